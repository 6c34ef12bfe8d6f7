"""The firmware partition follows the running generation: config.txt and cmdline.txt rewritten on every
switch, rollback and recovery, so that a power cut never leaves files the firmware cannot boot. (GRUB
boards, the qemu target: cmdline.cfg, the kernel's arguments that grub.cfg sources, the same way.)

The Raspberry Pi firmware reads /boot/firmware/config.txt before Linux runs; a spec's
raspberryPi.firmwareConfig lands there. FAT has no journal and no atomic rename, so each file goes
in three durable steps:
  1. NAME.kiosk-new written whole and fsynced (with its directory): NAME is still the old file;
  2. renamed over NAME (one 32-byte directory entry now points at the new data) and the directory fsynced;
  3. nothing left but NAME.
A cut before 2 leaves the old file; a cut inside 2 leaves the old or the new one, possibly with its
data chain shared with NAME.kiosk-new or not yet freed: fsck.fat repairs that at the next boot
(systemd-fsck, fstab pass 2), before kiosk-recover (which runs when a .kiosk-new exists) settles on one
generation and writes its files again. Every state between the steps holds a config.txt whose
kernel=/initramfs lines are the old or the new one; kiosk never changes those in a push (both come
from the kernel in /boot, as Debian's hook does), so the firmware boots either way.

The bytes are config.bootconfig's, i.e. Debian's z50-raspi-firmware hook's for the same
/etc/default/raspi-* files: the hook's next run (a kernel upgrade) writes the same files. (Running the
hook itself does nothing here: it exits at once unless dpkg's DEB_MAINT_PARAMS says "configure", and
it writes config.txt in place, truncating first.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kiosk.config.bootconfig import (CMDLINE_CFG, KIOSK_CMDLINE, grub_cmdline_cfg, latest_boot_file, raspi_cmdline_txt,
                                     raspi_config_txt, read_defaults)
from kiosk.core.errors import KioskError
from kiosk.core.files import crash_point, fsync_dir
from kiosk.core.log import Log
from kiosk.spec.hardware import load_board

FIRMWARE_DIR = "boot/firmware"
NEW_SUFFIX = ".kiosk-new"
DEFAULTS = "etc/default/raspi-firmware"
CUSTOM = "etc/default/raspi-firmware-custom"
EXTRA = "etc/default/raspi-extra-cmdline"


def _board(root: Path) -> dict:
    try:
        hardware = json.loads((root / "etc/kiosk/release.json").read_text())["hardware"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KioskError(f"/etc/kiosk/release.json does not say which board this is ({exc})",
                         hint="the image is damaged; reflash it") from None
    return load_board(hardware)


def expected(root: Path) -> dict[str, bytes]:
    """{name on the firmware partition: bytes} for the generation linked at root; {} when the board's
    firmware reads no config.txt (the qemu target) or Debian's settings say to leave a file alone."""
    root = Path(root)
    grub_arguments = root / KIOSK_CMDLINE.lstrip("/")
    if grub_arguments.is_file():   # GRUB boards (the qemu target): the kernel's arguments, sourced by grub.cfg
        return {CMDLINE_CFG: grub_cmdline_cfg(grub_arguments.read_text()).encode()}
    if not (root / CUSTOM).is_file():
        return {}
    board = _board(root)
    defaults = read_defaults((root / DEFAULTS).read_text()) if (root / DEFAULTS).is_file() else {}
    kernel, initrd = latest_boot_file(root / "boot", "vmlinuz-"), latest_boot_file(root / "boot", "initrd.img-")
    files = {}
    if kernel and initrd:   # the hook's own condition; KERNEL="u-boot.bin" INITRAMFS="no" on A/B Pis
        arch = defaults.get("KERNEL_ARCH") or board["architecture"]
        named = defaults.get("KERNEL", "auto")
        files["config.txt"] = raspi_config_txt(arch, kernel if named == "auto" else named,
                                               None if defaults.get("INITRAMFS", "auto") == "no" else initrd,
                                               (root / CUSTOM).read_text()).encode()
    consoles = defaults.get("CONSOLES", "auto")
    if consoles != "auto" and defaults.get("ROOTPART"):
        extra = (root / EXTRA).read_text() if (root / EXTRA).is_file() else None
        files["cmdline.txt"] = raspi_cmdline_txt(consoles.split(), defaults["ROOTPART"],
                                                 pi4=board["name"] == "raspberryPi4",
                                                 cma=defaults.get("CMA", "64M"), extra=extra).encode()
    return files


def _firmware_dir(root: Path) -> Path | None:
    """The mounted firmware partition; None in a tree that has none (a test device root)."""
    fat = Path(root) / FIRMWARE_DIR
    if Path(root).resolve() == Path("/"):
        if not os.path.ismount(fat):
            raise KioskError("the firmware partition is not mounted at /boot/firmware",
                             hint="mount it (it is in /etc/fstab) and switch again")
        return fat
    return fat if fat.is_dir() else None


def replace(directory: Path, name: str, data: bytes) -> None:
    """Steps 1-2 of the module's docstring for one file."""
    new = directory / (name + NEW_SUFFIX)
    fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(directory)
    crash_point(f"firmware-written-{name}")
    os.rename(new, directory / name)
    fsync_dir(directory)
    crash_point(f"firmware-replaced-{name}")


def leftovers(directory: Path) -> list[Path]:
    return sorted(directory.glob("*" + NEW_SUFFIX))


def sync(root: Path, log: Log) -> list[str]:
    """Make the firmware partition's config.txt and cmdline.txt those of the generation linked at root;
    returns the names rewritten. Raises KioskError when the partition cannot be written."""
    want = expected(root)
    if not want:
        return []
    fat = _firmware_dir(root)
    if fat is None:
        return []
    try:
        for stale in leftovers(fat):   # an interrupted write: its content is recomputed below
            stale.unlink()
            fsync_dir(fat)
            log(f"firmware partition: removed {stale.name} (a write a power cut interrupted)")
        written = []
        for name, data in sorted(want.items()):
            path = fat / name
            if path.is_file() and path.read_bytes() == data:
                continue
            replace(fat, name, data)
            written.append(name)
    except OSError as exc:
        raise KioskError(f"cannot write the firmware partition: {exc.strerror} ({exc.filename})",
                         hint="check the SD card (dmesg); the previous settings stay in use") from None
    if written:
        log(f"firmware partition: {' and '.join(written)} rewritten (the firmware reads them at the next boot)")
    return written
