"""The generations on disk: write one whole, read them, move the pointers. Nothing here touches the live system.

Everything takes the device root as a parameter ("/" on a device; an image tree
at build time; a temporary directory in tests). State lives in ROOT/var/lib/kiosk:

    generations/N/root/...   the rendered layer (files with their modes and owners, dirs, symlinks)
    generations/N/nixiosk.json  the spec text exactly as committed (0600: Wi-Fi passphrases)
    generations/N/layer.json    manifest: path -> kind, mode, uid, gid, sha256, target (0600: it holds
                                the sha256 of 0600 files, an offline oracle for a guessed passphrase)
    generations/N/meta.json     number, commit, date, status, reason, packages, previous
    current -> generations/N    THE pointer: what the live links follow (the running configuration)
    default -> generations/N    what the next boot runs (differs from current only after `switch test|boot`)
    switch.json                 the journal of a switch in progress (present = not committed; switch.py)
    pending.json                a pushed generation whose ref update configuration.git has not confirmed
    lock                        one push / switch at a time (flock; lock.py)

A generation is written to generations/.tmp-N and renamed into place, so it is
complete or absent; afterwards only meta.json's status and reason change (each
time a whole new meta.json is written, fsynced and renamed over the old one, so
readers such as the agent always see one complete version). One is deleted by a
rename to generations/.tmp-gone-N first (switch.prune), so it too vanishes whole.

A meta.json that is not what kiosk wrote (not JSON, not an object, a field missing or of the
wrong type) makes its generation "damaged": listed as such, never chosen, never deleted.
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
from kiosk.core.errors import InvalidSpec, KioskError, Problem, one_line
from kiosk.core.files import fsync_dir, json_text, write_json
from kiosk.core.paths import REPO, STATE

DEVICE_STATE = "/" + STATE                        # the state directory as seen on the device
BRANCH = "refs/heads/main"
STATUSES = ("built", "active", "failed", "rolled-back", "superseded")
GOOD = ("active", "superseded", "rolled-back")   # generations that once ran healthily
DAMAGED = "damaged"                               # what `status` says of a generation whose meta.json is unreadable
MANIFEST_MODE = 0o600
JSON_INDENT = 1                                   # the generation files' layout: byte-identical across versions
# meta.json's fields: the ones kiosk decides with must be there; the others may be absent
META_REQUIRED = {"status": str, "commit": str, "packages": list}
META_OPTIONAL = {"number": int, "date": str, "reason": str, "previous": (int, type(None))}


class DamagedState(KioskError):
    """A state file (switch.json, pending.json) that is not what kiosk writes: recover() decides what to do."""


def read_state(path: Path, fields: dict) -> dict | None:
    """A state file written by write_state: None when absent, its data when every field in `fields`
    (name -> type or tuple of types) is there with its type; DamagedState (one line) otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DamagedState(f"{path} is damaged: not readable JSON ({one_line(str(exc))[:80]})",
                           hint="kiosk switch --recover sets it aside") from None
    if not isinstance(data, dict):
        raise DamagedState(f"{path} is damaged: a JSON {type(data).__name__}, not an object",
                           hint="kiosk switch --recover sets it aside")
    for name, kind in fields.items():
        if name not in data or not isinstance(data[name], kind) or isinstance(data[name], bool):
            raise DamagedState(f"{path} is damaged: \"{name}\" is missing or of the wrong type",
                               hint="kiosk switch --recover sets it aside")
    return data


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


def number_of(name: str) -> int | None:
    """A generation number from a directory or link name ("12"), or None (".tmp-3", "x", "²")."""
    return int(name) if name.isascii() and name.isdigit() else None


def spec_data(text: str, source: str = "nixiosk.json") -> dict:
    """A stored spec's text (a generation's nixiosk.json) as the JSON object it holds, as stored.

    The device's one way to read a spec it already accepted: kiosk.spec.load's own JSON reader (so a
    spec reads here as `kiosk validate` reads it), and a UTF-8 byte-order mark dropped whatever that
    reader does with one, since older kiosk versions stored BOM-prefixed specs as committed and a
    device must always be able to read the generation it runs. Not validated again: a spec the
    device accepted must not become unreadable because the rules grew stricter since. InvalidSpec
    (one line per problem) when the text is not a JSON object."""
    from kiosk.spec.load import parse_json

    data = parse_json(text, source)   # drops a leading byte-order mark, like every spec reader
    if not isinstance(data, dict):
        raise InvalidSpec(source, [Problem("", "is not a JSON object", "roll back to another generation")])
    return data


def meta_problem(data) -> str:
    """What is wrong with a generation's parsed meta.json ("" when it is as kiosk writes it)."""
    if not isinstance(data, dict):
        return f"is a JSON {type(data).__name__}, not an object"
    for name, kind in META_REQUIRED.items():
        if name not in data:
            return f"has no \"{name}\""
        if not isinstance(data[name], kind):
            return f"\"{name}\" is not a {kind.__name__}"
    for name, kind in META_OPTIONAL.items():
        if name in data and (not isinstance(data[name], kind) or isinstance(data[name], bool)):
            return f"\"{name}\" has the wrong type"
    if data["status"] not in STATUSES:
        return f"has the unknown status {data['status'][:40]!r}"
    if not all(isinstance(p, str) for p in data["packages"]):
        return "\"packages\" is not a list of names"
    return ""


def reason_line(text: str) -> str:
    """A failure as the single line meta.json's reason keeps (`kiosk generations` shows it in a table row)."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


@dataclass
class Generation:
    number: int
    path: Path

    def _read_meta(self) -> tuple[dict | None, str]:
        """(meta.json's data, "") or (None, what is wrong with it)."""
        try:
            data = json.loads((self.path / "meta.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, "meta.json is missing"
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            return None, f"meta.json is not readable JSON ({one_line(str(exc))[:80]})"
        problem = meta_problem(data)
        return (None, f"meta.json {problem}") if problem else (data, "")

    @property
    def damage(self) -> str:
        """What is wrong with this generation's meta.json ("" when nothing is)."""
        return self._read_meta()[1]

    @property
    def meta(self) -> dict:
        """meta.json; for a damaged one a stand-in whose status is "damaged" and whose reason says why
        (so listings and decisions go on: a damaged generation is shown, never chosen)."""
        data, problem = self._read_meta()
        if data is not None:
            return data
        return {"number": self.number, "commit": "", "date": "", "status": DAMAGED,
                "reason": f"damaged: {problem}", "packages": [], "previous": None}

    @property
    def status(self) -> str:
        return self.meta["status"]

    @property
    def manifest(self) -> dict:
        path = self.path / "layer.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise KioskError(f"generation {self.number} is damaged: cannot read {path} "
                             f"({one_line(str(exc))[:80]})", hint="roll back to another generation") from None
        if not isinstance(data, dict) or not all(isinstance(e, dict) and "kind" in e for e in data.values()):
            raise KioskError(f"generation {self.number} is damaged: {path} is not a kiosk manifest",
                             hint="roll back to another generation")
        return data

    @property
    def spec_text(self) -> str:
        return (self.path / "nixiosk.json").read_text(encoding="utf-8")

    def spec(self) -> dict:
        """This generation's spec with the schema's defaults (spec_data: a byte-order mark read past, not
        validated again); InvalidSpec, one line, when it is not a spec at all."""
        try:
            text = self.spec_text
        except (OSError, UnicodeDecodeError) as exc:
            raise KioskError(f"generation {self.number}'s nixiosk.json cannot be read ({exc})",
                             hint="roll back to another generation") from None
        from kiosk.spec.load import with_defaults

        source = f"generation {self.number}'s nixiosk.json"
        data = spec_data(text, source)
        try:
            return with_defaults(data)
        except (KeyError, TypeError, AttributeError) as exc:  # not a spec kiosk accepted (edited by hand?)
            raise InvalidSpec(source, [Problem("", f"is not a whole spec ({type(exc).__name__}: {exc})",
                                               "roll back to another generation")]) from None

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
    if not exists(root, number):
        raise KioskError(f"there is no generation {number}", hint="see: kiosk generations")
    return Generation(number, generations_dir(root) / str(number))


def exists(root: Path, number) -> bool:
    """A generation directory with its meta.json (damaged or not): a complete generation."""
    return (isinstance(number, int) and not isinstance(number, bool) and number > 0
            and (generations_dir(root) / str(number) / "meta.json").is_file())


def list_generations(root: Path) -> list[Generation]:
    base = generations_dir(root)
    if not base.is_dir():
        return []
    found = [Generation(number_of(p.name), p) for p in base.iterdir()
             if number_of(p.name) and (p / "meta.json").is_file()]
    return sorted(found, key=lambda g: g.number)


def pointer(root: Path, name: str = "current") -> int | None:
    try:
        target = os.readlink(state_dir(root) / name)
    except (FileNotFoundError, OSError):
        return None
    return number_of(target.rstrip("/").rsplit("/", 1)[-1])


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
            text = path.read_text(encoding="utf-8")
            # the spec as the device reads every stored spec (a byte-order mark read past)
            data = json.loads(text) if name == "meta.json" else spec_data(text, str(path))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError, KioskError) as exc:  # e.g. nixiosk.json is 0600, not root
            warn(f"cannot read {path} ({one_line(str(exc))})")
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


def make_manifests_private(root: Path) -> list[int]:
    """layer.json root's only in every generation (older kiosk versions left it world-readable);
    returns the generations whose manifest was readable by others."""
    fixed = []
    for gen in list_generations(root):
        path = gen.path / "layer.json"
        with contextlib.suppress(FileNotFoundError):
            if os.lstat(path).st_mode & 0o077 and not path.is_symlink():
                os.chmod(path, MANIFEST_MODE)
                fixed.append(gen.number)
    return fixed


def update_meta(gen: Generation, **changes) -> None:
    """Change meta.json's fields. A damaged one is rewritten only with a new status (then it is
    whole again, its unknown fields empty); a reason alone is not worth replacing the evidence."""
    meta = gen.meta
    if meta["status"] == DAMAGED and "status" not in changes:
        return
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
    numbers = [number_of(p.name) or 0 for p in base.iterdir()]
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
    # plain writes: the whole directory is fsynced below and appears in one rename.
    # layer.json is root's only: it holds the sha256 of every file, the 0600 Wi-Fi one too, and a digest
    # anyone can read is an offline oracle for a guessed passphrase (the activation plan and verify
    # need the digests, and they run as root)
    fd = os.open(tmp / "layer.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, MANIFEST_MODE)
    try:
        os.fchmod(fd, MANIFEST_MODE)
        os.write(fd, json_text(manifest_of(layer), JSON_INDENT).encode())
    finally:
        os.close(fd)
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
