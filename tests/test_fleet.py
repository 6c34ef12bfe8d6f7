"""kiosk fleet: an Ansible inventory to many devices, pushed in waves through each device's configuration.git.

The devices are the push tests' harness (tests/sshd_harness.py): a device root with generation 1 and the
real hooks, served by a real OpenSSH sshd on a loopback port; `kiosk fleet push` runs the real git and ssh.
An unreachable device is one whose sshd is stopped (connection refused) or a port that never answers
(status). The inventory's own Ansible variables carry the ssh settings (key, known_hosts, an empty ssh
config), as an operator's would.
"""

from __future__ import annotations

import copy
import json
import socket
import textwrap
import threading
from collections import Counter

import pytest
from conftest import kiosk_cli
from fake_mirror import Server, dpkg_status, write_mirror, write_suite
from sshd_harness import VENV_BIN, Device, key_set, snapshot

from kiosk.device import pending, store
from kiosk.fleet import commands as fleet_commands
from kiosk.fleet.inventory import expand_pattern, read_inventory, select
from kiosk.fleet.merge import deep_merge, load_fleet
from kiosk.fleet.rollout import failure_budget
from kiosk.core.errors import UsageError
from kiosk.spec import archive
from kiosk.update import status as one_status

LOBBY = ["https://lobby.example.org/v2"]
CAFE = ["https://cafe.example.org/v2", "--kiosk"]


# ---------------------------------------------------------------- inventory rules (no devices)

def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


BASE = {"hardware": "qemu", "authorizedKeys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOverzkLB6qX/N7KKvsfRbCO0wZ7xZR2stnOLFsuAmLp k"],
        "program": {"package": "foot", "args": ["base"]}, "locale": {"timeZone": "UTC", "regDom": "DE"}}


@pytest.fixture
def base(tmp_path, monkeypatch):
    monkeypatch.setenv("KIOSK_OFFLINE", "1")    # package names are not looked up: these tests are about merging
    path = tmp_path / "base.json"
    path.write_text(json.dumps(BASE))
    return str(path)


def test_host_patterns_expand_as_ansibles():
    assert expand_pattern("screen[01:03]") == (["screen01", "screen02", "screen03"], None)
    assert expand_pattern("s[1:5:2]-[a:b].shop:2222") == (["s1-a.shop", "s1-b.shop", "s3-a.shop", "s3-b.shop",
                                                         "s5-a.shop", "s5-b.shop"], 2222)
    assert expand_pattern("fe80::1") == (["fe80::1"], None)
    for bad in ("s[01:3]", "s[3:1]", "s[1:]", "s[a:9]", "s[0:99999]", "a b", "-x", "h:70000"):
        with pytest.raises(ValueError):
            expand_pattern(bad)


def test_yaml_and_ini_give_the_same_fleet_with_ansibles_precedence(tmp_path, base):
    """all < parent group < child group < host, depth first, then ansible_group_priority, then name; group_vars/
    and host_vars/ files as Ansible orders them; dicts merged, lists and scalars replaced."""
    yaml_inv = write(tmp_path, "yaml/hosts.yml", """\
        all:
          vars: {program: {args: [all]}, locale: {timeZone: Europe/Paris}}
          children:
            site:
              vars: {program: {args: [site]}, allowKioskLogin: true}
              children:
                lobby:
                  vars: {program: {args: [lobby]}}
                  hosts:
                    screen[1:2]:
                    screen3: {program: {args: [own]}, ansible_port: 2201}
                zeta:
                  vars: {packages: [less], ansible_group_priority: 1}
                  hosts: {screen1: }
                alpha:
                  vars: {packages: [alpha]}
                  hosts: {screen1: }
            ungrouped:
              hosts: {loner.example.org: }
        """)
    ini_inv = write(tmp_path, "ini/hosts", """\
        [lobby]
        screen[1:2]
        screen3 program="{'args': ['own']}" ansible_port=2201
        [lobby:vars]
        program={"args": ["lobby"]}
        [zeta]
        screen1
        [zeta:vars]
        packages=['less']
        [alpha]
        screen1   # alpha too (an INI comment)
        [alpha:vars]
        packages=["alpha"]
        [site:children]
        lobby
        zeta
        alpha
        [site:vars]
        program={"args": ["site"]}
        allowKioskLogin=True
        [all:vars]
        program={"args": ["all"]}
        locale={"timeZone": "Europe/Paris"}
        [ungrouped]
        loner.example.org
        """)
    fleets = [load_fleet(str(path), base) for path in (yaml_inv, ini_inv)]
    for fleet in fleets:
        assert fleet.problems == []
        got = {d.name: d for d in fleet.devices}
        assert list(got) == ["screen1", "screen2", "screen3", "loner.example.org"]
        assert got["screen2"].data["program"] == {"package": "foot", "args": ["lobby"]}   # child over parent
        assert got["screen3"].data["program"]["args"] == ["own"]                          # host over groups
        assert got["screen1"].data["packages"] == ["less"]       # same depth: by name, zeta after alpha
        assert got["screen1"].data["locale"] == {"timeZone": "Europe/Paris", "regDom": "DE"}   # merged
        assert got["loner.example.org"].data["program"]["args"] == ["all"]
        assert "allowKioskLogin" not in got["loner.example.org"].data
        assert got["screen3"].connection.port == 2201 and got["screen3"].connection.host == "screen3.local"
        assert got["loner.example.org"].connection.host == "loner.example.org"   # a FQDN is its own address
        assert got["loner.example.org"].data["hostName"] == "loner"
        assert got["screen1"].data["hostName"] == "screen1" and "ansible_port" not in json.dumps(got["screen3"].data)
    assert [d.data for d in fleets[0].devices] == [d.data for d in fleets[1].devices]

    # group_vars/ and host_vars/ beside the inventory: group_vars/all < group_vars/GROUP < host vars < host_vars
    write(tmp_path, "yaml/group_vars/all.yml", "program: {args: [gv-all]}\nallowKioskLogin: false\n")
    write(tmp_path, "yaml/group_vars/lobby/10-url.yml", "program: {args: [gv-lobby]}\n")
    write(tmp_path, "yaml/host_vars/screen3.json", '{"program": {"args": ["hv-screen3"]}}')
    got = {d.name: d for d in load_fleet(str(yaml_inv), base).devices}
    assert got["screen2"].data["program"]["args"] == ["gv-lobby"]
    assert got["screen3"].data["program"]["args"] == ["hv-screen3"]
    assert got["loner.example.org"].data["program"]["args"] == ["gv-all"]
    assert got["screen2"].data["allowKioskLogin"] is False    # group_vars/all over the inventory's site vars

    # priority: a higher ansible_group_priority wins at the same depth
    ini_inv.write_text(ini_inv.read_text().replace("[alpha:vars]\n", "[alpha:vars]\nansible_group_priority=5\n"))
    assert {d.name: d for d in load_fleet(str(ini_inv), base).devices}["screen1"].data["packages"] == ["alpha"]

    inv = read_inventory(yaml_inv)
    assert select(inv, "lobby,!screen2") == ["screen1", "screen3"]
    assert select(inv, "screen*,&zeta") == ["screen1"]
    with pytest.raises(UsageError):
        select(inv, "nosuch")


def test_deep_merge_and_failure_budget():
    assert deep_merge({"a": {"b": 1, "c": [1, 2]}, "d": 1}, {"a": {"c": [3]}, "d": None}) == \
        {"a": {"b": 1, "c": [3]}, "d": None}
    assert [failure_budget(t, 20) for t in ("0", "3", "10%", "12.5%", "100%")] == [0, 3, 2, 2, 20]
    for bad in ("-1", "x", "nan%", "150%", "inf"):
        with pytest.raises(UsageError):
            failure_budget(bad, 20)


def test_bad_inventories_are_refused_one_line_per_problem(tmp_path, base):
    """Through the real command: exit 2, every problem on one line naming the host (or group) and the field."""
    def refused(text, name="hosts.yml", *extra):
        path = write(tmp_path, name, text)
        r = kiosk_cli("fleet", "show", str(path), base, *extra, env={"KIOSK_OFFLINE": "1"})
        assert r.returncode == 2, (r.stdout, r.stderr)
        return [line.replace(str(tmp_path) + "/", "") for line in r.stderr.splitlines()]

    # an unknown host variable, and one in a group; an override that makes the spec invalid
    assert refused("""\
        all:
          children:
            lobby:
              vars: {programm: {args: [x]}}
              hosts:
                screen01: {colour: blue}
                screen02: {program: {args: "https://not-a-list"}, locale: {timeZone: Mars/Olympus}}
        """) == [
        "hosts.yml: group lobby: /programm: unknown variable 'programm': neither a nixiosk.json field nor an "
        "Ansible variable (ansible_*); did you mean 'program'?",
        "hosts.yml: host screen01: /colour: unknown variable 'colour': neither a nixiosk.json field nor an Ansible "
        "variable (ansible_*); nixiosk.json's fields are: allowKioskLogin, allowLocalBuild, authorizedKeys, "
        "builders, debian, display, hardware, hostName, localSystem, locale, networks, packages, program, raspberryPi",
        tz_problem(tmp_path, "hosts.yml: host screen02"),
        "hosts.yml: host screen02: /program/args: must be an array, not a string; give a list of strings; each "
        "is passed to the program as one argument, never through a shell"]

    # duplicate host names: a key twice in one mapping, two devices with one hostName, one device twice
    assert refused("""\
        all:
          hosts:
            screen01:
            screen02: {hostName: screen01}
            screen03: {ansible_host: 10.0.0.9}
            screen04: {ansible_host: 10.0.0.9}
            screen01:
        """) == ["hosts.yml: line 7 column 5: the key 'screen01' appears twice in one mapping (first on line 3); "
                 "YAML keeps only the last; fix the YAML there"]
    assert refused("""\
        all:
          hosts:
            screen01:
            screen02: {hostName: SCREEN01}
            screen03: {ansible_host: 10.0.0.9}
            screen04: {ansible_host: 10.0.0.9, ansible_password: secret}
        """) == [
        "hosts.yml: host screen04: ansible_password: kiosk devices take SSH keys only, never a password; remove it "
        "(and put your key in authorizedKeys)",
        "hosts.yml: host screen02: /hostName: 'SCREEN01' is host screen01's hostName too: both would answer as "
        "SCREEN01.local; give each device its own (hostName in its host variables)"]
    assert refused("""\
        all:
          hosts:
            screen03: {ansible_host: 10.0.0.9}
            screen04: {ansible_host: 10.0.0.9}
        """)[0] == ("hosts.yml: host screen04: ansible_host: reached at 10.0.0.9:22 like host screen03: one device "
                    "cannot run two specs; fix ansible_host or ansible_port")
    # YAML syntax errors: the line and column
    lines = refused("all:\n  hosts:\n    screen01: {program: [\n")
    assert len(lines) == 1 and lines[0].startswith("hosts.yml: line 4 column 1: ") and "fix the YAML there" in lines[0]
    assert refused("all:\n\thosts: x\n")[0].startswith("hosts.yml: line 2 column 1: ")
    # structure: a typo that would lose devices; a host var that is not a mapping; an INI section of nothing
    assert refused("all:\n  children:\n    cafe:\n      host: {cafe01: }\n") == [
        "hosts.yml: group cafe: unknown key 'host'; a group holds only hosts, children and vars (did you mean "
        "'hosts'?)", "hosts.yml: names no hosts; list the devices in it (docs/fleet.md shows how)"]
    assert refused("[cafe:vars]\nprogram={}\n[lobby:children]\nhall\n", "hosts.ini") == [
        "hosts.ini: line 1: [cafe:vars] names the group 'cafe', which is never defined; add a [cafe] section with "
        "its hosts, or fix the name",
        "hosts.ini: line 4: [lobby:children] names the group 'hall', which is never defined; add a [hall] section "
        "with its hosts, or fix the name", "hosts.ini: names no hosts; list the devices in it (docs/fleet.md shows how)"]
    # YAML's own types a spec cannot hold, and an alias bomb
    assert refused("all:\n  vars: {locale: {timeZone: 2024-01-01}}\n  hosts: {s1: }\n") == [
        "hosts.yml: group all: /locale/timeZone: is a date (as YAML reads it), which a spec cannot hold; quote it "
        "to make it a string"]
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8))
    assert "expands to more than" in refused(bomb)[0]


def tz_problem(tmp_path, source: str) -> str:
    """The time zone problem exactly as `kiosk validate` says it for one spec, with the fleet's source."""
    spec = dict(copy.deepcopy(BASE), hostName="x", locale={"timeZone": "Mars/Olympus"})
    path = tmp_path / "tz.json"
    path.write_text(json.dumps(spec))
    line = kiosk_cli("validate", str(path), env={"KIOSK_OFFLINE": "1"}).stderr.splitlines()[0]
    return line.replace(f"{path}: ", f"{source}: ")


# ---------------------------------------------------------------- real devices over real ssh

@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return key_set(tmp_path_factory.mktemp("fleet-keys"), ("host", "client", "other_host"), "fleet-test")


def device_spec(fake_mirror, keys, name: str) -> dict:
    return {"hostName": name, "hardware": "raspberryPi3", "authorizedKeys": [keys["client_pub"]],
            "program": {"package": "cog", "executable": "/usr/bin/cog", "args": ["https://example.org/v1"]},
            "locale": {"lang": "en_US.UTF-8", "regDom": "US", "timeZone": "America/New_York"},
            "debian": {"suite": "bookworm", "mirror": fake_mirror}}


class Fleet:
    """N harness devices (screen01..), a base spec, and an inventory reaching them as an operator's would."""

    def __init__(self, tmp_path, fake_mirror, keys, count: int, groups=("lobby", "cafe"), debian=None, env=None):
        """debian: more fields of every spec's debian section; env: {name: the device's environment}."""
        self.tmp, self.keys = tmp_path, keys
        self.devices: dict[str, Device] = {}
        names = [f"screen{i:02d}" for i in range(1, count + 1)]
        threads, errors = [], []

        def make(name):
            try:
                directory = tmp_path / name
                directory.mkdir()
                spec = device_spec(fake_mirror, keys, name)
                spec["debian"].update(debian or {})
                self.devices[name] = Device(directory, spec, keys["client_pub"], keys["host"], device_paths=True,
                                            env=(env or {}).get(name))
            except Exception as exc:   # reported below, in the test's thread
                errors.append(exc)

        for name in names:   # provisioning 20 device roots: a few at a time
            threads.append(threading.Thread(target=make, args=(name,)))
            threads[-1].start()
            if len(threads) % 4 == 0:
                for t in threads:
                    t.join()
        for t in threads:
            t.join()
        if errors:
            self.close()
            raise errors[0]
        self.names = names
        self.known_hosts = tmp_path / "known_hosts"
        self.known_hosts.write_text("".join(f"[127.0.0.1]:{d.port} {keys['host_pub']}\n"
                                            for d in self.devices.values()))
        (tmp_path / "ssh_config").write_text("")    # not the user's ~/.ssh/config
        base = device_spec(fake_mirror, keys, "x")
        base["debian"].update(debian or {})
        del base["hostName"]
        self.base = tmp_path / "nixiosk.json"
        self.base.write_text(json.dumps(base, indent=2))
        half = (len(names) + 1) // 2
        self.group_of = {n: groups[0] if i < half else groups[1] for i, n in enumerate(names)}
        self.inventory = tmp_path / "fleet.yml"
        self.write_inventory()

    def write_inventory(self, extra_host_vars=None) -> None:
        extra_host_vars = extra_host_vars or {}
        lines = ["all:", "  vars:", "    ansible_host: 127.0.0.1",
                 f"    ansible_ssh_private_key_file: {self.keys['client']}",
                 f"    ansible_ssh_common_args: -F {self.tmp}/ssh_config -o UserKnownHostsFile={self.known_hosts}",
                 "  children:"]
        for group, args in (("lobby", LOBBY), ("cafe", CAFE)):
            members = [n for n in self.names if self.group_of[n] == group]
            if not members:
                continue
            lines += [f"    {group}:", "      vars:", f"        program: {{args: {json.dumps(args)}}}", "      hosts:"]
            lines += [f"        {n}: {json.dumps({'ansible_port': self.devices[n].port, **extra_host_vars.get(n, {})})}"
                      for n in members]
        self.inventory.write_text("\n".join(lines) + "\n")

    def push(self, *args, env=None):
        r = kiosk_cli("fleet", "push", str(self.inventory), str(self.base), "--json", *args, cwd=self.tmp, env=env)
        try:
            report = json.loads(r.stdout)
        except ValueError:
            raise AssertionError(f"exit {r.returncode}: {r.stdout}\n{r.stderr}") from None
        return r, report, {row["host"]: row for row in report["devices"]}

    def generation(self, name: str) -> int:
        return store.pointer(self.devices[name].root)

    def argv(self, name: str) -> list[str]:
        root = self.devices[name].root
        return json.loads((root / "var/lib/kiosk/current/root/etc/kiosk/program.json").read_text())[4:]

    def close(self) -> None:
        for device in self.devices.values():
            device.close()


@pytest.fixture
def make_fleet(tmp_path, fake_mirror, keys):
    made = []

    def make(count, **kw):
        made.append(Fleet(tmp_path, fake_mirror, keys, count, **kw))
        return made[-1]

    yield make
    for fleet in made:
        fleet.close()


@pytest.mark.root
def test_twenty_devices_in_waves_stop_at_the_failure_budget_and_resume(make_fleet):
    """20 devices, canary + waves of 5: screen07 is unreachable (sshd stopped), screen12 rolls back (its new
    kiosk.service fails the health check). With --max-failures 1 the rollout stops after screen12's wave;
    screen13..20 are not touched. A second run, with both fixed, deploys exactly the rest."""
    fleet = make_fleet(20)
    dev = fleet.devices
    dev["screen07"].close()
    dev["screen12"].recording.write_text(json.dumps({"fail": [
        {"unit": "kiosk.service", "reason": "exited at once (status 1)", "when": "v2"}]}))
    untouched = {n: snapshot(dev[n].root) for n in fleet.names[12:]}

    r, report, rows = fleet.push("--batch", "5", "--max-failures", "1")
    assert r.returncode == 1, r.stderr
    assert rows["screen07"]["result"] == "unreachable" and "connection refused" in rows["screen07"]["reason"]
    assert rows["screen07"]["wave"] == "look"
    assert rows["screen12"]["result"] == "rolled back" and rows["screen12"]["wave"] == "wave 2/4"
    assert "generation 2 failed: kiosk.service: exited at once (status 1)" in rows["screen12"]["reason"]
    assert rows["screen01"]["wave"] == "canary"
    deployed = ["screen01", "screen02", "screen03", "screen04", "screen05", "screen06", "screen08", "screen09",
                "screen10", "screen11"]
    assert [n for n, row in rows.items() if row["result"] == "deployed"] == deployed
    assert {rows[n]["wave"] for n in deployed[1:6]} == {"wave 1/4"}
    assert [n for n, row in rows.items() if row["result"] == "not reached"] == fleet.names[12:]
    assert report["stopped"].startswith("2 failure(s) (screen07, screen12), more than --max-failures 1")
    assert report["failures"] == ["screen07", "screen12"]
    for name in deployed:
        assert fleet.generation(name) == 2 and rows[name]["generation"] == 2
        assert rows[name]["commit"] == pending.repo_main(dev[name].root)
        assert fleet.argv(name) == (LOBBY if fleet.group_of[name] == "lobby" else CAFE)
    assert fleet.generation("screen12") == 1 and fleet.argv("screen12") == ["https://example.org/v1"]
    assert pending.repo_main(dev["screen12"].root) == dev["screen12"].first_commit   # main never moved
    for name, before in untouched.items():
        assert snapshot(dev[name].root) == before, f"{name} was touched"
    assert "==> STOPPED: 2 failure(s)" in r.stderr and "8 device(s) not reached (untouched)" in r.stderr

    # the second run: screen07 is back, screen12 no longer fails; nothing deployed before is redeployed
    dev["screen07"].start()
    dev["screen12"].recording.write_text("{}")
    done = {n: snapshot(dev[n].root) for n in deployed}
    r, report, rows = fleet.push("--batch", "5", "--max-failures", "1")
    assert r.returncode == 0, r.stderr
    assert {n for n, row in rows.items() if row["result"] == "unchanged"} == set(deployed)
    assert {n for n, row in rows.items() if row["result"] == "deployed"} == \
        {"screen07", "screen12", *fleet.names[12:]}
    assert rows["screen07"]["wave"] == "canary"          # the first device that still needs the change
    for name in deployed:
        assert snapshot(dev[name].root) == done[name], f"{name} was redeployed"
    assert fleet.generation("screen12") == 3 and rows["screen12"]["generation"] == 3   # 2 is the rolled-back one
    for name in fleet.names:
        assert fleet.argv(name) == (LOBBY if fleet.group_of[name] == "lobby" else CAFE), name
        assert json.loads(store.current(dev[name].root).spec_text)["hostName"] == name

    # and a third run has nothing to do
    r, report, rows = fleet.push()
    assert r.returncode == 0 and {row["result"] for row in rows.values()} == {"unchanged"}

    # status: every device, its generation and commit; one stopped device is unreachable (exit 1)
    dev["screen20"].close()
    r = kiosk_cli("fleet", "status", str(fleet.inventory), "--json", "--timeout", "60")   # a loaded CI machine
    assert r.returncode == 1, r.stderr
    status = {row["host"]: row for row in json.loads(r.stdout)["devices"]}
    assert status["screen20"]["reachable"] is False and "connection refused" in status["screen20"]["health"]
    for name in fleet.names[:-1]:
        assert status[name]["reachable"] and status[name]["health"] == "ok", status[name]
        assert status[name]["generation"] == fleet.generation(name)
        assert status[name]["commit"] == pending.repo_main(dev[name].root)
        # kiosk status's facts: one root partition; no dpkg database in a harness root, so nothing to count
        assert status[name]["slots"] == {"booted": None, "slots": {}}
        assert status[name]["pending"]["count"] is None and {s["state"] for s in status[name]["pending"]["suites"]} \
            == {"unknown"}
    assert status["screen20"]["slots"] is None and status["screen20"]["pending"] is None


@pytest.mark.root
def test_a_bad_inventory_deploys_nothing(make_fleet):
    """Problems found before any device is contacted: exit 2, every device exactly as it was."""
    fleet = make_fleet(3)
    before = {n: snapshot(d.root) for n, d in fleet.devices.items()}
    good = fleet.inventory.read_text()
    cases = [
        (good.replace("program: {args:", "program: {argz: [1], args:", 1),
         "hosts screen01, screen02: /program/argz: unknown field"),
        (good.replace("      hosts:\n", "      hosts:\n        colourful: {colour: red, ansible_port: 1}\n", 1),
         "host colourful: /colour: unknown variable 'colour'"),
        (good.replace("      hosts:\n", "      hosts:\n        screen01: {}\n", 1), "appears twice in one mapping"),
        (good + "  oops: [\n", "fix the YAML there"),
    ]
    for text, needle in cases:
        fleet.inventory.write_text(text)
        r = kiosk_cli("fleet", "push", str(fleet.inventory), str(fleet.base))
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert needle in r.stderr, r.stderr
        assert r.stdout == ""
    for name, device in fleet.devices.items():
        assert snapshot(device.root) == before[name]


@pytest.mark.root
def test_host_keys_are_never_trusted_silently(make_fleet, keys, tmp_path):
    """A device whose host key is not in known_hosts is refused and named; --accept-new-host-keys trusts a first
    key (and writes it to known_hosts); a changed key is refused even then."""
    fleet = make_fleet(2)
    fleet.known_hosts.write_text(f"[127.0.0.1]:{fleet.devices['screen01'].port} {keys['host_pub']}\n")
    r, report, rows = fleet.push("--max-failures", "1")
    assert rows["screen02"]["result"] == "refused", (rows, r.stderr)
    assert "host key is not in your known_hosts" in rows["screen02"]["reason"]
    assert rows["screen01"]["result"] == "deployed" and fleet.generation("screen02") == 1, (rows, r.stderr)
    r, report, rows = fleet.push("--accept-new-host-keys")
    assert r.returncode == 0 and rows["screen02"]["result"] == "deployed", r.stderr
    assert f"[127.0.0.1]:{fleet.devices['screen02'].port}" in fleet.known_hosts.read_text()
    # screen01 now presents another key (reinstalled, or someone in between)
    lines = fleet.known_hosts.read_text().splitlines()
    fleet.known_hosts.write_text("\n".join(
        line.replace(keys["host_pub"].split()[1], keys["other_host_pub"].split()[1])
        if line.startswith(f"[127.0.0.1]:{fleet.devices['screen01'].port} ") else line for line in lines) + "\n")
    fleet.group_of = {"screen01": "cafe", "screen02": "lobby"}   # a change for both
    fleet.write_inventory()
    r, report, rows = fleet.push("--accept-new-host-keys", "--canary", "0", "--max-failures", "1")
    assert rows["screen01"]["result"] == "refused" and "CHANGED" in rows["screen01"]["reason"]
    assert rows["screen02"]["result"] == "deployed"


@pytest.mark.root
def test_status_times_out_on_a_device_that_never_answers(make_fleet):
    fleet = make_fleet(1)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(5)      # accepts TCP, never says a word (a wedged sshd)
    try:
        fleet.write_inventory({"screen01": {"ansible_port": silent.getsockname()[1]}})
        r = kiosk_cli("fleet", "status", str(fleet.inventory), "--timeout", "2")
        assert r.returncode == 1
        row = r.stdout.splitlines()[1].split()
        assert row[:3] == ["screen01", f"root@127.0.0.1:{silent.getsockname()[1]}", "NO"], r.stdout
        assert "timed out" in r.stdout or "no answer" in r.stdout, r.stdout
    finally:
        silent.close()


# ---------------------------------------------------------------- status: slots and pending fixes

def test_a_fleet_fetches_each_archive_index_once():
    """100 devices answering at once, 20 at a time, on two mirrors' worth of suites: each (mirror, suite,
    architecture) is fetched once, the devices that need it wait for that one fetch and share its index or its
    failure (an unreachable updates suite is "?" on every device, never 100 time-outs)."""
    calls, gate = Counter(), threading.Event()

    def fetch(mirror, suite, arch, *, deadline=None):
        calls[(mirror, suite, arch)] += 1
        gate.wait(10)   # every device has asked before any index arrives
        if suite.endswith("-updates"):
            raise archive.ArchiveUnavailable(f"cannot reach {mirror}/dists/{suite}/: connection refused")
        return archive.SuiteVersions({"foot": "1.0-1+deb12u1", "cage": "1.0-1+deb12u1"}, 0.0)

    def facts(i):
        board = "raspberryPi0" if i % 10 == 0 else "raspberryPi3"            # armel and arm64
        arch = "armel" if i % 10 == 0 else "arm64"
        return {"board": board, "packages": [["foot", "1.0-1", arch], ["cage", "1.0-1+deb12u1", arch]],
                "debian": {"mirror": "http://m", "securityMirror": "http://s"}}

    answers, lock = {}, threading.Lock()
    with one_status.SuiteIndexes(fetch=fetch) as indexes:
        def device(i):
            answer = (facts(i), *one_status.compare(facts(i), indexes))
            with lock:
                answers[i] = answer

        threads = [threading.Thread(target=device, args=(i,)) for i in range(100)]
        for start in range(0, 100, 20):
            for t in threads[start:start + 20]:
                t.start()
        for t in threads:
            t.join()
        gate.set()
        for facts_i, arch, rows in answers.values():
            one_status.count(rows, facts_i["packages"], arch, indexes)
    assert calls == {("http://s", "bookworm-security", "arm64"): 1, ("http://m", "bookworm-updates", "arm64"): 1,
                     ("http://s", "bookworm-security", "armel"): 1, ("http://m", "bookworm-updates", "armel"): 1}
    for facts_i, arch, rows in answers.values():
        security, updates = rows
        assert security["state"] == "checked" and [p["name"] for p in security["packages"]] == ["foot"]
        assert updates["state"] == "unavailable" and "connection refused" in updates["note"]
        data = one_status.view("x", facts_i, rows, arch)["pending"]
        assert data["count"] is None and one_status.pending_word(data) == "?"


def test_slot_and_pending_cells():
    """The fleet table's SLOT and PENDING cells from kiosk status's facts."""
    def slots(a, b, booted="A"):
        return {"booted": booted, "slots": {"A": {"state": a, "reason": "", "version": ""},
                                            "B": {"state": b, "reason": "", "version": ""}}}

    assert one_status.slots_word(slots("good", "empty")) == "A good (B empty)"
    assert one_status.slots_word(slots("good", "trying", booted="B")) == "B trying (A good)"
    assert one_status.slots_word(slots("good", "bad (the boot loader says bad: an install into it was "
                                               "interrupted?)")) == "A good (B bad)"
    assert one_status.slots_word(slots("good", "installed, boots next")) == "A good (B installed, boots next)"
    assert one_status.slots_word({"booted": None, "slots": {}}) == "-"          # one root partition
    assert one_status.slots_word(None) == one_status.slots_word({"slots": []}) == "?"   # the device could not say
    checked = {"state": "checked", "packages": [{"name": "foot"}]}
    assert one_status.pending_word({"count": 1, "suites": [checked, {"state": "off"}]}) == "1"
    assert one_status.pending_word({"count": None, "suites": [{"state": "unknown"}] * 2}) == "-"
    assert one_status.pending_word({"count": 0, "suites": [{"state": "off"}, {"state": "none"}]}) == "-"
    assert one_status.pending_word(None) == "-"


OLD_KIOSK = """#!/bin/sh
# kiosk from before `kiosk status --here` (what its argparse said to `status`); every other command the real one
if [ "$1" = status ]; then
    echo "usage: kiosk [-h] [--version] COMMAND ..." >&2
    echo "kiosk: error: argument COMMAND: invalid choice: 'status' (choose from 'generations', 'rollback')" >&2
    exit 2
fi
exec {venv}/kiosk "$@"
"""


@pytest.fixture
def fixes_mirror(tmp_path):
    """bookworm, bookworm-security and bookworm-updates for the fleet's raspberryPi3 devices (arm64)."""
    root = tmp_path / "mirror"
    write_mirror(root)
    write_suite(root, "bookworm-security", "arm64", {"foot": "1.0-1+deb12u1", "cage": "1.0-1+deb12u2"})
    write_suite(root, "bookworm-updates", "arm64", {"tzdata": "2025b-0+deb12u1"})
    server = Server(root)
    yield server
    server.close()


@pytest.mark.root
def test_status_shows_each_devices_slot_and_pending_fixes(tmp_path, fixes_mirror, keys):
    """screen01 is behind in both suites (3 pending), screen02 is up to date (0), screen03 runs a kiosk older
    than `kiosk status --here` (its generation and health; "-" for slot and pending). Harness devices have one
    root partition ("-": their /proc/cmdline is this machine's, without rauc.slot=). Each index is fetched once
    for the fleet. With the archive unreachable: "?" and one warning line; the rest of the table as before."""
    shim = tmp_path / "old-kiosk"
    shim.mkdir()
    (shim / "kiosk").write_text(OLD_KIOSK.format(venv=VENV_BIN))
    (shim / "kiosk").chmod(0o755)
    (tmp_path / "fleet").mkdir()
    fleet = Fleet(tmp_path / "fleet", fixes_mirror.url, keys, 3, debian={"securityMirror": fixes_mirror.url},
                  env={"screen03": {"PATH": f"{shim}:{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin"}})
    try:
        installed = {"screen01": [("foot", "1.0-1", "arm64"), ("cage", "1.0-1", "arm64"), ("htop", "1.0-1", "arm64"),
                                  ("tzdata", "2024a-0+deb12u1", "all")],
                     "screen02": [("foot", "1.0-1+deb12u1", "arm64"), ("tzdata", "2025b-0+deb12u1", "all")],
                     "screen03": [("foot", "1.0-1", "arm64")]}
        for name, packages in installed.items():
            (fleet.devices[name].root / "var/lib/dpkg").mkdir(parents=True)
            (fleet.devices[name].root / "var/lib/dpkg/status").write_text(dpkg_status(packages))
        commit = {name: device.first_commit[:12] for name, device in fleet.devices.items()}
        fixes_mirror.requests.clear()
        r = kiosk_cli("fleet", "status", str(fleet.inventory), "--timeout", "60",
                      env={"KIOSK_CACHE_DIR": str(tmp_path / "cache")})
        assert r.returncode == 0 and r.stderr == "", r.stdout + r.stderr
        lines = r.stdout.splitlines()
        assert lines[0].split() == ["HOST", "REACHED", "AS", "REACHABLE", "GEN", "COMMIT", "SLOT", "PENDING", "HEALTH"]
        cells = {line.split()[0]: line.split()[2:] for line in lines[1:]}
        assert cells == {"screen01": ["yes", "1", commit["screen01"], "-", "3", "ok"],
                         "screen02": ["yes", "1", commit["screen02"], "-", "0", "ok"],
                         "screen03": ["yes", "1", commit["screen03"], "-", "-", "ok"]}, r.stdout
        fetched = Counter(fixes_mirror.requests)
        assert "/dists/bookworm-security/main/binary-arm64/Packages.xz" in fetched, fetched
        assert "/dists/bookworm-updates/main/binary-arm64/Packages.xz" in fetched, fetched
        assert set(fetched.values()) == {1}, fetched    # two devices counted, each index fetched once

        r = kiosk_cli("fleet", "status", str(fleet.inventory), "--timeout", "60", "--json",
                      env={"KIOSK_CACHE_DIR": str(tmp_path / "cache")})
        rows = {row["host"]: row for row in json.loads(r.stdout)["devices"]}
        behind = {row["kind"]: {p["name"]: p["available"] for p in row["packages"]}
                  for row in rows["screen01"]["pending"]["suites"]}
        assert behind == {"security": {"cage": "1.0-1+deb12u2", "foot": "1.0-1+deb12u1"},
                          "updates": {"tzdata": "2025b-0+deb12u1"}}
        assert rows["screen01"]["pending"]["count"] == 3 and rows["screen02"]["pending"]["count"] == 0
        assert rows["screen01"]["slots"] == {"booted": None, "slots": {}} and rows["screen01"]["problems"] == []
        assert rows["screen01"]["generation"] == 1
        assert rows["screen01"]["commit"] == fleet.devices["screen01"].first_commit
        assert rows["screen03"]["slots"] is None and rows["screen03"]["pending"] is None
        assert rows["screen03"]["generation"] == 1 and rows["screen03"]["problems"] == [fleet_commands.OLDER]

        # the archive goes away (a fresh cache: nothing to fall back on): "?" and one line saying why
        fixes_mirror.close()
        r = kiosk_cli("fleet", "status", str(fleet.inventory), "--timeout", "60",
                      env={"KIOSK_CACHE_DIR": str(tmp_path / "cache2")})
        assert r.returncode == 0, r.stdout + r.stderr
        warning = r.stderr.splitlines()
        assert len(warning) == 1 and warning[0].startswith(
            f"kiosk: warning: pending fixes not counted on 2 device(s) (PENDING ?): archive unavailable: cannot "
            f"reach {fixes_mirror.url}/dists/bookworm-"), r.stderr
        cells = {line.split()[0]: line.split()[2:] for line in r.stdout.splitlines()[1:]}
        assert cells == {"screen01": ["yes", "1", commit["screen01"], "-", "?", "ok"],
                         "screen02": ["yes", "1", commit["screen02"], "-", "?", "ok"],
                         "screen03": ["yes", "1", commit["screen03"], "-", "-", "ok"]}, r.stdout
    finally:
        fleet.close()


# ---------------------------------------------------------------- images

@pytest.mark.root
def test_fleet_build_makes_one_image_per_device_from_one_cached_base(tmp_path, tmp_path_factory):
    """Two qemu devices of two groups: two images through kiosk build's pipeline, each with its own hostName and
    argv in generation 1; the second reuses the cached base (a configuration-only build); a rerun keeps both."""
    from imagetools import MINIMAL_PROGRAM, _cache_dir, _shared_dir, full_spec, read_root_file

    base = full_spec("qemu")
    del base["hostName"]
    (tmp_path / "nixiosk.json").write_text(json.dumps(base, indent=2))
    write(tmp_path, "fleet.yml", """\
        lobby:
          vars: {program: {args: ["--title=lobby"]}}
          hosts: {fleet-a: }
        cafe:
          vars: {program: {args: ["--title=cafe"]}}
          hosts: {fleet-b: }
        """)
    env = {"KIOSK_CACHE_DIR": str(_cache_dir(_shared_dir(tmp_path_factory)))}
    r = kiosk_cli("fleet", "build", "fleet.yml", "nixiosk.json", "-o", "images", "--json", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    images = {row["host"]: row for row in json.loads(r.stdout)["images"]}
    assert list(images) == ["fleet-a", "fleet-b"] and {row["result"] for row in images.values()} == {"built"}
    assert "fleet-b| " in r.stderr and "rootfs: reusing the" in r.stderr.split("[2/2] fleet-b")[1]
    for name, title in (("fleet-a", "lobby"), ("fleet-b", "cafe")):
        manifest = json.loads((tmp_path / "images" / name / "manifest.json").read_text())
        assert manifest["hostName"] == name and manifest["image"] == images[name]["image"]
        assert manifest["image"] == str(tmp_path / "images" / name / f"{name}-qemu.img")
        stored = json.loads(read_root_file(manifest["image"], "/var/lib/kiosk/generations/1/nixiosk.json"))
        assert stored == dict(base, hostName=name, program=dict(MINIMAL_PROGRAM, args=[f"--title={title}"]))
        program = json.loads(read_root_file(manifest["image"], "/var/lib/kiosk/generations/1/root/etc/kiosk/program.json"))
        assert program[3:] == ["/usr/bin/foot", f"--title={title}"]
    r = kiosk_cli("fleet", "build", "fleet.yml", "nixiosk.json", "-o", "images", cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.count("up to date") == 2, r.stdout + r.stderr


# ---------------------------------------------------------------- a LAN: discover, then NAME.local

@pytest.mark.root
def test_discovered_kiosks_are_pushed_to_as_name_local(tmp_path, fake_mirror, keys):
    """Two devices on a LAN of network namespaces (sshd on port 22 and the device agent announcing the name),
    the operator's laptop a third: `kiosk fleet discover` prints an inventory of both, and `kiosk fleet push`
    with it reaches hall.local and foyer.local through `kiosk ssh-proxy` (mDNS, no nss-mdns), host keys checked."""
    import os
    import shutil
    import subprocess
    import sys

    import yaml
    from mdns_netns import ROOT, Lan

    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1", KIOSK_OFFLINE="1")
    kiosk = shutil.which("kiosk", path=os.path.dirname(sys.executable))
    lan = Lan(subnet="10.79.0")
    devices = {}
    try:
        laptop = lan.add_host()
        for name in ("hall", "foyer"):
            host = lan.add_host()
            (tmp_path / name).mkdir()
            devices[name] = Device(tmp_path / name, device_spec(fake_mirror, keys, name), keys["client_pub"],
                                   keys["host"], device_paths=True, netns=host.ns, address=host.ip, port=22)
            host.popen(sys.executable, "-m", "kiosk", "agent", "--state-dir", str(devices[name].root / "var/lib/kiosk"),
                       stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{name}-agent.log", "w"), env=env)
        found = {}
        for _ in range(5):   # the agents probe their names for a second or two before they answer
            r = laptop.run(kiosk, "fleet", "discover", "--timeout", "3", env=env)
            assert r.returncode == 0, r.stderr
            found = yaml.safe_load(r.stdout)
            if len((found["all"].get("children") or {}).get("raspberryPi3", {}).get("hosts") or {}) == 2:
                break
        group = found["all"]["children"]["raspberryPi3"]
        assert group["vars"] == {"hardware": "raspberryPi3"} and sorted(group["hosts"]) == ["foyer", "hall"]
        assert "generation 1" in r.stdout and devices["hall"].first_commit[:12] in r.stdout

        (tmp_path / "ssh_config").write_text("")
        known = tmp_path / "known_hosts"
        known.write_text("".join(f"{n}.local {keys['host_pub']}\n" for n in devices))   # port 22: no [host]:port
        found["all"]["vars"] = {"ansible_ssh_private_key_file": str(keys["client"]),
                                "ansible_ssh_common_args": f"-F {tmp_path}/ssh_config -o UserKnownHostsFile={known}",
                                "program": {"args": LOBBY}}
        (tmp_path / "fleet.yml").write_text(yaml.safe_dump(found))
        base = device_spec(fake_mirror, keys, "x")
        del base["hostName"], base["hardware"]     # the discovered group says the board
        (tmp_path / "nixiosk.json").write_text(json.dumps(base))
        r = laptop.run(kiosk, "fleet", "push", str(tmp_path / "fleet.yml"), str(tmp_path / "nixiosk.json"), "--json",
                       env=env, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        rows = {row["host"]: row for row in json.loads(r.stdout)["devices"]}
        assert {row["result"] for row in rows.values()} == {"deployed"}, rows
        assert "pushing to root@hall.local" in r.stderr
        for name, device in devices.items():
            assert store.pointer(device.root) == 2
            assert json.loads((device.root / "var/lib/kiosk/current/root/etc/kiosk/program.json").read_text())[4:] \
                == LOBBY
        r = laptop.run(kiosk, "fleet", "status", str(tmp_path / "fleet.yml"), env=env, timeout=60)
        assert r.returncode == 0 and r.stdout.count(" ok") == 2, r.stdout + r.stderr
    finally:
        for device in devices.values():
            device.close()
        lan.close()


@pytest.mark.root
def test_a_device_reached_under_another_name_is_refused(make_fleet):
    """Two inventory entries with their addresses swapped (a typo in ansible_port): each would give one device
    the other's spec and name. Both are refused, named, untouched; --allow-rename is the way to rename."""
    fleet = make_fleet(2)
    before = {n: snapshot(d.root) for n, d in fleet.devices.items()}
    fleet.write_inventory({"screen01": {"ansible_port": fleet.devices["screen02"].port},
                           "screen02": {"ansible_port": fleet.devices["screen01"].port}})
    r, report, rows = fleet.push("--max-failures", "2")
    assert r.returncode == 1
    assert rows["screen01"]["result"] == "refused" and rows["screen01"]["wave"] == "look"
    assert rows["screen01"]["reason"].startswith(
        f"this device is 'screen02' (its main's nixiosk.json), not 'screen01': is "
        f"root@127.0.0.1:{fleet.devices['screen02'].port} the right address?")
    assert {n: snapshot(d.root) for n, d in fleet.devices.items()} == before
    r, report, rows = fleet.push("--allow-rename")
    assert r.returncode == 0 and {row["result"] for row in rows.values()} == {"deployed"}, r.stderr
    assert json.loads(store.current(fleet.devices["screen02"].root).spec_text)["hostName"] == "screen01"
