"""The `kiosk` command: one sub-command per stage, one place that turns errors into exit codes.

Each stage module exposes `register(subparsers)`, adding its sub-commands with
`set_defaults(func=...)`; the function returns the exit status. Heavy imports
stay inside those functions so `kiosk --help` is fast on a Raspberry Pi 0.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from kiosk import __version__
from kiosk.errors import InvalidSpec, KioskError

# Stage modules that contribute sub-commands, in the order `--help` lists them.
COMMAND_MODULES = (
    "kiosk.spec_commands",   # validate, show
    "kiosk.build",           # build
    "kiosk.qemu",            # run
    "kiosk.flash",           # flash
    "kiosk.generations",     # generations, rollback, switch
    "kiosk.agent",           # agent
    "kiosk.discover",        # discover, resolve, ssh-proxy, ssh-config
    "kiosk.builders",        # builders check/authorize, builder-serve (and build --builder)
    "kiosk.hooks",           # hook entry points used by configuration.git
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiosk",
        description="Build, flash and update Raspberry Pi kiosks from one nixiosk.json.",
    )
    parser.add_argument("--version", action="version", version=f"kiosk {__version__}")
    parser.add_argument("--debug", action="store_true", help="show a traceback on internal errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a stage not present in this copy
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
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
