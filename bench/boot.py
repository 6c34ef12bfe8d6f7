#!/usr/bin/env python3
"""Seconds from QEMU's start to an active kiosk, and from git push to an active generation, per QEMU machine,
with `kiosk run` under TCG.

    sudo .venv/bin/python bench/boot.py                       # qemu (q35), raspberryPi3 (raspi3b), raspberryPi0 (raspi0)
    sudo .venv/bin/python bench/boot.py --boards raspberryPi4 raspberryPi2 raspberryPi1 --runs 1

For each board: build the boot-test image once (kiosk.image.pipeline, program foot, as
tests/test_boot.py does; KIOSK_TEST_CACHE_DIR or --cache keeps the base root
filesystems between runs), then boot it --runs times, each time on a fresh copy
(a first boot: machine id, host keys, grow-root), and record:

  ssh      QEMU start -> the device's sshd accepted the key (host clock)
  unit     kiosk.service became active (the guest's own clock: seconds after the kernel started)
  program  the program started under cage (guest clock); the raspi machines give Debian's kernel no
           display device: there cage draws on wlroots' headless output (kiosk run's kernel arguments)
  target   graphical.target reached (systemd-analyze)
  seen     QEMU start -> the program seen running over SSH (host clock; 2 s polling)
  push     git push of new program arguments -> the push returned with "generation 2 is active"
           (a config-only push: validate, build generation 2, switch, restart the kiosk, health check)

"QEMU start" is when QEMU's monitor socket appears, after kiosk run copied the
image and read the boot files (that part is reported as "prep").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))

from boottools import BootedVM, boot_spec, build_boot_image, make_key  # noqa: E402


def has_display(board: str) -> bool:
    from kiosk.spec.hardware import load_board
    return bool(load_board(board)["qemu"].get("display"))


def push_once(vm: BootedVM, work: Path, n: int) -> float:
    """Seconds for a config-only git push (new program arguments) until it returned with generation N active."""
    client = vm.git_client(work / "push")
    clone = client.clone(vm.repo_url, "configuration")
    spec = json.loads((clone / "nixiosk.json").read_text())
    spec["program"]["args"] = ["--title=pushed", "--", "/bin/sh", "-c", f"echo pushed {n}; exec sleep infinity"]
    client.commit_spec(clone, spec, message="bench: new arguments")
    started = time.monotonic()
    result = client.push(clone)
    seconds = time.monotonic() - started
    if result.returncode != 0 or "==> generation 2 is active" not in result.stderr:
        raise SystemExit(f"the push failed:\n{result.stderr}")
    return seconds


def boot_once(image: Path, key: Path, work: Path, board: str, program: str, n: int) -> dict:
    vm = BootedVM(image, key, work, board=board)
    vm.start()
    try:
        prep = vm.qemu_started - vm.started
        ssh = vm.wait_for_ssh(timeout=1800)
        pid = vm.wait_for_program(program, timeout=1800)
        seen = time.monotonic() - vm.qemu_started
        program_at = vm.guest_seconds(pid)
        unit = vm.unit_active_since("kiosk.service")
        state = vm.ssh("systemctl is-system-running --wait", check=False, timeout=900).stdout.strip()
        usec = vm.ssh("systemctl show -p FinishTimestampMonotonic --value").stdout.strip()
        target = vm.unit_active_since("graphical.target")
        push = push_once(vm, work, n)
        return {"prep": prep, "ssh": ssh, "unit": unit, "program": program_at, "target": target, "seen": seen,
                "push": push, "finished": int(usec) / 1e6 if usec.isdigit() else None, "state": state}
    finally:
        vm.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boards", nargs="+", default=["qemu", "raspberryPi3", "raspberryPi0"])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--cache", default=os.environ.get("KIOSK_TEST_CACHE_DIR"),
                        help="kiosk cache for the base root filesystems (default: a temporary one)")
    parser.add_argument("--work", help="keep images and logs here (default: a temporary directory)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    from kiosk.spec.hardware import load_board

    work = Path(args.work or tempfile.mkdtemp(prefix="kiosk-bench-boot-"))
    cache = Path(args.cache) if args.cache else work / "cache"
    key, public = make_key(work / "key")
    print(f"cores: {os.cpu_count()}; accelerator: TCG unless KVM is usable ({os.uname().machine} host); "
          f"runs per board: {args.runs}", flush=True)
    results = {}
    for board in args.boards:
        q = load_board(board)["qemu"]
        spec = boot_spec(board, public)
        started = time.monotonic()
        image, _ = build_boot_image(spec, work / f"image-{board}", cache, log=lambda m: None)
        print(f"{board}: image {image.name} ({image.stat().st_size >> 20} MiB) ready in "
              f"{time.monotonic() - started:.0f} s", flush=True)
        runs = []
        for n in range(args.runs):
            figures = boot_once(image, key, work / f"vm-{board}-{n}", board, spec["program"]["executable"], n)
            runs.append(figures)
            print(f"  run {n + 1}: " + ", ".join(f"{k} {v:.1f} s" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in figures.items()), flush=True)
        results[board] = {"machine": q["machine"], "display": has_display(board), "runs": runs}

    print()
    print(f"{'board':<14}{'machine':<10}{'ssh':>8}{'unit':>8}{'program':>9}{'target':>8}{'seen':>8}{'push':>8}"
          "  (median s)")
    for board, r in results.items():
        med = {k: statistics.median(run[k] for run in r["runs"])
               for k in ("ssh", "unit", "program", "target", "seen", "push")}
        note = "" if r["display"] else "  (headless output)"
        print(f"{board:<14}{r['machine']:<10}{med['ssh']:>8.0f}{med['unit']:>8.0f}{med['program']:>9.0f}"
              f"{med['target']:>8.0f}{med['seen']:>8.0f}{med['push']:>8.1f}{note}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cores": os.cpu_count(), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
