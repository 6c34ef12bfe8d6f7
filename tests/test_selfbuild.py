"""A system the device builds itself (kiosk.device.selfbuild): who may, the device's own signing key and RAUC's
trust in it (real openssl and rauc, the system.conf an image carries), and the refusal when it may not. The build
itself (a copy of the running root, dpkg in it, the bundle installed and tried) runs on a booted qemu device in
tests/test_system_push_boot.py."""

import os
import stat
import subprocess

import pytest
from test_system_trial import SECOND, add_generation, booted, device, pushed, quiet, store  # noqa: F401

from kiosk.config import signing
from kiosk.core.errors import KioskError
from kiosk.core.paths import DEVICE_BUILD_KEY, DEVICE_KEYRING
from kiosk.device import selfbuild, system
from kiosk.image.rauc import system_conf
from kiosk.spec.hardware import load_board


def test_who_builds_its_own_system():
    assert selfbuild.why_not_here({"hardware": "qemu"}) is None
    assert selfbuild.why_not_here({"hardware": "raspberryPi3", "allowLocalBuild": True}) is None
    assert "allowLocalBuild is false" in selfbuild.why_not_here({"hardware": "qemu", "allowLocalBuild": False})
    assert "needs a builder" in selfbuild.why_not_here({"hardware": "raspberryPi0"})


def test_an_images_slot_trusts_the_devices_builds_and_an_older_one_does_not(tmp_path):
    conf = tmp_path / selfbuild.SYSTEM_CONF
    conf.parent.mkdir(parents=True)
    conf.write_text(system_conf(load_board("raspberryPi3")))
    assert selfbuild.trusts_own_builds(tmp_path)
    conf.write_text(conf.read_text().replace(f"directory={DEVICE_KEYRING}\n", ""))
    assert not selfbuild.trusts_own_builds(tmp_path)


def _bundle(tmp_path, name, key):
    staging = tmp_path / f"staging-{name}"
    staging.mkdir()
    (staging / signing.ROOT_IMAGE).write_bytes(os.urandom(1 << 18))
    out = tmp_path / f"{name}.raucb"
    signing.sign_bundle(staging, out, board="qemu", version=f"device {name}", description="test", key=key)
    return out


def _rauc_info(conf, bundle):
    return subprocess.run(["rauc", f"--conf={conf}", "info", str(bundle)], capture_output=True, text=True)


def test_the_devices_key_signs_bundles_its_rauc_takes_beside_the_users(tmp_path, monkeypatch):
    """RAUC 1.8 with the image's [keyring] (the user's certificate as path=, the data partition's directory=):
    bundles of the user's key and of the device's own verify, a stranger's does not; the key is 0600."""
    monkeypatch.setenv("KIOSK_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "device"
    (root / "etc").mkdir(parents=True)
    (root / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    made = []
    key = selfbuild.device_key(root, "kiosk-test", made.append)
    assert key.key == root / DEVICE_BUILD_KEY.lstrip("/") / "key.pem"
    assert stat.S_IMODE(key.key.stat().st_mode) == 0o600
    keyring = root / DEVICE_KEYRING.lstrip("/")
    assert [p.read_text() for p in keyring.iterdir()] == [key.cert.read_text()]
    assert selfbuild.device_key(root, "kiosk-test", made.append) == key   # made once, trusted once
    assert sum("RAUC trusts" in line for line in made) == 1

    user = signing.signing_key()
    stranger = signing.signing_key(directory=tmp_path / "stranger", subject="/O=kiosk/CN=someone else")
    conf = tmp_path / "system.conf"
    conf.write_text(system_conf(load_board("qemu")).replace(signing.RAUC_CERTIFICATE, str(user.cert))
                    .replace(f"directory={DEVICE_KEYRING}", f"directory={keyring}"))
    for signer, verified in ((key, True), (user, True), (stranger, False)):
        proc = _rauc_info(conf, _bundle(tmp_path, signer.key.parent.name, signer))
        assert (proc.returncode == 0) is verified, proc.stderr
        if verified:
            assert "Verified inline signature" in proc.stderr
    # before the device made its key (the directory absent), the user's bundles still verify
    conf.write_text(conf.read_text().replace(f"directory={keyring}", f"directory={tmp_path / 'absent'}"))
    assert _rauc_info(conf, tmp_path / "update-signing.raucb").returncode == 0


def test_a_board_that_may_not_build_itself_refuses_the_push_untouched(device, monkeypatch):  # noqa: F811
    root = device
    booted(root, "A")
    old, new = pushed(root)
    gen = add_generation(root, SECOND, commit=new)

    def none(*a, **k):
        raise system.NoBuilder("no builder could build this system (raspberryPi0); nothing on the device was changed",
                               hint=system.NO_BUILDER)

    monkeypatch.setattr(system, "fetch_bundle", none)
    with pytest.raises(KioskError, match=r"nothing on the device was changed \(a raspberryPi0 does not build"):
        system.start_trial(root, gen, store.generation(root, 1), commit=new, old_commit=old,
                           data={"debian": {}, "hardware": "raspberryPi0"}, spec_text="{}", running={"debian": {}},
                           changes=["packages +hello"], pid=os.getpid(), log=quiet(), added=["hello"])
    assert system.read_trial(root) is None and store.pointer(root, "default") == 1
    with pytest.raises(KioskError, match="allowLocalBuild is false"):
        system.start_trial(root, gen, store.generation(root, 1), commit=new, old_commit=old,
                           data={"debian": {}, "hardware": "qemu", "allowLocalBuild": False}, spec_text="{}",
                           running={"debian": {}}, changes=["packages +hello"], pid=os.getpid(), log=quiet(),
                           added=["hello"])
    with pytest.raises(KioskError, match="only on itself"):   # a test root is never copied as if it were /
        system.start_trial(root, gen, store.generation(root, 1), commit=new, old_commit=old,
                           data={"debian": {}, "hardware": "qemu", "hostName": "k"}, spec_text="{}",
                           running={"debian": {}}, changes=["packages +hello"], pid=os.getpid(), log=quiet(),
                           added=["hello"])
    assert system.read_trial(root) is None and store.pointer(root, "default") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root (the CI runs as root)")
def test_the_chroots_dev_is_its_own_and_a_stale_work_directory_goes_with_its_mounts(tmp_path):
    """dpkg's chroot gets new proc/sysfs/tmpfs instances, never a bind of the device's /dev; what a killed push
    left in incoming/ (a build's mounts included) is detached and removed by the next one, nothing else."""
    base = tmp_path / "incoming"
    tree = base / "system-stale" / "new"
    for name in ("dev", "proc", "sys"):
        (tree / name).mkdir(parents=True)
    keep = base / "other"
    keep.mkdir()
    with selfbuild._mounted(print) as mount:
        selfbuild._chroot_mounts(tree, mount)
        null = (tree / "dev/null").stat()
        assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
        assert (tree / "proc/self").is_symlink() and os.readlink(tree / "dev/fd") == "/proc/self/fd"
        assert os.stat(tree / "dev").st_dev != os.stat("/dev").st_dev
    assert selfbuild._mounts_under(base) == []   # all unmounted again
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(tree / "dev")], check=True)   # as a killed push leaves it
    (tree / "dev/null").write_text("x")
    said = []
    selfbuild.clear_stale(base, said.append)
    assert not (base / "system-stale").exists() and keep.is_dir(), said
    assert selfbuild._mounts_under(base) == [] and said == ["removed system-stale, left by a push that never finished"]


def test_an_archive_dated_after_the_devices_clock_is_said_with_what_to_do(monkeypatch):
    """apt's refusal (a Pi with no network time: no clock of its own) comes before the copy, with a hint."""
    def refused(request, work, log):
        raise KioskError("apt-get update -q ... exited with status 100:\n  E: Release file for http://deb.debian.org"
                         "/debian/dists/bookworm/InRelease is not valid yet (invalid for another 74d 14h 11min 37s).")

    monkeypatch.setattr(selfbuild, "fetch_packages", refused)
    monkeypatch.setattr(selfbuild, "package_request", lambda root, data, wanted: {"packages": wanted})
    with pytest.raises(KioskError, match="not valid yet") as caught:
        selfbuild._fetch("/", {}, ["hello"], None, print)
    assert "clock" in caught.value.hint and "builder" in caught.value.hint
    assert selfbuild._fetch("/", {}, [], None, print) == []   # nothing to fetch: no apt at all
