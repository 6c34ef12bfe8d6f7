"""The device's side of its builders: ask them in order for what it needs (its new system, kiosk.device.system)
and take the first answer that checks out; and the dpkg steps of a board that builds its system itself
(kiosk.device.selfbuild): what to ask apt for, installed with dpkg all at once, no network inside dpkg."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from kiosk.builders.apt import COMPONENTS
from kiosk.builders.client import exchange
from kiosk.builders.keys import device_public_key, ensure_device_key
from kiosk.builders.select import ARCHITECTURES, device_architecture, effective_builders, \
    known_hosts_text, spec_data
from kiosk.builders.ssh import BuilderFailure, connect_timeout, probe_all, ssh_argv, ssh_options, transfer_timeout
from kiosk.builders.wire import PROTOCOL, BadAnswer
from kiosk.core.errors import KioskError
from kiosk.core.paths import setting
from kiosk.core.run import run, run_lines
from kiosk.spec.sources import apt_sources


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


def fetch_from_builders(root: Path, data: dict, request: dict, work: Path, log, accept):
    """Try the builders in order; the first answer `accept(header, files, argv)` takes wins: what it returns
    (with a description for the log), else BadAnswer and the next builder (argv reaches the same builder again,
    while work lasts). None when no builder could."""
    arch = request["architecture"]
    candidates = _candidates(data, arch, log)
    if not candidates:
        log("no builder the device can use")
        return None
    known_hosts = work / "known_hosts"
    known_hosts.write_text(known_hosts_text(candidates))
    timeout = connect_timeout()
    probes = probe_all(candidates, timeout)
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
