"""Spec + board -> Plan: everything a build needs to know, decided in one place.

The package set is the cache key of the base root filesystem, so it is
sorted and contains only what packages decide; configuration (host name,
keys, Wi-Fi, program arguments) never enters it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from kiosk.spec.hardware import load_board
from kiosk.spec.sources import apt_sources

# Every kiosk: init, networking, SSH, the display stack, and what the device-side
# kiosk package needs (Debian's own python3 libraries, git for configuration.git).
BASE_PACKAGES = (
    "systemd-sysv", "systemd-resolved", "udev", "dbus", "libpam-systemd", "kmod", "iproute2", "ca-certificates",
    "openssh-server", "wpasupplicant", "wireless-regdb", "locales", "tzdata", "fdisk", "e2fsprogs",
    "cage", "fonts-dejavu-core", "plymouth", "plymouth-themes",
    # cage's seat: libseat's logind backend needs polkit to activate the session (EACCES without it), so
    # seatd hands cage the DRM and input devices. cage 0.1.4 exits at start without the Xwayland binary
    # (a Recommends, which the build does not install); X11 programs (chromium) need it anyway.
    "seatd", "xwayland",
    # `kiosk screenshot`: grim reads the screen through cage's wlr-screencopy (cage 0.1.4 has it; 49 kB).
    "grim",
    # fsck.fat: systemd-fsck checks the firmware partition at boot (fstab pass 2), so a power cut during
    # a config.txt rewrite (FAT has no journal) is repaired before kiosk-recover reconciles it.
    "dosfstools",
    "git", "python3", "python3-jsonschema", "python3-git", "python3-zeroconf", "python3-requests",
    # A Raspberry Pi has no real-time clock: without NTP it boots at systemd's build date and every TLS
    # certificate a browser kiosk meets is "not yet valid".
    "systemd-timesyncd",
)


@dataclass(frozen=True)
class Plan:
    spec: dict                      # the validated spec, defaults filled in
    board: dict                     # hardware/<board>.json
    architecture: str
    suite: str
    mirror: str
    sources: tuple[tuple[str, str], ...]   # (mirror, suite): the suite, its -security, its -updates
    packages: tuple[str, ...]       # sorted; the whole set given to mmdebstrap
    notes: tuple[str, ...] = field(default=())

    @property
    def package_key(self) -> str:
        """Cache key of the base root filesystem: (suite, architecture, sources, package set)."""
        blob = json.dumps([self.suite, self.architecture, [list(s) for s in self.sources], list(self.packages)])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def summary(self) -> dict:
        return {
            "board": self.board["name"],
            "description": self.board["description"],
            "architecture": self.architecture,
            "kernel": self.board["kernelPackage"],
            "bootloader": self.board["bootloader"],
            "suite": self.suite,
            "mirror": self.mirror,
            "sources": [f"{mirror} {suite}" for mirror, suite in self.sources],
            "packages": list(self.packages),
            "packageKey": self.package_key,
            "canBuildItself": self.board["canBuildItself"],
        }


def make_plan(spec: dict) -> Plan:
    board = load_board(spec["hardware"])
    packages = set(BASE_PACKAGES)
    packages.add(board["kernelPackage"])
    packages.update(board["firmwarePackages"])
    packages.update(board.get("updatePackages", []))
    if spec.get("raspberryPi", {}).get("enableExtraFirmware"):
        packages.update(board["extraFirmwarePackages"])
    if spec.get("raspberryPi", {}).get("cecSupport") and board["bootloader"] == "raspi-firmware":
        # cec-utils (libcec's cec-client) as Nixiosk has it; v4l-utils' cec-ctl speaks the kernel's CEC API
        # (/dev/cec0 of vc4's HDMI), which `kiosk screen off|on` uses for the TV's standby and wake-up.
        packages.update(("cec-utils", "v4l-utils"))
    packages.add(spec["program"]["package"])
    packages.update(spec.get("packages", []))
    return Plan(
        spec=spec,
        board=board,
        architecture=board["architecture"],
        suite=spec["debian"]["suite"],
        mirror=spec["debian"]["mirror"],
        sources=tuple(apt_sources(spec["debian"])),
        packages=tuple(sorted(packages)),
    )
