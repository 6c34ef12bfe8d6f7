"""`kiosk flash IMAGE TARGET...`: write an image to SD cards, safely, fast, and verified; several at once.

Safety first: the rules of target.py keep kiosk off the user's own disks (a refusal exits 2 and
nothing is written to any target), then every device is opened exclusively. Speed and trust are
writer.py's: only the block map's ranges are written (IMAGE.bmap, or the image's own data
extents), read back behind the writer, and the partition table goes on last. A compressed image
(.img.zst, .img.xz, .img.gz) is decompressed as it is written (source.py). A plain file target
gets the same, written beside it and renamed when done.

Several targets are written at once, one thread each with its own reading of the image: one
card failing (or slower) changes nothing for the others. An I/O failure exits 1; Ctrl-C exits
130 saying what state each card is in.
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import stat
import sys
import tempfile
import threading
import traceback
from pathlib import Path

from kiosk.core.errors import KioskError, Refused, UsageError, one_line
from kiosk.core.files import fsync_dir, human_size
from kiosk.core.inputs import open_regular
from kiosk.flash.progress import Progress, Rows
from kiosk.flash.source import Stream, check_compressed, compression, open_source, uncompressed_name
from kiosk.flash.target import Roots, ask, check_disk, check_rules, describe_disk, devnum, lsblk_partitions, refuse, \
    resolve_target, stdin_is_tty
from kiosk.flash.writer import VerifyFailed, Written, verify_late, write_image
from kiosk.image import bmap as bmapmod

DIRECT_WRITES = True     # O_DIRECT for aligned writes to a device (see notes/flash.md for the measurements)
_BLKRRPART = 0x125F      # ioctl: re-read the partition table


class Interrupted(KioskError):
    """Ctrl-C; the message says what state the target is in. Exit status 130."""

    exit_code = 130


def _load_map(image: Path, image_fd: int, size: int, bmap_arg: str | None):
    """(block map, its file): --bmap, IMAGE.bmap or (compressed) IMAGE-without-.zst.bmap; else a map
    made here (file None): the data extents of a plain image, all of a compressed one."""
    kind = compression(image)
    found = [Path(bmap_arg)] if bmap_arg else [p for p in (Path(f"{image}.bmap"), Path(f"{uncompressed_name(image)}.bmap"))
                                               if os.path.exists(p)]
    if found:
        bmap = bmapmod.read_bmap(found[0])
        if bmap.image_size != size and not kind:
            raise bmapmod.InvalidBmap(f"{found[0]} describes an image of {bmap.image_size} bytes but {image} "
                                      f"has {size}: the map belongs to another image",
                                      hint="pass the right one with --bmap or rebuild the image")
        return bmap, str(found[0])
    if kind:
        print(f"kiosk: no block map ({image}.bmap or {uncompressed_name(image)}.bmap): decompressing {image} "
              f"once to learn its size, then writing all of it", file=sys.stderr)
        size = Stream(image_fd, str(image), kind, None).measure()
        if size == 0:
            raise UsageError(one_line(f"{image} decompresses to nothing"), hint="download or build it again")
        ranges = [(0, -(-size // bmapmod.BLOCK_SIZE) - 1)]
    else:
        print(f"kiosk: no block map ({image}.bmap): writing the image's data extents", file=sys.stderr)
        ranges = bmapmod.mapped_ranges(image_fd, size)
    bmap = bmapmod.BlockMap(size, bmapmod.BLOCK_SIZE, tuple((f, l, None) for f, l in ranges),
                            sum(l - f + 1 for f, l in ranges), None)
    return bmap, None


def _io_error(target: str, exc: OSError, state: str, fix: str = "") -> KioskError:
    """'writing TARGET failed: why; what state it is in', with what to do as the hint."""
    text = f"writing {target} failed: {exc.strerror or exc}" + (f"; {state}" if state else "")
    return KioskError(one_line(text), hint=one_line(fix))


def _names(labels: list[str]) -> str:
    """'/dev/sdb', '/dev/sdb and /dev/sdc', '/dev/sdb, /dev/sdc and /dev/sdd'."""
    return labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} and {labels[-1]}"


# ---------------------------------------------------------------------------------------------
# The targets: each is checked, opened, written and verified on its own

class FileTarget:
    """A plain file: a sparse copy, written to a temp file and renamed only when complete and verified."""

    def __init__(self, path: Path):
        self.path = Path(path).absolute()
        self.label = str(path)
        self.fd, self.tmp, self.renamed = None, None, False

    def check_rules(self, bmap, args) -> None:
        """Nothing to check that was not checked by name (it is not the image, its directory exists)."""

    def check(self, bmap, args, roots: Roots) -> bool:
        return True

    def open(self, bmap) -> None:
        try:
            self.fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".kiosk-partial",
                                                 dir=self.path.parent)
        except OSError as exc:
            error = UsageError if exc.errno in (errno.ENOENT, errno.ENOTDIR) else KioskError
            raise error(one_line(f"cannot create a file in {self.path.parent}: {exc.strerror}")) from None

    def write(self, src, image: Path, bmap, args, progress_for=Progress) -> Written:
        target = self.path
        state, fix = f"{self.label} was not written", "run the command again"
        try:
            progress = progress_for(f"writing {self.label}", bmap.mapped_bytes)
            try:
                os.ftruncate(self.fd, bmap.image_size)
                written = write_image(src, self.fd, bmap, progress=progress, label=str(image),
                                      verify_path=None if args.no_verify else self.tmp, verify_label=self.label,
                                      progress_for=progress_for)
            finally:
                progress.close()
            if not args.no_verify:
                verify_late(self.tmp, bmap, written, self.label, progress_for)
            os.fchmod(self.fd, 0o644)
            os.replace(self.tmp, target)
            self.renamed = True
            fsync_dir(target.parent)
        except KeyboardInterrupt:
            self.close()
            if not self.renamed:
                raise Interrupted(f"interrupted: {state}", hint=fix) from None
        except OSError as exc:
            self.close()
            if self.renamed:
                state, fix = "", "it is complete but may not survive a power cut: run sync"
            raise _io_error(self.label, exc, state, fix) from None
        except BaseException:   # (a bad image, a failed check: the temp file goes, the message stands)
            self.close()
            raise
        return written

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.tmp is not None and not self.renamed:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None


class DeviceTarget:
    """A card: every rule and the user's confirmation, then the write with its read-back, the head last."""

    def __init__(self, name: str, roots: Roots):
        self.name, self.roots, self.label = name, roots, f"/dev/{name}"
        self.fd, self.direct = None, None

    def check_rules(self, bmap, args) -> None:
        check_rules(self.name, bmap.image_size, self.roots, allow_fixed=args.allow_fixed_disk)

    def check(self, bmap, args, roots: Roots) -> bool:
        """Every rule (target.py); True if the user typed the device's name (a fixed disk) to confirm."""
        def describe():
            for line in describe_disk(self.name, roots, lsblk=lsblk_partitions if roots == Roots() else None):
                print(line, file=sys.stderr)

        typed = []

        def ask_name(prompt):
            typed.append(True)
            return ask(prompt)

        check_disk(self.name, bmap.image_size, roots, allow_fixed=args.allow_fixed_disk, ask=ask_name,
                   describe=describe)
        return bool(typed)

    def open(self, bmap) -> None:
        """O_EXCL makes the kernel refuse a disk that is mounted or held, whatever sysfs said a moment ago."""
        name, path, roots = self.name, self.label, self.roots
        try:
            fd = os.open(roots.dev / name, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise refuse(name, "the kernel says it is in use (mounted, in LVM/RAID/LUKS, or open exclusively "
                                   "by another program)", "close whatever uses it, then run the command again") from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise KioskError(f"cannot open {path}: {exc.strerror}",
                                 hint="run as root (sudo kiosk flash ...)") from None
            raise KioskError(one_line(f"cannot open {path}: {exc.strerror}")) from None
        self.fd = fd
        st = os.fstat(fd)
        if f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" != devnum(name, roots):
            raise refuse(name, f"{path} is no longer the disk that was checked", "run the command again")
        size = os.lseek(fd, 0, os.SEEK_END)
        if size < bmap.image_size:
            raise refuse(name, f"it holds {human_size(size)} but the image is {human_size(bmap.image_size)}",
                         f"use a card of at least {human_size(bmap.image_size)}")
        if DIRECT_WRITES and hasattr(os, "O_DIRECT"):
            try:
                self.direct = os.open(roots.dev / name, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                self.direct = None

    def write(self, src, image: Path, bmap, args, progress_for=Progress) -> Written:
        path, device = self.label, str(self.roots.dev / self.name)
        states = {   # what the card is like if the command stops there, and what to do about it
            "writing": (f"{path} is partially written and will not boot", "run the command again"),
            "verifying": (f"{path} is fully written but not verified", "run the command again to write and verify it"),
        }
        stage = "writing"   # and, unless --no-verify, reading back: the partition table goes on last
        try:
            progress = progress_for(f"writing {path}", bmap.mapped_bytes)
            try:
                written = write_image(src, self.fd, bmap, progress=progress, head_last=True, direct_dst=self.direct,
                                      label=str(image), verify_path=None if args.no_verify else device,
                                      verify_label=path, progress_for=progress_for)
            finally:
                progress.close()
            if not args.no_verify:
                stage = "verifying"
                verify_late(device, bmap, written, path, progress_for)
            stage = "done"
            try:
                fcntl.ioctl(self.fd, _BLKRRPART)  # show the new partitions (best effort: loop devices say EINVAL)
            except OSError:
                pass
        except KeyboardInterrupt:
            if stage != "done":
                during = " while verifying" if stage == "verifying" else ""
                state, fix = states[stage]
                raise Interrupted(f"interrupted{during}: {state}", hint=fix) from None
        except OSError as exc:
            if stage == "verifying":
                raise KioskError(one_line(f"reading {path} back failed: {exc.strerror or exc}"),
                                 hint="the card is written but unverified: try again, or another card") from None
            raise _io_error(path, exc, *states.get(stage, ("", ""))) from None
        except (Refused, VerifyFailed):
            raise
        except KioskError as exc:  # a bad image, or one not matching its map: say what state the card is in
            raise KioskError(exc.message, hint="; ".join(filter(None, (exc.hint, *states[stage])))) from None
        return written

    def close(self) -> None:
        for fd in (self.fd, self.direct):
            if fd is not None:
                os.close(fd)
        self.fd = self.direct = None


def _summary(image: Path, target: str, bmap, written: Written, verified: bool) -> None:
    rate = written.bytes / written.seconds / 1e6 if written.seconds else 0.0
    print(f"kiosk: wrote {image} to {target}: {human_size(written.bytes)} "
          f"(image {human_size(bmap.image_size)}) in {written.seconds:.1f} s, {rate:.1f} MB/s, "
          f"{'verified' if verified else 'NOT verified (--no-verify)'}", flush=True)


# ---------------------------------------------------------------------------------------------
# The command

def _target(target: str, image_st: os.stat_result, roots: Roots):
    """A DeviceTarget or FileTarget for one TARGET argument; what is neither is refused by name."""
    real = os.path.realpath(target)
    try:
        tst = os.stat(real)
    except (FileNotFoundError, NotADirectoryError):
        tst = None
    except OSError as exc:
        raise UsageError(one_line(f"cannot write {target}: {exc.strerror}")) from None
    if tst is not None and stat.S_ISBLK(tst.st_mode):
        return DeviceTarget(resolve_target(target, roots), roots)
    if real == "/dev" or real.startswith("/dev/"):
        raise Refused(one_line(f"refusing to write {target}: it is not a block device (is the card inserted?)"),
                      hint="pass the card's device, see lsblk")
    if tst is not None and not stat.S_ISREG(tst.st_mode):
        raise UsageError(one_line(f"{target} is neither a block device nor a regular file"))
    if tst is not None and (tst.st_dev, tst.st_ino) == (image_st.st_dev, image_st.st_ino):
        raise UsageError(one_line(f"{target} is the image itself"), hint="pass another file or the card's device")
    parent = Path(target).absolute().parent
    if not os.path.isdir(parent):   # said now, before the map is read
        why = os.strerror(errno.ENOTDIR if os.path.exists(parent) else errno.ENOENT)
        raise UsageError(one_line(f"cannot create a file in {parent}: {why}"))
    return FileTarget(Path(target))


def _confirm(image: Path, bmap, devices: list[DeviceTarget], args) -> None:
    """One y/N question for the card-like disks (a fixed disk's typed name confirmed it already)."""
    if not devices or args.yes:
        return
    names = _names([d.label for d in devices])
    if not stdin_is_tty():
        raise Refused(one_line(f"refusing to write {names}: there is no terminal to ask for confirmation"),
                      hint="pass --yes to write without asking")
    answer = ask(f"Erase {names} and write {image} ({human_size(bmap.mapped_bytes)} of data)? [y/N] ")
    if (answer or "").strip().lower() not in ("y", "yes"):
        raise Refused(one_line(f"refusing to write {names}: not confirmed"),
                      hint="nothing was written; answer y to write it")


def _write_all(targets, source_for, image: Path, bmap, args) -> int:
    """Every target in its own thread with its own source; a progress row and a last line each."""
    cancel = threading.Event()
    rows = Rows(len(targets), cancel=cancel)
    results: list = [None] * len(targets)
    finished: queue.Queue = queue.Queue()   # rows of the cards done (Thread.join is not Ctrl-C safe in 3.11)

    def work(row: int, target) -> None:
        src = None
        try:
            src = source_for()
            results[row] = target.write(src, image, bmap, args, rows.progress_for(row))
        except KioskError as exc:
            results[row] = exc
        except BaseException as exc:   # a bug: said like cli.py says one, for this card only
            if getattr(args, "debug", False):
                traceback.print_exc()
            results[row] = KioskError(f"{target.label}: internal error: {type(exc).__name__}: {exc}",
                                      hint="rerun with --debug for details")
        finally:
            try:
                if src is not None:
                    src.close()
                target.close()
            finally:
                finished.put(row)   # whatever happened: the main thread must not wait for this card forever

    threads = [threading.Thread(target=work, args=(row, t), name=f"kiosk-flash-{row}", daemon=True)
               for row, t in enumerate(targets)]
    for thread in threads:
        thread.start()
    left = len(threads)

    def wait() -> None:
        nonlocal left
        while left:
            try:
                finished.get(timeout=0.25)
                left -= 1
            except queue.Empty:
                pass

    try:
        wait()
    except KeyboardInterrupt:   # each card stops at its next progress update, saying its state
        cancel.set()
        try:
            wait()
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted twice: {_names([t.label for t in targets])} may be partially "
                              f"written (then they will not boot)", hint="run the command again") from None
    failed = []
    for target, result in zip(targets, results):
        if isinstance(result, Written):
            _summary(image, target.label, bmap, result, verified=not args.no_verify)
        else:
            failed.append((target.label, result))
            print(f"kiosk: {result}", file=sys.stderr, flush=True)
    done = len(targets) - len(failed)
    print(f"kiosk: {done} of {len(targets)} targets written{'' if args.no_verify else ' and verified'}"
          + (f"; failed: {_names([label for label, _ in failed])}" if failed else ""), file=sys.stderr)
    if not failed:
        return 0
    return max(Interrupted.exit_code if isinstance(r, Interrupted) else r.exit_code for _, r in failed)


def cmd_flash(args, roots: Roots = Roots()) -> int:
    image = Path(args.image)
    # A regular file only, checked before it is opened: a FIFO would block the open, /dev/zero never ends.
    image_fd = open_regular(image, "image", hint="give the .img file kiosk build wrote, or a .img.zst, .img.xz or .img.gz")
    targets = []
    try:
        st = os.fstat(image_fd)
        if st.st_size == 0:
            raise UsageError(one_line(f"{image} is empty"), hint="rebuild it")
        check_compressed(image_fd, image)
        # The targets first, then the map: a refusal is the only line the user sees.
        targets = [_target(t, st, roots) for t in args.targets]
        seen: dict = {}
        for given, t in zip(args.targets, targets):
            key = t.label if isinstance(t, DeviceTarget) else os.path.realpath(t.path)
            if key in seen:
                raise UsageError(one_line(f"{given} is named twice (also as {seen[key]})"),
                                 hint="name each target once")
            seen[key] = given
        bmap, _ = _load_map(image, image_fd, st.st_size, args.bmap)
        for t in targets:   # every target through the rules first: a refusal is the only thing said
            t.check_rules(bmap, args)
        typed = [t.check(bmap, args, roots) for t in targets]
        _confirm(image, bmap, [t for t, y in zip(targets, typed) if not y], args)
        for t in targets:
            t.open(bmap)
        plain = None if compression(image) else open_source(image_fd, image, bmap.image_size)

        def source_for():   # a plain image is shared (pread); a compressed one is decompressed per target
            return plain or open_source(image_fd, image, bmap.image_size)

        if len(targets) > 1:
            return _write_all(targets, source_for, image, bmap, args)
        src = source_for()
        try:
            written = targets[0].write(src, image, bmap, args)
        finally:
            src.close()
        _summary(image, targets[0].label, bmap, written, verified=not args.no_verify)
        return 0
    except KeyboardInterrupt:
        raise Interrupted("interrupted: nothing was written") from None
    finally:
        for t in targets:
            t.close()
        os.close(image_fd)


def register(sub) -> None:
    p = sub.add_parser(
        "flash", help="write an image to SD cards: only its data, read back and verified; several at once",
        description="Write IMAGE to each TARGET (a card's whole-disk device, or a file). IMAGE may be "
                    "compressed (.img.zst, .img.xz, .img.gz): it is decompressed as it is written, never to disk. "
                    "Only the blocks listed in the block map are written, and read back and checked as the "
                    "writing goes on; the partition table is written last, once the rest has checked out. "
                    "Several targets are checked first, then written at the same time, each on its own: one "
                    "failing does not stop the others (exit status 1 if any failed). "
                    "kiosk refuses partitions, mounted disks, the system's own disks, LVM/RAID/LUKS "
                    "members, read-only and too small disks, and fixed disks unless --allow-fixed-disk; "
                    "if any target is refused, none is written.")
    p.add_argument("image", metavar="IMAGE", help="the disk image: kiosk build's .img, or .img.zst/.img.xz/.img.gz")
    p.add_argument("targets", metavar="TARGET", nargs="+",
                   help="a card: /dev/sdX, /dev/mmcblkN, /dev/disk/by-id/...; or a file path")
    p.add_argument("--bmap", metavar="FILE", help="block map (default: IMAGE.bmap, or for IMAGE.img.zst "
                                                  "IMAGE.img.bmap, if present; else the image's data "
                                                  "extents, or all of a compressed image)")
    p.add_argument("--yes", action="store_true", help="do not ask before writing (refusals still apply)")
    p.add_argument("--no-verify", action="store_true", help="do not read the cards back after writing")
    p.add_argument("--allow-fixed-disk", action="store_true",
                   help="allow a non-removable, non-USB, non-SD disk (asks you to type its name)")
    p.set_defaults(func=cmd_flash)
