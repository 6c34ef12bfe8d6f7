"""A push that changes the system of an A/B board (kiosk.device.system), its logic on a device root in a
temporary directory: which generation a boot runs during a trial, what a fallback does to the generations
and to main, what a push finds while a trial is under way. The same paths run for real on a booted qemu
device with a builder on this host in tests/test_system_push_boot.py."""

import json
import os
import subprocess

import pytest
from conftest import kiosk_cli
from test_generations import SECOND, add_generation, assert_consistent_on, install, statuses

from kiosk.core.log import Log
from kiosk.device import activation, pending, slots, store, system

@pytest.fixture
def device(tmp_path, monkeypatch_offline, monkeypatch):
    root = tmp_path / "device"
    root.mkdir()
    install(root)
    path = tmp_path / "recording.json"
    path.write_text("{}")
    monkeypatch.setenv("KIOSK_ACTIVATOR", f"recording:{path}")
    monkeypatch.setenv("KIOSK_HEALTH_SECONDS", "0")
    return root


def booted(root, slot):
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc/cmdline").write_text(f"BOOT_IMAGE=/vmlinuz root=/dev/vda2 rauc.slot={slot} panic=10\n")


def git(root, *args) -> str:
    return subprocess.run(["git", f"--git-dir={store.repo_dir(root)}", *args], check=True, capture_output=True,
                          text=True, env={k: v for k, v in os.environ.items() if not k.startswith("GIT_")}).stdout.strip()


def pushed(root) -> tuple[str, str]:
    """A second commit on main, as git records an accepted push: (old main, new main)."""
    old = git(root, "rev-parse", "main")
    tree = git(root, "rev-parse", "main^{tree}")
    new = subprocess.run(["git", f"--git-dir={store.repo_dir(root)}", "commit-tree", tree, "-p", old, "-m", "push"],
                         check=True, capture_output=True, text=True,
                         env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                              "GIT_COMMITTER_EMAIL": "t@t", "PATH": os.environ["PATH"]}).stdout.strip()
    git(root, "update-ref", "refs/heads/main", new, old)
    return old, new


def start(root, *, pid=2 ** 22 + 7, state="rebooting") -> dict:
    """What start_trial leaves: generation 2 built and the default, trial.json for slot B."""
    old, new = pushed(root)
    gen = add_generation(root, SECOND, commit=new)
    trial = {"commit": new, "previousCommit": old, "generation": gen.number, "previous": 1, "slot": "B",
             "state": state, "installed": "2026-12-05T20:00:00Z", "pid": pid, "pidStart": pending.process_start(pid)}
    store.write_state(store.state_dir(root) / system.TRIAL, trial)
    store.set_pointer(root, "default", gen.number)
    system.update_default_marker(root)
    return trial


def at_boot(root):
    r = kiosk_cli("switch", "--recover", "--at-boot", "--root", str(root))
    assert r.returncode == 0, r.stderr
    return r.stderr


def quiet() -> Log:
    return Log(open(os.devnull, "w"))


def test_what_makes_a_push_a_new_system_and_how_its_packages_are_said():
    running = {"debian": {"suite": "bookworm", "mirror": "http://deb.debian.org/debian"}}
    data = {"debian": {"suite": "bookworm", "mirror": "http://deb.debian.org/debian"}}
    assert system.system_changes(running, data, [], []) == []
    assert system.system_changes(running, data, ["hello"], ["cowsay"]) == ["packages +hello -cowsay"]
    assert system.system_changes(running, dict(data, debian=dict(data["debian"], upgrade="2026-12-05")), [], []) \
        == ["/debian/upgrade"]
    assert system.system_changes(running, dict(data, debian=dict(data["debian"], security=False)), [], []) \
        == ["/debian/security"]
    assert system.package_changes({"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "2.1", "d": "4"}) == \
        ["  b 2 -> 2.1", "- c 3", "+ d 4"]


def test_a_board_without_slots_never_starts_a_trial(device):
    assert system.slot_here(device) is None   # no rauc.slot= on its command line: pushes refuse system changes
    booted(device, "A")
    assert system.slot_here(device) == "A"


def test_the_trial_slot_boots_the_pushed_generation_and_a_healthy_verdict_keeps_it(device):
    root = device
    trial = start(root)
    booted(root, "B")
    said = at_boot(root)
    assert "booting the default generation 2" in said
    assert_consistent_on(root, 2)
    assert system.read_trial(root)["state"] == "trying"
    assert system.after_verdict(root, "B", True, quiet()) is False
    assert system.read_trial(root) is None
    assert statuses(root) == {1: "superseded", 2: "active"}
    assert git(root, "rev-parse", "main") == trial["commit"]


def test_a_fallback_to_the_old_slot_fails_the_generation_and_sets_main_back(device):
    root = device
    trial = start(root)
    booted(root, "B")
    at_boot(root)                       # the try: generation 2 linked in slot B...
    slots.record(root, "B", "bad", "kiosk.service: restarted 3 time(s) within 4s", installed=trial["installed"])
    booted(root, "A")                   # ...unhealthy, marked bad, restarted into slot A
    said = at_boot(root)
    assert f"the trial of commit {trial['commit'][:12]} in slot B failed (kiosk.service: restarted 3" in said
    assert_consistent_on(root, 1)
    gens = {g.number: g.meta for g in store.list_generations(root)}
    assert gens[2]["status"] == "failed" and "kiosk.service: restarted 3" in gens[2]["reason"], gens[2]
    assert gens[1]["status"] == "active"
    assert git(root, "rev-parse", "main") == trial["previousCommit"]
    assert system.read_trial(root)["state"] == "failed"
    assert system.after_verdict(root, "A", True, quiet()) is False    # slot A's verdict ends it
    assert system.read_trial(root) is None


def test_a_try_that_never_reached_a_verdict_says_why(device):
    root = device
    trial = start(root)
    booted(root, "A")                   # the boot loader passed over B (a hang, a panic, a power cut)
    at_boot(root)
    gen = store.generation(root, 2)
    assert gen.meta["status"] == "failed" and slots.FALLBACK_REASON in gen.meta["reason"]
    assert git(root, "rev-parse", "main") == trial["previousCommit"]


def test_the_trial_slot_booted_before_git_recorded_the_push_is_left(device):
    root = device
    trial = start(root, state="installed")
    git(root, "update-ref", "refs/heads/main", trial["previousCommit"], trial["commit"])  # git never moved main
    booted(root, "B")
    at_boot(root)
    assert_consistent_on(root, 1)
    assert store.generation(root, 2).meta["status"] == "failed"
    assert system.after_verdict(root, "B", True, quiet()) is True    # kiosk slot commit marks B bad, restarts


def installing(root) -> dict:
    """What a power cut during `rauc install` leaves: the try recorded, main and default not yet moved."""
    trial = start(root, state="installing")
    git(root, "update-ref", "refs/heads/main", trial["previousCommit"], trial["commit"])
    store.set_pointer(root, "default", 1)
    system.update_default_marker(root)
    return trial


def test_a_power_cut_during_the_install_is_a_failed_try_never_a_new_system_kept(device):
    root = device
    trial = installing(root)
    booted(root, "A")                   # the install never finished: the old slot boots
    said = at_boot(root)
    assert "restarted before its install into slot B was recorded" in said
    assert_consistent_on(root, 1)
    assert store.generation(root, 2).meta["status"] == "failed"
    assert git(root, "rev-parse", "main") == trial["previousCommit"]
    assert system.after_verdict(root, "A", True, quiet()) is False and system.read_trial(root) is None


def test_a_power_cut_after_the_install_leaves_the_new_slot_for_the_old_one(device):
    root = device
    installing(root)
    booted(root, "B")                   # RAUC had finished and made B first: it boots, on generation 1
    at_boot(root)
    assert_consistent_on(root, 1)
    assert store.generation(root, 2).meta["status"] == "failed"
    assert system.after_verdict(root, "B", True, quiet()) is True    # kiosk slot commit marks B bad, restarts


def test_a_failed_install_leaves_no_try_behind(device, monkeypatch):
    root = device
    booted(root, "A")
    old, new = pushed(root)
    gen = add_generation(root, SECOND, commit=new)
    seen = []
    monkeypatch.setattr(system, "fetch_bundle", lambda *a, **k: (root / "none.raucb", {"packages": []}, []))

    def refused(argv, log):
        seen.append(system.read_trial(root)["state"])   # the try is on disk before RAUC touches the slot
        raise system.KioskError("rauc install on the device failed: no space left")

    monkeypatch.setattr(system, "rauc_install", refused)
    with pytest.raises(system.KioskError):
        system.start_trial(root, gen, store.generation(root, 1), commit=new, old_commit=old, data={
            "debian": {}, "hardware": "qemu"}, spec_text="{}", running={"debian": {}}, changes=["packages +hello"],
            pid=os.getpid(), log=quiet())
    assert seen == ["installing"]
    assert system.read_trial(root) is None and store.pointer(root, "default") == 1


def _chunked_then(root, monkeypatch, second_install_error=None):
    """start_trial with a builder whose index bundle's install fails (its chunks never came), then whatever
    the whole bundle's install does: ([chunks asked per request], [bundles installed], the log, the push)."""
    asked, installed = [], []

    def fetch(root_, data, spec_text, *, upgrade, work, log, chunks=True):
        asked.append(chunks)
        bundle = work / "update.raucb"
        bundle.write_bytes(b"index" if chunks else b"whole")
        return bundle, ({"packages": [], "chunkStore": "v1"} if chunks else {"packages": []}), ["ssh", "b"]

    def install(root_, bundle, header, argv, log):
        installed.append(bundle.read_bytes())
        if header.get("chunkStore"):
            raise system.KioskError("rauc install on the device failed: casync: chunk 3f2a/3f2a... not found")
        if second_install_error:
            raise second_install_error

    monkeypatch.setattr(system, "fetch_bundle", fetch)
    monkeypatch.setattr(system, "_install", install)
    monkeypatch.setattr(system, "rauc_status", lambda: {"slots": {"B": {"installed": "2026-12-06T03:00:00Z"}}})
    booted(root, "A")
    old, new = pushed(root)
    gen = add_generation(root, SECOND, commit=new)
    log = quiet()

    def push():
        system.start_trial(root, gen, store.generation(root, 1), commit=new, old_commit=old, data={
            "debian": {}, "hardware": "qemu"}, spec_text="{}", running={"debian": {}}, changes=["packages +hello"],
            pid=os.getpid(), log=log)
    return asked, installed, log, push


def test_a_chunked_install_that_fails_is_done_again_from_the_whole_bundle(device, monkeypatch):
    asked, installed, log, push = _chunked_then(device, monkeypatch)
    push()
    assert asked == [True, False] and installed == [b"index", b"whole"]
    assert any("the chunked install failed (rauc install on the device failed: casync: chunk" in line
               and "asking for the whole bundle instead" in line for line in log.lines), log.lines
    assert system.read_trial(device)["state"] == "installed" and store.pointer(device, "default") == 2


def test_a_whole_bundle_that_fails_too_leaves_no_try_and_a_refused_signature_is_final(device, monkeypatch):
    asked, installed, _, push = _chunked_then(
        device, monkeypatch, system.KioskError("rauc install on the device failed: no space left"))
    with pytest.raises(system.KioskError, match="no space left"):
        push()
    assert asked == [True, False] and installed == [b"index", b"whole"]
    assert system.read_trial(device) is None and store.pointer(device, "default") == 1

    asked = []

    def refused(root_, bundle, header, argv, log):
        raise slots.BundleRefused("the device refused the bundle: it is not signed by the key this device trusts")

    monkeypatch.setattr(system, "_install", refused)
    monkeypatch.setattr(system, "fetch_bundle", lambda *a, **k: asked.append(k.get("chunks", True)) or (
        k["work"] / "update.raucb", {"packages": [], "chunkStore": "v1"}, []))
    with pytest.raises(slots.BundleRefused):
        system._install_or_whole(device, device / "x.raucb", {"chunkStore": "v1"}, [], {}, "{}", False, device, quiet())
    assert asked == []   # no second request: the whole bundle has the same signer


def test_a_push_during_a_trial_waits_and_one_git_never_recorded_is_undone(device, monkeypatch):
    root = device
    marks = []
    monkeypatch.setattr(system, "rauc_mark", lambda state, which="booted": marks.append((state, which)))
    act = activation.from_env(root)
    trial = start(root, pid=os.getpid(), state="installed")
    git(root, "update-ref", "refs/heads/main", trial["previousCommit"], trial["commit"])
    assert "still being recorded" in system.waiting_trial(root, act, quiet())   # receive-pack still runs
    store.write_state(store.state_dir(root) / system.TRIAL, dict(trial, pid=2 ** 22 + 7, pidStart=None))
    assert system.waiting_trial(root, act, quiet()) is None                     # it died: undone
    assert marks == [("bad", "other")]
    assert system.read_trial(root) is None and store.pointer(root, "default") == 1
    assert store.generation(root, 2).meta["status"] == "failed"


def test_a_push_while_the_device_restarts_into_a_trial_is_refused(device, tmp_path):
    root = device
    trial = start(root, state="installed")
    act = activation.from_env(root)
    said = system.waiting_trial(root, act, quiet())   # git recorded it, post-receive never restarted the device
    assert said.startswith(f"the device is trying commit {trial['commit'][:12]} in slot B")
    recorded = json.loads((tmp_path / "recording.json").read_text())
    assert ["reboot-soon", None] in recorded["calls"]
    assert system.read_trial(root)["state"] == "rebooting"


def test_a_builder_keeps_the_chunk_stores_devices_may_still_install_from(tmp_path, monkeypatch):
    import time

    from kiosk.buildhost import server

    monkeypatch.setenv("KIOSK_CACHE_DIR", str(tmp_path / "cache"))
    now = time.time()
    ages = {"newest": 0, "second": 60, "in-use": 3600, "old": 7 * 3600, "older": 8 * 3600}
    for name, age in ages.items():
        (server._stores() / name).mkdir()
        os.utime(server._stores() / name, (now - age, now - age))
    server.prune_stores()
    assert sorted(p.name for p in server._stores().iterdir()) == ["in-use", "newest", "second"]


# ---------------------------------------------------------------- the builder's side, for real

@pytest.mark.root
def test_a_builder_builds_the_system_as_a_bundle_signed_with_the_key_the_device_trusts(tmp_path, tmp_path_factory,
                                                                                      monkeypatch):
    """builder-serve's `bundle` request over real OpenSSH, as a device's push makes it: kiosk build's pipeline
    on the builder (the test cache), the bundle received, its signature checked against the device's
    certificate, from the second builder when the first is down; a device trusting another key gets the
    builder's refusal and nothing."""
    import shutil

    from boottools import boot_spec
    from imagetools import _cache_dir, _shared_dir
    from sshd_harness import Device as SshServer, free_port, key_set

    from kiosk.builders.client import ChunkSession
    from kiosk.builders.keys import device_public_key, ensure_device_key
    from kiosk.config.signing import RAUC_CERTIFICATE, signing_key
    from kiosk.core.paths import RAUC_CHUNK_STORE
    from kiosk.builders.chunkstore import ChunkServer
    from kiosk.core.errors import KioskError
    from kiosk.core.paths import BUILDER_KEY
    from kiosk.spec.load import loads

    if os.geteuid() != 0:
        pytest.skip("building an image needs root (the CI runs as root)")
    cache = _cache_dir(_shared_dir(tmp_path_factory))
    monkeypatch.setenv("KIOSK_CACHE_DIR", str(cache))
    keys = key_set(tmp_path, ["host", "client"])
    port = free_port()
    spec = boot_spec("qemu", keys["client_pub"], host="bundle-builder")
    down = free_port()   # a faster builder that is down: the device says so and asks the next
    spec["builders"] = [{"hostName": "127.0.0.1", "port": p, "systems": ["amd64"], "speedFactor": speed,
                         "publicHostKey": " ".join(keys["host_pub"].split()[:2])} for p, speed in ((down, 2), (port, 1))]
    text = json.dumps(spec, indent=2) + "\n"
    data = loads(text, "nixiosk.json").data
    (tmp_path / "builder").mkdir()
    builder = SshServer(tmp_path / "builder", spec, keys["client_pub"], keys["host"], port=port,
                        env={"KIOSK_CACHE_DIR": str(cache)})
    try:
        root = tmp_path / "device"
        cert = root / RAUC_CERTIFICATE.lstrip("/")
        cert.parent.mkdir(parents=True)
        shutil.copyfile(signing_key().cert, cert)
        lines: list[str] = []
        key = ensure_device_key(root, BUILDER_KEY, lines.append)
        r = kiosk_cli("builders", "authorize", "--key", "-", "--authorized-keys",
                      str(tmp_path / "builder" / "authorized_keys"), input=device_public_key(key))
        assert r.returncode == 0, r.stderr
        # a device whose system takes casync index bundles (as every image kiosk makes now)
        (root / "usr/bin").mkdir(parents=True)
        (root / "usr/bin/casync").symlink_to(shutil.which("casync"))
        (root / "etc/rauc/system.conf").write_text(f"[system]\nstorepath={RAUC_CHUNK_STORE}\n")
        assert system.takes_chunks(root)
        (tmp_path / "work").mkdir()
        bundle, header, argv = system.fetch_bundle(root, data, text, upgrade=False, work=tmp_path / "work",
                                                   log=lines.append)
        said = "\n".join(lines)
        assert f"builder 127.0.0.1:{down} unreachable (connection refused); trying 127.0.0.1:{port}..." in lines, said
        assert "127.0.0.1:%d: ==> rootfs" % port in said and "127.0.0.1:%d: ==> bundle" % port in said, said
        assert f"builder 127.0.0.1:{port}: bundle " in said and "signature checked" in said, said
        info = slots.bundle_info(bundle, cert)
        assert info["compatible"] == "kiosk-qemu"
        assert {"foot", "rauc"} <= {p["name"] for p in header["packages"]}
        # the index bundle came, its chunks stay on the builder: casync takes them through the device's relay
        # (the same ChunkSession and ChunkServer the install uses), each checked against the signed index
        assert bundle.stat().st_size < 4 << 20 < header["chunks"]["wholeBundle"], header["chunks"]
        index = tmp_path / "index"
        subprocess.run(["unsquashfs", "-q", "-d", str(index), str(bundle)], check=True, capture_output=True)
        caibx = next(index.glob("*.caibx"))
        with ChunkSession(argv, header["chunkStore"], relay=lines.append) as session, \
                ChunkServer(source=session.get) as relay:
            assert session.get("0000/" + "0" * 64) is None and session.get("abcd/" + "e" * 64) is None
            slot = tmp_path / "slot.ext4"
            subprocess.run(["casync", "extract", f"--store=http://127.0.0.1:{relay.port}/store", str(caibx),
                            str(slot)], check=True, capture_output=True, timeout=1200)
        count, size = relay.figures()
        assert count == header["chunks"]["count"] and size == header["chunks"]["bytes"], (count, size)
        conf = subprocess.run(["debugfs", "-R", "cat /etc/rauc/system.conf", str(slot)], check=True,
                              capture_output=True, text=True).stdout
        assert "compatible=kiosk-qemu" in conf and f"storepath={RAUC_CHUNK_STORE}" in conf, conf
        assert subprocess.run(["e2fsck", "-fn", str(slot)], capture_output=True).returncode == 0
        # a device that trusts another key: the builder refuses before building, nothing comes
        monkeypatch.setenv("KIOSK_CACHE_DIR", str(tmp_path / "other-user"))
        shutil.copyfile(signing_key().cert, cert)
        lines.clear()
        (tmp_path / "work2").mkdir()
        with pytest.raises(KioskError, match="no builder could build this system"):
            system.fetch_bundle(root, data, text, upgrade=False, work=tmp_path / "work2", log=lines.append)
        assert any("this builder signs updates with another key" in line for line in lines), lines
        assert not any(p.is_file() and p.name == "update.raucb" for p in (tmp_path / "work2").rglob("*"))
    finally:
        builder.close()
