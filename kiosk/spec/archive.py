"""Which packages the Debian archive has for an architecture.

Reads dists/<suite>/<component>/binary-<arch>/Packages.xz (the same index apt
uses), keeps only the package names and what they provide, and caches that for
a day so `kiosk validate` stays fast and works on a train. Offline is not an
error here: callers turn ArchiveUnavailable into a warning.
"""

from __future__ import annotations

import json
import lzma
import os
import sys
import time
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from kiosk.core import paths
from kiosk.core.errors import KioskError

COMPONENTS = ("main", "non-free-firmware")
CACHE_SECONDS = 24 * 3600


class ArchiveUnavailable(KioskError):
    """The index could not be fetched (offline, mirror down); the text says why."""


@dataclass(frozen=True)
class PackageIndex:
    packages: frozenset[str]
    provides: dict[str, tuple[str, ...]]   # virtual name -> real packages providing it

    def __contains__(self, name: str) -> bool:
        return name in self.packages


def _parse(text: str) -> tuple[set[str], dict[str, set[str]]]:
    packages: set[str] = set()
    provides: dict[str, set[str]] = {}
    name = None
    for line in text.splitlines():
        if line.startswith("Package: "):
            name = line[9:].strip()
            packages.add(name)
        elif line.startswith("Provides: ") and name:
            for item in line[10:].split(","):
                virtual = item.strip().split(" ", 1)[0]
                if virtual:
                    provides.setdefault(virtual, set()).add(name)
    return packages, provides


def _cache_file(mirror: str, suite: str, arch: str) -> Path:
    key = sha256(f"{mirror.rstrip('/')}|{suite}|{arch}".encode()).hexdigest()[:16]
    return paths.cache_dir() / "archive" / f"{suite}-{arch}-{key}.json"


def _fetch(mirror: str, suite: str, arch: str, timeout: float) -> tuple[set[str], dict[str, set[str]]]:
    import requests

    packages: set[str] = set()
    provides: dict[str, set[str]] = {}
    for component in COMPONENTS:
        url = f"{mirror.rstrip('/')}/dists/{suite}/{component}/binary-{arch}/Packages.xz"
        if sys.stderr.isatty():
            print(f"kiosk: fetching the {suite} {component} package index for {arch}...", file=sys.stderr)
        try:
            response = requests.get(url, timeout=timeout)
        except requests.RequestException as exc:
            raise ArchiveUnavailable(f"cannot reach {url}: {type(exc).__name__}") from None
        if response.status_code == 404 and component != "main":
            continue  # a mirror without non-free-firmware still answers for main
        if response.status_code != 200:
            raise ArchiveUnavailable(f"{url} answered HTTP {response.status_code}")
        try:
            text = lzma.decompress(response.content).decode("utf-8", "replace")
        except lzma.LZMAError:
            raise ArchiveUnavailable(f"{url} is not a valid xz file") from None
        names, provided = _parse(text)
        packages |= names
        for virtual, real in provided.items():
            provides.setdefault(virtual, set()).update(real)
    if not packages:
        raise ArchiveUnavailable(f"no packages found for {arch} in {suite} at {mirror}")
    return packages, provides


def package_index(mirror: str, suite: str, arch: str, *, timeout: float = 20.0) -> PackageIndex:
    """The archive's package names for (mirror, suite, arch), from cache when fresh.

    KIOSK_OFFLINE=1 never touches the network: a stale cache is used, none raises.
    """
    cache = _cache_file(mirror, suite, arch)
    offline = paths.setting("KIOSK_OFFLINE") == "1"
    cached = None
    if cache.is_file():
        try:
            cached = json.loads(cache.read_text())
        except (OSError, ValueError):
            cached = None
    fresh = cached and time.time() - cached.get("fetched", 0) < CACHE_SECONDS
    if cached and (fresh or offline):
        return PackageIndex(frozenset(cached["packages"]), {k: tuple(v) for k, v in cached["provides"].items()})
    if offline:
        raise ArchiveUnavailable("KIOSK_OFFLINE=1 and no cached package index")
    try:
        packages, provides = _fetch(mirror, suite, arch, timeout)
    except ArchiveUnavailable:
        if cached:  # stale is better than nothing
            return PackageIndex(frozenset(cached["packages"]), {k: tuple(v) for k, v in cached["provides"].items()})
        raise
    record = {"fetched": time.time(), "packages": sorted(packages),
              "provides": {k: sorted(v) for k, v in sorted(provides.items())}}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, cache)
    return PackageIndex(frozenset(packages), {k: tuple(sorted(v)) for k, v in provides.items()})
