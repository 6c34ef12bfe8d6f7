"""The cached base root file system: the base tarball as a finished ext4 image, made once, copied per build.

A build used to unpack the ~1 GB tarball and run `mke2fs -d` over the whole tree for a change of
a few kilobytes. Now the ext4 of the base tree is made once per tarball and kept in the cache
(`<tarball stem>.fs-<key>.ext4` + `.json`); each build copies it (`copy`: reflink where the file
system shares extents, else an in-kernel copy of its mapped ranges) and writes only what the
spec changes into the copy (kiosk.image.overlay).

Owners, modes and extended attributes come from the tarball's index, never from an unpacked
tree: the tree is unpacked without owners or xattrs (as root and as a user alike), mke2fs -d
copies it, and a debugfs pass sets every owner, mode and xattr that differs from the index
(plus the timestamps: mke2fs 1.47.0 copies each file's atime and ctime, which are the unpack
time). So a user's build gives the same bytes as root's.

The key covers everything that goes into the bytes: the tarball's sha256, the mke2fs command
(size, inode count, features), the e2fsprogs version, the epoch and RECIPE_VERSION (bump it when
this recipe changes). The file system's UUID and hash seed are the base's own (derived from the
key); each image sets its own UUID afterwards (metadata_csum_seed: the checksums do not depend
on the UUID, so changing it rewrites the superblock only).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kiosk.core import paths
from kiosk.core.errors import KioskError
from kiosk.core.run import run
from kiosk.image.tarindex import TarIndex

Log = Callable[[str], None]

RECIPE_VERSION = "3"
ROOT_LABEL = "RASPIROOT"
BLOCK = 4096
MiB = 1 << 20


@dataclass(frozen=True)
class BaseFs:
    path: Path        # the cached ext4 image (never written after it is made)
    size: int         # bytes: the root partition's size
    epoch: int
    key: str
    used: int = 0     # bytes the tree needs (usage): what an A/B slot's size is reckoned from


def fake_time_env(epoch: int) -> dict:
    """e2fsprogs with every timestamp it writes (inodes, superblock) at the epoch."""
    return dict(E2FSPROGS_FAKE_TIME=str(epoch), SOURCE_DATE_EPOCH=str(epoch), TZ="UTC",
                MKE2FS_CONFIG="/etc/mke2fs.conf")


def quote(path: str) -> str | None:
    """A path as a debugfs argument; None when its command language cannot say it (a quote or newline)."""
    if any(c in path for c in '\n"'):
        return None
    return f'"{path}"'


def run_debugfs(fs: Path, commands: list[str], *, epoch: int, what: str, offset: int = 0) -> None:
    """Run debugfs -w over a command file on the ext4 at `offset` in the file fs; any complaint it prints
    is a failure (it exits 0 regardless). fs is named relative to its directory: debugfs reads options
    after the first "?" of the name, and a directory of the user's may hold one."""
    with tempfile.NamedTemporaryFile("w", prefix="kiosk-debugfs-", suffix=".cmds", delete=False) as f:
        f.write("\n".join(commands) + "\n")
        script = f.name
    name = f"./{fs.name}" + (f"?offset={offset}" if offset else "")
    try:
        result = run(["debugfs", "-w", "-f", script, name], cwd=fs.parent, env=fake_time_env(epoch), check=False)
    finally:
        os.unlink(script)
    errors = [line for line in result.stderr.splitlines()
              if line and not line.startswith("debugfs ") and not line.startswith("Allocated inode")]
    if result.returncode != 0 or errors:
        raise KioskError(f"{what} failed (debugfs):\n" + "\n".join(errors[:10] + ["..."] + errors[-10:]))


def e2fsprogs_version() -> str:
    out = run(["mke2fs", "-V"], what="image (root filesystem)")
    return (out.stderr + out.stdout).splitlines()[0].strip()


def usage(index: TarIndex) -> tuple[int, int]:
    """(bytes the tree needs in 4 KiB blocks, number of inodes), hard links counted once."""
    used = inodes = 0
    for m in index.members.values():
        if m.kind == "h":
            continue
        inodes += 1
        if m.kind == "d":
            used += BLOCK
        elif m.kind == "f":
            used += -(-m.size // BLOCK) * BLOCK
        elif m.kind == "l" and len(m.link.encode()) > 59:
            used += BLOCK
    return used, inodes


def size_for(used: int, inodes: int) -> tuple[int, int]:
    """(root file system bytes, inode count): the tree + inode tables, a 64 MiB journal, 5 % reserved,
    and room to grow (25 %, at least 256 MiB, which also holds what the spec adds), 4 MiB aligned."""
    inode_count = max(-(-inodes * 2 // 8192) * 8192, 65536)
    overhead = inode_count * 256 + 64 * MiB + used // 20 + 16 * MiB
    size = used + overhead + max(used // 4, 256 * MiB)
    return -(-size // (4 * MiB)) * (4 * MiB), inode_count


def _ids(key: str) -> tuple[str, str]:
    h = hashlib.sha256(f"kiosk-basefs\0{key}".encode()).digest()
    return str(uuidlib.UUID(bytes=h[:16], version=4)), str(uuidlib.UUID(bytes=h[16:32], version=4))


def mke2fs_command(size: int, inodes: int, ident: str) -> list[str]:
    """mke2fs for a base of `size` bytes (the tree and the image file are appended by the caller)."""
    root_uuid, hash_seed = _ids(ident)
    return ["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-N", str(inodes), "-L", ROOT_LABEL,
            "-O", "metadata_csum_seed", "-U", root_uuid,
            "-E", f"hash_seed={hash_seed},root_owner=0:0,nodiscard"]


def fs_path(tar: Path, key: str) -> Path:
    return tar.with_name(f"{tar.stem}.fs-{key}.ext4")


def base_fs(tar: Path, index: TarIndex, *, epoch: int, log: Log, lock) -> BaseFs:
    """The cached ext4 of the tarball's tree (made on a miss: ~15 s for 1 GB); `lock(path)` guards the cache."""
    used, inodes = usage(index)
    size, inode_count = size_for(used, inodes)
    version = e2fsprogs_version()
    ident = hashlib.sha256(json.dumps([index.sha256, size, inode_count, epoch, version, RECIPE_VERSION])
                           .encode()).hexdigest()
    command = mke2fs_command(size, inode_count, ident)
    key = hashlib.sha256(json.dumps([ident, command]).encode()).hexdigest()[:16]
    path = fs_path(tar, key)
    meta_path = path.with_suffix(".json")
    with lock(path.with_suffix(".lock")):
        if path.exists() and meta_path.exists():
            log(f"base file system: reusing {path.name} ({size // MiB} MiB)")
            return BaseFs(path, size, epoch, key, used)
        started = time.monotonic()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            _make(tar, index, tmp, command, size, epoch=epoch, log=log)
            meta = {"key": key, "tarball": tar.name, "tarballSha256": index.sha256, "bytes": size,
                    "inodes": inode_count, "sourceDateEpoch": epoch, "e2fsprogs": version,
                    "recipe": RECIPE_VERSION, "seconds": round(time.monotonic() - started, 1)}
            meta_path.with_suffix(".json.tmp").write_text(json.dumps(meta, indent=1) + "\n")
            os.replace(tmp, path)
            os.replace(meta_path.with_suffix(".json.tmp"), meta_path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        log(f"base file system: made {path.name} in {time.monotonic() - started:.1f} s ({size // MiB} MiB)")
        _prune(tar, path)
        return BaseFs(path, size, epoch, key, used)


def _prune(tar: Path, keep: Path) -> None:
    """One file system per tarball: those of an older recipe, e2fsprogs or tarball (~1 GB each) go."""
    for old in tar.parent.glob(f"{tar.stem}.fs-*.ext4"):
        if old != keep:
            for path in (old, old.with_suffix(".json"), old.with_suffix(".lock")):
                path.unlink(missing_ok=True)


def _make(tar: Path, index: TarIndex, fs: Path, command: list[str], size: int, *, epoch: int, log: Log) -> None:
    from kiosk.image.rootfs import extract

    work_parent = paths.cache_dir() / "tmp"
    work_parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="basefs-", dir=work_parent))
    try:
        tree = work / "root"
        tree.mkdir()
        extract(tar, tree, owners=False, log=log)
        _make_readable(index, tree)
        fs.unlink(missing_ok=True)
        with open(fs, "wb") as f:
            f.truncate(size)
        started = time.monotonic()
        run([*command, "-d", str(tree), str(fs), str(size // BLOCK)], what="image (root filesystem)",
            env=fake_time_env(epoch))
        made = time.monotonic()
        run_debugfs(fs, _settle_commands(index, tree, work, epoch, log), epoch=epoch,
                    what="image (root filesystem owners, modes and times)")
        # The superblock counts the kilobytes ever written to the file system, and a user's pass above
        # writes more (every owner): start the count again in a session that writes the same everywhere.
        run_debugfs(fs, ["ssv kbytes_written 0"], epoch=epoch, what="image (root filesystem)")
        log(f"base file system: mke2fs -d {made - started:.1f} s, owners/modes/times "
            f"{time.monotonic() - made:.1f} s")
    finally:
        remove_tree(work)


def _make_readable(index: TarIndex, tree: Path) -> None:
    """As a user, mke2fs -d must read every file and enter every directory: give the owner r (and x)
    where the base denies it (the debugfs pass puts the base's mode back)."""
    if os.geteuid() == 0:
        return
    for m in index.members.values():
        need = 0o500 if m.kind == "d" else 0o400 if m.kind == "f" else 0
        if need and m.mode & need != need:
            os.chmod(tree / m.path.lstrip("/"), m.mode | need)


def remove_tree(work: Path) -> None:
    """Remove an unpacked tree; as a user its read-only directories must first become writable."""
    def writable(func, path, exc_info):
        os.chmod(os.path.dirname(path), 0o700)
        func(path)
    shutil.rmtree(work, onerror=writable)


def _settle_commands(index: TarIndex, tree: Path, work: Path, epoch: int, log: Log) -> list[str]:
    """debugfs commands making every inode what the index says: owner, mode, xattrs; atime and ctime
    at the epoch, mtime clamped to it."""
    commands = []
    skipped = []
    for n, m in enumerate(index.members.values()):
        if m.kind == "h":
            continue   # the same inode as its target
        st = os.lstat(tree / m.path.lstrip("/"))
        q = quote(m.path)
        fixes = []
        if st.st_uid != m.uid:
            fixes.append(f"sif {q} uid {m.uid}")
        if st.st_gid != m.gid:
            fixes.append(f"sif {q} gid {m.gid}")
        if (stat.S_IMODE(st.st_mode) != m.mode or m.path == "/") and m.kind != "l":   # a symlink's is 0777
            fixes.append(f"sif {q} mode 0{stat.S_IFMT(st.st_mode) | m.mode:o}")
        for name, value in m.xattrs.items():
            value_file = work / f"xattr-{n}-{len(fixes)}"
            value_file.write_bytes(value)
            fixes.append(f"ea_set -f {value_file} {q} {name}")
        if q is None:
            if fixes:
                raise KioskError(f"image: {m.path!r} needs its owner, mode or xattrs set, and debugfs cannot name it",
                                 hint="build as root, or leave the package with such a file name out")
            skipped.append(m.path)
            continue
        commands += fixes
        commands += [f"sif {q} atime @{epoch}", f"sif {q} ctime @{epoch}"]
        mtime = min(m.mtime, epoch)
        if st.st_mtime_ns != mtime * 10**9 or m.path == "/":   # mke2fs gives the root its own time
            commands.append(f"sif {q} mtime @{mtime}")
    commands += [f"sif /lost+found atime @{epoch}", f"sif /lost+found ctime @{epoch}"]
    if skipped:
        log(f"image: {len(skipped)} paths with quotes or newlines keep their build-time ctime: {skipped[:3]}")
    return commands


def copy(base: BaseFs, dest: Path, offset: int, size: int) -> None:
    """dest = a new sparse file of `size` bytes holding a copy of the cached base file system at `offset`:
    its mapped ranges only (FIEMAP, so the block map of every copy is the same), extents shared where
    the file system can (copy_file_range reflinks on XFS and btrfs)."""
    from kiosk.image.assemble import copy_sparse

    with open(dest, "wb") as f:
        f.truncate(size)
    copy_sparse(base.path, dest, offset)
    # Write the ~1 GB out now (this runs beside the configure step): debugfs and the block map fsync the
    # image later, and would otherwise wait for all of it then.
    with open(dest, "rb+") as f:
        os.fsync(f.fileno())
