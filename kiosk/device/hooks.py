"""`kiosk hook pre-receive|post-receive`: what configuration.git's hooks run on every push.

The whole deployment happens in pre-receive, BEFORE git moves the ref: validate
the pushed nixiosk.json, build generation N, switch, activate, health-check, and on
failure roll back; a push that changes the system itself (packages, /debian) instead
starts a try of the new system in the other root slot (kiosk.device.system). The
hook's exit status decides the push: a refused spec or a rolled-back switch exits
non-zero, so git refuses the push, main stays where it was, and `git push` fails and
says why. (A post-receive hook cannot fail a push: the ref would already point at a
commit the device rejected.)

Everything the hook prints goes to the pusher as `remote:` lines while it
happens (stderr, flushed per line).

Between pre-receive's exit and git's ref update there is a window: the device
already runs the new generation. It is covered by ROOT/var/lib/kiosk/pending.json
(commit, generation, the pid of git receive-pack): post-receive confirms it; the
next push (holding the lock) waits while that receive-pack still runs and, if it
died without moving main, returns the device to main's generation first; at boot,
kiosk-recover.service does the same. So the device ends up running what main
says, or what a person chose with `kiosk rollback`/`kiosk switch`.

Environment: KIOSK_ROOT (device root, default /), KIOSK_ACTIVATOR (see
kiosk.device.activation), KIOSK_LOCK_TIMEOUT (seconds a push waits for another, default
600), KIOSK_HEALTH_SECONDS (how long units must stay up, default 4).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kiosk.core.errors import InvalidSpec, KioskError, Problem, UsageError, one_line
from kiosk.core.log import Log
from kiosk.core.paths import device_root
from kiosk.device import activation, system
from kiosk.device.lock import device_lock, lock_timeout
from kiosk.device.pending import clear_pending, read_pending, repo_main, write_pending
from kiosk.device.recover import recover, resolve_pending
from kiosk.device.store import BRANCH, current, reason_line, state_dir, update_meta, write_generation
from kiosk.device.switch import Switch, prune, rollback

if TYPE_CHECKING:
    import git

ZERO = "0" * 40
MAX_UPDATES = 1 << 20   # git sends one line of about 100 bytes per pushed ref
# old and new object names (SHA-1: configuration.git is a plain `git init`) and a ref name: no spaces,
# no control characters (git check-ref-format refuses them too), so a name is safe to print.
_UPDATE = re.compile(rb"([0-9a-f]{40}) ([0-9a-f]{40}) (refs/[^\x00-\x20\x7f]+)")
MAIN = BRANCH
SPEC_FILE = "nixiosk.json"


def pushed_repository() -> git.Repo:
    """The repository the hook runs in, as git receive-pack set it up (GIT_DIR, the current directory).

    GitPython runs its git processes (cat-file, merge-base) with this process's environment, so they
    see receive-pack's quarantine (GIT_OBJECT_DIRECTORY, GIT_ALTERNATE_OBJECT_DIRECTORIES,
    GIT_QUARANTINE_PATH): the pushed objects exist only there until the hook accepts the push.
    So, unlike provision's plain git, nothing here may clean the environment of GIT_*.
    GitPython is imported here, not at the top: it costs 0.1-0.3 s to import on x86 and seconds on a
    Pi 0, and only the push itself needs it (kiosk's other device commands start without it)."""
    import git
    return git.Repo()


def _bad_updates(what: str) -> UsageError:
    return UsageError(f"git's ref updates on standard input: {what}; nothing on the device was changed",
                      hint="the hook takes only what git receive-pack sends, '<old> <new> <ref>' lines")


def read_updates(stream) -> list[tuple[str, str, str]]:
    """git's '<old> <new> <ref>' lines (a binary stream), at most MAX_UPDATES bytes, every line checked.

    Anything else (a blank line, binary bytes, a name that is not UTF-8, megabytes of it) is not git
    talking: one UsageError line (exit 2, so pre-receive refuses the push), read no further."""
    data = stream.read(MAX_UPDATES + 1)
    if len(data) > MAX_UPDATES:
        raise _bad_updates(f"more than {MAX_UPDATES >> 20} MiB")
    updates = []
    for number, raw in enumerate(data.removesuffix(b"\n").split(b"\n") if data else [], 1):
        match = _UPDATE.fullmatch(raw)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad_updates(f"line {number} is not UTF-8 text") from None
        if not match:
            shown = f"'{one_line(line[:60])}'" + ("..." if len(line) > 60 else "") if line else "empty"
            raise _bad_updates(f"line {number} is not '<40 hex digits> <40 hex digits> refs/...': {shown}")
        updates.append((match[1].decode(), match[2].decode(), match[3].decode()))
    return updates


def ref_problems(repo: git.Repo, updates: list[tuple[str, str, str]]) -> list[str]:
    """Only main is deployable; it cannot be deleted or rewritten."""
    problems = []
    for old, new, ref in updates:
        if ref != MAIN:
            problems.append(f"{ref}: refused: only main is deployed to this device and no other branch or tag "
                            "is kept; push to main (git push origin HEAD:main)")
        elif new == ZERO:
            problems.append(f"{ref}: refused: main cannot be deleted; it is the configuration this device runs")
        elif old != ZERO and not _is_ancestor(repo, old, new):
            problems.append(f"{ref}: refused: not a fast-forward of the device's main ({old[:12]}); "
                            "git pull --rebase, then push again")
    return problems


def _is_ancestor(repo: git.Repo, old: str, new: str) -> bool:
    import git
    try:
        return repo.is_ancestor(old, new)
    except git.GitCommandError:  # merge-base failed (an unreadable object): as before, no fast-forward
        return False


def spec_at(repo: git.Repo, commit: str, known_packages=frozenset()):
    """(text, Spec) of nixiosk.json in `commit`; InvalidSpec with the same one-line problems as `kiosk validate`.

    known_packages (the running generation's) are not looked up in the archive."""
    from kiosk.spec import load as specmod

    tree = repo.commit(commit).tree
    if SPEC_FILE not in tree:
        raise InvalidSpec(SPEC_FILE, [Problem("", f"not found in commit {commit[:12]}",
                                              "commit nixiosk.json at the top of the repository")])
    item = tree / SPEC_FILE
    if item.type != "blob" or item.mode not in (0o100644, 0o100755):
        raise InvalidSpec(SPEC_FILE, [Problem("", f"is not a regular file in commit {commit[:12]}",
                                              "commit nixiosk.json itself, not a link or a directory")])
    if item.size > specmod.MAX_BYTES:   # before reading it: a 200 MB blob must not reach memory
        raise specmod.too_large(SPEC_FILE)
    # Read exactly as `kiosk validate` reads a file (kiosk.spec.load.from_bytes: size, UTF-8, a leading
    # byte-order mark dropped): a push is accepted or refused as validate says (test_push checks the two
    # agree). What is stored is spec.text, without the mark.
    spec = specmod.from_bytes(item.data_stream.read(), SPEC_FILE, known_packages=known_packages)
    return spec.text, spec


def in_place_problems(spec: dict, running: dict) -> list[Problem]:
    """What a push cannot change on a running device: the board (kernel, firmware, architecture), the suite.
    (`running` is the stored spec, not validated again: a field it lacks is not compared.)"""
    from kiosk.spec.hardware import ALIASES

    problems = []
    old_hw, new_hw = running.get("hardware"), spec["hardware"]
    if isinstance(old_hw, str) and ALIASES.get(new_hw, new_hw) != ALIASES.get(old_hw, old_hw):
        problems.append(Problem("/hardware", f"this device is a {old_hw}; a push cannot change the board to "
                                f"{new_hw} (another kernel, firmware and architecture)",
                                f"build and flash a new image for it (kiosk build, ./deploy.sh /dev/mmcblk0), "
                                f"or set \"hardware\" back to \"{old_hw}\""))
    debian = running.get("debian")
    old_suite, new_suite = debian.get("suite") if isinstance(debian, dict) else None, spec["debian"]["suite"]
    if isinstance(old_suite, str) and old_suite != new_suite:
        problems.append(Problem("/debian/suite", f"this device runs Debian {old_suite}; a push cannot upgrade "
                                f"it to {new_suite}",
                                f"build and flash a new image, or set \"suite\" back to \"{old_suite}\""))
    return problems


def without_slots(changes: list[str]) -> list[Problem]:
    """A device booted without a root slot (an image made before every board had them) cannot take a new
    system: a push there changes the configuration only, and a system change needs a new image."""
    hint = "build and flash a new image for it (./deploy.sh /dev/mmcblk0): its root slots take new systems"
    problems = []
    for change in changes:
        pointer, what = ("/packages", change.removeprefix("packages ") + " ") if change.startswith("packages ") \
            else (change, "")
        problems.append(Problem(pointer, f"{what}changes the system, and this device has no root slot to install "
                                         "a new one into", hint))
    return problems


def _refuse(log: Log, lines: list[str], why: str) -> int:
    for line in lines:
        log.raw(line)
    log.stage(f"push refused: {why}; nothing on the device was changed")
    return 1


def _prune(root: Path, log: Log) -> None:
    """After every push that wrote a generation, good or failed (twelve failed pushes must not leave twelve
    generations on the card). Whatever goes wrong here is said, and changes nothing about the push."""
    try:
        prune(root, log)
    except (OSError, KioskError) as exc:
        log(f"warning: old generations were not deleted: {exc}")


def _wait_for_previous_push(root: Path, activator, log: Log, timeout: float) -> None:
    """Holding the lock: a previous push whose ref update git has not made yet still counts as running."""
    deadline = time.monotonic() + timeout
    said = False
    while True:
        state = resolve_pending(root, activator, log)
        if state != "in-progress":
            return
        if not said:
            log("waiting for another push to finish... (git is recording the previous push)")
            said = True
        if time.monotonic() > deadline:
            raise KioskError(f"the previous push has not finished in {timeout:.0f}s; nothing was changed",
                             hint="push again later")
        time.sleep(0.1)


def pre_receive(stdin, log: Log) -> int:
    from kiosk.spec.plan import make_plan
    from kiosk.config.render import render

    os.umask(0o022)
    root = device_root()
    updates = read_updates(stdin)
    with pushed_repository() as repo:
        problems = ref_problems(repo, updates)
        if problems:
            return _refuse(log, problems, "only fast-forwards of main are deployed")
        if not updates:
            return 0
        old, new, _ = updates[0]

        log.stage(f"validate nixiosk.json (commit {new[:12]})")
        try:
            running = current(root)
            known = frozenset(running.meta.get("packages", [])) if running else frozenset()
            spec_text, spec = spec_at(repo, new, known)
        except InvalidSpec as exc:
            return _refuse(log, exc.render().splitlines(), "nixiosk.json is not valid")
    for warning in spec.warnings:
        log.raw(f"{SPEC_FILE}: warning: {warning}")
    data = spec.data
    log(f"valid: {data['hostName']} on {data['hardware']}, program {data['program']['package']} "
        f"({data['program']['executable']})")

    activator = activation.from_env(root)
    timeout = lock_timeout()
    settle = activation.settle_seconds()
    with device_lock(root, f"push of {new[:12]}", log, timeout):
        recover(root, activator, log)
        _wait_for_previous_push(root, activator, log, timeout)
        waiting = system.waiting_trial(root, activator, log)
        if waiting:
            return _refuse(log, [waiting], "a new system is being tried")
        main_now = repo_main(root)
        if old != (main_now or ZERO):
            return _refuse(log, [f"{MAIN}: refused: main moved to {(main_now or ZERO)[:12]} while you pushed "
                                 f"(another push?); git pull --rebase, then push again"], "main has moved")
        cur = current(root)
        if cur is None:
            raise KioskError("this device has no current generation", hint="reflash it")
        try:
            running_spec = cur.spec()
        except InvalidSpec as exc:
            raise KioskError(f"the running generation {cur.number}'s own nixiosk.json cannot be read "
                             f"({exc.problems[0].message if exc.problems else exc})",
                             hint="kiosk rollback on the device, then push again") from None
        plan = make_plan(data)
        old_packages = cur.meta.get("packages", [])
        added = sorted(set(plan.packages) - set(old_packages))
        removed = sorted(set(old_packages) - set(plan.packages))
        lines = [p.line(SPEC_FILE) for p in in_place_problems(data, running_spec)]
        changes = [] if lines else system.system_changes(running_spec, data, added, removed)
        if changes and not system.slot_here(root):
            lines = [p.line(SPEC_FILE) for p in without_slots(changes)]
        if lines:
            return _refuse(log, lines, "this change needs a new image")

        # from here on the device changes: keep the last push's log for whoever lost the connection
        log.tee_to(state_dir(root) / "push.log")
        layer = render(data)
        gen = write_generation(root, spec_text, layer, commit=new, packages=plan.packages,
                                    previous=cur.number)
        log.stage(f"build generation {gen.number}: what changes from generation {cur.number}")
        sw = Switch(root, cur, gen, mode="switch", purpose="push", activator=activator, log=log)
        for line in sw.changes():
            log(line)
        log("packages: " + (" ".join([f"+{p}" for p in added] + [f"-{p}" for p in removed]) or "no change"))
        if changes:   # the new system is built whole (by a builder, or by the device in a copy of its root) and tried in the other slot, never apt in place
            try:
                sw.preflight()
                system.start_trial(root, gen, cur, commit=new, old_commit=old, data=data, spec_text=spec_text,
                                   running=running_spec, changes=changes, pid=os.getppid(), log=log,
                                   added=added, removed=removed)
            except KioskError as exc:
                update_meta(gen, status="failed", reason=reason_line(exc))
                _prune(root, log)
                return _refuse(log, [f"generation {gen.number} failed: {exc}"],
                               "the new system could not be prepared")
            _prune(root, log)
            return 0
        try:
            sw.preflight()
        except KioskError as exc:
            update_meta(gen, status="failed", reason=reason_line(exc))
            _prune(root, log)
            return _refuse(log, [f"generation {gen.number} failed: {exc}"],
                           "the new generation could not be prepared")

        try:
            problems = sw.run(settle)
            if problems:
                reason = "; ".join(problems)
                again = rollback(root, gen, cur, reason, activator, log, settle)
                _prune(root, log)
                log.stage(f"ROLLED BACK to generation {cur.number} (commit {cur.meta['commit'][:12]}): "
                          f"generation {gen.number} failed: {reason}")
                if again:
                    log(f"warning: generation {cur.number} is not healthy either: {'; '.join(again)}")
                log.stage(f"push refused: main stays at {old[:12]}; fix nixiosk.json and push again "
                          f"(kiosk generations on the device shows what failed)")
                return 1
            write_pending(root, new, gen.number, cur.number, os.getppid())
            sw.commit()
        except BaseException:
            # whatever broke mid-switch: back to the journal's safe generation now, not at the next push
            with contextlib.suppress(Exception):
                recover(root, activator, log)
            raise
        _prune(root, log)
    log.stage(f"generation {gen.number} is active: {data['hostName']}, commit {new[:12]}")
    return 0


def post_receive(stdin, log: Log) -> int:
    """git has moved main: the pushed generation is confirmed (nothing to change on the device)."""
    root = device_root()
    for old, new, ref in read_updates(stdin):
        if ref != MAIN:
            continue
        pending = read_pending(root)
        if pending and pending["commit"] == new and repo_main(root) == new:
            clear_pending(root)
        if system.confirm(root, new, activation.from_env(root), log):
            continue
        cur = current(root)
        if cur is not None and cur.meta.get("commit") == new:
            log.stage(f"main is at {new[:12]}; the device runs generation {cur.number}")
    return 0


def cmd_hook(args) -> int:
    log = Log()
    if args.hook == "pre-receive":
        return pre_receive(sys.stdin.buffer, log)
    return post_receive(sys.stdin.buffer, log)


def register(sub) -> None:
    p = sub.add_parser("hook", help="what configuration.git's hooks run on the device (validate, switch)",
                       description="Entry points of configuration.git's hooks on the device (reads git's "
                                   "'old new ref' lines on stdin).")
    p.add_argument("hook", choices=("pre-receive", "post-receive"))
    p.set_defaults(func=cmd_hook)
