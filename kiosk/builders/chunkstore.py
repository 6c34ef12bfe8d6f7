"""A casync chunk store over HTTP on 127.0.0.1: what casync on a device fetches the chunks its running slot
lacks from, during `rauc install` of a casync index bundle (kiosk.image.bundle.make_chunked).

The same server has two sources: a store directory on the machine that made the bundle (`kiosk update`
forwards the device's store port to it with ssh -R), or, on the device itself, a relay to the builder that
made it (kiosk.builders.client.ChunkSession, a push's new system). casync checks every chunk against the
signed index, so nothing served here is trusted.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from kiosk.core.errors import KioskError
from kiosk.core.files import human_size

PROBE_PATH = "/kiosk-chunk-store"
PROBE_ANSWER = b"kiosk chunk store\n"
# casync asks for <store>/<first 4 hex digits>/<chunk id>.cacnk (and may double the slash after the store)
_CHUNK_PATH = re.compile(r"^/+store/+([0-9a-f]{4})/+([0-9a-f]{64})\.cacnk$")


def chunk_name(path: str) -> str | None:
    """"abcd/<id>" for a chunk path casync asks a store for (or a relay passes on), None for anything else."""
    m = _CHUNK_PATH.match(path if path.startswith("/") else f"/store/{path}.cacnk")
    return f"{m.group(1)}/{m.group(2)}" if m and m.group(2)[:4] == m.group(1) else None


def store_reader(store: Path):
    """A chunk's bytes from a store directory by chunk_name, None when it has none."""
    def read(name: str) -> bytes | None:
        try:
            return (Path(store) / f"{name}.cacnk").read_bytes()
        except OSError:
            return None
    return read


class ChunkServer:
    """A chunk store over HTTP on 127.0.0.1, read only, counting what it serves: the chunks come from
    `source(chunk_name) -> bytes | None` (a store directory here, or a builder's through a relay on the
    device). port 0 picks a free one (kiosk update forwards it); a device's relay takes RAUC's fixed one."""

    def __init__(self, store: Path | None = None, *, source=None, port: int = 0):
        self.source = source or store_reader(Path(store))
        self.sent = 0
        self.served = 0
        self.first = 0.0   # when the first chunk went (casync reads its seed before it asks for any)
        self.lock = threading.Lock()
        self.started = time.monotonic()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"   # keep-alive: one ssh channel for many chunks
            disable_nagle_algorithm = True   # headers and body are two writes: no 40 ms wait per chunk

            def _answer(self, body: bool) -> None:
                if self.path == PROBE_PATH:
                    data = PROBE_ANSWER
                    self._send(200, len(data))
                    if body:
                        self.wfile.write(data)
                    return
                name = chunk_name(self.path)
                data = owner.source(name) if name else None
                if data is None:
                    self._send(404, 0)
                    return
                self._send(200, len(data))
                if body:
                    self.wfile.write(data)
                    with owner.lock:
                        owner.first = owner.first or time.monotonic()
                        owner.sent += len(data)
                        owner.served += 1

            def _send(self, code: int, length: int) -> None:
                self.send_response(code)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def do_GET(self):   # noqa: N802 (http.server's name)
                self._answer(True)

            def do_HEAD(self):   # noqa: N802
                self._answer(False)

            def log_message(self, *args):
                pass

        try:
            self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        except OSError as exc:
            raise KioskError(f"cannot serve chunks on 127.0.0.1:{port}: {exc.strerror}",
                             hint="another update is under way on this machine; try again once it is over") from None
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def figures(self) -> tuple[int, int]:
        """(chunks, bytes) served so far."""
        with self.lock:
            return self.served, self.sent

    @contextlib.contextmanager
    def reporting(self, log, every: float = 5):
        """A progress line (bytes, chunks, rate) every `every` seconds while something changed."""
        stop = threading.Event()

        def progress() -> None:
            said = (0, 0)
            while not stop.wait(every):
                count, size = self.figures()
                if (count, size) != said:
                    rate = size / max(time.monotonic() - (self.first or self.started), 1e-3)
                    log(f"shipping chunks: {human_size(size)} ({count} chunks), {human_size(int(rate))}/s")
                    said = (count, size)

        reporter = threading.Thread(target=progress, daemon=True)
        reporter.start()
        try:
            yield self
        finally:
            stop.set()
            reporter.join(timeout=10)

    def __enter__(self):
        self.started = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
