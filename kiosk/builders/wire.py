"""The builder protocol on the wire, both sides: the answer's header, the tar that follows, their checks.

stdin is one JSON request line; stdout is one JSON header line and then exactly `payload.bytes`
bytes (a tar of the announced files); stderr lines that start with MARK are progress. The
receiving side trusts nothing: names, sizes and sha256s are checked while the stream is written.
One request is a conversation: `chunks` (a device fetching what its slot lacks, kiosk.builders.client
ChunkSession), whose lines after the header are chunk names one way and sized chunks the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
from pathlib import Path

from kiosk import __version__
from kiosk.core.errors import KioskError
from kiosk.core.files import human_size

PROTOCOL = 1
MARK = "kiosk-builder: "
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+~%_-]{0,250}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_HEADER = 64 << 20
MAX_REQUEST = 16 << 20   # a request line: a spec (at most 1 MiB) or a device's dpkg status (about 1 MiB)
CHUNK = 1 << 20


class BadAnswer(KioskError):
    """What a builder sent does not check out; nothing from it is used."""


class _Counted:
    """Reads at most `limit` bytes of a stream, hashing and counting them."""

    def __init__(self, raw, limit: int):
        self.raw = raw
        self.left = limit
        self.count = 0
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.raw.read(size)
        self.left -= len(data)
        self.count += len(data)
        self.digest.update(data)
        if not data:
            self.left = 0  # end of stream before the announced end
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def _write_member(source, dest: Path, size: int) -> str:
    """Copy one file out of the tar, leaving holes where it is zeros (a sparse image stays sparse)."""
    digest = hashlib.sha256()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            left = size
            while left > 0:
                chunk = source.read(min(CHUNK, left))
                if not chunk:
                    break
                digest.update(chunk)
                if chunk.count(0) == len(chunk):
                    out.seek(len(chunk), os.SEEK_CUR)
                else:
                    out.write(chunk)
                left -= len(chunk)
            out.truncate(size - left)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def check_header(header) -> tuple[dict[str, dict], dict]:
    """The files and payload a builder announces, checked for shape before a byte is read."""
    if not isinstance(header, dict) or not isinstance(header.get("files"), list) \
            or not isinstance(header.get("payload"), dict):
        raise BadAnswer("the builder's answer has no file list")
    files: dict[str, dict] = {}
    for item in header["files"]:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not FILE_NAME.match(name) or name in files:
            raise BadAnswer(f"the builder announced a bad or repeated file name {name!r}")
        if not isinstance(item.get("size"), int) or item["size"] < 0 \
                or not isinstance(item.get("sha256"), str) or not HEX64.match(item["sha256"]):
            raise BadAnswer(f"the builder announced {name} without a size and sha256")
        files[name] = item
    payload = header["payload"]
    if not isinstance(payload.get("bytes"), int) or payload["bytes"] < 0 \
            or not isinstance(payload.get("sha256"), str) or not HEX64.match(payload["sha256"]) \
            or payload.get("compression", "none") not in ("none", "xz"):
        raise BadAnswer("the builder's answer announces no payload size, sha256 and compression")
    return files, payload


def receive_payload(stream, header: dict, dest: Path) -> dict[str, Path]:
    """Read the payload the header announces from `stream` into dest; every check must pass.

    Files are written while the stream is hashed (no second copy on a small SD card); on any
    mismatch every file already written is deleted and BadAnswer says what did not match."""
    import lzma

    files, payload = check_header(header)
    total = payload["bytes"]
    need = sum(item["size"] for item in files.values())
    free = shutil.disk_usage(dest).free
    if need + (16 << 20) > free:
        raise BadAnswer(f"not enough free space for the {human_size(need)} it sends ({human_size(free)} free)")
    reader = _Counted(stream, total)
    written: dict[str, Path] = {}
    mode = "r|xz" if payload.get("compression") == "xz" else "r|"
    problem: str | None = None
    try:
        with tarfile.open(fileobj=reader, mode=mode) as tar:
            for member in tar:
                name = member.name
                if not member.isfile() or name not in files or name in written:
                    problem = f"unexpected entry {name!r} in the transfer"
                    break
                if member.size != files[name]["size"]:
                    problem = f"{name}: {member.size} bytes, but the manifest says {files[name]['size']}"
                    break
                path = dest / name
                written[name] = path
                digest = _write_member(tar.extractfile(member), path, member.size)
                if digest != files[name]["sha256"]:
                    problem = (f"{name}: checksum mismatch (sha256 {digest[:16]}..., the manifest says "
                               f"{files[name]['sha256'][:16]}...)")
                    break
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError) as exc:
        problem = f"the transfer is damaged ({type(exc).__name__}: {exc})"
    reader.drain()
    try:
        if reader.count < total:
            raise BadAnswer(f"the transfer was cut short after {reader.count} of {total} bytes")
        if reader.digest.hexdigest() != payload["sha256"]:
            raise BadAnswer(f"checksum mismatch: the {total}-byte transfer does not match the sha256 the builder "
                            f"announced (damaged on the way)")
        if problem:
            raise BadAnswer(problem)
        if stream.read(1):
            raise BadAnswer("the builder sent more bytes than it announced")
        missing = sorted(set(files) - set(written))
        if missing:
            raise BadAnswer(f"the transfer lacks {', '.join(missing)}")
    except BadAnswer:
        for path in written.values():
            path.unlink(missing_ok=True)
        raise
    return written


def tar_add(tar: tarfile.TarFile, path: Path, name: str) -> None:
    """One file into the answer's tar, with nothing of the builder in it (owner, mode, time)."""
    info = tarfile.TarInfo(name)
    info.size = path.stat().st_size
    info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
    with open(path, "rb") as f:
        tar.addfile(info, f)


def answer(out, header: dict, payload: Path | None = None) -> None:
    """The header line (with this side's protocol and version), then the payload's bytes."""
    header = dict(header, kiosk=PROTOCOL, version=__version__)
    out.write((json.dumps(header, sort_keys=True) + "\n").encode())
    if payload is not None:
        with open(payload, "rb") as f:
            shutil.copyfileobj(f, out, CHUNK)
    out.flush()
