"""Shipping only what changed: RAUC's casync bundles (notes/ab-update.md, "Shipping less").

`rauc convert` turns the signed verity bundle into a signed verity bundle of ~0.5 MiB that carries a
casync index (rootfs.ext4.caibx: the SHA-512/256 of every ~64 KiB content-defined chunk of the root
filesystem) instead of the filesystem, and a chunk store beside it here. On the device, `rauc install`
checks that bundle's signature as for any bundle and runs `casync extract --seed <booted slot>`: every
chunk the running slot already has is read from it, the others are fetched from the store, and casync
checks each chunk, read or fetched, against its id in the signed index before writing it.

The device reaches the store at the fixed address its system.conf names (kiosk.image.grub
RAUC_CHUNK_STORE: 127.0.0.1 on the device), which `ssh -R` forwards to ChunkServer here for the length of
the install: a small read-only HTTP server bound to this machine's loopback, answering chunk paths only.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from kiosk.config.signing import SigningKey
from kiosk.core.errors import KioskError
from kiosk.core.files import human_size
from kiosk.core.run import run
from kiosk.image.rauc import RAUC_CHUNK_PORT
from kiosk.image.bundle import HINT, SQUASHFS_ARGS

PROBE_PATH = "/kiosk-chunk-store"
PROBE_ANSWER = b"kiosk chunk store\n"
# casync asks for <store>/<first 4 hex digits>/<chunk id>.cacnk (and may double the slash after the store)
_CHUNK_PATH = re.compile(r"^/+store/+([0-9a-f]{4})/+([0-9a-f]{64})\.cacnk$")
# On the device, before `rauc install`: the forwarded store answers (the forward is this ssh session's own,
# so another listener on the device's port cannot pass for it: it would not give this answer).
WAIT_FOR_STORE = (
    "python3 -c 'import sys, time, urllib.request\n"
    "for _ in range(40):\n"
    "    try:\n"
    f"        if urllib.request.urlopen(\"http://127.0.0.1:{RAUC_CHUNK_PORT}{PROBE_PATH}\", timeout=5).read() "
    f"== b\"{PROBE_ANSWER.decode().strip()}\\n\":\n"
    "            sys.exit(0)\n"
    "    except OSError:\n"
    "        pass\n"
    "    time.sleep(0.5)\n"
    f"sys.exit(\"the chunk store forwarded to 127.0.0.1:{RAUC_CHUNK_PORT} does not answer\")\n'")


def store_size(store: Path) -> tuple[int, int]:
    """(chunks, bytes) in a casync store directory."""
    count = size = 0
    for path in store.glob("*/*.cacnk"):
        count += 1
        size += path.stat().st_size
    return count, size


def make_chunked(bundle: Path, key: SigningKey, log=lambda message: None) -> tuple[Path, Path]:
    """(index bundle, chunk store) made by `rauc convert` from a signed bundle, beside it; the bundle's
    signature is checked against key's certificate first, and the new bundle signed with key."""
    bundle = Path(bundle)
    out = bundle.with_name(f"{bundle.stem}-chunks.raucb")
    store = out.with_suffix(".castr")
    out.unlink(missing_ok=True)
    shutil.rmtree(store, ignore_errors=True)   # rauc convert would add to an old store, never prune it
    try:
        run(["rauc", "convert", f"--keyring={key.cert}", f"--cert={key.cert}", f"--key={key.key}",
             f"--mksquashfs-args={SQUASHFS_ARGS}", str(bundle), str(out)],
            what="making the chunked bundle (rauc convert)", hint=f"{HINT} casync")
    except BaseException:
        out.unlink(missing_ok=True)
        shutil.rmtree(store, ignore_errors=True)
        raise
    count, size = store_size(store)
    log(f"chunks: {out.name} {human_size(out.stat().st_size)} (the casync index, signed), "
        f"{count} chunks {human_size(size)} in {store.name}")
    return out, store


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


def forwarded(ssh: list[str], port: int) -> list[str]:
    """The ssh argv (kiosk.net.reach, ending `-- HOST`) with the device's store port forwarded to `port` here;
    ssh gives up rather than run the command when the device refuses the forward."""
    if len(ssh) < 2 or ssh[-2] != "--":
        raise KioskError("internal: the ssh command line does not end with -- HOST")
    return [*ssh[:-2], "-o", "ExitOnForwardFailure=yes", "-R", f"127.0.0.1:{RAUC_CHUNK_PORT}:127.0.0.1:{port}",
            *ssh[-2:]]
