"""config.txt and cmdline.txt exactly as Debian's raspi-firmware writes them, from the files it reads.

Debian's kernel hook (/etc/kernel/postinst.d/z50-raspi-firmware, raspi-firmware 1.20220830) rewrites
both on the firmware partition after a kernel or firmware upgrade, from /etc/default/raspi-firmware,
raspi-firmware-custom and raspi-extra-cmdline. kiosk renders those three (config.render) and derives
the two FAT files from them with these functions, at image build (image.bootfiles) and on every
switch (device.bootconfig): the bytes are the hook's, so its next run changes nothing
(tests/test_image.py runs the hook itself and compares).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from kiosk.config.display import mode_kernel_args

CONFIG_HEADER = """# Do not modify this file!
#
# It is automatically generated upon install or update of either the
# firmware or the Linux kernel.
#
# If you need to set boot-time parameters, do so via the
# /etc/default/raspi-firmware, /etc/default/raspi-firmware-custom or
# /etc/default/raspi-extra-cmdline files.

"""


def version_key(name: str):
    """Order kernel versions and file names as `sort -V` does for Debian's (6.1.0-9 before 6.1.0-28)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def latest_boot_file(boot: Path, prefix: str) -> str | None:
    """The hook's `ls -1 /boot/PREFIX* | grep -E -v '\\.(dpkg-bak|old-dkms)$' | sort -V -r | head -1`, as a name."""
    names = [p.name for p in boot.glob(prefix + "*") if not p.name.endswith((".dpkg-bak", ".old-dkms"))]
    return max(names, key=version_key) if names else None


def firmware_custom(spec: dict, board: dict) -> str:
    """/etc/default/raspi-firmware-custom's settings: the board's lines, then the spec's firmwareConfig."""
    text = "\n".join(board["configTxt"]) + "\n"
    extra = (spec.get("raspberryPi") or {}).get("firmwareConfig", "")
    if extra:
        text += "# raspberryPi.firmwareConfig from nixiosk.json\n" + extra.rstrip("\n") + "\n"
    return text


def extra_cmdline(board: dict, spec: dict) -> str:
    """/etc/default/raspi-extra-cmdline: the board's kernel arguments, the spec's display mode, a quiet boot."""
    return " ".join(kernel_arguments(board, spec)) + "\n"


def kernel_arguments(board: dict, spec: dict) -> list[str]:
    """The kernel arguments after root= and console=: the board's, display.mode's EDID, quiet splash."""
    return board["cmdline"] + mode_kernel_args(spec, board) + ["quiet", "splash"]


def _shell_cat(text: str) -> str:
    """What $(cat file) gives in the hook: trailing newlines removed."""
    return text.rstrip("\n")


def raspi_config_txt(arch: str, kernel: str, initrd: str | None, custom: str | None) -> str:
    """config.txt as raspi-firmware's z50-raspi-firmware hook writes it (bookworm 1.20220830); initrd None is
    its INITRAMFS="no" (U-Boot, which loads the slot's own, is the firmware's kernel)."""
    text = CONFIG_HEADER
    if arch == "arm64":
        text += "# Switch the CPU from ARMv7 into ARMv8 (aarch64) mode\narm_64bit=1\n\n"
    text += f"enable_uart=1\nupstream_kernel=1\n\nkernel={kernel}\n"
    if initrd is not None:
        text += ("# For details on the initramfs directive, see\n"
                 "# https://www.raspberrypi.org/forums/viewtopic.php?f=63&t=10532\n"
                 f"initramfs {initrd}\n")
    if custom is not None:
        text += f"\n# Inserted by /etc/default/raspi-firmware-custom\n{_shell_cat(custom)}\n"
    return text


def raspi_cmdline_txt(console_list: list[str], rootpart: str, *, pi4: bool, cma: str = "64M",
                      extra: str | None = None) -> str:
    """cmdline.txt as the same hook writes it, spaces and all."""
    pre = "".join(f" console={c}" for c in console_list)
    set_cma = "" if (cma == "64M" and pi4) or cma == "0" else f"cma={cma}"
    post = _shell_cat(extra) if extra is not None else ""
    return f"{pre} root={rootpart} rw fsck.repair=yes net.ifnames=0 {set_cma} rootwait {post}\n"


def set_default(text: str, key: str, value: str) -> str:
    """Set KEY=value in a shell defaults file: replace the (commented) line, else append."""
    line = f"{key}={value}"
    pattern = re.compile(rf"^#?\s*{key}=.*$", re.M)
    if re.search(rf"^{key}=", text, re.M):
        return re.sub(rf"^{key}=.*$", line, text, count=1, flags=re.M)
    if pattern.search(text):
        return pattern.sub(line, text, count=1)
    return text.rstrip("\n") + f"\n{line}\n"


def read_defaults(text: str) -> dict[str, str]:
    """The KEY=value assignments of /etc/default/raspi-firmware as the hook's `. file` sees plain ones
    (quotes removed, the last one wins); anything fancier than an assignment is not kiosk's and ignored."""
    values = {}
    for line in text.splitlines():
        match = re.match(r"^\s*([A-Z_][A-Z0-9_]*)=(.*)$", line)
        if match:
            try:
                words = shlex.split(match.group(2), comments=True)
            except ValueError:
                continue
            values[match.group(1)] = " ".join(words)
    return values


# --- U-Boot's slot order (A/B Raspberry Pis, kiosk.image.uboot) ----------------------------------

SLOTS_FILE = "kiosk-slots.txt"   # on the FAT: the order of the last commit, for a lost uboot.env
TRIES = 3                        # boots a committed slot may fail before U-Boot passes it over


def slots_text(order: str, left: dict[str, int]) -> str:
    """kiosk-slots.txt (U-Boot's `env import -t` format): the boot order and tries of a known-good state,
    written at image build and by `kiosk slot commit`."""
    return f"BOOT_ORDER={order}\n" + "".join(f"BOOT_{name}_LEFT={left[name]}\n" for name in ("A", "B"))


# --- the kernel command line of GRUB boards (the A/B qemu target, kiosk.image.grub) -----------------

KIOSK_CMDLINE = "/etc/default/kiosk-cmdline"   # rendered by config.render, like raspi-extra-cmdline
CMDLINE_CFG = "cmdline.cfg"                     # on the FAT: grub.cfg sources it at every boot


def efi_kernel_arguments(board: dict, spec: dict) -> list[str]:
    """The kernel's arguments beyond root= and the slot: the screen's console first, the serial console last
    (/dev/console: systemd's messages reach the serial log `kiosk run` shows), then what every boot loader
    gives (the board's own, display.mode's EDID, quiet splash)."""
    return ["console=tty1", f"console={board['serialConsole']}", *kernel_arguments(board, spec)]


def grub_cmdline_cfg(arguments: str) -> str:
    """cmdline.cfg: the arguments as one GRUB variable, single-quoted (GRUB expands nothing in it). Written at
    build (image.grub) and on every switch (device.bootconfig), so a pushed display.mode reaches the kernel
    at the next boot as cmdline.txt does on the Pis."""
    words = arguments.split()
    if any("'" in word for word in words):   # spec values are validated: a quote here is a bug
        raise ValueError(f"a kernel argument with a quote: {arguments!r}")
    return ("# Written by kiosk: the kernel's arguments (grub/grub.cfg sources this file).\n"
            f"set kiosk_cmdline='{' '.join(words)}'\n")
