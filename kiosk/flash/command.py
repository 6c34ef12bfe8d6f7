"""`kiosk flash IMAGE TARGET`: write an image to an SD card, safely, fast, and verified.

Safety first: the rules of target.py keep kiosk off the user's own disks (a refusal exits 2),
then the device is opened exclusively. An I/O failure exits 1; Ctrl-C exits 130 saying what
state the card is in. Speed and trust are writer.py's: only the block map's ranges are written
(IMAGE.bmap, or the image's own data extents), read back behind the writer, and the partition
table goes on last. A plain file target gets the same, written beside it and renamed when done.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
import tempfile
from pathlib import Path

from kiosk.core.errors import KioskError, Refused, UsageError, one_line
from kiosk.core.files import fsync_dir, human_size
from kiosk.core.inputs import open_regular
from kiosk.flash.progress import Progress
from kiosk.flash.target import Roots, ask, check_disk, describe_disk, devnum, lsblk_partitions, refuse, \
    resolve_target, stdin_is_tty
from kiosk.flash.writer import VerifyFailed, Written, verify_late, write_image
from kiosk.image import bmap as bmapmod

DIRECT_WRITES = True     # O_DIRECT for aligned writes to a device (see notes/flash.md for the measurements)
_BLKRRPART = 0x125F      # ioctl: re-read the partition table


class Interrupted(KioskError):
    """Ctrl-C; the message says what state the target is in. Exit status 130."""

    exit_code = 130


def _load_map(image: Path, image_fd: int, size: int, bmap_arg: str | None):
    """(block map, its file): --bmap or IMAGE.bmap if there is one, else the image's data extents (file None)."""
    path = Path(bmap_arg) if bmap_arg else Path(str(image) + ".bmap")
    if bmap_arg or os.path.exists(path):
        bmap = bmapmod.read_bmap(path)
        if bmap.image_size != size:
            raise bmapmod.InvalidBmap(f"{path} describes an image of {bmap.image_size} bytes but {image} "
                                      f"has {size}: the map belongs to another image",
                                      hint="pass the right one with --bmap or rebuild the image")
        return bmap, str(path)
    ranges = bmapmod.mapped_ranges(image_fd, size)
    bmap = bmapmod.BlockMap(size, bmapmod.BLOCK_SIZE, tuple((f, l, None) for f, l in ranges),
                            sum(l - f + 1 for f, l in ranges), None)
    return bmap, None


def _io_error(target: str, exc: OSError, state: str, fix: str = "") -> KioskError:
    """'writing TARGET failed: why; what state it is in', with what to do as the hint."""
    text = f"writing {target} failed: {exc.strerror or exc}" + (f"; {state}" if state else "")
    return KioskError(one_line(text), hint=one_line(fix))


def flash_file(image_fd: int, image: Path, target: Path, bmap, args) -> int:
    """A plain file target: a sparse copy, written to a temp file and renamed only when complete and verified."""
    target = target.absolute()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".kiosk-partial", dir=target.parent)
    except OSError as exc:
        error = UsageError if exc.errno in (errno.ENOENT, errno.ENOTDIR) else KioskError
        raise error(one_line(f"cannot create a file in {target.parent}: {exc.strerror}")) from None
    state, fix = f"{target} was not written", "run the command again"
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
        fsync_dir(target.parent)
    except KeyboardInterrupt:
        discard()
        if not renamed:
            raise Interrupted(f"interrupted: {state}", hint=fix) from None
    except OSError as exc:
        discard()
        if renamed:
            state, fix = "", "it is complete but may not survive a power cut: run sync"
        raise _io_error(str(target), exc, state, fix) from None
    except BaseException:
        discard()
        raise
    finally:
        os.close(fd)
    _summary(image, str(target), bmap, written, verified=not args.no_verify)
    return 0


def _summary(image: Path, target: str, bmap, written: Written, verified: bool) -> None:
    rate = written.bytes / written.seconds / 1e6 if written.seconds else 0.0
    print(f"kiosk: wrote {image} to {target}: {human_size(written.bytes)} "
          f"(image {human_size(bmap.image_size)}) in {written.seconds:.1f} s, {rate:.1f} MB/s, "
          f"{'verified' if verified else 'NOT verified (--no-verify)'}")


def _open_device(name: str, roots: Roots) -> tuple[int, int | None]:
    """O_EXCL makes the kernel refuse a disk that is mounted or held, whatever sysfs said a moment ago."""
    path = f"/dev/{name}"
    try:
        fd = os.open(roots.dev / name, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise refuse(name, "the kernel says it is in use (mounted, in LVM/RAID/LUKS, or open exclusively "
                               "by another program)", "close whatever uses it, then run the command again") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise KioskError(f"cannot open {path}: {exc.strerror}", hint="run as root (sudo kiosk flash ...)") from None
        raise KioskError(one_line(f"cannot open {path}: {exc.strerror}")) from None
    st = os.fstat(fd)
    if f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" != devnum(name, roots):
        os.close(fd)
        raise refuse(name, f"{path} is no longer the disk that was checked", "run the command again")
    direct = None
    if DIRECT_WRITES and hasattr(os, "O_DIRECT"):
        try:
            direct = os.open(roots.dev / name, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            direct = None
    return fd, direct


def flash_device(image_fd: int, image: Path, name: str, bmap, args, roots: Roots) -> int:
    """A card: every rule, the user's confirmation, then the write with its read-back, the head last."""
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
            raise refuse(name, "there is no terminal to ask for confirmation", "pass --yes to write without asking")
        answer = ask(f"Erase {path} and write {image} ({human_size(bmap.mapped_bytes)} of data)? [y/N] ")
        if (answer or "").strip().lower() not in ("y", "yes"):
            raise refuse(name, "not confirmed", "nothing was written; answer y to write it")

    fd, direct = _open_device(name, roots)
    states = {   # what the card is like if the command stops there, and what to do about it
        "checking": ("nothing was written", ""),
        "writing": (f"{path} is partially written and will not boot", "run the command again"),
        "verifying": (f"{path} is fully written but not verified", "run the command again to write and verify it"),
    }
    stage = "checking"
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size < bmap.image_size:
            raise refuse(name, f"it holds {human_size(size)} but the image is {human_size(bmap.image_size)}",
                         f"use a card of at least {human_size(bmap.image_size)}")
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
            fcntl.ioctl(fd, _BLKRRPART)  # show the new partitions (best effort: loop devices say EINVAL)
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
    except KioskError as exc:  # the image does not match its map: say what state the card is in
        raise KioskError(exc.message, hint="; ".join(filter(None, (exc.hint, *states[stage])))) from None
    finally:
        os.close(fd)
        if direct is not None:
            os.close(direct)
    _summary(image, path, bmap, written, verified=not args.no_verify)
    return 0


def cmd_flash(args, roots: Roots = Roots()) -> int:
    image = Path(args.image)
    # A regular file only, checked before it is opened: a FIFO would block the open, /dev/zero never ends.
    image_fd = open_regular(image, "image", hint="give the .img file kiosk build wrote")
    try:
        st = os.fstat(image_fd)
        if st.st_size == 0:
            raise UsageError(one_line(f"{image} is empty"), hint="rebuild it")
        # The target first, then the map: a refusal is the only line the user sees.
        target = args.target
        real = os.path.realpath(target)
        try:
            tst = os.stat(real)
        except (FileNotFoundError, NotADirectoryError):
            tst = None
        except OSError as exc:
            raise UsageError(one_line(f"cannot write {target}: {exc.strerror}")) from None
        device = None
        if tst is not None and stat.S_ISBLK(tst.st_mode):
            device = resolve_target(target, roots)
        elif real == "/dev" or real.startswith("/dev/"):
            raise Refused(one_line(f"refusing to write {target}: it is not a block device (is the card inserted?)"),
                          hint="pass the card's device, see lsblk")
        elif tst is not None and not stat.S_ISREG(tst.st_mode):
            raise UsageError(one_line(f"{target} is neither a block device nor a regular file"))
        elif tst is not None and (tst.st_dev, tst.st_ino) == (st.st_dev, st.st_ino):
            raise UsageError(one_line(f"{target} is the image itself"), hint="pass another file or the card's device")
        elif not os.path.isdir(Path(target).absolute().parent):   # said now, before the map is read
            parent = Path(target).absolute().parent
            why = os.strerror(errno.ENOTDIR if os.path.exists(parent) else errno.ENOENT)
            raise UsageError(one_line(f"cannot create a file in {parent}: {why}"))

        bmap, source = _load_map(image, image_fd, st.st_size, args.bmap)
        if source is None:
            print(f"kiosk: no block map ({image}.bmap): writing the image's data extents", file=sys.stderr)
        if device is not None:
            return flash_device(image_fd, image, device, bmap, args, roots)
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
