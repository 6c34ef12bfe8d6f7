"""Switching the live system from one generation to another, with a journal a power cut cannot confuse.

A switch A -> B: journal {from, to, safe, step} (fsync) -> stop units that go
away -> (1) link paths new in B -> (2) flip current (and default) -> (3) replace
changed symlink entries -> (4) remove A-only paths -> activate -> health check
-> remove the journal (the commit point). `kiosk switch --recover` (at boot, by
kiosk-recover.service; recover.py) returns an interrupted switch to the journal's
`safe` generation (the one before a switch, the target of a rollback), so a power
cut always leaves ONE complete, previously good generation linked.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kiosk.core.errors import KioskError
from kiosk.core.files import crash_point, fsync_dir, remove_durable, write_durable
from kiosk.core.log import Log
from kiosk.core.paths import number_setting
from kiosk.device import activation, bootconfig, screen
from kiosk.device.links import conflicts, ensure, remove_ours, sync
from kiosk.device.pending import read_pending
from kiosk.device.store import (DAMAGED, GOOD, DamagedState, Generation, current, list_generations, pointer,
                                read_state, reason_line, set_pointer, state_dir, update_meta, write_state)

SWITCH_STEPS = ("begin", "stopped", "linked", "flipped", "symlinks", "cleaned", "activated", "healthy")
DEFAULT_KEEP = 10


def journal_path(root: Path) -> Path:
    return state_dir(root) / "switch.json"


JOURNAL_FIELDS = {"from": (int, type(None)), "to": int, "safe": int, "step": str, "purpose": str,
                  "defaultBefore": (int, type(None))}


def read_journal(root: Path) -> dict | None:
    """The journal of a switch in progress, or None; DamagedState when it is not what a switch wrote."""
    return read_state(journal_path(root), JOURNAL_FIELDS)


def update_default_marker(root: Path) -> None:
    """kiosk-recover.service runs at boot only when there is something to do: this marker says the
    next boot must switch to `default` (after `kiosk switch test|boot`)."""
    marker = state_dir(root) / "default-differs"
    if pointer(root, "current") != pointer(root, "default"):
        write_durable(marker, f"{pointer(root, 'default')}\n".encode())
    else:
        remove_durable(marker)


class Switch:
    """One switch from generation A (or none) to B with its journal; used by pushes, rollbacks, recovery."""

    def __init__(self, root: Path, old: Generation | None, new: Generation, *, mode: str, purpose: str,
                 activator: activation.Activator, log: Log, reason: str = ""):
        self.root, self.old, self.new = Path(root), old, new
        self.mode, self.purpose, self.reason = mode, purpose, reason
        self.activator, self.log = activator, log
        self.om = old.manifest if old else {}
        self.nm = new.manifest
        wanted = [p for p in {*self.nm, *self.om}
                  if p.startswith((activation.UNIT_DIR, "/etc/sysusers.d/")) or p == "/etc/hostname"]
        self.plan = activation.plan(self.om, self.nm, new_texts=new.texts(wanted),
                                    old_texts=old.texts(wanted) if old else {})
        self.journal = {"from": old.number if old else None, "to": new.number, "mode": mode, "purpose": purpose,
                        "safe": new.number if purpose == "rollback" else (old.number if old else new.number),
                        "defaultBefore": pointer(root, "default"), "step": "begin", "reason": reason}

    def changes(self) -> list[str]:
        om, nm = self.om, self.nm
        added = sorted(p for p in nm if p not in om)
        removed = sorted(p for p in om if p not in nm)
        changed = sorted(p for p in nm if p in om and om[p] != nm[p])
        out = []
        for label, paths in (("files changed", changed), ("files added", added), ("files removed", removed)):
            if paths:
                shown = ", ".join(paths[:12]) + (f", ... ({len(paths) - 12} more)" if len(paths) > 12 else "")
                out.append(f"{label}: {shown}")
        if not out:
            out.append("files: no change")
        return out + (self.plan.lines() or ["units: no change"])

    def _crash(self, step: str) -> None:
        crash_point(f"rollback-{step}" if self.purpose == "rollback" else step)

    def _step(self, step: str) -> None:
        self.journal["step"] = step
        write_state(journal_path(self.root), self.journal)
        self._crash(step)

    def links(self) -> None:
        """Steps 1-4: new links, flip, changed symlinks, old paths gone. Current (and default) end at B."""
        root, om, nm, log = self.root, self.om, self.nm, self.log
        touched: set[Path] = set()
        new_paths = [p for p in sorted(nm) if p not in om and nm[p]["kind"] in ("file", "dir")]
        for path in new_paths:
            ensure(root, path, nm[path], touched)
        sync(touched)
        log(f"1/4 linked {len(new_paths)} new path(s)")
        self._step("linked")

        set_pointer(root, "current", self.new.number)
        if self.mode == "switch" or self.purpose == "rollback":
            set_pointer(root, "default", self.new.number)
        log(f"2/4 current -> generations/{self.new.number}"
            + ("" if pointer(root, "default") == self.new.number else
               f" (default stays generations/{pointer(root, 'default')})"))
        self._step("flipped")

        replaced = [p for p in sorted(nm) if om.get(p) != nm[p] and (
            nm[p]["kind"] in ("symlink", "dir") or (p in om and nm[p]["kind"] != om[p]["kind"]))]
        for path in replaced:
            ensure(root, path, nm[path], touched)
        sync(touched)
        log(f"3/4 updated {len(replaced)} symlink and directory entr{'y' if len(replaced) == 1 else 'ies'}")
        self._step("symlinks")

        gone = [p for p in sorted(om, reverse=True) if p not in nm]
        for path in gone:
            remove_ours(root, path, om[path], touched)
        sync(touched)
        log(f"4/4 removed {len(gone)} path(s) generation {self.new.number} does not have")
        self._step("cleaned")

    def activate(self) -> None:
        """Tell the service manager; raises ActivationFailed."""
        a, p, log = self.activator, self.plan, self.log
        if p.daemon_reload:
            log("systemctl daemon-reload")
            a.daemon_reload()
        if p.hostname:
            log(f"host name -> {p.hostname}")
            a.set_hostname(p.hostname)
        # The screen switched off on purpose (display.schedule, blanking, by hand) stays off: starting cage
        # would light it. kiosk.service stays stopped and runs this generation when the screen comes on.
        off_by = screen.who_switched_off(self.root)
        if off_by and p.hold(activation.PROGRAM_UNIT):
            log(f"{activation.PROGRAM_UNIT}: not restarted, the screen is switched off ({off_by}); the program "
                f"starts as this generation has it when the screen comes on ({screen.comes_on(off_by)})")
        for verb, units, call in (("reload", p.reload, a.reload), ("restart", p.restart, a.restart),
                                  ("try-restart", p.try_restart, a.try_restart), ("start", p.start, a.start)):
            if units:
                log(f"systemctl {verb} {' '.join(units)}")
                call(units)
        for argv in p.commands:  # after the units: sysusers has created any new user by now
            log(f"run {' '.join(argv)}")
            a.run(argv)
        bootconfig.sync(self.root, log)   # config.txt/cmdline.txt of the generation now linked
        if p.empty():
            log("nothing to tell systemd")
        self._step("activated")

    def health(self, settle: float) -> list[str]:
        units = sorted(set(activation.HEALTH_UNITS) | set(self.plan.touched_units()))
        units = [u for u in units if u not in self.plan.stop]
        # display.schedule, blanking or a hand stopped the kiosk on purpose (and activate() left it stopped)
        off_by = screen.who_switched_off(self.root)
        units = [u for u in units if not (off_by and u == activation.PROGRAM_UNIT)]
        self.log.stage(f"health check: {', '.join(units)} (up and staying up for {settle:g}s)")
        if off_by:
            self.log(f"{activation.PROGRAM_UNIT}: not checked, the screen is switched off ({off_by})")
        problems = self.activator.health(units, settle)
        problems, off_during = screen.stopped_on_purpose(self.root, problems, activation.PROGRAM_UNIT)
        for unit in units:
            bad = [p for p in problems if p.startswith(unit + ":")]
            if unit == activation.PROGRAM_UNIT and off_during:
                self.log(f"{unit}: stopped during the check, the screen was switched off ({off_during})")
            else:
                self.log(f"FAILED {bad[0]}" if bad else f"{unit}: up")
        return problems

    def stop_units(self) -> None:
        if self.plan.stop:
            self.log(f"systemctl stop {' '.join(self.plan.stop)}")
            self.activator.stop(self.plan.stop)
        self._step("stopped")

    def preflight(self) -> None:
        """Refuse before anything changes: paths the new generation cannot take over."""
        problems = conflicts(self.root, self.nm)
        if problems:
            raise KioskError("generation %d cannot be linked: %s" % (self.new.number, "; ".join(problems)))

    def run(self, settle: float) -> list[str]:
        """The whole switch; returns health problems ([] = healthy). The journal stays until commit()."""
        self._step("begin")
        try:
            self.log.stage(f"switch to generation {self.new.number}")
            self.stop_units()
            self.links()
            self.log.stage("activate")
            self.activate()
        except Exception as exc:  # anything at all: the caller rolls back to the journal's safe generation
            # one line: it becomes the generation's reason (a failed command says its last lines on more)
            why = reason_line(exc) if isinstance(exc, KioskError) else f"{type(exc).__name__}: {exc}"
            self.log(f"FAILED: {why}")
            return [why]
        problems = self.health(settle)
        if not problems:
            self._step("healthy")
        return problems

    def commit(self) -> None:
        """The switch is final: statuses, then the journal goes (after this, recovery keeps B)."""
        if self.purpose != "rollback":
            if self.old and self.old.number != self.new.number and self.old.status == "active":
                update_meta(self.old, status="rolled-back" if self.purpose == "manual-rollback" else "superseded")
            update_meta(self.new, status="active", reason="")
        update_default_marker(self.root)
        remove_durable(journal_path(self.root))


def rollback(root: Path, failed: Generation, good: Generation, reason: str, activator, log: Log,
             settle: float) -> list[str]:
    """Back from a failed switch to `good`, with the same machinery; the failed one is marked failed."""
    log.stage(f"rolling back to generation {good.number}")
    back = Switch(root, failed, good, mode="switch", purpose="rollback", activator=activator, log=log, reason=reason)
    problems = back.run(settle)
    if problems:
        log(f"generation {good.number} is not healthy either: {'; '.join(problems)}")
    update_meta(failed, status="failed", reason=reason)
    update_meta(good, status="active")
    update_default_marker(root)
    remove_durable(journal_path(root))
    return problems


def switch_to(root: Path, target: Generation, *, mode: str, purpose: str, activator, log: Log,
              settle: float | None = None) -> None:
    """Switch the device to `target` (kiosk switch, kiosk rollback); rolls back by itself when unhealthy."""
    settle = activation.settle_seconds() if settle is None else settle
    old = current(root)
    if mode == "boot":
        set_pointer(root, "default", target.number)
        update_default_marker(root)
        log(f"default -> generations/{target.number}: the next boot runs it (nothing activated now)")
        return
    sw = Switch(root, old, target, mode=mode, purpose=purpose, activator=activator, log=log)
    log.stage(f"changes from generation {old.number if old else '-'} to {target.number}")
    for line in sw.changes():
        log(line)
    if mode == "dry-activate":
        log("dry-activate: nothing was changed")
        return
    sw.preflight()
    problems = sw.run(settle)
    if problems:
        reason = "; ".join(problems)
        if old is None or old.number == target.number:
            remove_durable(journal_path(root))
            raise KioskError(f"generation {target.number} is not healthy: {reason}")
        rollback(root, target, old, reason, activator, log, settle)
        raise KioskError(f"rolled back to generation {old.number}: generation {target.number} failed: {reason}")
    sw.commit()
    log.stage(f"generation {target.number} is active" + ("" if mode == "switch" else
                                                           f" (default stays generation {pointer(root, 'default')})"))


def keep_setting() -> int:
    """KIOSK_KEEP_GENERATIONS: how many good generations prune keeps (default 10; a whole number >= 1)."""
    return int(number_setting("KIOSK_KEEP_GENERATIONS", DEFAULT_KEEP, least=1, whole=True))


def needed(root: Path, keep: int) -> set[int]:
    """The generations prune keeps: current and default; the newest one (its number is never given out
    again, and the reason the last push failed stays readable); the newest `keep` good ones (what
    rollback chooses from); any a pending push or an interrupted switch's journal names."""
    gens = list_generations(root)
    spare = {pointer(root, "current"), pointer(root, "default")}
    if gens:
        spare.add(gens[-1].number)
    spare |= {g.number for g in [g for g in gens if g.status in GOOD][-keep:]}
    pending = read_pending(root)
    if pending:
        spare |= {pending["generation"], pending["previous"]}
    journal = read_journal(root)
    if journal:
        spare |= {journal["from"], journal["to"], journal["safe"], journal["defaultBefore"]}
    return {n for n in spare if n is not None}


def prune(root: Path, log: Log, keep: int | None = None) -> list[int]:
    """Delete the generations rollback does not need (see needed()): failed pushes and good generations
    older than the newest `keep` (KIOSK_KEEP_GENERATIONS). A damaged generation (unreadable meta.json)
    is left to a person. Each goes in one rename to generations/.tmp-gone-N (it vanishes whole), then
    its files are deleted; a power cut in between leaves .tmp-gone-N, which recovery and the next
    generation build delete. A state file that cannot be read keeps everything (nothing is deleted)."""
    keep = keep_setting() if keep is None else keep
    try:
        spare = needed(root, max(keep, 1))
    except DamagedState as exc:
        log(f"not deleting old generations: {exc}")
        return []
    doomed = [g for g in list_generations(root) if g.number not in spare and g.status != DAMAGED]
    for gen in doomed:
        gone = gen.path.with_name(f".tmp-gone-{gen.number}")
        os.rename(gen.path, gone)
        fsync_dir(gen.path.parent)
        crash_point("prune")
        shutil.rmtree(gone)
    if doomed:
        log(f"deleted {len(doomed)} old generation(s): {', '.join(str(g.number) for g in doomed)}")
    return [g.number for g in doomed]
