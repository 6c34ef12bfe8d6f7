"""The image's bill of materials: SPDX 2.3 JSON, one package per installed Debian package, with its purl."""

from __future__ import annotations

from kiosk import __version__


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
