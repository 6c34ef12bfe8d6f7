"""nixiosk.json: load it, check it, fill in defaults, and say exactly what is wrong.

The field rules live in schemas/nixiosk.schema.json; this module turns schema
errors into one-line problems (`FILE: /pointer: what is wrong; how to fix it`),
adds the checks a schema cannot express (host name label, key parsing, tz
database, ISO country, the Debian archive, what the board can run, config.txt
keys that decide what boots), and reports every problem at once. The device
runs the same code on every push.

Reading specs, one way everywhere: load(path) for a file, from_bytes(raw) for
bytes (a pushed commit, a request) and loads(text) for text; a spec the device accepted
before (a generation) is read back by kiosk.device.store.spec_data, not checked again. All go through
jsontext.parse_json: a UTF-8 byte-order mark is accepted and dropped, and
Spec.text is the text without it, the text to store and hand on.
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
from kiosk.core.inputs import InputRefused, read_small
from kiosk.spec.firmware import refused_lines
from kiosk.spec.jsontext import (BOM, MAX_BYTES, parse_json, pointer,  # noqa: F401 (parse_json, pointer: re-exported)
                                 too_large, value_problems)
from kiosk.spec.sshkeys import BadKey, parse_public_key

# Whole-string patterns: always used with fullmatch (a `$` would let one trailing newline through).
HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
HEX64 = re.compile(r"[0-9a-fA-F]{64}")
MAX_PROBLEMS = 100
NIX_SYSTEMS = {"x86_64-linux": "amd64", "aarch64-linux": "arm64", "armv7l-linux": "armhf", "armv6l-linux": "armel"}


@dataclass
class Spec:
    """A valid spec: the data with defaults filled in, where it came from, and warnings."""

    data: dict
    source: str = "nixiosk.json"
    warnings: list[str] = field(default_factory=list)
    text: str | None = None   # the text it was read from, without a BOM (None when checked from data)

    @property
    def digest(self) -> str:
        return hashlib.sha256(canonical_json(self.data).encode()).hexdigest()


def canonical_json(data) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads((paths.schemas_dir() / "nixiosk.schema.json").read_text())


def _show(value, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    choices = [c for c in choices if isinstance(c, str)]   # enums of numbers (display.rotation) have no spelling
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:
        return lowered[word.lower()]
    close = difflib.get_close_matches(word, choices, n=10, cutoff=cutoff)
    if not close and len(word) >= 3:  # an abbreviation: "cec" for "cecSupport"
        close = [c for c in choices if c.lower().startswith(word.lower())]
    return min(close, key=lambda c: (_edit_distance(word, c), abs(len(c) - len(word)))) if close else ""


def _schema_problems(data, skip: frozenset[str] = frozenset()) -> list[Problem]:
    """The schema's problems, except at or under the pointers in `skip` (those have one already)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = list(validator.iter_errors(data))
    # A string that is empty or too long also breaks its pattern: say only the first.
    sized = {tuple(e.absolute_path) for e in errors if e.validator in ("type", "minLength", "maxLength")}
    problems: list[Problem] = []
    for error in errors:
        if error.validator == "pattern" and tuple(error.absolute_path) in sized:
            continue
        where = pointer(error.absolute_path)
        if skip and (where in skip or any(a in skip for a in _ancestors(where))):
            continue
        problems.extend(p for p in _explain(error) if p.pointer not in skip)
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
            close = _suggest(name, known) if len(name) <= 64 else ""
            hint = f"did you mean \"{close}\"?" if close else f"remove it; fields here are: {', '.join(known)}"
            problems.append(Problem(pointer(path + [name]), f"unknown field {_show(name)}", hint))
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
    if kind in ("maxItems", "maxProperties"):
        return [Problem(where, f"has {len(value)} items; the most allowed is {error.validator_value}", fix)]
    if kind == "uniqueItems":
        seen, dups = set(), []
        for item in value:
            key = canonical_json(item)
            if key in seen:
                dups.append(item)
            seen.add(key)
        return [Problem(where, f"lists {_show(dups[0]) if dups else 'an item'} more than once", "list each item once")]
    return [Problem(where, error.message if len(error.message) <= 200 else error.message[:197] + "...", fix)]


# ---------------------------------------------------------------- checks a schema cannot express

def network_psk(ssid: str, secret: str | None) -> str | None:
    """The 64-hex PSK wpa_supplicant uses, exactly as wpa_passphrase computes it; None for open networks."""
    if secret is None:
        return None
    if HEX64.fullmatch(secret):
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


def _ancestors(ptr: str) -> list[str]:
    """"/a/b/c" -> ["/a", "/a/b"] (pointers escape "/" in keys, so splitting is exact)."""
    parts = ptr.split("/")
    return ["/".join(parts[:i]) for i in range(2, len(parts))]


def _semantic_problems(data: dict, bad: set[str], warnings: list[str],
                       known_packages: frozenset[str] = frozenset()) -> list[Problem]:
    """Checks on fields the schema accepted (pointers in `bad` already have a problem)."""
    problems: list[Problem] = []
    below = {a for b in bad for a in _ancestors(b)}

    def ok(ptr: str) -> bool:
        """No problem yet at ptr, above it or below it."""
        return ptr not in bad and ptr not in below and not any(a in bad for a in _ancestors(ptr))

    host = data.get("hostName")
    if isinstance(host, str) and ok("/hostName") and not HOST_LABEL.fullmatch(host):
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
            if isinstance(secret, str) and not HEX64.fullmatch(secret):
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
    seen = set()
    for i, login in enumerate(logins):
        if login and login[1] is not None and ok(f"/builders/{i}/hostName"):
            if login in seen:
                problems.append(Problem(f"/builders/{i}/hostName", f"builder {login[0]}@{login[1]}:{login[2]} "
                                        "is listed twice", "list each builder once"))
            seen.add(login)

    raspberry = data.get("raspberryPi")
    firmware = raspberry.get("firmwareConfig") if isinstance(raspberry, dict) else None
    if isinstance(firmware, str) and ok("/raspberryPi/firmwareConfig"):
        for number, line, why in refused_lines(firmware):
            problems.append(Problem("/raspberryPi/firmwareConfig", f"line {number}: {_show(line)} {why}",
                                    "remove that line (kiosk itself sets the kernel, initramfs, command line and "
                                    "device tree)"))

    display = data.get("display")
    schedule = display.get("schedule") if isinstance(display, dict) else None
    if isinstance(schedule, dict) and isinstance(schedule.get("on"), str) and schedule.get("on") == schedule.get("off") \
            and ok("/display/schedule/on") and ok("/display/schedule/off"):
        problems.append(Problem("/display/schedule/on", f"is the same time as \"off\" ({schedule['on']}), so the "
                                "screen would never be off", "give two different times, e.g. \"off\": \"22:00\", "
                                "\"on\": \"07:00\" (on may be the next morning)"))

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
    limits, fatal = value_problems(data)
    if fatal:  # the schema validator would recurse too deep, or fail to print a huge number: stop here
        raise InvalidSpec(source, limits)
    problems = limits + _schema_problems(data, frozenset(p.pointer for p in limits))
    warnings: list[str] = []
    problems += _semantic_problems(data, {p.pointer for p in problems}, warnings, frozenset(known_packages))
    if len(problems) > MAX_PROBLEMS:
        shown = sorted(set(problems))[:MAX_PROBLEMS]
        problems = shown + [Problem("", f"{len(set(problems))} problems in all; the first {MAX_PROBLEMS} are shown",
                                    "fix these and validate again")]
    if problems:
        raise InvalidSpec(source, problems)
    return Spec(with_defaults(data), source, warnings)


def loads(text: str, source: str = "nixiosk.json", *, known_packages=frozenset()) -> Spec:
    """Check spec text (a leading UTF-8 BOM is dropped); Spec.text is the text without it."""
    text = text.removeprefix(BOM)
    spec = check(parse_json(text, source), source, known_packages=known_packages)
    spec.text = text
    return spec


def decode(raw: bytes, source: str = "nixiosk.json") -> str:
    """Spec bytes as text: at most MAX_BYTES of UTF-8, a leading BOM dropped; InvalidSpec otherwise."""
    if len(raw) > MAX_BYTES:
        raise too_large(source)
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise InvalidSpec(source, [Problem("", "is UTF-16 text, not UTF-8", "save the file as UTF-8")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidSpec(source, [Problem("", f"is not UTF-8 text (bad byte at offset {exc.start})",
                                           "save the file as UTF-8")]) from None
    return text.removeprefix(BOM)


def from_bytes(raw: bytes, source: str = "nixiosk.json", *, known_packages=frozenset()) -> Spec:
    """Check spec bytes (a pushed commit's blob, a builder request); Spec.text is what to store."""
    return loads(decode(raw, source), source, known_packages=known_packages)


def load(path: str | Path) -> Spec:
    """Check the spec file at `path`: a regular file of at most MAX_BYTES (a FIFO or /dev/zero is refused)."""
    return from_bytes(read_file(path), str(path))


def read_file(path: str | Path) -> bytes:
    """The bytes of the spec file at `path` (a regular file of at most MAX_BYTES); InvalidSpec saying why not."""
    path = Path(path)
    try:
        raw = read_small(path, "spec file", MAX_BYTES, hint="name a regular spec file")
    except InputRefused as refused:
        if refused.kind == "missing":
            raise InvalidSpec(str(path), [Problem("", "file not found", "create it (cp nixiosk.json.sample "
                                                  "nixiosk.json) or name another")]) from None
        if refused.kind == "size":
            raise too_large(str(path)) from None
        if refused.kind == "os":
            raise InvalidSpec(str(path), [Problem("", f"cannot be read: {refused.reason}",
                                                  "check its permissions")]) from None
        raise InvalidSpec(str(path), [Problem("", refused.reason, refused.hint)]) from None
    return raw


def builder_architectures(systems: list[str]) -> list[str]:
    """Builder `systems` in Debian architecture names (Nix system names are accepted too)."""
    return sorted({NIX_SYSTEMS.get(s, s) for s in systems})
