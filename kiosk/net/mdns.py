"""What the device's agent and the laptop's discovery share: mDNS names, local addresses, resolving.

Everything here works with the python-zeroconf APIs that both Debian bookworm's
0.47.3 (the device) and current releases (a laptop) have: no AddressResolver,
no update_interfaces.

Name resolution uses mDNS "legacy unicast" (RFC 6762 section 6.7): the query goes
to 224.0.0.251:5353 from an ephemeral port, and responders answer straight back
to that port, at once, with every address in one packet. That is what
`dig -p 5353 @224.0.0.251` does; it needs no port 5353 of our own (so it works
beside avahi-daemon) and no root, and it is not subject to the one-second
multicast rate limit that would otherwise delay repeated lookups.
"""

from __future__ import annotations

import ipaddress
import math
import re
import secrets
import socket
import time
from pathlib import Path

from kiosk.core.errors import KioskError, UsageError, one_line

KIOSK_TYPE = "_kiosk._tcp.local."
SSH_TYPE = "_ssh._tcp.local."
DEFAULT_TIMEOUT = 3.0
MAX_SECONDS = 86400.0  # a day: the most any --timeout or --interval may be (a bigger one is a typo, or a hang)

_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_SURROGATES = re.compile("[\ud800-\udfff]")
_IFF_UP = 0x1
_IFF_LOOPBACK = 0x8


# --- names and local addresses (shared with the agent) -------------------------------------

def mdns_name(host: str) -> str:
    """'kitchen', 'kitchen.local' or 'kitchen.local.' -> 'kitchen.local.'; UsageError otherwise."""
    name = host.strip().rstrip(".")
    if name.lower().endswith(".local"):
        name = name[: -len(".local")]
    if not _LABEL.match(name):
        raise UsageError(f"{one_line(host)!s} is not a host name: use letters, digits and '-' "
                         "(at most 63), optionally followed by .local")
    return f"{name}.local."


def host_name(host: str) -> str:
    """`host` when it can be looked up at all (an IP address, a .local name mdns_name takes, or a DNS name
    of at most 253 characters in labels of 1 to 63); UsageError otherwise, before any resolver sees it.

    The resolver's IDNA step raises UnicodeError for a lone surrogate (an argument that was not UTF-8)
    or an over-long label: an internal error, where the user's argument is at fault."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if is_mdns_host(host):
        mdns_name(host)
        return host
    shown = one_line(host[:60] + ("..." if len(host) > 60 else "")) or "''"
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if _SURROGATES.search(host):
        problem = "is not UTF-8 text"
    elif not name:
        problem = "is empty"
    elif any(c.isspace() or not c.isprintable() for c in host):
        problem = "holds a space or a control character"
    elif len(name) > 253:
        problem = f"has {len(name)} characters; a host name has at most 253"
    elif not all(labels):
        problem = "has an empty part between dots"
    elif any(len(label) > 63 for label in labels):
        problem = "has a part longer than 63 characters between dots, the most a host name allows"
    else:
        try:
            if len(name.encode("idna")) <= 253:
                return host
            problem = "is longer than 253 characters once written in ASCII (IDNA)"
        except UnicodeError as exc:
            problem = f"is not a host name ({one_line(str(exc))})"
    raise UsageError(f"host {shown} {problem}", hint="give a host name, e.g. kitchen.local, or an IP address")


def seconds(value: float, option: str, maximum: float = MAX_SECONDS) -> float:
    """`value` when it is a usable duration (finite, above 0, at most `maximum`); UsageError naming `option` if not.

    argparse's float() takes "nan", "inf" and "1e999": each would make a loop wait forever.
    """
    if not (math.isfinite(value) and 0 < value <= maximum):
        raise UsageError(f"{option} {value:g} is not a usable number of seconds",
                         hint=f"give a number above 0 and at most {maximum:g}, e.g. {option} 3")
    return value


def is_mdns_host(host: str) -> bool:
    return host.strip().rstrip(".").lower().endswith(".local")


def _interface_up(name: str) -> bool:
    try:
        flags = int(Path(f"/sys/class/net/{name}/flags").read_text(), 16)
    except (OSError, ValueError):
        return True  # no sysfs (not Linux, or a rename in flight): trust the address list
    return bool(flags & _IFF_UP) and not flags & _IFF_LOOPBACK


def local_addresses() -> dict[str, list[str]]:
    """Non-loopback addresses of interfaces that are up: {interface: [address, ...]}.

    Read with ifaddr (getifaddrs(3) through ctypes), which python-zeroconf itself
    depends on: one system call, cheap enough to poll every two seconds on a Pi 0.
    IPv6 link-local addresses are included (as avahi does); scope ids are not.
    """
    import ifaddr

    result: dict[str, set[str]] = {}
    for adapter in ifaddr.get_adapters():
        if not _interface_up(adapter.name):
            continue
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            try:
                addr = ipaddress.ip_address(text.split("%")[0])
            except ValueError:
                continue
            if addr.is_loopback or addr.is_unspecified or addr.is_multicast:
                continue
            result.setdefault(adapter.name, set()).add(str(addr))
    return {name: sort_addresses(addrs) for name, addrs in sorted(result.items())}


def sort_addresses(addresses) -> list[str]:
    """IPv4 first, then global IPv6, then link-local IPv6; numeric order within each."""
    def key(text: str):
        addr = ipaddress.ip_address(text)
        return (addr.version, addr.is_link_local, addr.packed)
    return sorted(set(addresses), key=key)


def ipv4_of(addresses: dict[str, list[str]]) -> list[str]:
    return [a for addrs in addresses.values() for a in addrs if ":" not in a]


def tolerate_bad_packets(zc, log=None) -> None:
    """Count, don't print, errors escaping zeroconf's event loop.

    Some malformed packets make bookworm's zeroconf 0.47.3 raise out of
    datagram_received (a HINFO string that is not UTF-8 raises UnicodeDecodeError);
    asyncio would log a traceback for each one. The loop carries on either way,
    so: nothing on a user's terminal, and at most one line a minute in the agent's
    log (`log`), with the count.
    """
    state = {"count": 0, "last": -60.0}

    def handler(loop, context) -> None:
        state["count"] += 1
        if log is None:
            return
        exc = context.get("exception")
        log.debug("error in zeroconf's event loop: %s", context.get("message"), exc_info=exc)
        now = time.monotonic()
        if now - state["last"] >= 60:
            what = f"{type(exc).__name__}: {exc}" if exc else context.get("message")
            log.warning("ignored %d packet(s) or event(s) zeroconf could not handle (latest: %s)",
                        state["count"], one_line(str(what))[:200])
            state["count"], state["last"] = 0, now

    zc.loop.set_exception_handler(handler)


# --- resolving <host>.local ------------------------------------------------------------------

def resolve(host: str, timeout: float = DEFAULT_TIMEOUT, settle: float = 0.02,
            interfaces: list[str] | None = None) -> list[str]:
    """Every address any responder gives for HOST.local, or [] after `timeout` seconds.

    Queries A and AAAA in one legacy-unicast packet, sent out of every IPv4
    interface, repeated after 0.25, 0.5, 1, 2 ... s; returns `settle` seconds after
    the first answer (so a second responder for the same name is heard too).
    """
    return _ask(host, timeout, settle, interfaces, probe=False)


def probe(host: str, duration: float, interfaces: list[str] | None = None) -> list[str]:
    """Every address given for HOST.local in answers to three queries 0.25 s apart, heard for `duration` s.

    The answers come back to this call's own ephemeral port (legacy unicast), so
    only a responder that answers *this* question counts: an unsolicited
    announcement multicast to port 5353 never reaches it (RFC 6762 sections 8.1, 9).
    """
    return _ask(host, duration, duration, interfaces, probe=True)


def _ask(host: str, timeout: float, settle: float, interfaces: list[str] | None, probe: bool) -> list[str]:
    from zeroconf import DNSOutgoing, DNSQuestion, IPVersion, Zeroconf
    from zeroconf.const import _CLASS_IN, _FLAGS_QR_QUERY, _TYPE_A, _TYPE_AAAA

    name = mdns_name(host)
    if interfaces is None:
        interfaces = ipv4_of(local_addresses())
    if not interfaces:
        raise KioskError("no network: this machine has no IPv4 address to send mDNS queries from")
    try:
        zc = Zeroconf(interfaces=interfaces, unicast=True, ip_version=IPVersion.V4Only)
    except OSError as exc:
        raise KioskError(f"cannot open an mDNS socket: {exc}") from exc
    tolerate_bad_packets(zc)
    try:
        def query() -> DNSOutgoing:
            # A fresh random ID each time: responders drop a packet identical to one they saw within the
            # last second (zeroconf does, from any sender), so with ID 0 the repeats of a query, or another
            # host's lookup of the same name, would go unanswered for a second.
            out = DNSOutgoing(_FLAGS_QR_QUERY, multicast=False, id_=secrets.randbits(16))  # False: write the ID
            out.add_question(DNSQuestion(name, _TYPE_A, _CLASS_IN))
            out.add_question(DNSQuestion(name, _TYPE_AAAA, _CLASS_IN))
            return out

        start = time.monotonic()
        deadline = start + timeout
        next_send, gap = start, 0.25
        sent = 0
        answered_at = None
        while True:
            now = time.monotonic()
            if now >= next_send and (sent < 3 if probe else answered_at is None):
                zc.send(query())
                sent += 1
                next_send, gap = now + gap, (gap if probe else gap * 2)
            found = cached_addresses(zc, name)
            if found and answered_at is None:
                answered_at = now
            if answered_at is not None and now - answered_at >= settle:
                return sort_addresses(found)
            if now >= deadline:
                return sort_addresses(found)
            time.sleep(0.005)
    finally:
        zc.close()


def cached_addresses(zc, name: str) -> list[str]:
    """Unexpired A/AAAA addresses for `name` in zc's cache (what it has heard on the network)."""
    return [address for address, _ in cached_records(zc, name)]


def cached_records(zc, name: str) -> list[tuple[str, object]]:
    """(address, record) for every unexpired A/AAAA record of `name` in zc's cache."""
    from zeroconf import current_time_millis
    from zeroconf.const import _CLASS_IN, _TYPE_A, _TYPE_AAAA

    found = []
    now_ms = current_time_millis()  # zeroconf's clock (monotonic), not the wall clock
    for type_, family in ((_TYPE_A, socket.AF_INET), (_TYPE_AAAA, socket.AF_INET6)):
        for record in zc.cache.get_all_by_details(name, type_, _CLASS_IN):
            if record.is_expired(now_ms):
                continue
            try:
                found.append((socket.inet_ntop(family, record.address), record))
            except (ValueError, OSError):
                continue  # a malformed record from a hostile responder
    return found
