"""The update signing key and the bundle of a built image (kiosk.update): real openssl, real rauc, a real
image from kiosk's pipeline. The device side (install into the inactive slot, boot once, fall back) is
in notes/ab-update.md until the A/B image layout lands."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from imagetools import built_image  # noqa: E402,F401

from kiosk.core.errors import KioskError  # noqa: E402
from kiosk.image.mbr import root_partition  # noqa: E402
from kiosk.config import signing  # noqa: E402
from kiosk.image import bundle  # noqa: E402
from kiosk.device.slots import bundle_info  # noqa: E402


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
        signing._manifest("qemu", "1\n[evil]", "x")
    assert "compatible=kiosk-qemu\nversion=7 abc\n" in signing._manifest("qemu", "7 abc", "d")


def test_a_bundle_carries_the_images_root_byte_for_byte_and_only_its_key_opens_it(built_image, tmp_path, cache):
    img = built_image("qemu")
    pair = signing.signing_key()
    out = bundle.make_bundle(img.image, tmp_path / "update.raucb", board="qemu", version="2",
                             description="kiosk test", key=pair)
    assert out.is_file() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]   # no leftovers

    info = bundle_info(out, pair.cert)
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
    assert "post-install" in rootfs["hooks"]   # kiosk's hook keeps the machine id (below)
    assert rootfs["size"] == part.size
    assert rootfs["checksum"] == digest.hexdigest()
    # Compressed: a bundle is shipped over the network.
    assert out.stat().st_size < part.size // 2

    # Another user's key: the same bundle does not verify against it.
    os.environ["KIOSK_CACHE_DIR"] = str(tmp_path / "other-cache")   # (monkeypatch restores it)
    other = signing.signing_key()
    with pytest.raises(KioskError, match="signature verification failed"):
        bundle_info(out, other.cert)


def test_only_a_refused_signature_is_said_to_be_the_wrong_key(tmp_path, cache):
    """rauc_install's words for RAUC's failures, from real RAUC output: a bundle signed by another key is
    BundleRefused ("not signed by the key this device trusts"); a failure after the signature was verified
    (RAUC said "Verifying bundle signature..." first, as in every install) is the failure it is. Seen: a
    chunked install on raspberryPi3 that failed after its signature checked was reported as the wrong key."""
    from kiosk.device.slots import BundleRefused, rauc_install

    own = signing.signing_key()
    content = tmp_path / "content"
    content.mkdir()
    (content / "rootfs.ext4").write_bytes(os.urandom(200_000))
    (content / "manifest.raucm").write_text("[update]\ncompatible=kiosk-test\nversion=1\n[bundle]\nformat=verity\n"
                                            "[image.rootfs]\nfilename=rootfs.ext4\n")
    out = tmp_path / "test.raucb"
    subprocess.run(["rauc", "bundle", "--cert", str(own.cert), "--key", str(own.key), str(content), str(out)],
                   check=True, capture_output=True)
    os.environ["KIOSK_CACHE_DIR"] = str(tmp_path / "other-cache")   # (the fixture's monkeypatch restores it)
    other = signing.signing_key()
    said = []
    with pytest.raises(BundleRefused, match="not signed by the key this device trusts"):
        rauc_install(["rauc", "info", "--keyring", str(other.cert), str(out)], said.append)
    assert any("signature verification failed" in line for line in said), said
    said.clear()
    with pytest.raises(KioskError) as failed:
        rauc_install(["rauc", "extract", "--keyring", str(own.cert), str(out), str(tmp_path / "no/such/dir")],
                     said.append)
    assert not isinstance(failed.value, BundleRefused), failed.value
    assert any("Verifying bundle signature" in line for line in said), said
    assert str(failed.value).startswith("rauc install on the device failed: "), failed.value


def test_the_bundles_hook_gives_the_new_slot_the_running_machine_id(tmp_path):
    """What RAUC runs after writing the slot (`hook slot-post-install`, the slot mounted; the booted update test
    sees the same id after the switch): the id copied whole, and only for the root slot's post-install."""
    hook = tmp_path / "hook"
    hook.write_text(signing.HOOK_SCRIPT.replace("/etc/machine-id ", f"{tmp_path}/running-id "))
    hook.chmod(0o755)
    (tmp_path / "running-id").write_text("0123456789abcdef0123456789abcdef\n")
    slot = tmp_path / "slot"
    (slot / "etc").mkdir(parents=True)
    (slot / "etc/machine-id").write_text("uninitialized\n")

    def run_hook(*args, cls="rootfs"):
        env = {"PATH": os.environ["PATH"], "RAUC_SLOT_CLASS": cls, "RAUC_SLOT_MOUNT_POINT": str(slot)}
        return subprocess.run([str(hook), *args], env=env, capture_output=True, text=True)

    assert run_hook("slot-pre-install").returncode == 0
    assert run_hook("slot-post-install", cls="appfs").returncode == 0
    assert (slot / "etc/machine-id").read_text() == "uninitialized\n"
    assert run_hook("slot-post-install").returncode == 0
    assert (slot / "etc/machine-id").read_text() == "0123456789abcdef0123456789abcdef\n"
    assert sorted(p.name for p in (slot / "etc").iterdir()) == ["machine-id"]


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _casync_extract(server, seed: Path, index: Path, out: Path) -> subprocess.CompletedProcess:
    """casync extract as RAUC 1.8 runs it on the device (update_handler.c casync_extract)."""
    return subprocess.run(["casync", "extract", "--seed", str(seed), f"--store=http://127.0.0.1:{server.port}/store",
                           "--seed-output=no", str(index), str(out)], capture_output=True, text=True)


def test_a_chunked_bundle_is_signed_and_a_seed_leaves_only_the_changed_chunks_to_ship(built_image, tmp_path,
                                                                                      cache):
    """kiosk update's default (kiosk.update.chunks): `rauc convert` of the signed bundle gives a signed verity
    bundle carrying the casync index, and real `casync extract` as RAUC runs it on the device (the running
    slot as the seed, the store over HTTP from ChunkServer) rebuilds the root byte for byte while only the
    chunks the seed lacks cross the wire; a store whose chunks were altered writes nothing whole."""
    from kiosk.builders import chunkstore

    img = built_image("qemu")
    pair = signing.signing_key()
    whole = bundle.make_bundle(img.image, tmp_path / "update.raucb", board="qemu", version="3",
                               description="kiosk test", key=pair)
    full = bundle_info(whole, pair.cert)["images"][0]["rootfs"]
    index, store = bundle.make_chunked(whole, pair)
    assert (index.name, store.name) == ("update-chunks.raucb", "update-chunks.castr")
    info = bundle_info(index, pair.cert)
    assert info["compatible"] == "kiosk-qemu" and info["version"] == "3"
    rootfs = info["images"][0]["rootfs"]
    assert rootfs["filename"] == "rootfs.ext4.caibx"
    assert (rootfs["size"], rootfs["checksum"]) == (full["size"], full["checksum"])
    text = subprocess.run(["rauc", "info", f"--keyring={pair.cert}", str(index)], capture_output=True, text=True,
                          check=True).stdout
    assert "Bundle Format: \tverity" in text or "Bundle Format: verity" in " ".join(text.split()), text
    assert index.stat().st_size < 2 << 20 < whole.stat().st_size
    count, stored = bundle.store_size(store)
    assert count > 1000 and stored > whole.stat().st_size // 2

    # The index as the device's RAUC sees it (signature checked); the seed: this root with 1 MiB changed.
    unpacked = tmp_path / "unpacked"
    subprocess.run(["rauc", "extract", f"--keyring={pair.cert}", str(index), str(unpacked)], check=True,
                   capture_output=True)
    part = root_partition(img.image)
    seed = tmp_path / "seed.ext4"
    bundle._copy_sparse_range(img.image, part.start, part.size, seed)
    with open(seed, "r+b") as f:
        f.seek(64 << 20)
        f.write(os.urandom(1 << 20))
    out = tmp_path / "slot.ext4"
    with chunkstore.ChunkServer(store) as server:
        proc = _casync_extract(server, seed, unpacked / "rootfs.ext4.caibx", out)
        assert proc.returncode == 0, proc.stderr
        served, sent = server.figures()
    assert _sha256_of(out) == full["checksum"]
    assert 1 <= served <= 40 and 0 < sent < stored // 100, (served, sent, stored)   # compressed chunks

    # Altered chunks in the store: casync checks each against its id in the signed index and stops.
    for chunk in store.glob("*/*.cacnk"):
        chunk.write_bytes(b"not the chunk")
    out.unlink()
    with chunkstore.ChunkServer(store) as server:
        proc = _casync_extract(server, seed, unpacked / "rootfs.ext4.caibx", out)
    assert proc.returncode != 0
    assert not out.exists() or _sha256_of(out) != full["checksum"]


def test_the_chunk_server_answers_chunk_paths_of_its_store_only(tmp_path):
    """Unit (the integration is above and in test_update_boot.py): what the forwarded port gives out."""
    import urllib.error
    import urllib.request

    from kiosk.builders import chunkstore
    from kiosk.update import chunks

    store = tmp_path / "s.castr"
    cid = "ab12" + "0" * 60
    (store / "ab12").mkdir(parents=True)
    (store / "ab12" / f"{cid}.cacnk").write_bytes(b"chunk")
    (tmp_path / "secret").write_text("no")
    with chunkstore.ChunkServer(store) as server:
        base = f"http://127.0.0.1:{server.port}"
        assert urllib.request.urlopen(f"{base}/store/ab12/{cid}.cacnk").read() == b"chunk"
        assert urllib.request.urlopen(f"{base}/store//ab12/{cid}.cacnk").read() == b"chunk"
        assert urllib.request.urlopen(base + chunkstore.PROBE_PATH).read() == chunkstore.PROBE_ANSWER
        for path in ("/store/../secret", "/secret", f"/store/cd12/{cid}.cacnk", "/store/ab12/", "/store/"):
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(base + path)
            assert caught.value.code == 404, path
        assert server.figures() == (2, 10)
    assert chunks.forwarded(["ssh", "-o", "BatchMode=yes", "--", "dev"], 4242) == [
        "ssh", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-R", "127.0.0.1:7464:127.0.0.1:4242",
        "--", "dev"]


def test_the_devices_wait_for_the_forwarded_store_runs_in_a_shell_and_knows_its_answer(tmp_path):
    """The fixed remote command's first half (kiosk.update.chunks.WAIT_FOR_STORE), run by bash as sshd runs it,
    against ChunkServer's handler on the device-side port (here: this machine's loopback)."""
    import threading
    from http.server import ThreadingHTTPServer

    from kiosk.image.rauc import RAUC_CHUNK_PORT
    from kiosk.builders import chunkstore
    from kiosk.update import chunks

    assert chunks.WAIT_FOR_STORE.count("'") == 2   # one single-quoted word: nothing inside may close it
    with chunkstore.ChunkServer(tmp_path) as server:
        try:
            device_side = ThreadingHTTPServer(("127.0.0.1", RAUC_CHUNK_PORT), server.httpd.RequestHandlerClass)
        except OSError:
            pytest.skip(f"port {RAUC_CHUNK_PORT} is taken on this machine")
        thread = threading.Thread(target=device_side.serve_forever, daemon=True)
        thread.start()
        try:
            proc = subprocess.run(["bash", "-c", f"{chunks.WAIT_FOR_STORE} && echo answered"], capture_output=True,
                                  text=True, timeout=60)
        finally:
            device_side.shutdown()
            device_side.server_close()
    assert (proc.returncode, proc.stdout) == (0, "answered\n"), proc.stderr


@pytest.mark.root
def test_rauc_18_takes_one_install_per_service_so_kiosk_starts_a_fresh_one(tmp_path, cache):
    """Real RAUC 1.8 (the devices' and this machine's), its service on a private system bus, two raw slots
    in files, a custom boot loader in files, and kiosk's chunk server as system.conf's casync storepath (as
    on every device). After one install (here a bundle signed by another key, refused), the same service's
    next install fails ("Copying image ... failed", "RAUC service disappeared": RAUC frees storepath with
    the first bundle, fixed in 1.11.1; seen on raspberryPi3). A fresh service installs the same bundle,
    seeded from slot A. So kiosk stops the service before every install (slots.FRESH_RAUC; the booted
    tests check that it does). If the second install here succeeds, this machine's RAUC is fixed:
    FRESH_RAUC can go once the devices' RAUC is too."""
    import shutil
    import time

    from kiosk.builders.chunkstore import ChunkServer
    from kiosk.device.slots import FRESH_RAUC, install_here

    if os.geteuid() != 0:
        pytest.skip("RAUC mounts the bundle (a loop device): root")
    assert FRESH_RAUC == "systemctl stop rauc.service"
    own = signing.signing_key()
    os.environ["KIOSK_CACHE_DIR"] = str(tmp_path / "other-cache")   # (the fixture's monkeypatch restores it)
    other = signing.signing_key()
    system = tmp_path / "system"
    (system / "mnt").mkdir(parents=True)
    content = tmp_path / "content"
    content.mkdir()
    old = os.urandom(48 << 20)
    (system / "slotA").write_bytes(old)
    new = old[:(8 << 20)] + os.urandom(1 << 20) + old[(9 << 20):]   # one MiB changed: casync seeds the rest
    (content / "rootfs.img").write_bytes(new)
    (system / "slotB").write_bytes(b"")
    os.truncate(system / "slotB", len(new))
    # plain: a verity bundle needs device-mapper, which this CI machine's kernel lacks (the devices have it)
    (content / "manifest.raucm").write_text("[update]\ncompatible=kiosk-test\nversion=2\n[bundle]\nformat=plain\n"
                                            "[image.rootfs]\nfilename=rootfs.img\n")
    chunked = {}
    for name, key in (("own", own), ("other", other)):
        whole = tmp_path / f"{name}.raucb"
        subprocess.run(["rauc", "bundle", "--cert", str(key.cert), "--key", str(key.key), str(content), str(whole)],
                       check=True, capture_output=True)
        chunked[name] = bundle.make_chunked(whole, key)
    (system / "boot.sh").write_text(f"""#!/bin/sh
case "$1" in
  get-primary) cat {system}/primary 2>/dev/null || echo A ;;
  set-primary) echo "$2" > {system}/primary ;;
  get-state) cat {system}/state-$2 2>/dev/null || echo good ;;
  set-state) echo "$3" > {system}/state-$2 ;;
  get-current) echo A ;;
esac
""")
    (system / "boot.sh").chmod(0o755)
    (system / "bus.conf").write_text(f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><listen>unix:path={system}/bus</listen><auth>EXTERNAL</auth>
<policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*"/>
<allow receive_sender="*"/></policy></busconfig>
""")
    env = dict(os.environ, DBUS_SYSTEM_BUS_ADDRESS=f"unix:path={system}/bus")
    bus = subprocess.Popen(["dbus-daemon", f"--config-file={system}/bus.conf", "--nofork"])
    services = []

    def service() -> subprocess.Popen:
        proc = subprocess.Popen(["rauc", f"--conf={system}/system.conf", "service", "--override-boot-slot=A"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        services.append(proc)
        for _ in range(100):
            if subprocess.run(["rauc", f"--conf={system}/system.conf", "status"], env=env,
                              capture_output=True).returncode == 0:
                return proc
            time.sleep(0.1)
        raise AssertionError("the RAUC service did not come up")

    def install(name: str) -> subprocess.CompletedProcess:
        return subprocess.run(["rauc", f"--conf={system}/system.conf", "install", str(chunked[name][0])], env=env,
                              capture_output=True, text=True, timeout=300)

    try:
        with ChunkServer(chunked["own"][1]) as server:
            (system / "system.conf").write_text(
                f"[system]\ncompatible=kiosk-test\nbootloader=custom\nstatusfile={system}/rauc.status\n"
                f"mountprefix={system}/mnt\n[handlers]\nbootloader-custom-backend={system}/boot.sh\n"
                f"[keyring]\npath={own.cert}\n[casync]\nstorepath=http://127.0.0.1:{server.port}/store\n"
                f"[slot.rootfs.0]\ndevice={system}/slotA\ntype=raw\nbootname=A\n"
                f"[slot.rootfs.1]\ndevice={system}/slotB\ntype=raw\nbootname=B\n")
            first = service()
            refused = install("other")
            assert refused.returncode != 0 and "signature verification failed" in refused.stdout + refused.stderr
            again = install("own")                 # the same service: storepath was freed with the refused bundle
            said = again.stdout + again.stderr
            # casync is handed whatever now lies where storepath was (seen: "Failed to run synchronizer"), and
            # the service itself often dies of the heap damage ("RAUC service disappeared", SIGSEGV/SIGABRT)
            assert again.returncode != 0 and "Copying image to rootfs.1 failed" in said, said
            assert (system / "slotB").read_bytes() != new
            first.terminate()                      # FRESH_RAUC on a device: systemctl stop rauc.service...
            first.wait(timeout=30)
            service()                              # ...and D-Bus starts a new one for the install
            # kiosk's own command (this machine has no systemd: its systemctl fails, and the install goes on)
            fresh = subprocess.run(install_here(chunked["own"][0]), env=env, capture_output=True, text=True,
                                   timeout=300)
            assert fresh.returncode == 0, fresh.stdout + fresh.stderr
            assert (system / "slotB").read_bytes() == new
            count, _ = server.figures()
            assert 0 < count < len(list(chunked["own"][1].rglob("*.cacnk"))) / 2   # seeded from slot A
    finally:
        for proc in [*services, bus]:
            proc.kill()
            proc.wait()
        shutil.rmtree(system / "mnt", ignore_errors=True)
