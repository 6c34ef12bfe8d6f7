#!/usr/bin/env python3
"""Build-speed benchmark: the four figures of the image build, on this machine.

  1. cold build of the sample (raspberryPi3, cog showing a web page), empty cache
  2. rebuild after a configuration-only change (other URL, same packages)
  3. rebuild after adding one package (less)
  4. cold build for raspberryPi0 (armel, cog), empty cache

The cache is a dedicated directory (--cache-dir, default /var/tmp/kiosk-bench-cache)
that the cold runs wipe; --quick skips the cold runs and measures 2 and 3 on
whatever is cached (building the sample first if nothing is). Prints one line
per figure, the per-stage seconds, and a JSON summary as the last line.

Run as root (mmdebstrap --mode=root), e.g.:
    sudo .venv/bin/python bench/build.py            # ~15 minutes on 2 cores
    sudo .venv/bin/python bench/build.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SAMPLE_URL = "https://en.wikipedia.org/"


def spec(board: str, *, url: str = SAMPLE_URL, packages=()) -> dict:
    return {
        "hostName": "bench",
        "hardware": board,
        "authorizedKeys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOverzkLB6qX/N7KKvsfRbCO0wZ7xZR2stnOLFsuAmLp bench"],
        "program": {"package": "cog", "executable": "/usr/bin/cog", "args": [url]},
        "networks": {},
        "allowKioskLogin": False,
        "locale": {"lang": "en_US.UTF-8", "regDom": "US", "timeZone": "America/New_York"},
        "packages": list(packages),
        "debian": {"suite": "bookworm", "mirror": os.environ.get("KIOSK_BENCH_MIRROR", "http://deb.debian.org/debian")},
        "raspberryPi": {"firmwareConfig": "", "enableExtraFirmware": False, "cecSupport": False},
        "builders": [],
    }


def build(name: str, s: dict, out: Path, verbose: bool) -> dict:
    """One build through kiosk's pipeline (what `kiosk build` runs), timed by its own stages."""
    from kiosk.core.log import Log
    from kiosk.image.pipeline import build as pipeline_build
    from kiosk.spec.load import loads

    started = time.monotonic()

    class Lines:
        def write(self, text):
            for line in text.splitlines():
                msg = line.strip()
                if msg and (verbose or line.startswith("==>") or msg.startswith(("rootfs: built", "image: "))):
                    print(f"    [{time.monotonic() - started:6.1f}] {msg}", flush=True)

        def flush(self):
            pass

    text = json.dumps(s, indent=2) + "\n"
    manifest = pipeline_build(loads(text, f"{name}.json"), text, out, log=Log(out=Lines()))
    total = time.monotonic() - started
    timings = manifest["stageSeconds"]
    result = {"name": name, "board": s["hardware"], "seconds": round(total, 1), "stages": timings,
              "imageMiB": manifest["imageBytes"] >> 20, "sha256": manifest["imageSha256"]}
    print(f"{name}: {total:.1f} s  (" + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()) + ")", flush=True)
    return result


def wipe(cache: Path) -> None:
    if cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=os.environ.get("KIOSK_BENCH_CACHE", "/var/tmp/kiosk-bench-cache"))
    parser.add_argument("--out", default="/var/tmp/kiosk-bench-out")
    parser.add_argument("--quick", action="store_true", help="skip the cold builds (use what is cached)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()

    cache = Path(args.cache_dir)
    out = Path(args.out)
    os.environ["KIOSK_CACHE_DIR"] = str(cache)
    print(f"kiosk build benchmark: {os.cpu_count()} cores, cache {cache}", flush=True)
    results = []
    if not args.quick:
        wipe(cache)
        results.append(build("cold build, raspberryPi3 sample (cog)", spec("raspberryPi3"), out / "pi3", args.verbose))
    else:
        # The sample itself must be cached (its top layer too), or the "config-only" figure would build it.
        print("(warm-up: the sample, so the figures below start from its cache; not a figure)")
        build("warm-up", spec("raspberryPi3"), out / "pi3", args.verbose)
    results.append(build("rebuild after a configuration-only change",
                         spec("raspberryPi3", url="https://example.org/"), out / "pi3-config", args.verbose))
    results.append(build("rebuild after adding one package (less)",
                         spec("raspberryPi3", packages=["less"]), out / "pi3-less", args.verbose))
    if not args.quick:
        wipe(cache)
        results.append(build("cold build, raspberryPi0 sample (cog, armel)", spec("raspberryPi0"), out / "pi0",
                             args.verbose))
    print(json.dumps({"cores": os.cpu_count(), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
