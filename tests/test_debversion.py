"""kiosk.spec.debversion against the real `dpkg --compare-versions`, on pairs picked for dpkg's rules
(epochs, ~, +deb12u1, +b1, revisions, leading zeros, letters against other characters) and on many
generated ones."""

from __future__ import annotations

import random
import shutil
import subprocess

import pytest

from kiosk.spec.debversion import compare, newer, sort_key, split

pytestmark = pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs dpkg")

PAIRS = [
    ("1.0", "1.0"), ("1.0", "1.0-0"), ("1.0", "1.0-1"), ("1.0-1", "1.0-1+b1"), ("1.0", "1.0+b1"),
    ("2.36.1-8", "2.36.1-8+deb12u1"), ("2.36.1-8+deb12u1", "2.36.1-8+deb12u2"), ("1.2.3-1", "1.2.3-1+deb12u10"),
    ("252.30-1~deb12u2", "252.31-1~deb12u1"), ("252.36-1~deb12u1", "252.36-1"), ("1.0~rc1", "1.0"),
    ("1.0~rc1", "1.0~rc2"), ("1.0~~", "1.0~"), ("1.0~", "1.0"), ("1.0~~a", "1.0~"), ("1:1.0", "2.0"),
    ("1:1.0", "1:1.0"), ("0:1.0", "1.0"), ("2:0.1", "1:9.9"), ("10:1", "9:1"), ("01.0", "1.0"),
    ("1.001", "1.1"), ("1.10", "1.9"), ("1.0a", "1.0"), ("1.0a", "1.0+"), ("1.0A", "1.0a"), ("1.0.", "1.0+"),
    ("1.0-1", "1.0.1-1"), ("6.1.0-28", "6.1.0-9"), ("6.1.123-1", "6.1.99-1"), ("3.0.11-1~deb12u2", "3.0.15-1~deb12u1"),
    ("1:9.18.28-1~deb12u2", "1:9.18.33-1~deb12u2"), ("2.2.40-1.1", "2.2.40-1.1+deb12u1"), ("7.88.1-10+deb12u5", "7.88.1-10+deb12u12"),
    ("1.0-1ubuntu1", "1.0-1"), ("1.0-1", "1.0-1a"), ("a", "b"), ("1.0+dfsg", "1.0"), ("1.0+dfsg-1", "1.0-1"),
    ("2023.01+dfsg-2+deb12u3", "2023.01+dfsg-2"), ("1.2.3-0.1", "1.2.3-0.10"), ("1.0-2", "1.0-10"),
    ("0.0", "0"), ("123456789012345678901234567890", "123456789012345678901234567891"),
    ("1.0~bpo12+1", "1.0-1"), ("1.0-1~bpo12+1", "1.0-1"), ("5.2.15-2+b7", "5.2.15-2+b8"), ("20230210-5", "20230210-5+deb12u1"),
]


def dpkg(a: str, op: str, b: str) -> bool:
    proc = subprocess.run(["dpkg", "--compare-versions", a, op, b], capture_output=True, text=True)
    assert proc.returncode in (0, 1), f"dpkg refused {a!r} or {b!r}: {proc.stderr}"   # a pair dpkg calls bad syntax
    return proc.returncode == 0


def dpkg_order(a: str, b: str) -> int:
    return -1 if dpkg(a, "lt", b) else (0 if dpkg(a, "eq", b) else 1)


def sign(n: int) -> int:
    return (n > 0) - (n < 0)


@pytest.mark.parametrize("a, b", PAIRS)
def test_chosen_pairs_order_as_dpkg_orders_them(a, b):
    assert sign(compare(a, b)) == dpkg_order(a, b), (a, b)
    assert sign(compare(b, a)) == dpkg_order(b, a), (b, a)
    assert newer(a, b) == dpkg(a, "gt", b)


def _generated(rng: random.Random) -> str:
    """A version dpkg accepts: an optional epoch, an upstream starting with a digit, an optional revision."""
    parts = ["0", "1", "2", "9", "10", "01", "a", "b", "Z", ".", "+", "~", "~~", "dfsg", "deb12u", "b"]
    upstream = rng.choice("0123456789") + "".join(rng.choice(parts) for _ in range(rng.randint(0, 5)))
    upstream = upstream.replace("-", "")
    version = upstream
    if rng.random() < 0.6:
        version += "-" + rng.choice("0123456789") + "".join(rng.choice(parts) for _ in range(rng.randint(0, 3)))
    if rng.random() < 0.2:
        version = f"{rng.randint(0, 3)}:{version}"
    return version


def test_generated_pairs_order_as_dpkg_orders_them():
    """400 pairs (a fixed seed), with near neighbours: the same prefix and a small change."""
    rng = random.Random(17)
    wrong, outcomes = [], set()
    for _ in range(200):
        a = _generated(rng)
        b = _generated(rng)
        c = a + rng.choice(["~", "+b1", "a", ".0", "0", "~rc1", "-1"]) if "-" not in a else a + rng.choice(["~", "+b1", "a", ".0"])
        for x, y in ((a, b), (a, c)):
            expected = dpkg_order(x, y)
            outcomes.add(expected)
            if sign(compare(x, y)) != expected:
                wrong.append((x, y, compare(x, y), expected))
    assert not wrong, wrong[:20]
    assert outcomes == {-1, 0, 1}


def test_the_order_sorts_a_list_as_dpkg_would():
    versions = ["1.0", "1.0~rc1", "1:0.5", "1.0-1", "1.0+b1", "0.9", "1.0-1+deb12u1", "1.0~~"]
    ordered = sorted(versions, key=sort_key)
    assert ordered == ["0.9", "1.0~~", "1.0~rc1", "1.0", "1.0-1", "1.0-1+deb12u1", "1.0+b1", "1:0.5"]
    for x, y in zip(ordered, ordered[1:]):
        assert dpkg(x, "le", y), (x, y)


def test_split_names_the_parts():
    assert split("1:2.36.1-8+deb12u1") == ("1", "2.36.1", "8+deb12u1")
    assert split("2.36.1") == ("0", "2.36.1", "")
    assert split("1.0-2-3") == ("0", "1.0-2", "3")
