"""An Ansible inventory read as Ansible reads it: YAML or INI, host ranges, group_vars/ and host_vars/.

So an operator reuses the inventory they have. The rules are Ansible's (its yaml and ini inventory
plugins and host_group_vars): top-level YAML keys are groups under `all`; a group holds `hosts`,
`children` and `vars`; `web[01:20].example.org` is twenty hosts; `host:2222` sets ansible_port; an
INI value is a Python literal when it parses as one (`ast.literal_eval`), else a string; a host in
no group but `all` is in `ungrouped`; group_vars/NAME(.yml|.yaml|.json) and host_vars/NAME beside the
inventory file add variables.

Stricter than Ansible where Ansible warns and goes on, because a typo there loses devices or
settings without a word: an unknown key in a YAML group (`host:` for `hosts:`), a key twice in one
YAML mapping (YAML readers keep the last one silently), one variable of one host set to two
different values, a child or a [group:vars] section naming a group that is never defined. Every
problem is one line naming the file, the host or group, and what to do; all are reported at once.
"""

from __future__ import annotations

import ast
import difflib
import fnmatch
import re
import shlex
import string
from dataclasses import dataclass, field
from pathlib import Path

from kiosk.core.errors import UsageError, one_line
from kiosk.core.inputs import InputRefused, read_small

MAX_BYTES = 4 << 20          # an inventory of thousands of hosts is well under a MiB
MAX_VALUES = 200_000         # values after YAML aliases are expanded (a "billion laughs" file is refused)
MAX_RANGE = 10_000           # hosts one pattern like web[0001:9999] may name
YAML_SUFFIXES = (".yml", ".yaml", ".json")
GROUP_KEYS = ("hosts", "children", "vars")


@dataclass
class Group:
    name: str
    vars: dict = field(default_factory=dict)
    children: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)
    depth: int = 0


@dataclass
class Inventory:
    """Groups, hosts in the order the file first names them, and every variable with where it was set."""

    source: str
    groups: dict[str, Group] = field(default_factory=dict)
    hosts: list[str] = field(default_factory=list)
    host_vars: dict[str, dict] = field(default_factory=dict)
    set_in: dict[tuple[str, str], str] = field(default_factory=dict)   # (host, var) -> the group it was set in
    group_files: dict[str, list[tuple[str, dict]]] = field(default_factory=dict)   # group_vars/: (file, vars)
    host_files: dict[str, list[tuple[str, dict]]] = field(default_factory=dict)    # host_vars/
    problems: list[str] = field(default_factory=list)
    readable: bool = True     # False: the file itself could not be read (nothing else is worth checking)

    def problem(self, where: str, message: str, fix: str = "") -> None:
        text = f"{self.source}: {where}: {message}" if where else f"{self.source}: {message}"
        self.problems.append(one_line(f"{text}; {fix}" if fix else text))

    def group(self, name: str) -> Group:
        if name not in self.groups:
            self.groups[name] = Group(name)
        return self.groups[name]

    def add_child(self, parent: str, child: str) -> None:
        if child not in self.group(parent).children:
            self.groups[parent].children.append(child)
        if parent not in self.group(child).parents:
            self.groups[child].parents.append(parent)

    def add_hosts(self, pattern: str, group: str, variables: dict) -> None:
        """Every host a pattern names, in `group`, with its variables (one value per variable and host)."""
        try:
            names, port = expand_pattern(pattern)
        except ValueError as why:
            self.problem(f"group {group}", f"host {pattern!r}: {why}")
            return
        if port is not None:
            variables = {**variables, "ansible_port": port}
        for name in names:
            if name not in self.host_vars:
                self.hosts.append(name)
                self.host_vars[name] = {}
            if name not in self.group(group).hosts:
                self.groups[group].hosts.append(name)
            for var, value in variables.items():
                known = self.host_vars[name]
                if var in known and known[var] != value:
                    self.problem(f"host {name}", f"variable {var!r} is set twice, to different values (in group "
                                 f"{self.set_in[(name, var)]} and in group {group})",
                                 "set it in one place (or in a group both share)")
                    continue
                known[var] = value
                self.set_in[(name, var)] = group

    def members(self, host: str) -> list[str]:
        """The groups a host belongs to, with every ancestor ('all' included)."""
        found: set[str] = set()
        todo = [g.name for g in self.groups.values() if host in g.hosts]
        while todo:
            name = todo.pop()
            if name not in found:
                found.add(name)
                todo.extend(self.groups[name].parents)
        return sorted(found, key=self.precedence)

    def precedence(self, name: str) -> tuple:
        """Ansible's order for merging group variables: by depth, then ansible_group_priority, then name."""
        group = self.groups[name]
        priority = group.vars.get("ansible_group_priority", 1)
        return (group.depth, priority if isinstance(priority, int) and not isinstance(priority, bool) else 1, name)


# ---------------------------------------------------------------- host patterns

_RANGE = re.compile(r"\[([^\[\]:]*):([^\[\]:]*)(?::([^\[\]:]*))?\]")
_BAD_NAME = re.compile(r"[\s\x00-\x1f\x7f]")


def expand_pattern(pattern: str) -> tuple[list[str], int | None]:
    """'screen[01:03]:2222' -> (['screen01', 'screen02', 'screen03'], 2222): Ansible's ranges and port."""
    port = None
    head, sep, tail = pattern.rpartition(":")
    if sep and tail.isdigit() and ":" not in re.sub(r"\[[^\]]*\]", "", head):   # not an IPv6 address
        pattern, port = head, int(tail)
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is not between 1 and 65535")
    names = _expand_ranges(pattern)
    for name in names:
        if not name or _BAD_NAME.search(name) or name.startswith("-"):
            raise ValueError("a host name must not be empty, start with '-', or hold spaces or control characters")
    return names, port


def _expand_ranges(pattern: str) -> list[str]:
    match = _RANGE.search(pattern)
    if not match:
        if "[" in pattern or "]" in pattern:
            raise ValueError("a range is written [BEGIN:END] or [BEGIN:END:STEP], e.g. screen[01:20]")
        return [pattern]
    begin, end, step = match[1] or "0", match[2], match[3] or "1"
    if not end or not step.isdigit() or int(step) < 1:
        raise ValueError("a range is written [BEGIN:END] or [BEGIN:END:STEP] with END given and STEP at least 1")
    if begin.isdigit() and end.isdigit():
        width = len(begin) if begin.startswith("0") and len(begin) > 1 else 0
        if width and len(end) != width:
            raise ValueError(f"[{begin}:{end}]: a zero-padded range needs BEGIN and END of the same width")
        if (int(end) - int(begin)) // int(step) >= MAX_RANGE:
            raise ValueError(f"[{begin}:{end}] names more than {MAX_RANGE} hosts")
        values = [str(i).zfill(width) for i in range(int(begin), int(end) + 1, int(step))]
    elif len(begin) == 1 and len(end) == 1 and begin in string.ascii_letters and end in string.ascii_letters:
        letters = string.ascii_letters
        values = list(letters[letters.index(begin):letters.index(end) + 1:int(step)])
    else:
        raise ValueError(f"[{begin}:{end}]: a range runs between two numbers or two letters")
    if not values:
        raise ValueError(f"[{begin}:{end}] names no host (BEGIN is after END)")
    head, tail = pattern[:match.start()], pattern[match.end():]
    names = [name for value in values for name in _expand_ranges(head + value + tail)]
    if len(names) > MAX_RANGE:
        raise ValueError(f"names more than {MAX_RANGE} hosts")
    return names


# ---------------------------------------------------------------- YAML

def _yaml_loader():
    """PyYAML's safe loader, refusing a key given twice in one mapping (<< merge keys may still override)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:   # an unhashable key: the constructor says so below
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {one_line(str(key))!r} appears twice in one mapping (first on line "
                    f"{first.line + 1}); YAML keeps only the last", key_node.start_mark)
            seen[key] = key_node.start_mark
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def load_yaml(text: str, inv: Inventory, label: str):
    """The YAML document in text, or None after saying why (one line with its line and column)."""
    import yaml

    try:
        data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else ""
        what = " ".join(part for part in (exc.context, exc.problem) if part)
        inv.problems.append(one_line(f"{label}: {where}: {what}; fix the YAML there"))
        return None
    except (yaml.YAMLError, RecursionError, ValueError) as exc:   # ValueError: a 5000-digit integer
        why = "nests too deep" if isinstance(exc, RecursionError) else str(exc)
        inv.problems.append(one_line(f"{label}: cannot be read as YAML: {why}"))
        return None
    if _expanded_size(data) > MAX_VALUES:
        inv.problems.append(f"{label}: expands to more than {MAX_VALUES} values (YAML aliases); "
                            "an inventory needs far fewer, write it out plainly")
        return None
    return data


def _expanded_size(data) -> int:
    """How many values data holds with every alias written out (shared objects counted each time)."""
    memo: dict[int, int] = {}

    def size(node) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) not in memo:
            memo[id(node)] = 0    # a recursive alias counts as one, and never loops
            items = list(node.items()) if isinstance(node, dict) else [(None, v) for v in node]
            memo[id(node)] = 1 + sum(size(v) for _, v in items) + len(items)
        return memo[id(node)]

    return size(data)


def _kind(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def _parse_yaml(text: str, inv: Inventory) -> None:
    data = load_yaml(text, inv, inv.source)
    if data is None and not inv.problems:
        inv.problems.append(f"{inv.source}: is empty; list the devices under all: hosts: (or in groups)")
    if not isinstance(data, dict) or "plugin" in data:
        inv.readable = False
        if data is None:
            return
        if "plugin" in data:
            inv.problem("", "is an Ansible inventory plugin's configuration, not an inventory",
                        "export the hosts first: ansible-inventory -i THIS --list --yaml > hosts.yml")
        else:
            inv.problem("", f"must be a mapping of groups (all:, ...), not {_kind(data)}",
                        "see docs/fleet.md for the inventory's shape")
        return
    for name, body in data.items():
        _yaml_group(inv, str(name), body, 0)


def _yaml_group(inv: Inventory, name: str, body, depth: int) -> None:
    if depth > 50:
        inv.problem(f"group {name}", "children nest more than 50 levels deep")
        return
    inv.group(name)
    if body is None:
        return
    if not isinstance(body, dict):
        inv.problem(f"group {name}", f"must be a mapping of hosts, children and vars, not {_kind(body)}")
        return
    for key, value in body.items():
        if key not in GROUP_KEYS:
            close = difflib.get_close_matches(str(key), GROUP_KEYS, n=1, cutoff=0.6)
            inv.problem(f"group {name}", f"unknown key {str(key)!r}; a group holds only hosts, children and vars"
                        + (f" (did you mean {close[0]!r}?)" if close else ""))
            continue
        if isinstance(value, str) and key != "vars":
            value = {value: None}
        if value is None:
            continue
        if not isinstance(value, dict):
            inv.problem(f"group {name}", f"{key} must be a mapping, not {_kind(value)}")
        elif key == "vars":
            for var, item in value.items():
                inv.groups[name].vars[str(var)] = item
        elif key == "children":
            for child, child_body in value.items():
                if str(child) == "all":
                    inv.problem(f"group {name}", "'all' cannot be a child group: every group is in all already")
                    continue
                _yaml_group(inv, str(child), child_body, depth + 1)
                inv.add_child(name, str(child))
        else:
            for pattern, variables in value.items():
                if variables is not None and not isinstance(variables, dict):
                    inv.problem(f"host {pattern}", f"its variables must be a mapping (name: value), not "
                                f"{_kind(variables)}", "write 'HOST:' alone for a host without variables")
                    continue
                inv.add_hosts(str(pattern), name, {str(k): v for k, v in (variables or {}).items()})


# ---------------------------------------------------------------- INI

_SECTION = re.compile(r"^\[([^:\]\s]+)(?::(\w+))?\]\s*(?:[#;].*)?$")
_GROUP_NAME = re.compile(r"^([^:\]\s]+)\s*(?:[#;].*)?$")


def _literal(text: str):
    """An INI value as Ansible reads it: a Python literal when it is one ({'a': 1}, 22, True), else the text."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text

    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(i) for i in v]
        if isinstance(v, dict):
            return {plain(k): plain(i) for k, i in v.items()}
        if isinstance(v, bytes):
            return v.decode("utf-8", "replace")
        if v is Ellipsis or isinstance(v, complex):
            return text
        return v

    try:
        return plain(value)
    except (RecursionError, TypeError):   # too deep, or a tuple key that became an (unhashable) list
        return text


def _parse_ini(text: str, inv: Inventory) -> None:
    group, state = "ungrouped", "hosts"
    declared = {"all", "ungrouped"}
    pending: dict[str, tuple[int, str]] = {}   # group named before it is defined -> (line, what named it)
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        section = _SECTION.match(line)
        if section:
            group, state = section[1], section[2] or "hosts"
            if state not in GROUP_KEYS:
                inv.problem(f"line {number}", f"section [{group}:{state}] has an unknown type {state!r}",
                            f"use [{group}], [{group}:vars] or [{group}:children]")
                state = "skip"
                continue
            inv.group(group)
            if state != "vars":
                declared.add(group)
            elif group not in declared:
                pending.setdefault(group, (number, f"[{group}:vars]"))
            continue
        if line.startswith("["):
            inv.problem(f"line {number}", f"{line[:60]!r} is not a section header",
                        "write [group], [group:vars] or [group:children], without spaces")
            state = "skip"
            continue
        if state == "hosts":
            _ini_host(inv, group, line, number)
        elif state == "vars":
            var, sep, value = line.partition("=")
            if not sep or not var.strip():
                inv.problem(f"line {number}", f"expected name=value in [{group}:vars], got {line[:60]!r}")
            else:
                inv.groups[group].vars[var.strip()] = _literal(value.strip())
        elif state == "children":
            child = _GROUP_NAME.match(line)
            if not child:
                inv.problem(f"line {number}", f"expected a group name in [{group}:children], got {line[:60]!r}")
            elif child[1] == "all":
                inv.problem(f"line {number}", "'all' cannot be a child group: every group is in all already")
            else:
                inv.add_child(group, child[1])
                pending.setdefault(child[1], (number, f"[{group}:children]"))
    for name, (number, where) in pending.items():
        if name not in declared:
            inv.problem(f"line {number}", f"{where} names the group {name!r}, which is never defined",
                        f"add a [{name}] section with its hosts, or fix the name")


def _ini_host(inv: Inventory, group: str, line: str, number: int) -> None:
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as exc:
        inv.problem(f"line {number}", f"cannot split the host line: {exc}", "check its quotes")
        return
    if not tokens:
        return
    if tokens[0].strip() == "---":
        inv.problem(f"line {number}", "'---' starts a YAML document", "name the file .yml if it is YAML")
        return
    variables = {}
    for token in tokens[1:]:
        var, sep, value = token.partition("=")
        if not sep or not var:
            inv.problem(f"line {number}", f"expected name=value after the host, got {token[:60]!r}")
            return
        variables[var] = _literal(value)
    inv.add_hosts(tokens[0], group, variables)


# ---------------------------------------------------------------- reading it all

def _is_ini(path: Path, text: str) -> bool:
    """.ini is INI and .yml/.yaml/.json YAML; otherwise INI when the first real line is a [section] or
    has no ':' (a bare host name), as Ansible's plugins would end up deciding."""
    if path.suffix in YAML_SUFFIXES:
        return False
    if path.suffix == ".ini":
        return True
    for line in text.splitlines():
        line = line.strip()
        if line and line[0] not in "#;":
            return line.startswith("[") or (":" not in line and line != "---")
    return False


def _read_text(path: Path, label: str, inv: Inventory) -> str | None:
    try:
        raw = read_small(path, "inventory file", MAX_BYTES, hint="name an Ansible inventory file (YAML or INI)")
    except InputRefused as refused:
        inv.problems.append(one_line(f"{label}: {refused.reason}" + (f"; {refused.hint}" if refused.hint else "")))
        return None
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        inv.problems.append(f"{label}: is not UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8")
        return None


def _var_files(inv: Inventory, directory: Path, name: str) -> list[tuple[str, dict]]:
    """group_vars/NAME or host_vars/NAME: a file (NAME, NAME.yml, .yaml, .json) or a directory of them."""
    found = []
    candidates = [directory / name, *(directory / f"{name}{suffix}" for suffix in YAML_SUFFIXES)]
    for candidate in candidates:
        if candidate.is_dir():
            found += sorted(p for p in candidate.rglob("*") if p.is_file() and not p.name.startswith(".")
                            and p.suffix in ("", *YAML_SUFFIXES))
        elif candidate.is_file():
            found.append(candidate)
    out = []
    for path in found:
        label = str(path)
        text = _read_text(path, label, inv)
        data = load_yaml(text, inv, label) if text is not None else None
        if data is None:
            continue
        if not isinstance(data, dict):
            inv.problems.append(f"{label}: must be a mapping of variables (name: value), not {_kind(data)}")
            continue
        out.append((label, {str(k): v for k, v in data.items()}))
    return out


def _finish(inv: Inventory) -> None:
    """'all' and 'ungrouped' as Ansible has them, depths for the merge order, and no circle of children."""
    inv.group("all")
    inv.group("ungrouped")
    for group in list(inv.groups.values()):
        if group.name != "all" and not group.parents:
            inv.add_child("all", group.name)
    in_a_group = {h for g in inv.groups.values() if g.name not in ("all", "ungrouped") for h in g.hosts}
    for host in inv.hosts:
        if host not in in_a_group and host not in inv.groups["ungrouped"].hosts:
            inv.groups["ungrouped"].hosts.append(host)
    # depth: the longest way down from all (a circle would never settle: found and refused first)
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> bool:
        state[name] = 1
        for child in inv.groups[name].children:
            if state.get(child) == 1:
                circle = path[path.index(child):] + [child] if child in path else [name, child]
                inv.problem(f"group {child}", "is its own ancestor: " + " -> ".join(circle),
                            "remove one of those children entries")
                return False
            if state.get(child) is None and not visit(child, path + [child]):
                return False
        state[name] = 2
        return True

    if not visit("all", ["all"]):
        return
    order = ["all"]
    for name in order:
        for child in inv.groups[name].children:
            inv.groups[child].depth = max(inv.groups[child].depth, inv.groups[name].depth + 1)
            order.append(child)   # a DAG: a group is revisited once per parent, its depth only grows


def read_inventory(path: str | Path) -> Inventory:
    """The inventory at path, parsed; its problems are in .problems (nothing is raised for the file's content)."""
    path = Path(path)
    inv = Inventory(str(path))
    text = _read_text(path, str(path), inv)
    if text is None:
        inv.readable = False
        return inv
    (_parse_ini if _is_ini(path, text) else _parse_yaml)(text, inv)
    if not inv.readable:
        return inv
    _finish(inv)
    base = path.parent
    for name in inv.groups:
        if files := _var_files(inv, base / "group_vars", name):
            inv.group_files[name] = files
    for host in inv.hosts:
        if files := _var_files(inv, base / "host_vars", host):
            inv.host_files[host] = files
    return inv


def select(inv: Inventory, limit: str | None) -> list[str]:
    """Hosts matching an Ansible-style --limit: names or groups (wildcards allowed), ',' between them,
    '!x' leaves x out, '&x' keeps only what is also in x. The inventory's order is kept."""
    if limit is None:
        return list(inv.hosts)

    def hosts_of(term: str) -> set[str]:
        found = {h for h in inv.hosts if fnmatch.fnmatchcase(h, term)}
        for name, group in inv.groups.items():
            if fnmatch.fnmatchcase(name, term):
                found |= {h for h in inv.hosts if name in inv.members(h)}
        if not found:
            raise UsageError(f"--limit: {term!r} matches no host or group of {inv.source}",
                             hint="see them with: kiosk fleet show " + inv.source)
        return found

    terms = [t.strip() for t in limit.split(",") if t.strip()]
    if not terms:
        raise UsageError("--limit names no host or group", hint="give names or groups, e.g. --limit lobby,cafe-01")
    chosen: set[str] = set()
    plain = [t for t in terms if t[0] not in "!&"]
    for term in plain:
        chosen |= hosts_of(term)
    if not plain:
        chosen = set(inv.hosts)
    for term in terms:
        if term[0] == "&":
            chosen &= hosts_of(term[1:])
        elif term[0] == "!":
            chosen -= hosts_of(term[1:])
    return [h for h in inv.hosts if h in chosen]
