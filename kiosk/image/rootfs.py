"""The base root filesystem: mmdebstrap of the plan's packages, cached, in two layers.

`base_rootfs(plan)` returns an uncompressed tarball under `cache_dir()/rootfs/`.
It is made in two cached stages (`stages(plan)`): the base (every package of the
plan except the program and the spec's own `packages`, plus busybox-static),
then a top layer installing those on the base with apt in the chroot. A new
program or one more package reinstalls only the top layer (~30 s native,
~1-2 min under qemu-user, instead of ~8 min). The split depends on the spec
alone, never on what is cached, so the same spec gives the same bytes anywhere.
An uncompressed tar is what the rest of the build reuses fastest: unpacking
~900 MB takes 1-3 s and needs no compression CPU (figures in notes/image.md).

Things this recipe takes care of:

- Downloaded .debs are kept in `cache_dir()/debs/` (all architectures: the
  `_all.deb` ones are shared between boards), hard-linked into the chroot's
  /var/cache/apt/archives before apt runs and back out at the end (copies, and
  mmdebstrap's sync-out special hook, in unshare mode), so adding one package
  downloads one package; no apt lists are cached, so apt always resolves
  against the mirror's current index.
- update-initramfs is diverted to a no-op while packages are installed: under
  qemu-user one mkinitramfs run costs ~10 minutes. kiosk.bootfiles builds a
  small initramfs natively instead. The diversion is removed at the end, so on
  the device a kernel upgrade runs the real update-initramfs (natively there).
- raspi-firmware's kernel hook finds no initrd during the build and exits
  before writing anything; the blobs its postinst copies to /boot/firmware are
  removed from the tree (the FAT partition is mounted there).
- For a foreign architecture, python3.11 is diverted too while packages are
  installed: this machine's own python3.11 byte-compiles natively when it is
  the same upstream version (kiosk.image.hostpython), the same bytes in less time.
- Reproducible: SOURCE_DATE_EPOCH is the suite's Release date (or the
  caller's SOURCE_DATE_EPOCH), ssh host keys are removed (the device makes its
  own on first start), /etc/hostname and /etc/resolv.conf get fixed contents,
  PYTHONHASHSEED=0 for byte-compilation.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kiosk.core import paths
from kiosk.core.errors import KioskError
from kiosk.core.run import run, run_lines
from kiosk.image import hostpython
from kiosk.spec.archive import release_date
from kiosk.spec.sources import COMPONENTS, sources_list, unsigned_allowed

# Bump when the recipe below changes what ends up in the tarball.
RECIPE_VERSION = "5"

# Always installed on top of the plan's packages: busybox-static of the target
# architecture is what the native initramfs (kiosk.image.bootfiles) is made of.
RECIPE_PACKAGES = ("busybox-static",)

QEMU_BINFMT = {"arm64": "qemu-aarch64", "armhf": "qemu-arm", "armel": "qemu-arm"}
FALLBACK_EPOCH = 1686355200  # 2023-06-10, the bookworm release, when the mirror gives no date

Log = Callable[[str], None]


def _noop_log(msg: str) -> None:
    pass


def host_arch() -> str:
    return run(["dpkg", "--print-architecture"]).stdout.strip()


def rootfs_dir() -> Path:
    return paths.cache_dir() / "rootfs"


@dataclass(frozen=True)
class Stage:
    """One cached tarball: a package set installed from scratch, or on top of a parent stage."""

    suite: str
    architecture: str
    mirror: str
    packages: tuple[str, ...]          # everything this tarball was asked to contain (sorted)
    install: tuple[str, ...]           # what this step installs (== packages for a base)
    parent: "Stage | None" = None
    sources: tuple[tuple[str, str], ...] = ()   # (mirror, suite) apt reads: kiosk.spec.sources

    @property
    def key(self) -> str:
        blob = json.dumps([self.suite, self.architecture, [list(s) for s in self.sources], list(self.packages),
                           list(self.install), RECIPE_VERSION, self.parent.key if self.parent else None])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def path(self) -> Path:
        kind = "top" if self.parent else "base"
        return rootfs_dir() / f"{self.suite}-{self.architecture}-{kind}-{self.key}.tar"


def stages(plan) -> list[Stage]:
    """The base (every package but the program and the spec's own packages), then the program on top.

    Two cached layers: a new program or an added package reinstalls only the top layer on the
    cached base (~2 min under qemu-user instead of ~8). The split depends only on the spec, never
    on what happens to be cached, so the same spec always gives the same tree.
    """
    top = {plan.spec["program"]["package"], *plan.spec.get("packages", [])}
    base_packages = tuple(sorted((set(plan.packages) - top) | set(RECIPE_PACKAGES)))
    base = Stage(plan.suite, plan.architecture, plan.mirror, base_packages, base_packages, sources=plan.sources)
    top_packages = tuple(sorted(set(plan.packages) & top))
    if not top_packages:
        return [base]
    everything = tuple(sorted(set(base_packages) | set(top_packages)))
    return [base, Stage(plan.suite, plan.architecture, plan.mirror, everything, top_packages, base,
                        sources=plan.sources)]


def tarball_path(plan) -> Path:
    """Where base_rootfs(plan) keeps the finished tree."""
    return stages(plan)[-1].path


def metadata_path(tar: Path) -> Path:
    return tar.with_suffix(".json")


def read_metadata(tar: Path) -> dict:
    """What was recorded when the tarball was built: epoch, packages, timings."""
    return json.loads(metadata_path(tar).read_text())


def release_epoch(sources, timeout: float = 20) -> int:
    """The newest Date: of the suites' Release files, or the caller's SOURCE_DATE_EPOCH.

    The Release dates change exactly when the package lock (the archive's state)
    does, so pinned snapshot mirrors give the same epoch, hence the same bytes.
    """
    if os.environ.get("SOURCE_DATE_EPOCH", "").isdigit():
        return int(os.environ["SOURCE_DATE_EPOCH"])
    dates = [release_date(mirror, suite, timeout) for mirror, suite in sources]
    return max((d for d in dates if d is not None), default=FALLBACK_EPOCH)


def check_foreign_arch(arch: str) -> None:
    """A foreign architecture needs qemu-user via binfmt_misc; say how to get it if missing."""
    if arch == host_arch():
        return
    result = run(["arch-test", arch], check=False) if shutil.which("arch-test") else None
    if result is not None and result.returncode == 0:
        return
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    hint = ""
    if not (binfmt / "status").exists():
        hint = " binfmt_misc is not mounted: mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc;"
    name = QEMU_BINFMT.get(arch, "qemu-" + arch)
    raise KioskError(f"rootfs: cannot run {arch} programs on this {host_arch()} machine",
                     hint=f"{hint.strip()} install qemu-user-static and binfmt-support, then update-binfmts "
                          f"--enable {name} (check with: arch-test {arch})".strip())


# The no-op that stands in for update-initramfs while packages are installed.
_NOOP_UPDATE_INITRAMFS = """#!/bin/sh
# kiosk: update-initramfs is diverted while the image is built (it would run
# mkinitramfs under qemu-user for ~10 minutes); kiosk builds the initramfs natively.
exit 0
"""


def mmdebstrap_mode() -> str:
    """root as root; otherwise unshare (user namespaces, needs /etc/subuid and /etc/subgid entries).

    KIOSK_MMDEBSTRAP_MODE=unshare forces unshare mode (as root too: then only the mount, pid, uts and
    ipc namespaces are new), to test that path.
    """
    forced = paths.setting("KIOSK_MMDEBSTRAP_MODE")
    if forced in ("root", "unshare"):
        return forced
    return "root" if os.geteuid() == 0 else "unshare"


def _subordinate_ids(path: Path, user: str, uid: int) -> int:
    """How many subordinate ids /etc/subuid or /etc/subgid gives the user (by name or number)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    count = 0
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) == 3 and fields[0] in (user, str(uid)) and fields[2].isdigit():
            count += int(fields[2])
    return count


def unshare_problems(etc: Path = Path("/etc")) -> list[str]:
    """What keeps mmdebstrap's unshare mode from working for this user (empty when nothing does).

    It runs the package installs as root inside a user namespace: the kernel must allow those, and the
    user needs 65536 subordinate uids and gids, mapped by newuidmap and newgidmap (package uidmap).
    """
    import pwd

    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    problems = []
    for kind, tool in (("uid", "newuidmap"), ("gid", "newgidmap")):
        if not shutil.which(tool):
            problems.append(f"{tool} is missing (apt install uidmap)")
        if _subordinate_ids(etc / f"sub{kind}", user, uid) < 65536:
            problems.append(f"{etc}/sub{kind} gives {user} fewer than 65536 subordinate {kind}s "
                            f"(sudo usermod --add-sub{kind}s 100000-165535 {user})")
    probe = run(["unshare", "--user", "--map-root-user", "true"], check=False) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        problems.append("this kernel does not let users make user namespaces "
                        "(sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0)")
    return problems


def check_unshare() -> None:
    """Before a base is built as a user: say everything mmdebstrap's unshare mode still lacks, at once."""
    if mmdebstrap_mode() != "unshare" or os.geteuid() == 0:
        return
    problems = unshare_problems()
    if problems:
        raise KioskError("rootfs: building a base root filesystem as a user needs mmdebstrap's unshare mode, and "
                         + "; ".join(problems),
                         hint="fix that, or build as root (sudo kiosk build ...); a cached base needs neither")


def mmdebstrap_command(stage: Stage, out: Path, *, verbose: bool = False, meta_dir: Path | None = None,
                       parent_tar: Path | None = None) -> list[str]:
    """The whole mmdebstrap invocation for one stage (shown by `--verbose` for reproducing by hand).

    A base stage installs its packages from scratch (variant minbase); a top stage unpacks
    parent_tar and installs its packages on it with apt inside the chroot (variant custom).
    meta_dir receives `dpkg-query` (the installed packages), copied out of the chroot.
    """
    mode = mmdebstrap_mode()
    meta_dir = meta_dir or out.parent
    debs = str(paths.deb_cache_dir())
    q = shlex.quote
    divert = "/usr/sbin/update-initramfs"
    noop = _NOOP_UPDATE_INITRAMFS.replace("'", "")
    archives = '"$1"/var/cache/apt/archives/'
    # Hard links where the cache and the chroot share a file system (instant), copies elsewhere.
    # (copies in unshare mode: sync-out's tar fails on files hard-linked to the ones it writes)
    link = "-l " if mode == "root" else ""
    sync_in = (f"mkdir -p {archives}partial && "
               f"find {q(debs)} -maxdepth 1 -type f \\( -name '*_{stage.architecture}.deb' -o -name '*_all.deb' \\) "
               f"-exec sh -c 'cp {link}-t \"$0\" \"$@\" 2>/dev/null || cp -t \"$0\" \"$@\"' {archives} {{}} +")
    if mode == "root":
        sync_out = (f"find {archives} -maxdepth 1 -type f -name '*.deb' "
                    f"-exec sh -c 'cp -l -n -t \"$0\" \"$@\" 2>/dev/null || cp -n -t \"$0\" \"$@\"' {q(debs)} {{}} +")
    else:
        # In a user namespace the chroot's root cannot write the user's cache: mmdebstrap's own
        # special hook copies out with the user's rights.
        sync_out = f"sync-out /var/cache/apt/archives {debs}"
    divert_add = [
        f"chroot \"$1\" dpkg-divert --quiet --local --rename --divert {divert}.kiosk-real --add {divert}",
        f"printf '%s' {q(noop)} > \"$1\"{divert} && chmod 755 \"$1\"{divert}",
    ]
    python_in, python_out = [], []
    version = hostpython.host_version() if stage.architecture != host_arch() else None
    if version:
        python_in, python_out = hostpython.hooks(version)
        divert_add += python_in
    cmd = [
        "mmdebstrap",
        f"--mode={mode}",
        f"--variant={'custom' if stage.parent else 'minbase'}",
        "--format=tar",
        f"--architectures={stage.architecture}",
        f"--components={','.join(COMPONENTS)}",
        "--aptopt=Acquire::Languages \"none\"",
        "--aptopt=APT::Install-Recommends \"false\"",
        "--dpkgopt=force-confold",
        # No manual pages, info, translations or documentation on a kiosk (copyright files stay:
        # they are the licences the SBOM points to). Kept on the device for later upgrades too.
        *[f"--dpkgopt=path-exclude={p}" for p in ("/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
                                                  "/usr/share/doc/*", "/usr/share/lintian/*")],
        "--dpkgopt=path-include=/usr/share/locale/locale.alias",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    ]
    if stage.parent is None:
        cmd += [
            "--include=" + ",".join(stage.install),
            # Keep downloaded .debs: put in before apt runs, taken out at the end.
            "--skip=essential/unlink",
            "--skip=download/empty",
            f"--setup-hook={sync_in}",
            # Divert update-initramfs before any package could call it.
            *[f"--essential-hook={h}" for h in divert_add],
        ]
    else:
        assert parent_tar is not None
        cmd += [
            # The parent tree, then apt inside the chroot for this layer's packages.
            f"--setup-hook=tar -C \"$1\" --extract --file {q(str(parent_tar))} --numeric-owner --same-owner "
            "--preserve-permissions --xattrs --xattrs-include='*' --exclude='./dev/*'",
            f"--setup-hook={sync_in}",
            # apt in the chroot needs DNS; the base's resolv.conf was emptied (and is emptied again below)
            "--setup-hook=rm -f \"$1\"/etc/resolv.conf && cp /etc/resolv.conf \"$1\"/etc/resolv.conf",
            *[f"--customize-hook={h}" for h in divert_add],
            "--customize-hook=chroot \"$1\" apt-get install --yes --no-install-recommends "
            "-o Dpkg::Options::=--force-confold " + " ".join(q(p) for p in stage.install),
        ]
    cmd += [
        f"--customize-hook={sync_out}",
        # Give python3.11 (kiosk.image.hostpython) and update-initramfs back to the device.
        *[f"--customize-hook={h}" for h in python_out],
        f"--customize-hook=rm -f \"$1\"{divert} && chroot \"$1\" dpkg-divert --quiet --local --rename "
        f"--divert {divert}.kiosk-real --remove {divert}",
        # Never bake secrets or host-specific files into an image.
        "--customize-hook=rm -f \"$1\"/etc/ssh/ssh_host_*_key \"$1\"/etc/ssh/ssh_host_*_key.pub",
        "--customize-hook=echo kiosk > \"$1\"/etc/hostname",
        "--customize-hook=rm -f \"$1\"/etc/resolv.conf && : > \"$1\"/etc/resolv.conf",
        # raspi-firmware's postinst copies its blobs here; the FAT partition is mounted over it.
        "--customize-hook=if [ -d \"$1\"/boot/firmware ]; then find \"$1\"/boot/firmware -mindepth 1 -delete; fi",
        # Record what is installed (parsed back by installed_packages()).
        "--customize-hook=chroot \"$1\" dpkg-query -W "
        "-f '${Package}\\t${Version}\\t${Architecture}\\t${source:Package}\\t${source:Version}\\n' "
        "> \"$1\"/tmp/dpkg-query",
        f"--customize-hook=copy-out /tmp/dpkg-query {meta_dir}",  # /tmp is emptied by mmdebstrap afterwards
    ]
    if verbose:
        cmd.append("--verbose")
    # Each source as a one-line sources.list entry: the suite, its security fixes, its updates.
    cmd += [stage.suite, str(out), *[sources_list([source], options="[trusted=yes] " if unsigned_allowed(source[0])
                                                  else "").rstrip("\n") for source in stage.sources]]
    return cmd


@contextlib.contextmanager
def cache_lock(path: Path):
    """Hold the cache's lock file `path` (flock): one build makes an entry, the others wait and reuse it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def index(tar: Path):
    """The tarball's index (kiosk.image.tarindex), made beside it under its lock when missing."""
    from kiosk.image import tarindex
    with cache_lock(tar.with_suffix(".lock")):
        return tarindex.load(tar)


def run_logged(cmd: list[str], *, stage: str, log: Log, verbose: bool, env: dict | None = None,
               interesting: Callable[[str], bool] = lambda line: False, tail: int = 20) -> None:
    """Run cmd, showing its output (all of it when verbose, else the interesting lines); a failure names
    the stage, the tool's error lines first, then its last `tail` lines."""
    def show(line: str) -> None:
        if verbose or interesting(line):
            log(f"  {line}")
    run_lines(cmd, show, env=env, what=f"{stage} failed", tail=tail,
              important=lambda line: line.startswith(("E: ", "tar: ", "dpkg: error")))


def _interesting(line: str) -> bool:
    """mmdebstrap's stage lines (not the hook command lines) and every warning or error."""
    if line.startswith(("E: ", "W: ")):
        return True
    return line.startswith("I: ") and not line.startswith(("I: running --", "I: running special hook"))


def base_rootfs(plan, *, log: Log = _noop_log, verbose: bool = False, upgrade: bool = False) -> Path:
    """The cached tree of plan's package set, as an uncompressed tarball (built if missing).

    Built in two cached stages (see stages()): the base, then the program and the spec's
    packages on top. The returned tarball's metadata (read_metadata) has the epoch and the
    installed packages. upgrade: a cached base older than the archive (a suite's Release is newer,
    e.g. a security fix was published since) is built again from today's archive, and its top with it.
    """
    check_foreign_arch(plan.architecture)
    parent_tar = None
    for stage in stages(plan):
        parent_tar = _build_stage(stage, parent_tar, log=log, verbose=verbose, upgrade=upgrade)
    assert parent_tar is not None
    return parent_tar


def archive_moved(cached_epoch: int, sources, *, timeout: float = 20) -> int | None:
    """The archive's state (its suites' newest Release date) when it is newer than cached_epoch, else None
    (also when no Release file can be read: offline, the cache stands)."""
    dates = [d for d in (release_date(mirror, suite, timeout) for mirror, suite in sources) if d is not None]
    newest = max(dates, default=None)
    return newest if newest is not None and newest > cached_epoch else None


def _stale(stage: Stage, tar: Path, parent_tar: Path | None, upgrade: bool, log: Log) -> bool:
    """Whether a cached tarball must be built again: its parent was (another epoch), or --upgrade and the
    archive has moved on since it was built."""
    epoch = read_metadata(tar).get("sourceDateEpoch")
    if parent_tar is not None:
        return read_metadata(parent_tar).get("sourceDateEpoch") != epoch
    if not upgrade or os.environ.get("SOURCE_DATE_EPOCH", "").isdigit():
        return False
    newer = archive_moved(int(epoch or 0), stage.sources)
    day = lambda t: time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))   # noqa: E731
    if newer is None:
        log(f"rootfs: --upgrade: the cached base is the archive's current state ({day(int(epoch or 0))} UTC)")
        return False
    log(f"rootfs: --upgrade: the archive has changed since the cached base ({day(int(epoch or 0))} -> "
        f"{day(newer)} UTC): building it again")
    return True


MIRROR_SYNC = "Mirror sync in progress?"   # apt: an index does not match its Release (a mirror mid-sync)
MIRROR_RETRIES = 3
MIRROR_WAIT_SECONDS = 60


def _mmdebstrap(cmd: list[str], *, log: Log, verbose: bool, env: dict) -> None:
    """mmdebstrap, again after a minute when a mirror was caught syncing (Debian's mirrors and caching
    proxies serve a new Release before its indexes for a while: apt says "File has unexpected size ...
    Mirror sync in progress?"); any other failure at once."""
    for attempt in range(1, MIRROR_RETRIES + 1):
        try:
            run_logged(cmd, stage="rootfs (mmdebstrap)", log=log, verbose=verbose, env=env, interesting=_interesting)
            return
        except KioskError as exc:
            if MIRROR_SYNC not in str(exc) or attempt == MIRROR_RETRIES:
                if MIRROR_SYNC in str(exc):
                    raise KioskError(exc.message, hint=f"the mirror was being synced during {attempt} tries: "
                                                            "try again later, or give another debian.mirror") from None
                raise
            log(f"rootfs: the mirror is being synced (an index does not match its Release); trying again in "
                f"{MIRROR_WAIT_SECONDS} s ({attempt} of {MIRROR_RETRIES - 1} retries)")
            time.sleep(MIRROR_WAIT_SECONDS)


def _build_stage(stage: Stage, parent_tar: Path | None, *, log: Log, verbose: bool, upgrade: bool) -> Path:
    tar = stage.path
    what = "base" if stage.parent is None else f"top layer ({', '.join(stage.install)})"
    with cache_lock(tar.with_suffix(".lock")):
        if tar.exists() and metadata_path(tar).exists() and not _stale(stage, tar, parent_tar, upgrade, log):
            log(f"rootfs: reusing the {what}: {tar.name} ({stage.architecture}, {len(stage.packages)} packages)")
            return tar
        if not shutil.which("mmdebstrap"):
            raise KioskError("rootfs: mmdebstrap is not installed", hint="apt install mmdebstrap")
        check_unshare()
        epoch = read_metadata(parent_tar)["sourceDateEpoch"] if parent_tar else \
            release_epoch(stage.sources)
        tmp = tar.with_name(f".{tar.name}.{os.getpid()}.tmp")
        meta_dir = tar.with_name(f".{tar.name}.{os.getpid()}.meta")
        meta_dir.mkdir(exist_ok=True)
        paths.deb_cache_dir().mkdir(parents=True, exist_ok=True)
        cmd = mmdebstrap_command(stage, tmp, verbose=verbose, meta_dir=meta_dir, parent_tar=parent_tar)
        env = dict(SOURCE_DATE_EPOCH=str(epoch), PYTHONHASHSEED="0", DEBIAN_FRONTEND="noninteractive")
        debs = paths.deb_cache_dir()
        cached = len(list(debs.glob(f"*_{stage.architecture}.deb")) + list(debs.glob("*_all.deb"))) \
            if debs.is_dir() else 0
        log(f"rootfs: mmdebstrap the {what}: {stage.suite} {stage.architecture}, {len(stage.install)} packages "
            f"from {', '.join(f'{m} {s}' for m, s in stage.sources)} ({cached} .debs cached, SOURCE_DATE_EPOCH={epoch})")
        started = time.monotonic()
        try:
            _mmdebstrap(cmd, log=log, verbose=verbose, env=env)
            packages = _parse_dpkg_query((meta_dir / "dpkg-query").read_text())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            shutil.rmtree(meta_dir, ignore_errors=True)
        elapsed = time.monotonic() - started
        meta = {
            "recipe": RECIPE_VERSION, "key": stage.key, "suite": stage.suite,
            "architecture": stage.architecture, "mirror": stage.mirror,
            "sources": [list(s) for s in stage.sources], "requested": list(stage.packages),
            "installedOnTop": list(stage.install) if stage.parent else [],
            "parent": parent_tar.name if parent_tar else None,
            "sourceDateEpoch": epoch, "seconds": round(elapsed, 1),
            "installed": [list(p) for p in packages],
        }
        metadata_path(tar).with_suffix(".json.tmp").write_text(json.dumps(meta, indent=1) + "\n")
        os.replace(tmp, tar)
        os.replace(metadata_path(tar).with_suffix(".json.tmp"), metadata_path(tar))
        log(f"rootfs: built the {what} in {elapsed:.0f} s: {tar.name}, {len(packages)} packages installed, "
            f"{tar.stat().st_size / 2**20:.0f} MiB")
        return tar


def _parse_dpkg_query(text: str) -> list[tuple[str, str, str, str]]:
    out = []
    for line in text.splitlines():
        name, version, arch, source, source_version = (line.split("\t") + [""] * 5)[:5]
        out.append((name, version, arch, source or name))
    return sorted(out)


def parse_dpkg_status(text: str) -> list[tuple[str, str, str, str]]:
    """(name, version, architecture, source) of every installed package in a dpkg status file."""
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line[:1].isspace() or ":" not in line:
                continue
            key, value = line.split(":", 1)
            fields[key] = value.strip()
        if not fields.get("Package") or "installed" not in fields.get("Status", "").split()[-1:]:
            continue
        source = fields.get("Source", fields["Package"]).split(" ", 1)[0]
        out.append((fields["Package"], fields.get("Version", ""), fields.get("Architecture", ""), source))
    return sorted(out)


def installed_packages(tree_or_tar: Path | str) -> list[tuple[str, str, str, str]]:
    """Installed packages (name, version, arch, source) of a root tree, a base tarball, or a status file."""
    path = Path(tree_or_tar)
    if path.is_dir():
        return parse_dpkg_status((path / "var/lib/dpkg/status").read_text())
    if path.suffix == ".tar":
        meta = metadata_path(path)
        if meta.exists():
            return [tuple(p) for p in json.loads(meta.read_text())["installed"]]
        with tarfile.open(path) as tf:
            for name in ("./var/lib/dpkg/status", "var/lib/dpkg/status"):
                try:
                    member = tf.extractfile(name)
                except KeyError:
                    continue
                if member:
                    return parse_dpkg_status(member.read().decode())
        raise KioskError(f"{path}: no var/lib/dpkg/status in this tarball")
    return parse_dpkg_status(path.read_text())


def extract(tar: Path, dest: Path, *, owners: bool = True, log: Log = _noop_log) -> None:
    """Unpack a base tarball into dest (which must exist), keeping modes and times.

    owners: also owners and extended attributes (as root; a user's unpack cannot keep them). Without,
    every file belongs to whoever unpacks: kiosk.image.basefs sets them from the tarball's index.
    /dev is left empty (devtmpfs is mounted there at boot), so this also works without root.
    """
    started = time.monotonic()
    cmd = ["tar", "-C", str(dest), "--extract", "--file", str(tar), "--numeric-owner", "--preserve-permissions",
           "--exclude=./dev/*"]
    if owners and os.geteuid() == 0:
        cmd += ["--same-owner", "--xattrs", "--xattrs-include=*"]
    else:
        cmd += ["--no-same-owner", "--no-xattrs"]
    run(cmd, what=f"rootfs: unpacking {tar} failed")
    log(f"rootfs: unpacked {tar.name} in {time.monotonic() - started:.1f} s")
