"""The device's root slots (A/B boards): which one runs, and keeping a new one only when the kiosk is healthy.

RAUC installs a new system into the inactive slot and makes it the boot loader's first choice for one
try (GRUB: ORDER=B A, and B_TRY is set as it is tried; U-Boot: BOOT_ORDER=B A with BOOT_B_LEFT=1, counted
down as it is tried). Nothing commits it but `kiosk slot commit`
(kiosk-slot-commit.service, every boot): once the system has started and the kiosk passes the push's
health check, `rauc status mark-good booted`; when the check fails and the other slot is known good,
`mark-bad booted` and a reboot into the other slot. A hang, a panic or a power cut before the verdict
ends in a reset (watchdog, panic=) and the boot loader's own fallback: the next boot, in the old slot,
sees that the boot loader's first choice is not the slot it booted, and records why.

The verdicts live in /var/lib/kiosk/slots.json, on the data partition both slots mount: `kiosk slot
status --json` prints them with RAUC's view, and `kiosk update` reads them to say kept or rolled back.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from kiosk.core import paths
from kiosk.core.errors import KioskError, one_line
from kiosk.core.files import read_json, write_json
from kiosk.core.log import Log
from kiosk.core.paths import device_root, number_setting
from kiosk.core.run import run, run_lines
from kiosk.device import activation, screen
from kiosk.device.store import state_dir

SLOTS_FILE = "slots.json"
NAMES = ("A", "B")
FALLBACK_REASON = ("it was tried and never came up healthy before the device restarted (a hang ended by the "
                   "watchdog, a kernel panic, a power cut or an interrupted install)")
HINT = "see journalctl -u kiosk-slot-commit.service on the device"
BUNDLE_HINT = "kiosk makes and checks update bundles with rauc (apt install rauc squashfs-tools)"


def booted_slot(cmdline: str) -> str | None:
    """The slot the boot loader chose (`rauc.slot=A|B` on the kernel command line), None on other boards."""
    match = re.search(r"(?:^|\s)rauc\.slot=([AB])(?:\s|$)", cmdline)
    return match.group(1) if match else None


def other(slot: str) -> str:
    return "B" if slot == "A" else "A"


def parse_rauc_status(text: str) -> dict:
    """`rauc status --detailed --output-format=json` -> {"compatible", "booted": "A", "primary": "B" or None,
    "slots": {"A": {"device", "bootStatus", "version", "installed"}, ...}}."""
    try:
        data = json.loads(text)
        slots = {}
        names = {}
        for entry in data.get("slots") or []:
            for name, slot in entry.items():
                bootname = slot.get("bootname")
                if slot.get("class") != "rootfs" or bootname not in NAMES:
                    continue
                names[name] = bootname
                bundle = ((slot.get("slot_status") or {}).get("bundle") or {})
                installed = ((slot.get("slot_status") or {}).get("installed") or {})
                slots[bootname] = {"device": slot.get("device"), "bootStatus": slot.get("boot_status"),
                                   "version": bundle.get("version"), "installed": installed.get("timestamp")}
        return {"compatible": data.get("compatible"), "booted": data.get("booted"),
                "primary": names.get(data.get("boot_primary") or ""), "slots": slots}
    except (ValueError, AttributeError, TypeError):
        raise KioskError("rauc status printed no JSON this kiosk can read", hint=HINT) from None


def rauc_status() -> dict:
    return parse_rauc_status(run(["rauc", "status", "--detailed", "--output-format=json"], timeout=120,
                                 what="rauc status", hint=HINT).stdout)


def rauc_mark(state: str, which: str = "booted") -> None:
    """`rauc status mark-good|mark-bad|mark-active booted|other`: the boot loader's variables."""
    run(["rauc", "status", f"mark-{state}", which], timeout=120, what=f"rauc status mark-{state} {which}", hint=HINT)


def bundle_info(bundle: Path, cert: Path) -> dict:
    """What `rauc info` says of a bundle after checking its signature against cert (KioskError if refused)."""
    proc = run(["rauc", "info", f"--keyring={cert}", "--output-format=json", str(bundle)],
               what=f"checking {Path(bundle).name}", hint=BUNDLE_HINT)
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise KioskError(f"rauc info {bundle}: not the JSON it should print") from None


SIGNATURE_REFUSED = ("signature verification failed", "failed to verify x509 cert")

# RAUC 1.8 (bookworm's) lends system.conf's storepath to the first bundle its service checks and frees it
# with that bundle, so the same service's next install reads freed memory: "Copying image to rootfs.0
# failed", "RAUC service disappeared" (fixed in RAUC 1.11.1, rauc/rauc#1320). Seen on raspberryPi3 after
# a refused bundle. Every install kiosk starts stops the service first; D-Bus starts a fresh one.
FRESH_RAUC = "systemctl stop rauc.service"


def install_here(bundle: Path) -> list[str]:
    """`rauc install BUNDLE` on this device, by a fresh RAUC service (FRESH_RAUC); the path is an argument,
    never shell text."""
    return ["sh", "-c", f'{FRESH_RAUC}; exec rauc install "$1"', "sh", str(bundle)]


class BundleRefused(KioskError):
    """RAUC on the device refused the bundle's signature: shipping it another way changes nothing."""


def rauc_install(argv: list[str], log) -> None:
    """`rauc install` (argv: run here, or through ssh on the device) with its progress as `rauc:` lines; a
    signature refusal in kiosk's words (BundleRefused), any other failure one line (the slot not switched)."""
    lines: list[str] = []

    def line(text: str) -> None:
        lines.append(text)
        if text.strip():
            log(f"rauc: {text.strip()}")

    try:
        run_lines(argv, line, what="rauc install")
    except KioskError:
        # RAUC's own words for a signature it refuses (src/signature.c); not its progress ("Verifying
        # signature", "Verified inline signature by ..."), which precedes every later failure too
        said = " ".join(lines).lower()
        if any(words in said for words in SIGNATURE_REFUSED):
            raise BundleRefused("the device refused the bundle: it is not signed by the key this device trusts",
                                hint=f"the device was made with another update key than {paths.cache_dir()}/"
                                     "update-signing: update it with the key it was built with, or reflash it") from None
        raise KioskError(f"rauc install on the device failed: {one_line(lines[-1] if lines else '')}",
                         hint="no slot was switched: the device runs what it ran") from None


def read_record(root: Path) -> dict:
    try:
        data = read_json(state_dir(root) / SLOTS_FILE)
    except (OSError, ValueError):
        return {}   # a damaged record is rebuilt by the next verdicts
    return data if isinstance(data, dict) else {}


def record(root: Path, slot: str, state: str, reason: str = "", **extra) -> dict:
    data = read_record(root)
    data[slot] = {"state": state, "reason": reason, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}
    write_json(state_dir(root) / SLOTS_FILE, data, durable=True)
    return data


def _wait_for_startup(deadline: float, log: Log) -> None:
    """Until systemd says the boot is over (running or degraded): the health check then sees the boot's
    units, not ones still starting. This unit is Type=exec, so it does not hold the boot up itself."""
    left = max(1.0, deadline - time.monotonic())
    try:
        state = run(["systemctl", "is-system-running", "--wait"], check=False, timeout=left,
                    what="waiting for the boot to finish").stdout.strip()
    except KioskError:
        state = f"still starting after {left:.0f} s"
    log(f"system: {state}")


def commit(root: Path, activator, log: Log, *, cmdline: str, status: dict, limit: float, settle: float,
           mark=rauc_mark, reboot=lambda: None, startup=None) -> int:
    """The verdict on the booted slot (see the module's docstring). Returns 0 when it is kept.

    A verdict belongs to one install of a slot (RAUC's install timestamp): a slot written again is judged
    again, and the other slot written since its last verdict but not the one booted was tried and failed."""
    booted = booted_slot(cmdline)
    if booted is None:
        log("this kiosk has no root slots (no rauc.slot= on the kernel command line): nothing to commit")
        return 0
    deadline = time.monotonic() + limit
    spare = other(booted)
    known = read_record(root)
    mine, theirs = status["slots"].get(booted) or {}, status["slots"].get(spare) or {}
    installed = mine.get("installed")
    version = mine.get("version") or "as flashed"
    spare_rec = known.get(spare) or {}
    untried = theirs.get("installed") and theirs.get("installed") != spare_rec.get("installed")
    if (untried or spare_rec.get("state") == "trying") and theirs.get("bootStatus") != "good":
        # Written since its last verdict, yet the boot loader chose this slot: it was tried and never committed.
        record(root, spare, "bad", FALLBACK_REASON, version=theirs.get("version") or "",
               installed=theirs.get("installed"))
        log(f"slot {spare} failed: {FALLBACK_REASON}; running slot {booted}")
        mark("bad", "other")   # the boot loader never tries it again (GRUB: OK=0; U-Boot: LEFT=0)
        mark("active")         # and the boot order says what runs
    elif status.get("primary") not in (None, booted):
        mark("active")
    mine_rec = known.get(booted) or {}
    if not (mine_rec.get("state") == "good" and mine_rec.get("installed") == installed):
        record(root, booted, "trying", version=version, installed=installed)
    (startup or _wait_for_startup)(deadline, log)
    units = list(activation.HEALTH_UNITS)
    off_by = screen.who_switched_off(root)
    if off_by:   # display.schedule or blanking stopped the kiosk on purpose: its unit is not checked
        units.remove(activation.PROGRAM_UNIT)
        log(f"{activation.PROGRAM_UNIT}: not checked, the screen is switched off ({off_by})")
    log(f"health check of slot {booted}: {', '.join(units)} (up and staying up for {settle:g}s)")
    problems = activator.health(units, settle)
    from kiosk.device import system   # (it imports this module)
    if not problems and system.after_verdict(root, booted, True, log):
        problems = ["it was installed for a push that did not complete (git did not record it)"]
    if not problems:
        mark("good")
        recorded = record(root, booted, "good", version=version, installed=installed)
        remember_order(root, booted, spare_good=(recorded.get(spare) or {}).get("state") == "good", log=log)
        log(f"slot {booted} is healthy: kept")
        return 0
    reason = "; ".join(problems)
    spare_rec = read_record(root).get(spare) or {}
    if spare_rec.get("state") == "good" and theirs.get("bootStatus") == "good":
        record(root, booted, "bad", reason, version=version, installed=installed)
        log(f"slot {booted} is not healthy ({reason}): marked bad, restarting into slot {spare}")
        mark("bad")
        reboot()
        return 1
    record(root, booted, "unhealthy", reason, version=version, installed=installed)
    system.after_verdict(root, booted, False, log)   # a trial stays: main keeps naming what runs
    log(f"slot {booted} is not healthy ({reason}), and slot {spare} is no better choice: staying")
    return 1


def remember_order(root: Path, booted: str, *, spare_good: bool, log: Log) -> None:
    """U-Boot boards: kiosk-slots.txt on the firmware partition says the committed order, for a boot script
    whose uboot.env was lost (Debian's U-Boot keeps no second copy; kiosk.image.uboot). Other boards have
    no such file."""
    from kiosk.device.bootconfig import FIRMWARE_DIR, replace
    from kiosk.config.bootconfig import SLOTS_FILE, TRIES, slots_text

    fat = Path(root) / FIRMWARE_DIR
    if not (fat / SLOTS_FILE).is_file():
        return
    text = slots_text(f"{booted} {other(booted)}", {booted: TRIES, other(booted): TRIES if spare_good else 0})
    if (fat / SLOTS_FILE).read_text() != text:
        try:
            replace(fat, SLOTS_FILE, text.encode())
        except OSError as exc:   # the slot is kept all the same: the file only helps a damaged uboot.env
            log(f"{SLOTS_FILE}: not written ({exc.strerror})")


def slot_state(name: str, record: dict, rauc: dict) -> dict:
    """What the device knows of slot `name` as kiosk status tells it: {"state", "reason", "version"}.

    state: the verdict on the system it holds now (good, bad, unhealthy, trying) when the record judges that
    install; "installed, boots next" / "installed, not tried" for a system RAUC wrote since (an install whose
    reboot is pending); "empty" for a slot never written. An interrupted install leaves RAUC's status file
    naming the previous install (notes/ab-update.md), so a slot the boot loader calls bad is never "good"."""
    rec = record.get(name) or {}
    slot = (rauc.get("slots") or {}).get(name) or {}
    installed = slot.get("installed")
    version = rec.get("version") or slot.get("version") or ""
    if rec.get("state") and rec.get("installed") == installed:
        state = rec["state"]
        if state == "good" and slot and slot.get("bootStatus") not in (None, "good"):
            state = f"bad (the boot loader says {slot.get('bootStatus')}: an install into it was interrupted?)"
        return {"state": state, "reason": rec.get("reason") or "", "version": version}
    if installed:
        nxt = rauc.get("primary") == name and slot.get("bootStatus") == "good"
        return {"state": "installed, boots next" if nxt else "installed, not tried", "reason": "",
                "version": slot.get("version") or ""}
    return {"state": "empty", "reason": "", "version": ""}


def summary(root: Path, cmdline: str) -> dict:
    """{"booted": "A"|"B"|None, "slots": {"A": slot_state, "B": ...}} for kiosk status; None booted (and no
    slots, no rauc asked) on a board with one root partition."""
    booted = booted_slot(cmdline)
    if booted is None:
        return {"booted": None, "slots": {}}
    status = rauc_status()
    record = read_record(root)
    return {"booted": booted, "slots": {name: slot_state(name, record, status) for name in NAMES}}


def cmd_slot(args) -> int:
    root = device_root(args.root)
    if args.action == "status":
        cmdline = Path("/proc/cmdline").read_text()
        from kiosk.device.system import read_trial   # (it imports this module)
        out = {"booted": booted_slot(cmdline), "record": read_record(root), "trial": read_trial(root)}
        if out["booted"]:
            out["rauc"] = rauc_status()
        if args.json:
            json.dump(out, sys.stdout, indent=2)
            print()
        else:
            print(f"booted: slot {out['booted'] or '(none: this kiosk has no root slots)'}")
            for name in NAMES:
                rec = out["record"].get(name) or {}
                rauc = (out.get("rauc") or {}).get("slots", {}).get(name) or {}
                print(f"slot {name}: {rec.get('state', 'unknown')}, boot loader says {rauc.get('bootStatus', '?')}"
                      f", system {rec.get('version') or rauc.get('version') or '?'}"
                      + (f" ({rec['reason']})" if rec.get("reason") else ""))
        return 0
    log = Log()
    limit = number_setting("KIOSK_SLOT_COMMIT_SECONDS", 600, least=10)
    return commit(root, activation.SystemdActivator(), log, cmdline=Path("/proc/cmdline").read_text(),
                  status=rauc_status(), limit=limit, settle=activation.settle_seconds(),
                  reboot=lambda: run(["systemctl", "reboot"], what="systemctl reboot"))


def register(sub) -> None:
    import argparse

    p = sub.add_parser("slot", help="on the device: the root slots A/B and their verdicts (status, commit)",
                       description="status: which root slot runs and what the device knows of each. commit: the "
                                   "health check that keeps a newly installed system, or marks it bad and "
                                   "restarts into the other slot (kiosk-slot-commit.service runs it at boot).")
    p.add_argument("action", choices=("status", "commit"))
    p.add_argument("--json", action="store_true", help="machine-readable status")
    p.add_argument("--root", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_slot)
