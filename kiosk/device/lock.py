"""One push or switch at a time on a device: an flock on ROOT/var/lib/kiosk/lock that says who holds it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from kiosk.core.errors import KioskError
from kiosk.core.log import Log
from kiosk.core.paths import number_setting
from kiosk.device.store import state_dir

DEFAULT_LOCK_TIMEOUT = 600.0


def lock_timeout() -> float:
    """KIOSK_LOCK_TIMEOUT: how long a push or switch waits for another (default 600 s).

    Seconds, finite and not negative: nan would never be reached (a push waiting for ever)."""
    return number_setting("KIOSK_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT, least=0)


@contextlib.contextmanager
def device_lock(root: Path, what: str, log: Log, timeout: float | None = None):
    """One push or switch at a time; a second waits (saying so) up to `timeout` seconds, then is refused."""
    if timeout is None:
        timeout = lock_timeout()
    state = state_dir(root)
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    log(f"waiting for another push to finish... ({holder or 'the device is busy'})")
                    said = True
                if time.monotonic() >= deadline:
                    raise KioskError(f"another push or switch has held the device for over {timeout:.0f}s; "
                                     "nothing was changed", hint="push again later") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {what}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # who holds it, only while held
    finally:
        os.close(fd)  # releases the flock
