#!/usr/bin/env python3
"""Seconds of a whole-system update, `kiosk update` start to "kept", on the A/B qemu target, split by
stage, and the bytes it ships against the root file system it replaces.

    sudo .venv/bin/python bench/update.py              # KIOSK_TEST_CACHE_DIR (or --cache) keeps the bases

Builds the boot-test image (program foot, as tests/test_update_boot.py does), boots it with `kiosk run`,
waits for slot A's commit, then runs the real `kiosk update 127.0.0.1 SPEC` with one package added
(`hello`: a new top layer on the cached base) and reads its stages from its own `==> stage` lines:

  build    plan + rootfs + base fs + configure + image + manifest (the pipeline, caches warm but the
           top layer new)
  bundle   the root partition into a signed, zstd-squashfs RAUC bundle
  chunks   `rauc convert` of it: the casync index bundle and chunk store (kiosk.update.chunks)
  ship     over ssh into the device's data partition (bytes and MiB/s): the index bundle (or, with
           --whole-bundle, the whole bundle)
  install  rauc install into the inactive slot (with chunks: the ones slot A lacks, fetched through ssh -R)
  boot     systemctl reboot until a new boot id answers
  health   until the device's verdict (kiosk-slot-commit: the push's health check, rauc mark-good)

Only the qemu target has root slots today (the Raspberry Pis' U-Boot slots are not built yet).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from boottools import BootedVM, boot_spec, build_boot_image, make_key  # noqa: E402

STAGES = {"build": ("plan", "rootfs", "base fs", "configure", "image", "manifest"), "bundle": ("bundle",),
          "chunks": ("chunks",), "ship": ("ship",), "install": ("install",), "boot": ("boot",), "health": ("health",)}


def stage_seconds(stderr: str) -> dict[str, float]:
    """`==> NAME` ... `NAME done in S s` pairs of kiosk's log."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^    (.+) done in ([0-9.]+)s$", stderr, re.M)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=os.environ.get("KIOSK_TEST_CACHE_DIR"),
                        help="kiosk cache (bases, signing key) to reuse (default: KIOSK_TEST_CACHE_DIR or a new one)")
    parser.add_argument("--whole-bundle", action="store_true",
                        help="kiosk update --whole-bundle: ship the whole system (the figure before chunks)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/update.py builds images: run it as root")
    work = Path(tempfile.mkdtemp(prefix="kiosk-bench-update-", dir="/var/tmp"))
    cache = Path(args.cache) if args.cache else work / "cache"
    key, public = make_key(work / "key")
    spec = boot_spec("qemu", public, host="bench-update")
    image, _ = build_boot_image(spec, work / "image", cache, log=lambda m: None)
    vm = BootedVM(image, key, work / "vm", board="qemu")
    vm.start()
    try:
        vm.wait_for_ssh(timeout=900)
        vm.wait_for("kiosk slot status --json | grep -q '\"state\": \"good\"' && echo ok", timeout=600)
        new = dict(spec, packages=[*spec.get("packages", []), "hello"])
        (work / "nixiosk.json").write_text(json.dumps(new, indent=2))
        argv = [sys.executable, "-m", "kiosk", "update", "127.0.0.1", str(work / "nixiosk.json"),
                "-p", str(vm.port), "-i", str(key), "--ssh-option", f"UserKnownHostsFile={vm.known_hosts()}",
                *(["--whole-bundle"] if args.whole_bundle else [])]
        started = time.monotonic()
        result = subprocess.run(argv, cwd=HERE.parent, capture_output=True, text=True, timeout=3600,
                                env={**os.environ, "KIOSK_CACHE_DIR": str(cache), "KIOSK_SSH_CONNECT_TIMEOUT": "60"})
        total = time.monotonic() - started
        if result.returncode != 0:
            raise SystemExit(f"kiosk update failed:\n{result.stderr[-3000:]}{result.stdout}")
        seconds = stage_seconds(result.stderr)
        shipped = (re.search(r"shipped ([0-9.]+ \S+) in all", result.stderr)
                   or re.search(r"shipped ([0-9.]+ \S+) in", result.stderr))
        whole = re.search(r"bundle: update.raucb, (\d+) MiB", result.stderr)
        chunk_line = re.search(r"^    (shipped .* in all, .*)$", result.stderr, re.M)
        root = re.search(r"bundle: root filesystem (\d+) MiB", result.stderr)
        rate = re.findall(r"shipping: .* ([0-9.]+ \S+)/s$", result.stderr, re.M)
        load = Path("/proc/loadavg").read_text().split()[:3]
        print(f"kiosk update on the qemu target ({os.cpu_count()} cores, load {' '.join(load)}): "
              f"{total:.0f} s to \"{result.stdout.strip().splitlines()[-1]}\"")
        for name, parts in STAGES.items():
            print(f"  {name:8} {sum(seconds.get(p, 0.0) for p in parts):6.1f} s")
        print(f"  shipped  {shipped.group(1) if shipped else '?'} (last rate {rate[-1] if rate else '?'}/s) "
              f"for a {root.group(1) if root else '?'} MiB root partition (one package added)")
        print(f"  bytes shipped: {shipped.group(1) if shipped else '?'}, the whole bundle "
              f"{whole.group(1) if whole else '?'} MiB ({'--whole-bundle' if args.whole_bundle else 'chunks'})")
        if chunk_line:
            print(f"  {chunk_line.group(1)}")
    finally:
        vm.stop()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
