"""apt with a private state: resolve packages for a device (its architecture, its dpkg status, the
spec's mirror) and download what it lacks, running no code of the target architecture.

A builder does this for a device (kiosk.buildhost.server); a board that can build for itself does
the same on its own disk when no builder answers (kiosk.device.fetch). Nothing of the machine's own
apt configuration decides what the device gets, except proxies in apt.conf.d.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import stat
import time
from pathlib import Path

from kiosk.builders.select import ARCHITECTURES
from kiosk.core import paths
from kiosk.core.errors import KioskError
from kiosk.core.files import human_size, sha256_file
from kiosk.core.run import run
from kiosk.spec.sources import COMPONENTS, sources_list

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}   # added to kiosk.core.run's environment

PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
SUITE_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
MIRROR_URL = re.compile(r"^(https?|file)://[^\s\[\]\"']+$")
INST = re.compile(r"^Inst (\S+) (?:\[(\S+)\] )?\((\S+) .*\[([a-z0-9]+)\]\)")


def _world_traversable(path: Path) -> bool:
    for p in [path, *path.parents]:
        with contextlib.suppress(OSError):
            if not os.stat(p).st_mode & stat.S_IXOTH:
                return False
    return True


@contextlib.contextmanager
def _flock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def check_request(req: dict) -> None:
    """Everything a packages request carries, checked before any of it reaches apt."""
    if req.get("architecture") not in ARCHITECTURES:
        raise KioskError(f"unknown architecture {req.get('architecture')!r}")
    for arch in req.get("foreignArchitectures") or []:
        if arch not in ARCHITECTURES:
            raise KioskError(f"unknown architecture {arch!r}")
    if not isinstance(req.get("suite"), str) or not SUITE_NAME.match(req["suite"]):
        raise KioskError(f"bad suite name {req.get('suite')!r}")
    if not isinstance(req.get("mirror"), str) or not MIRROR_URL.match(req["mirror"]):
        raise KioskError(f"bad mirror URL {req.get('mirror')!r}")
    for source in request_sources(req):
        if not (isinstance(source, list) and len(source) == 2 and isinstance(source[0], str)
                and MIRROR_URL.match(source[0]) and isinstance(source[1], str) and SUITE_NAME.match(source[1])):
            raise KioskError(f"bad source {source!r}: give [mirror URL, suite]")
    components = req.get("components") or list(COMPONENTS)
    if not all(isinstance(c, str) and SUITE_NAME.match(c) for c in components):
        raise KioskError("bad component names")
    packages = req.get("packages")
    if not isinstance(packages, list) or not packages or \
            not all(isinstance(p, str) and PACKAGE_NAME.match(p) for p in packages):
        raise KioskError("the request must name Debian packages (lower case names)")
    if not isinstance(req.get("status"), str):
        raise KioskError("the request carries no dpkg status")


def request_sources(req: dict) -> list:
    """The (mirror, suite) pairs a request resolves from: its "sources" (the suite, -security, -updates:
    kiosk.spec.sources), or from a device older than that field, its one mirror and suite."""
    sources = req.get("sources")
    return sources if isinstance(sources, list) and sources else [[req.get("mirror"), req.get("suite")]]


def apt_options(req: dict, status: Path) -> tuple[list[str], Path]:
    """apt-get options resolving for the device: its architecture, its dpkg status, the spec's
    mirror; lists, preferences and sources private to kiosk, kept per suite, architecture and mirror."""
    arch = req["architecture"]
    arches = [arch, *[a for a in req.get("foreignArchitectures") or [] if a != arch]]
    components = req.get("components") or list(COMPONENTS)
    trusted = paths.setting("KIOSK_TEST_UNSIGNED_MIRROR") == "1"
    sources = [(mirror.rstrip("/"), suite) for mirror, suite in request_sources(req)]
    key = hashlib.sha256(json.dumps([sources, arches, components, trusted]).encode()).hexdigest()[:16]
    base = paths.cache_dir() / "builder" / "apt" / f"{req['suite']}-{arch}-{key}"
    for sub in ("lists/partial", "state", "cache", "etc/parts", "etc/preferences.d", "log"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    archives = paths.deb_cache_dir()
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    if trusted:
        option = "trusted=yes"
    elif Path(KEYRING).is_file():
        option = f"signed-by={KEYRING}"
    else:
        option = ""
    opt = f"[arch={','.join(arches)}{' ' + option if option else ''}] "
    sources = sources_list(sources, options=opt, components=components)
    if not (base / "etc/sources.list").is_file() or (base / "etc/sources.list").read_text() != sources:
        (base / "etc/sources.list").write_text(sources)
    opts = {
        "APT::Architecture": arch, "APT::Architectures": ",".join(arches),
        "Dir::State": str(base / "state"), "Dir::State::Lists": str(base / "lists"),
        "Dir::State::status": str(status), "Dir::Cache": str(base / "cache"),
        "Dir::Cache::archives": str(archives), "Dir::Etc::SourceList": str(base / "etc/sources.list"),
        "Dir::Etc::SourceParts": str(base / "etc/parts"), "Dir::Etc::Preferences": str(base / "etc/preferences"),
        "Dir::Etc::PreferencesParts": str(base / "etc/preferences.d"), "Dir::Log": str(base / "log"),
        "APT::Install-Recommends": "false", "APT::Install-Suggests": "false", "Acquire::Languages": "none",
        "APT::Get::List-Cleanup": "false", "Binary::apt::APT::Keep-Downloaded-Packages": "true",
    }
    if os.geteuid() == 0 and not _world_traversable(archives):
        opts["APT::Sandbox::User"] = "root"  # _apt cannot reach a cache under /root; apt still verifies hashes
    argv: list[str] = []
    for name, value in opts.items():
        argv += ["-o", f"{name}={value}"]
    return argv, base


def _apt_errors(proc) -> list[str]:
    """From a failed apt run, the lines worth reading: errors and unmet dependencies, else its last lines."""
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    important = [line for line in lines if line.startswith(("E:", " ")) or "unmet" in line.lower()]
    return [line.strip() for line in (important or lines[-3:])[-6:]]


def _apt(argv: list[str]) -> str:
    """Run apt-get or apt-cache (its sub-command first, so a failure names it); its output."""
    return run(argv, env=APT_ENV, explain=_apt_errors).stdout


def deb_file_name(name: str, version: str, arch: str) -> str:
    return f"{name}_{version.replace(':', '%3a')}_{arch}.deb"


def _index_hashes(opts: list[str], entries: list[dict]) -> dict[tuple[str, str, str], str]:
    specs = [f"{e['package']}:{e['architecture']}={e['version']}" if e["architecture"] != "all"
             else f"{e['package']}={e['version']}" for e in entries]
    out = _apt(["apt-cache", "show", *opts, *specs])
    hashes = {}
    for block in out.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(" "))
        if "Package" in fields and "SHA256" in fields:
            hashes[(fields["Package"], fields.get("Version", ""), fields.get("Architecture", ""))] = fields["SHA256"]
    return hashes


def fetch_packages(req: dict, work: Path, log) -> list[dict]:
    """Resolve req's packages for the device's architecture against its dpkg status and download
    what it lacks; returns one entry per .deb in apt's install order (path in the .deb cache).

    Download-only resolution runs no code of the target architecture: apt reads indexes and
    fetches files, so any builder serves any architecture, no qemu needed."""
    check_request(req)
    status = work / "status"
    status.write_text(req["status"])
    started = time.monotonic()
    with _flock(paths.cache_dir() / "builder" / "apt.lock"):
        opts, base = apt_options(req, status)
        log(f"apt: updating the {req['suite']} {req['architecture']} index from {req['mirror']}")
        _apt(["apt-get", "update", "-q", *opts])
        packages = sorted(set(req["packages"]))
        plan = _apt(["apt-get", "install", "--simulate", "-q", *opts, *packages])
        removals = [line.split()[1] for line in plan.splitlines() if line.startswith("Remv ")]
        if removals:
            raise KioskError(f"installing {' '.join(packages)} would remove {' '.join(removals)} from the device; "
                             "kiosk never removes packages on a push")
        entries = []
        for line in plan.splitlines():
            match = INST.match(line)
            if match:
                name, _old, version, arch = match.groups()
                name = name.split(":", 1)[0]
                entries.append({"package": name, "version": version, "architecture": arch,
                                "name": deb_file_name(name, version, arch)})
        if not entries:
            log(f"apt: nothing to fetch: the device already has {' '.join(packages)}")
            return []
        archives = paths.deb_cache_dir()
        for attempt in (1, 2):
            _apt(["apt-get", "install", "--download-only", "-q", "-y", *opts, *packages])
            hashes = _index_hashes(opts, entries)
            damaged = []
            for entry in entries:
                path = archives / entry["name"]
                if not path.is_file():
                    raise KioskError(f"apt did not leave {entry['name']} in {archives}")
                entry["path"] = path
                entry["size"] = path.stat().st_size
                entry["sha256"] = sha256_file(path)
                want = hashes.get((entry["package"], entry["version"], entry["architecture"]))
                if want and want != entry["sha256"]:
                    damaged.append(path)
            if not damaged:
                break
            for path in damaged:
                path.unlink(missing_ok=True)
            if attempt == 2:
                raise KioskError(f"{', '.join(p.name for p in damaged)} do not match the archive's index")
            log(f"apt: {len(damaged)} cached .deb(s) did not match the index; downloading them again")
    size = sum(e["size"] for e in entries)
    log(f"apt: {len(entries)} package(s) for {req['architecture']}, {human_size(size)}, in "
        f"{time.monotonic() - started:.1f} s: {' '.join(e['package'] for e in entries)}")
    return entries
