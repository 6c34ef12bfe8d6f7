"""`kiosk screenshot`: what the kiosk's screen shows now, as a PNG, taken from its compositor.

On the device, grim reads the screen through cage's wlr-screencopy (cage 0.1.4 offers it), so it
works wherever cage draws: a real HDMI output, QEMU's virtio display, or wlroots' headless output
that `kiosk run` gives QEMU's raspi machines. From the user's machine the same command runs on the
device over ssh (its only login, root with a key) and the PNG comes back on ssh's stdout.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from kiosk.core.errors import KioskError, UsageError
from kiosk.core.files import write_atomic
from kiosk.core.paths import device_root
from kiosk.core.run import run
from kiosk.net import reach

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUNTIME_DIR = "run/kiosk"          # kiosk.service's RuntimeDirectory=: cage's Wayland socket is there
NOT_RUNNING_HINT = "see systemctl status kiosk.service and journalctl -u kiosk.service on the device"


def _check_png(data: bytes, source: str) -> bytes:
    if not data.startswith(PNG_SIGNATURE):
        raise KioskError(f"{source} gave no PNG ({len(data)} bytes)", hint=NOT_RUNNING_HINT)
    return data


def wayland_socket(root: Path) -> Path:
    """cage's socket under kiosk.service's runtime directory (wayland-0 unless that was taken)."""
    runtime = Path(root) / RUNTIME_DIR
    sockets = sorted(p for p in runtime.glob("wayland-*") if not p.name.endswith(".lock")) \
        if runtime.is_dir() else []
    if not sockets:
        raise KioskError(f"the kiosk is not running: no Wayland display in /{RUNTIME_DIR}", hint=NOT_RUNNING_HINT)
    return sockets[0]


def capture_here() -> bytes:
    """The screen of the kiosk this command runs on."""
    socket = wayland_socket(device_root())
    result = run(["grim", "-"], env={"XDG_RUNTIME_DIR": str(socket.parent), "WAYLAND_DISPLAY": socket.name},
                 text=False, timeout=60, what="screenshot (grim)", hint=NOT_RUNNING_HINT)
    return _check_png(result.stdout, "grim")


def capture_remote(ssh: list[str]) -> bytes:
    """The screen of the kiosk `ssh` (reach.ssh_argv) reaches: this same command, run there."""
    result = run([*ssh, "kiosk", "screenshot", "-o", "-"], text=False, timeout=180, what="screenshot",
                 hint="is the kiosk up and your key in its authorizedKeys? (ssh root@HOST)")
    return _check_png(result.stdout, f"the kiosk at {ssh[-1]}")


def cmd_screenshot(args) -> int:
    if args.host:
        data = capture_remote(reach.from_args(args))
    elif (device_root() / "etc/kiosk/release.json").is_file():
        data = capture_here()
    else:
        raise UsageError("this machine is not a kiosk: give the kiosk's HOST (kiosk screenshot HOST)")
    if args.output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return 0
    name = args.host or "kiosk"
    path = Path(args.output or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.png")
    write_atomic(path, data, 0o644)
    print(path)
    return 0


def register(sub) -> None:
    p = sub.add_parser("screenshot", help="save what a kiosk's screen shows now as a PNG",
                       description="Take a PNG of the kiosk's screen from its compositor (grim through cage's "
                                   "screencopy) over SSH. Run on a kiosk itself without HOST.")
    reach.add_arguments(p, optional=True, host_help="the kiosk: its name (lobby.local) or address "
                                                     "(none: this machine, when it is a kiosk)")
    p.add_argument("-o", "--output", metavar="FILE", help="where to save it ('-': standard output; default: "
                                                         "HOST-YYYYmmdd-HHMMSS.png here)")
    p.set_defaults(func=cmd_screenshot)
