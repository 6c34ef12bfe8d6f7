"""The one image build chain: spec -> <hostName>-<hardware>.img, its .bmap, manifest.json and an SPDX SBOM
(and with --compress, <hostName>-<hardware>.img.zst or .img.xz).

This module only orchestrates: each stage (rootfs, configure, boot, image) lives
in its own module. It prints each stage's name and elapsed time, keeps the
tools' output for --verbose, and never leaves a half-written image under the
output name (the image module writes to a temporary name and renames).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kiosk import __version__
from kiosk.core import paths
from kiosk.core.errors import KioskError
from kiosk.core.files import write_json
from kiosk.core.log import Log
from kiosk.core.run import run
from kiosk.image.sbom import created_at, package_dicts, spdx_sbom, write_system_files

PACKAGE_DIR = Path(__file__).resolve().parent.parent   # kiosk/, with its subpackages


def install_kiosk_package(root: Path, mtime: int) -> None:
    """The device runs this same package on Debian's python3 libraries: copy it in, with its data."""
    dest = root / paths.DEVICE_PYTHON_DIR
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for source in sorted(PACKAGE_DIR.rglob("*.py")):
        target = dest / source.relative_to(PACKAGE_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    data = root / paths.DEVICE_DATA_DIR
    if data.exists():
        shutil.rmtree(data)
    for sub in ("schemas", "hardware", "hooks"):
        shutil.copytree(paths.data_dir() / sub, data / sub)
    launcher = root / "usr/bin/kiosk"
    launcher.write_text("#!/usr/bin/python3\nfrom kiosk.cli import main\nraise SystemExit(main())\n")
    launcher.chmod(0o755)
    for path in [dest, data, launcher, *dest.rglob("*"), *data.rglob("*")]:
        os.utime(path, (mtime, mtime), follow_symlinks=False)


def check_no_password_hash(root: Path) -> None:
    """Refuse to ship an image with any password hash: every account is locked ('*' or '!...')."""
    shadow = root / "etc/shadow"
    for number, line in enumerate(shadow.read_text().splitlines(), 1):
        fields = line.split(":")
        if len(fields) > 1 and fields[1] not in ("*", "!", "!*", "!!") and not fields[1].startswith("!"):
            raise KioskError(f"/etc/shadow line {number}: account {fields[0]!r} has a password",
                             hint="kiosk images must have none: this is a bug in the build, please report it")
        if len(fields) > 1 and fields[1].startswith("!") and len(fields[1]) > 2:
            raise KioskError(f"/etc/shadow line {number}: account {fields[0]!r} holds a (locked) password hash",
                             hint="kiosk images must have none: this is a bug in the build, please report it")


def configure_root(root: Path, spec_text: str, layer: dict, plan, *, epoch: int, log) -> str:
    """Make the unpacked base tree this spec's system: generation 1, the kiosk package, users, no secrets baked in.

    Returns the configuration.git commit of generation 1.
    """
    from kiosk.device.provision import install_first_generation, recovery_layer
    from kiosk.config.layer import apply_layer

    install_kiosk_package(root, epoch)
    commit = install_first_generation(root, spec_text, layer, plan, epoch=epoch, hooks_dir=paths.hooks_dir())
    # Outside any generation: it must run even when an interrupted switch left the pointers half-moved.
    apply_layer(recovery_layer(), root, mtime=epoch)
    log(f"generation 1 from configuration.git commit {commit[:12]}")
    # Host keys are made on the device at first start (render's ssh drop-in): never two cards with one key.
    for key in sorted((root / "etc/ssh").glob("ssh_host_*")):
        key.unlink()
    machine_id = root / "etc/machine-id"
    machine_id.write_text("uninitialized\n")  # systemd makes a unique id on first boot
    # "uninitialized" also makes the first boot run `systemctl preset-all` (enable-only): without this,
    # Debian's presets (no "disable *") would enable every installed unit, e.g. ssh.socket next to
    # ssh.service, both on port 22. What runs is what the build and the generation enabled.
    preset = root / "etc/systemd/system-preset/00-kiosk.preset"
    preset.parent.mkdir(parents=True, exist_ok=True)
    preset.write_text("# Written by kiosk: first boot enables nothing the image did not enable itself.\ndisable *\n")
    for path in (preset, preset.parent):
        os.utime(path, (epoch, epoch))
    # Create the kiosk user now (the device would at first boot); natively, with the tree's own config.
    run(["systemd-sysusers", f"--root={root}"], env={"SOURCE_DATE_EPOCH": str(epoch)}, what="configure")
    _clamp_shadow_dates(root, epoch)
    check_no_password_hash(root)
    return commit


def _clamp_shadow_dates(root: Path, epoch: int) -> None:
    """sysusers stamps 'last password change' with today's date: use SOURCE_DATE_EPOCH's day instead."""
    day = str(epoch // 86400)
    for name in ("etc/shadow", "etc/shadow-"):
        path = root / name
        if not path.exists():
            continue
        lines = []
        for line in path.read_text().splitlines():
            fields = line.split(":")
            if len(fields) > 2 and fields[2]:
                fields[2] = day
            lines.append(":".join(fields))
        mode = path.stat().st_mode & 0o7777
        path.write_text("\n".join(lines) + "\n")
        path.chmod(mode)
    for name in ("etc/passwd-", "etc/group-", "etc/shadow-", "etc/gshadow-"):
        (root / name).unlink(missing_ok=True)  # backup copies would differ from build to build


# What the configure step reads from the base tree, or rewrites in place (beyond the boot files':
# bootfiles.boot_inputs). The fast path fetches exactly these into its sparse tree; everything else
# configure only creates, replaces or removes (kiosk.image.overlay).
#   /etc: apply_layer, reconcile and bootfiles replace files there; configure_root rewrites machine-id and
#         shadow in place, globs the ssh host keys, and systemd-sysusers reads passwd, group, shadow,
#         gshadow, login.defs and sysusers.d there; builders' files are written there.
#   sysusers.d under /usr: systemd-sysusers --root reads the packages' users from there.
CONFIGURE_READS = ("/etc", "/usr/lib/sysusers.d", "/usr/local/lib/sysusers.d")


def configure_inputs(plan, sparse) -> None:
    """Fetch what configure_tree reads into the sparse tree (overlay.Sparse), then record it."""
    from kiosk.image import bootfiles

    sparse.fetch(*CONFIGURE_READS)
    bootfiles.boot_inputs(plan, sparse.root, sparse.fetch)
    sparse.finish()


def configure_tree(root: Path, spec, spec_text: str, layer: dict, plan, out_dir: Path, *, epoch: int, ident,
                   log, data: Path, packages: list[dict], update_cert: str | None = None) -> tuple[dict, str]:
    """Make a base tree this spec's system: the configuration layer, boot files, the kiosk package,
    generation 1, users, builders' files, fstab, the system's manifest and SBOM (`packages`: what the base
    holds). Returns (FAT files, configuration.git commit).
    What goes on the data partition (generation 1, configuration.git) is moved out of the tree into the
    new directory `data` (kiosk.image.datafs), and the slot trusts update_cert (PEM): RAUC installs only
    bundles signed with the key of that certificate.

    The one configure step: the fast path runs it on a sparse tree, the whole-tree reference
    (keep_root) on the unpacked base. The umask is fixed so the modes never depend on the caller's.
    """
    from kiosk.config.layer import apply_layer
    from kiosk.image import assemble, bootfiles, datafs
    from kiosk.image.rauc import RAUC_CERTIFICATE

    umask = os.umask(0o022)
    try:
        # The layer as plain files first: the boot stage reads some of them (raspi-firmware-custom).
        apply_layer(layer, root, mtime=epoch)
        boot = bootfiles.boot_files(plan, root, root=ident.root, epoch=epoch, log=log)
        commit = configure_root(root, spec_text, layer, plan, epoch=epoch, log=log)
        if spec.data.get("builders") or (spec.data.get("localSystem") or {}).get("hostName"):
            from kiosk.builders.keys import prepare_device_for_builders  # builders known_hosts, ssh config
            prepare_device_for_builders(root, spec.data, out_dir, log, epoch=epoch)
        assemble.write_root_files(root, ident)
        write_system_files(root, plan, Path(assemble.image_name(plan)).stem, packages, epoch=epoch, seed=spec.digest)
        if not update_cert:
            raise KioskError("an image needs the update certificate its devices will trust",
                             hint="this is a bug in the build, please report it")
        cert = root / RAUC_CERTIFICATE.lstrip("/")
        cert.parent.mkdir(parents=True, exist_ok=True)
        cert.write_text(update_cert)
        for path in (cert, cert.parent):
            os.utime(path, (epoch, epoch))
        datafs.split(root, data, epoch=epoch)
    finally:
        os.umask(umask)
    return boot, commit


def build(spec, spec_text: str, out_dir: Path, *, verbose: bool = False, log: Log | None = None,
          keep_root: Path | None = None, compress: str | None = None, update_cert: str | None = None,
          upgrade: bool = False) -> dict:
    """Build the image for a validated spec; returns the manifest (also written to out_dir/manifest.json).

    This is the one build chain: `kiosk build`, ./deploy.sh, the builder's server, the tests and the
    build benchmark all come through here. log.times holds the seconds per stage afterwards.
    keep_root: also make the whole root tree there the slow way (the base unpacked, then the same
    configure step), for tests that compare it with the image; as root only.
    compress: "zst" or "xz": also write the image compressed (image/compress.py).
    update_cert: the PEM certificate the image trusts for update bundles; by default the user's own
    (kiosk.config.signing, made on first use). A builder building for someone else is given theirs.
    upgrade: build the cached base again when the archive has moved on (rootfs.base_rootfs).
    """
    from kiosk.config import signing
    from kiosk.config.render import render
    from kiosk.image import assemble, basefs, datafs, overlay, rootfs
    from kiosk.image.compress import compress_image
    from kiosk.spec.plan import make_plan

    log = log or Log()
    out_dir.mkdir(parents=True, exist_ok=True)
    with log.timed("plan"):
        plan = make_plan(spec.data)
        layer = render(spec.data)
        log(f"{plan.board['name']}: {plan.architecture}, {len(plan.packages)} packages, "
            f"{len(layer)} configuration files")

    with log.timed("rootfs"):
        tar = rootfs.base_rootfs(plan, log=log, verbose=verbose, upgrade=upgrade)
        epoch = rootfs.read_metadata(tar)["sourceDateEpoch"]
    with log.timed("base fs"):
        index = rootfs.index(tar)
        base = basefs.base_fs(tar, index, epoch=epoch, log=log, lock=rootfs.cache_lock)
    work = scratch_work_dir()
    out_image = out_dir / assemble.image_name(plan)
    image = assemble.scratch_path(out_image, "tmp")
    layout = assemble.layout_for(base.size, used=base.used)
    pool = ThreadPoolExecutor(max_workers=1)
    sparse = None
    try:
        # The copy of the base (kernel work: reflink or copy_file_range) runs while configure does.
        copying = pool.submit(basefs.copy, base, image, layout.root_start, layout.total)
        ident = assemble.identity(plan)
        with log.timed("configure"):
            if update_cert is None:
                update_cert = signing.signing_key(log=log).cert.read_text()
            log(f"update bundles: the image trusts the key of certificate "
                f"{signing.certificate_fingerprint(update_cert)[:23]}...")
            sparse = overlay.Sparse(index, work / "root")
            configure_inputs(plan, sparse)
            pkg_dicts = package_dicts(rootfs.installed_packages(tar))
            boot, commit = configure_tree(sparse.root, spec, spec_text, layer, plan, out_dir, epoch=epoch,
                                          ident=ident, log=log, data=work / "data", packages=pkg_dicts,
                                          update_cert=update_cert)
            changes = sparse.changes(epoch)
            log(f"configure: {len(changes)} paths differ from the base")
        with log.timed("image"):
            started = time.monotonic()
            copying.result()
            copied = time.monotonic()
            overlay.write(image, layout.root_start, changes, index, work, epoch=epoch, uuid=ident.root_uuid)
            datafs.write(image, layout.data_start, layout.data_size, work / "data", work, ident=ident, epoch=epoch)
            log(f"image: root file system: base copied (waited {copied - started:.1f} s), changes written "
                f"in {time.monotonic() - copied:.1f} s")
            image_sha = assemble.assemble(layout, image, boot, out_image, epoch=epoch, ident=ident, log=log)
        if keep_root is not None:
            whole_tree(tar, keep_root, spec, spec_text, layer, plan, work / "reference-out", epoch=epoch,
                       ident=ident, update_cert=update_cert)
    finally:
        pool.shutdown()   # the copy, if configure failed while it ran
        image.unlink(missing_ok=True)
        if sparse is not None:
            sparse.close()
        index.close()
        basefs.remove_tree(work)

    if compress:
        with log.timed("compress"):
            compressed = compress_image(out_image, compress, log)
    else:
        compressed = compress_image(out_image, None)   # (only drops a stale .zst/.xz: it would not match)
    with log.timed("manifest"):
        sbom_path = out_dir / f"{out_image.stem}.spdx.json"   # the same SBOM as the slot's own
        write_json(sbom_path, spdx_sbom(out_image.stem, pkg_dicts, created_at(epoch), spec.digest))
        manifest = {
            "kioskVersion": __version__,
            "hostName": spec.data["hostName"], "hardware": spec.data["hardware"],
            "architecture": plan.architecture, "suite": plan.suite, "mirror": plan.mirror,
            "sources": [f"{mirror} {suite}" for mirror, suite in plan.sources],
            "specSha256": spec.digest, "configurationCommit": commit, "sourceDateEpoch": epoch,
            "image": str(out_image), "imageSha256": image_sha, "imageBytes": out_image.stat().st_size,
            "bmap": str(out_image) + ".bmap", "sbom": str(sbom_path),
            "packageKey": plan.package_key, "packages": pkg_dicts,
            "stageSeconds": log.times,
        }
        if compressed:
            manifest["compressed"] = compressed
        write_json(out_dir / "manifest.json", manifest)
    return manifest


def scratch_work_dir() -> Path:
    """A new directory for this build's sparse tree, named after this process; those left in RAM by builds
    that were killed (their process is gone) are removed first."""
    from kiosk.image.basefs import remove_tree

    scratch = paths.scratch_dir()
    for old in scratch.glob("kiosk-build-*-*"):
        pid = old.name.split("-")[2]
        if pid.isdigit() and old.is_dir() and old.stat().st_uid == os.geteuid() and not _alive(int(pid)):
            remove_tree(old)
    return Path(tempfile.mkdtemp(prefix=f"kiosk-build-{os.getpid()}-", dir=scratch))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def whole_tree(tar: Path, dest: Path, spec, spec_text: str, layer: dict, plan, out_dir: Path, *, epoch: int,
               ident, update_cert: str | None = None) -> None:
    """The slow path's tree, for tests: the whole base unpacked with its owners (as root), then the same
    configure step. The image's files must be exactly these (tests/test_fastbuild.py compares them); on A/B
    boards the data partition's tree goes beside it, to <dest>-data."""
    from kiosk.image import rootfs

    data = dest.with_name(dest.name + "-data")   # A/B boards: the data partition's tree
    for old in (dest, data):
        shutil.rmtree(old, ignore_errors=True)
    dest.mkdir(parents=True)
    rootfs.extract(tar, dest)
    configure_tree(dest, spec, spec_text, layer, plan, out_dir, epoch=epoch, ident=ident, log=lambda m: None,
                   data=data, packages=package_dicts(rootfs.installed_packages(tar)), update_cert=update_cert)
