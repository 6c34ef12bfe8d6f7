"""Finishing or undoing what a power cut, a kill -9 or a lost push left half done (at boot and before each switch).

Afterwards the device runs ONE complete generation: the journal's safe one after an interrupted
switch, main's after a push whose ref update never came, `default` at boot after `switch test`.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from kiosk.core.errors import KioskError
from kiosk.core.files import remove_durable
from kiosk.core.log import Log
from kiosk.device import bootconfig, system
from kiosk.device.links import reconcile
from kiosk.device.pending import clear_pending, process_start, read_pending, repo_main
from kiosk.device.store import (GOOD, DamagedState, current, exists, generation, generations_dir, list_generations,
                                make_manifests_private, pointer, set_pointer, state_dir, update_meta)
from kiosk.device.switch import Switch, journal_path, read_journal, rollback, update_default_marker


def resolve_pending(root: Path, activator, log: Log, *, settle: float = 0.0) -> str:
    """A push that switched the device but whose ref update was not (yet) seen. Returns
    "none", "confirmed", "in-progress" (its git receive-pack still runs) or "reverted"."""
    pending = read_pending(root)
    if not pending:
        return "none"
    if repo_main(root) == pending["commit"]:
        clear_pending(root)
        return "confirmed"
    pid = pending.get("pid")
    if pid and process_start(pid) is not None and process_start(pid) == pending.get("pidStart"):
        return "in-progress"
    # git push never reported success (the ref was not updated): the device goes back to what main says.
    gen = current(root)
    reason = "its push did not complete: configuration.git's main was never moved to it"
    previous = pending.get("previous")
    if gen is not None and gen.number == pending["generation"] and previous is not None:
        log(f"generation {gen.number} was deployed but its push did not complete; returning to generation {previous}")
        good = generation(root, previous)
        rollback(root, gen, good, reason, activator, log, settle)
    elif gen is not None and gen.number == pending["generation"]:
        update_meta(gen, reason=reason)
    clear_pending(root)
    return "reverted"


def _remove_leftovers(root: Path, log: Log) -> None:
    """A generation build or a state file write that a power cut interrupted: never seen, so just gone."""
    base = generations_dir(root)
    if base.is_dir():
        for stale in base.glob(".tmp-*"):
            log(f"removing an incomplete generation build: {stale.name}")
            shutil.rmtree(stale)
    state = state_dir(root)
    if state.is_dir():
        # .<pointer>.tmp from set_pointer, .<file>.kiosk-tmp from the durable writes
        for stale in [*state.glob(".*.tmp"), *state.glob(".*.kiosk-tmp")]:
            stale.unlink()
    fixed = make_manifests_private(root)
    if fixed:
        log(f"layer.json of generation(s) {', '.join(map(str, fixed))} made readable by root only "
            "(it holds the digest of the Wi-Fi file)")


def _damaged_state(root: Path, log: Log) -> tuple[dict | None, bool]:
    """(the journal, whether it was damaged). A damaged pending.json is removed (its push is judged like any
    other: the device keeps what it runs); a damaged journal, or one naming no generation, is answered by
    _undo_damaged_switch."""
    try:
        read_pending(root)
    except DamagedState as exc:
        log(f"{exc.message}: removed")
        clear_pending(root)
    try:
        journal = read_journal(root)
    except DamagedState as exc:
        log(exc.message)
        return None, True
    if journal and not exists(root, journal["safe"]):
        log(f"the interrupted switch's journal names generation {journal['safe']}, which does not exist")
        return None, True
    return journal, False


def _undo_damaged_switch(root: Path, activator, log: Log, at_boot: bool) -> None:
    """A switch was interrupted but its journal cannot say where it came from: return to a generation that
    ran healthily (default or current, whichever did; else the newest good one), every other one unlinked."""
    gens = list_generations(root)
    by_number = {g.number: g for g in gens}
    choices = [by_number.get(pointer(root, "default")), by_number.get(pointer(root, "current"))]
    good = [g for g in choices if g is not None and g.status in GOOD] or \
        [g for g in reversed(gens) if g.status in GOOD] or [g for g in choices if g is not None]
    if not good:
        raise KioskError("an interrupted switch left no generation to return to", hint="reflash the device")
    safe = good[0]
    log(f"returning to generation {safe.number} (the journal of the interrupted switch is damaged)")
    reconcile(root, safe, [g for g in gens if g.number != safe.number])
    set_pointer(root, "default", safe.number)
    update_meta(safe, status="active")
    update_default_marker(root)
    remove_durable(journal_path(root))


def _undo_interrupted_switch(root: Path, journal: dict, activator, log: Log, at_boot: bool) -> None:
    safe = generation(root, journal["safe"])
    others = [generation(root, n) for n in (journal["from"], journal["to"])
              if n is not None and n != safe.number and exists(root, n)]
    log(f"an interrupted {journal['purpose']} from generation {journal['from']} to {journal['to']} "
        f"(at step {journal['step']}): returning to generation {safe.number}")
    reconcile(root, safe, others)
    if journal["purpose"] == "rollback" or journal.get("defaultBefore") is None:
        set_pointer(root, "default", safe.number)
    else:
        set_pointer(root, "default", journal["defaultBefore"])
    for other in others:
        if other.status in ("built", "active"):
            update_meta(other, status="failed",
                        reason=f"interrupted at step '{journal['step']}' (power cut or killed); recovered")
    update_meta(safe, status="active")
    pending = read_pending(root)
    if pending and pending.get("generation") != safe.number:
        clear_pending(root)
    update_default_marker(root)
    remove_durable(journal_path(root))
    if not at_boot:
        restore = Switch(root, others[0] if others else None, safe, mode="switch", purpose="recover",
                         activator=activator, log=log)
        with contextlib.suppress(KioskError):
            restore.activate()
        remove_durable(journal_path(root))


def _settle_pending_at_boot(root: Path, log: Log) -> bool:
    """At boot no push is running: confirm the pending push against configuration.git, or go back."""
    pending = read_pending(root)
    changed = False
    if repo_main(root) != pending["commit"]:
        gen = current(root)
        if gen is not None and gen.number == pending["generation"] and pending.get("previous") is not None:
            good = generation(root, pending["previous"])
            log(f"generation {gen.number}'s push did not complete; returning to generation {good.number}")
            reconcile(root, good, [gen])
            set_pointer(root, "default", good.number)
            update_meta(gen, status="failed", reason="its push did not complete (power cut before "
                                                     "configuration.git recorded it)")
            update_meta(good, status="active")
            changed = True
    clear_pending(root)
    return changed


def recover(root: Path, activator, log: Log, *, at_boot: bool = False) -> bool:
    """Finish or undo whatever a power cut or kill -9 interrupted; returns True if anything changed.

    Afterwards the device is on ONE complete generation: every link of it in place, no other's left.
    """
    root = Path(root)
    changed = False
    _remove_leftovers(root, log)
    journal, damaged = _damaged_state(root, log)
    if damaged:
        _undo_damaged_switch(root, activator, log, at_boot)
        changed = True
    elif journal:
        _undo_interrupted_switch(root, journal, activator, log, at_boot)
        changed = True
    if not at_boot and read_pending(root):
        # the running system: a push may still be finishing
        changed |= resolve_pending(root, activator, log) == "reverted"
    elif read_pending(root):
        changed |= _settle_pending_at_boot(root, log)
    if at_boot:   # a new system being tried: this boot runs its generation only in its slot
        changed |= system.settle_at_boot(root, log)
    cur, default = pointer(root, "current"), pointer(root, "default")
    if at_boot and default is not None and cur != default:
        target = generation(root, default)
        old = current(root) if exists(root, cur) else None
        log(f"booting the default generation {default} (current was {cur})")
        reconcile(root, target, [old] if old else [])
        if old and old.status == "active":
            update_meta(old, status="superseded")
        update_meta(target, status="active")
        changed = True
    elif not exists(root, cur):
        good = [g for g in list_generations(root) if g.status in GOOD]
        if good:
            pointed = default is not None and (generations_dir(root) / str(default)).is_dir()
            target = generation(root, default) if pointed else good[-1]
            log(f"current points at no generation; linking generation {target.number}")
            reconcile(root, target, [g for g in list_generations(root) if g.number != target.number])
            set_pointer(root, "default", target.number)
            changed = True
    if current(root) is not None:
        update_default_marker(root)
        try:   # the firmware partition follows the generation recovery settled on (device/bootconfig.py)
            bootconfig.sync(root, log)   # (it logs what it wrote; nothing for systemd to reconcile)
        except KioskError as exc:
            log(f"firmware partition not brought up to date: {exc}")
    if changed and at_boot:
        activator.boot_reconcile()
    return changed
