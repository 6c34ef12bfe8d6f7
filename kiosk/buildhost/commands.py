"""`kiosk builder-serve`: what a device's (or laptop's) ssh session runs on the builder."""

from __future__ import annotations

import json
import sys


def cmd_serve(args) -> int:
    from kiosk.buildhost.server import probe, serve

    if args.probe:
        json.dump(probe(), sys.stdout, indent=2)
        print()
        return 0
    return serve(sys.stdin.buffer, sys.stdout.buffer, sys.stderr)


def register(sub) -> None:
    s = sub.add_parser("builder-serve", help="on a builder: answer one request from a device (run over ssh)",
                       description="Reads one JSON request on stdin (probe, packages, build, bundle, chunks) "
                                   "and answers on stdout; devices run it over ssh.")
    s.add_argument("--probe", action="store_true", help="print what this machine can do as a builder")
    s.set_defaults(func=cmd_serve)
