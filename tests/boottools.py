"""Boot real kiosk images in QEMU with `kiosk run`, and look inside them over SSH.

Used by tests/test_boot.py and bench/boot.py:

    spec = boot_spec("qemu", public_key)
    image = build_boot_image(spec, out_dir, cache_dir)        # kiosk.build.build: generation 1 and all
    with BootedVM(image, private_key, work_dir) as vm:          # `kiosk run IMAGE --headless ...`
        vm.wait_for_ssh()
        vm.ssh("systemctl is-active kiosk.service")

The image is built by kiosk.build (the real `kiosk build` path: base root
filesystem, configuration layer, generation 1 with configuration.git, the kiosk
package, users), from the same package set as tests/imagetools.py's minimal
images (program foot), so one cached base root filesystem per architecture
serves both test modules.

The program is foot running a shell that prints its arguments and then sleeps:
foot's own argv carries the awkward arguments (spaces, $HOME, 100%, quotes,
a backslash) so /proc/<pid>/cmdline proves systemd's quoting, and the screen
shows them.

Under QEMU's raspi machines Debian's kernels have no display device (no vc4
emulation, no simpledrm). `kiosk run` gives those VMs wlroots' headless backend on
the kernel command line (hardware/<board>.json qemu.append: systemd.setenv=...), so
cage runs the program from the first boot there too; the image itself carries no
such setting (see notes/boot.md).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Boards booted by the default test suite, and the slow (-m slow) rest. raspberryPi0 is slow since 2026-12-06:
# its TCG ARM1176 boot and pushes cost ~15 min of a CI worker, which pushed the suite past its 45 min; the
# raspberryPi3 runs the same A/B, U-Boot and push code in CI (notes/boot.md).
DEFAULT_BOARDS = ("qemu", "raspberryPi3")
SLOW_BOARDS = ("raspberryPi0", "raspberryPi4", "raspberryPi2", "raspberryPi1")

# The boards with an ARM1176 (QEMU's raspi0 and raspi1ap, under TCG). Their guest kernel stalls for minutes, on
# a quiet host too ("soft lockup - CPU#0 stuck for 501s!", notes/ab-update.md): a harness ssh to them waits
# longer than the longest stall seen, and so does the laptop's ssh in the update tests.
ARM1176_BOARDS = ("raspberryPi0", "raspberryPi1")

# foot's argv after its executable: awkward arguments for systemd's ExecStart= quoting, then a shell that
# prints its own (also awkward) arguments on the screen and keeps the terminal open.
NASTY_ARGS = [
    "--title=a b", "--app-id=kiosk-$HOME-100%", "--",
    "/bin/sh", "-c", 'printf "%s\\n" "kiosk boot test" "$@"; exec sleep infinity', "sh",
    'a "quoted" b', "$HOME", "100%", "back\\slash", "tab\there",
]
PROGRAM = {"package": "foot", "executable": "/usr/bin/foot", "args": NASTY_ARGS}

# kiosk.service's log, cage's and the program's lines included: PAMName= puts the process in the logind
# session's scope (session-N.scope), so `journalctl -u kiosk.service` alone misses what cage says.
KIOSK_JOURNAL = "journalctl -b --no-pager -o cat _SYSTEMD_UNIT=kiosk.service + _COMM=cage"
# Linux's dwc2 host driver, for each request while it thinks its root port is empty (BootedVM.usb_lost_for)
USB_PORT_LOST = re.compile(r"dwc2 \S+: Not connected")
# Where the boot tests keep what a person may want to look at afterwards (screenshots): not in the pytest
# basetemp, which the next run deletes.
ARTIFACTS = Path(os.environ.get("KIOSK_TEST_ARTIFACTS") or ROOT / "test-artifacts")


def record_figure(board: str, name: str, seconds: float) -> None:
    """Keep a timing in test-artifacts/figures-<board>.json (notes/boot.md's table comes from these)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"figures-{board}.json"
    figures = json.loads(path.read_text()) if path.exists() else {}
    figures[name] = round(seconds, 1)
    figures["cores"] = os.cpu_count()
    path.write_text(json.dumps(figures, indent=1, sort_keys=True) + "\n")


def boot_spec(board: str, public_key: str, *, host: str | None = None, program: dict | None = None,
              packages=()) -> dict:
    """The spec a boot test builds: imagetools' minimal spec with the session's key and the nasty argv."""
    from imagetools import TEST_KEY, full_spec

    spec = full_spec(board, host=host or f"boot-{board.lower()}", program=copy.deepcopy(program or PROGRAM),
                     packages=packages)
    spec["authorizedKeys"] = [public_key.strip(), TEST_KEY]
    return spec


def make_key(directory: Path) -> tuple[Path, str]:
    """A fresh ed25519 key pair: (private key path, public key line)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = directory / "id_ed25519"
    lock = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)   # pytest-xdist workers share it
    try:
        if not key.with_suffix(".pub").exists():
            key.unlink(missing_ok=True)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "kiosk-boot-test", "-f", str(key)],
                           check=True, stdin=subprocess.DEVNULL)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
    return key, key.with_suffix(".pub").read_text().strip()


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_boot_image(spec: dict, out_dir: Path, cache_dir: Path, *, log=print) -> tuple[Path, dict]:
    """Build the spec's image with kiosk.image.pipeline.build (what `kiosk build` runs); (image, manifest).

    Built once per out_dir: a later call (another worker, a rerun with the same basetemp) reuses it.
    """
    from kiosk.spec import load as specmod
    from kiosk.core.log import Log
    from kiosk.image.pipeline import build

    out_dir.mkdir(parents=True, exist_ok=True)
    lock = os.open(out_dir / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        marker = out_dir / "manifest.json"
        text = json.dumps(spec, indent=2) + "\n"
        if marker.exists() and (out_dir / "spec.json").exists() and (out_dir / "spec.json").read_text() == text:
            manifest = json.loads(marker.read_text())
            return Path(manifest["image"]), manifest
        (out_dir / "spec.json").write_text(text)

        class Out:
            def write(self, s):
                for line in s.splitlines():
                    if line.strip():
                        log(f"[{spec['hardware']}] {line}")

            def flush(self):
                pass

        with _env(KIOSK_CACHE_DIR=cache_dir):
            loaded = specmod.loads(text, str(out_dir / "spec.json"))
            manifest = build(loaded, text, out_dir, log=Log(out=Out()))
        return Path(manifest["image"]), manifest
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)


@contextlib.contextmanager
def removed_when_passed(session, paths: list[Path]):
    """Run the block; then remove `paths` (as the list is then) if it ended normally and no test failed meanwhile.

    For a boot module's fixture: its image, card copy and VM disk are ~1 GB each, and a run used to keep them
    all until it ended. The CI machine's disk filled that way (every later mkdir failed: "could not create
    numbered dir ... after 10 tries"). A failure keeps them for a look, as tmp_path_retention_policy = "failed"
    does for tmp_path. `session.testsfailed` counts errors and failures on this worker; loadgroup keeps a
    module fixture's tests on one worker.
    """
    failed = session.testsfailed
    yield
    if session.testsfailed == failed:
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class BootedVM:
    """One `kiosk run IMAGE --headless` in the background, with SSH and QMP at hand."""

    image: Path
    key: Path
    work: Path
    board: str = ""
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    port: int = 0
    started: float = 0.0        # time.monotonic() when `kiosk run` was started
    qemu_started: float = 0.0   # ... when QEMU's monitor socket appeared (QEMU is up)
    stopped: bool = False       # stop() was called (QEMU did not stop by itself)
    ssh_up: float = 0.0         # ... when the first SSH command succeeded
    usb_replugs: int = 0        # power cycles for a lost emulated USB port (replug_lost_usb)

    def __post_init__(self):
        self.work.mkdir(parents=True, exist_ok=True)
        self.qmp = self.work / "qmp.sock"
        self.serial = self.work / "serial.log"
        self.run_log = self.work / "kiosk-run.log"
        self.cache = self.work / "cache"   # kiosk run's KIOSK_CACHE_DIR: its disk copy lives in cache/run
        self._usb_lost_since: float | None = None
        self._replugging = threading.Lock()   # the test and HungRebootReset's thread may both look

    # -- lifecycle
    def start(self, port: int | None = None) -> "BootedVM":
        """Boot; on `port` (a power cycle keeps the device's address, as a real one does) or a free one."""
        self._close_shared()
        self.port = port or _free_port()
        self.qmp.unlink(missing_ok=True)
        self._usb_lost_since = None
        if self.serial.exists():   # a power cycle: the last run's console is kept, console() reads on across it
            self.serial.rename(self.work / f"serial-{len(list(self.work.glob('serial-*.log'))) + 1}.log")
        argv = [sys.executable, "-m", "kiosk", "run", str(self.image), "--headless", "--ssh-port", str(self.port),
                "--qmp", str(self.qmp), "--serial-log", str(self.serial), *self.extra_args]
        self.started = time.monotonic()
        env = dict(os.environ, KIOSK_CACHE_DIR=str(self.cache))
        with open(self.run_log, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env)
        deadline = time.monotonic() + 120
        while not self.qmp.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"kiosk run exited with {self.proc.returncode}: {self.run_log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"QEMU did not start in 120 s: {self.run_log.read_text()}")
            time.sleep(0.05)
        self.qemu_started = time.monotonic()
        return self

    def stop(self) -> None:
        self.stopped = True
        self._close_shared()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)   # kiosk run stops QEMU and removes its copy
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- ssh
    def ssh_argv(self, *options: str) -> list[str]:
        return ["ssh", "-p", str(self.port), "-i", str(self.key), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20",
                "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", *options, "root@127.0.0.1"]

    @property
    def control_path(self) -> str:
        """The shared connection's socket: short (a unix socket path has 108 bytes), one per VM port."""
        return f"/tmp/kiosk-vm-{self.port}.ssh"

    def _shared(self) -> tuple[str, ...]:
        """Options that run a command over one shared, already logged-in connection (ssh -M).

        Every login on a TCG raspi0 costs seconds, and logind's session churn is where its guest
        kernel was caught in a soft lockup for minutes (notes/boot.md); one login serves all the
        plain commands. Tests of authentication itself pass `options` and get their own connection.
        When the shared one is gone (the device rebooted), commands connect directly until a new one is up.
        """
        if not os.path.exists(self.control_path):
            subprocess.run([*self.ssh_argv("-M", "-N", "-f", "-o", f"ControlPath={self.control_path}",
                                           "-o", "ControlPersist=yes", "-o", "ServerAliveInterval=30",
                                           "-o", "ServerAliveCountMax=20")],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=120, check=False)
        return ("-o", f"ControlPath={self.control_path}", "-o", "ControlMaster=no")

    def _close_shared(self) -> None:
        if self.port and os.path.exists(self.control_path):
            subprocess.run(["ssh", "-o", f"ControlPath={self.control_path}", "-O", "exit", "root@127.0.0.1"],
                           capture_output=True, timeout=30, check=False)
            Path(self.control_path).unlink(missing_ok=True)

    def ssh(self, command: str, *, timeout: float | None = None, check: bool = True, options=(),
            shared: bool = True) -> subprocess.CompletedProcess:
        """Run `command` on the device; `timeout` defaults to 300 s, 900 s on the ARM1176 boards (their stalls)."""
        if timeout is None:
            timeout = 900 if self.board in ARM1176_BOARDS else 300
        for attempt in range(3):
            if not options and shared:
                try:
                    options = self._shared()
                except subprocess.TimeoutExpired:
                    options = ()
            result = subprocess.run([*self.ssh_argv(*options), command], capture_output=True, text=True,
                                    timeout=timeout, stdin=subprocess.DEVNULL)
            # 255 is ssh's own failure; on a busy TCG raspi1ap a connection sometimes drops with no message.
            # Retried, unless the device refused the login (that is what some tests look for).
            if result.returncode != 255 or "Permission denied" in result.stderr:
                break
            time.sleep(2)
        if check and result.returncode != 0:
            raise AssertionError(f"ssh {command!r} exited {result.returncode}: {result.stderr.strip()}"
                                 f"{result.stdout.strip()}")
        return result

    @property
    def repo_url(self) -> str:
        """The device's configuration repository, as a user clones it."""
        return f"ssh://root@127.0.0.1:{self.port}/etc/kiosk/configuration.git"

    def git_client(self, directory: Path):
        """A user's git over ssh to this device (sshd_harness.Client), its real host key in known_hosts."""
        from sshd_harness import Client

        directory.mkdir(parents=True, exist_ok=True)
        host_key = " ".join(self.ssh("cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[:2])
        return Client(directory, self.key, host_key, self.port)

    def wait_for_ssh(self, timeout: float = 900) -> float:
        """Seconds from QEMU's start until the device's sshd answered with the key."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise AssertionError(f"QEMU stopped: {self.run_log.read_text()[-2000:]}\n{self.tail()}")
            self.replug_lost_usb()
            try:
                if self.ssh("true", timeout=30, check=False, shared=False).returncode == 0:
                    self.ssh_up = time.monotonic()
                    return self.ssh_up - self.qemu_started
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"no SSH after {timeout:.0f} s; serial console:\n{self.tail()}")
            time.sleep(2)

    def wait_for(self, command: str, *, timeout: float = 600, interval: float = 2) -> str:
        """Run command over SSH until it succeeds; its stdout."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                last = self.ssh(command, check=False, timeout=180)
                if last.returncode == 0:
                    return last.stdout
            except subprocess.TimeoutExpired:   # a slow board still busy booting (raspi0 under TCG)
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{command!r} still failing after {timeout:.0f} s: "
                                     f"{last.stdout + last.stderr if last else 'timed out'}")
            time.sleep(interval)

    def console(self) -> str:
        """All the serial console said since the first start, across power cycles (each start writes a new
        serial.log; the earlier runs' are serial-1.log, serial-2.log, ...); "" before any."""
        runs = sorted(self.work.glob("serial-*.log"), key=lambda p: int(p.stem.split("-")[1]))
        text = ""
        for path in [*runs, self.serial]:
            try:
                text += path.read_text(errors="replace")
            except FileNotFoundError:   # between a power cycle's stop and QEMU's new file
                pass
        return text

    def usb_lost_for(self) -> float:
        """Seconds this run's kernel has shown QEMU's USB root port lost (0 if not): on a raspi machine its
        network is usb-net behind dwc2, and now and then the guest's dwc2 driver drops the port's connect
        status while it starts (the dwc2 lines say "Not connected" at every try, usb0 never appears, and no
        later event brings it back: notes/boot.md). Seen once in CI after a Pi 3 power cycle: no SSH in 900 s."""
        try:
            text = self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return 0.0
        if not USB_PORT_LOST.search(text) or "usb0: register" in text:
            self._usb_lost_since = None
            return 0.0
        if self._usb_lost_since is None:
            self._usb_lost_since = time.monotonic()
        return time.monotonic() - self._usb_lost_since

    def replug_lost_usb(self, grace: float = 60) -> bool:
        """A power cycle when the emulated USB has been lost `grace` seconds (usb_lost_for), at most twice in
        this VM's life: what a person does with a Pi whose network never came up. The guest is not at
        fault, so a test goes on; a third loss fails it (the wait's own timeout)."""
        if self.board == "qemu" or self.usb_replugs >= 2 or not self._replugging.acquire(blocking=False):
            return False
        try:
            if self.usb_lost_for() < grace:
                return False
            self.usb_replugs += 1
            print(f"\n[{self.board}] QEMU's emulated USB root port was lost at boot (dwc2: Not connected, no "
                  f"usb0) for {grace:.0f} s: power cycle {self.usb_replugs} of 2", flush=True)
            self.power_cycle()
            return True
        finally:
            self._replugging.release()

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.console().splitlines()[-lines:]) or "(no serial log)"

    # -- the kiosk
    def program_pid(self, executable: str) -> int | None:
        """The pid of the program running under kiosk.service's cage, or None."""
        out = self.ssh("main=$(systemctl show -p MainPID --value kiosk.service); "
                       f"for p in $(pgrep -x -P \"$main\" {shlex.quote(Path(executable).name)}); do echo $p; done",
                       check=False).stdout.split()
        return int(out[0]) if out else None

    def cmdline(self, pid: int | str) -> list[str]:
        """/proc/<pid>/cmdline as the list of arguments, byte for byte (base64 over SSH)."""
        raw = base64.b64decode(self.ssh(f"base64 -w0 /proc/{pid}/cmdline").stdout.strip())
        return raw.decode("utf-8", "surrogateescape").split("\0")[:-1]

    def wait_for_program(self, executable: str, *, timeout: float = 600) -> int:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                pid = self.program_pid(executable)
                if pid:
                    return pid
            if time.monotonic() > deadline:
                journal = self.ssh(f"{KIOSK_JOURNAL} | tail -30", check=False).stdout
                raise AssertionError(f"{executable} is not running under cage after {timeout:.0f} s; "
                                     f"kiosk.service's journal:\n{journal}")
            time.sleep(2)

    def known_hosts(self) -> Path:
        """A known_hosts file holding this device's real host key (for kiosk's own ssh commands)."""
        key = " ".join(self.ssh("cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[:2])
        path = self.work / "known_hosts"
        path.write_text(f"[127.0.0.1]:{self.port} {key}\n")
        return path

    def kiosk_screenshot(self, dest: Path) -> subprocess.CompletedProcess:
        """`kiosk screenshot` of this device, as a user runs it (ssh with the key, the host key checked)."""
        argv = [sys.executable, "-m", "kiosk", "screenshot", "127.0.0.1", "-p", str(self.port), "-i", str(self.key),
                "--ssh-option", f"UserKnownHostsFile={self.known_hosts()}", "-o", str(dest)]
        # An emulated ARMv6 on a loaded 2-core host can take more than the default 15 s to send sshd's
        # banner (seen on raspberryPi1 at load 9); a real board answers in a second or two.
        env = {**os.environ, "KIOSK_SSH_CONNECT_TIMEOUT": "60"}
        return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)

    def guest_seconds(self, pid: int) -> float:
        """When a process started, in seconds since the guest kernel started."""
        out = self.ssh(f"cut -d' ' -f22 /proc/{pid}/stat; getconf CLK_TCK").stdout.split()
        return int(out[0]) / int(out[1])

    def unit_active_since(self, unit: str) -> float:
        """Seconds since the guest kernel started when unit last became active."""
        usec = self.ssh(f"systemctl show -p ActiveEnterTimestampMonotonic --value {unit}").stdout.strip()
        return int(usec) / 1e6

    def power_cycle(self) -> None:
        """Power off and on again with the same card: `reboot` inside QEMU 7.2's raspi machines never resets (the
        guest stops after reboot.target) and after QMP's system_reset the raspi's USB network never answers
        again, so the device is stopped and booted anew on the very disk it wrote (kept by a hard link while
        kiosk run removes its copy; later boots use --disk)."""
        disk = self.work / "disk.img"
        if "--disk" not in self.extra_args:
            copies = list((self.cache / "run").glob("*/disk.img"))
            assert len(copies) == 1, copies
            os.link(copies[0], disk)
            self.extra_args = [*self.extra_args, "--disk", str(disk)]
        self.stop()
        self.stopped = False
        self.start(port=self.port)   # whoever was reaching the device (kiosk update, a git client) reaches it again

    def screendump(self, dest: Path) -> Path:
        from kiosk.qemu.qmp import screendump
        return screendump(self.qmp, dest)


def reset(vm: BootedVM) -> None:
    """What a machine's reset line does: QMP system_reset on the qemu target; on a raspi machine a power cycle
    on the same card, since after system_reset its emulated USB network never answers again (seen in a
    raspberryPi3 update: slot B booted, sshd started, ssh timed out at the banner; notes/boot.md)."""
    from kiosk.qemu.qmp import QMP

    if vm.board == "qemu":
        with QMP(vm.qmp) as qmp:
            qmp.execute("system_reset")
    else:
        vm.power_cycle()


class HungRebootReset:
    """QEMU's q35 + OVMF sometimes hangs after the guest's "reboot: Restarting system" (notes/ab-update.md,
    trap 6; seen again 2026-12-05: no reset in 15 min), and QEMU's raspi machines never reset by themselves
    (notes/boot.md). A real machine resets there, so while an update reboots the device this presses QMP
    system_reset when a restart has shown no new boot (the boot loader's "kiosk-ab:" line) within `grace`
    seconds: 180 on the qemu target, 10 on a raspi machine."""

    def __init__(self, vm: BootedVM, grace: float | None = None):
        if grace is None:
            grace = 180 if vm.board == "qemu" else 10
        self.vm, self.grace, self.pressed = vm, grace, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _hung_since(self, text: str, since: dict) -> float | None:
        restart = text.rfind("reboot: Restarting system")
        if restart < 0 or text.find("kiosk-ab:", restart) >= 0:
            return None
        return since.setdefault(restart, time.monotonic())

    def _watch(self) -> None:
        since: dict = {}
        again = 0   # presses since the last boot that came
        while not self.stop.wait(5):
            if self.vm.replug_lost_usb():
                since.clear()
                continue
            hung = self._hung_since(self.vm.console(), since)
            if hung is None:   # no restart, or a boot came after it
                again = 0
            elif time.monotonic() - hung > self.grace:
                # seen 2026-12-05: a q35 guest whose reboot hung came back from no system_reset (three in
                # 9 min); a real machine's power button is the next thing a person presses
                cycle = again > 0 and self.vm.board == "qemu"
                print(f"\n[update] the guest's reboot hung {self.grace:.0f} s: "
                      f"{'power cycle' if cycle else 'reset'}", flush=True)
                self.vm.power_cycle() if cycle else reset(self.vm)
                self.pressed += 1
                again += 1
                since.clear()
                self.stop.wait(30)   # the new boot writes its own lines

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=30)


def wait_until(what: str, check, timeout: float, every: float = 5):
    """check() until it gives something true (returned), or an AssertionError naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(every)


def boot_env(vm: "BootedVM", board: str) -> dict:
    """The boot loader's slot variables on the device's FAT: GRUB's grubenv (ORDER, A_TRY, ...) on the qemu
    target, U-Boot's uboot.env (BOOT_ORDER, BOOT_A_LEFT, ...) through libubootenv's fw_printenv on the Pis."""
    from kiosk.spec.hardware import load_board

    command = ("fw_printenv" if load_board(board).get("uboot")
               else "grub-editenv /boot/firmware/grub/grubenv list")
    out = vm.ssh(command).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def png_colours(path: Path) -> int:
    """How many distinct colours a PNG screenshot has."""
    from pngtools import png_pixels

    width, height, rows = png_pixels(Path(path).read_bytes())
    colours = set()
    for row in rows:
        for i in range(0, len(row), 3):
            colours.add(row[i:i + 3])
    return len(colours)


def make_fake_image(path: Path, *, files: dict[str, bytes], root_bytes: int = 32 << 20,
                    root_files: dict[str, bytes] | None = None) -> Path:
    """A small MBR image with a FAT partition holding `files` and a Linux partition (argv tests): empty, or an
    ext4 holding root_files (paths inside it)."""
    fat_start, fat_size = 1 << 20, 40 << 20
    with open(path, "wb") as f:
        f.truncate(fat_start + fat_size + root_bytes)
    script = (f"label: dos\nunit: sectors\n\nstart={fat_start // 512}, size={fat_size // 512}, type=c\n"
              f"start={(fat_start + fat_size) // 512}, size={root_bytes // 512}, type=83\n")
    subprocess.run(["sfdisk", "--quiet", str(path)], input=script, text=True, check=True, capture_output=True)
    subprocess.run(["mkfs.vfat", "-F", "32", "-n", "RASPIFIRM", f"--offset={fat_start // 512}", str(path),
                    str(fat_size // 1024)], check=True, capture_output=True)
    staging = path.with_name(path.name + ".files")
    staging.mkdir(exist_ok=True)
    names = []
    for name, data in files.items():
        (staging / name).write_bytes(data)
        names.append(str(staging / name))
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    subprocess.run(["mcopy", "-i", f"{path}@@{fat_start}", *names, "::"], check=True, env=env, capture_output=True)
    if root_files is not None:
        tree = path.with_name(path.name + ".root")
        for name, data in root_files.items():
            (tree / name.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            (tree / name.lstrip("/")).write_bytes(data)
        subprocess.run(["mke2fs", "-F", "-q", "-t", "ext4", "-E", f"offset={fat_start + fat_size}", "-d", str(tree),
                        str(path), f"{root_bytes >> 10}k"], check=True, capture_output=True)
    return path
