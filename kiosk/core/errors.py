"""The errors a user can see, and the exit codes they map to.

Exit codes: 0 success, 2 invalid input (spec, arguments) or a refusal, 1 anything else.
Every failure a user can act on is a KioskError: a message saying what went wrong and, apart,
a hint saying what to do about it. Only cli.py turns them into text and exit codes; anything
else that escapes is an internal error.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass


def one_line(text: str) -> str:
    """Escape control and line-separator characters so a problem never spans two lines."""
    return "".join(c if not unicodedata.category(c).startswith(("C", "Zl", "Zp")) else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}") for c in text)


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with the input: where (JSON pointer), what, and how to fix it."""

    pointer: str
    message: str
    fix: str = ""

    def line(self, source: str) -> str:
        where = self.pointer or "/"
        text = f"{source}: {where}: {self.message}"
        return one_line(f"{text}; {self.fix}" if self.fix else text)


class KioskError(Exception):
    """A failure the user can act on: `message; hint` on one line, exit status 1."""

    exit_code = 1

    def __init__(self, message: str = "", hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}; {self.hint}" if self.hint else self.message


class UsageError(KioskError):
    """Bad command-line input; exit status 2."""

    exit_code = 2


class Refused(KioskError):
    """kiosk will not do this (write that disk, take that key); nothing was changed. Exit status 2."""

    exit_code = 2


class InvalidSpec(KioskError):
    """A spec with one or more problems; every problem is reported, exit status 2."""

    exit_code = 2

    def __init__(self, source: str, problems: list[Problem], detail: str = ""):
        self.source = source
        self.problems = sorted(set(problems))
        self.detail = detail  # extra lines shown after the problems (e.g. a caret under a syntax error)
        super().__init__(self.render())

    def render(self) -> str:
        lines = [p.line(self.source) for p in self.problems]
        if self.detail:
            lines.append(self.detail)
        return "\n".join(lines)
