"""The key that signs update bundles, and the certificate every device trusts (notes/ab-update.md).

kiosk makes the pair on first use and keeps it in the user's cache (KIOSK_CACHE_DIR/update-signing/,
a 0700 directory; the key 0600). A device trusts exactly this certificate (its RAUC keyring), so a
bundle signed by anyone else is refused on the device before a slot is touched.

The certificate is valid from 1970 to 9999: a Raspberry Pi has no clock, and a device that boots
offline runs at its image's build date; RAUC refuses a signer whose notBefore is after the device's
clock ("certificate is not yet valid", tried with rauc 1.8), so a certificate made today would make
every update of such a device fail. `openssl req -x509` (OpenSSL 3.0) cannot set notBefore;
`openssl ca -selfsign -startdate` can.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kiosk.core import paths
from kiosk.core.errors import KioskError, one_line
from kiosk.core.files import fsync_dir
from kiosk.core.run import run

DIR_NAME = "update-signing"
RAUC_CERTIFICATE = "/etc/rauc/kiosk-update.cert.pem"   # where an A/B image keeps the certificate it trusts
ROOT_IMAGE = "rootfs.ext4"
SQUASHFS_ARGS = "-comp zstd -Xcompression-level 3"
_MANIFEST_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._:+@-]{0,200}")
HINT = "kiosk makes update bundles with rauc (apt install rauc squashfs-tools)"
NOT_BEFORE = "19700101000000Z"
NOT_AFTER = "99991231235959Z"

_CA_CONFIG = """\
[ca]
default_ca = kiosk
[kiosk]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = any
copy_extensions = none
x509_extensions = ext
unique_subject = no
[any]
organizationName = optional
commonName = supplied
[ext]
basicConstraints = critical,CA:TRUE
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
keyUsage = critical,digitalSignature,keyCertSign
"""


@dataclass(frozen=True)
class SigningKey:
    key: Path    # PEM private key, 0600
    cert: Path   # PEM self-signed certificate: what devices trust


def signing_dir() -> Path:
    return paths.cache_dir() / DIR_NAME


def _openssl(args: list[str], cwd: Path, what: str) -> str:
    return run(["openssl", *args], cwd=cwd, what=what,
               hint="kiosk signs update bundles with openssl (apt install openssl)").stdout


def _subject() -> str:
    """Whose key this is, for people reading `rauc info` on a device (no '/' or ',' from the names)."""
    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = str(os.getuid())
    where = socket.gethostname()
    clean = "".join(c for c in f"{who}@{where}" if c.isalnum() or c in "@.-_")[:48] or "unknown"
    return f"/O=kiosk/CN=kiosk update signing key {clean}"


def _make(directory: Path, subject: str) -> None:
    """Key and certificate into directory (empty, 0700)."""
    (directory / "ca.cnf").write_text(_CA_CONFIG)
    (directory / "index.txt").write_text("")
    (directory / "serial").write_text("01\n")
    old = os.umask(0o077)
    try:
        _openssl(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                  "-keyout", "key.pem", "-out", "req.pem", "-subj", subject], directory,
                 "making the update signing key")
        _openssl(["ca", "-batch", "-config", "ca.cnf", "-selfsign", "-keyfile", "key.pem", "-in", "req.pem",
                  "-out", "cert.pem", "-startdate", NOT_BEFORE, "-enddate", NOT_AFTER, "-notext"], directory,
                 "making the update signing certificate")
    finally:
        os.umask(old)
    for name in os.listdir(directory):
        if name not in ("key.pem", "cert.pem"):
            os.unlink(directory / name)
    os.chmod(directory / "key.pem", 0o600)
    os.chmod(directory / "cert.pem", 0o644)


def check_private(directory: Path) -> SigningKey:
    """The pair in directory, refused when others could read the key or replace the certificate."""
    pair = SigningKey(directory / "key.pem", directory / "cert.pem")
    for path, allowed in ((directory, 0o700), (pair.key, 0o600), (pair.cert, 0o644)):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise KioskError(f"{path} is missing: the update signing key is incomplete",
                             hint=f"restore it from your backup; devices trust only its certificate "
                                  f"(a new key needs a newly flashed card)") from None
        kind_ok = stat.S_ISDIR(st.st_mode) if path == directory else stat.S_ISREG(st.st_mode)
        if not kind_ok or st.st_uid != os.getuid():
            raise KioskError(one_line(f"{path} is not a {'directory' if path == directory else 'file'} "
                                      f"of yours"), hint="kiosk keeps the update signing key only in a place "
                                                         "that is yours alone")
        if stat.S_IMODE(st.st_mode) & ~allowed:
            raise KioskError(one_line(f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: others may read or "
                                      f"change the update signing key"), hint=f"chmod {allowed:o} {path}")
    return pair


def signing_key(*, create: bool = True, log=lambda message: None, directory: Path | None = None,
                subject: str | None = None) -> SigningKey:
    """The user's signing pair, made on first use (two kiosk processes at once end up with one pair);
    with directory and subject, another pair made the same way (a device's own: kiosk.device.selfbuild)."""
    directory = Path(directory) if directory is not None else signing_dir()
    if not directory.exists():
        if not create:
            raise KioskError(f"no update signing key in {directory}",
                             hint="kiosk makes it the first time it builds an update")
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{DIR_NAME}-", dir=directory.parent))   # 0700
        try:
            _make(tmp, subject or _subject())
            fsync_dir(tmp)
            os.rename(tmp, directory)   # fails if another process made its pair first: theirs is kept
            fsync_dir(directory.parent)
            log(f"made the update signing key {directory / 'key.pem'}" + (" (keep a copy: devices trust only its "
                "certificate)" if subject is None else ""))
        except OSError:
            if not directory.exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return check_private(directory)


def fingerprint(cert: Path) -> str:
    """SHA-256 fingerprint of a certificate (what `rauc info` and people compare)."""
    out = _openssl(["x509", "-in", str(cert), "-noout", "-fingerprint", "-sha256"], cert.parent,
                   "reading the update signing certificate")
    return out.strip().split("=", 1)[-1]


def certificate_fingerprint(pem: str) -> str:
    """SHA-256 fingerprint of a PEM certificate given as text: what an image is told to trust (one
    certificate, nothing else in the text), refused with a KioskError when it is not one."""
    if pem.count("-----BEGIN CERTIFICATE-----") != 1 or "PRIVATE KEY" in pem:
        raise KioskError("the update certificate is not one PEM certificate",
                         hint=f"give the cert.pem of {signing_dir()} (never the key)")
    try:
        out = run(["openssl", "x509", "-noout", "-fingerprint", "-sha256"], input=pem,
                  what="reading the update certificate",
                  hint="the update certificate must be a PEM certificate (openssl x509 reads it)").stdout
    except KioskError as exc:
        raise KioskError(f"the update certificate is not readable: {exc.message}", hint=exc.hint) from None
    return out.strip().split("=", 1)[-1]


def compatible(board: str) -> str:
    """What a bundle and a device must both say (RAUC refuses a bundle made for another board)."""
    return f"kiosk-{board}"


def _manifest(board: str, version: str, description: str) -> str:
    for name, value in (("version", version), ("description", description)):
        if not _MANIFEST_VALUE.fullmatch(value):
            raise KioskError(f"bundle {name} {value[:40]!r} has characters a RAUC manifest cannot hold",
                             hint="letters, digits, spaces and . _ : + @ - only")
    return (f"[update]\ncompatible={compatible(board)}\nversion={version}\ndescription={description}\n\n"
            f"[bundle]\nformat=verity\n\n[hooks]\nfilename={HOOK}\n\n"
            f"[image.rootfs]\nfilename={ROOT_IMAGE}\nhooks=post-install\n")


# RAUC runs this (from the signed bundle) as `hook slot-post-install` with the new slot mounted: the device keeps
# its identity across systems. systemd reads /etc/machine-id in PID 1 before any mount, so it cannot come from the
# data partition (notes/ab-update.md): a slot built with "uninitialized" would make a new id at its first boot,
# and with it a new DHCP client id and journal directory.
HOOK = "kiosk-hook"
HOOK_SCRIPT = """#!/bin/sh
set -e
if [ "$1" = slot-post-install ] && [ "$RAUC_SLOT_CLASS" = rootfs ] && [ -s /etc/machine-id ]; then
    cp /etc/machine-id "$RAUC_SLOT_MOUNT_POINT/etc/machine-id.kiosk-new"
    mv "$RAUC_SLOT_MOUNT_POINT/etc/machine-id.kiosk-new" "$RAUC_SLOT_MOUNT_POINT/etc/machine-id"
fi
"""


def sign_bundle(staging: Path, out: Path, *, board: str, version: str, description: str, key: SigningKey) -> None:
    """`rauc bundle` of staging (which holds ROOT_IMAGE) into out, with kiosk's manifest and hook: a bundle
    from an image's root (kiosk.image.bundle) and one a device made of its own (kiosk.device.selfbuild) are one
    format."""
    staging = Path(staging)
    (staging / "manifest.raucm").write_text(_manifest(board, version, description))
    (staging / HOOK).write_text(HOOK_SCRIPT)
    (staging / HOOK).chmod(0o755)
    run(["rauc", "bundle", f"--cert={key.cert}", f"--key={key.key}", f"--mksquashfs-args={SQUASHFS_ARGS}",
         str(staging), str(out)], what="making the update bundle", hint=HINT)
