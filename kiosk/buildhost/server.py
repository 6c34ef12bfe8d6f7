"""`kiosk builder-serve`: one request on stdin (probe, packages, build), one answer on stdout.

Progress goes to stderr, each line marked (wire.MARK) so the device tells it from ssh's own and
relays it to `git push`. Any failure becomes an answer with ok=false and a sentence, never a
traceback: the device logs it and tries the next builder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from kiosk import __version__
from kiosk.builders.apt import fetch_packages
from kiosk.builders.select import ARCHITECTURES
from kiosk.builders.wire import FILE_NAME, MARK, MAX_REQUEST, PROTOCOL, answer, tar_add
from kiosk.config.signing import certificate_fingerprint
from kiosk.core import paths
from kiosk.core.errors import InvalidSpec, KioskError, UsageError, one_line
from kiosk.core.log import Log
from kiosk.core.files import human_size, sha256_file
from kiosk.core.run import run


class _Progress:
    """Progress lines for the device (stderr, prefixed so they are told apart from ssh's own)."""

    def __init__(self, stream):
        self.stream = stream

    def __call__(self, text: str) -> None:
        for line in str(text).splitlines() or [""]:
            with contextlib.suppress(OSError, ValueError):
                self.stream.write(f"{MARK}{line}\n")
                self.stream.flush()


class _RelayText:
    """A text stream for the image build's stage log whose lines become progress lines."""

    def __init__(self, progress: _Progress):
        self.progress = progress
        self.buffer = ""

    def write(self, text: str) -> int:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self.progress(line)
        return len(text)

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def _job_slot(max_jobs: int, progress):
    """At most maxJobs builds at once on this builder (as the spec describes it)."""
    base = paths.cache_dir() / "builder" / "jobs"
    base.mkdir(parents=True, exist_ok=True)
    fds = []
    try:
        for i in range(max(1, min(max_jobs, 256))):
            fd = os.open(base / f"slot-{i}", os.O_RDWR | os.O_CREAT, 0o644)
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                yield
                return
            except BlockingIOError:
                continue
        progress(f"waiting for a free job slot ({max_jobs} at a time on this builder)")
        fcntl.flock(fds[os.getpid() % len(fds)], fcntl.LOCK_EX)
        yield
    finally:
        for fd in fds:
            os.close(fd)


def probe() -> dict:
    """What this machine can do as a builder."""
    from kiosk.image.rootfs import host_arch

    apt = shutil.which("apt-get")
    version = None
    if apt:
        out = run([apt, "--version"], check=False).stdout
        version = out.splitlines()[0] if out else "apt"
    host = host_arch() if shutil.which("dpkg") else None
    images = []
    if shutil.which("mmdebstrap") and host:
        for arch in ARCHITECTURES:
            if arch == host or (shutil.which("arch-test") and run(["arch-test", arch], check=False).returncode == 0):
                images.append(arch)
    cache = paths.cache_dir()
    existing = next(p for p in [cache, *cache.parents] if p.exists())
    return {"ok": True, "apt": version, "hostArchitecture": host,
            "architectures": list(ARCHITECTURES) if apt else [],
            "imageArchitectures": images, "freeBytes": shutil.disk_usage(existing).free,
            "cpus": os.cpu_count(), "load1": round(os.getloadavg()[0], 2)}


def _corrupt(path: Path) -> None:
    """Tests only (KIOSK_BUILDER_TEST_CORRUPT): one bit flipped, so the device must notice."""
    data = bytearray(path.read_bytes())
    if data:
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))


def _builder_tmp() -> Path:
    path = paths.cache_dir() / "builder" / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


def serve_packages(req: dict, out, progress) -> None:
    """Resolve and download what the device lacks; answer with the .debs in apt's install order."""
    work = Path(tempfile.mkdtemp(prefix="serve-", dir=_builder_tmp()))
    try:
        entries = fetch_packages(req, work, progress)
        corrupt = paths.setting("KIOSK_BUILDER_TEST_CORRUPT", "")
        compression = "xz" if req.get("compression") == "xz" else "none"
        payload = work / "payload.tar"
        with tarfile.open(payload, "w:xz" if compression == "xz" else "w", format=tarfile.PAX_FORMAT,
                          **({"preset": 6} if compression == "xz" else {})) as tar:
            for i, entry in enumerate(entries):
                source = entry["path"]
                if corrupt == "deb" and i == 0:  # test hook: the manifest says one thing, the tar holds another
                    source = work / entry["name"]
                    shutil.copyfile(entry["path"], source)
                    _corrupt(source)
                tar_add(tar, source, entry["name"])
        header = {"ok": True,
                  "files": [{k: e[k] for k in ("name", "package", "version", "architecture", "size", "sha256")}
                            for e in entries],
                  "install": [e["name"] for e in entries],
                  "payload": {"bytes": payload.stat().st_size, "sha256": sha256_file(payload),
                              "compression": compression}}
        if corrupt == "payload":  # test hook: damaged after the checksum was taken
            _corrupt(payload)
        progress(f"sending {len(entries)} .deb(s), {human_size(header['payload']['bytes'])} "
                 f"({compression if compression != 'none' else 'uncompressed'} tar)")
        answer(out, header, payload)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _request_spec(req: dict, progress):
    """The spec a build request carries, read as `kiosk build` reads a file (its warnings relayed)."""
    from kiosk.spec import load as specmod

    text = req.get("spec")
    if not isinstance(text, str):
        raise UsageError("the request carries no spec")
    source = req.get("source") if isinstance(req.get("source"), str) else "nixiosk.json"
    spec = specmod.loads(text, source)   # drops a byte-order mark; spec.text is what the image stores
    for warning in spec.warnings:
        progress(f"{source}: warning: {warning}")
    return spec


def _build(spec, req: dict, cert: str | None, work: Path, progress) -> tuple[Path, dict]:
    """kiosk build's pipeline for spec into work/out, its stages relayed: (out_dir, manifest)."""
    from kiosk.image.pipeline import build

    out_dir = work / "out"
    out_dir.mkdir()
    relay = _RelayText(progress)  # the build's `==> stage` lines reach the device as progress
    manifest = build(spec, spec.text, out_dir, verbose=bool(req.get("verbose")), log=Log(out=relay),
                     update_cert=cert, upgrade=bool(req.get("upgrade")))
    return out_dir, manifest


def _send_files(out, out_dir: Path, names: list[str], work: Path, progress, *, digests=None, **header) -> None:
    """names (files of out_dir) as a sparse tar with a sha256 each (from digests when known); header's fields join
    the answer's."""
    digests = digests or {}
    entries = [{"name": name, "size": (out_dir / name).stat().st_size,
                "sha256": digests.get(name) or sha256_file(out_dir / name)} for name in names]
    payload = work / "payload.tar"
    run(["tar", "--sparse", "--format=posix", "--owner=0", "--group=0", "--numeric-owner",
         "-C", out_dir, "-cf", payload, "--", *names], what="packing the answer for the device")
    header = {"ok": True, "files": entries, **header,
              "payload": {"bytes": payload.stat().st_size, "sha256": sha256_file(payload), "compression": "none"}}
    if paths.setting("KIOSK_BUILDER_TEST_CORRUPT") == "payload":
        _corrupt(payload)
    progress(f"sending {len(entries)} files, {human_size(header['payload']['bytes'])} (sparse tar)")
    answer(out, header, payload)


def serve_build(req: dict, out, progress) -> None:
    """Build the image of the spec in the request here; answer with the image, .bmap, manifest, SBOM."""
    spec = _request_spec(req, progress)
    cert = req.get("updateCertificate")
    # An image trusts one update key: the requester's. Built with this builder's own, the device would take
    # updates from the builder's owner and refuse its own user's.
    if not isinstance(cert, str):
        raise UsageError(f"{spec.data['hardware']} images trust the update key of whoever asked for them, "
                         "and the request carries no certificate",
                         hint="update kiosk on the machine that asked (it sends updateCertificate)")
    certificate_fingerprint(cert)
    with _job_slot(int(req.get("maxJobs") or 1), progress):
        work = Path(tempfile.mkdtemp(prefix="build-", dir=_builder_tmp()))
        try:
            # An older kiosk sends "builderKey" (the key its images shared): ignored, images carry no key now.
            out_dir, manifest = _build(spec, req, cert, work, progress)
            names = sorted(p.name for p in out_dir.iterdir() if p.is_file() and FILE_NAME.match(p.name))
            image_name = Path(manifest["image"]).name
            _send_files(out, out_dir, names, work, progress, image=image_name,
                        digests={image_name: manifest["imageSha256"]})
        finally:
            shutil.rmtree(work, ignore_errors=True)


def serve_bundle(req: dict, out, progress) -> None:
    """A device's new system (a push that changes it): the spec's image built here, its root in an update
    bundle signed with this builder's update key, which must be the one the device trusts (the request's
    updateCertificate): the device's RAUC would refuse any other, after the whole transfer."""
    from kiosk.config.signing import fingerprint, signing_key
    from kiosk.image.bundle import make_bundle

    spec = _request_spec(req, progress)
    cert = req.get("updateCertificate")
    if not isinstance(cert, str):
        raise UsageError("the request carries no update certificate (the one the device trusts)")
    trusted = certificate_fingerprint(cert)
    key = signing_key(create=False)
    own = fingerprint(key.cert)
    if own != trusted:
        raise KioskError(f"this builder signs updates with another key ({own[:23]}...) than the "
                         f"device trusts ({trusted[:23]}...)",
                         hint=f"build for the device on the machine whose kiosk made its image, or copy that "
                              f"machine's {key.cert.parent} here (0700)")
    with _job_slot(int(req.get("maxJobs") or 1), progress):
        work = Path(tempfile.mkdtemp(prefix="bundle-", dir=_builder_tmp()))
        try:
            out_dir, manifest = _build(spec, req, cert, work, progress)
            version = manifest["imageSha256"][:16]
            progress(f"==> bundle (system {version})")
            make_bundle(Path(manifest["image"]), out_dir / "update.raucb", board=spec.data["hardware"],
                        version=version, description=f"kiosk system of {spec.data['hostName']}", key=key,
                        log=progress)
            extra = {}
            if req.get("chunks") is True:   # the device has casync: the index bundle, its chunks kept here
                extra = _keep_chunks(out_dir / "update.raucb", key, version, progress)
            names = ["update.raucb", "manifest.json"]
            _send_files(out, out_dir, names, work, progress, version=version,
                        packages=manifest.get("packages") or [], **extra)
        finally:
            shutil.rmtree(work, ignore_errors=True)


KEEP_STORES = 2   # chunk stores always kept (each about the size of a whole bundle)...
KEEP_STORE_SECONDS = 6 * 3600   # ...and any other used this recently (a device may still be installing from it)


def _stores() -> Path:
    path = paths.cache_dir() / "builder" / "chunk-stores"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _keep_chunks(bundle: Path, key, version: str, progress) -> dict:
    """bundle becomes its casync index bundle (same name, same signer); the chunks move to this builder's
    chunk-stores/<version> for the device's `chunks` session: the answer's fields that name them."""
    from kiosk.image.bundle import make_chunked, store_size

    whole = bundle.stat().st_size
    index, store = make_chunked(bundle, key, log=progress)
    index.replace(bundle)
    kept = _stores() / version
    shutil.rmtree(kept, ignore_errors=True)
    store.rename(kept)
    os.utime(kept)
    prune_stores()
    count, size = store_size(kept)
    return {"chunkStore": version, "chunks": {"count": count, "bytes": size, "wholeBundle": whole}}


def prune_stores() -> None:
    """Chunk stores beyond the KEEP_STORES newest that no device has used for KEEP_STORE_SECONDS."""
    now = time.time()
    for old in sorted(_stores().iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)[KEEP_STORES:]:
        if now - old.stat().st_mtime > KEEP_STORE_SECONDS:
            shutil.rmtree(old, ignore_errors=True)


def serve_chunks(req: dict, stdin, out, progress) -> None:
    """A device installing an index bundle from serve_bundle: each line it sends names a chunk ("abcd/<id>"),
    each answer is "<size>\n" and the chunk's bytes, or "-\n" when this store lacks it; until its stdin ends.
    casync on the device checks every chunk against the signed index, so nothing here is trusted there."""
    from kiosk.builders.chunkstore import chunk_name, store_reader

    version = req.get("store")
    store = _stores() / version if isinstance(version, str) and HEX16.match(version) else None
    if store is None or not store.is_dir():
        raise KioskError(f"this builder holds no chunks of system {one_line(str(version))[:40]} (it keeps the "
                         f"{KEEP_STORES} newest and those used in the last {KEEP_STORE_SECONDS // 3600} h)",
                         hint="push again: the builder builds it again")
    os.utime(store)   # in use: not pruned by the next bundles for KEEP_STORE_SECONDS
    read = store_reader(store)
    answer(out, {"ok": True})
    served = sent = 0
    while line := stdin.readline(256):
        name = chunk_name(line.decode("ascii", "replace").strip())
        data = read(name) if name else None
        if data is None:
            out.write(b"-\n")
        else:
            out.write(b"%d\n" % len(data) + data)
            served, sent = served + 1, sent + len(data)
        out.flush()
    progress(f"chunks: {served} sent, {human_size(sent)}")


HEX16 = re.compile(r"^[0-9a-f]{16}$")
_EXPECTED = "builder-serve takes one JSON request line, as kiosk on a device or `kiosk build --builder` sends it"


class BadRequest(UsageError):
    """The request line itself is not a request of this protocol: answered, then exit status 2."""


def read_request(stdin) -> dict:
    """The one request line (binary stream): at most MAX_REQUEST bytes of UTF-8 JSON, read with the limits
    every spec is read with (jsontext.parse_json: nesting, number size, no NaN) and no lone surrogates."""
    from kiosk.spec.jsontext import parse_json, value_problems

    line = stdin.readline(MAX_REQUEST + 1)
    if len(line) > MAX_REQUEST:
        raise BadRequest(f"the request is longer than {human_size(MAX_REQUEST)}", hint=_EXPECTED)
    if not line.strip():
        raise BadRequest("expected one JSON request line on stdin, got none", hint=_EXPECTED)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the request is not UTF-8 text (bad byte at offset {exc.start})", hint=_EXPECTED) from None
    try:
        req = parse_json(text, "request", max_bytes=MAX_REQUEST)
    except InvalidSpec as exc:
        raise BadRequest(_first_problem(exc.problems, "is not JSON"), hint=_EXPECTED) from None
    if not isinstance(req, dict):
        raise BadRequest("the request is not a JSON object", hint=_EXPECTED)
    problems, _ = value_problems(req)
    if problems:
        raise BadRequest(_first_problem(problems, "cannot be read"), hint=_EXPECTED)
    if req.get("kiosk") != PROTOCOL:
        theirs = one_line(repr(req.get("kiosk")))[:40]
        raise BadRequest(f"this builder speaks protocol {PROTOCOL} (kiosk {__version__}), the request {theirs}",
                         hint="install the same kiosk version on both")
    return req


def _first_problem(problems, fallback: str) -> str:
    if not problems:
        return f"the request {fallback}"
    first = problems[0]
    return one_line(f"the request at {first.pointer or '/'}: {first.message}")


def serve(stdin, stdout, stderr) -> int:
    """One request on stdin, one answer on stdout; the answer says whether it worked (exit status 0). A
    `chunks` request then goes on answering chunk names until stdin ends.

    A request that is not one (not JSON, too long, too deep, another protocol) is answered the same
    way and then raised (one line on stderr, exit status 2): nothing was attempted."""
    progress = _Progress(stderr)
    try:
        req = read_request(stdin)
        op = req.get("op")
        if op == "probe":
            answer(stdout, probe())
        elif op == "packages":
            serve_packages(req, stdout, progress)
        elif op == "build":
            serve_build(req, stdout, progress)
        elif op == "bundle":
            serve_bundle(req, stdout, progress)
        elif op == "chunks":
            serve_chunks(req, stdin, stdout, progress)
        else:
            raise BadRequest(f"unknown request {one_line(repr(op))[:60]}",
                             hint="probe, packages, build, bundle or chunks")
    except BadRequest as exc:
        answer(stdout, {"ok": False, "error": str(exc), "exitCode": exc.exit_code})
        raise
    except KioskError as exc:
        answer(stdout, {"ok": False, "error": str(exc), "exitCode": exc.exit_code})
    except Exception as exc:  # the device gets a sentence, never a traceback
        answer(stdout, {"ok": False, "error": f"internal error on the builder: {type(exc).__name__}: {exc}"})
    return 0
