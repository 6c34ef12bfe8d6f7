"""The small interface to the service manager: what a switch asks systemd to do.

A switch between generations computes an activation Plan from the two layer
manifests (which units to stop, start, restart, reload; commands to run; what
only takes effect at the next boot) and hands it to an Activator:

- SystemdActivator calls the real `systemctl` (only ever on the device itself:
  it is chosen only when the device root is "/").
- RecordingActivator keeps every call in a JSON file and can be told that a
  unit fails, so tests (and the git hooks the tests drive over SSH) exercise
  the whole switch and rollback machinery without a running systemd.
- NullActivator does nothing: the default for a device root that is not "/"
  (an image tree, a test directory), so nothing can ever touch the host.

KIOSK_ACTIVATOR selects one explicitly: "systemd", "none" or "recording:<path>".
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from kiosk.core.errors import KioskError
from kiosk.core.paths import STATE, number_setting, setting
from kiosk.core.run import CompletedProcess, run as run_command  # SystemdActivator.run is a method

UNIT_DIR = "/etc/systemd/system"
DEFAULT_TARGET = f"{UNIT_DIR}/default.target"
UNIT_SUFFIXES = (".service", ".socket", ".target", ".timer", ".path", ".mount")
# The kiosk itself and the device agent: every switch checks that both come up and stay up.
HEALTH_UNITS = ("kiosk.service", "kiosk-agent.service")
PROGRAM_UNIT = "kiosk.service"   # cage, whose child is the program: healthy once that has started and stays
DEFAULT_SETTLE_SECONDS = 4.0

# Configuration files that services read at start: (path or prefix, action, argument).
# Actions: restart/try-restart/reload a unit, run a command, or "boot" (takes effect at the next boot).
FILE_ACTIONS: tuple[tuple[str, str, str], ...] = (
    ("/etc/hostname", "hostname", ""),
    ("/etc/ssh/", "reload", "ssh.service"),
    ("/etc/wpa_supplicant/wpa_supplicant-wlan0.conf", "restart", "wpa_supplicant@wlan0.service"),
    ("/etc/systemd/network/", "try-restart", "systemd-networkd.service"),
    ("/etc/systemd/resolved.conf.d/", "try-restart", "systemd-resolved.service"),
    ("/etc/sysusers.d/", "restart", "systemd-sysusers.service"),
    ("/etc/tmpfiles.d/", "restart", "systemd-tmpfiles-setup.service"),
    ("/etc/locale.gen", "restart", "kiosk.service"),  # render's kiosk-locale.service regenerates it
    ("/etc/default/locale", "restart", "kiosk.service"),
    ("/etc/localtime", "restart", "kiosk.service"),
    ("/etc/timezone", "restart", "kiosk.service"),
    ("/etc/kiosk/program.json", "restart", "kiosk.service"),
    ("/etc/kiosk/firmware/", "boot", "the display mode (an EDID the display driver reads when it starts)"),
    ("/etc/udev/rules.d/", "boot", "udev rules (the touchscreen's output)"),
    ("/etc/systemd/system.conf.d/", "boot", "systemd's manager settings (the watchdog)"),
    ("/etc/modprobe.d/", "boot", "the Wi-Fi regulatory domain (cfg80211 module option)"),
    # the switch rewrites config.txt/cmdline.txt from these (device/bootconfig.py); the firmware reads them at boot
    ("/etc/default/raspi-", "boot", "firmware settings (config.txt/cmdline.txt rewritten now, read at the next boot)"),
    ("/etc/default/kiosk-cmdline", "boot", "the kernel's arguments (cmdline.cfg rewritten now, read by GRUB at the next boot)"),
    ("/etc/plymouth/", "boot", "the boot splash"),
    (DEFAULT_TARGET, "boot", "the default target"),
)


@dataclass
class Plan:
    """What activating generation B after generation A means for the running system."""

    daemon_reload: bool = False
    stop: list[str] = field(default_factory=list)
    start: list[str] = field(default_factory=list)
    restart: list[str] = field(default_factory=list)
    try_restart: list[str] = field(default_factory=list)
    reload: list[str] = field(default_factory=list)
    hostname: str | None = None
    commands: list[list[str]] = field(default_factory=list)
    at_boot: list[str] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.daemon_reload or self.stop or self.start or self.restart or self.try_restart
                    or self.reload or self.hostname or self.commands)

    def touched_units(self) -> list[str]:
        """Units this activation (re)starts: each must come up healthy."""
        return sorted(u for u in {*self.start, *self.restart, *self.reload} if "*" not in u)

    def lines(self) -> list[str]:
        out = []
        for label, units in (("stop", self.stop), ("start", self.start), ("restart", self.restart),
                             ("restart if running", self.try_restart), ("reload", self.reload)):
            if units:
                out.append(f"units to {label}: {', '.join(units)}")
        if self.hostname:
            out.append(f"host name: {self.hostname}")
        for argv in self.commands:
            out.append(f"run: {' '.join(argv)}")
        for what in self.at_boot:
            out.append(f"at the next boot: {what}")
        return out


def unit_of(path: str) -> str | None:
    """The unit a path under /etc/systemd/system configures (its file, a drop-in, or a mask); else None.

    Template units map to a glob of their instances ("getty@*.service")."""
    if not path.startswith(UNIT_DIR + "/"):
        return None
    rest = path[len(UNIT_DIR) + 1:]
    parts = rest.split("/")
    if len(parts) == 1 and parts[0].endswith(UNIT_SUFFIXES):
        name = parts[0]
    elif len(parts) == 2 and parts[0].endswith(tuple(s + ".d" for s in UNIT_SUFFIXES)):
        name = parts[0][:-2]
    else:
        return None
    return name.replace("@.", "@*.") if "@." in name else name


def wanted_unit(path: str) -> str | None:
    """The unit a <target>.wants/ or .requires/ symlink enables, else None."""
    parent, _, name = path.rpartition("/")
    if parent.startswith(UNIT_DIR + "/") and parent.endswith((".wants", ".requires")) and name.endswith(UNIT_SUFFIXES):
        return name
    return None


def _shell_changes(new_text: str, old_text: str) -> list[list[str]]:
    """usermod commands for sysusers `u` lines whose shell differs between two sysusers.d files."""
    import shlex

    def shells(text):
        out = {}
        for line in text.splitlines():
            with contextlib.suppress(ValueError):
                fields = shlex.split(line, comments=True)
                if len(fields) >= 6 and fields[0] == "u":
                    out[fields[1]] = fields[5]
        return out

    before, after = shells(old_text), shells(new_text)
    return [["usermod", "--shell", shell, user] for user, shell in sorted(after.items())
            if user in before and before[user] != shell]


def plan(old: dict, new: dict, *, reloadable=frozenset({"ssh.service"}), new_texts: dict | None = None,
         old_texts: dict | None = None) -> Plan:
    """The activation plan between two layer manifests ({path: {kind, sha256, target, mode, ...}}).

    new_texts: path -> text of the new generation's files (unit files: ExecReload= means reload, not
    restart; /etc/hostname: the new host name; sysusers.d: login shells); old_texts: the old generation's.
    """
    p = Plan()
    changed = sorted(path for path in set(old) | set(new) if old.get(path) != new.get(path))
    enabled_old = {u for u in map(wanted_unit, old) if u}
    enabled_new = {u for u in map(wanted_unit, new) if u}
    restart: set[str] = set()
    try_restart: set[str] = set()
    reload: set[str] = set()
    stop: set[str] = set()
    commands: list[list[str]] = []
    at_boot: list[str] = []
    texts = new_texts or {}
    old_texts = old_texts or {}

    for path in changed:
        unit = unit_of(path)
        if path == DEFAULT_TARGET:
            unit = None  # which target boots is for the next boot (FILE_ACTIONS says so)
        elif unit or wanted_unit(path):
            p.daemon_reload = True
        if unit:
            entry = new.get(path)
            is_unit_file = path.count("/") == UNIT_DIR.count("/") + 1
            was = old.get(path) or {}
            if entry and entry.get("kind") == "symlink" and entry.get("target") == "/dev/null":
                stop.add(unit)  # newly masked
            elif entry is None and was.get("target") == "/dev/null":
                pass  # unmasked: it starts when something wants it (a .wants link, the next boot)
            elif entry is None and is_unit_file and was.get("kind") == "file" and "*" not in unit:
                stop.add(unit)  # its unit file went away (a mask going away stops nothing)
            elif unit in enabled_new and "*" not in unit:
                text = texts.get(f"{UNIT_DIR}/{unit}", "")
                (reload if "\nExecReload=" in text or unit in reloadable else restart).add(unit)
            elif unit in reloadable:
                reload.add(unit)
            else:
                try_restart.add(unit)
        for prefix, action, arg in FILE_ACTIONS:
            if not (path == prefix or (prefix.endswith(("/", "-")) and path.startswith(prefix))):
                continue
            if action == "restart":
                restart.add(arg)
            elif action == "try-restart":
                try_restart.add(arg)
            elif action == "reload":
                reload.add(arg)
            elif action == "command" and [arg] not in commands:
                commands.append([arg])
            elif action == "boot" and arg not in at_boot:
                at_boot.append(arg)
            elif action == "hostname" and path in new:
                p.hostname = texts.get(path, "").strip() or None
        if path.startswith("/etc/sysusers.d/") and path in new:
            # systemd-sysusers only creates users: a changed login shell (allowKioskLogin) needs usermod
            for argv in _shell_changes(texts.get(path, ""), old_texts.get(path, "")):
                if argv not in commands:
                    commands.append(argv)
    stop |= enabled_old - enabled_new
    start = enabled_new - enabled_old
    restart -= start | stop
    # a unit restarted anyway needs no reload or try-restart; a stopped one nothing else
    reload -= restart | start | stop
    try_restart -= restart | start | stop | reload
    p.stop, p.start = sorted(stop), sorted(start)
    p.restart, p.try_restart, p.reload = sorted(restart), sorted(try_restart), sorted(reload)
    p.commands, p.at_boot = commands, at_boot
    return p


# ---------------------------------------------------------------- activators

class Activator:
    """What a switch may ask of the service manager. Every method raises ActivationFailed on failure."""

    name = "abstract"

    def daemon_reload(self) -> None: ...
    def stop(self, units: list[str]) -> None: ...
    def start(self, units: list[str]) -> None: ...
    def restart(self, units: list[str]) -> None: ...
    def try_restart(self, units: list[str]) -> None: ...
    def reload(self, units: list[str]) -> None: ...
    def set_hostname(self, name: str) -> None: ...
    def run(self, argv: list[str]) -> None: ...
    def boot_reconcile(self) -> None:
        """At boot, after the recovery changed links: reload units and re-enqueue the default target."""

    def reboot_soon(self) -> None:
        """Restart the device a few seconds from now (after git has told the pusher what happens)."""

    def health(self, units: list[str], settle: float) -> list[str]:
        """Problems (one line each) with `units` over `settle` seconds; [] when all came up and stayed up."""
        return []

    def states(self, units: list[str]) -> dict[str, str]:
        """Each unit's state now, at one look ("active", "failed", "inactive (dead)", ...): kiosk status.
        A unit this activator cannot see is left out."""
        return {}


class ActivationFailed(KioskError):
    pass


class NullActivator(Activator):
    name = "none"


class SystemdActivator(Activator):
    """The real thing: systemctl on the running device."""

    name = "systemd"

    def __init__(self, systemctl: str = "systemctl", timeout: float = 120.0):
        self.systemctl = systemctl
        self.timeout = timeout

    def _run(self, *args: str, check: bool = True) -> CompletedProcess:
        return run_command([self.systemctl, *args], check=check, timeout=self.timeout, error=ActivationFailed,
                           tail=5)

    def daemon_reload(self) -> None:
        self._run("daemon-reload")

    def stop(self, units):
        if units:
            self._run("stop", *units)

    def start(self, units):
        if units:
            self._run("start", *units)

    def restart(self, units):
        if units:
            self._run("restart", *units)

    def try_restart(self, units):
        if units:
            self._run("try-restart", *units)

    def reload(self, units):
        if units:
            self._run("reload-or-restart", *units)

    def set_hostname(self, name):
        import socket
        try:
            socket.sethostname(name)
        except OSError as exc:
            raise ActivationFailed(f"cannot set the host name to {name}: {exc.strerror}") from None

    def run(self, argv):
        run_command(argv, timeout=self.timeout, error=ActivationFailed, tail=5)

    def boot_reconcile(self):
        self._run("daemon-reload")
        self._run("--no-block", "start", "default.target", check=False)

    def reboot_soon(self):
        # A transient timer: post-receive ends and git's connection closes before the restart begins.
        self.run(["systemd-run", "--on-active=3", "--timer-property=AccuracySec=100ms", "--unit=kiosk-trial-reboot",
                  "--description=kiosk: restart into the slot a push installed", self.systemctl, "reboot"])

    def _show(self, units: list[str]) -> dict[str, dict[str, str]]:
        props = ("Id,LoadState,ActiveState,SubState,Result,NRestarts,ExecMainStartTimestampMonotonic,ExecMainStatus,"
                 "MainPID")
        proc = self._run("show", "-p", props, "--", *units, check=False)
        out, current = {}, {}
        for unit, block in zip(units, proc.stdout.split("\n\n")):
            current = dict(line.split("=", 1) for line in block.strip().splitlines() if "=" in line)
            out[unit] = current
        return out

    def _wait_for_program(self, unit: str, first: dict, settle: float) -> tuple[dict, str | None]:
        """Until cage has started the program (the unit's main process has a child): a slow board (a Pi 0,
        or one under TCG) takes many seconds to get there, and a program that dies at once must be seen
        dying, not an unfinished cage taken for health. Returns (the unit's state then, a problem or None)."""
        deadline = time.monotonic() + program_start_seconds()
        while True:
            now = self._show([unit]).get(unit, {})
            problem = _compare(unit, first, now, settle)
            if problem or now.get("ActiveState") not in ("active", "activating", "reloading"):
                return now, problem
            if _has_child(now.get("MainPID", "0")):
                return now, None
            if time.monotonic() > deadline:
                return now, f"{unit}: the program did not start within {program_start_seconds():.0f}s"
            time.sleep(0.5)

    def states(self, units):
        out = {}
        for unit, props in (self._show(units) if units else {}).items():
            if not props:   # systemctl said nothing of it
                continue
            if props.get("LoadState") != "loaded":
                out[unit] = f"not loaded ({props.get('LoadState') or 'unknown'})"
            elif props.get("ActiveState") == "active":
                out[unit] = "active"
            else:
                out[unit] = f"{props.get('ActiveState') or 'unknown'} ({props.get('SubState') or '?'})"
        return out

    def health(self, units, settle):
        if not units:
            return []
        first = self._show(units)
        problems = {}
        if PROGRAM_UNIT in units:
            first[PROGRAM_UNIT], problem = self._wait_for_program(PROGRAM_UNIT, first.get(PROGRAM_UNIT, {}), settle)
            if problem:
                problems[PROGRAM_UNIT] = problem
        time.sleep(settle)
        second = self._show(units)
        for unit in units:
            a, b = first.get(unit, {}), second.get(unit, {})
            if unit in problems:
                continue
            if b.get("LoadState") != "loaded":
                problems[unit] = f"{unit}: not loaded ({b.get('LoadState', 'unknown')})"
            elif b.get("ActiveState") != "active":
                problems[unit] = (f"{unit}: {b.get('ActiveState')} ({b.get('SubState')}), result {b.get('Result')}, "
                                  f"exit status {b.get('ExecMainStatus')}")
            elif problem := _compare(unit, a, b, settle):
                problems[unit] = problem
        return [problems[u] for u in units if u in problems]


def _compare(unit: str, a: dict, b: dict, settle: float) -> str | None:
    """A restart between two looks at a unit (systemd restarted it: its program exited)."""
    if a.get("NRestarts") != b.get("NRestarts") or \
            a.get("ExecMainStartTimestampMonotonic") != b.get("ExecMainStartTimestampMonotonic"):
        return (f"{unit}: restarted {int(b.get('NRestarts') or 0) - int(a.get('NRestarts') or 0)} "
                f"time(s) within {settle:.0f}s (the program exits at once)")
    return None


def _has_child(pid: str) -> bool:
    """Whether process `pid` has a child (cage's is the kiosk program), from /proc."""
    if not pid.isdigit() or pid == "0":
        return False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        if len(fields) > 1 and fields[1] == pid:
            return True
    return False


class RecordingActivator(Activator):
    """Records every call in a JSON file; fails units as the file says. For tests.

    The file: {"calls": [[method, arg], ...], "fail": [{"unit": U, "reason": R, "when": TEXT}]}.
    A "fail" rule applies to health checks of U (and to starting it) while the running generation's
    nixiosk.json contains TEXT (always when "when" is absent). The file is locked around each change,
    so concurrent switches (which the device lock serialises anyway) never lose a record.
    """

    name = "recording"

    def __init__(self, path: Path, root: Path):
        self.path = Path(path)
        self.root = Path(root)

    def _update(self, fn):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.seek(0)
            text = f.read()
            data = json.loads(text) if text.strip() else {}
            result = fn(data)
            f.seek(0)
            f.truncate()
            f.write(json.dumps(data, indent=1))
            f.flush()
            os.fsync(f.fileno())
            return result

    def record(self, method: str, arg=None) -> None:
        self._update(lambda d: d.setdefault("calls", []).append([method, arg]))

    def _failing(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            data = {}
        try:
            spec_text = (self.root / STATE / "current/nixiosk.json").read_text()
        except OSError:
            spec_text = ""
        return {rule["unit"]: rule.get("reason", "failed") for rule in data.get("fail", [])
                if rule.get("when") is None or rule["when"] in spec_text}

    def daemon_reload(self):
        self.record("daemon-reload")

    def stop(self, units):
        if units:
            self.record("stop", list(units))

    def start(self, units):
        if units:
            self.record("start", list(units))

    def restart(self, units):
        if units:
            self.record("restart", list(units))

    def try_restart(self, units):
        if units:
            self.record("try-restart", list(units))

    def reload(self, units):
        if units:
            self.record("reload", list(units))

    def set_hostname(self, name):
        self.record("set-hostname", name)

    def run(self, argv):
        self.record("run", list(argv))

    def boot_reconcile(self):
        self.record("boot-reconcile")

    def reboot_soon(self):
        self.record("reboot-soon")

    def states(self, units):
        failing = self._failing()
        return {u: f"failed ({failing[u]})" if u in failing else "active" for u in units}

    def health(self, units, settle):
        time.sleep(settle)  # as long as the real check watches the units
        self.record("health", list(units))
        failing = self._failing()
        return [f"{u}: {failing[u]}" for u in units if u in failing]


def from_env(root: Path) -> Activator:
    """KIOSK_ACTIVATOR, or systemd on a real device root ("/"), or nothing for any other tree."""
    choice = setting("KIOSK_ACTIVATOR", "")
    if choice.startswith("recording:"):
        return RecordingActivator(Path(choice.split(":", 1)[1]), root)
    if choice == "none":
        return NullActivator()
    if choice == "systemd":
        return SystemdActivator()
    if choice:
        raise KioskError(f"KIOSK_ACTIVATOR={choice!r} is not an activator",
                         hint="use systemd, none or recording:<path>")
    return SystemdActivator() if Path(root).resolve() == Path("/") else NullActivator()


def program_start_seconds() -> float:
    """KIOSK_HEALTH_START_SECONDS: how long cage may take to start the program after a switch."""
    return number_setting("KIOSK_HEALTH_START_SECONDS", 180, least=1)


def settle_seconds() -> float:
    """KIOSK_HEALTH_SECONDS: how long the units a switch touched must stay up."""
    return number_setting("KIOSK_HEALTH_SECONDS", DEFAULT_SETTLE_SECONDS, least=0)
