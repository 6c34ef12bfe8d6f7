"""Where an image and its device take Debian packages from: the spec's suite, its security suite and
its updates suite.

One answer for every apt that works for a device: mmdebstrap building the image (kiosk.image.rootfs),
the sources.list it leaves on the device, apt on a device that builds its system itself (kiosk.device.selfbuild) and
a builder resolving packages for it (kiosk.builders.apt). Debian publishes its security fixes only in
`<suite>-security` (on its own mirror) and its stable updates in `<suite>-updates`: an image built from
the suite alone carries none of them. A frozen appliance may turn either off in the spec
(`debian.security`, `debian.updates`).
"""

from __future__ import annotations

from urllib.parse import urlsplit

COMPONENTS = ("main", "non-free-firmware")
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
# Suites Debian publishes no security or updates suite for.
NO_SECURITY_SUITES = ("sid", "unstable", "experimental", "rc-buggy")


def apt_sources(debian: dict) -> list[tuple[str, str]]:
    """(mirror, suite) pairs in the order apt reads them, from a spec's `debian` section.

    Missing fields take the schema's defaults (security and updates on), so a spec written before the
    fields existed gets the security fixes too.
    """
    mirror = debian.get("mirror") or "http://deb.debian.org/debian"
    suite = debian.get("suite") or "bookworm"
    sources = [(mirror, suite)]
    if suite in NO_SECURITY_SUITES:
        return sources
    if debian.get("security", True):
        sources.append((debian.get("securityMirror") or DEFAULT_SECURITY_MIRROR, f"{suite}-security"))
    if debian.get("updates", True):
        sources.append((mirror, f"{suite}-updates"))
    return sources


def sources_list(sources, *, options: str = "", components=COMPONENTS) -> str:
    """sources.list lines for (mirror, suite) pairs; options e.g. "[arch=armel signed-by=...] "."""
    return "".join(f"deb {options}{mirror} {suite} {' '.join(components)}\n" for mirror, suite in sources)


def unsigned_allowed(mirror: str) -> bool:
    """Tests only (KIOSK_TEST_UNSIGNED_MIRROR=1): a mirror on this machine's loopback may be an unsigned test
    archive ([trusted=yes]); never another mirror, so no cached base of a real archive is built unchecked."""
    from kiosk.core.paths import setting

    try:
        host = urlsplit(mirror).hostname
    except ValueError:
        return False
    return setting("KIOSK_TEST_UNSIGNED_MIRROR") == "1" and host in ("127.0.0.1", "localhost", "::1")
