"""The QEMU command line for an image: the board's "qemu" block plus the image's own boot files.

Everything QEMU needs comes from hardware/<board>.json's "qemu" block (machine, device tree,
console, extra kernel arguments, disk, display and network devices) and from the image's FAT
partition: the kernel, the initramfs, the device tree and cmdline.txt. The kernel command line
is the image's own; only console= is rewritten (QEMU's serial port for the board, last, so
systemd's messages reach the terminal) and root= only when it names a device that does not
exist under QEMU. Boards with qemu.firmware (the qemu target: OVMF) boot the disk's own boot
loader instead (GRUB on the FAT picks root slot A or B): no -kernel, -initrd or -append. A/B
Raspberry Pis name U-Boot as config.txt's kernel: it is QEMU's -kernel, with the device tree and the
command line QEMU hands it as the Pi's firmware would; U-Boot loads the chosen slot's kernel and initrd.
QEMU's raspi2b starts U-Boot as a uImage (qemu.ubootLoadAddress, made from the FAT's u-boot.bin). The
Pi 4's raspi4b is QEMU 9.0+: its board names an unpacked newer QEMU (qemu.release), and the FAT's tree gets
edits for what that machine lacks (qemu.dtbEdits) on kiosk run's copy.
QEMU's raspi0 and raspi1ap run only U-Boot's ELF (qemu.ubootElf, read from the image's root slot), and hand
an ELF neither -dtb nor -append: kiosk run writes the same into kiosk-qemu.txt on its disk copy's FAT (qemu_file), which
boot.scr reads when no firmware device tree came (kiosk.image.uboot).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path

from kiosk.core.errors import KioskError
from kiosk.core.run import run
from kiosk.image.bootfiles import edit_device_tree
from kiosk.image.mbr import boot_partition
from kiosk.qemu.disk import fat_listing, fat_read, root_read

# The Debian package that ships each QEMU binary.
QEMU_PACKAGES = {
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-system-i386": "qemu-system-x86",
    "qemu-system-aarch64": "qemu-system-arm",
    "qemu-system-arm": "qemu-system-arm",
}
# raspi machines have a fixed amount of memory (QEMU refuses any other -m).
FIXED_MEMORY = {"raspi0": "512M", "raspi1ap": "512M", "raspi2b": "1G", "raspi3ap": "512M", "raspi3b": "1G",
                "raspi4b": "2G"}
# A newer QEMU than the system's, for machines bookworm's 7.2 lacks (qemu.release: raspi4b is QEMU 9.0+):
# scripts/install-deps.sh test unpacks that suite's qemu-system-arm and its modules here, beside the system's
# QEMU (which every other board keeps). Its modules are found through QEMU_MODULE_DIR: without it the binary
# loads the system QEMU's modules ("Only modules from the same build can be loaded").
UNPACKED_QEMU = Path("/opt/kiosk/qemu")


def qemu_cmdline(cmdline: str, board: dict, *, display: bool, extra: list[str] = ()) -> str:
    """The image's cmdline.txt, with console= for QEMU (the serial port last: /dev/console) and the board's
    QEMU-only arguments; root= is rewritten only when it names a device QEMU does not have."""
    q = board["qemu"]
    words = [w for w in cmdline.split() if not w.startswith("console=")]
    root_device = q.get("rootDevice")
    for i, word in enumerate(words):
        if word.startswith("root=/dev/") and root_device and word != f"root={root_device}":
            # a machine that attaches the card under another name than the board's (qemu.rootDevice)
            words[i] = f"root={root_device}"
    consoles = (["console=tty1"] if display else []) + [f"console={q['console']}"]
    for arg in [*q.get("append", []), *extra]:
        if arg not in words:
            words.append(arg)
    return " ".join(consoles + words)


@dataclass
class BootFiles:
    kernel: Path
    initrd: Path | None
    dtb: Path | None
    cmdline: str
    elf: bool = False   # U-Boot's ELF (qemu.ubootElf): no -initrd/-dtb/-append, Machine.qemu_file instead


def extract_boot_files(image: Path, board: dict, dest: Path) -> BootFiles | None:
    """Kernel, initramfs, device tree and cmdline.txt from the image's FAT partition, into dest; None for a
    board whose firmware boots the disk itself (qemu.firmware: OVMF and the image's GRUB)."""
    if board["qemu"].get("firmware"):
        return None
    part = boot_partition(image)
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

    elf = board["qemu"].get("ubootElf")
    if elf:   # the firmware's U-Boot (config.txt's kernel) as QEMU's raspi0 runs it: the ELF from the same package
        data = root_read(image, f"/usr/lib/u-boot/{elf}")
        if data is None:
            raise KioskError(f"{image}: /usr/lib/u-boot/{elf} is not in its root file system (QEMU's "
                             f"{board['qemu']['machine']} runs U-Boot's ELF)",
                             hint="rebuild the image with this kiosk (u-boot-rpi is in every A/B Pi image)")
        kernel = Path(elf).name
        (dest / kernel).write_bytes(data)
    dtb = None
    wanted = board["qemu"].get("dtb")
    if wanted:
        name = Path(wanted).name
        if name.lower() not in lower:
            raise KioskError(f"{image}: device tree {name} (hardware/{board['name']}.json qemu.dtb) is not on the "
                             "FAT partition")
        dtb = copy(name)
        # what the emulated machine lacks (raspi4b: the HDMI block, the firmware's GPIO expander), disabled or
        # removed so that Debian's kernel does not stop at it; the image's own tree is never changed
        edit_device_tree(dtb, board["qemu"].get("dtbEdits", []))
    cmdline = fat_read(image, part, lower["cmdline.txt"]).decode(errors="replace").strip()
    if elf:
        return BootFiles(kernel=dest / kernel, initrd=None, dtb=dtb, cmdline=cmdline, elf=True)
    kernel_file = copy(kernel)
    load = board["qemu"].get("ubootLoadAddress")
    if load and board.get("uboot"):
        kernel_file = uboot_uimage(kernel_file, load)
    return BootFiles(kernel=kernel_file, initrd=copy(initrd) if initrd and initrd.lower() in lower else None,
                     dtb=dtb, cmdline=cmdline)


def unpacked_qemu(board: dict) -> Path | None:
    """The directory of the board's unpacked QEMU (qemu.release), None for the system's."""
    release = board["qemu"].get("release")
    return UNPACKED_QEMU / release if release else None


def qemu_binary(board: dict) -> str:
    q = board["qemu"]
    unpacked = unpacked_qemu(board)
    if unpacked is not None:
        return str(unpacked / "usr/bin" / q["binary"])
    return shutil.which(q["binary"]) or q["binary"]


def qemu_env(board: dict) -> dict[str, str]:
    """The environment QEMU needs beyond kiosk's own: an unpacked QEMU's module directory."""
    unpacked = unpacked_qemu(board)
    return {} if unpacked is None else {"QEMU_MODULE_DIR": str(unpacked / "usr/lib/x86_64-linux-gnu/qemu")}


def uboot_uimage(binary: Path, load: str) -> Path:
    """U-Boot's u-boot.bin as a uImage that loads and starts at `load` (qemu.ubootLoadAddress). QEMU's raspi2b
    starts a raw -kernel at 0x10000 (U-Boot runs from 0x8000, where the Pi's firmware puts it) and an ELF on all
    four cores at once; a uImage it loads where it says, as Linux: one core starts it, with -dtb and -append."""

    out = binary.with_suffix(".uimg")
    run(["mkimage", "-A", "arm", "-O", "linux", "-T", "kernel", "-C", "none", "-a", load, "-e", load,
         "-n", "u-boot", "-d", str(binary), str(out)], what=f"kiosk run: mkimage of {binary.name}",
        hint="apt install u-boot-tools (scripts/install-deps.sh)")
    return out


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
    boot: BootFiles | None      # None: the machine's firmware boots the disk (qemu.firmware)
    ssh_port: int
    qmp: Path
    headless: bool = True
    memory: str | None = None
    serial_log: Path | None = None
    extra_append: list[str] = field(default_factory=list)
    host_name: str | None = None
    accel: str = "auto"
    watch_qmp: Path | None = None   # a second monitor, kiosk run's own (MonitorWatch)

    @property
    def has_display(self) -> bool:
        return bool(self.board["qemu"].get("display"))

    def kernel_args(self) -> str:
        return qemu_cmdline(self.boot.cmdline, self.board, display=self.has_display, extra=self.extra_append)

    @property
    def qemu_file(self) -> str | None:
        """kiosk-qemu.txt for the disk copy's FAT when QEMU runs U-Boot's ELF: the command line and the device
        tree QEMU cannot hand it (boot.scr imports only these two variables); None otherwise."""
        if self.boot is None or not self.boot.elf:
            return None
        one_line = " ".join(self.kernel_args().split())   # (a newline in an --append would start another line)
        return f"kiosk_args={one_line}\nkiosk_fdtfile={self.boot.dtb.name}\n"

    def argv(self) -> list[str]:
        q = self.board["qemu"]
        args = [qemu_binary(self.board), "-M", q["machine"]]
        unpacked = unpacked_qemu(self.board)
        if unpacked is not None:   # its own firmware and data files, not the system QEMU's
            args += ["-L", str(unpacked / "usr/share/qemu")]
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
        if self.boot is None:
            args += list(q["firmware"])
        else:
            args += ["-kernel", str(self.boot.kernel)]
            if not self.boot.elf:   # (an ELF gets neither from QEMU: qemu_file)
                if self.boot.initrd:
                    args += ["-initrd", str(self.boot.initrd)]
                if self.boot.dtb:
                    args += ["-dtb", str(self.boot.dtb)]
                args += ["-append", self.kernel_args()]
        args += [a.replace("{image}", str(self.disk)) for a in q["disk"]]
        serials = list(q["serial"])
        if serials.count("mon:stdio") > 1:
            # Two ports on the terminal (or the log), through one mux: raspi0's U-Boot writes to the mini UART,
            # Linux to the PL011. (mon:stdio twice would open stdio twice, which QEMU refuses.)
            if self.serial_log is None:
                args += ["-chardev", "stdio,id=console,mux=on,signal=off", "-mon", "chardev=console"]
            else:
                args += ["-chardev", f"file,id=console,mux=on,path={str(self.serial_log).replace(',', ',,')}"]
            serials = ["chardev:console" if s == "mon:stdio" else s for s in serials]
        for serial in serials:
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


# The Debian package that ships each firmware file a board's qemu.firmware names.
FIRMWARE_PACKAGES = {"/usr/share/ovmf/OVMF.fd": "ovmf"}


def check_qemu(board: dict) -> str:
    binary = board["qemu"]["binary"]
    unpacked = unpacked_qemu(board)
    if unpacked is not None:
        path = qemu_binary(board)
        if not os.access(path, os.X_OK):
            raise KioskError(f"{path} is not there: {board['name']} boots on QEMU's {board['qemu']['machine']}, "
                             f"which needs the QEMU of {board['qemu']['release']}",
                             hint="scripts/install-deps.sh test unpacks it there (the system's QEMU stays)")
        return path
    path = shutil.which(binary)
    if not path:
        package = QEMU_PACKAGES.get(binary, "qemu-system")
        raise KioskError(f"{binary} is not installed",
                         hint=f"it boots {board['name']} images (apt install {package})")
    firmware = board["qemu"].get("firmware", [])
    for option, value in zip(firmware, firmware[1:]):
        if option == "-bios" and not os.path.isfile(value):
            raise KioskError(f"{value} is not installed",
                             hint=f"QEMU boots {board['name']} images with it (apt install "
                                  f"{FIRMWARE_PACKAGES.get(value, 'the package that has it')})")
    return path
