"""One request to one builder: start the ssh session, send the request, receive and check the answer."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

from kiosk.builders.ssh import BuilderFailure, ssh_problem
from kiosk.builders.wire import MARK, MAX_HEADER, PROTOCOL, BadAnswer, receive_payload
from kiosk.core.errors import KioskError
from kiosk.core.run import PIPE, start


class RemoteError(KioskError):
    """The builder answered with an error: the same request would fail on any builder.

    Its exit status is the builder's (2 for a spec it refuses)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _relay_stderr(proc, relay, other: list[str]) -> threading.Thread:
    """A thread reading the builder's stderr: its progress lines (MARK) to relay, anything else kept in other
    (ssh's own words, for the failure's sentence)."""
    def pump() -> None:
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith(MARK):
                relay(line[len(MARK):])
            elif line.strip():
                other.append(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def exchange(argv: list[str], request: dict, dest: Path, *, relay, timeout: float,
             key: str | Path | None = None) -> tuple[dict, dict[str, Path]]:
    """Send `request` to the `kiosk builder-serve` that argv starts; receive and check its answer.

    relay(line) gets the builder's progress lines. Raises BuilderFailure (could not get an
    answer: the next builder may do better), BadAnswer (the answer does not check out) or
    RemoteError (the builder answered with an error: the same request fails everywhere)."""
    proc = start(argv, stdin=PIPE, stdout=PIPE, stderr=PIPE, what="reaching the builder")
    other: list[str] = []
    errors = _relay_stderr(proc, relay, other)
    timer = threading.Timer(timeout, proc.kill)
    timer.daemon = True
    timer.start()
    try:
        with contextlib.suppress(BrokenPipeError, OSError):
            proc.stdin.write(json.dumps(request).encode() + b"\n")
            proc.stdin.close()
        line = proc.stdout.readline(MAX_HEADER)
        if not line.endswith(b"\n"):
            code = proc.wait()
            errors.join(5)
            if not timer.is_alive() and code < 0:
                raise BuilderFailure("failed", f"no answer within {timeout:g} s")
            raise ssh_problem("\n".join(other), code, key)
        try:
            header = json.loads(line)
        except ValueError:
            raise BadAnswer("the builder's answer is not JSON (is it running kiosk builder-serve?)") from None
        if not isinstance(header, dict) or header.get("kiosk") != PROTOCOL:
            theirs = header.get("kiosk") if isinstance(header, dict) else None
            raise BuilderFailure("failed", f"it speaks builder protocol {theirs!r}, this side {PROTOCOL}",
                                 hint="install the same kiosk version on both")
        if not header.get("ok"):
            raise RemoteError(str(header.get("error") or "the builder failed without saying why"),
                              int(header.get("exitCode") or 1))
        files = receive_payload(proc.stdout, header, dest) if header.get("payload") is not None else {}
        code = proc.wait()
        errors.join(5)
        if code != 0:
            for path in files.values():
                path.unlink(missing_ok=True)
            raise ssh_problem("\n".join(other), code, key)
        return header, files
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(Exception):
                stream.close()


MAX_CHUNK = 16 << 20   # casync's chunks are at most 256 KiB before compression


class ChunkSession:
    """A device's `chunks` session with the builder that made its index bundle: get(name) asks for one
    chunk and waits for it (one at a time; casync checks each against the signed index, not this)."""

    def __init__(self, argv: list[str], store: str, *, relay, key: str | Path | None = None):
        self.key = key
        self.broken = False   # after one failed answer the stream is out of step: every later get is None
        self.lock = threading.Lock()
        self.other: list[str] = []
        self.proc = start(argv, stdin=PIPE, stdout=PIPE, stderr=PIPE, what="reaching the builder for chunks")
        _relay_stderr(self.proc, relay, self.other)
        try:
            self.proc.stdin.write(json.dumps({"kiosk": PROTOCOL, "op": "chunks", "store": store}).encode() + b"\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline(MAX_HEADER)
            header = json.loads(line) if line.endswith(b"\n") else None
        except (OSError, ValueError):
            header = None
        if not isinstance(header, dict) or not header.get("ok"):
            self.close()
            if isinstance(header, dict):
                raise RemoteError(str(header.get("error") or "the builder refused the chunks session"))
            raise ssh_problem("\n".join(self.other), self.proc.returncode or 1, key)

    def get(self, name: str) -> bytes | None:
        """The chunk's bytes, None when the builder lacks it or the session broke (casync then fails the install)."""
        with self.lock:
            if self.broken:
                return None
            self.broken = True
            try:
                self.proc.stdin.write(name.encode() + b"\n")
                self.proc.stdin.flush()
                line = self.proc.stdout.readline(32)
                if line == b"-\n":
                    self.broken = False
                    return None
                size = int(line) if line.endswith(b"\n") else -1
                if not 0 <= size <= MAX_CHUNK:
                    return None
                data = self.proc.stdout.read(size)
                self.broken = len(data) != size
                return None if self.broken else data
            except (OSError, ValueError):
                return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(Exception):
                stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
