"""The generations on disk: write one whole, read them, move the pointers. Nothing here touches the live system.

Everything takes the device root as a parameter ("/" on a device; an image tree
at build time; a temporary directory in tests). State lives in ROOT/var/lib/kiosk:

    generations/N/root/...   the rendered layer (files with their modes and owners, dirs, symlinks)
    generations/N/nixiosk.json  the spec text exactly as committed (0600: Wi-Fi passphrases)
    generations/N/layer.json    manifest: path -> kind, mode, uid, gid, sha256, target
    generations/N/meta.json     number, commit, date, status, reason, packages, previous
    current -> generations/N    THE pointer: what the live links follow (the running configuration)
    default -> generations/N    what the next boot runs (differs from current only after `switch test|boot`)
    switch.json                 the journal of a switch in progress (present = not committed; switch.py)
    pending.json                a pushed generation whose ref update configuration.git has not confirmed
    lock                        one push / switch at a time (flock; lock.py)

A generation is written to generations/.tmp-N and renamed into place, so it is
complete or absent; afterwards only meta.json's status and reason change (each
time a whole new meta.json is written, fsynced and renamed over the old one, so
readers such as the agent always see one complete version).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kiosk.config.layer import Layer, apply_layer
from kiosk.core.errors import KioskError
from kiosk.core.files import fsync_dir, json_text, write_json
from kiosk.core.paths import REPO, STATE

DEVICE_STATE = "/" + STATE                        # the state directory as seen on the device
BRANCH = "refs/heads/main"
STATUSES = ("built", "active", "failed", "rolled-back", "superseded")
GOOD = ("active", "superseded", "rolled-back")   # generations that once ran healthily
JSON_INDENT = 1                                   # the generation files' layout: byte-identical across versions


def state_dir(root: Path) -> Path:
    return Path(root) / STATE


def generations_dir(root: Path) -> Path:
    return state_dir(root) / "generations"


def repo_dir(root: Path) -> Path:
    return Path(root) / REPO


def utc_date(epoch: float | None = None) -> str:
    moment = datetime.datetime.fromtimestamp(time.time() if epoch is None else epoch, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def write_state(path: Path, data) -> None:
    """A state file (meta.json, the journal, pending.json): whole or not at all, across a power cut."""
    write_json(path, data, durable=True, indent=JSON_INDENT)


def reason_line(text: str) -> str:
    """A failure as the single line meta.json's reason keeps (`kiosk generations` shows it in a table row)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


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
        raise KioskError(f"there is no generation {number}", hint="see: kiosk generations")
    return Generation(number, path)


def exists(root: Path, number: int | None) -> bool:
    return number is not None and (generations_dir(root) / str(number) / "meta.json").is_file()


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


def read_running(state: Path, warn: Callable[[str], None] = lambda message: None) -> tuple[dict, dict]:
    """(nixiosk.json, meta.json) of the generation STATE/current points at, as stored; {} for either one
    that is missing, unreadable or not an object (`warn` is told why, unless it is simply absent).

    For readers that must keep running whatever the state looks like (the agent): never raises."""
    def load(name: str) -> dict:
        path = Path(state) / "current" / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # e.g. nixiosk.json is 0600 and the reader is not root
            warn(f"cannot read {path} ({exc})")
            return {}
        return data if isinstance(data, dict) else {}

    return load("nixiosk.json"), load("meta.json")


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
    write_state(gen.path / "meta.json", meta)


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
    # plain writes: the whole directory is fsynced below and appears in one rename
    (tmp / "layer.json").write_text(json_text(manifest_of(layer), JSON_INDENT))
    meta = {"number": number, "commit": commit, "date": date or utc_date(), "status": status, "reason": "",
            "packages": sorted(packages), "previous": previous}
    (tmp / "meta.json").write_text(json_text(meta, JSON_INDENT))
    if mtime is not None:
        for path in (tmp, tmp / "root", spec_path, tmp / "layer.json", tmp / "meta.json"):
            os.utime(path, (mtime, mtime), follow_symlinks=False)
    _fsync_tree(tmp)
    os.rename(tmp, base / str(number))
    fsync_dir(base)
    return Generation(number, base / str(number))
