"""Byte-compiling a foreign root's Python natively: this machine's python3.11 stands in for the target's.

In a cold arm64 or armel base, the maintainer scripts' byte-compiling (py3compile of each python3-*
package, and python3.11's own compile of its standard library, plain and -O) runs under qemu-user:
one emulated interpreter start per package and every file compiled by emulated code, 30-90 s of a
~7 minute build (notes/image.md, "The cold build"). A .pyc is the same bytes whatever CPU made it,
given the same Python (checked on all 890 .pyc of an arm64 tree: bench/foreign.py).

So while packages are installed, the target's /usr/bin/python3.11 is diverted (as update-initramfs is)
to a small script that runs this machine's /usr/bin/python3.11 through its own loader and libraries,
copied into the tree under /usr/lib/kiosk-build, against the tree's own standard library; the
emulated interpreter runs instead when the upstream versions of python3.11-minimal differ. The
diversion and the copies are removed at the end: the device gets its own interpreter back, and
the tree is what an emulated build gives (tested cold against one: notes/image.md).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from kiosk.core.errors import KioskError
from kiosk.core.run import run

PYTHON = "/usr/bin/python3.11"
PACKAGE = "python3.11-minimal"
BUILD_DIR = "/usr/lib/kiosk-build"   # in the tree, removed at the end

_WRAPPER = """#!/bin/sh
# kiosk: python3.11 is diverted while the image is built: the build machine's own python3.11 (the same
# upstream version, checked on the first call) byte-compiles natively; the device gets its own back.
k={build}
if [ ! -e $k/verdict ]; then
    t=$(dpkg-query -W -f='${{Version}}' {package} 2>/dev/null)
    if [ "${{t%%-*}}" = {upstream} ]; then v=native; else v=emulated; fi
    echo $v > $k/verdict
fi
read v < $k/verdict
if [ "$v" = native ]; then
    exec $k/ld.so --library-path $k/lib $k/python3.11 "$@"
fi
exec {python}.kiosk-real "$@"
"""


def host_version() -> str | None:
    """This machine's Debian version of python3.11-minimal when its /usr/bin/python3.11 can stand in."""
    if not os.access(PYTHON, os.X_OK):
        return None
    try:
        result = run(["dpkg-query", "-W", "-f=${Version}", PACKAGE], check=False, what="asking dpkg for python3.11")
    except KioskError:   # no dpkg here: the target's own interpreter does it, emulated
        return None
    version = result.stdout.strip()
    return version if result.returncode == 0 and version else None


def upstream(version: str) -> str:
    """3.11.2 of Debian's 3.11.2-6+deb12u8: what makes the bytecode (the compiler and the .pyc format).
    Debian's revisions of one upstream version patch modules, not the compiler: an arm64 tree of
    3.11.2-6+deb12u8 byte-compiled by this machine's 3.11.2-6+deb12u6 gave the same .pyc (notes/image.md)."""
    return version.split("-", 1)[0]


def _libraries() -> tuple[str, list[str]]:
    """(the loader, the shared libraries) /usr/bin/python3.11 needs here, from ldd."""
    loader, libs = "", []
    for line in run(["ldd", PYTHON], what="listing python3.11's libraries").stdout.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libs.append(parts[2])
        elif parts and parts[0].startswith("/"):
            loader = parts[0]
    return loader, libs


def hooks(version: str) -> tuple[list[str], list[str]]:
    """(hooks that put this machine's python3.11 in for the target's, hooks that take it out again):
    mmdebstrap hook commands ("$1" is the tree), the first before any package could byte-compile."""
    loader, libs = _libraries()
    q = shlex.quote
    build = BUILD_DIR
    wrapper = _WRAPPER.format(build=build, package=PACKAGE, upstream=q(upstream(version)), python=PYTHON)
    put = [
        f"mkdir -p \"$1\"{build}/lib && cp -L {q(PYTHON)} \"$1\"{build}/python3.11 && "
        f"cp -L {q(loader)} \"$1\"{build}/ld.so && cp -L {' '.join(q(lib) for lib in libs)} \"$1\"{build}/lib/",
        f"chroot \"$1\" dpkg-divert --quiet --local --rename --divert {PYTHON}.kiosk-real --add {PYTHON}",
        f"printf '%s' {q(wrapper)} > \"$1\"{PYTHON} && chmod 755 \"$1\"{PYTHON}",
    ]
    take = [
        f"if [ \"$(cat \"$1\"{build}/verdict 2>/dev/null)\" = native ]; then echo 'I: kiosk: Python in the maintainer "
        f"scripts ran natively (python3.11 {version} of the build machine)'; fi",
        f"rm -f \"$1\"{PYTHON} && chroot \"$1\" dpkg-divert --quiet --local --rename "
        f"--divert {PYTHON}.kiosk-real --remove {PYTHON} && rm -rf \"$1\"{build}",
    ]
    return put, take
