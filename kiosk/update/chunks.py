"""Shipping only what changed: RAUC's casync bundles (notes/ab-update.md, "Shipping less").

`rauc convert` turns the signed verity bundle into a signed verity bundle of ~0.5 MiB that carries a
casync index (rootfs.ext4.caibx: the SHA-512/256 of every ~64 KiB content-defined chunk of the root
filesystem) instead of the filesystem, and a chunk store beside it here. On the device, `rauc install`
checks that bundle's signature as for any bundle and runs `casync extract --seed <booted slot>`: every
chunk the running slot already has is read from it, the others are fetched from the store, and casync
checks each chunk, read or fetched, against its id in the signed index before writing it.

The device reaches the store at the fixed address its system.conf names (kiosk.image.grub
RAUC_CHUNK_STORE: 127.0.0.1 on the device), which `ssh -R` forwards to ChunkServer here for the length of
the install: a small read-only HTTP server bound to this machine's loopback, answering chunk paths only.
"""

from __future__ import annotations

from kiosk.builders.chunkstore import PROBE_ANSWER, PROBE_PATH
from kiosk.core.errors import KioskError
from kiosk.core.paths import RAUC_CHUNK_PORT

# On the device, before `rauc install`: the forwarded store answers (the forward is this ssh session's own,
# so another listener on the device's port cannot pass for it: it would not give this answer).
WAIT_FOR_STORE = (
    "python3 -c 'import sys, time, urllib.request\n"
    "for _ in range(40):\n"
    "    try:\n"
    f"        if urllib.request.urlopen(\"http://127.0.0.1:{RAUC_CHUNK_PORT}{PROBE_PATH}\", timeout=5).read() "
    f"== b\"{PROBE_ANSWER.decode().strip()}\\n\":\n"
    "            sys.exit(0)\n"
    "    except OSError:\n"
    "        pass\n"
    "    time.sleep(0.5)\n"
    f"sys.exit(\"the chunk store forwarded to 127.0.0.1:{RAUC_CHUNK_PORT} does not answer\")\n'")


def forwarded(ssh: list[str], port: int) -> list[str]:
    """The ssh argv (kiosk.net.reach, ending `-- HOST`) with the device's store port forwarded to `port` here;
    ssh gives up rather than run the command when the device refuses the forward."""
    if len(ssh) < 2 or ssh[-2] != "--":
        raise KioskError("internal: the ssh command line does not end with -- HOST")
    return [*ssh[:-2], "-o", "ExitOnForwardFailure=yes", "-R", f"127.0.0.1:{RAUC_CHUNK_PORT}:127.0.0.1:{port}",
            *ssh[-2:]]
