"""A tiny Debian archive served over real HTTP, for tests that check package names (and, for a security or
updates suite, versions) offline."""

from __future__ import annotations

import functools
import http.server
import lzma
import threading
from pathlib import Path

COMMON = ["cog", "epiphany-browser", "foot", "htop", "busybox", "kodi", "retroarch", "cage", "exim4-daemon-light",
          "raspi-firmware", "firmware-brcm80211", "python3-zeroconf"]
ARMV7_PLUS = ["chromium", "firefox-esr"]
ARCHES = {"armel": COMMON, "armhf": COMMON + ARMV7_PLUS, "arm64": COMMON + ARMV7_PLUS,
          "amd64": COMMON + ARMV7_PLUS}


def write_mirror(root: Path, suite: str = "bookworm") -> None:
    for arch, names in ARCHES.items():
        write_suite(root, suite, arch, {name: "1.0-1" for name in names})


def write_suite(root: Path, suite: str, arch: str, versions: dict[str, str | list[str]],
                component: str = "main") -> None:
    """dists/SUITE/COMPONENT/binary-ARCH/Packages.xz listing each package at its version(s): a suite such
    as bookworm-security carrying a newer version of an installed package."""
    stanzas = []
    for name, listed in versions.items():
        for version in [listed] if isinstance(listed, str) else listed:
            stanza = f"Package: {name}\nVersion: {version}\nArchitecture: {arch}\n"
            if name == "exim4-daemon-light":
                stanza += "Provides: mail-transport-agent\n"
            stanzas.append(stanza)
    directory = root / "dists" / suite / component / f"binary-{arch}"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Packages.xz").write_bytes(lzma.compress("\n".join(stanzas).encode()))


def dpkg_status(packages) -> str:
    """/var/lib/dpkg/status of these (name, version, architecture) packages, as dpkg writes it; one package
    removed (config files left), which dpkg-query does not count as installed."""
    stanzas = [f"Package: {name}\nStatus: install ok installed\nMaintainer: x <x@example.org>\n"
               f"Architecture: {arch}\nVersion: {version}\nDescription: {name}\n" for name, version, arch in packages]
    stanzas.append("Package: gone\nStatus: deinstall ok config-files\nMaintainer: x <x@example.org>\n"
                   "Architecture: arm64\nVersion: 0.1-1\nDescription: gone\n")
    return "\n".join(stanzas)


class Server:
    """The archive at self.url; self.requests lists every path asked for, in order."""

    def __init__(self, root: Path):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.requests = self.httpd.requests = []
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/debian"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def send_head(self):
        self.server.requests.append(self.path.removeprefix("/debian"))
        return super().send_head()

    def translate_path(self, path):
        return super().translate_path(path.removeprefix("/debian"))

    def log_message(self, *args):
        pass
