"""May this block device be written, and what is on it?

Every rule that keeps `kiosk flash` off the user's own disks is a separate function
taking a `Roots` (where sysfs, /dev, mountinfo and /proc/swaps are), so each one is
tested against fake trees. A refusal is a Refused (exit status 2) naming the device and
the reason, with what to do as its hint.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

from kiosk.core.errors import KioskError, Refused, one_line
from kiosk.core.files import human_size, mount_table, unescape_octal
from kiosk.core.run import run

SYSTEM_MOUNTS = ("/", "/boot", "/boot/efi", "/boot/firmware", "/home", "/usr", "/var")


@dataclass(frozen=True)
class Roots:
    """Where the kernel's views live; tests point these at fake trees."""

    sys: Path = Path("/sys")
    dev: Path = Path("/dev")
    mountinfo: Path = Path("/proc/self/mountinfo")
    swaps: Path = Path("/proc/swaps")


def refuse(name: str, reason: str, fix: str) -> Refused:
    """'refusing to write /dev/NAME: REASON', with FIX as the hint."""
    return Refused(one_line(f"refusing to write /dev/{name}: {reason}"), hint=one_line(fix))


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


def mounts(roots: Roots) -> list[tuple[str, str, str]]:
    """(major:minor, mount point, source) for every mount in roots' mountinfo."""
    return mount_table(roots.mountinfo)


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
        raise Refused(one_line(f"refusing to write {target}: {exc.strerror}"),
                      hint="pass the card's device (see lsblk)") from None
    if not stat.S_ISBLK(st.st_mode):
        raise Refused(one_line(f"refusing to write {target}: not a block device"),
                      hint="pass the card's device (see lsblk)")
    entry = roots.sys / "dev" / "block" / f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    if not entry.exists():
        raise Refused(one_line(f"refusing to write {target}: the kernel has no such disk ({entry} is missing)"),
                      hint="is the card still inserted?")
    return Path(os.path.realpath(entry)).name


def check_whole_disk(name: str, roots: Roots = Roots()) -> None:
    """A partition is never a target; name the disk it belongs to."""
    base = block_dir(name, roots)
    if not base.exists():
        raise refuse(name, f"no such disk in {roots.sys}/class/block", "pass the card's device (see lsblk)")
    if (base / "partition").exists():
        parent = _real(name, roots).parent.name
        raise refuse(name, f"it is a partition of /dev/{parent}",
                     f"flash the whole disk instead: kiosk flash IMAGE /dev/{parent}")


def check_writable(name: str, roots: Roots = Roots()) -> None:
    if _read(block_dir(name, roots) / "ro") == "1":
        raise refuse(name, "the kernel reports it read-only",
                     "slide the SD card's lock switch away from LOCK and insert it again")


def check_not_system_disk(name: str, roots: Roots = Roots()) -> None:
    """The disk must not hold the running system's /, /boot, /home and the like."""
    for shown, point in _mounted(name, roots):
        if point in SYSTEM_MOUNTS:
            raise refuse(name, f"it holds {point} of the running system ({shown})",
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
        path = unescape_octal(line.split()[0])
        dev = _dev_name(path, roots)
        if dev in rel:
            base = rel[dev]
            raise refuse(name, f"/dev/{base} is in use as swap of the running system",
                         f"this is not an SD card: pick the card's device (see lsblk), "
                         f"or run 'swapoff {path}' first if you really mean it")


def check_not_mounted(name: str, roots: Roots = Roots()) -> None:
    for shown, point in _mounted(name, roots):
        raise refuse(name, f"{shown} is mounted on {point}", f"unmount it first: umount {shlex.quote(point)}")


def _holder_kind(holder: str, roots: Roots) -> tuple[str, str]:
    """(what the holder is, how to release it)."""
    if holder.startswith("md"):
        return f"RAID array /dev/{holder}", f"stop it first: mdadm --stop /dev/{holder}"
    uuid = _read(block_dir(holder, roots) / "dm" / "uuid") or ""
    dm_name = _read(block_dir(holder, roots) / "dm" / "name") or holder
    if uuid.startswith("LVM-"):
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
            raise refuse(name, f"/dev/{dev} is in use by {what}", fix)
    try:
        slaves = sorted(p.name for p in (block_dir(name, roots) / "slaves").iterdir())
    except OSError:
        slaves = []
    if slaves:
        raise refuse(name, f"it is a virtual device on top of /dev/{slaves[0]}",
                     "pick the card's own device (see lsblk)")


def disk_size(name: str, roots: Roots = Roots()) -> int:
    sectors = _read(block_dir(name, roots) / "size")
    return int(sectors) * 512 if sectors and sectors.isdigit() else 0


def check_size(name: str, image_size: int, roots: Roots = Roots()) -> None:
    size = disk_size(name, roots)
    if size < image_size:
        shown = human_size(size) if size else "nothing (no medium?)"
        raise refuse(name, f"it holds {shown} but the image is {human_size(image_size)}",
                     f"use a card of at least {human_size(image_size)}")


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
        raise refuse(name, "it is a fixed disk (not removable, not SD/MMC, not USB)",
                     "if you really mean it, pass --allow-fixed-disk")
    ask = ask or globals()["ask"]
    answer = ask(f"/dev/{name} is a fixed disk: everything on it will be lost. "
                 f"Type /dev/{name} to write it: ")
    if answer is None:
        raise refuse(name, "it is a fixed disk and no device name was typed",
                     f"type /dev/{name} at the prompt to confirm")
    if answer.strip() != f"/dev/{name}":
        raise refuse(name, f"it is a fixed disk and {answer.strip()!r} was typed, not /dev/{name}",
                     f"type /dev/{name} exactly to confirm")


def check_disk(name: str, image_size: int, roots: Roots = Roots(), *, allow_fixed: bool = False,
               ask=None, describe=None) -> None:
    """Every rule in order, the cheap and certain ones first; `describe` runs before the fixed-disk prompt."""
    check_rules(name, image_size, roots, allow_fixed=allow_fixed)
    if describe:
        describe()
    check_removable(name, roots, allow_fixed=allow_fixed, ask=ask)


def check_rules(name: str, image_size: int, roots: Roots = Roots(), *, allow_fixed: bool = False) -> None:
    """The rules that need no answer from the user (every target passes them before any is described)."""
    check_whole_disk(name, roots)
    check_writable(name, roots)
    check_not_system_disk(name, roots)
    check_not_swap(name, roots)
    check_not_mounted(name, roots)
    check_no_holders(name, roots)
    check_size(name, image_size, roots)
    if disk_kind(name, roots) is None and not allow_fixed:
        check_removable(name, roots, allow_fixed=False)


# ---------------------------------------------------------------------------------------------
# Asking and describing: the user confirms with the disk described before them

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
    try:
        out = run(["lsblk", "-J", "-b", "-o", "NAME,SIZE,LABEL,FSTYPE,MOUNTPOINT", device], timeout=10).stdout
        tree = json.loads(out)["blockdevices"]
    except (KioskError, OSError, ValueError, KeyError, TypeError):   # (KioskError: failed, missing, timed out)
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
    lines = [one_line(f"/dev/{name}: {model or 'unknown model'}, {human_size(disk_size(name, roots))}, {kind}")]
    parts = partitions(name, roots)
    if not parts:
        lines.append("  no partitions")
    for part in parts:
        node = info.get(part, {})
        text = f"  /dev/{part}  {human_size(disk_size(part, roots))}"
        if node.get("fstype"):
            text += f"  {node['fstype']}"
        if node.get("label"):
            text += f"  label {node['label']!r}"
        lines.append(one_line(text))
    return lines
