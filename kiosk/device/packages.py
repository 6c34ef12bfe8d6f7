"""The Debian packages a new generation needs, installed BEFORE the switch, by whoever can install them.

An Installer installs packages into a device root: remote builders when the spec names them
(kiosk.device.fetch), apt-get on the running device otherwise, nothing for any other tree.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from kiosk.core.errors import KioskError
from kiosk.core.log import Log
from kiosk.core.run import run_lines
from kiosk.device import activation
from kiosk.spec.sources import apt_sources, sources_list


class Installer:
    """Installs Debian packages on the device; this one installs nothing (a tree that is not the device)."""

    name = "none"

    def install(self, root: Path, packages: list[str], spec: dict, log: Log) -> None:
        log(f"not installing {' '.join(packages)}: {root} is not a running device")


class AptInstaller(Installer):
    """apt-get on the running device, from the spec's mirror and suite (only ever with root "/")."""

    name = "apt"

    def install(self, root, packages, spec, log):
        if Path(root).resolve() != Path("/"):
            raise KioskError("apt-get can only install packages on the running device (root /)")
        sources = sources_list(apt_sources(spec.get("debian", {})))
        env = {"DEBIAN_FRONTEND": "noninteractive", "APT_LISTCHANGES_FRONTEND": "none"}
        with tempfile.TemporaryDirectory(prefix="kiosk-apt-") as tmp:
            (Path(tmp) / "sources.list").write_text(sources)
            (Path(tmp) / "parts").mkdir()
            opts = ["-o", f"Dir::Etc::SourceList={tmp}/sources.list", "-o", f"Dir::Etc::SourceParts={tmp}/parts",
                    "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]
            clock_behind = []

            def show(line: str) -> None:
                if "is not valid yet" in line:   # the Release file's Date is in the device's future
                    clock_behind.append(line)
                log(f"apt: {line}")

            for what, argv in (("updating the package lists", ["apt-get", *opts, "update"]),
                               (f"installing {' '.join(packages)}",
                                ["apt-get", *opts, "install", "-y", "--no-install-recommends", *packages])):
                try:
                    run_lines(argv, show, env=env, what=what, tail=5, important=lambda line: line.startswith("E:"))
                except KioskError as exc:
                    if not clock_behind:
                        raise
                    raise KioskError(f"{what}: the device's clock is behind the Debian archive's ({clock_behind[0]})",
                                     hint="a Raspberry Pi has no real-time clock: let systemd-timesyncd reach an "
                                          "NTP server (timedatectl status), then push again") from exc


def default_installer(root: Path, spec: dict, activator: activation.Activator | None = None):
    """Remote builders when the spec names them (they install into any root with dpkg --root, so tests
    run them for real); else, in tests, the recording activator, which records installs too (the hooks
    run in a separate process that selects it with KIOSK_ACTIVATOR); else apt on the running device;
    else nothing. Whatever it returns has a `name` and install(root, packages, spec, log)."""
    if spec.get("builders") or (spec.get("localSystem") or {}).get("hostName"):
        from kiosk.device.fetch import package_installer
        return package_installer(spec)
    if isinstance(activator, activation.RecordingActivator):
        return activator
    if Path(root).resolve() != Path("/"):
        return Installer()
    return AptInstaller()


def ensure_packages(root: Path, old_packages, new_packages, spec: dict, log: Log, installer=None) -> list[str]:
    """Install the packages the new generation adds, BEFORE switching; returns them.

    Packages the new spec no longer names are left installed and simply not referenced: a
    rollback to the previous generation then needs no package work, and nothing the running
    system uses disappears under it. Not atomic (apt is not): a failure leaves whatever apt
    managed to install, which the current generation does not reference.
    """
    added = sorted(set(new_packages) - set(old_packages))
    removed = sorted(set(old_packages) - set(new_packages))
    if removed:
        log(f"no longer named (left installed, not used): {' '.join(removed)}")
    if not added:
        return []
    installer = installer or default_installer(root, spec)
    log(f"installing with {installer.name}: {' '.join(added)}")
    installer.install(Path(root), added, spec, log)
    return added
