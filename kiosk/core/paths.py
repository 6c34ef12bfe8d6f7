"""Where things are, and the KIOSK_* settings read from the environment: in one place, documented.

Data files (schemas/, hardware/, hooks/) sit beside the package in a source checkout and under
/usr/share/kiosk on a device (or an installed copy); KIOSK_DATA_DIR overrides both. Paths on a
device are relative to its root (`root / STATE`), so the same code serves a tree being built, a
test harness (KIOSK_ROOT) and the running device ("/").
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

from kiosk.core.errors import KioskError, UsageError, one_line
from kiosk.core.inputs import file_kind

_CHECKOUT = Path(__file__).resolve().parent.parent.parent
_INSTALLED = Path("/usr/share/kiosk")

# ---------------------------------------------------------------- on a device (relative to its root)
STATE = "var/lib/kiosk"                              # generations, pointers, journal, push log
REPO = "etc/kiosk/configuration.git"                 # what `git push` reaches
DEVICE_PYTHON_DIR = "usr/lib/python3/dist-packages/kiosk"
DEVICE_DATA_DIR = "usr/share/kiosk"
# The device's key for its builders (absolute): kiosk's state, which on A/B boards is the data partition's, so
# the key survives a switch of root slot. Until 2026-12 it was LEGACY_BUILDER_KEY, in the root, which a new slot
# replaced (its builders then refused the new key it made); keys.ensure_device_key moves it.
BUILDER_KEY = "/var/lib/kiosk/builder_ed25519"
LEGACY_BUILDER_KEY = "/etc/kiosk/builder_ed25519"
BUILDERS_KNOWN_HOSTS = "/etc/kiosk/builders_known_hosts"
BUILDERS_SSH_CONFIG = "/etc/kiosk/builders_ssh_config"

# What must survive a switch of root slot (notes/ab-update.md) lives on the data partition,
# mounted at DATA_MOUNT and bound where the system expects it (kiosk's initramfs mounts all of it before
# systemd starts, so PID 1 already reads the generation's units and hostname; fstab names them too).
DATA_MOUNT = "/data"
DATA_LABEL = "KIOSKDATA"
DATA_BINDS = (("kiosk/state", "/var/lib/kiosk"),                              # (on the data fs, bound at)
              ("kiosk/configuration.git", "/etc/kiosk/configuration.git"),
              ("log/journal", "/var/log/journal"))   # the logs of every slot's boots, kept across switches
# RAUC's casync chunk store on a device: the address its system.conf names, where `kiosk update` forwards its
# store (ssh -R) and a push's relay serves the builder's (kiosk.builders.chunkstore).
RAUC_CHUNK_PORT = 7464
RAUC_CHUNK_STORE = f"http://127.0.0.1:{RAUC_CHUNK_PORT}/store"
# A board that builds its own new system (kiosk.device.selfbuild) signs it with a key of its own, kept in kiosk's
# state (0700; the key 0600); its certificate is the one file of RAUC's keyring directory on the data partition,
# which every slot's system.conf names beside the user's certificate, so the device trusts it whatever slot runs.
DEVICE_BUILD_KEY = "/var/lib/kiosk/build-key"
DEVICE_KEYRING = "/data/rauc/keyring"
DATA_HOST_KEYS = "/data/ssh"     # `ssh-keygen -A -f` prefix: the host keys are /data/ssh/etc/ssh/ssh_host_*

# ---------------------------------------------------------------- the settings
# Every KIOSK_* variable kiosk reads, and what it does. Those marked "tests" are never set on a real
# device or builder: they let the test suite reach a state it could not reach otherwise.
SETTINGS = {
    "KIOSK_DATA_DIR": "where schemas/, hardware/ and hooks/ are",
    "KIOSK_CACHE_DIR": "downloads, root filesystems and kiosk run's copies (default ~/.cache/kiosk)",
    "KIOSK_ROOT": "the device root the hooks and device commands work on (default /)",
    "KIOSK_OFFLINE": "1: never fetch the archive's package index (validation skips package look-ups)",
    "KIOSK_ARCHIVE_TIMEOUT": "seconds fetching the archive's package index may take in all (default 120)",
    "KIOSK_MMDEBSTRAP_MODE": "force mmdebstrap's --mode (root, unshare, ...)",
    "KIOSK_ACTIVATOR": "how a switch tells the service manager: systemd (default on a device) or none",
    "KIOSK_HEALTH_SECONDS": "how long a new generation must stay healthy before it is kept",
    "KIOSK_HEALTH_START_SECONDS": "how long cage may take to start the program after a switch (default 180)",
    "KIOSK_SLOT_COMMIT_SECONDS": "how long a newly booted root slot may take to come up healthy (default 600)",
    "KIOSK_UPDATE_BOOT_SECONDS": "how long kiosk update waits for the device to come back after its reboot (default 900)",
    "KIOSK_LOCK_TIMEOUT": "seconds a push or switch waits for the device lock",
    "KIOSK_KEEP_GENERATIONS": "how many generations pruning keeps",
    "KIOSK_BUILDER_CONNECT_TIMEOUT": "seconds to reach a builder's ssh port",
    "KIOSK_BUILDER_TIMEOUT": "seconds one builder request may take",
    "KIOSK_BUILDER_COMMAND": "the command run on a builder (default: kiosk builder-serve)",
    "KIOSK_BUILDER_COMPRESSION": "compression ssh uses towards a builder",
    "KIOSK_SSH_COMMAND": "the ssh client kiosk build --builder, screenshot and other device commands run (default: ssh)",
    "KIOSK_SSH_CONNECT_TIMEOUT": "seconds ssh may take to reach a kiosk (default 15)",
    "KIOSK_TEST_CRASH_AT": "tests: SIGKILL the switch at this step",
    "KIOSK_TEST_UNSIGNED_MIRROR": "tests: 1 makes apt trust an unsigned mirror",
    "KIOSK_BUILDER_TEST_CORRUPT": "tests: the builder damages its answer (payload or deb)",
}


def setting(name: str, default: str | None = None) -> str | None:
    """A KIOSK_* variable's value (empty counts as unset)."""
    if name not in SETTINGS:
        raise KeyError(f"{name} is not a kiosk setting (add it to paths.SETTINGS)")
    return os.environ.get(name) or default


def number_setting(name: str, default: float, *, least: float | None = None, above: bool = False,
                   whole: bool = False) -> float:
    """A numeric KIOSK_* variable, finite (nan would never be reached, inf never ends), at least `least`
    (or above it), a whole number if asked; anything else is the user's error, said as such."""
    text = setting(name)
    if text is None:
        return float(default)
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if whole:
        what, unit = f"a whole number of at least {least:g}", "a count"
    elif least is None:
        what, unit = "a number", "seconds"
    else:
        what = f"a number of seconds above {least:g}" if above else f"a number of seconds, {least:g} or more"
        unit = "seconds"
    if (not math.isfinite(value) or (whole and not value.is_integer())
            or (least is not None and (value <= least if above else value < least))):
        raise KioskError(f"{name}={text!r} is not {what}", hint=f"unset it or give {unit}, e.g. {name}={default:g}")
    return value


# ---------------------------------------------------------------- data files and the cache

def data_dir() -> Path:
    override = setting("KIOSK_DATA_DIR")
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
    override = setting("KIOSK_CACHE_DIR")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kiosk"


def scratch_dir() -> Path:
    """Where a build keeps small, short-lived trees (the image build's sparse tree: tens of MB, thousands of
    directories): RAM (/dev/shm) when it is there and writable, where making and removing them takes a
    fifth of the time; else the cache's tmp/."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm
    tmp = cache_dir() / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return tmp


def deb_cache_dir() -> Path:
    """Downloaded .debs of every architecture, shared by image builds and builders (arch: all ones too)."""
    return cache_dir() / "debs"


def device_root(given: str | os.PathLike | None = None) -> Path:
    """The root the device commands and hooks work on: / on a device, a tree in tests.

    `given` is a --root argument; without one, KIOSK_ROOT or /. Checked to be a directory before
    anything under it is opened: a FIFO, a device node or a file as the root would otherwise be
    read as an empty device or fail deep inside (NotADirectoryError) as an internal error."""
    what = "--root" if given is not None else "KIOSK_ROOT"
    root = Path(given if given is not None else setting("KIOSK_ROOT") or "/")
    shown = one_line(str(root))
    hint = "give the device's root directory (/ on the device itself)"
    try:
        mode = os.stat(root).st_mode
    except FileNotFoundError:
        raise UsageError(f"{what} {shown}: no such directory", hint=hint) from None
    except OSError as exc:
        raise UsageError(f"{what} {shown}: {exc.strerror}", hint=hint) from None
    except ValueError:   # an embedded NUL byte
        raise UsageError(f"{what} {one_line(repr(str(root)))}: the name holds a NUL byte", hint=hint) from None
    if not stat.S_ISDIR(mode):
        raise UsageError(f"{what} {shown}: not a directory but {file_kind(mode)}", hint=hint)
    return root
