"""Writing an image's mapped ranges to a target, and reading them back to check them.

Speed: only the mapped ranges of the block map are written, in aligned chunks of up to
4 MiB, while a reader thread reads the next chunks (from the image file, or decompressing
a compressed image forwards: source.py).

Trust: every written range is read back bypassing the page cache and compared with the
block map's checksums (or, for a map without checksums, with the hashes of the image
computed while writing). The read-back runs in a thread behind the writer, on what an
fdatasync has made durable, so checking costs little more than writing; the partition
table goes on last, after the rest has been read back and found right.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import queue
import threading
import time
from dataclasses import dataclass, field

from kiosk.core.errors import KioskError
from kiosk.flash.progress import Progress, Quiet
from kiosk.flash.source import ImageFile

CHUNK = 4 << 20          # bytes per write: large and aligned, what SD cards like
VERIFY_BATCH = 64 << 20  # bytes written between an fdatasync and handing them to the read-back
HEAD_BYTES = 1 << 20     # the partition table region, written last


class VerifyFailed(KioskError):
    """Read-back differs from the image; exit status 1. `ranges`: indices of the differing ranges."""

    exit_code = 1

    def __init__(self, message: str, ranges=(), hint: str = ""):
        super().__init__(message, hint=hint)
        self.ranges = list(ranges)


@dataclass
class Written:
    """What write_image did: bytes written and the per-range digests the target must read back as."""

    bytes: int = 0
    seconds: float = 0.0
    expected: list = field(default_factory=list)   # hex digest per range of the block map
    kind: str = "sha256"
    late: list = field(default_factory=list)      # ranges still to read back (they overlap the head)


def pieces(bmap, lo: int = 0, hi: int | None = None, ranges=None):
    """(start, end, range index) byte pieces of the mapped ranges within [lo, hi), cut at CHUNK boundaries.

    `ranges`, if given, keeps only the ranges with those indices.
    """
    hi = bmap.image_size if hi is None else hi
    for index, (first, last, _) in enumerate(bmap.ranges):
        if ranges is not None and index not in ranges:
            continue
        start, end = bmap.byte_range(first, last)
        start, end = max(start, lo), min(end, hi)
        while start < end:
            cut = min(end, (start // CHUNK + 1) * CHUNK)
            yield start, cut, index
            start = cut


def _pwrite_full(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


class _Reader:
    """Reads pieces in a thread, a few chunks ahead of the consumer, so I/O overlaps hashing and writing.

    `read(view, start, end)` fills view with bytes [start, end). With `hashers`, the thread also
    hashes each piece into hashers[index] (writing: the writer thread only writes); without, the
    consumer hashes (verifying: reading the card overlaps hashing what was read).
    """

    def __init__(self, read, todo, hashers=None, depth=4):
        self.read, self.todo, self.hashers = read, todo, hashers
        self.free = queue.Queue()
        for _ in range(depth):
            self.free.put(mmap.mmap(-1, CHUNK + 4096))  # page-aligned: usable for O_DIRECT
        self.ready = queue.Queue()
        self.empty = queue.Empty
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kiosk-flash-reader", daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for start, end, index in self.todo:
                buf = None
                while buf is None:
                    if self.stop.is_set():
                        return
                    try:
                        buf = self.free.get(timeout=0.1)
                    except self.empty:
                        buf = None
                self.read(memoryview(buf), start, end)
                if self.hashers is not None:
                    self.hashers[index].update(memoryview(buf)[:end - start])
                self.ready.put((start, end, index, buf))
        except BaseException as exc:  # handed to the consumer, which raises it
            self.ready.put(exc)
            return
        self.ready.put(None)

    def __iter__(self):
        while True:
            item = self.ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, buf):
        self.free.put(buf)

    def close(self):
        self.stop.set()
        self.thread.join(timeout=5)


def write_image(src, dst: int, bmap, *, progress=None, head_last: bool = False,
                direct_dst: int | None = None, label: str = "the image", verify_path: str | None = None,
                verify_label: str | None = None, progress_for=Progress) -> Written:
    """Write the mapped ranges of `bmap` from `src` to fd `dst`, then fsync; return digests to verify.

    `src` is a source.ImageFile or source.Stream (a compressed image, read forwards), or a plain
    image's fd. A stream is read to its end, and checked there, before the head is written.

    With `head_last` (block devices) the first HEAD_BYTES (1 MiB: MBR, GPT and the
    alignment gap) are handled apart: first zeroed on the card and synced, then
    everything else is written and synced, and only then the image's own first
    MiB. While the card is being written it therefore has no partition table:
    neither the old one (now pointing at half-overwritten file systems) nor the
    new one (pointing at file systems not yet written). An interrupted write
    leaves a card that mounts nothing and boots nothing, instead of one that
    looks fine and fails later; running the command again fixes it.

    `direct_dst`, if given, is an O_DIRECT descriptor of the same target used for
    every sector-aligned piece (no page cache filling up, progress that is true).

    With `verify_path` (the target, opened again for reading) the target is read back while
    it is written (_Behind): each VERIFY_BATCH is fdatasync'ed and handed over, and the
    head is written only once all of it has been read back right. Ranges that overlap the
    head are left to the caller (Written.late). The image is then hashed only if the map
    has no checksums: the read-back against the map's checksums checks the image too, and
    a mismatch is blamed on the image or on the card by hashing that range of the image.

    `progress_for(what, total)` makes the read-back's progress line.

    Raises KioskError when the image does not match the map's checksums.
    """
    progress = progress or Quiet()
    src = ImageFile(src, label) if isinstance(src, int) else src
    kind = bmap.checksum_type or "sha256"
    stated = [digest for _, _, digest in bmap.ranges]
    hash_image = verify_path is None or None in stated
    hashers = [hashlib.new(kind) for _ in bmap.ranges] if hash_image else None
    range_end = [bmap.byte_range(first, last)[1] for first, last, _ in bmap.ranges]
    expected = list(stated)   # filled in as the image is hashed, where the map has no checksums
    result = Written(kind=kind, expected=expected)
    head_end = min(HEAD_BYTES, bmap.image_size) if head_last else 0
    result.late = [i for i, (first, _, _) in enumerate(bmap.ranges) if first * bmap.block_size < head_end]
    late = set(result.late)
    total = bmap.mapped_bytes
    started = time.monotonic()

    def mismatch(index: int, actual: str) -> KioskError:
        first, last, _ = bmap.ranges[index]
        start, end = bmap.byte_range(first, last)
        return KioskError(f"{label} does not match its block map: blocks {first}-{last} "
                          f"(bytes {start}-{end - 1}) have {kind} {actual}, the map says {stated[index]}",
                          hint="rebuild the image or its map")

    def range_done(index: int) -> None:
        if not hash_image:
            return
        actual = hashers[index].hexdigest()
        if stated[index] is not None and stated[index] != actual:
            raise mismatch(index, actual)
        expected[index] = actual

    def out_fd(start: int, end: int) -> int:
        if direct_dst is not None and start % 512 == 0 and (end - start) % 512 == 0:
            return direct_dst
        return dst

    # The head: read (and hash) it now (it comes first in every range's byte order), write it last.
    head = []
    for start, end, index in pieces(bmap, 0, head_end):
        buf = mmap.mmap(-1, end - start + (-(end - start) % 4096))
        view = memoryview(buf)[:end - start]
        src.read(view, start)
        if hash_image:
            hashers[index].update(view)
        head.append((start, end, index, buf))
        if end == range_end[index]:
            range_done(index)
    if head_end:
        zeros = mmap.mmap(-1, head_end + (-head_end % 4096))
        _pwrite_full(out_fd(0, head_end), memoryview(zeros)[:head_end], 0)
        os.fsync(dst)
        result.bytes += head_end

    done, batch, batched = 0, [], 0
    behind = _Behind(verify_path, bmap, expected, kind, verify_label or verify_path,
                     progress_for) if verify_path else None
    reader = _Reader(lambda view, start, end: src.read(view[:end - start], start), pieces(bmap, head_end), hashers)
    try:
        for start, end, index, buf in reader:
            _pwrite_full(out_fd(start, end), memoryview(buf)[:end - start], start)
            reader.release(buf)
            done += end - start
            result.bytes += end - start
            progress.update(done)
            if end == range_end[index]:
                range_done(index)
            if behind is not None and index not in late:
                batch.append((start, end, index))
                batched += end - start
                if batched >= VERIFY_BATCH:
                    os.fdatasync(dst)
                    behind.publish(batch)
                    batch, batched = [], 0
        os.fsync(dst)
        if behind is not None:
            behind.publish(batch)
        src.finish(bmap.image_size)   # a stream's end and its checks, while the last batch is read back
    except BaseException:   # (the fsync too: a card pulled out there must not leave the read-back waiting)
        if behind is not None:
            behind.abandon()
        raise
    finally:
        reader.close()
    if behind is not None:
        progress.update(done, force=True)
        progress.close()
        try:
            behind.finish()
        except VerifyFailed as failed:
            for index in failed.ranges if not hash_image else ():
                actual = _range_digest(src, bmap, index, kind)
                if actual != stated[index]:
                    raise mismatch(index, actual) from None
            raise
    for start, end, index, buf in head:
        _pwrite_full(out_fd(start, end), memoryview(buf)[:end - start], start)
        done += end - start
        result.bytes += end - start
    os.fsync(dst)
    if behind is None:   # (with it, the line was closed before the read-back's; the head is at most 1 MiB)
        progress.update(done, force=True)
    result.seconds = time.monotonic() - started
    assert done == total
    return result


def _open_for_reading(path: str, direct: bool = True) -> tuple[int, bool]:
    """A descriptor that reads from the medium, not from pages kiosk itself just wrote.

    O_DIRECT where the kernel allows it; otherwise (and in any case first) the
    target's cached pages are dropped with posix_fadvise(DONTNEED) after the fsync.
    """
    fd = None
    if direct and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            fd = None
    if fd is None:
        direct = False
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return fd, direct


def verify(path: str, bmap, expected: list[str], kind: str, *, progress=None, label: str | None = None,
           todo=None) -> int:
    """Read every mapped range of `path` back, past the page cache, and compare with `expected`.

    `todo` (default: all of `pieces(bmap)`) may be a subset of whole ranges, or a stream that
    waits for the writer (_Behind).
    Raises VerifyFailed naming the first differing range (block numbers and byte
    offsets) and how many differ; returns the bytes read.
    """
    label = label or path
    progress = progress or Quiet()
    fd, direct = _open_for_reading(path)
    short: set[int] = set()   # pieces (by start) the target could not give in full: it ends there

    def read(view: memoryview, start: int, end: int) -> None:
        """Bytes [start, end) of the target into view; short only where the target itself ends."""
        nonlocal fd, direct
        want, got = end - start, 0
        while got < want:
            # O_DIRECT reads whole sectors: round up (a disk's size is whole sectors, a file just
            # reads short at its end); only the image's bytes are hashed.
            ask = want - got + (-(want - got) % 512) if direct else want - got
            if not direct:   # pages the writer left behind must not stand in for the medium
                os.posix_fadvise(fd, start + got, ask, os.POSIX_FADV_DONTNEED)
            try:
                n = os.preadv(fd, [view[got:got + ask]], start + got)
            except OSError as exc:
                if direct and exc.errno == errno.EINVAL:  # this file system wants other alignment
                    os.close(fd)
                    fd, direct = _open_for_reading(path, direct=False)
                    continue
                raise
            if n == 0:
                short.add(start)
                return
            got += n

    hashers = [hashlib.new(kind) for _ in bmap.ranges]
    range_end = [bmap.byte_range(first, last)[1] for first, last, _ in bmap.ranges]
    done = 0
    bad: dict[int, None] = {}   # differing ranges, in order
    reader = _Reader(read, pieces(bmap) if todo is None else todo)
    try:
        for start, end, index, buf in reader:
            hashers[index].update(memoryview(buf)[:end - start])
            reader.release(buf)
            done += end - start
            progress.update(done)
            if start in short or (end == range_end[index] and hashers[index].hexdigest() != expected[index]):
                bad[index] = None
        progress.update(done, force=True)
    finally:
        reader.close()
        os.close(fd)
    bad = list(bad)
    if bad:
        first, last, _ = bmap.ranges[bad[0]]
        start, end = bmap.byte_range(first, last)
        more = f" (and {len(bad) - 1} more of {len(bmap.ranges)} ranges)" if len(bad) > 1 else ""
        raise VerifyFailed(f"verification failed: {label} differs from the image in blocks {first}-{last} "
                           f"(bytes {start}-{end - 1}){more}", bad,
                           hint="write it again, and if it fails again the card is faulty or fake: use another card")
    return done


class _Behind:
    """Reads back, in its own thread, what the writer has made durable (fdatasync), as it goes.

    The writer publishes batches of pieces; `finish()` waits for the read-back of all of
    them, showing progress, and raises its VerifyFailed or I/O error. On an SD card this
    costs about what reading afterwards would; where reads and writes overlap (USB SSDs,
    loop devices) the check is almost free.
    """

    def __init__(self, path: str, bmap, expected: list, kind: str, label: str, progress_for=Progress):
        self.label, self.batches, self.published, self.done = label, queue.Queue(), 0, 0
        self.error: BaseException | None = None
        self.progress = progress_for(f"verifying {label}", 0)   # shown by finish(); its rate counts from now
        self.thread = threading.Thread(target=self._run, args=(path, bmap, expected, kind),
                                       name="kiosk-flash-verify", daemon=True)
        self.thread.start()

    def _stream(self):
        while (batch := self.batches.get()) is not None:
            yield from batch

    def _run(self, path, bmap, expected, kind):
        try:
            verify(path, bmap, expected, kind, progress=self, label=self.label, todo=self._stream())
        except BaseException as exc:   # raised again by finish(), in the writer's thread
            self.error = exc

    def update(self, done: int, force: bool = False) -> None:   # verify()'s progress
        self.done = done

    def publish(self, batch: list) -> None:
        if batch:
            self.batches.put(batch)
            self.published += sum(end - start for start, end, _ in batch)

    def finish(self) -> int:
        """Wait until everything published has been read back; the bytes read back."""
        self.batches.put(None)
        progress, progress.total = self.progress, self.published
        try:
            while self.thread.is_alive():
                self.thread.join(0.25)
                progress.update(self.done)
            progress.update(self.done, force=True)
        finally:
            progress.close()
        if self.error is not None:
            raise self.error
        return self.done

    def abandon(self) -> None:
        """The writer failed: let the thread end (it stops at the end of what was published)."""
        self.batches.put(None)


def verify_late(path: str, bmap, written: Written, label: str, progress_for=Progress) -> int:
    """Read back the ranges write_image left for after the head (those that overlap it)."""
    late = set(written.late)
    if not late:
        return 0
    size = sum(end - start for start, end, _ in pieces(bmap, ranges=late))
    # Usually the MBR's 4 KiB: worth a progress line only when an unsparse image makes it one long range.
    check = progress_for(f"verifying {label} (ranges from its first MiB)", size) if size > 4 * CHUNK else Quiet()
    try:
        return verify(path, bmap, written.expected, written.kind, progress=check, label=label,
                      todo=pieces(bmap, ranges=late))
    finally:
        check.close()


def _range_digest(src, bmap, index: int, kind: str) -> str:
    """The image's own digest of one range (a stream starts again from its beginning to reach it)."""
    hasher, buf = hashlib.new(kind), mmap.mmap(-1, CHUNK)
    for start, end, _ in pieces(bmap, ranges={index}):
        src.read(memoryview(buf)[:end - start], start)
        hasher.update(memoryview(buf)[:end - start])
    return hasher.hexdigest()
