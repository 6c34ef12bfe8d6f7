"""Real images for raspberryPi3 (arm64), raspberryPi0 (armel, `-m slow`) and qemu (amd64), read back with
independent tools.

The images are built once per run (tests/imagetools.py, minimal program `foot`)
and inspected with sfdisk, blkid, fsck.vfat, e2fsck, debugfs, mtools and cpio,
never with kiosk's own code. Building needs root, mmdebstrap, qemu-user binfmt
and the Debian archive.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from imagetools import (  # noqa: F401  (built_image is a fixture)
    boot_listdir, build, built_image, full_spec, partition_offsets, read_boot_file, read_root_file,
    root_file_mode, root_listdir, root_stat,
)

# raspberryPi0's armel image is checked in `-m slow` since 2026-12-06: its cold armel base was the default
# suite's biggest build (~12 min of one worker) and CI went past its 45 minutes (notes/boot.md). raspberryPi3's
# image runs the same raspi-firmware, U-Boot and A/B code in the default suite.
PI0 = pytest.param("raspberryPi0", marks=pytest.mark.slow)
BOARDS = ["raspberryPi3", PI0, "qemu"]
RASPI = ["raspberryPi3", PI0]
MiB = 1 << 20


def _board(name: str) -> dict:
    from kiosk.spec.hardware import load_board
    return load_board(name)


def _extract(image: Path, start: int, size: int, dest: Path) -> Path:
    with open(image, "rb") as fin, open(dest, "wb") as fout:
        fin.seek(start)
        left = size
        while left:
            chunk = fin.read(min(left, 4 * MiB))
            if not chunk:
                break
            if chunk.count(0) == len(chunk):
                fout.seek(len(chunk), os.SEEK_CUR)
            else:
                fout.write(chunk)
            left -= len(chunk)
        fout.truncate(size)
    return dest


def _blkid(image: Path, offset: int) -> dict:
    out = subprocess.run(["blkid", "--probe", "--offset", str(offset), "-o", "export", str(image)],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def _bmap_ranges(bmap: Path) -> list[tuple[int, int]]:
    """The block map's mapped byte ranges [start, end), read from its XML."""
    import xml.etree.ElementTree as ET

    tree = ET.parse(bmap).getroot()
    block = int(tree.findtext("BlockSize"))
    ranges = []
    for r in tree.iter("Range"):
        first, _, last = r.text.strip().partition("-")
        ranges.append((int(first) * block, (int(last or first) + 1) * block))
    return ranges


def _mapped(ranges: list[tuple[int, int]], start: int, size: int) -> int:
    return sum(max(0, min(end, start + size) - max(begin, start)) for begin, end in ranges)


def _kernel_version(img) -> str:
    names = root_listdir(img.image, "/boot")
    versions = [n[len("vmlinuz-"):] for n in names if n.startswith("vmlinuz-")]
    assert len(versions) == 1, names
    return versions[0]


# --- the partition table -----------------------------------------------------------------------

@pytest.mark.parametrize("board", BOARDS)
def test_partition_table(built_image, board):
    img = built_image(board)
    table = __import__("json").loads(subprocess.run(["sfdisk", "--json", str(img.image)], capture_output=True,
                                                    text=True, check=True).stdout)["partitiontable"]
    assert table["label"] == "dos"
    p1, p2, p3, p4 = table["partitions"]
    assert p1["type"] == "c" and p1.get("bootable") is True
    assert p1["start"] * 512 == 4 * MiB and p1["size"] * 512 == 256 * MiB
    assert p2["type"] == "83"
    assert p2["start"] * 512 == 260 * MiB and (p2["start"] * 512) % (4 * MiB) == 0
    assert (p2["size"] * 512) % (4 * MiB) == 0
    # slot A, slot B of the same size (at least 2 GiB, 256 MiB steps, twice the tree), data 128 MiB last
    assert p3["type"] == p4["type"] == "83"
    assert p3["start"] == p2["start"] + p2["size"] and p3["size"] == p2["size"]
    assert p2["size"] * 512 >= 2 << 30 and (p2["size"] * 512) % (256 * MiB) == 0
    assert p4["start"] == p3["start"] + p3["size"] and p4["size"] * 512 == 128 * MiB
    fs_blocks = int(re.search(r"Block count:\s+(\d+)", subprocess.run(
        ["dumpe2fs", "-h", f"{img.image}?offset={p2['start'] * 512}"], capture_output=True, text=True).stdout)[1])
    assert p2["size"] * 512 >= fs_blocks * 4096   # slot A holds the root file system (and room beyond it)
    assert (p4["start"] + p4["size"]) * 512 == img.image.stat().st_size
    # the disk identifier is fixed (derived from the spec), never random
    from kiosk.image.assemble import identity
    assert int(table["id"], 16) == identity(img.plan).disk_id


@pytest.mark.parametrize("board", BOARDS)
def test_filesystems_are_clean(built_image, board, tmp_path):
    img = built_image(board)
    (b0, bsize), (r0, rsize), _, (d0, dsize) = partition_offsets(img.image)
    fat = _extract(img.image, b0, bsize, tmp_path / "fat.img")
    result = subprocess.run(["fsck.vfat", "-n", str(fat)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    root = _extract(img.image, r0, rsize, tmp_path / "root.img")
    result = subprocess.run(["e2fsck", "-fn", str(root)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    root.unlink()
    assert _blkid(img.image, b0)["TYPE"] == "vfat"
    assert _blkid(img.image, r0)["TYPE"] == "ext4"
    data = _extract(img.image, d0, dsize, tmp_path / "data.img")
    result = subprocess.run(["e2fsck", "-fn", str(data)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _blkid(img.image, d0)["TYPE"] == "ext4" and _blkid(img.image, d0)["LABEL"] == "KIOSKDATA"


def test_slot_b_is_empty_and_not_in_the_block_map(built_image):
    """Slot B holds nothing in the image: all zeros, no block of it in the .bmap (a flash costs nothing more
    than before); the data partition costs the block map what it holds, not its 128 MiB."""
    img = built_image("qemu")
    (_, _), (r0, rsize), (s0, ssize), (d0, dsize) = partition_offsets(img.image)
    ranges = _bmap_ranges(Path(f"{img.image}.bmap"))
    assert _mapped(ranges, s0, ssize) == 0
    with open(img.image, "rb") as f:
        f.seek(s0)
        left = ssize
        while left:
            chunk = f.read(min(left, 16 * MiB))
            assert chunk.count(0) == len(chunk), "slot B is not all zeros"
            left -= len(chunk)
    assert 0 < _mapped(ranges, d0, dsize) < 8 * MiB
    mapped = sum(end - begin for begin, end in ranges)
    print(f"\n[qemu] image {img.image.stat().st_size // MiB} MiB, block map {mapped // MiB} MiB mapped "
          f"(slot A {_mapped(ranges, r0, rsize) // MiB} MiB, data {_mapped(ranges, d0, dsize) // 1024} KiB)")


def test_generation_1_is_on_the_data_partition(built_image, tmp_path):
    """A/B: generation 1 and configuration.git are written into the data partition, where the device binds
    them over /var/lib/kiosk and /etc/kiosk/configuration.git; the slot keeps empty mount points."""
    img = built_image("qemu")
    (_, _), (r0, _), _, (d0, _) = partition_offsets(img.image)

    def ls(offset: int, path: str) -> list[str]:
        out = subprocess.run(["debugfs", "-R", f'ls -p "{path}"', f"{img.image}?offset={offset}"],
                             capture_output=True, text=True).stdout
        names = [line.strip("/").split("/")[4] for line in out.splitlines() if line.count("/") >= 6]
        return sorted(n for n in names if n not in (".", ".."))

    assert ls(r0, "/data") == [] and ls(r0, "/var/lib/kiosk") == [] and ls(r0, "/etc/kiosk/configuration.git") == []
    assert ls(r0, "/var/log/journal") == [] and ls(d0, "/log") == ["journal"]   # every slot's logs on /data
    journal = root_stat(img.image, "/var/log/journal")   # (through the bind) the base's mode: setgid, group-readable
    assert journal["type"] == "directory" and journal["mode"] & 0o7777 == 0o2755, journal
    assert {"current", "default", "generations", "lock"} <= set(ls(d0, "/kiosk/state"))
    assert "HEAD" in ls(d0, "/kiosk/configuration.git")
    assert ls(d0, "/ssh/etc/ssh") == []      # the host keys: made there at first start
    assert read_root_file(img.image, "/var/lib/kiosk/current", follow=False) == b"generations/1"
    spec = json.loads(read_root_file(img.image, "/var/lib/kiosk/current/nixiosk.json"))
    assert spec["hostName"] == img.spec["hostName"]
    # the live links in the slot resolve through the bind (the hostname is generation 1's)
    assert read_root_file(img.image, "/etc/hostname").decode().strip() == img.spec["hostName"]
    # and kiosk run finds the board in the image the same way (release.json is such a link)
    from kiosk.qemu.disk import board_of_image

    renamed = tmp_path / "card.img"      # no board in the name, no manifest beside it
    renamed.symlink_to(img.image)
    assert board_of_image(renamed) == ("qemu", img.spec["hostName"])


@pytest.mark.parametrize("board", BOARDS)
def test_the_first_boots_fsck_finds_the_root_clean(built_image, board, tmp_path):
    """What systemd-fsck-root runs at the first boot (e2fsck -a, not forced) must say "clean": a check it
    forces (e.g. backup superblocks that differ from the primary) rewrites the mounted root and reboots,
    and on QEMU's raspi machines a reboot halts."""
    img = built_image(board)
    root = _extract(img.image, img.root_offset, img.root_size, tmp_path / "root.ext4")   # a copy: -a may write
    # -a as systemd-fsck does: only preen mode compares the backup superblocks (-n said "clean" here)
    result = subprocess.run(["e2fsck", "-a", str(root)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "clean" in result.stdout and "check forced" not in result.stdout, result.stdout


@pytest.mark.parametrize("board", BOARDS)
def test_fstab_matches_the_filesystems(built_image, board):
    img = built_image(board)
    (b0, _), (r0, _) = partition_offsets(img.image)[:2]
    boot, root = _blkid(img.image, b0), _blkid(img.image, r0)
    assert boot["LABEL"] == "RASPIFIRM" and root["LABEL"] == "RASPIROOT"
    fstab = [line.split() for line in read_root_file(img.image, "/etc/fstab").decode().splitlines()
             if line.strip() and not line.startswith("#")]
    by_mount = {f[1]: f for f in fstab}
    # both slots carry one UUID; `/` is whichever the boot loader chose (root=/dev/vdaN)
    assert by_mount["/"][0] == "/dev/root" and by_mount["/"][2] == "ext4"
    assert by_mount["/data"][:4] == ["LABEL=KIOSKDATA", "/data", "ext4", "rw,noatime"]
    assert by_mount["/var/lib/kiosk"][:4] == ["/data/kiosk/state", "/var/lib/kiosk", "none", "bind"]
    assert by_mount["/etc/kiosk/configuration.git"][:4] == ["/data/kiosk/configuration.git",
                                                            "/etc/kiosk/configuration.git", "none", "bind"]
    assert by_mount["/var/log/journal"][:4] == ["/data/log/journal", "/var/log/journal", "none", "bind"]
    assert by_mount["/boot/firmware"][0] == f"UUID={boot['UUID']}" and by_mount["/boot/firmware"][2] == "vfat"
    assert root_stat(img.image, "/boot/firmware")["type"] == "directory"


@pytest.mark.parametrize("board", BOARDS)
def test_root_grows_on_first_boot(built_image, board):
    """The last partition, the data partition, grows to fill the card once (a slot never grows: slot B
    follows slot A)."""
    img = built_image(board)
    what, mount = "growdata", "/data"
    unit = read_root_file(img.image, f"/etc/systemd/system/kiosk-{what}.service").decode()
    assert "Type=oneshot" in unit and f"ConditionPathExists=!/var/lib/kiosk/{what}.done" in unit
    link = root_stat(img.image, f"/etc/systemd/system/local-fs.target.wants/kiosk-{what}.service")
    assert link["type"] == "symlink"
    script = read_root_file(img.image, f"/usr/lib/kiosk/{what}").decode()
    assert "resize2fs" in script and "sfdisk" in script and f"{what}.done" in script
    assert f"dev=$(findmnt -n -o SOURCE {mount})\n" in script
    assert root_file_mode(img.image, f"/usr/lib/kiosk/{what}") == 0o755
    with pytest.raises(FileNotFoundError):   # the unit of one-root images before slots
        read_root_file(img.image, "/etc/systemd/system/kiosk-growroot.service")


# --- boot files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("board", RASPI)
def test_raspi_boot_partition(built_image, board):
    img = built_image(board)
    hw = _board(board)
    version = _kernel_version(img)
    names = boot_listdir(img.image)
    for blob in ("bootcode.bin", "start.elf", "fixup.dat"):
        assert blob in names
    for dtb in hw["deviceTrees"]:
        assert Path(dtb).name in names
    if hw.get("uboot"):   # A/B: the firmware starts U-Boot; each slot carries its own kernel and initramfs
        assert not [n for n in names if n.startswith(("vmlinuz", "initrd.img"))], names
        assert read_boot_file(img.image, Path(hw["uboot"]["binary"]).name) == read_root_file(
            img.image, f"/usr/lib/u-boot/{hw['uboot']['binary']}")
        assert read_root_file(img.image, "/vmlinuz", follow=False) == f"boot/vmlinuz-{version}".encode()
        assert read_root_file(img.image, "/initrd.img", follow=False) == f"boot/initrd.img-{version}".encode()
        return
    kernel = read_boot_file(img.image, f"vmlinuz-{version}")
    assert kernel == read_root_file(img.image, f"/boot/vmlinuz-{version}")
    initrd = read_boot_file(img.image, f"initrd.img-{version}")
    assert initrd == read_root_file(img.image, f"/boot/initrd.img-{version}")
    dtb = read_boot_file(img.image, Path(hw["deviceTrees"][0]).name)
    assert dtb[:4] == b"\xd0\x0d\xfe\xed"  # flattened device tree magic


@pytest.mark.parametrize("board", RASPI)
def test_config_txt_exact(built_image, board):
    img = built_image(board)
    hw = _board(board)
    version = _kernel_version(img)
    custom = read_root_file(img.image, "/etc/default/raspi-firmware-custom").decode()
    assert "\n".join(hw["configTxt"]) in custom
    arm64 = "# Switch the CPU from ARMv7 into ARMv8 (aarch64) mode\narm_64bit=1\n\n" if hw["architecture"] == "arm64" \
        else ""
    expected = (
        "# Do not modify this file!\n#\n# It is automatically generated upon install or update of either the\n"
        "# firmware or the Linux kernel.\n#\n# If you need to set boot-time parameters, do so via the\n"
        "# /etc/default/raspi-firmware, /etc/default/raspi-firmware-custom or\n"
        "# /etc/default/raspi-extra-cmdline files.\n\n"
        f"{arm64}enable_uart=1\nupstream_kernel=1\n\n"
        + (f"kernel={Path(hw['uboot']['binary']).name}\n" if hw.get("uboot") else   # U-Boot loads the slot's
           f"kernel=vmlinuz-{version}\n"
           "# For details on the initramfs directive, see\n"
           "# https://www.raspberrypi.org/forums/viewtopic.php?f=63&t=10532\n"
           f"initramfs initrd.img-{version}\n")
        + "\n# Inserted by /etc/default/raspi-firmware-custom\n" + custom.rstrip("\n") + "\n")
    assert read_boot_file(img.image, "config.txt").decode() == expected


@pytest.mark.parametrize("board", RASPI)
def test_cmdline_txt_exact(built_image, board):
    img = built_image(board)
    hw = _board(board)
    (_, _), (r0, _) = partition_offsets(img.image)[:2]
    uuid = _blkid(img.image, r0)["UUID"]
    extra = read_root_file(img.image, "/etc/default/raspi-extra-cmdline").decode().rstrip("\n")
    assert extra.split()[-2:] == ["quiet", "splash"]
    expected = (f" console={hw['serialConsole']} console=tty1 root=UUID={uuid} rw fsck.repair=yes net.ifnames=0 "
                f"cma=64M rootwait {extra}\n")
    assert read_boot_file(img.image, "cmdline.txt").decode() == expected
    defaults = read_root_file(img.image, "/etc/default/raspi-firmware").decode()
    assert f'\nCONSOLES="{hw["serialConsole"]} tty1"\n' in defaults
    assert f'\nROOTPART="UUID={uuid}"\n' in defaults


@pytest.mark.parametrize("board", RASPI)
def test_device_regenerates_the_same_boot_config(built_image, board, tmp_path):
    """Debian's own kernel hook, run on the image's files, writes the same config.txt and cmdline.txt."""
    _check_hook_regenerates(built_image(board), tmp_path)


def _check_hook_regenerates(img, tmp_path):
    hw = _board(img.board)
    version = _kernel_version(img)
    t = tmp_path / "sys"
    (t / "boot/firmware").mkdir(parents=True)
    (t / "etc/default").mkdir(parents=True)
    for name in ("raspi-firmware", "raspi-firmware-custom", "raspi-extra-cmdline"):
        (t / "etc/default" / name).write_bytes(read_root_file(img.image, f"/etc/default/{name}"))
    for name in (f"vmlinuz-{version}", f"initrd.img-{version}"):
        (t / "boot" / name).write_bytes(b"x")
    dtbdir = t / f"usr/lib/linux-image-{version}" / ("broadcom" if hw["architecture"] == "arm64" else "")
    dtbdir.mkdir(parents=True)
    hook = read_root_file(img.image, "/etc/kernel/postinst.d/z50-raspi-firmware").decode()
    for path in ("/boot/firmware", "/boot/vmlinuz-", "/boot/initrd.img-", "/etc/default/", "/usr/lib/linux-image-"):
        hook = hook.replace(path, f"{t}{path}")
    hook = hook.replace("$(dpkg --print-architecture)", hw["architecture"]).replace("if ischroot", "if true")
    if img.board == "raspberryPi4":  # the hook asks the running board's device tree
        hook = hook.replace("grep -q 'Raspberry Pi \\(Compute Module \\)*4' /sys/firmware/devicetree/base/model "
                            "2>/dev/null", "true")
    (t / "hook").write_text(hook)
    result = subprocess.run(["sh", str(t / "hook")], env=dict(os.environ, DEB_MAINT_PARAMS="configure"),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # (paths were relocated under t, comments included: put them back)
    for name in ("config.txt", "cmdline.txt"):
        regenerated = (t / "boot/firmware" / name).read_text().replace(str(t), "")
        assert regenerated == read_boot_file(img.image, name).decode(), name
    # and what the device writes on every switch (device/bootconfig.py) is the same again
    from kiosk.device.bootconfig import expected
    (t / "etc/kiosk").mkdir(parents=True)
    (t / "etc/kiosk/release.json").write_text(json.dumps({"hardware": img.board}))   # (a live link in the image)
    assert expected(t) == {name: read_boot_file(img.image, name) for name in ("config.txt", "cmdline.txt")}


def test_qemu_boot_partition(built_image, tmp_path, tmp_path_factory):
    """GRUB (EFI) on the FAT, RAUC's slot variables in grubenv (A first, committed; B empty), and each slot's own
    kernel and kiosk's initramfs in the slot, which grub.cfg boots with root= by device path."""
    img = built_image("qemu")
    hw = _board("qemu")
    version = _kernel_version(img)
    assert set(boot_listdir(img.image)) == {"EFI", "grub", "cmdline.cfg"}
    efi = read_boot_file(img.image, "EFI/BOOT/BOOTX64.EFI")
    assert efi[:2] == b"MZ" and b"PE\0\0" in efi[:512]
    env = tmp_path / "grubenv"
    env.write_bytes(read_boot_file(img.image, "grub/grubenv"))
    assert len(env.read_bytes()) == 1024
    listed = subprocess.run(["grub-editenv", str(env), "list"], capture_output=True, text=True, check=True).stdout
    assert listed.split("\n")[:5] == ['ORDER=A B', "A_OK=1", "A_TRY=0", "B_OK=0", "B_TRY=0"]
    cfg = read_boot_file(img.image, "grub/grub.cfg").decode()
    assert "load_env --file (hd0,msdos1)/grub/grubenv" in cfg and "save_env --file (hd0,msdos1)/grub/grubenv A_TRY B_TRY" in cfg
    linux = next(line.split() for line in cfg.splitlines() if line.strip().startswith("linux "))
    assert linux[1] == "(hd0,msdos$part)/vmlinuz"
    assert linux[2:6] == ["root=/dev/vda$part", "rw", "rauc.slot=$slot", "panic=10"]   # a panic reboots: GRUB falls back
    # the rest is the generation's: cmdline.cfg, rewritten by every switch (device/bootconfig.py), read here
    assert linux[6:] == ["$kiosk_cmdline"] and "source (hd0,msdos1)/cmdline.cfg\nexport kiosk_cmdline\n" in cfg
    arguments = ["console=tty1", f"console={hw['serialConsole']}", *hw["cmdline"], "quiet", "splash"]
    assert f"set kiosk_cmdline='{' '.join(arguments)}'" in cfg   # (the image's own, should cmdline.cfg be lost)
    assert read_boot_file(img.image, "cmdline.cfg").decode().splitlines()[-1] == \
        f"set kiosk_cmdline='{' '.join(arguments)}'"
    from kiosk.device.bootconfig import expected   # what the device writes on every switch: the same bytes
    device = tmp_path / "device"
    (device / "etc/default").mkdir(parents=True)
    (device / "etc/default/kiosk-cmdline").write_bytes(read_root_file(img.image, "/etc/default/kiosk-cmdline"))
    assert expected(device) == {"cmdline.cfg": read_boot_file(img.image, "cmdline.cfg")}
    assert "initrd (hd0,msdos$part)/initrd.img" in cfg
    assert read_root_file(img.image, "/vmlinuz", follow=False) == f"boot/vmlinuz-{version}".encode()
    assert read_root_file(img.image, "/initrd.img", follow=False) == f"boot/initrd.img-{version}".encode()
    files = _cpio_list(read_root_file(img.image, "/initrd.img"), tmp_path)
    assert "etc/kiosk-data" in files     # kiosk's own initramfs: it mounts the data partition
    # RAUC's view of the same slots: its grub backend on this grubenv, what kiosk's bundles say they fit
    from kiosk.config.signing import compatible

    conf = read_root_file(img.image, "/etc/rauc/system.conf").decode()
    for line in (f"compatible={compatible('qemu')}", "bootloader=grub", "grubenv=/boot/firmware/grub/grubenv",
                 "statusfile=/data/rauc.status", "device=/dev/vda2", "device=/dev/vda3", "bootname=A",
                 "bootname=B"):
        assert f"\n{line}\n" in conf, conf
    # kiosk update's chunked bundles: the store it forwards to the device's loopback, and casync to read it
    from kiosk.update.commands import CAN_TAKE_CHUNKS

    assert conf.endswith("\n[casync]\nstorepath=http://127.0.0.1:7464/store\n"), conf
    assert "storepath=http://127.0.0.1:7464/store" in CAN_TAKE_CHUNKS
    assert read_root_file(img.image, "/usr/bin/casync")[:4] == b"\x7fELF"
    # Its keyring: the certificate of the update key of whoever built the image (their cache), nothing else
    from imagetools import _cache_dir, _shared_dir   # the cache built_image used

    assert "\npath=/etc/rauc/kiosk-update.cert.pem\n" in conf
    # and the directory of the device's own certificate, on the data partition (filled when it first builds a
    # system itself: kiosk.device.selfbuild); the image holds none
    assert "\ndirectory=/data/rauc/keyring\n" in conf
    trusted = read_root_file(img.image, "/etc/rauc/kiosk-update.cert.pem")
    assert trusted == (_cache_dir(_shared_dir(tmp_path_factory)) / "update-signing" / "cert.pem").read_bytes()
    assert trusted.count(b"-----BEGIN CERTIFICATE-----") == 1 and b"PRIVATE" not in trusted


@pytest.mark.parametrize("board", RASPI)
def test_raspberry_pi_uboot_files(built_image, board, tmp_path):
    """A/B Pis: boot.scr is kiosk's script as a U-Boot script image, uboot.env kiosk's minimal environment (valid
    CRC, slot A first with its tries, B empty, no USB start), kiosk-slots.txt the same order, and RAUC drives
    U-Boot's variables through libubootenv on that file."""
    import struct
    import zlib

    from kiosk.image.uboot import QEMU_FILE, boot_cmd

    img = built_image(board)
    hw = _board(board)
    scr = read_boot_file(img.image, "boot.scr")
    magic, _, _, size, _, _, _, _, _, kind, _ = struct.unpack(">IIIIIIIBBBB", scr[:32])
    assert magic == 0x27051956 and kind == 6 and scr[32:40].rstrip(b"\0") == b"kiosk-ab"   # IH_TYPE_SCRIPT
    (tmp_path / "boot.scr").write_bytes(scr)
    listed = subprocess.run(["dumpimage", "-l", str(tmp_path / "boot.scr")], capture_output=True, text=True).stdout
    arch = {"arm64": "AArch64", "arm": "ARM"}[hw["uboot"]["mkimageArch"]]
    assert f"{arch} Linux Script" in listed and "kiosk-ab" in listed, listed
    body = scr[64:64 + size]
    length = struct.unpack(">I", body[:4])[0]
    assert body[8:8 + length].decode() == boot_cmd(hw)
    # U-Boot's hush: no comment lines, no single quote anywhere (each gave "syntax error" at boot, seen)
    assert "'" not in boot_cmd(hw) and not any(line.lstrip().startswith("#") for line in boot_cmd(hw).splitlines())
    # without a firmware device tree (QEMU's raspi0 runs U-Boot's ELF) only these two names come from kiosk run's file
    assert f"env import -t ${{kernel_addr_r}} ${{filesize}} kiosk_args kiosk_fdtfile\n" in boot_cmd(hw)
    assert f"{hw['uboot']['bootCommand']} ${{kernel_addr_r}} ${{ramdisk_addr_r}}:${{filesize}} ${{kiosk_fdt}}\n" in \
        boot_cmd(hw)
    assert QEMU_FILE not in boot_listdir(img.image)   # kiosk run writes it on its copy, never in an image
    env = read_boot_file(img.image, "uboot.env")
    assert len(env) == 0x4000 and struct.unpack("<I", env[:4])[0] == zlib.crc32(env[4:])
    variables = dict(v.split("=", 1) for v in env[4:].split(b"\0\0")[0].decode().split("\0"))
    assert (variables["BOOT_ORDER"], variables["BOOT_A_LEFT"], variables["BOOT_B_LEFT"]) == ("A B", "3", "0")
    assert variables["bootcmd"] == "load mmc 0:1 ${scriptaddr} boot.scr; source ${scriptaddr}"
    assert "preboot" not in variables and variables["bootdelay"] == "0"
    assert read_boot_file(img.image, "kiosk-slots.txt") == b"BOOT_ORDER=A B\nBOOT_A_LEFT=3\nBOOT_B_LEFT=0\n"
    assert read_root_file(img.image, "/etc/fw_env.config").decode().splitlines()[-1] == \
        "/boot/firmware/uboot.env 0x0000 0x4000"
    conf = read_root_file(img.image, "/etc/rauc/system.conf").decode()
    for line in (f"compatible=kiosk-{board}", "bootloader=uboot", "boot-attempts=3", "boot-attempts-primary=1",
                 "device=/dev/mmcblk0p2", "device=/dev/mmcblk0p3", "statusfile=/data/rauc.status"):
        assert f"\n{line}\n" in conf, conf
    defaults = read_root_file(img.image, "/etc/default/raspi-firmware").decode()
    assert '\nKERNEL="u-boot.bin"\n' in defaults and '\nINITRAMFS="no"\n' in defaults


def _cpio_list(initrd: bytes, tmp_path: Path) -> list[str]:
    data = gzip.decompress(initrd)
    (tmp_path / "initrd.cpio").write_bytes(data)
    out = subprocess.run(["cpio", "-t", "--quiet", "-F", str(tmp_path / "initrd.cpio")], capture_output=True,
                         text=True, check=True).stdout
    return out.split()


@pytest.mark.parametrize("board", BOARDS)
def test_initramfs_reaches_the_root(built_image, board, tmp_path):
    img = built_image(board)
    version = _kernel_version(img)
    hw = _board(board)
    initrd = read_root_file(img.image, "/initrd.img")   # each slot boots its own
    files = _cpio_list(initrd, tmp_path)
    assert files == sorted(files)  # sorted: reproducible
    assert "init" in files and "bin/busybox" in files
    modules = {Path(f).name for f in files if f.endswith(".ko")}
    assert "ext4.ko" in modules and "jbd2.ko" in modules
    if hw["architecture"] == "arm64":
        assert {"sdhci-iproc.ko", "bcm2835.ko"} <= modules
    if hw["architecture"] == "amd64":
        assert {"virtio_blk.ko", "virtio_pci.ko"} <= modules
    assert f"lib/modules/{version}/modules.dep" in files
    # busybox of the target architecture, not the build machine's
    subprocess.run(["cpio", "-i", "-d", "--quiet", "-D", str(tmp_path), "-F", str(tmp_path / "initrd.cpio"),
                    "bin/busybox"], check=True)
    described = subprocess.run(["file", "-b", str(tmp_path / "bin/busybox")], capture_output=True,
                               text=True).stdout if shutil.which("file") else ""
    arch_word = {"arm64": "aarch64", "armel": "ARM", "amd64": "x86-64"}[hw["architecture"]]
    if described:
        assert arch_word in described and "statically linked" in described


# --- the root tree -----------------------------------------------------------------------------

@pytest.mark.parametrize("board", BOARDS)
def test_build_leaves_no_traces(built_image, board):
    img = built_image(board)
    etc_ssh = root_listdir(img.image, "/etc/ssh")
    host_keys = [n for n in etc_ssh if n.startswith("ssh_host_")]
    # only links to the public keys the device makes on /data at first start
    assert host_keys == [f"ssh_host_{k}_key.pub" for k in ("ecdsa", "ed25519", "rsa")], etc_ssh
    assert all(read_root_file(img.image, f"/etc/ssh/{n}", follow=False) == f"/data/ssh/etc/ssh/{n}".encode()
               for n in host_keys)
    # update-initramfs is the real one again, and not diverted
    assert b"kiosk" not in read_root_file(img.image, "/usr/sbin/update-initramfs")
    diversions = read_root_file(img.image, "/var/lib/dpkg/diversions").decode()
    assert "update-initramfs" not in diversions
    # no id baked in: every card makes its own at first boot ("uninitialized" also runs preset-all there)
    assert read_root_file(img.image, "/etc/machine-id") == b"uninitialized\n"
    assert root_listdir(img.image, "/var/cache/apt/archives") in ([], ["lock", "partial"], ["partial"])
    assert root_listdir(img.image, "/boot/firmware") == []


@pytest.mark.parametrize("board", BOARDS)
def test_installed_packages_recorded(built_image, board, tmp_path):
    from kiosk.image import rootfs

    img = built_image(board)
    hw = _board(board)
    status = tmp_path / "status"
    status.write_bytes(read_root_file(img.image, "/var/lib/dpkg/status"))
    packages = {name: (version, arch, source) for name, version, arch, source in rootfs.installed_packages(status)}
    assert packages["busybox-static"][1] == hw["architecture"]
    assert hw["kernelPackage"] in packages
    assert packages["foot"][1] == hw["architecture"]
    assert set(hw.get("updatePackages", [])) <= set(packages)    # A/B: rauc, rauc-service, grub-common
    assert all(v for v, _, _ in packages.values())


def _security_index(arch: str) -> dict[str, str] | None:
    """{package: version} of Debian's bookworm-security main for arch, fetched now; None when the suite
    publishes nothing for arch (its Release file's Architectures: bookworm's LTS dropped armel)."""
    import lzma
    import urllib.request

    from kiosk.spec.sources import DEFAULT_SECURITY_MIRROR

    suite = f"{DEFAULT_SECURITY_MIRROR}/dists/bookworm-security"
    with urllib.request.urlopen(f"{suite}/Release", timeout=60) as response:
        release = response.read().decode()
    architectures = next(line.split(":", 1)[1].split() for line in release.splitlines()
                         if line.startswith("Architectures:"))
    if arch not in architectures:
        return None
    with urllib.request.urlopen(f"{suite}/main/binary-{arch}/Packages.xz", timeout=60) as response:
        text = lzma.decompress(response.read()).decode()
    index = {}
    for stanza in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and not line.startswith(" "))
        if "Package" in fields:
            index[fields["Package"]] = fields["Version"]
    return index


@pytest.mark.parametrize("board", BOARDS)
def test_images_carry_debians_security_fixes(built_image, board, tmp_path):
    """Every installed package that bookworm-security updates is at that version (or newer), and the device's
    apt reads the suite, its security suite and its updates suite."""
    from kiosk.image import rootfs

    img = built_image(board)
    sources = read_root_file(img.image, "/etc/apt/sources.list").decode()
    assert "http://deb.debian.org/debian bookworm main non-free-firmware" in sources
    assert "http://deb.debian.org/debian-security bookworm-security main non-free-firmware" in sources
    assert "http://deb.debian.org/debian bookworm-updates main non-free-firmware" in sources
    status = tmp_path / "status"
    status.write_bytes(read_root_file(img.image, "/var/lib/dpkg/status"))
    installed = {name: version for name, version, _, _ in rootfs.installed_packages(status)}
    security = _security_index(_board(board)["architecture"])
    if security is None:   # armel (raspberryPi0/1) since bookworm went to LTS: nothing to be behind on
        assert installed, "no packages recorded"
        return
    fixed = sorted(set(installed) & set(security))
    assert fixed, "no installed package has a security update: the check would prove nothing"
    behind = [f"{name} {installed[name]} < {security[name]}" for name in fixed
              if subprocess.run(["dpkg", "--compare-versions", installed[name], "lt", security[name]]).returncode == 0]
    assert not behind, f"older than bookworm-security (a cached base built before the fix?): {behind}"


@pytest.mark.parametrize("board", BOARDS)
def test_all_timestamps_pinned(built_image, board):
    img = built_image(board)
    epoch = None
    paths = ["/etc/fstab", "/etc/hostname", "/usr/lib/kiosk/growdata", "/", "/etc",
             # on the data partition
             "/var/lib/kiosk", "/var/lib/kiosk/generations/1/nixiosk.json", "/etc/kiosk/configuration.git/HEAD"]
    for path in paths:
        text = root_stat(img.image, path)["text"]
        times = re.findall(r"(?:ctime|atime|mtime|crtime): (0x[0-9a-f]+)", text)
        assert len(set(times)) == 1, (path, text)
        epoch = epoch or times[0]
        assert times[0] == epoch
    mdir = subprocess.run(["mdir", "-i", f"{img.image}@@{img.boot_offset}", "::"], capture_output=True, text=True,
                          env=dict(os.environ, MTOOLS_SKIP_CHECK="1")).stdout
    dates = {m for m in re.findall(r"\d{4}-\d\d-\d\d\s+\d+:\d\d", mdir)}
    assert len(dates) == 1, mdir


def test_rebuild_is_byte_identical(built_image, tmp_path, tmp_path_factory, isolated_cache):
    """Same plan, same layer, same update certificate: the same image bytes (and block map), from this
    worker's own cache."""
    from imagetools import _cache_dir, _shared_dir

    img = built_image("qemu")
    # The key of the first build (the user's key restored): the A/B image trusts its certificate. Replaced
    # even if this worker's cache has one: an earlier test's A/B build here made its own.
    shutil.rmtree(isolated_cache / "update-signing", ignore_errors=True)
    shutil.copytree(_cache_dir(_shared_dir(tmp_path_factory)) / "update-signing", isolated_cache / "update-signing")
    again = build(img.spec, tmp_path, keep_root=False, log=lambda m: None)
    assert again.image.name == img.image.name

    def sha(p):
        return hashlib.sha256(Path(p).read_bytes()).hexdigest()

    assert sha(again.image) == sha(img.image)
    bmap = Path(str(img.image) + ".bmap")
    assert Path(str(again.image) + ".bmap").read_bytes() == bmap.read_bytes()


def test_kiosk_build_compress_writes_the_pair_bmaptool_and_kiosk_flash_take(built_image, tmp_path, tmp_path_factory):
    """`kiosk build --compress zst`, the real command: IMAGE.img.zst beside the same IMAGE.img and IMAGE.img.bmap
    as a build without it, the manifest says so, and `bmaptool copy` of the pair gives the image back."""
    from conftest import kiosk_cli
    from imagetools import _cache_dir, _shared_dir

    img = built_image("qemu")
    spec = tmp_path / "nixiosk.json"
    spec.write_text(json.dumps(img.spec, indent=2) + "\n")
    out = tmp_path / "out"
    result = kiosk_cli("build", str(spec), "-o", str(out), "--compress", "zst",
                       env={"KIOSK_CACHE_DIR": str(_cache_dir(_shared_dir(tmp_path_factory)))})
    assert result.returncode == 0, result.stderr[-3000:]
    image = out / img.image.name
    packed = out / f"{img.image.name}.zst"
    assert f"  compressed {packed} (sha256 " in result.stdout
    assert f"write it with: kiosk flash {packed} /dev/mmcblk0" in result.stdout
    assert image.read_bytes() == img.image.read_bytes()   # the same image (and map) as without --compress
    assert Path(f"{image}.bmap").read_bytes() == Path(f"{img.image}.bmap").read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["compressed"] == {"path": str(packed), "format": "zst", "bytes": packed.stat().st_size,
                                      "sha256": hashlib.sha256(packed.read_bytes()).hexdigest(),
                                      "bmap": f"{image}.bmap"}
    assert "compress" in manifest["stageSeconds"]
    copy = tmp_path / "copy.img"
    done = subprocess.run(["bmaptool", "copy", str(packed), str(copy)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"discovered bmap file '{image}.bmap'" in done.stderr
    assert copy.read_bytes() == image.read_bytes()


@pytest.mark.root
def test_mmdebstrap_failure_names_the_stage(tmp_path_factory, monkeypatch):
    """A package that does not exist: a KioskError naming the stage and showing apt's complaint.

    The spec's own packages go in the top layer: the base (shared with the qemu image's, so this costs
    no extra mmdebstrap of the base) stays cached, the failed top leaves no tarball and no temp file."""
    from imagetools import _cache_dir, _shared_dir
    from kiosk.image import rootfs
    from kiosk.core.errors import KioskError
    from kiosk.spec.plan import make_plan

    cache = _cache_dir(_shared_dir(tmp_path_factory))
    monkeypatch.setenv("KIOSK_CACHE_DIR", str(cache))
    plan = make_plan(full_spec("qemu", packages=["kiosk-no-such-package"]))
    base, top = rootfs.stages(plan)
    with pytest.raises(KioskError) as info:
        rootfs.base_rootfs(plan)
    text = str(info.value)
    assert "rootfs (mmdebstrap) failed" in text and "kiosk-no-such-package" in text
    assert base.path.exists() and not top.path.exists()
    assert not [p.name for p in top.path.parent.iterdir() if top.key in p.name and p.suffix != ".lock"]


@pytest.mark.slow
@pytest.mark.parametrize("board", ["raspberryPi0", "raspberryPi1", "raspberryPi2", "raspberryPi3", "raspberryPi4",
                                   "qemu"])
def test_sample_image_for_every_board(board, tmp_path_factory, monkeypatch):
    """The sample (cog showing a web page) for every board: builds, and its boot files are right."""
    from imagetools import SAMPLE_PROGRAM, _cache_dir, _shared_dir

    from kiosk.image.mbr import boot_partition
    from kiosk.qemu.disk import fat_read

    if os.geteuid() != 0:
        pytest.skip("building an image needs root")
    shared = _shared_dir(tmp_path_factory)
    out = tmp_path_factory.mktemp(f"sample-{board}")
    monkeypatch.setenv("KIOSK_CACHE_DIR", str(_cache_dir(shared)))
    img = build(full_spec(board, program=SAMPLE_PROGRAM), out, keep_root=False,
                log=lambda m: print(f"[{board}] {m}", flush=True))
    hw = _board(board)
    (b0, bsize), (r0, rsize) = partition_offsets(img.image)[:2]
    result = subprocess.run(["e2fsck", "-fn", f"{img.image}?offset={r0}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    names = boot_listdir(img.image)
    if hw["bootloader"] == "raspi-firmware":
        for dtb in hw["deviceTrees"]:
            assert Path(dtb).name in names
        for dtb in hw["deviceTrees"] if hw.get("deviceTreeAliases") else []:   # the Pi 4: EMMC2 is mmc0
            copy = tmp_path_factory.mktemp(f"dtb-{board}") / Path(dtb).name
            copy.write_bytes(fat_read(img.image, boot_partition(img.image), Path(dtb).name))
            for name, node in hw["deviceTreeAliases"].items():
                got = subprocess.run(["fdtget", "-t", "s", str(copy), "/aliases", name], capture_output=True, text=True)
                assert got.stdout.strip() == node, (dtb, name, got)
        assert {"bootcode.bin", "start.elf", "config.txt", "cmdline.txt"} <= set(names)
        _check_hook_regenerates(img, tmp_path_factory.mktemp(f"hook-{board}"))
    else:
        assert {"vmlinuz", "initrd.img", "cmdline.txt"} <= set(names)
    assert root_stat(img.image, "/usr/bin/cog")["type"] == "regular"
    img.image.unlink()


# --- pure parts, no build ------------------------------------------------------------------------

def test_cpio_is_newc_sorted_and_timeless(tmp_path):
    import stat as st

    from kiosk.image.bootfiles import _cpio_newc

    entries = [("bin", st.S_IFDIR | 0o755, b""), ("bin/x", st.S_IFREG | 0o755, b"#!/bin/sh\n"),
               ("init", st.S_IFREG | 0o700, b"abc")]
    data = _cpio_newc(entries, 1234567890)
    (tmp_path / "a.cpio").write_bytes(data)
    listing = subprocess.run(["cpio", "-tv", "--quiet", "-F", str(tmp_path / "a.cpio")], capture_output=True,
                             text=True, check=True).stdout
    assert [line.split()[-1] for line in listing.splitlines()] == ["bin", "bin/x", "init"]
    assert "-rwx------" in listing and "2009" in listing  # mode kept, mtime 1234567890 = Feb 2009
    (tmp_path / "out").mkdir()
    subprocess.run(["cpio", "-id", "--quiet", "-D", str(tmp_path / "out"), "-F", str(tmp_path / "a.cpio")],
                   check=True)
    assert (tmp_path / "out/init").read_bytes() == b"abc"
    assert _cpio_newc(entries, 1234567890) == data


def test_the_pi4s_device_trees_get_the_mmc_aliases(tmp_path):
    """hardware/raspberryPi4.json deviceTreeAliases on a tree shaped like Debian's bcm2711 ones (no mmc aliases):
    EMMC2 becomes mmc0, what U-Boot's environment (mmc 0:1) and the slots (/dev/mmcblk0pN) rely on. The source
    file is not changed; a node the kernel's tree lacks is a one-line error naming the alias."""
    from kiosk.core.errors import KioskError
    from kiosk.image.bootfiles import device_tree

    aliases = _board("raspberryPi4")["deviceTreeAliases"]
    source = tmp_path / "bcm2711-rpi-4-b.dts"
    source.write_text('/dts-v1/;\n/ { aliases { serial0 = "/soc/serial@7e201000"; };\n'
                      '  soc { mmc@7e300000 { compatible = "brcm,bcm2835-sdhci"; }; };\n'
                      '  emmc2bus { mmc@7e340000 { compatible = "brcm,bcm2711-emmc2"; }; }; };\n')
    dtb = tmp_path / "bcm2711-rpi-4-b.dtb"
    subprocess.run(["dtc", "-I", "dts", "-O", "dtb", "-o", str(dtb), str(source)], check=True)
    before = dtb.read_bytes()
    assert device_tree(dtb, {}) == dtb
    edited = tmp_path / "edited.dtb"
    edited.write_bytes(device_tree(dtb, aliases))
    assert dtb.read_bytes() == before

    def alias(name):
        return subprocess.run(["fdtget", "-t", "s", str(edited), "/aliases", name], capture_output=True,
                              text=True, check=True).stdout.strip()
    assert alias("mmc0") == "/emmc2bus/mmc@7e340000" and alias("mmc1") == "/soc/mmc@7e300000"
    assert alias("serial0") == "/soc/serial@7e201000"
    with pytest.raises(KioskError, match="has no node /soc/mmc@7e999999 for the alias mmc2"):
        device_tree(dtb, {"mmc2": "/soc/mmc@7e999999"})


def test_module_order_puts_dependencies_first(tmp_path):
    from kiosk.image.bootfiles import module_load_order

    (tmp_path / "modules.dep").write_text(
        "kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko\n"
        "kernel/fs/jbd2/jbd2.ko:\nkernel/fs/mbcache.ko:\nkernel/lib/crc16.ko:\n"
        "kernel/drivers/mmc/host/sdhci-iproc.ko: kernel/drivers/mmc/host/sdhci-pltfm.ko "
        "kernel/drivers/mmc/host/sdhci.ko\n"
        "kernel/drivers/mmc/host/sdhci-pltfm.ko: kernel/drivers/mmc/host/sdhci.ko\n"
        "kernel/drivers/mmc/host/sdhci.ko:\n")
    order = module_load_order(tmp_path, ["sdhci_iproc", "ext4", "not-there"])
    names = [Path(p).name for p in order]
    assert names.index("sdhci.ko") < names.index("sdhci-pltfm.ko") < names.index("sdhci-iproc.ko")
    assert names.index("jbd2.ko") < names.index("ext4.ko") and names.index("crc16.ko") < names.index("ext4.ko")
    assert len(names) == len(set(names)) == 7


def test_raspi_cmdline_as_the_hook_writes_it():
    from kiosk.config.bootconfig import raspi_cmdline_txt

    line = raspi_cmdline_txt(["ttyS1,115200", "tty1"], "UUID=x", pi4=False, extra="quiet splash\n")
    assert line == " console=ttyS1,115200 console=tty1 root=UUID=x rw fsck.repair=yes net.ifnames=0 cma=64M " \
                   "rootwait quiet splash\n"
    # Pi 4 at the default CMA: the hook leaves cma= out (and the double space in)
    assert "  rootwait" in raspi_cmdline_txt(["ttyS1,115200"], "UUID=x", pi4=True)


def test_rootfs_stages_split_by_spec_only():
    """The base never holds the program or the spec's packages, so changing those reuses it."""
    from kiosk.image import rootfs
    from kiosk.spec.plan import make_plan

    cog = rootfs.stages(make_plan(full_spec("raspberryPi3", program={"package": "cog", "executable": "/usr/bin/cog",
                                                                      "args": []})))
    foot_less = rootfs.stages(make_plan(full_spec("raspberryPi3", packages=["less"])))
    assert cog[0] == foot_less[0] and cog[0].path == foot_less[0].path
    assert cog[1].install == ("cog",) and foot_less[1].install == ("foot", "less")
    assert "busybox-static" in cog[0].packages and "linux-image-arm64" in cog[0].packages
    assert "cog" not in cog[0].packages and cog[1].parent == cog[0]
    assert cog[1].path != foot_less[1].path and rootfs.tarball_path(make_plan(full_spec("raspberryPi3"))) != \
        cog[1].path


def test_apt_sources_follow_the_spec():
    """The suite, its -security (on the security mirror) and its -updates, each switchable off."""
    from kiosk.spec.sources import apt_sources, sources_list

    main = "http://deb.debian.org/debian"
    assert apt_sources({"suite": "bookworm", "mirror": main}) == [
        (main, "bookworm"), ("http://deb.debian.org/debian-security", "bookworm-security"), (main, "bookworm-updates")]
    assert apt_sources({"suite": "bookworm", "mirror": "http://m/debian", "security": False, "updates": False}) == [
        ("http://m/debian", "bookworm")]
    assert apt_sources({"suite": "bookworm", "mirror": main, "securityMirror": "http://s/ds", "updates": False}) == [
        (main, "bookworm"), ("http://s/ds", "bookworm-security")]
    assert apt_sources({"suite": "sid", "mirror": main}) == [(main, "sid")]   # Debian has no sid-security
    assert sources_list([(main, "bookworm")], options="[arch=armel] ") == \
        "deb [arch=armel] http://deb.debian.org/debian bookworm main non-free-firmware\n"


def test_the_base_key_follows_the_sources():
    """Turning the security suite off (or on) is another package set: another cached base."""
    from kiosk.image import rootfs
    from kiosk.spec.plan import make_plan

    frozen = full_spec("qemu")
    frozen["debian"] = {**frozen["debian"], "security": False}
    assert rootfs.stages(make_plan(full_spec("qemu")))[0].key != rootfs.stages(make_plan(frozen))[0].key
    command = rootfs.mmdebstrap_command(rootfs.stages(make_plan(full_spec("qemu")))[0], Path("/tmp/x.tar"))
    assert command[-3:] == ["deb http://deb.debian.org/debian bookworm main non-free-firmware",
                            "deb http://deb.debian.org/debian-security bookworm-security main non-free-firmware",
                            "deb http://deb.debian.org/debian bookworm-updates main non-free-firmware"]


def test_only_a_test_archive_on_this_machine_is_taken_unsigned(monkeypatch):
    """KIOSK_TEST_UNSIGNED_MIRROR (tests only) marks a loopback mirror [trusted=yes] for mmdebstrap, never
    Debian's: a cached base of the real archive is always built with its signatures checked."""
    from kiosk.image import rootfs
    from kiosk.spec.plan import make_plan

    spec = full_spec("qemu")
    spec["debian"] = {**spec["debian"], "securityMirror": "http://127.0.0.1:8123/debian"}
    stage = rootfs.stages(make_plan(spec))[0]
    assert not any("trusted" in line for line in rootfs.mmdebstrap_command(stage, Path("/tmp/x.tar"))[-3:])
    monkeypatch.setenv("KIOSK_TEST_UNSIGNED_MIRROR", "1")
    assert rootfs.mmdebstrap_command(stage, Path("/tmp/x.tar"))[-3:] == [
        "deb http://deb.debian.org/debian bookworm main non-free-firmware",
        "deb [trusted=yes] http://127.0.0.1:8123/debian bookworm-security main non-free-firmware",
        "deb http://deb.debian.org/debian bookworm-updates main non-free-firmware"]


def test_identity_is_stable_and_per_device():
    from kiosk.image.assemble import identity
    from kiosk.spec.plan import make_plan

    a = identity(make_plan(full_spec("raspberryPi3", host="one")))
    assert a == identity(make_plan(full_spec("raspberryPi3", host="one", packages=["less"])))
    b = identity(make_plan(full_spec("raspberryPi3", host="two")))
    assert len({a.disk_id, b.disk_id}) == 2 and len({a.root_uuid, b.root_uuid}) == 2
    assert re.fullmatch(r"[0-9A-F]{4}-[0-9A-F]{4}", a.boot_uuid)


def test_layout_counts_hard_links_once(tmp_path):
    """The root file system's size comes from the tarball's index: a file with ten more names counts once."""
    import tarfile

    from kiosk.image import basefs, tarindex
    from kiosk.image.assemble import ALIGN, layout_for

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big").write_bytes(b"x" * (8 << 20))
    for i in range(10):
        os.link(tree / "big", tree / f"link{i}")
    with tarfile.open(tmp_path / "base.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        tf.add(tree, arcname=".")
    index = tarindex.TarIndex(tmp_path / "base.tar", tarindex.scan(tmp_path / "base.tar"))
    assert [m.kind for m in index.members.values()].count("h") == 10
    used, inodes = basefs.usage(index)
    assert used < 9 << 20 and inodes == 2
    size, inode_count = basefs.size_for(used, inodes)
    layout = layout_for(size, used=used)
    assert layout.root_start % ALIGN == 0 and layout.root_size % ALIGN == 0 and layout.boot_start == ALIGN
    assert inode_count >= 65536 and size >= used + (256 << 20)


def test_copy_sparse_works_across_file_systems(tmp_path):
    """kiosk run's copy may live on another file system than the image (a tmpfs, another disk), where
    copy_file_range says EXDEV: the data still arrives, the holes stay holes."""
    from kiosk.image.assemble import copy_sparse

    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(os.urandom(3 << 20))
        f.seek(40 << 20)
        f.write(b"end of data")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        dst = Path(shm) / "copy.img"
        with open(dst, "wb") as f:
            f.truncate(128 << 20)
        assert copy_sparse(src, dst, 4096) >= (3 << 20) + 11
        with open(src, "rb") as a, open(dst, "rb") as b:
            b.seek(4096)
            assert a.read() == b.read(64 << 20)
        assert dst.stat().st_blocks * 512 < 16 << 20, "the holes were filled"


def test_the_build_machines_python_stands_in_for_a_foreign_ones_only_when_their_upstream_versions_match(tmp_path):
    """kiosk.image.hostpython: the copy its first hook makes runs from the tree through the copied loader and
    libraries and writes the .pyc this machine's python3.11 writes; the wrapper picks it only for the same
    upstream version. (The whole path, in a chroot of an arm64 build, against an emulated build of the same
    packages: notes/image.md.)"""
    import py_compile
    from kiosk.image import hostpython, rootfs

    version = hostpython.host_version()
    if version is None:
        pytest.skip("no Debian python3.11 on this machine")
    assert hostpython.upstream("3.11.2-6+deb12u8") == "3.11.2" == hostpython.upstream("3.11.2")
    put, take = hostpython.hooks(version)
    tree = tmp_path / "tree"
    tree.mkdir()
    subprocess.run(["sh", "-c", put[0], "hook", str(tree)], check=True)
    build = tree / hostpython.BUILD_DIR.lstrip("/")
    source = tmp_path / "mod.py"
    source.write_text("def f(x):\n    return {k: x * k for k in range(3)}\n")
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000", PYTHONHASHSEED="0")
    subprocess.run([str(build / "ld.so"), "--library-path", str(build / "lib"), str(build / "python3.11"), "-E", "-S",
                    "-c", f"import py_compile; py_compile.compile({str(source)!r}, cfile={str(tmp_path / 'a.pyc')!r}, "
                    "dfile='/usr/lib/python3/dist-packages/mod.py', doraise=True)"], check=True, env=env)
    subprocess.run(["/usr/bin/python3.11", "-E", "-S", "-c",
                    f"import py_compile; py_compile.compile({str(source)!r}, cfile={str(tmp_path / 'b.pyc')!r}, "
                    "dfile='/usr/lib/python3/dist-packages/mod.py', doraise=True)"], check=True, env=env)
    assert (tmp_path / "a.pyc").read_bytes() == (tmp_path / "b.pyc").read_bytes()
    # the wrapper (the second and third hooks need a chroot): native for the same upstream version only
    wrapper = put[2].split("'", 1)[1]
    assert f"= {hostpython.upstream(version)} ]; then v=native" in wrapper.replace("'\"'\"'", "'")
    assert any("--remove /usr/bin/python3.11" in h and f"rm -rf \"$1\"{hostpython.BUILD_DIR}" in h for h in take)
    # only a foreign architecture's build diverts it
    stage = rootfs.Stage("bookworm", rootfs.host_arch(), "http://deb.debian.org/debian", ("python3",), ("python3",),
                         sources=(("http://deb.debian.org/debian", "bookworm"),))
    assert not any("kiosk-build" in c for c in rootfs.mmdebstrap_command(stage, tmp_path / "x.tar"))
    foreign = rootfs.Stage("bookworm", "arm64", stage.mirror, stage.packages, stage.install, sources=stage.sources)
    assert sum("kiosk-build" in c for c in rootfs.mmdebstrap_command(foreign, tmp_path / "x.tar")) >= 3
