"""GRUB (x86_64-efi) on the FAT partition of A/B images: it boots root slot A or B (notes/ab-update.md).

Files only, no grub-install and no loop device: EFI/BOOT/BOOTX64.EFI (grub-mkimage from the build
host's grub-efi-amd64-bin, the removable-media path any UEFI firmware boots, OVMF under QEMU),
grub/grub.cfg and grub/grubenv (grub-editenv). grub.cfg follows RAUC's GRUB convention (ORDER,
A_OK/A_TRY, B_OK/B_TRY in grubenv, `save_env` on the FAT): a slot is tried when OK=1 and TRY=0, and
TRY is set as it is tried, so a slot that never commits is not booted twice; `rauc status
mark-good` clears TRY (kiosk slot commit, after the health check). panic=10: a kernel panic reboots, and
the next boot falls back like after a watchdog reset. Each slot boots its own kernel and initramfs (/vmlinuz, /initrd.img in the
slot's root); root= names the partition by device path, since both slots carry one ext4 UUID.
grub-mkimage's output is the same bytes for the same modules and GRUB version (checked by the
rebuild test).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from kiosk.core.errors import KioskError
from kiosk.core.run import run

GRUB_EFI_DIR = Path("/usr/lib/grub/x86_64-efi")
PREFIX = "(hd0,msdos1)/grub"
MODULES = ("part_msdos", "fat", "ext2", "normal", "configfile", "loadenv", "test", "echo", "linux", "cat",
           "sleep", "halt", "reboot", "efi_gop", "all_video", "gzio")
# The first boot: slot A committed (the image's own), slot B empty.
FIRST_ENV = {"ORDER": "A B", "A_OK": "1", "A_TRY": "0", "B_OK": "0", "B_TRY": "0"}

GRUB_CFG = """# Written by kiosk at image build: boot root slot A or B (RAUC's GRUB convention, notes/ab-update.md).
set timeout=0
set default=0
load_env --file {prefix}/grubenv
if [ -z "$ORDER" ]; then set ORDER="A B"; fi
if [ -z "$A_OK" ]; then set A_OK=1; fi
if [ -z "$A_TRY" ]; then set A_TRY=0; fi
if [ -z "$B_OK" ]; then set B_OK=0; fi
if [ -z "$B_TRY" ]; then set B_TRY=0; fi
echo "kiosk-ab: ORDER=$ORDER A_OK=$A_OK A_TRY=$A_TRY B_OK=$B_OK B_TRY=$B_TRY"
set slot=
for s in $ORDER; do
  if [ -z "$slot" ]; then
    if [ "$s" = "A" -a "$A_OK" = "1" -a "$A_TRY" = "0" ]; then set slot=A; set part=2; set A_TRY=1; fi
    if [ "$s" = "B" -a "$B_OK" = "1" -a "$B_TRY" = "0" ]; then set slot=B; set part=3; set B_TRY=1; fi
  fi
done
if [ -z "$slot" ]; then
  echo "kiosk-ab: no slot left to try: booting A without a try"
  set slot=A; set part=2
fi
# menuentry bodies see exported variables only
export slot
export part
save_env --file {prefix}/grubenv A_TRY B_TRY
echo "kiosk-ab: booting slot $slot from (hd0,msdos$part)"
menuentry "kiosk slot" {{
  linux (hd0,msdos$part)/vmlinuz root={device}$part rw rauc.slot=$slot panic=10 {cmdline}
  initrd (hd0,msdos$part)/initrd.img
}}
"""


RAUC_CERTIFICATE = "/etc/rauc/kiosk-update.cert.pem"   # the keyring: the user's update certificate (not yet written)

# The casync chunk store `rauc install` reads a chunked bundle's missing chunks from: the device's loopback, which
# kiosk update forwards (ssh -R) to the store it serves for that install (kiosk.update.chunks).
RAUC_CHUNK_PORT = 7464
RAUC_CHUNK_STORE = f"http://127.0.0.1:{RAUC_CHUNK_PORT}/store"

RAUC_SYSTEM_CONF = """# Written by kiosk at image build: the root slots RAUC installs into (notes/ab-update.md).
[system]
compatible=kiosk-{board}
bootloader=grub
grubenv=/boot/firmware/grub/grubenv
statusfile=/data/rauc.status

[keyring]
path={certificate}

[slot.rootfs.0]
device={prefix}2
type=ext4
bootname=A

[slot.rootfs.1]
device={prefix}3
type=ext4
bootname=B

[casync]
storepath={store}
"""


def rauc_system_conf(board: dict) -> str:
    """/etc/rauc/system.conf: RAUC's grub backend on the grubenv this module writes; `compatible` is what
    kiosk.update.bundle puts in a bundle's manifest for the board."""
    return RAUC_SYSTEM_CONF.format(board=board["name"], certificate=RAUC_CERTIFICATE,
                                   store=RAUC_CHUNK_STORE, prefix=board["slotDevicePrefix"])


def kernel_arguments(board: dict, spec: dict) -> list[str]:
    """The kernel's arguments beyond root= and the slot: the screen's console first, the serial console last
    (/dev/console: systemd's messages reach the serial log `kiosk run` shows), then what every boot loader
    gives (kiosk.config.bootconfig: the board's own, display.mode's EDID, quiet splash)."""
    from kiosk.config.bootconfig import kernel_arguments as common

    return ["console=tty1", f"console={board['serialConsole']}", *common(board, spec)]


def grub_cfg(board: dict, spec: dict) -> str:
    return GRUB_CFG.format(prefix=PREFIX, device=board["slotDevicePrefix"],
                           cmdline=" ".join(kernel_arguments(board, spec)))


def _need_grub() -> None:
    if not (GRUB_EFI_DIR / "linux.mod").is_file() or not shutil.which("grub-mkimage"):
        raise KioskError(f"boot files: GRUB for EFI is not installed on this machine ({GRUB_EFI_DIR})",
                         hint="apt install grub-efi-amd64-bin grub-common (scripts/install-deps.sh)")


def grub_files(board: dict, spec: dict) -> dict[str, bytes]:
    """{path on the FAT: bytes}: the EFI boot loader, grub.cfg and the first grubenv."""
    _need_grub()
    with tempfile.TemporaryDirectory(prefix="kiosk-grub-") as tmp:
        efi = Path(tmp) / "BOOTX64.EFI"
        run(["grub-mkimage", "-O", "x86_64-efi", "-d", str(GRUB_EFI_DIR), "-o", str(efi), "-p", PREFIX, *MODULES],
            what="boot files (grub-mkimage)")
        env = Path(tmp) / "grubenv"
        run(["grub-editenv", str(env), "create"], what="boot files (grub-editenv)")
        run(["grub-editenv", str(env), "set", *(f"{k}={v}" for k, v in FIRST_ENV.items())],
            what="boot files (grub-editenv)")
        return {"EFI/BOOT/BOOTX64.EFI": efi.read_bytes(), "grub/grub.cfg": grub_cfg(board, spec).encode(),
                "grub/grubenv": env.read_bytes()}
