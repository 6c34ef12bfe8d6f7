"""The window between a push's switch and git's ref update: pending.json, and what main says now.

pre-receive switches the device BEFORE git moves main (only then can a failed switch refuse the
push). pending.json records that push (commit, generation, the pid of git receive-pack) until
post-receive sees main at its commit; recover.py settles a pending push that never got there.
"""

from __future__ import annotations

from pathlib import Path

from kiosk.core.files import remove_durable
from kiosk.device.store import BRANCH, read_state, repo_dir, state_dir, write_state

FIELDS = {"commit": str, "generation": int, "previous": (int, type(None))}


def _pending_path(root: Path) -> Path:
    return state_dir(root) / "pending.json"


def process_start(pid: int) -> str | None:
    """When process `pid` started (so a recycled pid is not taken for it), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def write_pending(root: Path, commit: str, number: int, previous: int | None, pid: int) -> None:
    write_state(_pending_path(root), {"commit": commit, "generation": number, "previous": previous,
                                      "pid": pid, "pidStart": process_start(pid)})


def read_pending(root: Path) -> dict | None:
    """The unconfirmed push, or None; DamagedState when pending.json is not what write_pending wrote."""
    return read_state(_pending_path(root), FIELDS)


def clear_pending(root: Path) -> None:
    remove_durable(_pending_path(root))


def repo_main(root: Path) -> str | None:
    """The commit configuration.git's main points at (None without a repository or a main).

    Read from the ref files by GitPython, with no git process: inside a hook the environment names
    the hook's repository and quarantine (GIT_DIR, GIT_OBJECT_DIRECTORY...), and this must see the
    device's own repository as it is, whatever the caller's environment says."""
    path = repo_dir(root)
    if not path.is_dir():
        return None
    import git  # here, not at the top: every device command imports this module, few need GitPython
    with git.Repo(path) as repo:
        try:
            return git.SymbolicReference.dereference_recursive(repo, BRANCH)
        except ValueError:
            return None
