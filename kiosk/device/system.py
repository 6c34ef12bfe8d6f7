"""A push that changes the system of an A/B board: built by a builder, tried once in the other root slot.

Packages are never installed in place on a board with root slots. When a push changes what the system
holds (packages, Debian's suites, an upgrade asked for with /debian/upgrade), pre-receive asks a builder
for the whole new system as an update bundle (its `bundle` request: `kiosk build`'s pipeline, signed with
the key the device trusts), `rauc install` writes it into the inactive slot, the pushed configuration
becomes generation N as `default` (what the next boot runs), and trial.json records the try. git then
moves main: main names the commit whose trial is under way. post-receive restarts the device into the
new slot. There:

- kiosk-recover (early at boot) links generation N when the boot loader chose the trial's slot; when it
  chose the old slot (the new one panicked, hung, or failed its health check and restarted), generation
  N is marked failed, the old one is linked again and main is set back to the old commit;
- kiosk slot commit (after the boot) keeps the new slot when healthy and ends the trial, or marks it bad
  and restarts into the old slot, whose recover then does the above.

So `main` only ever names what the device runs or the commit it is trying; after a failed trial it names
the old commit again. Config-only pushes never come here (today's live switch).
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from pathlib import Path

from kiosk.builders.wire import PROTOCOL, BadAnswer
from kiosk.config.signing import RAUC_CERTIFICATE, compatible
from kiosk.core.errors import KioskError, one_line
from kiosk.core.files import human_size, remove_durable
from kiosk.core.log import Log
from kiosk.core.paths import RAUC_CHUNK_PORT, RAUC_CHUNK_STORE
from kiosk.core.run import run
from kiosk.device.pending import process_start, repo_main
from kiosk.device.slots import (FALLBACK_REASON, BundleRefused, booted_slot, bundle_info, install_here, other,
                                rauc_install, rauc_mark, rauc_status, read_record)
from kiosk.device.store import (DamagedState, generation, read_state, repo_dir, set_pointer, state_dir,
                                update_meta, write_state)
from kiosk.device.switch import update_default_marker

TRIAL = "trial.json"
FIELDS = {"commit": str, "previousCommit": str, "generation": int, "previous": int, "slot": str, "state": str}
DEBIAN_FIELDS = ("mirror", "security", "updates", "securityMirror", "upgrade")
NO_BUILDER = "start a builder (kiosk builders check on the device says which answers), then push again"


def slot_here(root: Path) -> str | None:
    """The root slot the device booted (rauc.slot= on ROOT/proc/cmdline), None on a board without slots."""
    try:
        return booted_slot((Path(root) / "proc/cmdline").read_text())
    except OSError:
        return None


def system_changes(running: dict, data: dict, added: list[str], removed: list[str]) -> list[str]:
    """What a push changes in the system itself (not the configuration): what makes it a new slot."""
    changes = []
    if added or removed:
        changes.append("packages " + " ".join([f"+{p}" for p in added] + [f"-{p}" for p in removed]))
    old = running.get("debian") if isinstance(running.get("debian"), dict) else {}
    for field in DEBIAN_FIELDS:
        if old.get(field) != data["debian"].get(field):
            changes.append(f"/debian/{field}")
    return changes


def _trial_path(root: Path) -> Path:
    return state_dir(root) / TRIAL


def read_trial(root: Path) -> dict | None:
    """The trial under way (trial.json), None; a damaged one is removed (the device keeps what it runs)."""
    try:
        return read_state(_trial_path(root), FIELDS)
    except DamagedState:
        remove_durable(_trial_path(root))
        return None


def _write_trial(root: Path, trial: dict) -> None:
    write_state(_trial_path(root), trial)


def clear_trial(root: Path) -> None:
    remove_durable(_trial_path(root))


def package_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """The push's package lines: added, removed and changed versions, by name."""
    lines = []
    for name in sorted(set(before) | set(after)):
        old, new = before.get(name), after.get(name)
        if old is None:
            lines.append(f"+ {name} {new}")
        elif new is None:
            lines.append(f"- {name} {old}")
        elif old != new:
            lines.append(f"  {name} {old} -> {new}")
    return lines


def _installed(root: Path) -> dict[str, str]:
    from kiosk.device.facts import installed_packages
    try:
        return {name: version for name, version, *_ in installed_packages(root)}
    except KioskError:
        return {}


def fetch_bundle(root: Path, data: dict, spec_text: str, *, upgrade: bool, work: Path,
                 log: Log, chunks: bool = True) -> tuple[Path, dict, list[str]]:
    """(bundle, the builder's answer, the ssh argv that reaches that builder again) from the first builder that
    builds this spec's system; KioskError when none could. Its signature is checked here against the
    certificate this device trusts before anything is written. chunks=False asks for the whole bundle even
    where casync could take an index bundle."""
    from kiosk.builders.select import device_architecture
    from kiosk.device.fetch import fetch_from_builders

    cert = Path(root) / RAUC_CERTIFICATE.lstrip("/")
    try:
        cert_text = cert.read_text()
    except OSError as exc:
        raise KioskError(f"{cert}: {exc.strerror}: this device cannot check an update bundle",
                         hint="reflash it with an image kiosk built (it carries the update certificate)") from None
    request = {"kiosk": PROTOCOL, "op": "bundle", "architecture": device_architecture(data), "spec": spec_text,
               "updateCertificate": cert_text, "upgrade": upgrade, "chunks": chunks and takes_chunks(root)}

    def accept(header: dict, files: dict[str, Path], argv: list[str]) -> tuple[tuple[Path, dict, list[str]], str]:
        bundle = files.get("update.raucb")
        if bundle is None:
            raise BadAnswer("the answer holds no update.raucb")
        try:
            info = bundle_info(bundle, cert)
        except KioskError as exc:
            raise BadAnswer(f"the bundle is not signed by the key this device trusts ({one_line(exc.message)[:160]})") \
                from None
        if info.get("compatible") != compatible(data["hardware"]):
            raise BadAnswer(f"the bundle is for {info.get('compatible')}, this device takes {compatible(data['hardware'])}")
        said = f"bundle {human_size(bundle.stat().st_size)}, signature checked"
        chunks = header.get("chunks") if isinstance(header.get("chunks"), dict) else {}
        if header.get("chunkStore"):
            said += (f" (the casync index of the system: the slot takes what it lacks of {chunks.get('count', '?')} "
                     f"chunks, {human_size(int(chunks.get('bytes') or 0))}, from the builder during the install)")
        return (bundle, header, argv), said

    found = fetch_from_builders(root, data, request, work, log, accept=accept)
    if found is None:
        raise NoBuilder(f"no builder could build this system ({data['hardware']}); nothing on the device was changed",
                         hint=NO_BUILDER)
    return found


class NoBuilder(KioskError):
    """No builder built the system: the device may build it itself (kiosk.device.selfbuild), or refuse."""


def takes_chunks(root: Path) -> bool:
    """Whether this system installs casync index bundles: casync there, RAUC's store where the relay serves."""
    root = Path(root)
    try:
        conf = (root / "etc/rauc/system.conf").read_text()
    except OSError:
        return False
    return (root / "usr/bin/casync").exists() and f"storepath={RAUC_CHUNK_STORE}" in conf.splitlines()


def _install(root: Path, bundle: Path, header: dict, argv: list[str], log: Log) -> None:
    """`rauc install`; for an index bundle with the chunks it lacks (what the running slot does not hold)
    fetched from the builder that made it, through RAUC's chunk store address on this device."""
    store = header.get("chunkStore")
    if not isinstance(store, str):
        rauc_install(install_here(bundle), log)
        return
    from kiosk.builders.client import ChunkSession
    from kiosk.builders.chunkstore import ChunkServer

    with ChunkSession(argv, store, relay=lambda line: log(f"builder: {line}")) as session, \
            ChunkServer(source=session.get, port=RAUC_CHUNK_PORT) as relay, relay.reporting(log):
        rauc_install(install_here(bundle), log)
    count, size = relay.figures()
    whole = int((header.get("chunks") or {}).get("wholeBundle") or 0)
    log(f"shipped {human_size(bundle.stat().st_size + size)} in all: the index bundle "
        f"{human_size(bundle.stat().st_size)} and {count} chunks {human_size(size)}"
        + (f", against {human_size(whole)} for the whole bundle" if whole else "")
        + "; the rest came from the running slot")


def _install_or_whole(root: Path, bundle: Path, header: dict, argv: list[str], data: dict, spec_text: str,
                      upgrade: bool, work: Path, log: Log) -> None:
    """_install; when an index bundle's install fails for a reason the whole bundle does not share (its
    chunks did not come: the builder pruned its store, the second session broke), the whole bundle from a
    builder, installed once more. A signature refusal is final: the whole bundle carries the same signer."""
    try:
        _install(root, bundle, header, argv, log)
        return
    except BundleRefused:
        raise
    except KioskError as exc:
        if not header.get("chunkStore"):
            raise
        log(f"the chunked install failed ({one_line(exc.message)[:200]}): asking for the whole bundle instead")
    bundle.unlink(missing_ok=True)   # the index bundle: the data partition's room goes to the whole one
    whole = work / "whole"
    whole.mkdir()
    bundle, header, argv = fetch_bundle(root, data, spec_text, upgrade=upgrade, work=whole, log=log, chunks=False)
    _install(root, bundle, header, argv, log)


def _incoming(root: Path, log: Log):
    """On the data partition (/var/lib/kiosk is there on A/B boards), not the slot or /tmp (RAM); what a push
    that never finished left there is removed first."""
    from kiosk.device.selfbuild import clear_stale

    base = state_dir(root) / "incoming"
    base.mkdir(parents=True, exist_ok=True)
    clear_stale(base, log)
    return tempfile.TemporaryDirectory(prefix="system-", dir=base)


def _build_here(root: Path, data: dict, no_builder: NoBuilder, *, added: list[str], removed: list[str],
                upgrade: bool, commit: str, work: Path, log: Log) -> tuple[Path, dict, list[str]]:
    """No builder answered: the system built on this device when its board and spec allow it, else the refusal."""
    from kiosk.device import selfbuild

    why_not = selfbuild.why_not_here(data)
    if why_not:
        raise KioskError(f"{no_builder.message} ({why_not})", hint=no_builder.hint)
    log(f"no builder built it: this {data['hardware']} builds its new system itself (allowLocalBuild)")
    bundle, header = selfbuild.build_here(root, data, added=added, removed=removed, upgrade=upgrade, commit=commit,
                                          work=work, log=log)
    return bundle, header, []


def start_trial(root: Path, gen, cur, *, commit: str, old_commit: str, data: dict, spec_text: str,
                running: dict, changes: list[str], pid: int, log: Log, added: list[str] = (),
                removed: list[str] = ()) -> None:
    """Build (on a builder, or on the device itself), receive and install the pushed system into the other slot;
    generation `gen` boots next. KioskError when any of it fails: then nothing but the inactive slot was written."""
    booted = slot_here(root)
    target = other(booted)
    log.stage(f"a new system for slot {target} (slot {booted} runs): {'; '.join(changes)}")
    upgrade = (running.get("debian") or {}).get("upgrade") != data["debian"].get("upgrade")
    with _incoming(root, log) as tmp:
        try:
            bundle, header, argv = fetch_bundle(root, data, spec_text, upgrade=upgrade, work=Path(tmp), log=log)
        except NoBuilder as exc:
            suites = any(c.startswith("/debian/") for c in changes)
            bundle, header, argv = _build_here(root, data, exc, added=list(added), removed=list(removed),
                                               upgrade=upgrade or suites, commit=commit, work=Path(tmp), log=log)
        after = {p["name"]: p["version"] for p in header.get("packages") or []
                 if isinstance(p, dict) and isinstance(p.get("name"), str) and isinstance(p.get("version"), str)}
        lines = package_changes(_installed(root), after) if after else []
        log.stage(f"packages that change: {len(lines) or 'none'}")
        for line in lines:
            log(line)
        # recorded before the slot is touched: a power cut during or just after the install is then a
        # try the next boot undoes (settle_at_boot), never a new system kept on the old generation
        trial = {"commit": commit, "previousCommit": old_commit, "generation": gen.number, "previous": cur.number,
                 "slot": target, "state": "installing", "installed": None, "version": header.get("version") or "",
                 "pid": pid, "pidStart": process_start(pid), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write_trial(root, trial)
        log.stage(f"install into slot {target}")
        try:
            _install_or_whole(root, bundle, header, argv, data, spec_text, upgrade, Path(tmp), log)
        except BaseException:
            clear_trial(root)   # RAUC leaves a slot it could not finish out of the boot order
            raise
    trial["installed"] = (rauc_status()["slots"].get(target) or {}).get("installed")
    trial["state"] = "installed"
    _write_trial(root, trial)
    set_pointer(root, "default", gen.number)
    update_default_marker(root)
    log.stage(f"slot {target} holds commit {commit[:12]}'s system; the device restarts into it once git has "
              f"recorded this push")


def confirm(root: Path, commit: str, activator, log: Log) -> bool:
    """post-receive: git recorded the push of a trial: restart into the new slot (True), or nothing to do."""
    trial = read_trial(root)
    if not trial or trial["commit"] != commit or trial["state"] != "installed" or repo_main(root) != commit:
        return False
    trial["state"] = "rebooting"
    _write_trial(root, trial)
    log.stage(f"main is at {commit[:12]}: the device restarts into slot {trial['slot']} to try it")
    log(f"kept if it comes up healthy; otherwise the device returns to slot {other(trial['slot'])} by itself, "
        f"on generation {trial['previous']}, and main goes back to {trial['previousCommit'][:12]}")
    log("follow it with: kiosk status HOST (or git fetch: main says what runs)")
    activator.reboot_soon()
    return True


def waiting_trial(root: Path, activator, log: Log) -> str | None:
    """Before a push (holding the lock): a sentence why the push must wait for the trial under way, or None.
    A trial whose push git never recorded (receive-pack gone, main elsewhere) is undone first; one git recorded
    whose restart never came (post-receive did not run) restarts now."""
    trial = read_trial(root)
    if not trial or trial["state"] == "failed":
        return None
    pid = trial.get("pid") if isinstance(trial.get("pid"), int) else 0
    started = process_start(pid) if pid else None
    recording = started is not None and started == trial.get("pidStart")
    if repo_main(root) == trial["commit"]:
        if trial["state"] == "installed" and not recording:
            confirm(root, trial["commit"], activator, log)
        return (f"the device is trying commit {trial['commit'][:12]} in slot {trial['slot']}; push again once it has "
                f"a verdict (kiosk status HOST)")
    if recording:
        return f"the push of commit {trial['commit'][:12]} is still being recorded; push again in a moment"
    cancel(root, trial, "its push did not complete (git did not record it)", log)
    return None


def cancel(root: Path, trial: dict, reason: str, log: Log) -> None:
    """On the running system: the trial's slot never boots (marked bad), its generation failed."""
    with contextlib.suppress(KioskError):
        rauc_mark("bad", "other")
    _fail(root, trial, reason, log)
    clear_trial(root)


def _fail(root: Path, trial: dict, reason: str, log: Log) -> None:
    """Generation N failed, the previous one is what boots, main names the old commit again."""
    gen = generation(root, trial["generation"])
    update_meta(gen, status="failed", reason=f"its system in slot {trial['slot']} failed: {reason}")
    set_pointer(root, "default", trial["previous"])
    update_default_marker(root)
    if repo_main(root) == trial["commit"]:
        run(["git", f"--git-dir={repo_dir(root)}", "update-ref", "-m", f"kiosk: trial of {trial['commit'][:12]} failed",
             "refs/heads/main", trial["previousCommit"], trial["commit"]], drop_env=("GIT_",),
            what="setting main back")
    log(f"the trial of commit {trial['commit'][:12]} in slot {trial['slot']} failed ({reason}): generation "
        f"{trial['previous']} and commit {trial['previousCommit'][:12]} again")
    trial["state"] = "failed"
    trial["reason"] = reason


def settle_at_boot(root: Path, log: Log) -> bool:
    """Early at boot (kiosk-recover): which generation this boot runs. The trial's, when the boot loader chose
    its slot and main names it; else the trial failed. True when anything changed."""
    trial = read_trial(root)
    if not trial or trial["state"] == "failed":
        return False
    booted = slot_here(root)
    if booted == trial["slot"] and repo_main(root) == trial["commit"]:
        if trial["state"] != "trying":
            trial["state"] = "trying"
            _write_trial(root, trial)
        return False
    if booted == trial["slot"]:
        reason = "its push did not complete (git did not record it)"
    elif trial["state"] == "installing":
        reason = f"the device restarted before its install into slot {trial['slot']} was recorded (a power cut?)"
    else:
        rec = read_record(root).get(trial["slot"]) or {}
        same = rec.get("installed") == trial.get("installed") and rec.get("state") in ("bad", "unhealthy")
        reason = rec.get("reason") if same and rec.get("reason") else FALLBACK_REASON
    _fail(root, trial, reason, log)
    _write_trial(root, trial)
    return True


def after_verdict(root: Path, booted: str, kept: bool, log: Log) -> bool:
    """kiosk slot commit's verdict ends a trial. True when the booted slot must be left (a trial that failed
    but runs: its push never completed), for the caller to mark bad and restart."""
    trial = read_trial(root)
    if not trial:
        return False
    if trial["state"] == "failed":
        if booted == trial["slot"]:
            return True
        clear_trial(root)
        return False
    if booted != trial["slot"]:
        return False
    if kept:
        log(f"commit {trial['commit'][:12]} is kept: slot {booted}, generation {trial['generation']}")
        with contextlib.suppress(KioskError, OSError):
            update_meta(generation(root, trial["previous"]), status="superseded")
    clear_trial(root)
    return False
