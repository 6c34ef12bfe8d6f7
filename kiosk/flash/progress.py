"""The progress line of a long write or read-back, on stderr; one line per card when several are written.

Flashing a card takes minutes: the user sees how far it is, how fast, and how long is left,
without a terminal full of lines (or, in a log, without a line per chunk).
"""

from __future__ import annotations

import sys
import threading
import time

from kiosk.core.files import human_size


def _clock_text(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """'writing /dev/sdb: 42% 120.0 MiB of 286.3 MiB, 21.4 MB/s, 0:08 left' on stderr.

    One line rewritten in place on a terminal (4 times a second at most); otherwise a
    new line every `interval` seconds, so logs stay readable.
    """

    def __init__(self, what: str, total: int, stream=None, clock=time.monotonic, interval: float | None = None):
        self.what, self.total, self.clock = what, total, clock
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.interval = interval if interval is not None else (0.25 if self.tty else 5.0)
        self.start = clock()
        self.last = self.start if not self.tty else None  # logs: the first line after `interval`
        self.shown = False

    def line(self, done: int) -> str:
        elapsed = max(self.clock() - self.start, 1e-6)
        rate = done / elapsed
        percent = 100.0 * done / self.total if self.total else 100.0
        text = f"{self.what}: {percent:3.0f}% {human_size(done)} of {human_size(self.total)}, {rate / 1e6:.1f} MB/s"
        if done < self.total and rate > 0:
            text += f", {_clock_text((self.total - done) / rate)} left"
        return text

    def update(self, done: int, force: bool = False) -> None:
        now = self.clock()
        if not force and self.last is not None and now - self.last < self.interval:
            return
        self.last = now
        self.show(self.line(done))
        self.shown = True

    def show(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + text + "\x1b[K")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the updating line so that what follows starts on its own line."""
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()
            self.shown = False


class Quiet(Progress):
    """No progress line: for a read-back too short to be worth one, and callers that show none."""

    def __init__(self):
        super().__init__("", 0, stream=sys.stderr)

    def update(self, done, force=False):
        pass


class Rows:
    """Several cards written at once: one progress line each, on stderr.

    On a terminal every card keeps its own row, rewritten in place (the rows are reserved
    first, then reached by moving the cursor up and back); in a log each card's line comes
    every few seconds and names its card. `cancel`, once set, makes every card's next
    progress update raise KeyboardInterrupt in that card's thread: Ctrl-C reaches only the
    main thread, and each card must stop where it can say what state it is in.
    """

    def __init__(self, count: int, stream=None, cancel: threading.Event | None = None):
        self.count, self.cancel, self.lock = count, cancel, threading.Lock()
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        if self.tty:
            self.stream.write("\n" * count)
            self.stream.flush()

    def progress_for(self, row: int):
        """The Progress factory (what, total) of card number `row`."""
        return lambda what, total: _Row(self, row, what, total)

    def show(self, row: int, text: str) -> None:
        with self.lock:
            if self.tty:
                up = self.count - row
                self.stream.write(f"\x1b[{up}A\r{text}\x1b[K\x1b[{up}B\r")
            else:
                self.stream.write(text + "\n")
            self.stream.flush()


class _Row(Progress):
    def __init__(self, rows: Rows, row: int, what: str, total: int):
        self.rows, self.row = rows, row
        super().__init__(what, total, stream=rows.stream)

    def update(self, done: int, force: bool = False) -> None:
        if self.rows.cancel is not None and self.rows.cancel.is_set():
            raise KeyboardInterrupt
        super().update(done, force)

    def show(self, text: str) -> None:
        self.rows.show(self.row, text)

    def close(self) -> None:
        """The row stays; the next stage of the same card rewrites it."""
