#!/usr/bin/env python3
"""Remote builders: seconds for a one-package change applied through a builder over ssh, against the
same change resolved and applied locally on the device harness.

Both paths end in the same `dpkg --install` into a device root (a directory with a dpkg database
made by dpkg); they differ in who runs apt:
  remote  the device asks its builders (fetch_from_builders, the `packages` request a device made
          before root slots sends; tests/builders_fixture.debs_from_builders): TCP probe, ssh to a real
          sshd on loopback (ed25519 keys, the device's key restricted to `kiosk builder-serve`), apt on
          the builder against the device's dpkg status, tar back, verify, dpkg --install;
  local   the same apt resolution (fetch_packages) run on the device itself, then dpkg --install:
          what a board that can build for itself does, without ssh.
Each run installs kiosk-test-hello (+ its arch:all dependency) and is undone with dpkg --purge.
The archive is tests/builders_fixture.py's, on loopback HTTP; --kib makes kiosk-test-hello carry
that many KiB of incompressible data. Also timed, for the fixed cost of asking a builder anything:
a bare ssh round trip (`true`), and `kiosk builder-serve` answering a probe locally (interpreter start).

--real also resolves htop for armel against an empty dpkg status from deb.debian.org (network) and
reports what compressing the payload with xz would save on real .debs (the device asks for an
uncompressed tar by default).

Needs root (sshd, dpkg --root). Usage: sudo .venv/bin/python bench/builders.py [--runs 5] [--kib 1024] [--real]
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--kib", type=int, default=1, help="size of kiosk-test-hello's payload (KiB)")
    parser.add_argument("--real", action="store_true", help="also measure xz on real armel .debs (network)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/builders.py needs root (sshd, dpkg --root)")

    tmp = Path(tempfile.mkdtemp(prefix="kiosk-bench-builders-"))
    os.environ["KIOSK_CACHE_DIR"] = str(tmp / "cache")
    os.environ["KIOSK_TEST_UNSIGNED_MIRROR"] = "1"  # the loopback test archive is unsigned

    from builders_fixture import debs_from_builders, dpkg_installed, init_dpkg, write_archive
    from fake_mirror import Server
    from sshd_harness import Device, keygen

    from kiosk.builders import apt, keys, select, ssh
    from kiosk.device import fetch
    from kiosk.spec.load import with_defaults

    (tmp / "archive").mkdir()
    debs = write_archive(tmp / "archive", arches=("armel",), payload_kib=args.kib)
    server = Server(tmp / "archive")
    (tmp / "keys").mkdir()
    host_pub = keygen(tmp / "keys/builder_host", "builder@bench")
    client_pub = keygen(tmp / "keys/client", "client@bench")
    spec = {"hostName": "bench", "hardware": "raspberryPi0", "authorizedKeys": [client_pub],
            "program": {"package": "kiosk-test-kiosk", "executable": "/usr/bin/kiosk-test-kiosk"},
            "debian": {"suite": "bookworm", "mirror": server.url,
                       "security": False, "updates": False}}   # the test archive has no -security/-updates
    (tmp / "builder").mkdir()
    builder = Device(tmp / "builder", spec, client_pub, tmp / "keys/builder_host",
                     env={"KIOSK_TEST_UNSIGNED_MIRROR": "1"})
    spec = with_defaults(dict(spec, builders=[{"hostName": "127.0.0.1", "port": builder.port,
                                               "publicHostKey": host_pub}]))
    root = tmp / "device"
    root.mkdir()
    init_dpkg(root, "armel", [debs[("kiosk-test-kiosk", "armel")]])
    keys.prepare_device_for_builders(root, spec, tmp / "out", lambda line: None)
    device_key = keys.ensure_device_key(root, keys.BUILDER_KEY, lambda line: None)  # as on the device
    subprocess.run([sys.executable, "-m", "kiosk", "builders", "authorize", "--key", f"{device_key}.pub",
                    "--authorized-keys", str(builder.tmp / "authorized_keys")], check=True, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wanted = ["kiosk-test-hello"]
    log_lines: list[str] = []

    def reset() -> None:
        subprocess.run(["dpkg", f"--root={root}", f"--admindir={root / 'var/lib/dpkg'}", "--log=/dev/null",
                        "--purge", "kiosk-test-hello", "kiosk-test-libhello"], check=True, capture_output=True)
        assert dpkg_installed(root) == {"kiosk-test-kiosk": "1.0"}

    def remote() -> None:
        with tempfile.TemporaryDirectory(dir=tmp) as work:
            assert debs_from_builders(root, spec, wanted, Path(work), log_lines.append) is not None, log_lines

    def local() -> None:
        request = fetch.package_request(root, spec, wanted)
        with tempfile.TemporaryDirectory(dir=tmp) as work:
            entries = apt.fetch_packages(request, Path(work), log_lines.append)
            fetch.install_debs(root, entries, wanted, log_lines.append)

    known = tmp / "known_hosts"
    known.write_text(select.known_hosts_text(select.effective_builders(spec)))

    def ssh_round_trip() -> None:
        """ssh in and run `true` (the client key, not restricted): the connection's own cost."""
        b = select.effective_builders(spec)[0]
        argv = ["ssh", "-F", "/dev/null", *[f"-o{k}={v}" for k, v in ssh.ssh_options(tmp / "keys/client", known)],
                "-p", str(b.port), "root@127.0.0.1", "true"]
        subprocess.run(argv, check=True, capture_output=True)

    def serve_start() -> None:
        """The builder's `kiosk builder-serve` answering a probe, without ssh (interpreter + imports + probe)."""
        subprocess.run([sys.executable, "-m", "kiosk", "builder-serve"], input=b'{"kiosk": 1, "op": "probe"}\n',
                       check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))

    def timed(fn, undo=None) -> list[float]:
        fn()  # warm-up: apt lists and the .deb cache filled, like a builder in use
        if undo:
            undo()
        out = []
        for _ in range(args.runs):
            started = time.monotonic()
            fn()
            out.append(time.monotonic() - started)
            if undo:
                undo()
        return out

    try:
        figures = {"cores": os.cpu_count(), "runs": args.runs, "packageKiB": args.kib,
                   "remote": timed(remote, reset), "local": timed(local, reset), "ssh": timed(ssh_round_trip),
                   "serve": timed(serve_start)}
        sent = [line for line in log_lines if "sending" in line]
        figures["payload"] = sent[-1] if sent else ""
        if args.real:
            figures["real"] = real_debs(tmp)
    finally:
        builder.close()
        server.close()
        shutil.rmtree(tmp, ignore_errors=True)
    for name in ("remote", "local", "ssh", "serve"):
        figures[name + "Median"] = round(statistics.median(figures[name]), 3)
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"cores: {figures['cores']}; runs: {args.runs} (after one warm-up); kiosk-test-hello payload "
          f"{args.kib} KiB + kiosk-test-libhello")
    print(f"  remote (builder over ssh, verify, dpkg): median {figures['remoteMedian']:.3f} s  "
          f"runs {' '.join(f'{v:.3f}' for v in figures['remote'])}")
    print(f"  local (apt on the device, dpkg):          median {figures['localMedian']:.3f} s  "
          f"runs {' '.join(f'{v:.3f}' for v in figures['local'])}")
    print(f"  ssh round trip (connect, auth, true):      median {figures['sshMedian']:.3f} s")
    print(f"  kiosk builder-serve probe, no ssh:         median {figures['serveMedian']:.3f} s")
    print(f"  {figures['payload'].strip()}")
    if args.real:
        r = figures["real"]
        print(f"  real armel .debs (htop against an empty status): {r['debs']} .debs, tar {r['tarBytes']} bytes; "
              f"xz -6: {r['xzBytes']} bytes ({r['xzSaved']:.1%} saved), compress {r['xzCompressSeconds']:.2f} s, "
              f"decompress {r['xzDecompressSeconds']:.2f} s here; resolve+download {r['fetchSeconds']:.1f} s")
        print(f"  apt resolving htop for armel with a cold cache of the real index ({r['indexBytes'] / 2**20:.0f} MiB "
              f"of Packages): {r['resolveSeconds']:.2f} s, max RSS {r['resolveMaxRssMiB']} MiB (work a device "
              f"with builders never does)")
    return 0


def real_debs(tmp: Path) -> dict:
    """What xz would save on real Debian .debs (their members are compressed already)."""
    from kiosk.builders import apt
    from kiosk.builders.wire import PROTOCOL
    from kiosk.core.run import environment

    os.environ.pop("KIOSK_TEST_UNSIGNED_MIRROR", None)
    work = tmp / "real"
    work.mkdir()
    req = {"kiosk": PROTOCOL, "op": "packages", "architecture": "armel", "foreignArchitectures": [],
           "suite": "bookworm", "mirror": "http://deb.debian.org/debian", "components": ["main"],
           "packages": ["htop"], "status": ""}
    started = time.monotonic()
    entries = apt.fetch_packages(req, work, lambda line: None)
    fetch = time.monotonic() - started
    # what the device no longer does: apt building its cache from the full armel index and resolving
    opts, base = apt.apt_options(req, work / "status")
    for cache in (base / "cache").glob("*.bin"):
        cache.unlink()
    timed = subprocess.run(["/usr/bin/time", "-f", "%M %e", "apt-get", "-q", "-s", *opts, "install", "htop"],
                           capture_output=True, text=True, env=environment(apt.APT_ENV))
    rss_kib, seconds = timed.stderr.strip().splitlines()[-1].split()
    lists = sum(p.stat().st_size for p in (base / "lists").glob("*Packages*"))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for e in entries:
            tar.add(e["path"], arcname=e["name"])
    data = raw.getvalue()
    started = time.monotonic()
    packed = lzma.compress(data, preset=6)
    compress = time.monotonic() - started
    started = time.monotonic()
    lzma.decompress(packed)
    decompress = time.monotonic() - started
    return {"debs": len(entries), "tarBytes": len(data), "xzBytes": len(packed),
            "xzSaved": 1 - len(packed) / len(data), "xzCompressSeconds": compress,
            "xzDecompressSeconds": decompress, "fetchSeconds": fetch,
            "resolveSeconds": float(seconds), "resolveMaxRssMiB": round(int(rss_kib) / 1024, 1),
            "indexBytes": lists}


if __name__ == "__main__":
    raise SystemExit(main())
