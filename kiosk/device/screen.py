"""`kiosk screen off|on|idle` on the device: the screen off and on again without the compositor's help.

cage 0.1.4 offers no wlr-output-power-management, and while it runs it is the DRM master, so nothing
else may change the output. So "off" stops kiosk.service (cage gives the DRM device back), then asks
the kernel's fbdev console to power the output down (FB_BLANK_POWERDOWN on /sys/class/graphics/fb*:
the DRM fbdev helper turns the CRTC off), and with raspberryPi.cecSupport tells the TV to go to
standby over HDMI-CEC. "on" undoes it in the opposite order and starts kiosk.service again.

display.schedule's timers run `screen off|on --by schedule`; display.blanking runs `screen idle`,
which watches every input device itself (evdev, as root, not grabbing: cage still gets every event)
and switches the screen off after the spec's seconds without input and on at the next touch or key.
The screen that the schedule switched off is not switched on by input: /run/kiosk-screen/off says who
switched it off. Settings come from /etc/kiosk/screen.json (config.display renders it).
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time
from pathlib import Path

from kiosk.config.display import DAYS
from kiosk.core.errors import KioskError
from kiosk.core.paths import device_root
from kiosk.core.run import run

FB_UNBLANK, FB_BLANK_POWERDOWN = "0", "4"
STATE = "run/kiosk-screen/off"
CEC_DEVICE = "dev/cec0"


def settings(root: Path) -> dict:
    path = Path(root) / "etc/kiosk/screen.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KioskError(f"{path} cannot be read ({exc})", hint="push the spec again (it renders this file)") from None


def _say(line: str) -> None:
    print(f"kiosk screen: {line}", flush=True)


def _framebuffers(root: Path) -> list[Path]:
    return sorted((Path(root) / "sys/class/graphics").glob("fb[0-9]*/blank"))


def _blank(root: Path, value: str) -> None:
    for blank in _framebuffers(root):
        try:
            blank.write_text(value + "\n")
        except OSError as exc:   # EBUSY: a DRM master still holds the output
            _say(f"{blank.parent.name}: cannot {'power down' if value != FB_UNBLANK else 'wake'} ({exc.strerror})")


def _cec(root: Path, on: bool) -> None:
    """The TV itself, over HDMI-CEC: standby, or image-view-on (cec-ctl of v4l-utils, the kernel's CEC API)."""
    device = Path(root) / CEC_DEVICE
    if not settings(root).get("cec") or not device.exists():
        return
    message = "--image-view-on" if on else "--standby"
    result = run(["cec-ctl", "-d", str(device), "--playback", "--to", "0", message], check=False, timeout=30,
                 what="cec-ctl")
    _say(f"HDMI-CEC {message[2:]}: {'sent' if result.returncode == 0 else 'failed (exit %d)' % result.returncode}")


def who_switched_off(root: Path) -> str | None:
    path = Path(root) / STATE
    return path.read_text().strip() if path.exists() else None


def comes_on(by: str) -> str:
    """When a screen switched off by `by` comes on again (and kiosk.service starts)."""
    return {"schedule": "at display.schedule's \"on\"", "idle": "at the next touch or key"}.get(
        by, "with `kiosk screen on`")


def stopped_on_purpose(root: Path, problems: list[str], unit: str) -> tuple[list[str], str | None]:
    """A health check's problems without those of `unit` (kiosk.service) when the screen is switched off by
    now: the schedule's "off", blanking or kiosk-screen-boot.service stopped it during the check, on purpose
    (screen_off records who before it stops the unit). Returns (the problems left, who switched it off or None)."""
    off_by = who_switched_off(root)
    if not off_by or not any(p.startswith(unit + ":") for p in problems):
        return problems, None
    return [p for p in problems if not p.startswith(unit + ":")], off_by


def screen_off(root: Path, by: str) -> None:
    state = Path(root) / STATE
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(by + "\n")
    run(["systemctl", "stop", "kiosk.service"], timeout=180, what="systemctl stop kiosk.service")
    # cage 0.1.4 aborts while it shuts down on SIGTERM (wl_display_terminate's assertion, seen with
    # KillMode=control-group and mixed), so a stop leaves the unit "failed": it was stopped on purpose
    run(["systemctl", "reset-failed", "kiosk.service"], check=False, timeout=60)
    _blank(root, FB_BLANK_POWERDOWN)
    _cec(root, on=False)
    _say(f"off ({by}): kiosk.service stopped, the output powered down")


def screen_on(root: Path, by: str) -> None:
    _cec(root, on=True)
    _blank(root, FB_UNBLANK)
    (Path(root) / STATE).unlink(missing_ok=True)
    run(["systemctl", "start", "--no-block", "kiosk.service"], timeout=60, what="systemctl start kiosk.service")
    _say(f"on ({by}): kiosk.service started")


class InputWatch:
    """Every /dev/input/event*, read without grabbing; new devices are picked up every few seconds."""

    def __init__(self, root: Path):
        self.directory = Path(root) / "dev/input"
        self.fds: dict[str, int] = {}
        self.scanned = 0.0

    def _scan(self) -> None:
        for path in self.directory.glob("event*"):
            if str(path) not in self.fds:
                try:
                    self.fds[str(path)] = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError:
                    continue
        self.scanned = time.monotonic()

    def wait(self, timeout: float) -> bool:
        """True when any input arrived within timeout seconds."""
        if time.monotonic() - self.scanned > 5:
            self._scan()
        ready, _, _ = select.select(list(self.fds.values()), [], [], max(0.0, min(timeout, 5.0)))
        active = False
        for fd in ready:
            try:
                active |= bool(os.read(fd, 4096))
            except OSError:   # unplugged
                path = next(p for p, f in self.fds.items() if f == fd)
                os.close(self.fds.pop(path))
        return active


def idle(root: Path) -> int:
    """Until stopped; stopping it (a push that sets blanking to "never") lights a screen it switched off."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        return _idle_loop(root)
    finally:
        if who_switched_off(root) == "idle":
            screen_on(root, "blanking stopped")


def _idle_loop(root: Path) -> int:
    watch = InputWatch(root)
    last, seconds = time.monotonic(), None
    while True:
        # read every round: a push that changes display.blanking changes only screen.json
        now_seconds = settings(root).get("blanking")
        if now_seconds != seconds:
            seconds = now_seconds
            _say(f"switching the screen off after {seconds} s without input" if seconds else
                 "display.blanking is \"never\"; nothing to do")
        if not seconds:
            return 0
        if watch.wait(seconds - (time.monotonic() - last)):
            last = time.monotonic()
            if who_switched_off(root) == "idle":
                screen_on(root, "input")
        elif time.monotonic() - last >= seconds and who_switched_off(root) is None:
            screen_off(root, "idle")


def in_off_window(schedule: dict, now: time.struct_time) -> bool:
    """Whether display.schedule has the screen off at `now` (local time): from "off" on each of its days
    until "on" (the next day when "on" is earlier, as its timers run)."""
    days = schedule.get("days") or list(DAYS)
    today, yesterday = DAYS[now.tm_wday], DAYS[(now.tm_wday - 1) % 7]
    minute = f"{now.tm_hour:02d}:{now.tm_min:02d}"
    off, on = schedule["off"], schedule["on"]
    if off < on:
        return today in days and off <= minute < on
    return (today in days and minute >= off) or (yesterday in days and minute < on)


def at_boot(root: Path, now: time.struct_time | None = None) -> bool:
    """A kiosk started inside the schedule's off window goes dark at once (its timers only fire at the
    times themselves). Returns whether it switched the screen off."""
    schedule = settings(root).get("schedule")
    if not schedule or not in_off_window(schedule, now or time.localtime()):
        return False
    screen_off(root, "schedule")
    return True


def cmd_screen(args) -> int:
    root = device_root()
    if not (root / "etc/kiosk/release.json").is_file():
        raise KioskError("kiosk screen runs on a kiosk device", hint="ssh root@HOST kiosk screen off")
    if args.action == "boot":
        if not at_boot(root):
            _say("on: not inside display.schedule's off window")
    elif args.action == "off":
        screen_off(root, args.by)
    elif args.action == "on":
        screen_on(root, args.by)
    else:
        return idle(root)
    return 0


def register(sub) -> None:
    p = sub.add_parser("screen", help="on the device: switch the screen off or on, or off after no input "
                                      "(display.schedule and display.blanking run this)",
                       description="Switch this kiosk's screen off (kiosk.service stopped, the output powered down, "
                                   "the TV to standby over HDMI-CEC with raspberryPi.cecSupport) or on again; "
                                   "'idle' switches it off after display.blanking seconds without input.")
    p.add_argument("action", choices=("off", "on", "idle", "boot"),
                   help="boot: off if the time is inside display.schedule's off window (kiosk-screen-boot.service)")
    p.add_argument("--by", default="hand", choices=("hand", "schedule", "idle", "input"),
                   help="who asks (the schedule's 'off' is not undone by input)")
    p.set_defaults(func=cmd_screen)
