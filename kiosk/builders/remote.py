"""`kiosk build --builder HOST`: the image is built on a bigger machine and comes back checksummed."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

from kiosk.builders.client import RemoteError, exchange
from kiosk.builders.ssh import BuilderFailure, connect_timeout, remote_command, transfer_timeout
from kiosk.builders.wire import PROTOCOL, BadAnswer
from kiosk.config.signing import signing_key
from kiosk.core.errors import KioskError, UsageError
from kiosk.core.files import write_json
from kiosk.core.paths import setting

NOTHING_WRITTEN = "nothing was written"


def parse_target(text: str) -> tuple[str | None, str, int | None]:
    """[USER@]HOST[:PORT] (IPv6 as [ADDR]:PORT) -> (user, host, port)."""
    match = re.match(r"^(?:([a-z_][a-z0-9_.-]*)@)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*)(?::(\d{1,5}))?$",
                     text or "")
    if not match:
        raise UsageError(f"--builder {text!r}: not a builder address",
                         hint="give [USER@]HOST[:PORT], e.g. me@build-box or build-box:2222")
    user, host, port = match.groups()
    port_number = int(port) if port else None
    if port_number is not None and not 1 <= port_number <= 65535:
        raise UsageError(f"--builder {text!r}: the port must be 1-65535")
    return user, host.strip("[]"), port_number


def _ssh_argv(user: str | None, host: str, port: int | None) -> list[str]:
    # KIOSK_SSH_COMMAND (like GIT_SSH_COMMAND): another ssh, or extra options, e.g. "ssh -i ~/.ssh/build_key"
    argv = [*shlex.split(setting("KIOSK_SSH_COMMAND", "ssh")), "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={max(1, round(connect_timeout()))}",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4", "-o", "RequestTTY=no"]
    if port:
        argv += ["-p", str(port)]
    if user:
        argv += ["-l", user]
    return argv + ["--", host, *remote_command()]


def _fetch(argv: list[str], request: dict, incoming: Path, where: str) -> tuple[dict, dict[str, Path]]:
    """The builder's answer, or one error saying what went wrong and that nothing was written."""
    try:
        return exchange(argv, request, incoming, relay=lambda line: print(line, file=sys.stderr, flush=True),
                        timeout=transfer_timeout())
    except BuilderFailure as failure:
        raise KioskError(f"builder {where} {failure.kind}: {failure}", hint=NOTHING_WRITTEN) from None
    except BadAnswer as exc:
        raise KioskError(f"REFUSED what {where} sent: {exc}", hint=NOTHING_WRITTEN) from None
    except RemoteError as exc:
        if exc.exit_code == 2:
            raise UsageError(f"{where} refused the spec:\n{exc}") from None
        raise KioskError(f"the build on {where} failed: {exc}", hint=NOTHING_WRITTEN) from None
    except KioskError as exc:
        raise KioskError(f"the build on {where} failed: {exc}", hint=NOTHING_WRITTEN) from None


def remote_build(args) -> int:
    """The builder runs `kiosk build` on this spec; the image, its .bmap, manifest.json and SBOM come
    back checksummed (the image sparse), then are renamed into place."""
    from kiosk.spec import load as specmod
    from kiosk.spec.commands import print_warnings

    path = Path(args.spec)
    spec = specmod.load(path)
    print_warnings(spec)
    text = spec.text   # as loaded: what validation saw, without a byte-order mark
    user, host, port = parse_target(args.builder)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    request = {"kiosk": PROTOCOL, "op": "build", "spec": text, "source": path.name,
               "verbose": bool(getattr(args, "verbose", False)), "upgrade": bool(getattr(args, "upgrade", False))}
    where = f"{user + '@' if user else ''}{host}{':' + str(port) if port else ''}"
    print(f"==> building on {where}", file=sys.stderr, flush=True)
    # The image trusts this user's update key, never the builder's own (kiosk.config.signing).
    say = lambda m: print(f"    {m}", file=sys.stderr, flush=True)   # noqa: E731
    request["updateCertificate"] = signing_key(log=say).cert.read_text()
    started = time.monotonic()
    incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=out_dir))
    try:
        header, files = _fetch(_ssh_argv(user, host, port), request, incoming, where)
        image_name = header.get("image")
        placed = {}
        for name, file_path in sorted(files.items(), key=lambda kv: kv[0] == image_name):  # the image last
            os.chmod(file_path, 0o600 if name.endswith(".builder") else 0o644)  # an older builder's shared key
            os.replace(file_path, out_dir / name)
            placed[name] = out_dir / name
        manifest_path = placed.get("manifest.json")
        manifest = json.loads(manifest_path.read_text()) if manifest_path else {}
        if manifest:
            image = out_dir / Path(manifest["image"]).name
            manifest.update(image=str(image), bmap=str(image) + ".bmap",
                            sbom=str(out_dir / Path(manifest.get("sbom", "")).name), builtOn=where)
            write_json(manifest_path, manifest)
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    image = out_dir / (image_name or "")
    print(f"{image}\n  sha256 {manifest.get('imageSha256', '')}\n  block map {image}.bmap\n"
          f"  built on {where} and fetched in {time.monotonic() - started:.0f}s (checksums verified); "
          f"write it with: kiosk flash {image} /dev/mmcblk0")
    return 0
