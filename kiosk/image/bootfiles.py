"""What goes on the FAT partition (firmware, U-Boot or GRUB, device trees, config.txt, cmdline.txt), and each
root slot's own kernel and native initramfs.

`boot_files(plan, root_dir, root=...)` returns {name on the FAT partition: bytes
or a Path inside root_dir}; kiosk.image copies them in sorted order. It also
writes into root_dir what the device needs to regenerate the same files
itself after a firmware upgrade (raspi-firmware's hooks read
/etc/default/raspi-firmware, /etc/default/raspi-firmware-custom and
/etc/default/raspi-extra-cmdline), plus /boot/initrd.img-<version>.

Every board has root slots A and B, and the kernel and initramfs stay in the slot, as /vmlinuz and
/initrd.img; RAUC's system.conf names the slots. grub-efi (the qemu target): GRUB's files
(kiosk.image.grub). raspi-firmware boards: the firmware's files with U-Boot as its kernel
(kiosk.image.uboot); config.txt and cmdline.txt are exactly what Debian's
/etc/kernel/postinst.d/z50-raspi-firmware writes from those files, so a firmware upgrade on the device
reproduces them byte for byte.

The initramfs is built here, natively, in a second: busybox-static of the
target architecture (installed by kiosk.rootfs), the kernel modules needed to
reach and mount the root filesystem (with their dependencies, from the tree's
modules.dep), and a short /init that loads them, waits for root= (UUID=,
LABEL= or a /dev path), mounts it and switch_roots to /sbin/init. Running
Debian's mkinitramfs under qemu-user instead costs ~10 minutes.
"""

from __future__ import annotations

import gzip
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Callable

from kiosk.config.bootconfig import (extra_cmdline, firmware_custom, latest_boot_file,
                                     raspi_cmdline_txt, raspi_config_txt, set_default)
from kiosk.core import paths
from kiosk.core.errors import KioskError
from kiosk.core.files import write_atomic
from kiosk.core.run import run

Log = Callable[[str], None]

# Modules the initramfs loads, in this order, when the kernel has them as modules
# (names as modules.dep spells them, '-' and '_' equivalent). Missing ones are skipped:
# they are built in, or absent on this kernel flavour.
FS_MODULES = ("crc16", "mbcache", "jbd2", "crc32c_generic", "crc32c_intel", "libcrc32c", "ext4")
RASPI_MODULES = (
    "mmc_core", "mmc_block",
    "raspberrypi", "clk_raspberrypi", "reset_raspberrypi", "gpio_raspberrypi_exp", "raspberrypi_cpufreq",
    "bcm2835_dma", "gpio_regulator", "pwrseq_simple",
    "sdhci", "sdhci_pltfm", "sdhci_iproc", "bcm2835",  # bcm2835 = the sdhost SD controller
)
VIRTIO_MODULES = (
    "virtio", "virtio_ring", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_mmio",
    "virtio_blk", "virtio_scsi", "scsi_mod", "sd_mod", "ahci",
)

# The consoles the kernel logs to; the last one is /dev/console (boot messages, plymouth).
def consoles(board: dict) -> list[str]:
    return [board["serialConsole"], "tty1"]


def kernel_version(root_dir: Path) -> str:
    """The (newest) kernel version installed in the tree, from /boot/vmlinuz-<version>."""
    newest = latest_boot_file(root_dir / "boot", "vmlinuz-")
    if newest is None:
        raise KioskError(f"boot files: no kernel in {root_dir}/boot (is the kernel package in the plan?)")
    return newest[len("vmlinuz-"):]


# --- modules ---------------------------------------------------------------------------------

def _norm(name: str) -> str:
    return name.replace("-", "_")


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return _norm(re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base))


def read_modules_dep(moddir: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (relative path, [dependency paths]) from the tree's modules.dep."""
    deps: dict[str, tuple[str, list[str]]] = {}
    text = (moddir / "modules.dep").read_text()
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[_module_name(path)] = (path, rest.split())
    return deps


def module_load_order(moddir: Path, wanted: list[str]) -> list[str]:
    """Relative paths of the wanted modules and their dependencies, dependencies first."""
    deps = read_modules_dep(moddir)
    by_path = {path: name for name, (path, _) in deps.items()}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in deps:
            return
        seen.add(name)
        path, requires = deps[name]
        # modules.dep lists a module's dependencies so that the last is loaded first
        for dep in reversed(requires):
            visit(by_path.get(dep, _module_name(dep)))
        order.append(path)

    for name in wanted:
        visit(_norm(name))
    return order


def initramfs_modules(board: dict) -> list[str]:
    if board["bootloader"] == "raspi-firmware":
        return [*RASPI_MODULES, *FS_MODULES]
    return [*VIRTIO_MODULES, *FS_MODULES]


# --- the initramfs ---------------------------------------------------------------------------

INIT = r"""#!/bin/busybox sh
# kiosk initramfs: load the modules that reach the root filesystem, mount it, switch_root.
/bin/busybox mkdir -p /proc /sys /dev /run /root /tmp /sbin /usr/bin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run

# The root is mounted read-only whatever the command line says ("rw" is there because raspi-firmware's
# hook writes it): systemd-fsck-root then checks it with the root's own e2fsck (fsck.repair=yes) and
# systemd-remount-fs makes it read-write from /etc/fstab. kiosk.rootrw mounts it read-write here.
root= ; rootfstype=auto ; rootflags= ; mode=ro ; init=/sbin/init ; rootdelay=90 ; quiet=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root="${arg#root=}" ;;
        rootfstype=*) rootfstype="${arg#rootfstype=}" ;;
        rootflags=*) rootflags="${arg#rootflags=}" ;;
        rootdelay=*) rootdelay="${arg#rootdelay=}" ;;
        init=*) init="${arg#init=}" ;;
        kiosk.rootrw) mode=rw ;;
        quiet) quiet=1 ;;
    esac
done
say() { [ -n "$quiet" ] || echo "kiosk-initramfs: $*"; }
fail() {
    echo "kiosk-initramfs: $*"
    echo "kiosk-initramfs: block devices: $(ls /sys/class/block 2>/dev/null | tr '\n' ' ')"
    echo "kiosk-initramfs: kernel command line: $(cat /proc/cmdline)"
    grep -q kiosk.shell /proc/cmdline && exec sh
    echo "kiosk-initramfs: rebooting in 30 seconds (add kiosk.shell to the command line for a shell)"
    sleep 30
    reboot -f
}

say "loading modules"
while read -r module; do
    insmod "/lib/modules/$(uname -r)/$module" 2>/dev/null
done < /etc/kiosk-modules
# Anything else the hardware asks for (coldplug by modalias).
for alias in $(cat /sys/bus/*/devices/*/modalias 2>/dev/null | sort -u); do
    modprobe -q "$alias" 2>/dev/null
done

say "waiting for root=$root"
dev=
waited=0
while :; do
    case "$root" in
        UUID=*|LABEL=*) dev=$(findfs "$root" 2>/dev/null) ;;
        /dev/*) [ -b "$root" ] && dev="$root" ;;
        "") fail "no root= on the kernel command line" ;;
        *) fail "root=$root: use UUID=, LABEL= or a /dev path" ;;
    esac
    [ -n "$dev" ] && [ -b "$dev" ] && break
    [ "$waited" -ge $((rootdelay * 5)) ] && fail "root device $root did not appear in $rootdelay seconds"
    # new devices (SD card detect, late probes) may need their modules
    if [ $((waited % 10)) -eq 9 ]; then
        for alias in $(cat /sys/bus/*/devices/*/modalias 2>/dev/null | sort -u); do modprobe -q "$alias" 2>/dev/null; done
    fi
    sleep 0.2
    waited=$((waited + 1))
done

# A/B boards: the data partition (generations, configuration.git, host keys), found now, mounted below.
data_spec= ; data_dev=
if [ -s /etc/kiosk-data ]; then
    read -r data_spec data_mount < /etc/kiosk-data
    say "waiting for the data partition $data_spec"
    waited=0
    while :; do
        data_dev=$(findfs "$data_spec" 2>/dev/null)
        [ -n "$data_dev" ] && [ -b "$data_dev" ] && break
        [ "$waited" -ge $((rootdelay * 5)) ] && fail "the data partition $data_spec did not appear in $rootdelay seconds"
        sleep 0.2
        waited=$((waited + 1))
    done
fi

say "mounting $dev ($root) on /root ($mode)"
opts=$mode
[ -n "$rootflags" ] && opts="$opts,$rootflags"
if [ "$rootfstype" = auto ]; then
    mount -o "$opts" "$dev" /root || fail "cannot mount $dev"
else
    mount -t "$rootfstype" -o "$opts" "$dev" /root || fail "cannot mount $dev as $rootfstype"
fi
[ -x "/root$init" ] || [ -L "/root$init" ] || fail "no $init on $dev"

if [ -n "$data_dev" ]; then
    # Checked with the slot's own e2fsck, mounted and bound before systemd starts: PID 1 reads the
    # generation's units and hostname through the binds (fstab names them too, pass 0: found mounted).
    for fs in /dev /proc /sys; do mount -o bind "$fs" "/root$fs"; done
    chroot /root /sbin/e2fsck -p "$data_dev"
    rc=$?
    if [ "$rc" -ge 4 ]; then
        chroot /root /sbin/e2fsck -y "$data_dev"
        rc=$?
    fi
    for fs in /dev /proc /sys; do umount "/root$fs"; done
    [ "$rc" -ge 4 ] && fail "e2fsck could not repair the data partition $data_dev (exit $rc)"
    say "mounting the data partition $data_dev on $data_mount"
    mount -t ext4 -o rw,noatime "$data_dev" "/root$data_mount" || fail "cannot mount $data_dev on $data_mount"
    sed 1d /etc/kiosk-data > /tmp/kiosk-binds
    while read -r source target; do
        # a directory a newer system binds that this card's data partition (made when it was flashed) lacks
        [ -d "/root$source" ] || mkdir -p "/root$source" || fail "cannot make $source"
        mount -o bind "/root$source" "/root$target" || fail "cannot bind $source on $target"
    done < /tmp/kiosk-binds
fi

for fs in /dev /run /proc /sys; do
    mkdir -p "/root$fs"
    mount --move "$fs" "/root$fs" 2>/dev/null || umount -l "$fs"
done
say "switching to $init"
exec switch_root /root "$init" "$@"
"""


def data_mounts() -> str:
    """/etc/kiosk-data of an A/B board's initramfs: the data partition and where it goes, then its binds."""
    from kiosk.core.paths import DATA_BINDS, DATA_LABEL, DATA_MOUNT

    return (f"LABEL={DATA_LABEL} {DATA_MOUNT}\n"
            + "".join(f"{DATA_MOUNT}/{source} {target}\n" for source, target in DATA_BINDS))


def _cpio_newc(entries: list[tuple[str, int, bytes]], mtime: int) -> bytes:
    """A newc cpio archive of (name, mode, data) in the given order: owner root, fixed times and inodes."""
    out = bytearray()

    def header(ino: int, mode: int, size: int, name: bytes, nlink: int = 1) -> None:
        fields = [ino, mode, 0, 0, nlink, mtime, size, 0, 0, 0, 0, len(name) + 1, 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(name + b"\0")
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data) in enumerate(entries, start=1):
        header(ino, mode, len(data), name.encode(), 2 if stat.S_ISDIR(mode) else 1)
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))
    header(0, 0, 0, b"TRAILER!!!")
    out.extend(b"\0" * (-len(out) % 512))
    return bytes(out)


def _depmod(entries: dict[str, tuple[int, bytes]], version: str) -> dict[str, bytes]:
    """modules.dep, modules.alias... for the initramfs's modules, by the host's depmod (it reads any arch)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kiosk-depmod-") as tmp:
        base = Path(tmp)
        for name, (mode, data) in entries.items():
            if name.startswith(f"lib/modules/{version}/"):
                path = base / name
                if stat.S_ISDIR(mode):
                    path.mkdir(parents=True, exist_ok=True)
                else:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
        result = run(["depmod", "-b", str(base), version], check=False)
        if result.returncode != 0:
            return {}
        out = {}
        moddir = base / "lib/modules" / version
        for f in sorted(moddir.glob("modules.*")):
            if f.is_file() and not f.name.endswith(".bin") and f.name not in ("modules.order", "modules.builtin"):
                out[f"lib/modules/{version}/{f.name}"] = f.read_bytes()
        return out


def _gzip_cached(archive: bytes) -> bytes:
    """gzip -9 of the archive (mtime 0), kept in the cache under the archive's own sha256.

    Compressing takes ~1.7 s, more than the rest of a configuration-only build's configure step, and
    the archive changes only with the kernel, busybox, the board's modules or the epoch. The cache is
    keyed by the exact input (and zlib's version) and every hit is checked by decompressing it, so a
    stale or damaged entry can never be used.
    """
    import hashlib
    import zlib

    key = hashlib.sha256(archive).hexdigest()
    path = paths.cache_dir() / "initramfs" / f"{key}.gz9-zlib{zlib.ZLIB_RUNTIME_VERSION}"
    try:
        packed = path.read_bytes()
        if gzip.decompress(packed) == archive:
            return packed
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile):
        pass
    packed = gzip.compress(archive, compresslevel=9, mtime=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")   # two builds may store the same entry at once
    tmp.write_bytes(packed)
    os.replace(tmp, path)
    return packed


def build_initramfs(plan, root_dir: Path, version: str, *, epoch: int, log: Log) -> bytes:
    """The gzip-compressed initramfs for the tree's kernel, made natively (reproducible bytes)."""
    busybox = next((p for p in (root_dir / "usr/bin/busybox", root_dir / "bin/busybox") if p.is_file()), None)
    if busybox is None:
        raise KioskError("boot files: busybox-static is not installed in the root tree (kiosk.image.rootfs adds it)")
    moddir = root_dir / "lib/modules" / version
    if not (moddir / "modules.dep").is_file():
        raise KioskError(f"boot files: {moddir}/modules.dep is missing (depmod did not run for {version})")
    wanted = initramfs_modules(plan.board)
    order = module_load_order(moddir, wanted)
    files: dict[str, tuple[int, bytes]] = {}

    def add_dir(path: str) -> None:
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            files.setdefault("/".join(parts[:i]), (stat.S_IFDIR | 0o755, b""))

    for d in ("bin", "dev", "etc", "proc", "root", "run", "sbin", "sys", "tmp", "usr/bin", "usr/sbin",
              f"lib/modules/{version}"):
        add_dir(d)
    files["bin/busybox"] = (stat.S_IFREG | 0o755, busybox.read_bytes())
    files["init"] = (stat.S_IFREG | 0o755, INIT.encode())
    for rel in order:
        src = moddir / rel
        add_dir(f"lib/modules/{version}/{rel.rsplit('/', 1)[0]}")
        files[f"lib/modules/{version}/{rel}"] = (stat.S_IFREG | 0o644, src.read_bytes())
    for extra in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (moddir / extra).is_file():
            files[f"lib/modules/{version}/{extra}"] = (stat.S_IFREG | 0o644, (moddir / extra).read_bytes())
    for name, data in _depmod(files, version).items():
        files[name] = (stat.S_IFREG | 0o644, data)
    files["etc/kiosk-modules"] = (stat.S_IFREG | 0o644, "".join(f"{rel}\n" for rel in order).encode())
    files["etc/kiosk-data"] = (stat.S_IFREG | 0o644, data_mounts().encode())
    # The initramfs modules must never be stale: record what they came from.
    files["etc/kiosk-initramfs"] = (stat.S_IFREG | 0o644,
                                    f"kernel {version}\nboard {plan.board['name']}\n".encode())
    entries = [(name, mode, data) for name, (mode, data) in sorted(files.items())]
    archive = _cpio_newc(entries, epoch)
    packed = _gzip_cached(archive)
    found = {_module_name(r) for r in order}
    log(f"boot files: initramfs for {version}: {len(order)} modules "
        f"({', '.join(sorted(found & {_norm(m) for m in wanted}))}), {len(packed) // 1024} KiB")
    return packed


def _dtb_dir(root_dir: Path, version: str) -> Path:
    for candidate in (root_dir / "usr/lib" / f"linux-image-{version}", root_dir / "lib" / f"linux-image-{version}"):
        if candidate.is_dir():
            return candidate
    raise KioskError(f"boot files: no device trees for kernel {version} (/usr/lib/linux-image-{version})")


def edit_device_tree(dtb: Path, edits: list[dict]) -> None:
    """Edits of a device tree file in place, with fdtput: each names a node and what to set (string
    properties), delete (properties) or whether to remove it. For the FAT's trees (device_tree) and for
    kiosk run's copy of one (qemu.dtbEdits, kiosk.qemu.machine)."""
    for edit in edits:
        node = edit["node"]
        steps = [["-r", str(dtb), node]] if edit.get("remove") else []
        steps += [["-d", str(dtb), node, prop] for prop in edit.get("delete", [])]
        steps += [["-t", "s", str(dtb), node, prop, value] for prop, value in edit.get("set", {}).items()]
        for step in steps:
            run(["fdtput", *step], what=f"device tree {dtb.name} ({node})",
                hint="apt install device-tree-compiler (scripts/install-deps.sh)")


def device_tree(src: Path, aliases: dict[str, str]) -> bytes | Path:
    """The board's device tree for the FAT: Debian's file, or a copy with `aliases` (hardware deviceTreeAliases)
    added. The Pi 4's tree from Debian has no mmc aliases, so U-Boot and Linux number its two SD controllers in
    probe order and the card is mmc 0 or 1, mmcblk0 or mmcblk1; the Pi firmware's own trees say mmc0 = EMMC2,
    which kiosk's uboot.env, boot.scr and RAUC's slot devices rely on (notes/ab-update.md)."""
    if not aliases:
        return src
    with tempfile.TemporaryDirectory(prefix="kiosk-dtb-") as tmp:
        dtb = Path(tmp) / src.name
        dtb.write_bytes(src.read_bytes())
        for name, node in sorted(aliases.items()):
            if run(["fdtget", "-p", str(dtb), node], what="boot files (fdtget)", check=False).returncode != 0:
                raise KioskError(f"boot files: {src.name} has no node {node} for the alias {name}",
                                 hint="correct deviceTreeAliases in the board's hardware file for this kernel's tree")
        edit_device_tree(dtb, [{"node": "/aliases", "set": dict(sorted(aliases.items()))}])
        return dtb.read_bytes()


# --- the stage ------------------------------------------------------------------------------

def boot_inputs(plan, root_dir: Path, fetch: Callable[..., None]) -> None:
    """Fetch into a sparse root_dir (kiosk.image.overlay) every base file boot_files reads.

    /boot (kernel_version globs it; the kernel goes to the FAT), busybox-static, the kernel's module
    index and the initramfs's modules (build_initramfs), and on raspi-firmware boards the firmware
    blobs, the board's device trees and /etc/default (raspi-firmware's settings, rewritten here).
    Keep it in step with boot_files: tests/test_image.py compares the image with a whole-tree build.
    """
    fetch("/boot", "/usr/bin/busybox", "/bin/busybox")
    version = kernel_version(root_dir)
    moddir = f"/lib/modules/{version}"
    fetch(*(f"{moddir}/{name}" for name in ("modules.dep", "modules.builtin", "modules.builtin.modinfo",
                                             "modules.order")))
    wanted = module_load_order(root_dir / moddir.lstrip("/"), initramfs_modules(plan.board))
    fetch(*(f"{moddir}/{rel}" for rel in wanted))
    if plan.board["bootloader"] == "raspi-firmware":
        fetch(f"/usr/lib/u-boot/{plan.board['uboot']['binary']}", "/usr/lib/raspi-firmware", "/etc/default",
              *(f"{lib}/linux-image-{version}/{dtb}" for lib in ("/usr/lib", "/lib") for dtb in plan.board["deviceTrees"]))


def boot_files(plan, root_dir: Path, *, root: str, epoch: int, log: Log = lambda m: None) -> dict[str, bytes | Path]:
    """Files for the FAT partition, {name: bytes or a Path to copy}; writes the matching on-device config.

    root is the root= value (e.g. "UUID=..."), as kiosk.image decides it.
    """
    board = plan.board
    version = kernel_version(root_dir)
    initrd = build_initramfs(plan, root_dir, version, epoch=epoch, log=log)
    # On the device, raspi-firmware's hooks copy /boot/initrd.img-* to the FAT partition: keep ours there.
    write_atomic(root_dir / "boot" / f"initrd.img-{version}", initrd)
    files: dict[str, bytes | Path] = {}

    from kiosk.image import rauc

    write_atomic(root_dir / "etc/rauc/system.conf", rauc.system_conf(board))
    # Each slot boots its own kernel and initramfs (grub.cfg and boot.scr name these Debian-style links).
    for link, target in (("vmlinuz", f"boot/vmlinuz-{version}"), ("initrd.img", f"boot/initrd.img-{version}")):
        (root_dir / link).unlink(missing_ok=True)
        (root_dir / link).symlink_to(target)

    if board["bootloader"] == "grub-efi":
        from kiosk.image.grub import grub_files

        files.update(grub_files(board, plan.spec))
        log(f"boot files: GRUB EFI, grub.cfg, grubenv; kernel {version} and initrd.img in the root slot")
        return files

    firmware = root_dir / "usr/lib/raspi-firmware"
    if not firmware.is_dir():
        raise KioskError("boot files: /usr/lib/raspi-firmware is missing (raspi-firmware must be in the plan)")
    for blob in sorted(firmware.iterdir()):
        if blob.is_file():
            files[blob.name] = blob
    dtbs = _dtb_dir(root_dir, version)
    for dtb in board["deviceTrees"]:
        src = dtbs / dtb
        if not src.is_file():
            raise KioskError(f"boot files: device tree {dtb} is not in kernel {version} (hardware/{board['name']}.json)")
        files[Path(dtb).name] = device_tree(src, board.get("deviceTreeAliases", {}))
    # The firmware starts U-Boot, which boots a slot's kernel (kiosk.image.uboot).
    from kiosk.image.uboot import fw_env_config, uboot_files

    files.update(uboot_files(board, root_dir, epoch))
    write_atomic(root_dir / "etc/fw_env.config", fw_env_config())
    firmware_kernel = Path(board["uboot"]["binary"]).name

    # The on-device settings, so raspi-firmware's hooks regenerate these same files after an upgrade.
    defaults = root_dir / "etc/default/raspi-firmware"
    text = defaults.read_text() if defaults.is_file() else ""
    text = set_default(text, "CONSOLES", f'"{" ".join(consoles(board))}"')
    text = set_default(text, "ROOTPART", f'"{root}"')
    text = set_default(text, "KERNEL", f'"{firmware_kernel}"')
    text = set_default(text, "INITRAMFS", '"no"')
    write_atomic(defaults, text)
    custom_path = root_dir / "etc/default/raspi-firmware-custom"
    extra_path = root_dir / "etc/default/raspi-extra-cmdline"
    if not custom_path.is_file():
        write_atomic(custom_path, firmware_custom(plan.spec, board))
    if not extra_path.is_file():
        write_atomic(extra_path, extra_cmdline(board, plan.spec))
    custom = custom_path.read_text()
    extra = extra_path.read_text()
    files["config.txt"] = raspi_config_txt(plan.architecture, firmware_kernel, None, custom).encode()
    files["cmdline.txt"] = raspi_cmdline_txt(consoles(board), root, pi4=board["name"] == "raspberryPi4",
                                             extra=extra).encode()
    log(f"boot files: firmware ({sum(1 for p in firmware.iterdir())} files), "
        + f"U-Boot, boot.scr, uboot.env; kernel {version} and initrd.img in the root slot, "
        + f"{len(board['deviceTrees'])} device trees, config.txt, cmdline.txt")
    return files
