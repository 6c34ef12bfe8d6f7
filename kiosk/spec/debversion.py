"""Debian version order, as `dpkg --compare-versions` has it (Debian Policy 5.6.12).

`kiosk status` compares every installed package with the archive's security and updates suites on the
user's machine, which may not be Debian (no dpkg there), and a few hundred packages a device would
otherwise mean a few hundred dpkg processes. tests/test_debversion.py checks this against dpkg itself.
"""

from __future__ import annotations

import functools


_DIGITS = range(0x30, 0x3A)
_LETTERS = frozenset(range(0x41, 0x5B)) | frozenset(range(0x61, 0x7B))


def _order(byte: int | None) -> int:
    """dpkg's weight of one byte in a non-digit run: '~' before the end, the end before letters, letters
    before everything else (ASCII only, as C's isalpha in dpkg)."""
    if byte is None or byte in _DIGITS:
        return 0
    if byte == 0x7E:   # ~
        return -1
    return byte if byte in _LETTERS else byte + 256


def _compare_part(a: bytes, b: bytes) -> int:
    """dpkg's verrevcmp: alternating non-digit runs (compared by _order) and digit runs (as numbers, of any
    length: compared as text without leading zeros, never through int())."""
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and a[i] not in _DIGITS) or (j < len(b) and b[j] not in _DIGITS):
            ac = _order(a[i] if i < len(a) else None)
            bc = _order(b[j] if j < len(b) else None)
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        start_i, start_j = i, j
        while i < len(a) and a[i] in _DIGITS:
            i += 1
        while j < len(b) and b[j] in _DIGITS:
            j += 1
        x, y = a[start_i:i].lstrip(b"0"), b[start_j:j].lstrip(b"0")
        if x != y:
            return -1 if (len(x), x) < (len(y), y) else 1
    return 0


def split(version: str) -> tuple[str, str, str]:
    """(epoch, upstream version, Debian revision) as text; no epoch is "0", a missing revision "" (which
    sorts as "0" does)."""
    version = version.strip()
    epoch = "0"
    if ":" in version:
        epoch, version = version.split(":", 1)
    upstream, _, revision = version.rpartition("-")
    if not upstream:
        upstream, revision = revision, ""
    return epoch, upstream, revision


def compare(a: str, b: str) -> int:
    """<0, 0 or >0 as version a sorts before, with or after b (dpkg's order). The epoch is a number; dpkg
    refuses a version whose epoch is not, this compares it as verrevcmp would."""
    (ea, ua, ra), (eb, ub, rb) = split(a), split(b)
    return (_compare_part(ea.encode(), eb.encode()) or _compare_part(ua.encode(), ub.encode())
            or _compare_part(ra.encode(), rb.encode()))


def newer(a: str, b: str) -> bool:
    """a is a later version than b (`dpkg --compare-versions a gt b`)."""
    return compare(a, b) > 0


sort_key = functools.cmp_to_key(compare)
