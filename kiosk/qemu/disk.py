"""Reading a kiosk image without root or mounting, and making the copy QEMU boots.

The partition table is read by kiosk.image.mbr (no tool needed), the FAT partition with mtools and the ext4
root with debugfs, both at the partition's offset inside the image file (on A/B images what the
device binds from the data partition is read there). The user's image is
never opened for writing: QEMU boots a sparse copy, grown to a power of two where the machine
needs it (the raspi SD controller) and always larger than the image, so the device's
grow-root-once unit has room to grow into.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

from kiosk.core.errors import KioskError, UsageError
from kiosk.core.run import run
from kiosk.image.mbr import Partition, partitions, root_partition

MiB = 1 << 20
GiB = 1 << 30
RUN_HEADROOM = 512 * MiB   # what a device writes in a session (journal, grow-root, a push) beyond its image


# ------------------------------------------------------------------ the file systems

def _need_tool(name: str, package: str) -> None:
    if not shutil.which(name):
        raise KioskError(f"{name} is not installed", hint=f"apt install {package}")


_MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "MTOOLS_NO_VFAT": "0"}


def fat_listing(image: Path, part: Partition) -> list[str]:
    """File names in the FAT partition's top directory."""
    _need_tool("mdir", "mtools")
    result = run(["mdir", "-b", "-i", f"{image}@@{part.start}", "::"], env=_MTOOLS_ENV,
                 what=f"{image}: cannot read the FAT partition")
    names = []
    for line in result.stdout.splitlines():
        line = line.strip()
        if line.startswith("::/"):
            line = line[3:]
        if line and "/" not in line.rstrip("/"):
            names.append(line.rstrip("/"))
    return sorted(names)


def fat_read(image: Path, part: Partition, name: str) -> bytes:
    _need_tool("mcopy", "mtools")
    return run(["mcopy", "-n", "-i", f"{image}@@{part.start}", f"::{name}", "-"], env=_MTOOLS_ENV, text=False,
               what=f"{image}: cannot read {name} from the FAT partition").stdout


def fat_write(image: Path, part: Partition, name: str, source: Path) -> None:
    """source's bytes as NAME on the FAT partition (replacing it): only ever on kiosk run's own disk copy."""
    _need_tool("mcopy", "mtools")
    run(["mcopy", "-o", "-i", f"{image}@@{part.start}", str(source), f"::{name}"], env=_MTOOLS_ENV,
        what=f"{image}: cannot write {name} on the FAT partition")


def _file_system_of(image: Path, path: str) -> tuple[str, str]:
    """(debugfs's image spec, path inside that file system) for a path as the device sees it: the root, or on
    A/B images (four partitions) the data partition for what the device binds from there (paths.DATA_BINDS)."""
    from kiosk.core.paths import DATA_BINDS

    parts = partitions(image)
    if len(parts) == 4:
        for source, target in DATA_BINDS:
            if path == target or path.startswith(target + "/"):
                return f"{image}?offset={parts[3].start}", "/" + source + path[len(target):]
    return f"{image}?offset={root_partition(image).start}", path


def root_read(image: Path, path: str, *, hops: int = 16) -> bytes | None:
    """A file from the image's ext4 root filesystem with debugfs (symlinks followed); None if absent."""
    debugfs = shutil.which("debugfs") or shutil.which("/sbin/debugfs")
    if not debugfs:
        return None
    for _ in range(hops):
        spec, inside = _file_system_of(image, path)
        stat = run([debugfs, "-R", f'stat "{inside}"', spec], check=False)
        if "Type: symlink" not in stat.stdout:
            if "Type: regular" not in stat.stdout:
                return None
            result = run([debugfs, "-R", f'cat "{inside}"', spec], check=False, text=False)
            return result.stdout if result.returncode == 0 else None
        match = re.search(r'Fast link dest: "(.*)"', stat.stdout)
        if match:
            target = match.group(1)
        else:
            target = run([debugfs, "-R", f'cat "{inside}"', spec], check=False).stdout.rstrip("\0")
        path = target if target.startswith("/") else os.path.normpath(os.path.join(os.path.dirname(path), target))
    return None


def board_of_image(image: Path) -> tuple[str, str | None]:
    """(board, host name) the image was built for: release.json inside it, else manifest.json beside it,
    else the file name (<host>-<board>.img)."""
    from kiosk.spec.hardware import board_names

    data = root_read(image, "/etc/kiosk/release.json")
    if data:
        with contextlib.suppress(ValueError, AttributeError):
            release = json.loads(data)
            return release["hardware"], release.get("hostName")
    manifest = image.parent / "manifest.json"
    if manifest.is_file():
        with contextlib.suppress(ValueError, KeyError, OSError):
            info = json.loads(manifest.read_text())
            if Path(info["image"]).name == image.name:
                return info["hardware"], info.get("hostName")
    for board in board_names():
        if image.name.endswith(f"-{board}.img"):
            return board, image.name[: -len(f"-{board}.img")]
    raise KioskError(f"{image}: cannot tell which board it is for (no /etc/kiosk/release.json in it, no "
                     "manifest.json beside it)", hint="give --board NAME")


# ------------------------------------------------------------------ the copy QEMU boots

def disk_size(image_bytes: int, board: dict, requested: int | None = None) -> int:
    """The size of the copy QEMU boots: a power of two for the raspi SD controller; larger than the
    image in any case (at least +256 MiB) so the first boot's grow-root has something to do."""
    power_of_two = board["qemu"].get("imagePowerOfTwo", False)
    if requested is not None:
        if requested < image_bytes:
            raise UsageError(f"--disk-size {requested // MiB} MiB is smaller than the image ({image_bytes // MiB} MiB)")
        if power_of_two and requested & (requested - 1):
            raise UsageError(f"--disk-size: QEMU's {board['qemu']['machine']} SD card must be a power of two",
                             hint="e.g. --disk-size 4G")
        return requested
    size = 1 << (image_bytes + 256 * MiB - 1).bit_length()
    return size if power_of_two else max(size, 2 * GiB)


def make_disk(image: Path, dest: Path, size: int) -> None:
    """A sparse copy of image at dest, `size` bytes long (the user's image is never opened for writing)."""
    from kiosk.image.assemble import copy_sparse

    tmp = dest.with_name(f".{dest.name}.tmp")
    with open(tmp, "wb") as f:
        f.truncate(size)
    try:
        copy_sparse(image, tmp, 0)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)


def check_free_space(image: Path, where: Path, headroom: int = RUN_HEADROOM) -> None:
    """Refuse to start when the copy would not fit: a VM whose disk fills is paused by QEMU without a word.

    The copy is sparse: it needs the image's allocated bytes, plus what the device will write.
    """
    need = image.stat().st_blocks * 512 + headroom
    free = shutil.disk_usage(where).free
    if free < need:
        raise KioskError(f"{where} has {free / GiB:.1f} GiB free; the copy QEMU boots needs "
                         f"{need / GiB:.1f} GiB (the image's data and {headroom // MiB} MiB for what the device "
                         f"writes)", hint="free some space, or point KIOSK_CACHE_DIR at a disk with room")
