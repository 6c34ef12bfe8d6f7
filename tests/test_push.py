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

    # a package added: installed before the switch (here by the recording installer)
    new["packages"] = ["htop"]
    new["hostName"] = "hall"
    commit = client.commit_spec(clone, new)
    r = client.push(clone)
    assert r.returncode == 0, r.stderr
    lines = remote_lines(r.stderr)
    assert "    packages: +htop" in lines
    assert lines[lines.index("==> packages"):lines.index("==> packages") + 2] == \
        ["==> packages", "    installing with recording: htop"]
    assert lines.index("==> packages") < lines.index("==> switch to generation 3")
    assert "    host name -> hall" in lines
    assert device.recorded()["installs"] == [["htop"]]
    assert store.pointer(root) == 3 and pending.repo_main(root) == commit and links.verify(root) == []


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
    restart the kiosk must not fail its health check on it."""
    state = device.root / "run/kiosk-screen/off"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text("schedule\n")
    clone = client.clone(device.url, "clone")
    new = copy.deepcopy(spec)
    new["display"] = {"blanking": 300}
    client.commit_spec(clone, new)
    r = client.push(clone)
    assert r.returncode == 0, r.stderr
    lines = remote_lines(r.stderr)
    assert "==> health check: kiosk-agent.service, kiosk-screen-idle.service (up and staying up for 0s)" in lines
    assert "    kiosk.service: not checked, the screen is switched off (schedule)" in lines


@pytest.mark.parametrize("off_by, comes_on", [("schedule", 'at display.schedule\'s "on"'),
                                               ("idle", "at the next touch or key")])
def test_a_push_that_restarts_the_kiosk_leaves_a_screen_switched_off_dark_and_is_kept(device, client, spec,
                                                                                      off_by, comes_on):
    """Issue 20's leftover: a push that changes the program inside the schedule's off window (or while blanked)
    does not start cage (it would light the screen): kiosk.service stays stopped and runs the new generation when
    the screen comes on. The push is kept, not rolled back for the stopped kiosk; a rollback leaves it dark too."""
    state = device.root / "run/kiosk-screen/off"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(off_by + "\n")
    clone = client.clone(device.url, "clone")
    new = copy.deepcopy(spec)
    new["program"]["args"] = ["https://example.org/night"]
    commit = client.commit_spec(clone, new)
    r = client.push(clone)
    assert r.returncode == 0, r.stderr
    lines = remote_lines(r.stderr)
    assert "    units to restart: kiosk.service" in lines   # what the change means ...
    assert (f"    kiosk.service: not restarted, the screen is switched off ({off_by}); the program starts as this "
            f"generation has it when the screen comes on ({comes_on})") in lines   # ... and what was done
    assert "==> health check: kiosk-agent.service (up and staying up for 0s)" in lines
    assert f"    kiosk.service: not checked, the screen is switched off ({off_by})" in lines
    calls = device.recorded()["calls"]
    assert not any(verb in ("start", "restart", "try-restart") and "kiosk.service" in units
                   for verb, units in calls if isinstance(units, list)), calls
    assert store.current(device.root).meta["commit"] == commit and store.current(device.root).meta["status"] == "active"
    assert state.read_text() == off_by + "\n"

    # a push that fails (the agent) is rolled back without starting the kiosk either
    device.recording.write_text(json.dumps({"fail": [{"unit": "kiosk-agent.service", "when": "failing"}]}))
    new["program"]["args"] = ["https://example.org/failing"]
    client.commit_spec(clone, new)
    r = client.push(clone)
    assert r.returncode != 0 and store.current(device.root).meta["commit"] == commit, r.stderr
    calls = device.recorded()["calls"]
    assert calls and not any(verb in ("start", "restart", "try-restart") and "kiosk.service" in units
                             for verb, units in calls if isinstance(units, list)), calls
    assert sum("kiosk.service: not restarted, the screen is switched off" in line
               for line in remote_lines(r.stderr)) == 2   # the switch and its rollback
