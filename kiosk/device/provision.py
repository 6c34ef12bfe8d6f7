"""Generation 1, made inside an image's root tree at build time: configuration.git, its first commit, the links.

Also the boot unit that finishes or undoes an interrupted switch (kiosk-recover.service): it lives
outside every generation, so it runs even when a power cut left the pointers half-moved.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from kiosk.config.layer import Layer
from kiosk.core.errors import KioskError
from kiosk.core.run import run
from kiosk.device.links import live_path, reconcile
from kiosk.device.store import (BRANCH, DEVICE_STATE, generations_dir, repo_dir, set_pointer, state_dir,
                                utc_date, write_generation)

RECOVER_UNIT = "/etc/systemd/system/kiosk-recover.service"
SPEC_FILE = "nixiosk.json"
FIRST_MESSAGE = "nixiosk.json as built into the image"


def _git(args, *, env: dict | None = None, input: bytes | None = None) -> str:
    """Plain git, isolated from the caller: no GIT_* variable and no system or user configuration.

    Not GitPython: its commands always inherit the caller's environment (a GIT_DIR from an enclosing
    hook would redirect `git init`), and Commit.create_from_tree reads the user's ~/.gitconfig
    (i18n.commitEncoding adds a header: another commit id). Isolated plumbing keeps the first commit a
    function of the spec text and the epoch alone, byte for byte."""
    proc = run(["git", *args], input=input, text=False, drop_env=("GIT_",), what="configuration.git",
               env={"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", **(env or {})})
    return proc.stdout.decode().strip()


def commit_env(epoch: int) -> dict:
    date = f"@{epoch} +0000"
    return {"GIT_AUTHOR_NAME": "kiosk", "GIT_AUTHOR_EMAIL": "kiosk@localhost", "GIT_AUTHOR_DATE": date,
            "GIT_COMMITTER_NAME": "kiosk", "GIT_COMMITTER_EMAIL": "kiosk@localhost", "GIT_COMMITTER_DATE": date}


def _create_repository(repo: Path, spec_text: str, epoch: int, hooks_dir: Path) -> str:
    """configuration.git (bare, 0700, main, no non-fast-forwards, no deletes) holding spec_text as its
    first commit, with the hooks; returns the commit."""
    repo.parent.mkdir(parents=True, exist_ok=True)
    _git(["init", "--quiet", "--bare", "--template=", "--initial-branch=main", str(repo)])
    os.chmod(repo, 0o700)  # the spec holds Wi-Fi passphrases
    for key, value in (("receive.denyNonFastForwards", "true"), ("receive.denyDeletes", "true"),
                       ("receive.fsckObjects", "true"), ("gc.autoDetach", "false")):
        _git(["--git-dir", str(repo), "config", key, value])
    blob = _git(["--git-dir", str(repo), "hash-object", "-w", "--stdin"], input=spec_text.encode("utf-8"))
    tree = _git(["--git-dir", str(repo), "mktree"], input=f"100644 blob {blob}\t{SPEC_FILE}\n".encode())
    commit = _git(["--git-dir", str(repo), "commit-tree", tree, "-m", FIRST_MESSAGE], env=commit_env(epoch))
    _git(["--git-dir", str(repo), "update-ref", BRANCH, commit])
    hooks = repo / "hooks"
    hooks.mkdir(exist_ok=True)
    for name in ("pre-receive", "post-receive"):
        shutil.copyfile(Path(hooks_dir) / name, hooks / name)
        os.chmod(hooks / name, 0o755)
    return commit


def install_first_generation(root: Path, spec_text: str, layer: Layer, plan, *, epoch: int, hooks_dir: Path) -> str:
    """Generation 1 inside an image's root tree at build time; returns configuration.git's first commit.

    Creates ROOT/etc/kiosk/configuration.git holding spec_text as its first commit (author/committer
    kiosk, dates = epoch: a reproducible sha), copies the hooks in, writes generation 1 (status active),
    links it, and points current and default at it. Works on any tree (links still name the device
    path /var/lib/kiosk/current/...). `plan` is the build's own plan: its packages are generation 1's.
    """
    root = Path(root)
    repo = repo_dir(root)
    if repo.exists() or generations_dir(root).exists():
        raise KioskError(f"{root} already has generations or configuration.git",
                         hint="install_first_generation only makes the first one")
    commit = _create_repository(repo, spec_text, epoch, hooks_dir)

    state = state_dir(root)
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o755)
    gen = write_generation(root, spec_text, layer, commit=commit, packages=plan.packages,
                           previous=None, date=utc_date(epoch), status="active", mtime=epoch)
    reconcile(root, gen)
    set_pointer(root, "default", gen.number)
    fd = os.open(state / "lock", os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    # reproducible: every file and link made here carries SOURCE_DATE_EPOCH
    for top in (repo, state):
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames + filenames:
                os.utime(os.path.join(dirpath, name), (epoch, epoch), follow_symlinks=False)
        os.utime(top, (epoch, epoch))
    touched = {repo.parent, state.parent, state.parent.parent}
    for path in gen.manifest:
        live = live_path(root, path)
        touched.update(p for p in live.parents if p != root and root in p.parents)
        with contextlib.suppress(FileNotFoundError):
            os.utime(live, (epoch, epoch), follow_symlinks=False)
    for directory in touched:  # links replaced files: their directories' times changed
        with contextlib.suppress(FileNotFoundError):
            os.utime(directory, (epoch, epoch))
    return commit


def recovery_unit() -> tuple[str, str]:
    """The boot unit that finishes or undoes an interrupted switch before any kiosk service starts.

    It runs only when there is something to do (a journal, an unconfirmed push, or a default that
    differs from current after `kiosk switch test|boot`), so a normal boot pays nothing for it."""
    text = (
        "# Written by kiosk: finish or undo an interrupted generation switch, boot the default generation.\n"
        "[Unit]\n"
        "Description=Kiosk: recover an interrupted generation switch\n"
        "DefaultDependencies=no\n"
        "RequiresMountsFor=/var/lib/kiosk\n"
        # boot-firmware.mount: nofail mounts are not ordered before local-fs.target
        "After=local-fs.target systemd-remount-fs.service boot-firmware.mount\n"
        # Not Before=systemd-sysusers.service: that runs before local-fs-pre.target (tmpfiles-setup-dev needs
        # it), so with After=local-fs.target it made an ordering cycle and systemd dropped sysusers at boot.
        "Before=sysinit.target systemd-tmpfiles-setup.service shutdown.target\n"
        "Conflicts=shutdown.target\n"
        f"ConditionPathExists=|{DEVICE_STATE}/switch.json\n"
        f"ConditionPathExists=|{DEVICE_STATE}/pending.json\n"
        f"ConditionPathExists=|{DEVICE_STATE}/default-differs\n"
        f"ConditionPathExists=|{DEVICE_STATE}/trial.json\n"   # a new system being tried (device/system.py)
        f"ConditionPathExists=|!{DEVICE_STATE}/current\n"
        # a config.txt/cmdline.txt rewrite a power cut interrupted (device/bootconfig.py)
        "ConditionPathExistsGlob=|/boot/firmware/*.kiosk-new\n"
        "\n[Service]\n"
        "Type=oneshot\n"
        "ExecStart=/usr/bin/kiosk switch --recover --at-boot\n"
        "StandardOutput=journal+console\n"
        "\n[Install]\n"
        "WantedBy=sysinit.target\n")
    return RECOVER_UNIT, text


def recovery_layer() -> Layer:
    """recovery_unit() as layer entries, enabled (for the image build's base tree, not a generation)."""
    from kiosk.config.layer import file, symlink
    path, text = recovery_unit()
    return {path: file(text), "/etc/systemd/system/sysinit.target.wants/kiosk-recover.service": symlink(path)}
