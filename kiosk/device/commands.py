"""`kiosk generations`, `kiosk rollback`, `kiosk switch`: the device's own commands for its generations."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kiosk.core.errors import KioskError, UsageError, one_line
from kiosk.core.log import Log
from kiosk.core.paths import device_root
from kiosk.device import activation
from kiosk.device.links import verify
from kiosk.device.lock import device_lock
from kiosk.device.recover import recover
from kiosk.device.store import (DAMAGED, GOOD, Generation, current, exists, generation, generations_dir,
                                list_generations, pointer)
from kiosk.device.switch import switch_to


def _root(args) -> Path:
    """--root, checked to be a directory before anything under it is read (core.paths.device_root)."""
    return device_root(args.root)


def generations_data(root: Path) -> dict:
    """What `kiosk generations --json` prints: {"current", "default", "generations": [row, ...]}."""
    cur, default = pointer(root, "current"), pointer(root, "default")
    rows = []
    for gen in list_generations(root):
        meta = gen.meta
        rows.append({"number": gen.number, "date": meta.get("date"), "commit": meta.get("commit"),
                     "status": meta.get("status"), "reason": meta.get("reason", ""),
                     "current": gen.number == cur, "default": gen.number == default,
                     "previous": meta.get("previous")})
    return {"current": cur, "default": default, "generations": rows}


def generation_health(data: dict) -> tuple[str, str, str]:
    """(generation, commit, health) from generations_data / `kiosk generations --json`: "ok" when the current
    generation is active, else its status and reason; a different boot default is said too. kiosk fleet
    status and kiosk status show it."""
    rows = {g.get("number"): g for g in data["generations"] if isinstance(g, dict)}
    current = rows.get(data.get("current"))
    if current is None:
        return "-", "-", "no current generation"
    health = "ok" if current.get("status") == "active" else one_line(str(current.get("status")))
    if current.get("reason"):
        health += f" ({one_line(str(current['reason']))[:80]})"
    if data.get("default") != data.get("current"):
        health += f"; boots generation {data.get('default')} next"
    return str(current.get("number")), str(current.get("commit") or "-"), health


def cmd_generations(args) -> int:
    root = _root(args)
    data = generations_data(root)
    rows = data["generations"]
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        print()
        return 0
    if not rows:   # a failure, said on stderr like every other (exit 1)
        raise KioskError(f"no generations under {one_line(str(generations_dir(root)))}",
                         hint="is this a kiosk device (or --root its root)?")
    print(f"{'':2}{'GEN':>4}  {'DATE':20}  {'COMMIT':12}  {'STATUS':11}  NOTE")
    for row in rows:
        mark = "*" if row["current"] else " "
        notes = [n for n, on in (("current", row["current"]), ("default", row["default"])) if on]
        if row["reason"]:
            notes.append(one_line(row["reason"]))
        print(f"{mark:2}{row['number']:>4}  {one_line(row['date'] or ''):20}  {one_line(row['commit'] or '')[:12]:12}  "
              f"{row['status'] or '':11}  {'; '.join(notes)}")
    return 0


def _previous_good(root: Path, before: int) -> Generation:
    for gen in reversed(list_generations(root)):
        if gen.number < before and gen.status in GOOD:
            return gen
    raise KioskError("no earlier good generation to roll back to", hint="see: kiosk generations")


def _check_number(number: int | None) -> None:
    """Before anything is locked or changed: N as typed is a generation number at all."""
    if number is not None and number < 1:
        raise UsageError(f"there is no generation {number}: generations are numbered from 1",
                         hint="see: kiosk generations")


def _chosen(root: Path, number: int) -> Generation:
    """Generation N as a person named it on the command line: it exists and is not damaged."""
    _check_number(number)
    if not exists(root, number):
        raise UsageError(f"there is no generation {number}", hint="see: kiosk generations")
    gen = generation(root, number)
    if gen.damage:
        raise KioskError(f"generation {number} is damaged: {gen.damage}", hint="choose another (kiosk generations)")
    return gen


def cmd_rollback(args) -> int:
    root = _root(args)
    _check_number(args.generation)
    log = Log()
    activator = activation.from_env(root)
    with device_lock(root, "kiosk rollback", log):
        recover(root, activator, log)
        cur = current(root)
        if cur is None:
            raise KioskError("no current generation")
        target = _chosen(root, args.generation) if args.generation is not None else _previous_good(root, cur.number)
        if target.number == cur.number:
            raise UsageError(f"generation {target.number} is already current")
        if target.status == "failed":
            log(f"note: generation {target.number} failed before: {target.meta.get('reason')}")
        log.stage(f"rolling back from generation {cur.number} to {target.number}")
        switch_to(root, target, mode="switch", purpose="manual-rollback", activator=activator, log=log)
    return 0


def cmd_switch(args) -> int:
    root = _root(args)
    _check_number(args.generation)
    log = Log()
    activator = activation.from_env(root)
    if args.recover:
        with device_lock(root, "kiosk switch --recover", log):
            changed = recover(root, activator, log, at_boot=args.at_boot)
        problems = verify(root) if current(root) else ["no current generation"]
        for problem in problems:
            log(f"inconsistent: {problem}")
        if not problems:
            log(f"generation {pointer(root, 'current')} is linked"
                + (" (recovered)" if changed else " (nothing to recover)"))
        return 1 if problems else 0
    if args.mode is None:
        args.mode = "switch"
    with device_lock(root, f"kiosk switch {args.mode}", log):
        recover(root, activator, log)
        if args.generation is not None:
            target = _chosen(root, args.generation)
        else:
            candidates = [g for g in list_generations(root) if g.status not in ("failed", DAMAGED)]
            if not candidates:
                raise KioskError("no generation to switch to")
            target = candidates[-1]
        switch_to(root, target, mode=args.mode, purpose="switch", activator=activator, log=log)
    return 0


def register(sub) -> None:
    import argparse

    def add_root(p):
        p.add_argument("--root", default=None, help=argparse.SUPPRESS)   # default: KIOSK_ROOT, else /

    p = sub.add_parser("generations", help="the device's generations: number, date, commit, status, current",
                       description="List the generations on this device (run on the device).")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_root(p)
    p.set_defaults(func=cmd_generations)

    p = sub.add_parser("rollback", help="switch back to the previous good generation (or generation N)",
                       description="Switch the device back to an earlier generation, activate it and check its "
                                   "health; the generation left is marked rolled-back.")
    p.add_argument("generation", nargs="?", type=int, metavar="N", help="the generation (default: the previous good one)")
    add_root(p)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("switch", help="make a generation current: switch|boot|test|dry-activate; --recover",
                       description="switch: make generation N current and the boot default, and activate it now; "
                                   "boot: make it the boot default only (nothing changes until the next boot); "
                                   "test: activate it now but keep the boot default (the next boot returns); "
                                   "dry-activate: print what would change. N defaults to the newest generation "
                                   "that did not fail. --recover finishes or undoes an interrupted switch "
                                   "(kiosk-recover.service runs it at boot).")
    p.add_argument("mode", nargs="?", choices=("switch", "boot", "test", "dry-activate"))
    p.add_argument("generation", nargs="?", type=int, metavar="N")
    p.add_argument("--recover", action="store_true", help="finish or undo an interrupted switch")
    p.add_argument("--at-boot", action="store_true", help=argparse.SUPPRESS)
    add_root(p)
    p.set_defaults(func=cmd_switch)
