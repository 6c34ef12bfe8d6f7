"""The SD card image: MBR, a FAT32 firmware partition, an ext4 root, and its block map.

No mounting and no loop devices: the image is a sparse file; sfdisk writes the
partition table into it, mkfs.vfat --offset and mcopy -i image@@offset make
and fill the FAT partition in place, and `mke2fs -d` makes the ext4 root from
the tree in place (-E offset=). Nothing needs root except keeping file owners
in the tree (the tree is unpacked as root).

Reproducible: the disk identifier, FAT serial and ext4 UUID / hash seed are
derived from the spec (hostName + hardware); every timestamp is
SOURCE_DATE_EPOCH (mke2fs 1.47.0 copies each source file's ctime and atime
into the filesystem, so a debugfs pass sets them afterwards); FAT files are
copied in sorted order with fixed times (mkfs.vfat --invariant, mcopy -m).

The image is written under a temporary name next to the output and renamed at
the end: a half-written image never has the output's name.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kiosk.core.errors import KioskError
from kiosk.core.files import write_atomic
from kiosk.core.run import run

Log = Callable[[str], None]

MiB = 1 << 20
SECTOR = 512
ALIGN = 4 * MiB
BOOT_SIZE = 256 * MiB
BOOT_LABEL = "RASPIFIRM"
ROOT_LABEL = "RASPIROOT"
BOOT_MOUNT = "/boot/firmware"


def _noop_log(msg: str) -> None:
    pass


@dataclass(frozen=True)
class Identity:
    """The identifiers baked into an image; derived from the spec, so rebuilding gives the same ones."""

    disk_id: int          # MBR disk signature (PARTUUID prefix)
    boot_serial: str      # FAT volume id, 8 hex digits (fstab: XXXX-XXXX)
    root_uuid: str        # ext4 UUID
    hash_seed: str        # ext4 directory hash seed

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
    hash_seed = str(uuidlib.UUID(bytes=hashlib.sha256(h).digest()[:16], version=4))
    return Identity(disk_id, boot_serial, root_uuid, hash_seed)


@dataclass(frozen=True)
class Layout:
    boot_start: int
    boot_size: int
    root_start: int
    root_size: int

    @property
    def total(self) -> int:
        return self.root_start + self.root_size


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def tree_usage(root_dir: Path) -> tuple[int, int]:
    """(bytes the tree needs in 4 KiB blocks, number of inodes)."""
    used = 0
    inodes = 0
    seen: set[tuple[int, int]] = set()   # hard links (mesa's dri drivers are one file 40 times) count once
    for dirpath, dirnames, filenames in os.walk(root_dir):
        inodes += 1
        used += 4096
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            inodes += 1
            if stat.S_ISREG(st.st_mode):
                used += _round_up(st.st_size, 4096)
            elif stat.S_ISLNK(st.st_mode) and st.st_size > 59:
                used += 4096
    return used, inodes


def plan_layout(root_dir: Path) -> tuple[Layout, int]:
    """Partition sizes for this tree: FAT 256 MiB at 4 MiB, root = tree + 25% (at least +256 MiB), 4 MiB aligned.

    Returns the layout and the inode count the root filesystem should have.
    """
    used, inodes = tree_usage(root_dir)
    # ext4 overhead: inode tables (256 B per inode), a 64 MiB journal, 5% reserved blocks, bitmaps.
    inode_count = max(_round_up(inodes * 2, 8192), 65536)
    overhead = inode_count * 256 + 64 * MiB + used // 20 + 16 * MiB
    root_size = _round_up(used + overhead + max(used // 4, 256 * MiB), ALIGN)
    boot_start = ALIGN
    root_start = boot_start + BOOT_SIZE
    return Layout(boot_start, BOOT_SIZE, root_start, root_size), inode_count


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


def _debugfs_quote(path: str) -> str | None:
    if any(c in path for c in '\n"'):
        return None
    return f'"{path}"'


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
    """Copy src's data (not its holes) into dst at offset; returns the bytes copied."""
    copied = 0
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        size = os.fstat(fin.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
            while data < hole:
                n = _copy_range(fin.fileno(), fout.fileno(), hole - data, data, data + offset)
                if n <= 0:
                    raise KioskError(f"image: copying {src} into {dst} stopped at {data}")
                data += n
                copied += n
            pos = hole
    return copied


def make_ext4(fs: Path, layout: Layout, root_dir: Path, ident: Identity, *, epoch: int, inodes: int,
              log: Log) -> None:
    """ext4 from root_dir in the file fs (created, layout.root_size long); every timestamp clamped to epoch."""
    env = dict(E2FSPROGS_FAKE_TIME=str(epoch), SOURCE_DATE_EPOCH=str(epoch), TZ="UTC",
               MKE2FS_CONFIG="/etc/mke2fs.conf")
    fs.unlink(missing_ok=True)
    with open(fs, "wb") as f:
        f.truncate(layout.root_size)
    _make_ext4_file(fs, layout, root_dir, ident, epoch=epoch, inodes=inodes, env=env, log=log)


def shift_right(path: Path, by: int) -> bool:
    """Insert `by` bytes of hole at the start of path without copying (FALLOC_FL_INSERT_RANGE, ext4/XFS)."""
    if not shutil.which("fallocate"):
        return False
    result = run(["fallocate", "--insert-range", "--offset", "0", "--length", str(by), str(path)], check=False)
    return result.returncode == 0


def _make_ext4_file(fs: Path, layout: Layout, root_dir: Path, ident: Identity, *, epoch: int, inodes: int,
                    env: dict, log: Log) -> None:
    _run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-N", str(inodes), "-L", ROOT_LABEL,
          "-U", ident.root_uuid, "-E", f"hash_seed={ident.hash_seed},root_owner=0:0,nodiscard",
          "-d", str(root_dir), str(fs), str(layout.root_size // 4096)],
         stage="image (root filesystem)", env=env)
    # mke2fs -d (1.47.0) copies each file's atime and ctime: pin them (and clamp mtimes) to the epoch.
    commands = []
    skipped = []
    for dirpath, dirnames, filenames in os.walk(root_dir):
        dirnames.sort()
        for name in [""] + sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, name) if name else dirpath
            rel = "/" + os.path.relpath(full, root_dir) if os.path.normpath(full) != os.path.normpath(root_dir) \
                else "/"
            quoted = _debugfs_quote(rel)
            if quoted is None:
                skipped.append(rel)
                continue
            commands.append(f"sif {quoted} atime @{epoch}")
            commands.append(f"sif {quoted} ctime @{epoch}")
            if os.lstat(full).st_mtime > epoch:
                commands.append(f"sif {quoted} mtime @{epoch}")
    commands.append(f"sif /lost+found atime @{epoch}")
    commands.append(f"sif /lost+found ctime @{epoch}")
    with tempfile.NamedTemporaryFile("w", prefix="kiosk-debugfs-", suffix=".cmds", delete=False) as f:
        f.write("\n".join(commands) + "\n")
        script = f.name
    try:
        result = run(["debugfs", "-w", "-f", script, str(fs)], env=env, check=False)
    finally:
        os.unlink(script)
    errors = [line for line in result.stderr.splitlines() if line and not line.startswith("debugfs ")]
    if result.returncode != 0 or errors:
        raise KioskError("image (root filesystem timestamps) failed:\n" + "\n".join(errors[-20:]))
    if skipped:
        log(f"image: {len(skipped)} paths with quotes or newlines keep their build-time ctime: {skipped[:3]}")


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


def assemble(plan, root_dir: Path, boot: dict[str, bytes | Path], out_image: Path, *, epoch: int,
             log: Log = _noop_log, ident: Identity | None = None) -> Path:
    """Write the image for root_dir + boot files to out_image (atomically) and its .bmap; returns out_image.

    Writes /etc/fstab and the grow-root unit into root_dir first (they depend on the layout).
    """
    ident = ident or identity(plan)
    out_image = Path(out_image)
    out_image.parent.mkdir(parents=True, exist_ok=True)
    write_root_files(root_dir, ident)
    layout, inodes = plan_layout(root_dir)
    tmp = out_image.with_name(f".{out_image.name}.{os.getpid()}.tmp")
    staging = out_image.with_name(f".{out_image.name}.{os.getpid()}.boot")
    started = time.monotonic()
    try:
        # The root filesystem is made first, in the file that becomes the image, then moved to its
        # offset by inserting a hole before it: no second copy of ~1 GB (copied where that is unsupported).
        make_ext4(tmp, layout, root_dir, ident, epoch=epoch, inodes=inodes, log=log)
        t_ext4 = time.monotonic()
        if not shift_right(tmp, layout.root_start):
            fs = tmp.with_name(tmp.name + ".ext4")
            os.replace(tmp, fs)
            try:
                with open(tmp, "wb") as f:
                    f.truncate(layout.total)
                copy_sparse(fs, tmp, layout.root_start)
            finally:
                fs.unlink(missing_ok=True)
        if os.path.getsize(tmp) != layout.total:
            raise KioskError(f"image: {tmp} is {os.path.getsize(tmp)} bytes, expected {layout.total}")
        write_partition_table(tmp, layout, ident)
        make_fat(tmp, layout, boot, ident, epoch=epoch, staging=staging)
        t_fat = time.monotonic()
        os.utime(tmp, (epoch, epoch))
        os.replace(tmp, out_image)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"image: {out_image.name}: {layout.total // MiB} MiB (FAT {layout.boot_size // MiB} MiB, root "
        f"{layout.root_size // MiB} MiB); ext4 {t_ext4 - started:.1f} s, MBR + FAT {t_fat - t_ext4:.1f} s")
    bmap = _write_bmap(out_image, log)
    if bmap:
        log(f"image: block map {bmap.name}")
    return out_image


def image_name(plan) -> str:
    return f"{plan.spec['hostName']}-{plan.board['name']}.img"
