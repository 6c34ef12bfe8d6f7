"""One booted qemu device in a fleet run, beside harness devices: `kiosk fleet push` end to end on real
systemd, real sshd and the device's own hooks, in the same rollout as the others.

The VM is the default suite's qemu boot image (tests/boottools.py: built by kiosk's pipeline with this
session's key, reused when test_boot.py built it already) booted with `kiosk run`, reached on its
forwarded ssh port with its real host key in known_hosts. Two harness devices (tests/sshd_harness.py)
make it a fleet: the VM is its own group with its own argv; the rollout is a canary then a wave.
Needs root (image build, as test_boot.py) and minutes of CPU for the boot.
"""

from __future__ import annotations

import copy
import json
import os
import time

import pytest
from boottools import BootedVM, boot_spec, build_boot_image, make_key
from conftest import kiosk_cli
from imagetools import _cache_dir, _shared_dir
from sshd_harness import Device, keygen

from kiosk.device import store

pytestmark = [pytest.mark.root, pytest.mark.xdist_group("boot-qemu")]

VM_ARGS = ["--title=fleet", "--", "/bin/sh", "-c", "echo pushed by kiosk fleet; exec sleep infinity"]
HARNESS_ARGS = ["--title=harness"]


@pytest.fixture(scope="module")
def booted(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("building images needs root (the CI runs as root)")
    shared = _shared_dir(tmp_path_factory)
    key, public = make_key(shared / "boot-key")   # the session's key, as test_boot.py's boot_key
    spec = boot_spec("qemu", public)
    image, _ = build_boot_image(spec, shared / "boot-qemu", _cache_dir(shared), log=lambda m: print(m, flush=True))
    vm = BootedVM(image, key, tmp_path_factory.mktemp("vm-fleet"), board="qemu")
    vm.start()
    try:
        vm.wait_for_ssh(timeout=900)
        vm.wait_for_program(spec["program"]["executable"], timeout=900)
        yield vm, spec, key, public
    finally:
        vm.stop()


def test_a_fleet_push_reaches_a_booted_qemu_device(booted, tmp_path):
    vm, spec, key, public = booted
    host_key = " ".join(vm.ssh("cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[:2])
    harness_key = tmp_path / "harness_host"
    harness_pub = " ".join(keygen(harness_key, "harness").split()[:2])
    devices = {}
    try:
        for name in ("harness-1", "harness-2"):
            (tmp_path / name).mkdir()
            devices[name] = Device(tmp_path / name, dict(copy.deepcopy(spec), hostName=name), public, harness_key,
                                   device_paths=True)
        known = tmp_path / "known_hosts"
        known.write_text(f"[127.0.0.1]:{vm.port} {host_key}\n"
                         + "".join(f"[127.0.0.1]:{d.port} {harness_pub}\n" for d in devices.values()))
        (tmp_path / "ssh_config").write_text("")
        base = copy.deepcopy(spec)
        del base["hostName"]
        (tmp_path / "nixiosk.json").write_text(json.dumps(base, indent=2))
        inventory = {"all": {
            "vars": {"ansible_host": "127.0.0.1", "ansible_ssh_private_key_file": str(key),
                     "ansible_ssh_common_args": f"-F {tmp_path}/ssh_config -o UserKnownHostsFile={known}"},
            "children": {
                "vm": {"hosts": {spec["hostName"]: {"ansible_port": vm.port}}, "vars": {"program": {"args": VM_ARGS}}},
                "harness": {"hosts": {n: {"ansible_port": d.port} for n, d in devices.items()},
                            "vars": {"program": {"args": HARNESS_ARGS}}}}}}
        (tmp_path / "fleet.yml").write_text(json.dumps(inventory, indent=2))   # JSON is YAML

        before = int(vm.ssh("systemctl show -p MainPID --value kiosk.service").stdout)
        started = time.monotonic()
        r = kiosk_cli("fleet", "push", "fleet.yml", "nixiosk.json", "--batch", "2", "--json", "-v", cwd=tmp_path)
        print(f"\n[qemu] fleet push of 3 devices (the VM the canary): {time.monotonic() - started:.1f} s\n{r.stderr}")
        assert r.returncode == 0, r.stdout + r.stderr
        rows = {row["host"]: row for row in json.loads(r.stdout)["devices"]}
        assert rows[spec["hostName"]]["wave"] == "canary" and rows[spec["hostName"]]["result"] == "deployed"
        assert {row["result"] for row in rows.values()} == {"deployed"}, rows

        # the VM: generation 2 active, main at the pushed commit, cage restarted with the group's argv
        state = json.loads(vm.ssh("kiosk generations --json").stdout)
        assert state["current"] == state["default"] == 2 == rows[spec["hostName"]]["generation"]
        assert vm.ssh("git -C /etc/kiosk/configuration.git rev-parse main").stdout.strip() == \
            rows[spec["hostName"]]["commit"]
        pid = vm.wait_for_program(spec["program"]["executable"], timeout=300)
        assert int(vm.ssh("systemctl show -p MainPID --value kiosk.service").stdout) != before
        assert vm.cmdline(pid)[1:] == VM_ARGS
        for name, device in devices.items():
            assert store.pointer(device.root) == 2
            assert json.loads((device.root / "var/lib/kiosk/current/root/etc/kiosk/program.json").read_text())[4:] \
                == HARNESS_ARGS

        # status over the same ssh: all three healthy; a rerun changes nothing
        r = kiosk_cli("fleet", "status", "fleet.yml", "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
        assert {row["host"]: row["generation"] for row in json.loads(r.stdout)["devices"]} == \
            {spec["hostName"]: 2, "harness-1": 2, "harness-2": 2}
        r = kiosk_cli("fleet", "push", "fleet.yml", "nixiosk.json", "--json", cwd=tmp_path)
        assert r.returncode == 0 and {row["result"] for row in json.loads(r.stdout)["devices"]} == {"unchanged"}
    finally:
        for device in devices.values():
            device.close()
