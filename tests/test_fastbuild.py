"""The fast image build (issue 18): a cached base ext4 plus the spec's changes, checked against the slow way.

- The configure step on a sparse tree, written with debugfs, gives exactly the files of the whole
  tree configured the slow way (owners, modes, contents, xattrs, links, mtimes): on a small
  synthetic base that takes every branch, and on real images (qemu, raspberryPi3).
- A cache miss (the base file system made from the tarball in the build) and a cache hit give the
  same bytes; so do a build as root and one as a user.

The real-image tests read the image through a read-only loop mount (the kernel's view), never with
kiosk's code; they need root.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from imagetools import _cache_dir, _shared_dir, build, full_spec, partition_offsets

EPOCH = 1700000000


# --- reading trees -----------------------------------------------------------------------------

def tree_records(top: Path) -> tuple[dict, list]:
    """path -> what a file system says of it (kind, mode, owner, mtime, xattrs, contents, link), and the
    groups of paths sharing an inode."""
    out, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [None, *dirnames, *filenames]:
            full = Path(dirpath, name) if name else Path(dirpath)
            rel = "/" + str(full.relative_to(top)) if full != top else "/"
            st = os.lstat(full)
            rec = {"kind": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
                   "gid": st.st_gid, "mtime": st.st_mtime_ns,
                   "xattrs": sorted((k, os.getxattr(full, k, follow_symlinks=False))
                                    for k in os.listxattr(full, follow_symlinks=False))}
            if stat.S_ISREG(st.st_mode):
                rec["sha256"] = hashlib.sha256(full.read_bytes()).hexdigest()
                inodes.setdefault(st.st_ino, []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                rec["target"] = os.readlink(full)
            out[rel] = rec
    return out, sorted(sorted(names) for names in inodes.values() if len(names) > 1)


def differences(reference: Path, image_root: Path, epoch: int) -> list[str]:
    """What differs between the slow path's tree and the image's (whose mtimes are clamped to the epoch,
    atimes and ctimes at it)."""
    ref, ref_links = tree_records(reference)
    img, img_links = tree_records(image_root)
    img.pop("/lost+found", None)
    out = []
    for path in sorted(set(ref) | set(img)):
        a, b = ref.get(path), img.get(path)
        if a is None or b is None:
            out.append(f"{path}: only in the {'image' if a is None else 'slow tree'}")
            continue
        a = dict(a, mtime=min(a["mtime"], epoch * 10**9))
        if a != b:
            out.append(f"{path}: " + ", ".join(f"{k} {a.get(k)!r} != {b.get(k)!r}" for k in a if a.get(k) != b.get(k)))
    if ref_links != img_links:
        out.append(f"hard links differ: {ref_links} != {img_links}")
    for dirpath, dirnames, filenames in os.walk(image_root):
        for name in [*dirnames, *filenames]:
            st = os.lstat(Path(dirpath, name))
            if st.st_atime_ns != epoch * 10**9 or st.st_ctime_ns != epoch * 10**9:
                out.append(f"{Path(dirpath, name)}: atime/ctime not at the epoch")
    return out


@contextlib.contextmanager
def mounted_ext4(fs: Path, mountpoint: Path, offset: int = 0, size: int | None = None):
    """The ext4 in fs (at offset), mounted read-only through a loop device this test makes and removes."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    options = f"ro,noload,loop,offset={offset}" + (f",sizelimit={size}" if size else "")
    subprocess.run(["mount", "-t", "ext4", "-o", options, str(fs), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=True)


def e2fsck_clean(fs: str) -> None:
    result = subprocess.run(["e2fsck", "-fn", fs], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- a small synthetic base, every branch of the overlay ------------------------------------------

def _add(tf: tarfile.TarFile, name: str, kind=tarfile.REGTYPE, data: bytes = b"", mode=0o644, uid=0, gid=0,
         link: str = "", xattrs: dict | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, EPOCH - 1000
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()}
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def synthetic_base(path: Path) -> None:
    """A base tree as mmdebstrap's tarballs have it: depth first, every directory before its contents."""
    D, L, H = tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tf:
        _add(tf, "./", D, mode=0o755)
        _add(tf, "./dev/", D, mode=0o755)
        _add(tf, "./etc/", D, mode=0o755)
        _add(tf, "./etc/gone", data=b"removed by configure\n")
        _add(tf, "./etc/inplace", data=b"old contents\n", xattrs={"user.kiosk": b"kept\x00\xff"})
        _add(tf, "./etc/keep", data=b"unchanged\n")
        _add(tf, "./etc/readonly", data=b"0444 in the base\n", mode=0o444)
        _add(tf, "./etc/shadow", data=b"root:*:1:::::\n", mode=0o640, gid=42)
        _add(tf, "./etc/sub/", D, mode=0o755)
        _add(tf, "./etc/sub/mode", data=b"chmod only\n", mode=0o600)
        _add(tf, "./etc/tolink", data=b"becomes a symlink\n")
        _add(tf, "./lib", L, mode=0o777, link="usr/lib")
        _add(tf, "./srv/", D, mode=0o755)
        _add(tf, "./srv/locked/", D, mode=0o555)
        _add(tf, "./srv/locked/inside", data=b"in a read-only directory\n")
        _add(tf, "./usr/", D, mode=0o755)
        _add(tf, "./usr/lib/", D, mode=0o755)
        _add(tf, "./usr/lib/hl", data=b"library\n" * 100, uid=7, gid=8)
        _add(tf, "./usr/lib/setuid", data=b"#!/bin/sh\n", mode=0o4755)
        _add(tf, "./usr/lib/x", H, link="./usr/lib/hl")
        _add(tf, "./var/", D, mode=0o755)
        _add(tf, "./var/log/", D, mode=0o2755, gid=4, xattrs={"user.acl-like": b"\x02\x00"})
        _add(tf, "./var/old/", D, mode=0o755)
        _add(tf, "./var/old/a", data=b"a\n", uid=5, gid=5)
        _add(tf, "./var/old/deep/", D, mode=0o755)
        _add(tf, "./var/old/deep/b", data=b"b\n")


def configure_like(root: Path) -> None:
    """What a configure step does to a tree, every kind of it (the same calls on both trees)."""
    from kiosk.core.files import write_atomic

    (root / "etc/inplace").write_text("new contents\n")                 # in place: inode, owner, xattrs kept
    os.utime(root / "etc/inplace", (EPOCH, EPOCH))
    shadow = root / "etc/shadow"                                        # replaced, keeping owner and mode
    st = shadow.stat()
    (root / "etc/.shadow.new").write_text("root:*:19000:::::\nkiosk:!*:19000::::::\n")
    os.chmod(root / "etc/.shadow.new", stat.S_IMODE(st.st_mode))
    if os.geteuid() == 0:
        os.chown(root / "etc/.shadow.new", st.st_uid, st.st_gid)
    os.replace(root / "etc/.shadow.new", shadow)
    (root / "etc/readonly").write_text("rewritten, still 0444\n")       # seeded writable, mode comes back
    (root / "etc/gone").unlink()
    (root / "etc/tolink").unlink()
    os.symlink("keep", root / "etc/tolink")
    os.chmod(root / "etc/sub/mode", 0o640)
    write_atomic(root / "lib/x", "replaced through the /lib link\n")   # an unseeded base file replaced
    shutil.rmtree(root / "var/old")                                     # a base subtree, unseeded files too
    (root / "var/old").mkdir()
    (root / "var/old/new").write_text("new file in a recreated directory\n")
    (root / "var/lib/kiosk").mkdir(parents=True)
    os.chmod(root / "var/lib/kiosk", 0o700)
    (root / "var/lib/kiosk/state").write_text("{}\n")
    os.link(root / "var/lib/kiosk/state", root / "var/lib/kiosk/state.link")
    os.symlink("/var/lib/kiosk/state", root / "etc/state")
    os.chmod(root / "var/log", 0o2750)
    os.utime(root / "var/lib/kiosk", (EPOCH - 5, EPOCH - 5))


@pytest.mark.root
def test_overlay_matches_the_slow_way_on_every_kind_of_change(tmp_path, monkeypatch):
    from kiosk.image import basefs, overlay, rootfs, tarindex

    monkeypatch.setenv("KIOSK_CACHE_DIR", str(tmp_path / "cache"))
    tar = tmp_path / "base.tar"
    synthetic_base(tar)
    index = tarindex.load(tar)
    base = basefs.base_fs(tar, index, epoch=EPOCH, log=lambda m: None, lock=rootfs.cache_lock)
    e2fsck_clean(str(base.path))

    sparse = overlay.Sparse(index, tmp_path / "sparse")
    sparse.fetch("/etc")
    sparse.finish()
    configure_like(sparse.root)
    changes = sparse.changes(EPOCH)
    assert "/etc/keep" not in {c.path for c in changes}
    fs = tmp_path / "image.ext4"
    basefs.copy(base, fs, 0, base.size)
    overlay.write(fs, 0, changes, index, tmp_path, epoch=EPOCH, uuid="01234567-89ab-4def-8123-456789abcdef")
    e2fsck_clean(str(fs))

    whole = tmp_path / "whole"
    whole.mkdir()
    rootfs.extract(tar, whole)
    configure_like(whole)
    with mounted_ext4(fs, tmp_path / "mnt") as mnt:
        diffs = differences(whole, mnt, EPOCH)
        assert not diffs, "\n".join(diffs)
        assert os.getxattr(mnt / "etc/inplace", "user.kiosk") == b"kept\x00\xff"
        assert (os.stat(mnt / "etc/shadow").st_gid, stat.S_IMODE(os.stat(mnt / "etc/readonly").st_mode)) == (42, 0o444)
    blkid = subprocess.run(["blkid", "-p", "-o", "value", "-s", "UUID", str(fs)], capture_output=True, text=True)
    assert blkid.stdout.strip() == "01234567-89ab-4def-8123-456789abcdef"


def test_overlay_refuses_to_rewrite_a_file_with_several_names(tmp_path, monkeypatch):
    """A base file with two names rewritten in place would need both names changed: refused, not half done."""
    from kiosk.core.errors import KioskError
    from kiosk.image import overlay, tarindex

    monkeypatch.setenv("KIOSK_CACHE_DIR", str(tmp_path / "cache"))
    tar = tmp_path / "base.tar"
    synthetic_base(tar)
    sparse = overlay.Sparse(tarindex.load(tar), tmp_path / "sparse")
    sparse.fetch("/lib/x")       # through the /lib symlink: /usr/lib/x and its second name
    sparse.finish()
    (sparse.root / "usr/lib/x").write_text("changed in place\n")
    with pytest.raises(KioskError, match="several names"):
        sparse.changes(EPOCH)


# --- real images ---------------------------------------------------------------------------------

def _root_partition(image: Path) -> tuple[int, int]:
    return partition_offsets(image)[1]


SPECS = {
    "qemu": full_spec("qemu"),
    "qemu-wifi-builders-login": {
        **full_spec("qemu", networks={"home": "correct horse battery"}), "allowKioskLogin": True,
        "builders": [{"hostName": "builder.example", "sshUser": "kiosk", "port": 2222,
                      "publicHostKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOverzkLB6qX/N7KKvsfRbCO0wZ7xZR2stnOLFsuAmLp"}]},
    "raspberryPi3": full_spec("raspberryPi3", firmware_config="dtoverlay=vc4-kms-v3d\n",
                              networks={"home": "correct horse battery"}),
}


@pytest.mark.root
@pytest.mark.parametrize("name", list(SPECS))
def test_image_files_are_the_whole_tree_configured_the_slow_way(name, tmp_path_factory, monkeypatch):
    """The image's root file system holds exactly what the configure step makes of the whole unpacked base."""
    monkeypatch.setenv("KIOSK_CACHE_DIR", str(_cache_dir(_shared_dir(tmp_path_factory))))
    out = tmp_path_factory.mktemp(f"slow-{name}")
    try:
        img = build(SPECS[name], out, keep_root=True, log=lambda m: None)
        offset, size = _root_partition(img.image)
        e2fsck_clean(f"{img.image}?offset={offset}")
        manifest = json.loads((out / "manifest.json").read_text())
        epoch = manifest["sourceDateEpoch"]
        with mounted_ext4(img.image, out / "mnt", offset, size) as mnt:
            diffs = differences(img.root, mnt, epoch)
            assert not diffs, "\n".join(diffs)
            # the slot says what it holds: the SBOM beside the image, and the manifest's packages
            system = mnt / "usr/share/kiosk"
            assert (system / "system.spdx.json").read_bytes() == Path(manifest["sbom"]).read_bytes()
            assert json.loads((system / "system.json").read_text())["packages"] == manifest["packages"]
    finally:
        shutil.rmtree(out, ignore_errors=True)


# --- the same bytes, however the image is reached --------------------------------------------------

def _seed_cache(cache: Path, spec: dict, from_cache: Path) -> None:
    """A fresh cache holding only the spec's base tarballs (hard links to from_cache's, else copies) and
    from_cache's update signing pair (an A/B image carries its certificate: as a user restores theirs)."""
    from kiosk.config.signing import signing_key
    from kiosk.image import rootfs
    from kiosk.spec.plan import make_plan

    (cache / "rootfs").mkdir(parents=True, exist_ok=True)
    old = os.environ.get("KIOSK_CACHE_DIR")
    os.environ["KIOSK_CACHE_DIR"] = str(from_cache)
    try:
        tars = [stage.path for stage in rootfs.stages(make_plan(spec))]
        shutil.copytree(signing_key().cert.parent, cache / "update-signing")
    finally:
        os.environ["KIOSK_CACHE_DIR"] = old or ""
    for tar in tars:
        for source in (tar, rootfs.metadata_path(tar)):
            if not source.exists():
                pytest.skip(f"{source.name} is not cached in {from_cache} (a cold base costs minutes)")
            try:
                os.link(source, cache / "rootfs" / source.name)
            except OSError:
                shutil.copy2(source, cache / "rootfs" / source.name)


@pytest.mark.root
def test_a_cache_miss_and_a_hit_give_the_same_bytes(tmp_path_factory, monkeypatch):
    """The base file system made in the build (cache miss) or taken from the cache: the same image and map."""
    shared = _cache_dir(_shared_dir(tmp_path_factory))
    spec = full_spec("qemu", host="kiosk-cache-test")
    fresh = tmp_path_factory.mktemp("fresh-cache")
    _seed_cache(fresh, spec, shared)
    images = []
    try:
        for cache, name in ((fresh, "miss"), (shared, "hit")):
            monkeypatch.setenv("KIOSK_CACHE_DIR", str(cache))
            lines = []
            img = build(spec, tmp_path_factory.mktemp(f"cache-{name}"), keep_root=False, log=lines.append)
            made = any("base file system: made" in line for line in lines)
            assert made == (name == "miss"), lines
            images.append(img.image)
        assert sha256(images[0]) == sha256(images[1])
        assert Path(f"{images[0]}.bmap").read_bytes() == Path(f"{images[1]}.bmap").read_bytes()
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
        for image in images:
            shutil.rmtree(image.parent, ignore_errors=True)


@contextlib.contextmanager
def throwaway_user():
    """A system user made for this test (no home, no login, no subordinate ids), removed afterwards."""
    import pwd

    name = f"kiosk-t{os.getpid()}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=True)


def _as_user(user, argv: list[str], env: dict) -> subprocess.CompletedProcess:
    exe = shutil.which("kiosk", path=str(Path(sys.executable).parent))
    return subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", exe,
                           *argv], capture_output=True, text=True, cwd="/",
                          env={"PATH": os.environ["PATH"], "KIOSK_OFFLINE": "1", **env})


def _users_dir(user) -> Path:
    """A directory the user owns, outside pytest's (root-only) temporary directories."""
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="kiosk-user-build-", dir="/var/tmp"))
    os.chown(home, user.pw_uid, user.pw_gid)
    return home


@pytest.mark.root
def test_a_users_build_is_byte_for_byte_roots(tmp_path_factory, monkeypatch):
    """`kiosk build` run by a throwaway user gives the image and block map root's build gives.

    The user's cache holds only hard links to the tarballs root built (a cold base costs minutes, and
    mmdebstrap's unshare mode needs subordinate ids this machine may not have): so this proves the
    base file system (owners, modes, xattrs from the index), the configure step and the image as a
    user; the tarballs' own unshare-mode equality is in notes/image.md.
    """
    shared = _cache_dir(_shared_dir(tmp_path_factory))
    monkeypatch.setenv("KIOSK_CACHE_DIR", str(shared))
    spec = full_spec("qemu", host="kiosk-user-test")
    root_out = tmp_path_factory.mktemp("root-build")
    with throwaway_user() as user:
        home = _users_dir(user)
        try:
            _seed_cache(home / "cache", spec, shared)
            for path in [home / "cache", *(home / "cache").rglob("*")]:
                if not path.is_file() or path.stat().st_nlink == 1:
                    os.chown(path, user.pw_uid, user.pw_gid)
            (home / "nixiosk.json").write_text(json.dumps(spec))
            result = _as_user(user, ["build", str(home / "nixiosk.json"), "-o", str(home / "out")],
                              {"HOME": str(home), "KIOSK_CACHE_DIR": str(home / "cache")})
            assert result.returncode == 0, result.stdout + result.stderr
            assert "base file system: made" in result.stderr
            theirs = home / "out" / "kiosk-user-test-qemu.img"
            assert theirs.stat().st_uid == user.pw_uid
            exe = shutil.which("kiosk", path=str(Path(sys.executable).parent))
            mine = subprocess.run([exe, "build", str(home / "nixiosk.json"), "-o", str(root_out)], capture_output=True,
                                  text=True, env=dict(os.environ, KIOSK_CACHE_DIR=str(shared), KIOSK_OFFLINE="1"))
            assert mine.returncode == 0, mine.stderr
            ours = root_out / theirs.name
            assert sha256(theirs) == sha256(ours)
            assert Path(f"{theirs}.bmap").read_bytes() == Path(f"{ours}.bmap").read_bytes()
        finally:
            shutil.rmtree(home, ignore_errors=True)
            shutil.rmtree(root_out, ignore_errors=True)


@pytest.mark.root
def test_a_user_without_unshare_mode_is_told_what_is_missing(tmp_path):
    """No cached base and no subordinate ids: one error naming each missing piece and the way out, exit 1,
    before anything is built."""
    with throwaway_user() as user:
        home = _users_dir(user)
        try:
            (home / "nixiosk.json").write_text(json.dumps(full_spec("qemu")))
            result = _as_user(user, ["build", str(home / "nixiosk.json"), "-o", str(home / "out")],
                              {"HOME": str(home), "KIOSK_CACHE_DIR": str(home / "cache")})
            assert result.returncode == 1, result.stdout + result.stderr
            assert "Traceback" not in result.stderr
            assert "needs mmdebstrap's unshare mode" in result.stderr
            assert f"/etc/subuid gives {user.pw_name} fewer than 65536 subordinate uids" in result.stderr
            assert "build as root (sudo kiosk build ...)" in result.stderr
            assert not list((home / "cache").glob("rootfs/*.tar")) and not (home / "out" / "kiosk-qemu-qemu.img").exists()
        finally:
            shutil.rmtree(home, ignore_errors=True)
