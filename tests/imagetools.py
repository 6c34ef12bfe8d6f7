"""Build real images once per test run, and read them back with independent tools.

Use in a test module:

    from imagetools import built_image, read_root_file, read_boot_file, root_file_mode  # noqa: F401

    def test_something(built_image):
        img = built_image("raspberryPi3")      # BuiltImage: image, root (tree), offsets, plan, spec
        assert b"PasswordAuthentication no" in read_root_file(img.image, "/etc/ssh/sshd_config.d/kiosk.conf")

`built_image(board)` builds a minimal image for the board (program `foot`, the
configuration layer rendered by kiosk.render when it is available) the first
time any test asks for it, and reuses it afterwards; pytest-xdist workers share
the builds through a lock. The package cache lives in KIOSK_TEST_CACHE_DIR if set
(keep it between runs to skip mmdebstrap), else in the run's temporary directory.

Readers use debugfs (root filesystem) and mtools (FAT partition) on the image
file itself: no mounting, no root needed to read.
"""

from __future__ import annotations

import copy
import fcntl
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TEST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOverzkLB6qX/N7KKvsfRbCO0wZ7xZR2stnOLFsuAmLp kiosk-test"

# The lightest cage-compatible program that is one Debian package on every architecture.
MINIMAL_PROGRAM = {"package": "foot", "executable": "/usr/bin/foot", "args": []}
SAMPLE_PROGRAM = {"package": "cog", "executable": "/usr/bin/cog", "args": ["https://example.org/"]}


def full_spec(board: str, *, host: str | None = None, program: dict | None = None, packages=(),
              firmware_config: str = "", networks: dict | None = None) -> dict:
    """A complete spec (every default filled in by hand), as kiosk.spec would return it."""
    return {
        "hostName": host or f"kiosk-{board.lower()}",
        "hardware": board,
        "authorizedKeys": [TEST_KEY],
        "program": copy.deepcopy(program or MINIMAL_PROGRAM),
        "networks": dict(networks or {}),
        "allowKioskLogin": False,
        "locale": {"lang": "en_US.UTF-8", "regDom": "US", "timeZone": "America/New_York"},
        "packages": list(packages),
        "debian": {"suite": "bookworm", "mirror": os.environ.get("KIOSK_TEST_MIRROR", "http://deb.debian.org/debian"),
                   "security": True, "updates": True, "securityMirror": "http://deb.debian.org/debian-security"},
        "raspberryPi": {"firmwareConfig": firmware_config, "enableExtraFirmware": False, "cecSupport": False},
        "display": {"rotation": 0, "mode": "auto", "cursor": "hidden", "blanking": "never"},
        "builders": [],
    }


@dataclass
class BuiltImage:
    board: str
    image: Path
    root: Path | None          # the final root tree (as written into the image), when kept (not by the fixture)
    boot_offset: int
    boot_size: int
    root_offset: int
    root_size: int
    spec: dict
    timings: dict = field(default_factory=dict)

    @property
    def plan(self):
        from kiosk.spec.plan import make_plan
        return make_plan(self.spec)


def partition_offsets(image: Path) -> list[tuple[int, int]]:
    """(start, size) in bytes of each partition, read by sfdisk (independent of kiosk.image)."""
    out = json.loads(subprocess.run(["sfdisk", "--json", str(image)], capture_output=True, text=True,
                                    check=True).stdout)["partitiontable"]
    sector = out.get("sectorsize", 512)
    return [(p["start"] * sector, p["size"] * sector) for p in out["partitions"]]


def _offsets(image: Path | str) -> tuple[int, int]:
    parts = partition_offsets(Path(image))
    return parts[0][0], parts[1][0]


# A/B images: the device binds these directories of the data partition (partition 4) over the slot's
# (hardware/qemu.json: grub-efi; kiosk.core.paths.DATA_BINDS, written out here to stay independent of it).
DATA_BINDS = {"/var/lib/kiosk": "/kiosk/state", "/etc/kiosk/configuration.git": "/kiosk/configuration.git",
              "/var/log/journal": "/log/journal"}


def _where(image: Path | str, path: str) -> tuple[int, str]:
    """(offset of the ext4, path inside it) of a path as the running device sees it: slot A, or the data
    partition for what the device binds from there."""
    parts = partition_offsets(Path(image))
    if len(parts) == 4:
        for mount, inside in DATA_BINDS.items():
            if path == mount or path.startswith(mount + "/"):
                return parts[3][0], inside + path[len(mount):]
    return parts[1][0], path


def read_root_file(image: Path | str, path: str, *, follow: bool = True) -> bytes:
    """A file's bytes from the image's root filesystem (debugfs cat), as the device sees it (A/B images:
    the data partition's bound directories included).

    follow: symlinks are resolved inside the image, as the device would see them (the configuration
    layer's files are links into /var/lib/kiosk/current); False gives a link's own target text."""
    import posixpath
    import re

    for _ in range(16):
        root, inside = _where(image, path)
        result = subprocess.run(["debugfs", "-R", f'cat "{inside}"', f"{image}?offset={root}"], capture_output=True)
        err = result.stderr.decode(errors="replace")
        if result.returncode != 0 or "File not found" in err or "not found by ext2_lookup" in err:
            raise FileNotFoundError(f"{path} in {image}: {err.strip()}")
        info = root_stat(image, path)
        if info["type"] != "symlink":
            return result.stdout
        # a short target lives in the inode ("fast link"): debugfs cat prints nothing for it
        fast = re.search(r'Fast link dest: "(.*)"', info["text"])
        target = fast.group(1) if fast else result.stdout.decode()
        if not follow:
            return target.encode()
        path = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    raise FileNotFoundError(f"{path} in {image}: too many levels of symbolic links")


def root_stat(image: Path | str, path: str) -> dict:
    """debugfs's stat of a path: mode, uid, gid, size, type, times (as debugfs prints them)."""
    import re

    root, inside = _where(image, path)
    result = subprocess.run(["debugfs", "-R", f'stat "{inside}"', f"{image}?offset={root}"], capture_output=True,
                            text=True)
    text = result.stdout
    if "Inode:" not in text:
        raise FileNotFoundError(f"{path} in {image}: {result.stderr.strip()}")
    mode = int(re.search(r"Mode:\s+(\d+)", text).group(1), 8)
    uid = int(re.search(r"User:\s+(\d+)", text).group(1))
    gid = int(re.search(r"Group:\s+(\d+)", text).group(1))
    size = int(re.search(r"Size:\s+(\d+)", text).group(1))
    kind = re.search(r"Type:\s+(\S+)", text).group(1)
    return {"mode": mode, "uid": uid, "gid": gid, "size": size, "type": kind, "text": text}


def root_file_mode(image: Path | str, path: str) -> int:
    """Permission bits (e.g. 0o600) of a path in the root filesystem."""
    return root_stat(image, path)["mode"] & 0o7777


def root_listdir(image: Path | str, path: str) -> list[str]:
    root, inside = _where(image, path)
    result = subprocess.run(["debugfs", "-R", f'ls -p "{inside}"', f"{image}?offset={root}"], capture_output=True,
                            text=True)
    names = []
    for line in result.stdout.splitlines():
        fields = line.strip("/").split("/")
        if len(fields) >= 5 and fields[4] not in (".", ".."):
            names.append(fields[4])
    return sorted(names)


def read_boot_file(image: Path | str, name: str) -> bytes:
    """A file's bytes from the image's FAT partition (mtools mtype, binary)."""
    boot, _ = _offsets(image)
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    result = subprocess.run(["mcopy", "-n", "-i", f"{image}@@{boot}", f"::{name}", "-"], capture_output=True,
                            env=env)
    if result.returncode != 0:
        raise FileNotFoundError(f"{name} on the FAT partition of {image}: {result.stderr.decode().strip()}")
    return result.stdout


def boot_listdir(image: Path | str) -> list[str]:
    boot, _ = _offsets(image)
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    out = subprocess.run(["mdir", "-b", "-i", f"{image}@@{boot}", "::"], capture_output=True, text=True, env=env,
                         check=True).stdout
    return sorted(line.strip().lstrip(":/").strip("/") for line in out.splitlines() if line.strip())


def build(spec: dict, out_dir: Path, *, keep_root: bool = True, log=print) -> BuiltImage:
    """Build one image through kiosk's build pipeline: exactly what `kiosk build` runs."""
    from kiosk.core.log import Log
    from kiosk.image.pipeline import build as pipeline_build
    from kiosk.spec.load import loads

    class Lines:
        def write(self, text):
            for line in text.splitlines():
                if line.strip():
                    log(line.strip())

        def flush(self):
            pass

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(spec, indent=2) + "\n"
    (out_dir / "nixiosk.json").write_text(text)
    root = out_dir / "root" if keep_root else None
    manifest = pipeline_build(loads(text, str(out_dir / "nixiosk.json")), text, out_dir, log=Log(out=Lines()),
                              keep_root=root)
    path = Path(manifest["image"])
    boot, rootfs = partition_offsets(path)[:2]
    return BuiltImage(spec["hardware"], path, root, boot[0], boot[1], rootfs[0], rootfs[1], spec,
                      manifest["stageSeconds"])


def _shared_dir(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    # under pytest-xdist every worker has its own basetemp inside a shared parent
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    d = shared / "kiosk-images"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _cache_dir(shared: Path) -> Path:
    return Path(os.environ.get("KIOSK_TEST_CACHE_DIR") or shared / "cache")


@pytest.fixture(scope="session")
def built_image(tmp_path_factory):
    """built_image(board) -> BuiltImage of the minimal image for that board (built once per run)."""
    shared = _shared_dir(tmp_path_factory)
    done: dict[str, BuiltImage] = {}

    def get(board: str) -> BuiltImage:
        if os.geteuid() != 0:
            pytest.skip("building an image needs root (mmdebstrap --mode=root, file owners)")
        if board in done:
            return done[board]
        out = shared / board
        out.mkdir(exist_ok=True)
        lock = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            marker = out / "built.json"
            if marker.exists():
                info = json.loads(marker.read_text())
                result = BuiltImage(board, Path(info["image"]), Path(info["root"]) if info["root"] else None,
                                    *info["offsets"],
                                    info["spec"], info["timings"])
            else:
                old = os.environ.get("KIOSK_CACHE_DIR")
                os.environ["KIOSK_CACHE_DIR"] = str(_cache_dir(shared))
                try:
                    # the tree is not kept (1+ GB per board): read files with read_root_file()
                    result = build(full_spec(board), out, keep_root=False,
                                   log=lambda m: print(f"[{board}] {m}", flush=True))
                finally:
                    if old is None:
                        os.environ.pop("KIOSK_CACHE_DIR", None)
                    else:
                        os.environ["KIOSK_CACHE_DIR"] = old
                marker.write_text(json.dumps({
                    "image": str(result.image), "root": str(result.root) if result.root else None,
                    "offsets": [result.boot_offset, result.boot_size, result.root_offset, result.root_size],
                    "spec": result.spec, "timings": result.timings}))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            os.close(lock)
        done[board] = result
        return result

    return get
