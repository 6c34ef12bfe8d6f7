"""`kiosk build`: the command around the pipeline (and `--builder`, which hands the build to another machine)."""

from __future__ import annotations

import time
from pathlib import Path

from kiosk.core.log import Log
from kiosk.image.pipeline import build


def cmd_build(args) -> int:
    from kiosk.spec import load as specmod
    from kiosk.spec.commands import print_warnings

    if getattr(args, "builder", None):
        from kiosk.builders.remote import remote_build  # issue 8: build on a bigger machine over ssh
        code = remote_build(args)
        _compress_fetched(Path(args.output) / "manifest.json", args.compress)   # here, from what came back
        return code
    path = Path(args.spec)
    spec = specmod.load(path)
    print_warnings(spec)
    started = time.monotonic()
    manifest = build(spec, spec.text, Path(args.output), verbose=args.verbose, log=Log(), compress=args.compress,
                     upgrade=args.upgrade)
    written = manifest.get("compressed", {}).get("path")
    print(f"{manifest['image']}\n  sha256 {manifest['imageSha256']}\n  block map {manifest['bmap']}\n"
          + (f"  compressed {written} (sha256 {manifest['compressed']['sha256']})\n" if written else "")
          + f"  built in {time.monotonic() - started:.0f}s; write it with: kiosk flash {written or manifest['image']} "
          f"/dev/mmcblk0")
    return 0


def _compress_fetched(manifest_path: Path, fmt: str) -> None:
    from kiosk.core.files import read_json, write_json
    from kiosk.image.compress import compress_image

    manifest = read_json(manifest_path)
    if not manifest:
        return
    entry = compress_image(Path(manifest["image"]), fmt, Log())   # (without fmt: drops a stale one)
    if entry:
        manifest["compressed"] = entry
        write_json(manifest_path, manifest)
        print(f"  compressed {entry['path']} (sha256 {entry['sha256']})")


def register(sub) -> None:
    p = sub.add_parser("build", help="build the SD card image (+ .bmap, manifest.json, SPDX SBOM)",
                       description="Build <hostName>-<hardware>.img from a spec, from Debian packages of the "
                                   "board's architecture. Caches the base root filesystem by package set (as a "
                                   "tarball and a finished ext4), so a configuration-only change rebuilds in "
                                   "seconds. Runs as root or as a user, with the same bytes; a user's build of a "
                                   "package set not cached yet needs mmdebstrap's unshare mode (user namespaces, "
                                   "65536 ids in /etc/subuid and /etc/subgid, newuidmap from uidmap).")
    p.add_argument("spec", nargs="?", default="nixiosk.json", metavar="SPEC", help="the spec (default: nixiosk.json)")
    p.add_argument("-o", "--output", default="out", metavar="DIR", help="output directory (default: out)")
    p.add_argument("-v", "--verbose", action="store_true", help="stream the tools' output")
    p.add_argument("--upgrade", action="store_true",
                   help="take today's archive: build the cached base again if a suite (security fixes, "
                        "updates) has changed since it was cached")
    p.add_argument("--compress", choices=("zst", "xz"), metavar="zst|xz",
                   help="also write <name>.img.zst (or .img.xz) beside <name>.img and its .bmap, the same bytes "
                        "for the same image; kiosk flash and bmaptool copy take it with that .bmap")
    p.add_argument("--builder", metavar="[USER@]HOST[:PORT]",
                   help="build on that machine over ssh (kiosk installed there) and fetch the image, checksummed")
    p.set_defaults(func=cmd_build)
