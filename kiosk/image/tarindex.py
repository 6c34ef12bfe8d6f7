"""An index of a cached base tarball: every member's metadata and where its bytes are.

The tarball (rootfs.base_rootfs) is the truth about the base tree: names, kinds, modes, owners,
mtimes, extended attributes, contents. The image build reads that truth without unpacking
~1 GB: to give the cached base file system its owners (basefs), to fetch the few files the
configure step reads into a sparse tree, and to know what a path held before configure
changed it (overlay). Scanning the headers takes ~0.3 s per 20 000 members; the index is
kept beside the tarball (`<tar>.index.json`, written atomically under the tarball's lock) with
the tarball's sha256, which keys everything derived from it, and is rebuilt when the tarball
is replaced.

Paths are absolute as on the device ("/etc/passwd", "/" for the root); /dev's device nodes
are left out, as rootfs.extract leaves them out (devtmpfs is mounted there at boot).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from kiosk.core.errors import KioskError

INDEX_VERSION = 1
KINDS = {tarfile.REGTYPE: "f", tarfile.AREGTYPE: "f", tarfile.CONTTYPE: "f", tarfile.DIRTYPE: "d",
         tarfile.SYMTYPE: "l", tarfile.LNKTYPE: "h", tarfile.FIFOTYPE: "p", tarfile.CHRTYPE: "c",
         tarfile.BLKTYPE: "b"}


@dataclass(frozen=True)
class Member:
    """One path of the base tree. kind: f file, d directory, l symlink, h hard link to `link`, p fifo."""

    path: str
    kind: str
    mode: int                 # permission bits, set-id and sticky bits included
    uid: int
    gid: int
    mtime: int
    size: int = 0
    offset: int = 0           # where a file's bytes start in the tarball
    link: str = ""            # a symlink's target, or the path a hard link names
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _path(name: str) -> str:
    path = posixpath.normpath("/" + name.lstrip("/"))
    return "/" + path.lstrip("/")


def _xattrs(member: tarfile.TarInfo) -> dict[str, bytes]:
    prefix = "SCHILY.xattr."
    return {k[len(prefix):]: v.encode("utf-8", "surrogateescape")
            for k, v in sorted(member.pax_headers.items()) if k.startswith(prefix)}


def index_path(tar: Path) -> Path:
    return tar.with_name(tar.name + ".index.json")


def _identity(tar: Path) -> list[int]:
    st = tar.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def scan(tar: Path) -> dict:
    """The index data of a tarball: its members and its sha256 (one read of the whole file)."""
    members = []
    with tarfile.open(tar) as tf:
        for m in tf:
            kind = KINDS.get(m.type)
            path = _path(m.name)
            if path.startswith("/dev/"):
                continue   # as rootfs.extract: devtmpfs is mounted there at boot
            if kind is None or kind in "cb":
                raise KioskError(f"{tar}: {m.name} is a {'device node' if kind else 'member of an unknown kind'} "
                                 "outside /dev, which kiosk does not put into images")
            link = _path(m.linkname) if kind == "h" else m.linkname
            xattrs = {k: base64.b64encode(v).decode() for k, v in _xattrs(m).items()}
            members.append([path, kind, m.mode, m.uid, m.gid, int(m.mtime), m.size if kind == "f" else 0,
                            m.offset_data if kind == "f" else 0, link, xattrs])
    digest = hashlib.sha256()
    with open(tar, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return {"version": INDEX_VERSION, "tar": _identity(tar), "sha256": digest.hexdigest(), "members": members}


class TarIndex:
    """The members of one base tarball by path, and their bytes read straight from it."""

    def __init__(self, tar: Path, data: dict):
        self.tar = tar
        self.sha256: str = data["sha256"]
        self.members: dict[str, Member] = {}
        for path, kind, mode, uid, gid, mtime, size, offset, link, xattrs in data["members"]:
            self.members[path] = Member(path, kind, mode, uid, gid, mtime, size, offset, link,
                                        {k: base64.b64decode(v) for k, v in xattrs.items()})
        self._fd: int | None = None

    def __contains__(self, path: str) -> bool:
        return path in self.members

    def get(self, path: str) -> Member | None:
        return self.members.get(path)

    def under(self, path: str) -> list[Member]:
        """path itself and everything below it, in the tarball's order (parents first)."""
        prefix = path.rstrip("/") + "/"
        return [m for p, m in self.members.items() if p == path or p.startswith(prefix)]

    def file_member(self, member: Member) -> Member:
        """The member holding a hard link's bytes (the member itself for a plain file)."""
        seen = 0
        while member.kind == "h":
            target = self.members.get(member.link)
            seen += 1
            if target is None or seen > 8:
                raise KioskError(f"{self.tar}: {member.path} is a hard link to {member.link}, which is not in it")
            member = target
        return member

    def read(self, member: Member) -> bytes:
        """A file's bytes (a hard link's: its target's)."""
        member = self.file_member(member)
        if member.kind != "f":
            raise KioskError(f"{self.tar}: {member.path} is not a file")
        if self._fd is None:
            self._fd = os.open(self.tar, os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(self._fd, member.size, member.offset)
        if len(data) != member.size:
            raise KioskError(f"{self.tar}: {member.path} is cut short (the tarball changed under the build?)")
        return data

    def resolve(self, path: str) -> str:
        """path with every symlink on the way followed inside the tree (/lib/x -> /usr/lib/x)."""
        parts = [p for p in path.split("/") if p]
        done = "/"
        hops = 0
        while parts:
            here = posixpath.normpath(posixpath.join(done, parts.pop(0)))
            member = self.members.get(here)
            if member is None or member.kind != "l":
                done = here
                continue
            hops += 1
            if hops > 40:
                raise KioskError(f"{self.tar}: too many symbolic links on the way to {path}")
            if member.link.startswith("/"):
                done = "/"
            parts = [p for p in member.link.split("/") if p] + parts
        return done

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def link_counts(self) -> dict[str, int]:
        """Names per file (the plain member's path -> how many names share its inode)."""
        counts: dict[str, int] = {}
        for m in self.members.values():
            if m.kind in "fh":
                key = self.file_member(m).path
                counts[key] = counts.get(key, 0) + 1
        return counts


def load(tar: Path) -> TarIndex:
    """The tarball's index, made and stored beside it when missing or stale. The caller holds its lock."""
    path = index_path(tar)
    try:
        data = json.loads(path.read_text())
        if data.get("version") == INDEX_VERSION and data.get("tar") == _identity(tar):
            return TarIndex(tar, data)
    except (OSError, ValueError):
        pass
    try:
        data = scan(tar)
    except (OSError, tarfile.TarError) as exc:
        raise KioskError(f"{tar}: cannot read the base tarball ({exc})",
                         hint=f"remove it and build again (it is a cache: {tar.parent})") from None
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)
    return TarIndex(tar, data)
