"""raspberryPi.firmwareConfig: the config.txt settings a spec may not set, and why.

The lines are appended to the config.txt kiosk writes (kernel=, initramfs, arm_64bit, upstream_kernel
are kiosk's). A push changes config.txt on the running device, and nothing rolls a boot partition
back: a setting that chooses the kernel, initramfs, command line, device tree or GPU firmware, or
where they are loaded from, can leave the card unbootable with no way to push a fix. Those are
refused, as are the settings that write the board's one-time-programmable memory and `include`
(another file kiosk cannot check). The key list follows the Raspberry Pi config.txt documentation
("Boot options", "Legacy options"); keys are compared case-insensitively, in every [section].
"""

from __future__ import annotations

import re

_BRICK = "decides what boots; a bad value would brick the device with no way back"
_OTP = "writes the board's one-time-programmable memory, which can never be undone"

REFUSED = {
    # the kernel, its load address and mode
    "kernel": _BRICK, "kernel_address": _BRICK, "kernel_old": _BRICK, "arm_64bit": _BRICK, "arm_control": _BRICK,
    "armstub": _BRICK, "arm_peri_high": _BRICK, "enable_gic": _BRICK, "disable_commandline_tags": _BRICK,
    # the initramfs and the command line
    "initramfs": _BRICK, "ramfsfile": _BRICK, "ramfsaddr": _BRICK, "auto_initramfs": _BRICK, "cmdline": _BRICK,
    # where the kernel, device tree and overlays are read from
    "os_prefix": _BRICK, "overlay_prefix": _BRICK, "upstream_kernel": _BRICK,
    "device_tree": _BRICK, "device_tree_address": _BRICK, "device_tree_end": _BRICK,
    # the GPU firmware (start*.elf / fixup*.dat are a matched pair)
    "start_file": _BRICK, "fixup_file": _BRICK, "start_x": _BRICK, "start_debug": _BRICK, "start_cd": _BRICK,
    # autoboot.txt's keys, should they be put here
    "boot_partition": _BRICK, "tryboot_a_b": _BRICK,
    "include": "reads settings from another file, which kiosk cannot check",
    "program_usb_boot_mode": _OTP, "program_usb_boot_timeout": _OTP, "program_gpio_bootmode": _OTP,
    "otp_write": _OTP,
}

_KEY = re.compile(r"[A-Za-z0-9_]+")


def refused_lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, the line, why) for every line of `text` that sets a refused key."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "[")):
            continue
        key = _KEY.match(stripped)
        if key and key.group().lower() in REFUSED:
            found.append((number, stripped, REFUSED[key.group().lower()]))
    return found
