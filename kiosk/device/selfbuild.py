"""A new system built on the device itself, when no builder answers a push that changes an A/B board's system
and the board may build for itself (hardware canBuildItself, the spec's allowLocalBuild, true by default).

The new slot is the running one with the push's package changes: the running root file system, seen through a
bind mount of / (so nothing mounted on it comes along: the data partition, the firmware partition, /proc), is
copied into a new ext4 the size of the running one; the added packages are resolved and fetched by apt with a
private state, as a builder does (kiosk.builders.apt), and installed there with dpkg --root; the removed ones are
purged; an upgrade (/debian/upgrade, a changed suite) fetches newer versions of every installed package the
same way. The file goes into a bundle of the format a builder makes (kiosk.config.signing.sign_bundle), signed
with the device's own key: made on first use in kiosk's state on the data partition (0600), its certificate the
one file of RAUC's keyring directory there, which every slot's system.conf names beside the user's certificate
(kiosk.image.rauc). So `rauc install` checks its signature, and the try and the verdict are a builder's
system's (kiosk.device.system): tried once in the other slot, kept only when healthy.

Unlike a builder's, such a system starts from the running slot rather than a fresh build of the spec: what a
removed package pulled in stays, and files the running system wrote into its root come along.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
from pathlib import Path

from kiosk.builders.apt import fetch_packages
from kiosk.config.signing import ROOT_IMAGE, SigningKey, sign_bundle, signing_key
from kiosk.core.errors import KioskError, one_line
from kiosk.core.files import human_size, mount_table, write_atomic
from kiosk.core.paths import DEVICE_BUILD_KEY, DEVICE_KEYRING
from kiosk.core.run import run
from kiosk.device.facts import installed_packages
from kiosk.device.fetch import install_debs, package_request
from kiosk.spec.hardware import load_board
from kiosk.spec.sources import apt_sources, sources_list, unsigned_allowed

SOURCES_LIST = "etc/apt/sources.list"
SYSTEM_CONF = "etc/rauc/system.conf"
HINT = "start a builder for it, or give the device a larger card"


def why_not_here(data: dict) -> str | None:
    """Why this device may not build its own system (a sentence), or None when it may."""
    board = load_board(data["hardware"])
    if not board.get("canBuildItself"):
        return f"a {board['name']} does not build its own system (too small: it needs a builder)"
    if data.get("allowLocalBuild", True) is False:
        return "the spec's /allowLocalBuild is false, so the device does not build it itself"
    return None


def trusts_own_builds(root: Path) -> bool:
    """Whether the running slot's RAUC takes bundles signed by the device's key (system.conf names the keyring
    directory; slots from images older than that do not)."""
    try:
        lines = (Path(root) / SYSTEM_CONF).read_text().splitlines()
    except OSError:
        return False
    return f"directory={DEVICE_KEYRING}" in lines


def _subject(root: Path, host: str) -> str:
    """The device's name in its certificate, distinct from the user's (OpenSSL's keyring directory finds a
    signer by subject: two certificates with one subject would hide each other)."""
    try:
        machine = (Path(root) / "etc/machine-id").read_text().strip()[:12]
    except OSError:
        machine = "unknown"
    clean = "".join(c for c in host if c.isalnum() or c in ".-")[:48] or "device"
    return f"/O=kiosk/CN=kiosk device build key {clean} {machine}"


def device_key(root: Path, host: str, log) -> SigningKey:
    """The device's signing pair (made on first use), its certificate in RAUC's keyring directory."""
    root = Path(root)
    key = signing_key(directory=root / DEVICE_BUILD_KEY.lstrip("/"), subject=_subject(root, host), log=log)
    keyring = root / DEVICE_KEYRING.lstrip("/")
    keyring.mkdir(parents=True, exist_ok=True)
    name = run(["openssl", "x509", "-noout", "-hash", "-in", str(key.cert)], what="hashing the device's certificate",
               hint="openssl comes with ca-certificates").stdout.strip() + ".0"
    text = key.cert.read_text()
    target = keyring / name
    if not target.is_file() or target.read_text() != text:
        write_atomic(target, text, mode=0o644)
        log(f"RAUC trusts the device's own certificate: {target}")
    for stale in keyring.iterdir():   # only the device's current certificate
        if stale.name != name:
            stale.unlink()
    return key


def _filesystem(device: str) -> list[str]:
    """mkfs.ext4 options that make a file system like the ext4 on device: its size, block size, inode count,
    label and UUID (both slots carry one UUID: kiosk.image.assemble)."""
    out = run(["dumpe2fs", "-h", device], what=f"reading {device}'s file system").stdout
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}
    try:
        block, blocks, inodes = int(fields["Block size"]), int(fields["Block count"]), int(fields["Inode count"])
    except (KeyError, ValueError):
        raise KioskError(f"dumpe2fs -h {device} gave no block size, block count and inode count") from None
    options = ["-b", str(block), "-N", str(inodes)]
    if fields.get("Filesystem volume name", "<none>") != "<none>":
        options += ["-L", fields["Filesystem volume name"]]
    if fields.get("Filesystem UUID"):
        options += ["-U", fields["Filesystem UUID"]]
    return options + [str(blocks)]


@contextlib.contextmanager
def _mounted(log):
    """mount(argv..., target) for the block's length; everything mounted is unmounted again, last first."""
    targets: list[Path] = []

    def mount(*args: str, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        run(["mount", *args, str(target)], what=f"mounting {target}")
        targets.append(target)

    try:
        yield mount
    finally:
        for target in reversed(targets):
            proc = run(["umount", str(target)], check=False)
            if proc.returncode != 0:
                log(f"umount {target} failed ({one_line(proc.stderr)[:160]}): detaching it lazily")
                run(["umount", "-l", str(target)], check=False)


# The chroot's /dev: a tmpfs of its own with the character devices maintainer scripts use, never a bind of the
# device's /dev (a cleanup that ran into a bind would delete the running system's device nodes).
DEVICE_NODES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}


def _chroot_mounts(tree: Path, mount) -> None:
    """/proc, /sys (read-only) and /dev for dpkg's maintainer scripts in tree: new instances, not binds."""
    mount("-t", "proc", "proc", target=tree / "proc")
    mount("-t", "sysfs", "-o", "ro", "sysfs", target=tree / "sys")
    mount("-t", "tmpfs", "-o", "mode=0755,size=1m", "tmpfs", target=tree / "dev")
    for name, (major, minor) in DEVICE_NODES.items():
        os.mknod(tree / "dev" / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(tree / "dev" / name, 0o666)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, tree / "dev" / name)


def _mounts_under(path: Path) -> list[str]:
    """Mount points below path, deepest first."""
    prefix = f"{str(path).rstrip('/')}/"
    return sorted((point for _, point, _ in mount_table() if point.startswith(prefix)), key=len, reverse=True)


def clear_stale(base: Path, log) -> None:
    """The work directories in base (system-*) of pushes that never finished (their process killed, a power
    cut during a build): their mounts detached, then removed. The caller holds the device's lock, so none is
    in use."""
    for old in Path(base).glob("system-*"):
        if not old.is_dir():
            continue
        for point in _mounts_under(old):
            run(["umount", "-l", point], check=False)
        if _mounts_under(old):
            log(f"left {old}: something is still mounted below it (restart the device to free it)")
            continue
        shutil.rmtree(old, ignore_errors=True)
        log(f"removed {old.name}, left by a push that never finished")


def _sources(data: dict) -> list[str]:
    """The lines of /etc/apt/sources.list the image build leaves for this spec (kiosk.image.rootfs)."""
    return [sources_list([s], options="[trusted=yes] " if unsigned_allowed(s[0]) else "").strip()
            for s in apt_sources(data["debian"])]


def _installed(tree: Path) -> dict[str, str]:
    return {name: version for name, version, _ in installed_packages(tree)}


@contextlib.contextmanager
def _cache_in(directory: Path):
    """kiosk's cache (apt's lists, the .debs) in directory for the block's length: on the data partition, not in
    the running slot, and gone afterwards."""
    before = os.environ.get("KIOSK_CACHE_DIR")
    os.environ["KIOSK_CACHE_DIR"] = str(directory)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("KIOSK_CACHE_DIR", None)
        else:
            os.environ["KIOSK_CACHE_DIR"] = before
        shutil.rmtree(directory, ignore_errors=True)


def _fetch(root: Path, data: dict, wanted: list[str], work: Path, log) -> list[dict]:
    """The .debs for wanted, resolved by apt with a private state against the pushed spec's sources and the
    running system's dpkg status (the copy's, before it is made): a refusal (the archive unreachable, its
    Release not valid by this device's clock, a package unknown) comes before the long copy."""
    if not wanted:
        return []
    try:
        return fetch_packages(package_request(root, data, wanted), work, log)
    except KioskError as exc:
        if "not valid yet" in exc.message:
            raise KioskError(exc.message, hint="the device's clock is behind the archive's (a Pi has no clock of its "
                                               "own: it needs network time, see timedatectl on it), or give the "
                                               "spec a builder") from None
        raise


def _apply(tree: Path, data: dict, entries: list[dict], wanted: list[str], removed: list[str], log) -> None:
    """The push's package changes, in the copy: the fetched .debs installed with dpkg --root, removals by dpkg
    --purge (one the rest still needs stays, said so), sources.list as the spec's."""
    sources = _sources(data)
    try:
        same = [line.strip() for line in (tree / SOURCES_LIST).read_text().splitlines() if line.strip()] == sources
    except OSError:
        same = False
    if not same:   # mmdebstrap's layout: one source a paragraph
        write_atomic(tree / SOURCES_LIST, "\n\n".join(sources) + "\n", mode=0o644)
        log("apt sources: " + " | ".join(sources))
    if wanted:
        install_debs(tree, entries, wanted, log)
    for name in removed:
        proc = run(["dpkg", f"--root={tree}", "--purge", name], check=False, env={"DEBIAN_FRONTEND": "noninteractive"})
        if proc.returncode != 0:
            lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
            log(f"kept {name}: dpkg would not purge it ({one_line(' '.join(lines[-3:]))[:200]})")
        else:
            log(f"purged {name}")


def build_here(root: Path, data: dict, *, added: list[str], removed: list[str], upgrade: bool, commit: str,
               work: Path, log) -> tuple[Path, dict]:
    """(bundle, what a builder's answer would say of it: version, packages) for the pushed spec, made on this
    device in work (on the data partition). KioskError when it cannot be: nothing but work was written."""
    if Path(root).resolve() != Path("/"):
        raise KioskError("a device builds its own system only on itself (root /)")
    if not trusts_own_builds(root):
        raise KioskError("this device's slot predates systems built on the device (its RAUC system.conf names no "
                         f"keyring directory {DEVICE_KEYRING})",
                         hint="give it one new system through a builder or kiosk update; then it can build its own")
    started = time.monotonic()
    key = device_key(root, data["hostName"], log)
    source = run(["findmnt", "-n", "-o", "SOURCE", "/"], what="finding the root file system").stdout.strip()
    mkfs = _filesystem(source)
    usage = shutil.disk_usage("/")
    free = shutil.disk_usage(work).free
    needed = usage.used * 3 // 2 + (256 << 20)   # the copy, the bundle (compressed), apt's downloads
    if free < needed:
        raise KioskError(f"the data partition has {human_size(free)} free; building the new system here needs about "
                         f"{human_size(needed)}", hint=HINT)
    staging = work / "bundle"
    staging.mkdir()
    image = staging / ROOT_IMAGE
    log.stage(f"build the new system on the device: a copy of the running root ({human_size(usage.used)} of "
              f"{source}) with the push's changes")
    wanted = sorted(set(added) | (set(_installed(Path(root))) - set(removed) if upgrade else set()))
    with _cache_in(work / "cache"):
        entries = _fetch(Path(root), data, wanted, work, log)
        run(["mkfs.ext4", "-q", "-F", *mkfs[:-1], str(image), mkfs[-1]], what="making the new root file system")
        tree = work / "new"
        copied = time.monotonic()
        with _mounted(log) as mount:
            mount("--bind", "-o", "ro", "/", target=work / "running")   # / alone: not what is mounted on it
            mount("-o", "loop", str(image), target=tree)
            run(["cp", "-a", "--one-file-system", f"{work / 'running'}/.", f"{tree}/"], what="copying the running root")
            log(f"copied the running root in {time.monotonic() - copied:.0f} s")
            _chroot_mounts(tree, mount)
            _apply(tree, data, entries, wanted, removed, log)
            packages = _installed(tree)
    log.stage("sign the new system with the device's key")
    version = f"device {commit[:12]}"
    bundle = work / "update.raucb"
    sign_bundle(staging, bundle, board=data["hardware"], version=version,
                description=f"kiosk system of {data['hostName']} built on the device", key=key)
    image.unlink()
    log(f"built on the device in {time.monotonic() - started:.0f} s: bundle {human_size(bundle.stat().st_size)}")
    return bundle, {"version": version, "packages": [{"name": n, "version": v} for n, v in sorted(packages.items())]}

