"""Linking a generation into the live system, and checking that it is linked (like NixOS's /etc/static).

Every "file" entry of the layer becomes a link ROOT/<path> -> ../<...>/var/lib/kiosk/current/root/<path>
(relative, so it resolves the same on the device and inside any other tree), so flipping `current`
switches every unchanged-kind file at once; "dir" entries are real directories; "symlink" entries are
placed directly. Only what a generation placed is ever removed: a file someone put there stays.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from kiosk.core.errors import KioskError
from kiosk.core.files import fsync_dir
from kiosk.device.store import DEVICE_STATE, Generation, current, list_generations, set_pointer

LINK_PREFIX = DEVICE_STATE + "/current/root"   # what live links lead to, as seen on the device


def live_path(root: Path, path: str) -> Path:
    """Where a layer path is in the live tree under `root` (a path escaping it is refused)."""
    if not path.startswith("/") or ".." in path.split("/"):
        raise KioskError(f"bad layer path {path!r}")
    return Path(root) / path.lstrip("/")


def link_target(path: str) -> str:
    """Where the live link at `path` points: RELATIVE to its directory, through `current`
    (/etc/hostname -> ../var/lib/kiosk/current/root/etc/hostname). On the device it resolves exactly like
    the absolute /var/lib/kiosk/current/root/etc/hostname, and it also resolves inside any tree that is
    not "/": the image build's tree (systemd-sysusers/-tmpfiles --root ignore absolute links there:
    systemd 252), a card mounted on another machine, a test directory."""
    return os.path.relpath(LINK_PREFIX + path, os.path.dirname(path))


def _ours(path: str, dest: Path) -> bool:
    """A link this code placed for a "file" entry (either form, so older absolute links are recognised)."""
    return dest.is_symlink() and os.readlink(dest) in (link_target(path), LINK_PREFIX + path)


def _wanted_link(path: str, entry: dict) -> str | None:
    if entry["kind"] == "file":
        return link_target(path)
    if entry["kind"] == "symlink":
        return entry["target"]
    return None


def _place_symlink(dest: Path, target: str) -> None:
    tmp = dest.with_name(f".{dest.name}.kiosk-tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    try:
        os.replace(tmp, dest)
    except IsADirectoryError:
        tmp.unlink()
        raise KioskError(f"{dest}: is a directory on the device; the new generation wants a file there") from None


def ensure(root: Path, path: str, entry: dict, touched: set[Path]) -> None:
    """Put one manifest entry in place (idempotent); directories whose entries changed go into `touched`."""
    dest = live_path(root, path)
    if not dest.parent.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
    want = _wanted_link(path, entry)
    if want is not None:
        if not (dest.is_symlink() and os.readlink(dest) == want):
            _place_symlink(dest, want)
            touched.add(dest.parent)
        return
    # a real directory, with its mode and owner
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        dest.unlink()
    if not dest.is_dir():
        dest.mkdir()
        touched.add(dest.parent)
    os.chmod(dest, int(entry["mode"], 8))
    if os.geteuid() == 0:
        os.lchown(dest, entry["uid"], entry["gid"])


def remove_ours(root: Path, path: str, entry: dict, touched: set[Path]) -> None:
    """Remove what a generation put at `path`, and only that (a file someone put there stays)."""
    dest = live_path(root, path)
    want = _wanted_link(path, entry)
    if want is not None:
        if (dest.is_symlink() and os.readlink(dest) == want) or (entry["kind"] == "file" and _ours(path, dest)):
            dest.unlink()
            touched.add(dest.parent)
    elif dest.is_dir() and not dest.is_symlink():
        with contextlib.suppress(OSError):
            dest.rmdir()  # only when empty
            touched.add(dest.parent)


def conflicts(root: Path, manifest: dict) -> list[str]:
    """Paths the generation cannot take over: a real directory where it wants a file or symlink."""
    out = []
    for path, entry in manifest.items():
        dest = live_path(root, path)
        if entry["kind"] != "dir" and dest.is_dir() and not dest.is_symlink():
            out.append(f"{path}: is a directory on the device, the generation wants a {entry['kind']} there")
    return out


def sync(touched: set[Path]) -> None:
    """fsync the directories whose entries changed, so the links survive a power cut."""
    for directory in sorted(touched):
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(directory)
    touched.clear()


def reconcile(root: Path, target: Generation, others: list[Generation] = ()) -> None:
    """Make the live system exactly `target`: its links, dirs and symlinks in place, the others' extras gone,
    current -> target. Idempotent: recovery runs it whatever step a switch stopped at."""
    tm = target.manifest
    touched: set[Path] = set()
    for other in others:
        om = other.manifest
        for path in sorted(om, reverse=True):  # children before their directories
            if path not in tm:
                remove_ours(root, path, om[path], touched)
    for path in sorted(tm):
        ensure(root, path, tm[path], touched)
    sync(touched)
    set_pointer(root, "current", target.number)


def verify(root: Path) -> list[str]:
    """Problems with the live system (empty when consistent): every path of the current generation is
    linked into it and resolves to its file with the recorded digest; no other generation's link remains."""
    gen = current(root)
    if gen is None:
        return ["no current generation"]
    problems = []
    tm = gen.manifest
    for path, entry in tm.items():
        dest = live_path(root, path)
        want = _wanted_link(path, entry)
        if want is not None:
            if not dest.is_symlink() or os.readlink(dest) != want:
                problems.append(f"{path}: not linked to {want}")
            elif entry["kind"] == "file":
                real = gen.path / "root" / path.lstrip("/")
                if dest.resolve() != real.resolve():  # the whole chain, through `current`, inside the root
                    problems.append(f"{path}: resolves to {dest.resolve()}, not into generation {gen.number}")
                elif hashlib.sha256(real.read_bytes()).hexdigest() != entry["sha256"]:
                    problems.append(f"{path}: generation {gen.number}'s file differs from its manifest")
        elif not dest.is_dir() or dest.is_symlink():
            problems.append(f"{path}: not a directory")
    for other in list_generations(root):
        for path, entry in other.manifest.items():
            if path in tm:
                continue
            dest = live_path(root, path)
            want = _wanted_link(path, entry)
            if want is not None and ((dest.is_symlink() and os.readlink(dest) == want)
                                     or (entry["kind"] == "file" and _ours(path, dest))):
                problems.append(f"{path}: still linked for generation {other.number}")
    return problems
