"""The `kiosk` command: one sub-command per stage, one place that turns errors into exit codes.

Each stage module exposes `register(subparsers)`, adding its sub-commands with
`set_defaults(func=...)`; the function returns the exit status. Heavy imports
stay inside those functions, and running one command imports only its own
stage (COMMANDS), so `kiosk hook ...` on a Raspberry Pi 0 does not pay for zeroconf's or QEMU's.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import traceback

from kiosk import __version__
from kiosk.core import stdio
from kiosk.core.errors import InvalidSpec, KioskError, one_line

# Stage modules that contribute sub-commands, in the order `--help` lists them.
COMMAND_MODULES = (
    "kiosk.spec.commands",   # validate, show
    "kiosk.image.commands",  # build
    "kiosk.qemu.command",    # run
    "kiosk.flash.command",          # flash
    "kiosk.device.commands",     # generations, rollback, switch
    "kiosk.device.slots",        # slot status/commit (on an A/B device)
    "kiosk.update.commands",     # update
    "kiosk.update.status",       # status
    "kiosk.device.screen",       # screen (on the device)
    "kiosk.device.selfheal",     # program-exited, watch-url (on the device)
    "kiosk.net.agent",           # agent
    "kiosk.net.discover",        # discover, resolve, ssh-proxy, ssh-config
    "kiosk.net.screenshot",      # screenshot
    "kiosk.builders.commands",        # builders check/authorize (build --builder is kiosk.builders.remote)
    "kiosk.buildhost.commands",       # builder-serve
    "kiosk.fleet.commands",          # fleet show/build/push/status/discover
    "kiosk.device.hooks",           # hook entry points used by configuration.git
)


# Which stage registers each command; tests/test_spec.py checks it against what the stages register.
COMMANDS = {
    "validate": "kiosk.spec.commands", "show": "kiosk.spec.commands", "build": "kiosk.image.commands",
    "run": "kiosk.qemu.command", "flash": "kiosk.flash.command", "generations": "kiosk.device.commands",
    "rollback": "kiosk.device.commands", "switch": "kiosk.device.commands", "agent": "kiosk.net.agent",
    "discover": "kiosk.net.discover", "resolve": "kiosk.net.discover", "ssh-proxy": "kiosk.net.discover",
    "ssh-config": "kiosk.net.discover", "screenshot": "kiosk.net.screenshot",
    "builders": "kiosk.builders.commands",
    "builder-serve": "kiosk.buildhost.commands", "fleet": "kiosk.fleet.commands",
    "hook": "kiosk.device.hooks", "screen": "kiosk.device.screen", "program-exited": "kiosk.device.selfheal",
    "watch-url": "kiosk.device.selfheal", "slot": "kiosk.device.slots", "update": "kiosk.update.commands",
    "status": "kiosk.update.status",
}


def _stages_for(argv: list[str]) -> tuple[str, ...]:
    """The one stage a known command needs; every stage for --help, no command or an unknown one."""
    command = next((arg for arg in argv if not arg.startswith("-")), None)  # global options take no values
    stage = COMMANDS.get(command)
    return (stage,) if stage in COMMAND_MODULES else COMMAND_MODULES


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (not the usage block and then the error), exit status 2."""

    def error(self, message: str):
        message = re.sub(r"'([^']{60})[^']{10,}'", r"'\1...'", message)   # a 5000-digit number is not shown whole
        self.exit(2, one_line(f"{self.prog}: {message}") + f"; see {self.prog} --help\n")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kiosk",
        description="Build, flash and update Raspberry Pi kiosks from one nixiosk.json.",
    )
    parser.add_argument("--version", action="version", version=f"kiosk {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show every command kiosk runs, and a traceback on internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES if argv is None else _stages_for(argv):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a stage not present in this copy
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `kiosk` command (argv None: sys.argv, with the standard streams guarded; see core/stdio.py)."""
    if argv is None:
        stdio.guard_standard_streams()
    try:
        try:
            return _main(sys.argv[1:] if argv is None else argv)
        finally:   # what is still buffered fails here, inside the handlers below (also after --help)
            stdio.flush_stdout()
    except stdio.OutputError as exc:
        print(f"kiosk: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return 1


def _main(argv: list[str]) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)   # (--help on a full stdout: main reports the OutputError)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from kiosk.core import run as runmod
    runmod.DEBUG = args.debug   # every command line kiosk runs goes to stderr first
    try:
        return int(args.func(args) or 0)
    except KioskError as exc:
        # Spec problems already start with the file name; other errors get the program's name.
        print(exc.render() if isinstance(exc, InvalidSpec) else f"kiosk: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kiosk: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # the promise: no traceback reaches the user unless asked for
        if args.debug:
            traceback.print_exc()
        print(f"kiosk: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)",
              file=sys.stderr)
        return 1
