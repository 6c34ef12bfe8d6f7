"""Generations on the device: build one, point at it, link it into the live system, switch, roll back, recover.

Everything takes the device root as a parameter ("/" on a device; an image tree
at build time; a temporary directory in tests). State lives in ROOT/var/lib/kiosk:

    generations/N/root/...   the rendered layer (files with their modes and owners, dirs, symlinks)
    generations/N/nixiosk.json  the spec text exactly as committed (0600: Wi-Fi passphrases)
    generations/N/layer.json    manifest: path -> kind, mode, uid, gid, sha256, target
    generations/N/meta.json     number, commit, date, status, reason, packages, previous
    current -> generations/N    THE pointer: what the live links follow (the running configuration)
    default -> generations/N    what the next boot runs (differs from current only after `switch test|boot`)
    switch.json                 the journal of a switch in progress (present = not committed)
    pending.json                a pushed generation whose ref update configuration.git has not confirmed
    lock                        one push / switch at a time (flock)

A generation is written to generations/.tmp-N and renamed into place, so it is
complete or absent; afterwards only meta.json's status and reason change (each
time a whole new meta.json is written, fsynced and renamed over the old one, so
readers such as the agent always see one complete version).

Linking (like NixOS's /etc/static): every "file" entry of the layer becomes a
link ROOT/<path> -> ../<...>/var/lib/kiosk/current/root/<path> (relative, so it
resolves the same on the device and inside any other tree), so flipping
`current` switches every unchanged-kind file at once; "dir" entries are real
directories; "symlink" entries are placed directly.

A switch A -> B: journal {from, to, safe, step} (fsync) -> stop units that go
away -> (1) link paths new in B -> (2) flip current (and default) -> (3) replace
changed symlink entries -> (4) remove A-only paths -> activate -> health check
-> remove the journal (the commit point). `kiosk switch --recover` (at boot, by
kiosk-recover.service) returns an interrupted switch to the journal's `safe`
generation (the one before a switch, the target of a rollback), so a power cut
always leaves ONE complete, previously good generation linked.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kiosk.device import activation
from kiosk.core.errors import KioskError, UsageError
from kiosk.config.layer import Layer, apply_layer

STATE = "var/lib/kiosk"
DEVICE_STATE = "/var/lib/kiosk"
LINK_PREFIX = DEVICE_STATE + "/current/root"   # what live links lead to, as seen on the device
REPO = "etc/kiosk/configuration.git"
BRANCH = "refs/heads/main"
STATUSES = ("built", "active", "failed", "rolled-back", "superseded")
GOOD = ("active", "superseded", "rolled-back")   # generations that once ran healthily
RECOVER_UNIT = "/etc/systemd/system/kiosk-recover.service"
DEFAULT_LOCK_TIMEOUT = 600.0
SWITCH_STEPS = ("begin", "stopped", "linked", "flipped", "symlinks", "cleaned", "activated", "healthy")


# ---------------------------------------------------------------- output

class Log:
    """Progress for people: `==> stage` and indented details, flushed line by line (git push streams them).

    A pusher who disconnects (Ctrl-C on git push) must not stop a switch half-way: once the output is
    gone, lines only go to the tee file (ROOT/var/lib/kiosk/push.log for pushes), never raise."""

    def __init__(self, out=None):
        self.out = out
        self.gone = False
        self.tee = None
        self.lines: list[str] = []

    def tee_to(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            self.tee = open(path, "w", encoding="utf-8")
            self.tee.write("".join(line + "\n" for line in self.lines))

    def raw(self, text: str) -> None:
        """One line as it is (spec problems keep the exact form `kiosk validate` prints)."""
        self.lines.append(text)
        if self.tee:
            with contextlib.suppress(OSError, ValueError):
                self.tee.write(text + "\n")
                self.tee.flush()
        if self.gone:
            return
        try:
            print(text, file=self.out or sys.stderr, flush=True)
        except (OSError, ValueError):
            self.gone = True

    def stage(self, text: str) -> None:
        self.raw(f"==> {text}")

    def __call__(self, text: str) -> None:
        self.raw(f"    {text}")


def _crash_point(step: str) -> None:
    """Tests kill the process here (a real SIGKILL) to prove recovery: KIOSK_TEST_CRASH_AT=<step>."""
    if os.environ.get("KIOSK_TEST_CRASH_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- durable little files

def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write to a temporary name, fsync, rename over `path`, fsync the directory: old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json(path: Path, data, mode: int = 0o644) -> None:
    write_durable(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), mode)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def remove_durable(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        fsync_dir(path.parent)


def utc_date(epoch: float | None = None) -> str:
    moment = datetime.datetime.fromtimestamp(time.time() if epoch is None else epoch, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- generations

def state_dir(root: Path) -> Path:
    return Path(root) / STATE


def generations_dir(root: Path) -> Path:
    return state_dir(root) / "generations"


def repo_dir(root: Path) -> Path:
    return Path(root) / REPO


@dataclass
class Generation:
    number: int
    path: Path

    @property
    def meta(self) -> dict:
        return json.loads((self.path / "meta.json").read_text())

    @property
    def manifest(self) -> dict:
        return json.loads((self.path / "layer.json").read_text())

    @property
    def spec_text(self) -> str:
        return (self.path / "nixiosk.json").read_text(encoding="utf-8")

    def spec(self) -> dict:
        from kiosk.spec.load import with_defaults
        return with_defaults(json.loads(self.spec_text))

    def texts(self, paths) -> dict[str, str]:
        """Text of some of this generation's files (for the activation plan)."""
        out = {}
        for path in paths:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                out[path] = (self.path / "root" / path.lstrip("/")).read_text()
        return out

    def short(self) -> str:
        meta = self.meta
        return f"generation {self.number} (commit {meta.get('commit', '')[:12]})"


def generation(root: Path, number: int) -> Generation:
    path = generations_dir(root) / str(number)
    if not (path / "meta.json").is_file():
        raise KioskError(f"there is no generation {number} (see: kiosk generations)")
    return Generation(number, path)


def list_generations(root: Path) -> list[Generation]:
    base = generations_dir(root)
    if not base.is_dir():
        return []
    found = [Generation(int(p.name), p) for p in base.iterdir() if p.name.isdigit() and (p / "meta.json").is_file()]
    return sorted(found, key=lambda g: g.number)


def pointer(root: Path, name: str = "current") -> int | None:
    try:
        target = os.readlink(state_dir(root) / name)
    except (FileNotFoundError, OSError):
        return None
    tail = target.rstrip("/").rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else None


def set_pointer(root: Path, name: str, number: int) -> None:
    """Retarget a pointer atomically: symlink at a temporary name, fsync, rename over, fsync."""
    directory = state_dir(root)
    tmp = directory / f".{name}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(f"generations/{number}", tmp)
    fsync_dir(directory)
    os.replace(tmp, directory / name)
    fsync_dir(directory)


def current(root: Path) -> Generation | None:
    number = pointer(root, "current")
    return generation(root, number) if number is not None else None


def manifest_of(layer: Layer) -> dict:
    out = {}
    for path in sorted(layer):
        e = layer[path]
        item = {"kind": e.kind}
        if e.kind == "symlink":
            item["target"] = e.target
        else:
            item.update(mode=f"{e.mode:04o}", uid=e.uid, gid=e.gid)
        if e.kind == "file":
            item["sha256"] = hashlib.sha256(e.data).hexdigest()
        out[path] = item
    return out


def update_meta(gen: Generation, **changes) -> None:
    meta = gen.meta
    meta.update(changes)
    write_json(gen.path / "meta.json", meta)


def _fsync_tree(top: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(dirpath))


def write_generation(root: Path, spec_text: str, layer: Layer, *, commit: str, packages, previous: int | None,
                     date: str | None = None, status: str = "built", mtime: int | None = None) -> Generation:
    """Write generation N (the next number) complete, or not at all. The caller holds the lock."""
    base = generations_dir(root)
    base.mkdir(parents=True, exist_ok=True)
    for stale in base.glob(".tmp-*"):
        shutil.rmtree(stale)  # a build a power cut interrupted: never visible as a generation
    numbers = [int(p.name) for p in base.iterdir() if p.name.isdigit()]
    number = max(numbers, default=0) + 1
    tmp = base / f".tmp-{number}"
    (tmp / "root").mkdir(parents=True)
    apply_layer(layer, tmp / "root", mtime=mtime)
    spec_path = tmp / "nixiosk.json"
    fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # Wi-Fi passphrases: root only, whatever the umask
        os.write(fd, spec_text.encode("utf-8"))
    finally:
        os.close(fd)
    (tmp / "layer.json").write_text(json.dumps(manifest_of(layer), indent=1, sort_keys=True) + "\n")
    meta = {"number": number, "commit": commit, "date": date or utc_date(), "status": status, "reason": "",
            "packages": sorted(packages), "previous": previous}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    if mtime is not None:
        for path in (tmp, tmp / "root", spec_path, tmp / "layer.json", tmp / "meta.json"):
            os.utime(path, (mtime, mtime), follow_symlinks=False)
    _fsync_tree(tmp)
    os.rename(tmp, base / str(number))
    fsync_dir(base)
    return Generation(number, base / str(number))


# ---------------------------------------------------------------- linking into the live system

def _live(root: Path, path: str) -> Path:
    if not path.startswith("/") or ".." in path.split("/"):
        raise KioskError(f"bad layer path {path!r}")
    return Path(root) / path.lstrip("/")


def link_target(path: str) -> str:
    """Where the live link at `path` points: RELATIVE to its directory, through `current`
    (/etc/hostname -> ../var/lib/kiosk/current/root/etc/hostname). On the device it resolves exactly like
    the absolute /var/lib/kiosk/current/root/etc/hostname, and it also resolves inside any tree that is
    not "/": the image build's tree (systemd-sysusers/-tmpfiles --root ignore absolute links there:
    systemd 252), a card mounted on another machine, a test directory."""
    return os.path.relpath(LINK_PREFIX + path, os.path.dirname(path))


def _ours(path: str, dest: Path) -> bool:
    """A link this code placed for a "file" entry (either form, so older absolute links are recognised)."""
    return dest.is_symlink() and os.readlink(dest) in (link_target(path), LINK_PREFIX + path)


def _wanted_link(path: str, entry: dict) -> str | None:
    if entry["kind"] == "file":
        return link_target(path)
    if entry["kind"] == "symlink":
        return entry["target"]
    return None


def _place_symlink(dest: Path, target: str) -> None:
    tmp = dest.with_name(f".{dest.name}.kiosk-tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    try:
        os.replace(tmp, dest)
    except IsADirectoryError:
        tmp.unlink()
        raise KioskError(f"{dest}: is a directory on the device; the new generation wants a file there") from None


def _ensure(root: Path, path: str, entry: dict, touched: set[Path]) -> None:
    dest = _live(root, path)
    if not dest.parent.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
    want = _wanted_link(path, entry)
    if want is not None:
        if not (dest.is_symlink() and os.readlink(dest) == want):
            _place_symlink(dest, want)
            touched.add(dest.parent)
        return
    # a real directory, with its mode and owner
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        dest.unlink()
    if not dest.is_dir():
        dest.mkdir()
        touched.add(dest.parent)
    os.chmod(dest, int(entry["mode"], 8))
    if os.geteuid() == 0:
        os.lchown(dest, entry["uid"], entry["gid"])


def _remove_ours(root: Path, path: str, entry: dict, touched: set[Path]) -> None:
    """Remove what a generation put at `path`, and only that (a file someone put there stays)."""
    dest = _live(root, path)
    want = _wanted_link(path, entry)
    if want is not None:
        if (dest.is_symlink() and os.readlink(dest) == want) or (entry["kind"] == "file" and _ours(path, dest)):
            dest.unlink()
            touched.add(dest.parent)
    elif dest.is_dir() and not dest.is_symlink():
        with contextlib.suppress(OSError):
            dest.rmdir()  # only when empty
            touched.add(dest.parent)


def _conflicts(root: Path, manifest: dict) -> list[str]:
    """Paths the generation cannot take over: a real directory where it wants a file or symlink."""
    out = []
    for path, entry in manifest.items():
        dest = _live(root, path)
        if entry["kind"] != "dir" and dest.is_dir() and not dest.is_symlink():
            out.append(f"{path}: is a directory on the device, the generation wants a {entry['kind']} there")
    return out


def _sync(touched: set[Path]) -> None:
    for directory in sorted(touched):
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(directory)
    touched.clear()


def reconcile(root: Path, target: Generation, others: list[Generation] = ()) -> None:
    """Make the live system exactly `target`: its links, dirs and symlinks in place, the others' extras gone,
    current -> target. Idempotent: recovery runs it whatever step a switch stopped at."""
    tm = target.manifest
    touched: set[Path] = set()
    for other in others:
        om = other.manifest
        for path in sorted(om, reverse=True):  # children before their directories
            if path not in tm:
                _remove_ours(root, path, om[path], touched)
    for path in sorted(tm):
        _ensure(root, path, tm[path], touched)
    _sync(touched)
    set_pointer(root, "current", target.number)


def verify(root: Path) -> list[str]:
    """Problems with the live system (empty when consistent): every path of the current generation is
    linked into it and resolves to its file with the recorded digest; no other generation's link remains."""
    gen = current(root)
    if gen is None:
        return ["no current generation"]
    problems = []
    tm = gen.manifest
    for path, entry in tm.items():
        dest = _live(root, path)
        want = _wanted_link(path, entry)
        if want is not None:
            if not dest.is_symlink() or os.readlink(dest) != want:
                problems.append(f"{path}: not linked to {want}")
            elif entry["kind"] == "file":
                real = gen.path / "root" / path.lstrip("/")
                if dest.resolve() != real.resolve():  # the whole chain, through `current`, inside the root
                    problems.append(f"{path}: resolves to {dest.resolve()}, not into generation {gen.number}")
                elif hashlib.sha256(real.read_bytes()).hexdigest() != entry["sha256"]:
                    problems.append(f"{path}: generation {gen.number}'s file differs from its manifest")
        elif not dest.is_dir() or dest.is_symlink():
            problems.append(f"{path}: not a directory")
    for other in list_generations(root):
        for path, entry in other.manifest.items():
            if path in tm:
                continue
            dest = _live(root, path)
            want = _wanted_link(path, entry)
            if want is not None and ((dest.is_symlink() and os.readlink(dest) == want)
                                     or (entry["kind"] == "file" and _ours(path, dest))):
                problems.append(f"{path}: still linked for generation {other.number}")
    return problems


# ---------------------------------------------------------------- the lock

@contextlib.contextmanager
def device_lock(root: Path, what: str, log: Log, timeout: float | None = None):
    """One push or switch at a time; a second waits (saying so) up to `timeout` seconds, then is refused."""
    if timeout is None:
        timeout = float(os.environ.get("KIOSK_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT))
    state = state_dir(root)
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
                    log(f"waiting for another push to finish... ({holder or 'the device is busy'})")
                    said = True
                if time.monotonic() >= deadline:
                    raise KioskError(f"another push or switch has held the device for over {timeout:.0f}s; "
                                     "nothing was changed; push again later") from None
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {what}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # who holds it, only while held
    finally:
        os.close(fd)  # releases the flock


# ---------------------------------------------------------------- packages

class Installer:
    """Installs Debian packages on the device. Issue 8 (kiosk.device.fetch) provides one for remote builders."""

    name = "none"

    def install(self, root: Path, packages: list[str], spec: dict, log: Log) -> None:
        log(f"not installing {' '.join(packages)}: {root} is not a running device")


class AptInstaller(Installer):
    """apt-get on the running device, from the spec's mirror and suite (only ever with root "/")."""

    name = "apt"

    def install(self, root, packages, spec, log):
        import tempfile

        if Path(root).resolve() != Path("/"):
            raise KioskError("apt-get can only install packages on the running device (root /)")
        debian = spec.get("debian", {})
        sources = f"deb {debian.get('mirror')} {debian.get('suite')} main non-free-firmware\n"
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", APT_LISTCHANGES_FRONTEND="none")
        with tempfile.TemporaryDirectory(prefix="kiosk-apt-") as tmp:
            (Path(tmp) / "sources.list").write_text(sources)
            (Path(tmp) / "parts").mkdir()
            opts = ["-o", f"Dir::Etc::SourceList={tmp}/sources.list", "-o", f"Dir::Etc::SourceParts={tmp}/parts",
                    "-o", "Dpkg::Options::=--force-confdef", "-o", "Dpkg::Options::=--force-confold"]
            for argv in (["apt-get", *opts, "update"],
                         ["apt-get", *opts, "install", "-y", "--no-install-recommends", *packages]):
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                tail = []
                for line in proc.stdout:
                    line = line.rstrip()
                    tail = (tail + [line])[-5:]
                    log(f"apt: {line}")
                if proc.wait() != 0:
                    raise KioskError(f"{' '.join(argv[:1] + argv[-len(packages) - 4:])} failed: "
                                     f"{tail[-1] if tail else proc.returncode}")


class RecordingInstaller(Installer):
    name = "recording"

    def __init__(self, recorder: activation.RecordingActivator):
        self.recorder = recorder

    def install(self, root, packages, spec, log):
        self.recorder.install(packages)


def default_installer(root: Path, spec: dict, activator: activation.Activator | None = None) -> Installer:
    """Remote builders when the spec names them (issue 8; they install into any root with dpkg --root,
    so tests run them for real); else the recording installer in tests; else apt."""
    if spec.get("builders") or (spec.get("localSystem") or {}).get("hostName"):
        try:
            from kiosk.device import fetch  # issue 8
            return fetch.package_installer(spec)
        except (ImportError, AttributeError):
            pass
    if isinstance(activator, activation.RecordingActivator):
        return RecordingInstaller(activator)
    if Path(root).resolve() != Path("/"):
        return Installer()
    return AptInstaller()


def ensure_packages(root: Path, old_packages, new_packages, spec: dict, log: Log,
                    installer: Installer | None = None) -> list[str]:
    """Install the packages the new generation adds, BEFORE switching; returns them.

    Packages the new spec no longer names are left installed and simply not referenced: a
    rollback to the previous generation then needs no package work, and nothing the running
    system uses disappears under it. Not atomic (apt is not): a failure leaves whatever apt
    managed to install, which the current generation does not reference.
    """
    added = sorted(set(new_packages) - set(old_packages))
    removed = sorted(set(old_packages) - set(new_packages))
    if removed:
        log(f"no longer named (left installed, not used): {' '.join(removed)}")
    if not added:
        return []
    installer = installer or default_installer(root, spec)
    log(f"installing with {installer.name}: {' '.join(added)}")
    installer.install(Path(root), added, spec, log)
    return added


# ---------------------------------------------------------------- switching

def _journal_path(root: Path) -> Path:
    return state_dir(root) / "switch.json"


def read_journal(root: Path) -> dict | None:
    return _read_json(_journal_path(root))


class Switch:
    """One switch from generation A (or none) to B with its journal; used by pushes, rollbacks, recovery."""

    def __init__(self, root: Path, old: Generation | None, new: Generation, *, mode: str, purpose: str,
                 activator: activation.Activator, log: Log, reason: str = ""):
        self.root, self.old, self.new = Path(root), old, new
        self.mode, self.purpose, self.reason = mode, purpose, reason
        self.activator, self.log = activator, log
        self.om = old.manifest if old else {}
        self.nm = new.manifest
        wanted = [p for p in {*self.nm, *self.om}
                  if p.startswith((activation.UNIT_DIR, "/etc/sysusers.d/")) or p == "/etc/hostname"]
        self.plan = activation.plan(self.om, self.nm, new_texts=new.texts(wanted),
                                    old_texts=old.texts(wanted) if old else {})
        self.journal = {"from": old.number if old else None, "to": new.number, "mode": mode, "purpose": purpose,
                        "safe": new.number if purpose == "rollback" else (old.number if old else new.number),
                        "defaultBefore": pointer(root, "default"), "step": "begin", "reason": reason}

    def changes(self) -> list[str]:
        om, nm = self.om, self.nm
        added = sorted(p for p in nm if p not in om)
        removed = sorted(p for p in om if p not in nm)
        changed = sorted(p for p in nm if p in om and om[p] != nm[p])
        out = []
        for label, paths in (("files changed", changed), ("files added", added), ("files removed", removed)):
            if paths:
                shown = ", ".join(paths[:12]) + (f", ... ({len(paths) - 12} more)" if len(paths) > 12 else "")
                out.append(f"{label}: {shown}")
        if not out:
            out.append("files: no change")
        return out + (self.plan.lines() or ["units: no change"])

    def _crash(self, step: str) -> None:
        _crash_point(f"rollback-{step}" if self.purpose == "rollback" else step)

    def _step(self, step: str) -> None:
        self.journal["step"] = step
        write_json(_journal_path(self.root), self.journal)
        self._crash(step)

    def links(self) -> None:
        """Steps 1-4: new links, flip, changed symlinks, old paths gone. Current (and default) end at B."""
        root, om, nm, log = self.root, self.om, self.nm, self.log
        touched: set[Path] = set()
        new_paths = [p for p in sorted(nm) if p not in om and nm[p]["kind"] in ("file", "dir")]
        for path in new_paths:
            _ensure(root, path, nm[path], touched)
        _sync(touched)
        log(f"1/4 linked {len(new_paths)} new path(s)")
        self._step("linked")

        set_pointer(root, "current", self.new.number)
        if self.mode == "switch" or self.purpose == "rollback":
            set_pointer(root, "default", self.new.number)
        log(f"2/4 current -> generations/{self.new.number}"
            + ("" if pointer(root, "default") == self.new.number else
               f" (default stays generations/{pointer(root, 'default')})"))
        self._step("flipped")

        replaced = [p for p in sorted(nm) if om.get(p) != nm[p] and (
            nm[p]["kind"] in ("symlink", "dir") or (p in om and nm[p]["kind"] != om[p]["kind"]))]
        for path in replaced:
            _ensure(root, path, nm[path], touched)
        _sync(touched)
        log(f"3/4 updated {len(replaced)} symlink and directory entr{'y' if len(replaced) == 1 else 'ies'}")
        self._step("symlinks")

        gone = [p for p in sorted(om, reverse=True) if p not in nm]
        for path in gone:
            _remove_ours(root, path, om[path], touched)
        _sync(touched)
        log(f"4/4 removed {len(gone)} path(s) generation {self.new.number} does not have")
        self._step("cleaned")

    def activate(self) -> None:
        """Tell the service manager; raises ActivationFailed."""
        a, p, log = self.activator, self.plan, self.log
        if p.daemon_reload:
            log("systemctl daemon-reload")
            a.daemon_reload()
        if p.hostname:
            log(f"host name -> {p.hostname}")
            a.set_hostname(p.hostname)
        for verb, units, call in (("reload", p.reload, a.reload), ("restart", p.restart, a.restart),
                                  ("try-restart", p.try_restart, a.try_restart), ("start", p.start, a.start)):
            if units:
                log(f"systemctl {verb} {' '.join(units)}")
                call(units)
        for argv in p.commands:  # after the units: sysusers has created any new user by now
            log(f"run {' '.join(argv)}")
            a.run(argv)
        if p.empty():
            log("nothing to tell systemd")
        self._step("activated")

    def health(self, settle: float) -> list[str]:
        units = sorted(set(activation.HEALTH_UNITS) | set(self.plan.touched_units()))
        units = [u for u in units if u not in self.plan.stop]
        self.log.stage(f"health check: {', '.join(units)} (up and staying up for {settle:g}s)")
        problems = self.activator.health(units, settle)
        for unit in units:
            bad = [p for p in problems if p.startswith(unit + ":")]
            self.log(f"FAILED {bad[0]}" if bad else f"{unit}: up")
        return problems

    def stop_units(self) -> None:
        if self.plan.stop:
            self.log(f"systemctl stop {' '.join(self.plan.stop)}")
            self.activator.stop(self.plan.stop)
        self._step("stopped")

    def preflight(self) -> None:
        """Refuse before anything changes: paths the new generation cannot take over."""
        problems = _conflicts(self.root, self.nm)
        if problems:
            raise KioskError("generation %d cannot be linked: %s" % (self.new.number, "; ".join(problems)))

    def run(self, settle: float) -> list[str]:
        """The whole switch; returns health problems ([] = healthy). The journal stays until commit()."""
        self._step("begin")
        try:
            self.log.stage(f"switch to generation {self.new.number}")
            self.stop_units()
            self.links()
            self.log.stage("activate")
            self.activate()
        except Exception as exc:  # anything at all: the caller rolls back to the journal's safe generation
            why = str(exc) if isinstance(exc, KioskError) else f"{type(exc).__name__}: {exc}"
            self.log(f"FAILED: {why}")
            return [why]
        problems = self.health(settle)
        if not problems:
            self._step("healthy")
        return problems

    def commit(self) -> None:
        """The switch is final: statuses, then the journal goes (after this, recovery keeps B)."""
        if self.purpose != "rollback":
            if self.old and self.old.number != self.new.number and self.old.meta.get("status") == "active":
                update_meta(self.old, status="rolled-back" if self.purpose == "manual-rollback" else "superseded")
            update_meta(self.new, status="active", reason="")
        _update_default_marker(self.root)
        remove_durable(_journal_path(self.root))


def _update_default_marker(root: Path) -> None:
    """kiosk-recover.service runs at boot only when there is something to do: this marker says the
    next boot must switch to `default` (after `kiosk switch test|boot`)."""
    marker = state_dir(root) / "default-differs"
    if pointer(root, "current") != pointer(root, "default"):
        write_durable(marker, f"{pointer(root, 'default')}\n".encode())
    else:
        remove_durable(marker)


def rollback(root: Path, failed: Generation, good: Generation, reason: str, activator, log: Log,
             settle: float) -> list[str]:
    """Back from a failed switch to `good`, with the same machinery; the failed one is marked failed."""
    log.stage(f"rolling back to generation {good.number}")
    back = Switch(root, failed, good, mode="switch", purpose="rollback", activator=activator, log=log, reason=reason)
    problems = back.run(settle)
    if problems:
        log(f"generation {good.number} is not healthy either: {'; '.join(problems)}")
    update_meta(failed, status="failed", reason=reason)
    update_meta(good, status="active")
    _update_default_marker(root)
    remove_durable(_journal_path(root))
    return problems


def switch_to(root: Path, target: Generation, *, mode: str, purpose: str, activator, log: Log,
              settle: float | None = None) -> None:
    """Switch the device to `target` (kiosk switch, kiosk rollback); rolls back by itself when unhealthy."""
    settle = activation.settle_seconds() if settle is None else settle
    old = current(root)
    if mode == "boot":
        set_pointer(root, "default", target.number)
        _update_default_marker(root)
        log(f"default -> generations/{target.number}: the next boot runs it (nothing activated now)")
        return
    sw = Switch(root, old, target, mode=mode, purpose=purpose, activator=activator, log=log)
    log.stage(f"changes from generation {old.number if old else '-'} to {target.number}")
    for line in sw.changes():
        log(line)
    if mode == "dry-activate":
        log("dry-activate: nothing was changed")
        return
    sw.preflight()
    problems = sw.run(settle)
    if problems:
        reason = "; ".join(problems)
        if old is None or old.number == target.number:
            remove_durable(_journal_path(root))
            raise KioskError(f"generation {target.number} is not healthy: {reason}")
        rollback(root, target, old, reason, activator, log, settle)
        raise KioskError(f"rolled back to generation {old.number}: generation {target.number} failed: {reason}")
    sw.commit()
    log.stage(f"generation {target.number} is active" + ("" if mode == "switch" else
                                                           f" (default stays generation {pointer(root, 'default')})"))


def prune(root: Path, log: Log, keep: int | None = None) -> list[int]:
    """Delete all but the newest `keep` generations (KIOSK_KEEP_GENERATIONS, default 10), never the
    current or default one. Each goes in one rename (it vanishes whole), then its files are deleted."""
    if keep is None:
        keep = int(os.environ.get("KIOSK_KEEP_GENERATIONS", "10"))
    all_gens = list_generations(root)
    spare = {pointer(root, "current"), pointer(root, "default")}
    pending = read_pending(root)
    if pending:
        spare |= {pending.get("generation"), pending.get("previous")}
    doomed = [g for g in all_gens[:-keep] if g.number not in spare] if keep > 0 else []
    for gen in doomed:
        gone = gen.path.with_name(f".tmp-gone-{gen.number}")
        os.rename(gen.path, gone)
        fsync_dir(gen.path.parent)
        shutil.rmtree(gone)
    if doomed:
        log(f"deleted {len(doomed)} old generation(s): {', '.join(str(g.number) for g in doomed)}")
    return [g.number for g in doomed]


# ---------------------------------------------------------------- pending pushes

def _pending_path(root: Path) -> Path:
    return state_dir(root) / "pending.json"


def _process_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def write_pending(root: Path, commit: str, number: int, previous: int | None, pid: int) -> None:
    write_json(_pending_path(root), {"commit": commit, "generation": number, "previous": previous,
                                     "pid": pid, "pidStart": _process_start(pid)})


def read_pending(root: Path) -> dict | None:
    return _read_json(_pending_path(root))


def clear_pending(root: Path) -> None:
    remove_durable(_pending_path(root))


def repo_main(root: Path) -> str | None:
    """The commit configuration.git's main points at (None without a repository)."""
    repo = repo_dir(root)
    if not repo.is_dir():
        return None
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    proc = subprocess.run(["git", "--git-dir", str(repo), "rev-parse", "--verify", "-q", BRANCH + "^{commit}"],
                          capture_output=True, text=True, env=env)
    return proc.stdout.strip() or None


def resolve_pending(root: Path, activator, log: Log, *, settle: float = 0.0) -> str:
    """A push that switched the device but whose ref update was not (yet) seen. Returns
    "none", "confirmed", "in-progress" (its git receive-pack still runs) or "reverted"."""
    pending = read_pending(root)
    if not pending:
        return "none"
    if repo_main(root) == pending["commit"]:
        clear_pending(root)
        return "confirmed"
    pid = pending.get("pid")
    if pid and _process_start(pid) is not None and _process_start(pid) == pending.get("pidStart"):
        return "in-progress"
    # git push never reported success (the ref was not updated): the device goes back to what main says.
    gen = current(root)
    reason = "its push did not complete: configuration.git's main was never moved to it"
    previous = pending.get("previous")
    if gen is not None and gen.number == pending["generation"] and previous is not None:
        log(f"generation {gen.number} was deployed but its push did not complete; returning to generation {previous}")
        good = generation(root, previous)
        rollback(root, gen, good, reason, activator, log, settle)
    elif gen is not None and gen.number == pending["generation"]:
        update_meta(gen, reason=reason)
    clear_pending(root)
    return "reverted"


# ---------------------------------------------------------------- recovery

def recover(root: Path, activator, log: Log, *, at_boot: bool = False) -> bool:
    """Finish or undo whatever a power cut or kill -9 interrupted; returns True if anything changed.

    Afterwards the device is on ONE complete generation: every link of it in place, no other's left.
    """
    root = Path(root)
    changed = False
    base = generations_dir(root)
    if base.is_dir():
        for stale in base.glob(".tmp-*"):
            log(f"removing an incomplete generation build: {stale.name}")
            shutil.rmtree(stale)
    for stale in state_dir(root).glob(".*.tmp") if state_dir(root).is_dir() else []:
        stale.unlink()
    journal = read_journal(root)
    if journal:
        safe = generation(root, journal["safe"])
        others = [generation(root, n) for n in (journal["from"], journal["to"])
                  if n is not None and n != safe.number and (base / str(n) / "meta.json").is_file()]
        log(f"an interrupted {journal['purpose']} from generation {journal['from']} to {journal['to']} "
            f"(at step {journal['step']}): returning to generation {safe.number}")
        reconcile(root, safe, others)
        if journal["purpose"] == "rollback" or journal.get("defaultBefore") is None:
            set_pointer(root, "default", safe.number)
        else:
            set_pointer(root, "default", journal["defaultBefore"])
        for other in others:
            if other.meta.get("status") in ("built", "active"):
                update_meta(other, status="failed",
                            reason=f"interrupted at step '{journal['step']}' (power cut or killed); recovered")
        update_meta(safe, status="active")
        pending = read_pending(root)
        if pending and pending.get("generation") != safe.number:
            clear_pending(root)
        _update_default_marker(root)
        remove_durable(_journal_path(root))
        changed = True
        if not at_boot:
            restore = Switch(root, others[0] if others else None, safe, mode="switch", purpose="recover",
                             activator=activator, log=log)
            with contextlib.suppress(KioskError):
                restore.activate()
            remove_durable(_journal_path(root))
    if not at_boot and read_pending(root):
        # the running system: a push may still be finishing
        changed |= resolve_pending(root, activator, log) == "reverted"
    elif read_pending(root):
        # at boot no push is running: confirm against configuration.git, or go back
        pending = read_pending(root)
        if repo_main(root) == pending["commit"]:
            clear_pending(root)
        else:
            gen = current(root)
            if gen is not None and gen.number == pending["generation"] and pending.get("previous") is not None:
                good = generation(root, pending["previous"])
                log(f"generation {gen.number}'s push did not complete; returning to generation {good.number}")
                reconcile(root, good, [gen])
                set_pointer(root, "default", good.number)
                update_meta(gen, status="failed", reason="its push did not complete (power cut before "
                                                         "configuration.git recorded it)")
                update_meta(good, status="active")
                changed = True
            clear_pending(root)
    cur, default = pointer(root, "current"), pointer(root, "default")
    if at_boot and default is not None and cur != default:
        target = generation(root, default)
        old = current(root) if cur is not None and (base / str(cur) / "meta.json").is_file() else None
        log(f"booting the default generation {default} (current was {cur})")
        reconcile(root, target, [old] if old else [])
        if old and old.meta.get("status") == "active":
            update_meta(old, status="superseded")
        update_meta(target, status="active")
        changed = True
    elif cur is None or not (base / str(cur) / "meta.json").is_file():
        good = [g for g in list_generations(root) if g.meta.get("status") in GOOD]
        if good:
            target = generation(root, default) if default is not None and (base / str(default)).is_dir() \
                else good[-1]
            log(f"current points at no generation; linking generation {target.number}")
            reconcile(root, target, [g for g in list_generations(root) if g.number != target.number])
            set_pointer(root, "default", target.number)
            changed = True
    if current(root) is not None:
        _update_default_marker(root)
    if changed and at_boot:
        activator.boot_reconcile()
    return changed


# ---------------------------------------------------------------- generation 1, in the image

def _git(args, *, cwd=None, env=None, input=None) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    clean.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null")
    clean.update(env or {})
    proc = subprocess.run(["git", *args], cwd=cwd, env=clean, input=input, capture_output=True)
    if proc.returncode != 0:
        raise KioskError(f"git {' '.join(args[:2])} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout.decode().strip()


def commit_env(epoch: int) -> dict:
    date = f"@{epoch} +0000"
    return {"GIT_AUTHOR_NAME": "kiosk", "GIT_AUTHOR_EMAIL": "kiosk@localhost", "GIT_AUTHOR_DATE": date,
            "GIT_COMMITTER_NAME": "kiosk", "GIT_COMMITTER_EMAIL": "kiosk@localhost", "GIT_COMMITTER_DATE": date}


def install_first_generation(root: Path, spec_text: str, layer: Layer, *, epoch: int, hooks_dir: Path) -> str:
    """Generation 1 inside an image's root tree at build time; returns configuration.git's first commit.

    Creates ROOT/etc/kiosk/configuration.git (bare, 0700, main, no non-fast-forwards, no deletes)
    holding spec_text as its first commit (author/committer kiosk, dates = epoch: a reproducible sha),
    copies the hooks in, writes generation 1 (status active), links it, and points current and
    default at it. Works on any tree (links still name the device path /var/lib/kiosk/current/...).
    """
    from kiosk.spec.plan import make_plan
    from kiosk.spec.load import with_defaults

    root = Path(root)
    repo = repo_dir(root)
    if repo.exists() or generations_dir(root).exists():
        raise KioskError(f"{root} already has generations or configuration.git; install_first_generation "
                         "only makes the first one")
    repo.parent.mkdir(parents=True, exist_ok=True)
    _git(["init", "--quiet", "--bare", "--template=", "--initial-branch=main", str(repo)])
    os.chmod(repo, 0o700)  # the spec holds Wi-Fi passphrases
    for key, value in (("receive.denyNonFastForwards", "true"), ("receive.denyDeletes", "true"),
                       ("receive.fsckObjects", "true"), ("gc.autoDetach", "false")):
        _git(["--git-dir", str(repo), "config", key, value])
    blob = _git(["--git-dir", str(repo), "hash-object", "-w", "--stdin"], input=spec_text.encode("utf-8"))
    tree = _git(["--git-dir", str(repo), "mktree"], input=f"100644 blob {blob}\tnixiosk.json\n".encode())
    commit = _git(["--git-dir", str(repo), "commit-tree", tree, "-m", "nixiosk.json as built into the image"],
                  env=commit_env(epoch))
    _git(["--git-dir", str(repo), "update-ref", BRANCH, commit])
    hooks = repo / "hooks"
    hooks.mkdir(exist_ok=True)
    for name in ("pre-receive", "post-receive"):
        shutil.copyfile(Path(hooks_dir) / name, hooks / name)
        os.chmod(hooks / name, 0o755)

    spec = with_defaults(json.loads(spec_text))
    state = state_dir(root)
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o755)
    gen = write_generation(root, spec_text, layer, commit=commit, packages=make_plan(spec).packages,
                           previous=None, date=utc_date(epoch), status="active", mtime=epoch)
    reconcile(root, gen)
    set_pointer(root, "default", gen.number)
    fd = os.open(state / "lock", os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    # reproducible: every file and link made here carries SOURCE_DATE_EPOCH
    for top in (repo, state):
        for dirpath, dirnames, filenames in os.walk(top):
            for name in dirnames + filenames:
                os.utime(os.path.join(dirpath, name), (epoch, epoch), follow_symlinks=False)
        os.utime(top, (epoch, epoch))
    touched = {repo.parent, state.parent, state.parent.parent}
    for path in gen.manifest:
        live = _live(root, path)
        touched.update(p for p in live.parents if p != root and root in p.parents)
        with contextlib.suppress(FileNotFoundError):
            os.utime(live, (epoch, epoch), follow_symlinks=False)
    for directory in touched:  # links replaced files: their directories' times changed
        with contextlib.suppress(FileNotFoundError):
            os.utime(directory, (epoch, epoch))
    return commit


def recovery_unit() -> tuple[str, str]:
    """The boot unit that finishes or undoes an interrupted switch before any kiosk service starts.

    It runs only when there is something to do (a journal, an unconfirmed push, or a default that
    differs from current after `kiosk switch test|boot`), so a normal boot pays nothing for it."""
    text = (
        "# Written by kiosk: finish or undo an interrupted generation switch, boot the default generation.\n"
        "[Unit]\n"
        "Description=Kiosk: recover an interrupted generation switch\n"
        "DefaultDependencies=no\n"
        "RequiresMountsFor=/var/lib/kiosk\n"
        "After=local-fs.target systemd-remount-fs.service\n"
        # Not Before=systemd-sysusers.service: that runs before local-fs-pre.target (tmpfiles-setup-dev needs
        # it), so with After=local-fs.target it made an ordering cycle and systemd dropped sysusers at boot.
        "Before=sysinit.target systemd-tmpfiles-setup.service shutdown.target\n"
        "Conflicts=shutdown.target\n"
        f"ConditionPathExists=|{DEVICE_STATE}/switch.json\n"
        f"ConditionPathExists=|{DEVICE_STATE}/pending.json\n"
        f"ConditionPathExists=|{DEVICE_STATE}/default-differs\n"
        f"ConditionPathExists=|!{DEVICE_STATE}/current\n"
        "\n[Service]\n"
        "Type=oneshot\n"
        "ExecStart=/usr/bin/kiosk switch --recover --at-boot\n"
        "StandardOutput=journal+console\n"
        "\n[Install]\n"
        "WantedBy=sysinit.target\n")
    return RECOVER_UNIT, text


def recovery_layer() -> Layer:
    """recovery_unit() as layer entries, enabled (for the image build's base tree, not a generation)."""
    from kiosk.config.layer import file, symlink
    path, text = recovery_unit()
    return {path: file(text), "/etc/systemd/system/sysinit.target.wants/kiosk-recover.service": symlink(path)}


# ---------------------------------------------------------------- CLI

def _root(args) -> Path:
    return Path(args.root)


def cmd_generations(args) -> int:
    root = _root(args)
    cur, default = pointer(root, "current"), pointer(root, "default")
    rows = []
    for gen in list_generations(root):
        meta = gen.meta
        rows.append({"number": gen.number, "date": meta.get("date"), "commit": meta.get("commit"),
                     "status": meta.get("status"), "reason": meta.get("reason", ""),
                     "current": gen.number == cur, "default": gen.number == default,
                     "previous": meta.get("previous")})
    if args.json:
        json.dump({"current": cur, "default": default, "generations": rows}, sys.stdout, indent=2)
        print()
        return 0
    if not rows:
        print(f"no generations under {generations_dir(root)}")
        return 1
    print(f"{'':2}{'GEN':>4}  {'DATE':20}  {'COMMIT':12}  {'STATUS':11}  NOTE")
    for row in rows:
        mark = "*" if row["current"] else " "
        notes = [n for n, on in (("current", row["current"]), ("default", row["default"])) if on]
        if row["reason"]:
            notes.append(row["reason"])
        print(f"{mark:2}{row['number']:>4}  {row['date'] or '':20}  {(row['commit'] or '')[:12]:12}  "
              f"{row['status'] or '':11}  {'; '.join(notes)}")
    return 0


def _previous_good(root: Path, before: int) -> Generation:
    for gen in reversed(list_generations(root)):
        if gen.number < before and gen.meta.get("status") in GOOD:
            return gen
    raise KioskError(f"no earlier good generation to roll back to (see: kiosk generations)")


def cmd_rollback(args) -> int:
    root = _root(args)
    log = Log()
    activator = activation.from_env(root)
    with device_lock(root, "kiosk rollback", log):
        recover(root, activator, log)
        cur = current(root)
        if cur is None:
            raise KioskError("no current generation")
        target = generation(root, args.generation) if args.generation else _previous_good(root, cur.number)
        if target.number == cur.number:
            raise UsageError(f"generation {target.number} is already current")
        if target.meta.get("status") == "failed":
            log(f"note: generation {target.number} failed before: {target.meta.get('reason')}")
        log.stage(f"rolling back from generation {cur.number} to {target.number}")
        switch_to(root, target, mode="switch", purpose="manual-rollback", activator=activator, log=log)
    return 0


def cmd_switch(args) -> int:
    root = _root(args)
    log = Log()
    activator = activation.from_env(root)
    if args.recover:
        with device_lock(root, "kiosk switch --recover", log):
            changed = recover(root, activator, log, at_boot=args.at_boot)
        problems = verify(root) if current(root) else ["no current generation"]
        for problem in problems:
            log(f"inconsistent: {problem}")
        if not problems:
            log(f"generation {pointer(root, 'current')} is linked"
                + (" (recovered)" if changed else " (nothing to recover)"))
        return 1 if problems else 0
    if args.mode is None:
        args.mode = "switch"
    with device_lock(root, f"kiosk switch {args.mode}", log):
        recover(root, activator, log)
        if args.generation:
            target = generation(root, args.generation)
        else:
            candidates = [g for g in list_generations(root) if g.meta.get("status") != "failed"]
            if not candidates:
                raise KioskError("no generation to switch to")
            target = candidates[-1]
        switch_to(root, target, mode=args.mode, purpose="switch", activator=activator, log=log)
    return 0


def register(sub) -> None:
    import argparse

    def add_root(p):
        p.add_argument("--root", default="/", help=argparse.SUPPRESS)

    p = sub.add_parser("generations", help="the device's generations: number, date, commit, status, current",
                       description="List the generations on this device (run on the device).")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_root(p)
    p.set_defaults(func=cmd_generations)

    p = sub.add_parser("rollback", help="switch back to the previous good generation (or generation N)",
                       description="Switch the device back to an earlier generation, activate it and check its "
                                   "health; the generation left is marked rolled-back.")
    p.add_argument("generation", nargs="?", type=int, metavar="N", help="the generation (default: the previous good one)")
    add_root(p)
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("switch", help="make a generation current: switch|boot|test|dry-activate; --recover",
                       description="switch: make generation N current and the boot default, and activate it now; "
                                   "boot: make it the boot default only (nothing changes until the next boot); "
                                   "test: activate it now but keep the boot default (the next boot returns); "
                                   "dry-activate: print what would change. N defaults to the newest generation "
                                   "that did not fail. --recover finishes or undoes an interrupted switch "
                                   "(kiosk-recover.service runs it at boot).")
    p.add_argument("mode", nargs="?", choices=("switch", "boot", "test", "dry-activate"))
    p.add_argument("generation", nargs="?", type=int, metavar="N")
    p.add_argument("--recover", action="store_true", help="finish or undo an interrupted switch")
    p.add_argument("--at-boot", action="store_true", help=argparse.SUPPRESS)
    add_root(p)
    p.set_defaults(func=cmd_switch)
