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
# the kernel's arguments: the generation's (cmdline.cfg, rewritten by every switch), else the image's
set kiosk_cmdline='{cmdline}'
source (hd0,msdos1)/{cmdline_cfg}
export kiosk_cmdline
menuentry "kiosk slot" {{
  linux (hd0,msdos$part)/vmlinuz root={device}$part rw rauc.slot=$slot panic=10 $kiosk_cmdline
  initrd (hd0,msdos$part)/initrd.img
}}
"""


def grub_cfg(board: dict, spec: dict) -> str:
    from kiosk.config.bootconfig import CMDLINE_CFG, efi_kernel_arguments

    return GRUB_CFG.format(prefix=PREFIX, device=board["slotDevicePrefix"], cmdline_cfg=CMDLINE_CFG,
                           cmdline=" ".join(efi_kernel_arguments(board, spec)))


def _need_grub() -> None:
    if not (GRUB_EFI_DIR / "linux.mod").is_file() or not shutil.which("grub-mkimage"):
        raise KioskError(f"boot files: GRUB for EFI is not installed on this machine ({GRUB_EFI_DIR})",
                         hint="apt install grub-efi-amd64-bin grub-common (scripts/install-deps.sh)")


def grub_files(board: dict, spec: dict) -> dict[str, bytes]:
    """{path on the FAT: bytes}: the EFI boot loader, grub.cfg, the first grubenv and the kernel's arguments."""
    from kiosk.config.bootconfig import CMDLINE_CFG, efi_kernel_arguments, grub_cmdline_cfg

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
                "grub/grubenv": env.read_bytes(),
                CMDLINE_CFG: grub_cmdline_cfg(" ".join(efi_kernel_arguments(board, spec))).encode()}
