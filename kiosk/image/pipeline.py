"""`kiosk build`: spec -> <hostName>-<hardware>.img, its .bmap, manifest.json and an SPDX SBOM.

This module only orchestrates: each stage (rootfs, configure, boot, image) lives
in its own module. It prints each stage's name and elapsed time, keeps the
tools' output for --verbose, and never leaves a half-written image under the
output name (the image module writes to a temporary name and renames).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from kiosk import __version__
from kiosk.core import paths as resources
from kiosk.core.errors import KioskError

PACKAGE_DIR = Path(__file__).resolve().parent.parent   # kiosk/, with its subpackages
DEVICE_PYTHON_DIR = "usr/lib/python3/dist-packages/kiosk"
DEVICE_DATA_DIR = "usr/share/kiosk"


class Stages:
    """Prints `==> stage` and its elapsed time; remembers the times for the manifest."""

    def __init__(self, out=sys.stderr):
        self.out = out
        self.times: dict[str, float] = {}

    def log(self, message: str) -> None:
        print(f"    {message}", file=self.out, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str):
        print(f"==> {name}", file=self.out, flush=True)
        start = time.monotonic()
        try:
            yield
        except KioskError as exc:
            elapsed = time.monotonic() - start
            raise KioskError(f"stage '{name}' failed after {elapsed:.1f}s: {exc}") from None
        elapsed = time.monotonic() - start
        self.times[name] = round(elapsed, 2)
        print(f"    {name} done in {elapsed:.1f}s", file=self.out, flush=True)


def install_kiosk_package(root: Path, mtime: int) -> None:
    """The device runs this same package on Debian's python3 libraries: copy it in, with its data."""
    dest = root / DEVICE_PYTHON_DIR
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for source in sorted(PACKAGE_DIR.rglob("*.py")):
        target = dest / source.relative_to(PACKAGE_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    data = root / DEVICE_DATA_DIR
    if data.exists():
        shutil.rmtree(data)
    for sub in ("schemas", "hardware", "hooks"):
        shutil.copytree(resources.data_dir() / sub, data / sub)
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
            raise KioskError(f"/etc/shadow line {number}: account {fields[0]!r} has a password; "
                             "kiosk images must have none (this is a bug in the build)")
        if len(fields) > 1 and fields[1].startswith("!") and len(fields[1]) > 2:
            raise KioskError(f"/etc/shadow line {number}: account {fields[0]!r} holds a (locked) password hash; "
                             "kiosk images must have none")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def spdx_sbom(name: str, packages: list[dict], created: str, namespace_seed: str) -> dict:
    """SPDX 2.3 JSON: one package per installed Debian package, with its purl."""
    doc_packages = []
    for pkg in sorted(packages, key=lambda p: (p["name"], p["architecture"])):
        ident = f"SPDXRef-deb-{pkg['name']}-{pkg['architecture']}".replace("+", "plus").replace("_", "-")
        entry = {
            "SPDXID": ident, "name": pkg["name"], "versionInfo": pkg["version"],
            "downloadLocation": "NOASSERTION", "filesAnalyzed": False,
            "supplier": "Organization: Debian",
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": f"pkg:deb/debian/{pkg['name']}@{pkg['version']}"
                                                  f"?arch={pkg['architecture']}"}],
        }
        if pkg.get("source") and pkg["source"] != pkg["name"]:
            entry["sourceInfo"] = f"built from Debian source package {pkg['source']}"
        doc_packages.append(entry)
    return {
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT", "name": name,
        "documentNamespace": f"https://kiosk.invalid/spdx/{name}-{namespace_seed[:16]}",
        "creationInfo": {"created": created, "creators": [f"Tool: kiosk-{__version__}"]},
        "packages": doc_packages,
        "relationships": [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                           "relatedSpdxElement": p["SPDXID"]} for p in doc_packages],
    }


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def configure_root(root: Path, spec_text: str, layer: dict, *, epoch: int, log) -> str:
    """Make the unpacked base tree this spec's system: generation 1, the kiosk package, users, no secrets baked in.

    Returns the configuration.git commit of generation 1.
    """
    import subprocess

    from kiosk.device.provision import install_first_generation, recovery_layer
    from kiosk.config.layer import apply_layer

    install_kiosk_package(root, epoch)
    commit = install_first_generation(root, spec_text, layer, epoch=epoch, hooks_dir=resources.hooks_dir())
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
    result = subprocess.run(["systemd-sysusers", f"--root={root}"], capture_output=True, text=True,
                            env=dict(os.environ, SOURCE_DATE_EPOCH=str(epoch)))
    if result.returncode != 0:
        raise KioskError(f"systemd-sysusers failed: {result.stderr.strip()[-500:]}")
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


def build(spec, spec_text: str, out_dir: Path, *, verbose: bool = False, stages: Stages | None = None) -> dict:
    """Build the image for a validated spec; returns the manifest (also written to out_dir/manifest.json)."""
    from kiosk.image import bootfiles
    from kiosk.image import assemble as image
    from kiosk.image import rootfs
    from kiosk.config.layer import apply_layer
    from kiosk.spec.plan import make_plan
    from kiosk.config.render import render

    stages = stages or Stages()
    out_dir.mkdir(parents=True, exist_ok=True)
    with stages.stage("plan"):
        plan = make_plan(spec.data)
        layer = render(spec.data)
        stages.log(f"{plan.board['name']}: {plan.architecture}, {len(plan.packages)} packages, "
                   f"{len(layer)} configuration files")
    with stages.stage("rootfs"):
        tar = rootfs.base_rootfs(plan, log=stages.log, verbose=verbose)
        epoch = rootfs.read_metadata(tar)["sourceDateEpoch"]
    work_parent = resources.cache_dir() / "tmp"
    work_parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=work_parent))
    try:
        root = work / "root"
        root.mkdir()
        with stages.stage("unpack"):
            rootfs.extract(tar, root, log=stages.log)
        with stages.stage("configure"):
            # The layer as plain files first: the boot stage reads some of them (raspi-firmware-custom).
            apply_layer(layer, root, mtime=epoch)
            ident = image.identity(plan)
            boot = bootfiles.boot_files(plan, root, root=ident.root, epoch=epoch, log=stages.log)
            commit = configure_root(root, spec_text, layer, epoch=epoch, log=stages.log)
            if spec.data.get("builders") or (spec.data.get("localSystem") or {}).get("hostName"):
                from kiosk.builders.builders import prepare_device_for_builders  # issue 8: the device's builder key
                prepare_device_for_builders(root, spec.data, out_dir, stages.log, epoch=epoch)
        with stages.stage("image"):
            out_image = out_dir / image.image_name(plan)
            image.assemble(plan, root, boot, out_image, epoch=epoch, log=stages.log, ident=ident)
        packages = rootfs.installed_packages(tar)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    with stages.stage("manifest"):
        image_sha = sha256_file(out_image)
        pkg_dicts = [{"name": n, "version": v, "architecture": a, "source": s} for n, v, a, s in packages]
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
        sbom_path = out_dir / f"{out_image.stem}.spdx.json"
        write_json_atomic(sbom_path, spdx_sbom(out_image.stem, pkg_dicts, created, spec.digest))
        manifest = {
            "kioskVersion": __version__,
            "hostName": spec.data["hostName"], "hardware": spec.data["hardware"],
            "architecture": plan.architecture, "suite": plan.suite, "mirror": plan.mirror,
            "specSha256": spec.digest, "configurationCommit": commit, "sourceDateEpoch": epoch,
            "image": str(out_image), "imageSha256": image_sha, "imageBytes": out_image.stat().st_size,
            "bmap": str(out_image) + ".bmap", "sbom": str(sbom_path),
            "packageKey": plan.package_key, "packages": pkg_dicts,
            "stageSeconds": stages.times,
        }
        write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def require_root(what: str, how: str) -> None:
    """Refuse an image build without root, before any work.

    Unpacked as a user, every file of the tree would belong to that user and mke2fs -d would copy
    that into the image (root's files owned by uid 1000): a broken card that looks fine.
    """
    if os.geteuid() != 0:
        raise KioskError(f"{what}: the image's files keep their owners (root, kiosk, _apt, ...) and only root "
                         f"can give them; {how}")


def cmd_build(args) -> int:
    from kiosk.spec import load as specmod
    from kiosk.spec.commands import print_warnings

    if getattr(args, "builder", None):
        from kiosk.builders.builders import remote_build  # issue 8: build on a bigger machine over ssh
        return remote_build(args)
    path = Path(args.spec)
    spec = specmod.load(path)
    print_warnings(spec)
    require_root("kiosk build must run as root", f"run: sudo kiosk build {args.spec} -o {args.output} "
                 "(./deploy.sh asks for sudo itself)")
    stages = Stages()
    started = time.monotonic()
    manifest = build(spec, path.read_text(encoding="utf-8"), Path(args.output), verbose=args.verbose, stages=stages)
    print(f"{manifest['image']}\n  sha256 {manifest['imageSha256']}\n  block map {manifest['bmap']}\n"
          f"  built in {time.monotonic() - started:.0f}s; write it with: kiosk flash {manifest['image']} /dev/mmcblk0")
    return 0


def register(sub) -> None:
    p = sub.add_parser("build", help="build the SD card image (+ .bmap, manifest.json, SPDX SBOM)",
                       description="Build <hostName>-<hardware>.img from a spec, from Debian packages of the "
                                   "board's architecture. Caches the base root filesystem by package set, so a "
                                   "configuration-only change rebuilds in seconds.")
    p.add_argument("spec", nargs="?", default="nixiosk.json", metavar="SPEC", help="the spec (default: nixiosk.json)")
    p.add_argument("-o", "--output", default="out", metavar="DIR", help="output directory (default: out)")
    p.add_argument("-v", "--verbose", action="store_true", help="stream the tools' output")
    p.add_argument("--builder", metavar="[USER@]HOST[:PORT]",
                   help="build on that machine over ssh (kiosk installed there) and fetch the image, checksummed")
    p.set_defaults(func=cmd_build)
