"""Which packages the Debian archive has for an architecture, and (for the small security and updates
suites) at which versions.

Reads dists/<suite>/<component>/binary-<arch>/Packages.xz (the same index apt
uses), keeps only the package names and what they provide (package_index), or
the names and their newest versions (suite_versions: `kiosk status` counts the
fixes a device lacks), and caches that for a day so `kiosk validate` stays fast
and works on a train. Offline is not an error here: callers turn
ArchiveUnavailable into a warning.

A mirror is not trusted to be kind: the whole fetch (connect, download,
decompress, parse) has a deadline (KIOSK_ARCHIVE_TIMEOUT; a mirror sending a
byte every few seconds is cut off there), the download and the decompressed
index have size limits (an xz bomb stops at MAX_INDEX_BYTES, parsed as it
streams so memory stays small), and so has the number of names kept.
"""

from __future__ import annotations

import email.utils
import json
import lzma
import os
import re
import socket
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Callable, TypeVar

from kiosk.core import paths
from kiosk.core.errors import KioskError
from kiosk.core.files import human_size
from kiosk.spec.debversion import newer
from kiosk.spec.sources import COMPONENTS

CACHE_SECONDS = 24 * 3600
DEADLINE_SECONDS = 120.0          # the whole fetch; KIOSK_ARCHIVE_TIMEOUT overrides
READ_TIMEOUT = 20.0               # one read from the mirror
MAX_DOWNLOAD_BYTES = 64 << 20     # bookworm's largest Packages.xz (main, amd64) is about 9 MiB
MAX_INDEX_BYTES = 256 << 20       # ... and about 45 MiB decompressed
MAX_NAMES = 400_000               # package names plus provides entries (bookworm main: about 80,000)
MAX_LINE = 1 << 20
CHUNK = 1 << 16

_FIELD = re.compile(rb"^(Package|Provides): ?([^\n]*)$", re.M)
_VERSION_FIELD = re.compile(rb"^(Package|Version): ?([^\n]*)$", re.M)
T = TypeVar("T")


class ArchiveUnavailable(KioskError):
    """The index could not be fetched (offline, mirror down, too slow, too big); the text says why."""


class NotPublished(ArchiveUnavailable):
    """The mirror has no such index (HTTP 404 for main): the suite is not published for this architecture
    (bookworm-security for armel since bookworm's LTS), or not at all."""


@dataclass(frozen=True)
class PackageIndex:
    packages: frozenset[str]
    provides: dict[str, tuple[str, ...]]   # virtual name -> real packages providing it

    def __contains__(self, name: str) -> bool:
        return name in self.packages


@dataclass(frozen=True)
class SuiteVersions:
    versions: dict[str, str]   # package -> its newest version in the suite (all components)
    fetched: float             # when the mirror was read (seconds since the epoch): a cached index is older


class _IndexParser:
    """Package names and provides (or, given `versions`, names and their newest versions) from a Packages
    file fed in pieces; only those lines are kept."""

    def __init__(self, url: str, packages: set[str], provides: dict[str, set[str]],
                 versions: dict[str, str] | None = None):
        self.url, self.packages, self.provides, self.versions = url, packages, provides, versions
        self.field = _FIELD if versions is None else _VERSION_FIELD
        self.name: str | None = None
        self.pending = b""
        self.size = 0
        self.entries = len(packages) + sum(len(v) for v in provides.values())

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_INDEX_BYTES:
            raise ArchiveUnavailable(f"{self.url} decompresses to more than {human_size(MAX_INDEX_BYTES)}; "
                                     "a package index is far smaller (is the mirror broken or hostile?)")
        buf = self.pending + data
        cut = buf.rfind(b"\n") + 1
        self.pending = buf[cut:]
        if len(self.pending) > MAX_LINE:
            raise ArchiveUnavailable(f"{self.url} has a line longer than {human_size(MAX_LINE)}; "
                                     "it is not a package index")
        self._lines(buf[:cut])

    def close(self) -> None:
        self._lines(self.pending + b"\n")
        self.pending = b""

    def _lines(self, block: bytes) -> None:
        for match in self.field.finditer(block):
            value = match.group(2).decode("utf-8", "replace")
            if match.group(1) == b"Package":
                self.name = value.strip()
                self.packages.add(self.name)
                self.entries += 1
            elif match.group(1) == b"Version":
                version = value.strip()
                if self.name and version and (self.name not in self.versions
                                              or newer(version, self.versions[self.name])):
                    self.versions[self.name] = version
            elif self.name:
                for item in value.split(","):
                    virtual = item.strip().split(" ", 1)[0]
                    if virtual:
                        self.provides.setdefault(virtual, set()).add(self.name)
                        self.entries += 1
            if self.entries > MAX_NAMES:
                raise ArchiveUnavailable(f"{self.url} lists more than {MAX_NAMES} packages and provides; "
                                         "a package index has far fewer")


def _parse(text: str) -> tuple[set[str], dict[str, set[str]]]:
    packages: set[str] = set()
    provides: dict[str, set[str]] = {}
    parser = _IndexParser("the index", packages, provides)
    parser.feed(text.encode())
    parser.close()
    return packages, provides


def _cache_file(mirror: str, suite: str, arch: str, kind: str = "") -> Path:
    key = sha256(f"{mirror.rstrip('/')}|{suite}|{arch}".encode()).hexdigest()[:16]
    return paths.cache_dir() / "archive" / f"{suite}-{arch}-{key}{kind}.json"


def _decompress(chunks, parser: _IndexParser, url: str, stop: threading.Event) -> None:
    """Feed the xz (or lzma) data in `chunks` to parser, never more than CHUNK decompressed bytes at once."""
    decompressor = lzma.LZMADecompressor()
    try:
        for chunk in chunks:
            while True:
                if stop.is_set():
                    return
                if decompressor.eof:  # an xz file may hold several streams one after the other
                    chunk = decompressor.unused_data + chunk
                    if not chunk:
                        break
                    decompressor = lzma.LZMADecompressor()
                if not chunk and decompressor.needs_input:
                    break
                parser.feed(decompressor.decompress(chunk, max_length=CHUNK))
                chunk = b""
        if not decompressor.eof:
            raise ArchiveUnavailable(f"{url} ends before its xz stream does (cut off?)")
    except lzma.LZMAError:
        raise ArchiveUnavailable(f"{url} is not a valid xz file") from None
    parser.close()


def _socket_of(response):
    connection = getattr(getattr(response, "raw", None), "connection", None)
    return getattr(connection, "sock", None)


def _download(url: str, parser: _IndexParser, stop: threading.Event, current: dict, end: float) -> bool:
    """Stream one Packages.xz into parser; False when the mirror has no such file (404)."""
    import requests

    if sys.stderr.isatty():
        print(f"kiosk: fetching {url}...", file=sys.stderr)
    timeout = max(0.1, min(READ_TIMEOUT, end - time.monotonic()))
    try:
        response = requests.get(url, timeout=(timeout, timeout), stream=True,
                                headers={"Accept-Encoding": "identity"})
    except requests.RequestException as exc:
        raise ArchiveUnavailable(f"cannot reach {url}: {type(exc).__name__}") from None
    current["response"] = response
    with response:
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise ArchiveUnavailable(f"{url} answered HTTP {response.status_code}")
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > MAX_DOWNLOAD_BYTES:
            raise ArchiveUnavailable(f"{url} is {human_size(int(length))}; a package index is at most "
                                     f"{human_size(MAX_DOWNLOAD_BYTES)}")

        def chunks():
            received = 0
            while not stop.is_set():
                try:
                    block = response.raw.read(CHUNK, decode_content=False)
                except Exception as exc:  # urllib3's and the socket's errors alike: the mirror failed us
                    raise ArchiveUnavailable(f"reading {url} failed: {type(exc).__name__}") from None
                if not block:
                    return
                received += len(block)
                if received > MAX_DOWNLOAD_BYTES:
                    raise ArchiveUnavailable(f"{url} is larger than {human_size(MAX_DOWNLOAD_BYTES)}; a package "
                                             "index is far smaller")
                yield block

        _decompress(chunks(), parser, url, stop)
    return True


def _fetch_all(mirror: str, suite: str, arch: str, stop: threading.Event, current: dict, end: float,
               versions: dict[str, str] | None = None):
    packages: set[str] = set()
    provides: dict[str, set[str]] = {}
    for component in COMPONENTS:
        url = f"{mirror.rstrip('/')}/dists/{suite}/{component}/binary-{arch}/Packages.xz"
        if not _download(url, _IndexParser(url, packages, provides, versions), stop, current, end):
            if component == "main":
                raise NotPublished(f"{url} answered HTTP 404")
            continue  # a mirror without non-free-firmware still answers for main
        if stop.is_set():
            break
    if not packages and versions is None:   # a security or updates suite may well be empty for a while
        raise ArchiveUnavailable(f"no packages found for {arch} in {suite} at {mirror}")
    return packages, provides


def deadline_seconds() -> float:
    """KIOSK_ARCHIVE_TIMEOUT, or the default: seconds the whole fetch may take."""
    return paths.number_setting("KIOSK_ARCHIVE_TIMEOUT", DEADLINE_SECONDS, least=0, above=True)


def _fetch(mirror: str, suite: str, arch: str, deadline: float,
           versions: dict[str, str] | None = None) -> tuple[set[str], dict[str, set[str]]]:
    """The index's names (and `versions`, when given), within `deadline` seconds in all, whatever the
    mirror does.

    The fetch runs in a thread the caller waits for; at the deadline its connection is shut down,
    which wakes a read blocked on a slow mirror, and the thread ends on its own."""
    stop, current, outcome = threading.Event(), {}, {}
    end = time.monotonic() + deadline

    def work():
        try:
            outcome["value"] = _fetch_all(mirror, suite, arch, stop, current, end, versions)
        except ArchiveUnavailable as exc:
            outcome["error"] = exc
        except Exception as exc:  # whatever else a hostile mirror provokes, the index is still unavailable
            outcome["error"] = ArchiveUnavailable(f"fetching from {mirror} failed: {type(exc).__name__}")

    worker = threading.Thread(target=work, name="kiosk-package-index", daemon=True)
    worker.start()
    worker.join(deadline)
    if worker.is_alive():
        stop.set()
        sock = _socket_of(current.get("response"))
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        raise ArchiveUnavailable(f"the package index from {mirror} did not arrive within {deadline:g}s "
                                 "(KIOSK_ARCHIVE_TIMEOUT)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


_READ: dict[Path, tuple[float, object]] = {}   # cache file -> (fetched, index), as read by this process


def _cached(cache: Path, fetch: Callable[[], dict], decode: Callable[[dict], T | None],
            outdated: Callable[[dict], bool] | None = None) -> T:
    """The index in `cache` when fresh (a day, and not `outdated(record)`), else fetch() it and keep it there.
    fetch returns the JSON record to keep, decode turns a record (with "fetched") back into the index (None:
    a damaged file).

    KIOSK_OFFLINE=1 never touches the network: a stale cache is used, none raises; a failed fetch falls
    back to a stale cache too."""
    memo = _READ.get(cache)
    if memo and time.time() - memo[0] < CACHE_SECONDS:   # read once per process (a fleet checks 100 specs)
        return memo[1]
    offline = paths.setting("KIOSK_OFFLINE") == "1"
    cached = None
    data = None
    if cache.is_file():
        try:
            data = json.loads(cache.read_text())
            if isinstance(data, dict) and isinstance(data.get("fetched"), (int, float)):
                index = decode(data)
                cached = (data["fetched"], index) if index is not None else None   # damaged: fetch again
        except (OSError, ValueError):
            cached = None
    fresh = cached and time.time() - cached[0] < CACHE_SECONDS
    if fresh and not offline and outdated is not None and outdated(data):
        fresh = False
    if cached and (fresh or offline):
        if fresh:
            _READ[cache] = cached
        return cached[1]
    if offline:
        raise ArchiveUnavailable("KIOSK_OFFLINE=1 and no cached package index")
    try:
        record = {"fetched": time.time(), **fetch()}
    except ArchiveUnavailable:
        if cached:  # stale is better than nothing
            return cached[1]
        raise
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")   # two threads may fetch at once
    tmp.write_text(json.dumps(record))
    os.replace(tmp, cache)
    index = decode(record)
    _READ[cache] = (record["fetched"], index)
    return index


def _names(data: dict) -> PackageIndex | None:
    try:
        return PackageIndex(frozenset(data["packages"]), {k: tuple(v) for k, v in data["provides"].items()})
    except (TypeError, AttributeError, KeyError):
        return None


def _versions(data: dict) -> SuiteVersions | None:
    versions = data.get("versions")
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        return None
    return SuiteVersions(versions, data["fetched"])


def _timeout(deadline: float | None) -> float:
    return deadline_seconds() if deadline is None else deadline


def package_index(mirror: str, suite: str, arch: str, *, deadline: float | None = None) -> PackageIndex:
    """The archive's package names for (mirror, suite, arch), from cache when fresh (see _cached).

    deadline: seconds the fetch may take in all (default KIOSK_ARCHIVE_TIMEOUT, else 120).
    """
    def fetch() -> dict:
        packages, provides = _fetch(mirror, suite, arch, _timeout(deadline))
        return {"packages": sorted(packages), "provides": {k: sorted(v) for k, v in sorted(provides.items())}}

    return _cached(_cache_file(mirror, suite, arch), fetch, _names)


def release_date(mirror: str, suite: str, timeout: float) -> int | None:
    """The suite's Release Date: (the archive's state, changed by every publication), None when unreadable."""
    for name in ("InRelease", "Release"):
        url = f"{mirror.rstrip('/')}/dists/{suite}/{name}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                head = response.read(4096).decode("utf-8", "replace")
        except (OSError, ValueError):
            continue
        match = re.search(r"^Date: (.+)$", head, re.M)
        if match:
            try:
                return int(email.utils.parsedate_to_datetime(match.group(1).strip()).timestamp())
            except (TypeError, ValueError):
                return None
    return None


def suite_versions(mirror: str, suite: str, arch: str, *, deadline: float | None = None) -> SuiteVersions:
    """Every package of (mirror, suite, arch) with its newest version: meant for the small suites
    (`<suite>-security`, `<suite>-updates`). Same limits and cache as package_index, but a kept index is
    fetched again as soon as the suite's Release says it was published anew (one small request); NotPublished
    when the mirror has no such index."""
    def release() -> int | None:
        return release_date(mirror, suite, min(_timeout(deadline), 20))

    def fetch() -> dict:
        versions: dict[str, str] = {}
        published = release()
        _fetch(mirror, suite, arch, _timeout(deadline), versions)
        return {"versions": dict(sorted(versions.items())), "release": published}

    def outdated(record: dict) -> bool:
        """A fix published since the index was kept (the security suite publishes several times a day):
        its Release is newer. Unreadable now: the kept index stands."""
        now = release()
        return now is not None and now != record.get("release")

    return _cached(_cache_file(mirror, suite, arch, "-versions"), fetch, _versions, outdated)
