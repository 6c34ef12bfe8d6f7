"""nixiosk.json: load it, check it, fill in defaults, and say exactly what is wrong.

The field rules live in schemas/nixiosk.schema.json; this module turns schema
errors into one-line problems (`FILE: /pointer: what is wrong; how to fix it`),
adds the checks a schema cannot express (host name label, key parsing, tz
database, ISO country, the Debian archive, what the board can run), and
reports every problem at once. The device runs the same code on every push.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from kiosk.core import paths
from kiosk.core.errors import InvalidSpec, Problem
from kiosk.spec.sshkeys import BadKey, parse_public_key

HOST_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
NIX_SYSTEMS = {"x86_64-linux": "amd64", "aarch64-linux": "arm64", "armv7l-linux": "armhf", "armv6l-linux": "armel"}


@dataclass
class Spec:
    """A valid spec: the data with defaults filled in, where it came from, and warnings."""

    data: dict
    source: str = "nixiosk.json"
    warnings: list[str] = field(default_factory=list)

    @property
    def digest(self) -> str:
        return hashlib.sha256(canonical_json(self.data).encode()).hexdigest()


def canonical_json(data) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads((paths.schemas_dir() / "nixiosk.schema.json").read_text())


def pointer(parts) -> str:
    """RFC 6901 JSON pointer of a path."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _show(value, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- JSON syntax

class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _reject_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _pointer_at(text: str, pos: int) -> str:
    """The JSON pointer of the container being parsed at `pos` (best effort, for syntax errors)."""
    stack: list[list] = []  # [kind, key or index]
    i, in_string, start, last_string = 0, False, 0, None
    while i < min(pos, len(text)):
        c = text[i]
        if in_string:
            if c == "\\":
                i += 1
            elif c == '"':
                in_string = False
                last_string = text[start + 1:i]
        elif c == '"':
            in_string, start = True, i
        elif c == "{":
            stack.append(["{", None])
        elif c == "[":
            stack.append(["[", 0])
        elif c in "}]":
            if stack:
                stack.pop()
        elif c == ":" and stack and stack[-1][0] == "{":
            stack[-1][1] = last_string
        elif c == "," and stack:
            if stack[-1][0] == "[":
                stack[-1][1] += 1
            else:
                stack[-1][1] = None
        i += 1
    parts = [key for kind, key in stack if key is not None]
    # the innermost container's own key is where the error is; leave off a key not yet complete
    return pointer(parts)


def parse_json(text: str, source: str):
    """Parse JSON text; a syntax error becomes InvalidSpec with line, column and a caret."""
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates)
    except _DuplicateKey as dup:
        first = text.find(json.dumps(dup.key))
        where = text.find(json.dumps(dup.key), first + 1)
        raise InvalidSpec(source, [Problem(
            _pointer_at(text, where) + pointer([dup.key]), f"the key {dup.key!r} appears twice",
            "keep one of them (JSON readers disagree on which one wins)")]) from None
    except json.JSONDecodeError as exc:
        lineno, colno, pos = exc.lineno, exc.colno, exc.pos
        message, fix = exc.msg, "fix the JSON syntax at that point"
        before = text[:pos].rstrip()
        if before.endswith(",") and text[pos:pos + 1] in ("}", "]"):
            comma = len(before) - 1
            lineno = text.count("\n", 0, comma) + 1
            colno = comma - (text.rfind("\n", 0, comma) + 1) + 1
            pos = comma
            message = f"trailing comma before '{text[exc.pos]}' (JSON allows no comma after the last item)"
            fix = "remove that comma"
        elif not text[pos:].strip():
            end = len(text.rstrip())
            lineno = text.count("\n", 0, end) + 1
            colno = end - (text.rfind("\n", 0, end) + 1) + 1
            pos = end
            message = "the file ends in the middle of the JSON" if text.strip() else "the file is empty"
            fix = "close every open '{' and '['" if text.strip() else "start from nixiosk.json.sample"
        elif "Expecting property name" in exc.msg:
            message, fix = "expected a key in double quotes", "quote the key with \" (JSON has no single quotes or bare keys)"
        elif exc.msg.startswith("Expecting ',' delimiter"):
            message, fix = "expected ',' between items", "add a comma after the previous item"
        elif exc.msg.startswith("Invalid control character"):
            message, fix = "a raw line break or tab inside a string", "write it as \\n or \\t"
        elif exc.msg.startswith("Expecting value"):
            message, fix = "expected a value", "write a string, number, true, false, null, object or array here"
        lines = text.splitlines()
        line_text = lines[lineno - 1] if 0 < lineno <= len(lines) else ""
        caret = " " * (colno - 1) + "^"
        where = _pointer_at(text, pos) or "/"
        raise InvalidSpec(source, [Problem(where, f"line {lineno} column {colno}: {message}", fix)],
                          detail=f"    {line_text}\n    {caret}") from None


# ---------------------------------------------------------------- schema problems

def _x_fix(node: dict) -> str:
    return node.get("x-fix", "") if isinstance(node, dict) else ""


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


_TYPE_WORDS = {"string": "a string", "integer": "a whole number", "number": "a number", "boolean": "true or false",
               "array": "an array", "object": "an object", "null": "null"}


def _edit_distance(a: str, b: str) -> int:
    """Optimal string alignment distance: typos, including swapped neighbours, count as one."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def _suggest(word: str, choices, cutoff: float = 0.6) -> str:
    """The closest choice to a misspelt word ("" if none is close): case first, then fewest typos."""
    choices = [c for c in choices if c is not None]
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        return lowered[word.lower()]
    close = difflib.get_close_matches(word, choices, n=10, cutoff=cutoff)
    if not close and len(word) >= 3:  # an abbreviation: "cec" for "cecSupport"
        close = [c for c in choices if c.lower().startswith(word.lower())]
    return min(close, key=lambda c: (_edit_distance(word, c), abs(len(c) - len(word)))) if close else ""


def _schema_problems(data) -> list[Problem]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    problems: list[Problem] = []
    for error in validator.iter_errors(data):
        problems.extend(_explain(error))
    return problems


def _explain(error) -> list[Problem]:
    path = list(error.absolute_path)
    where = pointer(path)
    node, value, kind = error.schema, error.instance, error.validator
    fix = _x_fix(node)
    if kind == "required":
        missing = [name for name in error.validator_value if name not in value]
        return [Problem(pointer(path + [name]), "is required but missing",
                        _x_fix(node.get("properties", {}).get(name, {})) or f"add \"{name}\"")
                for name in missing]
    if kind == "additionalProperties" and isinstance(value, dict):
        known = sorted(node.get("properties", {}))
        problems = []
        for name in sorted(set(value) - set(known)):
            close = _suggest(name, known)
            hint = f"did you mean \"{close}\"?" if close else f"remove it; fields here are: {', '.join(known)}"
            problems.append(Problem(pointer(path + [name]), f"unknown field \"{name}\"", hint))
        return problems
    if kind == "type":
        wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in wanted)
        return [Problem(where, f"must be {words}, not {_json_type(value)}", fix)]
    if kind == "enum":
        close = _suggest(value, error.validator_value) if isinstance(value, str) else ""
        hint = f"did you mean \"{close}\"?" if close else fix
        return [Problem(where, f"{_show(value)} is not a valid choice", hint)]
    if "propertyNames" in error.relative_schema_path:
        # jsonschema reports an object key that breaks propertyNames at the object's path, the key as instance
        what = "is empty" if kind == "minLength" else "is too long (an SSID has at most 32 characters)"
        return [Problem(pointer(path + [value]), f"the name {_show(value)} {what}", "use the network's exact SSID")]
    if kind == "pattern":
        return [Problem(where, f"{_show(value)} is not in the right form", fix)]
    if kind == "minLength":
        return [Problem(where, "must not be empty" if error.validator_value == 1 else
                        f"must be at least {error.validator_value} characters", fix)]
    if kind == "maxLength":
        return [Problem(where, f"is {len(value)} characters; the most allowed is {error.validator_value}", fix)]
    if kind in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        words = {"minimum": "at least", "maximum": "at most", "exclusiveMinimum": "more than",
                 "exclusiveMaximum": "less than"}[kind]
        return [Problem(where, f"is {_show(value)}; it must be {words} {error.validator_value}", fix)]
    if kind == "minItems":
        return [Problem(where, f"must have at least {error.validator_value} item(s)", fix)]
    if kind == "uniqueItems":
        seen, dups = set(), []
        for item in value:
            key = canonical_json(item)
            if key in seen:
                dups.append(item)
            seen.add(key)
        return [Problem(where, f"lists {_show(dups[0]) if dups else 'an item'} more than once", "list each item once")]
    return [Problem(where, error.message, fix)]


# ---------------------------------------------------------------- checks a schema cannot express

def network_psk(ssid: str, secret: str | None) -> str | None:
    """The 64-hex PSK wpa_supplicant uses, exactly as wpa_passphrase computes it; None for open networks."""
    if secret is None:
        return None
    if HEX64.match(secret):
        return secret.lower()
    return hashlib.pbkdf2_hmac("sha1", secret.encode(), ssid.encode(), 4096, 32).hex()


@lru_cache(maxsize=1)
def _time_zones() -> frozenset[str] | None:
    try:
        import zoneinfo
        zones = zoneinfo.available_timezones()
    except Exception:
        return None
    return frozenset(zones) or None


@lru_cache(maxsize=1)
def _countries() -> frozenset[str] | None:
    """ISO 3166-1 alpha-2 codes, from tzdata's iso3166.tab (present on every Debian system)."""
    for candidate in ("/usr/share/zoneinfo/iso3166.tab", "/usr/share/zoneinfo/zone1970.tab"):
        path = Path(candidate)
        if path.is_file():
            codes = set()
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                if line and not line.startswith("#"):
                    codes.update(c for c in line.split("\t")[0].split(",") if len(c) == 2)
            return frozenset(codes)
    return None


def _semantic_problems(data: dict, bad: set[str], warnings: list[str],
                       known_packages: frozenset[str] = frozenset()) -> list[Problem]:
    """Checks on fields the schema accepted (pointers in `bad` already have a problem)."""
    problems: list[Problem] = []

    def ok(ptr: str) -> bool:
        return not any(ptr == b or ptr.startswith(b + "/") or b.startswith(ptr + "/") for b in bad)

    host = data.get("hostName")
    if isinstance(host, str) and ok("/hostName") and not HOST_LABEL.match(host):
        if host.startswith("-") or host.endswith("-"):
            why = "starts or ends with a hyphen"
        elif "." in host:
            why = "contains a dot (give the name without .local or a domain)"
        else:
            bad_chars = sorted({c for c in host if not (c.isascii() and (c.isalnum() or c == "-"))})
            why = "contains " + ", ".join(repr(c) for c in bad_chars)
        problems.append(Problem("/hostName", f"{_show(host)} is not a valid host name: it {why}",
                                _x_fix(schema()["properties"]["hostName"])))

    if data.get("hardware") == "qemu-no-virtfs":
        warnings.append("/hardware: \"qemu-no-virtfs\" is Nixiosk's name; kiosk builds the \"qemu\" target for it")

    keys = data.get("authorizedKeys", [])
    if isinstance(keys, list):
        for i, key in enumerate(keys):
            if isinstance(key, str) and ok(f"/authorizedKeys/{i}"):
                try:
                    parse_public_key(key)
                except BadKey as why:
                    problems.append(Problem(f"/authorizedKeys/{i}", f"this SSH key {why}",
                                            "paste the whole line of your .pub file, e.g. ~/.ssh/id_ed25519.pub"))
        if not keys and data.get("allowKioskLogin") is not True and ok("/authorizedKeys"):
            problems.append(Problem("/authorizedKeys", "no SSH key and allowKioskLogin is false: nobody could ever "
                                    "log in to the device or push to it",
                                    "add your public key (cat ~/.ssh/id_ed25519.pub), or set allowKioskLogin to true"))

    networks = data.get("networks")
    if isinstance(networks, dict):
        for ssid, secret in networks.items():
            ptr = pointer(["networks", ssid])
            if not ok(ptr):
                continue
            if len(ssid.encode()) > 32:
                problems.append(Problem(ptr, f"the SSID is {len(ssid.encode())} bytes in UTF-8; Wi-Fi allows 32",
                                        "use the network's exact SSID"))
            if isinstance(secret, str) and not HEX64.match(secret):
                if len(secret) == 64:
                    problems.append(Problem(ptr, "is 64 characters but not hexadecimal, so it is neither a raw "
                                            "PSK nor a passphrase (8-63 characters)",
                                            "use the psk= line of wpa_passphrase, or the passphrase itself"))
                elif not 8 <= len(secret) <= 63:
                    problems.append(Problem(ptr, f"a Wi-Fi passphrase has 8 to 63 characters, this one has {len(secret)}",
                                            "check the passphrase, or use null for an open network"))
                elif not all(32 <= ord(c) <= 126 for c in secret):
                    problems.append(Problem(ptr, "a Wi-Fi passphrase may only contain printable ASCII characters",
                                            "give the 64-hex PSK from wpa_passphrase instead"))

    locale = data.get("locale")
    if isinstance(locale, dict):
        tz = locale.get("timeZone")
        if isinstance(tz, str) and ok("/locale/timeZone"):
            zones = _time_zones()
            if zones is None:
                warnings.append("/locale/timeZone: no tz database on this machine; not checked")
            elif tz not in zones:
                close = _suggest(tz, zones)
                problems.append(Problem("/locale/timeZone", f"{_show(tz)} is not in the tz database",
                                        f"did you mean \"{close}\"?" if close else
                                        _x_fix(schema()["properties"]["locale"]["properties"]["timeZone"])))
        reg = locale.get("regDom")
        if isinstance(reg, str) and ok("/locale/regDom") and reg != "00":
            countries = _countries()
            if countries is None:
                warnings.append("/locale/regDom: no ISO 3166 table on this machine; not checked")
            elif reg not in countries:
                problems.append(Problem("/locale/regDom", f"{_show(reg)} is not an ISO 3166-1 alpha-2 country code",
                                        "use your country's two-letter code (e.g. \"US\", \"GB\", \"DE\") or \"00\""))

    for b_index, builder in enumerate(data.get("builders", []) if isinstance(data.get("builders"), list) else []):
        ptr = f"/builders/{b_index}/publicHostKey"
        if isinstance(builder, dict) and isinstance(builder.get("publicHostKey"), str) and ok(ptr):
            try:
                parse_public_key(builder["publicHostKey"])
            except BadKey as why:
                problems.append(Problem(ptr, f"this host key {why}",
                                        "paste the builder's host key line, e.g. from: ssh-keyscan -t ed25519 HOST"))
    # The same builder is the same (user, host, port): one host may serve two users or ports.
    logins = [(b.get("sshUser", "root"), b.get("hostName"), b.get("port", 22)) if isinstance(b, dict) else None
              for b in data.get("builders", [])] if isinstance(data.get("builders"), list) else []
    for i, login in enumerate(logins):
        if login and login[1] is not None and login in logins[:i] and ok(f"/builders/{i}/hostName"):
            problems.append(Problem(f"/builders/{i}/hostName",
                                    f"builder {login[0]}@{login[1]}:{login[2]} is listed twice", "list each builder once"))

    problems.extend(_board_problems(data, ok, warnings, known_packages))
    return problems


def _board_problems(data: dict, ok, warnings: list[str], known_packages: frozenset[str]) -> list[Problem]:
    """What the board can run, and whether the Debian archive has the packages for its architecture.

    known_packages (what a device already has installed) are not looked up: a push that changes no
    package never fetches the archive's index, which a Pi 0 would take minutes to parse."""
    from kiosk.spec.archive import ArchiveUnavailable, package_index
    from kiosk.spec.hardware import load_board

    hardware = data.get("hardware")
    if not isinstance(hardware, str) or not ok("/hardware"):
        return []
    board = load_board(hardware)
    wanted: list[tuple[str, str]] = []
    program = data.get("program")
    if isinstance(program, dict) and isinstance(program.get("package"), str) and ok("/program/package"):
        wanted.append(("/program/package", program["package"]))
    if isinstance(data.get("packages"), list):
        wanted += [(f"/packages/{i}", p) for i, p in enumerate(data["packages"])
                   if isinstance(p, str) and ok(f"/packages/{i}")]

    problems = []
    for ptr, name in wanted:
        if name in board["refusedPrograms"]:
            problems.append(Problem(ptr, f"\"{name}\" cannot run on {hardware}: "
                                    + board["refusedPrograms"][name].split(": ")[0],
                                    board["refusedPrograms"][name].split(": ", 1)[-1]))
    wanted = [(p, n) for p, n in wanted if n not in board["refusedPrograms"] and n not in known_packages]
    if not wanted:
        return problems

    debian = data.get("debian") if isinstance(data.get("debian"), dict) else {}
    props = schema()["properties"]["debian"]["properties"]
    suite = debian.get("suite") if ok("/debian/suite") and isinstance(debian.get("suite"), str) else props["suite"]["default"]
    mirror = debian.get("mirror") if ok("/debian/mirror") and isinstance(debian.get("mirror"), str) else props["mirror"]["default"]
    arch = board["architecture"]
    try:
        index = package_index(mirror, suite, arch)
    except ArchiveUnavailable as why:
        warnings.append(f"/program/package: could not check the Debian archive ({why}); "
                        f"package names were not checked for {arch}")
        return problems
    for ptr, name in wanted:
        if name in index:
            continue
        providers = index.provides.get(name)
        if providers:
            problems.append(Problem(ptr, f"\"{name}\" is a virtual package in Debian {suite} {arch}",
                                    f"name the package that provides it: {', '.join(providers[:5])}"))
            continue
        close = _suggest(name, index.packages, cutoff=0.75)
        problems.append(Problem(ptr, f"Debian {suite} has no package \"{name}\" for {arch} ({hardware})",
                                f"did you mean \"{close}\"?" if close else
                                f"check the name at https://packages.debian.org/{suite}/{name}"))
    return problems


# ---------------------------------------------------------------- defaults

def _fill_defaults(node: dict, value):
    """Copy schema defaults into missing properties, recursively (objects and arrays of objects)."""
    if "properties" in node and isinstance(value, dict):
        for name, sub in node.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = _fill_defaults(sub, value[name])
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        return [_fill_defaults(node["items"], item) for item in value]
    return value


def with_defaults(data: dict) -> dict:
    filled = _fill_defaults(schema(), copy.deepcopy(data))
    program = filled["program"]
    program.setdefault("executable", f"/usr/bin/{program['package']}")
    return filled


# ---------------------------------------------------------------- entry points

def check(data, source: str = "nixiosk.json", *, known_packages=frozenset()) -> Spec:
    """Validate parsed JSON; every problem at once. Returns the Spec with defaults filled in.

    known_packages: package names known to exist for the board (installed on the device)."""
    if not isinstance(data, dict):
        raise InvalidSpec(source, [Problem("", f"the spec must be a JSON object, not {_json_type(data)}",
                                           "start from nixiosk.json.sample")])
    problems = _schema_problems(data)
    warnings: list[str] = []
    problems += _semantic_problems(data, {p.pointer for p in problems}, warnings, frozenset(known_packages))
    if problems:
        raise InvalidSpec(source, problems)
    return Spec(with_defaults(data), source, warnings)


def loads(text: str, source: str = "nixiosk.json", *, known_packages=frozenset()) -> Spec:
    return check(parse_json(text, source), source, known_packages=known_packages)


def load(path: str | Path) -> Spec:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InvalidSpec(str(path), [Problem("", "file not found",
                                              "create it (cp nixiosk.json.sample nixiosk.json) or name another")]) from None
    except IsADirectoryError:
        raise InvalidSpec(str(path), [Problem("", "is a directory, not a spec file", "name a .json file")]) from None
    except OSError as exc:
        raise InvalidSpec(str(path), [Problem("", f"cannot read it: {exc.strerror}", "check the path and permissions")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidSpec(str(path), [Problem("", f"is not UTF-8 text (bad byte at offset {exc.start})",
                                              "save the file as UTF-8")]) from None
    return loads(text.removeprefix("\ufeff"), str(path))


def builder_architectures(systems: list[str]) -> list[str]:
    """Builder `systems` in Debian architecture names (Nix system names are accepted too)."""
    return sorted({NIX_SYSTEMS.get(s, s) for s in systems})
