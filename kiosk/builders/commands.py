"""`kiosk builders check` (can each builder of a spec serve this device?) and `kiosk builders authorize`
(on a builder: let a device's key in, limited to `kiosk builder-serve`)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from kiosk.builders.client import exchange
from kiosk.builders.keys import device_key_paths, key_fingerprint
from kiosk.builders.select import Builder, device_architecture, effective_builders, known_hosts_text
from kiosk.builders.ssh import BuilderFailure, connect_timeout, probe_all, ssh_argv, ssh_options
from kiosk.builders.wire import PROTOCOL
from kiosk.core.errors import KioskError, UsageError
from kiosk.core.files import human_size, write_atomic
from kiosk.core.paths import STATE


def _default_spec(root: Path) -> str:
    if Path("nixiosk.json").is_file():
        return "nixiosk.json"
    current = Path(root) / STATE / "current/nixiosk.json"
    return str(current) if current.is_file() else "nixiosk.json"


def check_builder(b: Builder, key: Path | None, known_hosts: Path | None, tcp: tuple[str | None, float],
                  work: Path, config: str | None) -> dict:
    """One row of `kiosk builders check`: reachable, what the builder says it can do, round trip."""
    row = {"builder": f"{b.sshUser}@{b.label}", "hostName": b.hostName, "port": b.port, "sshUser": b.sshUser,
           "speedFactor": b.speedFactor, "systems": list(b.systems), "hostKeyPinned": bool(b.publicHostKey),
           "reachable": False, "ok": False, "error": None, "connectMs": None, "rttMs": None}
    problem, seconds = tcp
    if problem:
        row["error"] = f"unreachable: {problem}"
        return row
    row["reachable"] = True
    row["connectMs"] = round(seconds * 1000, 1)
    options = ssh_options(key, known_hosts if b.publicHostKey else None)
    argv = ssh_argv(b, options, config=config)
    started = time.monotonic()
    try:
        header, _ = exchange(argv, {"kiosk": PROTOCOL, "op": "probe"}, work, relay=lambda line: None,
                             timeout=60, key=key)
    except BuilderFailure as failure:
        row["error"] = f"{failure.kind}: {failure}"
        return row
    except KioskError as exc:
        row["error"] = f"failed: {exc}"
        return row
    row["rttMs"] = round((time.monotonic() - started) * 1000, 1)
    for name in ("apt", "hostArchitecture", "architectures", "imageArchitectures", "freeBytes", "cpus", "load1",
                 "version"):
        row[name] = header.get(name)
    row["kioskVersion"] = row.pop("version")
    row["architectures"] = [a for a in row["architectures"] or [] if a in b.systems]
    row["ok"] = bool(row["architectures"])
    if not row["ok"]:
        row["error"] = "apt is not installed there" if not header.get("apt") else "none of its systems"
    return row


def _check_key(b: Builder, data: dict, root: Path, args) -> tuple[Path | None, str | None, str]:
    """The key `check` logs in with: -i, the image's key (--image-dir), the device's own, or the user's."""
    if args.identity:
        return Path(args.identity), "/dev/null", str(args.identity)
    if args.image_dir:
        private, _ = device_key_paths(data, Path(args.image_dir))
        if not private.is_file():
            raise UsageError(f"{private}: no builder key there",
                             hint="kiosk build makes it when the spec names builders")
        return private, "/dev/null", str(private)
    device = root / b.sshKey.lstrip("/")
    if device.is_file() and os.access(device, os.R_OK):
        return device, "/dev/null", b.sshKey
    return None, None, "your own ssh keys"


def _print_table(rows: list[dict], data: dict, arch: str) -> None:
    print(f"{'BUILDER':30}  {'SPEED':>5}  {'STATUS':40}  {'ARCHITECTURES':26}  {'FREE':>9}  {'RTT':>7}")
    for r in rows:
        status = "ok" if r["ok"] else (r["error"] or "not usable")
        if r["ok"]:
            status += f" (kiosk {r.get('kioskVersion')}, {r.get('hostArchitecture')})"
            if not r["hostKeyPinned"]:
                status += ", host key not pinned"
        free = human_size(r["freeBytes"]) if r.get("freeBytes") is not None else ""
        rtt = f"{r['rttMs']:.0f} ms" if r.get("rttMs") is not None else ""
        speed = f"{r['speedFactor']:g}"
        print(f"{r['builder']:30}  {speed:>5}  {status:40}  {' '.join(r.get('architectures') or []):26}  "
              f"{free:>9}  {rtt:>7}")
    usable = sum(1 for r in rows if r["buildsForDevice"])
    print(f"{data['hostName']} ({data['hardware']}, {arch}): {usable} of {len(rows)} builder(s) can build for it")


def cmd_check(args) -> int:
    from kiosk.spec import load as specmod
    from kiosk.spec.commands import print_warnings

    root = Path(args.root)
    spec = specmod.load(args.spec or _default_spec(root))
    print_warnings(spec)
    data = spec.data
    arch = device_architecture(data)
    builders = effective_builders(data)
    if not builders:
        raise UsageError(f"{spec.source}: names no builders", hint="add \"builders\", or Nixiosk's \"localSystem\"")
    with tempfile.TemporaryDirectory(prefix="kiosk-check-") as tmp:
        work = Path(tmp)
        known_hosts = work / "known_hosts"
        known_hosts.write_text(known_hosts_text(builders))
        probes = probe_all(builders, connect_timeout())
        results: list[dict | None] = [None] * len(builders)

        def run(i: int, b: Builder) -> None:
            key, config, note = _check_key(b, data, root, args)
            scratch = work / f"b{i}"
            scratch.mkdir()
            row = check_builder(b, key, known_hosts, probes[i], scratch, config)
            row["key"] = note
            row["buildsForDevice"] = row["ok"] and arch in row["architectures"] and bool(b.publicHostKey)
            results[i] = row

        threads = [threading.Thread(target=run, args=(i, b)) for i, b in enumerate(builders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rows = [r for r in results if r is not None]
    if args.json:
        json.dump({"deviceArchitecture": arch, "builders": rows}, sys.stdout, indent=2)
        print()
    else:
        _print_table(rows, data, arch)
    return 0 if all(r["ok"] for r in rows) else 1


def _serve_command() -> str:
    me = Path(sys.argv[0])
    if me.name == "kiosk" and me.is_file():
        return shlex.join([str(me.absolute()), "builder-serve"])
    found = shutil.which("kiosk")
    if found:
        return shlex.join([found, "builder-serve"])
    return shlex.join([sys.executable, "-m", "kiosk", "builder-serve"])


def _public_key_line(args) -> tuple[str, str]:
    """The device's public key to authorize, and where it came from."""
    if args.key == "-":
        return sys.stdin.read().strip(), "stdin"
    if args.key:
        try:
            return Path(args.key).read_text().strip(), args.key
        except OSError as exc:
            raise UsageError(f"{args.key}: {exc.strerror}") from None
    from kiosk.spec import load as specmod
    spec = specmod.load(args.spec or "nixiosk.json")
    _, pub = device_key_paths(spec.data, Path(args.image_dir))
    if not pub.is_file():
        raise UsageError(f"{pub}: not found", hint="build the image first (kiosk build), or pass --key FILE")
    return pub.read_text().strip(), str(pub)


def cmd_authorize(args) -> int:
    from kiosk.spec.sshkeys import BadKey, parse_public_key

    line, where = _public_key_line(args)
    try:
        key = parse_public_key(line)
    except BadKey as why:
        raise UsageError(f"{where}: this key {why}") from None
    command = _serve_command()
    if '"' in command or "\n" in command:
        raise KioskError(f"cannot write a forced command for {command!r}")
    entry = key.line() if args.no_restrict else f'restrict,command="{command}" {key.line()}'
    target = Path(args.authorized_keys).expanduser() if args.authorized_keys else Path.home() / ".ssh/authorized_keys"
    if not target.parent.is_dir():
        target.parent.mkdir(mode=0o700, parents=True)
    lines = target.read_text().splitlines() if target.is_file() else []
    body = key.line().split()[1]
    kept, replaced = [], False
    for existing in lines:
        if body in existing.split():
            if existing == entry:
                print(f"{target}: {key_fingerprint(line)} is already authorized")
                return 0
            replaced = True
            continue
        kept.append(existing)
    kept.append(entry)
    write_atomic(target, "\n".join(kept) + "\n", 0o600)
    print(f"{target}: {'updated' if replaced else 'authorized'} {key.comment or 'the key'} ({key_fingerprint(line)})"
          + ("" if args.no_restrict else f", limited to: {command}"))
    host_key = Path("/etc/ssh/ssh_host_ed25519_key.pub")
    if host_key.is_file():
        pinned = " ".join(host_key.read_text().split()[:2])
        print(f"pin this builder's host key in the spec's builders entry:\n  \"publicHostKey\": \"{pinned}\"")
    return 0


def register(sub) -> None:
    import argparse

    p = sub.add_parser("builders", help="remote builders: check them, authorize a device on one",
                       description="Remote builders resolve and fetch packages for small boards over SSH "
                                   "(and build images for `kiosk build --builder`).")
    bsub = p.add_subparsers(dest="builders_command", metavar="COMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    c = bsub.add_parser("check", help="is each builder of a spec reachable, what can it build, free disk, RTT",
                        description="For each builder of the spec: reachable or not, the architectures it can "
                                    "resolve packages for and build images for, free disk, round-trip time. Exit "
                                    "status 1 when any builder is not usable.")
    c.add_argument("spec", nargs="?", metavar="SPEC",
                   help="the spec (default: nixiosk.json, or the device's current one)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--image-dir", metavar="DIR", help="log in with the key kiosk build made for the device (in DIR)")
    c.add_argument("-i", "--identity", metavar="KEY", help="log in with this private key")
    c.add_argument("--root", default="/", help=argparse.SUPPRESS)
    c.set_defaults(func=cmd_check)

    a = bsub.add_parser("authorize", help="on a builder: let a device's key in (limited to kiosk builder-serve)",
                        description="Run on the builder, as the user the spec's sshUser names: append the device's "
                                    "builder key (<image>.builder.pub, from kiosk build) to ~/.ssh/authorized_keys, "
                                    "limited to `kiosk builder-serve` (restrict, forced command).")
    a.add_argument("spec", nargs="?", metavar="SPEC", help="the spec (default: nixiosk.json)")
    a.add_argument("--image-dir", default="out", metavar="DIR", help="where kiosk build wrote the image (default: out)")
    a.add_argument("--key", metavar="FILE", help="the public key file instead (- reads it from stdin)")
    a.add_argument("--authorized-keys", metavar="FILE", help="default: ~/.ssh/authorized_keys")
    a.add_argument("--no-restrict", action="store_true", help="no forced command (the key may run anything)")
    a.set_defaults(func=cmd_authorize)
