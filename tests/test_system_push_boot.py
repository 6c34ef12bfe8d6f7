"""A git push that changes the system of a booted A/B device (issue 17): built by a builder on this host, tried
once in the other root slot, kept only when healthy; main follows the device's verdict.

Real parts: the qemu target booted with `kiosk run` (GRUB, RAUC, systemd), the device's own hooks over its
real sshd, the builder an OpenSSH server on this host (QEMU's user network reaches it at 10.0.2.2) whose
forced command is `kiosk builder-serve` (authorized with `kiosk builders authorize`, the device's own key),
building with `kiosk build`'s pipeline and the test cache, signing with the key the image trusts.

In file order, one device:
- with the builder down, a push that adds a package is refused, the device untouched;
- a push that adds `hello`: built, shipped, installed into slot B, one restart, kept: main at the commit,
  generation 2 current, hello runs, the push output lists hello's version;
- an upgrade (/debian/upgrade changed) once this host's security archive (the qemu lab's securityMirror)
  publishes a newer hello: kiosk status counts it pending, the builder builds from the archive's new
  state, the device runs the new version in the other slot, nothing pending after;
- a push that removes hello with a program that exits at once: tried in the other slot, unhealthy, the
  device is back by itself, that generation failed, main back at the previous commit;
- the same removal with a program that runs: kept in the other slot, hello gone.
The first two run on the raspberryPi0 VM too (builder for armel on this host, only the chunks the device
lacks shipped over its emulated USB network); the others on the qemu target only.
Run: pytest tests/test_system_push_boot.py --basetemp=/var/tmp/syspushbt (KIOSK_TEST_CACHE_DIR set);
-k raspberryPi0 or -k qemu for one board.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from boottools import (BootedVM, HungRebootReset, boot_env, boot_spec, build_boot_image, removed_when_passed,
                       wait_until)
from conftest import kiosk_cli
from imagetools import _cache_dir, _shared_dir
from sshd_harness import Device as SshServer, free_port, keygen, remote_lines
from test_boot import boot_key  # noqa: F401 (the session's SSH key fixture)
from test_update_boot import Device, committed, first_slot, kiosk_status, ready, slot_status

# Slow: each try builds a system and restarts the device (~10 min here at load 5); the default suite runs the
# same builder request over real OpenSSH (tests/test_system_trial.py) and the trial's logic on a device root.
pytestmark = [pytest.mark.root, pytest.mark.slow]

HOST_FROM_GUEST = "10.0.2.2"   # QEMU's user network: the host's loopback


@dataclass
class Lab:
    vm: BootedVM
    spec: dict
    builder: SshServer
    clone: Path
    client: object
    board: str = "qemu"
    cache: Path = Path()
    mirror: Path | None = None   # the qemu lab's security archive (publish_security)


ARCHITECTURE = {"qemu": "amd64", "raspberryPi0": "armel"}


def qemu_only(lab: Lab) -> None:
    """The fallback and the removal run on the qemu target; a raspberryPi0 try costs an hour here (its armel
    system built under qemu-user, its install hashing the seed slot on an emulated ARM1176)."""
    if lab.board != "qemu":
        pytest.skip("run on the qemu target only (an hour per try on the raspberryPi0 VM)")


@pytest.fixture(scope="module", params=list(ARCHITECTURE))
def lab(request, tmp_path_factory, boot_key):  # noqa: F811 (the imported fixture)
    if os.geteuid() != 0:
        pytest.skip("building images needs root (the CI runs as root)")
    board = request.param
    key, public = boot_key
    shared = _shared_dir(tmp_path_factory)
    cache = _cache_dir(shared)
    work = tmp_path_factory.mktemp(f"syspush-{board}")
    image_dir = shared / f"boot-syspush-{board}"
    host_key = work / "builder_host_ed25519"
    host_pub = keygen(host_key, "builder@test")
    port = free_port()
    spec = boot_spec(board, public, host=f"syspush-{board.lower()}")
    spec["allowLocalBuild"] = False   # a builder's system, or none (the device's own build: test_selfbuild_boot.py)
    spec["builders"] = [{"hostName": HOST_FROM_GUEST, "port": port, "sshUser": "root",
                         "systems": [ARCHITECTURE[board]], "publicHostKey": " ".join(host_pub.split()[:2])}]
    mirror = server = None
    env = {"KIOSK_CACHE_DIR": str(cache)}
    if board == "qemu":   # Debian's security suite from this host (the upgrade test publishes a fix there)
        from fake_mirror import Server

        mirror = work / "security"
        publish_security(mirror, [], 1686300000)   # older than bookworm's Release: the base's epoch stays
        server = Server(mirror)
        spec["debian"] = dict(spec.get("debian", {}), securityMirror=server.url)
        env["KIOSK_TEST_UNSIGNED_MIRROR"] = os.environ["KIOSK_TEST_UNSIGNED_MIRROR"] = "1"
    try:
        image, _ = build_boot_image(spec, image_dir, cache,
                                    log=lambda m: print(m, flush=True))
    finally:
        os.environ.pop("KIOSK_TEST_UNSIGNED_MIRROR", None)
    # The builder: this host's sshd on the port the spec names, kiosk builder-serve with the test cache (its
    # update key is the one the image trusts; its pipeline caches are warm).
    (work / "builder").mkdir()
    builder = SshServer(work / "builder", spec, public, host_key, port=port, env=env)
    with removed_when_passed(request.session, [image_dir, work]):   # image, VM disk, builder, clones
        vm = BootedVM(image, key, work / "vm", board=board)
        vm.start()
        try:
            print(f"[syspush {board}] ssh after {vm.wait_for_ssh(timeout=900):.0f} s", flush=True)
            wait_until("slot A committed", lambda: committed(vm, "A"), timeout=900)
            device_key = vm.ssh("kiosk builders key").stdout.strip()
            r = kiosk_cli("builders", "authorize", "--key", "-", "--authorized-keys",
                          str(work / "builder" / "authorized_keys"), input=device_key)
            assert r.returncode == 0, r.stderr
            client = vm.git_client(work / "client")
            clone = client.clone(vm.repo_url, "configuration")
            yield Lab(vm, spec, builder, clone, client, board, cache, mirror)
        finally:
            vm.stop()
            builder.close()
            if server:
                server.close()
                forget(cache, server.url)


def forget(cache: Path, mirror_url: str) -> None:
    """The cache's bases and layers built from this run's own archive (its port is new every run): ~4 GB a
    run that no later run can use."""
    for meta in (cache / "rootfs").glob("*.json"):
        try:
            if mirror_url not in meta.read_text():
                continue
        except OSError:
            continue
        stem = meta.name.split(".fs-")[0].removesuffix(".json")
        for path in (cache / "rootfs").glob(f"{stem}.*"):
            path.unlink(missing_ok=True)


def _main(vm: BootedVM) -> str:
    return vm.ssh("git -C /etc/kiosk/configuration.git rev-parse main").stdout.strip()


def _generations(vm: BootedVM) -> dict:
    return json.loads(vm.ssh("kiosk generations --json").stdout)


def _push(lab: Lab, spec: dict, message: str):
    commit = lab.client.commit_spec(lab.clone, spec, message=message)
    started = time.monotonic()
    result = lab.client.push(lab.clone)
    lines = remote_lines(result.stderr)
    print(f"\n[syspush] git push ({message}): {time.monotonic() - started:.0f} s, exit {result.returncode}\n"
          + "\n".join(lines[-80:]), flush=True)
    return commit, result, lines


def _number(lines: list[str]) -> int:
    """The generation a push built ("==> build generation N: ..."): a refused push used a number too."""
    return int(next(line for line in lines if line.startswith("==> build generation ")).split()[3].rstrip(":"))


def _spec(lab: Lab) -> dict:
    return json.loads((lab.clone / "nixiosk.json").read_text())


def _booted_again(lab: Lab, slot: str, old_boot: str, timeout: float = 1200) -> None:
    vm = lab.vm

    def back() -> bool:
        r = vm.ssh("cat /proc/sys/kernel/random/boot_id", check=False, timeout=60)
        return r.returncode == 0 and r.stdout.strip() not in ("", old_boot)

    with HungRebootReset(vm):
        wait_until("the device restarted", back, timeout=timeout)
        wait_until(f"slot {slot} judged", lambda: _judged(vm), timeout=900)


def _judged(vm: BootedVM) -> bool:
    """kiosk slot commit has run on this boot (no trial left, or its verdict written)."""
    r = vm.ssh("systemctl show -p ActiveState --value kiosk-slot-commit.service; test -e /var/lib/kiosk/trial.json "
               "&& echo trial", check=False, timeout=60)
    return r.returncode in (0, 1) and r.stdout.split()[:1] in (["inactive"], ["failed"]) and "trial" not in r.stdout


def test_with_the_builder_down_a_system_push_is_refused_and_nothing_changes(lab):
    vm = lab.vm
    before_main, before = _main(vm), _generations(vm)
    slots_before = slot_status(vm)["rauc"]
    lab.builder.close()
    try:
        pushed = _spec(lab)
        pushed["packages"] = [*pushed.get("packages", []), "hello"]
        _, result, lines = _push(lab, pushed, "hello, builder down")
    finally:
        lab.builder.start()
    assert result.returncode != 0
    assert any(line.startswith("==> a new system for slot B (slot A runs): packages +hello") for line in lines), lines
    assert any("unreachable" in line for line in lines), lines
    assert any(f"no builder could build this system ({lab.board}); nothing on the device was changed" in line
               for line in lines), lines
    assert lines[-1].startswith("==> push refused: the new system could not be prepared"), lines
    assert _main(vm) == before_main
    after = _generations(vm)
    assert after["current"] == after["default"] == before["current"]
    assert slot_status(vm)["rauc"]["slots"] == slots_before["slots"]   # nothing written into slot B
    assert vm.ssh("dpkg -s hello", check=False).returncode != 0
    lab.client.git("reset", "--hard", "HEAD~1", cwd=lab.clone)


def test_a_push_that_adds_a_package_is_built_tried_in_slot_b_and_kept(lab):
    vm = lab.vm
    assert vm.ssh("dpkg -s hello", check=False).returncode != 0
    old_boot = vm.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    machine_id = vm.ssh("cat /etc/machine-id").stdout.strip()
    previous = _main(vm)
    pushed = _spec(lab)
    pushed["packages"] = [*pushed.get("packages", []), "hello"]
    commit, result, lines = _push(lab, pushed, "hello")
    assert result.returncode == 0, result.stderr[-4000:]
    text = "\n".join(lines)
    assert "==> a new system for slot B (slot A runs): packages +hello" in text
    assert f"{HOST_FROM_GUEST}:{lab.builder.port}: ==> rootfs" in text or "==> rootfs" in text   # the build's stages
    assert "signature checked" in text, text[-3000:]
    assert any(line.startswith("    + hello ") for line in lines), lines   # the package and its version
    assert "==> install into slot B" in text and "rauc: " in text
    shipped = next(line for line in lines if "in all: the index bundle" in line)   # only the chunks it lacked
    assert "the rest came from the running slot" in shipped, shipped
    assert f"==> main is at {commit[:12]}: the device restarts into slot B to try it" in text
    _booted_again(lab, "B", old_boot, timeout=1200 if lab.board == "qemu" else 2400)
    assert "rauc.slot=B" in vm.ssh("cat /proc/cmdline").stdout.split()
    assert vm.ssh("hello").stdout.strip() == "Hello, world!"
    assert vm.ssh("cat /etc/machine-id").stdout.strip() == machine_id   # the same device to systemd and DHCP
    assert _main(vm) == commit and commit != previous
    state = _generations(vm)
    number = _number(lines)
    assert state["current"] == state["default"] == number, state
    assert [(g["number"], g["commit"], g["status"]) for g in state["generations"]][-1] == (number, commit, "active")
    env = boot_env(vm, lab.board)
    assert first_slot(env) == "B" and ready(env, "B"), env
    assert (slot_status(vm)["record"].get("B") or {}).get("state") == "good"
    vm.wait_for_program(lab.spec["program"]["executable"], timeout=600)
    status = kiosk_status(Device(lab.board, vm, lab.spec, lab.cache, lab.clone.parent))   # as the user sees it
    assert status["board"] == lab.board and status["health"] == "ok", status
    assert status["slots"]["booted"] == "B" and status["slots"]["slots"]["B"]["state"] == "good", status
    assert status["generation"]["number"] == number and status["generation"]["commit"] == commit, status


def _slot(vm: BootedVM) -> str:
    return next(w.split("=", 1)[1] for w in vm.ssh("cat /proc/cmdline").stdout.split() if w.startswith("rauc.slot="))


def other(slot: str) -> str:
    return "B" if slot == "A" else "A"


def _status(lab: Lab) -> dict:
    return kiosk_status(Device(lab.board, lab.vm, lab.spec, lab.cache, lab.clone.parent))


SECURITY_SUITE = "bookworm-security"


def _security_row(status: dict) -> dict:
    return next(row for row in status["pending"]["suites"] if row["kind"] == "security")


def publish_security(root: Path, debs: list[Path], date: int) -> None:
    """root as a Debian security archive (unsigned: KIOSK_TEST_UNSIGNED_MIRROR) of bookworm-security for amd64
    holding `debs`, its Release dated `date` (the archive's state: kiosk's --upgrade compares it)."""
    import email.utils
    import hashlib
    import lzma
    import shutil
    import subprocess

    from kiosk.spec.sources import COMPONENTS

    pool = root / "pool/updates/main"
    shutil.rmtree(root / "dists", ignore_errors=True)
    pool.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        shutil.copyfile(deb, pool / deb.name)
    sums = []
    for component in COMPONENTS:
        rel = f"{component}/binary-amd64"
        (root / "dists" / SECURITY_SUITE / rel).mkdir(parents=True)
        text = subprocess.run(["dpkg-scanpackages", "-m", "pool"], cwd=root, check=True, capture_output=True,
                              text=True).stdout if component == "main" and debs else ""
        for name, data in (("Packages", text.encode()), ("Packages.xz", lzma.compress(text.encode()))):
            (root / "dists" / SECURITY_SUITE / rel / name).write_bytes(data)
            sums.append(f" {hashlib.sha256(data).hexdigest()} {len(data):8d} {rel}/{name}")
    (root / "dists" / SECURITY_SUITE / "Release").write_text(
        f"Origin: kiosk-tests\nLabel: kiosk-tests\nSuite: stable-security\nCodename: {SECURITY_SUITE}\n"
        f"Date: {email.utils.formatdate(date, usegmt=True)}\nArchitectures: amd64\n"
        f"Components: {' '.join(COMPONENTS)}\nSHA256:\n" + "\n".join(sums) + "\n")


def newer_hello(cache: Path, work: Path, installed: str) -> tuple[Path, str]:
    """The hello the device runs (its .deb in the cache, by version: an earlier run's repacked one may be there
    too), repacked with a higher version: a security fix as the archive would publish it (the same files, so
    the new slot's hello still says Hello, world!)."""
    import subprocess

    deb = next(iter(sorted(cache.rglob(f"hello_{installed.replace(':', '%3a')}_amd64.deb"))))
    tree = work / "hello-src"
    subprocess.run(["dpkg-deb", "-R", str(deb), str(tree)], check=True)
    control = (tree / "DEBIAN/control").read_text()
    old = next(line.split(": ", 1)[1] for line in control.splitlines() if line.startswith("Version: "))
    version = f"{old}+kiosktest1"
    (tree / "DEBIAN/control").write_text(control.replace(f"Version: {old}\n", f"Version: {version}\n"))
    out = work / f"hello_{version}_amd64.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(out)], check=True, capture_output=True)
    return out, version


def test_an_upgrade_brings_the_security_fix_kiosk_status_counted(lab):
    """/debian/upgrade changed: the builder builds the system from the archive's current state; the device
    runs the new version of the package kiosk status counted as pending before, and none is pending after."""
    qemu_only(lab)
    vm = lab.vm
    installed = vm.ssh("dpkg-query -W -f '${Version}' hello").stdout.strip()
    deb, version = newer_hello(lab.cache, lab.mirror.parent, installed)
    publish_security(lab.mirror, [deb], int(time.time()))
    before = _security_row(_status(lab))   # (the updates row is the real archive's: not asserted)
    assert before["state"] == "checked" and [p["name"] for p in before["packages"]] == ["hello"], before
    old_boot = vm.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    target = other(_slot(vm))
    pushed = _spec(lab)
    pushed["debian"] = dict(pushed["debian"], upgrade="2026-12-05.hello-fix")
    commit, result, lines = _push(lab, pushed, "upgrade")
    assert result.returncode == 0, result.stderr[-4000:]
    text = "\n".join(lines)
    assert f"==> a new system for slot {target}" in text and "/debian/upgrade" in text, text[-3000:]
    assert "the archive has changed since the cached base" in text, text[-3000:]
    assert f"hello {installed} -> {version}" in [line.strip() for line in lines], lines   # the push said it
    _booted_again(lab, target, old_boot)
    assert _slot(vm) == target and _main(vm) == commit
    assert vm.ssh("dpkg-query -W -f '${Version}' hello").stdout.strip() == version
    assert vm.ssh("hello").stdout.strip() == "Hello, world!"
    after = _security_row(_status(lab))
    assert after["state"] == "checked" and after["packages"] == [], after


def test_a_system_push_that_cannot_run_the_program_falls_back_and_main_goes_back(lab):
    qemu_only(lab)
    vm = lab.vm
    old_boot = vm.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    previous = _main(vm)
    pushed = _spec(lab)
    pushed["packages"] = [p for p in pushed.get("packages", []) if p != "hello"]
    pushed["program"] = copy.deepcopy(pushed["program"])
    pushed["program"]["args"] = ["--", "/bin/false"]   # foot exits at once: the kiosk never stays up
    commit, result, lines = _push(lab, pushed, "no hello, a program that exits")
    assert result.returncode == 0, result.stderr[-4000:]   # accepted for a try: main names the trial
    assert any(line.startswith("    - hello ") for line in lines), lines
    running = _generations(vm)["current"]
    here = _slot(vm)
    _booted_again(lab, here, old_boot, timeout=1800)   # the other slot tried, unhealthy, marked bad, back here
    assert f"rauc.slot={here}" in vm.ssh("cat /proc/cmdline").stdout.split()
    assert _main(vm) == previous != commit
    state = _generations(vm)
    assert state["current"] == state["default"] == running, state
    failed = state["generations"][-1]
    assert failed["number"] == _number(lines) and failed["status"] == "failed", failed
    assert "kiosk.service" in failed["reason"], failed
    assert (slot_status(vm)["record"].get(other(here)) or {}).get("state") == "bad"
    assert vm.ssh("hello").stdout.strip() == "Hello, world!"
    lab.client.git("fetch", "origin", cwd=lab.clone)
    lab.client.git("reset", "--hard", "origin/main", cwd=lab.clone)


def test_a_push_that_removes_a_package_is_kept_without_it(lab):
    qemu_only(lab)
    vm = lab.vm
    old_boot = vm.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    pushed = _spec(lab)
    pushed["packages"] = [p for p in pushed.get("packages", []) if p != "hello"]
    target = other(_slot(vm))
    commit, result, lines = _push(lab, pushed, "no hello")
    assert result.returncode == 0, result.stderr[-4000:]
    _booted_again(lab, target, old_boot)
    assert f"rauc.slot={target}" in vm.ssh("cat /proc/cmdline").stdout.split()
    assert vm.ssh("dpkg -s hello", check=False).returncode != 0
    assert _main(vm) == commit
