"""Tiny real Debian packages in a real (unsigned) archive, and a device root with a real dpkg database.

Packages (built with dpkg-deb, no maintainer scripts, so dpkg --root can install them into a
directory):
  kiosk-test-kiosk      <arch>  the spec's program, installed on the device from the start
  kiosk-test-libhello   all     Multi-Arch: foreign (see below)
  kiosk-test-hello      <arch>  Depends: kiosk-test-libhello
  kiosk-test-other      <arch>  Depends: kiosk-test-libhello

Why Multi-Arch: foreign on the arch:all library: on this x86-64 test host dpkg's native
architecture is compiled in (amd64), so in the device root the board's armel is a *foreign*
architecture and arch:all packages count as amd64; an armel package's dependency on a plain
arch:all package would then be unsatisfied, which it never is on a real armel device. M-A:
foreign makes the dependency hold in both places; apt (APT::Architecture=armel) treats it the same.

The archive: pool/main/*.deb, dists/<suite>/main/binary-<arch>/Packages(.xz) from
dpkg-scanpackages, and a Release with SHA256 sums but no signature: apt accepts it only with
[trusted=yes], which kiosk writes only when KIOSK_TEST_UNSIGNED_MIRROR=1 (tests only).
"""

from __future__ import annotations

import email.utils
import hashlib
import lzma
import subprocess
from pathlib import Path

PACKAGES = ("kiosk-test-kiosk", "kiosk-test-libhello", "kiosk-test-hello", "kiosk-test-other")
ARCHES = ("armel", "arm64", "amd64")


def build_deb(pool: Path, name: str, arch: str, version: str = "1.0", depends: str = "",
              multi_arch: str = "", payload_kib: int = 1) -> Path:
    src = pool.parent / "src" / f"{name}_{arch}"
    (src / "DEBIAN").mkdir(parents=True, exist_ok=True)
    share = src / "usr/share" / name
    share.mkdir(parents=True, exist_ok=True)
    (share / "hello.txt").write_text(f"hello from {name} {version} ({arch})\n")
    if payload_kib > 1:  # incompressible filler, for benchmarks
        (share / "filler.bin").write_bytes(hashlib.shake_256(name.encode()).digest(payload_kib * 1024))
    if name == "kiosk-test-kiosk":
        (src / "usr/bin").mkdir(parents=True, exist_ok=True)
        (src / "usr/bin" / name).write_text("#!/bin/sh\necho kiosk\n")
        (src / "usr/bin" / name).chmod(0o755)
    control = (f"Package: {name}\nVersion: {version}\nArchitecture: {arch}\n"
               "Maintainer: kiosk tests <tests@kiosk.invalid>\n"
               + (f"Depends: {depends}\n" if depends else "")
               + (f"Multi-Arch: {multi_arch}\n" if multi_arch else "")
               + f"Description: kiosk test package {name}\n")
    (src / "DEBIAN/control").write_text(control)
    out = pool / f"{name}_{version}_{arch}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(src), str(out)],
                   check=True, capture_output=True)
    return out


def build_packages(pool: Path, arches=ARCHES, payload_kib: int = 1) -> dict[tuple[str, str], Path]:
    pool.mkdir(parents=True, exist_ok=True)
    debs = {("kiosk-test-libhello", "all"): build_deb(pool, "kiosk-test-libhello", "all", multi_arch="foreign")}
    for arch in arches:
        debs[("kiosk-test-kiosk", arch)] = build_deb(pool, "kiosk-test-kiosk", arch)
        debs[("kiosk-test-hello", arch)] = build_deb(pool, "kiosk-test-hello", arch, depends="kiosk-test-libhello",
                                                     payload_kib=payload_kib)
        debs[("kiosk-test-other", arch)] = build_deb(pool, "kiosk-test-other", arch, depends="kiosk-test-libhello")
    return debs


def write_archive(root: Path, arches=ARCHES, suite: str = "bookworm", payload_kib: int = 1) -> dict:
    """root/pool/main/*.deb and root/dists/<suite>/...; returns the built .debs by (name, arch)."""
    debs = build_packages(root / "pool/main", arches, payload_kib)
    dist = root / "dists" / suite
    sums = []
    for arch in arches:
        rel = f"main/binary-{arch}"
        (dist / rel).mkdir(parents=True, exist_ok=True)
        text = subprocess.run(["dpkg-scanpackages", "-m", "-a", arch, "pool"], cwd=root, check=True,
                              capture_output=True, text=True).stdout
        (dist / rel / "Packages").write_text(text)
        (dist / rel / "Packages.xz").write_bytes(lzma.compress(text.encode()))
        for name in ("Packages", "Packages.xz"):
            data = (dist / rel / name).read_bytes()
            sums.append(f" {hashlib.sha256(data).hexdigest()} {len(data):8d} {rel}/{name}")
    date = email.utils.formatdate(1700000000, usegmt=True)
    (dist / "Release").write_text(
        f"Origin: kiosk-tests\nLabel: kiosk-tests\nSuite: {suite}\nCodename: {suite}\nDate: {date}\n"
        f"Architectures: {' '.join(arches)}\nComponents: main\nSHA256:\n" + "\n".join(sums) + "\n")
    return debs


def init_dpkg(root: Path, arch: str, preinstall: list[Path] = ()) -> None:
    """ROOT/var/lib/dpkg made by dpkg itself: status, info/, updates/, the board's architecture, and
    `preinstall` installed with dpkg --root."""
    admin = root / "var/lib/dpkg"
    (admin / "info").mkdir(parents=True, exist_ok=True)
    (admin / "updates").mkdir(exist_ok=True)
    (admin / "status").touch()
    (root / "var/log").mkdir(parents=True, exist_ok=True)
    dpkg = ["dpkg", f"--root={root}", f"--admindir={admin}", f"--log={root / 'var/log/dpkg.log'}"]
    native = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    if arch != native:
        subprocess.run([*dpkg, "--add-architecture", arch], check=True)
    if preinstall:
        subprocess.run([*dpkg, "--install", *map(str, preinstall)], check=True, capture_output=True)


def dpkg_installed(root: Path) -> dict[str, str]:
    """package -> version of what ROOT's dpkg database says is installed."""
    out = subprocess.run(["dpkg-query", f"--admindir={root / 'var/lib/dpkg'}", "-W", "-f",
                          "${Package}\t${Version}\t${db:Status-Abbrev}\n"], capture_output=True, text=True).stdout
    return {n: v for n, v, s in (line.split("\t") for line in out.splitlines()) if s.strip() == "ii"}


def debs_from_builders(root: Path, data: dict, packages: list[str], work: Path, log) -> list[dict] | None:
    """A device asking its builders in order (fetch_from_builders, the loop every system request takes)
    with the `packages` request a device made before root slots still sends, and what came installed
    with dpkg (install_debs, a self-building board's step). The .debs, None when no builder gave them."""
    from kiosk.device import fetch

    def debs(header: dict, files: dict, argv: list[str]) -> tuple[list[dict], str]:
        by_name = {f["name"]: f for f in header["files"]}
        entries = [dict(by_name[name], path=files[name]) for name in header.get("install") or list(by_name)]
        return entries, f"{len(entries)} .deb(s), checksums verified"

    request = fetch.package_request(root, data, packages)
    entries = fetch.fetch_from_builders(root, data, request, work, log, accept=debs)
    if entries is not None:
        fetch.install_debs(root, entries, list(request["packages"]), log)
    return entries
