"""`kiosk update HOST [SPEC]`: a whole new system for a running kiosk, in its other root slot, kept only
when it comes up healthy (notes/ab-update.md).

The system is built with `kiosk build`'s pipeline and caches (the spec given, else the one the device
runs: its configuration.git main), its root partition goes into a RAUC bundle signed with the user's
key, ssh carries it to the device's data partition, `rauc install` checks the signature and writes the
inactive slot, and one reboot tries it. By default only what changed is shipped (kiosk.update.chunks: RAUC's
casync bundles, the running slot as the seed); the whole bundle goes when the device or this machine cannot
do that (one line says why) or with --whole-bundle. The device judges it (kiosk slot commit: the push's health
check) and falls back by itself; this command waits for the verdict and prints one line.

What a slot holds is the system: packages, kernel, initramfs. The configuration stays the device's
current generation on its data partition (git push changes it, live). So a SPEC whose configuration
differs from the device's is refused: push that first.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

from kiosk.core import paths
from kiosk.core.errors import KioskError, UsageError, one_line
from kiosk.core.files import human_size
from kiosk.core.log import Log
from kiosk.core.run import run, start
from kiosk.image.rauc import RAUC_CHUNK_STORE
from kiosk.net import reach
from kiosk.device.slots import FRESH_RAUC, BundleRefused, rauc_install
from kiosk.builders.chunkstore import ChunkServer
from kiosk.image.bundle import make_chunked, store_size
from kiosk.update.chunks import WAIT_FOR_STORE, forwarded

INCOMING = "/data/kiosk/incoming"
BUNDLE = f"{INCOMING}/update.raucb"
# Fixed remote commands: nothing from the spec or the command line reaches the device's shell.
RECEIVE = f"mkdir -p {INCOMING} && cat > {BUNDLE}.part && sync {BUNDLE}.part && mv -f {BUNDLE}.part {BUNDLE}"
INSTALL = f"{FRESH_RAUC}; rauc install {BUNDLE} 2>&1; rc=$?; rm -f {BUNDLE}; exit $rc"   # slots.FRESH_RAUC: why
BOOT_ID = "cat /proc/sys/kernel/random/boot_id"
SLOT_STATUS = "kiosk slot status --json"
SPEC_ON_DEVICE = "git -C /etc/kiosk/configuration.git show main:nixiosk.json"
# Can the device take a chunked bundle: casync installed, and RAUC's chunk store where kiosk forwards it.
CAN_TAKE_CHUNKS = f"test -x /usr/bin/casync && grep -qxF 'storepath={RAUC_CHUNK_STORE}' /etc/rauc/system.conf"
INSTALL_CHUNKED = f"{WAIT_FOR_STORE} && {INSTALL}"
NO_CHUNKS = ("its system has no casync chunk store set up (built before kiosk shipped chunks; "
             "the system this update brings has it)")


def _ssh(ssh: list[str], command: str, *, what: str, timeout: float = 120, check: bool = True):
    return run([*ssh, command], what=what, timeout=timeout, check=check,
               hint="is the kiosk up and your key in its authorizedKeys? (ssh root@HOST)")


def slot_status(ssh: list[str]) -> dict:
    status = _status_of(_ssh(ssh, SLOT_STATUS, what="kiosk slot status").stdout)
    if status is None:
        raise KioskError(f"the device's `{SLOT_STATUS}` printed no JSON",
                         hint="is kiosk on the device as new as this one?")
    return status


def _status_of(text: str) -> dict | None:
    try:
        status = json.loads(text)
    except ValueError:
        return None
    return status if isinstance(status, dict) else None


def _device_spec(ssh: list[str]) -> str:
    return _ssh(ssh, SPEC_ON_DEVICE, what="reading the device's nixiosk.json").stdout


def config_differences(a: dict, b: dict) -> list[str]:
    """Paths of the configuration layer two specs render differently (what a slot does not carry)."""
    from kiosk.config.render import render

    mine, theirs = render(a), render(b)
    ignored = {"/etc/kiosk/release.json"}   # says which packages and spec: the system's, not configuration
    return sorted(p for p in set(mine) | set(theirs) if p not in ignored and mine.get(p) != theirs.get(p))


def _ship(ssh: list[str], bundle: Path, log: Log) -> None:
    """The bundle onto the device's data partition, with bytes and rate every few seconds."""
    total = bundle.stat().st_size
    sent = 0
    started = time.monotonic()
    proc = start([*ssh, RECEIVE], what="ssh", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                 stderr=subprocess.PIPE)
    errors: list[bytes] = []
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
    reader.start()
    last = 0.0
    try:
        with open(bundle, "rb") as f:
            while chunk := f.read(1 << 20):
                proc.stdin.write(chunk)
                sent += len(chunk)
                now = time.monotonic()
                if now - last >= 5 or sent == total:
                    rate = sent / max(now - started, 1e-3)
                    log(f"shipping: {human_size(sent)} of {human_size(total)}, {human_size(int(rate))}/s")
                    last = now
        proc.stdin.close()
    except BrokenPipeError:
        pass
    code = proc.wait()
    reader.join(timeout=5)
    if code != 0 or sent != total:
        text = one_line(b"".join(errors).decode(errors="replace").strip())[-300:]
        raise KioskError(f"shipping the bundle stopped after {human_size(sent)} of {human_size(total)}: "
                         f"{text or f'ssh exited {code}'}", hint="nothing was installed; run kiosk update again")
    log(f"shipped {human_size(total)} in {time.monotonic() - started:.0f} s")


def _install(ssh: list[str], log: Log, command: str = INSTALL) -> None:
    rauc_install([*ssh, command], log)


def _ask(ssh: list[str], command: str, what: str):
    """A question to a device that may be rebooting: None while it does not answer (a refused connection, or
    QEMU's or a router's port accepting while no sshd is up yet, so ssh waits for a banner)."""
    try:
        proc = _ssh(ssh, command, what=what, timeout=60, check=False)
    except KioskError:
        return None
    return proc if proc.returncode == 0 else None


def _wait_for_new_boot(ssh: list[str], old_boot: str, limit: float, log: Log) -> None:
    started = time.monotonic()
    last = started
    while time.monotonic() - started < limit:
        proc = _ask(ssh, BOOT_ID, "waiting for the device")
        if proc and proc.stdout.strip() and proc.stdout.strip() != old_boot:
            log(f"back after {time.monotonic() - started:.0f} s")
            return
        if time.monotonic() - last >= 30:
            log(f"waiting for the device to come back ({time.monotonic() - started:.0f} s)")
            last = time.monotonic()
        time.sleep(5)
    raise KioskError(f"the device did not come back within {limit:.0f} s of its reboot",
                     hint="its boot loader falls back to the old slot by itself if the new one hangs; look at "
                          "its screen or serial console, then `kiosk slot status` on it")


def _verdict(ssh: list[str], target: str, limit: float, log: Log) -> tuple[bool, dict]:
    """(kept, the device's slot status) once the device has judged this install of slot `target`: kept,
    unhealthy with nowhere to go, or failed and back on the other slot."""
    started = time.monotonic()
    last = started
    while time.monotonic() - started < limit:
        proc = _ask(ssh, SLOT_STATUS, "kiosk slot status")
        status = _status_of(proc.stdout) if proc else None
        if status:
            rec = (status.get("record") or {}).get(target) or {}
            installed = (((status.get("rauc") or {}).get("slots") or {}).get(target) or {}).get("installed")
            state = rec.get("state") if rec.get("installed") == installed else None
            if status.get("booted") == target and state in ("good", "unhealthy"):
                return state == "good", status
            if status.get("booted") not in (None, target) and state == "bad":
                return False, status
        if time.monotonic() - last >= 30:
            log(f"waiting for the device's verdict on slot {target} ({time.monotonic() - started:.0f} s)")
            last = time.monotonic()
        time.sleep(5)
    raise KioskError(f"no verdict on slot {target} within {limit:.0f} s",
                     hint="see `kiosk slot status` and journalctl -u kiosk-slot-commit.service on the device")


def cmd_update(args) -> int:
    from kiosk.config.signing import signing_key
    from kiosk.device.slots import other
    from kiosk.image.pipeline import build
    from kiosk.spec import load as specmod
    from kiosk.spec.commands import print_warnings
    from kiosk.config.signing import compatible
    from kiosk.image.bundle import make_bundle

    log = Log()
    ssh = reach.from_args(args)
    log.stage(f"device {args.host}")
    status = slot_status(ssh)
    booted = status.get("booted")
    if not booted:
        raise UsageError(f"{args.host} has no root slots A and B (its board boots one root partition)",
                         hint="change its configuration with git push; a whole new system needs a newly flashed card")
    target = other(booted)
    trial = status.get("trial")
    if isinstance(trial, dict) and trial.get("state") not in (None, "failed"):
        raise UsageError(f"{args.host} is trying commit {str(trial.get('commit'))[:12]} from a git push in slot "
                         f"{trial.get('slot')}", hint="update it once that try has its verdict (kiosk status HOST)")
    device_text = _device_spec(ssh)
    device_spec = specmod.loads(device_text, f"{args.host}:nixiosk.json")
    if args.spec:
        spec = specmod.load(Path(args.spec))
        print_warnings(spec)
        if spec.data["hardware"] != device_spec.data["hardware"]:
            raise UsageError(f"{args.spec}: /hardware is {spec.data['hardware']}, the device is a "
                             f"{device_spec.data['hardware']}", hint="an update is built for the device's own board")
        differ = config_differences(spec.data, device_spec.data)
        if differ:
            raise UsageError(f"{args.spec} configures the device differently from what it runs ({', '.join(differ[:6])}"
                             f"{', ...' if len(differ) > 6 else ''})",
                             hint="kiosk update ships the system (packages, kernel); git push the configuration first")
    else:
        spec = device_spec
    rauc_compatible = (status.get("rauc") or {}).get("compatible")
    if rauc_compatible and rauc_compatible != compatible(spec.data["hardware"]):
        raise UsageError(f"{args.host} takes {rauc_compatible} bundles, not {compatible(spec.data['hardware'])}")
    log(f"slot {booted} runs; the new system goes into slot {target}")
    chunks = not args.whole_bundle and _can_take_chunks(ssh)
    if args.whole_bundle:
        log("shipping the whole bundle (--whole-bundle)")
    elif not chunks:
        log(f"shipping the whole bundle: {NO_CHUNKS}")

    out_dir = paths.cache_dir() / "update" / spec.data["hostName"]
    out_dir.mkdir(parents=True, exist_ok=True)
    key = signing_key(log=log)
    manifest = build(spec, spec.text, out_dir, log=log, update_cert=key.cert.read_text(), upgrade=args.upgrade)
    with log.timed("bundle"):
        version = f"{manifest['imageSha256'][:16]}"
        bundle = make_bundle(Path(manifest["image"]), out_dir / "update.raucb", board=spec.data["hardware"],
                             version=version, description=f"kiosk update of {spec.data['hostName']}",
                             key=key, log=log)
    chunked = None
    if chunks:
        with log.timed("chunks"):
            try:
                chunked = make_chunked(bundle, key, log=log)
            except KioskError as exc:
                log(f"shipping the whole bundle: this machine could not make a chunked one ({exc.message})")
    kept, status = deliver(ssh, bundle, target, log, chunked)
    return report(args.host, target, version, kept, status)


def _can_take_chunks(ssh: list[str]) -> bool:
    return _ssh(ssh, CAN_TAKE_CHUNKS, what="asking whether the device takes chunked bundles",
                check=False).returncode == 0


def _deliver_chunks(ssh: list[str], chunked: tuple[Path, Path], whole: int, log: Log) -> bool:
    """The index bundle shipped, then `rauc install` on the device with the chunk store forwarded to it:
    True when installed; False (said in one line) when the chunked install failed for a reason a whole
    bundle does not share. A signature refusal is raised (BundleRefused), as for a whole bundle."""
    index, store = chunked
    index_size = index.stat().st_size
    with log.timed("ship"):
        _ship(ssh, index, log)
    with log.timed("install"), ChunkServer(store) as server, server.reporting(log):
        try:
            _install(forwarded(ssh, server.port), log, INSTALL_CHUNKED)
        except BundleRefused:
            raise
        except KioskError as exc:
            log(f"the chunked install failed ({exc.message}): shipping the whole bundle instead")
            return False
    count, size = server.figures()
    total = index_size + size
    stored, _ = store_size(store)
    log(f"shipped {human_size(total)} in all, {100 * total / max(whole, 1):.1f}% of the whole bundle "
        f"({human_size(whole)}): the index bundle {human_size(index_size)} and {count} of {stored} chunks "
        f"{human_size(size)}; the rest came from the running slot")
    return True


def deliver(ssh: list[str], bundle: Path, target: str, log: Log,
            chunked: tuple[Path, Path] | None = None) -> tuple[bool, dict]:
    """Ship a bundle (only the chunks the device lacks when `chunked`, kiosk.update.chunks.make_chunked's
    (index bundle, store) of it, is given), install it into slot `target`, reboot once and wait for the
    device's verdict: (kept, the device's slot status). The bundle files are removed afterwards."""
    try:
        if not (chunked and _deliver_chunks(ssh, chunked, bundle.stat().st_size, log)):
            with log.timed("ship"):
                _ship(ssh, bundle, log)
            with log.timed("install"):
                _install(ssh, log)
    finally:
        bundle.unlink(missing_ok=True)
        if chunked:
            chunked[0].unlink(missing_ok=True)
            shutil.rmtree(chunked[1], ignore_errors=True)
    log.stage("reboot into the new system")
    old_boot = _ssh(ssh, BOOT_ID, what="reading the boot id").stdout.strip()
    _ask(ssh, "systemctl reboot", "systemctl reboot")   # the connection may drop or hang as the device goes down
    limit = paths.number_setting("KIOSK_UPDATE_BOOT_SECONDS", 900, least=30)
    with log.timed("boot"):
        _wait_for_new_boot(ssh, old_boot, limit, log)
    with log.timed("health"):
        return _verdict(ssh, target, limit, log)


def report(host: str, target: str, version: str, kept: bool, status: dict) -> int:
    """The one result line; 0 when the new system was kept."""
    rec = (status.get("record") or {}).get(target) or {}
    if kept:
        print(f"{host}: kept: slot {target} runs the new system {version}, healthy")
        return 0
    if status.get("booted") == target:
        print(f"{host}: not healthy, kept for want of a better slot: {rec.get('reason') or 'unknown'}")
        return 1
    print(f"{host}: rolled back: slot {target} failed ({rec.get('reason') or 'no reason recorded'}); "
          f"slot {status.get('booted')} runs the old system")
    return 1


def register(sub) -> None:
    p = sub.add_parser("update", help="a whole new system for a kiosk: built here, tried once in its other root "
                                      "slot, kept only when healthy",
                       description="Build the kiosk's system (SPEC, or the nixiosk.json it runs) with kiosk build's "
                                   "pipeline, ship it as a bundle signed with your update key, install it into the "
                                   "device's inactive root slot, reboot into it once and wait for the device's "
                                   "verdict: kept (healthy) or rolled back (the device returns to the old slot by "
                                   "itself). Configuration changes go by git push.")
    reach.add_arguments(p)
    p.add_argument("spec", nargs="?", metavar="SPEC", help="nixiosk.json to build from (default: the device's own)")
    p.add_argument("--upgrade", action="store_true",
                   help="the archive's current versions (Debian's security fixes and updates): build the cached "
                        "base again if the archive has changed since it was cached")
    p.add_argument("--whole-bundle", action="store_true",
                   help="ship the whole system (~300 MB) rather than only the chunks the device's running slot "
                        "lacks")
    p.set_defaults(func=cmd_update)
