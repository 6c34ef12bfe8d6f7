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

# Types bookworm's OpenSSH 9.2 accepts by default (ssh-dss is disabled there).
KEY_TYPES = (
    "ssh-ed25519", "ssh-rsa",
    "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
)


class BadKey(ValueError):
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
    (n,) = struct.unpack(">I", blob[:4])
    embedded = blob[4:4 + n]
    if n > len(blob) - 4 or embedded.decode("ascii", "replace") != ktype:
        raise BadKey(f"says {ktype} but its body is not a {ktype} key")
    return PublicKey(ktype, blob, parts[2] if len(parts) > 2 else "")
