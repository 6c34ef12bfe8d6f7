"""`kiosk build --compress zst|xz`: IMAGE.img.zst or IMAGE.img.xz beside IMAGE.img and its block map.

The compressed file is what people download and share; its block map is IMAGE.img.bmap, the
map of the uncompressed image (checksums of the uncompressed bytes, as bmaptool expects), which
`kiosk flash` and `bmaptool copy` both find beside IMAGE.img.zst.

Same image bytes, same compressed bytes (with the same zstd / xz versions): both run
multithreaded, in the mode whose output does not depend on the number of threads. zstd -T0
always uses its worker threads (the one-thread case is -T1, the same format; only
--single-thread would differ), xz -T0 since 5.4 always uses its multithreaded encoder (only -T1
is the single-threaded one), and neither stores a file name or a time.
"""

from __future__ import annotations

import os
from pathlib import Path

from kiosk.core.errors import KioskError
from kiosk.core.files import sha256_file
from kiosk.core.run import run

# --compress value -> the command that writes the compressed image to stdout. zstd -9: 3 % larger than
# -15 for a seventh of the time; xz -6 is xz's own default (notes/flash.md has the figures).
COMMANDS = {
    "zst": ["zstd", "-9", "-T0", "-q", "--no-progress", "-c", "--"],
    "xz": ["xz", "-6", "-T0", "-q", "-c", "--"],
}


def compressed_path(image: Path, fmt: str) -> Path:
    return image.with_name(f"{image.name}.{fmt}")


def compress_image(image: Path, fmt: str | None, log=lambda message: None) -> dict | None:
    """Write IMAGE.<fmt> (atomically: a temp name, renamed when complete) and drop a stale one of the
    other format, which would no longer match IMAGE.bmap. Returns the manifest's "compressed" entry."""
    image = Path(image)
    for other in COMMANDS:
        if other != fmt:
            compressed_path(image, other).unlink(missing_ok=True)
    if fmt is None:
        return None
    if fmt not in COMMANDS:
        raise KioskError(f"unknown compression {fmt!r}", hint=f"use one of: {', '.join(COMMANDS)}")
    out = compressed_path(image, fmt)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as sink:
            run(COMMANDS[fmt] + [str(image)], stdout=sink, what=f"compressing {image.name}",
                hint="is there room for it? (df -h)")
            os.fsync(sink.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    size = out.stat().st_size
    log(f"compressed: {out.name}, {size / (1 << 20):.1f} MiB ({100 * size / image.stat().st_size:.1f} % of the image)")
    return {"path": str(out), "format": fmt, "sha256": sha256_file(out), "bytes": size,
            "bmap": f"{image}.bmap"}
