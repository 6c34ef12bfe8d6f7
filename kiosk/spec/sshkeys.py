"""OpenSSH public key lines: parse and check them before they lock anyone out.

A key line is `TYPE BASE64 [COMMENT]`; the base64 body is an SSH wire-format
blob whose first field repeats TYPE. Checking that catches truncated pastes and
keys of one type labelled as another.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass

from kiosk.core.errors import KioskError

# Types bookworm's OpenSSH 9.2 accepts by default (ssh-dss is disabled there), with the
# number of length-prefixed fields their wire-format blob holds (the type name included).
KEY_FIELDS = {
    "ssh-ed25519": 2, "ssh-rsa": 3,
    "ecdsa-sha2-nistp256": 3, "ecdsa-sha2-nistp384": 3, "ecdsa-sha2-nistp521": 3,
    "sk-ssh-ed25519@openssh.com": 3, "sk-ecdsa-sha2-nistp256@openssh.com": 4,
}
KEY_TYPES = tuple(KEY_FIELDS)


def _fields(blob: bytes) -> list[bytes] | None:
    """Split an SSH wire-format blob into its length-prefixed fields; None if it does not split exactly."""
    fields, at = [], 0
    while at < len(blob):
        if at + 4 > len(blob):
            return None
        (n,) = struct.unpack(">I", blob[at:at + 4])
        if at + 4 + n > len(blob):
            return None
        fields.append(blob[at + 4:at + 4 + n])
        at += 4 + n
    return fields


class BadKey(KioskError):
    """Why a key line does not parse; the text is shown to the user."""


@dataclass(frozen=True)
class PublicKey:
    type: str
    blob: bytes
    comment: str

    def line(self) -> str:
        body = f"{self.type} {base64.b64encode(self.blob).decode()}"
        return f"{body} {self.comment}" if self.comment else body


def parse_public_key(text: str) -> PublicKey:
    parts = text.strip().split(None, 2)
    if not parts:
        raise BadKey("is empty")
    if "\n" in text.strip():
        raise BadKey("holds more than one line")
    ktype = parts[0]
    if ktype == "ssh-dss":
        raise BadKey("is a DSA key, which OpenSSH no longer accepts")
    if ktype not in KEY_TYPES:
        if ktype.startswith("-----BEGIN") or "PRIVATE" in text:
            raise BadKey("looks like a private key or a PEM file, not a public key line")
        raise BadKey(f"has unknown key type {ktype[:40]!r}")
    if len(parts) < 2:
        raise BadKey(f"has the type {ktype} but no base64 key body")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise BadKey("has a key body that is not valid base64 (truncated or mangled paste?)") from None
    if len(blob) < 4:
        raise BadKey("has a key body too short to be a key")
    fields = _fields(blob)
    if fields and fields[0] != ktype.encode():
        raise BadKey(f"says {ktype} but its body is not a {ktype} key")
    if fields is None or len(fields) != KEY_FIELDS[ktype] or (ktype == "ssh-ed25519" and len(fields[1]) != 32):
        if fields is None and blob[4:4 + len(ktype)] != ktype.encode():
            raise BadKey(f"says {ktype} but its body is not a {ktype} key")
        raise BadKey("has a key body that is cut short or has extra bytes (truncated paste?)")
    return PublicKey(ktype, blob, parts[2] if len(parts) > 2 else "")
