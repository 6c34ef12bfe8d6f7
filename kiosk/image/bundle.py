"""Update bundles: the root filesystem of an image kiosk's pipeline built, in a RAUC bundle signed with the
user's key (kiosk.config.signing). The device installs it into its inactive root slot (notes/ab-update.md), checked with kiosk.device.slots.bundle_info.

The bundle carries the image's root partition byte for byte (an ext4 made by `mke2fs -d`, sparse), so a
device updated with it runs exactly what a card flashed with the image would. The format is RAUC's
"verity" (a squashfs whose dm-verity hash tree is in the signed manifest): the device checks the
signature once, then every block it reads. squashfs compression is zstd level 3: for the qemu target's
1.4 GB root (951 MB used) mksquashfs took 4 s for 308 MB, where its default (gzip) took minutes on the
same machine for 304 MB; Debian's amd64, arm64 and rpi kernels all read zstd squashfs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from kiosk.core.errors import KioskError
from kiosk.core.files import human_size
from kiosk.core.run import run
from kiosk.image.mbr import root_partition
from kiosk.config.signing import HINT, ROOT_IMAGE, SQUASHFS_ARGS, SigningKey, sign_bundle



def _copy_sparse_range(src: Path, start: int, length: int, dst: Path) -> None:
    """src[start:start+length] into the new file dst, holes kept as holes (SEEK_DATA / copy_file_range)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.truncate(length)
        end = start + length
        pos = start
        while pos < end:
            try:
                data = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:   # ENXIO: only a hole is left
                break
            if data >= end:
                break
            hole = min(os.lseek(fin.fileno(), data, os.SEEK_HOLE), end)
            done = data
            while done < hole:
                n = os.copy_file_range(fin.fileno(), fout.fileno(), hole - done, done, done - start)
                if n <= 0:
                    raise KioskError(f"copying the root filesystem out of {src} stopped at byte {done}")
                done += n
            pos = hole


def make_bundle(image: Path, out: Path, *, board: str, version: str, description: str, key: SigningKey,
                log=lambda message: None) -> Path:
    """A signed bundle at out (written under a temporary name, renamed when whole) from image's root."""
    image, out = Path(image), Path(out)
    part = root_partition(image)
    staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out.parent))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        _copy_sparse_range(image, part.start, part.size, staging / ROOT_IMAGE)
        log(f"bundle: root filesystem {part.size >> 20} MiB from {image.name} (partition {part.number})")
        tmp.unlink(missing_ok=True)
        sign_bundle(staging, tmp, board=board, version=version, description=description, key=key)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    log(f"bundle: {out.name}, {out.stat().st_size >> 20} MiB, signed with {key.cert}")
    return out


def store_size(store: Path) -> tuple[int, int]:
    """(chunks, bytes) in a casync store directory."""
    count = size = 0
    for path in store.glob("*/*.cacnk"):
        count += 1
        size += path.stat().st_size
    return count, size


def make_chunked(bundle: Path, key: SigningKey, log=lambda message: None) -> tuple[Path, Path]:
    """(index bundle, chunk store) made by `rauc convert` from a signed bundle, beside it; the bundle's
    signature is checked against key's certificate first, and the new bundle signed with key."""
    bundle = Path(bundle)
    out = bundle.with_name(f"{bundle.stem}-chunks.raucb")
    store = out.with_suffix(".castr")
    out.unlink(missing_ok=True)
    shutil.rmtree(store, ignore_errors=True)   # rauc convert would add to an old store, never prune it
    try:
        run(["rauc", "convert", f"--keyring={key.cert}", f"--cert={key.cert}", f"--key={key.key}",
             f"--mksquashfs-args={SQUASHFS_ARGS}", str(bundle), str(out)],
            what="making the chunked bundle (rauc convert)", hint=f"{HINT} casync")
    except BaseException:
        out.unlink(missing_ok=True)
        shutil.rmtree(store, ignore_errors=True)
        raise
    count, size = store_size(store)
    log(f"chunks: {out.name} {human_size(out.stat().st_size)} (the casync index, signed), "
        f"{count} chunks {human_size(size)} in {store.name}")
    return out, store
