"""Small files written so that a crash leaves the old or the new content, never half; files placed
inside a tree without ever leaving it; hashing; sizes; the kernel's mount table. Reading a file the user
names safely is kiosk.core.inputs."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import signal
import stat
from pathlib import Path

from kiosk.core.errors import Refused, one_line
from kiosk.core.paths import setting

CHUNK = 4 << 20


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def crash_point(step: str) -> None:
    """Tests kill the process here (a real SIGKILL) to prove recovery: KIOSK_TEST_CRASH_AT=<step>."""
    if setting("KIOSK_TEST_CRASH_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


def write_atomic(path: Path, data: str | bytes, mode: int = 0o644, *, durable: bool = False) -> None:
    """Write to a temporary name beside `path`, then rename over it: readers see old or new, never half.

    durable: also fsync the file and its directory, so a power cut keeps one of the two (device state).
    Without it (build trees, output files) the rename alone is enough and much cheaper.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.kiosk-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data.encode() if isinstance(data, str) else data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def _parts_in_root(relpath: str) -> list[str]:
    """The names of a path inside a tree ("/etc/kiosk/key" and "etc/kiosk/key" alike); ".." refused."""
    if not isinstance(relpath, str) or "\0" in relpath:
        raise Refused(f"{one_line(repr(relpath))}: not a path")
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Refused(f"{one_line(relpath)}: \"..\" leads out of the tree; kiosk places files only inside it",
                      hint="give the path without \"..\"")
    if not parts:
        raise Refused(f"{one_line(repr(relpath))}: names no file")
    return parts


def _open_dirs(root: Path, parts: list[str], relpath: str, *, create: bool, dir_mode: int = 0o755) -> int | None:
    """An fd of the directory parts name inside root, each component opened from the one before with
    O_NOFOLLOW: a symbolic link (or anything but a directory) on the way is refused, never followed.
    With create=False, None when a directory on the way does not exist yet (nothing further to check)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, name in enumerate(parts):
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            try:
                try:
                    nxt = os.open(name, flags, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        return None
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, dir_mode, dir_fd=fd)
                    nxt = os.open(name, flags, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                where = one_line("/" + "/".join(parts[:i + 1]))
                st = os.lstat(name, dir_fd=fd)
                if stat.S_ISLNK(st.st_mode):
                    target = one_line(os.readlink(name, dir_fd=fd))
                    raise Refused(f"{one_line(relpath)}: {where} is a symbolic link in the tree (to {target}); "
                                  "kiosk writes nothing through links, which may lead out of it",
                                  hint="choose a path whose directories are real ones, e.g. under /etc/kiosk") from None
                raise Refused(f"{one_line(relpath)}: {where} is not a directory in the tree") from None
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def check_in_root(root: Path, relpath: str) -> None:
    """Refuse (Refused) a path that write_in_root would refuse: "..", or a link or non-directory on the
    way among the directories that exist already; a directory at the name itself."""
    parts = _parts_in_root(relpath)
    fd = _open_dirs(root, parts[:-1], relpath, create=False)
    if fd is None:
        return
    try:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.lstat(parts[-1], dir_fd=fd).st_mode):
                raise Refused(f"{one_line(relpath)}: a directory is there in the tree")
    finally:
        os.close(fd)


def write_in_root(root: Path, relpath: str, data: str | bytes, mode: int = 0o644, *, mtime: int | None = None,
                  owner: tuple[int, int] | None = None, dir_mode: int = 0o755, durable: bool = False) -> Path:
    """Write `data` at `relpath` inside the tree `root`, and never outside it, whatever the tree holds.

    relpath is the path as the tree's own system sees it ("/etc/kiosk/key" or "etc/kiosk/key"). ".." is
    refused. Every directory on the way is opened from the one before with O_NOFOLLOW (openat-style,
    starting at a descriptor of root), so a symbolic link on the way (var/run -> /run, or one planted
    at the file's parent) is refused with Refused, never followed; missing directories are made
    (dir_mode). The file goes in as write_atomic does: a fresh temporary (O_EXCL, O_NOFOLLOW) in that
    directory, then a rename over the name, so whatever was at the name (a link, a FIFO, a device node)
    is replaced, never written through or opened. owner: (uid, gid); mtime: its atime and mtime.
    Returns root/relpath.
    """
    parts = _parts_in_root(relpath)
    fd = _open_dirs(Path(root), parts[:-1], relpath, create=True, dir_mode=dir_mode)
    name = parts[-1]
    try:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISDIR(os.lstat(name, dir_fd=fd).st_mode):
                raise Refused(f"{one_line(relpath)}: a directory is there in the tree")
        tmp = f".kiosk-tmp-{secrets.token_hex(8)}"
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=fd)
        try:
            try:
                view = memoryview(data.encode() if isinstance(data, str) else data)
                while view:
                    view = view[os.write(out, view):]
                if owner is not None:
                    os.fchown(out, *owner)
                os.fchmod(out, mode)
                if mtime is not None:
                    os.utime(out, (mtime, mtime))
                if durable:
                    os.fsync(out)
            finally:
                os.close(out)
            os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=fd)
            raise
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    return Path(root).joinpath(*parts)


def write_durable(path: Path, data: bytes, mode: int = 0o644) -> None:
    """write_atomic with fsyncs: survives a power cut as the old or the new content."""
    write_atomic(path, data, mode, durable=True)


def json_text(data, indent: int = 2) -> str:
    return json.dumps(data, indent=indent, sort_keys=True) + "\n"


def write_json(path: Path, data, mode: int = 0o644, *, durable: bool = False, indent: int = 2) -> None:
    write_atomic(path, json_text(data, indent), mode, durable=durable)


def read_json(path: Path):
    """The file's JSON, or None when there is no such file."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def remove_durable(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        fsync_dir(path.parent)


def sha256_file(path: Path | str, chunk: int = CHUNK) -> str:
    """The file's sha256; its holes are hashed as the zeros they read as, without reading them (an A/B
    image is mostly the empty slot B: 3 GB of hole)."""
    digest = hashlib.sha256()
    zeros = bytes(chunk)
    with open(path, "rb") as f:
        fd = f.fileno()
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):   # a device or a pipe: no holes to skip
            for block in iter(lambda: f.read(chunk), b""):
                digest.update(block)
            return digest.hexdigest()
        size = info.st_size
        offset = 0
        while offset < size:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:   # ENXIO: only a hole is left
                if exc.errno != errno.ENXIO:
                    raise
                data = size
            for start in range(offset, data, chunk):
                digest.update(zeros[:min(chunk, data - start)])
            if data >= size:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            f.seek(data)
            left = hole - data
            while left:
                block = f.read(min(chunk, left))
                if not block:
                    raise OSError(f"{path}: shorter than its size while hashing")
                digest.update(block)
                left -= len(block)
            offset = hole
    return digest.hexdigest()



def human_size(size: int) -> str:
    """1536 -> '1.5 KiB' (the style of bmaptool's comments and of kiosk's messages)."""
    if size < 1024:
        return f"{size} bytes" if size != 1 else "1 byte"
    value = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024.0
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024.0:.1f} PiB"


def unescape_octal(text: str) -> str:
    """Mount points and swap file names escape spaces etc. as octal (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), text)


def mount_table(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[tuple[str, str, str]]:
    """(major:minor, mount point, source) for every mount in mountinfo ([] when it cannot be read)."""
    out = []
    try:
        lines = Path(mountinfo).read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5:
            out.append((fields[2], unescape_octal(fields[4]), unescape_octal(tail[1]) if len(tail) >= 2 else ""))
    return out
