"""`kiosk agent` / `discover` / `resolve` / `ssh-proxy` over real multicast.

Every test builds its own LAN of network namespaces (tests/mdns_netns.py: a bridge,
one namespace per host) and runs the real `kiosk` as subprocesses in them. Agents
run on the current zeroconf (a laptop's) and, where available, on Debian
bookworm's 0.47.3 (the device's): KIOSK_DEVICE_PYTHON names that interpreter, or
/usr/bin/python3 is used when it has python3-zeroconf 0.47.x (apt).
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import kiosk_cli
from mdns_netns import Lan, make_state_dir

ROOT = Path(__file__).resolve().parent.parent
HELPER = str(Path(__file__).resolve().parent / "mdns_netns.py")



def _device_python() -> str | None:
    """An interpreter with bookworm's zeroconf 0.47.x, or None."""
    for candidate in (os.environ.get("KIOSK_DEVICE_PYTHON"), "/usr/bin/python3"):
        if not candidate or not os.path.exists(candidate):
            continue
        r = subprocess.run([candidate, "-c", "import zeroconf; print(zeroconf.__version__)"],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.startswith("0.47."):
            return candidate
    return None


DEVICE_PY = _device_python()
PYTHONS = [
    pytest.param(sys.executable, id="zeroconf-current"),
    pytest.param(DEVICE_PY, id="zeroconf-0.47.3", marks=pytest.mark.skipif(
        DEVICE_PY is None, reason="no bookworm zeroconf 0.47.3: apt install python3-zeroconf, or set "
                                  "KIOSK_DEVICE_PYTHON (see notes/mdns.md)")),
]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONDONTWRITEBYTECODE="1")


def network(test):
    """Needs root (network namespaces) and iproute2."""
    return pytest.mark.root(pytest.mark.skipif(not shutil.which("ip"), reason="needs iproute2")(test))


@pytest.fixture
def lan():
    net = Lan()
    yield net
    net.close()


class Agent:
    def __init__(self, host, state_dir: Path, log: Path, python: str, *extra: str):
        self.host, self.state_dir, self.log_path = host, state_dir, log
        self.proc = host.popen(python, "-m", "kiosk", "agent", "--state-dir", str(state_dir), *extra,
                               stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=ENV, cwd=str(ROOT))

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig=signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=10)


def start_agent(host, tmp_path: Path, name: str, python: str = sys.executable, *extra: str, **state) -> Agent:
    state_dir = make_state_dir(tmp_path / f"state-{host.ns}", name, **state)
    return Agent(host, state_dir, tmp_path / f"agent-{host.ns}.log", python, *extra)


def kiosk(host, *args: str, python: str = sys.executable, timeout: float = 60, input=None):
    return host.run(python, "-m", "kiosk", *args, timeout=timeout, env=ENV, input=input)


def wait_for(check, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def resolved(host, name: str, timeout: float = 0.5, python: str = sys.executable) -> list[str]:
    r = kiosk(host, "resolve", name, "--timeout", str(timeout), python=python)
    return r.stdout.split() if r.returncode == 0 else []


def ipv4(addresses) -> set[str]:
    return {a for a in addresses if ":" not in a}


def discovered(host, timeout: float = 2, python: str = sys.executable) -> dict[str, dict]:
    r = kiosk(host, "discover", "--json", "--timeout", str(timeout), python=python)
    assert r.returncode == 0, r.stderr
    return {k["host"]: k for k in json.loads(r.stdout)}


class Watch:
    """`kiosk discover --watch --json` running in a namespace; events as dicts."""

    def __init__(self, host, python: str = sys.executable):
        self.proc = host.popen(python, "-m", "kiosk", "discover", "--watch", "--json", stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=ENV, cwd=str(ROOT))
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()

    def next(self, predicate, timeout: float, what: str) -> dict:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = json.loads(self.lines.get(timeout=left))
            except queue.Empty:
                break
            if predicate(event):
                return event
        raise AssertionError(f"discover --watch: no {what} within {timeout} s"
                             + (f" (exited: {self.proc.stderr.read()})" if self.proc.poll() is not None else ""))

    def close(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --- without a network -------------------------------------------------------------------------

def test_state_is_read_without_trusting_it(tmp_path, monkeypatch):
    from kiosk.net.agent import read_state, sanitize_label

    monkeypatch.setattr("socket.gethostname", lambda: "Build_Host.example.org")
    assert read_state(tmp_path / "missing") == ("Build-Host", {"version": "0.1.0"})
    make_state_dir(tmp_path, "kitchen", generation=7, hardware="raspberryPi0", commit="c0ffee", package="kodi")
    assert read_state(tmp_path) == ("kitchen", {"version": "0.1.0", "hardware": "raspberryPi0", "generation": "7",
                                                "commit": "c0ffee", "program": "kodi"})
    (tmp_path / "generations/7/nixiosk.json").write_text('{"hostName": "bad name!", "program": [1]}')
    (tmp_path / "generations/7/meta.json").write_text("[truncated")
    assert read_state(tmp_path) == ("Build-Host", {"version": "0.1.0"})
    assert sanitize_label("...") == "kiosk" and len(sanitize_label("x" * 100)) == 63


@pytest.mark.parametrize("text, name", [("kitchen", "kitchen.local."), ("Kitchen.local", "Kitchen.local."),
                                        ("kitchen.LOCAL.", "kitchen.local."), ("a-1", "a-1.local.")])
def test_host_names(text, name):
    from kiosk.net.mdns import mdns_name

    assert mdns_name(text) == name


@pytest.mark.parametrize("text", ["", ".local", "-a", "a-", "a_b", "a.b.local", "x" * 64, "k\nl"])
def test_not_host_names(text):
    from kiosk.net.mdns import mdns_name
    from kiosk.core.errors import UsageError

    with pytest.raises(UsageError):
        mdns_name(text)


@pytest.mark.parametrize("text", ["kitchen.local", "Kitchen.LOCAL.", "example.org", "example.org.", "k\u00fcck.example",
                                  "127.0.0.1", "::1", "fe80::1%lo", "a" * 63 + ".example", ".".join(["a" * 61] * 4)])
def test_host_names_ssh_proxy_takes(text):
    from kiosk.net.mdns import host_name

    assert host_name(text) == text


@pytest.mark.parametrize("text, said", [
    ("\udced\udca0\udc80", "is not UTF-8 text"), ("", "is empty"), ("a b.example", "holds a space"),
    ("a\nb.example", "holds a space or a control character"), ("a" * 100_000, "has 100000 characters"),
    ("a" * 64 + ".example", "has a part longer than 63"), ("a..example", "has an empty part"),
    (".".join(["a" * 63] * 4), "has 255 characters"),
    ("bad_label.local", "is not a host name"), ("x" * 64 + ".local", "is not a host name")])
def test_host_names_ssh_proxy_refuses(text, said):
    """ssh-proxy handed a lone surrogate (an argument that is not UTF-8) or a 100,000-character name to the
    resolver, whose IDNA step raised UnicodeError: an internal error. Now one UsageError line first."""
    from kiosk.net.mdns import host_name
    from kiosk.core.errors import UsageError

    with pytest.raises(UsageError) as caught:
        host_name(text)
    assert said in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("host", [b"\xed\xa0\x80", b"a" * 100_000, b"caf\xe9.example"])
def test_ssh_proxy_refuses_a_host_that_is_not_one(host):
    exe = shutil.which("kiosk", path=os.path.dirname(sys.executable))
    r = subprocess.run([exe, "ssh-proxy", host, "22", "--timeout", "1"], capture_output=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and r.stdout == b"" and r.stderr.count(b"\n") == 1, r.stderr
    assert r.stderr.startswith(b"kiosk: host ") and b"internal error" not in r.stderr, r.stderr


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e999", "-1", "0", "86401"])
@pytest.mark.parametrize("command", [["resolve", "kitchen"], ["ssh-proxy", "kitchen.local", "22"], ["discover"],
                                     ["discover", "--watch", "--json"], ["agent", "--state-dir", "/nonexistent"]])
def test_durations_that_are_not_are_refused(command, value):
    """float() takes nan and inf: each used to hang (a deadline never reached) or do nothing at all."""
    option = "--interval" if command[0] == "agent" else "--timeout"

    def hung(signum, frame):
        raise TimeoutError(f"kiosk {' '.join(command)} {option} {value} still running after 20 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)  # subprocess.run kills the child when this interrupts it
    try:
        r = kiosk_cli(*command, f"{option}={value}")  # "=": argparse would take -inf for an option
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith(f"kiosk: {option} ") and "is not a usable number of seconds" in r.stderr, r.stderr
    assert "above 0" in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stdout == ""


def test_relay_passes_eof_both_ways():
    import socket as so

    from kiosk.net.discover import relay

    near, far = so.socketpair()
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    os.write(stdin_w, b"to the device")
    os.close(stdin_w)  # ssh closed its end
    done = threading.Thread(target=relay, args=(near, stdin_r, stdout_w))
    done.start()
    assert far.recv(100) == b"to the device" and far.recv(100) == b"", "EOF passed on as a half-close"
    far.sendall(b"and back")
    far.close()
    done.join(5)
    assert not done.is_alive()
    os.close(stdout_w)
    assert os.read(stdout_r, 100) == b"and back"


def test_ssh_config_names_this_kiosk_by_absolute_path():
    r = subprocess.run([sys.executable, "-m", "kiosk", "ssh-config"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0
    lines = [line.strip() for line in r.stdout.splitlines()]
    assert "Host *.local" in lines
    proxy = next(line for line in lines if line.startswith("ProxyCommand "))
    assert proxy.split()[1].startswith("/") and proxy.endswith(" ssh-proxy %h %p")


# --- over the network (root: namespaces) ----------------------------------------------------------------------------------

@network
def test_discover_twenty_agents(lan, tmp_path):
    hosts = [lan.add_host() for _ in range(21)]
    client, devices = hosts[0], hosts[1:]
    boards = ["raspberryPi0", "raspberryPi3", "raspberryPi4", "qemu"]
    for i, host in enumerate(devices, 1):
        start_agent(host, tmp_path, f"kiosk-{i:02d}", hardware=boards[i % 4], generation=i,
                    commit=f"{i:02x}" * 20, package=["cog", "kodi", "retroarch"][i % 3])

    def all_listed():
        found = discovered(client, timeout=2)
        return found if len(found) == 20 else None

    found = wait_for(all_listed, 60, "20 kiosks in `kiosk discover`", interval=0)
    for i, host in enumerate(devices, 1):
        k = found[f"kiosk-{i:02d}.local"]
        assert host.ip in k["addresses"]
        assert k["name"] == f"kiosk-{i:02d}"
        assert k["hardware"] == boards[i % 4]
        assert k["generation"] == str(i)
        assert k["commit"] == f"{i:02x}" * 20
        assert k["program"] == ["cog", "kodi", "retroarch"][i % 3]
        assert k["version"] == "0.1.0"
        assert k["port"] == 22
    table = kiosk(client, "discover", "--timeout", "2")
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["HOST", "ADDRESSES", "HARDWARE", "GEN", "PROGRAM", "COMMIT"]
    assert len(lines) == 21 and lines[1].startswith("kiosk-01.local ")


@network
@pytest.mark.parametrize("client_py", PYTHONS)
@pytest.mark.parametrize("agent_py", PYTHONS)
def test_resolve_and_an_independent_resolver(lan, tmp_path, agent_py, client_py):
    device, laptop = lan.add_host(), lan.add_host()
    agent = start_agent(device, tmp_path, "kitchen", agent_py)
    addresses = wait_for(lambda: resolved(laptop, "kitchen", python=client_py), 20, "kitchen.local to resolve")
    assert ipv4(addresses) == {device.ip}
    assert [a for a in addresses if a.startswith("fe80:")], "the link-local IPv6 address is published too"
    # Any spelling of the name.
    assert resolved(laptop, "KITCHEN.local.", timeout=2, python=client_py) == addresses
    # An independent resolver (BIND's dig, unicast to port 5353) agrees; _ssh._tcp and TXT are there.
    def dig(name: str, type_: str) -> list[str]:
        r = laptop.run("dig", "+short", "+tries=1", "+time=2", "-p", "5353", f"@{device.ip}", name, type_)
        return r.stdout.split() if r.returncode == 0 and not r.stdout.startswith(";;") else []

    assert dig("kitchen.local", "A") == [device.ip]
    assert set(dig("kitchen.local", "AAAA")) == {a for a in addresses if ":" in a}
    assert dig("kitchen._ssh._tcp.local", "SRV") == ["0", "0", "22", "kitchen.local."]
    assert dig("_ssh._tcp.local", "PTR") == ["kitchen._ssh._tcp.local."]  # dig warns on a malformed packet
    assert dig("_kiosk._tcp.local", "PTR") == ["kitchen._kiosk._tcp.local."]
    assert set(dig("kitchen._kiosk._tcp.local", "TXT")) == {
        '"version=0.1.0"', '"hardware=raspberryPi4"', '"generation=1"', f'"commit={1:040x}"', '"program=cog"',
        '"host=kitchen"'}
    # A name nobody has: a clear error after the timeout, exit 1.
    started = time.monotonic()
    r = kiosk(laptop, "resolve", "nobody.local", "--timeout", "1", python=client_py)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("kiosk: no answer for nobody.local within 1 s"), r.stderr
    assert time.monotonic() - started < 10
    bad = kiosk(laptop, "resolve", "no_such host", python=client_py)
    assert bad.returncode == 2 and "is not a host name" in bad.stderr
    assert "Traceback" not in agent.log()


@network
@pytest.mark.parametrize("second_py", PYTHONS)
def test_two_devices_claiming_one_name(lan, tmp_path, second_py):
    first, second, laptop = lan.add_host(), lan.add_host(), lan.add_host()
    a = start_agent(first, tmp_path, "twin")
    wait_for(lambda: resolved(laptop, "twin"), 20, "the first twin")
    b = start_agent(second, tmp_path, "twin", second_py)
    assert ipv4(wait_for(lambda: resolved(laptop, "twin-2"), 20, "twin-2.local")) == {second.ip}
    assert ipv4(resolved(laptop, "twin", timeout=2)) == {first.ip}, "the first keeps its name, alone"
    found = discovered(laptop)
    assert found["twin.local"]["name"] == "twin" and first.ip in found["twin.local"]["addresses"]
    assert found["twin-2.local"]["name"] == "twin-2" and second.ip in found["twin-2.local"]["addresses"]
    log = b.log()
    assert "HOST NAME CONFLICT: twin.local is already used by another device" in log, log
    assert "this device is twin-2.local" in log and first.ip in log
    assert "CONFLICT" not in a.log()


@network
@pytest.mark.parametrize("agent_py", PYTHONS)
def test_two_networks_joined_with_one_name_twice(lan, tmp_path, agent_py):
    """Both claimed the name apart (no probe could see the other); once joined, exactly one keeps it."""
    low, high, laptop = lan.add_host(), lan.add_host(), lan.add_host()
    lan.plug(low, False)
    lan.plug(high, False)
    a = start_agent(low, tmp_path, "pair", agent_py)
    b = start_agent(high, tmp_path, "pair", agent_py)
    wait_for(lambda: "announced pair.local" in a.log() and "announced pair.local" in b.log(), 20,
             "both to claim pair.local on their own")
    lan.plug(low, True)
    lan.plug(high, True)
    # Any query makes both answer on the shared link, and each hears the other.
    wait_for(lambda: ipv4(resolved(laptop, "pair-2")) == {low.ip}, 30, "the lower address to become pair-2")
    assert ipv4(resolved(laptop, "pair", timeout=2)) == {high.ip}
    assert "this device takes another" in a.log() and "this device keeps the name" in b.log()
    found = discovered(laptop)
    assert found["pair.local"]["name"] == "pair" and found["pair-2.local"]["name"] == "pair-2"


@network
@pytest.mark.parametrize("agent_py", PYTHONS)
def test_forged_announcements_do_not_take_the_name(lan, tmp_path, agent_py):
    """An attacker announcing "hijack.local is at <a greater address>" every 0.3 s, never answering a query,
    is not a conflict (RFC 6762 section 9): the device keeps its name and services, and keeps answering."""
    device, attacker, laptop = lan.add_host(), lan.add_host(), lan.add_host()
    agent = start_agent(device, tmp_path, "hijack", agent_py)
    wait_for(lambda: resolved(laptop, "hijack"), 20, "hijack.local")
    forged = f"{lan.subnet}.250"  # greater than the device's: the tie-break an old agent lost
    forger = attacker.popen(sys.executable, HELPER, "forge", "hijack.local.", forged, "20", "0.3",
                            stdout=subprocess.PIPE, text=True, env=ENV)
    during = []
    while forger.poll() is None:
        during.append(ipv4(resolved(laptop, "hijack", timeout=1)))
    assert int(forger.stdout.read()) > 50, "the attack ran"
    after = [ipv4(resolved(laptop, "hijack", timeout=1)) for _ in range(8)]
    log = agent.log()
    assert len(during) >= 10, during
    ok_during = sum(found == {device.ip} for found in during)
    assert ok_during >= 0.9 * len(during), (f"{ok_during} of {len(during)} resolutions during the attack", log)
    assert all(found == {device.ip} for found in after), (after, log)
    k = discovered(laptop)
    assert set(k) == {"hijack.local"}, (sorted(k), log)
    assert (k["hijack.local"]["name"], k["hijack.local"]["service"]) == ("hijack", "hijack._kiosk._tcp.local.")
    assert "hijack-" not in log and "takes another" not in log, log
    assert forged in log, "the forged claim is logged"
    assert "Traceback" not in log and len(log.splitlines()) < 10, f"no log flood: {log}"
    assert agent.proc.poll() is None


@network
def test_addresses_follow_the_network(lan, tmp_path):
    device, laptop = lan.add_host(address=False), lan.add_host()
    agent = start_agent(device, tmp_path, "roamer", sys.executable, "--interval", "1")
    time.sleep(2)
    assert resolved(laptop, "roamer") == [], "no IPv4 address yet: nothing to answer with"
    a, b, c = "10.77.0.101", "10.77.0.102", "10.77.0.103"

    def now_has(expected: set[str], what: str):
        wait_for(lambda: ipv4(resolved(laptop, "roamer")) == expected, 20, what)

    device.ip_cmd("addr", "add", f"{a}/24", "dev", "eth0")      # interface gets its address after start
    now_has({a}, "the first address")
    device.ip_cmd("addr", "add", f"{b}/24", "dev", "eth0")      # one more on the same interface
    now_has({a, b}, "the added address")
    device.ip_cmd("addr", "del", f"{b}/24", "dev", "eth0")      # and gone again
    now_has({a}, "the removed address to go")
    device.ip_cmd("addr", "add", f"{c}/24", "dev", "eth0")
    device.ip_cmd("addr", "del", f"{a}/24", "dev", "eth0")      # the address its socket was bound to
    now_has({c}, "the move to a new address")
    log = agent.log()
    assert "Traceback" not in log and "ERROR" not in log, log
    assert agent.proc.poll() is None


@network
@pytest.mark.parametrize("agent_py", PYTHONS)
def test_generation_change_and_goodbye(lan, tmp_path, agent_py):
    device, laptop = lan.add_host(), lan.add_host()
    agent = start_agent(device, tmp_path, "lobby", agent_py, "--interval", "60")
    watch = Watch(laptop)
    try:
        added = watch.next(lambda e: e["event"] == "added", 20, "lobby to appear")
        assert (added["host"], added["generation"], added["hardware"]) == ("lobby.local", "1", "raspberryPi4")
        # A new generation: TXT follows at once on SIGHUP (the poll interval here is 60 s).
        make_state_dir(agent.state_dir, "lobby", generation=2, hardware="raspberryPi3", package="kodi",
                       commit="ab" * 20)
        agent.proc.send_signal(signal.SIGHUP)
        sent = time.monotonic()
        updated = watch.next(lambda e: e["event"] == "updated" and e["generation"] == "2", 5, "generation 2")
        assert time.monotonic() - sent < 3
        assert (updated["hardware"], updated["program"], updated["commit"]) == ("raspberryPi3", "kodi", "ab" * 20)
        # A generation with another host name: the old name says goodbye, the new one appears.
        make_state_dir(agent.state_dir, "foyer", generation=3)
        agent.proc.send_signal(signal.SIGHUP)
        watch.next(lambda e: e["event"] == "removed" and e["host"] == "lobby.local", 10, "lobby to go")
        watch.next(lambda e: e["event"] == "added" and e["host"] == "foyer.local" and e["generation"] == "3",
                   10, "foyer to appear")
        assert ipv4(resolved(laptop, "foyer", timeout=2)) == {device.ip}
        assert resolved(laptop, "lobby", timeout=1) == []
        # Stopping says goodbye: browsers drop the device at once, not after the TTL (75 min).
        stopped = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        watch.next(lambda e: e["event"] == "removed" and e["host"] == "foyer.local", 5, "goodbye")
        assert time.monotonic() - stopped < 2.5
        assert agent.proc.wait(timeout=10) == 0
    finally:
        watch.close()
    assert "goodbye from foyer.local" in agent.log()


@network
@pytest.mark.parametrize("agent_py", PYTHONS)
def test_hostile_packets(lan, tmp_path, agent_py):
    device, attacker, laptop = lan.add_host(), lan.add_host(), lan.add_host()
    agent = start_agent(device, tmp_path, "sturdy", agent_py)
    wait_for(lambda: resolved(laptop, "sturdy"), 20, "sturdy.local")
    seed = random.randrange(1 << 30)  # in the failure messages: rerun mdns_netns.py fuzz with it
    fuzz = attacker.run(sys.executable, HELPER, "fuzz", device.ip, "6000", str(seed), timeout=120, env=ENV)
    assert fuzz.returncode == 0 and int(fuzz.stdout) > 5000, (seed, fuzz)
    assert agent.proc.poll() is None, (seed, agent.log())
    assert ipv4(resolved(laptop, "sturdy", timeout=3)) == {device.ip}, seed
    k = discovered(laptop)["sturdy.local"]
    assert (k["name"], k["generation"], k["hardware"]) == ("sturdy", "1", "raspberryPi4")
    assert "evil.local" not in discovered(laptop), "the fuzzer's own records are not the agent's"
    log = agent.log()
    assert "Traceback" not in log and len(log.splitlines()) < 10, f"seed {seed}, no log flood: {log[-2000:]}"


@network
def test_ssh_proxy_over_mdns(lan, tmp_path):
    device, laptop = lan.add_host(), lan.add_host()
    start_agent(device, tmp_path, "shell")
    echo = device.popen(sys.executable, HELPER, "echo", "2222", stdout=subprocess.PIPE, text=True)
    assert echo.stdout.readline().strip() == "ready"
    wait_for(lambda: resolved(laptop, "shell"), 20, "shell.local")
    payload = os.urandom(300_000)
    r = subprocess.run(["ip", "netns", "exec", laptop.ns, sys.executable, "-m", "kiosk", "ssh-proxy",
                        "shell.local", "2222"], input=payload, capture_output=True, timeout=60, env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stdout == payload
    # Without .local it is ordinary name resolution (here: an address literal).
    r = subprocess.run(["ip", "netns", "exec", laptop.ns, sys.executable, "-m", "kiosk", "ssh-proxy",
                        device.ip, "2222"], input=b"plain", capture_output=True, timeout=60, env=ENV)
    assert (r.returncode, r.stdout) == (0, b"plain")
    r = kiosk(laptop, "ssh-proxy", "nobody.local", "22", "--timeout", "1")
    assert r.returncode == 1 and "no answer for nobody.local" in r.stderr
    r = kiosk(laptop, "ssh-proxy", "shell.local", "1")
    assert r.returncode == 1 and r.stderr.startswith("kiosk: cannot connect to shell.local port 1: 10.77.0.10:")

    # And the real thing: OpenSSH through `kiosk ssh-config`'s ProxyCommand, no nss-mdns anywhere.
    if not (shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")) or not shutil.which("ssh"):
        return
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    hostkey, userkey = tmp_path / "hostkey", tmp_path / "userkey"
    for key in (hostkey, userkey):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    conf = tmp_path / "sshd_config"
    conf.write_text(f"Port 2022\nHostKey {hostkey}\nAuthorizedKeysFile {userkey}.pub\nPermitRootLogin yes\n"
                    f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nPidFile none\n"
                    "StrictModes no\n")  # the key sits under /tmp, which is world-writable
    device.popen("/usr/sbin/sshd", "-D", "-e", "-f", str(conf), stderr=open(tmp_path / "sshd.log", "w"))
    snippet = kiosk(laptop, "ssh-config")
    assert snippet.returncode == 0 and "Host *.local" in snippet.stdout
    proxy = next(line.split(None, 1)[1] for line in snippet.stdout.splitlines()
                 if line.strip().startswith("ProxyCommand"))
    assert proxy.startswith("/") and proxy.endswith("ssh-proxy %h %p")
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(snippet.stdout + f"    User root\n    Port 2022\n    IdentityFile {userkey}\n"
                          f"    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    BatchMode yes\n"
                          f"    LogLevel ERROR\n")

    def ssh_works():
        r = subprocess.run(["ip", "netns", "exec", laptop.ns, "env", f"PYTHONPATH={ROOT}", "ssh", "-F",
                            str(ssh_config), "shell.local", "echo", "hello from", "$((6*7))"],
                           capture_output=True, text=True, timeout=30)
        return r.stdout.strip() == "hello from 42"

    wait_for(ssh_works, 20, "ssh shell.local via the ProxyCommand", interval=0.5)
