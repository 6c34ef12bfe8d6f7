#!/usr/bin/env python3
"""How much faster is `kiosk flash` than dd? Prints the figures; run as root.

Builds a sample-like sparse image (default 2 GiB, an MBR with a FAT and an ext4
partition, about 36% of it data in a few extents: "less than half full"; the
data is this machine's own /usr files, so it compresses like a root file system
does, or random bytes with --data random), writes its block map as `kiosk build`
does, compresses it as `kiosk build --compress zst|xz` does (niced: not timed),
then writes it to fresh loop devices with each method, in the same run:

  kiosk flash            (block map, O_DIRECT writes, read back and checked behind the writer)
  kiosk flash --no-verify
  kiosk flash, buffered  (DIRECT_WRITES=False: page-cache writes, fsync at the end)
  bmaptool copy          (the peer tool, for reference)
  dd bs=4M conv=fsync    (what most guides tell you)
  kiosk flash IMG.img.zst / .img.xz     (streamed: decompressed as written, verified)
  bmaptool copy IMG.img.zst / .img.xz   (with IMG.img.bmap)
  zstdcat / xzcat IMG | dd bs=4M conv=fsync
  two cards: `kiosk flash IMG DEV1 DEV2` against `kiosk flash IMG DEV1; kiosk flash IMG DEV2`
             (the .img, the .img.zst and the .img.xz: each card decompresses the stream itself)

Before each timed write the page cache is dropped (echo 3 > drop_caches) so no
method reads the image from memory another one left behind. Bytes written and
read are the loop devices' own counters (/sys/class/block/loopN/stat), not
what the tools claim; CPU seconds are the method's processes' user + system
time. A loop device is not an SD card: it is backed by a file on this
machine's disk, so the ratio is the point, not the MB/s.

    sudo .venv/bin/python bench/flash.py [--size-gib 2] [--dir /var/tmp] [--repeat 1] [--data system|random]
                                         [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MiB = 1 << 20


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def system_bytes():
    """This machine's /usr files, one after the other: data that compresses like a root file system's."""
    for top in ("/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/share", "/usr/lib"):
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if os.path.islink(path) or not os.path.isfile(path):
                    continue
                try:
                    with open(path, "rb") as f:
                        while chunk := f.read(4 * MiB):
                            yield chunk
                except OSError:
                    continue


def make_card_shaped_file(path: Path, size: int, data_kind: str = "system") -> int:
    """A sparse image with a partition table and data extents; returns the data bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
    boot = min(256 * MiB, size // 8 // MiB * MiB)
    sh("sfdisk", "-q", str(path),
       input=f"label: dos\nstart=2048, size={boot // 512}, type=c\nstart={(MiB + boot) // 512}, type=83\n")
    fat = ["-F", "32", "-s", "1"] if boot >= 64 * MiB else []  # FAT32 like Raspberry Pi OS
    sh("mkfs.vfat", "-n", "BOOT", *fat, "--offset", "2048", str(path), str(boot // 1024))
    # Random data in a few extents, as a root file system leaves them: kernel and firmware in
    # the boot partition, then system, libraries and the browser spread over the ext4 partition.
    extents = [(2 * MiB, 24 * MiB), (300 * MiB, 260 * MiB), (700 * MiB, 300 * MiB), (1500 * MiB, 150 * MiB)]
    scale = size / (2048 * MiB)
    data = 0
    files = system_bytes()
    pending = b""
    with open(path, "r+b") as f:
        block = os.urandom(16 * MiB)
        for offset, length in extents:
            offset, length = int(offset * scale) // MiB * MiB, int(length * scale) // MiB * MiB
            f.seek(offset)
            for done in range(0, length, len(block)):
                want = min(len(block), length - done)
                if data_kind == "random":
                    part = block[:want]
                    f.write(bytes([done // len(block) % 251]) + part[1:])  # no two chunks alike
                    continue
                while len(pending) < want:
                    pending += next(files, None) or os.urandom(want)   # (random only if /usr runs out)
                f.write(pending[:want])
                pending = pending[want:]
            data += length
    return data


def compress_niced(image: Path, fmt: str) -> tuple[Path, float]:
    """IMAGE.<fmt> as `kiosk build --compress` writes it (image/compress.py), at the lowest CPU priority:
    the bench prepares its input without crowding whoever else uses the machine. (path, seconds)."""
    start = time.monotonic()
    code = ("import sys; from pathlib import Path; from kiosk.image.compress import compress_image; "
            "print(compress_image(Path(sys.argv[1]), sys.argv[2])['path'])")
    out = subprocess.run(["nice", "-n", "19", sys.executable, "-c", code, str(image), fmt], check=True,
                         capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return Path(out), time.monotonic() - start


def loop_stat(dev: str) -> tuple[int, int]:
    """(bytes read, bytes written) so far by the block device."""
    fields = Path(f"/sys/class/block/{Path(dev).name}/stat").read_text().split()
    return int(fields[2]) * 512, int(fields[6]) * 512


def kiosk_command() -> list[str]:
    """`python -m kiosk`, or, while another stage of this tree does not import, a flash-only driver."""
    full = [sys.executable, "-m", "kiosk"]
    probe = subprocess.run(full + ["flash", "--help"], capture_output=True, text=True, cwd=ROOT)
    if probe.returncode == 0:
        return full
    print("note: `python -m kiosk` does not start in this tree right now; using a flash-only driver",
          file=sys.stderr)
    return [sys.executable, "-c",
            "import sys; from kiosk import cli; cli.COMMAND_MODULES = ('kiosk.flash.command',); "
            "sys.exit(cli.main(sys.argv[1:]))"]


def buffered_command() -> list[str]:
    return [sys.executable, "-c",
            "import sys; from kiosk import cli; from kiosk.flash import command; command.DIRECT_WRITES = False; "
            "cli.COMMAND_MODULES = ('kiosk.flash.command',); sys.exit(cli.main(sys.argv[1:]))"]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(name: str, image: Path, work: Path, commands_for, stdin_for=None, cards: int = 1) -> dict:
    """Fresh loop devices (`cards` of them), caches dropped, then the commands commands_for(devs) gives,
    one after the other (each a list of argv, or a shell line given as a str); stdin_for(devs) gives the
    input of all of them, or a list with one per command."""
    devs, backings = [], []
    try:
        for n in range(cards):
            backing = work / f"card{n}.img"
            backing.unlink(missing_ok=True)
            with open(backing, "wb") as f:
                f.truncate(image.stat().st_size)
            backings.append(backing)
            devs.append(sh("losetup", "--find", "--show", str(backing)).stdout.strip())
        drop_caches()
        before = [loop_stat(dev) for dev in devs]
        cpu0, start = children_cpu(), time.monotonic()
        inputs = stdin_for(devs) if stdin_for else None
        for n, argv in enumerate(commands_for(devs)):
            proc = subprocess.run(argv, input=inputs[n] if isinstance(inputs, list) else inputs,
                                  shell=isinstance(argv, str), capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        seconds, cpu = time.monotonic() - start, children_cpu() - cpu0
        after = [loop_stat(dev) for dev in devs]
        same = all(subprocess.run(["cmp", "-s", "-n", str(image.stat().st_size), str(image), dev]).returncode == 0
                   for dev in devs)
    finally:
        for dev in devs:
            subprocess.run(["losetup", "-d", dev], check=False)
        for backing in backings:
            backing.unlink(missing_ok=True)
    return {"name": name, "seconds": seconds, "cpu": cpu, "written": sum(a[1] - b[1] for a, b in zip(after, before)),
            "read": sum(a[0] - b[0] for a, b in zip(after, before)), "identical": same, "cards": cards}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--dir", default="/var/tmp", help="where the image and the loop backing file go")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each method (the best is kept)")
    parser.add_argument("--data", choices=("system", "random"), default="system",
                        help="what fills the data extents: this machine's /usr files (compress like a root file "
                             "system) or random bytes (do not compress)")
    parser.add_argument("--keep", metavar="DIR", help="make the image and its compressed files in DIR and keep "
                                                      "them; a later run with the same DIR and size reuses them")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/flash.py: needs root (loop devices, drop_caches)", file=sys.stderr)
        return 2

    from kiosk.image.bmap import read_bmap, write_bmap

    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="kiosk-bench-flash-", dir=args.dir))
    try:
        image = work / "sample.img"
        size = int(args.size_gib * 1024) * MiB
        inputs = [image, Path(f"{image}.bmap"), Path(f"{image}.xz"), Path(f"{image}.zst")]
        reused = all(p.exists() for p in inputs) and image.stat().st_size == size
        if reused:   # --keep: the image, its map and the compressed files of an earlier run
            data, bmap_seconds = sum(e - s for s, e in read_bmap(inputs[1]).byte_ranges()) // MiB * MiB, 0.0
            packed = {fmt: (inputs[n], 0.0) for n, fmt in ((2, "xz"), (3, "zst"))}
        else:
            data = make_card_shaped_file(image, size, args.data)
            start = time.monotonic()
            write_bmap(image, Path(str(image) + ".bmap"))
            bmap_seconds = time.monotonic() - start
            keep, packed = work / "keep", {}
            keep.mkdir(exist_ok=True)
            for fmt in ("xz", "zst"):   # (compress_image drops the other format: each is kept aside meanwhile)
                packed[fmt] = compress_niced(image, fmt)
                os.replace(packed[fmt][0], keep / packed[fmt][0].name)
            for path, _ in packed.values():   # both beside sample.img and sample.img.bmap again
                os.replace(keep / path.name, path)
        bmap = read_bmap(Path(str(image) + ".bmap"))
        load_before = Path("/proc/loadavg").read_text().strip()

        kiosk = kiosk_command()
        typed = lambda devs: "".join(f"{dev}\n" for dev in devs)  # loop devices are fixed disks: names are typed
        flash = lambda img, *extra: lambda devs: [kiosk + ["flash", str(img), *devs, "--allow-fixed-disk", *extra]]
        one_by_one = lambda img: lambda devs: [kiosk + ["flash", str(img), dev, "--allow-fixed-disk"] for dev in devs]
        zst, xz = packed["zst"][0], packed["xz"][0]
        piped = lambda cat, img: lambda devs: [f"{cat} {img} | dd of={devs[0]} bs=4M conv=fsync status=none"]
        methods = [
            ("kiosk flash (verify)", flash(image), typed, 1),
            ("kiosk flash --no-verify", flash(image, "--no-verify"), typed, 1),
            ("kiosk flash buffered (verify)",
             lambda devs: [buffered_command() + ["flash", str(image), devs[0], "--allow-fixed-disk"]], typed, 1),
            ("bmaptool copy", lambda devs: [["bmaptool", "-q", "copy", str(image), devs[0]]], None, 1),
            ("dd bs=4M conv=fsync", lambda devs: [["dd", f"if={image}", f"of={devs[0]}", "bs=4M", "conv=fsync"]],
             None, 1),
            ("kiosk flash .img.zst (verify)", flash(zst), typed, 1),
            ("kiosk flash .img.xz (verify)", flash(xz), typed, 1),
            ("bmaptool copy .img.zst", lambda devs: [["bmaptool", "-q", "copy", str(zst), devs[0]]], None, 1),
            ("bmaptool copy .img.xz", lambda devs: [["bmaptool", "-q", "copy", str(xz), devs[0]]], None, 1),
            ("zstdcat .img.zst | dd", piped("zstdcat", zst), None, 1),
            ("xzcat .img.xz | dd", piped("xzcat", xz), None, 1),
            ("2 cards at once, .img", flash(image), typed, 2),
            ("2 cards one by one, .img", one_by_one(image), lambda devs: [typed([dev]) for dev in devs], 2),
            ("2 cards at once, .img.zst", flash(zst), typed, 2),
            ("2 cards one by one, .img.zst", one_by_one(zst), lambda devs: [typed([dev]) for dev in devs], 2),
            ("2 cards at once, .img.xz", flash(xz), typed, 2),
            ("2 cards one by one, .img.xz", one_by_one(xz), lambda devs: [typed([dev]) for dev in devs], 2),
        ]
        if not shutil.which("bmaptool"):
            methods = [m for m in methods if not m[0].startswith("bmaptool")]
        results = {}
        for _ in range(args.repeat):
            for name, commands_for, stdin_for, cards in methods:
                r = timed(name, image, work, commands_for, stdin_for, cards)
                if name not in results or r["seconds"] < results[name]["seconds"]:
                    results[name] = r
        sizes = {fmt: (path.stat().st_size, seconds) for fmt, (path, seconds) in packed.items()}
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    dd = results["dd bs=4M conv=fsync"]
    print(f"cores: {os.cpu_count()}   kernel: {os.uname().release}   image dir: {args.dir}")
    print(f"load before: {load_before}   after: {Path('/proc/loadavg').read_text().strip()}")
    print(f"image: {size / MiB:.0f} MiB, {data / MiB:.0f} MiB of {args.data} data ({100 * data / size:.0f}%), "
          f"block map: {bmap.mapped_blocks * bmap.block_size / MiB:.1f} MiB mapped in {len(bmap.ranges)} ranges, "
          f"written in {bmap_seconds:.2f} s")
    for fmt, (nbytes, seconds) in sizes.items():
        print(f"  .img.{fmt}: {nbytes / MiB:.1f} MiB ({100 * nbytes / data:.0f}% of the data), "
              + (f"compressed in {seconds:.1f} s at nice 19" if seconds else f"reused from {work}"))
    print(f"page caches dropped before every run; best of {args.repeat}; bytes are the loop devices' counters")
    print(f"{'method':32} {'cards':>5} {'written MiB':>11} {'read MiB':>9} {'seconds':>8} {'cpu s':>6} "
          f"{'vs dd':>7}  identical")
    for r in results.values():
        print(f"{r['name']:32} {r['cards']:5} {r['written'] / MiB:11.1f} {r['read'] / MiB:9.1f} {r['seconds']:8.2f} "
              f"{r['cpu']:6.2f} {dd['seconds'] / r['seconds']:6.2f}x  {'yes' if r['identical'] else 'NO'}")
    for kind in (".img", ".img.zst", ".img.xz"):
        both, each = results[f"2 cards at once, {kind}"], results[f"2 cards one by one, {kind}"]
        print(f"2 cards of the {kind}: at once {both['seconds']:.2f} s, one by one {each['seconds']:.2f} s "
              f"({each['seconds'] / both['seconds']:.2f}x)")
    print("vs dd: dd's seconds / the method's seconds (higher is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
