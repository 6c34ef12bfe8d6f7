"""`kiosk status HOST [--json] [-v]`: one kiosk at a glance, from the user's machine.

The device answers one fixed command over ssh (`kiosk status --here --json`, kiosk.device.facts):
board, root slots, generation and commit, uptime, health, its spec's `debian` section and its
installed packages. This side then counts the installed packages that Debian's `<suite>-security` and
`<suite>-updates` carry newer versions of, from the mirrors of the device's own spec
(kiosk.spec.sources.apt_sources) and the archive's indexes (kiosk.spec.archive.suite_versions:
deadline, size limits, a day's cache). That work stays here: a 512 MB Pi 0 must not run `apt-get
update`. An archive that cannot be reached is said in its row; the rest is printed all the same.

`kiosk fleet status` asks every device the same question and counts with the same code, through one
SuiteIndexes for the whole fleet: each (mirror, suite, architecture) index is fetched once, not per device.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from kiosk.core.errors import KioskError, UsageError, one_line
from kiosk.core.run import run
from kiosk.net import reach

# Fixed: nothing from the spec or the command line reaches the device's shell.
REMOTE = "kiosk status --here --json"
KINDS = ("security", "updates")   # apt_sources names them <suite>-security and <suite>-updates
NO_SLOTS = "none (one root partition)"
NO_BOARD = "the device did not say its board"
HINT = "is the kiosk up and your key in its authorizedKeys? (ssh root@HOST)"


# ---------------------------------------------------------------- asking the device

def _login(args) -> str:
    return f"ssh {f'-p {args.port} ' if args.port else ''}root@{args.host}"


def older(said: str) -> bool:
    """Whether a kiosk's error output says it has no `kiosk status --here` (it is older than this one)."""
    return "invalid choice: 'status'" in said or "unrecognized arguments: --here" in said


def read_answer(text: str) -> dict | None:
    """The device's `kiosk status --here --json` with each field of its type (_well_typed), or None when the
    text is not such an answer (no JSON, another format)."""
    from kiosk.device.facts import FORMAT

    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    return _well_typed(data)


def ask(args) -> dict:
    """The device's `kiosk status --here --json`, or a one-line KioskError saying why not (exit 1)."""
    ssh = reach.from_args(args)
    proc = run([*ssh, REMOTE], check=False, timeout=300, what="ssh", hint=HINT)
    said = proc.stderr + proc.stdout
    if proc.returncode != 0:
        problem = reach.ssh_problem(said, host=args.host, port=args.port, login=_login(args))
        if problem:
            raise KioskError(f"{args.host}: {problem[0]}: {problem[1]}", hint=HINT)
        if older(said):
            raise KioskError(f"{args.host}: its kiosk has no `kiosk status --here` (it is older than this one)",
                             hint="ssh root@HOST kiosk generations says its generations")
        if proc.returncode == 127:
            raise KioskError(f"{args.host}: has no `kiosk` command: is it a kiosk?", hint=HINT)
        lines = [line for line in said.splitlines() if line.strip()]
        raise KioskError(f"{args.host}: `{REMOTE}` failed there (exit {proc.returncode}): "
                         f"{one_line(lines[-1])[:300] if lines else 'no output'}", hint=HINT)
    data = read_answer(proc.stdout)
    if data is None:
        raise KioskError(f"{args.host}: its `kiosk status --here --json` printed nothing this kiosk can read",
                         hint="is kiosk on the device as new as this one?")
    return data


FIELDS = {"hostName": str, "board": str, "kioskVersion": str, "uptimeSeconds": (int, float), "generation": dict,
          "health": str, "units": dict, "slots": dict, "debian": dict, "packages": list, "problems": list}


def _well_typed(data: dict) -> dict:
    """The device's answer with each field of the type kiosk.device.facts gives it, else null and a problem
    said (a damaged answer is shown as such, never a traceback); packages only as [name, version, arch]."""
    problems = [one_line(str(p)) for p in data.get("problems") or [] if isinstance(p, str)] \
        if isinstance(data.get("problems"), list) else ["problems: not a list"]
    out = {"format": data["format"]}
    for name, kind in FIELDS.items():
        value = data.get(name)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            problems.append(f"{name}: the device's answer has {type(value).__name__}, not what kiosk status reads")
            value = None
        out[name] = value
    if out["packages"] is not None:
        out["packages"] = [p for p in out["packages"]
                           if isinstance(p, list) and len(p) == 3 and all(isinstance(x, str) for x in p)]
    out["problems"] = problems
    return out


# ---------------------------------------------------------------- what the archive has newer

def _debian(section) -> dict:
    """The device's `debian` section, its text and switch fields only (the device validated the spec when it
    was pushed; this side uses the mirrors only as URLs to fetch)."""
    return {k: v for k, v in section.items() if isinstance(v, (str, bool))} if isinstance(section, dict) else {}


def behind(packages, versions: dict[str, str], arch: str) -> list[dict]:
    """Installed packages (name, version, architecture) of `arch` or all that `versions` has newer."""
    from kiosk.spec.debversion import newer

    out = []
    for name, version, pkg_arch in packages:
        available = versions.get(name)
        if pkg_arch in (arch, "all") and available and newer(available, version):
            out.append({"name": name, "installed": version, "available": available})
    return out


class SuiteIndexes:
    """The archive's versions of each (mirror, suite, architecture), fetched once for a whole run: the first
    device that needs an index starts its fetch, every other device of the run (a fleet of 100 on one
    bookworm-security) waits for that same fetch and shares its index or its failure. Fetches of different
    indexes run at once. A context manager: leaving it waits for the fetches still running (each has the
    archive's deadline, KIOSK_ARCHIVE_TIMEOUT)."""

    def __init__(self, deadline: float | None = None, fetch=None):
        from kiosk.spec.archive import suite_versions

        self._fetch = fetch or suite_versions
        self._deadline = deadline
        self._lock = threading.Lock()
        self._jobs: dict[tuple[str, str, str], Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=2 * len(KINDS), thread_name_prefix="kiosk-suite-index")

    def get(self, mirror: str, suite: str, arch: str) -> Future:
        """The fetch of this index (started now if no device asked for it before)."""
        key = (mirror, suite, arch)
        with self._lock:
            if key not in self._jobs:
                self._jobs[key] = self._pool.submit(self._fetch, mirror, suite, arch, deadline=self._deadline)
            return self._jobs[key]

    def start(self, rows: list[dict], arch: str | None) -> list[tuple[dict, Future]]:
        """The fetches the rows still to count (suites(): state "checked") need, started."""
        return [(row, self.get(row["mirror"], row["suite"], arch)) for row in rows if row["state"] == "checked"]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True)


def suites(packages, debian: dict, arch: str | None, *, no_arch: str = NO_BOARD) -> list[dict]:
    """One row per kind (security, updates), before the archive is asked: {"kind", "suite", "mirror", "state",
    "note", "fetched", "packages"}. state: checked (to count: count()), off (not in the device's sources),
    unknown (the device did not say its packages or its board)."""
    from kiosk.spec.sources import NO_SECURITY_SUITES, apt_sources

    sources = apt_sources(debian)
    suite = sources[0][1]
    enabled = {name: mirror for mirror, name in sources[1:]}
    rows = []
    for kind in KINDS:
        name = f"{suite}-{kind}"
        row = {"kind": kind, "suite": name, "mirror": enabled.get(name), "state": "checked", "note": "",
               "fetched": None, "packages": []}
        if name not in enabled:
            row.update(state="off", note=f"{suite} has no {kind} suite" if suite in NO_SECURITY_SUITES
                       else f"off in the device's spec (/debian/{kind} is false)")
        elif packages is None:
            row.update(state="unknown", note="the device did not say which packages it has")
        elif arch is None:
            row.update(state="unknown", note=no_arch)
        rows.append(row)
    return rows


def count(rows: list[dict], packages, arch: str | None, indexes: SuiteIndexes) -> list[dict]:
    """The rows with their pending packages filled in from the archive's indexes (through `indexes`, so a
    fleet fetches each once). A row whose index cannot be had becomes none (the mirror publishes no such
    suite for this architecture) or unavailable (offline, mirror down, too slow: the archive's reason)."""
    from kiosk.spec.archive import ArchiveUnavailable, NotPublished

    for row, job in indexes.start(rows, arch):
        try:
            index = job.result()
        except NotPublished:
            row.update(state="none", note=f"no {row['kind']} suite for {arch} ({row['mirror']} publishes "
                                          f"no {row['suite']} for it)")
        except (ArchiveUnavailable, OSError) as exc:   # OSError: the cache could not be written
            row.update(state="unavailable", note=f"archive unavailable: {one_line(str(exc))[:200]}")
        else:
            row.update(fetched=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(index.fetched)),
                       packages=behind(packages, index.versions, arch))
    return rows


def pending(packages, debian: dict, arch: str | None, *, deadline: float | None = None,
            no_arch: str = NO_BOARD) -> list[dict]:
    """One device's rows (suites(), then count()): security and updates fetched at once."""
    with SuiteIndexes(deadline) as indexes:
        return count(suites(packages, debian, arch, no_arch=no_arch), packages, arch, indexes)


def architecture(board) -> tuple[str | None, str]:
    """(the Debian architecture of the device's board, "") or (None, why it is not known)."""
    from kiosk.spec.hardware import board_names, load_board

    if board in board_names():   # a name from the device, never a path
        return load_board(board)["architecture"], ""
    if board:
        return None, f"this kiosk does not know the board {one_line(str(board))[:60]!r}: update kiosk here"
    return None, NO_BOARD


def compare(facts: dict, indexes: SuiteIndexes) -> tuple[str | None, list[dict]]:
    """(architecture, suites() rows) of a device's answer, their fetches started through `indexes`;
    count() the rows once the run has asked every device."""
    arch, no_arch = architecture(facts.get("board"))
    rows = suites(facts.get("packages"), _debian(facts.get("debian")), arch, no_arch=no_arch)
    indexes.start(rows, arch)
    return arch, rows


# ---------------------------------------------------------------- telling it

def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "unknown"
    minutes, hours, days = int(seconds) // 60 % 60, int(seconds) // 3600 % 24, int(seconds) // 86400
    if days:
        return f"{days} d {hours} h {minutes} min"
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {int(seconds) % 60} s"


def _slot_line(slots) -> str:
    if slots is None:
        return "unknown (see problems)"
    booted = slots.get("booted")
    if not booted:
        return NO_SLOTS
    parts = []
    for name, slot in sorted(slots.get("slots", {}).items(), key=lambda item: item[0] != booted):
        text = slot.get("state", "unknown")
        if slot.get("version"):
            text += f", system {slot['version']}"
        if slot.get("reason"):
            text += f" ({slot['reason']})"
        parts.append(f"{name} runs: {text}" if name == booted else f"other slot {name}: {text}")
    trial = slots.get("trial")
    if isinstance(trial, dict) and isinstance(trial.get("commit"), str):
        commit, where = trial["commit"][:12], f"slot {trial.get('slot')}"
        parts.append(f"the try of commit {commit} in {where} failed ({trial.get('reason') or 'no reason'})"
                     if trial.get("state") == "failed" else f"trying commit {commit} in {where} ({trial.get('state')})")
    return "; ".join(parts)


def _generation_line(gen) -> str:
    if not gen or gen.get("number") is None:
        return "none"
    text = f"{gen['number']}, commit {(gen.get('commit') or '-')[:12]} ({gen.get('status') or 'unknown'}"
    text += f": {gen['reason']})" if gen.get("reason") else ")"
    if gen.get("default") != gen.get("number"):
        text += f"; generation {gen.get('default')} boots next"
    return text


def _pending_line(row: dict) -> str:
    if row["state"] != "checked":
        return row["note"]
    count = len(row["packages"])
    return (f"{count or 'none'} pending in {row['suite']} ({row['mirror']}, index of {row['fetched']})")


def uncounted(rows: list[dict]) -> bool:
    """Whether a suite the device uses could not be compared (its index unavailable, or the device did not say
    its packages or board): then no count is given."""
    return any(row["state"] in ("unavailable", "unknown") for row in rows)


def slots_word(slots) -> str:
    """The root slots in a table cell of many devices: the booted slot and its state, the other's in brackets
    ("A good (B empty)"); "-" on a board with one root partition; "?" when the device could not say."""
    if not isinstance(slots, dict) or not isinstance(slots.get("slots", {}), dict):
        return "?"
    booted = slots.get("booted")
    if not booted:
        return "-"
    states = {str(name): str(slot.get("state") or "unknown").split(" (")[0] if isinstance(slot, dict) else "unknown"
              for name, slot in slots.get("slots", {}).items()}
    others = ", ".join(f"{name} {state}" for name, state in sorted(states.items()) if name != booted)
    return f"{booted} {states.get(booted, 'unknown')}" + (f" ({others})" if others else "")


def pending_word(pending: dict | None) -> str:
    """The pending fixes in a table cell of many devices: their count; "?" when the archive could not be asked
    for a suite the device uses; "-" when there is nothing to count (no answer, the device did not say its
    packages or board, both suites off or not published for its architecture)."""
    states = {row["state"] for row in (pending or {}).get("suites") or []}
    if "unavailable" in states:
        return "?"
    if "checked" not in states or pending["count"] is None:
        return "-"
    return str(pending["count"])


def view(host: str, facts: dict, rows: list[dict] | None, arch: str | None) -> dict:
    """What --json prints."""
    packages = facts.get("packages")
    names = {p["name"] for row in rows or [] for p in row["packages"]}
    return {"host": host, "hostName": facts.get("hostName"), "board": facts.get("board"), "architecture": arch,
            "kioskVersion": facts.get("kioskVersion"), "uptimeSeconds": facts.get("uptimeSeconds"),
            "slots": facts.get("slots"), "generation": facts.get("generation"), "health": facts.get("health"),
            "units": facts.get("units"), "installedPackages": len(packages) if packages is not None else None,
            "pending": None if rows is None else {"count": None if uncounted(rows) else len(names), "suites": rows},
            "problems": facts.get("problems") or []}


def table(data: dict, *, verbose: bool = False) -> str:
    """The short human form: one line per field, and with verbose every pending package."""
    units = data.get("units") or {}
    health = data.get("health") or "unknown (see problems)"
    if units and health == "ok":
        health += " (" + ", ".join(f"{u} {s}" for u, s in units.items()) + ")"
    installed = data.get("installedPackages")
    lines = [
        ("host", f"{data.get('hostName') or '?'} at {data['host']} (kiosk {data.get('kioskVersion') or '?'})"),
        ("board", f"{data.get('board') or 'unknown'}" + (f" ({data['architecture']})" if data.get("architecture") else "")),
        ("slots", _slot_line(data.get("slots"))),
        ("generation", _generation_line(data.get("generation"))),
        ("uptime", _duration(data.get("uptimeSeconds"))),
        ("health", health),
        ("packages", "unknown (see problems)" if installed is None else f"{installed} installed"),
    ]
    suites = (data.get("pending") or {}).get("suites")
    if suites is None:
        lines.append(("pending", "not checked on the device (kiosk status HOST from another machine compares "
                                 "its packages with the archive)"))
    for row in suites or []:
        lines.append((row["kind"], _pending_line(row)))
    for problem in data.get("problems") or []:
        lines.append(("problem", problem))
    width = max(len(key) for key, _ in lines)
    out = [f"{key:<{width}}  {one_line(str(value))}" for key, value in lines]
    if verbose:
        for row in suites or []:
            for p in row["packages"]:
                out.append(one_line(f"  {p['name']} {p['installed']} -> {p['available']} ({row['suite']})"))
    return "\n".join(out)


def cmd_status(args) -> int:
    from kiosk.core.paths import device_root

    if args.here:
        if args.host:
            raise UsageError("--here is the kiosk's own status: give HOST or --here, not both")
        from kiosk.device.facts import RELEASE, gather

        root = device_root()
        if not (root / RELEASE).is_file():
            raise UsageError(f"this machine is not a kiosk (no /{RELEASE})",
                             hint="on your computer: kiosk status HOST")
        facts = gather(root)
        if args.json:
            print(json.dumps(facts, indent=1, ensure_ascii=False))
            return 0
        data = view("localhost", facts, None, None)
    else:
        if not args.host:
            raise UsageError("give the kiosk: kiosk status HOST (its name, e.g. lobby.local, or address)")
        facts = ask(args)
        with SuiteIndexes() as indexes:
            arch, rows = compare(facts, indexes)
            count(rows, facts["packages"], arch, indexes)
        data = view(args.host, facts, rows, arch)
    if args.json:
        print(json.dumps(data, indent=1, ensure_ascii=False))
    else:
        print(table(data, verbose=args.verbose))
    return 0 if data.get("health") == "ok" else 1


def register(sub) -> None:
    p = sub.add_parser("status", help="one kiosk at a glance: board, slots, generation, uptime, health, pending "
                                      "security and stable updates",
                       description="Ask the kiosk over ssh (one fixed command) for its board, root slots (the one "
                                   "running and the other's state), current generation and commit, uptime, health "
                                   "(kiosk.service, kiosk-agent.service, the generation) and installed packages; then "
                                   "count here the packages Debian's <suite>-security and <suite>-updates have newer "
                                   "versions of, from the mirrors of the kiosk's own spec (indexes cached for a day; "
                                   "an unreachable archive is said in its row). Exit 0 when the kiosk answered and is "
                                   "healthy, 1 when it cannot be reached or is not healthy, 2 for bad usage.")
    reach.add_arguments(p, optional=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="list every pending package: installed version -> available version (suite)")
    p.add_argument("--here", action="store_true",
                   help="on the kiosk itself: its own status, without the archive check (with --json: what "
                        "kiosk status HOST reads over ssh)")
    p.set_defaults(func=cmd_status)
