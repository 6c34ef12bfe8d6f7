"""The update signing key and the bundle of a built image (kiosk.update): real openssl, real rauc, a real
image from kiosk's pipeline. The device side (install into the inactive slot, boot once, fall back) is
in notes/ab-update.md until the A/B image layout lands."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imagetools import built_image  # noqa: E402,F401

from kiosk.core.errors import KioskError  # noqa: E402
from kiosk.qemu.disk import root_partition  # noqa: E402
from kiosk.config import signing  # noqa: E402
from kiosk.update import bundle  # noqa: E402


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache of this test's own (the session's isolated one is shared by every test)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("KIOSK_CACHE_DIR", str(path))
    return path


def _dates(cert: Path) -> str:
    return subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-dates"], capture_output=True,
                          text=True, check=True).stdout


def test_the_signing_key_is_made_once_private_and_valid_from_1970(cache):
    made = []
    pair = signing.signing_key(log=made.append)
    assert pair.key.parent == cache / "update-signing"
    assert stat.S_IMODE(os.stat(pair.key.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(pair.key).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pair.cert).st_mode) == 0o644
    assert sorted(os.listdir(pair.key.parent)) == ["cert.pem", "key.pem"]   # no CA database left behind
    assert len(made) == 1 and "keep a copy" in made[0]
    # A device without a clock runs at its image's date: the certificate must already be valid then.
    dates = _dates(pair.cert)
    assert "notBefore=Jan  1 00:00:00 1970 GMT" in dates and "notAfter=Dec 31 23:59:59 9999 GMT" in dates
    # The key and the certificate are one pair.
    pub_key = subprocess.run(["openssl", "pkey", "-in", str(pair.key), "-pubout"], capture_output=True,
                             text=True, check=True).stdout
    pub_cert = subprocess.run(["openssl", "x509", "-in", str(pair.cert), "-noout", "-pubkey"],
                              capture_output=True, text=True, check=True).stdout
    assert pub_key == pub_cert
    # Made once: the second call finds it and says nothing.
    first = signing.fingerprint(pair.cert)
    again = signing.signing_key(log=made.append)
    assert again == pair and signing.fingerprint(again.cert) == first and len(made) == 1
    assert not [n for n in os.listdir(cache) if n.startswith(".update-signing")]


def test_no_key_is_made_when_asked_not_to(cache):
    with pytest.raises(KioskError, match="no update signing key"):
        signing.signing_key(create=False)
    assert not (cache / "update-signing").exists()


@pytest.mark.parametrize("target, mode, words", [
    ("key.pem", 0o640, "mode 0640: others may read"),
    ("cert.pem", 0o666, "mode 0666"),
    ("", 0o755, "mode 0755"),
])
def test_a_key_others_can_read_or_change_is_refused(cache, target, mode, words):
    pair = signing.signing_key()
    os.chmod(pair.key.parent / target if target else pair.key.parent, mode)
    with pytest.raises(KioskError, match=words) as caught:
        signing.signing_key()
    assert "chmod" in caught.value.hint


def test_a_missing_half_is_said_and_not_replaced(cache):
    pair = signing.signing_key()
    pair.cert.unlink()
    with pytest.raises(KioskError, match="cert.pem is missing"):
        signing.signing_key()
    assert not pair.cert.exists()   # never a new certificate that no device trusts


def test_manifest_values_that_rauc_cannot_hold_are_refused():
    with pytest.raises(KioskError, match="version"):
        bundle._manifest("qemu", "1\n[evil]", "x")
    assert "compatible=kiosk-qemu\nversion=7 abc\n" in bundle._manifest("qemu", "7 abc", "d")


def test_a_bundle_carries_the_images_root_byte_for_byte_and_only_its_key_opens_it(built_image, tmp_path, cache):
    img = built_image("qemu")
    pair = signing.signing_key()
    out = bundle.make_bundle(img.image, tmp_path / "update.raucb", board="qemu", version="2",
                             description="kiosk test", key=pair)
    assert out.is_file() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]   # no leftovers

    info = bundle.bundle_info(out, pair.cert)
    assert info["compatible"] == "kiosk-qemu" and info["version"] == "2"
    (rootfs,) = [entry["rootfs"] for entry in info["images"]]
    part = root_partition(img.image)
    digest = hashlib.sha256()
    with open(img.image, "rb") as f:
        f.seek(part.start)
        left = part.size
        while left:
            block = f.read(min(left, 8 << 20))
            digest.update(block)
            left -= len(block)
    assert rootfs["filename"] == "rootfs.ext4"
    assert rootfs["size"] == part.size
    assert rootfs["checksum"] == digest.hexdigest()
    # Compressed: a bundle is shipped over the network.
    assert out.stat().st_size < part.size // 2

    # Another user's key: the same bundle does not verify against it.
    os.environ["KIOSK_CACHE_DIR"] = str(tmp_path / "other-cache")   # (monkeypatch restores it)
    other = signing.signing_key()
    with pytest.raises(KioskError, match="signature verification failed"):
        bundle.bundle_info(out, other.cert)
