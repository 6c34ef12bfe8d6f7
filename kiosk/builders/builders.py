"""Remote builders (issue 8): a small board hands package work to a bigger machine over SSH,
and a laptop can hand a whole image build to one.

A push that adds packages, on the device (BuilderInstaller, chosen by
kiosk.generations.default_installer when the spec names builders):

  1. candidates: effective_builders(spec) (`builders` plus Nixiosk's `localSystem`), by
     speedFactor, keeping those whose systems include the board's architecture and whose host
     key the spec pins (publicHostKey): the device never talks to a builder it cannot verify;
  2. a TCP probe of every candidate at once (KIOSK_BUILDER_CONNECT_TIMEOUT, default 5 s);
  3. the first reachable one gets ONE request over ssh (the device's own key, a known_hosts
     written from the spec, StrictHostKeyChecking=yes, BatchMode=yes): `kiosk builder-serve`
     reads {op: packages, architecture, suite, mirror, packages, the device's dpkg status},
     runs apt with a private state directory against that status (APT::Architecture=<arch>,
     --download-only, so only what the device lacks is fetched) and answers with a JSON header
     (each .deb's name, package, version, architecture, size and sha256, apt's install order,
     the payload's size and sha256) followed by a tar of those .debs;
  4. the device streams the tar to its disk while hashing, checks every file and the whole
     stream, checks each .deb's control fields, and only then runs `dpkg --install` on all of
     them at once (dpkg orders the configuration): no network and no resolution on the device;
  5. an unreachable or failing builder costs one log line and the next is tried; when none
     works the push fails with nothing installed, unless the board can build for itself
     (canBuildItself: Pi 3/4, qemu), which then resolves with apt itself, the same way.

The wire protocol: stdin is one JSON line; stdout is one JSON line and then exactly
`payload.bytes` bytes; stderr lines that start with "kiosk-builder: " are progress, relayed to
`git push`. The request is data only (package names must match Debian's name rule before they
reach apt's argv), so authorized_keys can pin the device's key to
`restrict,command="kiosk builder-serve"` (what `kiosk builders authorize` writes).

Design notes, trust model and figures: notes/builders.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kiosk import __version__
from kiosk.core import paths as resources
from kiosk.core.errors import KioskError, UsageError
from kiosk.device.packages import Installer

PROTOCOL = 1
DEFAULT_KEY = "/etc/kiosk/builder_ed25519"
KNOWN_HOSTS = "/etc/kiosk/builders_known_hosts"
SSH_CONFIG = "/etc/kiosk/builders_ssh_config"
ARCHITECTURES = ("amd64", "arm64", "armhf", "armel")
COMPONENTS = ("main", "non-free-firmware")
MARK = "kiosk-builder: "
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# Test-only switches, never set on a real device or builder:
UNSIGNED_ENV = "KIOSK_TEST_UNSIGNED_MIRROR"   # "1": apt trusts an unsigned mirror ([trusted=yes])
CORRUPT_ENV = "KIOSK_BUILDER_TEST_CORRUPT"    # builder side: "payload" or "deb" damages the answer

PACKAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
SUITE_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
MIRROR_URL = re.compile(r"^(https?|file)://[^\s\[\]\"']+$")
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+~%_-]{0,250}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
MAX_HEADER = 64 << 20
CHUNK = 1 << 20


class Refused(KioskError):
    """What a builder sent does not check out; nothing from it is used."""


class BuilderFailure(Exception):
    """One builder could not do the work: kind is unreachable, refused or failed."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


# ---------------------------------------------------------------- the spec's builders

@dataclass(frozen=True)
class Builder:
    """One machine that builds for the device, every default filled in."""

    hostName: str
    sshUser: str = "root"
    port: int = 22
    sshKey: str = DEFAULT_KEY
    publicHostKey: str | None = None
    systems: tuple[str, ...] = ARCHITECTURES
    maxJobs: int = 1
    speedFactor: float = 1.0
    origin: str = "/builders/0"

    @property
    def label(self) -> str:
        host = f"[{self.hostName}]" if ":" in self.hostName else self.hostName
        return f"{host}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        return self.hostName if self.port == 22 else f"[{self.hostName}]:{self.port}"


def _data(spec) -> dict:
    return getattr(spec, "data", spec)


def _board(data: dict) -> dict | None:
    from kiosk.spec.hardware import load_board
    try:
        return load_board(data["hardware"])
    except (KeyError, KioskError):
        return None


def device_architecture(spec) -> str:
    board = _board(_data(spec))
    if board is None:
        raise KioskError(f"unknown board {_data(spec).get('hardware')!r}")
    return board["architecture"]


def effective_builders(spec) -> list[Builder]:
    """The spec's builders, best first: `builders`, then Nixiosk's `localSystem` (when its hostName
    is set), sorted by speedFactor (highest first), ties in the order they are written.

    localSystem is Nixiosk's build platform: the machine that cross-built the device's system.
    So it builds for its own `system` AND for the device it is named in."""
    from kiosk.spec.load import builder_architectures

    data = _data(spec)
    found: list[Builder] = []
    for index, item in enumerate(data.get("builders") or []):
        found.append(Builder(
            hostName=item["hostName"], sshUser=item.get("sshUser") or "root", port=int(item.get("port") or 22),
            sshKey=item.get("sshKey") or DEFAULT_KEY, publicHostKey=item.get("publicHostKey") or None,
            systems=tuple(builder_architectures(item.get("systems") or list(ARCHITECTURES))),
            maxJobs=int(item.get("maxJobs") or 1), speedFactor=float(item.get("speedFactor") or 1),
            origin=f"/builders/{index}"))
    local = data.get("localSystem") or {}
    if local.get("hostName"):
        systems = set(builder_architectures([local["system"]])) if local.get("system") else set(ARCHITECTURES)
        board = _board(data)
        if board:
            systems.add(board["architecture"])
        builder = Builder(hostName=local["hostName"], sshUser=local.get("sshUser") or "root",
                          systems=tuple(sorted(systems)), origin="/localSystem")
        if not any((b.hostName, b.port, b.sshUser) == (builder.hostName, builder.port, builder.sshUser)
                   for b in found):
            found.append(builder)
    return [b for _, b in sorted(enumerate(found), key=lambda pair: (-pair[1].speedFactor, pair[0]))]


def names_builders(spec) -> bool:
    data = _data(spec)
    return bool(data.get("builders") or (data.get("localSystem") or {}).get("hostName"))


def known_hosts_text(builders: list[Builder]) -> str:
    """known_hosts lines for the builders whose host key the spec pins ([host]:port for other ports)."""
    from kiosk.spec.sshkeys import parse_public_key

    lines = []
    for b in builders:
        if b.publicHostKey:
            key = parse_public_key(b.publicHostKey)
            lines.append(f"{b.known_hosts_name} {key.type} {key.line().split()[1]}")
    return "".join(line + "\n" for line in dict.fromkeys(lines))


# ---------------------------------------------------------------- ssh

def connect_timeout() -> float:
    try:
        return max(0.2, float(os.environ.get("KIOSK_BUILDER_CONNECT_TIMEOUT", "5")))
    except ValueError:
        return 5.0


def transfer_timeout() -> float:
    try:
        return max(1.0, float(os.environ.get("KIOSK_BUILDER_TIMEOUT", "3600")))
    except ValueError:
        return 3600.0


def ssh_options(key: str | Path | None, known_hosts: str | Path | None,
                timeout: float | None = None) -> list[tuple[str, str]]:
    """The device's ssh settings for builders: pinned host keys, no prompts, no forwarding."""
    options = [("BatchMode", "yes"), ("StrictHostKeyChecking", "yes"),
               ("ConnectTimeout", str(max(1, round(timeout if timeout is not None else connect_timeout())))),
               ("ServerAliveInterval", "15"), ("ServerAliveCountMax", "4"), ("UpdateHostKeys", "no"),
               ("ForwardAgent", "no"), ("ForwardX11", "no"), ("RequestTTY", "no"), ("ControlMaster", "no"),
               ("ControlPath", "none"), ("LogLevel", "ERROR")]
    if key is not None:
        options += [("IdentityFile", str(key)), ("IdentitiesOnly", "yes")]
    if known_hosts is not None:
        options += [("UserKnownHostsFile", str(known_hosts)), ("GlobalKnownHostsFile", "/dev/null")]
    return options


def remote_command() -> list[str]:
    """What the device asks the builder to run (a forced command in authorized_keys wins anyway)."""
    return shlex.split(os.environ.get("KIOSK_BUILDER_COMMAND", "kiosk builder-serve"))


def ssh_argv(builder: Builder, options: list[tuple[str, str]], *, config: str | None = "/dev/null") -> list[str]:
    argv = ["ssh"]
    if config is not None:
        argv += ["-F", config]
    for name, value in options:
        argv += ["-o", f"{name}={value}"]
    argv += ["-p", str(builder.port), "-l", builder.sshUser, "--", builder.hostName, *remote_command()]
    return argv


def tcp_probe(host: str, port: int, timeout: float) -> tuple[str | None, float]:
    """(None, seconds) when something accepts TCP at host:port, else (why not, seconds)."""
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror:
        return "unknown host name", time.monotonic() - started
    except ConnectionRefusedError:
        return "connection refused", time.monotonic() - started
    except (TimeoutError, socket.timeout):
        return f"no answer within {timeout:g} s", time.monotonic() - started
    except OSError as exc:
        return (exc.strerror or str(exc)).lower(), time.monotonic() - started
    return None, time.monotonic() - started


def probe_all(builders: list[Builder], timeout: float) -> list[tuple[str | None, float]]:
    """tcp_probe of every builder at the same time (one slow builder does not delay the others)."""
    results: list[tuple[str | None, float]] = [(f"no answer within {timeout:g} s", timeout)] * len(builders)

    def run(i: int, b: Builder) -> None:
        results[i] = tcp_probe(b.hostName, b.port, timeout)

    threads = [threading.Thread(target=run, args=(i, b), daemon=True) for i, b in enumerate(builders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 2)
    return results


def ssh_problem(stderr: str, code: int, key: str | Path | None = None) -> BuilderFailure:
    """ssh's complaint as one short reason."""
    text = stderr.lower()
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if "host key verification failed" in text or "remote host identification has changed" in text:
        return BuilderFailure("refused", "its host key does not match publicHostKey in the spec; not trusted "
                                         "(a reinstalled builder, or someone in between)")
    if "permission denied" in text:
        return BuilderFailure("refused", "it does not accept this device's key"
                                         + (f" {key}.pub" if key else "")
                                         + " (on the builder: kiosk builders authorize)")
    if "bad permissions" in text or "load key" in text or "no such identity" in text:
        return BuilderFailure("failed", f"the key {key} cannot be used: {lines[-1] if lines else ''}")
    for needle, reason in (("connection refused", "connection refused"), ("timed out", "timed out"),
                           ("no route to host", "no route to host"), ("network is unreachable", "network unreachable"),
                           ("could not resolve hostname", "unknown host name"),
                           ("name or service not known", "unknown host name")):
        if needle in text:
            return BuilderFailure("unreachable", reason)
    if code == 127 or "command not found" in text or "no such file or directory" in text:
        return BuilderFailure("failed", "kiosk is not installed there, or not on the PATH of ssh sessions "
                                        "(install it, or set KIOSK_BUILDER_COMMAND)")
    if "connection closed" in text or "connection reset" in text or "broken pipe" in text:
        return BuilderFailure("failed", lines[-1] if lines else "the connection was closed")
    if lines:
        return BuilderFailure("failed", lines[-1][:300])
    return BuilderFailure("failed", f"ssh exited with status {code} without an answer")


# ---------------------------------------------------------------- the payload on the wire

def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Counted:
    """Reads at most `limit` bytes of a stream, hashing and counting them."""

    def __init__(self, raw, limit: int):
        self.raw = raw
        self.left = limit
        self.count = 0
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.raw.read(size)
        self.left -= len(data)
        self.count += len(data)
        self.digest.update(data)
        if not data:
            self.left = 0  # end of stream before the announced end
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def _write_member(source, dest: Path, size: int) -> str:
    """Copy one file out of the tar, leaving holes where it is zeros (a sparse image stays sparse)."""
    digest = hashlib.sha256()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            left = size
            while left > 0:
                chunk = source.read(min(CHUNK, left))
                if not chunk:
                    break
                digest.update(chunk)
                if chunk.count(0) == len(chunk):
                    out.seek(len(chunk), os.SEEK_CUR)
                else:
                    out.write(chunk)
                left -= len(chunk)
            out.truncate(size - left)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def check_header(header) -> tuple[dict[str, dict], dict]:
    """The files and payload a builder announces, checked for shape before a byte is read."""
    if not isinstance(header, dict) or not isinstance(header.get("files"), list) \
            or not isinstance(header.get("payload"), dict):
        raise Refused("the builder's answer has no file list")
    files: dict[str, dict] = {}
    for item in header["files"]:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not FILE_NAME.match(name) or name in files:
            raise Refused(f"the builder announced a bad or repeated file name {name!r}")
        if not isinstance(item.get("size"), int) or item["size"] < 0 \
                or not isinstance(item.get("sha256"), str) or not HEX64.match(item["sha256"]):
            raise Refused(f"the builder announced {name} without a size and sha256")
        files[name] = item
    payload = header["payload"]
    if not isinstance(payload.get("bytes"), int) or payload["bytes"] < 0 \
            or not isinstance(payload.get("sha256"), str) or not HEX64.match(payload["sha256"]) \
            or payload.get("compression", "none") not in ("none", "xz"):
        raise Refused("the builder's answer announces no payload size, sha256 and compression")
    return files, payload


def receive_payload(stream, header: dict, dest: Path) -> dict[str, Path]:
    """Read the payload the header announces from `stream` into dest; every check must pass.

    Files are written while the stream is hashed (no second copy on a small SD card); on any
    mismatch every file already written is deleted and Refused says what did not match."""
    import lzma

    files, payload = check_header(header)
    total = payload["bytes"]
    need = sum(item["size"] for item in files.values())
    free = shutil.disk_usage(dest).free
    if need + (16 << 20) > free:
        raise Refused(f"not enough free space for {_human(need)} of packages ({_human(free)} free)")
    reader = _Counted(stream, total)
    written: dict[str, Path] = {}
    mode = "r|xz" if payload.get("compression") == "xz" else "r|"
    problem: str | None = None
    try:
        with tarfile.open(fileobj=reader, mode=mode) as tar:
            for member in tar:
                name = member.name
                if not member.isfile() or name not in files or name in written:
                    problem = f"unexpected entry {name!r} in the transfer"
                    break
                if member.size != files[name]["size"]:
                    problem = f"{name}: {member.size} bytes, but the manifest says {files[name]['size']}"
                    break
                path = dest / name
                written[name] = path
                digest = _write_member(tar.extractfile(member), path, member.size)
                if digest != files[name]["sha256"]:
                    problem = (f"{name}: checksum mismatch (sha256 {digest[:16]}..., the manifest says "
                               f"{files[name]['sha256'][:16]}...)")
                    break
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError) as exc:
        problem = f"the transfer is damaged ({type(exc).__name__}: {exc})"
    reader.drain()
    try:
        if reader.count < total:
            raise Refused(f"the transfer was cut short after {reader.count} of {total} bytes")
        if reader.digest.hexdigest() != payload["sha256"]:
            raise Refused(f"checksum mismatch: the {total}-byte transfer does not match the sha256 the builder "
                          f"announced (damaged on the way)")
        if problem:
            raise Refused(problem)
        if stream.read(1):
            raise Refused("the builder sent more bytes than it announced")
        missing = sorted(set(files) - set(written))
        if missing:
            raise Refused(f"the transfer lacks {', '.join(missing)}")
    except Refused:
        for path in written.values():
            path.unlink(missing_ok=True)
        raise
    return written


def _tar_add(tar: tarfile.TarFile, path: Path, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = path.stat().st_size
    info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
    with open(path, "rb") as f:
        tar.addfile(info, f)


def _answer(out, header: dict, payload: Path | None = None) -> None:
    header = dict(header, kiosk=PROTOCOL, version=__version__)
    out.write((json.dumps(header, sort_keys=True) + "\n").encode())
    if payload is not None:
        with open(payload, "rb") as f:
            shutil.copyfileobj(f, out, CHUNK)
    out.flush()


def _human(size: int) -> str:
    from kiosk.image.bmap import human_size
    return human_size(size)


# ---------------------------------------------------------------- one request to one builder

def exchange(argv: list[str], request: dict, dest: Path, *, relay, timeout: float,
             key: str | Path | None = None) -> tuple[dict, dict[str, Path]]:
    """Send `request` to the `kiosk builder-serve` that argv starts; receive and check its answer.

    relay(line) gets the builder's progress lines. Raises BuilderFailure (could not get an
    answer: the next builder may do better), Refused (the answer does not check out) or
    KioskError (the builder answered with an error: the same request fails everywhere)."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    other: list[str] = []

    def pump() -> None:
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith(MARK):
                relay(line[len(MARK):])
            elif line.strip():
                other.append(line)

    errors = threading.Thread(target=pump, daemon=True)
    errors.start()
    timer = threading.Timer(timeout, proc.kill)
    timer.daemon = True
    timer.start()
    try:
        with contextlib.suppress(BrokenPipeError, OSError):
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.close()
        line = proc.stdout.readline(MAX_HEADER)
        if not line.endswith(b"\n"):
            code = proc.wait()
            errors.join(5)
            if not timer.is_alive() and code < 0:
                raise BuilderFailure("failed", f"no answer within {timeout:g} s")
            raise ssh_problem("\n".join(other), code, key)
        try:
            header = json.loads(line)
        except ValueError:
            raise Refused("the builder's answer is not JSON (is it running kiosk builder-serve?)") from None
        if not isinstance(header, dict) or header.get("kiosk") != PROTOCOL:
            theirs = header.get("kiosk") if isinstance(header, dict) else None
            raise BuilderFailure("failed", f"it speaks builder protocol {theirs!r}, this side {PROTOCOL} "
                                           "(install the same kiosk version on both)")
        if not header.get("ok"):
            error = KioskError(str(header.get("error") or "the builder failed without saying why"))
            error.exit_code = int(header.get("exitCode") or 1)
            raise error
        files = receive_payload(proc.stdout, header, dest) if header.get("payload") is not None else {}
        code = proc.wait()
        errors.join(5)
        if code != 0:
            for path in files.values():
                path.unlink(missing_ok=True)
            raise ssh_problem("\n".join(other), code, key)
        return header, files
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(Exception):
                stream.close()


# ---------------------------------------------------------------- apt with a private state (builder side)

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
    components = req.get("components") or list(COMPONENTS)
    if not all(isinstance(c, str) and SUITE_NAME.match(c) for c in components):
        raise KioskError("bad component names")
    packages = req.get("packages")
    if not isinstance(packages, list) or not packages or \
            not all(isinstance(p, str) and PACKAGE_NAME.match(p) for p in packages):
        raise KioskError("the request must name Debian packages (lower case names)")
    if not isinstance(req.get("status"), str):
        raise KioskError("the request carries no dpkg status")


def apt_options(req: dict, status: Path) -> tuple[list[str], Path]:
    """apt-get options resolving for the device: its architecture, its dpkg status, the spec's
    mirror; lists, preferences and sources private to kiosk (nothing of the builder's own apt
    configuration decides what the device gets, except proxies in apt.conf.d)."""
    arch = req["architecture"]
    arches = [arch, *[a for a in req.get("foreignArchitectures") or [] if a != arch]]
    components = req.get("components") or list(COMPONENTS)
    trusted = os.environ.get(UNSIGNED_ENV) == "1"
    key = hashlib.sha256(json.dumps([req["mirror"].rstrip("/"), req["suite"], arches, components, trusted])
                         .encode()).hexdigest()[:16]
    base = resources.cache_dir() / "builder" / "apt" / f"{req['suite']}-{arch}-{key}"
    for sub in ("lists/partial", "state", "cache", "etc/parts", "etc/preferences.d", "log"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    from kiosk.image.rootfs import deb_cache_dir
    archives = deb_cache_dir()
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    if trusted:
        option = "trusted=yes"
    elif Path(KEYRING).is_file():
        option = f"signed-by={KEYRING}"
    else:
        option = ""
    opt = f"[arch={','.join(arches)}{' ' + option if option else ''}] "
    sources = f"deb {opt}{req['mirror']} {req['suite']} {' '.join(components)}\n"
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


def _apt_env() -> dict:
    return dict(os.environ, LC_ALL="C.UTF-8", LANGUAGE="", DEBIAN_FRONTEND="noninteractive")


def _run_apt(argv: list[str], what: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, env=_apt_env())
    if proc.returncode != 0:
        lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
        important = [l.strip() for l in lines if l.startswith(("E:", " ")) or "unmet" in l.lower()] or lines[-3:]
        raise KioskError(f"{what} failed: " + " | ".join(important[-6:]))
    return proc.stdout


INST = re.compile(r"^Inst (\S+) (?:\[(\S+)\] )?\((\S+) .*\[([a-z0-9]+)\]\)")


def deb_file_name(name: str, version: str, arch: str) -> str:
    return f"{name}_{version.replace(':', '%3a')}_{arch}.deb"


def _index_hashes(opts: list[str], entries: list[dict]) -> dict[tuple[str, str, str], str]:
    specs = [f"{e['package']}:{e['architecture']}={e['version']}" if e["architecture"] != "all"
             else f"{e['package']}={e['version']}" for e in entries]
    out = _run_apt(["apt-cache", *opts, "show", *specs], "apt-cache show")
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
    with _flock(resources.cache_dir() / "builder" / "apt.lock"):
        opts, base = apt_options(req, status)
        log(f"apt: updating the {req['suite']} {req['architecture']} index from {req['mirror']}")
        _run_apt(["apt-get", "-q", *opts, "update"], "apt-get update")
        packages = sorted(set(req["packages"]))
        plan = _run_apt(["apt-get", "-q", "-s", *opts, "install", *packages], "apt-get install (simulated)")
        removals = [line.split()[1] for line in plan.splitlines() if line.startswith("Remv ")]
        if removals:
            raise KioskError(f"installing {' '.join(packages)} would remove {' '.join(removals)} from the device; "
                             "refused (kiosk never removes packages on a push)")
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
        from kiosk.image.rootfs import deb_cache_dir
        archives = deb_cache_dir()
        for attempt in (1, 2):
            _run_apt(["apt-get", "-q", "-y", *opts, "--download-only", "install", *packages],
                     "apt-get --download-only install")
            hashes = _index_hashes(opts, entries)
            damaged = []
            for entry in entries:
                path = archives / entry["name"]
                if not path.is_file():
                    raise KioskError(f"apt did not leave {entry['name']} in {archives}")
                entry["path"] = path
                entry["size"] = path.stat().st_size
                entry["sha256"] = _sha256_file(path)
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
    log(f"apt: {len(entries)} package(s) for {req['architecture']}, {_human(size)}, in "
        f"{time.monotonic() - started:.1f} s: {' '.join(e['package'] for e in entries)}")
    return entries


# ---------------------------------------------------------------- kiosk builder-serve (builder side)

class _Progress:
    """Progress lines for the device (stderr, prefixed so they are told apart from ssh's own)."""

    def __init__(self, stream):
        self.stream = stream

    def __call__(self, text: str) -> None:
        for line in str(text).splitlines() or [""]:
            with contextlib.suppress(OSError, ValueError):
                self.stream.write(f"{MARK}{line}\n")
                self.stream.flush()


class _RelayText:
    """A text stream for kiosk.build.Stages whose lines become progress lines."""

    def __init__(self, progress: _Progress):
        self.progress = progress
        self.buffer = ""

    def write(self, text: str) -> int:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self.progress(line)
        return len(text)

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def _job_slot(max_jobs: int, progress):
    """At most maxJobs builds at once on this builder (as the spec describes it)."""
    base = resources.cache_dir() / "builder" / "jobs"
    base.mkdir(parents=True, exist_ok=True)
    fds = []
    try:
        for i in range(max(1, min(max_jobs, 256))):
            fd = os.open(base / f"slot-{i}", os.O_RDWR | os.O_CREAT, 0o644)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                yield
                return
            except BlockingIOError:
                continue
        progress(f"waiting for a free job slot ({max_jobs} at a time on this builder)")
        fcntl.flock(fds[os.getpid() % len(fds)], fcntl.LOCK_EX)
        yield
    finally:
        for fd in fds:
            os.close(fd)


def probe() -> dict:
    """What this machine can do as a builder."""
    from kiosk.image.rootfs import host_arch

    apt = shutil.which("apt-get")
    version = None
    if apt:
        out = subprocess.run([apt, "--version"], capture_output=True, text=True).stdout
        version = out.splitlines()[0] if out else "apt"
    host = host_arch() if shutil.which("dpkg") else None
    images = []
    if shutil.which("mmdebstrap") and host:
        for arch in ARCHITECTURES:
            if arch == host or (shutil.which("arch-test") and
                                subprocess.run(["arch-test", arch], capture_output=True).returncode == 0):
                images.append(arch)
    cache = resources.cache_dir()
    existing = next(p for p in [cache, *cache.parents] if p.exists())
    return {"ok": True, "apt": version, "hostArchitecture": host,
            "architectures": list(ARCHITECTURES) if apt else [],
            "imageArchitectures": images, "freeBytes": shutil.disk_usage(existing).free,
            "cpus": os.cpu_count(), "load1": round(os.getloadavg()[0], 2)}


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    if data:
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))


def serve_packages(req: dict, out, progress) -> None:
    work = Path(tempfile.mkdtemp(prefix="serve-", dir=_builder_tmp()))
    try:
        entries = fetch_packages(req, work, progress)
        corrupt = os.environ.get(CORRUPT_ENV, "")
        compression = "xz" if req.get("compression") == "xz" else "none"
        payload = work / "payload.tar"
        with tarfile.open(payload, "w:xz" if compression == "xz" else "w", format=tarfile.PAX_FORMAT,
                          **({"preset": 6} if compression == "xz" else {})) as tar:
            for i, entry in enumerate(entries):
                source = entry["path"]
                if corrupt == "deb" and i == 0:  # test hook: the manifest says one thing, the tar holds another
                    source = work / entry["name"]
                    shutil.copyfile(entry["path"], source)
                    _corrupt(source)
                _tar_add(tar, source, entry["name"])
        header = {"ok": True,
                  "files": [{k: e[k] for k in ("name", "package", "version", "architecture", "size", "sha256")}
                            for e in entries],
                  "install": [e["name"] for e in entries],
                  "payload": {"bytes": payload.stat().st_size, "sha256": _sha256_file(payload),
                              "compression": compression}}
        if corrupt == "payload":  # test hook: damaged after the checksum was taken
            _corrupt(payload)
        progress(f"sending {len(entries)} .deb(s), {_human(header['payload']['bytes'])} "
                 f"({compression if compression != 'none' else 'uncompressed'} tar)")
        _answer(out, header, payload)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _builder_tmp() -> Path:
    path = resources.cache_dir() / "builder" / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def serve_build(req: dict, out, progress) -> None:
    """Build the image of the spec in the request here; answer with the image, .bmap, manifest, SBOM."""
    from kiosk.spec import load as specmod
    from kiosk.image.pipeline import Stages, build, require_root

    text = req.get("spec")
    if not isinstance(text, str):
        raise UsageError("the request carries no spec")
    source = req.get("source") if isinstance(req.get("source"), str) else "nixiosk.json"
    spec = specmod.loads(text.removeprefix("\ufeff"), source)
    for warning in spec.warnings:
        progress(f"{source}: warning: {warning}")
    require_root(f"this builder runs kiosk as uid {os.geteuid()}, not root",
                 "name a builder whose sshUser is root for image builds (package builds for a device need no root)")
    with _job_slot(int(req.get("maxJobs") or 1), progress):
        work = Path(tempfile.mkdtemp(prefix="build-", dir=_builder_tmp()))
        try:
            out_dir = work / "out"
            out_dir.mkdir()
            key = req.get("builderKey")
            if isinstance(key, dict) and isinstance(key.get("private"), str) and isinstance(key.get("public"), str):
                stem = device_key_paths(spec.data, out_dir)
                _write_private(stem[0], key["private"].encode())
                stem[1].write_text(key["public"])
            manifest = build(spec, text, out_dir, verbose=bool(req.get("verbose")),
                             stages=Stages(out=_RelayText(progress)))
            names = sorted(p.name for p in out_dir.iterdir() if p.is_file() and FILE_NAME.match(p.name))
            entries = []
            image_name = Path(manifest["image"]).name
            for name in names:
                path = out_dir / name
                digest = manifest["imageSha256"] if name == image_name else _sha256_file(path)
                entries.append({"name": name, "size": path.stat().st_size, "sha256": digest})
            payload = work / "payload.tar"
            proc = subprocess.run(["tar", "--sparse", "--format=posix", "--owner=0", "--group=0", "--numeric-owner",
                                   "-C", str(out_dir), "-cf", str(payload), "--", *names],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise KioskError(f"tar failed: {proc.stderr.strip()[-300:]}")
            header = {"ok": True, "files": entries, "image": image_name,
                      "payload": {"bytes": payload.stat().st_size, "sha256": _sha256_file(payload),
                                  "compression": "none"}}
            if os.environ.get(CORRUPT_ENV) == "payload":
                _corrupt(payload)
            progress(f"sending {len(entries)} files, {_human(header['payload']['bytes'])} (sparse tar)")
            _answer(out, header, payload)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def serve(stdin, stdout, stderr) -> int:
    """`kiosk builder-serve`: one request on stdin, one answer on stdout."""
    progress = _Progress(stderr)
    try:
        line = stdin.readline(MAX_HEADER)
        try:
            req = json.loads(line)
        except ValueError:
            raise KioskError("expected one JSON request line on stdin") from None
        if not isinstance(req, dict):
            raise KioskError("expected a JSON object")
        if req.get("kiosk") != PROTOCOL:
            raise KioskError(f"this builder speaks protocol {PROTOCOL} (kiosk {__version__}), the request "
                             f"{req.get('kiosk')!r}: install the same kiosk version on both")
        op = req.get("op")
        if op == "probe":
            _answer(stdout, probe())
        elif op == "packages":
            serve_packages(req, stdout, progress)
        elif op == "build":
            serve_build(req, stdout, progress)
        else:
            raise KioskError(f"unknown request {op!r}")
    except KioskError as exc:
        text = exc.render() if hasattr(exc, "render") else str(exc)
        _answer(stdout, {"ok": False, "error": text, "exitCode": exc.exit_code})
    except Exception as exc:  # the device gets a sentence, never a traceback
        _answer(stdout, {"ok": False, "error": f"internal error on the builder: {type(exc).__name__}: {exc}"})
    return 0


# ---------------------------------------------------------------- the device: install what a builder sent

def device_status(root: Path) -> str:
    path = Path(root) / "var/lib/dpkg/status"
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise KioskError(f"{path}: no dpkg database on this device") from None


def _dpkg_root_args(root: Path) -> list[str]:
    root = Path(root)
    if root.resolve() == Path("/"):
        return []
    logfile = root / "var/log/dpkg.log" if (root / "var/log").is_dir() else Path("/dev/null")
    return [f"--root={root}", f"--admindir={root / 'var/lib/dpkg'}", f"--log={logfile}"]


def foreign_architectures(root: Path, arch: str) -> list[str]:
    """The device's extra dpkg architectures (not its own, and not the dpkg binary's of a test host)."""
    admin = ["--admindir", str(Path(root) / "var/lib/dpkg")] if Path(root).resolve() != Path("/") else []
    try:
        out = subprocess.run(["dpkg", *admin, "--print-foreign-architectures"], capture_output=True,
                             text=True).stdout.split()
        native = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return []
    return sorted({a for a in out if a in ARCHITECTURES and a not in (arch, native)})


def package_request(root: Path, spec, packages) -> dict:
    data = _data(spec)
    arch = device_architecture(data)
    compression = os.environ.get("KIOSK_BUILDER_COMPRESSION", "none")
    return {"kiosk": PROTOCOL, "op": "packages", "architecture": arch,
            "foreignArchitectures": foreign_architectures(root, arch),
            "suite": data["debian"]["suite"], "mirror": data["debian"]["mirror"], "components": list(COMPONENTS),
            "packages": sorted(set(packages)), "status": device_status(root),
            "compression": compression if compression in ("none", "xz") else "none"}


def check_debs(entries: list[dict], arches: set[str]) -> None:
    """Each .deb says (dpkg-deb --field) what the manifest says it is, for this device."""
    for entry in entries:
        proc = subprocess.run(["dpkg-deb", "--field", str(entry["path"]), "Package", "Version", "Architecture"],
                              capture_output=True, text=True)
        fields = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
        if proc.returncode != 0:
            raise Refused(f"{entry['name']} is not a Debian package ({proc.stderr.strip()[-200:]})")
        got = (fields.get("Package"), fields.get("Version"), fields.get("Architecture"))
        want = (entry.get("package"), entry.get("version"), entry.get("architecture"))
        if got != want:
            raise Refused(f"{entry['name']} is {got[0]} {got[1]} ({got[2]}), the manifest says "
                          f"{want[0]} {want[1]} ({want[2]})")
        if got[2] not in arches | {"all"}:
            raise Refused(f"{entry['name']} is for {got[2]}, this device is {'/'.join(sorted(arches))}")


def install_debs(root: Path, entries: list[dict], wanted: list[str], log) -> None:
    """dpkg --install every .deb at once (dpkg configures them in dependency order); then check."""
    root = Path(root)
    if entries:
        argv = ["dpkg", *_dpkg_root_args(root), "--force-confdef", "--force-confold", "--install",
                *[str(e["path"]) for e in entries]]
        log(f"dpkg --install {' '.join(e['name'] for e in entries)}")
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        tail: list[str] = []
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail = (tail + [line])[-5:]
                log(f"dpkg: {line}")
        if proc.wait() != 0:
            raise KioskError(f"dpkg --install failed (status {proc.returncode}): {tail[-1] if tail else ''}")
    admin = ["--admindir", str(root / "var/lib/dpkg")] if root.resolve() != Path("/") else []
    proc = subprocess.run(["dpkg-query", *admin, "-W", "-f", "${Package}\t${Version}\t${db:Status-Abbrev}\n",
                           *wanted], capture_output=True, text=True)
    installed = {}
    for line in proc.stdout.splitlines():
        name, version, abbrev = (line.split("\t") + ["", ""])[:3]
        if abbrev.strip() == "ii":
            installed[name] = version
    missing = [p for p in wanted if p not in installed]
    if missing:
        raise KioskError(f"after dpkg, {' '.join(missing)} is still not installed")
    log("installed: " + ", ".join(f"{p} {installed[p]}" for p in wanted))


@contextlib.contextmanager
def _incoming(root: Path):
    """A private directory on the device's disk (not /tmp: RAM on a 512 MB board) for one transfer;
    it and any directory made for it are gone afterwards."""
    base = Path(root) / "var/cache/kiosk"
    made = []
    p = base
    while not p.exists():
        made.append(p)
        p = p.parent
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="builder-", dir=base))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()


def ensure_device_key(root: Path, key_path: str, log) -> Path:
    """The device's builder key; made here if the image had none (builders added by a later push)."""
    key = Path(root) / key_path.lstrip("/")
    if key.is_file():
        return key
    key.parent.mkdir(parents=True, exist_ok=True)
    comment = f"kiosk-builder@{socket.gethostname()}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
                   check=True, capture_output=True)
    log(f"made this device's builder key {key_path}; authorize it on each builder "
        f"(kiosk builders authorize --key -): {Path(str(key) + '.pub').read_text().strip()}")
    return key


class BuilderInstaller(Installer):
    """Packages resolved and fetched by a remote builder, verified and installed with dpkg."""

    name = "builders"

    def __init__(self, spec=None):
        self.spec = spec

    def install(self, root, packages, spec, log) -> None:
        data = _data(spec if spec is not None else self.spec)
        root = Path(root)
        board = _board(data)
        if board is None:
            raise KioskError(f"unknown board {data.get('hardware')!r}")
        request = package_request(root, data, packages)
        with _incoming(root) as work:
            entries = fetch_from_builders(root, data, request, work, log)
            if entries is None:
                if board.get("canBuildItself") and not data.get("allowLocalBuild", True):
                    raise KioskError(f"no builder could provide {' '.join(request['packages'])} for "
                                     f"{request['architecture']} and allowLocalBuild is false; nothing was "
                                     "installed (start a builder, see kiosk builders check)")
                if not board.get("canBuildItself"):
                    raise KioskError(f"no builder could provide {' '.join(request['packages'])} for "
                                     f"{request['architecture']}; nothing was installed (a {board['name']} "
                                     f"cannot resolve packages itself: start a builder, see kiosk builders check)")
                log(f"{board['name']} can build for itself: resolving with apt on the device")
                entries = fetch_packages(request, work, log)
                for entry in entries:
                    local = work / entry["name"]
                    shutil.copyfile(entry["path"], local)
                    entry["path"] = local
            install_debs(root, entries, list(request["packages"]), log)


def package_installer(spec) -> Installer:
    return BuilderInstaller(spec)


def fetch_from_builders(root: Path, data: dict, request: dict, work: Path, log) -> list[dict] | None:
    """Try the builders in order; the first verified answer wins. None when none could."""
    arch = request["architecture"]
    candidates = []
    for b in effective_builders(data):
        if arch not in b.systems:
            log(f"builder {b.label} skipped: its systems ({' '.join(b.systems)}) do not include {arch}")
        elif not b.publicHostKey:
            log(f"builder {b.label} skipped: the spec pins no host key for it ({b.origin}/publicHostKey; "
                f"get it with: ssh-keyscan -p {b.port} -t ed25519 {b.hostName})")
        else:
            candidates.append(b)
    if not candidates:
        log("no builder the device can use")
        return None
    known_hosts = work / "known_hosts"
    known_hosts.write_text(known_hosts_text(candidates))
    timeout = connect_timeout()
    probes = probe_all(candidates, timeout)
    arches = {arch, *request.get("foreignArchitectures", [])}
    for i, b in enumerate(candidates):
        after = f"trying {candidates[i + 1].label}..." if i + 1 < len(candidates) else "no builder left"
        problem, _ = probes[i]
        if problem:
            log(f"builder {b.label} unreachable ({problem}); {after}")
            continue
        try:
            key = ensure_device_key(root, b.sshKey, log)
            argv = ssh_argv(b, ssh_options(key, known_hosts, timeout))
            incoming = work / f"from-{i}"
            incoming.mkdir()
            started = time.monotonic()
            header, files = exchange(argv, request, incoming, relay=lambda line, b=b: log(f"{b.label}: {line}"),
                                     timeout=transfer_timeout(), key=key)
            entries = []
            by_name = {f["name"]: f for f in header["files"]}
            for name in header.get("install") or list(by_name):
                if name not in files:
                    raise Refused(f"the install list names {name!r}, which was not sent")
                entries.append(dict(by_name[name], path=files[name]))
            check_debs(entries, arches)
            size = sum(e["size"] for e in entries)
            log(f"builder {b.label}: {len(entries)} .deb(s), {_human(size)}, checksums verified, in "
                f"{time.monotonic() - started:.1f} s")
            return entries
        except BuilderFailure as failure:
            log(f"builder {b.label} {failure.kind} ({failure.reason}); {after}")
        except Refused as exc:
            log(f"builder {b.label} REFUSED: {exc}; nothing from it is used; {after}")
        except KioskError as exc:
            log(f"builder {b.label} failed ({exc}); {after}")
        with contextlib.suppress(OSError):
            shutil.rmtree(work / f"from-{i}")
    return None


# ---------------------------------------------------------------- the image: the device's key and settings

def device_key_paths(spec: dict, out_dir: Path) -> tuple[Path, Path]:
    """Where the device's builder key is kept next to its image: <image>.builder and <image>.builder.pub."""
    board = _board(spec)
    image = f"{spec['hostName']}-{board['name'] if board else spec['hardware']}.img"
    return Path(out_dir) / f"{image}.builder", Path(out_dir) / f"{image}.builder.pub"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)


def key_fingerprint(public_line: str) -> str:
    import base64
    from kiosk.spec.sshkeys import parse_public_key
    blob = parse_public_key(public_line).blob
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def device_key(spec: dict, out_dir: Path, log) -> tuple[bytes, str]:
    """The device's builder key pair: reused from out_dir when there (so a rebuild of the same
    spec gives the same image bytes, and builders stay authorized), else made once."""
    from kiosk.spec.sshkeys import BadKey, parse_public_key

    private, public = device_key_paths(spec, out_dir)
    if private.is_file() and public.is_file():
        line = public.read_text().strip()
        try:
            parse_public_key(line)
            derived = subprocess.run(["ssh-keygen", "-y", "-f", str(private)], capture_output=True, text=True)
            if derived.returncode == 0 and derived.stdout.split()[:2] == line.split()[:2]:
                log(f"builders: reusing this device's key {private} ({key_fingerprint(line)})")
                return private.read_bytes(), line
        except BadKey:
            pass
        log(f"builders: {private} and {public.name} do not match; making a new key")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".builder-key-") as tmp:
        path = Path(tmp) / "key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"kiosk-builder@{spec['hostName']}",
                        "-f", str(path)], check=True, capture_output=True)
        line = Path(str(path) + ".pub").read_text().strip()
        os.chmod(path, 0o600)
        os.replace(Path(str(path) + ".pub"), public)
        os.replace(path, private)
    log(f"builders: made this device's key {private} ({key_fingerprint(line)})")
    return private.read_bytes(), line


def ssh_config_text(builders: list[Builder]) -> str:
    lines = ["# Written by kiosk at image build from nixiosk.json: how this device reaches its builders.",
             "# kiosk passes the same options itself (and a known_hosts made from the spec in use);",
             f"# this file is for people, e.g.: ssh -F {SSH_CONFIG} builder-1", ""]
    for i, b in enumerate(builders, 1):
        lines += [f"Host builder-{i}", f"    HostName {b.hostName}", f"    Port {b.port}", f"    User {b.sshUser}",
                  f"    IdentityFile {b.sshKey}", ""]
    lines.append("Host *")
    for name, value in ssh_options(None, KNOWN_HOSTS):
        lines.append(f"    {name} {value}")
    lines.append("    IdentitiesOnly yes")
    return "\n".join(lines) + "\n"


def _place(root: Path, path: str, data: bytes, mode: int, epoch: int | None) -> None:
    dest = Path(root) / path.lstrip("/")
    if not dest.parent.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.kiosk-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    if os.geteuid() == 0:
        os.chown(tmp, 0, 0)
    os.replace(tmp, dest)
    if epoch is not None:
        os.utime(dest, (epoch, epoch))


def prepare_device_for_builders(root: Path, spec: dict, out_dir: Path, log, *, epoch: int | None = None) -> None:
    """At image build: the device's builder key (root only, 0600) at each builder's sshKey path,
    known_hosts from the spec's publicHostKeys, an ssh_config for people; the public key is
    printed and written to <image>.builder.pub so the user can authorize it on the builders."""
    data = _data(spec)
    builders = effective_builders(data)
    if not builders:
        return
    private, public = device_key(data, Path(out_dir), log)
    for key_path in sorted({b.sshKey for b in builders}):
        _place(root, key_path, private, 0o600, epoch)
        _place(root, key_path + ".pub", (public + "\n").encode(), 0o644, epoch)
    _place(root, KNOWN_HOSTS, known_hosts_text(builders).encode(), 0o644, epoch)
    _place(root, SSH_CONFIG, ssh_config_text(builders).encode(), 0o644, epoch)
    _, pub_path = device_key_paths(data, Path(out_dir))
    log(f"builders: {len(builders)} ({', '.join(b.sshUser + '@' + b.label for b in builders)}); the device's key:")
    log(f"  {public}")
    log(f"  authorize it on each builder: kiosk builders authorize --key {pub_path} "
        f"(or append {pub_path.name} to the builder user's ~/.ssh/authorized_keys)")
    for b in builders:
        if not b.publicHostKey:
            log(f"builders: warning: {b.label} has no publicHostKey ({b.origin}); the device will not use it "
                f"until the spec pins its host key (ssh-keyscan -p {b.port} -t ed25519 {b.hostName})")


# ---------------------------------------------------------------- kiosk build --builder (the laptop)

def parse_target(text: str) -> tuple[str | None, str, int | None]:
    """[USER@]HOST[:PORT] (IPv6 as [ADDR]:PORT) -> (user, host, port)."""
    match = re.match(r"^(?:([a-z_][a-z0-9_.-]*)@)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*)(?::(\d{1,5}))?$",
                     text or "")
    if not match:
        raise UsageError(f"--builder {text!r}: give [USER@]HOST[:PORT], e.g. me@build-box or build-box:2222")
    user, host, port = match.groups()
    port_number = int(port) if port else None
    if port_number is not None and not 1 <= port_number <= 65535:
        raise UsageError(f"--builder {text!r}: the port must be 1-65535")
    return user, host.strip("[]"), port_number


def remote_build(args) -> int:
    """`kiosk build --builder HOST`: the builder runs `kiosk build` on this spec; the image, its .bmap,
    manifest.json and SBOM come back checksummed (the image sparse), then are renamed into place."""
    from kiosk.spec import load as specmod
    from kiosk.spec.commands import print_warnings

    path = Path(args.spec)
    spec = specmod.load(path)
    print_warnings(spec)
    text = path.read_text(encoding="utf-8")
    user, host, port = parse_target(args.builder)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    request = {"kiosk": PROTOCOL, "op": "build", "spec": text, "source": path.name,
               "verbose": bool(getattr(args, "verbose", False))}
    if names_builders(spec.data):
        private, public = device_key_paths(spec.data, out_dir)
        if private.is_file() and public.is_file():
            request["builderKey"] = {"private": private.read_text(), "public": public.read_text()}
    # KIOSK_SSH_COMMAND (like GIT_SSH_COMMAND): another ssh, or extra options, e.g. "ssh -i ~/.ssh/build_key"
    argv = [*shlex.split(os.environ.get("KIOSK_SSH_COMMAND") or "ssh"), "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={max(1, round(connect_timeout()))}",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4", "-o", "RequestTTY=no"]
    if port:
        argv += ["-p", str(port)]
    if user:
        argv += ["-l", user]
    argv += ["--", host, *remote_command()]
    where = f"{user + '@' if user else ''}{host}{':' + str(port) if port else ''}"
    print(f"==> building on {where}", file=sys.stderr, flush=True)
    started = time.monotonic()
    incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=out_dir))
    try:
        try:
            header, files = exchange(argv, request, incoming, relay=lambda line: print(line, file=sys.stderr,
                                                                                       flush=True),
                                     timeout=transfer_timeout())
        except BuilderFailure as failure:
            raise KioskError(f"builder {where} {failure.kind}: {failure.reason}; nothing was written") from None
        except Refused as exc:
            raise KioskError(f"REFUSED what {where} sent: {exc}; nothing was written") from None
        except KioskError as exc:
            if exc.exit_code == 2:
                raise UsageError(f"{where} refused the spec:\n{exc}") from None
            raise KioskError(f"the build on {where} failed: {exc}; nothing was written") from None
        image_name = header.get("image")
        placed = {}
        for name, file_path in sorted(files.items(), key=lambda kv: kv[0] == image_name):
            dest = out_dir / name
            if name.endswith(".builder"):
                os.chmod(file_path, 0o600)
            else:
                os.chmod(file_path, 0o644)
            os.replace(file_path, dest)
            placed[name] = dest
        manifest_path = placed.get("manifest.json")
        manifest = json.loads(manifest_path.read_text()) if manifest_path else {}
        if manifest:
            image = out_dir / Path(manifest["image"]).name
            manifest.update(image=str(image), bmap=str(image) + ".bmap",
                            sbom=str(out_dir / Path(manifest.get("sbom", "")).name), builtOn=where)
            from kiosk.image.pipeline import write_json_atomic
            write_json_atomic(manifest_path, manifest)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    image = out_dir / (image_name or "")
    print(f"{image}\n  sha256 {manifest.get('imageSha256', '')}\n  block map {image}.bmap\n"
          f"  built on {where} and fetched in {time.monotonic() - started:.0f}s (checksums verified); "
          f"write it with: kiosk flash {image} /dev/mmcblk0")
    return 0


# ---------------------------------------------------------------- kiosk builders check / authorize

def _default_spec(root: Path) -> str:
    if Path("nixiosk.json").is_file():
        return "nixiosk.json"
    current = Path(root) / "var/lib/kiosk/current/nixiosk.json"
    return str(current) if current.is_file() else "nixiosk.json"


def check_builder(b: Builder, key: Path | None, known_hosts: Path | None, tcp: tuple[str | None, float],
                  work: Path, config: str | None) -> dict:
    row = {"builder": f"{b.sshUser}@{b.label}", "hostName": b.hostName, "port": b.port, "sshUser": b.sshUser,
           "speedFactor": b.speedFactor, "systems": list(b.systems), "hostKeyPinned": bool(b.publicHostKey),
           "reachable": False, "ok": False, "error": None, "connectMs": None, "rttMs": None}
    problem, seconds = tcp
    if problem:
        row["error"] = f"unreachable: {problem}"
        return row
    row["reachable"] = True
    row["connectMs"] = round(seconds * 1000, 1)
    options = ssh_options(key, known_hosts if b.publicHostKey else None)
    argv = ssh_argv(b, options, config=config)
    started = time.monotonic()
    try:
        header, _ = exchange(argv, {"kiosk": PROTOCOL, "op": "probe"}, work, relay=lambda line: None,
                             timeout=60, key=key)
    except BuilderFailure as failure:
        row["error"] = f"{failure.kind}: {failure.reason}"
        return row
    except KioskError as exc:
        row["error"] = f"failed: {exc}"
        return row
    row["rttMs"] = round((time.monotonic() - started) * 1000, 1)
    for name in ("apt", "hostArchitecture", "architectures", "imageArchitectures", "freeBytes", "cpus", "load1",
                 "version"):
        row[name] = header.get(name)
    row["kioskVersion"] = row.pop("version")
    row["architectures"] = [a for a in row["architectures"] or [] if a in b.systems]
    row["ok"] = bool(row["architectures"])
    if not row["ok"]:
        row["error"] = "apt is not installed there" if not header.get("apt") else "none of its systems"
    return row


def cmd_check(args) -> int:
    from kiosk.spec import load as specmod
    from kiosk.spec.commands import print_warnings

    root = Path(args.root)
    spec = specmod.load(args.spec or _default_spec(root))
    print_warnings(spec)
    data = spec.data
    arch = device_architecture(data)
    builders = effective_builders(data)
    if not builders:
        raise UsageError(f"{spec.source}: names no builders (add \"builders\", or Nixiosk's \"localSystem\")")
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiosk-check-") as tmp:
        work = Path(tmp)
        known_hosts = work / "known_hosts"
        known_hosts.write_text(known_hosts_text(builders))
        probes = probe_all(builders, connect_timeout())
        results: list[dict | None] = [None] * len(builders)

        def run(i: int, b: Builder) -> None:
            key, config, note = _check_key(b, data, root, args)
            scratch = work / f"b{i}"
            scratch.mkdir()
            row = check_builder(b, key, known_hosts, probes[i], scratch, config)
            row["key"] = note
            row["buildsForDevice"] = row["ok"] and arch in row["architectures"] and bool(b.publicHostKey)
            results[i] = row

        threads = [threading.Thread(target=run, args=(i, b)) for i, b in enumerate(builders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rows = [r for r in results if r is not None]
    if args.json:
        json.dump({"deviceArchitecture": arch, "builders": rows}, sys.stdout, indent=2)
        print()
    else:
        print(f"{'BUILDER':30}  {'SPEED':>5}  {'STATUS':40}  {'ARCHITECTURES':26}  {'FREE':>9}  {'RTT':>7}")
        for r in rows:
            status = "ok" if r["ok"] else (r["error"] or "not usable")
            if r["ok"]:
                status += f" (kiosk {r.get('kioskVersion')}, {r.get('hostArchitecture')})"
                if not r["hostKeyPinned"]:
                    status += ", host key not pinned"
            free = _human(r["freeBytes"]) if r.get("freeBytes") is not None else ""
            rtt = f"{r['rttMs']:.0f} ms" if r.get("rttMs") is not None else ""
            speed = f"{r['speedFactor']:g}"
            print(f"{r['builder']:30}  {speed:>5}  {status:40}  {' '.join(r.get('architectures') or []):26}  "
                  f"{free:>9}  {rtt:>7}")
        usable = sum(1 for r in rows if r["buildsForDevice"])
        print(f"{data['hostName']} ({data['hardware']}, {arch}): {usable} of {len(rows)} builder(s) can build for it")
    return 0 if all(r["ok"] for r in rows) else 1


def _check_key(b: Builder, data: dict, root: Path, args) -> tuple[Path | None, str | None, str]:
    """The key `check` logs in with: -i, the image's key (--image-dir), the device's own, or the user's."""
    if args.identity:
        return Path(args.identity), "/dev/null", str(args.identity)
    if args.image_dir:
        private, _ = device_key_paths(data, Path(args.image_dir))
        if not private.is_file():
            raise UsageError(f"{private}: no builder key there (kiosk build makes it when the spec names builders)")
        return private, "/dev/null", str(private)
    device = root / b.sshKey.lstrip("/")
    if device.is_file() and os.access(device, os.R_OK):
        return device, "/dev/null", b.sshKey
    return None, None, "your own ssh keys"


def _serve_command() -> str:
    me = Path(sys.argv[0])
    if me.name == "kiosk" and me.is_file():
        return shlex.join([str(me.absolute()), "builder-serve"])
    found = shutil.which("kiosk")
    if found:
        return shlex.join([found, "builder-serve"])
    return shlex.join([sys.executable, "-m", "kiosk", "builder-serve"])


def cmd_authorize(args) -> int:
    from kiosk.spec.sshkeys import BadKey, parse_public_key

    if args.key == "-":
        line, where = sys.stdin.read().strip(), "stdin"
    elif args.key:
        where = args.key
        try:
            line = Path(args.key).read_text().strip()
        except OSError as exc:
            raise UsageError(f"{args.key}: {exc.strerror}") from None
    else:
        from kiosk.spec import load as specmod
        spec = specmod.load(args.spec or "nixiosk.json")
        _, pub = device_key_paths(spec.data, Path(args.image_dir))
        if not pub.is_file():
            raise UsageError(f"{pub}: not found; build the image first (kiosk build), or pass --key FILE")
        line, where = pub.read_text().strip(), str(pub)
    try:
        key = parse_public_key(line)
    except BadKey as why:
        raise UsageError(f"{where}: this key {why}") from None
    command = _serve_command()
    if '"' in command or "\n" in command:
        raise KioskError(f"cannot write a forced command for {command!r}")
    entry = key.line() if args.no_restrict else f'restrict,command="{command}" {key.line()}'
    target = Path(args.authorized_keys).expanduser() if args.authorized_keys else Path.home() / ".ssh/authorized_keys"
    if not target.parent.is_dir():
        target.parent.mkdir(mode=0o700, parents=True)
    lines = target.read_text().splitlines() if target.is_file() else []
    body = key.line().split()[1]
    kept, replaced = [], False
    for existing in lines:
        if body in existing.split():
            if existing == entry:
                print(f"{target}: {key_fingerprint(line)} is already authorized")
                return 0
            replaced = True
            continue
        kept.append(existing)
    kept.append(entry)
    tmp = target.with_name(f".{target.name}.kiosk-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, ("\n".join(kept) + "\n").encode())
    finally:
        os.close(fd)
    os.replace(tmp, target)
    print(f"{target}: {'updated' if replaced else 'authorized'} {key.comment or 'the key'} ({key_fingerprint(line)})"
          + ("" if args.no_restrict else f", limited to: {command}"))
    host_key = Path("/etc/ssh/ssh_host_ed25519_key.pub")
    if host_key.is_file():
        pinned = " ".join(host_key.read_text().split()[:2])
        print(f"pin this builder's host key in the spec's builders entry:\n  \"publicHostKey\": \"{pinned}\"")
    return 0


def cmd_serve(args) -> int:
    if args.probe:
        json.dump(probe(), sys.stdout, indent=2)
        print()
        return 0
    return serve(sys.stdin.buffer, sys.stdout.buffer, sys.stderr)


def register(sub) -> None:
    import argparse

    p = sub.add_parser("builders", help="remote builders: check them, authorize a device on one",
                       description="Remote builders resolve and fetch packages for small boards over SSH "
                                   "(and build images for `kiosk build --builder`).")
    bsub = p.add_subparsers(dest="builders_command", metavar="COMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    c = bsub.add_parser("check", help="is each builder of a spec reachable, what can it build, free disk, RTT",
                        description="For each builder of the spec: reachable or not, the architectures it can "
                                    "resolve packages for and build images for, free disk, round-trip time. Exit "
                                    "status 1 when any builder is not usable.")
    c.add_argument("spec", nargs="?", metavar="SPEC",
                   help="the spec (default: nixiosk.json, or the device's current one)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--image-dir", metavar="DIR", help="log in with the key kiosk build made for the device (in DIR)")
    c.add_argument("-i", "--identity", metavar="KEY", help="log in with this private key")
    c.add_argument("--root", default="/", help=argparse.SUPPRESS)
    c.set_defaults(func=cmd_check)

    a = bsub.add_parser("authorize", help="on a builder: let a device's key in (limited to kiosk builder-serve)",
                        description="Run on the builder, as the user the spec's sshUser names: append the device's "
                                    "builder key (<image>.builder.pub, from kiosk build) to ~/.ssh/authorized_keys, "
                                    "limited to `kiosk builder-serve` (restrict, forced command).")
    a.add_argument("spec", nargs="?", metavar="SPEC", help="the spec (default: nixiosk.json)")
    a.add_argument("--image-dir", default="out", metavar="DIR", help="where kiosk build wrote the image (default: out)")
    a.add_argument("--key", metavar="FILE", help="the public key file instead (- reads it from stdin)")
    a.add_argument("--authorized-keys", metavar="FILE", help="default: ~/.ssh/authorized_keys")
    a.add_argument("--no-restrict", action="store_true", help="no forced command (the key may run anything)")
    a.set_defaults(func=cmd_authorize)

    s = sub.add_parser("builder-serve", help="on a builder: answer one request from a device (run over ssh)",
                       description="Reads one JSON request on stdin (probe, packages, build) and answers on "
                                   "stdout; devices run it over ssh.")
    s.add_argument("--probe", action="store_true", help="print what this machine can do as a builder")
    s.set_defaults(func=cmd_serve)
