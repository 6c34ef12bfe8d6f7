#!/usr/bin/env python3
"""Build-speed benchmark: the four figures of the image build, on this machine.

  1. cold build of the sample (raspberryPi3, cog showing a web page), empty cache
  2. rebuild after a configuration-only change (other URL, same packages)
  3. rebuild after adding one package (less)
  4. cold build for raspberryPi0 (armel, cog), empty cache

The cache is a dedicated directory (--cache-dir, default /var/tmp/kiosk-bench-cache)
that the cold runs wipe; --quick skips the cold runs and measures 2 and 3 on
whatever is cached (building the sample first if nothing is). --board builds the
sample for another board (qemu: amd64, no qemu-user). Prints one line per figure,
the per-stage seconds, and a JSON summary as the last line.

--before REF (with --quick): figure 2 side by side with the kiosk of git commit REF
(e.g. main), in the same run on the same cache: REF's tree is exported to a temporary
directory and built in a child process, alternating with this tree, --repeat times,
each build a new configuration (another URL).

Run as root for mmdebstrap --mode=root (a user's build uses unshare mode), e.g.:
    sudo .venv/bin/python bench/build.py            # ~15 minutes on 2 cores
    sudo .venv/bin/python bench/build.py --quick
    sudo .venv/bin/python bench/build.py --quick --board qemu --before main --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
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


# The child that builds with another tree's kiosk: argv = tree, spec JSON, output directory.
CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from kiosk.core.log import Log
from kiosk.image.pipeline import build
from kiosk.spec.load import loads
text = sys.argv[2]
started = time.monotonic()
manifest = build(loads(text, "bench.json"), text, __import__("pathlib").Path(sys.argv[3]), log=Log(out=open("/dev/null", "w")))
print(json.dumps({"seconds": time.monotonic() - started, "stages": manifest["stageSeconds"],
                  "sha256": manifest["imageSha256"]}))
"""


def export_tree(ref: str, dest: Path) -> Path:
    """The kiosk package and its data files as they are in git commit `ref`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "kiosk", "schemas", "hardware", "hooks"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def build_with(tree: Path, name: str, s: dict, out: Path) -> dict:
    """One build with the kiosk in `tree`, in a child process (its own imports), timed by its stages."""
    text = json.dumps(s, indent=2) + "\n"
    env = dict(os.environ, KIOSK_DATA_DIR=str(tree))
    before = os.times()
    done = subprocess.run([sys.executable, "-c", CHILD, str(tree), text, str(out)], check=True, capture_output=True,
                          text=True, env=env)
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    result = json.loads(done.stdout.splitlines()[-1])
    print(f"{name}: {result['seconds']:.1f} s, CPU {cpu:.1f} s  ("
          + ", ".join(f"{k} {v:.1f}" for k, v in result["stages"].items()) + ")", flush=True)
    return {"name": name, "board": s["hardware"], "seconds": round(result["seconds"], 2), "cpuSeconds": round(cpu, 2),
            "stages": result["stages"], "sha256": result["sha256"], "loadavg": os.getloadavg()[0]}


def compare(ref: str, board: str, out: Path, repeat: int) -> list[dict]:
    """The config-only rebuild with REF's kiosk and with this tree's, alternating, each a new configuration."""
    results = []
    with tempfile.TemporaryDirectory(prefix="kiosk-bench-before-") as tmp:
        before = export_tree(ref, Path(tmp))
        for i in range(repeat):
            for tree, label in ((before, f"before ({ref})"), (ROOT, "after (this tree)")):
                url = f"https://example.org/{label.split()[0]}/{i}"
                results.append(build_with(tree, f"config-only rebuild, {label}", spec(board, url=url),
                                          out / f"compare-{label.split()[0]}"))
    for label in (f"before ({ref})", "after (this tree)"):
        times = [r["seconds"] for r in results if label in r["name"]]
        cpu = [r["cpuSeconds"] for r in results if label in r["name"]]
        print(f"config-only rebuild, {label}: median {statistics.median(times):.1f} s of {times}, "
              f"CPU median {statistics.median(cpu):.1f} s", flush=True)
    return results


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
    parser.add_argument("--board", default="raspberryPi3", help="the board of figures 1-3 (default raspberryPi3)")
    parser.add_argument("--before", metavar="REF", help="with --quick: figure 2 also with the kiosk of git commit REF")
    parser.add_argument("--repeat", type=int, default=3, help="builds of each side with --before (default 3)")
    args = parser.parse_args()

    cache = Path(args.cache_dir)
    out = Path(args.out)
    os.environ["KIOSK_CACHE_DIR"] = str(cache)
    print(f"kiosk build benchmark: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, cache {cache}", flush=True)
    results = []
    if not args.quick:
        wipe(cache)
        results.append(build(f"cold build, {args.board} sample (cog)", spec(args.board), out / "pi3", args.verbose))
    else:
        # The sample itself must be cached (its top layer too), or the "config-only" figure would build it.
        print("(warm-up: the sample, so the figures below start from its cache; not a figure)")
        build("warm-up", spec(args.board), out / "pi3", args.verbose)
    if args.before:
        results += compare(args.before, args.board, out, args.repeat)
    results.append(build("rebuild after a configuration-only change",
                         spec(args.board, url="https://example.org/"), out / "pi3-config", args.verbose))
    results.append(build("rebuild after adding one package (less)",
                         spec(args.board, packages=["less"]), out / "pi3-less", args.verbose))
    if not args.quick:
        wipe(cache)
        results.append(build("cold build, raspberryPi0 sample (cog, armel)", spec("raspberryPi0"), out / "pi0",
                             args.verbose))
    print(json.dumps({"cores": os.cpu_count(), "loadavg": os.getloadavg(), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
