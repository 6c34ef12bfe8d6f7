"""Opening a file the user named, safely: a regular file or a clear refusal, never a hang.

A path on the command line may name anything: a FIFO (opening it for reading waits for a
writer, forever), a device node (/dev/zero never ends; opening some devices has side effects,
a watchdog or a tape), a directory, a socket. Its type is checked before it is opened, and
again on the open descriptor (the name may have been swapped in between); the open itself
never waits (O_NONBLOCK, cleared once the file is known to be regular). Small inputs are read
with a bound, so a huge file is an error and not a MemoryError.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from kiosk.core.errors import KioskError, UsageError, one_line

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """'a FIFO (named pipe)', 'a character device', ... for a st_mode; 'a regular file' for one."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


class InputRefused(UsageError):
    """An input file kiosk will not read (exit 2). kind: "missing", "type", "size" or "os", so a caller
    can say it in its own words (a spec's problem line); reason is the text after the path."""

    def __init__(self, path, kind: str, reason: str, hint: str = "", message: str | None = None):
        self.path, self.kind, self.reason = str(path), kind, reason
        super().__init__(one_line(message or f"{path}: {reason}"), hint=hint)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB" if n >= 1 << 10 else f"{n} bytes"


def _not_regular(path, what: str, mode: int, hint: str) -> InputRefused:
    return InputRefused(path, "type", f"the {what} must be a regular file, not {file_kind(mode)}",
                        hint or f"give the {what} as a file")


def open_regular(path: str | Path, what: str, *, hint: str = "") -> int:
    """A read-only descriptor (close-on-exec) of the regular file `path`; UsageError otherwise.

    `what` names the input in messages ('image', 'block map'). Symbolic links are followed (to a
    regular file); anything else, or a file that cannot be opened, is the user's error (exit 2).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        kind = "missing" if isinstance(exc, FileNotFoundError) else "os"
        raise InputRefused(path, kind, exc.strerror, hint,
                           message=f"cannot read the {what} {path}: {exc.strerror}") from None
    except ValueError:   # an embedded NUL byte
        raise UsageError(one_line(f"cannot read the {what} {path!r}: the name holds a NUL byte")) from None
    if not stat.S_ISREG(mode):
        raise _not_regular(path, what, mode, hint)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise InputRefused(path, "os", exc.strerror, hint,
                           message=f"cannot read the {what} {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):   # swapped for something else since the stat
            raise _not_regular(path, what, mode, hint)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_small(path: str | Path, what: str, limit: int, *, hint: str = "") -> bytes:
    """The bytes of a regular file of at most `limit` bytes (open_regular's checks); UsageError otherwise."""
    fd = open_regular(path, what, hint=hint)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise _too_big(path, what, limit, hint)
        chunks, total = [], 0
        while True:   # read to the end, never past the limit (the file may grow while it is read)
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise _too_big(path, what, limit, hint)
        return b"".join(chunks)
    except OSError as exc:   # an I/O error on a regular file: not the user's input (exit 1)
        raise KioskError(one_line(f"cannot read the {what} {path}: {exc.strerror}"), hint=hint) from None
    finally:
        os.close(fd)


def _too_big(path, what: str, limit: int, hint: str) -> InputRefused:
    return InputRefused(path, "size", f"the {what} is larger than {_size(limit)}, the most kiosk reads for one",
                        hint or f"give the right {what}")
