"""`kiosk fleet show|build|push|status|discover`: one spec to many kiosks, from an Ansible inventory.

No server: the laptop (or an Ansible control node, docs/fleet.md) pushes to each device's own
configuration.git, and the devices' hooks do what they do for one `git push`.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from kiosk.core.errors import one_line
from kiosk.core.log import Log
from kiosk.fleet.merge import Device, load_fleet
from kiosk.net.mdns import seconds


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    cells = [tuple(one_line(str(c)) for c in row) for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def _dump(data) -> None:
    json.dump(data, sys.stdout, indent=2, ensure_ascii=False)
    print()


def _whole_number(text: str) -> int:
    """argparse type: 1 or more."""
    if not text.isdigit() or not 1 <= int(text) <= 10000:
        raise ValueError
    return int(text)


def _count(text: str) -> int:
    """argparse type: 0 or more."""
    if not text.isdigit() or int(text) > 10000:
        raise ValueError
    return int(text)


def _devices(args, *, check_specs: bool = True) -> list[Device]:
    return load_fleet(args.inventory, getattr(args, "spec", None), limit=args.limit,
                      check_specs=check_specs).require_valid()


# ---------------------------------------------------------------- show

def cmd_show(args) -> int:
    fleet = load_fleet(args.inventory, args.spec, limit=args.limit)
    for line in fleet.problems:
        print(line, file=sys.stderr)
    if args.json:
        _dump({"devices": [{"host": d.name, "groups": d.groups, "valid": d.spec is not None,
                            "reach": d.connection.label if d.connection else None,
                            "url": d.connection.url if d.connection else None, "spec": d.data}
                           for d in fleet.devices], "problems": fleet.problems})
    else:
        for device in fleet.devices:
            reach = device.connection.label if device.connection else "(cannot be reached: see the problems)"
            state = "" if device.spec is not None else "; NOT VALID (see the problems)"
            print(f"# {device.name}: groups {', '.join(g for g in device.groups if g != 'all') or '-'}; "
                  f"reached as {reach}{state}")
            print(device.text)
    return 2 if fleet.problems else 0


# ---------------------------------------------------------------- push

def cmd_push(args) -> int:
    from kiosk.fleet.remote import Settings, commit_identity
    from kiosk.fleet.rollout import Progress, Waves, failure_budget, rollout

    seconds(args.connect_timeout, "--connect-timeout", 600)
    devices = _devices(args)
    parallel = args.parallel or args.batch
    waves = Waves(batch=args.batch, parallel=parallel, canary=args.canary,
                  max_failures=failure_budget(args.max_failures, len(devices)))
    settings = Settings(connect_timeout=args.connect_timeout, accept_new_host_keys=args.accept_new_host_keys,
                        allow_rename=args.allow_rename, author=commit_identity(), message=args.message)
    progress = Progress(verbose=args.verbose)
    progress.stage(f"fleet: {len(devices)} device(s) from {args.inventory}"
                   + (f" and {args.spec}" if args.spec else ""))
    started = time.monotonic()
    report = rollout(devices, settings, waves, progress)
    rows = [{"host": d.name, "result": report.outcomes[d.name].result, "reason": report.outcomes[d.name].reason,
             "commit": report.outcomes[d.name].commit, "generation": report.outcomes[d.name].generation,
             "seconds": round(report.outcomes[d.name].seconds, 2), "wave": report.wave_of[d.name]}
            for d in devices]
    if args.json:
        _dump({"devices": rows, "stopped": report.stopped or None, "failures": report.failures,
               "maxFailures": waves.max_failures, "seconds": round(time.monotonic() - started, 2)})
    else:
        print(_table(("HOST", "RESULT", "COMMIT", "GEN", "SECONDS", "WAVE", "REASON"),
                     [(r["host"], r["result"], r["commit"][:12] or "-", r["generation"] or "-",
                       f"{r['seconds']:.1f}" if r["seconds"] else "-", r["wave"], r["reason"][:100])
                      for r in rows]))
    progress.stage(f"done in {time.monotonic() - started:.1f} s: "
                   + ", ".join(f"{sum(r['result'] == k for r in rows)} {k}"
                               for k in dict.fromkeys(r["result"] for r in rows)))
    return 1 if report.failures or report.stopped else 0


# ---------------------------------------------------------------- status

OLDER = "an older kiosk (no `kiosk status --here`): its generations only"


def _generation(number) -> int | None:
    return number if isinstance(number, int) and not isinstance(number, bool) else None


def cmd_status(args) -> int:
    from kiosk.device.commands import generation_health
    from kiosk.fleet.remote import Settings, device_status
    from kiosk.fleet.rollout import run_parallel
    from kiosk.update import status

    seconds(args.timeout, "--timeout", 3600)
    devices = _devices(args, check_specs=False)
    settings = Settings(connect_timeout=min(args.timeout, 10), accept_new_host_keys=args.accept_new_host_keys)
    rows: dict[str, dict] = {}
    answers: dict[str, tuple[dict, str | None, list[dict]]] = {}

    with status.SuiteIndexes() as indexes:   # each (mirror, suite, architecture) fetched once for the fleet
        def ask(device: Device) -> None:
            started = time.monotonic()
            facts, older, why = device_status(device.connection, settings, args.timeout)
            row = {"host": device.name, "reach": device.connection.label,
                   "reachable": facts is not None or older is not None, "generation": None, "commit": None,
                   "health": why, "slots": None, "pending": None, "problems": [],
                   "seconds": round(time.monotonic() - started, 2)}
            if facts is not None:   # kiosk status HOST's answer: the same facts, the same health
                gen = facts["generation"] or {}
                row.update(generation=_generation(gen.get("number")),
                           commit=gen.get("commit") if isinstance(gen.get("commit"), str) else None,
                           health=facts["health"] or "unknown (see problems)", slots=facts["slots"],
                           problems=facts["problems"])
                answers[device.name] = (facts, *status.compare(facts, indexes))   # its indexes' fetches start now
            elif older is not None:
                gen, commit, health = generation_health(older)
                row.update(generation=int(gen) if gen.isdigit() else None, commit=commit, health=health,
                           problems=[OLDER])
            rows[device.name] = row

        run_parallel(devices, ask, args.parallel)
        for name, (facts, arch, suites) in answers.items():
            status.count(suites, facts["packages"], arch, indexes)
            rows[name]["pending"] = status.view(name, facts, suites, arch)["pending"]
    ordered = [rows[d.name] for d in devices]
    unknown = [r for r in ordered if status.pending_word(r["pending"]) == "?"]
    if unknown:   # one line for the whole fleet, not one per device
        causes = list(dict.fromkeys(s["note"] for r in unknown for s in r["pending"]["suites"]
                                    if s["state"] == "unavailable"))
        print(f"kiosk: warning: pending fixes not counted on {len(unknown)} device(s) (PENDING ?): {causes[0]}"
              + (f" (and {len(causes) - 1} more: --json says each)" if len(causes) > 1 else ""),
              file=sys.stderr)
    if args.json:
        _dump({"devices": ordered})
    else:
        print(_table(("HOST", "REACHED AS", "REACHABLE", "GEN", "COMMIT", "SLOT", "PENDING", "HEALTH"),
                     [(r["host"], r["reach"], "yes" if r["reachable"] else "NO", r["generation"] or "-",
                       (r["commit"] or "-")[:12], status.slots_word(r["slots"]) if r["host"] in answers else "-",
                       status.pending_word(r["pending"]), r["health"]) for r in ordered]))
    return 0 if all(r["reachable"] and r["health"] == "ok" for r in ordered) else 1


# ---------------------------------------------------------------- build

class _Prefixed:
    """A stream for the pipeline's Log: each line prefixed with the device's name."""

    def __init__(self, name: str):
        self.name = name

    def write(self, text: str) -> None:
        for line in text.splitlines():
            if line.strip():
                print(f"    {self.name}| {line}", file=sys.stderr, flush=True)

    def flush(self) -> None:
        pass


def cmd_build(args) -> int:
    from kiosk.core.files import read_json
    from kiosk.image.pipeline import build

    devices = _devices(args)
    out = Path(args.output).resolve()   # manifests name their images absolutely: "up to date" from anywhere
    rows = []
    started = time.monotonic()
    for number, device in enumerate(devices, 1):
        directory = out / device.name
        assert device.spec is not None
        manifest = read_json(directory / "manifest.json") if (directory / "manifest.json").is_file() else None
        if manifest and manifest.get("specSha256") == device.spec.digest and Path(manifest["image"]).is_file():
            print(f"==> [{number}/{len(devices)}] {device.name}: up to date ({manifest['image']})", file=sys.stderr)
            rows.append({"host": device.name, "image": manifest["image"], "sha256": manifest["imageSha256"],
                         "seconds": 0, "result": "up to date", "stageSeconds": {}})
            continue
        print(f"==> [{number}/{len(devices)}] {device.name}: building for {device.data['hardware']} into "
              f"{directory}", file=sys.stderr, flush=True)
        began = time.monotonic()
        manifest = build(device.spec, device.text, directory, verbose=args.verbose, log=Log(out=_Prefixed(device.name)))
        seconds = time.monotonic() - began
        print(f"==> [{number}/{len(devices)}] {device.name}: {manifest['image']} in {seconds:.0f} s",
              file=sys.stderr, flush=True)
        rows.append({"host": device.name, "image": manifest["image"], "sha256": manifest["imageSha256"],
                     "seconds": round(seconds, 1), "result": "built", "stageSeconds": manifest["stageSeconds"]})
    if args.json:
        _dump({"images": rows, "seconds": round(time.monotonic() - started, 1)})
    else:
        print(_table(("HOST", "RESULT", "SECONDS", "BASE (s)", "IMAGE"),
                     [(r["host"], r["result"], f"{r['seconds']:.0f}", r["stageSeconds"].get("rootfs", "-"),
                       r["image"]) for r in rows]))
    return 0


# ---------------------------------------------------------------- discover

def _quoted(text) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is valid YAML): device-supplied text stays data."""
    return json.dumps(str(text), ensure_ascii=True)


def cmd_discover(args) -> int:
    from kiosk.net.discover import discover

    seconds(args.timeout, "--timeout")
    found = sorted(discover(args.timeout).values(), key=lambda k: (k["host"].lower(), k["service"]))
    by_board: dict[str, list[dict]] = {}
    for kiosk in found:
        by_board.setdefault(kiosk["hardware"] or "unknown", []).append(kiosk)
    print(f"# kiosk fleet discover: {len(found)} kiosk(s) answered over mDNS within {args.timeout:g} s.")
    print("# Each board is a group (a push cannot change a device's board). Add variables, then:")
    print("#   kiosk fleet show THIS_FILE nixiosk.json")
    print("all:\n  children:" if found else "all:\n  hosts: {}")
    for board, kiosks in sorted(by_board.items()):
        print(f"    {_quoted(board)}:")
        if board != "unknown":
            print(f"      vars:\n        hardware: {_quoted(board)}")
        print("      hosts:")
        for kiosk in kiosks:
            name = kiosk["host"].removesuffix(".local")
            note = one_line(f"{' '.join(kiosk['addresses'])}, generation {kiosk['generation'] or '-'}, "
                            f"commit {(kiosk['commit'] or '-')[:12]}, {kiosk['program'] or '-'}")
            print(f"        {_quoted(name)}:   # {note[:120]}")
    return 0


# ---------------------------------------------------------------- the parser

def register(sub) -> None:
    p = sub.add_parser("fleet", help="one spec to many kiosks from an Ansible inventory: show, build, push in "
                                     "waves, status",
                       description="Fleets without a server: an Ansible inventory (YAML or INI) lists the "
                                   "devices; group and host variables override fields of the base spec. "
                                   "See docs/fleet.md.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    def common(q, spec: bool = True) -> None:
        q.add_argument("inventory", metavar="INVENTORY", help="an Ansible inventory file (YAML or INI)")
        if spec:
            q.add_argument("spec", nargs="?", default=None, metavar="SPEC",
                           help="the base spec the variables override (default: nixiosk.json if present)")
        q.add_argument("--limit", metavar="PATTERN",
                       help="only these hosts or groups (Ansible's form: a,b  group  'screen*'  '!x'  '&y')")

    q = actions.add_parser("show", help="each device's resulting nixiosk.json, or its problems",
                           description="Print each device's nixiosk.json (base spec + its variables), checked "
                                       "as `kiosk validate` checks one; every problem on one line naming the host "
                                       "or group and the field; exit 2 when there is any.")
    common(q)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_show)

    q = actions.add_parser("push", help="deploy to every device's configuration.git, in waves",
                           description="Commit each device's nixiosk.json onto its main and push it over ssh; "
                                       "the device validates, switches, health-checks and rolls back as for one "
                                       "git push. First every device is looked at (one whose main already "
                                       "carries its spec is left alone, so a rerun continues where the last "
                                       "stopped), then a canary, then waves. Exit 0 when every device is "
                                       "deployed or unchanged, 1 otherwise, 2 for a bad inventory (nothing "
                                       "deployed).")
    common(q)
    q.add_argument("--batch", type=_whole_number, default=10, metavar="N", help="devices per wave (default 10)")
    q.add_argument("--parallel", type=_whole_number, default=None, metavar="N",
                   help="devices pushed at once, within a wave and when looking (default: the batch size)")
    q.add_argument("--canary", type=_count, default=1, metavar="N",
                   help="devices pushed alone first (default 1; 0: none); a failed canary stops the rollout")
    q.add_argument("--max-failures", default="0", metavar="N|P%",
                   help="failures allowed (a count or a share of the devices); one more stops the rollout "
                        "after the current wave (default 0)")
    q.add_argument("--connect-timeout", type=float, default=10.0, metavar="S",
                   help="seconds to reach each device (default 10)")
    q.add_argument("--accept-new-host-keys", action="store_true",
                   help="trust the host key of a device never reached before (a changed key is still refused)")
    q.add_argument("--allow-rename", action="store_true",
                   help="push to a device whose running hostName differs from the inventory's (refused otherwise: "
                        "a wrong address would give one device another's spec)")
    q.add_argument("-m", "--message", default="kiosk fleet push", help="the commit message")
    q.add_argument("-v", "--verbose", action="store_true", help="show every device's push output as it comes")
    q.add_argument("--json", action="store_true", help="the final table as JSON")
    q.set_defaults(func=cmd_push)

    q = actions.add_parser("status", help="every device: reachable, generation, commit, root slot, pending fixes, "
                                          "health",
                           description="Ask every device (in parallel) the one fixed question of `kiosk status HOST`: "
                                       "reachable, the current generation, its commit, the root slot it booted and the "
                                       "other slot's state (A/B boards; - without slots), how many installed packages "
                                       "Debian's <suite>-security and <suite>-updates have newer (each index fetched "
                                       "once for the fleet; ? when the archive cannot be reached), and health as "
                                       "kiosk status says it. An older kiosk is asked `kiosk generations --json`. "
                                       "Exit 1 when any device is unreachable or not healthy.")
    common(q, spec=False)
    q.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds per device (default 10)")
    q.add_argument("--parallel", type=_whole_number, default=20, metavar="N", help="devices asked at once (default 20)")
    q.add_argument("--accept-new-host-keys", action="store_true", help="as for push")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_status)

    q = actions.add_parser("build", help="one SD image per device (all but the first from the cache)",
                           description="Build every device's image into DIR/HOST/ with `kiosk build`'s "
                                       "pipeline; devices sharing a package set reuse the cached base, so all "
                                       "but the first are configuration-only builds. An image whose spec has "
                                       "not changed is kept. As root or as a user, like kiosk build.")
    common(q)
    q.add_argument("-o", "--output", default="out", metavar="DIR", help="output directory (default: out)")
    q.add_argument("-v", "--verbose", action="store_true", help="stream the tools' output")
    q.add_argument("--json", action="store_true", help="machine-readable summary")
    q.set_defaults(func=cmd_build)

    q = actions.add_parser("discover", help="print an inventory of the kiosks on the LAN (mDNS)",
                           description="Browse the LAN for kiosks (as kiosk discover) and print a YAML "
                                       "inventory of them, one group per board: a start to edit.")
    q.add_argument("--timeout", type=float, default=3.0, metavar="S", help="how long to listen (default 3 s)")
    q.set_defaults(func=cmd_discover)
