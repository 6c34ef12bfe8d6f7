"""`kiosk run`: boot an image in QEMU on this machine, no board needed (as Nixiosk's qemu script does).

    kiosk run [SPEC|IMAGE] [--headless] [--ssh-port N] [--memory 2G]

Given a spec, the image is OUT/<hostName>-<hardware>.img (`kiosk build` makes it);
given an image, its board is read from the image itself (/etc/kiosk/release.json
in the root filesystem, through debugfs), else from the manifest.json beside it.

Everything QEMU needs comes from hardware/<board>.json's "qemu" block (machine,
device tree, console, extra kernel arguments, disk, display and network
devices) and from the image's FAT partition, read with mtools (no root, no
mounting): the kernel, the initramfs, the device tree and cmdline.txt.

The user's image is never written: QEMU boots a sparse copy, grown to a power
of two where the machine needs it (the raspi SD controller) and always larger
than the image, so the device's grow-root-once unit has room to grow into.
The kernel command line is the image's own; only console= is rewritten (QEMU's
serial port for the board, last, so systemd's messages reach the terminal) and
root= only when it names a device that does not exist under QEMU.

The device's SSH port is forwarded to a free port on 127.0.0.1; a QMP monitor
socket stays available (screendump works with -display none too).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from kiosk.core.errors import KioskError, UsageError

# The Debian package that ships each QEMU binary.
QEMU_PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-system-i386": "qemu-system-x86",
    "qemu-system-aarch64": "qemu-system-arm",
    "qemu-system-arm": "qemu-system-arm",
}
# raspi machines have a fixed amount of memory (QEMU refuses any other -m).
FIXED_MEMORY = {"raspi0": "512M", "raspi1ap": "512M", "raspi2b": "1G", "raspi3ap": "512M", "raspi3b": "1G"}
FAT_TYPES = {0x01, 0x04, 0x06, 0x0B, 0x0C, 0x0E}
MiB = 1 << 20
GiB = 1 << 30


# ------------------------------------------------------------------ the image

@dataclass(frozen=True)
class Partition:
    number: int
    type: int
    start: int   # bytes
    size: int    # bytes


def partitions(image: Path) -> list[Partition]:
    """The image's MBR primary partitions (read here: no tool needed)."""
    try:
        with open(image, "rb") as f:
            mbr = f.read(512)
    except OSError as exc:
        raise KioskError(f"{image}: cannot read it: {exc.strerror}") from None
    if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
        raise KioskError(f"{image}: not a disk image (no MBR partition table); give an image made by kiosk build")
    parts = []
    for i in range(4):
        entry = mbr[446 + 16 * i: 462 + 16 * i]
        ptype = entry[4]
        start, count = struct.unpack("<II", entry[8:16])
        if ptype and count:
            parts.append(Partition(i + 1, ptype, start * 512, count * 512))
    return parts


def is_disk_image(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(510)
            return f.read(2) == b"\x55\xaa"
    except OSError:
        return False


def _boot_partition(image: Path) -> Partition:
    for part in partitions(image):
        if part.type in FAT_TYPES:
            return part
    raise KioskError(f"{image}: no FAT boot partition (partition 1 should be FAT32 'RASPIFIRM')")


def _root_partition(image: Path) -> Partition:
    for part in partitions(image):
        if part.type == 0x83:
            return part
    raise KioskError(f"{image}: no Linux root partition")


def _need_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if not path:
        raise KioskError(f"{name} is not installed (apt install {package})")
    return path


def _mtools_env() -> dict:
    return dict(os.environ, MTOOLS_SKIP_CHECK="1", MTOOLS_NO_VFAT="0")


def fat_listing(image: Path, part: Partition) -> list[str]:
    """File names in the FAT partition's top directory."""
    _need_tool("mdir", "mtools")
    result = subprocess.run(["mdir", "-b", "-i", f"{image}@@{part.start}", "::"], capture_output=True, text=True,
                            env=_mtools_env())
    if result.returncode != 0:
        raise KioskError(f"{image}: cannot read the FAT partition: {result.stderr.strip().splitlines()[-1:]}")
    names = []
    for line in result.stdout.splitlines():
        line = line.strip()
        if line.startswith("::/"):
            line = line[3:]
        if line and "/" not in line.rstrip("/"):
            names.append(line.rstrip("/"))
    return sorted(names)


def fat_read(image: Path, part: Partition, name: str) -> bytes:
    _need_tool("mcopy", "mtools")
    result = subprocess.run(["mcopy", "-n", "-i", f"{image}@@{part.start}", f"::{name}", "-"], capture_output=True,
                            env=_mtools_env())
    if result.returncode != 0:
        raise KioskError(f"{image}: cannot read {name} from the FAT partition: "
                         f"{result.stderr.decode(errors='replace').strip()}")
    return result.stdout


def root_read(image: Path, path: str, *, hops: int = 16) -> bytes | None:
    """A file from the image's ext4 root filesystem with debugfs (symlinks followed); None if absent."""
    debugfs = shutil.which("debugfs") or shutil.which("/sbin/debugfs")
    if not debugfs:
        return None
    part = _root_partition(image)
    spec = f"{image}?offset={part.start}"
    for _ in range(hops):
        stat = subprocess.run([debugfs, "-R", f'stat "{path}"', spec], capture_output=True, text=True)
        if "Type: symlink" not in stat.stdout:
            if "Type: regular" not in stat.stdout:
                return None
            result = subprocess.run([debugfs, "-R", f'cat "{path}"', spec], capture_output=True)
            return result.stdout if result.returncode == 0 else None
        match = re.search(r'Fast link dest: "(.*)"', stat.stdout)
        if match:
            target = match.group(1)
        else:
            target = subprocess.run([debugfs, "-R", f'cat "{path}"', spec], capture_output=True,
                                    text=True).stdout.rstrip("\0")
        path = target if target.startswith("/") else os.path.normpath(os.path.join(os.path.dirname(path), target))
    return None


def board_of_image(image: Path) -> tuple[str, str | None]:
    """(board, host name) the image was built for: release.json inside it, else manifest.json beside it,
    else the file name (<host>-<board>.img)."""
    from kiosk.spec.hardware import board_names

    data = root_read(image, "/etc/kiosk/release.json")
    if data:
        with contextlib.suppress(ValueError, AttributeError):
            release = json.loads(data)
            return release["hardware"], release.get("hostName")
    manifest = image.parent / "manifest.json"
    if manifest.is_file():
        with contextlib.suppress(ValueError, KeyError, OSError):
            info = json.loads(manifest.read_text())
            if Path(info["image"]).name == image.name:
                return info["hardware"], info.get("hostName")
    for board in board_names():
        if image.name.endswith(f"-{board}.img"):
            return board, image.name[: -len(f"-{board}.img")]
    raise KioskError(f"{image}: cannot tell which board it is for (no /etc/kiosk/release.json in it, no "
                     "manifest.json beside it); give --board NAME")


# ------------------------------------------------------------------ kernel command line

def qemu_cmdline(cmdline: str, board: dict, *, display: bool, extra: list[str] = ()) -> str:
    """The image's cmdline.txt, with console= for QEMU (the serial port last: /dev/console) and the board's
    QEMU-only arguments; root= is rewritten only when it names a device QEMU does not have."""
    q = board["qemu"]
    words = [w for w in cmdline.split() if not w.startswith("console=")]
    root_device = q.get("rootDevice")
    for i, word in enumerate(words):
        if word.startswith("root=/dev/") and root_device and word != f"root={root_device}":
            # e.g. /dev/mmcblk0p2 on the arm64 virt machine (raspberryPi4): the disk is virtio there
            words[i] = f"root={root_device}"
    consoles = (["console=tty1"] if display else []) + [f"console={q['console']}"]
    for arg in [*q.get("append", []), *extra]:
        if arg not in words:
            words.append(arg)
    return " ".join(consoles + words)


# ------------------------------------------------------------------ the machine

@dataclass
class BootFiles:
    kernel: Path
    initrd: Path | None
    dtb: Path | None
    cmdline: str


def extract_boot_files(image: Path, board: dict, dest: Path) -> BootFiles:
    """Kernel, initramfs, device tree and cmdline.txt from the image's FAT partition, into dest."""
    part = _boot_partition(image)
    names = fat_listing(image, part)
    lower = {n.lower(): n for n in names}
    config = fat_read(image, part, lower["config.txt"]).decode(errors="replace") if "config.txt" in lower else ""
    kernel = initrd = None
    for line in config.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("kernel="):
            kernel = line.split("=", 1)[1].strip()
        elif line.startswith("initramfs "):
            initrd = line.split()[1]
    if kernel is None:
        kernel = lower.get("vmlinuz") or max((n for n in names if n.lower().startswith("vmlinuz")), default=None)
    if initrd is None:
        initrd = lower.get("initrd.img") or max((n for n in names if n.lower().startswith("initrd.img")),
                                                default=None)
    if not kernel or kernel.lower() not in lower:
        raise KioskError(f"{image}: no kernel on the FAT partition (files: {', '.join(names) or 'none'})")
    if "cmdline.txt" not in lower:
        raise KioskError(f"{image}: no cmdline.txt on the FAT partition")
    dest.mkdir(parents=True, exist_ok=True)

    def copy(name: str) -> Path:
        out = dest / name
        out.write_bytes(fat_read(image, part, lower[name.lower()]))
        return out

    dtb = None
    wanted = board["qemu"].get("dtb")
    if wanted:
        name = Path(wanted).name
        if name.lower() not in lower:
            raise KioskError(f"{image}: device tree {name} (hardware/{board['name']}.json qemu.dtb) is not on the "
                             "FAT partition")
        dtb = copy(name)
    return BootFiles(kernel=copy(kernel), initrd=copy(initrd) if initrd and initrd.lower() in lower else None,
                     dtb=dtb, cmdline=fat_read(image, part, lower["cmdline.txt"]).decode(errors="replace").strip())


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not match:
        raise UsageError(f"size {text!r}: give a number with K, M, G or T (e.g. 4G)")
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[match.group(2).upper()]


def disk_size(image_bytes: int, board: dict, requested: int | None = None) -> int:
    """The size of the copy QEMU boots: a power of two for the raspi SD controller; larger than the
    image in any case (at least +256 MiB) so the first boot's grow-root has something to do."""
    power_of_two = board["qemu"].get("imagePowerOfTwo", False)
    if requested is not None:
        if requested < image_bytes:
            raise UsageError(f"--disk-size {requested // MiB} MiB is smaller than the image ({image_bytes // MiB} MiB)")
        if power_of_two and requested & (requested - 1):
            raise UsageError(f"--disk-size: QEMU's {board['qemu']['machine']} SD card must be a power of two "
                             "(e.g. 2G, 4G)")
        return requested
    size = 1 << (image_bytes + 256 * MiB - 1).bit_length()
    return size if power_of_two else max(size, 2 * GiB)


def make_disk(image: Path, dest: Path, size: int) -> None:
    """A sparse copy of image at dest, `size` bytes long (the user's image is never opened for writing)."""
    from kiosk.image.assemble import copy_sparse

    tmp = dest.with_name(f".{dest.name}.tmp")
    with open(tmp, "wb") as f:
        f.truncate(size)
    try:
        copy_sparse(image, tmp, 0)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)


RUN_HEADROOM = 512 * MiB   # what a device writes in a session (journal, grow-root, a push) beyond its image


def check_free_space(image: Path, where: Path, headroom: int = RUN_HEADROOM) -> None:
    """Refuse to start when the copy would not fit: a VM whose disk fills is paused by QEMU without a word.

    The copy is sparse: it needs the image's allocated bytes, plus what the device will write.
    """
    need = image.stat().st_blocks * 512 + headroom
    free = shutil.disk_usage(where).free
    if free < need:
        raise KioskError(f"{where} has {free / GiB:.1f} GiB free; the copy QEMU boots needs "
                         f"{need / GiB:.1f} GiB (the image's data and {headroom // MiB} MiB for what the device "
                         f"writes): free some space, or point KIOSK_CACHE_DIR at a disk with room")


class DiskWatch:
    """Says why a VM stopped when its disk copy cannot be written (virtio: QEMU pauses it silently).

    Listens on a QMP socket of its own (QEMU serves one client per socket; the user's
    --qmp stays free for screenshots) for BLOCK_IO_ERROR, and prints one line.
    """

    def __init__(self, path: Path, where: Path, out):
        import threading
        self.path, self.where, self.out = path, where, out
        self.said = False
        self.thread = threading.Thread(target=self._run, name="kiosk-run-diskwatch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def message(self, event: dict) -> str:
        data = event.get("data", {})
        why = "the host's disk is full" if data.get("nospace") else data.get("reason", "an I/O error on the host")
        action = "QEMU paused the device" if data.get("action") == "stop" else "the device saw an I/O error"
        return (f"kiosk: {action}: its disk copy could not be written ({why}; the copy is in {self.where}); "
                f"free some space and type `cont` on the monitor to go on, or stop it with Ctrl-C")

    def _run(self) -> None:
        try:
            with QMP(self.path, timeout=60) as qmp:
                qmp.sock.settimeout(None)
                for line in iter(qmp.file.readline, ""):
                    event = json.loads(line)
                    if event.get("event") == "BLOCK_IO_ERROR" and not self.said:
                        self.said = True
                        print(self.message(event), file=self.out, flush=True)
        except (OSError, ValueError, KioskError):
            return   # QEMU went away: nothing more to watch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kvm_usable(binary: str) -> bool:
    """KVM for this QEMU binary on this machine: same architecture, a CPU that says it can (vmx/svm on x86;
    /dev/kvm can exist in a sandbox whose guests then never boot), and /dev/kvm making a VM."""
    import fcntl

    machine = os.uname().machine
    if binary == "qemu-system-x86_64" and machine == "x86_64":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        if not re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M):
            return False
    elif not (binary == "qemu-system-aarch64" and machine == "aarch64"):
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.close(fcntl.ioctl(fd, 0xAE01, 0))   # KVM_CREATE_VM
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@dataclass
class Machine:
    """One QEMU invocation for an image: the argv and the files it uses."""

    board: dict
    disk: Path
    boot: BootFiles
    ssh_port: int
    qmp: Path
    headless: bool = True
    memory: str | None = None
    serial_log: Path | None = None
    extra_append: list[str] = field(default_factory=list)
    host_name: str | None = None
    accel: str = "auto"
    watch_qmp: Path | None = None   # a second monitor, kiosk run's own (DiskWatch)

    @property
    def has_display(self) -> bool:
        return bool(self.board["qemu"].get("display"))

    def argv(self) -> list[str]:
        q = self.board["qemu"]
        binary = shutil.which(q["binary"]) or q["binary"]
        args = [binary, "-M", q["machine"]]
        kvm = q["machine"] in ("q35", "pc", "virt") and (
            self.accel == "kvm" or (self.accel == "auto" and kvm_usable(q["binary"])))
        if kvm:
            args += ["-accel", "kvm", "-cpu", "host"]
        else:
            args += ["-accel", "tcg"]
            if q.get("cpu"):
                args += ["-cpu", q["cpu"]]
        if q.get("smp"):
            args += ["-smp", str(q["smp"])]
        args += ["-m", self.memory or q["memory"]]
        args += ["-kernel", str(self.boot.kernel)]
        if self.boot.initrd:
            args += ["-initrd", str(self.boot.initrd)]
        if self.boot.dtb:
            args += ["-dtb", str(self.boot.dtb)]
        args += ["-append", qemu_cmdline(self.boot.cmdline, self.board, display=self.has_display,
                                         extra=self.extra_append)]
        args += [a.replace("{image}", str(self.disk)) for a in q["disk"]]
        for serial in q["serial"]:
            if serial == "mon:stdio" and self.serial_log is not None:
                serial = f"file:{self.serial_log}"
            args += ["-serial", serial]
        if self.serial_log is not None:
            args += ["-monitor", "none"]
        hostfwd = f",hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22"
        args += [a.replace("{hostfwd}", hostfwd) for a in q["network"]]
        args += list(q.get("display", []))
        if self.headless:
            args += ["-display", "none"]
        args += ["-qmp", f"unix:{self.qmp},server=on,wait=off"]
        if self.watch_qmp is not None:
            args += ["-qmp", f"unix:{self.watch_qmp},server=on,wait=off"]
        if self.host_name:
            args += ["-name", self.host_name]
        return args


def check_qemu(board: dict) -> str:
    binary = board["qemu"]["binary"]
    path = shutil.which(binary)
    if not path:
        package = QEMU_PACKAGES.get(binary, "qemu-system")
        raise KioskError(f"{binary} is not installed; it boots {board['name']} images (apt install {package})")
    return path


# ------------------------------------------------------------------ the monitor

class QMP:
    """A minimal QMP client (JSON lines over the unix socket QEMU was given with -qmp)."""

    def __init__(self, path: Path | str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.settimeout(timeout)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise KioskError(f"no QEMU monitor at {path}") from None
                time.sleep(0.2)
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # the greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments) -> object:
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.file.write(json.dumps(message) + "\n")
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                raise KioskError(f"QEMU closed its monitor during {command}")
            reply = json.loads(line)
            if "event" in reply:
                continue
            if "error" in reply:
                raise KioskError(f"QEMU {command}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def ppm_to_png(ppm: bytes) -> bytes:
    """A binary PPM (P6, 8-bit) as PNG, with zlib only."""
    match = re.match(rb"P6\s+(?:#[^\n]*\s+)*(\d+)\s+(\d+)\s+(\d+)\s", ppm)
    if not match:
        raise KioskError("screendump: not a P6 PPM file")
    width, height, maxval = (int(g) for g in match.groups())
    if maxval != 255:
        raise KioskError(f"screendump: PPM maxval {maxval} (expected 255)")
    pixels = ppm[match.end():match.end() + width * height * 3]
    stride = width * 3
    raw = b"".join(b"\0" + pixels[y * stride:(y + 1) * stride] for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def png_pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB bytes) of an 8-bit RGB or RGBA PNG (non-interlaced), with zlib only."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    pos, idat, header = 8, b"", None
    while pos < len(png):
        length, kind = struct.unpack(">I4s", png[pos:pos + 8])
        data = png[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", data)
        elif kind == b"IDAT":
            idat += data
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in (2, 6) or interlace:
        raise ValueError(f"unsupported PNG (depth {depth}, colour type {colour}, interlace {interlace})")
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - bpp] if i >= bpp else 0
            up = prev[i]
            upleft = prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + ((left + up) >> 1)) & 0xFF
            elif kind == 4:
                p = left + up - upleft
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - upleft)
                pred = left if pa <= pb and pa <= pc else (up if pb <= pc else upleft)
                line[i] = (line[i] + pred) & 0xFF
        prev = line
        rows.append(bytes(line) if bpp == 3 else bytes(b for i, b in enumerate(line) if i % 4 != 3))
    return width, height, rows


def screendump(qmp_path: Path | str, dest: Path | str) -> Path:
    """The guest's screen as a PNG at dest (QMP screendump; PNG directly where QEMU can, else PPM converted)."""
    dest = Path(dest).resolve()
    with QMP(qmp_path) as qmp:
        try:
            qmp.execute("screendump", filename=str(dest), format="png")
            if dest.is_file() and dest.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n":
                return dest
        except KioskError:
            pass
        ppm = dest.with_suffix(".ppm")
        qmp.execute("screendump", filename=str(ppm))
    try:
        dest.write_bytes(ppm_to_png(ppm.read_bytes()))
    finally:
        ppm.unlink(missing_ok=True)
    return dest


# ------------------------------------------------------------------ the command

def _resolve_target(args) -> tuple[Path, str | None]:
    """(image, spec path or None) from the positional argument."""
    target = Path(args.target)
    if not target.exists():
        if args.target == "nixiosk.json":
            raise UsageError("no nixiosk.json here: give a spec (kiosk run my.json) or an image "
                             "(kiosk run out/host-board.img)")
        raise UsageError(f"{target}: no such file")
    if target.is_dir():
        raise UsageError(f"{target} is a directory: give a spec or an image file")
    if is_disk_image(target):
        return target, None
    with open(target, "rb") as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"{"):
        raise UsageError(f"{target}: neither a disk image (no MBR partition table) nor a spec (JSON); "
                         "give an image made by kiosk build, or its nixiosk.json")
    from kiosk.spec import load as specmod
    from kiosk.spec.hardware import load_board

    spec = specmod.load(target)
    board = load_board(spec.data["hardware"])
    image = Path(args.output) / f"{spec.data['hostName']}-{board['name']}.img"
    if not image.is_file():
        if not args.build:
            raise KioskError(f"{image} does not exist: build it first with `kiosk build {target}"
                             f"{'' if args.output == 'out' else ' -o ' + shlex.quote(args.output)}` "
                             f"(or `kiosk run --build {target}`)")
    return image, str(target)


def _build(spec_path: str, output: str) -> None:
    from kiosk.image.pipeline import cmd_build

    class _Args:
        spec = spec_path
        verbose = False
    _Args.output = output
    if cmd_build(_Args) != 0:
        raise KioskError("kiosk build failed")


class _StderrRelay:
    """QEMU's stderr to ours, with each known noisy message shown once: with the raspi machines' usb-net,
    slirp reports "Failed to send packet" again and again while the device works normally; the raspi
    SD card model reports every failed write of its disk copy (no pause there, unlike virtio)."""

    REPEATED = (
        (re.compile(r"Slirp: Failed to send packet"), "harmless; repeats hidden"),
        (re.compile(r"sd_blk_(write|read): \w+ error on host side"),
         "the disk copy could not be written or read: is the host's disk full? repeats hidden"),
    )

    def __init__(self, source, dest):
        import threading

        self.source, self.dest = source, dest
        self.seen: set[int] = set()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    def _run(self) -> None:
        for raw in iter(self.source.readline, b""):
            line = raw.decode(errors="replace")
            kind = next((n for n, (pattern, _) in enumerate(self.REPEATED) if pattern.search(line)), None)
            if kind is not None:
                if kind in self.seen:
                    continue
                self.seen.add(kind)
                line = line.rstrip("\n") + f" ({self.REPEATED[kind][1]})\n"
            with contextlib.suppress(OSError, ValueError):
                self.dest.write(line)
                self.dest.flush()


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
    from kiosk.core import paths as resources
    from kiosk.spec.hardware import load_board

    image, spec_path = _resolve_target(args)
    if spec_path and (args.build or not image.is_file()):
        _build(spec_path, args.output)
    image = image.resolve()
    if args.board:
        board_name, host = args.board, None
    else:
        board_name, host = board_of_image(image)
    board = load_board(board_name)
    check_qemu(board)
    q = board["qemu"]
    fixed = FIXED_MEMORY.get(q["machine"])
    if args.memory and fixed and parse_size(args.memory) != parse_size(fixed):
        raise UsageError(f"--memory: QEMU's {q['machine']} machine has a fixed {fixed} of memory")
    if args.memory:
        parse_size(args.memory)
    image_bytes = image.stat().st_size
    size = disk_size(image_bytes, board, parse_size(args.disk_size) if args.disk_size else None)
    port = args.ssh_port or free_port()

    work_parent = resources.cache_dir() / "run"
    work_parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{image.stem}-", dir=work_parent))
    # kiosk run's own monitor socket: a short private path (a unix socket's has at most 107 bytes; the work
    # directory under a deep cache or test directory can be longer, and QEMU then serves nothing there).
    sockets = Path(tempfile.mkdtemp(prefix="kiosk-run-"))
    keep = args.keep or args.disk is not None
    proc = None
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
        if args.print_command:
            print(shlex.join(argv))
            return 0
        out = sys.stderr
        print(f"kiosk: booting {image.name} ({board['name']}) on QEMU {q['machine']}; "
              f"disk: a {size / GiB:.3g} GiB copy{'' if keep else ' (deleted afterwards)'}", file=out)
        print(f"  ssh -p {port} root@localhost", file=out)
        print(f"  git clone ssh://root@localhost:{port}/etc/kiosk/configuration.git", file=out)
        print(f"  monitor (QMP): {qmp}; screenshot: kiosk run --screendump FILE --qmp {qmp}", file=out)
        if machine.serial_log is None:
            print("  serial console below; Ctrl-A X quits QEMU, Ctrl-A C switches to its monitor", file=out)
        else:
            print(f"  serial console: {machine.serial_log}", file=out)
        out.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL if machine.serial_log else None,
                                stderr=subprocess.PIPE)
        relay = _StderrRelay(proc.stderr, sys.stderr)
        relay.start()
        DiskWatch(machine.watch_qmp, disk.parent, sys.stderr).start()
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
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(sockets, ignore_errors=True)
        if keep and (proc is not None or args.print_command):   # (a failure before QEMU leaves nothing to keep)
            print(f"kiosk: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def cmd_screendump(args) -> int:
    path = screendump(args.qmp, args.screendump)
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
                   help="KVM for the qemu target (and raspberryPi4 on an arm64 machine) when this machine has "
                        "it, else TCG emulation (default: auto)")
    p.add_argument("--board", metavar="NAME", help="the board, when the image cannot say")
    p.add_argument("--qmp", metavar="SOCKET", help="path of the QMP monitor socket (default: in the work directory)")
    p.add_argument("--serial-log", metavar="FILE", help="write the serial console to FILE instead of the terminal")
    p.add_argument("--append", action="append", metavar="ARG", help="one more kernel argument (repeatable)")
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
