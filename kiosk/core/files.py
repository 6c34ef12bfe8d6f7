"""Small files written so that a crash leaves the old or the new content, never half; hashing; sizes;
and reading a file the user names without waiting forever or filling memory (read_input)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from pathlib import Path

from kiosk.core.errors import UsageError

CHUNK = 4 << 20


class InputRefused(UsageError):
    """An input file kiosk will not read: missing, not a regular file, too large or unreadable (exit 2).

    kind is "missing", "type", "size" or "os", so a caller can put the reason in its own words;
    reason is the text after the path, hint how to fix it."""

    def __init__(self, path, kind: str, reason: str, hint: str):
        self.path, self.kind, self.reason = str(path), kind, reason
        super().__init__(f"{path}: {reason}", hint)


_NOT_REGULAR = ((stat.S_ISDIR, "a directory"),
                (stat.S_ISFIFO, "a FIFO (named pipe): reading it would wait for a writer, maybe forever"),
                (stat.S_ISCHR, "a character device: reading it may never end (/dev/zero) or wait for input"),
                (stat.S_ISBLK, "a block device (a whole disk), not a file"),
                (stat.S_ISSOCK, "a socket"))


def _not_regular(mode: int) -> str | None:
    for test, words in _NOT_REGULAR:
        if test(mode):
            return words
    return None if stat.S_ISREG(mode) else "not a regular file"


def read_input(path: Path | str, limit: int, *, what: str = "file") -> bytes:
    """The bytes of a regular file the user named, at most `limit` of them; InputRefused otherwise.

    The file type is checked before opening and again on the open descriptor (opened non-blocking, so
    a FIFO swapped in meanwhile cannot block the open), and no more than limit+1 bytes are ever read:
    a FIFO, /dev/zero, a directory or a file growing under us cannot hang kiosk or fill its memory."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise InputRefused(path, "missing", "file not found", f"check the path of the {what}") from None
    except OSError as exc:
        raise InputRefused(path, "os", f"cannot read it: {exc.strerror}", "check the path and permissions") from None
    bad = _not_regular(info.st_mode)
    if bad:
        raise InputRefused(path, "type", f"is {bad}", f"name a regular {what}")
    too_big = InputRefused(path, "size", f"is larger than {human_size(limit)}, the most kiosk reads as a {what}",
                           f"name the right file; a {what} is much smaller than that")
    if info.st_size > limit:
        raise too_big
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise InputRefused(path, "os", f"cannot read it: {exc.strerror}", "check the path and permissions") from None
    try:
        bad = _not_regular(os.fstat(fd).st_mode)
        if bad:
            raise InputRefused(path, "type", f"is {bad}", f"name a regular {what}")
        parts, size = [], 0
        while size <= limit:
            block = os.read(fd, min(CHUNK, limit + 1 - size))
            if not block:
                break
            parts.append(block)
            size += len(block)
    except OSError as exc:
        raise InputRefused(path, "os", f"cannot read it: {exc.strerror}", "check the path and permissions") from None
    finally:
        os.close(fd)
    if size > limit:
        raise too_big
    return b"".join(parts)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
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
