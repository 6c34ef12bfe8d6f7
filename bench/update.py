#!/usr/bin/env python3
"""Seconds of a whole-system update, `kiosk update` start to "kept", on an A/B VM (the qemu target, or a
Raspberry Pi's raspi machine with --board), split by stage, and the bytes it ships against the root file
system it replaces.

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

With --push: the same one-package change as a `git push` of the device's configuration (issue 17), built
by a builder on this host (an OpenSSH server whose forced command is `kiosk builder-serve`, which the VM
reaches at 10.0.2.2), shipped to the device as the casync index bundle and the chunks its running slot
lacks, installed, tried, kept; seconds from `git push` to the push's end (build on the builder, transfer,
signature check, rauc install) and from there to the new slot's verdict (restart, health). --board
raspberryPi0 does the same on the raspi0 VM with an armel builder.

--board: the VM, the qemu target (GRUB) by default; a Raspberry Pi board is its raspi machine with U-Boot
slots, about half an hour per update here (casync hashes the running slot on the emulated CPU), where a
reboot that halts (QEMU's raspi machines never reset) is power-cycled 10 s after it, as in the tests.
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

from boottools import BootedVM, HungRebootReset, boot_spec, build_boot_image, make_key  # noqa: E402

STAGES = {"build": ("plan", "rootfs", "base fs", "configure", "image", "manifest"), "bundle": ("bundle",),
          "chunks": ("chunks",), "ship": ("ship",), "install": ("install",), "boot": ("boot",), "health": ("health",)}
BOARDS = ("qemu", "raspberryPi0", "raspberryPi1", "raspberryPi2", "raspberryPi3", "raspberryPi4")
PUSH_BOARDS = ("qemu", "raspberryPi0")


def stage_seconds(stderr: str) -> dict[str, float]:
    """`==> NAME` ... `NAME done in S s` pairs of kiosk's log."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^    (.+) done in ([0-9.]+)s$", stderr, re.M)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=os.environ.get("KIOSK_TEST_CACHE_DIR"),
                        help="kiosk cache (bases, signing key) to reuse (default: KIOSK_TEST_CACHE_DIR or a new one)")
    parser.add_argument("--whole-bundle", action="store_true",
                        help="kiosk update --whole-bundle: ship the whole system (the figure before chunks)")
    parser.add_argument("--push", action="store_true",
                        help="the change as a git push, built by a builder on this host (issue 17)")
    parser.add_argument("--board", choices=BOARDS, default="qemu",
                        help="the VM (a raspberryPi board: its raspi machine, about half an hour per update here; "
                             "with --push: qemu or raspberryPi0)")
    args = parser.parse_args()
    if args.push and args.board not in PUSH_BOARDS:
        parser.error(f"--push measures {' or '.join(PUSH_BOARDS)} (a builder on this host for its architecture)")
    if os.geteuid() != 0:
        raise SystemExit("bench/update.py builds images: run it as root")
    work = Path(tempfile.mkdtemp(prefix="kiosk-bench-update-", dir="/var/tmp"))
    cache = Path(args.cache) if args.cache else work / "cache"
    key, public = make_key(work / "key")
    spec = boot_spec(args.board, public, host="bench-update")
    if args.push:
        return push(work, cache, key, public, spec, args.board)
    image, _ = build_boot_image(spec, work / "image", cache, log=lambda m: None)
    vm = BootedVM(image, key, work / "vm", board=args.board)
    raspi = args.board != "qemu"
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
        # A raspi VM: a Pi's boot and verdict take minutes emulated (the tests' KIOSK_UPDATE_BOOT_SECONDS). A reboot
        # that hangs (q35 + OVMF now and then) or halts (raspi machines, where a Pi resets) is reset, as in the tests.
        with HungRebootReset(vm) as watch:
            result = subprocess.run(argv, cwd=HERE.parent, capture_output=True, text=True,
                                    timeout=5400 if raspi else 3600,
                                    env={**os.environ, "KIOSK_CACHE_DIR": str(cache), "KIOSK_SSH_CONNECT_TIMEOUT": "60",
                                         "KIOSK_UPDATE_BOOT_SECONDS": "2400" if raspi else "900"})
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
        print(f"kiosk update on the {args.board} VM ({os.cpu_count()} cores, load {' '.join(load)}): "
              f"{total:.0f} s to \"{result.stdout.strip().splitlines()[-1]}\"")
        for name, parts in STAGES.items():
            print(f"  {name:8} {sum(seconds.get(p, 0.0) for p in parts):6.1f} s")
        if watch.pressed:
            print(f"  (boot: {watch.pressed} reset(s) pressed where the reboot halted or hung)")
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


def push(work: Path, cache: Path, key: Path, public: str, spec: dict, board: str) -> int:
    """git push of the one-package change through a builder on this host, to the device's verdict."""
    from sshd_harness import Device as SshServer, free_port, keygen, remote_lines

    host_pub = keygen(work / "builder_host", "builder@bench")
    port = free_port()
    spec["builders"] = [{"hostName": "10.0.2.2", "port": port, "systems": ["armel" if board == "raspberryPi0" else "amd64"],
                         "publicHostKey": " ".join(host_pub.split()[:2])}]
    image, _ = build_boot_image(spec, work / "image", cache, log=lambda m: None)
    (work / "builder").mkdir()
    builder = SshServer(work / "builder", spec, public, work / "builder_host", port=port,
                        env={"KIOSK_CACHE_DIR": str(cache)})
    vm = BootedVM(image, key, work / "vm", board=board)
    vm.start()
    try:
        vm.wait_for_ssh(timeout=900)
        vm.wait_for("kiosk slot status --json | grep -q '\"state\": \"good\"' && echo ok", timeout=600)
        device_key = vm.ssh("kiosk builders key").stdout
        subprocess.run([sys.executable, "-m", "kiosk", "builders", "authorize", "--key", "-", "--authorized-keys",
                        str(work / "builder" / "authorized_keys")], input=device_key, text=True, check=True,
                       cwd=HERE.parent, capture_output=True)
        client = vm.git_client(work / "client")
        for attempt in (1, 2, 3):   # the emulated ARM1176 under load drops a connection now and then
            try:
                clone = client.clone(vm.repo_url, "configuration")
                break
            except AssertionError as exc:
                if attempt == 3:
                    raise
                print(f"  git clone failed ({str(exc).splitlines()[1:2]}); again in 30 s", flush=True)
                subprocess.run(["rm", "-rf", str(work / "client" / "configuration")], check=False)
                time.sleep(30)
        data = json.loads((clone / "nixiosk.json").read_text())
        data["packages"] = [*data.get("packages", []), "hello"]
        client.commit_spec(clone, data, message="hello")
        old_boot = vm.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()
        started = time.monotonic()
        result = client.push(clone)
        pushed = time.monotonic() - started
        lines = remote_lines(result.stderr)
        if result.returncode != 0:
            raise SystemExit("git push failed:\n" + ("\n".join(lines[-40:]) or result.stderr[-2000:]))
        # a raspi VM halts where a Pi resets (QEMU 7.2): power-cycled 10 s after its "reboot: Restarting system"
        with HungRebootReset(vm) as watch:
            vm.wait_for("test \"$(cat /proc/sys/kernel/random/boot_id)\" != " + old_boot + " && echo new",
                        timeout=2400)
        back = time.monotonic() - started
        vm.wait_for("test ! -e /var/lib/kiosk/trial.json && kiosk slot status --json | grep -q '\"booted\": \"B\"'"
                    " && echo kept", timeout=900)
        kept = time.monotonic() - started
        text = "\n".join(lines)
        build = sum(float(x) for x in re.findall(r": +\S.* done in ([0-9.]+)s$", text, re.M))
        got = re.search(r"builder \S+: bundle ([0-9.]+ \S+), signature checked.*, in ([0-9.]+) s$", text, re.M)
        shipped = re.search(r"shipped (.+) in all: .*", text)
        load = Path("/proc/loadavg").read_text().split()[:3]
        print(f"git push of a package change on the {board} VM through a builder on this host "
              f"({os.cpu_count()} cores, load {' '.join(load)}): {kept:.0f} s to kept")
        print(f"  push     {pushed:6.1f} s  (git push until it returned: build on the builder {build:.1f} s of "
              f"stages, the bundle received and checked {float(got.group(2)) if got else 0:.1f} s in all, rauc install)")
        print(f"  restart  {back - pushed:6.1f} s  (until the new boot answered"
              f"{f'; {watch.pressed} reset(s) pressed where the VM hung' if watch.pressed else ''})")
        print(f"  health   {kept - back:6.1f} s  (until kiosk slot commit kept slot B)")
        print(f"  shipped  {shipped.group(0) if shipped else (got.group(1) if got else '?') + ' (the whole bundle)'}"
              " (one package added)")
    finally:
        vm.stop()
        builder.close()
        subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
