"""Reaching a kiosk from the user's machine: the one ssh command line kiosk's laptop-side commands use.

The user's own ssh setup applies (~/.ssh/config, known_hosts, keys): kiosk adds what an unattended
command needs (BatchMode: nothing waits for a prompt; a connect timeout; keep-alives; no agent or X11
forwarding) and for a `<host>.local` name its own mDNS resolver (`kiosk ssh-proxy`). Host key
checking stays whatever the user has: kiosk never turns it off. kiosk screenshot and kiosk fleet use it.
"""

from __future__ import annotations

import re
import shlex

from kiosk.core.errors import UsageError
from kiosk.core.paths import number_setting, setting
from kiosk.net.mdns import is_mdns_host

# A host name (RFC 1123 labels), an IPv4 address or a bracket-free IPv6 address; never an ssh option.
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?$|^[0-9A-Fa-f:.]+$")


def check_host(host: str) -> str:
    """The host as given, or a UsageError saying why ssh should not see it."""
    if not _HOST.match(host or "") or ".." in host:
        raise UsageError(f"{host!r} is not a host name or address",
                         hint="give the kiosk's name (e.g. lobby.local, as kiosk discover lists it) or its address")
    return host


def ssh_command(host: str, *, identity: str | None = None, options=(), leading=(),
                connect_timeout: float | None = None) -> list[str]:
    """ssh and its options for reaching `host` (no host, no command: also GIT_SSH_COMMAND). `leading` are
    ssh arguments that must come first (an inventory's own: ssh keeps the first value of an option)."""
    from kiosk.net.discover import kiosk_command

    if connect_timeout is None:
        connect_timeout = number_setting("KIOSK_SSH_CONNECT_TIMEOUT", 15, least=1)
    # KIOSK_SSH_COMMAND (like GIT_SSH_COMMAND), as kiosk build --builder reads it
    argv = [*shlex.split(setting("KIOSK_SSH_COMMAND", "ssh")), *leading, "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={max(1, round(connect_timeout))}",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
            "-o", "ForwardAgent=no", "-o", "ForwardX11=no", "-o", "LogLevel=ERROR"]
    for option in options:
        argv += ["-o", option]
    if identity:
        argv += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
    if is_mdns_host(host):   # kiosk's own mDNS resolver, as `kiosk ssh-config` sets up
        argv += ["-o", f"ProxyCommand={kiosk_command()} ssh-proxy %h %p"]
    return argv


def ssh_argv(host: str, *, port: int | None = None, identity: str | None = None, options=(),
             user: str = "root") -> list[str]:
    """ssh to the device as root (its only login), up to and including the host; the caller adds the command."""
    check_host(host)
    argv = [*ssh_command(host, identity=identity, options=options), "-l", user]
    if port:
        argv += ["-p", str(port)]
    return [*argv, "--", host]


def add_arguments(parser, *, host_help: str = "the kiosk: its name (lobby.local) or address",
                  optional: bool = False) -> None:
    """HOST and how to reach it: the same options on every command that talks to one device."""
    parser.add_argument("host", metavar="HOST", nargs="?" if optional else None, help=host_help)
    parser.add_argument("-p", "--port", type=int, metavar="PORT", help="its SSH port (default: ssh's, 22)")
    parser.add_argument("-i", "--identity", metavar="KEY", help="the SSH key to log in with (default: ssh's)")
    parser.add_argument("--ssh-option", action="append", default=[], metavar="OPTION",
                        help="one more ssh -o option, e.g. UserKnownHostsFile=FILE (repeatable)")


def ssh_problem(text: str, *, host: str, port: int | None, login: str, new_keys: str = "") -> tuple[str, str] | None:
    """("refused" or "unreachable", reason) when ssh's output says it could not reach the device or was
    refused; None when ssh got through (a failure is then the remote command's). login: the ssh command a
    person types; new_keys: how the caller's command trusts a first key, if it can."""
    low = text.lower()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("remote: ")]
    if "remote host identification has changed" in low:
        where = f"[{host}]:{port}" if port and port != 22 else host
        return "refused", ("its host key has CHANGED since you last connected (a reinstalled device, or someone "
                           f"in between); check it, then remove the old key (ssh-keygen -R '{where}')")
    if "host key verification failed" in low:
        return "refused", ("its host key is not in your known_hosts, so it is not trusted; check it and connect "
                           f"once by hand ({login}){new_keys}")
    if "permission denied" in low:
        return "refused", "it does not take your ssh key (Permission denied); is your key in its authorizedKeys?"
    for needle, reason in (("connection refused", "connection refused"), ("timed out", "timed out"),
                           ("no route to host", "no route to host"),
                           ("network is unreachable", "network unreachable"),
                           ("could not resolve hostname", "unknown host name"),
                           ("name or service not known", "unknown host name"),
                           ("over mdns", "no answer over mDNS"), ("kex_exchange_identification", "connection closed"),
                           ("connection closed", "connection closed"), ("connection reset", "connection reset")):
        if needle in low:
            detail = next((line for line in lines if needle in line.lower()), "")
            return "unreachable", reason + (f" ({detail})" if detail and detail.lower() != reason else "")
    return None


def from_args(args) -> list[str]:
    return ssh_argv(args.host, port=args.port, identity=args.identity, options=args.ssh_option)
