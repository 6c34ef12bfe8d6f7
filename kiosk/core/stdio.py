"""Standard output that fails as one line: a full disk, a closed descriptor, a reader gone away.

`kiosk validate x >/dev/full` or `kiosk show --json ... >&-` used to end in an internal error,
or in Python's "Exception ignored ... BrokenPipeError" at exit, or silently with status 0
(argparse swallows the failed write of --help). guard_standard_streams() (run once by the
`kiosk` command, not by callers of cli.main) makes each of these one OutputError:

- descriptors 0, 1 and 2 are always open: a closed one is reopened on /dev/null (stdout
  read-only, so writing it fails as writing a closed descriptor does), so no file kiosk opens
  later lands on them and no program it starts inherits one of its files as its stdout;
- sys.stdout writes through a raw writer that turns a failed write into OutputError
  ("cannot write to standard output: No space left on device", exit status 1), and a reader
  gone away into BrokenPipeError (cli.py exits 1 quietly, as before). After the first failure
  the rest of the output is dropped, so the flush at interpreter exit has nothing to report
  (the SIGPIPE/BrokenPipeError note in the Python docs of the signal module);
- text that cannot be encoded (a lone surrogate from a file name or a spec) is written
  backslash-escaped instead of raising UnicodeEncodeError;
- sys.stderr drops what it cannot write: there is no one left to tell.
"""

from __future__ import annotations

import io
import os
import select
import sys

from kiosk.core.errors import KioskError

_NULL = os.devnull


class OutputError(KioskError):
    """Standard output cannot be written (full, closed, an I/O error); exit status 1."""


class _Writer(io.RawIOBase):
    """os.write on a descriptor; failures become OutputError (stdout) or are dropped (stderr)."""

    def __init__(self, fd: int, name: str, *, quiet: bool):
        super().__init__()
        self._fd, self._name, self._quiet = fd, name, quiet
        self.failed = False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        try:
            return os.isatty(self._fd)
        except OSError:
            return False

    def close(self) -> None:   # the descriptor stays open: it is the process's, not this object's
        self.flush()
        super().close()

    def write(self, data) -> int:
        size = len(memoryview(data))
        if self.failed or size == 0:
            return size
        while True:
            try:
                return os.write(self._fd, data)
            except BlockingIOError:   # a descriptor left non-blocking by whoever started kiosk: wait, then go on
                select.select([], [self._fd], [], 1.0)
            except BrokenPipeError:
                self.failed = True
                if self._quiet:
                    return size
                raise
            except OSError as exc:
                self.failed = True
                if self._quiet:
                    return size
                raise OutputError(f"cannot write to {self._name}: {exc.strerror or exc}") from None


def _reserve(fd: int, flags: int) -> bool:
    """Open /dev/null on `fd` if it is closed; True when it was."""
    try:
        os.fstat(fd)
        return False
    except OSError:
        pass
    null = os.open(_NULL, flags)
    if null != fd:
        os.dup2(null, fd, inheritable=True)
        os.close(null)
    else:
        os.set_inheritable(fd, True)
    return True


def _text(raw: _Writer, like) -> io.TextIOWrapper:
    encoding = getattr(like, "encoding", None) or "utf-8"
    return io.TextIOWrapper(io.BufferedWriter(raw), encoding=encoding, errors="backslashreplace",
                            line_buffering=raw.isatty())


def guard_standard_streams() -> None:
    """Make stdin, stdout and stderr safe to use whatever state they were left in (see the module's text)."""
    if _reserve(0, os.O_RDONLY) or sys.stdin is None:
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8", errors="surrogateescape")
    _reserve(1, os.O_RDONLY)   # read-only: a write fails with EBADF, as on the closed descriptor it replaces
    _reserve(2, os.O_WRONLY)
    sys.stdout = _text(_Writer(1, "standard output", quiet=False), sys.stdout)
    sys.stderr = _text(_Writer(2, "standard error", quiet=True), sys.stderr)
    sys.stderr.reconfigure(line_buffering=True)   # a message is on the terminal before the next step starts


def flush_stdout() -> None:
    """Flush standard output; an OutputError (or BrokenPipeError) is raised at most once."""
    if sys.stdout is not None:
        sys.stdout.flush()
