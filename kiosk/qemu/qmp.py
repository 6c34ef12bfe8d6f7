"""Talking to a running QEMU through its monitor (QMP): commands, and the guest's screen as PNG.

A QMP socket works with -display none too, so screenshots need no window; where QEMU cannot
write PNG itself, its PPM is converted here with zlib only (no image library on the host).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import struct
import time
import zlib
from pathlib import Path

from kiosk.core.errors import KioskError


class QMP:
    """A minimal QMP client (JSON lines over the unix socket QEMU was given with -qmp)."""

    def __init__(self, path: Path | str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.settimeout(timeout)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise KioskError(f"no QEMU monitor at {path}") from None
                time.sleep(0.2)
        self.path = path
        self.file = self.sock.makefile("rw", encoding="utf-8", errors="replace")
        try:
            greeting = self._read()
            if not isinstance(greeting, dict) or "QMP" not in greeting:
                raise KioskError(f"{path} is not a QEMU monitor (it does not greet as QMP)")
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    def _read(self):
        """One JSON line from the monitor; a silence, a closed or a broken line is a KioskError."""
        try:
            line = self.file.readline(1 << 20)
        except OSError as exc:   # (socket.timeout included)
            raise KioskError(f"no answer from the QEMU monitor at {self.path}: {exc.strerror or exc}") from None
        if not line:
            return None
        try:
            return json.loads(line)
        except ValueError:
            raise KioskError(f"{self.path} is not a QEMU monitor (it sent something that is not QMP)") from None

    def execute(self, command: str, **arguments) -> object:
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        try:
            self.file.write(json.dumps(message) + "\n")
            self.file.flush()
        except OSError as exc:
            raise KioskError(f"QEMU closed its monitor during {command}: {exc.strerror or exc}") from None
        while True:
            reply = self._read()
            if reply is None:
                raise KioskError(f"QEMU closed its monitor during {command}")
            if not isinstance(reply, dict):
                raise KioskError(f"{self.path} is not a QEMU monitor (it sent something that is not QMP)")
            if "event" in reply:
                continue
            if "error" in reply:
                raise KioskError(f"QEMU {command}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def ppm_to_png(ppm: bytes) -> bytes:
    """A binary PPM (P6, 8-bit) as PNG, with zlib only."""
    match = re.match(rb"P6\s+(?:#[^\n]*\s+)*(\d+)\s+(\d+)\s+(\d+)\s", ppm)
    if not match:
        raise KioskError("screendump: not a P6 PPM file")
    width, height, maxval = (int(g) for g in match.groups())
    if maxval != 255:
        raise KioskError(f"screendump: PPM maxval {maxval} (expected 255)")
    pixels = ppm[match.end():match.end() + width * height * 3]
    stride = width * 3
    raw = b"".join(b"\0" + pixels[y * stride:(y + 1) * stride] for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def screendump(qmp_path: Path | str, dest: Path | str, timeout: float = 30.0) -> Path:
    """The guest's screen as a PNG at dest (QMP screendump; PNG directly where QEMU can, else PPM converted)."""
    dest = Path(dest).resolve()
    with QMP(qmp_path, timeout=timeout) as qmp:
        try:
            qmp.execute("screendump", filename=str(dest), format="png")
            if dest.is_file() and dest.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n":
                return dest
        except KioskError:
            pass
        ppm = dest.with_suffix(".ppm")
        qmp.execute("screendump", filename=str(ppm))
    try:
        dest.write_bytes(ppm_to_png(ppm.read_bytes()))
    finally:
        ppm.unlink(missing_ok=True)
    return dest
