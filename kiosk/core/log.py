"""Progress for people: `==> stage` lines with indented details, timed for a build, teed for a push."""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from kiosk.core.errors import KioskError


class Log:
    """`==> stage` and indented details, flushed line by line (git push streams them).

    A pusher who disconnects (Ctrl-C on git push) must not stop a switch half-way: once the output is
    gone, lines only go to the tee file (ROOT/var/lib/kiosk/push.log for pushes), never raise."""

    def __init__(self, out=None):
        self.out = out
        self.gone = False
        self.tee = None
        self.lines: list[str] = []
        self.times: dict[str, float] = {}

    def tee_to(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            self.tee = open(path, "w", encoding="utf-8")
            self.tee.write("".join(line + "\n" for line in self.lines))

    def raw(self, text: str) -> None:
        """One line as it is (spec problems keep the exact form `kiosk validate` prints)."""
        self.lines.append(text)
        if self.tee:
            with contextlib.suppress(OSError, ValueError):
                self.tee.write(text + "\n")
                self.tee.flush()
        if self.gone:
            return
        try:
            print(text, file=self.out or sys.stderr, flush=True)
        except (OSError, ValueError):
            self.gone = True

    def stage(self, text: str) -> None:
        self.raw(f"==> {text}")

    def __call__(self, text: str) -> None:
        self.raw(f"    {text}")

    @contextlib.contextmanager
    def timed(self, name: str):
        """The build's form: a stage is a block, timed into self.times, and a failure inside names it."""
        self.stage(name)
        start = time.monotonic()
        try:
            yield
        except KioskError as exc:
            elapsed = time.monotonic() - start
            raise KioskError(f"stage '{name}' failed after {elapsed:.1f}s: {exc.message}", hint=exc.hint) from None
        elapsed = time.monotonic() - start
        self.times[name] = round(elapsed, 2)
        self(f"{name} done in {elapsed:.1f}s")
