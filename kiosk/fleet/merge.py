"""Each device's nixiosk.json: the base spec overridden by its groups' and its own inventory variables.

Variables are overrides of the base spec's top-level fields: a mapping is merged key by key into
what is below it (`program: {args: [...]}` keeps the base's program.package), a list or a plain
value replaces it. The order is Ansible's (inventory file group vars by depth, ansible_group_priority
and name; group_vars/all; group_vars/GROUP; the host's own; host_vars/HOST), so an operator reads
precedence the same way in both tools. (Ansible itself replaces a mapping whole by default; kiosk
merges, so a group can change one field of `program` or `locale`.)

A host's hostName is its inventory name (a DNS name's first label) unless a variable says otherwise. Ansible's
own variables (ansible_host, ansible_port, ansible_user, ansible_ssh_private_key_file,
ansible_ssh_common_args, ansible_ssh_extra_args) say how to reach the device and are not spec
fields; other ansible_* variables are Ansible's business and are left alone; any other variable that
is not a nixiosk.json field is a problem (a typo would otherwise be a setting that never arrives).
"""

from __future__ import annotations

import copy
import datetime
import difflib
import ipaddress
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from kiosk.core.errors import InvalidSpec, KioskError, one_line
from kiosk.core.paths import REPO
from kiosk.fleet.inventory import Inventory, read_inventory, select
from kiosk.spec import load as specmod
from kiosk.spec.jsontext import parse_json, pointer

# Ansible's connection variables kiosk uses (with their older ansible_ssh_* spellings)
CONNECTION_VARS = {
    "ansible_host": "host", "ansible_ssh_host": "host",
    "ansible_port": "port", "ansible_ssh_port": "port",
    "ansible_user": "user", "ansible_ssh_user": "user",
    "ansible_ssh_private_key_file": "key", "ansible_private_key_file": "key",
    "ansible_ssh_common_args": "common_args", "ansible_ssh_extra_args": "extra_args",
}
PASSWORD_VARS = ("ansible_password", "ansible_ssh_pass", "ansible_ssh_password")
_USER = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]{0,31}")
_BAD_HOST = re.compile(r"[\s\x00-\x1f\x7f/@\\]")


class FleetInvalid(InvalidSpec):
    """Every problem of an inventory and its devices' specs, one line each, in the order found (exit 2:
    nothing is built or deployed). As `kiosk validate`, the problem lines and nothing else."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        self.source, self.problems, self.detail = "", [], ""
        KioskError.__init__(self, "\n".join(lines))

    def render(self) -> str:
        return "\n".join(self.lines)


@dataclass(frozen=True)
class Connection:
    """How the laptop reaches a device's configuration.git: ssh to user@host:port, with these options."""

    host: str
    port: int = 22
    user: str = "root"
    key: str | None = None
    ssh_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user}@{host}:{self.port}/{REPO}"

    @property
    def label(self) -> str:
        return f"{self.user}@{self.host}" + (f":{self.port}" if self.port != 22 else "")


@dataclass
class Device:
    name: str                 # the inventory's name for it
    groups: list[str]         # its groups, in merge order ('all' first)
    data: dict                # its nixiosk.json, as it is committed (no defaults filled in)
    connection: Connection
    spec: specmod.Spec | None = None   # checked, defaults filled in (None when it has problems)

    @property
    def text(self) -> str:
        return json.dumps(self.data, indent=2, ensure_ascii=False) + "\n"


@dataclass
class Fleet:
    inventory: Inventory
    devices: list[Device] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def require_valid(self) -> list[Device]:
        if self.problems:
            raise FleetInvalid(self.problems)
        return self.devices


def deep_merge(base: dict, override: dict) -> dict:
    """override over base: mappings merged key by key, anything else replaced (copies, never shared)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def default_host_name(name: str) -> str:
    """An inventory name as a hostName: a DNS name's first label (lobby.example.org, lobby.local -> lobby);
    an IP address stays as it is, which the spec check refuses (such a host needs hostName in its variables)."""
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        return name.split(".", 1)[0]


def layers(inv: Inventory, host: str) -> list[tuple[str, dict]]:
    """(where, variables) for a host, lowest precedence first (Ansible's order)."""
    groups = inv.members(host)
    out = [(f"{inv.source}: group {g}", inv.groups[g].vars) for g in groups if inv.groups[g].vars]
    out += inv.group_files.get("all", [])
    out += [item for g in groups if g != "all" for item in inv.group_files.get(g, [])]
    if inv.host_vars.get(host):
        out.append((f"{inv.source}: host {host}", inv.host_vars[host]))
    out += inv.host_files.get(host, [])
    return out


def _not_json(value, path: list) -> list[tuple[str, str]]:
    """(pointer, why) for every value JSON cannot hold (YAML dates, binary, sets; non-string keys)."""
    found = []
    stack = [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, dict):
            for key, sub in item.items():
                if isinstance(key, str):
                    stack.append((where + [key], sub))
                else:
                    found.append((pointer(where), f"has the key {one_line(repr(key))[:40]}, which is not a string; "
                                  "quote it"))
        elif isinstance(item, list):
            stack.extend((where + [i], sub) for i, sub in enumerate(item))
        elif isinstance(item, (datetime.date, bytes, set)):
            kind = {bytes: "binary data", set: "a set"}.get(type(item), "a date")
            found.append((pointer(where), f"is {kind} (as YAML reads it), which a spec cannot hold; quote it "
                          "to make it a string"))
        elif not isinstance(item, (str, int, float, bool, type(None))):
            found.append((pointer(where), f"is a {type(item).__name__}, which a spec cannot hold"))
    return found


class _Checker:
    """Splits one host's variables into spec overrides and connection settings, reporting each bad one
    once per place it was set (a group's typo is one line, not one per host of the group)."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.fields = sorted(specmod.schema()["properties"])
        self.said: set[tuple[str, str]] = set()

    def problem(self, where: str, ptr: str, message: str) -> None:
        if (where, ptr + message) not in self.said:
            self.said.add((where, ptr + message))
            self.fleet.problems.append(one_line(f"{where}: {ptr}: {message}"))

    def split(self, host: str, sources: list[tuple[str, dict]]) -> tuple[list[dict], dict, dict]:
        overrides, ansible, origin = [], {}, {}
        for where, variables in sources:
            spec_vars = {}
            for var, value in variables.items():
                if var.startswith("ansible_"):
                    ansible[var], origin[var] = value, where
                    continue
                if var not in self.fields:
                    close = difflib.get_close_matches(var, self.fields, n=1, cutoff=0.6) or \
                        [f for f in self.fields if f.lower() == var.lower()]
                    self.problem(where, pointer([var]), f"unknown variable {var!r}: neither a nixiosk.json field "
                                 "nor an Ansible variable (ansible_*); "
                                 + (f"did you mean {close[0]!r}?" if close else
                                    f"nixiosk.json's fields are: {', '.join(self.fields)}"))
                    continue
                bad = _not_json(value, [var])
                for ptr, why in bad:
                    self.problem(where, ptr, why)
                if not bad:
                    spec_vars[var] = value
            overrides.append(spec_vars)
        return overrides, ansible, origin

    def connection(self, host: str, hostname, ansible: dict, origin: dict) -> Connection | None:
        settings = {CONNECTION_VARS[k]: (k, v) for k, v in ansible.items() if k in CONNECTION_VARS}
        ok = True

        def bad(var: str, message: str) -> None:
            nonlocal ok
            ok = False
            self.problem(origin[var], var, message)

        for var in PASSWORD_VARS:
            if var in ansible:
                bad(var, "kiosk devices take SSH keys only, never a password; remove it (and put your key in "
                         "authorizedKeys)")
        if "ansible_connection" in ansible and ansible["ansible_connection"] not in ("ssh", "smart"):
            bad("ansible_connection", f"{one_line(str(ansible['ansible_connection']))[:40]!r}: kiosk reaches "
                "devices over ssh only; remove it or set it to ssh")
        address = settings.get("host", (None, None))[1]
        if address is None:   # a FQDN or address as the inventory name is the address, as for Ansible
            name = hostname if isinstance(hostname, str) else host
            address = host if ("." in host or ":" in host) else f"{name}.local"
        elif not isinstance(address, str) or not address or _BAD_HOST.search(address) or address.startswith("-"):
            bad(settings["host"][0], "must be a host name or an address (no spaces, '/', '@', or a leading '-')")
        port = settings.get("port", (None, 22))[1]
        if isinstance(port, str) and port.isdigit():
            port = int(port)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            bad(settings["port"][0], "must be a port number between 1 and 65535")
        user = settings.get("user", (None, "root"))[1]
        if not isinstance(user, str) or not _USER.fullmatch(user):
            bad(settings["user"][0], "must be a user name (letters, digits, '.', '_', '-'); kiosk devices take "
                                     "pushes as root")
        key = settings.get("key", (None, None))[1]
        if key is not None and (not isinstance(key, str) or not key):
            bad(settings["key"][0], "must be the path of a private key file")
        ssh_args: list[str] = []
        for name in ("common_args", "extra_args"):
            var, value = settings.get(name, (None, ""))
            if not isinstance(value, str):
                bad(var, "must be a string of ssh arguments, e.g. '-o ProxyJump=gateway'")
                continue
            try:
                ssh_args += shlex.split(value)
            except ValueError as exc:
                bad(var, f"cannot be split into ssh arguments: {exc}")
        if not ok:
            return None
        return Connection(address, port, user, str(Path(key).expanduser()) if key else None, tuple(ssh_args))


def read_base(path: str | None, default: str = "nixiosk.json") -> tuple[dict, list[str]]:
    """The base spec as data (not checked: a base may leave hostName to the inventory), and its problems.

    No SPEC given and no nixiosk.json here: the inventory's variables are the whole spec."""
    if path is None and not Path(default).exists():
        return {}, []
    name = default if path is None else path
    try:
        data = parse_json(specmod.decode(specmod.read_file(name), name), name)
    except InvalidSpec as exc:
        return {}, exc.render().splitlines()
    if not isinstance(data, dict):
        return {}, [f"{name}: /: the base spec must be a JSON object; start from nixiosk.json.sample"]
    return data, []


def load_fleet(inventory_path: str, spec_path: str | None = None, *, limit: str | None = None,
               check_specs: bool = True) -> Fleet:
    """Every selected device with its spec and connection; all problems collected in Fleet.problems."""
    inv = read_inventory(inventory_path)
    fleet = Fleet(inv, problems=list(inv.problems))
    if not inv.readable:
        return fleet
    base, base_problems = read_base(spec_path)
    if base_problems:   # every device's spec would be wrong for the same reason: say it once
        fleet.problems += base_problems
        return fleet
    checker = _Checker(fleet)
    spec_problems: dict = {}    # one problem shared by many hosts (a group's bad value) is one line
    for host in select(inv, limit):
        overrides, ansible, origin = checker.split(host, layers(inv, host))
        # the inventory name is the hostName (first, as a reader looks for it) unless a variable says otherwise
        data = {"hostName": default_host_name(host), **{k: v for k, v in base.items() if k != "hostName"}}
        for override in overrides:
            data = deep_merge(data, override)
        connection = checker.connection(host, data.get("hostName"), ansible, origin)
        device = Device(host, inv.members(host), data, connection)  # type: ignore[arg-type]
        if check_specs:
            try:
                device.spec = specmod.check(copy.deepcopy(data), f"{inv.source}: host {host}")
            except InvalidSpec as exc:
                for problem in exc.problems:
                    spec_problems.setdefault(problem, []).append(host)
        fleet.devices.append(device)
    for problem, hosts in spec_problems.items():
        fleet.problems.append(problem.line(f"{inv.source}: {_hosts(hosts)}"))
    fleet.problems += _clashes(inv.source, fleet.devices)
    if not fleet.devices and limit is None:
        fleet.problems.append(f"{inv.source}: names no hosts; list the devices in it (docs/fleet.md shows how)")
    return fleet


def _hosts(names: list[str], shown: int = 5) -> str:
    if len(names) == 1:
        return f"host {names[0]}"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"hosts {', '.join(names[:shown])}{more}"


def _clashes(source: str, devices: list[Device]) -> list[str]:
    """Two devices with one hostName (both would answer as NAME.local), or two names for one device."""
    problems, names, targets = [], {}, {}
    for device in devices:
        name = device.data.get("hostName")
        if isinstance(name, str):
            first = names.setdefault(name.lower(), device.name)
            if first != device.name:
                problems.append(one_line(f"{source}: host {device.name}: /hostName: {name!r} is host {first}'s "
                                         f"hostName too: both would answer as {name}.local; give each device its "
                                         "own (hostName in its host variables)"))
                continue   # its address may follow from that name: one mistake, one line
        if device.connection is not None:
            target = (device.connection.host.lower(), device.connection.port)
            first = targets.setdefault(target, device.name)
            if first != device.name:
                problems.append(one_line(f"{source}: host {device.name}: ansible_host: reached at "
                                         f"{device.connection.host}:{device.connection.port} like host {first}: one "
                                         "device cannot run two specs; fix ansible_host or ansible_port"))
    return problems
