"""`kiosk status HOST`: the device's answer (kiosk.device.facts), the archive's newer versions
(kiosk.spec.archive.suite_versions against a local Debian-like mirror over real HTTP), the pending count,
and the whole command over real OpenSSH against a device root (tests/sshd_harness.py, as the push tests).
"""

from __future__ import annotations

import json
import socket

import pytest
from conftest import kiosk_cli
from fake_mirror import Server, dpkg_status, write_mirror, write_suite
from sshd_harness import Device, key_set

from kiosk.device import slots, store
from kiosk.spec import archive
from kiosk.update import status

SECURITY = {"foot": "1.0-1+deb12u1", "cage": ["0.9-1", "1.0-1+deb12u2", "1.0-1+deb12u1"], "htop": "0.9-1",
            "libssl3": "3.0.16-1~deb12u1"}
UPDATES = {"tzdata": "2025b-0+deb12u1", "busybox": "1:1.35.0-4+b4"}
INSTALLED = [("foot", "1.0-1", "arm64"), ("cage", "1.0-1", "arm64"), ("htop", "1.0-1", "arm64"),
             ("tzdata", "2024a-0+deb12u1", "all"), ("busybox", "1:1.35.0-4+b3", "arm64"),
             ("libssl3", "3.0.16-1~deb12u1", "arm64"), ("libc6", "2.36-9+deb12u10", "i386"),
             ("python3-zeroconf", "1.0-1", "arm64")]


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    """bookworm main, bookworm-security and bookworm-updates for arm64; armel has no security suite."""
    root = tmp_path_factory.mktemp("mirror")
    write_mirror(root)
    write_suite(root, "bookworm-security", "arm64", SECURITY)
    write_suite(root, "bookworm-security", "arm64", {"firmware-brcm80211": "1:20230210-5+deb12u1"},
                component="non-free-firmware")
    for arch in ("arm64", "armel"):
        write_suite(root, "bookworm-updates", arch, UPDATES)
    server = Server(root)
    yield server
    server.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache of this test's own: every test fetches from the mirror first."""
    monkeypatch.setenv("KIOSK_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/debian"


# ---------------------------------------------------------------- the archive's versions

def test_suite_versions_keep_each_packages_newest_version_from_every_component(mirror, cache):
    index = archive.suite_versions(mirror.url, "bookworm-security", "arm64")
    assert index.versions["cage"] == "1.0-1+deb12u2"      # listed three times
    assert index.versions["foot"] == "1.0-1+deb12u1"
    assert index.versions["firmware-brcm80211"] == "1:20230210-5+deb12u1"   # non-free-firmware
    assert "cog" not in index.versions
    assert index.fetched > 0


def test_a_suite_the_mirror_does_not_publish_for_an_architecture_is_not_published(mirror, cache):
    with pytest.raises(archive.NotPublished, match="binary-armel/Packages.xz answered HTTP 404"):
        archive.suite_versions(mirror.url, "bookworm-security", "armel")


def test_suite_versions_are_cached_and_used_offline(mirror, cache, monkeypatch, tmp_path):
    root = tmp_path / "m"
    write_suite(root, "bookworm-security", "arm64", {"foot": "2.0-1"})
    server = Server(root)
    first = archive.suite_versions(server.url, "bookworm-security", "arm64")
    server.close()
    archive._READ.clear()   # as a new process would: from the cache file
    assert archive.suite_versions(server.url, "bookworm-security", "arm64") == first
    monkeypatch.setenv("KIOSK_OFFLINE", "1")
    archive._READ.clear()
    assert archive.suite_versions(server.url, "bookworm-security", "arm64").versions == {"foot": "2.0-1"}
    with pytest.raises(archive.ArchiveUnavailable, match="KIOSK_OFFLINE=1 and no cached package index"):
        archive.suite_versions(mirror.url, "bookworm-updates", "arm64")


def test_a_kept_suite_index_is_fetched_again_once_the_suite_is_published_anew(cache, tmp_path):
    """A fix published an hour after the last look is pending now, not a day later: the suite's Release
    date is compared (one small request) before the kept index is used."""
    import email.utils

    root = tmp_path / "m"

    def publish(versions: dict, date: int) -> None:
        write_suite(root, "bookworm-security", "arm64", versions)
        (root / "dists/bookworm-security/Release").write_text(
            f"Suite: stable-security\nDate: {email.utils.formatdate(date, usegmt=True)}\n")

    publish({"foot": "2.0-1"}, 1764900000)
    server = Server(root)
    try:
        assert archive.suite_versions(server.url, "bookworm-security", "arm64").versions == {"foot": "2.0-1"}
        archive._READ.clear()
        asked = len(server.requests)
        assert archive.suite_versions(server.url, "bookworm-security", "arm64").versions == {"foot": "2.0-1"}
        assert server.requests[asked:] == ["/dists/bookworm-security/InRelease", "/dists/bookworm-security/Release"]
        publish({"foot": "2.0-1+deb12u1"}, 1764903600)
        archive._READ.clear()
        assert archive.suite_versions(server.url, "bookworm-security", "arm64").versions == {"foot": "2.0-1+deb12u1"}
    finally:
        server.close()


# ---------------------------------------------------------------- pending

def debian(url: str, **more) -> dict:
    return {"suite": "bookworm", "mirror": url, "securityMirror": url, **more}


def test_pending_counts_what_security_and_updates_have_newer(mirror, cache):
    rows = {row["kind"]: row for row in status.pending(INSTALLED, debian(mirror.url), "arm64")}
    security, updates = rows["security"], rows["updates"]
    assert security["state"] == updates["state"] == "checked"
    # foot and cage are behind; htop is newer than the suite's; libssl3 is at it; libc6:i386 is another arch
    assert security["packages"] == [{"name": "foot", "installed": "1.0-1", "available": "1.0-1+deb12u1"},
                                    {"name": "cage", "installed": "1.0-1", "available": "1.0-1+deb12u2"}]
    assert security["suite"] == "bookworm-security" and security["mirror"] == mirror.url and security["fetched"]
    # tzdata (all) and busybox (a binNMU) from the updates suite
    assert [p["name"] for p in updates["packages"]] == ["tzdata", "busybox"]
    data = status.view("lobby", {"packages": [list(p) for p in INSTALLED], "health": "ok"}, list(rows.values()),
                       "arm64")
    assert data["pending"]["count"] == 4 and data["installedPackages"] == len(INSTALLED)
    text = status.table(data, verbose=True)
    assert f"security    2 pending in bookworm-security ({mirror.url}, index of " in text
    assert "  foot 1.0-1 -> 1.0-1+deb12u1 (bookworm-security)" in text.splitlines()
    assert "  busybox 1:1.35.0-4+b3 -> 1:1.35.0-4+b4 (bookworm-updates)" in text.splitlines()
    assert "foot 1.0-1 ->" not in status.table(data)


def test_armel_has_no_security_suite_rather_than_none_pending(mirror, cache):
    rows = {row["kind"]: row for row in status.pending(INSTALLED, debian(mirror.url), "armel")}
    assert rows["security"]["state"] == "none"
    assert rows["security"]["note"].startswith("no security suite for armel")
    assert rows["updates"]["state"] == "checked"


def test_suites_the_spec_turns_off_or_the_suite_lacks_are_said(mirror, cache):
    rows = status.pending(INSTALLED, debian(mirror.url, security=False), "arm64")
    assert (rows[0]["state"], rows[0]["note"]) == ("off", "off in the device's spec (/debian/security is false)")
    assert rows[1]["state"] == "checked"
    rows = status.pending(INSTALLED, debian(mirror.url, suite="sid"), "arm64")
    assert [(r["state"], r["note"]) for r in rows] == [("off", "sid has no security suite"),
                                                        ("off", "sid has no updates suite")]


def test_an_unreachable_archive_is_said_in_its_row(cache, monkeypatch):
    url = closed_port_url()
    rows = status.pending(INSTALLED, debian(url), "arm64", deadline=20)
    assert [r["state"] for r in rows] == ["unavailable", "unavailable"]
    assert rows[0]["note"].startswith(f"archive unavailable: cannot reach {url}/dists/bookworm-security/")
    monkeypatch.setenv("KIOSK_OFFLINE", "1")
    rows = status.pending(INSTALLED, debian(url), "arm64")
    assert rows[0]["note"] == "archive unavailable: KIOSK_OFFLINE=1 and no cached package index"
    data = status.view("lobby", {"packages": [], "health": "ok"}, rows, "arm64")
    assert data["pending"]["count"] is None           # not 0: nothing could be compared
    assert "security    archive unavailable: KIOSK_OFFLINE=1" in status.table(data)


def test_a_damaged_answer_from_the_device_is_shown_as_such():
    data = status._well_typed({"format": 1, "hostName": ["x"], "uptimeSeconds": True, "slots": "A",
                               "packages": [["foot", "1.0-1", "arm64"], ["bad"], "x", [1, 2, 3]],
                               "problems": ["dpkg-query: gone\nsecond line", 7]})
    assert data["hostName"] is None and data["uptimeSeconds"] is None and data["slots"] is None
    assert data["packages"] == [["foot", "1.0-1", "arm64"]]
    assert data["problems"][0] == "dpkg-query: gone\\x0asecond line"
    assert "hostName: the device's answer has list, not what kiosk status reads" in data["problems"]
    text = status.table(status.view("lobby", data, None, None))
    assert "slots       unknown (see problems)" in text.splitlines()


# ---------------------------------------------------------------- slots

def rauc(primary=None, a=None, b=None) -> dict:
    return {"booted": "A", "primary": primary,
            "slots": {"A": {"bootStatus": "good", "installed": None, "version": None, **(a or {})},
                      "B": {"bootStatus": "bad", "installed": None, "version": None, **(b or {})}}}


def test_a_slot_is_empty_good_bad_or_installed_as_its_record_and_rauc_say():
    assert slots.slot_state("B", {}, rauc()) == {"state": "empty", "reason": "", "version": ""}
    record = {"A": {"state": "good", "installed": None, "version": "as flashed"}}
    assert slots.slot_state("A", record, rauc())["state"] == "good"
    b_new = {"installed": "T1", "version": "abc", "bootStatus": "good"}
    assert slots.slot_state("B", record, rauc("B", b=b_new))["state"] == "installed, boots next"
    record["B"] = {"state": "bad", "installed": "T1", "version": "abc", "reason": "kiosk.service: failed"}
    assert slots.slot_state("B", record, rauc(b={**b_new, "bootStatus": "bad"})) == \
        {"state": "bad", "reason": "kiosk.service: failed", "version": "abc"}
    # an install into B interrupted: RAUC's status file still names the last finished install (a good one)
    record["B"] = {"state": "good", "installed": "T1", "version": "abc"}
    assert slots.slot_state("B", record, rauc(b={**b_new, "bootStatus": "bad"}))["state"].startswith("bad (")


RAUC_JSON = {   # `rauc status --detailed --output-format=json` of rauc 1.8 after the first boot's commit
    "compatible": "kiosk-qemu", "booted": "A", "boot_primary": "rootfs.0",
    "slots": [{"rootfs.0": {"class": "rootfs", "device": "/dev/vda2", "bootname": "A", "boot_status": "good",
                            "slot_status": {}}},
              {"rootfs.1": {"class": "rootfs", "device": "/dev/vda3", "bootname": "B", "boot_status": "bad",
                            "slot_status": {}}}]}


def test_an_ab_device_says_which_slot_runs_and_what_the_other_holds(tmp_path, monkeypatch):
    from kiosk.device import facts

    root = tmp_path / "root"
    (root / "var/lib/kiosk").mkdir(parents=True)
    monkeypatch.setattr(slots, "rauc_status", lambda: slots.parse_rauc_status(json.dumps(RAUC_JSON)))
    slots.record(root, "A", "good", installed=None, version="as flashed")
    data = facts.gather(root, cmdline="root=/dev/vda2 rw rauc.slot=A quiet")
    assert data["slots"] == {"booted": "A", "slots": {"A": {"state": "good", "reason": "", "version": "as flashed"},
                                                      "B": {"state": "empty", "reason": "", "version": ""}}}
    text = status.table(status.view("lobby", status._well_typed(data), None, None))
    assert "slots       A runs: good, system as flashed; other slot B: empty" in text.splitlines()
    # this root has no dpkg database: its packages are unknown (dpkg-query would list none and succeed)
    assert data["packages"] is None
    assert any(p.startswith("installed packages: no dpkg database") for p in data["problems"]), data["problems"]
    rows = status.suites(data["packages"], {}, "amd64")
    assert [(r["state"], r["note"]) for r in rows] == [("unknown", "the device did not say which packages it has")] * 2
    # slot B tried and failed; A runs again
    b = RAUC_JSON["slots"][1]["rootfs.1"]
    monkeypatch.setitem(b, "slot_status", {"bundle": {"version": "0123abcd"}, "installed": {"timestamp": "T1"}})
    slots.record(root, "B", "bad", "kiosk.service: restarted 3 time(s)", installed="T1", version="0123abcd")
    data = facts.gather(root, cmdline="rauc.slot=A")
    text = status.table(status.view("lobby", status._well_typed(data), None, None))
    assert ("slots       A runs: good, system as flashed; other slot B: bad, system 0123abcd (kiosk.service: "
            "restarted 3 time(s))") in text.splitlines()
    # a push's try of that system failed (kiosk.device.system): the row says so
    from kiosk.device import system
    store.write_state(store.state_dir(root) / system.TRIAL,
                      {"commit": "c" * 40, "previousCommit": "d" * 40, "generation": 3, "previous": 2, "slot": "B",
                       "state": "failed", "reason": "kiosk.service: restarted 3 time(s)"})
    text = status.table(status.view("lobby", status._well_typed(facts.gather(root, cmdline="rauc.slot=A")), None, None))
    assert any(line.endswith("; the try of commit cccccccccccc in slot B failed (kiosk.service: restarted 3 time(s))")
               for line in text.splitlines()), text


def test_a_board_without_slots_says_so(monkeypatch):
    monkeypatch.setattr(slots, "rauc_status", lambda: pytest.fail("no rauc on a board without slots"))
    assert slots.summary(None, "root=/dev/mmcblk0p2 rw") == {"booted": None, "slots": {}}
    text = status.table(status.view("pi", {"slots": {"booted": None, "slots": {}}, "health": "ok"}, [], "armel"))
    assert "slots       none (one root partition)" in text.splitlines()


# ---------------------------------------------------------------- over real OpenSSH

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return key_set(tmp_path_factory.mktemp("keys"), ("host", "client"))


@pytest.fixture
def device(tmp_path, mirror, keys):
    spec = {"hostName": "lobby", "hardware": "raspberryPi3", "authorizedKeys": [keys["client_pub"]],
            "program": {"package": "cog", "executable": "/usr/bin/cog", "args": ["https://example.org/"]},
            "debian": debian(mirror.url)}
    made = Device(tmp_path, spec, keys["client_pub"], keys["host"])
    (made.root / "var/lib/dpkg").mkdir(parents=True)
    (made.root / "var/lib/dpkg/status").write_text(dpkg_status(INSTALLED))
    yield made
    made.close()


def kiosk_status(device, keys, tmp_path, *args, env=None):
    """`kiosk status` as a user runs it: their key, the device's host key in their known_hosts."""
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{device.port} {keys['host_pub']}\n")
    return kiosk_cli("status", "127.0.0.1", "-p", str(device.port), "-i", str(keys["client"]),
                     "--ssh-option", f"UserKnownHostsFile={known}", "--ssh-option", "StrictHostKeyChecking=yes",
                     *args, env=env)


@pytest.mark.root
def test_kiosk_status_over_ssh_prints_every_field(device, keys, tmp_path, cache):
    result = kiosk_status(device, keys, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("host        lobby at 127.0.0.1 (kiosk ")
    assert "board       raspberryPi3 (arm64)" in lines
    assert "slots       none (one root partition)" in lines
    assert f"generation  1, commit {device.first_commit[:12]} (active)" in lines
    assert any(line.startswith("uptime      ") and "min" in line for line in lines)
    assert "health      ok (kiosk.service active, kiosk-agent.service active)" in lines
    assert f"packages    {len(INSTALLED)} installed" in lines          # "gone" (config files only) is not
    assert any(line.startswith("security    2 pending in bookworm-security (") for line in lines), lines
    assert any(line.startswith("updates     2 pending in bookworm-updates (") for line in lines), lines
    assert result.stderr == ""

    verbose = kiosk_status(device, keys, tmp_path, "-v")
    assert "  cage 1.0-1 -> 1.0-1+deb12u2 (bookworm-security)" in verbose.stdout.splitlines()

    data = json.loads(kiosk_status(device, keys, tmp_path, "--json").stdout)
    assert data["board"] == "raspberryPi3" and data["architecture"] == "arm64" and data["hostName"] == "lobby"
    assert data["generation"]["commit"] == device.first_commit and data["generation"]["number"] == 1
    assert data["slots"] == {"booted": None, "slots": {}}
    assert data["health"] == "ok" and data["units"] == {"kiosk.service": "active", "kiosk-agent.service": "active"}
    assert data["pending"]["count"] == 4 and data["installedPackages"] == len(INSTALLED)
    assert data["uptimeSeconds"] > 0 and data["problems"] == []


@pytest.mark.root
def test_on_the_kiosk_itself_here_says_the_same_without_the_archive(device):
    env = {"KIOSK_ROOT": str(device.root), "KIOSK_ACTIVATOR": f"recording:{device.recording}"}
    result = kiosk_cli("status", "--here", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("host        lobby at localhost (kiosk ")
    assert "health      ok (kiosk.service active, kiosk-agent.service active)" in lines
    assert any(line.startswith("pending     not checked on the device") for line in lines)
    facts = json.loads(kiosk_cli("status", "--here", "--json", env=env).stdout)
    assert facts["debian"]["securityMirror"].startswith("http://127.0.0.1:")
    assert "authorizedKeys" not in json.dumps(facts)   # the debian section, not the spec
    assert ["foot", "1.0-1", "arm64"] in facts["packages"] and ["gone", "0.1-1", "arm64"] not in facts["packages"]


@pytest.mark.root
def test_an_unhealthy_kiosk_is_said_and_exits_1(device, keys, tmp_path, cache):
    device.recording.write_text(json.dumps({"fail": [{"unit": "kiosk.service", "reason": "exit-code"}]}))
    result = kiosk_status(device, keys, tmp_path)
    assert result.returncode == 1
    assert "health      kiosk.service failed (exit-code)" in result.stdout.splitlines()


@pytest.mark.root
def test_a_kiosk_switched_off_on_purpose_is_healthy(device):
    from kiosk.device import facts, screen

    device.recording.write_text(json.dumps({"fail": [{"unit": "kiosk.service", "reason": "inactive"}]}))
    env = {"KIOSK_ROOT": str(device.root), "KIOSK_ACTIVATOR": f"recording:{device.recording}"}
    assert json.loads(kiosk_cli("status", "--here", "--json", env=env).stdout)["health"] == "kiosk.service failed (inactive)"
    (device.root / screen.STATE).parent.mkdir(parents=True)
    (device.root / screen.STATE).write_text("schedule\n")
    data = json.loads(kiosk_cli("status", "--here", "--json", env=env).stdout)
    assert data["health"] == "ok"
    assert data["units"]["kiosk.service"] == "failed (inactive), the screen is switched off (schedule)"
    assert data["format"] == facts.FORMAT


@pytest.mark.root
def test_an_offline_archive_still_prints_the_rest(device, keys, tmp_path, cache):
    result = kiosk_status(device, keys, tmp_path, env={"KIOSK_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "security    archive unavailable: KIOSK_OFFLINE=1 and no cached package index" in result.stdout
    assert "board       raspberryPi3 (arm64)" in result.stdout


@pytest.mark.root
def test_an_unreachable_kiosk_is_one_line_and_exit_1(device, keys, tmp_path):
    device.close()
    result = kiosk_status(device, keys, tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("kiosk: 127.0.0.1: unreachable: connection refused"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_usage_exits_2():
    for args in ((), ("--here", "lobby"), ("-p", "x", "lobby"), ("-oProxyCommand=x",)):
        result = kiosk_cli("status", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
