"""What the configure step changes, found on a sparse tree and written into a copy of the base file system.

The configure step (pipeline.configure_tree: the layer, boot files, the kiosk package, generation
1, users, fstab) is plain Python and tools working on a directory tree. It runs on a sparse tree
instead of an unpacked ~1 GB base:

- every directory and symbolic link of the base, with its mode and mtime (so paths resolve through
  /lib -> usr/lib, `mkdir -p` and existence checks behave as on the whole tree), and
- the contents of the files the configure step reads or rewrites in place (pipeline.configure_inputs
  names them, by reading the steps), fetched from the tarball.

After configure, `changes()` compares the sparse tree with what was seeded (inode numbers and
ctimes tell what was touched, replaced or removed) and with the tarball's index (what the base
held at each path), and `write()` turns that into debugfs commands on the image's copy of the base
ext4: removals first (a replaced or removed directory takes its whole base subtree with it), then
new directories, files, links in path order, then owners, modes and times, the directories' mtimes
last, then the image's own UUID.

Owners do not come from the sparse tree (a user's build cannot give files away): a path keeps the
owner it had in the base when it was there before (rewritten in place, or replaced as
systemd-sysusers replaces /etc/shadow, keeping root:shadow); whatever is new belongs to root. A
root build checks that rule against the owners the tree really got, for every change. Modes are
the tree's (a mode the seeding had to widen for the owner to write comes back as the base's);
times follow the slow path's rule: atime, ctime and crtime at the epoch, mtime clamped to it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from kiosk.core.errors import KioskError
from kiosk.image.basefs import quote, run_debugfs
from kiosk.image.tarindex import Member, TarIndex

KIND = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l"}


@dataclass(frozen=True)
class Seeded:
    """A path as seeded: its inode and ctime (changed = touched) and the mode it was given."""

    ino: int
    ctime_ns: int
    kind: str
    mode: int


@dataclass
class Change:
    """One path of the image that differs from the base.

    op: "new" (created; `replaces` is what the base had there, removed first), "update" (the base's
    inode with new metadata, or new contents when `rewrite`), "remove" (the base's entry, subtree too).
    """

    path: str
    op: str
    kind: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    source: Path | None = None
    target: str = ""
    replaces: Member | None = None
    rewrite: bool = False
    xattrs: dict[str, bytes] = field(default_factory=dict)
    first_name: str = ""          # a new hard link: the path written first for this inode
    links: int = 1


def _widened(kind: str, mode: int) -> int:
    """The mode seeding gives: the owner may always read and write (and enter directories)."""
    return mode | (0o700 if kind == "d" else 0o600 if kind == "f" else 0)


class Sparse:
    """A sparse copy of the base tree at `root`: seed it, let configure change it, ask what changed."""

    def __init__(self, index: TarIndex, root: Path):
        self.index = index
        self.root = Path(root)
        self.as_root = os.geteuid() == 0
        self.fetched: set[str] = set()
        self.seeded: dict[str, Seeded] = {}
        self._pins: list[int] = []
        self._skeleton()

    def host(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def _own(self, target: Path, m: Member) -> None:
        if self.as_root:
            os.lchown(target, m.uid, m.gid)

    def _skeleton(self) -> None:
        """Every directory and symlink of the base (their times are set in finish())."""
        self.root.mkdir(parents=True, exist_ok=True)
        for m in self.index.members.values():
            if m.kind == "d" and m.path != "/":
                os.mkdir(self.host(m.path), 0o700)
            elif m.kind == "l":
                target = self.host(m.path)
                os.symlink(m.link, target)
                self._own(target, m)
                os.utime(target, ns=(m.mtime * 10**9,) * 2, follow_symlinks=False)

    def fetch(self, *paths: str) -> None:
        """Seed the contents of these base paths (a directory: every file below it), symlinks followed."""
        for path in paths:
            real = self.index.resolve(path)
            member = self.index.get(real)
            if member is None:
                continue
            members = self.index.under(real) if member.kind == "d" else [member]
            for m in members:
                if m.kind in "fh" and m.path not in self.fetched:
                    self._fetch_file(m)

    def _fetch_file(self, m: Member) -> None:
        target = self.host(m.path)
        source = self.index.file_member(m)
        if m.kind == "h" and source.path in self.fetched:
            os.link(self.host(source.path), target)
        else:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                data = memoryview(self.index.read(m))
                while data:
                    data = data[os.write(fd, data):]
            finally:
                os.close(fd)
            self._own(target, source)
            os.chmod(target, _widened("f", source.mode))
            os.utime(target, ns=(source.mtime * 10**9,) * 2)
        self.fetched.add(m.path)

    def finish(self) -> None:
        """Directories get their modes, owners and times, then everything seeded is recorded."""
        for m in reversed(list(self.index.members.values())):
            if m.kind == "d":
                target = self.host(m.path)
                self._own(target, m)
                os.chmod(target, _widened("d", m.mode))
                os.utime(target, ns=(m.mtime * 10**9,) * 2)
        seeded = [m.path for m in self.index.members.values() if m.kind in "dl" or m.path in self.fetched]
        _allow_open_files(len(seeded) + 256)
        for path in seeded:
            # Pinned: an inode held open is never freed, so its number cannot come back for a new file
            # (ext4 reuses freed numbers at once), and "same inode number" means "the seeded inode".
            self._pins.append(os.open(self.host(path), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC))
            st = os.fstat(self._pins[-1])
            self.seeded[path] = Seeded(st.st_ino, st.st_ctime_ns, KIND[stat.S_IFMT(st.st_mode)],
                                       stat.S_IMODE(st.st_mode))

    def close(self) -> None:
        """Let go of the seeded inodes (changes() does when it is done)."""
        for fd in self._pins:
            os.close(fd)
        self._pins.clear()

    # --- after configure -------------------------------------------------------------------------

    def changes(self, epoch: int) -> list[Change]:
        """Every path whose image entry must differ from the base's, in path order."""
        out: list[Change] = []
        seen: set[str] = set()
        replaced_dirs: list[str] = []
        new_inodes: dict[int, str] = {}
        seeded_inodes = {s.ino for s in self.seeded.values()}
        counts = self.index.link_counts()
        for path, st in self._walk():
            seen.add(path)
            kind = KIND.get(stat.S_IFMT(st.st_mode))
            if kind is None:
                raise KioskError(f"image: configure left {path} of a kind kiosk does not put into images")
            before = None if any(path.startswith(d + "/") for d in replaced_dirs) else self.seeded.get(path)
            base = self.index.get(path)
            if before is not None and before.ino == st.st_ino and before.kind == kind:
                if st.st_ctime_ns != before.ctime_ns:
                    change = self._update(path, kind, st, before, base, counts, epoch)
                    if change:
                        out.append(change)
                continue
            if before is not None and before.kind == "d":
                replaced_dirs.append(path)
            if st.st_ino in seeded_inodes and kind != "d":
                raise KioskError(f"image: configure gave a base file a second name, {path}",
                                 hint="this is a bug in kiosk's configure step: copy the file instead")
            change = self._new(path, kind, st, before, base, epoch)
            if change.kind == "f" and st.st_nlink > 1:
                first = new_inodes.setdefault(st.st_ino, path)
                change.first_name = "" if first == path else first
                change.links = st.st_nlink
            out.append(change)
        for path in sorted(set(self.seeded) - seen):
            out.append(Change(path, "remove", replaces=self.index.get(path)))
        self.close()
        if self.as_root:
            self._check_owners(out)
        return sorted(out, key=lambda c: c.path)

    def _walk(self):
        """(path, lstat) of everything in the sparse tree, parents first, never through symlinks."""
        stack = ["/"]
        while stack:
            path = stack.pop()
            host = self.host(path)
            st = os.lstat(host)
            yield path, st
            if stat.S_ISDIR(st.st_mode):
                names = sorted(os.listdir(host), reverse=True)
                stack += [(path.rstrip("/") + "/" + name) for name in names]

    def _final_mode(self, st, before: Seeded | None, base: Member | None) -> int:
        mode = stat.S_IMODE(st.st_mode)
        if before is not None and base is not None and mode == before.mode and before.mode != base.mode:
            return base.mode   # widened for seeding, not changed by configure
        return mode

    def _update(self, path, kind, st, before, base, counts, epoch) -> Change | None:
        """The base's own inode, touched: new metadata, maybe new contents."""
        rewrite = False
        if kind == "f":
            with open(self.host(path), "rb") as f:
                rewrite = f.read() != self.index.read(base)
            if rewrite and (base.kind == "h" or counts.get(base.path, 1) > 1):
                raise KioskError(f"image: configure rewrote {path}, a file with several names in the base",
                                 hint="this is a bug in kiosk's configure step: write a new file instead")
        mode = self._final_mode(st, before, base)
        mtime = min(int(st.st_mtime), epoch)
        owner = self.index.file_member(base) if base.kind == "h" else base
        if not rewrite and mode == base.mode and mtime == min(base.mtime, epoch):
            return None
        return Change(path, "update", kind, mode, owner.uid, owner.gid, mtime, source=self.host(path),
                      rewrite=rewrite, xattrs=owner.xattrs if rewrite else {}, replaces=base if rewrite else None)

    def _new(self, path, kind, st, before, base, epoch) -> Change:
        """A new inode at path (replacing what the base had there, if anything)."""
        uid, gid = (base.uid, base.gid) if before is not None and base is not None else (0, 0)
        if base is not None and base.kind == "h":
            source = self.index.file_member(base)
            uid, gid = (source.uid, source.gid) if before is not None else (0, 0)
        return Change(path, "new", kind, self._final_mode(st, before, base), uid, gid,
                      min(int(st.st_mtime), epoch), source=self.host(path) if kind == "f" else None,
                      target=os.readlink(self.host(path)) if kind == "l" else "", replaces=base)

    def _check_owners(self, changes: list[Change]) -> None:
        """As root the tree has the real owners: they must be what the rule gives (else kiosk has a bug)."""
        wrong = []
        for c in changes:
            if c.op != "remove":
                st = os.lstat(self.host(c.path))
                if (st.st_uid, st.st_gid) != (c.uid, c.gid):
                    wrong.append(f"{c.path}: {st.st_uid}:{st.st_gid} in the tree, {c.uid}:{c.gid} by the rule")
        if wrong:
            raise KioskError("image: the owners the configure step gave differ from what a build as a user "
                             "would write:\n  " + "\n  ".join(wrong[:10]),
                             hint="this is a bug in kiosk (overlay.Sparse owner rule); please report it")


def _allow_open_files(count: int) -> None:
    """Raise this process's open-file limit to `count` when it is lower (up to the hard limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count:
        if hard != resource.RLIM_INFINITY and hard < count:
            raise KioskError(f"image: the build holds {count} files open, and this process may open only {hard}",
                             hint=f"raise the limit (ulimit -n {count}) and build again")
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))


def _q(path: str) -> str:
    q = quote(path)
    if q is None:
        raise KioskError(f"image: {path!r}: debugfs cannot name a path with a quote or a newline",
                         hint="rename it in the spec (or the package that brings it)")
    return q


def commands(changes: list[Change], index: TarIndex, work: Path, *, epoch: int) -> list[str]:
    """The debugfs script that turns the base file system into the image's (xattr values go into work)."""
    removals: set[str] = set()
    for c in changes:
        if c.replaces is not None and (c.op != "update" or c.rewrite):
            removals.update(m.path for m in (index.under(c.path) if c.replaces.kind == "d" else [c.replaces]))
    out = []
    for path in sorted(removals, reverse=True):   # children before their directories
        out.append(f"{'rmdir' if index.get(path).kind == 'd' else 'rm'} {_q(path)}")
    created = [c for c in changes if c.op == "new" or c.rewrite]
    for c in created:
        # Every new name relative to its directory: debugfs resolves the directory part of "/name" (an empty
        # string) against its working directory, so "mkdir /data" after a cd would land in that directory.
        parent, name = os.path.split(c.path)
        out.append(f"cd {_q(parent)}")
        if c.kind == "d":
            out.append(f"mkdir {_q(name)}")
        elif c.kind == "l":
            out.append(f"symlink {_q(name)} {_q(c.target)}")
        elif c.first_name:
            out.append(f"ln {_q(c.first_name)} {_q(name)}")
        else:
            out.append(f"write {_q(str(c.source))} {_q(name)}")
    out.append("cd /")
    for n, (path, name, value) in enumerate((c.path, k, v) for c in changes if c.rewrite for k, v in c.xattrs.items()):
        value_file = work / f"xattr-{n}"
        value_file.write_bytes(value)
        out.append(f"ea_set -f {_q(str(value_file))} {_q(path)} {name}")
    # libext2fs stamps a directory whose entries it changes with the wall clock's ctime: put the epoch back.
    kept = {c.path for c in changes if c.op != "remove"}
    parents = {os.path.dirname(p) for p in removals | {c.path for c in created}} - removals
    out += [f"sif {_q(p)} ctime @{epoch}" for p in sorted(parents - kept)]
    dirs = []
    for c in changes:
        if c.op == "remove" or c.first_name:
            continue
        q = _q(c.path)
        fmt = {"f": stat.S_IFREG, "d": stat.S_IFDIR, "l": stat.S_IFLNK}[c.kind]
        out += [f"sif {q} mode 0{fmt | c.mode:o}", f"sif {q} uid {c.uid}", f"sif {q} gid {c.gid}",
                f"sif {q} atime @{epoch}", f"sif {q} ctime @{epoch}", f"sif {q} crtime @{epoch}"]
        if c.links > 1:
            out.append(f"sif {q} links_count {c.links}")
        (dirs if c.kind == "d" else out).append(f"sif {q} mtime @{c.mtime}")
    return out + dirs


def write(image: Path, offset: int, changes: list[Change], index: TarIndex, work: Path, *, epoch: int,
          uuid: str) -> None:
    """Apply the changes to the ext4 at `offset` in `image` (a copy of the base), with this image's UUID."""
    # close -a: the backup superblocks too (debugfs writes only the primary). A backup with the base's UUID
    # made e2fsck -a (systemd-fsck-root at the first boot) force a full check and then reboot, the check
    # having rewritten the backups of the mounted root; on QEMU's raspi machines, where a reboot halts,
    # raspberryPi2 never came up.
    script = commands(changes, index, work, epoch=epoch) + [f"ssv uuid {uuid}", "close -a"]
    run_debugfs(image, script, epoch=epoch, offset=offset, what="image (the configuration into the root file system)")
