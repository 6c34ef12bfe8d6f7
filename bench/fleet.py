#!/usr/bin/env python3
"""How long does `kiosk fleet push` take for a configuration-only change to 20 and to 100 devices?

The devices are the push tests' harness (tests/sshd_harness.py, via tests/test_fleet.py's Fleet): a device
root with generation 1 and the real hooks, a real sshd on a loopback port each, the recording activator
(no systemd, no health-check wait: on real devices add KIOSK_HEALTH_SECONDS, 4 s, per wave). For each
fleet size it measures, with --parallel 10 (waves of 10 after one canary):

  push       `kiosk fleet push` wall time, every device changed (the program's URL)
  rerun      the same command again: every device looked at and found unchanged (the resume cost)
  status     `kiosk fleet status` (kiosk status's question over ssh on every device, 10 at a time)

--build N also times `kiosk fleet build` of N qemu images (base root filesystem from KIOSK_TEST_CACHE_DIR
or KIOSK_CACHE_DIR; the first image may build it, the rest are configuration-only builds). Root only.

    sudo .venv/bin/python bench/fleet.py [--sizes 20 100] [--parallel 10] [--build 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def kiosk(*args: str, cwd: Path, env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    exe = shutil.which("kiosk", path=str(Path(sys.executable).parent))
    started = time.monotonic()
    proc = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    return time.monotonic() - started, proc


def bench_push(work: Path, size: int, parallel: int, mirror: str, keys: dict) -> dict:
    from test_fleet import Fleet

    started = time.monotonic()
    fleet = Fleet(work, mirror, keys, size)
    made = time.monotonic() - started
    try:
        args = ("fleet", "push", str(fleet.inventory), str(fleet.base), "--parallel", str(parallel),
                "--batch", str(parallel), "--json")
        push, proc = kiosk(*args, cwd=work)
        rows = json.loads(proc.stdout)["devices"]
        assert proc.returncode == 0 and {r["result"] for r in rows} == {"deployed"}, proc.stderr[-2000:]
        per_device = sorted(r["seconds"] for r in rows)
        rerun, proc = kiosk(*args, cwd=work)
        assert proc.returncode == 0 and {r["result"] for r in json.loads(proc.stdout)["devices"]} == {"unchanged"}
        status, proc = kiosk("fleet", "status", str(fleet.inventory), "--parallel", str(parallel), cwd=work)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return {"devices": size, "setup": made, "push": push, "rerun": rerun, "status": status,
                "one push median": per_device[len(per_device) // 2], "one push max": per_device[-1]}
    finally:
        fleet.close()


def bench_build(work: Path, count: int, cache: str | None) -> dict:
    from imagetools import full_spec

    base = full_spec("qemu")
    del base["hostName"]
    (work / "nixiosk.json").write_text(json.dumps(base, indent=2))
    hosts = "\n".join(f"    fleet{i:02d}: {{program: {{args: ['--title=fleet{i:02d}']}}}}" for i in range(1, count + 1))
    (work / "fleet.yml").write_text(f"all:\n  hosts:\n{hosts}\n")
    seconds, proc = kiosk("fleet", "build", "fleet.yml", "nixiosk.json", "-o", "images", "--json", cwd=work,
                          env={"KIOSK_CACHE_DIR": cache} if cache else None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = json.loads(proc.stdout)["images"]
    return {"images": count, "total": seconds, "each": [round(i["seconds"], 1) for i in images],
            "stages of the last": images[-1]["stageSeconds"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[20, 100], help="fleet sizes (none: only --build)")
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--build", type=int, default=0, metavar="N", help="also time a fleet build of N images")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/fleet.py: needs root (sshd on loopback as the harness runs it)", file=sys.stderr)
        return 2
    from fake_mirror import Server, write_mirror
    from sshd_harness import key_set

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load {open('/proc/loadavg').read().split()[:3]}")
    with tempfile.TemporaryDirectory(prefix="kiosk-bench-fleet-") as tmp:
        tmp = Path(tmp)
        build_cache = os.environ.get("KIOSK_TEST_CACHE_DIR") or os.environ.get("KIOSK_CACHE_DIR")
        os.environ["KIOSK_CACHE_DIR"] = str(tmp / "cache")   # the harness and validation: not the user's cache
        (tmp / "mirror").mkdir()
        write_mirror(tmp / "mirror")
        server = Server(tmp / "mirror")
        (tmp / "keys").mkdir()
        keys = key_set(tmp / "keys", ("host", "client", "other_host"), "bench")
        try:
            for size in args.sizes:
                (tmp / f"fleet{size}").mkdir()
                r = bench_push(tmp / f"fleet{size}", size, args.parallel, server.url, keys)
                print(f"{size} devices, --parallel {args.parallel}: push {r['push']:.1f} s, rerun (all unchanged) "
                      f"{r['rerun']:.1f} s, status {r['status']:.1f} s; one device's push median "
                      f"{r['one push median']:.2f} s, max {r['one push max']:.2f} s (setup {r['setup']:.0f} s); "
                      f"load {open('/proc/loadavg').read().split()[:3]}", flush=True)
        finally:
            server.close()
        if args.build:
            (tmp / "build").mkdir()
            r = bench_build(tmp / "build", args.build, build_cache)
            print(f"fleet build of {r['images']} qemu images: {r['total']:.0f} s; each {r['each']} s; the last's "
                  f"stages {r['stages of the last']}; load {open('/proc/loadavg').read().split()[:3]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
