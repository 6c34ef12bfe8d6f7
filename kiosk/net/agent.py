"""`kiosk agent`: the device's mDNS responder (systemd service kiosk-agent).

It gives the device its name, `<hostName>.local` (A and AAAA for every address the
device has), and announces `_ssh._tcp` (port 22) and `_kiosk._tcp` (port 22, TXT:
hardware, generation, commit, version, program, host) so `kiosk discover` finds it.

What python-zeroconf does not do, and this does:
- Probe the host name before claiming it (the library only probes service
  instance names): when another device answers for `<hostName>.local`, take
  `<hostName>-2` (then -3, ...), log it loudly, and say so in TXT `host`.
- Defend the name once claimed (RFC 6762 section 9): another host's address for
  it, heard in an announcement, only makes the agent probe again (rate-limited)
  and re-announce; it gives the name up only to a host that answers its probes
  for it, twice, and wins the tie-break. Forged unsolicited announcements cannot
  take the name or make the service names drift.
- Follow the running generation (/var/lib/kiosk/current): a new hostName, board,
  program or commit is re-announced without a restart. Polled every --interval
  seconds; SIGHUP makes it look at once.
- Follow the network: addresses come and go (DHCP, Wi-Fi, an interface that comes
  up after the agent started). Polled with ifaddr every --interval seconds.
  A new address on an interface we already listen on is a records update (with
  goodbyes for addresses that went away); a new interface, or the loss of an
  address a socket was bound to, rebuilds the Zeroconf instance (bookworm's 0.47.3
  cannot add interfaces to a running one), without goodbyes and without probing
  again, since the names are still ours.
- Goodbye (TTL 0) for everything on SIGTERM/SIGINT, so browsers forget the device
  at once instead of after the records' TTL.

Works with bookworm's python3-zeroconf 0.47.3 and with current releases.
mDNS traffic goes over IPv4 (AAAA records are still answered, over IPv4).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import select
import signal
import socket
import sys
import time
from pathlib import Path

from kiosk import __version__
from kiosk.net.mdns import (KIOSK_TYPE, SSH_TYPE, cached_records, ipv4_of, local_addresses, probe, resolve,
                            seconds, tolerate_bad_packets)
from kiosk.core.errors import KioskError
from kiosk.device import store

log = logging.getLogger("kiosk.net.agent")

DEFAULT_STATE_DIR = "/var/lib/kiosk"
PROBE_TIME = 1.0     # seconds listening for another owner of a host name (3 queries, as RFC 6762 probes)
REPROBE_MIN = 5.0    # after a re-probe that nobody answered, wait this long before the next one ...
REPROBE_MAX = 60.0   # ... doubling up to this while unanswered announcements keep coming
QUIET_RESET = 120.0  # seconds without foreign records after which a new one is probed at once again
MAX_SUFFIX = 99
TXT_MAX = 200        # bytes per TXT value we publish; a TXT string is at most 255


def sanitize_label(text: str) -> str:
    """A usable DNS label from arbitrary text (the fallback system host name)."""
    label = re.sub(r"[^A-Za-z0-9-]+", "-", text.split(".")[0]).strip("-")[:63].strip("-")
    return label or "kiosk"


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def read_state(state_dir: Path) -> tuple[str, dict[str, str]]:
    """(host name, TXT without `host`) from the running generation, or the system's host name.

    The spec was validated before it became a generation, so this only reads it;
    it still never trusts it enough to crash on a broken file.
    """
    spec, meta = store.read_running(state_dir, lambda why: _warn_once(f"{why}; announcing without it"))
    host = spec.get("hostName")
    if not isinstance(host, str) or sanitize_label(host) != host:
        host = sanitize_label(socket.gethostname())
    txt: dict[str, str] = {"version": __version__}
    program = spec.get("program")
    for key, value in (("hardware", spec.get("hardware")),
                       ("generation", meta.get("number")),
                       ("commit", meta.get("commit")),
                       ("program", program.get("package") if isinstance(program, dict) else None)):
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            txt[key] = str(value)[:TXT_MAX]
    return host, txt


def _packed(address: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)


def _flat(addresses: dict[str, list[str]]) -> list[str]:
    return sorted({a for addrs in addresses.values() for a in addrs})


class Agent:
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.zc = None                 # the Zeroconf instance, once there is an IPv4 address
        self.bound: dict[str, str] = {}  # IPv4 address the instance was created with -> its interface
        self.addresses: dict[str, list[str]] = {}
        self.base = ""                 # the host name the spec asks for
        self.name = ""                 # the host name we got (base, or base-N)
        self.txt: dict[str, str] = {}
        self.instances: dict[str, str] = {}  # service type -> instance name we registered
        self.published: set[str] = set()     # every address this process ever announced
        self.defended: set[str] = set()      # the other claimant we last re-announced against
        self.reported: set[str] = set()      # addresses claimed by unanswered announcements, logged once
        self.probe_gap = 0.0                 # seconds between re-probes that found nobody (backing off)
        self.next_probe = 0.0                # time.monotonic() before which we do not re-probe
        self.last_probe = 0.0

    # -- the loop ---------------------------------------------------------------------------

    def tick(self) -> None:
        base, txt = read_state(self.state_dir)
        addresses = local_addresses()
        if not ipv4_of(addresses):
            if self.zc is not None:
                log.warning("no IPv4 address left: not answering until one comes back")
                self._drop_instance()
                self.name = ""
            self.addresses = addresses
            return
        if self.zc is None:
            self._start(base, txt, addresses)
            return
        if base != self.base:
            log.info("the running generation asks for host name %s.local (was %s.local)", base, self.base)
            self._unregister()
            self.addresses, self.txt = addresses, txt
            self._claim_and_register(base)
            return
        if self._needs_rebuild(addresses):
            self._rebuild(addresses)
        elif _flat(addresses) != _flat(self.addresses):
            self._update_addresses(addresses)
        if txt != self.txt:
            log.info("generation changed: %s", _describe(txt))
            self.txt = txt
            self.zc.update_service(self._kiosk_info())
        self._check_conflict()

    def stop(self) -> None:
        if self.zc is not None:
            log.info("stopping: goodbye from %s.local", self.name)
            self.zc.close()  # unregisters every service: goodbye packets, TTL 0
            self.zc = None

    # -- claiming a name ----------------------------------------------------------------------

    def _start(self, base: str, txt: dict[str, str], addresses: dict[str, list[str]]) -> None:
        from zeroconf import IPVersion, Zeroconf

        self.addresses, self.txt = addresses, txt
        v4 = ipv4_of(addresses)
        self.bound = {a: iface for iface, addrs in addresses.items() for a in addrs if a in v4}
        self.zc = Zeroconf(interfaces=v4, ip_version=IPVersion.V4Only)
        tolerate_bad_packets(self.zc, log)
        log.info("listening on %s", ", ".join(f"{a} ({i})" for a, i in self.bound.items()))
        self._claim_and_register(base)

    def _claim_and_register(self, base: str) -> None:
        self.base = base
        self.name = self._claim(base)
        self.instances = {}
        infos = {KIOSK_TYPE: self._kiosk_info(), SSH_TYPE: self._ssh_info()}
        self._register(list(infos.values()), allow_name_change=True)
        for type_, info in infos.items():
            self.instances[type_] = info.name
            if info.name != f"{self.name}.{type_}":
                log.warning("service name %s was taken; announced as %s", f"{self.name}.{type_}", info.name)
        log.info("announced %s.local: %s; %s", self.name, " ".join(_flat(self.addresses)), _describe(self.txt))

    def _claim(self, base: str) -> str:
        """The first of base, base-2, base-3 ... that no other device answers for."""
        mine = set(_flat(self.addresses))
        v4 = ipv4_of(self.addresses)
        owner: set[str] = set()
        for n in range(1, MAX_SUFFIX + 1):
            suffix = "" if n == 1 else f"-{n}"
            candidate = base[: 63 - len(suffix)] + suffix
            answers = set(resolve(candidate, timeout=PROBE_TIME, settle=0.25, interfaces=v4))
            others = answers - mine  # our own addresses: this device (e.g. avahi) answering, no conflict
            if not others:
                if n > 1:
                    log.warning("HOST NAME CONFLICT: %s.local is already used by another device on this network "
                                "(%s); this device is %s.local until one of them is renamed",
                                base, " ".join(sorted(owner)), candidate)
                return candidate
            if n == 1:
                owner = others
            log.warning("%s.local is taken (answered by %s)", candidate, " ".join(sorted(others)))
        raise KioskError(f"no free host name from {base}.local to {base}-{MAX_SUFFIX}.local",
                         hint="give this device another hostName: every numbered name is taken on this network")

    def _check_conflict(self) -> None:
        """Another host claiming our host name after we probed and announced it (RFC 6762 section 9).

        A genuine conflict: two devices with one name probed at the same moment (a power cut
        ends) or two networks were joined. A forged one: anyone on the LAN can multicast
        "<name>.local is at 10.0.0.250" as often as they like. So a foreign address record in
        our cache is only a reason to probe again, never to give the name up: the name is
        ours until another host ANSWERS our probe for it with other addresses (an answer
        comes back to the probe's own port; an unsolicited announcement never does), and
        answers a second probe too. Then both devices decide alike: the one whose greatest
        IPv4 address is greater keeps the name and re-announces (peers flush the other's
        address records); the other drops its records silently (a goodbye would also
        retract the PTR/SRV both share) and claims a new name, which the probe then finds
        taken: name-2. A probe that ends with us keeping the name re-announces our records
        (flushing forged ones from peers' caches) and backs the next one off (5 s, doubling
        to 60 s), so a flood of announcements cannot make us flood the network.
        """
        now = time.monotonic()
        if now < self.next_probe:
            return
        records = [(a, r) for a, r in cached_records(self.zc, f"{self.name}.local.") if a not in self.published]
        if not records:
            if now - self.last_probe > QUIET_RESET:
                self.probe_gap = 0.0
            return
        claimed = {a for a, _ in records}
        self.last_probe = now
        answered = self._probe_others()
        if answered and self._wins(answered):
            again = self._probe_others()  # one answer is not enough: it must be there when asked again
            if again and self._wins(again):
                log.warning("HOST NAME CONFLICT: %s also answers for %s.local; it keeps the name (greater "
                            "address), this device takes another", " ".join(sorted(answered | again)), self.name)
                self._forget_services()
                self._claim_and_register(self.base)
                return
            answered = again
        self._forget_cached([r for _, r in records])  # judged; only a new announcement makes us look again
        if answered and answered != self.defended:
            log.warning("HOST NAME CONFLICT: %s also answers for %s.local; this device keeps the name "
                        "(greater address) and re-announces it", " ".join(sorted(answered)), self.name)
        elif not answered and claimed - self.reported:
            log.warning("announcements claim %s.local for %s, but no host answers for it with that address "
                        "when asked: not a conflict (RFC 6762 section 9); this device keeps the name and "
                        "re-announces it", self.name, " ".join(sorted(claimed)))
            self.reported = claimed | (self.reported if len(self.reported) < 256 else set())
        self.defended = answered
        self.zc.update_service(self._kiosk_info())
        self.zc.update_service(self._ssh_info())
        self.probe_gap = min(max(2 * self.probe_gap, REPROBE_MIN), REPROBE_MAX)
        self.next_probe = now + self.probe_gap

    def _probe_others(self) -> set[str]:
        """Addresses other hosts give when asked for our name (three queries over PROBE_TIME)."""
        answers = probe(self.name, PROBE_TIME, interfaces=ipv4_of(self.addresses))
        return set(answers) - set(_flat(self.addresses))

    def _wins(self, answered: set[str]) -> bool:
        """The tie-break both devices make alike: whether `answered` (other hosts' addresses) beats ours."""
        mine = ipv4_of(self.addresses) or _flat(self.addresses)
        their_v4 = [a for a in answered if ":" not in a]
        return max(map(_packed, their_v4 or answered)) > max(map(_packed, mine))

    def _forget_cached(self, records: list) -> None:
        """Drop records from our own cache (in zeroconf's loop; those that expired meanwhile are gone)."""
        from zeroconf.const import _CLASS_IN

        zc = self.zc

        def drop() -> None:
            present = [r for r in records if r in zc.cache.get_all_by_details(r.name, r.type, _CLASS_IN)]
            zc.cache.async_remove_records(present)

        zc.loop.call_soon_threadsafe(drop)

    def _forget_services(self) -> None:
        """Stop answering for our services and name, without goodbyes."""
        zc = self.zc

        async def forget() -> None:
            zc.registry.async_remove(zc.registry.async_get_service_infos())

        asyncio.run_coroutine_threadsafe(forget(), zc.loop).result(5)
        self.instances = {}

    # -- records --------------------------------------------------------------------------------

    def _info(self, type_: str, properties: dict[str, str] | bytes):
        from zeroconf import ServiceInfo

        name = self.instances.get(type_) or f"{self.name}.{type_}"
        self.published.update(_flat(self.addresses))
        return ServiceInfo(type_, name, port=22, properties=properties, server=f"{self.name}.local.",
                           addresses=[_packed(a) for a in _flat(self.addresses)])

    def _kiosk_info(self):
        return self._info(KIOSK_TYPE, {**self.txt, "host": self.name})

    def _ssh_info(self):
        # No keys: one empty string, as RFC 6763 6.1 asks (zeroconf encodes {} as empty rdata, which
        # dig reports as a malformed packet).
        return self._info(SSH_TYPE, b"\x00")

    def _register(self, infos: list, **options) -> None:
        """Register services concurrently: their probes (0.75 s each) overlap instead of adding up."""
        zc = self.zc

        async def register_all() -> None:
            await asyncio.gather(*(zc.async_register_service(info, **options) for info in infos))

        asyncio.run_coroutine_threadsafe(register_all(), zc.loop).result(10)

    def _update_addresses(self, addresses: dict[str, list[str]]) -> None:
        gone = sorted(set(_flat(self.addresses)) - set(_flat(addresses)))
        new = sorted(set(_flat(addresses)) - set(_flat(self.addresses)))
        log.info("addresses changed: +%s -%s", " ".join(new) or "none", " ".join(gone) or "none")
        self.addresses = addresses
        # Re-announcing with the cache-flush bit replaces peers' address sets; the goodbyes also
        # cover a family that vanished entirely (the last AAAA), which a flush would not reach.
        self.zc.update_service(self._kiosk_info())
        self.zc.update_service(self._ssh_info())
        if gone:
            self._goodbye_addresses(gone)

    def _goodbye_addresses(self, gone: list[str]) -> None:
        from zeroconf import DNSAddress, DNSOutgoing
        from zeroconf.const import _CLASS_IN, _CLASS_UNIQUE, _FLAGS_AA, _FLAGS_QR_RESPONSE, _TYPE_A, _TYPE_AAAA

        out = DNSOutgoing(_FLAGS_QR_RESPONSE | _FLAGS_AA)
        for address in gone:
            type_ = _TYPE_AAAA if ":" in address else _TYPE_A
            out.add_answer_at_time(DNSAddress(f"{self.name}.local.", type_, _CLASS_IN | _CLASS_UNIQUE, 0,
                                              _packed(address)), 0)
        self.zc.send(out)

    # -- sockets ---------------------------------------------------------------------------------

    def _needs_rebuild(self, addresses: dict[str, list[str]]) -> bool:
        """A socket's address is gone, or an interface has IPv4 but no socket of ours."""
        v4 = set(ipv4_of(addresses))
        if any(a not in v4 for a in self.bound):
            return True
        covered = set(self.bound.values())
        return any(iface not in covered for iface, addrs in addresses.items() if any(":" not in a for a in addrs))

    def _rebuild(self, addresses: dict[str, list[str]]) -> None:
        from zeroconf import IPVersion, Zeroconf

        gone = sorted(set(_flat(self.addresses)) - set(_flat(addresses)))
        log.info("interfaces changed: listening again on %s", " ".join(ipv4_of(addresses)))
        self._drop_instance()
        self.addresses = addresses
        v4 = ipv4_of(addresses)
        self.bound = {a: iface for iface, addrs in addresses.items() for a in addrs if a in v4}
        self.zc = Zeroconf(interfaces=v4, ip_version=IPVersion.V4Only)
        tolerate_bad_packets(self.zc, log)
        # The names are ours already (probed and defended by this process): no new probing.
        self._register([self._kiosk_info(), self._ssh_info()], cooperating_responders=True)
        if gone:
            self._goodbye_addresses(gone)

    def _drop_instance(self) -> None:
        """Close the Zeroconf instance WITHOUT goodbyes (the device keeps its names)."""
        if self.zc is None:
            return
        instances = self.instances
        try:
            self._forget_services()
        except Exception as exc:  # closing anyway; a goodbye too many is harmless
            log.warning("could not clear the registry before closing: %s", exc)
        self.instances = instances
        zc, self.zc = self.zc, None
        zc.close()

    def _unregister(self) -> None:
        for info in (self._kiosk_info(), self._ssh_info()):
            self.zc.unregister_service(info)  # goodbyes; address goodbyes go with the last one
        self.instances = {}


def _describe(txt: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(txt.items()))


def run(state_dir: Path, interval: float) -> int:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    flags = {"stop": False}

    def on_stop(signum, frame):
        flags["stop"] = True

    def on_hup(signum, frame):
        pass  # the wakeup fd already woke the loop; the next tick re-reads the state

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    signal.set_wakeup_fd(wake_w)

    agent = Agent(state_dir)
    failures = 0
    try:
        while not flags["stop"]:
            try:
                agent.tick()
                failures = 0
            except Exception as exc:  # keep answering; start over cleanly on the next tick
                failures += 1
                log.error("%s: %s (starting over in %g s)", type(exc).__name__, exc, interval,
                          exc_info=failures == 1 and log.isEnabledFor(logging.DEBUG))
                agent._drop_instance()
                agent.name = ""
            if flags["stop"]:
                break
            select.select([wake_r], [], [], interval)
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
    finally:
        agent.stop()
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)
    return 0


def _no_socket_tracebacks(record: logging.LogRecord) -> bool:
    """zeroconf logs a traceback when a socket's address vanished under it (DHCP, Wi-Fi roaming):
    expected here (the next tick rebuilds the sockets), so keep its one-line message only."""
    if record.exc_info and isinstance(record.exc_info[1], OSError):
        record.exc_info = record.exc_text = None
    return True


def cmd_agent(args) -> int:
    seconds(args.interval, "--interval", maximum=3600)
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if args.verbose else logging.INFO,
                        format="kiosk-agent: %(levelname)s: %(message)s")
    zeroconf_log = logging.getLogger("zeroconf")
    zeroconf_log.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    zeroconf_log.addFilter(_no_socket_tracebacks)
    return run(Path(args.state_dir), args.interval)


def register(sub) -> None:
    p = sub.add_parser("agent", help="the device's mDNS responder: <hostName>.local, _ssh._tcp, _kiosk._tcp",
                       description="Answer for <hostName>.local and announce _ssh._tcp and _kiosk._tcp, "
                                   "following the running generation and the network. Runs on the device "
                                   "(systemd: kiosk-agent.service); stops with goodbyes on SIGTERM.")
    p.add_argument("--state-dir", default=DEFAULT_STATE_DIR, metavar="DIR",
                   help=f"where the generations live (default {DEFAULT_STATE_DIR}); reads DIR/current")
    p.add_argument("--interval", type=float, default=2.0, metavar="S",
                   help="how often to look at the network and the running generation (default 2 s)")
    p.add_argument("--verbose", action="store_true", help="log every mDNS detail (zeroconf debug)")
    p.set_defaults(func=cmd_agent)
