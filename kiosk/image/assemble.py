"""The SD card image: MBR, four partitions, and its block map.

The FAT32 firmware partition, root slot A (the ext4 root file system), root slot B (the same size, all
zeros: the block map skips it) and the data partition (ext4 KIOSKDATA, kiosk.image.datafs), which grows
to fill the card on first boot. Every board has the slots (notes/ab-update.md).

No mounting, no loop devices, no root: the image is a sparse file; the root
file system is written into it at its offset by the caller (a copy of the
cached base ext4 with the spec's changes: kiosk.image.basefs and overlay);
sfdisk writes the partition table, mkfs.vfat --offset and mcopy -i
image@@offset make and fill the FAT partition in place.

Reproducible: the disk identifier, FAT serial and ext4 UUID are derived from
the spec (hostName + hardware); every timestamp is SOURCE_DATE_EPOCH; FAT
files are copied in sorted order with fixed times (mkfs.vfat --invariant,
mcopy -m).

The image is written under a temporary name next to the output and renamed at
the end: a half-written image never has the output's name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kiosk.core.errors import KioskError
from kiosk.core.files import sha256_file, write_atomic
from kiosk.core.run import run

Log = Callable[[str], None]

MiB = 1 << 20
SECTOR = 512
ALIGN = 4 * MiB
BOOT_SIZE = 256 * MiB
BOOT_LABEL = "RASPIFIRM"
BOOT_MOUNT = "/boot/firmware"
DATA_SIZE = 128 * MiB          # the data partition in the image (it grows on the device)
SLOT_MIN = 2 << 30             # a root slot: at least 2 GiB ...
SLOT_STEP = 256 * MiB          # ... in steps of 256 MiB


def _noop_log(msg: str) -> None:
    pass


@dataclass(frozen=True)
class Identity:
    """The identifiers baked into an image; derived from the spec, so rebuilding gives the same ones."""

    disk_id: int          # MBR disk signature (PARTUUID prefix)
    boot_serial: str      # FAT volume id, 8 hex digits (fstab: XXXX-XXXX)
    root_uuid: str        # ext4 UUID (the directory hash seed is the cached base's: basefs)
    data_uuid: str        # the data partition's ext4 UUID ...
    data_hash_seed: str   # ... and its directory hash seed

    @property
    def boot_uuid(self) -> str:
        return f"{self.boot_serial[:4]}-{self.boot_serial[4:]}".upper()

    @property
    def root(self) -> str:
        """The root= argument: the filesystem UUID (the initramfs and Debian's both resolve it)."""
        return f"UUID={self.root_uuid}"


def identity(plan) -> Identity:
    seed = f"kiosk-image\0{plan.spec['hostName']}\0{plan.board['name']}".encode()
    h = hashlib.sha256(seed).digest()
    disk_id = int.from_bytes(h[0:4], "big") or 1
    boot_serial = h[4:8].hex()
    root_uuid = str(uuidlib.UUID(bytes=h[8:24], version=4))
    d = hashlib.sha256(seed + b"\0data").digest()
    return Identity(disk_id, boot_serial, root_uuid, str(uuidlib.UUID(bytes=d[:16], version=4)),
                    str(uuidlib.UUID(bytes=d[16:32], version=4)))


@dataclass(frozen=True)
class Layout:
    boot_start: int
    boot_size: int
    root_start: int
    root_size: int        # the root file system, in slot A (which may be larger)
    slot_size: int        # each root slot's partition
    data_size: int        # the data partition (in the image: it grows on the device)

    @property
    def slot_b_start(self) -> int:
        return self.root_start + self.slot_size

    @property
    def data_start(self) -> int:
        return self.root_start + 2 * self.slot_size

    @property
    def total(self) -> int:
        return self.data_start + self.data_size


def slot_size_for(root_size: int, used: int) -> int:
    """A root slot is fixed at the first flash and must hold next year's bigger system too: twice the tree,
    at least 2 GiB and at least this root file system, in 256 MiB steps (notes/ab-update.md)."""
    size = max(2 * used, root_size, SLOT_MIN)
    return -(-size // SLOT_STEP) * SLOT_STEP


def layout_for(root_size: int, *, used: int) -> Layout:
    """FAT 256 MiB at 4 MiB, then slot A holding the root file system (its size is the cached base's,
    basefs.size_for; `used` its bytes in use), slot B as large, then the data partition."""
    boot_start = ALIGN
    return Layout(boot_start, BOOT_SIZE, boot_start + BOOT_SIZE, root_size, slot_size_for(root_size, used), DATA_SIZE)


def _run(cmd: list[str], *, stage: str, env: dict | None = None, input: str | None = None) -> str:
    return run(cmd, what=f"{stage} failed", env=env, input=input).stdout


# --- root tree additions that depend on the image layout ---------------------------------------

GROW_SCRIPT = """#!/bin/sh
# kiosk: grow the partition mounted at {mount} and its ext4 file system to fill the card, once.
set -eu
stamp={stamp}
dev=$(findmnt -n -o SOURCE {mount})
name=${{dev##*/}}
part=$(cat "/sys/class/block/$name/partition")
disk=/dev/$(basename "$(readlink -f "/sys/class/block/$name/..")")
echo "growing $dev (partition $part of $disk) to fill the card"
# ", +" = same start, as large as possible; --force: the disk is in use (the partition is mounted).
echo ", +" | sfdisk --force --no-reread --no-tell-kernel -N "$part" "$disk" || true
partx -u -n "$part" "$disk"
resize2fs "$dev"
mkdir -p "${{stamp%/*}}"
touch "$stamp"
systemctl --no-reload disable {unit} || true
"""

GROW_UNIT = """[Unit]
Description=Grow the {what} to fill the SD card (first boot only)
Documentation=file://{script}
ConditionPathExists=!{stamp}
DefaultDependencies=no
After=systemd-remount-fs.service
RequiresMountsFor={mounts}
Before=shutdown.target
Conflicts=shutdown.target

[Service]
Type=oneshot
ExecStart={script}
RemainAfterExit=yes

[Install]
WantedBy=local-fs.target
"""


GROW_PATH = "/usr/lib/kiosk/growdata"


def grow_unit() -> tuple[str, str, str]:
    """(unit name, script, unit text) of the grow-once unit: the data partition (the last one; a root slot
    never grows: slot B follows slot A)."""
    from kiosk.core.paths import DATA_MOUNT

    unit, stamp = "kiosk-growdata.service", "/var/lib/kiosk/growdata.done"
    return (unit, GROW_SCRIPT.format(mount=DATA_MOUNT, stamp=stamp, unit=unit),
            GROW_UNIT.format(what="data partition", script=GROW_PATH, stamp=stamp,
                             mounts=f"{DATA_MOUNT} /var/lib/kiosk"))


HOST_KEY_TYPES = ("ecdsa", "ed25519", "rsa")

SLOT_COMMIT_UNIT = """[Unit]
Description=Keep this root slot only when the kiosk comes up healthy (A/B: boot once, then commit or fall back)
After=kiosk.service kiosk-agent.service
RequiresMountsFor=/var/lib/kiosk

[Service]
# exec, not oneshot: the command waits for the boot to finish (systemctl is-system-running --wait).
Type=exec
ExecStart=/usr/bin/kiosk slot commit

[Install]
WantedBy=multi-user.target
"""


def fstab(ident: Identity) -> str:
    """This image's partitions: `/` is whichever slot the boot loader chose (both carry the same UUID), and
    the data partition with its binds (kiosk's initramfs checks and mounts them before systemd starts:
    pass 0, systemd finds them mounted)."""
    from kiosk.core.paths import DATA_BINDS, DATA_LABEL, DATA_MOUNT

    return ("# Written by kiosk at image build: the partitions of this image.\n"
            "# <file system>\t<mount point>\t<type>\t<options>\t<dump>\t<pass>\n"
            "/dev/root\t/\text4\trw,noatime,errors=remount-ro\t0\t1\n"
            f"UUID={ident.boot_uuid}\t{BOOT_MOUNT}\tvfat\trw,noatime,umask=0022,nofail\t0\t2\n"
            f"LABEL={DATA_LABEL}\t{DATA_MOUNT}\text4\trw,noatime\t0\t0\n"
            + "".join(f"{DATA_MOUNT}/{source}\t{target}\tnone\tbind\t0\t0\n" for source, target in DATA_BINDS))


def _enable(root_dir: Path, target: str, unit: str) -> None:
    wants = root_dir / f"etc/systemd/system/{target}.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / unit
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(f"/etc/systemd/system/{unit}")


def write_root_files(root_dir: Path, ident: Identity) -> None:
    """/etc/fstab for this image's partitions, the grow-once unit and the slot's commit unit (enabled), the
    data mount point, and the host keys' public halves where ssh tools look for them (the keys are made on
    /data at first start)."""
    from kiosk.core.paths import DATA_HOST_KEYS, DATA_MOUNT

    write_atomic(root_dir / "etc/fstab", fstab(ident))
    (root_dir / BOOT_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
    unit, script, text = grow_unit()
    write_atomic(root_dir / GROW_PATH.lstrip("/"), script, 0o755)
    write_atomic(root_dir / "etc/systemd/system" / unit, text)
    _enable(root_dir, "local-fs.target", unit)
    # kiosk.device.slots: the verdict on a newly installed system (RAUC mark-good / mark-bad)
    write_atomic(root_dir / "etc/systemd/system/kiosk-slot-commit.service", SLOT_COMMIT_UNIT)
    _enable(root_dir, "multi-user.target", "kiosk-slot-commit.service")
    (root_dir / DATA_MOUNT.lstrip("/")).mkdir(exist_ok=True)
    for kind in HOST_KEY_TYPES:
        pub = root_dir / f"etc/ssh/ssh_host_{kind}_key.pub"
        pub.unlink(missing_ok=True)
        pub.symlink_to(f"{DATA_HOST_KEYS}/etc/ssh/ssh_host_{kind}_key.pub")


# --- filesystems ---------------------------------------------------------------------------------

def write_partition_table(image: Path, layout: Layout, ident: Identity) -> None:
    script = (
        "label: dos\n"
        f"label-id: 0x{ident.disk_id:08x}\n"
        "unit: sectors\n\n"
        f"start={layout.boot_start // SECTOR}, size={layout.boot_size // SECTOR}, type=c, bootable\n"
        f"start={layout.root_start // SECTOR}, size={layout.slot_size // SECTOR}, type=83\n"
        f"start={layout.slot_b_start // SECTOR}, size={layout.slot_size // SECTOR}, type=83\n"   # slot B, empty
        f"start={layout.data_start // SECTOR}, size={layout.data_size // SECTOR}, type=83\n"
    )
    _run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(image)], stage="image (partition table)",
         input=script)


def make_fat(image: Path, layout: Layout, files: dict[str, bytes | Path], ident: Identity, *, epoch: int,
             staging: Path) -> None:
    """FAT32 at layout.boot_start in image, holding files (sorted), every time = epoch."""
    env = dict(SOURCE_DATE_EPOCH=str(epoch), MTOOLS_SKIP_CHECK="1", TZ="UTC")
    # 2 KiB clusters: 256 MiB in 512 B sectors would make mkfs.vfat pick 4 KiB clusters with --offset,
    # too few for FAT32 (65525 minimum). -h: hidden sectors = the partition's start, as on a real card.
    _run(["mkfs.vfat", "-F", "32", "-S", "512", "-s", "4", "-h", str(layout.boot_start // SECTOR),
          "-n", BOOT_LABEL, "--invariant", "-i", ident.boot_serial,
          f"--offset={layout.boot_start // SECTOR}", str(image), str(layout.boot_size // 1024)],
         stage="image (FAT partition)", env=env)
    staging.mkdir(parents=True, exist_ok=True)
    by_dir: dict[str, list[str]] = {}     # FAT directory ("" = the top) -> files to copy there, sorted
    for name in sorted(files):
        if any(not part or part.startswith(".") for part in name.split("/")):
            raise KioskError(f"image: boot file name {name!r} must be a plain name or a relative path")
        content = files[name]
        dest = staging / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, dest)
        else:
            dest.write_bytes(content)
        os.chmod(dest, 0o644)
        os.utime(dest, (epoch, epoch))
        by_dir.setdefault(name.rpartition("/")[0], []).append(str(dest))
    fat = f"{image}@@{layout.boot_start}"
    # Directories made in sorted order, files copied in sorted order: the same FAT bytes every time
    # (mmd stamps directories with SOURCE_DATE_EPOCH).
    directories = sorted({"/".join(d.split("/")[:i]) for d in by_dir if d for i in range(1, d.count("/") + 2)})
    if directories:
        _run(["mmd", "-i", fat, *(f"::{d}" for d in directories)], stage="image (FAT partition)", env=env)
    for directory in sorted(by_dir):
        _run(["mcopy", "-m", "-o", "-i", fat, *by_dir[directory], f"::{directory}" + ("/" if directory else "")],
             stage="image (FAT partition)", env=env)


def _copy_range(fin: int, fout: int, count: int, src_at: int, dst_at: int) -> int:
    """copy_file_range, or read and write where the kernel will not copy between these file systems
    (EXDEV since Linux 5.19 for most pairs, e.g. an image on ext4 and a copy on tmpfs)."""
    import errno
    try:
        return os.copy_file_range(fin, fout, count, src_at, dst_at)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    data = os.pread(fin, min(count, 8 << 20), src_at)
    return os.pwrite(fout, data, dst_at) if data else 0


def copy_sparse(src: Path, dst: Path, offset: int) -> int:
    """Copy src's mapped ranges (not its holes) into dst at offset; returns the bytes copied.

    The ranges are the block map's (FIEMAP, unwritten extents included), not SEEK_DATA's, which on ext4
    depends on the page cache: the copy of the same file is then always mapped the same way. Where the
    file systems can, copy_file_range shares the extents instead of copying them (reflink)."""
    from kiosk.image.bmap import BLOCK_SIZE, mapped_ranges

    copied = 0
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        size = os.fstat(fin.fileno()).st_size
        for first, last in mapped_ranges(fin.fileno(), size):
            data, end = first * BLOCK_SIZE, min((last + 1) * BLOCK_SIZE, size)
            while data < end:
                n = _copy_range(fin.fileno(), fout.fileno(), end - data, data, data + offset)
                if n <= 0:
                    raise KioskError(f"image: copying {src} into {dst} stopped at {data}")
                data += n
                copied += n
    return copied


# --- the whole image -------------------------------------------------------------------------

def _write_bmap(image: Path, log: Log) -> Path | None:
    try:
        from kiosk.image.bmap import write_bmap
    except ImportError:
        log("image: kiosk.bmap is not available; no block map written")
        return None
    bmap = Path(str(image) + ".bmap")
    write_bmap(image, bmap)
    return bmap


def scratch_path(out_image: Path, what: str) -> Path:
    """A temporary file beside the output (same file system: renames and hole insertion work)."""
    return out_image.with_name(f".{out_image.name}.{os.getpid()}.{what}")


def assemble(layout: Layout, image: Path, boot: dict[str, bytes | Path], out_image: Path, *, epoch: int,
             ident: Identity, log: Log = _noop_log) -> str:
    """Finish the image file `image` (a scratch_path, layout.total bytes, the root file system already at
    layout.root_start): partition table, FAT partition, renamed to out_image; its .bmap; returns its sha256.

    The root is written in place at its offset: moving it there afterwards (fallocate --insert-range)
    made ext4 write the whole file back and drop it from the page cache, so that the block map and the
    sha256 read ~1 GB back from the disk. The sha256 is taken while the block map is made (two cores).
    """
    from concurrent.futures import ThreadPoolExecutor

    out_image = Path(out_image)
    staging = scratch_path(out_image, "boot")
    started = time.monotonic()
    try:
        if os.path.getsize(image) != layout.total:
            raise KioskError(f"image: {image} is {os.path.getsize(image)} bytes, expected {layout.total}")
        write_partition_table(image, layout, ident)
        make_fat(image, layout, boot, ident, epoch=epoch, staging=staging)
        os.utime(image, (epoch, epoch))
        os.replace(image, out_image)
    except BaseException:
        image.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    parts = (f"root slots A and B {layout.slot_size // MiB} MiB each (A's file system {layout.root_size // MiB} "
             f"MiB), data {layout.data_size // MiB} MiB")
    log(f"image: {out_image.name}: {layout.total // MiB} MiB (FAT {layout.boot_size // MiB} MiB, {parts}); "
        f"MBR + FAT {time.monotonic() - started:.1f} s")
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(sha256_file, out_image)
        bmap = _write_bmap(out_image, log)
        mapped = time.monotonic()
        sha = digest.result()
    log(f"image: block map {bmap.name if bmap else '(none)'} in {mapped - started:.1f} s, sha256 "
        f"{time.monotonic() - started:.1f} s")
    return sha


def image_name(plan) -> str:
    return f"{plan.spec['hostName']}-{plan.board['name']}.img"
