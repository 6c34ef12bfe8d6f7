#!/usr/bin/env python3
"""How long from `git push` to the new generation active, for a configuration-only change?

Runs the test harness's device (tests/sshd_harness.py): a device root in a temporary
directory with generation 1 installed as the image build does it, a real sshd on a
loopback port running configuration.git's hooks, the real git and ssh clients. Each
round changes the program's URL (a config-only change: no packages), commits and
pushes, and measures:

  active   git push start -> the new generation's meta.json says "active" (polled every 5 ms)
  push     git push start -> git push returned (the ref update and post-receive included)

and, for scale, what every push pays before the hook does anything:

  ls-remote   an ssh connection + git's ref advertisement (git ls-remote)
  kiosk       starting the `kiosk` command (python + imports: kiosk --version)

The activator is the recording one (no systemd here): on a device add the health
check's settle time (KIOSK_HEALTH_SECONDS, default 4 s) and systemctl's own work;
--settle S makes the recording activator wait S seconds to show that share.

--vm does the same against a booted image instead: the qemu target's boot-test image
(tests/boottools.py; KIOSK_TEST_CACHE_DIR keeps its base root filesystem), booted with
`kiosk run` under QEMU, the device's own hooks, real systemd (health check included):

  active   git push start -> the device printed "generation N is active" (streamed remote: line)
  push     git push start -> git push returned

    sudo .venv/bin/python bench/push.py [--rounds 5] [--settle 0]
    sudo .venv/bin/python bench/push.py --vm [--rounds 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def timed(fn) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--settle", type=float, default=0.0, help="health-check settle seconds (default 0)")
    parser.add_argument("--vm", action="store_true", help="push to the qemu target booted in QEMU instead")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (sshd, root logins; --vm: building the image)", file=sys.stderr)
        return 2
    if args.vm:
        return vm_main(args)

    from fake_mirror import Server, write_mirror
    from sshd_harness import Client, Device, keygen

    from kiosk.device import store

    tmp = Path(tempfile.mkdtemp(prefix="kiosk-bench-push-"))
    os.environ["KIOSK_CACHE_DIR"] = str(tmp / "cache")
    (tmp / "mirror").mkdir()
    write_mirror(tmp / "mirror")
    mirror = Server(tmp / "mirror")
    host_pub = keygen(tmp / "host", "host")
    client_pub = keygen(tmp / "client", "client")
    spec = {
        "hostName": "lobby", "hardware": "raspberryPi3", "authorizedKeys": [client_pub],
        "program": {"package": "cog", "executable": "/usr/bin/cog", "args": ["https://example.org/0"]},
        "networks": {"cafe": "correct horse battery"},
        "locale": {"lang": "en_US.UTF-8", "regDom": "US", "timeZone": "America/New_York"},
        "debian": {"suite": "bookworm", "mirror": mirror.url},
    }
    (tmp / "dev").mkdir()
    device = Device(tmp / "dev", spec, client_pub, tmp / "host", env={"KIOSK_HEALTH_SECONDS": str(args.settle)})
    client = Client(tmp, tmp / "client", host_pub, device.port)
    try:
        clone = client.clone(device.url, "clone")
        versions = {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "git": subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.strip(),
            "ssh": subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip(),
        }
        print(f"cores: {versions['cores']}; {versions['git']}; {versions['ssh']}; python {versions['python']}")
        print(f"health-check settle: {args.settle:g} s (recording activator)")

        ls_remote = [timed(lambda: client.git("ls-remote", device.url)) for _ in range(args.rounds)]
        kiosk = str(Path(sys.executable).parent / "kiosk")
        startup = [timed(lambda: subprocess.run([kiosk, "--version"], capture_output=True, check=True))
                   for _ in range(args.rounds)]

        pushes, actives = [], []
        for i in range(1, args.rounds + 2):  # the first round warms the package-index cache; not counted
            new = copy.deepcopy(spec)
            new["program"]["args"] = [f"https://example.org/{i}"]
            client.commit_spec(clone, new, message=f"round {i}")
            number = i + 1
            meta = device.root / f"var/lib/kiosk/generations/{number}/meta.json"
            seen: list[float] = []

            def watch():
                while not seen:
                    try:
                        if json.loads(meta.read_text())["status"] == "active":
                            seen.append(time.monotonic())
                            return
                    except (OSError, ValueError):
                        pass
                    time.sleep(0.005)

            watcher = threading.Thread(target=watch, daemon=True)
            start = time.monotonic()
            watcher.start()
            r = client.push(clone)
            end = time.monotonic()
            watcher.join(timeout=5)
            if r.returncode != 0 or store.pointer(device.root) != number or not seen:
                print(r.stderr, file=sys.stderr)
                raise SystemExit(f"round {i}: push failed")
            if i > 1:
                pushes.append(end - start)
                actives.append(seen[0] - start)
            print(f"  round {i}: active after {seen[0] - start:.3f} s, push returned after {end - start:.3f} s"
                  + ("  (warm-up, not counted)" if i == 1 else ""))

        def row(name, values):
            print(f"{name:11} median {statistics.median(values):.3f} s  (min {min(values):.3f}, "
                  f"max {max(values):.3f}, n={len(values)})")

        print()
        row("active", actives)
        row("push", pushes)
        row("ls-remote", ls_remote)
        row("kiosk", startup)
    finally:
        device.close()
        mirror.close()
    return 0


def vm_main(args) -> int:
    """Config-only pushes to the qemu target booted in QEMU (TCG here), real systemd on the device."""
    from boottools import BootedVM, boot_spec, build_boot_image, make_key

    tmp = Path(tempfile.mkdtemp(prefix="kiosk-bench-push-vm-"))
    cache = Path(os.environ.get("KIOSK_TEST_CACHE_DIR") or tmp / "cache")
    key, public = make_key(tmp / "key")
    spec = boot_spec("qemu", public, host="bench-push")
    started = time.monotonic()
    image, _ = build_boot_image(spec, tmp / "image", cache, log=lambda m: None)
    print(f"cores: {os.cpu_count()}; image built in {time.monotonic() - started:.0f} s; booting {image.name}")
    vm = BootedVM(image, key, tmp / "vm", board="qemu")
    vm.start()
    try:
        print(f"ssh after {vm.wait_for_ssh(timeout=1200):.0f} s")
        vm.wait_for_program(spec["program"]["executable"], timeout=900)
        client = vm.git_client(tmp)
        clone = client.clone(vm.repo_url, "clone")
        current = json.loads(clone.joinpath("nixiosk.json").read_text())
        from kiosk.device.activation import DEFAULT_SETTLE_SECONDS
        print(f"health check: the device's default ({DEFAULT_SETTLE_SECONDS:g} s settle), real systemd")
        pushes, actives = [], []
        for i in range(1, args.rounds + 1):
            new = copy.deepcopy(current)
            new["program"]["args"] = ["--title=round " + str(i), "--", "/bin/sh", "-c", "exec sleep infinity"]
            client.commit_spec(clone, new, message=f"round {i}")
            number = i + 1
            start = time.monotonic()
            proc = subprocess.Popen(["git", "push", "-q", "origin", "main"], cwd=clone, env=client.env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            active = None
            lines = []
            for line in proc.stderr:
                lines.append(line)
                if active is None and f"==> generation {number} is active" in line:
                    active = time.monotonic() - start
            proc.wait()
            end = time.monotonic() - start
            if proc.returncode != 0 or active is None:
                print("".join(lines), file=sys.stderr)
                raise SystemExit(f"round {i}: push failed")
            pushes.append(end)
            actives.append(active)
            print(f"  round {i}: generation {number} active after {active:.2f} s, push returned after {end:.2f} s")

        def row(name, values):
            print(f"{name:7} median {statistics.median(values):.2f} s  (min {min(values):.2f}, "
                  f"max {max(values):.2f}, n={len(values)})")

        print()
        row("active", actives)
        row("push", pushes)
    finally:
        vm.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
