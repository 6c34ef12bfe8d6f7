"""The SD card image: MBR, a FAT32 firmware partition, an ext4 root, and its block map.

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


def _noop_log(msg: str) -> None:
    pass


@dataclass(frozen=True)
class Identity:
    """The identifiers baked into an image; derived from the spec, so rebuilding gives the same ones."""

    disk_id: int          # MBR disk signature (PARTUUID prefix)
    boot_serial: str      # FAT volume id, 8 hex digits (fstab: XXXX-XXXX)
    root_uuid: str        # ext4 UUID (the directory hash seed is the cached base's: basefs)

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
    return Identity(disk_id, boot_serial, root_uuid)


@dataclass(frozen=True)
class Layout:
    boot_start: int
    boot_size: int
    root_start: int
    root_size: int

    @property
    def total(self) -> int:
        return self.root_start + self.root_size


def layout_for(root_size: int) -> Layout:
    """FAT 256 MiB at 4 MiB, then the root file system (its size is the cached base's, basefs.size_for)."""
    boot_start = ALIGN
    return Layout(boot_start, BOOT_SIZE, boot_start + BOOT_SIZE, root_size)


def _run(cmd: list[str], *, stage: str, env: dict | None = None, input: str | None = None) -> str:
    return run(cmd, what=f"{stage} failed", env=env, input=input).stdout


# --- root tree additions that depend on the image layout ---------------------------------------

GROWROOT_SCRIPT = """#!/bin/sh
# kiosk: grow the root partition and its ext4 filesystem to fill the card, once.
set -eu
stamp=/var/lib/kiosk/growroot.done
dev=$(findmnt -n -o SOURCE /)
name=${dev##*/}
part=$(cat "/sys/class/block/$name/partition")
disk=/dev/$(basename "$(readlink -f "/sys/class/block/$name/..")")
echo "growing $dev (partition $part of $disk) to fill the card"
# ", +" = same start, as large as possible; --force: the disk is in use (its root is mounted).
echo ", +" | sfdisk --force --no-reread --no-tell-kernel -N "$part" "$disk" || true
partx -u -n "$part" "$disk"
resize2fs "$dev"
mkdir -p "${stamp%/*}"
touch "$stamp"
systemctl --no-reload disable kiosk-growroot.service || true
"""

GROWROOT_UNIT = """[Unit]
Description=Grow the root filesystem to fill the SD card (first boot only)
Documentation=file:///usr/lib/kiosk/growroot
ConditionPathExists=!/var/lib/kiosk/growroot.done
DefaultDependencies=no
After=systemd-remount-fs.service
Before=shutdown.target
Conflicts=shutdown.target

[Service]
Type=oneshot
ExecStart=/usr/lib/kiosk/growroot
RemainAfterExit=yes

[Install]
WantedBy=local-fs.target
"""


def write_root_files(root_dir: Path, ident: Identity) -> None:
    """/etc/fstab for this image's partitions, and the grow-root-once unit (enabled)."""
    fstab = ("# Written by kiosk at image build: the partitions of this image.\n"
             "# <file system>\t<mount point>\t<type>\t<options>\t<dump>\t<pass>\n"
             f"UUID={ident.root_uuid}\t/\text4\trw,noatime,errors=remount-ro\t0\t1\n"
             f"UUID={ident.boot_uuid}\t{BOOT_MOUNT}\tvfat\trw,noatime,umask=0022,nofail\t0\t2\n")
    write_atomic(root_dir / "etc/fstab", fstab)
    (root_dir / BOOT_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
    write_atomic(root_dir / "usr/lib/kiosk/growroot", GROWROOT_SCRIPT, 0o755)
    write_atomic(root_dir / "etc/systemd/system/kiosk-growroot.service", GROWROOT_UNIT)
    wants = root_dir / "etc/systemd/system/local-fs.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    link = wants / "kiosk-growroot.service"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to("/etc/systemd/system/kiosk-growroot.service")


# --- filesystems ---------------------------------------------------------------------------------

def write_partition_table(image: Path, layout: Layout, ident: Identity) -> None:
    script = (
        "label: dos\n"
        f"label-id: 0x{ident.disk_id:08x}\n"
        "unit: sectors\n\n"
        f"start={layout.boot_start // SECTOR}, size={layout.boot_size // SECTOR}, type=c, bootable\n"
        f"start={layout.root_start // SECTOR}, size={layout.root_size // SECTOR}, type=83\n"
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
    sources = []
    for name in sorted(files):
        if "/" in name or name.startswith("."):
            raise KioskError(f"image: boot file name {name!r} must be a plain name")
        content = files[name]
        dest = staging / name
        if isinstance(content, Path):
            shutil.copyfile(content, dest)
        else:
            dest.write_bytes(content)
        os.chmod(dest, 0o644)
        os.utime(dest, (epoch, epoch))
        sources.append(str(dest))
    if sources:
        _run(["mcopy", "-m", "-o", "-i", f"{image}@@{layout.boot_start}", *sources, "::"],
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
    log(f"image: {out_image.name}: {layout.total // MiB} MiB (FAT {layout.boot_size // MiB} MiB, root "
        f"{layout.root_size // MiB} MiB); MBR + FAT {time.monotonic() - started:.1f} s")
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
