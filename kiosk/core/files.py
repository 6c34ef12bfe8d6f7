"""Small files written so that a crash leaves the old or the new content, never half; hashing; sizes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

CHUNK = 4 << 20


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
