"""The image's bill of materials: SPDX 2.3 JSON, one package per installed Debian package, with its purl.

The same SBOM goes beside the image and into its root file system (SYSTEM_SBOM), with the system's
manifest (SYSTEM_MANIFEST: sources, epoch, packages): every root slot says what it holds, whichever way
it was written (flashed, `kiosk update`, a push's bundle), since the slot is the image's root.
"""

from __future__ import annotations

import os
from pathlib import Path

from kiosk import __version__
from kiosk.core.files import write_json

SYSTEM_DIR = "/usr/share/kiosk"
SYSTEM_MANIFEST = f"{SYSTEM_DIR}/system.json"
SYSTEM_SBOM = f"{SYSTEM_DIR}/system.spdx.json"


def spdx_sbom(name: str, packages: list[dict], created: str, namespace_seed: str) -> dict:
    """SPDX 2.3 JSON: one package per installed Debian package, with its purl."""
    doc_packages = []
    for pkg in sorted(packages, key=lambda p: (p["name"], p["architecture"])):
        ident = f"SPDXRef-deb-{pkg['name']}-{pkg['architecture']}".replace("+", "plus").replace("_", "-")
        entry = {
            "SPDXID": ident, "name": pkg["name"], "versionInfo": pkg["version"],
            "downloadLocation": "NOASSERTION", "filesAnalyzed": False,
            "supplier": "Organization: Debian",
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": f"pkg:deb/debian/{pkg['name']}@{pkg['version']}"
                                                  f"?arch={pkg['architecture']}"}],
        }
        if pkg.get("source") and pkg["source"] != pkg["name"]:
            entry["sourceInfo"] = f"built from Debian source package {pkg['source']}"
        doc_packages.append(entry)
    return {
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT", "name": name,
        "documentNamespace": f"https://kiosk.invalid/spdx/{name}-{namespace_seed[:16]}",
        "creationInfo": {"created": created, "creators": [f"Tool: kiosk-{__version__}"]},
        "packages": doc_packages,
        "relationships": [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                           "relatedSpdxElement": p["SPDXID"]} for p in doc_packages],
    }


def package_dicts(packages) -> list[dict]:
    """rootfs.installed_packages' (name, version, architecture, source) rows as the manifest lists them."""
    return [{"name": n, "version": v, "architecture": a, "source": src} for n, v, a, src in packages]


def created_at(epoch: int) -> str:
    import time
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def write_system_files(root: Path, plan, name: str, packages: list[dict], *, epoch: int, seed: str) -> None:
    """The slot's own manifest and SBOM in the tree `root` (mode 0644, mtime the epoch)."""
    manifest = {"kioskVersion": __version__, "architecture": plan.architecture, "suite": plan.suite,
                "sources": [f"{mirror} {suite}" for mirror, suite in plan.sources], "sourceDateEpoch": epoch,
                "packageKey": plan.package_key, "packages": packages}
    directory = Path(root) / SYSTEM_DIR.lstrip("/")
    directory.mkdir(parents=True, exist_ok=True)
    for path, data in ((SYSTEM_MANIFEST, manifest), (SYSTEM_SBOM, spdx_sbom(name, packages, created_at(epoch), seed))):
        target = Path(root) / path.lstrip("/")
        write_json(target, data)   # as the SBOM beside the image is written: the same bytes
        os.utime(target, (epoch, epoch))
    os.utime(directory, (epoch, epoch))
