"""The data partition of A/B images: ext4 KIOSKDATA, holding what must survive a switch of root slot.

The configure step makes generation 1 and configuration.git inside the root tree, where the device
sees them (/var/lib/kiosk, /etc/kiosk/configuration.git). On A/B boards `split` then moves them out
of the tree into a data tree (paths.DATA_BINDS: kiosk/state, kiosk/configuration.git), leaving empty
mount points in the slot, and `write` makes the data file system from that tree inside the image at
the data partition's offset: mke2fs -E offset= (no root, no loop device), then the tree written with
debugfs by the same commands the root's changes use (kiosk.image.overlay). Reproducible like the
root: the UUID and hash seed come from the spec's identity, every time is SOURCE_DATE_EPOCH, every
owner root (as a user's build writes it too).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from kiosk.core.errors import KioskError
from kiosk.core.paths import DATA_BINDS, DATA_HOST_KEYS, DATA_LABEL, DATA_MOUNT
from kiosk.core.run import run
from kiosk.image.basefs import BLOCK, fake_time_env, run_debugfs
from kiosk.image.overlay import KIND, Change, commands


def split(root: Path, data: Path, *, epoch: int) -> None:
    """Move the bound directories out of the root tree into the data tree `data`; empty mount points (same
    mode and owner) stay in the tree. Also the host keys' directory (made empty: every card makes its own keys)."""
    data.mkdir(mode=0o755)
    for source, target in DATA_BINDS:
        live = root / target.lstrip("/")
        moved = data / source
        moved.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        st = live.lstat()
        os.rename(live, moved)
        live.mkdir()
        os.chmod(live, stat.S_IMODE(st.st_mode))
        if os.geteuid() == 0:   # the mount point keeps the base's owner (/var/log/journal: root:systemd-journal);
            os.chown(live, st.st_uid, st.st_gid)   # on /data everything is root's (tmpfiles sets the journal's
            os.chown(moved, 0, 0)                   # group at boot: z /var/log/journal in systemd.conf)
        for path in (live, live.parent):
            os.utime(path, (epoch, epoch))
    keys = data / DATA_HOST_KEYS.removeprefix(DATA_MOUNT + "/") / "etc/ssh"
    keys.mkdir(mode=0o755, parents=True)
    for directory, _, _ in os.walk(data):
        os.utime(directory, (epoch, epoch))


def tree_changes(data: Path, epoch: int) -> list[Change]:
    """The data tree as overlay Changes on an empty file system: everything new, owned by root."""
    changes = [Change("/", "update", "d", 0o755, 0, 0, epoch)]
    first_names: dict[int, str] = {}
    for directory, dirnames, filenames in os.walk(data):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            host = Path(directory) / name
            st = host.lstat()
            kind = KIND.get(stat.S_IFMT(st.st_mode))
            path = "/" + str(host.relative_to(data))
            if kind is None:
                raise KioskError(f"image: {path} on the data partition is of a kind kiosk does not put into images")
            if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
                raise KioskError(f"image: {path} on the data partition belongs to {st.st_uid}:{st.st_gid}, not root",
                                 hint="this is a bug in kiosk (a user's build would write it as root's)")
            change = Change(path, "new", kind, stat.S_IMODE(st.st_mode), 0, 0, min(int(st.st_mtime), epoch),
                            source=host if kind == "f" else None, target=os.readlink(host) if kind == "l" else "")
            if kind == "f" and st.st_nlink > 1:
                first = first_names.setdefault(st.st_ino, path)
                change.first_name = "" if first == path else first
                change.links = st.st_nlink
            changes.append(change)
    return sorted(changes, key=lambda c: c.path)


def mke2fs_command(image: Path, offset: int, size: int, ident) -> list[str]:
    """mke2fs for the data file system at `offset` in the image file, `size` bytes."""
    return ["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-L", DATA_LABEL, "-U", ident.data_uuid,
            "-E", f"hash_seed={ident.data_hash_seed},root_owner=0:0,nodiscard,lazy_itable_init=1,"
                  f"lazy_journal_init=1,offset={offset}", str(image), str(size // BLOCK)]


def write(image: Path, offset: int, size: int, data: Path, work: Path, *, ident, epoch: int) -> None:
    """The data file system at `offset` in `image` (a sparse file, zeros there), holding the data tree.

    lazy_itable_init/lazy_journal_init: mke2fs writes only the metadata it needs, so the partition costs
    the block map (and a flash) what the tree holds, not 128 MiB; the kernel zeroes inode tables itself."""
    run(mke2fs_command(image, offset, size, ident), what="image (data partition)", env=fake_time_env(epoch))
    script = commands(tree_changes(data, epoch), None, work, epoch=epoch) + ["close -a"]   # (see overlay.write)
    run_debugfs(image, script, epoch=epoch, offset=offset, what="image (generation 1 into the data partition)")
