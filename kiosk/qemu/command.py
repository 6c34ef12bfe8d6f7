"""`kiosk run`: boot an image in QEMU on this machine, no board needed (as Nixiosk's qemu script does).

    kiosk run [SPEC|IMAGE] [--headless] [--ssh-port N] [--memory 2G]

Given a spec, the image is OUT/<hostName>-<hardware>.img (`kiosk build` makes it);
given an image, its board is read from the image itself (/etc/kiosk/release.json
in the root filesystem, through debugfs), else from the manifest.json beside it.

QEMU boots a copy (qemu.disk), with the command line qemu.machine makes. The device's SSH
port is forwarded to a free port on 127.0.0.1; a QMP monitor socket stays available
(screendump works with -display none too).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import stat
import sys
import tempfile
from pathlib import Path

from kiosk.core import paths
from kiosk.core.errors import KioskError, UsageError, one_line
from kiosk.core.inputs import file_kind, open_regular
from kiosk.core.run import DEVNULL, PIPE, TimeoutExpired, start
from kiosk.image.uboot import QEMU_FILE
from kiosk.image.mbr import boot_partition
from kiosk.qemu.disk import GiB, board_of_image, check_free_space, disk_size, fat_write, make_disk
from kiosk.qemu.machine import FIXED_MEMORY, Machine, check_qemu, extract_boot_files, free_port, qemu_env
from kiosk.qemu.qmp import screendump
from kiosk.qemu.watch import MonitorWatch, StderrRelay


def parse_size(text: str, option: str = "size") -> int:
    """'4G' -> 4 << 30; a size that is not a whole positive number of at most 15 digits is a UsageError."""
    match = re.fullmatch(r"\s*([0-9]{1,15})\s*([KMGT]?)(i?B)?\s*", text, re.I | re.A)
    if not match or int(match.group(1)) == 0:
        raise UsageError(one_line(f"{option} {text[:40]!r}{'...' if len(text) > 40 else ''} is not a size"),
                         hint="give a whole number with K, M, G or T (e.g. 4G)")
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[match.group(2).upper()]


def _check_options(args) -> None:
    """The numbers and files of the command line, before anything is read or started."""
    if not 0 <= args.ssh_port <= 65535:
        raise UsageError(f"--ssh-port {args.ssh_port} is not a TCP port", hint="give 1-65535, or leave it out for a free one")
    for option, value in (("--memory", args.memory), ("--disk-size", args.disk_size)):
        if value is not None:
            parse_size(value, option)
    if args.disk:
        try:
            mode = os.stat(args.disk).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return   # made from the image
        except OSError as exc:
            raise UsageError(one_line(f"--disk {args.disk}: {exc.strerror}")) from None
        if not stat.S_ISREG(mode):
            raise UsageError(one_line(f"--disk {args.disk} is {file_kind(mode)}, not a disk file"),
                             hint="give a file (made from the image when it does not exist)")


def _resolve_target(args) -> tuple[Path, str | None]:
    """(image, spec path or None) from the positional argument."""
    target = Path(args.target)
    if args.target == "nixiosk.json" and not os.path.lexists(target):
        raise UsageError("no nixiosk.json here",
                         hint="give a spec (kiosk run my.json) or an image (kiosk run out/host-board.img)")
    # A regular file only, checked before it is opened: a FIFO would block the open, /dev/zero never ends.
    fd = open_regular(target, "spec or image", hint="give a spec or an image file")
    try:
        head = os.pread(fd, 512, 0)
    except OSError as exc:
        raise KioskError(one_line(f"cannot read {target}: {exc.strerror}")) from None
    finally:
        os.close(fd)
    if len(head) == 512 and head[510:] == b"\x55\xaa":   # an MBR: a disk image
        return target, None
    if not head[:64].lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        raise UsageError(f"{target}: neither a disk image (no MBR partition table) nor a spec (JSON)",
                         hint="give an image made by kiosk build, or its nixiosk.json")
    from kiosk.spec import load as specmod
    from kiosk.spec.hardware import load_board

    spec = specmod.load(target)
    board = load_board(spec.data["hardware"])
    image = Path(args.output) / f"{spec.data['hostName']}-{board['name']}.img"
    if not image.is_file():
        if not args.build:
            raise KioskError(f"{image} does not exist",
                             hint=f"build it first with `kiosk build {target}"
                                  f"{'' if args.output == 'out' else ' -o ' + shlex.quote(args.output)}` "
                                  f"(or `kiosk run --build {target}`)")
    return image, str(target)


def _build(spec_path: str, output: str) -> None:
    from kiosk.image.commands import cmd_build

    class _Args:
        spec = spec_path
        verbose = False
    _Args.output = output
    if cmd_build(_Args) != 0:
        raise KioskError("kiosk build failed")


class _Stopped(Exception):
    """SIGTERM or SIGHUP: stop QEMU, clean up, exit 0."""


def _stop(signum, frame):
    raise _Stopped()


def cmd_run(args) -> int:
    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run(args)
    except _Stopped:
        return 0
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _run(args) -> int:
    from kiosk.spec.hardware import load_board

    _check_options(args)
    image, spec_path = _resolve_target(args)
    if spec_path and (args.build or not image.is_file()):
        _build(spec_path, args.output)
    os.close(open_regular(image, "image", hint="rebuild it with kiosk build"))   # (a spec's image may be anything)
    image = image.resolve()
    if args.board:
        board_name, host = args.board, None
    else:
        board_name, host = board_of_image(image)
    board = load_board(board_name)
    check_qemu(board)
    q = board["qemu"]
    if args.append and q.get("firmware"):
        raise UsageError(f"--append: {board['name']} images boot through their own boot loader, which sets the "
                         "kernel command line", hint="change it in grub/grub.cfg on the image's FAT partition")
    fixed = FIXED_MEMORY.get(q["machine"])
    if args.memory and fixed and parse_size(args.memory, "--memory") != parse_size(fixed):
        raise UsageError(f"--memory: QEMU's {q['machine']} machine has a fixed {fixed} of memory")
    image_bytes = image.stat().st_size
    size = disk_size(image_bytes, board, parse_size(args.disk_size, "--disk-size") if args.disk_size else None)
    port = args.ssh_port or free_port()

    work_parent = paths.cache_dir() / "run"
    work_parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{image.stem}-", dir=work_parent))
    # kiosk run's own monitor socket: a short private path (a unix socket's has at most 107 bytes; the work
    # directory under a deep cache or test directory can be longer, and QEMU then serves nothing there).
    sockets = Path(tempfile.mkdtemp(prefix="kiosk-run-"))
    keep = args.keep   # --disk FILE lives outside the work directory and is never deleted
    proc = None
    printed = False
    try:
        boot = extract_boot_files(image, board, work)
        disk = Path(args.disk).resolve() if args.disk else work / "disk.img"
        if disk == image:
            raise UsageError("--disk must not be the image itself (kiosk run never writes to your image)")
        if not disk.exists() and not args.print_command:
            check_free_space(image, disk.parent)
            make_disk(image, disk, size)
        qmp = Path(args.qmp).resolve() if args.qmp else work / "qmp.sock"
        headless = args.headless
        if not headless and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            print("kiosk: no graphical session here ($DISPLAY and $WAYLAND_DISPLAY are unset): running without a "
                  "window; take a picture with: kiosk run --screendump", file=sys.stderr)
            headless = True
        machine = Machine(board=board, disk=disk, boot=boot, ssh_port=port, qmp=qmp, headless=headless,
                          memory=args.memory, serial_log=Path(args.serial_log).resolve() if args.serial_log else None,
                          extra_append=list(args.append or []), host_name=host, accel=args.accel,
                          watch_qmp=None if args.print_command else sockets / "watch.sock")
        argv = machine.argv()
        if machine.qemu_file is not None:   # raspi0's U-Boot ELF: what -dtb/-append would carry, for the copy's FAT
            (work / QEMU_FILE).write_text(machine.qemu_file)
        env = qemu_env(board)
        if args.print_command:
            print(shlex.join([*(f"{k}={v}" for k, v in env.items()), *argv]))
            printed = True
            return 0
        if machine.qemu_file is not None:
            fat_write(disk, boot_partition(disk), QEMU_FILE, work / QEMU_FILE)
        out = sys.stderr
        print(f"kiosk: booting {image.name} ({board['name']}) on QEMU {q['machine']}; "
              + (f"disk: {disk} (kept)" if args.disk else
                 f"disk: a {size / GiB:.3g} GiB copy{'' if keep else ' (deleted afterwards)'}"), file=out)
        print(f"  ssh -p {port} root@localhost", file=out)
        print(f"  git clone ssh://root@localhost:{port}/etc/kiosk/configuration.git", file=out)
        if machine.has_display:
            print(f"  monitor (QMP): {qmp}; screenshot: kiosk run --screendump FILE --qmp {qmp}", file=out)
        else:
            # hardware/<board>.json's qemu.append sets WLR_BACKENDS=headless for this VM only (notes/boot.md)
            print(f"  QEMU's {q['machine']} gives Debian's kernel no display: cage draws on wlroots' headless "
                  f"output; see it with: kiosk screenshot localhost -p {port}", file=out)
            print(f"  monitor (QMP): {qmp}", file=out)
        if machine.serial_log is None:
            print("  serial console below; Ctrl-A X quits QEMU, Ctrl-A C switches to its monitor", file=out)
        else:
            print(f"  serial console: {machine.serial_log}", file=out)
        out.flush()
        # start(), not run(): QEMU is long-lived and owns the terminal (serial console, Ctrl-A), we relay its stderr.
        proc = start(argv, env=env, stdin=DEVNULL if machine.serial_log else None, stderr=PIPE, what="kiosk run")
        relay = StderrRelay(proc.stderr, sys.stderr)
        relay.start()
        MonitorWatch(machine.watch_qmp, disk.parent, sys.stderr).start()
        code = proc.wait()
        relay.join(timeout=5)
        if code not in (0, -signal.SIGTERM):
            raise KioskError(f"QEMU exited with status {code}" + (f" (command: {shlex.join(argv)})" if args.debug
                                                                   else ""))
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(sockets, ignore_errors=True)
        if keep and (proc is not None or printed):   # (a failure before QEMU leaves nothing to keep)
            print(f"kiosk: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def cmd_screendump(args) -> int:
    try:   # the socket of a running VM, not a path to wait for (nor a FIFO or a file to connect to)
        mode = os.stat(args.qmp).st_mode
    except OSError as exc:
        raise UsageError(one_line(f"--qmp {args.qmp}: {exc.strerror}"),
                         hint="give the QMP socket kiosk run printed for the running VM") from None
    if not stat.S_ISSOCK(mode):
        raise UsageError(one_line(f"--qmp {args.qmp} is {file_kind(mode)}, not a socket"),
                         hint="give the QMP socket kiosk run printed for the running VM")
    path = screendump(args.qmp, args.screendump, timeout=10)
    print(path)
    return 0


def register(sub) -> None:
    p = sub.add_parser("run", help="boot an image in QEMU on this machine (no board needed)",
                       description="Boot a kiosk image in QEMU, as the board would, with the device's SSH port "
                                   "forwarded to localhost. Never writes to the image: QEMU boots a copy.")
    p.add_argument("target", nargs="?", default="nixiosk.json", metavar="SPEC|IMAGE",
                   help="a spec (boots OUT/<hostName>-<hardware>.img) or an image file (default: nixiosk.json)")
    p.add_argument("-o", "--output", default="out", metavar="DIR", help="where kiosk build put the image (default: out)")
    p.add_argument("--build", action="store_true", help="build the spec's image first (kiosk build)")
    p.add_argument("--headless", action="store_true", help="no window (-display none); the QMP monitor still "
                                                           "takes screenshots")
    p.add_argument("--ssh-port", type=int, default=0, metavar="N", help="localhost port for the device's SSH "
                                                                        "(default: a free one)")
    p.add_argument("--memory", metavar="SIZE", help="guest memory, e.g. 2G (default: the board's)")
    p.add_argument("--disk-size", metavar="SIZE", help="size of the copy QEMU boots (default: the next power "
                                                       "of two above the image + 256 MiB)")
    p.add_argument("--disk", metavar="FILE", help="keep the disk QEMU writes here (made from the image if "
                                                  "missing, reused if present: the device's state survives)")
    p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="KVM for the qemu target when this machine has it, else TCG emulation (default: auto; "
                        "QEMU's raspi machines always emulate)")
    p.add_argument("--board", metavar="NAME", help="the board, when the image cannot say")
    p.add_argument("--qmp", metavar="SOCKET", help="path of the QMP monitor socket (default: in the work directory)")
    p.add_argument("--serial-log", metavar="FILE", help="write the serial console to FILE instead of the terminal")
    p.add_argument("--append", action="append", metavar="ARG", help="one more kernel argument (repeatable; boards QEMU boots with -kernel: not the qemu target, whose GRUB sets the command line)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (disk copy, kernel, initrd)")
    p.add_argument("--print-command", action="store_true", help="print the QEMU command line and exit")
    p.add_argument("--screendump", metavar="FILE", help="with --qmp SOCKET: save a running VM's screen as PNG "
                                                        "and exit")
    p.set_defaults(func=_dispatch)


def _dispatch(args) -> int:
    if args.screendump:
        if not args.qmp:
            raise UsageError("--screendump needs --qmp SOCKET (the socket kiosk run printed)")
        return cmd_screendump(args)
    return cmd_run(args)
