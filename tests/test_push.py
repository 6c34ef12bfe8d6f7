"""git push to a device over real OpenSSH: validate, build, switch, report; refuse bad pushes untouched;
roll back a failing switch; serialise concurrent pushes.

The device is a root directory in tmp with generation 1 installed as the image build does it; sshd
runs the configuration.git hooks against it with a recording activator (tests/sshd_harness.py).
"""

import copy
import fcntl
import json
import os
import time

import pytest
from conftest import kiosk_cli
from sshd_harness import Client, Device, key_set, remote_lines, snapshot

from kiosk.device import links, pending, store, switch

pytestmark = pytest.mark.root

REJECTED = "! [remote rejected] main -> main (pre-receive hook declined)"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return key_set(tmp_path_factory.mktemp("keys"), ("host", "client", "stranger"))


@pytest.fixture
def spec(fake_mirror, keys):
    return {
        "hostName": "lobby", "hardware": "raspberryPi3", "authorizedKeys": [keys["client_pub"]],
        "program": {"package": "cog", "executable": "/usr/bin/cog", "args": ["https://example.org/"]},
        "networks": {"cafe": "correct horse battery"},
        "locale": {"lang": "en_US.UTF-8", "regDom": "US", "timeZone": "America/New_York"},
        "debian": {"suite": "bookworm", "mirror": fake_mirror},
    }


@pytest.fixture
def make_device(tmp_path, spec, keys):
    made = []

    def make(env=None):
        directory = tmp_path / f"dev{len(made)}"
        directory.mkdir()
        device = Device(directory, spec, keys["client_pub"], keys["host"], env=env)
        made.append(device)
        return device

    yield make
    for device in made:
        device.close()


@pytest.fixture
def device(make_device):
    return make_device()


@pytest.fixture
def client(tmp_path, keys, device):
    return Client(tmp_path, keys["client"], keys["host_pub"], device.port)


def head(client, clone):
    return client.git("rev-parse", "HEAD", cwd=clone).stdout.strip()


def test_a_good_push_switches_and_says_each_step(device, client, spec):
    clone = client.clone(device.url, "clone")
    assert json.loads((clone / "nixiosk.json").read_text()) == spec  # generation 1's spec, as built
    new = copy.deepcopy(spec)
    new["program"]["args"] = ["https://example.org/welcome"]
    commit = client.commit_spec(clone, new)
    r = client.push(clone)
    assert r.returncode == 0, r.stderr
    c = commit[:12]
    assert remote_lines(r.stderr) == [
        f"==> validate nixiosk.json (commit {c})",
        "    valid: lobby on raspberryPi3, program cog (/usr/bin/cog)",
        "==> build generation 2: what changes from generation 1",
        "    files changed: /etc/kiosk/program.json, /etc/systemd/system/kiosk.service",
        "    units to restart: kiosk.service",
        "    packages: no change",
        "==> switch to generation 2",
        "    1/4 linked 0 new path(s)",
        "    2/4 current -> generations/2",
        "    3/4 updated 0 symlink and directory entries",
        "    4/4 removed 0 path(s) generation 2 does not have",
        "==> activate",
        "    systemctl daemon-reload",
        "    systemctl restart kiosk.service",
        "==> health check: kiosk-agent.service, kiosk.service (up and staying up for 0s)",
        "    kiosk-agent.service: up",
        "    kiosk.service: up",
        f"==> generation 2 is active: lobby, commit {c}",
        f"==> main is at {c}; the device runs generation 2",
    ]
    assert f"{device.first_commit[:7]}..{commit[:7]}  main -> main" in r.stderr
    root = device.root
    assert store.pointer(root) == store.pointer(root, "default") == 2
    assert pending.repo_main(root) == commit and store.current(root).meta["commit"] == commit
    assert store.current(root).spec_text == (clone / "nixiosk.json").read_text()
    assert {g.number: g.meta["status"] for g in store.list_generations(root)} == {1: "superseded", 2: "active"}
    assert links.verify(root) == [] and switch.read_journal(root) is None and pending.read_pending(root) is None
    assert device.recorded()["calls"] == [["daemon-reload", None], ["restart", ["kiosk.service"]],
                                          ["health", ["kiosk-agent.service", "kiosk.service"]]]
    program = (root / "var/lib/kiosk/current/root/etc/kiosk/program.json").read_text()
    assert "https://example.org/welcome" in program

    # a package added changes the system: this device root booted from no root slot, so it takes none
    # (a device with slots tries the new system in its other slot: tests/test_system_push_boot.py)
    before = snapshot(root)
    new["packages"] = ["htop"]
    new["hostName"] = "hall"
    client.commit_spec(clone, new)
    r = client.push(clone)
    assert r.returncode != 0
    lines = remote_lines(r.stderr)
    assert lines[-2:] == [
        "nixiosk.json: /packages: +htop changes the system, and this device has no root slot to install a new "
        "one into; build and flash a new image for it (./deploy.sh /dev/mmcblk0): its root slots take new systems",
        "==> push refused: this change needs a new image; nothing on the device was changed"], lines
    assert snapshot(root) == before and pending.repo_main(root) != head(client, clone)


def test_bad_pushes_are_refused_and_change_nothing(device, client, spec):
    clone = client.clone(device.url, "clone")
    base = head(client, clone)
    before = snapshot(device.root)

    def refused(r, *, hook=True):
        assert r.returncode != 0
        if hook:
            assert REJECTED in r.stderr or "(pre-receive hook declined)" in r.stderr, r.stderr
        assert snapshot(device.root) == before  # the device, its generations and configuration.git untouched
        assert device.recorded() == {}
        client.git("reset", "-q", "--hard", base, cwd=clone)
        return remote_lines(r.stderr)

    def validate_lines():
        v = kiosk_cli("validate", cwd=clone)
        assert v.returncode == 2
        return [line.rstrip() for line in v.stderr.splitlines()]

    # JSON syntax: the same lines as `kiosk validate` (caret included)
    text = json.dumps(spec, indent=2)[:-2] + ",\n}\n"
    commit = client.commit_spec(clone, text=text)
    expected = validate_lines()
    assert expected[0] == "nixiosk.json: /debian: line 25 column 4: trailing comma before '}' (JSON allows no " \
                          "comma after the last item); remove that comma"
    assert refused(client.push(clone)) == [f"==> validate nixiosk.json (commit {commit[:12]})", *expected,
                                           "==> push refused: nixiosk.json is not valid; nothing on the device "
                                           "was changed"]

    # schema and semantic problems: every one, one line each, as `kiosk validate` prints them
    commit = client.commit_spec(clone, dict(copy.deepcopy(spec), hostName="my_kiosk", colour="blue"))
    expected = validate_lines()
    assert expected == [
        'nixiosk.json: /colour: unknown field "colour"; remove it; fields here are: allowKioskLogin, '
        'allowLocalBuild, authorizedKeys, builders, debian, display, hardware, hostName, localSystem, locale, networks, '
        'packages, '
        'program, raspberryPi',
        'nixiosk.json: /hostName: "my_kiosk" is not a valid host name: it contains \'_\'; use 1-63 letters, '
        'digits and hyphens, not starting or ending with a hyphen, e.g. "lobby-screen"']
    assert refused(client.push(clone)) == [f"==> validate nixiosk.json (commit {commit[:12]})", *expected,
                                           "==> push refused: nixiosk.json is not valid; nothing on the device "
                                           "was changed"]

    # a package the board's Debian does not have (checked against the spec's mirror)
    commit = client.commit_spec(clone, dict(copy.deepcopy(spec), packages=["htpo"]))
    assert refused(client.push(clone))[1] == \
        'nixiosk.json: /packages/0: Debian bookworm has no package "htpo" for arm64 (raspberryPi3); ' \
        'did you mean "htop"?'

    # no nixiosk.json in the commit
    client.git("rm", "-q", "nixiosk.json", cwd=clone)
    client.git("commit", "-q", "-m", "oops", cwd=clone)
    commit = head(client, clone)
    assert refused(client.push(clone))[1:] == [
        f"nixiosk.json: /: not found in commit {commit[:12]}; commit nixiosk.json at the top of the repository",
        "==> push refused: nixiosk.json is not valid; nothing on the device was changed"]

    # another board: needs a new image
    commit = client.commit_spec(clone, dict(copy.deepcopy(spec), hardware="raspberryPi4"))
    lines = refused(client.push(clone))
    assert lines[2:] == [
        'nixiosk.json: /hardware: this device is a raspberryPi3; a push cannot change the board to raspberryPi4 '
        '(another kernel, firmware and architecture); build and flash a new image for it (kiosk build, '
        './deploy.sh /dev/mmcblk0), or set "hardware" back to "raspberryPi3"',
        "==> push refused: this change needs a new image; nothing on the device was changed"]

    # another branch
    client.commit_spec(clone, dict(copy.deepcopy(spec), hostName="elsewhere"))
    assert refused(client.push(clone, "HEAD:refs/heads/feature")) == [
        "refs/heads/feature: refused: only main is deployed to this device and no other branch or tag is kept; "
        "push to main (git push origin HEAD:main)",
        "==> push refused: only fast-forwards of main are deployed; nothing on the device was changed"]

    # rewriting history (the first commit amended, force-pushed)
    (clone / "nixiosk.json").write_text(json.dumps(dict(copy.deepcopy(spec), hostName="rewritten"), indent=2))
    client.git("commit", "-q", "-a", "--amend", "-m", "rewritten", cwd=clone)
    assert refused(client.push(clone, "--force", "main")) == [
        f"refs/heads/main: refused: not a fast-forward of the device's main ({base[:12]}); "
        "git pull --rebase, then push again",
        "==> push refused: only fast-forwards of main are deployed; nothing on the device was changed"]

    # deleting main
    assert refused(client.push(clone, ":main"), hook=False) == [
        "refs/heads/main: refused: main cannot be deleted; it is the configuration this device runs",
        "==> push refused: only fast-forwards of main are deployed; nothing on the device was changed"]

    # and after all that, a good push still works
    client.commit_spec(clone, dict(copy.deepcopy(spec), hostName="lobby2"))
    assert client.push(clone).returncode == 0
    assert store.pointer(device.root) == 2


def test_a_failing_switch_rolls_back_and_the_push_fails(device, client, spec):
    device.recording.write_text(json.dumps({"fail": [
        {"unit": "kiosk.service", "reason": "exited at once (status 1), restarted 2 times", "when": "crash-me"}]}))
    clone = client.clone(device.url, "clone")
    new = copy.deepcopy(spec)
    new["program"]["args"] = ["https://example.org/", "--crash-me"]   # the page stays: kiosk-url-watch is in both
    commit = client.commit_spec(clone, new)
    r = client.push(clone)
    assert r.returncode != 0
    assert REJECTED in r.stderr
    lines = remote_lines(r.stderr)
    tail = lines[lines.index("==> health check: kiosk-agent.service, kiosk.service (up and staying up for 0s)"):]
    first = device.first_commit[:12]
    assert tail == [
        "==> health check: kiosk-agent.service, kiosk.service (up and staying up for 0s)",
        "    kiosk-agent.service: up",
        "    FAILED kiosk.service: exited at once (status 1), restarted 2 times",
        "==> rolling back to generation 1",
        "==> switch to generation 1",
        "    1/4 linked 0 new path(s)",
        "    2/4 current -> generations/1",
        "    3/4 updated 0 symlink and directory entries",
        "    4/4 removed 0 path(s) generation 1 does not have",
        "==> activate",
        "    systemctl daemon-reload",
        "    systemctl restart kiosk.service",
        "==> health check: kiosk-agent.service, kiosk.service (up and staying up for 0s)",
        "    kiosk-agent.service: up",
        "    kiosk.service: up",
        f"==> ROLLED BACK to generation 1 (commit {first}): generation 2 failed: kiosk.service: exited at once "
        "(status 1), restarted 2 times",
        f"==> push refused: main stays at {first}; fix nixiosk.json and push again (kiosk generations on the "
        "device shows what failed)",
    ]
    root = device.root
    assert pending.repo_main(root) == device.first_commit
    assert store.pointer(root) == store.pointer(root, "default") == 1
    assert links.verify(root) == [] and switch.read_journal(root) is None and pending.read_pending(root) is None
    failed = store.generation(root, 2).meta
    assert (failed["status"], failed["commit"]) == ("failed", commit)
    assert failed["reason"] == "kiosk.service: exited at once (status 1), restarted 2 times"

    # the user fixes it (on top of the refused commit, which git never took) and pushes again
    new["program"]["args"] = ["https://example.org/fixed"]
    commit = client.commit_spec(clone, new)
    r = client.push(clone)
    assert r.returncode == 0, r.stderr
    assert store.pointer(root) == 3 and pending.repo_main(root) == commit
    r = kiosk_cli("generations", "--root", str(root))
    # the failed generation 2 was pruned by this push: rollback never needs it, and it is not the newest
    assert [line.split()[-1] for line in r.stdout.splitlines()[1:]] == ["superseded", "default"]
    assert [g.number for g in store.list_generations(root)] == [1, 3]


def test_five_concurrent_pushes_end_consistent(device, client, spec):
    clones = [client.clone(device.url, f"clone{i}") for i in range(5)]
    commits = []
    for i, clone in enumerate(clones):
        commits.append(client.commit_spec(clone, dict(copy.deepcopy(spec), hostName=f"kiosk{i}")))
    procs = [client.popen_push(clone) for clone in clones]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    codes = [p.returncode for p in procs]
    winners = [i for i, code in enumerate(codes) if code == 0]
    assert len(winners) == 1, "\n\n".join(outputs)
    for i, (code, out) in enumerate(zip(codes, outputs)):
        if code != 0:  # refused cleanly: by the device (main moved) or by git before the hook (fetch first)
            assert ("main moved to" in out and REJECTED in out) or "(fetch first)" in out, out
    root = device.root
    assert pending.repo_main(root) == commits[winners[0]]
    assert store.current(root).meta["commit"] == commits[winners[0]]
    assert links.verify(root) == [] and switch.read_journal(root) is None and pending.read_pending(root) is None
    for gen in store.list_generations(root):
        assert {p.name for p in gen.path.iterdir()} == {"root", "nixiosk.json", "layer.json", "meta.json"}
    assert [g.number for g in store.list_generations(root)] == [1, 2]
    assert not list((root / "var/lib/kiosk/generations").glob(".tmp-*"))
    assert (root / "var/lib/kiosk/lock").read_bytes() == b""


def test_a_push_waits_for_the_lock_then_gives_up(make_device, tmp_path, keys, spec):
    device = make_device(env={"KIOSK_LOCK_TIMEOUT": "2"})
    client = Client(tmp_path, keys["client"], keys["host_pub"], device.port)
    clone = client.clone(device.url, "clone")
    client.commit_spec(clone, dict(copy.deepcopy(spec), hostName="patient"))
    lock = os.open(device.root / "var/lib/kiosk/lock", os.O_RDWR)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.pwrite(lock, b"pid 1: a test holding the lock\n", 0)
        before = snapshot(device.root)
        r = client.push(clone)
        assert r.returncode != 0
        assert remote_lines(r.stderr)[2:] == [
            "    waiting for another push to finish... (pid 1: a test holding the lock)",
            "kiosk: another push or switch has held the device for over 2s; nothing was changed; push again later"]
        assert snapshot(device.root) == before
        # released while the push waits: it goes ahead
        push = client.popen_push(clone)
        seen = []
        for line in push.stdout:
            seen.append(line)
            if "waiting for another push to finish... (pid 1: a test holding the lock)" in line:
                os.ftruncate(lock, 0)
                fcntl.flock(lock, fcntl.LOCK_UN)
        assert push.wait() == 0, "".join(seen)
        assert "remote: ==> generation 2 is active: patient, commit" in "".join(seen)
        assert store.pointer(device.root) == 2
    finally:
        os.close(lock)


def test_a_key_not_authorized_is_refused_by_sshd(device, tmp_path, keys):
    stranger = Client(tmp_path / "s", keys["stranger"], keys["host_pub"], device.port) \
        if (tmp_path / "s").mkdir() is None else None
    r = stranger.git("clone", "-q", device.url, str(tmp_path / "s/clone"), check=False)
    assert r.returncode != 0
    assert "root@127.0.0.1: Permission denied (publickey)." in r.stderr
    assert not (tmp_path / "s/clone").exists()


def test_a_pusher_who_disconnects_does_not_stop_the_switch(make_device, tmp_path, keys, spec):
    """Ctrl-C (here: kill -9 of git push) mid-switch: the hook finishes the switch or rolls back, alone;
    the device never stays half-switched, and ends on what main says."""
    device = make_device(env={"KIOSK_HEALTH_SECONDS": "2"})
    client = Client(tmp_path, keys["client"], keys["host_pub"], device.port)
    clone = client.clone(device.url, "clone")
    commit = client.commit_spec(clone, dict(copy.deepcopy(spec), hostName="unattended"))
    push = client.popen_push(clone)
    journal = device.root / "var/lib/kiosk/switch.json"
    deadline = time.monotonic() + 30
    while not (journal.exists() and "activated" in journal.read_text()):
        assert time.monotonic() < deadline and push.poll() is None
        time.sleep(0.02)
    push.kill()  # during the 2 s health check
    push.wait()
    deadline = time.monotonic() + 30
    while journal.exists() or (device.root / "var/lib/kiosk/lock").read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    root = device.root
    log = (root / "var/lib/kiosk/push.log").read_text()
    assert log.startswith(f"==> validate nixiosk.json (commit {commit[:12]})\n")
    assert "==> generation 2 is active: unattended" in log
    assert links.verify(root) == [] and store.pointer(root) == 2
    # git itself may or may not have moved main after its client vanished (receive-pack dies of SIGPIPE
    # when it next writes to the dead connection); either way the device follows main after the next
    # push or boot, which run this same resolution:
    moved = pending.repo_main(root) == commit
    unconfirmed = pending.read_pending(root)
    assert unconfirmed is None or unconfirmed["commit"] == commit
    r = kiosk_cli("switch", "--recover", "--root", str(root), env={"KIOSK_ACTIVATOR": f"recording:{device.recording}"})
    assert r.returncode == 0, r.stderr
    assert pending.read_pending(root) is None and links.verify(root) == []
    assert store.current(root).meta["commit"] == pending.repo_main(root) == (commit if moved else device.first_commit)
    print(f"git moved main after the client died: {moved}; post-receive confirmed it: {unconfirmed is None}")


def test_failed_pushes_do_not_pile_up_generations(make_device, tmp_path, keys, spec):
    """Every push that wrote a generation prunes: what stays is what rollback needs (KIOSK_KEEP_GENERATIONS
    good ones, current, default) and the newest one (the last failure, readable with kiosk generations)."""
    device = make_device(env={"KIOSK_KEEP_GENERATIONS": "2"})
    client = Client(tmp_path, keys["client"], keys["host_pub"], device.port)
    device.recording.write_text(json.dumps({"fail": [{"unit": "kiosk.service", "when": "crash-me"}]}))
    clone = client.clone(device.url, "clone")
    root = device.root

    def push(args, ok):
        client.commit_spec(clone, dict(copy.deepcopy(spec), program=dict(spec["program"], args=args)))
        r = client.push(clone)
        assert (r.returncode == 0) == ok, r.stderr
        return r

    for i in range(6):
        r = push(["--crash-me", str(i)], ok=False)
        assert f"==> ROLLED BACK to generation 1 (commit {device.first_commit[:12]}): generation {i + 2} failed" \
            in "\n".join(remote_lines(r.stderr))
    assert {g.number: g.meta["status"] for g in store.list_generations(root)} == {1: "active", 7: "failed"}
    for i in range(3):
        push([f"https://example.org/{i}"], ok=True)
    assert {g.number: g.meta["status"] for g in store.list_generations(root)} == {9: "superseded", 10: "active"}
    push(["--crash-me", "again"], ok=False)
    assert {g.number: g.meta["status"] for g in store.list_generations(root)} == \
        {9: "superseded", 10: "active", 11: "failed"}
    assert links.verify(root) == [] and not list((root / "var/lib/kiosk/generations").glob(".*"))
    r = kiosk_cli("rollback", "--root", str(root), env={"KIOSK_ACTIVATOR": f"recording:{device.recording}",
                                                        "KIOSK_HEALTH_SECONDS": "0"})
    assert r.returncode == 0, r.stderr
    assert store.pointer(root) == 9 and links.verify(root) == []


def test_a_spec_with_a_byte_order_mark_does_not_wedge_the_device(device, client, spec):
    """A BOM-prefixed nixiosk.json (Windows editors write one): read as kiosk validate reads it; and the
    next push works whatever happened to it, also when the running generation's stored spec has one."""
    clone = client.clone(device.url, "clone")
    root = device.root
    text = json.dumps(dict(copy.deepcopy(spec), hostName="bom"), indent=2) + "\n"
    (clone / "nixiosk.json").write_bytes(b"\xef\xbb\xbf" + text.encode())
    client.git("commit", "-q", "-am", "bom", cwd=clone)
    r = client.push(clone)
    validate = kiosk_cli("validate", cwd=clone)
    if validate.returncode == 0:  # kiosk.spec.load reads past the mark: so does the device
        assert r.returncode == 0, r.stderr
        assert store.current(root).spec()["hostName"] == "bom"
    else:  # refused as kiosk validate refuses it, one line each
        assert r.returncode != 0 and REJECTED in r.stderr
        assert remote_lines(r.stderr)[1:-1] == validate.stderr.splitlines()
        client.git("reset", "-q", "--hard", "HEAD~", cwd=clone)
    commit = client.commit_spec(clone, dict(copy.deepcopy(spec), hostName="after"))
    r = client.push(clone)
    assert r.returncode == 0, r.stderr
    assert store.current(root).meta["commit"] == commit and links.verify(root) == []

    # a generation stored with a BOM as committed (older kiosk versions did): the next push still works
    stored = store.current(root).path / "nixiosk.json"
    stored.write_bytes(b"\xef\xbb\xbf" + stored.read_bytes())
    commit = client.commit_spec(clone, dict(copy.deepcopy(spec), hostName="later"))
    r = client.push(clone)
    assert r.returncode == 0, r.stderr
    assert store.current(root).meta["commit"] == commit and links.verify(root) == []


def test_a_push_while_the_screen_is_switched_off_does_not_check_the_stopped_kiosk(device, client, spec):
    """display.schedule/blanking stopped kiosk.service on purpose (/run/kiosk-screen/off): a push that does not
    restart the kiosk must not fail its health check on it; one that restarts it checks it as always."""
    state = device.root / "run/kiosk-screen/off"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text("idle\n")   # a schedule's off with no schedule would be undone (below)
    clone = client.clone(device.url, "clone")
    new = copy.deepcopy(spec)
    new["display"] = {"blanking": 300}
    client.commit_spec(clone, new)
    r = client.push(clone)
    assert r.returncode == 0, r.stderr
    lines = remote_lines(r.stderr)
    assert "==> health check: kiosk-agent.service, kiosk-screen-idle.service (up and staying up for 0s)" in lines
    assert "    kiosk.service: not checked, the screen is switched off (idle)" in lines
    new["program"]["args"] = ["https://example.org/other"]
    client.commit_spec(clone, new)
    lines = remote_lines(client.push(clone).stderr)
    assert any(line.startswith("==> health check: ") and "kiosk.service" in line for line in lines), lines


def _schedule_around_now(zone: str, inside: bool) -> dict:
    """A display.schedule whose off window holds the present (inside) or starts two hours from now, in `zone`."""
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo
    now = datetime.now(ZoneInfo(zone))
    start, end = (now - timedelta(hours=1), now + timedelta(hours=1)) if inside else \
        (now + timedelta(hours=2), now + timedelta(hours=3))
    return {"off": start.strftime("%H:%M"), "on": end.strftime("%H:%M")}


def test_a_push_that_changes_the_off_window_makes_the_screen_follow_it_at_once(device, client, spec):
    """display.schedule's timers act only at their times: the switch itself switches the screen off when the
    pushed off window holds the present (after the health check, which saw the kiosk up), and on again when a
    later push moves the window away or removes the schedule while the schedule holds the screen off (before
    the health check, which then checks the program that came back)."""
    state = device.root / "run/kiosk-screen/off"
    state.parent.mkdir(parents=True, exist_ok=True)
    clone = client.clone(device.url, "clone")
    zone, new = spec["locale"]["timeZone"], copy.deepcopy(spec)
    off, on = (["run", ["kiosk", "screen", verb, "--by", "schedule"]] for verb in ("off", "on"))

    def push(schedule):
        new["display"] = {"schedule": schedule} if schedule else {}
        client.commit_spec(clone, new)
        before = len(device.recorded().get("calls", []))
        r = client.push(clone)
        assert r.returncode == 0, r.stderr
        calls = device.recorded()["calls"][before:]
        return remote_lines(r.stderr), [c for c in calls if c in (off, on) or c[0] == "health"]

    lines, calls = push(_schedule_around_now(zone, inside=True))
    assert calls[0][0] == "health" and "kiosk.service" in calls[0][1] and calls[1:] == [off], calls
    assert "    display.schedule: the screen off (inside its off window)" in lines, lines
    state.write_text("schedule\n")   # as `kiosk screen off --by schedule` leaves it (the recorder runs nothing)

    away = _schedule_around_now(zone, inside=False)
    lines, calls = push(away)   # the window moved away: on, then checked
    assert calls[0] == on and calls[1][0] == "health" and "kiosk.service" in calls[1][1], calls
    assert "    display.schedule: the screen on (outside its off window)" in lines, lines
    assert not any("not checked" in line for line in lines), lines
    state.unlink()   # what `kiosk screen on` does

    new["networks"] = {"cafe": "another passphrase"}   # screen.json unchanged, the kiosk not restarted: nothing
    lines, calls = push(away)
    assert off not in calls and on not in calls, calls

    state.write_text("schedule\n")   # as if its off timer had run since
    lines, calls = push(None)   # the schedule removed while it holds the screen off: on, then checked
    assert calls[0] == on and "kiosk.service" in calls[1][1], calls
    assert "    display.schedule: the screen on (no schedule now)" in lines, lines

    state.write_text("idle\n")   # blanking's: a push changing the schedule outside its window leaves it so
    lines, calls = push(_schedule_around_now(zone, inside=False))
    assert off not in calls and on not in calls, calls
    assert "    kiosk.service: not checked, the screen is switched off (idle)" in lines, lines

    state.write_text("hand\n")   # a person's: not even a window around the present takes it over
    lines, calls = push(_schedule_around_now(zone, inside=True))
    assert off not in calls and on not in calls, calls


def test_a_push_that_restarts_the_kiosk_inside_the_off_window_checks_it_then_switches_the_screen_off(
        device, client, spec):
    """The restart lights the screen: the health check sees the new program start, then the switch darkens it
    again (before, it stayed lit until the next "on")."""
    clone = client.clone(device.url, "clone")
    new = copy.deepcopy(spec)
    new["display"] = {"schedule": _schedule_around_now(spec["locale"]["timeZone"], inside=True)}
    client.commit_spec(clone, new)
    assert client.push(clone).returncode == 0
    state = device.root / "run/kiosk-screen/off"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text("schedule\n")
    new["program"]["args"] = ["https://example.org/night"]
    client.commit_spec(clone, new)
    before = len(device.recorded()["calls"])
    r = client.push(clone)
    assert r.returncode == 0, r.stderr
    calls = device.recorded()["calls"][before:]
    restart = next(i for i, c in enumerate(calls) if c[0] == "restart" and "kiosk.service" in c[1])
    health = next(i for i, c in enumerate(calls) if c[0] == "health")
    assert "kiosk.service" in calls[health][1] and restart < health, calls
    assert calls[health + 1:] == [["run", ["kiosk", "screen", "off", "--by", "schedule"]]], calls
