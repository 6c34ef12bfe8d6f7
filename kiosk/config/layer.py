"""A configuration layer: the files a spec puts on top of the base root filesystem.

The renderer produces a Layer (pure data); the image builder writes it into the
root tree at build time and the device writes it into generation N on a push.
Entries are keyed by absolute path ("/etc/hostname") and applied in sorted order,
so the result never depends on dict order.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Entry:
    kind: str                 # "file", "dir" or "symlink"
    mode: int = 0o644
    data: bytes = b""         # file contents
    target: str = ""          # symlink target
    uid: int = 0
    gid: int = 0

    def digest(self) -> str:
        h = hashlib.sha256(f"{self.kind}:{self.mode:o}:{self.uid}:{self.gid}:{self.target}:".encode())
        h.update(self.data)
        return h.hexdigest()


def file(data: str | bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Entry:
    return Entry("file", mode, data.encode() if isinstance(data, str) else data, uid=uid, gid=gid)


def directory(mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    return Entry("dir", mode, uid=uid, gid=gid)


def symlink(target: str) -> Entry:
    return Entry("symlink", 0o777, target=target)


Layer = dict[str, Entry]


def _inside(root: Path, path: str) -> Path:
    if not path.startswith("/") or ".." in Path(path).parts:
        raise ValueError(f"layer path must be absolute and without '..': {path!r}")
    return root / path.lstrip("/")


def apply_layer(layer: Layer, root: Path, *, mtime: int | None = None) -> None:
    """Write every entry under root (parents first), replacing what is there.

    Files are written to a temporary name and renamed, so a reader never sees half a
    file; mtime (SOURCE_DATE_EPOCH) makes the result reproducible. Ownership is set
    only when running as root.
    """
    for path in sorted(layer):
        entry = layer[path]
        dest = _inside(root, path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if entry.kind == "dir":
            dest.mkdir(exist_ok=True)
            os.chmod(dest, entry.mode)
        elif entry.kind == "symlink":
            tmp = dest.with_name(f".{dest.name}.kiosk-tmp")
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(entry.target, tmp)
            os.replace(tmp, dest)
        elif entry.kind == "file":
            tmp = dest.with_name(f".{dest.name}.kiosk-tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, entry.mode)
            try:
                os.write(fd, entry.data)
                os.fchmod(fd, entry.mode)  # umask must not widen or narrow the declared mode
            finally:
                os.close(fd)
            os.replace(tmp, dest)
        else:
            raise ValueError(f"unknown layer entry kind {entry.kind!r} for {path}")
        if os.geteuid() == 0:
            os.lchown(dest, entry.uid, entry.gid)
        if mtime is not None:
            os.utime(dest, (mtime, mtime), follow_symlinks=False)
