"""`kiosk flash IMAGE TARGET`: write an image to an SD card, safely, fast, and verified.

Safety first: every rule that keeps kiosk off the user's own disks is a
separate function below taking a `Roots` (where sysfs, /dev, mountinfo and
/proc/swaps are), so each one is tested against fake trees. A refusal is one
line naming the device, the reason and what to do, with exit status 2; an I/O
failure exits 1; Ctrl-C exits 130 saying what state the card is in.

Speed: only the mapped ranges of the block map are written (IMAGE.bmap, or
the image's own data extents from FIEMAP/SEEK_DATA), in aligned chunks of up
to 4 MiB, while a reader thread reads the next chunks.

Trust: every written range is read back bypassing the page cache and compared
with the block map's checksums (or, for a map without checksums, with the
hashes of the image computed while writing). The read-back runs in a thread
behind the writer, on what an fdatasync has made durable, so checking costs
little more than writing; the partition table goes on last, after the rest
has been read back and found right.
"""

from __future__ import annotations

import os
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kiosk.core.errors import KioskError, one_line

CHUNK = 4 << 20          # bytes per write: large and aligned, what SD cards like
VERIFY_BATCH = 64 << 20  # bytes written between an fdatasync and handing them to the read-back
HEAD_BYTES = 1 << 20     # the partition table region, written last
DIRECT_WRITES = True     # O_DIRECT for aligned writes to a device (see notes/flash.md for the measurements)
SYSTEM_MOUNTS = ("/", "/boot", "/boot/efi", "/boot/firmware", "/home", "/usr", "/var")
_BLKRRPART = 0x125F      # ioctl: re-read the partition table


class Refused(KioskError):
    """kiosk will not write this target; nothing was written. Exit status 2."""

    exit_code = 2


class Interrupted(KioskError):
    """Ctrl-C; the message says what state the target is in. Exit status 130."""

    exit_code = 130


class VerifyFailed(KioskError):
    """Read-back differs from the image; exit status 1. `ranges`: indices of the differing ranges."""

    exit_code = 1

    def __init__(self, message: str, ranges=()):
        super().__init__(message)
        self.ranges = list(ranges)


@dataclass(frozen=True)
class Roots:
    """Where the kernel's views live; tests point these at fake trees."""

    sys: Path = Path("/sys")
    dev: Path = Path("/dev")
    mountinfo: Path = Path("/proc/self/mountinfo")
    swaps: Path = Path("/proc/swaps")


def human(size: int) -> str:
    from kiosk.image.bmap import human_size
    return human_size(size)


def _refuse(name: str, reason: str, fix: str) -> Refused:
    return Refused(one_line(f"refusing to write /dev/{name}: {reason}; {fix}"))


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# The device's place in sysfs

def block_dir(name: str, roots: Roots) -> Path:
    return roots.sys / "class" / "block" / name


def _real(name: str, roots: Roots) -> Path:
    return Path(os.path.realpath(block_dir(name, roots)))


def devnum(name: str, roots: Roots) -> str | None:
    """'major:minor' of a block device, from sysfs."""
    return _read(block_dir(name, roots) / "dev")


def partitions(name: str, roots: Roots) -> list[str]:
    """The disk's partitions, in partition-number order."""
    base = _real(name, roots)
    found = []
    try:
        children = list(base.iterdir())
    except OSError:
        return []
    for child in children:
        number = _read(child / "partition")
        if number is not None:
            found.append((int(number) if number.isdigit() else 0, child.name))
    return [n for _, n in sorted(found)]


def holders(name: str, roots: Roots) -> list[str]:
    try:
        return sorted(p.name for p in (block_dir(name, roots) / "holders").iterdir())
    except OSError:
        return []


def _loops_by_backing(roots: Roots) -> dict[str, list[str]]:
    """Kernel name of a block device -> loop devices set up on it (losetup /dev/sdb, mount -o offset=...)."""
    found: dict[str, list[str]] = {}
    try:
        entries = sorted(p.name for p in (roots.sys / "class" / "block").iterdir() if p.name.startswith("loop"))
    except OSError:
        return found
    for loop in entries:
        backing = _read(block_dir(loop, roots) / "loop" / "backing_file")
        dev = _dev_name(backing, roots) if backing else None
        if dev:
            found.setdefault(dev, []).append(loop)
    return found


def related(name: str, roots: Roots) -> dict[str, str]:
    """The disk, its partitions and everything stacked on them (dm, md, loop devices, and their
    partitions), each -> the disk or partition of `name` it rests on."""
    loops = _loops_by_backing(roots)
    out: dict[str, str] = {}
    pending = [(name, name)] + [(p, p) for p in partitions(name, roots)]
    while pending:
        dev, base = pending.pop(0)
        if dev in out:
            continue
        out[dev] = base
        above = holders(dev, roots) + loops.get(dev, [])
        above += [p for d in loops.get(dev, []) for p in partitions(d, roots)]
        pending.extend((h, base) for h in above)
    return out


def _dev_name(path: str, roots: Roots) -> str | None:
    """'/dev/mapper/vg-root' -> 'dm-0': the kernel name of a /dev path (as seen under roots.dev)."""
    if not path.startswith("/dev/"):
        return None
    return Path(os.path.realpath(roots.dev / path[len("/dev/"):])).name


def _unescape(text: str) -> str:
    """Mount points and swap file names escape spaces etc. as octal (\\040)."""
    import re
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), text)


def mounts(roots: Roots) -> list[tuple[str, str, str]]:
    """(major:minor, mount point, source) for every mount in mountinfo."""
    out = []
    try:
        lines = roots.mountinfo.read_text(errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5:
            out.append((fields[2], _unescape(fields[4]), _unescape(tail[1]) if len(tail) >= 2 else ""))
    return out


def _mounted(name: str, roots: Roots) -> list[tuple[str, str]]:
    """(device shown to the user, mount point) of every mount on the disk or anything on it."""
    rel = related(name, roots)
    numbers = {devnum(dev, roots): dev for dev in rel}
    numbers.pop(None, None)
    found = []
    for number, point, source in mounts(roots):
        dev = numbers.get(number) or (_dev_name(source, roots) if _dev_name(source, roots) in rel else None)
        if dev is None:
            continue
        base = rel[dev]
        shown = f"/dev/{base}" if dev == base else f"/dev/{base} (through /dev/{dev})"
        found.append((shown, point))
    return found


# ---------------------------------------------------------------------------------------------
# The rules: each raises Refused, or returns quietly

def resolve_target(target: str, roots: Roots = Roots()) -> str:
    """The kernel name ('sdb', 'mmcblk0') of a block device path, through symlinks (/dev/disk/by-id/...)."""
    real = os.path.realpath(target)
    try:
        st = os.stat(real)
    except OSError as exc:
        raise Refused(one_line(f"refusing to write {target}: {exc.strerror}; "
                               f"pass the card's device (see lsblk)")) from None
    if not stat.S_ISBLK(st.st_mode):
        raise Refused(one_line(f"refusing to write {target}: not a block device; pass the card's device (see lsblk)"))
    entry = roots.sys / "dev" / "block" / f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    if not entry.exists():
        raise Refused(one_line(f"refusing to write {target}: the kernel has no such disk "
                               f"({entry} is missing); is the card still inserted?"))
    return Path(os.path.realpath(entry)).name


def check_whole_disk(name: str, roots: Roots = Roots()) -> None:
    """A partition is never a target; name the disk it belongs to."""
    base = block_dir(name, roots)
    if not base.exists():
        raise _refuse(name, f"no such disk in {roots.sys}/class/block", "pass the card's device (see lsblk)")
    if (base / "partition").exists():
        parent = _real(name, roots).parent.name
        raise _refuse(name, f"it is a partition of /dev/{parent}",
                      f"flash the whole disk instead: kiosk flash IMAGE /dev/{parent}")


def check_writable(name: str, roots: Roots = Roots()) -> None:
    if _read(block_dir(name, roots) / "ro") == "1":
        raise _refuse(name, "the kernel reports it read-only",
                      "slide the SD card's lock switch away from LOCK and insert it again")


def check_not_system_disk(name: str, roots: Roots = Roots()) -> None:
    """The disk must not hold the running system's /, /boot, /home and the like."""
    for shown, point in _mounted(name, roots):
        if point in SYSTEM_MOUNTS:
            raise _refuse(name, f"it holds {point} of the running system ({shown})",
                          "this is not an SD card: pick the card's device (see lsblk)")


def check_not_swap(name: str, roots: Roots = Roots()) -> None:
    rel = related(name, roots)
    try:
        lines = roots.swaps.read_text(errors="replace").splitlines()[1:]
    except OSError:
        return
    for line in lines:
        if not line.split():
            continue
        path = _unescape(line.split()[0])
        dev = _dev_name(path, roots)
        if dev in rel:
            base = rel[dev]
            raise _refuse(name, f"/dev/{base} is in use as swap of the running system",
                          f"this is not an SD card: pick the card's device (see lsblk), "
                          f"or run 'swapoff {path}' first if you really mean it")


def check_not_mounted(name: str, roots: Roots = Roots()) -> None:
    for shown, point in _mounted(name, roots):
        import shlex
        raise _refuse(name, f"{shown} is mounted on {point}", f"unmount it first: umount {shlex.quote(point)}")


def _holder_kind(holder: str, roots: Roots) -> tuple[str, str]:
    """(what the holder is, how to release it)."""
    if holder.startswith("md"):
        return f"RAID array /dev/{holder}", f"stop it first: mdadm --stop /dev/{holder}"
    uuid = _read(block_dir(holder, roots) / "dm" / "uuid") or ""
    dm_name = _read(block_dir(holder, roots) / "dm" / "name") or holder
    if uuid.startswith("LVM-"):
        import re
        group = re.split(r"(?<!-)-(?!-)", dm_name)[0].replace("--", "-")  # 'my--vg-root' -> 'my-vg'
        return f"LVM volume /dev/mapper/{dm_name}", f"deactivate its volume group first: vgchange -an {group}"
    if uuid.startswith("CRYPT-"):
        return f"LUKS/dm-crypt volume /dev/mapper/{dm_name}", f"close it first: cryptsetup close {dm_name}"
    if holder.startswith("dm-"):
        return f"device-mapper volume /dev/mapper/{dm_name}", f"remove it first: dmsetup remove {dm_name}"
    return f"/dev/{holder}", f"release /dev/{holder} first"


def check_no_holders(name: str, roots: Roots = Roots()) -> None:
    """Not a member of LVM, md RAID or LUKS (sysfs holders/), nor a virtual device stacked on another disk."""
    for dev in [name] + partitions(name, roots):
        for holder in holders(dev, roots):
            what, fix = _holder_kind(holder, roots)
            raise _refuse(name, f"/dev/{dev} is in use by {what}", fix)
    try:
        slaves = sorted(p.name for p in (block_dir(name, roots) / "slaves").iterdir())
    except OSError:
        slaves = []
    if slaves:
        raise _refuse(name, f"it is a virtual device on top of /dev/{slaves[0]}",
                      "pick the card's own device (see lsblk)")


def disk_size(name: str, roots: Roots = Roots()) -> int:
    sectors = _read(block_dir(name, roots) / "size")
    return int(sectors) * 512 if sectors and sectors.isdigit() else 0


def check_size(name: str, image_size: int, roots: Roots = Roots()) -> None:
    size = disk_size(name, roots)
    if size < image_size:
        shown = human(size) if size else "nothing (no medium?)"
        raise _refuse(name, f"it holds {shown} but the image is {human(image_size)}",
                      f"use a card of at least {human(image_size)}")


def disk_kind(name: str, roots: Roots = Roots()) -> str | None:
    """'removable', 'SD/MMC' or 'USB' for a card-like disk; None for a fixed disk."""
    if _read(block_dir(name, roots) / "removable") == "1":
        return "removable"
    if name.startswith("mmcblk"):
        return "SD/MMC"
    if any(part.startswith("usb") for part in _real(name, roots).parts):
        return "USB"
    return None


def check_removable(name: str, roots: Roots = Roots(), allow_fixed: bool = False, ask=None) -> None:
    """A fixed disk needs --allow-fixed-disk and then its name typed exactly at a prompt."""
    if disk_kind(name, roots) is not None:
        return
    if not allow_fixed:
        raise _refuse(name, "it is a fixed disk (not removable, not SD/MMC, not USB)",
                      "if you really mean it, pass --allow-fixed-disk")
    ask = ask or globals()["ask"]
    answer = ask(f"/dev/{name} is a fixed disk: everything on it will be lost. "
                 f"Type /dev/{name} to write it: ")
    if answer is None:
        raise _refuse(name, "it is a fixed disk and no device name was typed",
                      f"type /dev/{name} at the prompt to confirm")
    if answer.strip() != f"/dev/{name}":
        raise _refuse(name, f"it is a fixed disk and {answer.strip()!r} was typed, not /dev/{name}",
                      f"type /dev/{name} exactly to confirm")


def check_disk(name: str, image_size: int, roots: Roots = Roots(), *, allow_fixed: bool = False,
               ask=None, describe=None) -> None:
    """Every rule in order, the cheap and certain ones first; `describe` runs before the fixed-disk prompt."""
    check_whole_disk(name, roots)
    check_writable(name, roots)
    check_not_system_disk(name, roots)
    check_not_swap(name, roots)
    check_not_mounted(name, roots)
    check_no_holders(name, roots)
    check_size(name, image_size, roots)
    if disk_kind(name, roots) is None and not allow_fixed:
        check_removable(name, roots, allow_fixed=False)
    if describe:
        describe()
    check_removable(name, roots, allow_fixed=allow_fixed, ask=ask)


# ---------------------------------------------------------------------------------------------
# Asking

def ask(prompt: str) -> str | None:
    """One line from stdin (None at end of input); the prompt goes to stderr."""
    sys.stderr.write(prompt)
    sys.stderr.flush()
    if sys.stdin is None:
        return None
    line = sys.stdin.readline()
    if not stdin_is_tty():  # the answer was not echoed: end the prompt's line
        sys.stderr.write("\n")
    return None if line == "" else line.rstrip("\r\n")


def stdin_is_tty() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def lsblk_partitions(device: str) -> dict[str, dict]:
    """name -> {label, fstype, mountpoint} from lsblk; {} when lsblk is missing or fails."""
    import json
    import subprocess
    try:
        out = subprocess.run(["lsblk", "-J", "-b", "-o", "NAME,SIZE,LABEL,FSTYPE,MOUNTPOINT", device],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        tree = json.loads(out)["blockdevices"]
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError):
        return {}
    found = {}
    for disk in tree:
        for node in [disk] + (disk.get("children") or []):
            found[node.get("name")] = node
    return found


def describe_disk(name: str, roots: Roots = Roots(), lsblk=lsblk_partitions) -> list[str]:
    """What the user is about to erase: model, size, kind, current partitions with labels."""
    base = block_dir(name, roots)
    device = base / "device"
    model = " ".join(filter(None, (_read(device / "vendor"), _read(device / "model"))))
    if not model:
        model = " ".join(filter(None, (_read(device / "type"), _read(device / "name"))))  # mmc: "SD SC32G"
    kind = disk_kind(name, roots) or "fixed disk"
    info = lsblk(f"/dev/{name}") if lsblk else {}
    lines = [one_line(f"/dev/{name}: {model or 'unknown model'}, {human(disk_size(name, roots))}, {kind}")]
    parts = partitions(name, roots)
    if not parts:
        lines.append("  no partitions")
    for part in parts:
        node = info.get(part, {})
        text = f"  /dev/{part}  {human(disk_size(part, roots))}"
        if node.get("fstype"):
            text += f"  {node['fstype']}"
        if node.get("label"):
            text += f"  label {node['label']!r}"
        lines.append(one_line(text))
    return lines


# ---------------------------------------------------------------------------------------------
# Progress

def _clock_text(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """'writing /dev/sdb: 42% 120.0 MiB of 286.3 MiB, 21.4 MB/s, 0:08 left' on stderr.

    One line rewritten in place on a terminal (4 times a second at most); otherwise a
    new line every `interval` seconds, so logs stay readable.
    """

    def __init__(self, what: str, total: int, stream=None, clock=time.monotonic, interval: float | None = None):
        self.what, self.total, self.clock = what, total, clock
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.interval = interval if interval is not None else (0.25 if self.tty else 5.0)
        self.start = clock()
        self.last = self.start if not self.tty else None  # logs: the first line after `interval`
        self.shown = False

    def line(self, done: int) -> str:
        elapsed = max(self.clock() - self.start, 1e-6)
        rate = done / elapsed
        percent = 100.0 * done / self.total if self.total else 100.0
        text = f"{self.what}: {percent:3.0f}% {human(done)} of {human(self.total)}, {rate / 1e6:.1f} MB/s"
        if done < self.total and rate > 0:
            text += f", {_clock_text((self.total - done) / rate)} left"
        return text

    def update(self, done: int, force: bool = False) -> None:
        now = self.clock()
        if not force and self.last is not None and now - self.last < self.interval:
            return
        self.last = now
        if self.tty:
            self.stream.write("\r" + self.line(done) + "\x1b[K")
        else:
            self.stream.write(self.line(done) + "\n")
        self.stream.flush()
        self.shown = True

    def close(self) -> None:
        """End the updating line so that what follows starts on its own line."""
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


class _Quiet(Progress):
    def __init__(self):
        super().__init__("", 0, stream=sys.stderr)

    def update(self, done, force=False):
        pass


# ---------------------------------------------------------------------------------------------
# Writing and verifying

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


def _pread_full(fd: int, view: memoryview, offset: int, what: str) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise KioskError(f"{what} ends at byte {offset + done}, before the block map says it does")
        done += n


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
        import mmap
        import queue
        import threading
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


def write_image(src: int, dst: int, bmap, *, progress=None, head_last: bool = False,
                direct_dst: int | None = None, label: str = "the image", verify_path: str | None = None,
                verify_label: str | None = None) -> Written:
    """Write the mapped ranges of `bmap` from fd `src` to fd `dst`, then fsync; return digests to verify.

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

    Raises KioskError when the image does not match the map's checksums.
    """
    import hashlib
    import mmap

    progress = progress or _Quiet()
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
                          f"(bytes {start}-{end - 1}) have {kind} {actual}, the map says {stated[index]}; "
                          f"rebuild the image or its map")

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
        _pread_full(src, view, start, label)
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
    behind = _Behind(verify_path, bmap, expected, kind, verify_label or verify_path) if verify_path else None
    reader = _Reader(lambda view, start, end: _pread_full(src, view[:end - start], start, label),
                     pieces(bmap, head_end), hashers)
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
    except BaseException:   # (the fsync too: a card pulled out there must not leave the read-back waiting)
        if behind is not None:
            behind.abandon()
        raise
    finally:
        reader.close()
    if behind is not None:
        behind.publish(batch)
        progress.update(done, force=True)
        progress.close()
        try:
            behind.finish()
        except VerifyFailed as failed:
            for index in failed.ranges if not hash_image else ():
                actual = _range_digest(src, bmap, index, kind, label)
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
    import errno
    import hashlib

    label = label or path
    progress = progress or _Quiet()
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
                           f"(bytes {start}-{end - 1}){more}; write it again, and if it fails again "
                           f"the card is faulty or fake: use another card", bad)
    return done


class _Behind:
    """Reads back, in its own thread, what the writer has made durable (fdatasync), as it goes.

    The writer publishes batches of pieces; `finish()` waits for the read-back of all of
    them, showing progress, and raises its VerifyFailed or I/O error. On an SD card this
    costs about what reading afterwards would; where reads and writes overlap (USB SSDs,
    loop devices) the check is almost free.
    """

    def __init__(self, path: str, bmap, expected: list, kind: str, label: str):
        import queue
        import threading
        self.label, self.batches, self.published, self.done = label, queue.Queue(), 0, 0
        self.error: BaseException | None = None
        self.progress = Progress(f"verifying {label}", 0)   # shown by finish(); its rate counts from now
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


def verify_late(path: str, bmap, written: Written, label: str) -> int:
    """Read back the ranges write_image left for after the head (those that overlap it)."""
    late = set(written.late)
    if not late:
        return 0
    size = sum(end - start for start, end, _ in pieces(bmap, ranges=late))
    # Usually the MBR's 4 KiB: worth a progress line only when an unsparse image makes it one long range.
    check = Progress(f"verifying {label} (ranges from its first MiB)", size) if size > 4 * CHUNK else _Quiet()
    try:
        return verify(path, bmap, written.expected, written.kind, progress=check, label=label,
                      todo=pieces(bmap, ranges=late))
    finally:
        check.close()


def _range_digest(fd: int, bmap, index: int, kind: str, label: str) -> str:
    import hashlib
    import mmap
    hasher, buf = hashlib.new(kind), mmap.mmap(-1, CHUNK)
    for start, end, _ in pieces(bmap, ranges={index}):
        _pread_full(fd, memoryview(buf)[:end - start], start, label)
        hasher.update(memoryview(buf)[:end - start])
    return hasher.hexdigest()


# ---------------------------------------------------------------------------------------------
# The command

def _load_map(image: Path, image_fd: int, size: int, bmap_arg: str | None):
    from kiosk.image import bmap as bmapmod

    path = Path(bmap_arg) if bmap_arg else Path(str(image) + ".bmap")
    if bmap_arg or path.exists():
        bmap = bmapmod.read_bmap(path)
        if bmap.image_size != size:
            raise bmapmod.InvalidBmap(f"{path} describes an image of {bmap.image_size} bytes but {image} "
                                      f"has {size}: the map belongs to another image; pass the right "
                                      f"one with --bmap or rebuild the image")
        return bmap, str(path)
    ranges = bmapmod.mapped_ranges(image_fd, size)
    bmap = bmapmod.BlockMap(size, bmapmod.BLOCK_SIZE, tuple((f, l, None) for f, l in ranges),
                            sum(l - f + 1 for f, l in ranges), None)
    return bmap, None


def _io_error(target: str, exc: OSError, state: str) -> KioskError:
    return KioskError(one_line(f"writing {target} failed: {exc.strerror or exc}; {state}"))


def flash_file(image_fd: int, image: Path, target: Path, bmap, args) -> int:
    """A plain file target: a sparse copy, written to a temp file and renamed only when complete and verified."""
    import errno
    import tempfile

    from kiosk.core.errors import UsageError

    target = target.absolute()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".kiosk-partial", dir=target.parent)
    except OSError as exc:
        error = UsageError if exc.errno in (errno.ENOENT, errno.ENOTDIR) else KioskError
        raise error(one_line(f"cannot create a file in {target.parent}: {exc.strerror}")) from None
    state = f"{target} was not written; run the command again"
    renamed = False

    def discard():
        if not renamed:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    try:
        progress = Progress(f"writing {target}", bmap.mapped_bytes)
        try:
            os.ftruncate(fd, bmap.image_size)
            written = write_image(image_fd, fd, bmap, progress=progress, label=str(image),
                                  verify_path=None if args.no_verify else tmp, verify_label=str(target))
        finally:
            progress.close()
        if not args.no_verify:
            verify_late(tmp, bmap, written, str(target))
        os.fchmod(fd, 0o644)
        os.replace(tmp, target)
        renamed = True
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except KeyboardInterrupt:
        discard()
        if not renamed:
            raise Interrupted(f"interrupted: {state}") from None
    except OSError as exc:
        discard()
        raise _io_error(str(target), exc, state if not renamed else "it is complete but may not survive "
                                                                    "a power cut: run sync") from None
    except BaseException:
        discard()
        raise
    finally:
        os.close(fd)
    _summary(image, str(target), bmap, written, verified=not args.no_verify)
    return 0


def _summary(image: Path, target: str, bmap, written: Written, verified: bool) -> None:
    rate = written.bytes / written.seconds / 1e6 if written.seconds else 0.0
    print(f"kiosk: wrote {image} to {target}: {human(written.bytes)} "
          f"(image {human(bmap.image_size)}) in {written.seconds:.1f} s, {rate:.1f} MB/s, "
          f"{'verified' if verified else 'NOT verified (--no-verify)'}")


def _open_device(name: str, roots: Roots) -> tuple[int, int | None]:
    """O_EXCL makes the kernel refuse a disk that is mounted or held, whatever sysfs said a moment ago."""
    import errno
    path = f"/dev/{name}"
    try:
        fd = os.open(roots.dev / name, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise _refuse(name, "the kernel says it is in use (mounted, in LVM/RAID/LUKS, or open exclusively "
                                "by another program)", "close whatever uses it, then run the command again") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise KioskError(f"cannot open {path}: {exc.strerror}; run as root (sudo kiosk flash ...)") from None
        raise KioskError(one_line(f"cannot open {path}: {exc.strerror}")) from None
    st = os.fstat(fd)
    if f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" != devnum(name, roots):
        os.close(fd)
        raise _refuse(name, f"{path} is no longer the disk that was checked", "run the command again")
    direct = None
    if DIRECT_WRITES and hasattr(os, "O_DIRECT"):
        try:
            direct = os.open(roots.dev / name, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            direct = None
    return fd, direct


def flash_device(image_fd: int, image: Path, name: str, bmap, args, roots: Roots) -> int:
    path = f"/dev/{name}"

    def describe():
        for line in describe_disk(name, roots, lsblk=lsblk_partitions if roots == Roots() else None):
            print(line, file=sys.stderr)

    typed = []

    def ask_name(prompt):
        typed.append(True)
        return ask(prompt)

    check_disk(name, bmap.image_size, roots, allow_fixed=args.allow_fixed_disk, ask=ask_name, describe=describe)
    # Typing the device name is a stronger confirmation than y; otherwise ask y/N unless --yes.
    if not typed and not args.yes:
        if not stdin_is_tty():
            raise _refuse(name, "there is no terminal to ask for confirmation",
                          "pass --yes to write without asking")
        answer = ask(f"Erase {path} and write {image} ({human(bmap.mapped_bytes)} of data)? [y/N] ")
        if (answer or "").strip().lower() not in ("y", "yes"):
            raise _refuse(name, "not confirmed", "nothing was written; answer y to write it")

    fd, direct = _open_device(name, roots)
    states = {
        "checking": "nothing was written",
        "writing": f"{path} is partially written and will not boot; run the command again",
        "verifying": f"{path} is fully written but not verified; run the command again to write and verify it",
    }
    stage = "checking"
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size < bmap.image_size:
            raise _refuse(name, f"it holds {human(size)} but the image is {human(bmap.image_size)}",
                          f"use a card of at least {human(bmap.image_size)}")
        stage = "writing"   # and, unless --no-verify, reading back: the partition table goes on last
        progress = Progress(f"writing {path}", bmap.mapped_bytes)
        try:
            written = write_image(image_fd, fd, bmap, progress=progress, head_last=True, direct_dst=direct,
                                  label=str(image), verify_path=None if args.no_verify else str(roots.dev / name),
                                  verify_label=path)
        finally:
            progress.close()
        if not args.no_verify:
            stage = "verifying"
            verify_late(str(roots.dev / name), bmap, written, path)
        stage = "done"
        try:
            import fcntl
            fcntl.ioctl(fd, _BLKRRPART)  # show the new partitions (best effort: loop devices say EINVAL)
        except OSError:
            pass
    except KeyboardInterrupt:
        if stage != "done":
            during = " while verifying" if stage == "verifying" else ""
            raise Interrupted(f"interrupted{during}: {states[stage]}") from None
    except OSError as exc:
        if stage == "verifying":
            raise KioskError(one_line(f"reading {path} back failed: {exc.strerror or exc}; the card is written "
                                      f"but unverified: try again, or another card")) from None
        raise _io_error(path, exc, states.get(stage, "")) from None
    except (Refused, VerifyFailed):
        raise
    except KioskError as exc:  # the image does not match its map: say what state the card is in
        raise KioskError(f"{exc}; {states[stage]}") from None
    finally:
        os.close(fd)
        if direct is not None:
            os.close(direct)
    _summary(image, path, bmap, written, verified=not args.no_verify)
    return 0


def cmd_flash(args, roots: Roots = Roots()) -> int:
    from kiosk.core.errors import UsageError

    image = Path(args.image)
    try:
        image_fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(one_line(f"cannot read image {image}: {exc.strerror}")) from None
    try:
        st = os.fstat(image_fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(one_line(f"{image} is not an image file"))
        if st.st_size == 0:
            raise UsageError(one_line(f"{image} is empty; rebuild it"))
        bmap, source = _load_map(image, image_fd, st.st_size, args.bmap)
        if source is None:
            print(f"kiosk: no block map ({image}.bmap): writing the image's data extents", file=sys.stderr)

        target = args.target
        real = os.path.realpath(target)
        try:
            tst = os.stat(real)
        except FileNotFoundError:
            tst = None
        if tst is not None and stat.S_ISBLK(tst.st_mode):
            return flash_device(image_fd, image, resolve_target(target, roots), bmap, args, roots)
        if real == "/dev" or real.startswith("/dev/"):
            raise Refused(one_line(f"refusing to write {target}: it is not a block device (is the card "
                                   f"inserted?); pass the card's device, see lsblk"))
        if tst is not None and not stat.S_ISREG(tst.st_mode):
            raise UsageError(one_line(f"{target} is neither a block device nor a regular file"))
        if tst is not None and (tst.st_dev, tst.st_ino) == (st.st_dev, st.st_ino):
            raise UsageError(one_line(f"{target} is the image itself; pass another file or the card's device"))
        return flash_file(image_fd, image, Path(target), bmap, args)
    except KeyboardInterrupt:
        raise Interrupted("interrupted: nothing was written") from None
    finally:
        os.close(image_fd)


def register(sub) -> None:
    p = sub.add_parser(
        "flash", help="write an image to an SD card: only its data, read back and verified",
        description="Write IMAGE to TARGET (a card's whole-disk device, or a file). Only the blocks "
                    "listed in the block map are written, and read back and checked as the writing goes on; the "
                    "partition table is written last, once the rest has checked out. "
                    "kiosk refuses partitions, mounted disks, the system's own disks, LVM/RAID/LUKS "
                    "members, read-only and too small disks, and fixed disks unless --allow-fixed-disk.")
    p.add_argument("image", metavar="IMAGE", help="the disk image (kiosk build's .img)")
    p.add_argument("target", metavar="TARGET",
                   help="the card: /dev/sdX, /dev/mmcblkN, /dev/disk/by-id/...; or a file path")
    p.add_argument("--bmap", metavar="FILE", help="block map (default: IMAGE.bmap if present, "
                                                  "else the image's data extents)")
    p.add_argument("--yes", action="store_true", help="do not ask before writing (refusals still apply)")
    p.add_argument("--no-verify", action="store_true", help="do not read the card back after writing")
    p.add_argument("--allow-fixed-disk", action="store_true",
                   help="allow a non-removable, non-USB, non-SD disk (asks you to type its name)")
    p.set_defaults(func=cmd_flash)
