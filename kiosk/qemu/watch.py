"""What a running QEMU says, told to the user once and plainly: its stderr, a paused disk, a watchdog reset.

QEMU repeats some messages endlessly, says nothing at all when it pauses a virtio VM whose disk
copy cannot be written (it looked like a hung device), and nothing when the guest's watchdog
resets it (a device that hung looked like one that rebooted); these two threads fix all three.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from pathlib import Path

from kiosk.core.errors import KioskError
from kiosk.qemu.qmp import QMP


class StderrRelay:
    """QEMU's stderr to ours, with each known noisy message shown once: with the raspi machines' usb-net,
    slirp reports "Failed to send packet" again and again while the device works normally; the raspi
    SD card model reports every failed write of its disk copy (no pause there, unlike virtio)."""

    REPEATED = (
        (re.compile(r"Slirp: Failed to send packet"), "harmless; repeats hidden"),
        (re.compile(r"sd_blk_(write|read): \w+ error on host side"),
         "the disk copy could not be written or read: is the host's disk full? repeats hidden"),
    )

    def __init__(self, source, dest):
        self.source, self.dest = source, dest
        self.seen: set[int] = set()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def _run(self) -> None:
        for raw in iter(self.source.readline, b""):
            line = raw.decode(errors="replace")
            kind = next((n for n, (pattern, _) in enumerate(self.REPEATED) if pattern.search(line)), None)
            if kind is not None:
                if kind in self.seen:
                    continue
                self.seen.add(kind)
                line = line.rstrip("\n") + f" ({self.REPEATED[kind][1]})\n"
            with contextlib.suppress(OSError, ValueError):
                self.dest.write(line)
                self.dest.flush()


class MonitorWatch:
    """Says why a VM stopped when its disk copy cannot be written (virtio: QEMU pauses it silently), and
    when the guest's hardware watchdog reset it (the system hung for the watchdog's whole timeout).

    Listens on a QMP socket of its own (QEMU serves one client per socket; the user's --qmp stays
    free for screenshots) for BLOCK_IO_ERROR (said once) and WATCHDOG (said each time), one line each.
    """

    def __init__(self, path: Path, where: Path, out):
        self.path, self.where, self.out = path, where, out
        self.said = False
        self.thread = threading.Thread(target=self._run, name="kiosk-run-monitorwatch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def message(self, event: dict) -> str:
        data = event.get("data", {})
        why = "the host's disk is full" if data.get("nospace") else data.get("reason", "an I/O error on the host")
        action = "QEMU paused the device" if data.get("action") == "stop" else "the device saw an I/O error"
        return (f"kiosk: {action}: its disk copy could not be written ({why}; the copy is in {self.where}); "
                f"free some space and type `cont` on the monitor to go on, or stop it with Ctrl-C")

    @staticmethod
    def watchdog_message(event: dict) -> str:
        action = event.get("data", {}).get("action", "reset")
        return (f"kiosk: the device's watchdog fired ({action}): the guest hung for its whole timeout "
                f"(its serial console and journal say what it was doing)")

    def _run(self) -> None:
        try:
            with QMP(self.path, timeout=60) as qmp:
                qmp.sock.settimeout(None)
                for line in iter(qmp.file.readline, ""):
                    event = json.loads(line)
                    if event.get("event") == "BLOCK_IO_ERROR" and not self.said:
                        self.said = True
                        print(self.message(event), file=self.out, flush=True)
                    elif event.get("event") == "WATCHDOG":
                        print(self.watchdog_message(event), file=self.out, flush=True)
        except (OSError, ValueError, KioskError):
            return   # QEMU went away: nothing more to watch
