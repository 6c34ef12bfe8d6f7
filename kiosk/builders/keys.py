"""The device's side of builders in its image: its own key (kept beside the image, so a rebuild is
byte-identical and builders stay authorized), known_hosts from the spec, an ssh_config for people."""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from pathlib import Path

from kiosk.builders.select import Builder, board_of, effective_builders, known_hosts_text, spec_data
from kiosk.builders.ssh import ssh_options
from kiosk.core.files import write_atomic
from kiosk.core.paths import BUILDERS_KNOWN_HOSTS, BUILDERS_SSH_CONFIG
from kiosk.core.run import run


def device_key_paths(spec: dict, out_dir: Path) -> tuple[Path, Path]:
    """Where the device's builder key is kept next to its image: <image>.builder and <image>.builder.pub."""
    board = board_of(spec)
    image = f"{spec['hostName']}-{board['name'] if board else spec['hardware']}.img"
    return Path(out_dir) / f"{image}.builder", Path(out_dir) / f"{image}.builder.pub"


def key_fingerprint(public_line: str) -> str:
    from kiosk.spec.sshkeys import parse_public_key
    blob = parse_public_key(public_line).blob
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def device_key(spec: dict, out_dir: Path, log) -> tuple[bytes, str]:
    """The device's builder key pair: reused from out_dir when there (so a rebuild of the same
    spec gives the same image bytes, and builders stay authorized), else made once."""
    from kiosk.spec.sshkeys import BadKey, parse_public_key

    private, public = device_key_paths(spec, out_dir)
    if private.is_file() and public.is_file():
        line = public.read_text().strip()
        try:
            parse_public_key(line)
            derived = run(["ssh-keygen", "-y", "-f", private], check=False)
            if derived.returncode == 0 and derived.stdout.split()[:2] == line.split()[:2]:
                log(f"builders: reusing this device's key {private} ({key_fingerprint(line)})")
                return private.read_bytes(), line
        except BadKey:
            pass
        log(f"builders: {private} and {public.name} do not match; making a new key")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".builder-key-") as tmp:
        path = Path(tmp) / "key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"kiosk-builder@{spec['hostName']}", "-f", path],
            what="making the device's builder key")
        line = Path(str(path) + ".pub").read_text().strip()
        os.chmod(path, 0o600)
        os.replace(Path(str(path) + ".pub"), public)
        os.replace(path, private)
    log(f"builders: made this device's key {private} ({key_fingerprint(line)})")
    return private.read_bytes(), line


def ssh_config_text(builders: list[Builder]) -> str:
    lines = ["# Written by kiosk at image build from nixiosk.json: how this device reaches its builders.",
             "# kiosk passes the same options itself (and a known_hosts made from the spec in use);",
             f"# this file is for people, e.g.: ssh -F {BUILDERS_SSH_CONFIG} builder-1", ""]
    for i, b in enumerate(builders, 1):
        lines += [f"Host builder-{i}", f"    HostName {b.hostName}", f"    Port {b.port}", f"    User {b.sshUser}",
                  f"    IdentityFile {b.sshKey}", ""]
    lines.append("Host *")
    for name, value in ssh_options(None, BUILDERS_KNOWN_HOSTS):
        lines.append(f"    {name} {value}")
    lines.append("    IdentitiesOnly yes")
    return "\n".join(lines) + "\n"


def _place(root: Path, path: str, data: bytes, mode: int, epoch: int | None) -> None:
    """A file of the image: root's, with the build's timestamp (the same bytes and times every build)."""
    dest = Path(root) / path.lstrip("/")
    write_atomic(dest, data, mode)
    if os.geteuid() == 0:
        os.chown(dest, 0, 0)
    if epoch is not None:
        os.utime(dest, (epoch, epoch))


def prepare_device_for_builders(root: Path, spec: dict, out_dir: Path, log, *, epoch: int | None = None) -> None:
    """At image build: the device's builder key (root only, 0600) at each builder's sshKey path,
    known_hosts from the spec's publicHostKeys, an ssh_config for people; the public key is
    printed and written to <image>.builder.pub so the user can authorize it on the builders."""
    data = spec_data(spec)
    builders = effective_builders(data)
    if not builders:
        return
    private, public = device_key(data, Path(out_dir), log)
    for key_path in sorted({b.sshKey for b in builders}):
        _place(root, key_path, private, 0o600, epoch)
        _place(root, key_path + ".pub", (public + "\n").encode(), 0o644, epoch)
    _place(root, BUILDERS_KNOWN_HOSTS, known_hosts_text(builders).encode(), 0o644, epoch)
    _place(root, BUILDERS_SSH_CONFIG, ssh_config_text(builders).encode(), 0o644, epoch)
    _, pub_path = device_key_paths(data, Path(out_dir))
    log(f"builders: {len(builders)} ({', '.join(b.sshUser + '@' + b.label for b in builders)}); the device's key:")
    log(f"  {public}")
    log(f"  authorize it on each builder: kiosk builders authorize --key {pub_path} "
        f"(or append {pub_path.name} to the builder user's ~/.ssh/authorized_keys)")
    for b in builders:
        if not b.publicHostKey:
            log(f"builders: warning: {b.label} has no publicHostKey ({b.origin}); the device will not use it "
                f"until the spec pins its host key (ssh-keyscan -p {b.port} -t ed25519 {b.hostName})")
