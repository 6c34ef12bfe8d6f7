"""Where the project's data files (schemas/, hardware/, hooks/) live.

In a source checkout they sit beside the package; on a device (and in an
installed copy) they are under /usr/share/kiosk. KIOSK_DATA_DIR overrides both.
"""

from __future__ import annotations

import os
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent
_INSTALLED = Path("/usr/share/kiosk")


def data_dir() -> Path:
    override = os.environ.get("KIOSK_DATA_DIR")
    if override:
        return Path(override)
    if (_CHECKOUT / "schemas").is_dir():
        return _CHECKOUT
    return _INSTALLED


def schemas_dir() -> Path:
    return data_dir() / "schemas"


def hardware_dir() -> Path:
    return data_dir() / "hardware"


def hooks_dir() -> Path:
    return data_dir() / "hooks"


def cache_dir() -> Path:
    """Downloads and built root filesystems; KIOSK_CACHE_DIR or XDG cache."""
    override = os.environ.get("KIOSK_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kiosk"
