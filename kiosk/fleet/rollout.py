"""A rollout in waves: look at every device, then a canary, then batches, stopping when failures pass the budget.

1. Look (in parallel): fetch each device's main. A device whose main already carries its
   nixiosk.json is left alone ("unchanged"): that is what makes a second run continue where the
   first stopped, without redeploying anything. One that cannot be reached counts as failed now.
2. The canary: the first device(s) that need the change, alone. A failed canary stops the rollout,
   whatever --max-failures says: that is what a canary is for.
3. Waves of --batch devices, --parallel of them at a time. Once failures pass --max-failures, no
   further device is started (those already pushing finish), and the rollout stops after that wave.
   The devices not reached are untouched; they are listed as such.
Every device's result is final in its own push: the device validates, switches, health-checks and
rolls back by itself (kiosk.device.hooks), so an interrupted rollout leaves each device on one
configuration, its main saying which.
"""

from __future__ import annotations

import math
import sys
import tempfile
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from kiosk.core.errors import KioskError, UsageError, one_line
from kiosk.fleet.merge import Device
from kiosk.fleet.remote import DeviceRepo, Outcome, Settings


@dataclass
class Waves:
    batch: int = 10
    parallel: int = 10
    canary: int = 1
    max_failures: int = 0    # failures allowed; one more stops the rollout


@dataclass
class Report:
    devices: list[Device]
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    wave_of: dict[str, str] = field(default_factory=dict)
    stopped: str = ""        # why the rollout stopped before some devices ("" when every device was tried)

    @property
    def failures(self) -> list[str]:
        return [d.name for d in self.devices if d.name in self.outcomes and self.outcomes[d.name].failed]


def failure_budget(text: str, total: int) -> int:
    """--max-failures: a count ('2') or a share of the devices ('10%', rounded down)."""
    value = text.strip()
    try:
        number = float(value[:-1]) if value.endswith("%") else int(value)
    except ValueError:
        raise UsageError(f"--max-failures {one_line(text)[:40]!r} is neither a count (2) nor a percentage "
                         "(10%)") from None
    if not math.isfinite(number) or number < 0 or (value.endswith("%") and number > 100):
        raise UsageError(f"--max-failures {value} must be a count of 0 or more, or a percentage from 0% to 100%")
    return math.floor(total * number / 100) if value.endswith("%") else int(number)


class Progress:
    """Lines to stderr as things happen, whole lines even with many devices working at once."""

    def __init__(self, out=None, verbose: bool = False):
        self.out = out
        self.verbose = verbose
        self.lock = threading.Lock()

    def raw(self, text: str) -> None:
        with self.lock:
            print(one_line(text), file=self.out or sys.stderr, flush=True)

    def stage(self, text: str) -> None:
        self.raw(f"==> {text}")

    def device(self, name: str, text: str) -> None:
        self.raw(f"    {name}: {text}")


def describe(outcome: Outcome) -> str:
    seconds = f" ({outcome.seconds:.1f} s)"
    if outcome.result == "deployed":
        return f"deployed: generation {outcome.generation} is active, commit {outcome.commit[:12]}{seconds}"
    if outcome.result == "unchanged":
        return f"unchanged: main ({outcome.commit[:12]}) already carries its nixiosk.json"
    return f"{outcome.result.upper()}: {outcome.reason}{seconds}"


def run_parallel(items: list, work, workers: int, stop=lambda: False) -> None:
    """work(item) for each item, `workers` at a time; once stop() is true no further item is started."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        queue = iter(items)
        running: set = set()

        def fill() -> None:
            while len(running) < workers and not stop():
                item = next(queue, None)
                if item is None:
                    return
                running.add(pool.submit(work, item))

        fill()
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            running.difference_update(done)
            for future in done:
                future.result()
            fill()


def rollout(devices: list[Device], settings: Settings, waves: Waves, progress: Progress) -> Report:
    report = Report(devices)
    lock = threading.Lock()

    def record(device: Device, outcome: Outcome, wave: str) -> None:
        with lock:
            report.outcomes[device.name] = outcome
            report.wave_of[device.name] = wave
        progress.device(device.name, describe(outcome))

    with tempfile.TemporaryDirectory(prefix="kiosk-fleet-") as tmp:
        repos = {d.name: DeviceRepo(d, settings, Path(tmp) / f"{i}.git") for i, d in enumerate(devices)}

        def look(device: Device) -> None:
            try:
                outcome = repos[device.name].look()
            except KioskError as exc:
                outcome = Outcome("failed", str(exc).splitlines()[0])
            if outcome is not None:
                record(device, outcome, "look")

        progress.stage(f"looking at {len(devices)} device(s): what their main carries ({waves.parallel} at a time)")
        run_parallel(devices, look, waves.parallel)
        todo = [d for d in devices if d.name not in report.outcomes]
        unchanged = sum(o.result == "unchanged" for o in report.outcomes.values())
        progress.stage(f"{len(todo)} to deploy, {unchanged} already on it, {len(report.failures)} failed; "
                       f"{'canary ' + str(min(waves.canary, len(todo))) + ', then ' if waves.canary else ''}"
                       f"waves of {waves.batch}, {waves.parallel} at a time; stop after more than "
                       f"{waves.max_failures} failure(s)")

        def over_budget() -> bool:
            return len(report.failures) > waves.max_failures

        def push(device: Device, wave: str) -> None:
            progress.device(device.name, f"pushing to {device.connection.label} (main was "
                                         f"{repos[device.name].main[:12]})")
            on_line = (lambda text: progress.raw(f"    {device.name}| {text}")) if progress.verbose else None
            try:
                outcome = repos[device.name].push(on_line)
            except KioskError as exc:
                outcome = Outcome("failed", str(exc).splitlines()[0], repos[device.name].main)
            record(device, outcome, wave)

        plan = [("canary", todo[:waves.canary])] if waves.canary and todo else []
        rest = todo[len(plan[0][1]):] if plan else todo
        batches = [rest[i:i + waves.batch] for i in range(0, len(rest), waves.batch)]
        plan += [(f"wave {n}/{len(batches)}", batch) for n, batch in enumerate(batches, 1)]
        for name, wave in plan:
            if over_budget():
                report.stopped = _why(report, waves)
                break
            progress.stage(f"{name}: {_names(wave)}")
            started = time.monotonic()
            run_parallel(wave, lambda d, w=name: push(d, w), waves.parallel, stop=over_budget)
            failed = [d.name for d in wave if d.name in report.outcomes and report.outcomes[d.name].failed]
            progress.stage(f"{name} done in {time.monotonic() - started:.1f} s: "
                           f"{len(wave) - len(failed)} ok, {len(failed)} failed")
            if name == "canary" and failed:
                report.stopped = f"the canary {', '.join(failed)} failed"
                break
    for device in devices:
        if device.name not in report.outcomes:
            report.outcomes[device.name] = Outcome("not reached", "the rollout stopped before it; untouched")
            report.wave_of[device.name] = "-"
    if not any(o.result == "not reached" for o in report.outcomes.values()):
        report.stopped = ""    # every device was tried: the failures say the rest
    if report.stopped:
        progress.stage(f"STOPPED: {report.stopped}; "
                       f"{sum(o.result == 'not reached' for o in report.outcomes.values())} device(s) not reached "
                       "(untouched); run the same command again to continue")
    return report


def _why(report: Report, waves: Waves) -> str:
    return (f"{len(report.failures)} failure(s) ({', '.join(report.failures[:5])}"
            f"{', ...' if len(report.failures) > 5 else ''}), more than --max-failures {waves.max_failures}")


def _names(wave: list[Device], shown: int = 8) -> str:
    names = [d.name for d in wave]
    return " ".join(names[:shown]) + (f" ... ({len(names)} devices)" if len(names) > shown else "")
