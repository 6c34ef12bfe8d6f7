"""What a kiosk says about itself for `kiosk status HOST`, in one answer (`kiosk status --here --json`).

One ssh round trip carries everything the user's machine needs: the board, the root slots and their
verdicts, the current generation and its commit, uptime, the health of the kiosk's units, the `debian`
section of the spec it runs (its mirrors and suites; not the whole spec, which holds Wi-Fi passwords) and
its installed packages. Comparing those packages with Debian's security and
updates suites happens on the user's machine: a 512 MB Pi 0 must not download and parse package indexes.

A part that cannot be read (no rauc, no dpkg, a damaged record) is a line in "problems" and that field is
null; the rest is still said.
"""

from __future__ import annotations

import json
from pathlib import Path

from kiosk import __version__
from kiosk.core.errors import KioskError, one_line
from kiosk.core.files import read_json
from kiosk.core.run import run
from kiosk.device import activation, screen, slots, system
from kiosk.device.commands import generation_health, generations_data
from kiosk.device.store import current, repo_dir

FORMAT = 1            # the answer's layout; kiosk status refuses one it does not know
RELEASE = "etc/kiosk/release.json"
DPKG_FORMAT = "${Package}\\t${Version}\\t${Architecture}\\t${db:Status-Abbrev}\\n"


def _release(root: Path) -> dict:
    data = read_json(root / RELEASE)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _spec_text(root: Path) -> str:
    """The nixiosk.json on configuration.git's main (what the device runs, or the commit being tried); the
    current generation's copy when git cannot say."""
    proc = run(["git", f"--git-dir={repo_dir(root)}", "show", "main:nixiosk.json"], drop_env=("GIT_",),
               check=False, timeout=60, what="git show main:nixiosk.json")
    if proc.returncode == 0:
        return proc.stdout
    gen = current(root)
    if gen is None:
        raise KioskError(f"configuration.git has no main:nixiosk.json ({one_line(proc.stderr.strip())[:200]}), "
                         "and there is no current generation")
    return gen.spec_text


def debian_section(spec_text: str) -> dict:
    """The spec's `debian` section ({} when it has none): where this device's apt takes packages from."""
    data = json.loads(spec_text)
    section = data.get("debian") if isinstance(data, dict) else None
    return section if isinstance(section, dict) else {}


def installed_packages(root: Path) -> list[list[str]]:
    """[name, version, architecture] of every installed package, from dpkg's own database."""
    if not (Path(root) / "var/lib/dpkg/status").is_file():   # dpkg-query would list nothing and succeed
        raise KioskError("no dpkg database (/var/lib/dpkg/status): the installed packages are not known")
    admin = [] if Path(root).resolve() == Path("/") else [f"--admindir={root}/var/lib/dpkg"]
    out = run(["dpkg-query", *admin, "-W", "-f", DPKG_FORMAT], timeout=120, what="dpkg-query").stdout
    packages = []
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) == 4 and fields[3][1:2] == "i":   # installed (not half-configured, not removed), held or not
            packages.append(fields[:3])
    return sorted(packages)


def _uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


def _health(root: Path, generations: dict | None) -> tuple[str, dict]:
    """(health, each unit's state): "ok" when the current generation is active and kiosk.service and
    kiosk-agent.service are active; else what is not. A kiosk switched off on purpose (kiosk screen off) is
    not a problem."""
    units = list(activation.HEALTH_UNITS)
    states = activation.from_env(root).states(units)
    states = {unit: states.get(unit, "unknown") for unit in units}
    problems = []
    if generations is not None:
        health = generation_health(generations)[2]
        if health != "ok":
            problems.append(f"generation: {health}")
    off_by = screen.who_switched_off(root)
    for unit, state in states.items():
        if state == "active":
            continue
        if unit == activation.PROGRAM_UNIT and off_by:
            states[unit] = f"{state}, the screen is switched off ({off_by})"
            continue
        problems.append(f"{unit} {state}")
    return ("ok" if not problems else "; ".join(problems)), states


def gather(root: Path, *, cmdline: str | None = None) -> dict:
    """Everything kiosk status HOST shows that the device knows (see the module's docstring)."""
    problems: list[str] = []

    def attempt(what: str, fn):
        try:
            return fn()
        except (KioskError, OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{what}: {one_line(str(exc))[:300]}")
            return None

    release = attempt("release.json", lambda: _release(root)) or {}
    generations = attempt("generations", lambda: generations_data(root))
    gen = None
    if generations is not None:
        number, commit, _ = generation_health(generations)
        row = next((g for g in generations["generations"] if g["number"] == generations["current"]), {})
        gen = {"number": generations["current"], "commit": None if commit == "-" else commit,
               "status": row.get("status"), "reason": row.get("reason") or "", "default": generations["default"]}
    health, units = attempt("health", lambda: _health(root, generations)) or (None, {})
    if cmdline is None:
        cmdline = attempt("/proc/cmdline", lambda: Path("/proc/cmdline").read_text()) or ""
    root_slots = attempt("slots", lambda: slots.summary(root, cmdline))
    trial = attempt("trial.json", lambda: system.read_trial(root))
    if root_slots is not None and trial:   # a push's new system being tried (device/system.py)
        root_slots["trial"] = {k: trial.get(k) for k in ("commit", "slot", "state", "reason")}
    return {
        "format": FORMAT,
        "hostName": release.get("hostName"),
        "board": release.get("hardware"),
        "kioskVersion": __version__,
        "uptimeSeconds": attempt("uptime", _uptime),
        "generation": gen,
        "health": health,
        "units": units,
        "slots": root_slots,
        "debian": attempt("nixiosk.json", lambda: debian_section(_spec_text(root))),
        "packages": attempt("installed packages", lambda: installed_packages(root)),
        "problems": problems,
    }
