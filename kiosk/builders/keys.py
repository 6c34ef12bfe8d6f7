"""The device's side of builders: its own key, made on the device the first time it is needed (never
carried in the image, so no two cards share one), known_hosts from the spec, an ssh_config for people.

Every file is placed with kiosk.core.files.write_in_root: inside the tree, whatever links it holds."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import tempfile
from pathlib import Path

from kiosk.builders.select import Builder, board_of, effective_builders, known_hosts_text, spec_data
from kiosk.builders.ssh import ssh_options
from kiosk.core.errors import Refused, one_line
from kiosk.core.files import check_in_root, write_in_root
from kiosk.core.paths import BUILDER_KEY, BUILDERS_KNOWN_HOSTS, BUILDERS_SSH_CONFIG, LEGACY_BUILDER_KEY
from kiosk.core.run import run

# Characters a key path may not hold: ssh reads `-o IdentityFile=...` and ssh_config lines word by
# word and expands % and ~, and a newline would start a new line of the ssh_config kiosk writes.
_UNSAFE = set(" \t\"'\\%")


def device_key_paths(spec: dict, out_dir: Path) -> tuple[Path, Path]:
    """Where kiosk builds before per-device keys kept the image's shared key: <image>.builder(.pub)."""
    board = board_of(spec)
    image = f"{spec['hostName']}-{board['name'] if board else spec['hardware']}.img"
    return Path(out_dir) / f"{image}.builder", Path(out_dir) / f"{image}.builder.pub"


def key_fingerprint(public_line: str) -> str:
    from kiosk.spec.sshkeys import parse_public_key
    blob = parse_public_key(public_line).blob
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def checked_key_path(path: str, where: str = "sshKey") -> str:
    """The builder key path as given, or Refused naming `where` (the spec's JSON pointer): absolute,
    without "." or ".." (checked here, whatever the schema let through), no character ssh or the
    ssh_config would read differently."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise Refused(f"{where}: {one_line(repr(path))} is not an absolute path",
                      hint=f"use a path on the device, e.g. \"{BUILDER_KEY}\"")
    names = path.split("/")[1:]
    if any(name in (".", "..") for name in names) or not names[-1] or len(path) > 1024:
        raise Refused(f"{where}: {one_line(path)} is not a plain path to a file (no \".\", \"..\" or trailing /)",
                      hint=f"use a path on the device, e.g. \"{BUILDER_KEY}\"")
    if any(c in _UNSAFE or ord(c) < 32 or ord(c) == 127 for c in path):
        raise Refused(f"{where}: {one_line(path)} holds a space, quote, backslash, % or control character, "
                      "which ssh would read differently", hint=f"use a plain path, e.g. \"{BUILDER_KEY}\"")
    return path


def key_paths(spec) -> list[tuple[str, str]]:
    """(path, JSON pointer) of each distinct builder key the spec's builders use, checked."""
    found: dict[str, str] = {}
    for b in effective_builders(spec_data(spec)):
        found.setdefault(checked_key_path(b.sshKey, f"{b.origin}/sshKey"), f"{b.origin}/sshKey")
    return list(found.items())


def ensure_device_key(root: Path, key_path: str, log, *, comment: str | None = None) -> Path:
    """This device's own builder key at key_path inside root (0600 root:root, plus .pub); made here the
    first time it is needed (`kiosk builders key`, or a push that needs a builder), like its ssh host
    keys: the image carries none, so every card has its own. Nothing is written outside root."""
    checked_key_path(key_path)
    check_in_root(root, key_path)  # "..", or a link on the way (var/run -> /run): refused before any work
    key = Path(root) / key_path.lstrip("/")
    try:
        st = os.lstat(key)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISREG(st.st_mode):
            return key
        raise Refused(f"{key_path}: something other than a regular file is there (a link?); not used as a key",
                      hint="remove it; kiosk then makes this device's key there")
    if key_path == BUILDER_KEY and _move_legacy_key(root, log):
        return key
    comment = comment or "kiosk-builder"
    with tempfile.TemporaryDirectory(prefix="kiosk-key-") as tmp:
        made = Path(tmp) / "key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", made],
            what="making this device's builder key")
        private, public = made.read_bytes(), Path(str(made) + ".pub").read_text().strip()
    owner = (0, 0) if os.geteuid() == 0 else None
    # .pub first: a power cut in between leaves a .pub without its key, and the next call makes a new pair.
    write_in_root(root, key_path + ".pub", public + "\n", 0o644, owner=owner, durable=True)
    write_in_root(root, key_path, private, 0o600, owner=owner, durable=True)
    log(f"made this device's builder key {key_path} ({key_fingerprint(public)}); authorize it on each builder, "
        f"there: echo '{public}' | kiosk builders authorize --key -")
    return key


def _move_legacy_key(root: Path, log) -> bool:
    """A key made where the default used to be (in the root, lost with a slot switch) moves to BUILDER_KEY, so a
    device keeps the key its builders authorized. True when moved."""
    old = Path(root) / LEGACY_BUILDER_KEY.lstrip("/")
    try:
        if not (stat.S_ISREG(os.lstat(old).st_mode) and stat.S_ISREG(os.lstat(str(old) + ".pub").st_mode)):
            return False
        check_in_root(root, LEGACY_BUILDER_KEY)
    except (FileNotFoundError, Refused):
        return False
    owner = (0, 0) if os.geteuid() == 0 else None
    write_in_root(root, BUILDER_KEY + ".pub", Path(str(old) + ".pub").read_bytes(), 0o644, owner=owner, durable=True)
    write_in_root(root, BUILDER_KEY, old.read_bytes(), 0o600, owner=owner, durable=True)
    old.unlink()
    Path(str(old) + ".pub").unlink()
    log(f"moved this device's builder key from {LEGACY_BUILDER_KEY} to {BUILDER_KEY} (kept across system updates)")
    return True


def device_public_key(key: Path) -> str:
    """The public line of a device key (its .pub, or derived from the private key)."""
    pub = Path(str(key) + ".pub")
    try:
        st = os.lstat(pub)
        if stat.S_ISREG(st.st_mode) and st.st_size < 65536:
            return pub.read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    return run(["ssh-keygen", "-y", "-f", key], what=f"reading the public half of {key}").stdout.strip()


def ssh_config_text(builders: list[Builder]) -> str:
    lines = ["# Written by kiosk at image build from nixiosk.json: how this device reaches its builders.",
             "# kiosk passes the same options itself (and a known_hosts made from the spec in use);",
             f"# this file is for people, e.g.: ssh -F {BUILDERS_SSH_CONFIG} builder-1", ""]
    for i, b in enumerate(builders, 1):
        lines += [f"Host builder-{i}", f"    HostName {b.hostName}", f"    Port {b.port}", f"    User {b.sshUser}",
                  f"    IdentityFile {checked_key_path(b.sshKey, f'{b.origin}/sshKey')}", ""]
    lines.append("Host *")
    for name, value in ssh_options(None, BUILDERS_KNOWN_HOSTS):
        lines.append(f"    {name} {value}")
    lines.append("    IdentitiesOnly yes")
    return "\n".join(lines) + "\n"


def prepare_device_for_builders(root: Path, spec: dict, out_dir: Path, log, *, epoch: int | None = None) -> None:
    """At image build: known_hosts from the spec's publicHostKeys and an ssh_config for people, root's
    files with the build's timestamp (the same bytes every build). No key: each device makes its own
    the first time it needs one (ensure_device_key); each sshKey path is checked here so that a path
    the device would refuse (through a link, or with "..") fails the build instead."""
    data = spec_data(spec)
    builders = effective_builders(data)
    if not builders:
        return
    for path, pointer in key_paths(data):
        try:
            check_in_root(root, path)
        except Refused as exc:
            raise Refused(f"{pointer}: {exc.message}", hint=exc.hint) from None
    owner = (0, 0) if os.geteuid() == 0 else None
    for path, text in ((BUILDERS_KNOWN_HOSTS, known_hosts_text(builders)), (BUILDERS_SSH_CONFIG,
                                                                            ssh_config_text(builders))):
        write_in_root(root, path, text, 0o644, owner=owner, mtime=epoch)
    users = ", ".join(b.sshUser + "@" + b.label for b in builders)
    log(f"builders: {len(builders)} ({users}); each device makes its own builder key when it first needs one. "
        f"Authorize a device once it is up: ssh root@{data['hostName']}.local kiosk builders key | "
        "ssh USER@BUILDER kiosk builders authorize --key -")
    old, _ = device_key_paths(data, Path(out_dir))
    if old.exists():
        log(f"builders: {old} is the key images built by earlier kiosk versions shared; this image does not "
            "carry it. Cards flashed from those images still use it: rotate it (README, Remote builders)")
    for b in builders:
        if not b.publicHostKey:
            log(f"builders: warning: {b.label} has no publicHostKey ({b.origin}); the device will not use it "
                f"until the spec pins its host key (ssh-keyscan -p {b.port} -t ed25519 {b.hostName})")
