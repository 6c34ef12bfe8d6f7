"""Where an image's bytes come from: a sparse .img read at any offset, or a compressed image read as a stream.

A compressed image (.img.zst, .img.xz, .img.gz) is never unpacked to disk: it is decompressed as
it is written, forwards only. The writer asks for pieces in ascending order, so a stream serves
them by decompressing and dropping the bytes of the holes in between; a read behind the current
place (only when a failed check hashes one range of the image again) starts the stream again.
The stream is read to its very end before the card gets its partition table: the formats' own
checks (zstd's and xz's checksums, gzip's CRC and length) and the decompressed length against
the block map are part of what is verified.

zstd runs as the `zstd` program on a pipe (its own process, so it decompresses on another core
while this one writes and hashes; no Python dependency); xz and gzip use Python's lzma and
gzip modules, which release the GIL while they decompress. notes/flash.md has the figures.
"""

from __future__ import annotations

import fcntl
import gzip
import lzma
import mmap
import os
import shutil
import zlib
from pathlib import Path

from kiosk.core.errors import KioskError, UsageError, one_line
from kiosk.core.run import PIPE, start

# suffix -> (format name as users know it, the magic bytes every such file starts with)
COMPRESSED = {".zst": ("zstd", b"\x28\xb5\x2f\xfd"), ".xz": ("xz", b"\xfd7zXZ\x00"), ".gz": ("gzip", b"\x1f\x8b")}
_PIPE_BYTES = 1 << 20        # a zstd pipe this large wakes the reader 16 times less often than the default 64 KiB
_F_SETPIPE_SZ = 1031
_SKIP = 4 << 20              # bytes dropped per read while skipping a hole of the stream


class InvalidImage(KioskError):
    """A compressed image that is cut short, corrupt, or not the length its block map says; exit status 1."""


def compression(path: Path | str) -> str | None:
    """'zstd', 'xz' or 'gzip' for IMAGE.zst/.xz/.gz (the name decides, as for bmaptool); None for a plain image."""
    entry = COMPRESSED.get(Path(path).suffix)
    return entry[0] if entry else None


def uncompressed_name(path: Path | str) -> str:
    """IMAGE.img.zst -> IMAGE.img (where the block map of the uncompressed image is looked for)."""
    path = str(path)
    return path[:-len(Path(path).suffix)] if compression(path) else path


def reopen(fd: int) -> int:
    """A descriptor of the same file with its own offset (each card's stream reads it at its own pace)."""
    return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)


class ImageFile:
    """A plain image: any piece, at any offset (pread)."""

    def __init__(self, fd: int, label: str):
        self.fd, self.label = fd, label

    def read(self, view: memoryview, start: int) -> None:
        """Fill `view` with the image's bytes from `start` on."""
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], start + done)
            if n == 0:
                raise KioskError(f"{self.label} ends at byte {start + done}, before the block map says it does")
            done += n

    def finish(self, size: int) -> None:
        """Nothing to check at the end of a plain file (its size was checked against the map before)."""

    def close(self) -> None:
        """The descriptor belongs to the caller."""


class Stream:
    """A compressed image, decompressed forwards as it is read; `size` is what the block map says it holds."""

    def __init__(self, fd: int, label: str, kind: str, size: int | None):
        self.image_fd, self.label, self.kind, self.size = fd, label, kind, size
        self.fd: int | None = None     # this stream's own descriptor of the compressed file
        self.proc = None               # zstd
        self.reader = None             # lzma / gzip file object, over `raw`
        self.raw = None
        self.pos = 0                   # bytes of the decompressed image handed out or dropped so far
        self.scratch = None

    # -- the decompressors --------------------------------------------------------------------

    def _open(self) -> None:
        self.close()
        self.fd, self.pos = reopen(self.image_fd), 0
        if self.kind == "zstd":
            # Its own session: Ctrl-C on the terminal reaches kiosk, which stops it (not zstd dying first).
            self.proc = start(["zstd", "-d", "-c", "-q", "--no-progress"], stdin=self.fd, stdout=PIPE,
                              stderr=PIPE, start_new_session=True, what="decompressing the image")
            try:
                fcntl.fcntl(self.proc.stdout.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
            except OSError:
                pass   # (a smaller pipe only costs wake-ups)
            os.close(self.fd)
            self.fd = None
        else:
            raw = os.fdopen(self.fd, "rb", buffering=1 << 20, closefd=True)
            self.fd = None
            self.reader = lzma.LZMAFile(raw) if self.kind == "xz" else gzip.GzipFile(fileobj=raw, mode="rb")
            self.raw = raw

    def _started(self) -> bool:
        return self.proc is not None or self.reader is not None

    def _read_some(self, view: memoryview) -> int:
        """Up to len(view) decompressed bytes into view; 0 at the end of the stream (checked by _end)."""
        try:
            if self.proc is not None:
                return os.readv(self.proc.stdout.fileno(), [view])
            return self.reader.readinto(view)
        except EOFError:
            raise self._invalid(f"is cut short: the {self.kind} data ends before its end marker") from None
        except (lzma.LZMAError, gzip.BadGzipFile, zlib.error) as exc:
            raise self._invalid(f"is corrupt: {self.kind} says {str(exc)!r}") from None

    def _end(self) -> None:
        """The decompressor reached the end: did it end well?"""
        if self.proc is not None:
            self.proc.stdout.close()
            why = self.proc.stderr.read().decode(errors="replace")
            code = self.proc.wait()
            self.proc.stderr.close()
            self.proc = None
            if code != 0:
                lines = [line.strip() for line in why.splitlines() if line.strip()]
                said = lines[-1].split(": ")[-1] if lines else f"exited with status {code}"
                raise self._invalid(f"is corrupt or cut short: zstd says {said!r}")

    def _invalid(self, why: str) -> InvalidImage:
        return InvalidImage(one_line(f"{self.label} {why} (after {self.pos} bytes of the image)"),
                            hint="download or build the image again")

    # -- what the writer uses -----------------------------------------------------------------

    def read(self, view: memoryview, start: int) -> None:
        """Fill `view` with the image's bytes from `start` on, dropping what lies between."""
        if not self._started() or start < self.pos:
            self._open()
        self._skip(start - self.pos)
        done = 0
        while done < len(view):
            n = self._read_some(view[done:])
            if n == 0:
                self._end()
                raise self._short()
            done += n
            self.pos += n

    def _skip(self, count: int) -> None:
        if count and self.scratch is None:
            self.scratch = mmap.mmap(-1, _SKIP)
        while count > 0:
            n = self._read_some(memoryview(self.scratch)[:min(count, _SKIP)])
            if n == 0:
                self._end()
                raise self._short()
            count -= n
            self.pos += n

    def _short(self) -> InvalidImage:
        return InvalidImage(one_line(f"{self.label} decompresses to {self.pos} bytes, but its block map says "
                                     f"the image has {self.size}"),
                            hint="pass the map of this image with --bmap, or download or build it again")

    def finish(self, size: int) -> None:
        """Read to the end of the stream: it must end well, exactly at `size` bytes."""
        if not self._started():
            self._open()
        self._skip(size - self.pos)
        extra = self._read_some(memoryview(bytearray(1)))
        if extra:
            self.pos += extra
            raise InvalidImage(one_line(f"{self.label} decompresses to more than the {size} bytes its block "
                                        f"map says the image has"),
                               hint="pass the map of this image with --bmap, or download or build it again")
        self._end()
        self.close()

    def measure(self) -> int:
        """The decompressed length, by decompressing it all (for an image that came without a block map)."""
        self._open()
        buf = mmap.mmap(-1, _SKIP)
        while n := self._read_some(memoryview(buf)):
            self.pos += n
        self._end()
        size = self.pos
        self.close()
        return size

    def close(self) -> None:
        """Stop the decompressor (kill zstd, close the files); reading again starts from the beginning."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for pipe in (self.proc.stdout, self.proc.stderr):
                pipe.close()
            self.proc = None
        if self.reader is not None:
            self.reader.close()
            self.raw.close()
            self.reader = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def open_source(fd: int, path: Path | str, size: int | None):
    """The image behind fd as the writer reads it: ImageFile, or a Stream for a compressed name."""
    kind = compression(path)
    return Stream(fd, str(path), kind, size) if kind else ImageFile(fd, str(path))


def check_compressed(fd: int, path: Path | str) -> None:
    """A .zst/.xz/.gz name must hold that format, and zstd must be at hand: said before anything is written."""
    kind = compression(path)
    if not kind:
        return
    if kind == "zstd" and not shutil.which("zstd"):
        raise KioskError(f"{path} is zstd-compressed and zstd is not installed",
                         hint="install it (apt install zstd), or give the uncompressed image")
    magic = COMPRESSED[Path(path).suffix][1]
    try:
        head = os.pread(fd, len(magic), 0)
    except OSError as exc:
        raise UsageError(one_line(f"cannot read the image {path}: {exc.strerror}")) from None
    if head != magic:
        raise UsageError(one_line(f"{path} is not a {kind} file (its name ends in {Path(path).suffix})"),
                         hint=f"rename it to what it holds, or give the {kind} image")

