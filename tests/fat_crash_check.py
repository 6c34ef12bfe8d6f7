"""Run ON a booted kiosk (the boot tests pipe it to `python3 -` over ssh): kiosk's firmware-partition writer
(kiosk/device/bootconfig.py, as installed on the device) on a real FAT file system, SIGKILLed at each of
its steps. Prints one JSON report; the boot test asserts on it.

A loop-mounted vfat holds config.txt and cmdline.txt as the image build wrote them, plus a kernel and an
initramfs; a device tree beside it holds the /etc/default/raspi-* files of the generation now linked.
Every step of the writer ends with fsync of the file and its directory, so what the disk holds after the
kill is what it holds after a power cut at that point. Then, as at the next boot: unmount, fsck.fat -a
(systemd-fsck does it for /boot/firmware), the partition read afresh (a new mount: nothing cached), and
kiosk-recover's sync, after which exactly the generation's files must be there and no leftover.
(This runs in the guest because the build host's kernel may have no vfat: the device's kernel is the
one whose FAT driver matters.)
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from kiosk.config.bootconfig import firmware_custom, raspi_cmdline_txt, raspi_config_txt
from kiosk.device import bootconfig
from kiosk.spec.hardware import load_board

VERSION = "6.1.0-28-arm64"
BOARD = load_board("raspberryPi3")
ROOTPART = "UUID=0b0e53b3-1c1e-4d5a-8f3e-5e1d1a2b3c4d"
EXTRA = "net.ifnames=0 fsck.repair=yes rootwait quiet splash\n"
STEPS = ["firmware-written-cmdline.txt", "firmware-replaced-cmdline.txt",
         "firmware-written-config.txt", "firmware-replaced-config.txt"]
NEW_SETTINGS = "hdmi_force_hotplug=1\ndisable_overscan=1"


def config(text):
    return raspi_config_txt("arm64", f"vmlinuz-{VERSION}", f"initrd.img-{VERSION}",
                            firmware_custom({"raspberryPi": {"firmwareConfig": text}}, BOARD)).encode()


def cmdline(cma):
    return raspi_cmdline_txt(["ttyS1,115200", "tty1"], ROOTPART, pi4=False, cma=cma, extra=EXTRA).encode()


def sh(*argv):
    return subprocess.run(argv, check=True, capture_output=True, text=True)


def device_root(work, firmware_config, cma):
    root = work / "root"
    for directory in ("etc/default", "etc/kiosk", "boot/firmware"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    (root / "etc/kiosk/release.json").write_text(json.dumps({"hardware": "raspberryPi3", "hostName": "t"}))
    (root / "etc/default/raspi-firmware").write_text(f'CMA={cma}\nCONSOLES="ttyS1,115200 tty1"\nROOTPART="{ROOTPART}"\n')
    (root / "etc/default/raspi-extra-cmdline").write_text(EXTRA)
    (root / "etc/default/raspi-firmware-custom").write_text(
        firmware_custom({"raspberryPi": {"firmwareConfig": firmware_config}}, BOARD))
    for name in (f"vmlinuz-{VERSION}", f"initrd.img-{VERSION}"):
        (root / "boot" / name).write_bytes(b"kernel")
    return root


def firmware_partition(work):
    """A 64 MiB FAT32 file system holding what the image build wrote (the old settings)."""
    disk = work / "firmware.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    sh("mkfs.vfat", "-F", "32", "-n", "RASPIFIRM", str(disk))
    mount(disk, work / "root/boot/firmware")
    fat = work / "root/boot/firmware"
    (fat / "config.txt").write_bytes(config(""))
    (fat / "cmdline.txt").write_bytes(cmdline("64M"))
    for name in (f"vmlinuz-{VERSION}", f"initrd.img-{VERSION}"):
        (fat / name).write_bytes(os.urandom(300_000))
    umount(fat)
    return disk


def mount(disk, where):
    sh("mount", "-o", "loop,rw,noatime,umask=0022", str(disk), str(where))


def umount(where):
    sh("umount", str(where))


def view(disk, where):
    """Every file on the partition, read through a fresh read-only mount (nothing from before is cached)."""
    sh("mount", "-o", "loop,ro", str(disk), str(where))
    try:
        return {p.name: p.read_bytes() for p in where.iterdir()}
    finally:
        umount(where)


def writer(root, crash_at):
    code = ("import sys; from pathlib import Path; from kiosk.device.bootconfig import sync; "
            "print(sync(Path(sys.argv[1]), print))")
    env = dict(os.environ, **({"KIOSK_TEST_CRASH_AT": crash_at} if crash_at else {}))
    return subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, env=env)


def check_step(step):
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        work = Path(tmp)
        root = device_root(work, NEW_SETTINGS, "128M")   # the new generation: both files change
        fat = root / "boot/firmware"
        disk = firmware_partition(work)
        mount(disk, fat)
        try:
            killed = writer(root, step)
        finally:
            umount(fat)
        fsck = subprocess.run(["fsck.fat", "-a", "-w", str(disk)], capture_output=True, text=True)
        seen = view(disk, fat)
        text = seen.get("config.txt", b"").decode(errors="replace")
        kernel = next((line.split("=", 1)[1] for line in text.splitlines() if line.startswith("kernel=")), None)
        initrd = next((line.split()[1] for line in text.splitlines() if line.startswith("initramfs ")), None)
        mount(disk, fat)
        try:
            again = writer(root, None)
        finally:
            umount(fat)
        after = view(disk, fat)
        return {
            "step": step, "killed": killed.returncode, "fsck": fsck.returncode,
            "config": "old" if seen.get("config.txt") == config("") else
                      "new" if seen.get("config.txt") == config(NEW_SETTINGS) else text,
            "cmdline": "old" if seen.get("cmdline.txt") == cmdline("64M") else
                       "new" if seen.get("cmdline.txt") == cmdline("128M") else repr(seen.get("cmdline.txt")),
            "kernelFound": bool(kernel) and len(seen.get(kernel, b"")) == 300_000,
            "initrdFound": bool(initrd) and len(seen.get(initrd, b"")) == 300_000,
            "recovered": again.returncode == 0 and after.get("config.txt") == config(NEW_SETTINGS)
                         and after.get("cmdline.txt") == cmdline("128M"),
            "leftovers": sorted(n for n in after if n.endswith(bootconfig.NEW_SUFFIX)),
            "recoverOutput": (again.stdout + again.stderr).strip().splitlines()[-3:],
        }


if __name__ == "__main__":
    print(json.dumps([check_step(step) for step in STEPS]))
