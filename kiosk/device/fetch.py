"""The device: install what a builder sent. Packages are resolved and fetched by a remote builder
(or, on a board that can build for itself, by apt on the device), verified, and installed with dpkg
all at once; no resolution and no network happen inside dpkg."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path

from kiosk.builders.apt import COMPONENTS, fetch_packages
from kiosk.builders.client import exchange
from kiosk.builders.keys import device_public_key, ensure_device_key
from kiosk.builders.select import ARCHITECTURES, board_of, device_architecture, effective_builders, \
    known_hosts_text, spec_data
from kiosk.builders.ssh import BuilderFailure, connect_timeout, probe_all, ssh_argv, ssh_options, transfer_timeout
from kiosk.builders.wire import PROTOCOL, BadAnswer
from kiosk.core.errors import KioskError
from kiosk.core.files import human_size
from kiosk.core.paths import setting
from kiosk.core.run import run, run_lines
from kiosk.device.packages import Installer
from kiosk.spec.sources import apt_sources

START_A_BUILDER = "start a builder, see kiosk builders check"


def device_status(root: Path) -> str:
    path = Path(root) / "var/lib/dpkg/status"
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise KioskError(f"{path}: no dpkg database on this device") from None


def _on_device(root: Path) -> bool:
    return Path(root).resolve() == Path("/")


def _dpkg_root_args(root: Path) -> list[str]:
    root = Path(root)
    if _on_device(root):
        return []
    logfile = root / "var/log/dpkg.log" if (root / "var/log").is_dir() else Path("/dev/null")
    return [f"--root={root}", f"--admindir={root / 'var/lib/dpkg'}", f"--log={logfile}"]


def _admindir(root: Path) -> list[str]:
    return [] if _on_device(root) else ["--admindir", str(Path(root) / "var/lib/dpkg")]


def foreign_architectures(root: Path, arch: str) -> list[str]:
    """The device's extra dpkg architectures (not its own, and not the dpkg binary's of a test host)."""
    try:
        out = run(["dpkg", *_admindir(root), "--print-foreign-architectures"], check=False).stdout.split()
        native = run(["dpkg", "--print-architecture"], check=False).stdout.strip()
    except KioskError:  # no dpkg here
        return []
    return sorted({a for a in out if a in ARCHITECTURES and a not in (arch, native)})


def package_request(root: Path, spec, packages) -> dict:
    data = spec_data(spec)
    arch = device_architecture(data)
    compression = setting("KIOSK_BUILDER_COMPRESSION", "none")
    return {"kiosk": PROTOCOL, "op": "packages", "architecture": arch,
            "foreignArchitectures": foreign_architectures(root, arch),
            "suite": data["debian"]["suite"], "mirror": data["debian"]["mirror"], "components": list(COMPONENTS),
            "sources": [list(s) for s in apt_sources(data["debian"])],
            "packages": sorted(set(packages)), "status": device_status(root),
            "compression": compression if compression in ("none", "xz") else "none"}


def check_debs(entries: list[dict], arches: set[str]) -> None:
    """Each .deb says (dpkg-deb --field) what the manifest says it is, for this device."""
    for entry in entries:
        proc = run(["dpkg-deb", "--field", entry["path"], "Package", "Version", "Architecture"], check=False)
        fields = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
        if proc.returncode != 0:
            raise BadAnswer(f"{entry['name']} is not a Debian package ({proc.stderr.strip()[-200:]})")
        got = (fields.get("Package"), fields.get("Version"), fields.get("Architecture"))
        want = (entry.get("package"), entry.get("version"), entry.get("architecture"))
        if got != want:
            raise BadAnswer(f"{entry['name']} is {got[0]} {got[1]} ({got[2]}), the manifest says "
                            f"{want[0]} {want[1]} ({want[2]})")
        if got[2] not in arches | {"all"}:
            raise BadAnswer(f"{entry['name']} is for {got[2]}, this device is {'/'.join(sorted(arches))}")


def install_debs(root: Path, entries: list[dict], wanted: list[str], log) -> None:
    """dpkg --install every .deb at once (dpkg configures them in dependency order); then check."""
    root = Path(root)
    if entries:
        log(f"dpkg --install {' '.join(e['name'] for e in entries)}")
        run_lines(["dpkg", "--install", *_dpkg_root_args(root), "--force-confdef", "--force-confold",
                   *[e["path"] for e in entries]], lambda line: log(f"dpkg: {line}"),
                  env={"DEBIAN_FRONTEND": "noninteractive"}, tail=5, important=lambda line: "error" in line)
    proc = run(["dpkg-query", *_admindir(root), "-W", "-f", "${Package}\t${Version}\t${db:Status-Abbrev}\n",
                *wanted], check=False)
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


class BuilderInstaller(Installer):
    """Packages resolved and fetched by a remote builder, verified and installed with dpkg."""

    name = "builders"

    def __init__(self, spec=None):
        self.spec = spec

    def install(self, root, packages, spec, log) -> None:
        data = spec_data(spec if spec is not None else self.spec)
        root = Path(root)
        board = board_of(data)
        if board is None:
            raise KioskError(f"unknown board {data.get('hardware')!r}")
        request = package_request(root, data, packages)
        wanted = f"{' '.join(request['packages'])} for {request['architecture']}"
        with _incoming(root) as work:
            entries = fetch_from_builders(root, data, request, work, log)
            if entries is None:
                if board.get("canBuildItself") and not data.get("allowLocalBuild", True):
                    raise KioskError(f"no builder could provide {wanted} and allowLocalBuild is false; "
                                     "nothing was installed", hint=START_A_BUILDER)
                if not board.get("canBuildItself"):
                    raise KioskError(f"no builder could provide {wanted}; nothing was installed (a {board['name']} "
                                     "cannot resolve packages itself)", hint=START_A_BUILDER)
                log(f"{board['name']} can build for itself: resolving with apt on the device")
                entries = fetch_packages(request, work, log)
                for entry in entries:
                    local = work / entry["name"]
                    shutil.copyfile(entry["path"], local)
                    entry["path"] = local
            install_debs(root, entries, list(request["packages"]), log)


def package_installer(spec) -> Installer:
    return BuilderInstaller(spec)


def _flat(exc: Exception) -> str:
    """A failure's lines as one log line ("...: E: a | E: b")."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:1] + [" | ".join(lines[1:])] if len(lines) > 1 else lines)


def _candidates(data: dict, arch: str, log) -> list:
    """The builders this device may use for arch: those that build it and whose host key the spec pins."""
    found = []
    for b in effective_builders(data):
        if arch not in b.systems:
            log(f"builder {b.label} skipped: its systems ({' '.join(b.systems)}) do not include {arch}")
        elif not b.publicHostKey:
            log(f"builder {b.label} skipped: the spec pins no host key for it ({b.origin}/publicHostKey; "
                f"get it with: ssh-keyscan -p {b.port} -t ed25519 {b.hostName})")
        else:
            found.append(b)
    return found


def _debs(arches: set[str]):
    """The answer to a packages request: the .debs in install order, each checked (dpkg-deb) against the manifest."""
    def accept(header: dict, files: dict[str, Path], argv: list[str]) -> tuple[list[dict], str]:
        entries = []
        by_name = {f["name"]: f for f in header["files"]}
        for name in header.get("install") or list(by_name):
            if name not in files:
                raise BadAnswer(f"the install list names {name!r}, which was not sent")
            entries.append(dict(by_name[name], path=files[name]))
        check_debs(entries, arches)
        return entries, f"{len(entries)} .deb(s), {human_size(sum(e['size'] for e in entries))}, checksums verified"
    return accept


def fetch_from_builders(root: Path, data: dict, request: dict, work: Path, log, accept=None):
    """Try the builders in order; the first answer `accept(header, files, argv)` takes wins: what it returns
    (with a description for the log), else BadAnswer and the next builder (argv reaches the same builder again,
    while work lasts). Without accept: the .debs of a packages request. None when no builder could."""
    arch = request["architecture"]
    candidates = _candidates(data, arch, log)
    if not candidates:
        log("no builder the device can use")
        return None
    known_hosts = work / "known_hosts"
    known_hosts.write_text(known_hosts_text(candidates))
    timeout = connect_timeout()
    probes = probe_all(candidates, timeout)
    accept = accept or _debs({arch, *request.get("foreignArchitectures", [])})
    for i, b in enumerate(candidates):
        after = f"trying {candidates[i + 1].label}..." if i + 1 < len(candidates) else "no builder left"
        problem, _ = probes[i]
        if problem:
            log(f"builder {b.label} unreachable ({problem}); {after}")
            continue
        try:
            key = ensure_device_key(root, b.sshKey, log, comment=f"kiosk-builder@{data['hostName']}")
            argv = ssh_argv(b, ssh_options(key, known_hosts, timeout))
            incoming = work / f"from-{i}"
            incoming.mkdir()
            started = time.monotonic()
            header, files = exchange(argv, dict(request, maxJobs=b.maxJobs), incoming,
                                     relay=lambda line, b=b: log(f"{b.label}: {line}"),
                                     timeout=transfer_timeout(), key=key)
            result, said = accept(header, files, argv)
            log(f"builder {b.label}: {said}, in {time.monotonic() - started:.1f} s")
            return result
        except BuilderFailure as failure:
            log(f"builder {b.label} {failure.kind} ({failure}); {after}")
            if failure.reason.startswith("it does not accept this device's key"):
                with contextlib.suppress(KioskError, OSError):
                    log(f"authorize this device there (as {b.sshUser}): echo '{device_public_key(key)}' | "
                        "kiosk builders authorize --key -")
        except BadAnswer as exc:
            log(f"builder {b.label} REFUSED: {exc}; nothing from it is used; {after}")
        except KioskError as exc:
            log(f"builder {b.label} failed ({_flat(exc)}); {after}")
        with contextlib.suppress(OSError):
            shutil.rmtree(work / f"from-{i}")
    return None
