"""/etc/rauc/system.conf of A/B images: the root slots RAUC installs into, and the boot loader it drives.

Both boot loaders follow RAUC's own conventions (notes/ab-update.md): GRUB's grubenv (kiosk.image.grub)
on the qemu target, U-Boot's environment file uboot.env (kiosk.image.uboot) on the Raspberry Pis.
`compatible` is what kiosk.image.bundle puts in a bundle's manifest for the board; the keyring is the
user's update certificate (kiosk.config.signing), written by the pipeline, and the directory of the device's own
certificate on the data partition (empty until the device builds a system itself: kiosk.device.selfbuild; RAUC
1.8 takes a missing directory); [casync] names the chunk store
kiosk update forwards to the device for a chunked bundle (kiosk.update.chunks).
"""

from __future__ import annotations

from kiosk.config.signing import RAUC_CERTIFICATE
# The casync chunk store `rauc install` reads a chunked bundle's missing chunks from (kiosk.core.paths).
from kiosk.core.paths import DEVICE_KEYRING, RAUC_CHUNK_PORT, RAUC_CHUNK_STORE  # noqa: F401 (RAUC_CHUNK_PORT)

# The boot loader's lines of [system]. U-Boot: a committed slot gets 3 tries (the boot script counts each
# boot down, `kiosk slot commit` sets it back with mark-good), a newly installed one a single try.
BOOTLOADER_LINES = {
    "grub": "bootloader=grub\ngrubenv=/boot/firmware/grub/grubenv\n",
    "uboot": "bootloader=uboot\nboot-attempts=3\nboot-attempts-primary=1\n",
}

SYSTEM_CONF = """# Written by kiosk at image build: the root slots RAUC installs into (notes/ab-update.md).
[system]
compatible=kiosk-{board}
{bootloader}statusfile=/data/rauc.status

[keyring]
path={certificate}
directory={device_keyring}

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


def bootloader(board: dict) -> str:
    """RAUC's name for the board's slot-choosing boot loader."""
    return "uboot" if board.get("uboot") else "grub"


def system_conf(board: dict) -> str:
    return SYSTEM_CONF.format(board=board["name"], bootloader=BOOTLOADER_LINES[bootloader(board)],
                              certificate=RAUC_CERTIFICATE, prefix=board["slotDevicePrefix"],
                              store=RAUC_CHUNK_STORE, device_keyring=DEVICE_KEYRING)
