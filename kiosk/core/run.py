"""The one way kiosk runs another program (as mkosi's run()).

Every call gets the same treatment: a normalised environment (C.UTF-8, so output parses the same
everywhere), the command line shown under `kiosk --debug`, and a failure turned into one
KioskError that names the command, its exit status and the last lines it printed. Long-lived
processes that kiosk drives interactively (QEMU, a builder's ssh session) use `start()`, the
same environment and logging around Popen.
"""

from __future__ import annotations

import collections
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

from kiosk.core.errors import KioskError

DEBUG = False   # set by `kiosk --debug`: every command line goes to stderr before it runs
PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT
CompletedProcess = subprocess.CompletedProcess
TimeoutExpired = subprocess.TimeoutExpired


def environment(extra: dict | None = None, *, drop: tuple[str, ...] = ()) -> dict:
    """os.environ in the C.UTF-8 locale, without variables starting with `drop`, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("LC_") or k == "LANGUAGE" or (drop and k.startswith(drop)))}
    env["LC_ALL"] = "C.UTF-8"
    env.update(extra or {})
    return env


def _show(argv) -> str:
    return shlex.join(str(a) for a in argv)


def _debug(argv, cwd) -> None:
    if DEBUG:
        where = f" (in {cwd})" if cwd else ""
        print(f"+ {_show(argv)}{where}", file=sys.stderr, flush=True)


def _missing(argv, what: str | None) -> KioskError:
    tool = Path(str(argv[0])).name
    return KioskError(f"{what or tool}: {tool} is not installed",
                      hint="install it (scripts/install-deps.sh installs what kiosk needs)")


def _last_lines(*texts, count: int) -> list[str]:
    lines = []
    for text in texts:
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        lines += [line.rstrip() for line in (text or "").splitlines() if line.strip()]
    return lines[-count:]


def failure(argv, code: int, output: list[str], *, what: str | None = None, hint: str = "",
            error: type[KioskError] = KioskError) -> KioskError:
    """The one way a failed command is told: what failed, the command, its status, its last lines."""
    head = f"{what}: " if what else ""
    text = f"{head}{_show(argv[:3])}{' ...' if len(argv) > 3 else ''} exited with status {code}"
    if output:
        text += ":\n" + "\n".join(f"  {line}" for line in output)
    return error(text, hint=hint)


def run(argv, *, input: str | bytes | None = None, env: dict | None = None, drop_env: tuple[str, ...] = (),
        cwd: Path | str | None = None, check: bool = True, text: bool = True, timeout: float | None = None,
        stdin=DEVNULL, stdout=PIPE, stderr=PIPE, what: str | None = None, hint: str = "", tail: int = 20,
        error: type[KioskError] = KioskError,
        explain: Callable[[subprocess.CompletedProcess], list[str]] | None = None) -> subprocess.CompletedProcess:
    """Run argv to completion; with check, a non-zero exit raises `error` (a KioskError) saying why.

    stdin is /dev/null unless input is given (or stdin=None to inherit it).
    env is added to the normalised environment; drop_env removes variables by prefix (e.g. "GIT_").
    explain(proc) may pick the lines worth showing from a failure (default: the last `tail` lines).
    """
    _debug(argv, cwd)
    if isinstance(input, str) and not text:
        input = input.encode()
    try:
        proc = subprocess.run([str(a) for a in argv], input=input, env=environment(env, drop=drop_env), cwd=cwd,
                              stdout=stdout, stderr=stderr, text=text, timeout=timeout,
                              errors="replace" if text else None,
                              **({} if input is not None else {"stdin": stdin}))
    except FileNotFoundError:
        if cwd is not None and not Path(cwd).is_dir():
            raise
        raise _missing(argv, what) from None
    except subprocess.TimeoutExpired:
        raise error(f"{what + ': ' if what else ''}{_show(argv[:3])} did not finish in {timeout:.0f} s",
                    hint=hint) from None
    if check and proc.returncode != 0:
        lines = explain(proc) if explain else _last_lines(proc.stdout if stderr == STDOUT else "",
                                                          proc.stderr, count=tail)
        if not lines and stdout == PIPE:
            lines = _last_lines(proc.stdout, count=tail)
        raise failure(argv, proc.returncode, lines, what=what, hint=hint, error=error)
    return proc


def run_lines(argv, on_line: Callable[[str], None], *, env: dict | None = None, drop_env: tuple[str, ...] = (),
              cwd: Path | str | None = None, what: str | None = None, hint: str = "", tail: int = 20,
              important: Callable[[str], bool] = lambda line: False) -> None:
    """Run argv, handing each line it prints (stdout and stderr together) to on_line as it comes.

    For long jobs whose progress is worth showing (mmdebstrap). A failure names the command with
    the `important` lines seen (errors worth reading first) and the last `tail` lines.
    """
    _debug(argv, cwd)
    last: collections.deque[str] = collections.deque(maxlen=tail)
    errors: list[str] = []
    try:
        proc = subprocess.Popen([str(a) for a in argv], stdout=PIPE, stderr=STDOUT, stdin=DEVNULL, cwd=cwd,
                                env=environment(env, drop=drop_env), text=True, errors="replace", bufsize=1)
    except FileNotFoundError:
        raise _missing(argv, what) from None
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            line = line.rstrip("\n").rsplit("\r", 1)[-1]   # progress bars redraw with \r: keep the last state
            if not line.strip():
                continue
            last.append(line)
            if important(line) and line not in errors and len(errors) < 5:
                errors.append(line)
            on_line(line)
    if proc.returncode != 0:
        shown = errors + (["last lines:"] if errors else []) + list(last)
        raise failure(argv, proc.returncode, shown, what=what, hint=hint)


def start(argv, *, env: dict | None = None, cwd: Path | str | None = None, what: str | None = None,
          **popen) -> subprocess.Popen:
    """Start a long-lived process (QEMU, an ssh session) with the same environment and logging."""
    _debug(argv, cwd)
    try:
        return subprocess.Popen([str(a) for a in argv], env=environment(env), cwd=cwd, **popen)
    except FileNotFoundError:
        raise _missing(argv, what) from None
