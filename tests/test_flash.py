"""`kiosk flash`: every refusal rule on fake kernel trees, real writes to loop devices and files,
verification that catches a flipped byte, bmaptool interop, Ctrl-C, exact messages and exit codes."""

import errno
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_bmap import make_disk_image

from kiosk import cli
from kiosk.core.errors import KioskError, Refused
from kiosk.core.files import human_size
from kiosk.flash import command, progress, target, writer
from kiosk.flash.target import Roots
from kiosk.image import bmap as bm

MiB = 1 << 20
root_only = pytest.mark.root
needs_bmaptool = pytest.mark.skipif(not shutil.which("bmaptool"), reason="bmap-tools not installed")


# =============================================================================================
# Fake kernel trees

USB = "devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0"
SATA = "devices/pci0000:00/0000:00:17.0/ata1/host0/target0:0:0/0:0:0:0"
MMC = "devices/platform/soc/fe340000.mmc/mmc_host/mmc0/mmc0:aaaa"
VIRTUAL = "devices/virtual"
BASE_MOUNTINFO = ("22 27 0:21 / /proc rw,relatime - proc proc rw\n"
                  "23 27 0:22 / /sys rw,relatime - sysfs sysfs rw\n"
                  "24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw\n")


class FakeSystem:
    """A sysfs, /dev, mountinfo and /proc/swaps laid out as the kernel does, in a temp directory."""

    def __init__(self, root: Path):
        self.sys, self.dev = root / "sys", root / "dev"
        self.mountinfo, self.swaps = root / "mountinfo", root / "swaps"
        (self.sys / "class" / "block").mkdir(parents=True)
        (self.sys / "dev" / "block").mkdir(parents=True)
        self.dev.mkdir()
        self.mountinfo.write_text(BASE_MOUNTINFO)
        self.swaps.write_text("Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n")
        self.roots = Roots(self.sys, self.dev, self.mountinfo, self.swaps)

    def _node(self, path: Path, name: str, number: str, size: int, **files):
        path.mkdir(parents=True)
        (path / "holders").mkdir()
        (path / "slaves").mkdir()
        (path / "dev").write_text(number + "\n")
        (path / "size").write_text(f"{size // 512}\n")
        for key, value in files.items():
            (path / key).write_text(f"{value}\n")
        (self.sys / "class" / "block" / name).symlink_to(os.path.relpath(path, self.sys / "class" / "block"))
        (self.sys / "dev" / "block" / number).symlink_to(os.path.relpath(path, self.sys / "dev" / "block"))
        (self.dev / name).touch()

    def disk(self, kname, number, size=16 << 30, bus=USB, removable=0, ro=0, **device):
        path = self.sys / bus / "block" / kname
        self._node(path, kname, number, size, ro=ro, removable=removable)
        if bus != VIRTUAL:
            for key, value in device.items():
                (self.sys / bus / key).write_text(value + "\n")
            (path / "device").symlink_to("../..")
        return kname

    def partition(self, disk, number, devnum, size=1 << 30):
        name = f"{disk}p{number}" if disk[-1].isdigit() else f"{disk}{number}"
        base = Path(os.path.realpath(self.sys / "class" / "block" / disk))
        self._node(base / name, name, devnum, size, partition=number, ro=0)
        return name

    def holder(self, under, name, devnum, uuid=None, dm_name=None, size=1 << 30):
        path = self.sys / VIRTUAL / "block" / name
        if not path.exists():
            self._node(path, name, devnum, size, ro=0, removable=0)
            if uuid is not None:
                (path / "dm").mkdir()
                (path / "dm" / "uuid").write_text(uuid + "\n")
                (path / "dm" / "name").write_text(dm_name + "\n")
                (self.dev / "mapper").mkdir(exist_ok=True)
                (self.dev / "mapper" / dm_name).symlink_to(f"../{name}")
        under_path = Path(os.path.realpath(self.sys / "class" / "block" / under))
        (under_path / "holders" / name).symlink_to(os.path.relpath(path, under_path / "holders"))
        (path / "slaves" / under).symlink_to(os.path.relpath(under_path, path / "slaves"))
        return name

    def loop(self, kname, number, backing):
        self.disk(kname, number, bus=VIRTUAL)
        (self.sys / VIRTUAL / "block" / kname / "loop").mkdir()
        (self.sys / VIRTUAL / "block" / kname / "loop" / "backing_file").write_text(backing + "\n")

    def mount(self, devnum, point, source, fstype="ext4"):
        escaped = point.replace("\\", "\\134").replace(" ", "\\040")
        with self.mountinfo.open("a") as f:
            f.write(f"40 27 {devnum} / {escaped} rw,relatime shared:5 - {fstype} {source} rw\n")

    def swap(self, path):
        with self.swaps.open("a") as f:
            f.write(f"{path}\t\t\t\tpartition\t1048572\t\t0\t\t-2\n")


@pytest.fixture
def fake(tmp_path):
    return FakeSystem(tmp_path / "fake")


def refusal(fn, *args, **kw) -> str:
    with pytest.raises(Refused) as info:
        fn(*args, **kw)
    assert info.value.exit_code == 2
    text = str(info.value)
    assert "\n" not in text
    assert info.value.hint and text.endswith(f"; {info.value.hint}")   # the fix is the hint, apart from the reason
    return text


def laptop(fake):
    """sda: the system disk (/, /boot/efi, /home on LUKS+LVM, swap); sdb: a USB card reader with a card."""
    fake.disk("sda", "8:0", 512 << 30, bus=SATA, vendor="ATA", model="Samsung SSD 870")
    fake.partition("sda", 1, "8:1", 512 << 20)
    fake.partition("sda", 2, "8:2", 100 << 30)
    fake.partition("sda", 3, "8:3", 400 << 30)
    fake.mount("8:2", "/", "/dev/sda2")
    fake.mount("8:1", "/boot/efi", "/dev/sda1", "vfat")
    fake.disk("sdb", "8:16", 32 << 30, bus=USB, vendor="Generic", model="STORAGE DEVICE")
    fake.partition("sdb", 1, "8:17", 256 << 20)
    fake.partition("sdb", 2, "8:18", 31 << 30)
    return fake


# =============================================================================================
# The rules, one by one

def test_a_partition_is_refused_naming_its_disk(fake):
    laptop(fake)
    fake.disk("mmcblk0", "179:0", bus=MMC)
    fake.partition("mmcblk0", 1, "179:1")
    assert refusal(target.check_whole_disk, "sdb1", fake.roots) == (
        "refusing to write /dev/sdb1: it is a partition of /dev/sdb; "
        "flash the whole disk instead: kiosk flash IMAGE /dev/sdb")
    assert refusal(target.check_whole_disk, "mmcblk0p1", fake.roots) == (
        "refusing to write /dev/mmcblk0p1: it is a partition of /dev/mmcblk0; "
        "flash the whole disk instead: kiosk flash IMAGE /dev/mmcblk0")
    target.check_whole_disk("sdb", fake.roots)
    assert refusal(target.check_whole_disk, "sdz", fake.roots) == (
        f"refusing to write /dev/sdz: no such disk in {fake.sys}/class/block; pass the card's device (see lsblk)")


def test_a_disk_with_a_mounted_partition_is_refused(fake):
    laptop(fake)
    target.check_not_mounted("sdb", fake.roots)
    fake.mount("8:17", "/media/me/BOOT FS", "/dev/sdb1", "vfat")
    assert refusal(target.check_not_mounted, "sdb", fake.roots) == (
        "refusing to write /dev/sdb: /dev/sdb1 is mounted on /media/me/BOOT FS; "
        "unmount it first: umount '/media/me/BOOT FS'")


def test_a_disk_mounted_whole_or_through_a_holder_is_refused(fake):
    laptop(fake)
    fake.holder("sdb2", "dm-3", "254:3", uuid="CRYPT-LUKS2-abc-secret", dm_name="secret")
    fake.mount("254:3", "/mnt/secret", "/dev/mapper/secret")
    assert refusal(target.check_not_mounted, "sdb", fake.roots) == (
        "refusing to write /dev/sdb: /dev/sdb2 (through /dev/dm-3) is mounted on /mnt/secret; "
        "unmount it first: umount /mnt/secret")
    fake.disk("sdc", "8:32", bus=USB)
    fake.mount("8:32", "/mnt/stick", "/dev/sdc", "vfat")
    assert refusal(target.check_not_mounted, "sdc", fake.roots) == (
        "refusing to write /dev/sdc: /dev/sdc is mounted on /mnt/stick; unmount it first: umount /mnt/stick")


def test_loop_devices_set_up_on_the_disk_are_followed(fake):
    laptop(fake)
    fake.loop("loop3", "7:3", "/dev/sdb")  # losetup -P /dev/sdb; then loop3p2 is mounted
    fake.partition("loop3", 2, "259:7")
    fake.mount("259:7", "/mnt/x", "/dev/loop3p2")
    fake.loop("loop4", "7:4", "/home/me/other.img")
    assert refusal(target.check_not_mounted, "sdb", fake.roots) == (
        "refusing to write /dev/sdb: /dev/sdb (through /dev/loop3p2) is mounted on /mnt/x; "
        "unmount it first: umount /mnt/x")


def test_the_disk_holding_root_or_boot_is_refused(fake):
    laptop(fake)
    assert refusal(target.check_not_system_disk, "sda", fake.roots) == (
        "refusing to write /dev/sda: it holds / of the running system (/dev/sda2); "
        "this is not an SD card: pick the card's device (see lsblk)")
    target.check_not_system_disk("sdb", fake.roots)


def test_home_on_btrfs_is_found_by_its_source_not_its_anonymous_devnum(fake):
    fake.disk("nvme0n1", "259:0", bus=SATA)
    fake.partition("nvme0n1", 2, "259:2")
    fake.mount("0:31", "/home", "/dev/nvme0n1p2", "btrfs")
    assert refusal(target.check_not_system_disk, "nvme0n1", fake.roots) == (
        "refusing to write /dev/nvme0n1: it holds /home of the running system (/dev/nvme0n1p2); "
        "this is not an SD card: pick the card's device (see lsblk)")


def test_a_disk_with_swap_is_refused(fake):
    laptop(fake)
    fake.swap("/dev/sda3")
    assert refusal(target.check_not_swap, "sda", fake.roots) == (
        "refusing to write /dev/sda: /dev/sda3 is in use as swap of the running system; this is not an SD card: "
        "pick the card's device (see lsblk), or run 'swapoff /dev/sda3' first if you really mean it")
    target.check_not_swap("sdb", fake.roots)


def test_swap_on_lvm_is_traced_to_its_disk(fake):
    laptop(fake)
    fake.holder("sdb2", "dm-1", "254:1", uuid="LVM-Kx1", dm_name="vg-swap")
    fake.swap("/dev/mapper/vg-swap")
    assert refusal(target.check_not_swap, "sdb", fake.roots) == (
        "refusing to write /dev/sdb: /dev/sdb2 is in use as swap of the running system; this is not an SD card: "
        "pick the card's device (see lsblk), or run 'swapoff /dev/mapper/vg-swap' first if you really mean it")


@pytest.mark.parametrize("holder, uuid, dm_name, what, fix", [
    ("dm-0", "LVM-aaaabbbbcccc", "my--vg-root", "LVM volume /dev/mapper/my--vg-root",
     "deactivate its volume group first: vgchange -an my-vg"),
    ("dm-0", "CRYPT-LUKS2-0123-secret", "secret", "LUKS/dm-crypt volume /dev/mapper/secret",
     "close it first: cryptsetup close secret"),
    ("dm-0", "mpath-3600", "mpatha", "device-mapper volume /dev/mapper/mpatha", "remove it first: dmsetup remove mpatha"),
    ("md0", None, None, "RAID array /dev/md0", "stop it first: mdadm --stop /dev/md0"),
])
def test_lvm_md_and_luks_members_are_refused(fake, holder, uuid, dm_name, what, fix):
    laptop(fake)
    target.check_no_holders("sdb", fake.roots)
    fake.holder("sdb2", holder, "254:0", uuid=uuid, dm_name=dm_name)
    assert refusal(target.check_no_holders, "sdb", fake.roots) == \
        f"refusing to write /dev/sdb: /dev/sdb2 is in use by {what}; {fix}"


def test_a_whole_disk_pv_and_a_stacked_device_are_refused(fake):
    laptop(fake)
    fake.disk("sdc", "8:32", bus=USB)
    fake.holder("sdc", "dm-2", "254:2", uuid="LVM-pv", dm_name="data-lv")
    assert refusal(target.check_no_holders, "sdc", fake.roots) == (
        "refusing to write /dev/sdc: /dev/sdc is in use by LVM volume /dev/mapper/data-lv; "
        "deactivate its volume group first: vgchange -an data")
    assert refusal(target.check_no_holders, "dm-2", fake.roots) == (
        "refusing to write /dev/dm-2: it is a virtual device on top of /dev/sdc; pick the card's own device (see lsblk)")


def test_a_disk_smaller_than_the_image_is_refused(fake):
    fake.disk("sdb", "8:16", 32 * MiB, bus=USB)
    fake.disk("sdc", "8:32", 0, bus=USB)
    target.check_size("sdb", 32 * MiB, fake.roots)
    assert refusal(target.check_size, "sdb", 64 * MiB, fake.roots) == (
        "refusing to write /dev/sdb: it holds 32.0 MiB but the image is 64.0 MiB; use a card of at least 64.0 MiB")
    assert refusal(target.check_size, "sdc", 64 * MiB, fake.roots) == (
        "refusing to write /dev/sdc: it holds nothing (no medium?) but the image is 64.0 MiB; "
        "use a card of at least 64.0 MiB")


def test_a_read_only_disk_is_refused(fake):
    fake.disk("mmcblk0", "179:0", bus=MMC, ro=1)
    fake.disk("mmcblk1", "179:8", bus=MMC, ro=0)
    target.check_writable("mmcblk1", fake.roots)
    assert refusal(target.check_writable, "mmcblk0", fake.roots) == (
        "refusing to write /dev/mmcblk0: the kernel reports it read-only; "
        "slide the SD card's lock switch away from LOCK and insert it again")


def test_disk_kinds(fake):
    laptop(fake)
    fake.disk("mmcblk0", "179:0", bus=MMC)
    fake.disk("sdc", "8:32", bus=SATA.replace("ata1", "ata2"), removable=1)  # a built-in card reader
    fake.disk("loop0", "7:0", bus=VIRTUAL)
    kinds = {n: target.disk_kind(n, fake.roots) for n in ("sda", "sdb", "mmcblk0", "sdc", "loop0")}
    assert kinds == {"sda": None, "sdb": "USB", "mmcblk0": "SD/MMC", "sdc": "removable", "loop0": None}


def test_a_fixed_disk_needs_the_flag(fake):
    laptop(fake)
    asked = []
    assert refusal(target.check_removable, "sda", fake.roots, allow_fixed=False, ask=asked.append) == (
        "refusing to write /dev/sda: it is a fixed disk (not removable, not SD/MMC, not USB); "
        "if you really mean it, pass --allow-fixed-disk")
    assert asked == []
    target.check_removable("sdb", fake.roots, allow_fixed=False, ask=asked.append)  # USB: no question
    assert asked == []


def test_a_fixed_disk_with_the_flag_needs_its_name_typed_exactly(fake):
    laptop(fake)
    prompts = []

    def typing(answer):
        def ask(prompt):
            prompts.append(prompt)
            return answer
        return ask

    assert refusal(target.check_removable, "sda", fake.roots, allow_fixed=True, ask=typing("sda")) == (
        "refusing to write /dev/sda: it is a fixed disk and 'sda' was typed, not /dev/sda; "
        "type /dev/sda exactly to confirm")
    assert refusal(target.check_removable, "sda", fake.roots, allow_fixed=True, ask=typing("/dev/sdb")) == (
        "refusing to write /dev/sda: it is a fixed disk and '/dev/sdb' was typed, not /dev/sda; "
        "type /dev/sda exactly to confirm")
    assert refusal(target.check_removable, "sda", fake.roots, allow_fixed=True, ask=typing(None)) == (
        "refusing to write /dev/sda: it is a fixed disk and no device name was typed; "
        "type /dev/sda at the prompt to confirm")
    target.check_removable("sda", fake.roots, allow_fixed=True, ask=typing("/dev/sda"))
    assert prompts[-1] == "/dev/sda is a fixed disk: everything on it will be lost. Type /dev/sda to write it: "


def test_check_disk_gives_the_most_specific_reason_first_and_describes_before_asking(fake):
    laptop(fake)
    fake.swap("/dev/sda3")
    events = []
    # The system disk: its / is named, not "fixed disk", and nothing is described or asked.
    assert refusal(target.check_disk, "sda", 64 * MiB, fake.roots, allow_fixed=True,
                   ask=lambda p: events.append("ask"), describe=lambda: events.append("describe")
                   ).startswith("refusing to write /dev/sda: it holds / of the running system")
    assert events == []
    fake.disk("sdc", "8:32", bus=SATA.replace("ata1", "ata3"))
    target.check_disk("sdc", 64 * MiB, fake.roots, allow_fixed=True,
                     ask=lambda p: events.append("ask") or "/dev/sdc", describe=lambda: events.append("describe"))
    assert events == ["describe", "ask"]
    events.clear()
    assert refusal(target.check_disk, "sdc", 64 * MiB, fake.roots, allow_fixed=False,
                   ask=lambda p: events.append("ask"), describe=lambda: events.append("describe")
                   ).endswith("if you really mean it, pass --allow-fixed-disk")
    assert events == []


def test_describe_shows_model_size_partitions_and_labels(fake):
    laptop(fake)
    fake.disk("mmcblk0", "179:0", 30 << 30, bus=MMC, type="SD", name="SC32G")
    info = {"sdb1": {"fstype": "vfat", "label": "bootfs"}, "sdb2": {"fstype": "ext4", "label": "root\nfs"}}
    assert target.describe_disk("sdb", fake.roots, lsblk=lambda dev: info) == [
        "/dev/sdb: Generic STORAGE DEVICE, 32.0 GiB, USB",
        "  /dev/sdb1  256.0 MiB  vfat  label 'bootfs'",
        "  /dev/sdb2  31.0 GiB  ext4  label 'root\\nfs'",
    ]
    assert target.describe_disk("mmcblk0", fake.roots, lsblk=None) == [
        "/dev/mmcblk0: SD SC32G, 30.0 GiB, SD/MMC", "  no partitions"]


def test_resolve_target_refuses_what_is_not_a_block_device(tmp_path):
    (tmp_path / "file").write_text("x")
    assert refusal(target.resolve_target, str(tmp_path / "file")) == \
        f"refusing to write {tmp_path}/file: not a block device; pass the card's device (see lsblk)"
    assert refusal(target.resolve_target, str(tmp_path / "none")) == \
        f"refusing to write {tmp_path}/none: No such file or directory; pass the card's device (see lsblk)"


# =============================================================================================
# Progress and pieces

class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_on_a_terminal_is_one_updating_line():
    clock, out = Clock(), Stream(tty=True)
    p = progress.Progress("writing /dev/sdb", 100 * MiB, stream=out, clock=clock)
    clock.now += 2
    p.update(20 * MiB)
    clock.now += 0.1
    p.update(21 * MiB)  # too soon: not shown
    clock.now += 2
    p.update(40 * MiB)
    p.close()
    assert out.getvalue() == (
        "\rwriting /dev/sdb:  20% 20.0 MiB of 100.0 MiB, 10.5 MB/s, 0:08 left\x1b[K"
        "\rwriting /dev/sdb:  40% 40.0 MiB of 100.0 MiB, 10.2 MB/s, 0:06 left\x1b[K\n")


def test_progress_in_a_log_is_a_line_every_few_seconds():
    clock, out = Clock(), Stream(tty=False)
    p = progress.Progress("verifying /dev/sdb", 10 * MiB, stream=out, clock=clock)
    clock.now += 1
    p.update(MiB)  # before the first interval: quiet
    clock.now += 4
    p.update(5 * MiB)
    clock.now += 5
    p.update(10 * MiB, force=True)
    p.close()
    assert out.getvalue() == ("verifying /dev/sdb:  50% 5.0 MiB of 10.0 MiB, 1.0 MB/s, 0:05 left\n"
                              "verifying /dev/sdb: 100% 10.0 MiB of 10.0 MiB, 1.0 MB/s\n")


def test_pieces_are_cut_at_4_mib_boundaries_and_clipped_to_the_image():
    m = bm.BlockMap(9 * MiB + 10, 4096, ((0, 0, None), (1000, 2100, None), (2304, 2304, None)), 1103, None)
    got = list(writer.pieces(m))
    assert got == [(0, 4096, 0), (1000 * 4096, 4 * MiB, 1), (4 * MiB, 8 * MiB, 1), (8 * MiB, 2101 * 4096, 1),
                   (9 * MiB, 9 * MiB + 10, 2)]
    assert list(writer.pieces(m, MiB)) == got[1:]
    assert list(writer.pieces(m, 0, MiB)) == got[:1]


# =============================================================================================
# Files as targets (no root needed) and the command's messages

@pytest.fixture(scope="module")
def image(tmp_path_factory):
    img = make_disk_image(tmp_path_factory.mktemp("flashimg") / "kiosk.img")
    bm.write_bmap(img, Path(str(img) + ".bmap"))
    return img


@pytest.fixture
def run(monkeypatch, capsys):
    """kiosk.cli.main with only the flash stage (other stages of this tree are not this file's business)."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("kiosk.flash.command",))

    def go(*argv):
        code = cli.main(["flash", *map(str, argv)])
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return SimpleNamespace(code=code, out=out, err=err)
    return go


def last_line(text):
    return text.rstrip("\n").split("\n")[-1]


def test_flash_to_a_file_is_a_sparse_identical_copy(image, tmp_path, run):
    out = tmp_path / "card.img"
    r = run(image, out)
    assert r.code == 0, r.err
    assert out.read_bytes() == image.read_bytes()
    m = bm.read_bmap(Path(str(image) + ".bmap"))
    assert out.stat().st_blocks * 512 <= m.mapped_bytes + MiB  # holes stayed holes
    assert re.fullmatch(rf"kiosk: wrote {re.escape(str(image))} to {re.escape(str(out))}: "
                        rf"{re.escape(human_size(m.mapped_bytes))} \(image 64.0 MiB\) in \d+\.\d s, "
                        rf"\d+\.\d MB/s, verified\n", r.out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.img"]


def test_flash_to_a_file_replaces_it_atomically(image, tmp_path, run):
    out = tmp_path / "card.img"
    out.write_text("old")
    before = out.stat().st_ino
    assert run(image, out).code == 0
    assert out.stat().st_ino != before and out.read_bytes() == image.read_bytes()


def test_without_a_bmap_the_data_extents_are_written(image, tmp_path, run):
    bare = tmp_path / "bare.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(bare)], check=True)
    r = run(bare, tmp_path / "out.img")
    assert r.code == 0, r.err
    assert r.err.startswith(f"kiosk: no block map ({bare}.bmap): writing the image's data extents\n")
    assert (tmp_path / "out.img").read_bytes() == image.read_bytes()


@needs_bmaptool
def test_flash_accepts_bmaptools_map(image, tmp_path, run):
    theirs = tmp_path / "theirs.bmap"
    subprocess.run(["bmaptool", "create", str(image), "-o", str(theirs)], check=True, capture_output=True)
    r = run(image, tmp_path / "out.img", "--bmap", theirs)
    assert r.code == 0, r.err
    assert (tmp_path / "out.img").read_bytes() == image.read_bytes()


def copy_with_a_flipped_bit(image, bad):
    """`image` and its map copied to `bad`, one bit flipped in its longest range: (first, last, map's, actual digest)."""
    subprocess.run(["cp", "--sparse=always", str(image), str(bad)], check=True)
    shutil.copy(str(image) + ".bmap", str(bad) + ".bmap")
    m = bm.read_bmap(Path(str(bad) + ".bmap"))
    first, last, digest = max(m.ranges, key=lambda r: r[1] - r[0])
    with open(bad, "r+b") as f:
        f.seek(first * 4096 + 5)
        byte = f.read(1)
        f.seek(first * 4096 + 5)
        f.write(bytes([byte[0] ^ 1]))
    return first, last, digest, hashlib.sha256(bad.read_bytes()[first * 4096:(last + 1) * 4096]).hexdigest()


def test_an_image_that_does_not_match_its_map_is_an_error_and_leaves_nothing(image, tmp_path, run):
    bad = tmp_path / "bad.img"
    first, last, digest, actual = copy_with_a_flipped_bit(image, bad)
    r = run(bad, tmp_path / "out.img")
    assert r.code == 1
    assert last_line(r.err) == (
        f"kiosk: {bad} does not match its block map: blocks {first}-{last} (bytes {first * 4096}-"
        f"{(last + 1) * 4096 - 1}) have sha256 {actual}, the map says {digest}; rebuild the image or its map")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.img", "bad.img.bmap"]


def test_a_map_of_another_image_is_refused(image, tmp_path, run):
    other = tmp_path / "other.img"
    with open(other, "wb") as f:
        f.truncate(32 * MiB)
    r = run(other, tmp_path / "out.img", "--bmap", str(image) + ".bmap")
    assert r.code == 2
    assert r.err == (f"kiosk: {image}.bmap describes an image of {64 * MiB} bytes but {other} has {32 * MiB}: "
                     f"the map belongs to another image; pass the right one with --bmap or rebuild the image\n")


def test_a_malformed_map_is_refused(image, tmp_path, run):
    (tmp_path / "bad.bmap").write_text("<bmap")
    r = run(image, tmp_path / "out.img", "--bmap", tmp_path / "bad.bmap")
    assert r.code == 2
    assert r.err.startswith(f"kiosk: {tmp_path}/bad.bmap: not a valid block map: XML error: ")
    assert not (tmp_path / "out.img").exists()


@pytest.mark.parametrize("case", ["missing image", "image is a directory", "target is the image",
                                  "target is a directory", "target under /dev"])
def test_bad_arguments(image, tmp_path, run, case):
    argv, code, message = {
        "missing image": ([tmp_path / "none.img", tmp_path / "o"], 2,
                          f"kiosk: cannot read the image {tmp_path}/none.img: No such file or directory; "
                          f"give the .img file kiosk build wrote, or a .img.zst, .img.xz or .img.gz"),
        "image is a directory": ([tmp_path, tmp_path / "o"], 2,
                                 f"kiosk: {tmp_path}: the image must be a regular file, not a directory; "
                                 f"give the .img file kiosk build wrote, or a .img.zst, .img.xz or .img.gz"),
        "target is the image": ([image, image], 2,
                                f"kiosk: {image} is the image itself; pass another file or the card's device"),
        "target is a directory": ([image, tmp_path], 2,
                                  f"kiosk: {tmp_path} is neither a block device nor a regular file"),
        "target under /dev": ([image, "/dev/kiosk-test-no-such-card"], 2,
                              "kiosk: refusing to write /dev/kiosk-test-no-such-card: it is not a block device "
                              "(is the card inserted?); pass the card's device, see lsblk"),
    }[case]
    r = run(*argv)
    assert (r.code, r.err) == (code, message + "\n")
    assert not Path("/dev/kiosk-test-no-such-card").exists()


def test_ctrl_c_while_writing_a_file_leaves_nothing(image, tmp_path, run, monkeypatch):
    calls = []

    def interrupted(fd, view, offset):
        calls.append(offset)
        if len(calls) == 2:
            raise KeyboardInterrupt
        os.pwrite(fd, view, offset)

    monkeypatch.setattr(writer, "_pwrite_full", interrupted)
    out = tmp_path / "card.img"
    r = run(image, out)
    assert r.code == 130
    assert last_line(r.err) == f"kiosk: interrupted: {out} was not written; run the command again"
    assert list(tmp_path.iterdir()) == []


def test_an_io_error_is_exit_1_and_leaves_nothing(image, tmp_path, run, monkeypatch):
    def failing(fd, view, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_pwrite_full", failing)
    out = tmp_path / "card.img"
    r = run(image, out)
    assert r.code == 1
    assert last_line(r.err) == (f"kiosk: writing {out} failed: No space left on device; "
                                f"{out} was not written; run the command again")
    assert list(tmp_path.iterdir()) == []


def test_head_last_order(image, tmp_path):
    """Zero the first MiB, sync, write the rest, sync, then the image's first MiB, sync."""
    m = bm.read_bmap(Path(str(image) + ".bmap"))
    events = []
    real_pwrite, real_fsync = writer._pwrite_full, os.fsync

    def pwrite(fd, view, offset):
        events.append(("write", offset, len(view), bytes(view).count(0) == len(view)))
        real_pwrite(fd, view, offset)

    out = tmp_path / "dev.img"
    with open(out, "wb") as f:
        f.write(b"\xaa" * (64 * MiB))
    src, dst = os.open(image, os.O_RDONLY), os.open(out, os.O_RDWR)
    try:
        writer._pwrite_full = pwrite
        os.fsync = lambda fd: events.append(("sync",)) or real_fsync(fd)
        written = writer.write_image(src, dst, m, head_last=True)
    finally:
        writer._pwrite_full, os.fsync = real_pwrite, real_fsync
        os.close(src)
        os.close(dst)
    assert events[:2] == [("write", 0, MiB, True), ("sync",)]
    syncs = [i for i, e in enumerate(events) if e == ("sync",)]
    body = [e[1] for e in events[2:syncs[1]]]
    head = [e[1] for e in events[syncs[1] + 1:syncs[2]]]
    assert body == sorted(body) and min(body) >= MiB and head and max(head) < MiB
    assert events[-1] == ("sync",) and len(syncs) == 3
    assert written.bytes == m.mapped_bytes + MiB
    data, img = out.read_bytes(), image.read_bytes()
    assert data[:MiB] == img[:MiB]  # the head: the image's, holes zeroed
    for start, end in m.byte_ranges():
        assert data[start:end] == img[start:end]
    hole = next(s for s in range(MiB, 64 * MiB, 4096) if all(not (a <= s < b) for a, b in m.byte_ranges()))
    assert data[hole:hole + 4096] == b"\xaa" * 4096  # holes past the head are not written


def test_verify_names_the_corrupted_range(image, tmp_path):
    m = bm.read_bmap(Path(str(image) + ".bmap"))
    out = tmp_path / "card.img"
    shutil.copy(image, out)
    expected = [d for _, _, d in m.ranges]
    assert writer.verify(str(out), m, expected, "sha256") == m.mapped_bytes
    index = len(m.ranges) // 2
    first, last, _ = m.ranges[index]
    with open(out, "r+b") as f:
        f.seek(last * 4096 + 4095)
        byte = f.read(1)
        f.seek(last * 4096 + 4095)
        f.write(bytes([byte[0] ^ 0x80]))
    with pytest.raises(writer.VerifyFailed) as info:
        writer.verify(str(out), m, expected, "sha256")
    assert info.value.exit_code == 1
    assert info.value.hint == "write it again, and if it fails again the card is faulty or fake: use another card"
    assert str(info.value) == (
        f"verification failed: {out} differs from the image in blocks {first}-{last} (bytes {first * 4096}-"
        f"{last * 4096 + 4095}); write it again, and if it fails again the card is faulty or fake: use another card")


def test_help_lists_the_options(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("kiosk.flash.command",))
    with pytest.raises(SystemExit) as info:
        cli.main(["flash", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("IMAGE", "TARGET", "--bmap FILE", "--yes", "--no-verify", "--allow-fixed-disk"):
        assert option in out


# =============================================================================================
# Real block devices (loop devices)

@pytest.fixture
def loops(tmp_path):
    made, mounted = [], []

    def make(size=80 * MiB, fill=None, flags=(), backing=None):
        if backing is None:
            backing = tmp_path / f"card{len(made)}.img"
            with open(backing, "wb") as f:
                if fill is None:
                    f.truncate(size)
                else:
                    f.write(fill * size)
        dev = subprocess.run(["losetup", "--find", "--show", *flags, str(backing)], check=True,
                             capture_output=True, text=True).stdout.strip()
        made.append(dev)
        return dev

    make.mounted = mounted
    yield make
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)
    for dev in made:
        subprocess.run(["losetup", "-d", dev], check=False)


def read_dev(dev, size, offset=0):
    fd = os.open(dev, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


@pytest.fixture
def typed(monkeypatch):
    """Answer the prompts as a user would; records what was asked."""
    def answer(text):
        prompts = []

        def ask(prompt):
            prompts.append(prompt)
            return text
        monkeypatch.setattr(command, "ask", ask)
        return prompts
    return answer


@root_only
def test_flash_a_loop_device_writes_only_the_data_and_verifies(image, loops, run, typed):
    dev = loops(fill=b"\xaa")
    name = Path(dev).name
    prompts = typed(dev)
    r = run(image, dev, "--allow-fixed-disk")
    assert r.code == 0, r.err
    assert prompts == [f"{dev} is a fixed disk: everything on it will be lost. Type {dev} to write it: "]
    assert r.err.startswith(f"{dev}: unknown model, 80.0 MiB, fixed disk\n  no partitions\n")
    m = bm.read_bmap(Path(str(image) + ".bmap"))
    assert re.fullmatch(rf"kiosk: wrote {re.escape(str(image))} to {dev}: "
                        rf"{re.escape(human_size(m.mapped_bytes + MiB))} \(image 64.0 MiB\) in \d+\.\d s, "
                        rf"\d+\.\d MB/s, verified\n", r.out)
    data, img = read_dev(dev, 80 * MiB), image.read_bytes()
    assert data[:MiB] == img[:MiB]
    for start, end in m.byte_ranges():
        assert data[start:end] == img[start:end]
    outside = bytearray(data)
    for start, end in [(0, MiB)] + m.byte_ranges():
        outside[start:end] = b"\xaa" * (end - start)
    assert bytes(outside) == b"\xaa" * (80 * MiB)  # nothing else was touched
    assert name.startswith("loop")


@root_only
def test_by_id_symlinks_resolve_to_the_disk(image, loops, run, typed, tmp_path):
    dev = loops()
    link = tmp_path / "usb-Generic_STORAGE_DEVICE-0:0"
    link.symlink_to(dev)
    prompts = typed(dev)
    r = run(image, link, "--allow-fixed-disk")
    assert r.code == 0, r.err
    assert prompts[0].startswith(f"{dev} is a fixed disk")
    assert f" to {dev}: " in r.out
    assert read_dev(dev, 64 * MiB) == image.read_bytes()


def partitioned_loop(image, loops, tmp_path, name):
    backing = tmp_path / name
    subprocess.run(["cp", "--sparse=always", str(image), str(backing)], check=True)
    with open(backing, "r+b") as f:
        f.truncate(80 * MiB)
    dev = loops(flags=("--partscan",), backing=backing)
    # Some kernels cannot parse an MBR themselves (CONFIG_MSDOS_PARTITION unset): partx adds them by BLKPG.
    subprocess.run(["partx", "--add", dev], capture_output=True)
    for _ in range(100):
        if os.path.exists(f"{dev}p2"):
            break
        time.sleep(0.05)
    return dev


@root_only
def test_a_partition_is_refused_naming_the_disk(image, loops, run, tmp_path):
    dev = partitioned_loop(image, loops, tmp_path, "parted.img")
    r = run(image, f"{dev}p1", "--yes")
    assert (r.code, r.err) == (2, f"kiosk: refusing to write {dev}p1: it is a partition of {dev}; "
                                  f"flash the whole disk instead: kiosk flash IMAGE {dev}\n")


def try_mount(loops, source, point, options):
    point.mkdir()
    mount = subprocess.run(["mount", "-o", options, source, str(point)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount here: {mount.stderr.strip()}")
    loops.mounted.append(point)


@root_only
def test_a_disk_with_a_mounted_partition_is_refused_for_real(image, loops, run, tmp_path):
    dev = partitioned_loop(image, loops, tmp_path, "mounted.img")
    point = tmp_path / "root fs"
    try_mount(loops, f"{dev}p2", point, "ro")
    r = run(image, dev, "--yes", "--allow-fixed-disk")
    assert (r.code, r.err) == (2, f"kiosk: refusing to write {dev}: {dev}p2 is mounted on {point}; "
                                  f"unmount it first: umount '{point}'\n")


@root_only
def test_a_mount_through_a_loop_device_on_the_disk_is_found(image, loops, run, tmp_path):
    """`mount -o offset=` sets up a second loop device on the disk: no holder link, still found."""
    backing = tmp_path / "stacked.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(backing)], check=True)
    dev = loops(backing=backing)
    point = tmp_path / "root"
    try_mount(loops, dev, point, f"ro,offset={17 * MiB}")
    upper = next(line.split()[0] for line in Path("/proc/self/mounts").read_text().splitlines()
                 if line.split()[1] == str(point))
    r = run(image, dev, "--yes", "--allow-fixed-disk")
    assert (r.code, r.err) == (2, f"kiosk: refusing to write {dev}: {dev} (through {upper}) is mounted on "
                                  f"{point}; unmount it first: umount {point}\n")


@root_only
def test_a_disk_held_open_exclusively_is_refused_by_the_kernel(image, loops, run, typed):
    dev = loops()
    typed(dev)
    holder = os.open(dev, os.O_RDONLY | os.O_EXCL)
    try:
        r = run(image, dev, "--allow-fixed-disk")
    finally:
        os.close(holder)
    assert (r.code, last_line(r.err)) == (2, (
        f"kiosk: refusing to write {dev}: the kernel says it is in use (mounted, in LVM/RAID/LUKS, or open "
        f"exclusively by another program); close whatever uses it, then run the command again"))
    assert read_dev(dev, MiB) == b"\0" * MiB


@root_only
def test_too_small_and_read_only_disks_are_refused(image, loops, run):
    small = loops(size=32 * MiB)
    r = run(image, small, "--yes")
    assert (r.code, r.err) == (2, f"kiosk: refusing to write {small}: it holds 32.0 MiB but the image is 64.0 MiB; "
                                  f"use a card of at least 64.0 MiB\n")
    ro = loops(flags=("--read-only",))
    r = run(image, ro, "--yes")
    assert (r.code, r.err) == (2, f"kiosk: refusing to write {ro}: the kernel reports it read-only; "
                                  f"slide the SD card's lock switch away from LOCK and insert it again\n")


@root_only
def test_a_fixed_disk_is_refused_without_the_flag_or_with_a_wrong_name(image, loops, run, typed):
    dev = loops()
    r = run(image, dev, "--yes")
    assert (r.code, r.err) == (2, f"kiosk: refusing to write {dev}: it is a fixed disk (not removable, not SD/MMC, "
                                  f"not USB); if you really mean it, pass --allow-fixed-disk\n")
    typed(Path(dev).name)
    r = run(image, dev, "--yes", "--allow-fixed-disk")
    assert (r.code, last_line(r.err)) == (2, f"kiosk: refusing to write {dev}: it is a fixed disk and "
                                             f"'{Path(dev).name}' was typed, not {dev}; type {dev} exactly to confirm")
    assert read_dev(dev, 80 * MiB) == b"\0" * (80 * MiB)


@root_only
def test_the_question_needs_a_terminal_or_yes(image, loops, run, typed, monkeypatch):
    dev = loops()
    monkeypatch.setattr(target, "disk_kind", lambda name, roots=None: "USB")  # as if it were a USB card reader
    monkeypatch.setattr(command, "stdin_is_tty", lambda: False)
    prompts = typed("y")
    r = run(image, dev)
    assert (r.code, last_line(r.err)) == (2, f"kiosk: refusing to write {dev}: there is no terminal to ask for "
                                             f"confirmation; pass --yes to write without asking")
    assert prompts == []
    monkeypatch.setattr(command, "stdin_is_tty", lambda: True)
    typed("")
    r = run(image, dev)
    assert (r.code, last_line(r.err)) == (2, f"kiosk: refusing to write {dev}: not confirmed; "
                                             f"nothing was written; answer y to write it")
    assert read_dev(dev, 80 * MiB) == b"\0" * (80 * MiB)
    prompts = typed("y")
    r = run(image, dev)
    assert r.code == 0, r.err
    m = bm.read_bmap(Path(str(image) + ".bmap"))
    assert prompts == [f"Erase {dev} and write {image} ({human_size(m.mapped_bytes)} of data)? [y/N] "]
    assert read_dev(dev, 64 * MiB) == image.read_bytes()


@root_only
def test_yes_skips_the_question_not_the_refusals(image, loops, run, typed, monkeypatch):
    dev = loops()
    monkeypatch.setattr(target, "disk_kind", lambda name, roots=None: "USB")
    prompts = typed("no")
    r = run(image, dev, "--yes", "--no-verify")
    assert r.code == 0, r.err
    assert prompts == [] and r.out.endswith(", NOT verified (--no-verify)\n")
    assert read_dev(dev, 64 * MiB) == image.read_bytes()


@root_only
@pytest.mark.parametrize("batch", [writer.VERIFY_BATCH, 1 * MiB])
@pytest.mark.parametrize("with_map", [True, False], ids=["map", "no-map"])
def test_the_card_is_read_back_behind_the_writer(image, loops, run, typed, monkeypatch, tmp_path, batch, with_map):
    """Batches are fdatasync'ed, then read back while later ones are written; the map's checksums, or
    without a map the image's own hashes, are what the card must read back as."""
    if not with_map:
        bare = tmp_path / "bare.img"
        subprocess.run(["cp", "--sparse=always", str(image), str(bare)], check=True)
        image = bare
    dev = loops()
    typed(dev)
    monkeypatch.setattr(writer, "VERIFY_BATCH", batch)
    published, real_publish, real_fdatasync = [], writer._Behind.publish, os.fdatasync
    monkeypatch.setattr(writer._Behind, "publish", lambda self, b: (published.append(list(b)), real_publish(self, b)))
    synced = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(len(published)), real_fdatasync(fd)))
    r = run(image, dev, "--allow-fixed-disk")
    assert r.code == 0, r.err
    assert read_dev(dev, 64 * MiB) == image.read_bytes()
    fd = os.open(image, os.O_RDONLY)
    try:
        m = command._load_map(image, fd, image.stat().st_size, None)[0]
    finally:
        os.close(fd)
    head_ranges = [i for i, (first, _, _) in enumerate(m.ranges) if first * 4096 < writer.HEAD_BYTES]
    read_back = [piece for b in published for piece in b]
    assert read_back == list(writer.pieces(m, writer.HEAD_BYTES, ranges=set(range(len(m.ranges))) - set(head_ranges)))
    if batch < writer.VERIFY_BATCH:
        assert len(published) > 2 and synced[:2] == [0, 1], "each batch is synced before it is read back"


@root_only
def test_a_flipped_byte_on_the_card_fails_verification(image, loops, run, typed, monkeypatch):
    dev = loops()
    typed(dev)
    m = bm.read_bmap(Path(str(image) + ".bmap"))
    first, last, _ = max(m.ranges, key=lambda r: r[1] - r[0])
    offset = (first + last) // 2 * 4096 + 123
    real_publish = writer._Behind.publish

    def corrupt_then_publish(self, batch):
        if any(start <= offset < end for start, end, _ in batch):
            fd = os.open(dev, os.O_RDWR)  # the card goes bad between writing and reading back
            try:
                byte = os.pread(fd, 1, offset)
                os.pwrite(fd, bytes([byte[0] ^ 0x01]), offset)
                os.fsync(fd)
            finally:
                os.close(fd)
        return real_publish(self, batch)

    monkeypatch.setattr(writer._Behind, "publish", corrupt_then_publish)
    r = run(image, dev, "--allow-fixed-disk")
    assert r.code == 1
    assert last_line(r.err) == (
        f"kiosk: verification failed: {dev} differs from the image in blocks {first}-{last} (bytes {first * 4096}-"
        f"{(last + 1) * 4096 - 1}); write it again, and if it fails again the card is faulty or fake: "
        f"use another card")
    assert r.out == ""
    # The read-back ran before the partition table was written: the card has none, it cannot half-work.
    assert read_dev(dev, writer.HEAD_BYTES) == bytes(writer.HEAD_BYTES)
    # And directly: verify() of that range on the device names it.
    index = m.ranges.index(max(m.ranges, key=lambda r: r[1] - r[0]))
    with pytest.raises(writer.VerifyFailed, match=rf"in blocks {first}-{last} \(bytes {first * 4096}-"):
        writer.verify(dev, m, [d for _, _, d in m.ranges], "sha256", todo=writer.pieces(m, ranges={index}))


@root_only
@needs_bmaptool
def test_bmaptool_copy_with_our_map_gives_the_same_card_as_kiosk_flash(image, loops, run, typed):
    ours, theirs = loops(), loops()
    typed(ours)
    assert run(image, ours, "--allow-fixed-disk").code == 0
    copy = subprocess.run(["bmaptool", "copy", "--bmap", str(image) + ".bmap", str(image), theirs],
                          capture_output=True, text=True)
    assert copy.returncode == 0, copy.stderr
    assert subprocess.run(["cmp", ours, theirs]).returncode == 0
    assert read_dev(theirs, 64 * MiB) == image.read_bytes()


@root_only
@needs_bmaptool
def test_kiosk_flash_with_bmaptools_map_on_a_device(image, loops, run, typed, tmp_path):
    dev = loops()
    typed(dev)
    theirs = tmp_path / "theirs.bmap"
    subprocess.run(["bmaptool", "create", str(image), "-o", str(theirs)], check=True, capture_output=True)
    r = run(image, dev, "--allow-fixed-disk", "--bmap", theirs)
    assert r.code == 0, r.err
    assert read_dev(dev, 64 * MiB) == image.read_bytes()


@root_only
def test_ctrl_c_while_writing_a_card_leaves_no_partition_table(image, loops, run, typed, monkeypatch):
    dev = loops()
    typed(dev)
    assert run(image, dev, "--allow-fixed-disk").code == 0
    assert read_dev(dev, 512)[510:] == b"\x55\xaa"  # a valid MBR from the first write
    calls = []
    real = writer._pwrite_full

    def interrupted(fd, view, offset):
        calls.append(offset)
        if len(calls) == 3:  # after the head is zeroed and one chunk of the body is written
            raise KeyboardInterrupt
        real(fd, view, offset)

    monkeypatch.setattr(writer, "_pwrite_full", interrupted)
    r = run(image, dev, "--allow-fixed-disk")
    assert r.code == 130
    assert last_line(r.err) == (f"kiosk: interrupted: {dev} is partially written and will not boot; "
                                f"run the command again")
    assert read_dev(dev, MiB) == b"\0" * MiB  # no partition table points at half-written file systems
    assert subprocess.run(["sfdisk", "--dump", dev], capture_output=True).returncode != 0


@root_only
def test_ctrl_c_while_reading_back_behind_the_writer(image, loops, run, typed, monkeypatch):
    """The read-back of everything but the first MiB happens before the partition table is written."""
    dev = loops()
    typed(dev)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer._Behind, "finish", interrupted)
    r = run(image, dev, "--allow-fixed-disk")
    assert (r.code, last_line(r.err)) == (130, f"kiosk: interrupted: {dev} is partially written and will not "
                                               f"boot; run the command again")
    assert read_dev(dev, MiB) == b"\0" * MiB


@root_only
def test_ctrl_c_while_verifying(image, loops, run, typed, monkeypatch):
    dev = loops()
    typed(dev)

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "verify_late", interrupted)
    r = run(image, dev, "--allow-fixed-disk")
    assert (r.code, last_line(r.err)) == (130, f"kiosk: interrupted while verifying: {dev} is fully written but "
                                               f"not verified; run the command again to write and verify it")
    assert read_dev(dev, 64 * MiB) == image.read_bytes()


@root_only
def test_an_io_error_on_a_card_is_exit_1(image, loops, run, typed, monkeypatch):
    dev = loops()
    typed(dev)
    calls = []

    def failing(fd, view, offset):
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        os.pwrite(fd, view, offset)

    monkeypatch.setattr(writer, "_pwrite_full", failing)
    r = run(image, dev, "--allow-fixed-disk")
    assert (r.code, last_line(r.err)) == (1, f"kiosk: writing {dev} failed: Input/output error; {dev} is partially "
                                             f"written and will not boot; run the command again")


@root_only
def test_an_image_not_matching_its_map_on_a_card_says_the_card_state(image, loops, run, typed, tmp_path):
    bad = tmp_path / "bad.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(bad)], check=True)
    shutil.copy(str(image) + ".bmap", str(bad) + ".bmap")
    m = bm.read_bmap(Path(str(bad) + ".bmap"))
    first, last, digest = m.ranges[-1]
    with open(bad, "r+b") as f:
        f.seek(last * 4096)
        f.write(b"\xff")
    actual = hashlib.sha256(bad.read_bytes()[first * 4096:(last + 1) * 4096]).hexdigest()
    dev = loops()
    typed(dev)
    r = run(bad, dev, "--allow-fixed-disk")
    assert (r.code, last_line(r.err)) == (1, (
        f"kiosk: {bad} does not match its block map: blocks {first}-{last} (bytes {first * 4096}-"
        f"{(last + 1) * 4096 - 1}) have sha256 {actual}, the map says {digest}; rebuild the image or its map; "
        f"{dev} is partially written and will not boot; run the command again"))
    assert read_dev(dev, MiB) == b"\0" * MiB


@root_only
def test_ctrl_c_at_the_question_writes_nothing(image, loops, run, monkeypatch):
    dev = loops(fill=b"\x11")
    monkeypatch.setattr(target, "disk_kind", lambda name, roots=None: "USB")
    monkeypatch.setattr(command, "stdin_is_tty", lambda: True)

    def ctrl_c(prompt):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "ask", ctrl_c)
    r = run(image, dev)
    assert (r.code, last_line(r.err)) == (130, "kiosk: interrupted: nothing was written")
    assert read_dev(dev, 80 * MiB) == b"\x11" * (80 * MiB)


def test_a_file_in_a_missing_directory_is_a_usage_error(image, tmp_path, run):
    r = run(image, tmp_path / "no" / "card.img")
    assert (r.code, r.err) == (2, f"kiosk: cannot create a file in {tmp_path}/no: No such file or directory\n")


# ---------------------------------------------------------------------------------------------
# Hostile files as the image or the map (issue 14), through the real command with a time bound:
# a FIFO used to block open() forever, /dev/zero to be read until memory ran out.

def kiosk_bounded(*argv, timeout=20):
    exe = shutil.which("kiosk", path=os.path.dirname(os.sys.executable)) or "kiosk"
    try:
        return subprocess.run([exe, *map(str, argv)], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"kiosk {' '.join(map(str, argv))} did not finish in {timeout} s")


@pytest.fixture
def small_image(tmp_path):
    img = tmp_path / "small.img"
    with open(img, "wb") as f:
        f.truncate(MiB)
        f.write(b"kiosk" * 100)
    return img


@pytest.mark.parametrize("case", ["image is a FIFO", "image is /dev/zero", "--bmap is a FIFO", "--bmap is /dev/zero",
                                  "IMAGE.bmap is a FIFO", "target is a FIFO", "--bmap says shake_128",
                                  "--bmap has a 5000-digit ImageSize"])
def test_hostile_files_are_refused_without_waiting_or_reading(small_image, tmp_path, case):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out.img"
    argv, says = {
        "image is a FIFO": ([fifo, out], f"{fifo}: the image must be a regular file, not a FIFO (named pipe); "),
        "image is /dev/zero": (["/dev/zero", out], "/dev/zero: the image must be a regular file, not a character device"),
        "--bmap is a FIFO": ([small_image, out, "--bmap", fifo],
                             f"{fifo}: the block map must be a regular file, not a FIFO (named pipe); "),
        "--bmap is /dev/zero": ([small_image, out, "--bmap", "/dev/zero"],
                                "/dev/zero: the block map must be a regular file, not a character device; "),
        "IMAGE.bmap is a FIFO": ([small_image, out], f"{small_image}.bmap: the block map must be a regular file, "),
        "target is a FIFO": ([small_image, fifo], f"{fifo} is neither a block device nor a regular file"),
        "--bmap says shake_128": ([small_image, out, "--bmap", tmp_path / "map"],
                                  f"{tmp_path}/map: not a valid block map: unknown checksum type 'shake_128'"),
        "--bmap has a 5000-digit ImageSize": ([small_image, out, "--bmap", tmp_path / "map"],
                                              f"{tmp_path}/map: not a valid block map: <ImageSize> is '999"),
    }[case]
    if case.startswith("--bmap says") or case.startswith("--bmap has"):
        text = bm.render(bm.block_map_of(small_image)).decode()
        if "shake" in case:
            text = text.replace("<ChecksumType> sha256 </ChecksumType>", "<ChecksumType> shake_128 </ChecksumType>")
        else:
            text = text.replace(f"<ImageSize> {MiB} </ImageSize>", f"<ImageSize> {'9' * 5000} </ImageSize>")
        (tmp_path / "map").write_text(text)
    if case == "IMAGE.bmap is a FIFO":
        os.mkfifo(f"{small_image}.bmap")
    r = kiosk_bounded("flash", *argv)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"kiosk: {says}") and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists()


# =============================================================================================
# Compressed images (issue 18): `kiosk build --compress`'s function, streamed flashing, bmaptool

from kiosk.flash import source  # noqa: E402
from kiosk.image import compress  # noqa: E402

def compressed_copy(image, where, fmt, name="kiosk.img"):
    """IMAGE.img.<fmt> of `image` beside IMAGE.img and IMAGE.img.bmap in `where`: zst and xz through
    compress_image (what `kiosk build --compress` calls), gz with gzip -n (kiosk only reads .gz)."""
    where.mkdir(parents=True, exist_ok=True)
    img = where / name
    subprocess.run(["cp", "--sparse=always", str(image), str(img)], check=True)
    shutil.copy(str(image) + ".bmap", str(img) + ".bmap")
    if fmt == "gz":
        with open(f"{img}.gz", "wb") as out:
            subprocess.run(["gzip", "-n", "-c", str(img)], stdout=out, check=True)
        return Path(f"{img}.gz")
    return Path(compress.compress_image(img, fmt)["path"])


@pytest.fixture(scope="module")
def packed(image, tmp_path_factory):
    """packed(fmt) -> IMAGE.img.<fmt>, made once per module (each format in its own directory)."""
    made = {}

    def get(fmt):
        if fmt not in made:
            made[fmt] = compressed_copy(image, tmp_path_factory.mktemp(f"packed-{fmt}"), fmt)
        return made[fmt]
    return get


@pytest.mark.parametrize("fmt", ["zst", "xz"])
def test_compress_image_is_deterministic_whatever_the_thread_count(image, tmp_path, monkeypatch, fmt):
    img = tmp_path / "kiosk.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(img)], check=True)
    (tmp_path / "kiosk.img.bmap").write_bytes(Path(str(image) + ".bmap").read_bytes())
    (tmp_path / f"kiosk.img.{'xz' if fmt == 'zst' else 'zst'}").write_text("stale: of an older image")
    entry = compress.compress_image(img, fmt)
    out = Path(entry["path"])
    assert out == tmp_path / f"kiosk.img.{fmt}"
    assert entry == {"path": str(out), "format": fmt, "sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
                     "bytes": out.stat().st_size, "bmap": f"{img}.bmap"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["kiosk.img", "kiosk.img.bmap", out.name])
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    first = out.read_bytes()
    # One thread and two: the same bytes (zstd -T1 is the threaded format with one worker; xz needs +1 for that).
    for threads in (("-T1",) if fmt == "zst" else ("-T+1",)) + ("-T2",):
        argv = [threads if a == "-T0" else a for a in compress.COMMANDS[fmt]]
        monkeypatch.setitem(compress.COMMANDS, fmt, argv)
        assert Path(compress.compress_image(img, fmt)["path"]).read_bytes() == first, threads
    tool = {"zst": ["zstd", "-dc"], "xz": ["xz", "-dc"]}[fmt]
    assert subprocess.run(tool + [str(out)], capture_output=True, check=True).stdout == image.read_bytes()


def test_build_with_a_builder_compresses_what_came_back(image, tmp_path, capsys):
    """`kiosk build --builder HOST --compress xz`: the builder sends the image, this machine compresses it."""
    from kiosk.image.commands import _compress_fetched

    img = tmp_path / "lobby-qemu.img"
    subprocess.run(["cp", "--sparse=always", str(image), str(img)], check=True)
    shutil.copy(str(image) + ".bmap", str(img) + ".bmap")
    (tmp_path / "lobby-qemu.img.zst").write_text("stale")
    manifest = {"image": str(img), "bmap": f"{img}.bmap", "builtOn": "builder"}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    _compress_fetched(tmp_path / "manifest.json", "xz")
    packed = tmp_path / "lobby-qemu.img.xz"
    written = json.loads((tmp_path / "manifest.json").read_text())
    assert written == dict(manifest, compressed={"path": str(packed), "format": "xz", "bytes": packed.stat().st_size,
                                                 "sha256": hashlib.sha256(packed.read_bytes()).hexdigest(),
                                                 "bmap": f"{img}.bmap"})
    assert not (tmp_path / "lobby-qemu.img.zst").exists()
    assert capsys.readouterr().out == f"  compressed {packed} (sha256 {written['compressed']['sha256']})\n"


def test_compress_failure_leaves_no_file(image, tmp_path, monkeypatch):
    img = tmp_path / "kiosk.img"
    shutil.copy(image, img)
    monkeypatch.setitem(compress.COMMANDS, "zst", ["zstd", "--no-such-option", "-c", "--"])
    with pytest.raises(KioskError) as info:
        compress.compress_image(img, "zst")
    assert str(info.value).startswith("compressing kiosk.img: zstd --no-such-option -c ... exited with status 1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kiosk.img"]


@pytest.mark.parametrize("fmt", ["zst", "xz", "gz"])
def test_a_compressed_image_is_streamed_to_a_file_with_the_uncompressed_images_map(packed, image, tmp_path, run,
                                                                                   monkeypatch, fmt):
    packed_image = packed(fmt)
    reads = []
    real = source.Stream.read
    monkeypatch.setattr(source.Stream, "read", lambda self, view, start: (reads.append(start), real(self, view, start)))
    out = tmp_path / "card.img"
    r = run(packed_image, out)
    assert r.code == 0, r.err
    assert out.read_bytes() == image.read_bytes()
    m = bm.read_bmap(Path(str(image) + ".bmap"))   # found as kiosk.img.bmap, beside kiosk.img.<fmt>
    assert out.stat().st_blocks * 512 <= m.mapped_bytes + MiB   # holes stayed holes
    assert r.out.startswith(f"kiosk: wrote {packed_image} to {out}: {human_size(m.mapped_bytes)} (image 64.0 MiB)")
    assert reads == sorted(reads), "the stream is only read forwards"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.img"]   # no uncompressed copy anywhere


@pytest.mark.parametrize("fmt", ["zst", "xz", "gz"])
@pytest.mark.parametrize("damage", ["cut", "flipped"])
def test_a_truncated_or_corrupt_compressed_image_is_one_line_and_leaves_nothing(packed, tmp_path, run, fmt, damage):
    (tmp_path / "in").mkdir()
    packed_image = tmp_path / "in" / packed(fmt).name
    shutil.copy(str(packed(fmt).with_suffix("")) + ".bmap", tmp_path / "in")
    data = bytearray(packed(fmt).read_bytes())
    if damage == "cut":
        data = data[:len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x55
    packed_image.write_bytes(bytes(data))
    out = tmp_path / "card.img"
    r = run(packed_image, out)
    assert r.code == 1 and r.out == ""
    line = last_line(r.err)
    assert r.err.count("\n") == 1 + r.err.count("writing ") + r.err.count("verifying "), r.err
    kind = {"zst": "zstd", "xz": "xz", "gz": "gzip"}[fmt]
    said = {("zst", "cut"): "is corrupt or cut short: zstd says 'premature end'",
            ("zst", "flipped"): "is corrupt or cut short: zstd says ",
            ("xz", "cut"): "is cut short: the xz data ends before its end marker",
            ("xz", "flipped"): "is corrupt: xz says ",
            ("gz", "cut"): "is cut short: the gzip data ends before its end marker",
            ("gz", "flipped"): "is corrupt: gzip says "}[fmt, damage]
    assert line.startswith(f"kiosk: {packed_image} {said}"), line
    assert re.search(r"\(after \d+ bytes of the image\); download or build the image again$", line), line
    assert kind in line
    assert not out.exists() and list(tmp_path.glob(".card.img.*")) == []


def test_a_compressed_image_not_matching_its_map_is_blamed_on_the_image(image, tmp_path, run):
    """The map's checksums fail on the read-back; the image's range is hashed again (the stream starts over)."""
    img = tmp_path / "kiosk.img"
    first, last, digest, actual = copy_with_a_flipped_bit(image, img)
    packed_image = Path(compress.compress_image(img, "zst")["path"])
    img.unlink()
    r = run(packed_image, tmp_path / "card.img")
    assert (r.code, last_line(r.err)) == (1, (
        f"kiosk: {packed_image} does not match its block map: blocks {first}-{last} (bytes {first * 4096}-"
        f"{(last + 1) * 4096 - 1}) have sha256 {actual}, the map says {digest}; rebuild the image or its map"))


def test_a_compressed_image_shorter_or_longer_than_its_map_says(image, tmp_path, run):
    m = bm.read_bmap(Path(str(image) + ".bmap"))
    for size in (60 * MiB, 65 * MiB):
        other = tmp_path / "other.img"
        with open(other, "wb") as f:
            f.write(image.read_bytes()[:size])
            f.truncate(size)
        subprocess.run(["gzip", "-1", "-f", str(other)], check=True)
        shorter = size < m.image_size
        r = run(tmp_path / "other.img.gz", tmp_path / "card.img", "--bmap", str(image) + ".bmap")
        assert r.code == 1
        if shorter:
            assert last_line(r.err).startswith(f"kiosk: {tmp_path}/other.img.gz decompresses to ")
            assert last_line(r.err).endswith(f" bytes, but its block map says the image has {m.image_size}; pass "
                                             f"the map of this image with --bmap, or download or build it again")
        else:
            assert last_line(r.err) == (f"kiosk: {tmp_path}/other.img.gz decompresses to more than the "
                                        f"{m.image_size} bytes its block map says the image has; pass the map of "
                                        f"this image with --bmap, or download or build it again")
        assert not (tmp_path / "card.img").exists()


def test_a_compressed_image_without_a_map_is_written_whole(image, tmp_path, run):
    bare = tmp_path / "bare.img.gz"
    with open(bare, "wb") as out:
        subprocess.run(["gzip", "-n", "-c", str(image)], stdout=out, check=True)
    r = run(bare, tmp_path / "card.img")
    assert r.code == 0, r.err
    assert r.err.startswith(f"kiosk: no block map ({bare}.bmap or {tmp_path}/bare.img.bmap): decompressing "
                            f"{bare} once to learn its size, then writing all of it\n")
    assert r.out.startswith(f"kiosk: wrote {bare} to {tmp_path}/card.img: 64.0 MiB (image 64.0 MiB)")
    assert (tmp_path / "card.img").read_bytes() == image.read_bytes()


@pytest.mark.parametrize("case", ["zst named xz", "plain named gz"])
def test_a_compressed_name_must_hold_that_format(image, packed, tmp_path, run, case):
    wrong = tmp_path / "wrong.img.xz" if case == "zst named xz" else tmp_path / "wrong.img.gz"
    shutil.copy(packed("zst") if case == "zst named xz" else image, wrong)
    r = run(wrong, tmp_path / "card.img", "--bmap", str(image) + ".bmap")
    kind = "xz" if case == "zst named xz" else "gzip"
    assert (r.code, r.err) == (2, f"kiosk: {wrong} is not a {kind} file (its name ends in {wrong.suffix}); "
                                  f"rename it to what it holds, or give the {kind} image\n")


# ---------------------------------------------------------------------------------------------
# Several targets at once

def test_rows_keep_one_line_per_card_on_a_terminal_and_name_the_card_in_a_log():
    import threading
    out = Stream(tty=True)
    rows = progress.Rows(2, stream=out)
    first, second = rows.progress_for(0)("writing /dev/sdb", 10 * MiB), rows.progress_for(1)("writing /dev/sdc", MiB)
    first.update(MiB, force=True)
    second.update(MiB, force=True)
    first.close()
    text = out.getvalue()
    assert text.startswith("\n\n")   # the rows, reserved
    assert "\x1b[2A\rwriting /dev/sdb:  10% 1.0 MiB of 10.0 MiB" in text and text.count("\x1b[2B\r") == 1
    assert "\x1b[1A\rwriting /dev/sdc: 100% 1.0 MiB of 1.0 MiB" in text and text.endswith("\x1b[K\x1b[1B\r")
    log = Stream(tty=False)
    rows = progress.Rows(2, stream=log, cancel=threading.Event())
    card = rows.progress_for(1)("verifying /dev/sdc", MiB)
    card.update(MiB, force=True)
    assert log.getvalue().startswith("verifying /dev/sdc: 100% 1.0 MiB of 1.0 MiB")
    rows.cancel.set()
    with pytest.raises(KeyboardInterrupt):   # Ctrl-C reached the main thread: every card stops at its next update
        card.update(MiB)


@pytest.mark.parametrize("fmt", [None, "zst"])
def test_several_files_at_once(image, packed, tmp_path, run, fmt):
    given = image if fmt is None else packed(fmt)
    outs = [tmp_path / f"card{i}.img" for i in range(3)]
    r = run(given, *outs)
    assert r.code == 0, r.err
    for out in outs:
        assert out.read_bytes() == image.read_bytes()
    assert [line.split(": ")[:2] for line in r.out.splitlines()] == [["kiosk", f"wrote {given} to {out}"]
                                                                      for out in outs]
    assert last_line(r.err) == "kiosk: 3 of 3 targets written and verified"


def test_a_target_named_twice_is_refused(image, tmp_path, run):
    out = tmp_path / "card.img"
    r = run(image, out, f"{tmp_path}/./card.img")
    assert (r.code, r.err) == (2, f"kiosk: {tmp_path}/./card.img is named twice (also as {out}); "
                                  f"name each target once\n")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Compressed images and several cards, on real block devices

def type_each_name(monkeypatch):
    """At each fixed-disk prompt, type the device it names (a loop device is a fixed disk); record the prompts."""
    prompts = []

    def ask(prompt):
        prompts.append(prompt)
        return re.search(r"Type (\S+) to write it", prompt)[1]
    monkeypatch.setattr(command, "ask", ask)
    return prompts


def assert_card_is(dev, image, fill=b"\0"):
    """The card holds the image's head and mapped ranges, and `fill` everywhere the map does not reach."""
    m = bm.read_bmap(Path(str(image) + ".bmap"))
    data, img = read_dev(dev, 80 * MiB), image.read_bytes()
    outside = bytearray(data)
    for start, end in [(0, MiB)] + m.byte_ranges():
        assert data[start:end] == img[start:end], (dev, start)
        outside[start:end] = fill * (end - start)
    assert bytes(outside) == fill * (80 * MiB), f"{dev}: written outside the map"


@pytest.fixture
def small_tmpfs(tmp_path):
    """A loop device's backing file on a 3 MiB tmpfs: writing a card past 3 MiB fails for real (ENOSPC)."""
    made = []

    def make(loops):
        point = tmp_path / "small"
        point.mkdir()
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "kiosk-test", str(point)],
                               capture_output=True, text=True)
        if mount.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
        backing = point / "card.img"
        with open(backing, "wb") as f:
            f.truncate(80 * MiB)
        dev = loops(backing=backing)
        made.append((dev, point))
        return dev
    yield make
    for dev, point in made:
        subprocess.run(["losetup", "-d", dev], check=False)
        subprocess.run(["umount", "--lazy", str(point)], check=False)


@root_only
@pytest.mark.parametrize("fmt", ["zst", "xz", "gz"])
def test_a_compressed_image_to_a_card_writes_only_the_data_and_verifies(image, packed, loops, run, monkeypatch, fmt):
    dev = loops(fill=b"\xaa")
    type_each_name(monkeypatch)
    r = run(packed(fmt), dev, "--allow-fixed-disk")
    assert r.code == 0, r.err
    m = bm.read_bmap(Path(str(image) + ".bmap"))
    assert r.out.startswith(f"kiosk: wrote {packed(fmt)} to {dev}: {human_size(m.mapped_bytes + MiB)} (image 64.0 MiB)")
    assert r.out.endswith(", verified\n")
    assert_card_is(dev, image, fill=b"\xaa")


@root_only
@needs_bmaptool
@pytest.mark.parametrize("fmt", ["zst", "xz"])
def test_bmaptool_copy_takes_the_compressed_image_with_its_map(image, packed, loops, run, monkeypatch, fmt):
    """`bmaptool copy IMAGE.img.zst --bmap IMAGE.img.bmap DEV`: the pair kiosk build --compress writes."""
    ours, theirs = loops(), loops()   # (zeros: kiosk zeroes all of the first MiB, bmaptool its mapped blocks)
    type_each_name(monkeypatch)
    assert run(packed(fmt), ours, "--allow-fixed-disk").code == 0
    bmap_file = str(packed(fmt).with_suffix("")) + ".bmap"
    copy = subprocess.run(["bmaptool", "copy", str(packed(fmt)), "--bmap", bmap_file, theirs],
                          capture_output=True, text=True)
    assert copy.returncode == 0, copy.stderr
    assert f"using bmap file '{Path(bmap_file).name}'" in copy.stderr
    assert subprocess.run(["cmp", ours, theirs]).returncode == 0
    assert_card_is(theirs, image)


@root_only
@pytest.mark.parametrize("fmt", [None, "zst"])
def test_several_cards_at_once_one_failing_midway(image, packed, loops, small_tmpfs, run, monkeypatch, fmt):
    """The middle card's backing store fills up after 3 MiB: it fails, says so and has no partition table;
    the two others are written and verified all the same."""
    given = image if fmt is None else packed(fmt)
    first, bad, last = loops(), small_tmpfs(loops), loops()
    prompts = type_each_name(monkeypatch)
    r = run(given, first, bad, last, "--allow-fixed-disk")
    assert r.code == 1, r.err
    assert prompts == [f"{dev} is a fixed disk: everything on it will be lost. Type {dev} to write it: "
                       for dev in (first, bad, last)]
    for dev in (first, last):
        assert_card_is(dev, image)
    lines = r.out.splitlines()
    assert [line.split(": ")[1] for line in lines] == [f"wrote {given} to {first}", f"wrote {given} to {last}"]
    assert all(line.endswith(", verified") for line in lines)
    errors = [line for line in r.err.splitlines() if line.startswith("kiosk: ")]
    assert re.fullmatch(rf"kiosk: writing {bad} failed: (Input/output error|No space left on device); {bad} is "
                        rf"partially written and will not boot; run the command again", errors[0]), r.err
    assert errors[1:] == [f"kiosk: 2 of 3 targets written and verified; failed: {bad}"]
    assert read_dev(bad, MiB) == bytes(MiB)   # no partition table on the failed card
    for dev in (first, last):   # a progress row for each card (in a log, at least the last state of each)
        assert f"writing {dev}: 100% " in r.err and f"verifying {dev}: 100% " in r.err


@root_only
def test_several_removable_cards_are_confirmed_with_one_question(image, loops, run, typed, monkeypatch):
    devs = [loops(), loops()]
    monkeypatch.setattr(target, "disk_kind", lambda name, roots=None: "USB")
    monkeypatch.setattr(command, "stdin_is_tty", lambda: True)
    prompts = typed("n")
    r = run(image, *devs)
    assert (r.code, last_line(r.err)) == (2, f"kiosk: refusing to write {devs[0]} and {devs[1]}: not confirmed; "
                                             f"nothing was written; answer y to write it")
    m = bm.read_bmap(Path(str(image) + ".bmap"))
    assert prompts == [f"Erase {devs[0]} and {devs[1]} and write {image} ({human_size(m.mapped_bytes)} of data)? "
                       f"[y/N] "]
    prompts = typed("y")
    r = run(image, *devs)
    assert r.code == 0, r.err
    for dev in devs:
        assert_card_is(dev, image)


@root_only
def test_one_refused_card_means_no_card_is_written(image, loops, run, monkeypatch):
    good, ro = loops(fill=b"\x11"), loops(flags=("--read-only",))
    monkeypatch.setattr(target, "disk_kind", lambda name, roots=None: "USB")
    r = run(image, good, ro, "--yes")
    assert (r.code, r.err) == (2, f"kiosk: refusing to write {ro}: the kernel reports it read-only; "
                                  f"slide the SD card's lock switch away from LOCK and insert it again\n")
    assert read_dev(good, 80 * MiB) == b"\x11" * (80 * MiB)


@root_only
def test_ctrl_c_with_several_cards_says_each_cards_state(image, packed, loops, run, monkeypatch, request):
    """Ctrl-C reaches the main thread only; every card stops at its next step and says where it stopped."""
    import signal
    # Python's own Ctrl-C handler, as a freshly started `kiosk flash` has it: in a full CI check (xdist) the main
    # thread once never raised KeyboardInterrupt in 60 s, as if the worker process's SIGINT handler were not
    # Python's default; the test is about kiosk's handling, not the test runner's.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    devs = [loops(), loops()]
    monkeypatch.setattr(target, "disk_kind", lambda name, roots=None: "USB")
    import threading
    real = writer._pwrite_full
    seen: dict[int, int] = {}
    lock = threading.Lock()
    both_started = threading.Barrier(2, timeout=60)

    from kiosk.flash import progress
    cancels: list = []   # the Event the main thread sets when Ctrl-C reaches it
    rows_init = progress.Rows.__init__

    def rows_seen(self, count, stream=None, cancel=None):
        cancels.append(cancel)
        rows_init(self, count, stream, cancel)

    def then_ctrl_c(fd, view, offset):
        with lock:
            seen[fd] = seen.get(fd, 0) + 1
            count = seen[fd]
        if count == 2:   # this card's head is zeroed; before its body, wait for the other card, then Ctrl-C
            if both_started.wait() == 0:   # (on a loaded machine one card could otherwise finish first)
                os.kill(os.getpid(), signal.SIGINT)
            # until the main thread has taken the Ctrl-C (a fixed second was too short in a loaded CI check:
            # both cards finished first)
            assert cancels and cancels[0].wait(timeout=60)
        real(fd, view, offset)

    monkeypatch.setattr(progress.Rows, "__init__", rows_seen)
    monkeypatch.setattr(writer, "_pwrite_full", then_ctrl_c)
    r = run(packed("zst"), *devs, "--yes")
    assert r.code == 130, r.err
    errors = [line for line in r.err.splitlines() if line.startswith("kiosk: ")]
    assert errors == [f"kiosk: interrupted: {dev} is partially written and will not boot; run the command again"
                      for dev in devs] + [f"kiosk: 0 of 2 targets written and verified; failed: {devs[0]} and {devs[1]}"]
    for dev in devs:
        assert read_dev(dev, MiB) == bytes(MiB)


@root_only
def test_a_cut_compressed_image_on_a_card_says_the_card_state(packed, loops, run, monkeypatch, tmp_path):
    cut = tmp_path / "kiosk.img.xz"
    cut.write_bytes(packed("xz").read_bytes()[:packed("xz").stat().st_size * 2 // 3])
    shutil.copy(str(packed("xz").with_suffix("")) + ".bmap", tmp_path)
    dev = loops(fill=b"\x11")
    type_each_name(monkeypatch)
    r = run(cut, dev, "--allow-fixed-disk")
    assert r.code == 1 and r.out == ""
    assert re.fullmatch(rf"kiosk: {cut} is cut short: the xz data ends before its end marker \(after \d+ bytes of "
                        rf"the image\); download or build the image again; {dev} is partially written and will not "
                        rf"boot; run the command again", last_line(r.err)), r.err
    assert read_dev(dev, MiB) == bytes(MiB)   # no partition table: it mounts nothing, boots nothing
