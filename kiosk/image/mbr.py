"""An image's MBR partition table, read back (no tool needed): where its FAT and root partitions are.

assemble.py writes the table; QEMU's disk copy (kiosk.qemu.disk) and update bundles (kiosk.image.bundle) read it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from kiosk.core.errors import KioskError

FAT_TYPES = {0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0E}


@dataclass(frozen=True)
class Partition:
    number: int
    type: int
    start: int   # bytes
    size: int    # bytes


def partitions(image: Path) -> list[Partition]:
    """The image's MBR primary partitions (read here: no tool needed)."""
    try:
        with open(image, "rb") as f:
            mbr = f.read(512)
    except OSError as exc:
        raise KioskError(f"{image}: cannot read it: {exc.strerror}") from None
    if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
        raise KioskError(f"{image}: not a disk image (no MBR partition table)",
                         hint="give an image made by kiosk build")
    parts = []
    for i in range(4):
        entry = mbr[446 + 16 * i: 462 + 16 * i]
        ptype = entry[4]
        start, count = struct.unpack("<II", entry[8:16])
        if ptype and count:
            parts.append(Partition(i + 1, ptype, start * 512, count * 512))
    return parts


def boot_partition(image: Path) -> Partition:
    for part in partitions(image):
        if part.type in FAT_TYPES:
            return part
    raise KioskError(f"{image}: no FAT boot partition (partition 1 should be FAT32 'RASPIFIRM')")


def root_partition(image: Path) -> Partition:
    for part in partitions(image):
        if part.type == 0x83:
            return part
    raise KioskError(f"{image}: no Linux root partition")
