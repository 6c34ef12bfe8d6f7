"""`kiosk validate` and `kiosk show`: the spec as the user wrote it, and what it implies."""

from __future__ import annotations

import json
import sys

from kiosk.spec import load as specmod


def add_spec_argument(parser) -> None:
    parser.add_argument("spec", nargs="?", default="nixiosk.json", metavar="SPEC",
                        help="the spec file (default: nixiosk.json)")


def print_warnings(spec: specmod.Spec) -> None:
    for warning in spec.warnings:
        print(f"{spec.source}: warning: {warning}", file=sys.stderr)


def cmd_validate(args) -> int:
    spec = specmod.load(args.spec)
    print_warnings(spec)
    data = spec.data
    print(f"{spec.source}: valid: {data['hostName']} on {data['hardware']}, "
          f"program {data['program']['package']} ({data['program']['executable']})")
    return 0


def cmd_show(args) -> int:
    from kiosk.spec.plan import make_plan

    spec = specmod.load(args.spec)
    print_warnings(spec)
    plan = make_plan(spec.data)
    implied = plan.summary()
    if args.json:
        json.dump({"spec": spec.data, "specSha256": spec.digest, "implies": implied}, sys.stdout, indent=2)
        print()
        return 0
    data = spec.data
    print(json.dumps(data, indent=2))
    print()
    print(f"board:        {implied['board']} ({implied['description']})")
    print(f"architecture: {implied['architecture']}")
    print(f"kernel:       {implied['kernel']}")
    print(f"boot:         {implied['bootloader']}")
    print(f"debian:       {'; '.join(implied['sources'])}")
    print(f"packages:     {len(implied['packages'])}: {' '.join(implied['packages'])}")
    print(f"builds on itself: {'yes' if implied['canBuildItself'] else 'no (needs a remote builder for package changes)'}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("validate", help="check a spec; every problem, one line each (exit 2 when invalid)",
                       description="Check a spec against the schema and the board; print every problem at once.")
    add_spec_argument(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("show", help="the spec with defaults filled in, and what it implies for its board",
                       description="Show the spec with defaults filled in, plus architecture, kernel and package set.")
    add_spec_argument(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_show)
