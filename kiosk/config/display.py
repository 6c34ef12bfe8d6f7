"""The spec's `display` section and the kiosk's self-healing, as files the device runs (notes/screen.md).

cage 0.1.4 (Debian bookworm) decides what is possible: `-r` turns the output 90 degrees clockwise per
use (touch follows: wlroots maps absolute input to the output's transformed box); there is no
wlr-output-management and no wlr-output-power-management, so the mode is an EDID override for the
board's connectors (config.edid), and "off" means kiosk.service stopped and the DRM output powered down by the
fbdev console once cage is no longer the DRM master (`kiosk screen off`, kiosk/device/screen.py).
The pointer is hidden by a cursor theme of transparent images that cage and the program both load.
"""

from __future__ import annotations

import json
import re
import struct

from kiosk.config.edid import edid
from kiosk.config.layer import Layer, file, symlink

UNIT_DIR = "/etc/systemd/system"
HEADER = "# Written by kiosk from nixiosk.json; edit nixiosk.json and git push instead.\n"
SCREEN_SETTINGS = "/etc/kiosk/screen.json"
FIRMWARE_DIR = "/etc/kiosk/firmware"   # firmware_class.path: searched before /lib/firmware
CURSOR_PATH = "/etc/kiosk/cursors"
CURSOR_THEME = "default"   # cage 0.1.4's seat loads the theme "default" (it passes no name to wlroots)
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
URL = re.compile(r"(?:-[A-Za-z0-9_-]*=)?(https?://\S+)", re.I)   # "URL" or "--app=URL"
# Every cursor name cage, Xwayland, foot, GTK and WebKit ask for (X11 names and CSS names): a name the
# theme lacks makes a client fall back to a visible built-in arrow.
CURSOR_NAMES = (
    "left_ptr", "default", "arrow", "top_left_arrow", "text", "xterm", "ibeam", "vertical-text", "pointer", "hand",
    "hand1", "hand2", "pointing_hand", "grab", "grabbing", "openhand", "closedhand", "fleur", "move", "all-scroll",
    "crosshair", "cross", "tcross", "cell", "plus", "wait", "watch", "progress", "left_ptr_watch", "help",
    "question_arrow", "whats_this", "context-menu", "not-allowed", "no-drop", "forbidden", "crossed_circle",
    "copy", "alias", "dnd-copy", "dnd-link", "dnd-move", "dnd-none", "zoom-in", "zoom-out", "col-resize",
    "row-resize", "sb_h_double_arrow", "sb_v_double_arrow", "ew-resize", "ns-resize", "nesw-resize",
    "nwse-resize", "n-resize", "s-resize", "e-resize", "w-resize", "ne-resize", "nw-resize", "se-resize",
    "sw-resize", "top_side", "bottom_side", "left_side", "right_side", "top_left_corner", "top_right_corner",
    "bottom_left_corner", "bottom_right_corner", "size_hor", "size_ver", "size_fdiag", "size_bdiag", "size_all",
    "split_h", "split_v", "h_double_arrow", "v_double_arrow", "right_ptr", "draft", "pencil", "X_cursor",
)


def rotation_flags(spec: dict) -> list[str]:
    """cage's `-r` once per 90 degrees clockwise (cage 0.1.4: each -r adds one quarter turn)."""
    return ["-r"] * (display(spec)["rotation"] // 90)


def display(spec: dict) -> dict:
    """The display section with its defaults (a spec from before the section existed has none)."""
    section = {"rotation": 0, "mode": "auto", "cursor": "hidden", "blanking": "never"}
    section.update(spec.get("display") or {})
    return section


def edid_name(spec: dict) -> str | None:
    """The EDID file display.mode needs, relative to the firmware search path; None for "auto"."""
    mode = display(spec)["mode"]
    return None if mode == "auto" else f"edid/kiosk-{mode.replace('@', '-')}.bin"


def mode_kernel_args(spec: dict, board: dict) -> list[str]:
    """Kernel arguments for display.mode: the board's connectors get an EDID naming only that mode
    (config.edid says why not `video=`), loaded from FIRMWARE_DIR; none for "auto"."""
    name, connectors = edid_name(spec), board.get("displayConnectors", [])
    if not name or not connectors:
        return []
    return [f"firmware_class.path={FIRMWARE_DIR}",
            "drm.edid_firmware=" + ",".join(f"{connector}:{name}" for connector in connectors)]


def mode_files(spec: dict) -> Layer:
    name = edid_name(spec)
    return {f"{FIRMWARE_DIR}/{name}": file(edid(display(spec)["mode"]))} if name else {}


def web_url(argv: list[str]) -> str | None:
    """The first http(s) URL among the program's arguments: the page the kiosk shows."""
    return next((m.group(1) for m in map(URL.fullmatch, argv) if m), None)


def kiosk_environment(spec: dict) -> str:
    """kiosk.service's Environment= lines for the pointer."""
    if display(spec)["cursor"] != "hidden":
        return ""
    return (f"Environment=XCURSOR_PATH={CURSOR_PATH}\nEnvironment=XCURSOR_THEME={CURSOR_THEME}\n"
            "Environment=XCURSOR_SIZE=24\n")


def transparent_cursor(size: int = 24) -> bytes:
    """An Xcursor file holding one fully transparent image (libXcursor's format, little-endian)."""
    image_type, header, chunk_header = 0xFFFD0002, 16, 36
    width = height = 1
    toc = struct.pack("<III", image_type, size, header + 12)
    chunk = struct.pack("<IIIIIIIII", chunk_header, image_type, size, 1, width, height, 0, 0, 0)
    pixels = b"\0\0\0\0" * (width * height)
    return b"Xcur" + struct.pack("<III", header, 0x10000, 1) + toc + chunk + pixels


def cursor_theme() -> Layer:
    """The transparent theme: one image, every name a link to it. Xwayland's cursor manager in cage
    0.1.4 asks for a theme named "left_ptr" (its cursor name passed as the theme): the same theme."""
    base = f"{CURSOR_PATH}/{CURSOR_THEME}"
    layer: Layer = {f"{base}/index.theme": file("[Icon Theme]\nName=kiosk hidden pointer\n"),
                    f"{base}/cursors/left_ptr": file(transparent_cursor())}
    for name in CURSOR_NAMES:
        if name != "left_ptr":
            layer[f"{base}/cursors/{name}"] = symlink("left_ptr")
    layer[f"{CURSOR_PATH}/left_ptr"] = symlink(CURSOR_THEME)
    return layer


def _calendar(days: list[str], time: str, zone: str) -> str:
    """systemd's OnCalendar= for HH:MM on these days in the spec's time zone (all days: no day list)."""
    when = f"*-*-* {time}:00 {zone}"
    return when if len(days) == len(DAYS) else ",".join(d for d in DAYS if d in days) + " " + when


def _next_days(days: list[str]) -> list[str]:
    return [DAYS[(DAYS.index(d) + 1) % 7] for d in days]


def _timer(name: str, what: str, calendar: str) -> str:
    # AccuracySec=1s: systemd's default of a minute would let "off" and "on" a minute apart run together.
    return (HEADER + f"[Unit]\nDescription=Kiosk: {what}\n\n[Timer]\nOnCalendar={calendar}\nAccuracySec=1s\n\n"
            "[Install]\nWantedBy=timers.target\n")


def _oneshot(what: str, argv: str, *, after: str = "", wanted_by: str = "") -> str:
    """A kiosk oneshot; wanted_by: enabled there, and RemainAfterExit (a push that adds or changes an
    enabled unit starts it, and the push's health check wants it "active" afterwards)."""
    unit = HEADER + f"[Unit]\nDescription=Kiosk: {what}\n" + (f"After={after}\n" if after else "") + "\n"
    unit += "[Service]\nType=oneshot\n" + ("RemainAfterExit=yes\n" if wanted_by else "") + f"ExecStart={argv}\n"
    return unit + (f"\n[Install]\nWantedBy={wanted_by}\n" if wanted_by else "")


def _enable(target: str, unit: str) -> tuple[str, object]:
    return f"{UNIT_DIR}/{target}.wants/{unit}", symlink(f"{UNIT_DIR}/{unit}")


def touch_rule(board: dict) -> Layer:
    """Touchscreens belong to the board's first display: libinput hands WL_OUTPUT to wlroots as the device's
    output name, cage 0.1.4 maps the device to that output, and only a mapped device gets the output's
    rotation applied to its touches (wlroots' wlr_cursor apply_output_transform); unmapped, a touch on a
    turned screen would land where the unturned picture was."""
    connectors = board.get("displayConnectors") or []
    if not connectors:
        return {}
    return {"/etc/udev/rules.d/70-kiosk-touch.rules": file(
        HEADER + 'ACTION=="add|change", SUBSYSTEM=="input", KERNEL=="event*", ENV{ID_INPUT_TOUCHSCREEN}=="1", '
        f'ENV{{WL_OUTPUT}}="{connectors[0]}"\n')}


def screen_files(spec: dict) -> Layer:
    """/etc/kiosk/screen.json (what `kiosk screen` reads), the schedule's timers, the idle watcher."""
    section = display(spec)
    blanking = section["blanking"] if section["blanking"] != "never" else None
    schedule = section.get("schedule")
    cec = bool((spec.get("raspberryPi") or {}).get("cecSupport"))
    settings = {"blanking": blanking, "cec": cec, "schedule": schedule}
    layer: Layer = {SCREEN_SETTINGS: file(json.dumps(settings, sort_keys=True) + "\n")}
    if schedule:
        zone = spec["locale"]["timeZone"]
        days = schedule.get("days", list(DAYS))
        on_days = days if schedule["on"] > schedule["off"] else _next_days(days)
        for state, when_days in (("off", days), ("on", on_days)):
            unit = f"kiosk-screen-{state}"
            layer[f"{UNIT_DIR}/{unit}.service"] = file(_oneshot(f"switch the screen {state} (display.schedule)",
                                                                f"/usr/bin/kiosk screen {state} --by schedule"))
            layer[f"{UNIT_DIR}/{unit}.timer"] = file(_timer(unit, f"the screen {state} at {schedule[state]}",
                                                            _calendar(when_days, schedule[state], zone)))
            path, link = _enable("timers.target", f"{unit}.timer")
            layer[path] = link
        # The timers fire only at the times themselves: a kiosk started inside the off window goes dark here.
        layer[f"{UNIT_DIR}/kiosk-screen-boot.service"] = file(_oneshot(
            "the screen off when the boot is inside display.schedule's off window", "/usr/bin/kiosk screen boot",
            after="kiosk.service", wanted_by="multi-user.target"))
        path, link = _enable("multi-user.target", "kiosk-screen-boot.service")
        layer[path] = link
    if blanking:
        layer.update(_daemon("kiosk-screen-idle.service", "the screen off after no input (display.blanking)",
                             "/usr/bin/kiosk screen idle", after="kiosk.service"))
    return layer


def _daemon(name: str, what: str, argv: str, *, after: str, options: str = "") -> Layer:
    """A kiosk service that runs for good (restarted when it ends), enabled in multi-user.target."""
    unit = (HEADER + f"[Unit]\nDescription=Kiosk: {what}\nAfter={after}\n\n"
            f"[Service]\nExecStart={argv}\nRestart=always\nRestartSec=5\n{options}\n"
            "[Install]\nWantedBy=multi-user.target\n")
    path, link = _enable("multi-user.target", name)
    return {f"{UNIT_DIR}/{name}": file(unit), path: link}


def self_healing(spec: dict, argv: list[str]) -> Layer:
    """The hardware watchdog, and the page watcher when the program shows an http(s) URL."""
    layer: Layer = {
        # systemd pets /dev/watchdog0 (bcm2835-wdt on the Pis, iTCO_wdt on q35); a hung kernel stops
        # petting it and the board resets. 30 s: a TCG guest under load still pets it in time.
        "/etc/systemd/system.conf.d/kiosk-watchdog.conf": file(
            HEADER + "[Manager]\nRuntimeWatchdogSec=30s\nRebootWatchdogSec=10min\n"),
    }
    if web_url(argv):
        layer.update(_daemon("kiosk-url-watch.service", "show the page again once its URL answers",
                             "/usr/bin/kiosk watch-url", after="kiosk.service network.target",
                             options="NoNewPrivileges=yes\nProtectHome=yes\nPrivateTmp=yes\n"))
    return layer
