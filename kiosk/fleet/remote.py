"""One device from the laptop: its configuration.git over ssh (fetch main, commit nixiosk.json, push) and
its state: `kiosk status HOST`'s one fixed question (an older kiosk: `kiosk generations --json`). The
device's hooks do the rest, exactly as for a person's `git push`: validate, build the generation, switch,
health-check, roll back.

ssh is the user's OpenSSH, with their ~/.ssh/config, keys and known_hosts, plus what a parallel,
unattended run needs: BatchMode (nothing may wait for a prompt), a connect timeout, keep-alives, no
agent or X11 forwarding, and for NAME.local `kiosk ssh-proxy` as ProxyCommand (mDNS without
nss-mdns, as `kiosk ssh-config` sets up). Host keys are checked as the user's ssh config says; under
BatchMode an unknown key is a refusal, named as such. --accept-new-host-keys (StrictHostKeyChecking=
accept-new) trusts a device's first key, explicitly; a changed key is refused whatever the option.
git runs with no user or system configuration and without the caller's GIT_* variables (a url
rewrite or a GIT_DIR must not send a device's spec elsewhere).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from kiosk.core.errors import KioskError, one_line
from kiosk.core.run import run, run_lines
from kiosk.fleet.merge import Connection, Device
from kiosk.net.reach import ssh_command, ssh_problem

SPEC_FILE = "nixiosk.json"
MAIN = "refs/heads/main"
FAILED = ("unreachable", "refused", "rolled back", "failed")
_ACTIVE = re.compile(r"==> generation (\d+) is active")
_ROLLED_BACK = re.compile(r"==> ROLLED BACK to generation (\d+) \(commit [0-9a-f]*\): (.*)")
_REFUSED = re.compile(r"==> push refused: (.*)")


@dataclass
class Settings:
    """What every device's ssh and git share in one run."""

    connect_timeout: float = 10.0
    accept_new_host_keys: bool = False
    allow_rename: bool = False      # push a spec whose hostName differs from the one the device runs
    author: tuple[str, str] = ("kiosk fleet", "kiosk@localhost")
    message: str = "kiosk fleet push"


@dataclass
class Outcome:
    result: str                 # deployed, unchanged, unreachable, refused, rolled back, failed
    reason: str = ""
    commit: str = ""            # main's commit afterwards (the new one when deployed)
    generation: int | None = None
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)   # what the device said (git's "remote: " lines)

    @property
    def failed(self) -> bool:
        return self.result in FAILED


def ssh_argv(conn: Connection, settings: Settings) -> list[str]:
    """ssh and its options for this device (net.reach's, the inventory's own ssh arguments first)."""
    return ssh_command(conn.host, identity=conn.key, leading=conn.ssh_args,
                       options=["StrictHostKeyChecking=accept-new"] if settings.accept_new_host_keys else (),
                       connect_timeout=settings.connect_timeout)


def commit_identity() -> tuple[str, str]:
    """The user's git identity for the commits a fleet push makes, else 'kiosk fleet <kiosk@HOST>'."""
    def get(key: str) -> str:
        proc = run(["git", "config", "--get", key], check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""
    return (get("user.name") or "kiosk fleet", get("user.email") or f"kiosk@{socket.gethostname()}")


def login(conn: Connection) -> str:
    """The ssh command line a person types to reach the device."""
    return f"ssh {'-p ' + str(conn.port) + ' ' if conn.port != 22 else ''}{conn.user}@{conn.host}"


def why_not(text: str, code: int, conn: Connection) -> tuple[str, str]:
    """(result, reason) from what ssh or git said when the device could not be reached or used."""
    said = ssh_problem(text, host=conn.host, port=conn.port, login=login(conn),
                       new_keys=", or pass --accept-new-host-keys for devices never reached before")
    if said:
        return said
    low = text.lower()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("remote: ")]
    if "does not appear to be a git repository" in low or "no such file or directory" in low:
        return "failed", "it has no configuration.git at /etc/kiosk/configuration.git: is it a kiosk?"
    if "couldn't find remote ref" in low:
        return "failed", "its configuration.git has no main branch"
    return "failed", one_line(lines[-1][:300]) if lines else f"exited with status {code} without a word"


class DeviceRepo:
    """A throwaway bare repository holding one device's main, to compare and commit against."""

    def __init__(self, device: Device, settings: Settings, workdir: Path):
        self.device, self.settings, self.dir = device, settings, workdir
        self.main = ""
        self.env = {"GIT_SSH_COMMAND": shlex.join(ssh_argv(device.connection, settings)),
                    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0",
                    "GIT_AUTHOR_NAME": settings.author[0], "GIT_AUTHOR_EMAIL": settings.author[1],
                    "GIT_COMMITTER_NAME": settings.author[0], "GIT_COMMITTER_EMAIL": settings.author[1]}

    def git(self, *args: str, input: str | None = None, timeout: float | None = 60, check: bool = True):
        return run(["git", f"--git-dir={self.dir}", *args], env=self.env, drop_env=("GIT_",), input=input,
                   check=check, timeout=timeout, what=f"git {args[0]} ({self.device.name})")

    def look(self) -> Outcome | None:
        """Fetch the device's main: an Outcome when there is nothing to push (or it cannot be reached)."""
        started = time.monotonic()
        run(["git", "init", "-q", "--bare", str(self.dir)], env=self.env, drop_env=("GIT_",))
        proc = self.git("fetch", "-q", "--no-tags", "--depth", "1", self.device.connection.url, f"+{MAIN}:{MAIN}",
                        check=False, timeout=max(120.0, 4 * self.settings.connect_timeout))
        if proc.returncode != 0:
            result, reason = why_not(proc.stderr + proc.stdout, proc.returncode, self.device.connection)
            return Outcome(result, reason, seconds=time.monotonic() - started)
        self.main = self.git("rev-parse", MAIN).stdout.strip()
        current = self.git("cat-file", "blob", f"{MAIN}:{SPEC_FILE}", check=False).stdout
        try:
            running = json.loads(current.removeprefix("\ufeff"))
        except ValueError:
            running = None
        if running == self.device.data:
            return Outcome("unchanged", "main already carries this nixiosk.json", self.main,
                           seconds=time.monotonic() - started)
        name, wanted = running.get("hostName") if isinstance(running, dict) else None, self.device.data["hostName"]
        if isinstance(name, str) and name != wanted and not self.settings.allow_rename:
            # the inventory reached another device than it means (a wrong ansible_host, a reused address)
            return Outcome("refused", f"this device is {name!r} (its main's nixiosk.json), not {wanted!r}: is "
                           f"{self.device.connection.label} the right address? (--allow-rename to rename it)",
                           self.main, seconds=time.monotonic() - started)
        return None

    def commit(self) -> str:
        """A commit on top of the device's main with nixiosk.json replaced (other files kept)."""
        blob = self.git("hash-object", "-w", "--stdin", input=self.device.text).stdout.strip()
        entries = [e for e in self.git("ls-tree", "-z", MAIN).stdout.split("\0")
                   if e and e.split("\t", 1)[-1] != SPEC_FILE]
        tree = self.git("mktree", "-z", input="\0".join([*entries, f"100644 blob {blob}\t{SPEC_FILE}"]) + "\0")
        return self.git("commit-tree", tree.stdout.strip(), "-p", self.main, "-m",
                        f"{self.settings.message}\n\nhost {self.device.name} ({self.device.data.get('hostName')})"
                        ).stdout.strip()

    def push(self, on_line=None) -> Outcome:
        """Push the commit to main; the device's pre-receive hook deploys it (or refuses, or rolls back)."""
        started = time.monotonic()
        commit = self.commit()
        seen: list[str] = []

        def line(text: str) -> None:
            seen.append(text)
            if on_line and text.startswith("remote: "):
                on_line(text[len("remote: "):].rstrip())

        try:
            run_lines(["git", f"--git-dir={self.dir}", "push", "--no-progress", self.device.connection.url,
                       f"{commit}:{MAIN}"], line, env=self.env, drop_env=("GIT_",), what="git push")
            code = 0
        except KioskError:
            code = 1
        outcome = read_push(seen, code, commit, self.main, self.device.connection)
        outcome.seconds = time.monotonic() - started
        return outcome


def read_push(output: list[str], code: int, commit: str, old: str, conn: Connection) -> Outcome:
    """What a push's output says happened: the hook's own `==>` lines decide, else ssh's words."""
    remote = [line[len("remote: "):].rstrip() for line in output if line.startswith("remote: ")]
    for text in remote:
        if (match := _ROLLED_BACK.search(text)):
            return Outcome("rolled back", match[2], old, int(match[1]), lines=remote)
    for i, text in enumerate(remote):
        if (match := _REFUSED.search(text)):
            said = [t for t in remote[:i] if t and not t.startswith(("==>", "    "))]
            reason = said[0] + (f" (and {len(said) - 1} more)" if len(said) > 1 else "") if said else match[1]
            return Outcome("refused", reason, old, lines=remote)
    active = [int(m[1]) for text in remote if (m := _ACTIVE.search(text))]
    if code == 0 and active:
        return Outcome("deployed", "", commit, active[-1], lines=remote)
    if code == 0:
        return Outcome("failed", "git push succeeded but the device did not say which generation is active "
                                 "(is it running kiosk's hooks?)", commit, lines=remote)
    result, reason = why_not("\n".join(output), code, conn)
    return Outcome(result, reason, old, lines=remote)


def _ask(conn: Connection, settings: Settings, timeout: float, command: str):
    """(ssh's CompletedProcess running the fixed `command` on the device, "") or (None, why there is none)."""
    argv = [*ssh_argv(conn, settings), "-p", str(conn.port), "-l", conn.user, "--", conn.host, command]
    try:
        return run(argv, check=False, timeout=timeout, what="ssh"), ""
    except KioskError:
        return None, f"no answer within {timeout:g} s"


def generations(conn: Connection, settings: Settings, timeout: float) -> tuple[dict | None, str]:
    """(`kiosk generations --json` of the device, "") or (None, why it could not be asked)."""
    proc, why = _ask(conn, settings, timeout, "kiosk generations --json")
    if proc is None:
        return None, why
    if proc.returncode != 0:
        return None, why_not(proc.stderr + proc.stdout, proc.returncode, conn)[1]
    try:
        data = json.loads(proc.stdout)
        if not isinstance(data, dict) or not isinstance(data.get("generations"), list):
            raise ValueError("not what kiosk generations --json prints")
    except ValueError:
        return None, "its `kiosk generations --json` printed something else (an older kiosk?)"
    return data, ""


def device_status(conn: Connection, settings: Settings, timeout: float) -> tuple[dict | None, dict | None, str]:
    """What `kiosk status HOST` asks (kiosk.update.status.REMOTE, one fixed command): (its answer, None, "");
    from a kiosk older than `kiosk status --here`, (None, its `kiosk generations --json`, ""); else
    (None, None, why the device could not be asked). `timeout` covers both questions."""
    from kiosk.update.status import REMOTE, older, read_answer

    started = time.monotonic()
    proc, why = _ask(conn, settings, timeout, REMOTE)
    if proc is None:
        return None, None, why
    said = proc.stderr + proc.stdout
    if proc.returncode == 0:
        facts = read_answer(proc.stdout)
        return (facts, None, "") if facts is not None else \
            (None, None, "its `kiosk status --here --json` printed nothing this kiosk can read (a newer kiosk?)")
    if older(said):
        data, why = generations(conn, settings, max(1.0, timeout - (time.monotonic() - started)))
        return None, data, why
    return None, None, why_not(said, proc.returncode, conn)[1]
