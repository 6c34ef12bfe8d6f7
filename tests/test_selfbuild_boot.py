"""A booted qemu device with no builder builds its own new system (issue 17's "a Pi 3/4 may build for itself"):
a git push that adds a package, with allowLocalBuild (the default) and no builder in the spec, is built on the
device from a copy of its running root (kiosk.device.selfbuild: apt resolving against Debian's archive from the
guest, dpkg into the copy, a bundle signed with the device's own key), installed by `rauc install` into the other
slot (RAUC checks that signature against the keyring directory on the data partition), tried once and kept;
then a push that removes it, built the same way, is kept without it.

Real parts: the qemu target booted with `kiosk run` (GRUB, RAUC, systemd), its hooks over its own sshd, Debian's
archive over QEMU's user network. The first test runs on the raspberryPi3 VM too (U-Boot, arm64), the second on
the qemu target only. Slow: each build copies the 1 GB root and makes a bundle on an emulated CPU.
Run: pytest -m slow tests/test_selfbuild_boot.py --basetemp=/var/tmp/selfbt (KIOSK_TEST_CACHE_DIR set);
-k qemu or -k raspberryPi3 for one board.
"""

from __future__ import annotations

import os
import time

import pytest

from boottools import BootedVM, boot_spec, build_boot_image, removed_when_passed, wait_until
from imagetools import _cache_dir, _shared_dir
from test_boot import boot_key  # noqa: F401 (the session's SSH key fixture)
from test_system_push_boot import Lab, _booted_again, _generations, _main, _number, _push, _slot, _spec, _status, other
from test_update_boot import committed, slot_status

from kiosk.core.paths import DEVICE_KEYRING

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module", params=["qemu", "raspberryPi3"])
def lab(request, tmp_path_factory, boot_key):  # noqa: F811 (the imported fixture)
    if os.geteuid() != 0:
        pytest.skip("building images needs root (the CI runs as root)")
    board = request.param
    key, public = boot_key
    shared = _shared_dir(tmp_path_factory)
    cache = _cache_dir(shared)
    work = tmp_path_factory.mktemp(f"selfbuild-{board}")
    image_dir = shared / f"boot-selfbuild-{board}"
    spec = boot_spec(board, public, host=f"selfbuild-{board.lower()}")
    assert not spec.get("builders") and spec.get("allowLocalBuild", True)
    image, _ = build_boot_image(spec, image_dir, cache, log=lambda m: print(m, flush=True))
    with removed_when_passed(request.session, [image_dir, work]):   # image, VM disk, clones
        vm = BootedVM(image, key, work / "vm", board=board)
        vm.start()
        try:
            print(f"[selfbuild {board}] ssh after {vm.wait_for_ssh(timeout=1800):.0f} s", flush=True)
            wait_until("slot A committed", lambda: committed(vm, "A"), timeout=1800)
            if board != "qemu":
                # A Pi has no clock of its own and takes the time from NTP; this sandbox reaches no NTP server (only
                # Debian's archive), so the harness sets the clock as timesyncd would on a network. Without it apt
                # refuses the archive ("Release file ... is not valid yet"), and the push says so with that hint.
                vm.ssh(f"date -u -s @{int(time.time())}")
            client = vm.git_client(work / "client")
            clone = client.clone(vm.repo_url, "configuration")
            yield Lab(vm, spec, None, clone, client, board, cache)
        finally:
            vm.stop()


def _try(lab: Lab, pushed: dict, message: str) -> tuple[str, list[str], str]:
    """Push, wait for the restart into the other slot and its verdict: (commit, the push's lines, that slot)."""
    vm = lab.vm
    old_boot = vm.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    target = other(_slot(vm))
    commit, result, said = _push(lab, pushed, message)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line.strip() for line in said]
    assert f"no builder built it: this {lab.board} builds its new system itself (allowLocalBuild)" in lines, lines
    assert any(line.startswith("built on the device in ") for line in lines), lines
    _booted_again(lab, target, old_boot, timeout=1800 if lab.board == "qemu" else 3600)
    assert f"rauc.slot={target}" in vm.ssh("cat /proc/cmdline").stdout.split()
    assert _main(vm) == commit
    state = _generations(vm)
    assert state["current"] == state["default"] == _number(lines), state
    assert (slot_status(vm)["record"].get(target) or {}).get("state") == "good"
    return commit, lines, target


def test_with_no_builder_the_device_builds_its_new_system_and_keeps_it(lab):
    vm = lab.vm
    assert vm.ssh("dpkg -s hello", check=False).returncode != 0
    assert vm.ssh(f"ls {DEVICE_KEYRING}", check=False).stdout.strip() == ""   # no device key before its first build
    machine_id = vm.ssh("cat /etc/machine-id").stdout.strip()
    pushed = _spec(lab)
    pushed["packages"] = [*pushed.get("packages", []), "hello"]
    commit, lines, target = _try(lab, pushed, "hello, built on the device")
    assert any(line.startswith("+ hello ") for line in lines), lines   # the push listed what changes
    assert vm.ssh("hello").stdout.strip() == "Hello, world!"
    assert vm.ssh("cat /etc/machine-id").stdout.strip() == machine_id
    assert len(vm.ssh(f"ls {DEVICE_KEYRING}").stdout.split()) == 1   # the device's own certificate
    assert vm.ssh("stat -c %a /var/lib/kiosk/build-key/key.pem").stdout.strip() == "600"
    status = _status(lab)
    assert status["health"] == "ok" and status["slots"]["booted"] == target, status
    assert status["slots"]["slots"][target]["state"] == "good", status
    assert slot_status(vm)["rauc"]["slots"][target]["version"] == f"device {commit[:12]}"   # the bundle's version
    assert "apt sources: " not in " ".join(lines)   # the spec's sources are the image's: the copy keeps its file


def test_a_removal_built_on_the_device_is_kept_without_the_package(lab):
    if lab.board != "qemu":
        pytest.skip("the qemu target only: a build on the emulated Pi 3 takes most of an hour")
    vm = lab.vm
    pushed = _spec(lab)
    pushed["packages"] = [p for p in pushed.get("packages", []) if p != "hello"]
    _, lines, _ = _try(lab, pushed, "no hello, built on the device")
    assert "purged hello" in lines, lines
    assert any(line.startswith("- hello ") for line in lines), lines
    assert vm.ssh("dpkg -s hello", check=False).returncode != 0
