"""U-Boot on the FAT partition of the Raspberry Pis' A/B images: it boots root slot A or B (notes/ab-update.md).

The Pi's firmware still starts first: it reads config.txt (raspi-firmware's hook writes `kernel=u-boot.bin`
and no initramfs line when /etc/default/raspi-firmware says KERNEL="u-boot.bin" INITRAMFS="no"), loads the
board's device tree with config.txt's overlays and cmdline.txt as its bootargs, and starts Debian's U-Boot
(u-boot-rpi, installed in the slot; its file is copied here). U-Boot reads kiosk's minimal uboot.env (no
`usb start`: under QEMU it breaks Linux's USB network, trap 1) and runs boot.scr, which follows RAUC's U-Boot
convention: BOOT_ORDER and BOOT_<slot>_LEFT, counted down and saved before each boot, so a slot that never
commits is passed over once its tries are spent; `rauc status mark-good` (kiosk slot commit) sets them back.

The kernel's command line is the firmware's (cmdline.txt, which kiosk's pushes keep up to date, read from the
device tree U-Boot was given: `kiosk run` passes the same through QEMU's -dtb/-append, or on raspi0 and raspi1ap,
whose U-Boot ELF QEMU hands neither, in kiosk-qemu.txt on the FAT of its own disk copy) plus the chosen
slot's root=, rauc.slot= and panic=10; the kernel and initramfs are the slot's own /vmlinuz and /initrd.img.
Debian's U-Boot has no redundant environment (trap 3): when uboot.env is lost, the boot script takes the
order of the last commit from kiosk-slots.txt, which `kiosk slot commit` writes on the FAT.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from kiosk.config.bootconfig import SLOTS_FILE, TRIES, slots_text
from kiosk.core.errors import KioskError
from kiosk.core.run import run
from kiosk.image.assemble import BOOT_MOUNT

ENV_FILE = "uboot.env"
# Written by `kiosk run` on its own disk copy's FAT, never in an image: under QEMU machines that run U-Boot's ELF
# (raspi0), which QEMU hands neither a device tree nor -append, it carries what the Pi's firmware would (the
# kernel's command line, the FAT's device tree to load): `kiosk_args=...` and `kiosk_fdtfile=...`.
QEMU_FILE = "kiosk-qemu.txt"
ENV_SIZE = 0x4000
PARTITIONS = {"A": 2, "B": 3}
# The first boot: slot A (the image's own) with its tries, slot B empty.
FIRST_SLOTS = {"BOOT_ORDER": "A B", "BOOT_A_LEFT": str(TRIES), "BOOT_B_LEFT": "0"}


def _choose(indent: str = "") -> str:
    """Hush: the first slot of BOOT_ORDER with tries left becomes ${raucslot}/${bootpart}, one try spent."""
    lines = ['for BOOT_SLOT in "${BOOT_ORDER}"; do',
             '  if test "x${bootpart}" != "x"; then',
             '    echo "kiosk-ab: slot ${BOOT_SLOT} not tried"']
    for name, part in PARTITIONS.items():
        lines += [f'  elif test "x${{BOOT_SLOT}}" = "x{name}"; then',
                  f'    if test ${{BOOT_{name}_LEFT}} -gt 0; then',
                  f'      setexpr BOOT_{name}_LEFT ${{BOOT_{name}_LEFT}} - 1; setenv bootpart {part}; setenv raucslot {name}',
                  '    fi']
    lines += ['  fi', 'done']
    return "".join(f"{indent}{line}\n" for line in lines)


# boot.scr's source. U-Boot's hush has no comments and stumbles on a single quote even inside double quotes
# ("syntax error", seen): neither may appear in it (tests/test_image.py checks). What it does: the slot
# order and tries from uboot.env, or from kiosk-slots.txt when uboot.env was lost; the first slot with a
# try left, one try spent and saved; no slot with tries: the last commit's order again; no USB start in a
# saved default environment (it breaks the USB network under QEMU); the firmware's device tree and
# command line, the slot's root=; without a firmware tree (QEMU's raspi0 runs U-Boot's ELF) those of kiosk run's
# kiosk-qemu.txt, its tree loaded from the FAT as the Pi's firmware would.
BOOT_CMD = """echo "kiosk-ab: BOOT_ORDER=${{BOOT_ORDER}} A_LEFT=${{BOOT_A_LEFT}} B_LEFT=${{BOOT_B_LEFT}}"
if test -z "${{BOOT_ORDER}}"; then
  echo "kiosk-ab: uboot.env has no slot order, lost or damaged: the order of the last commit from {slots}"
  if load mmc 0:1 ${{kernel_addr_r}} {slots}; then env import -t ${{kernel_addr_r}} ${{filesize}}; fi
fi
test -n "${{BOOT_ORDER}}" || setenv BOOT_ORDER "A B"
test -n "${{BOOT_A_LEFT}}" || setenv BOOT_A_LEFT {tries}
test -n "${{BOOT_B_LEFT}}" || setenv BOOT_B_LEFT 0
setenv preboot
setenv bootpart
setenv raucslot
{choose}if test -z "${{bootpart}}"; then
  echo "kiosk-ab: no slot has tries left: the order of the last commit from {slots}, with its tries"
  setenv BOOT_ORDER
  if load mmc 0:1 ${{kernel_addr_r}} {slots}; then env import -t ${{kernel_addr_r}} ${{filesize}}; fi
  test -n "${{BOOT_ORDER}}" || setenv BOOT_ORDER "A B"
  test ${{BOOT_A_LEFT}} -gt 0 || test ${{BOOT_B_LEFT}} -gt 0 || setenv BOOT_A_LEFT 1
{choose_again}fi
saveenv
echo "kiosk-ab: booting slot ${{raucslot}} (mmc 0:${{bootpart}}), A_LEFT=${{BOOT_A_LEFT}} B_LEFT=${{BOOT_B_LEFT}}"
setenv kiosk_args "{fallback_args}"
setenv kiosk_fdt ${{fdtcontroladdr}}
if test -n "${{fdt_addr}}"; then
  setenv kiosk_fdt ${{fdt_addr}}
  fdt addr ${{fdt_addr}}
  fdt get value kiosk_args /chosen bootargs
else
  if load mmc 0:1 ${{kernel_addr_r}} {qemu_file}; then
    env import -t ${{kernel_addr_r}} ${{filesize}} kiosk_args kiosk_fdtfile
    echo "kiosk-ab: no firmware device tree: {qemu_file} (kiosk run) gives the command line and ${{kiosk_fdtfile}}"
    if load mmc 0:1 ${{fdt_addr_r}} ${{kiosk_fdtfile}}; then setenv kiosk_fdt ${{fdt_addr_r}}; fi
  else
    echo "kiosk-ab: the firmware passed no device tree: the one of U-Boot, and a minimal command line"
  fi
fi
load mmc 0:${{bootpart}} ${{kernel_addr_r}} /vmlinuz
load mmc 0:${{bootpart}} ${{ramdisk_addr_r}} /initrd.img
setenv bootargs "${{kiosk_args}} root={device}${{bootpart}} rauc.slot=${{raucslot}} panic=10"
{boot} ${{kernel_addr_r}} ${{ramdisk_addr_r}}:${{filesize}} ${{kiosk_fdt}}
echo "kiosk-ab: slot ${{raucslot}} did not start"
"""


def boot_cmd(board: dict) -> str:
    """boot.scr's source. The fallback command line (no firmware device tree: never on a Pi) is the board's
    serial console and root wait."""
    u = board["uboot"]
    return BOOT_CMD.format(slots=SLOTS_FILE, tries=TRIES, choose=_choose(), choose_again=_choose("  "),
                           device=board["slotDevicePrefix"], boot=u["bootCommand"], qemu_file=QEMU_FILE,
                           fallback_args=f"console={board['serialConsole']} rootwait")


def env_text(board: dict) -> str:
    """uboot.env's variables: kiosk's own minimal environment (trap 2: a saved environment replaces U-Boot's
    defaults whole), the board's load addresses, and the first boot's slot state."""
    values = {"bootcmd": "load mmc 0:1 ${scriptaddr} boot.scr; source ${scriptaddr}", "bootdelay": "0",
              **board["uboot"]["addresses"], **FIRST_SLOTS}
    return "".join(f"{key}={values[key]}\n" for key in sorted(values))


def fw_env_config() -> str:
    """/etc/fw_env.config: where libubootenv's fw_printenv/fw_setenv (and RAUC's uboot backend) find uboot.env."""
    return f"# Written by kiosk at image build: U-Boot's environment on the firmware partition.\n" \
           f"{BOOT_MOUNT}/{ENV_FILE} 0x0000 0x{ENV_SIZE:x}\n"


def uboot_files(board: dict, root_dir: Path, epoch: int) -> dict[str, bytes]:
    """{path on the FAT: bytes}: U-Boot itself (from the slot's u-boot-rpi), boot.scr, uboot.env, kiosk-slots.txt."""
    u = board["uboot"]
    binary = root_dir / "usr/lib/u-boot" / u["binary"]
    if not binary.is_file():
        raise KioskError(f"boot files: /usr/lib/u-boot/{u['binary']} is not in the root tree",
                         hint=f"u-boot-rpi must be in hardware/{board['name']}.json updatePackages")
    for tool, package in (("mkimage", "u-boot-tools"), ("mkenvimage", "u-boot-tools")):
        if not shutil.which(tool):
            raise KioskError(f"boot files: {tool} is not installed on this machine",
                             hint=f"apt install {package} (scripts/install-deps.sh)")
    with tempfile.TemporaryDirectory(prefix="kiosk-uboot-") as tmp:
        cmd, scr, txt, env = (Path(tmp) / n for n in ("boot.cmd", "boot.scr", "env.txt", ENV_FILE))
        cmd.write_text(boot_cmd(board))
        # mkimage stamps the script's header with SOURCE_DATE_EPOCH: the same bytes on every build
        run(["mkimage", "-A", u["mkimageArch"], "-O", "linux", "-T", "script", "-C", "none", "-n", "kiosk-ab",
             "-d", str(cmd), str(scr)], what="boot files (mkimage boot.scr)",
            env={"SOURCE_DATE_EPOCH": str(epoch)})
        txt.write_text(env_text(board))
        run(["mkenvimage", "-s", str(ENV_SIZE), "-o", str(env), str(txt)], what="boot files (mkenvimage)")
        return {Path(u["binary"]).name: binary.read_bytes(), "boot.scr": scr.read_bytes(),
                ENV_FILE: env.read_bytes(),
                SLOTS_FILE: slots_text(FIRST_SLOTS["BOOT_ORDER"], {"A": TRIES, "B": 0}).encode()}
