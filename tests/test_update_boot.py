"""Whole-system updates on booted A/B devices (issue 16): real RAUC, GRUB or U-Boot, systemd, OpenSSH.

The qemu target (GRUB under OVMF) in the default suite; raspberryPi3, raspberryPi0, raspberryPi1,
raspberryPi2 and raspberryPi4 (Debian's U-Boot on QEMU's raspi3b, raspi0, raspi1ap, raspi2b and QEMU 10's
raspi4b, whose machines never reset by themselves: the test presses QMP system_reset where a Pi would
restart) in the slow suite, each an hour or more of emulated ARM (installs hash and write a whole slot on
the emulated CPU).

One device, booted once (module fixture), then in file order:
- its first boot commits slot A (kiosk-slot-commit.service: the health check, then rauc mark-good);
- `kiosk update` with a package added: built with kiosk build's pipeline and the same cache, shipped as
  a casync bundle (only the chunks slot A lacks, far fewer bytes than the whole bundle), installed into
  slot B, one reboot, kept; the package is there, the host key and generations unchanged;
- a bundle whose system cannot run the program (foot removed from its root): tried in slot A, judged
  unhealthy, marked bad, and the device restarts into slot B by itself; `kiosk update`'s delivery says
  "rolled back" with the health check's reason;
- a bundle signed by another key: refused by RAUC on the device, nothing switched;
- (slow) a try cut short by a reset (what the watchdog does to a hang): the boot loader falls back, and
  the old slot records why;
- (slow) a power cut during the install: the running slot boots, the half-written one is never chosen.
The fallback cases take whichever slot runs (settled()), so each also runs alone after the first boot:
-k "first_boot or power_cut" is a Pi's hour less than the whole module.
Run: pytest tests/test_update_boot.py --basetemp=/var/tmp/updatebt (KIOSK_TEST_CACHE_DIR set).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from boottools import (ARM1176_BOARDS, ROOT, BootedVM, HungRebootReset, boot_env, boot_spec, build_boot_image,
                       removed_when_passed, reset, wait_until)
from imagetools import _cache_dir, _shared_dir
from test_boot import boot_key  # noqa: F401 (the session's SSH key fixture)

pytestmark = [pytest.mark.root]


@dataclass
class Device:
    board: str
    vm: BootedVM
    spec: dict
    cache: Path
    work: Path

    @property
    def disk(self) -> str:
        """The slots' partition prefix: /dev/vda on the qemu target, /dev/mmcblk0p on the Pis."""
        from kiosk.spec.hardware import load_board
        return load_board(self.board)["slotDevicePrefix"]


# Every board with root slots: the qemu target in the default suite, the Raspberry Pis (U-Boot on QEMU's raspi
# machines, hours of emulated ARM) in the slow suite, each in its own xdist group.
@pytest.fixture(scope="module", params=[
    pytest.param("qemu", marks=pytest.mark.xdist_group("boot-update")),
    *(pytest.param(board, marks=[pytest.mark.slow, pytest.mark.xdist_group(f"boot-update-{board}")])
      for board in ("raspberryPi3", "raspberryPi0", "raspberryPi1", "raspberryPi2", "raspberryPi4"))])
def device(request, tmp_path_factory, boot_key):  # noqa: F811 (the imported fixture)
    if os.geteuid() != 0:
        pytest.skip("building images needs root (the CI runs as root)")
    board = request.param
    key, public = boot_key
    shared = _shared_dir(tmp_path_factory)
    spec = boot_spec(board, public, host=f"update-{board.lower()}")
    cache = _cache_dir(shared)
    image_dir = shared / f"boot-update-{board}"
    image, _ = build_boot_image(spec, image_dir, cache, log=lambda m: print(m, flush=True))
    work = tmp_path_factory.mktemp(f"vm-update-{board}")
    # its image and VM disk (~3 GB with the bundles) go when the board's tests pass (removed_when_passed)
    with removed_when_passed(request.session, [image_dir, work]):
        vm = BootedVM(image, key, work, board=board)
        vm.start()
        try:
            print(f"[update {board}] ssh after {vm.wait_for_ssh(timeout=900):.0f} s", flush=True)
            yield Device(board, vm, spec, cache, work)
        finally:
            vm.stop()


# The boot loaders' slot variables, read the same way: GRUB's ORDER/<slot>_OK/<slot>_TRY, U-Boot's
# BOOT_ORDER/BOOT_<slot>_LEFT (kiosk.image.grub, kiosk.image.uboot).
def first_slot(env: dict) -> str:
    return (env.get("ORDER") or env["BOOT_ORDER"]).split()[0]


def ready(env: dict, slot: str) -> bool:
    """Committed (or newly installed) and not being tried: GRUB OK=1 TRY=0, U-Boot all its tries left."""
    if "ORDER" in env:
        return (env[f"{slot}_OK"], env[f"{slot}_TRY"]) == ("1", "0")
    from kiosk.config.bootconfig import TRIES
    return env[f"BOOT_{slot}_LEFT"] == str(TRIES)


def passed_over(env: dict, slot: str) -> bool:
    """The boot loader will not choose it: GRUB OK=0 (marked bad) or TRY=1 (tried), U-Boot no tries left."""
    if "ORDER" in env:
        return env[f"{slot}_OK"] == "0" or env[f"{slot}_TRY"] == "1"
    return env[f"BOOT_{slot}_LEFT"] == "0"


def marked_bad(env: dict, slot: str) -> bool:
    return env[f"{slot}_OK"] == "0" if "ORDER" in env else env[f"BOOT_{slot}_LEFT"] == "0"


def slot_status(vm: BootedVM) -> dict:
    return json.loads(vm.ssh("kiosk slot status --json").stdout)


def kiosk_update(device: Device, *args: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`kiosk update` as a user runs it: ssh with the key, the device's host key checked (known_hosts). A raspi
    machine gets 90 minutes: its arm64 top layer builds under qemu-user, and its chunked install hashes the
    1.4 GB seed slot emulated (~30 min); 40 minutes ran out at load 6-8 (2026-12-05)."""
    vm = device.vm
    timeout = timeout or (2400 if device.board == "qemu" else 5400)
    argv = [sys.executable, "-m", "kiosk", "update", "127.0.0.1", *args, "-p", str(vm.port), "-i", str(vm.key),
            "--ssh-option", f"UserKnownHostsFile={vm.known_hosts()}"]
    env = {**os.environ, **laptop_env(device), "KIOSK_UPDATE_BOOT_SECONDS": boot_seconds(device)}
    started = time.monotonic()
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    print(f"\n[update] kiosk update {' '.join(args)}: {time.monotonic() - started:.0f} s, exit {result.returncode}\n"
          + result.stderr[-4000:] + result.stdout, flush=True)
    return result


def laptop_env(device: Device) -> dict:
    """kiosk's cache and ssh settings for a laptop command, as a user with a slow link sets them: a 60 s
    connect timeout; on the ARM1176 boards (raspberryPi0, raspberryPi1) 240 s, and keep-alives that wait
    4 minutes (KIOSK_SSH_COMMAND: ssh keeps the first value of an option, and it comes before kiosk's own
    15 s x 4). Their emulated CPU stalls for minutes, on a quiet host too ("soft lockup - CPU#0 stuck for
    79s" ... "501s"), which failed `kiosk update` at its first ssh in every raspberryPi0 run before this
    (notes/ab-update.md)."""
    env = {"KIOSK_CACHE_DIR": str(device.cache), "KIOSK_SSH_CONNECT_TIMEOUT": "60"}
    if device.board in ARM1176_BOARDS:
        env.update(KIOSK_SSH_CONNECT_TIMEOUT="240", KIOSK_SSH_COMMAND="ssh -o ServerAliveCountMax=16")
    return env


def boot_seconds(device: Device) -> str:
    """kiosk update's wait for the reboot and for the verdict (KIOSK_UPDATE_BOOT_SECONDS): the default 900 s on
    the qemu target; an emulated Pi 0 or 1 takes ~250 s to boot, and a rollback is two boots and a failed
    health check."""
    return "900" if device.board == "qemu" else "2400"


def kiosk_status(device: Device) -> dict:
    """`kiosk status --json` as a user runs it (issue 17): the slots as the laptop sees them."""
    vm = device.vm
    argv = [sys.executable, "-m", "kiosk", "status", "127.0.0.1", "-p", str(vm.port), "-i", str(vm.key),
            "--ssh-option", f"UserKnownHostsFile={vm.known_hosts()}", "--json"]
    env = {**os.environ, **laptop_env(device)}
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode in (0, 1), result.stderr
    return json.loads(result.stdout)


def device_ssh(vm: BootedVM) -> list[str]:
    """kiosk's own ssh argv to the device (kiosk.net.reach), its real host key checked."""
    from kiosk.net.reach import ssh_argv
    return ssh_argv("127.0.0.1", port=vm.port, identity=str(vm.key),
                    options=[f"UserKnownHostsFile={vm.known_hosts()}", "ConnectTimeout=60"])


def committed(vm: BootedVM, slot: str) -> bool:
    status = slot_status(vm)
    return status["booted"] == slot and (status["record"].get(slot) or {}).get("state") == "good"


PARTITION = {"A": 2, "B": 3}             # kiosk.image.assemble's layout: FAT, slot A, slot B, data
RAUC_SLOT = {"A": "rootfs.0", "B": "rootfs.1"}


def settled(vm: BootedVM) -> tuple[str, str]:
    """(the slot the device runs, once committed; the other one). The fallback cases work from whichever slot
    the cases before them left, so each also runs alone after the first boot (-k), an hour less on a Pi."""
    def good() -> str | None:
        status = slot_status(vm)
        return status["booted"] if (status["record"].get(status["booted"]) or {}).get("state") == "good" else None

    from kiosk.device.slots import other

    running = wait_until("the running slot committed", good, timeout=600)
    return running, other(running)


def test_the_first_boot_commits_slot_a(device):
    vm = device.vm
    wait_until("slot A committed", lambda: committed(vm, "A"), timeout=600)
    env = boot_env(vm, device.board)
    assert first_slot(env) == "A" and ready(env, "A"), env   # mark-good: no try pending
    rauc = slot_status(vm)["rauc"]
    assert rauc["compatible"] == f"kiosk-{device.board}" and rauc["slots"]["A"]["bootStatus"] == "good"
    journal = vm.ssh("journalctl -b -o cat -u kiosk-slot-commit.service").stdout
    assert "slot A is healthy: kept" in journal, journal
    status = kiosk_status(device)
    assert status["board"] == device.board and status["health"] == "ok", status
    assert status["slots"]["booted"] == "A"
    assert status["slots"]["slots"]["A"]["state"] == "good" and status["slots"]["slots"]["B"]["state"] == "empty"
    assert status["generation"]["commit"] == vm.ssh("git -C /etc/kiosk/configuration.git rev-parse main").stdout.strip()


_UNITS = {"bytes": 1, "byte": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def _size(text: str) -> float:
    number, unit = text.split()
    return float(number) * _UNITS[unit]


def _shipped(stderr: str) -> dict:
    """The figures of kiosk update's "shipped ... in all" line (sizes as kiosk prints them, 0.1 MiB steps)."""
    import re
    m = re.search(r"^    (shipped ([0-9.]+ \S+) in all, [0-9.]+% of the whole bundle \(([0-9.]+ \S+)\): the index "
                  r"bundle ([0-9.]+ \S+) and (\d+) of (\d+) chunks ([0-9.]+ \S+);.*)$", stderr, re.M)
    assert m, stderr[-3000:]
    return {"line": m.group(1), "all": _size(m.group(2)), "whole": _size(m.group(3)), "index": _size(m.group(4)),
            "chunks": int(m.group(5)), "stored": int(m.group(6)), "chunk_bytes": _size(m.group(7))}


def test_kiosk_update_with_a_package_added_is_kept(device, tmp_path):
    from kiosk.update.commands import _can_take_chunks

    vm = device.vm
    wait_until("slot A committed", lambda: committed(vm, "A"), timeout=600)
    # The device says whether it takes chunked bundles (its casync and RAUC's store address): one without
    # casync gets the whole bundle.
    ssh = device_ssh(vm)
    assert _can_take_chunks(ssh)
    vm.ssh("mv /usr/bin/casync /usr/bin/casync.away")
    try:
        assert not _can_take_chunks(ssh)
    finally:
        vm.ssh("mv /usr/bin/casync.away /usr/bin/casync")
    before = json.loads(vm.ssh("kiosk generations --json").stdout)
    main = vm.ssh("git -C /etc/kiosk/configuration.git rev-parse main").stdout
    assert vm.ssh("dpkg -s hello", check=False).returncode != 0
    machine_id = vm.ssh("cat /etc/machine-id").stdout.strip()
    spec = dict(device.spec, packages=[*device.spec.get("packages", []), "hello"])
    path = tmp_path / "nixiosk.json"
    path.write_text(json.dumps(spec, indent=2))
    with HungRebootReset(vm):
        result = kiosk_update(device, str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("127.0.0.1: kept: slot B runs the new system "), last
    for stage in ("==> device 127.0.0.1", "==> rootfs", "==> bundle", "==> ship", "==> install", "==> boot",
                  "==> health"):
        assert any(line.startswith(stage) for line in result.stderr.splitlines()), stage
    assert "shipping: " in result.stderr and "/s" in result.stderr   # bytes and rate
    assert "rauc: " in result.stderr
    # Only what changed was shipped (kiosk.update.chunks): the casync index bundle and the chunks slot A
    # lacked, against the whole bundle of the same system that the log also names.
    assert "shipping the whole bundle" not in result.stderr, result.stderr[-3000:]
    assert "==> chunks" in result.stderr
    shipped = _shipped(result.stderr)
    print(f"[update] shipped {shipped['all']} bytes of a {shipped['whole']}-byte bundle: {shipped['line']}", flush=True)
    assert shipped["all"] < shipped["whole"] / 5, shipped
    assert shipped["chunks"] >= 1, shipped        # hello's files are new: some chunks had to come
    # the new system runs: slot B, its package; the same host key (kiosk update's ssh checked it), the same
    # configuration and generations (the data partition)
    assert "rauc.slot=B" in vm.ssh("cat /proc/cmdline").stdout.split()
    assert vm.ssh("findmnt -no SOURCE /").stdout.strip() == f"{device.disk}3"
    assert vm.ssh("hello").stdout.strip() == "Hello, world!"
    assert vm.ssh("cat /etc/machine-id").stdout.strip() == machine_id   # the bundle's hook carried it over
    # the journal is on the data partition: slot A's boots are still there to read from slot B
    boots = vm.ssh("journalctl --list-boots --no-pager -q").stdout.strip().splitlines()
    assert len(boots) >= 2, boots
    assert json.loads(vm.ssh("kiosk generations --json").stdout) == before
    assert vm.ssh("git -C /etc/kiosk/configuration.git rev-parse main").stdout == main
    env = boot_env(vm, device.board)
    assert first_slot(env) == "B" and ready(env, "B"), env
    vm.wait_for_program("/usr/bin/foot", timeout=300)
    slots = kiosk_status(device)["slots"]
    version = last.split("runs the new system ")[1].split(",")[0]
    assert slots["booted"] == "B" and slots["slots"]["B"]["state"] == "good", slots
    assert slots["slots"]["B"]["version"] == version and slots["slots"]["A"]["state"] == "good", slots


def _user_key(device: Device):
    """The user's bundle signing key, the one the device's image trusts (kiosk's cache)."""
    from kiosk.config.signing import signing_key

    os.environ["KIOSK_CACHE_DIR"] = str(device.cache)
    try:
        return signing_key()
    finally:
        del os.environ["KIOSK_CACHE_DIR"]


def _chunked(device: Device, bundle: Path, key=None) -> tuple[Path, Path] | None:
    """What kiosk update ships to a Raspberry Pi: the casync index bundle and chunk store of `bundle` (the
    emulated USB network moves ~45 KiB/s, so a whole 311 MiB bundle would take two hours); None on the qemu
    target, whose tests keep the whole-bundle path."""
    from kiosk.image.bundle import make_chunked

    return None if device.board == "qemu" else make_chunked(bundle, key or _user_key(device))


def _ship_and_install(device: Device, bundle: Path, log, key=None) -> None:
    """Into the other slot, without the reboot: the whole bundle, or its chunks (_chunked)."""
    from kiosk.update.commands import _deliver_chunks, _install, _ship

    ssh = device_ssh(device.vm)
    chunked = _chunked(device, bundle, key)
    if chunked is None:
        _ship(ssh, bundle, log)
        _install(ssh, log)
        return
    try:
        assert _deliver_chunks(ssh, chunked, bundle.stat().st_size, log), "the chunked install failed"
    finally:
        chunked[0].unlink(missing_ok=True)
        shutil.rmtree(chunked[1], ignore_errors=True)


def _bundle(device: Device, tmp_path: Path, *, break_program: bool, key=None) -> Path:
    """A bundle of the boot image's system, signed with the user's key (or `key`); break_program: foot
    removed from its root, so cage cannot start the program (a system update that breaks the kiosk)."""
    from kiosk.image.mbr import root_partition
    from kiosk.image.bundle import make_bundle

    image = tmp_path / "broken.img"
    subprocess.run(["cp", "--sparse=always", str(device.vm.image), str(image)], check=True)
    if break_program:
        part = root_partition(image)
        subprocess.run(["debugfs", "-w", "-R", "rm /usr/bin/foot", f"{image}?offset={part.start}"], check=True,
                       capture_output=True)
    pair = key or _user_key(device)
    bundle = make_bundle(image, tmp_path / "test.raucb", board=device.board, version="broken-1" if break_program else "1",
                         description="kiosk test", key=pair)
    image.unlink()
    return bundle


def test_a_system_that_cannot_run_the_program_is_rolled_back_by_the_device(device, tmp_path, monkeypatch):
    from kiosk.core.log import Log
    from kiosk.update.commands import deliver, report

    monkeypatch.setenv("KIOSK_UPDATE_BOOT_SECONDS", boot_seconds(device))
    vm = device.vm
    running, other = settled(vm)
    bundle = _bundle(device, tmp_path, break_program=True)
    ssh = device_ssh(vm)
    lines = []
    with HungRebootReset(vm):
        kept, status = deliver(ssh, bundle, other, Log(out=type("Out", (), {"write": lambda s, t: lines.append(t),
                                                                              "flush": lambda s: None})()),
                               _chunked(device, bundle))
    assert not kept
    assert status["booted"] == running
    record = status["record"][other]
    assert record["state"] == "bad" and "kiosk.service" in record["reason"], record
    assert report("dev", other, "broken-1", kept, status) == 1
    assert vm.ssh("findmnt -no SOURCE /").stdout.strip() == f"{device.disk}{PARTITION[running]}"
    env = boot_env(vm, device.board)
    assert passed_over(env, other), env    # mark-bad: the boot loader will not choose it
    slots = kiosk_status(device)["slots"]
    assert slots["booted"] == running and slots["slots"][other]["state"] == "bad", slots
    assert "kiosk.service" in slots["slots"][other]["reason"], slots
    vm.wait_for_program("/usr/bin/foot", timeout=300)


def test_a_bundle_signed_by_another_key_is_refused_and_nothing_switches(device, tmp_path):
    from kiosk.config.signing import signing_key

    vm = device.vm
    before = boot_env(vm, device.board)
    os.environ["KIOSK_CACHE_DIR"] = str(tmp_path / "other-cache")
    try:
        other = signing_key()
    finally:
        del os.environ["KIOSK_CACHE_DIR"]
    bundle = _bundle(device, tmp_path, break_program=False, key=other)
    from kiosk.core.errors import KioskError
    from kiosk.core.log import Log

    log = Log(out=sys.stdout)   # RAUC's lines, shown when the test fails
    service = "systemctl show -p InvocationID --value rauc.service"
    running = vm.ssh(f"rauc status >/dev/null && {service}").stdout.strip()   # (D-Bus started it if it was not)
    with pytest.raises(KioskError, match="not signed by the key this device trusts"):
        _ship_and_install(device, bundle, log, key=other)
    assert boot_env(vm, device.board) == before
    # the install ran in a fresh RAUC service (slots.FRESH_RAUC: RAUC 1.8's takes one install only), so the
    # next one, the reset case's on a Pi, is not refused by a dead service
    assert running and vm.ssh(service).stdout.strip() not in ("", running)
    assert vm.ssh("ls /data/kiosk/incoming").stdout.strip() == ""   # the refused bundle is not left there


@pytest.mark.slow
def test_a_try_cut_short_by_a_reset_falls_back_and_the_old_slot_says_why(device, tmp_path):
    """What the watchdog does to a hung new system: the machine resets before any verdict. The boot loader
    does not try the slot again (GRUB: its TRY is set; U-Boot: its one try is spent), and the old slot
    records it failed."""
    from kiosk.core.log import Log

    vm = device.vm
    running, other = settled(vm)
    bundle = _bundle(device, tmp_path, break_program=False)
    _ship_and_install(device, bundle, Log(out=sys.stdout))   # RAUC's lines, shown when the test fails
    booting = f"kiosk-ab: booting slot {other}"
    seen = vm.console().count(booting)   # (across power cycles: a raspi machine's reset is one)
    with HungRebootReset(vm):   # (raspi machines: the reset a Pi does by itself)
        vm.ssh("systemctl reboot", check=False)
        wait_until(f"the boot loader booting slot {other}", lambda: vm.console().count(booting) > seen,
                   timeout=300, every=1)
    time.sleep(10)                     # the new slot's kernel is starting: no verdict can have been given
    reset(vm)
    def judged():
        try:
            status = slot_status(vm)
        except (AssertionError, subprocess.TimeoutExpired, ValueError):   # still booting
            return False
        return status["booted"] == running and (status["record"].get(other) or {}).get("state") == "bad"

    wait_until(f"back on slot {running} with a verdict on {other}", judged, timeout=900)
    record = slot_status(vm)["record"][other]
    from kiosk.device.slots import FALLBACK_REASON
    assert record["reason"] == FALLBACK_REASON, record
    env = boot_env(vm, device.board)
    assert first_slot(env) == running and marked_bad(env, other), env   # never tried again; the old slot first
    vm.wait_for_program("/usr/bin/foot", timeout=300)


@pytest.mark.slow
def test_a_power_cut_during_the_install_leaves_the_running_slot_booting(device, tmp_path):
    """QEMU killed while `rauc install` writes the inactive slot: the next boot is the old slot, its
    configuration and generations whole, and the half-written slot is never chosen (RAUC makes it
    unbootable before it writes)."""
    import contextlib

    from kiosk.builders.chunkstore import ChunkServer
    from kiosk.core.log import Log
    from kiosk.update.chunks import forwarded
    from kiosk.update.commands import INSTALL, INSTALL_CHUNKED, _ship

    vm = device.vm
    running, other = settled(vm)
    copying = f"Copying image to {RAUC_SLOT[other]}"
    generations = json.loads(vm.ssh("kiosk generations --json").stdout)
    main = vm.ssh("git -C /etc/kiosk/configuration.git rev-parse main").stdout
    bundle = _bundle(device, tmp_path, break_program=False)
    ssh = device_ssh(vm)
    chunked = _chunked(device, bundle)
    _ship(ssh, chunked[0] if chunked else bundle, Log(out=open(os.devnull, "w")))
    with ChunkServer(chunked[1]) if chunked else contextlib.nullcontext() as server:
        argv = [*forwarded(ssh, server.port), INSTALL_CHUNKED] if chunked else [*ssh, INSTALL]
        install = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        said = []
        for line in install.stdout:
            said.append(line)
            if copying in line:
                break
        assert any(copying in line for line in said), said
        time.sleep(3)                     # the slot is being written
        vm.power_cycle()                  # QEMU killed, then booted again on the same disk
        install.kill()
    vm.wait_for_ssh(timeout=900)
    wait_until(f"slot {running} committed again", lambda: committed(vm, running), timeout=600)
    assert vm.ssh("findmnt -no SOURCE /").stdout.strip() == f"{device.disk}{PARTITION[running]}"
    assert json.loads(vm.ssh("kiosk generations --json").stdout) == generations
    assert vm.ssh("git -C /etc/kiosk/configuration.git rev-parse main").stdout == main
    assert marked_bad(boot_env(vm, device.board), other)
    vm.wait_for_program("/usr/bin/foot", timeout=300)
