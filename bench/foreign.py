#!/usr/bin/env python3
"""Where a cold foreign-architecture base spends its time: single steps under qemu-user against native.

A cold arm64 or armel base (rootfs stage) takes 6-8 minutes on 2 cores, all of it mmdebstrap's apt and
dpkg running the packages' maintainer scripts under qemu-user. Instead of another cold build, this
unpacks a CACHED base tarball into a temporary directory and times the costly steps there, under
qemu-user (chroot through binfmt_misc) and, where the work is architecture-independent, natively:

  process start-up, update-ca-certificates --fresh, locales' postinst, py3compile of the python3-*
  packages, byte-compiling the stdlib, dpkg --unpack of the kernel package, depmod

It also checks that every .pyc in the tarball (py3compile's, under qemu-user) is byte-identical to what
the host's /usr/bin/python3.11 compiles natively: whether byte-compiling could move out of the emulator.

Run as root (chroot, mount), best on an otherwise idle machine:
    sudo .venv/bin/python bench/foreign.py --board raspberryPi3 --cache-dir /var/tmp/kiosk-test-cache
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def timed(argv: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.monotonic() - started


def steps(tree: Path, debs: Path) -> list[tuple[str, float, float | None]]:
    """(step, seconds under qemu-user, seconds natively or None)."""
    chroot = ["chroot", str(tree)]
    loop = "i=0; while [ $i -lt 100 ]; do /bin/true; i=$((i+1)); done"
    out = [("100 process starts (/bin/true)", timed([*chroot, "/bin/sh", "-c", loop]), timed(["/bin/sh", "-c", loop]))]
    out.append(("update-ca-certificates --fresh", timed([*chroot, "update-ca-certificates", "--fresh"]), None))
    out.append(("locales postinst", timed([*chroot, "/var/lib/dpkg/info/locales.postinst", "configure"]), None))
    query = subprocess.run([*chroot, "dpkg-query", "-W", "-f", "${Package}\n"], capture_output=True, text=True)
    python = [p for p in query.stdout.split() if p.startswith("python3-")]
    loop = "for p in " + " ".join(python) + "; do py3compile -p $p; done"
    out.append((f"py3compile of {len(python)} python3-* packages", timed([*chroot, "sh", "-c", loop]),
                timed(["/usr/bin/python3.11", "-m", "compileall", "-q", "-f", str(tree / "usr/lib/python3/dist-packages")])))
    out.append(("byte-compiling the stdlib", timed([*chroot, "/usr/bin/python3.11", "-E", "-S", "-m", "compileall", "-q",
                                                     "-f", "/usr/lib/python3.11"]),
                timed(["/usr/bin/python3.11", "-E", "-S", "-m", "compileall", "-q", "-f", str(tree / "usr/lib/python3.11")])))
    arch = subprocess.run([*chroot, "dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    # the kernel itself (linux-image-6.1.0-50-arm64), not the meta-package linux-image-arm64
    kernel = sorted(k for k in debs.glob(f"linux-image-[0-9]*_{arch}.deb") if "-dbg" not in k.name)
    if kernel:
        shutil.copy(kernel[-1], tree / "tmp/k.deb")
        with tempfile.TemporaryDirectory() as x:
            out.append((f"dpkg --unpack {kernel[-1].name.split('_')[0]}",
                        timed([*chroot, "dpkg", "--force-unsafe-io", "--unpack", "/tmp/k.deb"]),
                        timed(["dpkg-deb", "-x", str(kernel[-1]), x])))
    version = sorted(os.listdir(tree / "lib/modules"))[-1]
    out.append(("depmod of the kernel's modules", timed([*chroot, "depmod", "-a", version]),
                timed(["depmod", "-b", str(tree), "-a", version])))
    return out


def pyc_identity(tar: Path) -> dict:
    """How many of the tarball's .pyc the host's python3.11 compiles to the same bytes (in a child: the
    host's interpreter, which must be the target's version)."""
    code = r"""
import os, py_compile, struct, sys, tempfile
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from kiosk.image import tarindex
index = tarindex.TarIndex(Path(sys.argv[2]), tarindex.scan(Path(sys.argv[2])))
same = differ = skipped = 0
modes = {0: py_compile.PycInvalidationMode.TIMESTAMP, 1: py_compile.PycInvalidationMode.UNCHECKED_HASH,
         3: py_compile.PycInvalidationMode.CHECKED_HASH}
with tempfile.TemporaryDirectory() as tmp:
    for path, m in index.members.items():
        if not path.endswith(".pyc") or m.kind != "f":
            continue
        cache, name = os.path.split(path)
        src = index.get(os.path.join(os.path.dirname(cache), name.split(".")[0] + ".py"))
        if src is None or src.kind not in "fh":
            skipped += 1
            continue
        data = index.read(m)
        s, out = Path(tmp, "s.py"), Path(tmp, "o.pyc")
        s.write_bytes(index.read(src))
        os.utime(s, (src.mtime, src.mtime))
        py_compile.compile(str(s), str(out), dfile=src.path, doraise=True,
                           invalidation_mode=modes[struct.unpack("<I", data[4:8])[0]])
        same, differ = (same + 1, differ) if out.read_bytes() == data else (same, differ + 1)
print(same, differ, skipped)
"""
    done = subprocess.run(["/usr/bin/python3.11", "-c", code, str(ROOT), str(tar)], capture_output=True, text=True)
    same, differ, skipped = (int(n) for n in done.stdout.split()[-3:])
    return {"same": same, "differ": differ, "withoutSource": skipped}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--board", default="raspberryPi3")
    parser.add_argument("--cache-dir", default=os.environ.get("KIOSK_CACHE_DIR", "/var/tmp/kiosk-test-cache"))
    parser.add_argument("--tar", type=Path, help="a cached base tarball (default: the board's minimal image's)")
    args = parser.parse_args()
    os.environ["KIOSK_CACHE_DIR"] = args.cache_dir
    sys.path.insert(0, str(ROOT / "tests"))
    from imagetools import full_spec
    from kiosk.image import rootfs
    from kiosk.spec.plan import make_plan

    tar = args.tar or rootfs.tarball_path(make_plan(full_spec(args.board)))
    if not tar.exists():
        print(f"{tar} is not cached: build the board's image once first", file=sys.stderr)
        return 2
    print(f"foreign base steps: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, {tar.name}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kiosk-bench-foreign-", dir="/var/tmp") as tmp:
        tree = Path(tmp) / "root"
        tree.mkdir()
        rootfs.extract(tar, tree)
        subprocess.run(["mount", "-t", "proc", "proc", str(tree / "proc")], check=True)
        try:
            results = steps(tree, Path(args.cache_dir) / "debs")
        finally:
            subprocess.run(["umount", str(tree / "proc")], check=True)
    for step, emulated, native in results:
        print(f"{step:45} {emulated:7.1f} s under qemu-user" + (f", {native:5.1f} s natively" if native else ""))
    pyc = pyc_identity(tar)
    print(f".pyc compiled natively by /usr/bin/python3.11: {pyc['same']} the same bytes, {pyc['differ']} differ, "
          f"{pyc['withoutSource']} without a source file")
    print(json.dumps({"cores": os.cpu_count(), "loadavg": os.getloadavg(), "tarball": tar.name,
                      "steps": [{"step": s, "qemuUser": round(e, 2), "native": n and round(n, 2)} for s, e, n in results],
                      "pyc": pyc}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
