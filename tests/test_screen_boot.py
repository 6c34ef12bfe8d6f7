"""The display section and the self-healing kiosk (issue 20), booted on the qemu target (it has a real display).

One image, booted once (module fixture): display.rotation 90 and display.mode "1024x768@60" (virtio-gpu
accepts only its default 1024x768 or the host window's size: notes/screen.md), the program foot running a
small page loader (python3's urllib, then the page's text on the screen) pointed at a web server on this
host, reached from QEMU's user network as 10.0.2.2. The server is NOT running when the device boots.

In file order:
- rotation and mode: `kiosk screenshot` (the compositor's view) is portrait 768x1024; QEMU's screendump of
  the same moment is the landscape 1024x768 display showing that picture turned, its top at the display's
  left edge (upright on a screen hung turned 90 degrees clockwise); no pointer in the middle of the display;
- the page: the loader shows its error; the server starts; kiosk-url-watch sees the URL answer and restarts
  the kiosk; the screen turns the page's red;
- the program's restarts: killed twice, it comes back each time, the journal saying how it ended and the
  back-off growing;
- a schedule pushed with `git push`, "off" and "on" a minute apart: QEMU's display goes dark ("Display
  output is not active.": the CRTC is off) with kiosk.service stopped, then shows the page again;
- blanking pushed as 20 s: the output goes off without input, a key on QEMU's keyboard lights it again;
- a schedule pushed whose off window holds the present: dark right after the push; a push that removes the
  schedule: the program back on a lit display at once (before, it stayed dark until `kiosk screen on`);
- the watchdog: `echo c > /proc/sysrq-trigger` hangs the kernel (panic, no panic= reboot); iTCO_wdt,
  armed by systemd's RuntimeWatchdogSec, resets the machine and it boots again by itself.
Run: nice -n 19 pytest tests/test_screen_boot.py --basetemp=/var/tmp/screenbt (KIOSK_TEST_CACHE_DIR set).
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from boottools import (ARTIFACTS, KIOSK_JOURNAL, BootedVM, boot_spec, build_boot_image, removed_when_passed,
                       wait_until)
from imagetools import _cache_dir, _shared_dir
from sshd_harness import free_port
from test_boot import _push, boot_key  # noqa: F401 (boot_key: the session's SSH key fixture)

pytestmark = [pytest.mark.root, pytest.mark.xdist_group("boot-screen")]

RED = (200, 30, 30)
# The page paints the terminal red (a background colour, then enough spaces to fill any screen).
PAGE = ("\x1b[48;2;%d;%d;%dm\x1b[2J\x1b[Hkiosk page\n" % RED + " " * 40000).encode()
LOADER = ("import sys, time, urllib.request\n"
          "try:\n"
          "    sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())\n"
          "except Exception as e:\n"
          "    print('cannot load', sys.argv[1], e)\n"
          "sys.stdout.flush()\n"
          "time.sleep(1e9)\n")


class PageServer:
    """The kiosk's web server on this host: started and stopped by the tests."""

    def __init__(self, port: int):
        self.port, self.httpd = port, None

    def start(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; charset=utf-8")
                self.send_header("Content-Length", str(len(PAGE)))
                self.end_headers()
                self.wfile.write(PAGE)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


@dataclass
class Screen:
    vm: BootedVM
    spec: dict
    server: PageServer
    work: Path


@pytest.fixture(scope="module")
def screen(request, tmp_path_factory, boot_key):  # noqa: F811 (the imported fixture)
    if os.geteuid() != 0:
        pytest.skip("building images needs root (the CI runs as root)")
    key, public = boot_key
    shared = _shared_dir(tmp_path_factory)
    server = PageServer(free_port())
    url = f"http://10.0.2.2:{server.port}/"
    program = {"package": "foot", "executable": "/usr/bin/foot",
               "args": ["--", "/usr/bin/python3", "-c", LOADER, url]}
    spec = boot_spec("qemu", public, host="screen-qemu", program=program)
    spec["display"] = {"rotation": 90, "mode": "1024x768@60", "cursor": "hidden", "blanking": "never"}
    image_dir = shared / "boot-screen"
    image, _ = build_boot_image(spec, image_dir, _cache_dir(shared), log=lambda m: print(m, flush=True))
    work = tmp_path_factory.mktemp("vm-screen")
    # its image and VM disk: ~2 GB that go when the module passes (removed_when_passed)
    with removed_when_passed(request.session, [image_dir, work]):
        vm = BootedVM(image, key, work, board="qemu")
        vm.start()
        try:
            print(f"[screen] ssh after {vm.wait_for_ssh(timeout=900):.0f} s", flush=True)
            vm.wait_for_program("/usr/bin/foot", timeout=900)
            yield Screen(vm, spec, server, work)
        finally:
            server.stop()
            vm.stop()


# ---------------------------------------------------------------- pictures

def pixels(path: Path) -> tuple[int, int, list[bytes]]:
    from pngtools import png_pixels
    return png_pixels(Path(path).read_bytes())


def share(path: Path, colour, tolerance: int = 40) -> float:
    """The fraction of (every 8th in both directions) pixel within tolerance of colour."""
    _, _, rows = pixels(path)
    hits = total = 0
    for row in rows[::8]:
        for i in range(0, len(row), 24):
            total += 1
            hits += all(abs(row[i + c] - colour[c]) <= tolerance for c in range(3))
    return hits / total


def turned_difference(portrait: Path, landscape: Path, clockwise: bool) -> float:
    """Mean per-channel difference between the landscape picture and the portrait one turned 90 degrees,
    over the sampled points where either has ink (text, cursor): the dark background would hide a mismatch."""
    pw, ph, prows = pixels(portrait)
    lw, lh, lrows = pixels(landscape)
    assert (pw, ph) == (lh, lw), ((pw, ph), (lw, lh))
    diff = count = 0
    for y in range(0, lh, 6):
        for x in range(0, lw, 6):
            # turning (px, py) clockwise lands it at (ph - 1 - py, px): so landscape (x, y) came from ...
            px, py = (y, ph - 1 - x) if clockwise else (pw - 1 - y, x)
            a = lrows[y][3 * x:3 * x + 3]
            b = prows[py][3 * px:3 * px + 3]
            if max(a) > 80 or max(b) > 80:
                diff += sum(abs(a[c] - b[c]) for c in range(3))
                count += 3
    assert count, "no ink on either picture"
    return diff / count


def screenshots(screen: Screen, name: str) -> tuple[Path, Path]:
    """`kiosk screenshot` and QEMU's screendump, one right after the other (kept in test-artifacts/)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot, dump = ARTIFACTS / f"screen-{name}-kiosk.png", ARTIFACTS / f"screen-{name}-qemu.png"
    result = screen.vm.kiosk_screenshot(shot)
    assert result.returncode == 0, result.stderr
    screen.vm.screendump(dump)
    return shot, dump


def journal(screen: Screen, unit: str) -> str:
    return screen.vm.ssh(f"journalctl -b --no-pager -o cat -u {unit}", check=False).stdout


# ---------------------------------------------------------------- the tests, in order

def test_rotation_90_is_portrait_to_the_program_turned_on_the_display_and_no_pointer(screen):
    time.sleep(5)   # the loader has printed its error; nothing on the screen moves now
    shot, dump = screenshots(screen, "rotated")
    assert pixels(shot)[:2] == (768, 1024), "the compositor's output is portrait: 1024x768 (display.mode) turned"
    assert pixels(dump)[:2] == (1024, 768), "QEMU's display is landscape, in display.mode's 1024x768"
    clockwise, counter = turned_difference(shot, dump, True), turned_difference(shot, dump, False)
    print(f"\n[screen] mean difference where there is ink: the program's picture turned clockwise {clockwise:.1f}, "
          f"counter-clockwise {counter:.1f}")
    # The picture's top is at the display's left edge (turned counter-clockwise on the panel): upright on a
    # screen hung turned 90 degrees clockwise, which is what cage's "-r: rotate 90 degrees clockwise" means.
    assert counter < 5 and clockwise > 40, (clockwise, counter, shot, dump)
    # QEMU's PS/2 mouse gives cage's seat a pointer, so cage draws one in the middle of the output (foot's
    # I-beam there in an image without display.cursor): with the transparent theme the middle is empty
    width, height, rows = pixels(dump)
    middle = [rows[y][3 * x:3 * x + 3] for y in range(height // 2 - 16, height // 2 + 16)
              for x in range(width // 2 - 16, width // 2 + 16)]
    assert max(max(p) for p in middle) < 80, "a pointer is drawn in the middle of the screen"
    cmdline = screen.vm.ssh("cat /proc/cmdline").stdout
    assert "drm.edid_firmware=Virtual-1:edid/kiosk-1024x768-60.bin" in cmdline


def test_the_page_comes_back_once_its_server_answers(screen):
    shot, _ = screenshots(screen, "page-down")
    assert share(shot, RED) < 0.05, "the page cannot be on screen: its server is not running yet"
    assert "does not answer" in journal(screen, "kiosk-url-watch.service")
    screen.server.start()
    started = time.monotonic()

    def red():
        path = ARTIFACTS / "screen-page-up-kiosk.png"
        # while kiosk-url-watch restarts the kiosk there is a moment with no compositor to ask
        return screen.vm.kiosk_screenshot(path).returncode == 0 and share(path, RED) > 0.6

    wait_until("the page on screen after its server started", red, timeout=240)
    print(f"\n[screen] the page was back {time.monotonic() - started:.0f} s after its server started")
    assert "answers again" in journal(screen, "kiosk-url-watch.service")


def test_the_program_restarts_with_a_back_off_and_says_why(screen):
    vm = screen.vm
    for number in (1, 2):
        before = vm.wait_for_program("/usr/bin/foot")
        vm.ssh(f"kill -KILL {before}")
        wait_until("the program back", lambda: (vm.program_pid("/usr/bin/foot") or before) != before, timeout=240)
    lines = vm.ssh(f"{KIOSK_JOURNAL} | grep '^kiosk: the program'", check=False).stdout.splitlines()
    print("\n" + "\n".join(lines[-3:]))
    assert any("restart 1 in 2 s" in line for line in lines), lines
    assert any("restart 2 in 4 s (backing off: it keeps failing)" in line for line in lines), lines


def test_a_pushed_schedule_turns_the_output_off_and_on_again(screen, tmp_path):
    vm = screen.vm
    now = vm.ssh("date +%s").stdout.strip()
    # off at the start of the minute at least 150 s from now (the push takes about a minute), on one minute later
    off_at = (int(now) + 150) // 60 * 60 + 60
    hhmm = lambda t: vm.ssh(f"date -d @{t} +%H:%M").stdout.strip()   # noqa: E731 (the device's time zone)
    schedule = {"off": hhmm(off_at), "on": hhmm(off_at + 60)}

    def change(spec):
        spec["display"]["schedule"] = schedule

    result, lines, _ = _push(screen_as_kiosk(screen), tmp_path, change, "a schedule")
    assert result.returncode == 0, "\n".join(lines)
    assert vm.ssh("systemctl is-active kiosk-screen-off.timer kiosk-screen-on.timer", check=False).stdout.split() == \
        ["active", "active"], vm.ssh("systemctl list-timers --all --no-pager", check=False).stdout

    def kiosk_state() -> str:
        return vm.ssh("systemctl is-active kiosk.service", check=False).stdout.strip()

    def dark():
        # the cheap question first: the screendump is asked only once the kiosk is stopped
        return kiosk_state() == "inactive" and \
            share(vm.screendump(ARTIFACTS / "screen-scheduled-off-qemu.png"), (0, 0, 0), tolerance=8) > 0.99

    def lit():
        return kiosk_state() == "active" and \
            share(vm.screendump(ARTIFACTS / "screen-scheduled-on-qemu.png"), RED) > 0.6

    def journals() -> str:
        return vm.ssh("journalctl -b --no-pager -o short-monotonic -u kiosk-screen-off.service "
                      "-u kiosk-screen-on.service -u kiosk-screen-off.timer -u kiosk-screen-on.timer | tail -30",
                      check=False).stdout

    try:
        wait_until(f"the screen off at {schedule['off']}", dark,
                   timeout=off_at - int(vm.ssh("date +%s").stdout) + 50, every=1)
        print(f"\n[screen] dark at {vm.ssh('date +%T').stdout.strip()} (off at {schedule['off']})")
        wait_until(f"the screen on again at {schedule['on']}", lit,
                   timeout=off_at + 60 - int(vm.ssh("date +%s").stdout) + 120, every=2)
        print(f"[screen] lit again at {vm.ssh('date +%T').stdout.strip()} (on at {schedule['on']})")
    except AssertionError as failed:
        raise AssertionError(f"{failed}\n{journals()}") from None
    off_line = journal(screen, "kiosk-screen-off.service")
    assert "kiosk screen: off (schedule): kiosk.service stopped, the output powered down" in off_line, off_line
    assert "kiosk screen: on (schedule): kiosk.service started" in journal(screen, "kiosk-screen-on.service")


def test_blanking_turns_the_output_off_without_input_and_a_key_turns_it_on(screen, tmp_path):
    """display.blanking pushed as 20 s: nobody touches the VM, the output goes off; a key pressed on QEMU's
    keyboard (QMP input-send-event: the guest's i8042 keyboard, an evdev device) lights it again."""
    from kiosk.qemu.qmp import QMP

    vm = screen.vm

    def change(spec):
        spec["display"].pop("schedule", None)
        spec["display"]["blanking"] = 20

    result, lines, _ = _push(screen_as_kiosk(screen), tmp_path, change, "blanking after 20 s")
    assert result.returncode == 0, "\n".join(lines)

    def dark():
        return vm.ssh("systemctl is-active kiosk.service", check=False).stdout.strip() == "inactive" and \
            share(vm.screendump(ARTIFACTS / "screen-idle-off-qemu.png"), (0, 0, 0), tolerance=8) > 0.99

    wait_until("the screen off after 20 s without input", dark, timeout=180, every=2)
    assert "kiosk screen: off (idle)" in journal(screen, "kiosk-screen-idle.service")
    with QMP(vm.qmp) as qmp:
        for down in (True, False):
            qmp.execute("input-send-event", events=[{"type": "key", "data": {
                "down": down, "key": {"type": "qcode", "data": "shift"}}}])

    def lit():
        return vm.ssh("systemctl is-active kiosk.service", check=False).stdout.strip() == "active" and \
            share(vm.screendump(ARTIFACTS / "screen-idle-on-qemu.png"), RED) > 0.6

    wait_until("the screen on again after a key", lit, timeout=180, every=2)
    assert "kiosk screen: on (input)" in journal(screen, "kiosk-screen-idle.service")

    def never(spec):
        spec["display"]["blanking"] = "never"

    # pushed while the screen may be off again (20 s without input): the health check leaves the stopped kiosk
    # alone, and stopping the idle watcher lights the screen it had switched off
    result, lines, _ = _push(screen_as_kiosk(screen), tmp_path / "again", never, "no blanking")
    assert result.returncode == 0, "\n".join(lines)
    wait_until("the screen on for good once blanking is never", lit, timeout=180, every=2)


def test_a_push_makes_the_screen_follow_a_changed_schedule_at_once(screen, tmp_path):
    """The timers act only at their times: the push's switch itself darkens the screen when the pushed off
    window holds the present, and lights it again (program started, health-checked) when a push removes it."""
    vm = screen.vm
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    if screen.server.httpd is None:   # run alone: the page is the lit picture to look for
        screen.server.start()
    now = int(vm.ssh("date +%s").stdout)
    hhmm = lambda t: vm.ssh(f"date -d @{t} +%H:%M").stdout.strip()   # noqa: E731 (the device's time zone)
    around_now = {"off": hhmm(now - 1800), "on": hhmm(now + 5400)}

    def kiosk_state() -> str:
        return vm.ssh("systemctl is-active kiosk.service", check=False).stdout.strip()

    def lit():
        return kiosk_state() == "active" and share(vm.screendump(ARTIFACTS / "screen-follow-on-qemu.png"), RED) > 0.6

    wait_until("the page on screen", lit, timeout=240, every=2)

    def schedule(spec):
        spec["display"]["blanking"] = "never"
        spec["display"]["schedule"] = around_now

    result, lines, _ = _push(screen_as_kiosk(screen), tmp_path / "in", schedule, "an off window around now")
    assert result.returncode == 0, "\n".join(lines)
    assert "    display.schedule: the screen off (inside its off window)" in lines, lines
    assert vm.ssh("cat /run/kiosk-screen/off").stdout.strip() == "schedule"
    assert kiosk_state() == "inactive"
    assert share(vm.screendump(ARTIFACTS / "screen-follow-off-qemu.png"), (0, 0, 0), tolerance=8) > 0.99
    print(f"\n[screen] dark right after the push of {around_now}")

    def no_schedule(spec):
        spec["display"].pop("schedule", None)

    result, lines, _ = _push(screen_as_kiosk(screen), tmp_path / "out", no_schedule, "no schedule")
    assert result.returncode == 0, "\n".join(lines)
    assert "    display.schedule: the screen on (no schedule now)" in lines, lines
    assert "    kiosk.service: up" in lines, lines   # checked: the program came back
    assert vm.ssh("test -e /run/kiosk-screen/off", check=False).returncode != 0
    vm.wait_for_program("/usr/bin/foot", timeout=120)
    wait_until("the page on screen again", lit, timeout=120, every=2)
    print("[screen] lit with the page again after the push that removed the schedule")


def test_a_hung_kernel_is_reset_by_the_watchdog(screen):
    vm = screen.vm
    assert vm.ssh("cat /sys/class/watchdog/watchdog0/state").stdout.strip() == "active"
    assert vm.ssh("cat /sys/class/watchdog/watchdog0/identity").stdout.strip().startswith("iTCO_wdt")
    boot_id = vm.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()
    # detached, so ssh returns before the kernel stops answering. kernel.panic=0: A/B's grub.cfg has panic=10
    # (a panic reboots by itself); here the crashed kernel must stay hung, so only the watchdog can reset it
    # (sysctl in the foreground: `a && b &` would put both in the background with ssh's output still open)
    vm.ssh("sync; sysctl -q -w kernel.panic=0; nohup sh -c 'sleep 2; echo c > /proc/sysrq-trigger' >/dev/null 2>&1 &",
           timeout=60, shared=False)
    hung = time.monotonic()
    wait_until("the kernel panicked (serial console)", lambda: "Kernel panic" in vm.console(),
               timeout=120, every=2)
    vm._close_shared()

    def new_boot():
        try:
            result = vm.ssh("cat /proc/sys/kernel/random/boot_id", check=False, timeout=30, shared=False)
        except Exception:
            return None
        value = result.stdout.strip()
        return value if result.returncode == 0 and value and value != boot_id else None

    # the watchdog's part: QEMU's WATCHDOG event, which kiosk run tells (iTCO resets at its second expiry)
    wait_until("the watchdog's reset (kiosk run's line)",
               lambda: "the device's watchdog fired (reset)" in vm.run_log.read_text(errors="replace"),
               timeout=300, every=2)
    print(f"\n[screen] the watchdog reset the hung guest {time.monotonic() - hung:.0f} s after the panic")
    # the firmware's part: q35 + OVMF under TCG sometimes never comes back from a reset (notes/ab-update.md,
    # trap 6; the CI saw it here: nothing for 900 s). A real machine's reset line works, so past 240 s
    # without the boot loader's first line the harness power-cycles, and says so.
    seen = len(vm.console())
    try:
        wait_until("the boot loader after the watchdog's reset",
                   lambda: "kiosk-ab:" in vm.console()[seen:], timeout=240, every=5)
    except AssertionError:
        print("[screen] no boot loader 240 s after the watchdog's reset (QEMU's q35 + OVMF reset hang): "
              "power cycle", flush=True)
        vm.power_cycle()
    wait_until("the device back after the watchdog reset", new_boot, timeout=600, every=10)
    print(f"[screen] back {time.monotonic() - hung:.0f} s after the kernel hung")
    assert vm.alive(), "QEMU itself must not have stopped"
    vm.wait_for_program("/usr/bin/foot", timeout=600)


def screen_as_kiosk(screen: Screen):
    """What test_boot's _push expects of its `kiosk` argument: the booted VM and a board name."""
    return type("Booted", (), {"vm": screen.vm, "board": "qemu", "spec": screen.spec})()
