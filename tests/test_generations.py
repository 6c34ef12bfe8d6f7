"""Generations on a device root in a temporary directory: the first one as the image build makes it,
switches in every mode, the activation plan, and kill -9 at every step of a switch, then recovery."""

import copy
import json
import os
import hashlib
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import kiosk_cli
from sshd_harness import EPOCH, copy_root, snapshot
from test_spec import ED25519, RSA

from kiosk.core.errors import InvalidSpec, KioskError
from kiosk.core.log import Log
from kiosk.device import activation, links, pending, provision, recover, store, switch
from kiosk.core import paths as resources
from kiosk.config.render import render
from kiosk.spec.load import check
from kiosk.spec.plan import make_plan

BASE = {
    "hostName": "lobby", "hardware": "raspberryPi3", "authorizedKeys": [ED25519],
    "program": {"package": "cog", "executable": "/usr/bin/cog", "args": ["https://example.org/"]},
    "networks": {"cafe": "correct horse battery"},
    "locale": {"lang": "en_US.UTF-8", "regDom": "US", "timeZone": "America/New_York"},
}
# Every kind of change at once: host name, program, a symlink (/etc/localtime), files that go away
# (Wi-Fi), files and links that come (console login), masks that go, a unit that is no longer wanted.
SECOND = dict(copy.deepcopy(BASE), hostName="hall", networks={}, allowKioskLogin=True, authorizedKeys=[ED25519, RSA],
              program={"package": "cog", "executable": "/usr/bin/cog", "args": ["https://example.org/hall"]},
              locale={"lang": "en_US.UTF-8", "regDom": "US", "timeZone": "Europe/Berlin"})


def spec_text(data) -> str:
    return json.dumps(data, indent=2) + "\n"


def install(root, data=BASE):
    text = spec_text(data)
    spec = check(copy.deepcopy(data)).data
    return provision.install_first_generation(root, text, render(spec), make_plan(spec), epoch=EPOCH,
                                              hooks_dir=resources.hooks_dir())


def add_generation(root, data, commit="f" * 40):
    spec = check(copy.deepcopy(data)).data
    from kiosk.spec.plan import make_plan
    return store.write_generation(root, spec_text(data), render(spec), commit=commit,
                                 packages=make_plan(spec).packages, previous=store.pointer(root))


def statuses(root):
    return {g.number: g.meta["status"] for g in store.list_generations(root)}


@pytest.fixture
def device(tmp_path, monkeypatch_offline):
    root = tmp_path / "device"
    root.mkdir()
    install(root)
    return root


@pytest.fixture
def recording(tmp_path, monkeypatch):
    path = tmp_path / "recording.json"
    path.write_text("{}")
    monkeypatch.setenv("KIOSK_ACTIVATOR", f"recording:{path}")
    monkeypatch.setenv("KIOSK_HEALTH_SECONDS", "0")
    return path


def calls(recording):
    return json.loads(recording.read_text()).get("calls", [])


# ---------------------------------------------------------------- generation 1 in the image

def test_first_generation_is_complete_linked_private_and_reproducible(tmp_path, monkeypatch_offline):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    commit = install(a)
    assert install(b) == commit  # the commit sha depends only on (spec text, epoch)
    assert snapshot(a) == snapshot(b)
    times = {p: os.lstat(a / p).st_mtime for p in snapshot(a)}
    assert set(times.values()) == {EPOCH}  # every file, link and directory made or changed

    repo = a / resources.REPO
    assert stat.S_IMODE(repo.stat().st_mode) == 0o700  # Wi-Fi passphrases
    for hook in ("pre-receive", "post-receive"):
        assert stat.S_IMODE((repo / "hooks" / hook).stat().st_mode) == 0o755
    config = (repo / "config").read_text()
    assert "denyNonFastForwards = true" in config and "denyDeletes = true" in config
    assert (repo / "HEAD").read_text() == "ref: refs/heads/main\n"
    assert pending.repo_main(a) == commit

    gen = store.generation(a, 1)
    assert gen.spec_text == spec_text(BASE)
    assert stat.S_IMODE((gen.path / "nixiosk.json").stat().st_mode) == 0o600
    meta = gen.meta
    assert meta["number"] == 1 and meta["status"] == "active" and meta["previous"] is None
    assert meta["commit"] == pending.repo_main(a) and meta["date"] == "2023-11-14T22:13:20Z"
    assert "cog" in meta["packages"] and "linux-image-arm64" in meta["packages"]
    assert store.pointer(a, "current") == store.pointer(a, "default") == 1
    assert os.readlink(a / "var/lib/kiosk/current") == "generations/1"
    # relative links through `current`: they resolve inside whatever tree holds them
    assert os.readlink(a / "etc/hostname") == "../var/lib/kiosk/current/root/etc/hostname"
    assert os.readlink(a / "etc/systemd/system/kiosk.service") == \
        "../../../var/lib/kiosk/current/root/etc/systemd/system/kiosk.service"
    assert (a / "etc/hostname").resolve() == (a / "var/lib/kiosk/generations/1/root/etc/hostname").resolve()
    assert (a / "etc/hostname").read_text() == "lobby\n"
    assert os.readlink(a / "etc/localtime") == "/usr/share/zoneinfo/America/New_York"
    assert stat.S_IMODE((gen.path / "root/etc/wpa_supplicant/wpa_supplicant-wlan0.conf").stat().st_mode) == 0o600
    assert links.verify(a) == []
    manifest = gen.manifest
    assert manifest["/etc/hostname"] == {"kind": "file", "mode": "0644", "uid": 0, "gid": 0,
                                         "sha256": __import__("hashlib").sha256(b"lobby\n").hexdigest()}
    assert manifest["/etc/localtime"] == {"kind": "symlink", "target": "/usr/share/zoneinfo/America/New_York"}

    with pytest.raises(Exception, match="already has generations"):
        install(a)


def test_read_running_gives_a_reader_the_spec_and_meta_and_never_raises(device, tmp_path):
    """What the agent announces: the running generation's nixiosk.json and meta.json, {} for what is unreadable."""
    spec, meta = store.read_running(store.state_dir(device))
    assert spec["hostName"] == "lobby" and meta["number"] == 1 and meta["commit"] == pending.repo_main(device)
    warnings = []
    assert store.read_running(tmp_path / "nothing", warnings.append) == ({}, {}) and warnings == []
    broken = tmp_path / "broken"
    (broken / "generations/1").mkdir(parents=True)
    (broken / "generations/1/nixiosk.json").write_text("{")
    (broken / "generations/1/meta.json").write_text("[1]")
    (broken / "current").symlink_to("generations/1")
    assert store.read_running(broken, warnings.append) == ({}, {})
    assert len(warnings) == 1 and warnings[0].startswith(f"cannot read {broken}/current/nixiosk.json (")


def test_first_generation_replaces_the_layer_written_as_plain_files(tmp_path, monkeypatch_offline):
    """The image build writes the layer as plain files first (the boot stage reads them): they become links."""
    from kiosk.config.layer import apply_layer
    root = tmp_path / "tree"
    apply_layer(render(check(copy.deepcopy(BASE)).data), root, mtime=EPOCH)
    assert (root / "etc/hostname").is_file() and not (root / "etc/hostname").is_symlink()
    install(root)
    assert (root / "etc/hostname").is_symlink()
    assert links.verify(root) == []
    # systemd's --root tools follow the links inside the tree (they ignore absolute ones: systemd 252)
    if shutil.which("systemd-sysusers"):
        for name in ("passwd", "group", "shadow", "gshadow"):
            (root / "etc" / name).touch()
        r = subprocess.run(["systemd-sysusers", f"--root={root}"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert (root / "etc/passwd").read_text().startswith("kiosk:x:990:990:Kiosk display:/home/kiosk:")


def test_recovery_unit_runs_early_and_only_when_needed():
    path, text = provision.recovery_unit()
    assert path == "/etc/systemd/system/kiosk-recover.service"
    assert "ExecStart=/usr/bin/kiosk switch --recover --at-boot\n" in text
    assert "DefaultDependencies=no\n" in text and "Before=sysinit.target" in text
    for marker in ("switch.json", "pending.json", "default-differs"):
        assert f"ConditionPathExists=|/var/lib/kiosk/{marker}\n" in text
    layer = provision.recovery_layer()
    assert layer["/etc/systemd/system/sysinit.target.wants/kiosk-recover.service"].target == path


# ---------------------------------------------------------------- the activation plan

def test_activation_plan_between_two_specs(monkeypatch_offline):
    first = store.manifest_of(render(check(copy.deepcopy(BASE)).data))
    second_layer = render(check(copy.deepcopy(SECOND)).data)
    second = store.manifest_of(second_layer)
    texts = {p: e.data.decode(errors="replace") for p, e in second_layer.items() if e.kind == "file"}
    old_texts = {p: e.data.decode(errors="replace") for p, e in render(check(copy.deepcopy(BASE)).data).items() if e.kind == "file"}
    plan = activation.plan(first, second, new_texts=texts, old_texts=old_texts)
    assert plan.commands == [["usermod", "--shell", "/bin/bash", "kiosk"]]  # sysusers never changes a user
    assert plan.daemon_reload
    assert plan.hostname == "hall"
    # Wi-Fi gone; the login masks gone (template masks: their instances are not stopped, nothing ran)
    assert plan.stop == ["wpa_supplicant@wlan0.service"]
    assert plan.start == ["getty@tty2.service"]
    # kiosk: its ExecStart changed, and the time zone; sysusers: the kiosk user's shell (login allowed)
    assert plan.restart == ["kiosk.service", "systemd-sysusers.service"]
    assert plan.try_restart == ["serial-getty@*.service"]  # a drop-in for the template: running instances
    assert "at the next boot: the Wi-Fi regulatory domain (cfg80211 module option)" not in plan.lines()
    assert plan.touched_units() == ["getty@tty2.service", "kiosk.service", "systemd-sysusers.service"]

    same = activation.plan(first, first)
    assert same.empty() and same.lines() == []

    # only the SSH keys: nothing to restart (read at every login)
    keys = store.manifest_of(render(check(dict(copy.deepcopy(BASE), authorizedKeys=[ED25519, RSA])).data))
    assert activation.plan(first, keys).empty()

    # the regulatory domain: wpa_supplicant's country= now, the cfg80211 option at the next boot
    reg = store.manifest_of(render(check(dict(copy.deepcopy(BASE), locale=dict(BASE["locale"], regDom="DE"))).data))
    p = activation.plan(first, reg)
    assert p.at_boot == ["the Wi-Fi regulatory domain (cfg80211 module option)"]
    assert p.restart == ["wpa_supplicant@wlan0.service"] and not p.daemon_reload

    # firmware settings: the switch itself rewrites config.txt (device/bootconfig.py); the firmware reads it at
    # the next boot
    fw_spec = dict(copy.deepcopy(BASE), raspberryPi={"firmwareConfig": "hdmi_force_hotplug=1"})
    fw = store.manifest_of(render(check(fw_spec).data))
    p = activation.plan(first, fw)
    assert p.commands == []
    assert p.at_boot == ["firmware settings (config.txt/cmdline.txt rewritten now, read at the next boot)"]
    assert p.restart == [] and p.stop == [] and p.start == []


def test_unit_names_from_paths():
    assert activation.unit_of("/etc/systemd/system/kiosk.service") == "kiosk.service"
    assert activation.unit_of("/etc/systemd/system/ssh.service.d/x.conf") == "ssh.service"
    assert activation.unit_of("/etc/systemd/system/getty@.service") == "getty@*.service"
    assert activation.unit_of("/etc/systemd/system/multi-user.target.wants/a.service") is None
    assert activation.wanted_unit("/etc/systemd/system/multi-user.target.wants/a.service") == "a.service"
    assert activation.unit_of("/etc/hostname") is None


# ---------------------------------------------------------------- switching

def test_switch_test_boot_and_dry_activate(device, recording):
    root = device
    add_generation(root, SECOND)
    before = snapshot(root)
    r = kiosk_cli("switch", "dry-activate", "2", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert "    units to stop: wpa_supplicant@wlan0.service\n" in r.stderr
    assert "    dry-activate: nothing was changed\n" in r.stderr
    assert snapshot(root) == before and calls(recording) == []

    # test: activate now, keep the boot default; the next boot returns to it
    r = kiosk_cli("switch", "test", "2", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert store.pointer(root, "current") == 2 and store.pointer(root, "default") == 1
    assert (root / "var/lib/kiosk/default-differs").read_text() == "1\n"
    assert links.verify(root) == []
    assert ["set-hostname", "hall"] in calls(recording)
    assert calls(recording)[-2] == ["run", ["usermod", "--shell", "/bin/bash", "kiosk"]]
    assert not (root / "etc/wpa_supplicant/wpa_supplicant-wlan0.conf").is_symlink()
    r = kiosk_cli("switch", "--recover", "--at-boot", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert store.pointer(root, "current") == store.pointer(root, "default") == 1
    assert links.verify(root) == [] and calls(recording)[-1] == ["boot-reconcile", None]
    assert not (root / "var/lib/kiosk/default-differs").exists()
    assert (root / "etc/wpa_supplicant/wpa_supplicant-wlan0.conf").is_symlink()

    # boot: nothing changes now; the next boot runs it
    n = len(calls(recording))
    r = kiosk_cli("switch", "boot", "2", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert store.pointer(root, "current") == 1 and store.pointer(root, "default") == 2
    assert len(calls(recording)) == n and links.verify(root) == []
    r = kiosk_cli("switch", "--recover", "--at-boot", "--root", str(root))
    assert r.returncode == 0
    assert store.pointer(root, "current") == 2 and links.verify(root) == []
    assert statuses(root) == {1: "superseded", 2: "active"}

    # switch (back to 1) and the listing
    r = kiosk_cli("switch", "switch", "1", "--root", str(root))
    assert r.returncode == 0, r.stderr
    r = kiosk_cli("generations", "--json", "--root", str(root))
    listing = json.loads(r.stdout)
    assert listing["current"] == listing["default"] == 1
    assert [(g["number"], g["status"], g["current"]) for g in listing["generations"]] == \
        [(1, "active", True), (2, "superseded", False)]
    r = kiosk_cli("generations", "--root", str(root))
    assert r.stdout.splitlines()[0] == "   GEN  DATE                  COMMIT        STATUS       NOTE"
    assert r.stdout.splitlines()[1] == f"*    1  2023-11-14T22:13:20Z  {pending.repo_main(root)[:12]}  active       current; default"
    assert r.stdout.splitlines()[2] == "     2  " + store.generation(root, 2).meta["date"] + "  ffffffffffff  superseded   "


def test_rollback_command(device, recording):
    root = device
    add_generation(root, SECOND)
    assert kiosk_cli("switch", "switch", "--root", str(root)).returncode == 0  # newest: 2
    assert store.pointer(root) == 2
    r = kiosk_cli("rollback", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert "==> rolling back from generation 2 to 1\n" in r.stderr
    assert store.pointer(root) == store.pointer(root, "default") == 1
    assert statuses(root) == {1: "active", 2: "rolled-back"}
    assert links.verify(root) == []
    r = kiosk_cli("rollback", "--root", str(root))
    assert r.returncode == 1 and "no earlier good generation to roll back to" in r.stderr


def test_a_failing_unit_rolls_back_by_itself(device, recording):
    root = device
    recording.write_text(json.dumps({"fail": [{"unit": "kiosk.service", "reason": "exited at once (status 1)",
                                               "when": "example.org/hall"}]}))
    add_generation(root, SECOND)
    r = kiosk_cli("switch", "switch", "2", "--root", str(root))
    assert r.returncode == 1
    assert "    FAILED kiosk.service: exited at once (status 1)\n" in r.stderr
    assert "kiosk: rolled back to generation 1: generation 2 failed: kiosk.service: exited at once (status 1)" \
        in r.stderr
    assert store.pointer(root) == store.pointer(root, "default") == 1
    assert statuses(root) == {1: "active", 2: "failed"}
    assert store.generation(root, 2).meta["reason"] == "kiosk.service: exited at once (status 1)"
    assert links.verify(root) == [] and switch.read_journal(root) is None
    # the way back was activated too: Wi-Fi started again, the console login stopped
    assert ["start", ["wpa_supplicant@wlan0.service"]] in calls(recording)
    assert ["stop", ["autovt@*.service", "console-getty.service", "getty@*.service", "getty@tty2.service",
                     "serial-getty@*.service"]] in calls(recording)  # masked again: no login prompt anywhere
    assert calls(recording)[-1] == ["health", ["kiosk-agent.service", "kiosk.service", "systemd-sysusers.service",
                                               "wpa_supplicant@wlan0.service"]]


# ---------------------------------------------------------------- kill -9, then recovery

CRASH_STEPS = ["begin", "stopped", "linked", "flipped", "symlinks", "cleaned", "activated", "healthy"]


@pytest.fixture(scope="module")
def two_generations(tmp_path_factory):
    root = tmp_path_factory.mktemp("template") / "device"
    root.mkdir()
    with pytest.MonkeyPatch.context() as offline:  # offline only while the template is made
        offline.setenv("KIOSK_OFFLINE", "1")
        install(root)
        add_generation(root, SECOND)
    return root


def assert_consistent_on(root, number):
    """ONE complete generation: every path linked into it, nothing of another left, pointers agree."""
    assert switch.read_journal(root) is None
    assert store.pointer(root, "current") == store.pointer(root, "default") == number
    assert links.verify(root) == []
    target = store.generation(root, number)
    for path, entry in target.manifest.items():
        live = root / path.lstrip("/")
        if entry["kind"] == "file":  # the link chain ends in this generation, inside ROOT
            assert live.resolve() == (target.path / "root" / path.lstrip("/")).resolve()
    assert not list((root / "var/lib/kiosk/generations").glob(".tmp-*"))


@pytest.mark.parametrize("step", CRASH_STEPS)
def test_kill_9_during_a_switch_then_recover(two_generations, tmp_path, recording, step):
    root = copy_root(two_generations, tmp_path / "device")
    r = kiosk_cli("switch", "switch", "2", "--root", str(root), env={"KIOSK_TEST_CRASH_AT": step})
    assert r.returncode == -9, r.stderr  # really killed
    journal = switch.read_journal(root)
    assert journal["step"] == step and journal["safe"] == 1
    r = kiosk_cli("switch", "--recover", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert f"an interrupted switch from generation 1 to 2 (at step {step}): returning to generation 1" in r.stderr
    assert_consistent_on(root, 1)
    assert statuses(root)[1] == "active"
    assert statuses(root)[2] in ("failed", "built")
    # recovery is idempotent
    r = kiosk_cli("switch", "--recover", "--root", str(root))
    assert r.returncode == 0 and "(nothing to recover)" in r.stderr
    # and the device can still switch afterwards
    assert kiosk_cli("switch", "switch", "2", "--root", str(root)).returncode == 0
    assert_consistent_on(root, 2)


@pytest.mark.parametrize("step", ["linked", "flipped", "cleaned"])
def test_kill_9_during_a_rollback_then_recover(two_generations, tmp_path, recording, step):
    """A rollback interrupted is finished: the device ends on the good generation, never the failed one."""
    root = copy_root(two_generations, tmp_path / "device")
    recording.write_text(json.dumps({"fail": [{"unit": "kiosk.service", "when": "hall"}]}))
    r = kiosk_cli("switch", "switch", "2", "--root", str(root), env={"KIOSK_TEST_CRASH_AT": f"rollback-{step}"})
    assert r.returncode == -9, r.stderr
    assert switch.read_journal(root)["purpose"] == "rollback"
    r = kiosk_cli("switch", "--recover", "--at-boot", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert_consistent_on(root, 1)
    assert statuses(root) == {1: "active", 2: "failed"}


def test_a_build_cut_short_is_never_a_generation(device, recording):
    tmp = device / "var/lib/kiosk/generations/.tmp-2"
    (tmp / "root/etc").mkdir(parents=True)
    r = kiosk_cli("switch", "--recover", "--root", str(device))
    assert r.returncode == 0
    assert not tmp.exists() and [g.number for g in store.list_generations(device)] == [1]


# ---------------------------------------------------------------- a push whose ref update never happened

def test_unconfirmed_push_is_undone_at_boot(device, recording):
    root = device
    gen = add_generation(root, SECOND, commit="e" * 40)
    assert kiosk_cli("switch", "switch", "2", "--root", str(root)).returncode == 0
    pending.write_pending(root, "e" * 40, gen.number, 1, pid=2 ** 22 + 7)  # no such process
    r = kiosk_cli("switch", "--recover", "--at-boot", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert "generation 2's push did not complete; returning to generation 1" in r.stderr
    assert_consistent_on(root, 1)
    assert statuses(root) == {1: "active", 2: "failed"}
    assert pending.read_pending(root) is None


def test_unconfirmed_push_is_undone_by_the_next_push(device, recording):
    root = device
    gen = add_generation(root, SECOND, commit="e" * 40)
    assert kiosk_cli("switch", "switch", "2", "--root", str(root)).returncode == 0
    pending.write_pending(root, "e" * 40, gen.number, 1, pid=2 ** 22 + 7)
    log = Log(open(os.devnull, "w"))
    assert recover.resolve_pending(root, activation.from_env(root), log) == "reverted"
    assert_consistent_on(root, 1)
    # a pending push whose receive-pack still runs is waited for, not undone
    pending.write_pending(root, "e" * 40, gen.number, 1, pid=os.getpid())
    assert recover.resolve_pending(root, activation.from_env(root), log) == "in-progress"
    # and one git did record is confirmed
    pending.write_pending(root, pending.repo_main(root), 1, None, pid=2 ** 22 + 7)
    assert recover.resolve_pending(root, activation.from_env(root), log) == "confirmed"


def set_status(root, number, status):
    store.update_meta(store.generation(root, number), status=status)


def test_prune_keeps_what_rollback_needs_and_nothing_else(device):
    root = device
    for _ in range(12):
        add_generation(root, SECOND)  # 2..13
    for n in range(2, 7):
        set_status(root, n, "superseded")
    for n in (7, 8, 9, 10, 11, 13):
        set_status(root, n, "failed")
    set_status(root, 12, "rolled-back")
    pending.write_pending(root, "e" * 40, 8, 1, pid=2 ** 22 + 7)              # a pending push names 8
    store.write_state(switch.journal_path(root), {"from": 1, "to": 3, "safe": 1, "mode": "switch",
                                                  "purpose": "push", "defaultBefore": 1, "step": "begin"})
    (root / "var/lib/kiosk/generations/9/meta.json").write_text("{not json")  # damaged: left to a person
    lines = []
    # kept: 1 (current, default), 13 (the newest), 5 6 12 (the 3 newest good besides 1... counted with it:
    # good = 1-6, 12, the newest 3 of them are 5, 6, 12), 8 (pending), 3 (the journal), 9 (damaged)
    assert switch.prune(root, lines.append, keep=3) == [2, 4, 7, 10, 11]
    assert [g.number for g in store.list_generations(root)] == [1, 3, 5, 6, 8, 9, 12, 13]
    assert lines == ["deleted 5 old generation(s): 2, 4, 7, 10, 11"]
    assert not list((root / "var/lib/kiosk/generations").glob(".*"))
    # the next number is never one given out before
    assert store.write_generation(root, spec_text(BASE), {}, commit="0" * 40, packages=[], previous=1).number == 14
    switch.journal_path(root).unlink()
    pending.clear_pending(root)
    assert links.verify(root) == []
    # with nothing pending, the default keep (10) and a push's generations all failed: only 1 and the newest stay
    for n in (3, 5, 6, 12):
        set_status(root, n, "failed")
    (root / "var/lib/kiosk/generations/9/meta.json").write_text(json.dumps({"status": "failed", "commit": "",
                                                                            "packages": []}))
    assert switch.prune(root, lines.append) == [3, 5, 6, 8, 9, 12, 13]
    assert [g.number for g in store.list_generations(root)] == [1, 14]


def test_health_seconds_must_be_finite_and_not_negative(monkeypatch):
    """Every numeric KIOSK_* setting goes through paths.number_setting: nan, inf and out-of-range
    values are one clear error there (time.sleep(nan) would be an internal error)."""
    for bad in ("nan", "inf", "-1", "soon"):
        monkeypatch.setenv("KIOSK_HEALTH_SECONDS", bad)
        with pytest.raises(KioskError, match=f"KIOSK_HEALTH_SECONDS='{bad}' is not a number of seconds, 0 or more"):
            activation.settle_seconds()
    monkeypatch.setenv("KIOSK_HEALTH_SECONDS", "0")
    assert activation.settle_seconds() == 0


def test_prune_keep_setting_and_an_unreadable_state_file(device, monkeypatch):
    add_generation(device, SECOND)
    set_status(device, 2, "failed")
    add_generation(device, SECOND)
    for bad in ("0", "2.5", "-3", "nan", "many"):
        monkeypatch.setenv("KIOSK_KEEP_GENERATIONS", bad)
        with pytest.raises(KioskError, match="KIOSK_KEEP_GENERATIONS="):
            switch.prune(device, print)
    monkeypatch.setenv("KIOSK_KEEP_GENERATIONS", "1")
    (device / "var/lib/kiosk/pending.json").write_text("[]")
    lines = []
    assert switch.prune(device, lines.append) == []  # what it names is unknown: nothing is deleted
    assert lines == [f"not deleting old generations: {device}/var/lib/kiosk/pending.json is damaged: a JSON list, "
                     "not an object; kiosk switch --recover sets it aside"]
    (device / "var/lib/kiosk/pending.json").unlink()
    assert switch.prune(device, lines.append) == [2]


def test_a_power_cut_in_the_middle_of_a_prune(device, recording):
    """kill -9 between a generation's rename and the deletion of its files: the store lists only whole
    generations, and recovery deletes what is left."""
    root = device
    for _ in range(4):
        add_generation(root, SECOND)
    for n in (2, 3, 4):
        set_status(root, n, "failed")
    code = f"from kiosk.device import switch; switch.prune({str(root)!r}, print)"
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, KIOSK_TEST_CRASH_AT="prune"),
                       capture_output=True, text=True)
    assert r.returncode == -9, r.stderr  # really killed, after the first rename
    base = root / "var/lib/kiosk/generations"
    assert sorted(p.name for p in base.iterdir()) == [".tmp-gone-2", "1", "3", "4", "5"]
    assert [g.number for g in store.list_generations(root)] == [1, 3, 4, 5]
    assert links.verify(root) == []
    r = kiosk_cli("switch", "--recover", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert "generation 1 is linked (nothing to recover)" in r.stderr
    assert sorted(p.name for p in base.iterdir()) == ["1", "3", "4", "5"]
    assert switch.prune(root, print) == [3, 4]
    assert_consistent_on(root, 1)


# ---------------------------------------------------------------- what a damaged device says

def test_rollback_and_switch_to_no_such_generation(device, recording):
    root = device
    add_generation(root, SECOND)
    before = snapshot(root)
    for argv in (["rollback", "0"], ["rollback", "-1"], ["switch", "switch", "0"], ["switch", "test", "-2"]):
        r = kiosk_cli(*argv, "--root", str(root))
        assert r.returncode == 2, (argv, r.stderr)
        assert r.stderr == f"kiosk: there is no generation {argv[-1]}: generations are numbered from 1; " \
                           "see: kiosk generations\n"
    for argv in (["rollback", "7"], ["switch", "boot", "7"]):
        r = kiosk_cli(*argv, "--root", str(root))
        assert (r.returncode, r.stderr) == (2, "kiosk: there is no generation 7; see: kiosk generations\n")
    assert snapshot(root) == before and calls(recording) == []


DAMAGED_META = [
    ("not-json", b"{\"status\": \"active\"", "meta.json is not readable JSON (Expecting ',' delimiter"),
    ("empty", b"", "meta.json is not readable JSON (Expecting value"),
    ("binary", b"\xff\xfe\x00garbage", "meta.json is not readable JSON ("),
    ("a-list", b"[1, 2]", "meta.json is a JSON list, not an object"),
    ("no-status", b'{"commit": "", "packages": []}', 'meta.json has no "status"'),
    ("odd-status", b'{"status": "happy", "commit": "", "packages": []}', "meta.json has the unknown status 'happy'"),
    ("packages-string", b'{"status": "active", "commit": "", "packages": "cog"}', 'meta.json "packages" is not a list'),
    ("previous-string", b'{"status": "superseded", "commit": "", "packages": [], "previous": "1"}',
     'meta.json "previous" has the wrong type'),
]


@pytest.mark.parametrize("name,content,why", DAMAGED_META, ids=[d[0] for d in DAMAGED_META])
def test_a_damaged_meta_json_is_shown_skipped_and_recovered_from(device, recording, name, content, why):
    root = device
    add_generation(root, SECOND)
    add_generation(root, SECOND)
    assert kiosk_cli("switch", "switch", "3", "--root", str(root)).returncode == 0
    meta2 = root / "var/lib/kiosk/generations/2/meta.json"
    set_status(root, 2, "superseded")
    meta2.write_bytes(content)

    r = kiosk_cli("generations", "--root", str(root))
    assert r.returncode == 0, r.stderr
    row = r.stdout.splitlines()[2]
    assert row.startswith(f"{'':2}{2:>4}  {'':20}  {'':12}  {'damaged':11}  damaged: {why}"), row
    listing = json.loads(kiosk_cli("generations", "--json", "--root", str(root)).stdout)
    assert listing["generations"][1]["status"] == "damaged"

    r = kiosk_cli("rollback", "2", "--root", str(root))
    assert r.returncode == 1 and r.stderr.startswith("kiosk: generation 2 is damaged: " + why), r.stderr
    assert len(r.stderr.splitlines()) == 1 and store.pointer(root) == 3
    # the previous good one is 1: the damaged one is skipped, not a traceback
    r = kiosk_cli("rollback", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert store.pointer(root) == 1
    assert kiosk_cli("switch", "switch", "--root", str(root)).returncode == 0  # the newest not failed: 3
    assert store.pointer(root) == 3
    # the current one damaged: listed, rolled back from, recovered with
    (root / "var/lib/kiosk/generations/3/meta.json").write_bytes(content)
    r = kiosk_cli("generations", "--root", str(root))
    assert r.returncode == 0 and r.stdout.splitlines()[3].startswith(f"* {3:>4}  {'':20}  {'':12}  damaged "), r.stdout
    r = kiosk_cli("rollback", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert store.pointer(root) == 1 and statuses(root)[1] == "active"
    r = kiosk_cli("switch", "--recover", "--at-boot", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert links.verify(root) == []
    # a damaged meta.json is evidence: rewritten only when kiosk decides a status for it
    assert (root / "var/lib/kiosk/generations/2/meta.json").read_bytes() == content
    assert statuses(root)[3] == "damaged"


def test_a_damaged_journal_or_pending_file_is_recovered_from(two_generations, tmp_path, recording):
    root = copy_root(two_generations, tmp_path / "device")
    r = kiosk_cli("switch", "switch", "2", "--root", str(root), env={"KIOSK_TEST_CRASH_AT": "flipped"})
    assert r.returncode == -9 and store.pointer(root) == 2
    journal = root / "var/lib/kiosk/switch.json"
    journal.write_text('{"from": 1, "to": 2, "safe": "one"}')
    (root / "var/lib/kiosk/pending.json").write_text("\x00\x01")
    r = kiosk_cli("switch", "--recover", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert f"{root}/var/lib/kiosk/pending.json is damaged: not readable JSON (" in r.stderr
    assert f'{journal} is damaged: "safe" is missing or of the wrong type' in r.stderr
    assert "returning to generation 1 (the journal of the interrupted switch is damaged)" in r.stderr
    assert_consistent_on(root, 1)
    assert not (root / "var/lib/kiosk/pending.json").exists()
    # a journal naming a generation that is not there
    store.write_state(journal, {"from": 1, "to": 2, "safe": 9, "mode": "switch", "purpose": "push",
                                "defaultBefore": 1, "step": "linked"})
    r = kiosk_cli("switch", "--recover", "--at-boot", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert "names generation 9, which does not exist" in r.stderr
    assert_consistent_on(root, 1)


@pytest.mark.parametrize("value", ["abc", "nan", "inf", "-1", ""])
def test_a_bad_lock_timeout_is_one_line(device, value):
    r = subprocess.run([shutil.which("kiosk", path=os.path.dirname(sys.executable)), "rollback", "--root",
                        str(device)], env=dict(os.environ, KIOSK_LOCK_TIMEOUT=value), capture_output=True,
                       text=True, timeout=20)
    if value == "":  # unset in effect: the default; nothing to roll back to
        assert r.stderr == "kiosk: no earlier good generation to roll back to; see: kiosk generations\n"
        return
    assert r.returncode == 1
    assert r.stderr.startswith(f"kiosk: KIOSK_LOCK_TIMEOUT={value!r} is not a "), r.stderr
    assert r.stderr.endswith("; unset it or give seconds, e.g. KIOSK_LOCK_TIMEOUT=600\n")
    assert len(r.stderr.splitlines()) == 1


# ---------------------------------------------------------------- a hostile root, git's lines on the hooks' stdin

def _kiosk(*argv, env=None, stdin=None):
    return subprocess.run([shutil.which("kiosk", path=os.path.dirname(sys.executable)), *argv], capture_output=True,
                          env=dict(os.environ, KIOSK_ACTIVATOR="none", **(env or {})), timeout=30,
                          **({"stdin": subprocess.DEVNULL} if stdin is None else {"input": stdin}))


@pytest.mark.parametrize("kind", ["fifo", "device", "file", "missing"])
def test_a_root_that_is_not_a_directory_is_one_line_before_anything_reads_it(tmp_path, kind):
    """--root (or KIOSK_ROOT for the hooks) naming a FIFO, a device node, a file or nothing: `generations`
    listed it as an empty device (exit 0 with --json, exit 1 with its message on stdout), `switch --recover`
    was an internal error (NotADirectoryError). Now: one line on stderr, exit 2, nothing made anywhere."""
    root = tmp_path / "root"
    if kind == "fifo":
        os.mkfifo(root)
    elif kind == "device":
        try:
            os.mknod(root, 0o600 | stat.S_IFCHR, os.makedev(1, 5))   # a /dev/zero of our own
        except OSError as exc:
            pytest.skip(f"cannot make a device node here: {exc}")
    elif kind == "file":
        root.write_bytes(b"\x55\xaa")
    said = "no such directory" if kind == "missing" else "not a directory but a "
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in (["generations"], ["generations", "--json"], ["rollback"], ["rollback", "1"], ["switch", "--recover"],
                 ["switch", "switch", "1"], ["switch", "dry-activate"]):
        r = _kiosk(*argv, "--root", str(root))
        assert r.returncode == 2 and r.stdout == b"", (argv, r)
        assert r.stderr.decode().startswith(f"kiosk: --root {root}: {said}") and r.stderr.count(b"\n") == 1, (argv, r)
    for hook in ("pre-receive", "post-receive"):
        r = _kiosk("hook", hook, env={"KIOSK_ROOT": str(root)}, stdin=b"")
        assert r.returncode == 2 and r.stderr.decode().startswith(f"kiosk: KIOSK_ROOT {root}: {said}"), r
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_no_generations_is_said_on_stderr(tmp_path):
    r = _kiosk("generations", "--root", str(tmp_path))
    assert r.returncode == 1 and r.stdout == b"", r
    assert r.stderr.decode() == f"kiosk: no generations under {tmp_path}/var/lib/kiosk/generations; is this a " \
        "kiosk device (or --root its root)?\n"


GOOD_UPDATE = b"0" * 40 + b" " + b"f" * 40 + b" refs/heads/main\n"
BAD_UPDATES = {
    "zeros": (b"\0" * (2 << 20), "more than 1 MiB"),
    "blank-lines": (b"\n" * 1000 + GOOD_UPDATE, "line 1 is not '<40 hex digits> <40 hex digits> refs/...': empty"),
    "binary": (bytes(range(256)) * 16, "line 1 is not '<40 hex digits> <40 hex digits> refs/...': '\\x00\\x01"),
    "not-utf8": (GOOD_UPDATE + GOOD_UPDATE.replace(b"main", b"ma\xffin"), "line 2 is not UTF-8 text"),
    "surrogate": (b'{"hostName": "\\ud800"}\n', "line 1 is not '<40 hex digits> <40 hex digits> refs/...': "),
    "short-name": (GOOD_UPDATE[1:], "line 1 is not "),
    "two-spaces": (GOOD_UPDATE.replace(b" refs", b"  refs"), "line 1 is not "),
    "control": (GOOD_UPDATE.replace(b"main", b"ma\x1bin"), "line 1 is not "),
}


@pytest.mark.parametrize("name", BAD_UPDATES)
def test_the_hooks_take_only_gits_update_lines(device, name):
    """What git feeds the hooks on stdin was read whole (/dev/zero: a MemoryError) and every line that did not
    split in three skipped. Now at most 1 MiB of '<old> <new> <ref>' lines; anything else is one line, exit 2
    (pre-receive's exit refuses the push), before the repository or the device is looked at."""
    data, said = BAD_UPDATES[name]
    before = snapshot(device)
    for hook in ("pre-receive", "post-receive"):
        r = _kiosk("hook", hook, env={"KIOSK_ROOT": str(device)}, stdin=data)
        assert r.returncode == 2 and r.stdout == b"", (hook, r)
        assert r.stderr.decode().startswith(f"kiosk: git's ref updates on standard input: {said}"), (hook, r.stderr)
        assert r.stderr.count(b"\n") == 1, r.stderr
    assert snapshot(device) == before


def test_read_updates_takes_what_git_sends():
    import io
    from kiosk.device.hooks import read_updates

    two = GOOD_UPDATE + b"a" * 40 + b" " + b"0" * 40 + b" refs/tags/v1.0\n"
    assert read_updates(io.BytesIO(two)) == [("0" * 40, "f" * 40, "refs/heads/main"),
                                             ("a" * 40, "0" * 40, "refs/tags/v1.0")]
    assert read_updates(io.BytesIO(GOOD_UPDATE.rstrip(b"\n"))) == [("0" * 40, "f" * 40, "refs/heads/main")]
    assert read_updates(io.BytesIO(b"")) == []


# ---------------------------------------------------------------- secrets and odd spec text

def readable_by_others(root):
    """Every regular file under root that a user other than its owner (the kiosk user) can open."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.lstat(os.path.join(dirpath, d)).st_mode & 0o005 == 0o005]
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_mode & 0o004:
                out.append(path)
    return out


def test_no_file_others_can_read_holds_a_digest_of_a_secret(device, monkeypatch_offline):
    root = device
    add_generation(root, dict(copy.deepcopy(SECOND), networks={"cafe": "another passphrase"}))
    private = [p for p in (root / "var/lib/kiosk/generations").rglob("*")
               if p.is_file() and not p.is_symlink() and p.stat().st_mode & 0o077 == 0]
    secrets = {p: p.read_bytes() for p in private}
    assert any(p.name == "wpa_supplicant-wlan0.conf" for p in secrets) and any(p.name == "nixiosk.json" for p in secrets)
    digests = {hashlib.sha256(data).hexdigest(): p for p, data in secrets.items()}
    readable = readable_by_others(root)
    assert readable  # meta.json, the public files of each generation...
    for path in readable:
        data = Path(path).read_bytes()
        for digest, secret in digests.items():
            assert digest.encode() not in data and digest.upper().encode() not in data, (path, secret)
            assert hashlib.sha256(secrets[secret]).digest() not in data, (path, secret)
    # the manifest keeps its digests (the activation plan and verify need them), for root only
    gen = store.generation(root, 2)
    assert stat.S_IMODE((gen.path / "layer.json").stat().st_mode) == 0o600
    assert "sha256" in gen.manifest["/etc/wpa_supplicant/wpa_supplicant-wlan0.conf"]
    # a device from an older kiosk: its manifests are made private by the next recovery (each push runs one)
    os.chmod(gen.path / "layer.json", 0o644)
    r = kiosk_cli("switch", "--recover", "--root", str(root))
    assert r.returncode == 0, r.stderr
    assert "layer.json of generation(s) 2 made readable by root only" in r.stderr
    assert stat.S_IMODE((gen.path / "layer.json").stat().st_mode) == 0o600


def test_a_stored_spec_with_a_byte_order_mark_is_read(device, recording):
    """Older kiosk versions stored a BOM-prefixed spec as committed, then could not read it back."""
    gen = store.generation(device, 1)
    spec_file = gen.path / "nixiosk.json"
    spec_file.write_text("\ufeff" + spec_file.read_text())
    assert gen.spec()["hostName"] == "lobby"
    assert store.read_running(device / "var/lib/kiosk")[0]["hostName"] == "lobby"
    spec_file.write_text("[1]")
    with pytest.raises(InvalidSpec, match="generation 1's nixiosk.json: /: is not a JSON object"):
        gen.spec()
    spec_file.write_text('{"hostName": "edited-by-hand"}')
    with pytest.raises(InvalidSpec, match="generation 1's nixiosk.json: /: is not a whole spec \\(KeyError"):
        gen.spec()
    assert store.read_running(device / "var/lib/kiosk")[0] == {"hostName": "edited-by-hand"}  # as stored


def test_systemd_activator_reads_systemctl(tmp_path):
    """The real activator's calls and health logic, against a stand-in systemctl (no systemd runs here)."""
    fake = tmp_path / "systemctl"
    fake.write_text(f"""#!/bin/sh
echo "$@" >> {tmp_path}/calls
case "$1" in
show) n=$(cat {tmp_path}/count 2>/dev/null || echo 0); echo $((n+1)) > {tmp_path}/count
  printf 'Id=kiosk.service\\nLoadState=loaded\\nActiveState=active\\nSubState=running\\nResult=success\\n'
  printf 'NRestarts=%s\\nExecMainStartTimestampMonotonic=%s\\nExecMainStatus=0\\nMainPID={os.getpid()}\\n\\n' \
    $n $((n*100))
  printf 'Id=kiosk-agent.service\\nLoadState=loaded\\nActiveState=activating\\nSubState=auto-restart\\n'
  printf 'Result=exit-code\\nNRestarts=3\\nExecMainStartTimestampMonotonic=5\\nExecMainStatus=1\\n\\n'
  printf 'Id=ssh.service\\nLoadState=loaded\\nActiveState=active\\nSubState=running\\nResult=success\\n'
  printf 'NRestarts=0\\nExecMainStartTimestampMonotonic=7\\nExecMainStatus=0\\n\\n'
  printf 'Id=nope.service\\nLoadState=not-found\\nActiveState=inactive\\nSubState=dead\\n';;
restart) [ "$2" = bad.service ] && {{ echo "Job for bad.service failed because the control process exited with error code." >&2; exit 1; }};;
esac
exit 0
""")
    fake.chmod(0o755)
    a = activation.SystemdActivator(systemctl=str(fake))
    a.daemon_reload()
    a.restart(["kiosk.service"])
    a.reload(["ssh.service"])
    a.stop([])
    with pytest.raises(activation.ActivationFailed,
                       match=r"systemctl restart bad.service exited with status 1:\n  Job for bad.service failed because"):
        a.restart(["bad.service"])
    problems = a.health(["kiosk.service", "kiosk-agent.service", "ssh.service", "nope.service"], 0.01)
    assert problems == ["kiosk.service: restarted 1 time(s) within 0s (the program exits at once)",
                        "kiosk-agent.service: activating (auto-restart), result exit-code, exit status 1",
                        "nope.service: not loaded (not-found)"]
    assert (tmp_path / "calls").read_text().splitlines()[:4] == [
        "daemon-reload", "restart kiosk.service", "reload-or-restart ssh.service", "restart bad.service"]
    assert activation.from_env(tmp_path).name == "none"  # never systemctl for a tree that is not /


def test_the_health_check_waits_for_the_program_to_start(tmp_path, monkeypatch):
    """kiosk.service counts as healthy only once cage's child (the program) runs and stays: a slow board's
    cage still starting is not health, and one that never starts the program fails after
    KIOSK_HEALTH_START_SECONDS."""
    import subprocess
    import sys
    import time

    cage = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                             "subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])"])
    lonely = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        def fake(pid):
            path = tmp_path / f"systemctl-{pid}"
            path.write_text(f"""#!/bin/sh
printf 'Id=kiosk.service\\nLoadState=loaded\\nActiveState=active\\nSubState=running\\nResult=success\\n'
printf 'NRestarts=0\\nExecMainStartTimestampMonotonic=5\\nExecMainStatus=0\\nMainPID={pid}\\n\\n'
""")
            path.chmod(0o755)
            return activation.SystemdActivator(systemctl=str(path))

        deadline = time.monotonic() + 30
        while not activation._has_child(str(cage.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)    # (the stand-in cage starts its program)
        assert fake(cage.pid).health(["kiosk.service"], 0.01) == []
        monkeypatch.setenv("KIOSK_HEALTH_START_SECONDS", "1")
        assert fake(lonely.pid).health(["kiosk.service"], 0.01) == [
            "kiosk.service: the program did not start within 1s"]
    finally:
        for proc in (cage, lonely):
            proc.kill()
            proc.wait()
