"""`kiosk builders check` (can each builder of a spec serve this device?), `kiosk builders key` (on the
device: its own builder key, made when first asked for) and `kiosk builders authorize` (on a builder:
let a device's key in, limited to `kiosk builder-serve`)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

from kiosk.builders.client import exchange
from kiosk.builders.keys import device_key_paths, device_public_key, ensure_device_key, key_fingerprint, key_paths
from kiosk.builders.select import Builder, device_architecture, effective_builders, known_hosts_text
from kiosk.builders.ssh import BuilderFailure, connect_timeout, probe_all, ssh_argv, ssh_options
from kiosk.builders.wire import PROTOCOL
from kiosk.core.errors import KioskError, UsageError, one_line
from kiosk.core.files import check_in_root, human_size, write_in_root
from kiosk.core.inputs import InputRefused, read_small
from kiosk.core.paths import BUILDER_KEY, STATE

MAX_PUBLIC_KEY = 64 << 10
MAX_AUTHORIZED_KEYS = 16 << 20
AUTHORIZE_FROM_DEVICE = "ssh root@DEVICE kiosk builders key | ssh USER@BUILDER kiosk builders authorize --key -"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def _read_regular(path: Path, what: str, limit: int) -> tuple[str, os.stat_result]:
    """A small regular file's text. Anything else (a FIFO that would block, a device node, /dev/zero,
    a link) is refused with UsageError, without reading from it."""
    shown = one_line(str(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise UsageError(f"{what} {shown}: a symbolic link (to {one_line(os.readlink(path))}), not a "
                             "regular file", hint="give the file itself") from None
        raise UsageError(f"{what} {shown}: {exc.strerror}") from None
    st = os.fstat(fd)   # before fdopen, which raises IsADirectoryError itself
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UsageError(f"{what} {shown}: {_kind(st.st_mode)}, not a regular file", hint="give the file itself")
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UsageError(f"{what} {shown}: larger than {human_size(limit)}; not the file meant")
    try:
        return data.decode("utf-8"), st
    except UnicodeDecodeError:
        raise UsageError(f"{what} {shown}: not UTF-8 text") from None


def _read_key(path: str | Path, option: str) -> str:
    """A key file named on the command line, as text: read by kiosk.core.inputs.read_small (a regular file
    of at most MAX_PUBLIC_KEY; a directory, FIFO or device is refused unread); UsageError naming `option`."""
    shown = one_line(str(path))
    try:
        data = read_small(path, "key", MAX_PUBLIC_KEY, hint="give the key file itself")
    except InputRefused as exc:   # (a missing file: the words the OS uses, as before)
        raise UsageError(f"{option} {shown}: {exc.reason}", hint=exc.hint if exc.kind in ("type", "size") else "") \
            from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{option} {shown}: not UTF-8 text", hint="give the key file itself") from None


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
    # Every board has root slots: a device asks a builder for its whole new system (an update bundle), so
    # what counts is what the builder can build images for (mmdebstrap, qemu-user for foreign ones), not
    # what apt there could download.
    row["architectures"] = [a for a in row["imageArchitectures"] or [] if a in b.systems]
    row["ok"] = bool(row["architectures"])
    if not row["ok"]:
        row["error"] = ("apt is not installed there" if not header.get("apt") else
                        f"builds no system of {' '.join(b.systems)} (scripts/install-deps.sh build there)")
    return row


def _check_key(b: Builder, data: dict, root: Path, args) -> tuple[Path | None, str | None, str]:
    """The key `check` logs in with: -i, the shared key of an image built by an earlier kiosk
    (--image-dir), the device's own, or the user's. UsageError when the one asked for is not there."""
    if args.identity:
        _read_key(args.identity, "-i")
        return Path(args.identity), "/dev/null", str(args.identity)
    if args.image_dir:
        if not Path(args.image_dir).is_dir():
            raise UsageError(f"--image-dir {one_line(args.image_dir)}: no such directory",
                             hint="give the directory an earlier kiosk build wrote the image and its .builder key to")
        private, _ = device_key_paths(data, Path(args.image_dir))
        if not private.is_file():
            raise UsageError(f"--image-dir: {one_line(str(private))}: no builder key there",
                             hint="images carry no builder key any more, each device makes its own: run kiosk "
                                  "builders check on the device, or pass -i KEY")
        return private, "/dev/null", str(private)
    check_in_root(root, b.sshKey)
    device = root / b.sshKey.lstrip("/")
    if device.is_file() and not device.is_symlink() and os.access(device, os.R_OK):
        return device, "/dev/null", b.sshKey
    return None, None, "your own ssh keys"


def _authorize_hints(rows: list[dict | None], keys: list[tuple[Path | None, str | None, str]], builders) -> list[str]:
    """For each builder that refused this device's own key: the line that authorizes it there."""
    hints = []
    for row, (key, _, note), b in zip(rows, keys, builders):
        if row is None or key is None or note != b.sshKey or \
                not (row.get("error") or "").startswith("refused: it does not accept"):
            continue
        try:
            public = device_public_key(key)
        except KioskError:
            continue
        hints.append(f"{row['builder']} does not accept this device's key; there, as {b.sshUser}, run: "
                     f"echo '{public}' | kiosk builders authorize --key -")
    return hints


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
    keys = [_check_key(b, data, root, args) for b in builders]  # a missing key: one line, before any thread
    with tempfile.TemporaryDirectory(prefix="kiosk-check-") as tmp:
        work = Path(tmp)
        known_hosts = work / "known_hosts"
        known_hosts.write_text(known_hosts_text(builders))
        probes = probe_all(builders, connect_timeout())
        results: list[dict | None] = [None] * len(builders)

        def run(i: int, b: Builder) -> None:
            key, config, note = keys[i]
            scratch = work / f"b{i}"
            try:
                scratch.mkdir()
                row = check_builder(b, key, known_hosts, probes[i], scratch, config)
            except (KioskError, OSError) as exc:  # a row that says so, never a thread's traceback
                row = {"builder": f"{b.sshUser}@{b.label}", "speedFactor": b.speedFactor, "ok": False,
                       "hostKeyPinned": bool(b.publicHostKey), "error": f"failed: {exc}"}
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
        for line in _authorize_hints(results, keys, builders):
            print(line)
    return 0 if len(rows) == len(builders) and all(r["ok"] for r in rows) else 1


def cmd_key(args) -> int:
    """On the device: its own builder key(s), made now if it has none; the public line(s) on stdout."""
    from kiosk.spec import load as specmod

    root = Path(args.root)
    current = root / STATE / "current/nixiosk.json"
    spec = specmod.load(args.spec) if args.spec else specmod.load(current) if current.is_file() else None
    try:
        paths = [p for p, _ in key_paths(spec.data)] if spec is not None else []
    except KioskError as exc:
        raise UsageError(f"{spec.source}: {exc}") from None
    host = spec.data["hostName"] if spec is not None else socket.gethostname()
    for path in paths or [BUILDER_KEY]:
        key = ensure_device_key(root, path, lambda line: print(line, file=sys.stderr), comment=f"kiosk-builder@{host}")
        print(device_public_key(key))
    print(f"authorize it on each builder, e.g. from your computer: {AUTHORIZE_FROM_DEVICE}", file=sys.stderr)
    return 0


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
        text = sys.stdin.read(MAX_PUBLIC_KEY + 1)
        if len(text) > MAX_PUBLIC_KEY:
            raise UsageError(f"--key -: more than {human_size(MAX_PUBLIC_KEY)} on stdin; not a public key")
        return text.strip(), "stdin"
    if args.key:
        return _read_key(args.key, "--key").strip(), args.key
    # an image built by an earlier kiosk carried one key for all its cards, kept beside it
    from kiosk.spec import load as specmod
    if args.spec or Path("nixiosk.json").is_file():
        spec = specmod.load(args.spec or "nixiosk.json")
        _, pub = device_key_paths(spec.data, Path(args.image_dir))
        if pub.is_file():
            return _read_key(pub, "--image-dir").strip(), str(pub)
    raise UsageError("which device? give its public key with --key FILE, or --key - to read it from stdin",
                     hint=f"each device makes its own builder key; from your computer: {AUTHORIZE_FROM_DEVICE}")


def _authorized_keys(args) -> tuple[Path, list[str], os.stat_result | None]:
    """The authorized_keys file to change, its lines and its stat (None when it does not exist yet).
    Anything but a regular file or a missing one is refused (UsageError): a device node (/dev/null), a
    FIFO, a directory, and a symbolic link too, since whoever can write its directory may point it at
    any file (root authorizing for another user would then write where that user chose)."""
    what = "--authorized-keys" if args.authorized_keys else "authorized_keys"
    target = Path(args.authorized_keys).expanduser() if args.authorized_keys else Path.home() / ".ssh/authorized_keys"
    shown = one_line(str(target))
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        if target.parent.exists() and not target.parent.is_dir():
            raise UsageError(f"{what} {shown}: {one_line(str(target.parent))} is not a directory") from None
        return target, [], None
    except OSError as exc:
        raise UsageError(f"{what} {shown}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        link = one_line(os.readlink(target))
        raise UsageError(f"{what} {shown}: a symbolic link (to {link}); kiosk writes authorized_keys only as a "
                         "regular file, never through a link",
                         hint=f"give the file itself: --authorized-keys {one_line(str(target.resolve()))}")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{what} {shown}: {_kind(st.st_mode)}, not an authorized_keys file; nothing was changed",
                         hint="give a regular file, or a path that does not exist yet")
    text, st = _read_regular(target, what, MAX_AUTHORIZED_KEYS)
    return target, text.splitlines(), st


def cmd_authorize(args) -> int:
    from kiosk.spec.sshkeys import BadKey, parse_public_key

    line, where = _public_key_line(args)
    try:
        key = parse_public_key(line)
    except BadKey as why:
        raise UsageError(f"{one_line(where)}: this key {why}") from None
    command = _serve_command()
    if '"' in command or "\n" in command:
        raise KioskError(f"cannot write a forced command for {command!r}")
    entry = key.line() if args.no_restrict else f'restrict,command="{command}" {key.line()}'
    target, lines, st = _authorized_keys(args)
    body = key.line().split()[1]
    owner = (st.st_uid, st.st_gid) if st is not None and os.geteuid() == 0 else None
    if args.revoke:
        kept = [existing for existing in lines if body not in existing.split()]
        if len(kept) == len(lines):
            print(f"{target}: {key_fingerprint(line)} was not authorized; nothing changed")
            return 0
        write_in_root(target.parent, target.name, "".join(k + "\n" for k in kept), 0o600, owner=owner)
        print(f"{target}: removed {key.comment or 'the key'} ({key_fingerprint(line)})")
        return 0
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
    if not target.parent.is_dir():
        target.parent.mkdir(mode=0o700, parents=True)
    # A new file in place of the old (renamed over it, never written through); its owner kept.
    write_in_root(target.parent, target.name, "\n".join(kept) + "\n", 0o600, owner=owner)
    print(f"{target}: {'updated' if replaced else 'authorized'} {key.comment or 'the key'} ({key_fingerprint(line)})"
          + ("" if args.no_restrict else f", limited to: {command}"))
    host_key = Path("/etc/ssh/ssh_host_ed25519_key.pub")
    if host_key.is_file():
        pinned = " ".join(host_key.read_text().split()[:2])
        print(f"pin this builder's host key in the spec's builders entry:\n  \"publicHostKey\": \"{pinned}\"")
    return 0


def register(sub) -> None:
    import argparse

    p = sub.add_parser("builders", help="remote builders: check them, a device's key, authorize a device on one",
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
    c.add_argument("--image-dir", metavar="DIR",
                   help="log in with the key an earlier kiosk build kept beside the image in DIR (images built now "
                        "carry none: each device makes its own)")
    c.add_argument("-i", "--identity", metavar="KEY", help="log in with this private key")
    c.add_argument("--root", default="/", help=argparse.SUPPRESS)
    c.set_defaults(func=cmd_check)

    k = bsub.add_parser("key", help="on a device: print its own builder key (made now if it has none)",
                        description="Each device makes its own builder key the first time it needs one (never "
                                    "in the image, so no two cards share one). Prints its public line(s) for "
                                    f"`kiosk builders authorize`: {AUTHORIZE_FROM_DEVICE}")
    k.add_argument("spec", nargs="?", metavar="SPEC",
                   help="the spec whose builders' sshKey paths to use (default: the device's current one)")
    k.add_argument("--root", default="/", help=argparse.SUPPRESS)
    k.set_defaults(func=cmd_key)

    a = bsub.add_parser("authorize", help="on a builder: let a device's key in (limited to kiosk builder-serve)",
                        description="Run on the builder, as the user the spec's sshUser names: append the device's "
                                    "builder key to ~/.ssh/authorized_keys, limited to `kiosk builder-serve` "
                                    f"(restrict, forced command). From your computer: {AUTHORIZE_FROM_DEVICE}")
    a.add_argument("spec", nargs="?", metavar="SPEC",
                   help="with --image-dir: the spec of an image built by an earlier kiosk (default: nixiosk.json)")
    a.add_argument("--image-dir", default="out", metavar="DIR",
                   help="an earlier kiosk build's output, whose shared .builder.pub to authorize (default: out)")
    a.add_argument("--key", metavar="FILE", help="the device's public key file (- reads it from stdin)")
    a.add_argument("--authorized-keys", metavar="FILE",
                   help="default: ~/.ssh/authorized_keys; must be a regular file or not exist yet")
    a.add_argument("--no-restrict", action="store_true", help="no forced command (the key may run anything)")
    a.add_argument("--revoke", action="store_true", help="remove the key instead (rotating a device's key)")
    a.set_defaults(func=cmd_authorize)
