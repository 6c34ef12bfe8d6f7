"""A throw-away LAN made of network namespaces, for the mDNS tests and bench/mdns.py.

One "hub" namespace holds a Linux bridge; every host is its own namespace with an
`eth0` veth leg plugged into that bridge, so multicast (224.0.0.251:5353) really
travels between hosts, as on a home LAN. Names are unique per LAN so tests can run
in parallel (pytest-xdist); `close()` deletes every namespace it made (deleting a
namespace deletes its veth ends) after ending the processes it started.

Run as a script inside a namespace for the helpers a test needs there:
    python mdns_netns.py echo PORT          TCP echo server (prints "ready" once listening)
    python mdns_netns.py fuzz IP COUNT SEED  send COUNT hostile mDNS packets to IP and 224.0.0.251
    python mdns_netns.py forge NAME ADDRESS SECONDS INTERVAL
                                             announce "NAME is at ADDRESS" (unsolicited A, cache-flush)
                                             every INTERVAL s for SECONDS s; prints how many were sent
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


class Host:
    def __init__(self, lan: "Lan", index: int, ns: str, ip: str | None):
        self.lan, self.index, self.ns, self.ip = lan, index, ns, ip

    def run(self, *cmd: str, timeout: float = 60, input: str | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *cmd], capture_output=True, text=True,
                              timeout=timeout, input=input, env=env)

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *cmd], **kw)
        self.lan.procs.append(proc)
        return proc

    def ip_cmd(self, *args: str) -> None:
        sh("ip", "-n", self.ns, *args)


class Lan:
    """A bridge plus hosts; `with Lan() as lan:` or call close() in a finalizer."""

    def __init__(self, subnet: str = "10.77.0"):
        self.tag = secrets.token_hex(3)
        self.subnet = subnet
        self.hub = f"kmh-{self.tag}"
        self.namespaces: list[str] = []
        self.hosts: list[Host] = []
        self.procs: list[subprocess.Popen] = []
        self._add_ns(self.hub)
        sh("ip", "-n", self.hub, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
        sh("ip", "-n", self.hub, "link", "set", "br0", "up")

    def _add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def add_host(self, address: bool = True) -> Host:
        """A new namespace with eth0 on the bridge; address 10.77.0.(10+i)/24 unless address=False."""
        i = len(self.hosts)
        ns = f"kmd-{self.tag}-{i}"
        self._add_ns(ns)
        # No IPv6 duplicate address detection delaying link-local addresses; and, as systemd sets it
        # on a device (50-default.conf), removing a primary IPv4 address promotes the secondary one
        # instead of deleting every address of that subnet.
        sh("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.default.accept_dad=0",
           "net.ipv6.conf.all.accept_dad=0", "net.ipv4.conf.default.promote_secondaries=1",
           "net.ipv4.conf.all.promote_secondaries=1", check=False)
        sh("ip", "-n", self.hub, "link", "add", f"h{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "-n", self.hub, "link", "set", f"h{i}", "master", "br0", "up")
        ip = f"{self.subnet}.{10 + i}" if address else None
        if ip:
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        # dig @224.0.0.251 and other route-less multicast senders need a route.
        sh("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0", check=False)
        host = Host(self, i, ns, ip)
        self.hosts.append(host)
        return host

    def plug(self, host: Host, connected: bool) -> None:
        """Plug a host's cable into the bridge or pull it (its eth0 stays up, without carrier)."""
        sh("ip", "-n", self.hub, "link", "set", f"h{host.index}", "up" if connected else "down")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self.namespaces):
            # Anything still running in there (children of killed processes) goes too.
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces.clear()

    def __enter__(self) -> "Lan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_state_dir(path: Path, host_name: str, generation: int = 1, hardware: str = "raspberryPi4",
                   commit: str | None = None, package: str = "cog") -> Path:
    """A device state dir: generations/N/{nixiosk.json,meta.json} and current -> generations/N."""
    gen = path / "generations" / str(generation)
    gen.mkdir(parents=True, exist_ok=True)
    spec = {"hostName": host_name, "hardware": hardware,
            "program": {"package": package, "executable": f"/bin/{package}", "args": ["https://example.org"]}}
    meta = {"number": generation, "commit": commit or f"{generation:040x}", "date": "2024-01-01T00:00:00Z",
            "status": "booted"}
    (gen / "nixiosk.json").write_text(json.dumps(spec))
    (gen / "meta.json").write_text(json.dumps(meta))
    tmp = path / "current.new"
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(f"generations/{generation}")
    os.replace(tmp, path / "current")  # atomic, as the device switches
    return path


# --- helpers run inside a namespace ------------------------------------------------------------

def echo_server(port: int) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(5)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)


def _name(rng: random.Random) -> bytes:
    out = b""
    for _ in range(rng.randint(0, 4)):
        label = bytes(rng.randint(0, 255) for _ in range(rng.choice([0, 1, 5, 63, 64, 70])))
        out += bytes([len(label) & 0xFF]) + label
    return out + rng.choice([b"\x00", b"", b"\xc0\x0c", b"\xc0\x00", b"\xff\xff", b"\x05local\x00"])


def hostile_packets(count: int, seed: int, target_name: bytes = b"\x05kiosk\x05local\x00"):
    """Random bytes, truncated and bit-flipped real packets, compression loops, lying counts."""
    from zeroconf import DNSOutgoing, DNSQuestion, DNSAddress, DNSText, DNSService, DNSPointer
    from zeroconf.const import _FLAGS_QR_QUERY, _FLAGS_QR_RESPONSE, _FLAGS_AA

    rng = random.Random(seed)
    real = []
    q = DNSOutgoing(_FLAGS_QR_QUERY)
    q.add_question(DNSQuestion("kiosk.local.", 1, 1))
    q.add_question(DNSQuestion("_kiosk._tcp.local.", 12, 1))
    real += q.packets()
    r = DNSOutgoing(_FLAGS_QR_RESPONSE | _FLAGS_AA)
    r.add_answer_at_time(DNSPointer("_kiosk._tcp.local.", 12, 1, 4500, "evil._kiosk._tcp.local."), 0)
    r.add_answer_at_time(DNSService("evil._kiosk._tcp.local.", 33, 0x8001, 120, 0, 0, 22, "evil.local."), 0)
    r.add_answer_at_time(DNSText("evil._kiosk._tcp.local.", 16, 0x8001, 4500, b"\x05a=b\xff\xff"), 0)
    r.add_answer_at_time(DNSAddress("evil.local.", 1, 0x8001, 120, b"\x0a\x00\x00\x01"), 0)
    real += r.packets()
    def answer(rtype: int, rdata: bytes, name: bytes = target_name) -> bytes:
        return (struct.pack("!HH4H", 0, 0x8400, 0, 1, 0, 0) + name
                + struct.pack("!HHIH", rtype, 0x8001, 120, len(rdata)) + rdata)

    # Known-nasty ones first, so every run has them (the HINFO one makes zeroconf 0.47.3 raise
    # UnicodeDecodeError out of datagram_received).
    nasty = [
        answer(13, b"\x04\xff\xfe\xc0\x00\x02ok"),            # HINFO, not UTF-8
        answer(16, b"\xff" + b"x" * 10),                       # TXT string longer than its record
        answer(47, target_name + b"\x00\xff" + b"\xff" * 4),    # NSEC bitmap longer than it says
        answer(33, b"\x00\x00"),                               # SRV cut short
        answer(1, b"\x0a\x00"),                                # A with 2 bytes
        answer(28, b"\xfe\x80" * 3),                           # AAAA with 6 bytes
        answer(12, b"\xc0\x0c"),                               # PTR pointing at itself
        struct.pack("!HH4H", 0, 0, 1, 0, 0, 0) + b"\xc0\x0c",   # question name = pointer loop
        b"\x00" * 12,                                           # empty message
        b"\xff" * 12,                                           # all counts 65535, no data
    ]
    yield from nasty
    for n in range(count - len(nasty)):
        kind = n % 6
        if kind == 0:  # pure noise
            yield bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 1500)))
        elif kind == 1:  # a real packet cut short
            p = rng.choice(real)
            yield p[:rng.randint(0, len(p) - 1)]
        elif kind == 2:  # a real packet with bytes flipped
            p = bytearray(rng.choice(real))
            for _ in range(rng.randint(1, 8)):
                p[rng.randrange(len(p))] = rng.getrandbits(8)
            yield bytes(p)
        elif kind == 3:  # header that lies about its counts
            flags = rng.choice([0, 0x8400, 0x0200, 0xFFFF])
            counts = [rng.choice([0, 1, 255, 65535]) for _ in range(4)]
            yield struct.pack("!HH4H", rng.getrandbits(16), flags, *counts) + _name(rng) + b"\x00\x01\x00\x01"
        elif kind == 4:  # compression pointer loops and out-of-range pointers
            ptr = rng.choice([b"\xc0\x0c", b"\xc0\x0e", b"\xff\xff", b"\xc0\x10"])
            yield struct.pack("!HH4H", 0, 0, 1, 0, 0, 0) + ptr + b"\x00\x01\x00\x01" + ptr
        else:  # a response about the target's name with garbage rdata
            rdata = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
            rtype = rng.choice([1, 28, 12, 13, 33, 16, 47, 255, 41])
            yield (struct.pack("!HH4H", 0, 0x8400, 0, 1, 0, 0) + target_name
                   + struct.pack("!HHIH", rtype, 0x8001, rng.getrandbits(32), rng.choice([len(rdata), 0, 65535]))
                   + rdata)


def fuzz(ip: str, count: int, seed: int) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
    s5353 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # from port 5353: "real" mDNS traffic
    s5353.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s5353.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s5353.bind(("", 5353))
    sent = 0
    for n, packet in enumerate(hostile_packets(count, seed)):
        sock = s5353 if n % 2 else s
        dest = "224.0.0.251" if n % 3 else ip
        try:
            sock.sendto(packet, (dest, 5353))
            sent += 1
        except OSError:
            pass  # e.g. EMSGSIZE: still count as tried
        if n % 200 == 199:
            time.sleep(0.01)  # don't just fill the socket buffer: let the agent chew on them
    print(sent, flush=True)


def forged_announcement(name: str, address: str, ttl: int = 120) -> bytes:
    """An unsolicited mDNS response: `name` A `address`, cache-flush set, as its owner would announce it."""
    labels = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split("."))
    return (struct.pack("!HH4H", 0, 0x8400, 0, 1, 0, 0) + labels + b"\x00"
            + struct.pack("!HHIH", 1, 0x8001, ttl, 4) + socket.inet_aton(address))


def forge(name: str, address: str, seconds: float, interval: float) -> None:
    """Announce a forged address for `name` from port 5353 every `interval` s, for `seconds` s."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
    s.bind(("", 5353))
    packet = forged_announcement(name, address)
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s.sendto(packet, ("224.0.0.251", 5353))
        sent += 1
        time.sleep(interval)
    print(sent, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "echo":
        echo_server(int(sys.argv[2]))
    elif sys.argv[1] == "fuzz":
        fuzz(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "forge":
        forge(sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]))
    else:
        raise SystemExit(f"unknown helper {sys.argv[1]}")
