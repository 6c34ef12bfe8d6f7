"""Finding kiosks from the user's machine: `kiosk discover`, `resolve`, `ssh-proxy`, `ssh-config`.

Names and resolution live in kiosk.net.mdns (the device's agent uses them too); this module browses
_kiosk._tcp and connects ssh to a HOST.local.
"""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import selectors
import shlex
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

from kiosk.core.errors import KioskError, UsageError, one_line
from kiosk.net.mdns import (DEFAULT_TIMEOUT, KIOSK_TYPE, host_name, is_mdns_host, mdns_name, resolve,
                            seconds, sort_addresses, tolerate_bad_packets)

def cmd_resolve(args) -> int:
    name = mdns_name(args.host)
    seconds(args.timeout, "--timeout")
    addresses = resolve(name, timeout=args.timeout)
    if not addresses:
        raise KioskError(f"no answer for {name[:-1]} within {args.timeout:g} s: is the device on this network "
                         "(same link; mDNS is multicast to 224.0.0.251 UDP port 5353, which some Wi-Fi "
                         "networks and firewalls block)?")
    for address in addresses:
        print(address)
    return 0


# --- browsing _kiosk._tcp --------------------------------------------------------------------

def _text(value) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def describe(info) -> dict:
    """The fields of one kiosk, from its ServiceInfo (TXT values are untrusted text)."""
    props = {_text(k): _text(v) for k, v in (info.properties or {}).items()}
    server = (info.server or "").rstrip(".")
    return {
        "host": server,
        "addresses": sort_addresses(a.split("%")[0] for a in info.parsed_addresses()),
        "hardware": props.get("hardware"),
        "generation": props.get("generation"),
        "program": props.get("program"),
        "commit": props.get("commit"),
        "version": props.get("version"),
        "name": props.get("host"),
        "service": info.name,
        "port": info.port,
    }


class Browser:
    """Browse _kiosk._tcp; events ('found'|'removed', service name, description) arrive on .events."""

    def __init__(self, timeout: float = 2.0):
        from concurrent.futures import ThreadPoolExecutor

        from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, Zeroconf

        try:
            self.zc = Zeroconf(interfaces=InterfaceChoice.All, ip_version=IPVersion.V4Only)
        except (OSError, RuntimeError) as exc:
            raise KioskError(f"cannot listen for mDNS (UDP port 5353): {exc}") from exc
        tolerate_bad_packets(self.zc)
        self.events: queue.Queue = queue.Queue()
        self._lookup_timeout_ms = int(timeout * 1000)
        self._serial: dict[str, int] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=8)
        self._browser = ServiceBrowser(self.zc, KIOSK_TYPE, handlers=[self._on_change])

    def _on_change(self, zeroconf, service_type, name, state_change) -> None:
        from zeroconf import ServiceStateChange

        with self._lock:
            serial = self._serial[name] = self._serial.get(name, 0) + 1
        if state_change is ServiceStateChange.Removed:
            self.events.put(("removed", name, None))
        else:
            self._pool.submit(self._lookup, name, serial)

    def _lookup(self, name: str, serial: int) -> None:
        try:
            info = self.zc.get_service_info(KIOSK_TYPE, name, timeout=self._lookup_timeout_ms)
            found = describe(info) if info is not None else None
        except Exception:  # a hostile or half-gone service must not stop the others
            found = None
        with self._lock:
            if self._serial.get(name) != serial:
                return  # removed or changed again meanwhile: a newer lookup will report it
        if found and found["host"] and found["addresses"]:
            self.events.put(("found", name, found))

    def close(self) -> None:
        self._browser.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.zc.close()


def discover(timeout: float = DEFAULT_TIMEOUT, until=None) -> dict[str, dict]:
    """Kiosks seen within `timeout` seconds: {service name: description}; `until(found)` stops early."""
    browser = Browser()
    found: dict[str, dict] = {}
    try:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event, name, desc = browser.events.get(timeout=left)
            except queue.Empty:
                break
            if event == "removed":
                found.pop(name, None)
            else:
                found[name] = desc
            if until is not None and until(found):
                break
    finally:
        browser.close()
    return found


def _table(kiosks: list[dict]) -> str:
    rows = [("HOST", "ADDRESSES", "HARDWARE", "GEN", "PROGRAM", "COMMIT")]
    for k in kiosks:
        rows.append((f"{k['host']}", " ".join(k["addresses"]), k["hardware"] or "-", k["generation"] or "-",
                     k["program"] or "-", (k["commit"] or "-")[:12]))
    rows = [tuple(one_line(cell) for cell in row) for row in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def cmd_discover(args) -> int:
    if args.watch:
        return _watch(args)
    found = discover(args.timeout)
    kiosks = sorted(found.values(), key=lambda k: (k["host"].lower(), k["service"]))
    if args.json:
        json.dump(kiosks, sys.stdout, indent=2)
        print()
        return 0
    if not kiosks:
        print(f"kiosk: no kiosk answered within {args.timeout:g} s", file=sys.stderr)
        return 0
    print(_table(kiosks))
    return 0


def _watch(args) -> int:
    """Print kiosks as they appear, change and leave (one line or one JSON object each)."""
    browser = Browser()
    last: dict[str, dict] = {}
    deadline = time.monotonic() + args.timeout if args.timeout_given else None
    try:
        while deadline is None or time.monotonic() < deadline:
            try:
                event, name, desc = browser.events.get(timeout=0.5)
            except queue.Empty:
                continue
            if event == "found":
                if last.get(name) == desc:
                    continue
                kind = "updated" if name in last else "added"
                last[name] = desc
            else:
                desc = last.pop(name, None) or {"service": name, "host": None}
                kind = "removed"
            if args.json:
                print(json.dumps({"event": kind, "time": round(time.time(), 3), **desc}), flush=True)
            else:
                sign = {"added": "+", "updated": "~", "removed": "-"}[kind]
                detail = "" if kind == "removed" else (
                    f" {' '.join(desc['addresses'])} {desc['hardware']} generation {desc['generation']} "
                    f"{desc['program']}")
                print(one_line(f"{sign} {desc['host'] or desc['service']}{detail}"), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        browser.close()
    return 0


# --- ssh ----------------------------------------------------------------------------------------

def _connect(host: str, port: int, timeout: float) -> socket.socket:
    if is_mdns_host(host):
        addresses = resolve(host, timeout=timeout)
        if not addresses:
            raise KioskError(f"no answer for {mdns_name(host)[:-1]} over mDNS within {timeout:g} s")
        # A link-local IPv6 address needs an interface (scope) that mDNS does not carry: skip those.
        targets = [(a, port) for a in addresses if not (":" in a and ipaddress.ip_address(a).is_link_local)]
    else:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise KioskError(f"cannot resolve {one_line(host)}: {exc.strerror}") from exc
        targets = [info[4][:2] for info in infos]
    errors = []
    for address, p in targets:
        try:
            return socket.create_connection((address, p), timeout=timeout)
        except OSError as exc:
            errors.append(f"{address}: {exc.strerror or exc}")
    raise KioskError(f"cannot connect to {one_line(host)} port {port}: " + ("; ".join(errors) or "no usable address"))


def relay(sock: socket.socket, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
    """Copy stdin to the socket and the socket to stdout until the far side closes."""
    sock.settimeout(None)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    sel.register(stdin_fd, selectors.EVENT_READ, "stdin")
    try:
        while True:
            for key, _ in sel.select():
                if key.data == "stdin":
                    data = os.read(stdin_fd, 65536)
                    if data:
                        sock.sendall(data)
                    else:  # ssh closed its end: pass the EOF on, keep reading replies
                        sel.unregister(stdin_fd)
                        try:
                            sock.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                else:
                    data = sock.recv(65536)
                    if not data:
                        return
                    view = memoryview(data)
                    while view:
                        view = view[os.write(stdout_fd, view):]
    finally:
        sel.close()
        sock.close()


def cmd_ssh_proxy(args) -> int:
    if not 0 < args.port < 65536:
        raise UsageError(f"port {args.port} is not between 1 and 65535")
    seconds(args.timeout, "--timeout")
    sock = _connect(host_name(args.host), args.port, args.timeout)
    try:
        relay(sock)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return 0


def kiosk_command() -> str:
    """How to run this very `kiosk`, as an absolute path (ProxyCommand runs without our PATH)."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 and argv0.name == "kiosk" and argv0.exists():
        return shlex.quote(str(argv0.resolve()))
    found = shutil.which("kiosk", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                         os.environ.get("PATH", "")]))
    if found:
        return shlex.quote(str(Path(found).resolve()))
    return f"{shlex.quote(sys.executable)} -m kiosk"


def cmd_ssh_config(args) -> int:
    print("# Reach kiosks as <hostName>.local without nss-mdns: add this to ~/.ssh/config")
    print("Host *.local")
    print(f"    ProxyCommand {kiosk_command()} ssh-proxy %h %p")
    return 0


def register(sub) -> None:
    p = sub.add_parser("discover", help="list every kiosk on the LAN (mDNS)",
                       description="Browse _kiosk._tcp on the local network and list every kiosk found.")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help=f"how long to listen (default {DEFAULT_TIMEOUT:g} s; with --watch: forever)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--watch", action="store_true",
                   help="keep listening; print kiosks as they appear, change and leave")
    p.set_defaults(func=_discover_entry)

    p = sub.add_parser("resolve", help="the addresses of HOST.local (mDNS)",
                       description="Resolve HOST.local over mDNS and print its addresses, one per line.")
    p.add_argument("host", metavar="HOST[.local]")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"give up after S seconds (default {DEFAULT_TIMEOUT:g})")
    p.set_defaults(func=cmd_resolve)

    p = sub.add_parser("ssh-proxy", help="ssh ProxyCommand: connect to HOST.local via mDNS",
                       description="Resolve HOST (over mDNS when it ends in .local, otherwise DNS), connect to "
                                   "PORT and relay stdin/stdout: ssh -o ProxyCommand='kiosk ssh-proxy %%h %%p'.")
    p.add_argument("host", metavar="HOST")
    p.add_argument("port", type=int, metavar="PORT")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="resolve and connect timeout (default 5)")
    p.set_defaults(func=cmd_ssh_proxy)

    p = sub.add_parser("ssh-config", help="print the ~/.ssh/config snippet that makes ssh/git reach *.local",
                       description="Print a ~/.ssh/config block routing *.local through `kiosk ssh-proxy`.")
    p.set_defaults(func=cmd_ssh_config)


def _discover_entry(args) -> int:
    args.timeout_given = args.timeout is not None
    if args.timeout is None:
        args.timeout = DEFAULT_TIMEOUT
    seconds(args.timeout, "--timeout")
    return cmd_discover(args)
