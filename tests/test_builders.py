"""Remote builders (issue 8): a device asking its builders in order over real OpenSSH (failover, refusals,
the authorize hint), a builder's answer verified, `kiosk builders check`, the device's key. The request
here is the cheap `packages` one (devices made before root slots still send it: .debs resolved by the
builder's apt, installed with dpkg into the device root); the `bundle` request of a system push goes
through the same loop, built for real in tests/test_system_trial.py.

Builders are real sshd instances on loopback (tests/sshd_harness.Device: a throwaway sshd whose sessions
have this checkout's `kiosk` on PATH), authorized with `kiosk builders authorize` (forced command); one is
stopped where a test needs a builder down. The device is the push harness's device root plus a dpkg
database made by dpkg itself, prepared by prepare_device_for_builders as the image build does; its own
builder key is made by `kiosk builders key`, as on a device after its first boot. Packages are tiny real .debs in an unsigned archive served over HTTP (tests/builders_fixture.py).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import stat
import sys
import subprocess
import tarfile
import threading
import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from builders_fixture import debs_from_builders, dpkg_installed, init_dpkg, write_archive
from conftest import kiosk_cli
from fake_mirror import Server
from sshd_harness import Client, Device, free_port, keygen, remote_lines, snapshot

from kiosk.builders.keys import ensure_device_key, prepare_device_for_builders, ssh_config_text
from kiosk.builders.remote import parse_target
from kiosk.builders.select import Builder, effective_builders, known_hosts_text
from kiosk.builders.ssh import ssh_problem
from kiosk.builders.wire import BadAnswer, receive_payload
from kiosk.core.errors import Refused, UsageError
from kiosk.core.files import write_in_root
from kiosk.core.paths import BUILDER_KEY

EPOCH = 1700000000
ARCH = {"raspberryPi0": "armel", "raspberryPi3": "arm64", "qemu": "amd64"}


# ---------------------------------------------------------------- fixtures

def kiosk_argv() -> list[str]:
    """The real `kiosk` command (for runs that need a timeout, which kiosk_cli has not)."""
    return [shutil.which("kiosk", path=str(Path(sys.executable).parent)) or "kiosk"]


@pytest.fixture(scope="session")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("builder-archive")
    debs = write_archive(root)
    server = Server(root)
    yield SimpleNamespace(url=server.url, debs=debs, root=root)
    server.close()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("builder-keys")
    out = {}
    for name in ("client", "device_host", "b1", "b2", "stranger"):
        out[name] = tmp / f"{name}_ed25519"
        out[name + "_pub"] = keygen(out[name], f"{name}@test")
    return out


def device_spec(archive, keys, builders_=(), hardware="raspberryPi0", **extra) -> dict:
    spec = {"hostName": "lobby", "hardware": hardware, "authorizedKeys": [keys["client_pub"]],
            "program": {"package": "kiosk-test-kiosk", "executable": "/usr/bin/kiosk-test-kiosk"},
            "debian": {"suite": "bookworm", "mirror": archive.url,
                       "security": False, "updates": False}}   # the test archive has no -security/-updates
    if builders_:
        spec["builders"] = list(builders_)
    spec.update(extra)
    return spec


class Lab:
    """Builders (sshd, some stopped), a device root with dpkg and the builder key, a pusher's clone."""

    def __init__(self, tmp: Path, archive, keys, builder_descs: list[dict], hardware="raspberryPi0"):
        self.tmp, self.archive, self.keys, self.hardware = tmp, archive, keys, hardware
        self.arch = ARCH[hardware]
        self.servers: list[Device] = []
        self.builders: list[dict] = []
        plain = device_spec(archive, keys, hardware=hardware)
        for i, desc in enumerate(builder_descs, 1):
            directory = tmp / f"b{i}"
            directory.mkdir()
            env = {"KIOSK_TEST_UNSIGNED_MIRROR": "1", **desc.get("env", {})}
            server = Device(directory, plain, keys["client_pub"], keys[f"b{i}"], env=env)
            self.servers.append(server)
            if not desc.get("up", True):
                server.close()  # stopped: nothing listens on its port any more
            pin = keys["stranger_pub"] if desc.get("wrong_host_key") else keys[f"b{i}_pub"]
            self.builders.append({"hostName": desc.get("host", "127.0.0.1"), "port": server.port,
                                  "publicHostKey": pin, "speedFactor": desc.get("speed", 1)})
        self.spec = device_spec(archive, keys, self.builders, hardware=hardware)
        directory = tmp / "dev"
        directory.mkdir()
        self.device = Device(directory, self.spec, keys["client_pub"], keys["device_host"],
                             env={"KIOSK_TEST_UNSIGNED_MIRROR": "1", "KIOSK_BUILDER_CONNECT_TIMEOUT": "3"})
        self.root = self.device.root
        init_dpkg(self.root, self.arch, [archive.debs[("kiosk-test-kiosk", self.arch)]])
        self.out = tmp / "out"
        self.build_log: list[str] = []
        prepare_device_for_builders(self.root, self.spec, self.out, self.build_log.append, epoch=EPOCH)
        # after its first boot: the device makes its own key (the current generation's spec says where)
        r = kiosk_cli("builders", "key", "--root", str(self.root))
        assert r.returncode == 0, r.stderr
        self.public = r.stdout.strip()
        self.pub = tmp / "device_builder_key.pub"
        self.pub.write_text(self.public + "\n")
        for server, desc in zip(self.servers, builder_descs):
            if desc.get("up", True) and desc.get("authorize", True):
                r = kiosk_cli("builders", "authorize", "--key", "-",
                              "--authorized-keys", str(server.tmp / "authorized_keys"), input=self.public)
                assert r.returncode == 0, r.stderr
        (tmp / "client").mkdir()
        self.client = Client(tmp / "client", keys["client"], keys["device_host_pub"], self.device.port)
        self.clone = self.client.clone(self.device.url, "clone")
        self.spec_file = tmp / "nixiosk.json"
        self.spec_file.write_text(json.dumps(self.spec, indent=2) + "\n")

    def label(self, i: int) -> str:
        return f"{self.builders[i]['hostName']}:{self.builders[i]['port']}"

    def push(self, **changes) -> tuple[subprocess.CompletedProcess, list[str]]:
        data = json.loads((self.clone / "nixiosk.json").read_text())
        data.update(changes)
        self.client.commit_spec(self.clone, data)
        r = self.client.push(self.clone)
        return r, remote_lines(r.stderr)

    def connections(self, i: int) -> int:
        log = self.servers[i].log
        return log.read_text().count("Connection from") if log.exists() else 0

    def close(self) -> None:
        for server in [*self.servers, self.device]:
            server.close()


@pytest.fixture
def lab(tmp_path, archive, keys):
    made = []

    def make(descs, hardware="raspberryPi0") -> Lab:
        directory = tmp_path / f"lab{len(made)}"
        directory.mkdir()
        made.append(Lab(directory, archive, keys, descs, hardware))
        return made[-1]

    yield make
    for one in made:
        one.close()


# ---------------------------------------------------------------- the spec's builders (no root, no network)

def test_effective_builders_defaults_order_and_local_system():
    spec = {"hardware": "raspberryPi0", "builders": [
        {"hostName": "slow.example"},
        {"hostName": "fast.example", "speedFactor": 4, "port": 2222, "sshUser": "kiosk", "systems": ["aarch64-linux"]},
        {"hostName": "also-slow.example", "speedFactor": 1},
    ], "localSystem": {"system": "x86_64-linux", "sshUser": "me", "hostName": "laptop.local"}}
    found = effective_builders(spec)
    assert [b.hostName for b in found] == ["fast.example", "slow.example", "also-slow.example", "laptop.local"]
    fast = found[0]
    assert (fast.port, fast.sshUser, fast.systems, fast.speedFactor, fast.label) == \
        (2222, "kiosk", ("arm64",), 4.0, "fast.example:2222")
    slow = found[1]
    assert (slow.port, slow.sshUser, slow.sshKey, slow.systems, slow.maxJobs, slow.publicHostKey) == \
        (22, "root", "/var/lib/kiosk/builder_ed25519", ("amd64", "arm64", "armel", "armhf"), 1, None)
    # Nixiosk's localSystem: its own system and the device it was named for (it cross-built for it)
    laptop = found[3]
    assert (laptop.sshUser, laptop.port, laptop.systems, laptop.origin) == \
        ("me", 22, ("amd64", "armel"), "/localSystem")
    assert effective_builders({"hardware": "qemu", "localSystem": {"system": None, "sshUser": None,
                                                                   "hostName": "b"}})[0].sshUser == "root"
    # null hostName: Nixiosk ignores localSystem
    assert effective_builders({"hardware": "qemu", "localSystem": {"system": "x86_64-linux",
                                                                   "sshUser": "me", "hostName": None}}) == []
    # the same machine in both: listed once
    same = {"hardware": "qemu", "builders": [{"hostName": "b", "sshUser": "me"}],
            "localSystem": {"system": "x86_64-linux", "sshUser": "me", "hostName": "b"}}
    assert len(effective_builders(same)) == 1


def test_known_hosts_and_ssh_config(keys):
    found = [Builder("b1.example", publicHostKey=keys["b1_pub"]),
             Builder("127.0.0.1", port=2222, publicHostKey=keys["b2_pub"]),
             Builder("unpinned.example")]
    b1_body = keys["b1_pub"].split()[1]
    assert known_hosts_text(found) == (f"b1.example ssh-ed25519 {b1_body}\n"
                                                f"[127.0.0.1]:2222 ssh-ed25519 {keys['b2_pub'].split()[1]}\n")
    config = ssh_config_text(found)
    assert "Host builder-2\n    HostName 127.0.0.1\n    Port 2222\n    User root\n" in config
    for line in ("StrictHostKeyChecking yes", "BatchMode yes", "ConnectTimeout 5",
                 "UserKnownHostsFile /etc/kiosk/builders_known_hosts", "IdentitiesOnly yes"):
        assert f"    {line}\n" in config


def test_ssh_problems_are_one_reason():
    cases = [
        ("ssh: connect to host b1 port 22: Connection refused", 255, "unreachable", "connection refused"),
        ("Host key verification failed.", 255, "refused", "its host key does not match publicHostKey"),
        ("root@127.0.0.1: Permission denied (publickey).", 255, "refused", "does not accept this device's key"),
        ("ssh: Could not resolve hostname nope: Name or service not known", 255, "unreachable", "unknown host"),
        ("sh: 1: kiosk: not found", 127, "failed", "kiosk is not installed there"),
    ]
    for stderr, code, kind, reason in cases:
        failure = ssh_problem(stderr, code)
        assert failure.kind == kind and reason in failure.reason, (stderr, failure.kind, failure.reason)


def test_parse_target():
    assert parse_target("me@build-box:2222") == ("me", "build-box", 2222)
    assert parse_target("build-box") == (None, "build-box", None)
    assert parse_target("[::1]:22") == (None, "::1", 22)
    for bad in ("", "me@", "host:99999", "a b", "-oProxyCommand=x"):
        with pytest.raises(UsageError):
            parse_target(bad)


# ---------------------------------------------------------------- the payload checks (no root, no network)

def _payload(files: dict[str, bytes], *, compression="none") -> tuple[dict, bytes]:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:xz" if compression == "xz" else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    body = raw.getvalue()
    header = {"files": [{"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()],
              "payload": {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest(), "compression": compression}}
    return header, body


FILES = {"a_1.0_armel.deb": b"A" * 3000 + os.urandom(3000), "b_1.0_all.deb": os.urandom(5000)}


@pytest.mark.parametrize("compression", ["none", "xz"])
def test_payload_received_and_checked(tmp_path, compression):
    header, body = _payload(FILES, compression=compression)
    got = receive_payload(io.BytesIO(body), header, tmp_path)
    assert {n: p.read_bytes() for n, p in got.items()} == FILES


def test_payload_damage_is_refused_and_nothing_is_left(tmp_path):
    header, body = _payload(FILES)

    def refused(stream_bytes, head=header) -> str:
        with pytest.raises(BadAnswer) as info:
            receive_payload(io.BytesIO(stream_bytes), head, tmp_path)
        assert list(tmp_path.iterdir()) == []  # every file written before the problem is gone
        return str(info.value)

    flipped = bytearray(body)
    flipped[len(body) // 3] ^= 1
    assert "checksum mismatch" in refused(bytes(flipped))
    assert "cut short after 100 of" in refused(body[:100])
    assert "more bytes than it announced" in refused(body + b"x")
    # the stream is intact but a file is not what the manifest says (a builder's damaged cache)
    lying = json.loads(json.dumps(header))
    lying["files"][0]["sha256"] = "0" * 64
    assert "a_1.0_armel.deb: checksum mismatch" in refused(body, lying)
    # names that could escape the directory, or files nobody announced
    evil_header, evil_body = _payload({"../evil.deb": b"x"})
    assert "bad or repeated file name" in refused(evil_body, evil_header)
    extra_header, extra_body = _payload(dict(FILES, **{"c.deb": b"c"}))
    extra_header["files"] = extra_header["files"][:2]
    assert "unexpected entry 'c.deb'" in refused(extra_body, extra_header)


def test_the_image_carries_no_builder_key_and_each_device_makes_its_own(tmp_path, archive, keys):
    """Issue 14: every card from one image shared the key baked into it. Now the image holds none (and
    rebuilds stay byte-identical without keeping a secret beside the image); each device makes its own."""
    data = device_spec(archive, keys, [{"hostName": "b1.example", "publicHostKey": keys["b1_pub"]},
                                       {"hostName": "b2.example", "port": 2222, "sshKey": "/etc/kiosk/other_key"}])
    spec = __import__("kiosk.spec.load", fromlist=["with_defaults"]).with_defaults(data)
    out = tmp_path / "out"
    logs = []
    trees = []
    for n in (1, 2):
        root = tmp_path / f"root{n}"
        root.mkdir()
        prepare_device_for_builders(root, spec, out, logs.append, epoch=EPOCH)
        trees.append(snapshot(root))
    assert trees[0] == trees[1]  # the same bytes, modes and owners
    assert sorted(trees[0]) == ["etc", "etc/kiosk", "etc/kiosk/builders_known_hosts", "etc/kiosk/builders_ssh_config"]
    assert not out.exists() or list(out.iterdir()) == []  # no key kept beside the image either
    root = tmp_path / "root1"
    assert (root / "etc/kiosk/builders_known_hosts").read_text() == \
        f"b1.example ssh-ed25519 {keys['b1_pub'].split()[1]}\n"
    assert (root / "etc/kiosk/builders_known_hosts").stat().st_mtime == EPOCH
    assert any("ssh root@lobby.local kiosk builders key | ssh USER@BUILDER kiosk builders authorize --key -" in line
               for line in logs)
    assert any("b2.example:2222 has no publicHostKey" in line for line in logs)

    # two cards written from that image: each makes its own key on the device, and keeps it
    spec_file = tmp_path / "nixiosk.json"
    spec_file.write_text(json.dumps(data))
    publics = []
    for n in (1, 2):
        r = kiosk_cli("builders", "key", str(spec_file), "--root", str(tmp_path / f"root{n}"))
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert len(lines) == 2 and all(line.endswith(" kiosk-builder@lobby") for line in lines)  # one per sshKey
        assert "made this device's builder key /var/lib/kiosk/builder_ed25519 (SHA256:" in r.stderr
        assert "ssh root@DEVICE kiosk builders key | ssh USER@BUILDER kiosk builders authorize --key -" in r.stderr
        publics.append(lines[0])
        for key_path in ("var/lib/kiosk/builder_ed25519", "etc/kiosk/other_key"):
            st = (tmp_path / f"root{n}" / key_path).stat()
            assert (oct(st.st_mode & 0o777), st.st_uid) == ("0o600", 0)
        again = kiosk_cli("builders", "key", str(spec_file), "--root", str(tmp_path / f"root{n}"))
        assert again.stdout.splitlines() == lines and "made" not in again.stderr
    assert publics[0] != publics[1]


def test_a_device_without_a_builder_key_makes_one_and_says_so(tmp_path):
    # the first push that needs a builder makes the key if nobody asked for it before
    logs = []
    key = ensure_device_key(tmp_path, BUILDER_KEY, logs.append, comment="kiosk-builder@lobby")
    assert key == tmp_path / "var/lib/kiosk/builder_ed25519"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    public = Path(str(key) + ".pub").read_text().strip()
    assert public.endswith(" kiosk-builder@lobby")
    assert len(logs) == 1 and logs[0].endswith(f"echo '{public}' | kiosk builders authorize --key -")
    assert ensure_device_key(tmp_path, BUILDER_KEY, logs.append) == key and len(logs) == 1


def test_a_key_at_the_old_default_moves_to_the_data_partition_and_stays_the_same_key(tmp_path):
    """The default used to be /etc/kiosk/builder_ed25519, in the root: on an A/B board a new slot has none,
    and the device made a new key its builders refused (seen in a booted system push). It moves to
    /var/lib/kiosk (the data partition on A/B boards), the same key, so its builders still accept it."""
    from kiosk.core.paths import LEGACY_BUILDER_KEY

    old = ensure_device_key(tmp_path, LEGACY_BUILDER_KEY, lambda line: None)
    private, public = old.read_bytes(), Path(str(old) + ".pub").read_text()
    logs = []
    key = ensure_device_key(tmp_path, BUILDER_KEY, logs.append)
    assert key == tmp_path / "var/lib/kiosk/builder_ed25519"
    assert key.read_bytes() == private and Path(str(key) + ".pub").read_text() == public
    assert oct(key.stat().st_mode & 0o777) == "0o600" and not old.exists()
    assert logs == ["moved this device's builder key from /etc/kiosk/builder_ed25519 to "
                    "/var/lib/kiosk/builder_ed25519 (kept across system updates)"]


def test_builder_key_paths_stay_inside_the_tree(tmp_path, archive, keys):
    """Issue 14, must fix 1: sshKey through a link in the tree (var/run -> /run), through a link planted
    at the key's parent, or with "..": refused with a line naming the field; nothing lands outside."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "var").mkdir(parents=True)
    (root / "etc").mkdir()
    outside.mkdir()
    (root / "var/run").symlink_to(outside)  # as in Debian (var/run -> /run), but to a stand-in for outside
    (root / "etc/kiosk").symlink_to(outside)  # planted at the old default key's parent
    spec_file = tmp_path / "nixiosk.json"

    def refused(key_path: str) -> list[str]:
        spec = {"hostName": "lobby", "hardware": "raspberryPi0",
                "builders": [{"hostName": "b1.example", "sshKey": key_path}]}
        out = []
        with pytest.raises(Refused) as at_build:  # not through the schema: the code itself refuses
            prepare_device_for_builders(root, spec, tmp_path / "out", lambda line: None, epoch=EPOCH)
        out.append(str(at_build.value))
        with pytest.raises(Refused) as on_device:
            ensure_device_key(root, key_path, lambda line: None)
        out.append(str(on_device.value))
        assert list(outside.iterdir()) == []
        return out

    for line in refused("/var/run/kiosk/key") + refused("/etc/kiosk/builder_ed25519"):
        assert "is a symbolic link in the tree (to " in line and "kiosk writes nothing through links" in line
    assert refused("/var/run/key")[0].startswith("/builders/0/sshKey: /var/run/key: /var/run is a symbolic link")
    for path in ("/../../../..", "/etc/../../outside/key", "/etc/kiosk/..//x"):
        for line in refused(path):
            assert '".."' in line
    # the file helper on its own: ".." and links on the way refused, a link at the name itself replaced
    for path in ("../outside/x", "var/run/x", "etc/kiosk/x"):
        with pytest.raises(Refused):
            write_in_root(root, path, b"x")
    (root / "etc/kiosk").unlink()
    (root / "etc/kiosk").mkdir()
    (outside / "victim").write_text("untouched\n")
    (root / "etc/kiosk/builder_ed25519").symlink_to(outside / "victim")
    write_in_root(root, "/etc/kiosk/builder_ed25519", b"new\n", 0o600)
    assert (outside / "victim").read_text() == "untouched\n"
    assert not (root / "etc/kiosk/builder_ed25519").is_symlink()
    assert (root / "etc/kiosk/builder_ed25519").read_bytes() == b"new\n"
    # a key path that is a link on the device is not used as a key
    (root / "etc/kiosk/other").symlink_to(outside / "victim")
    with pytest.raises(Refused, match="other than a regular file"):
        ensure_device_key(root, "/etc/kiosk/other", lambda line: None)
    # through the command, as on a device: one line, exit 2
    spec_file.write_text(json.dumps(device_spec(archive, keys, [{"hostName": "b1.example", "sshKey": "/var/run/key"}])))
    r = kiosk_cli("builders", "key", str(spec_file), "--root", str(root))
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert len(r.stderr.splitlines()) == 1 and "/var/run is a symbolic link" in r.stderr
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]


@pytest.mark.root
def test_authorize_refuses_anything_but_a_regular_file(tmp_path, keys):
    """Issue 14, must fix 9: --authorized-keys naming a device node replaced it with a regular file (with
    /dev/null, the host's). Only a regular file or a missing one is written; the rest: one line, exit 2."""
    pub = tmp_path / "device.pub"
    pub.write_text(keys["stranger_pub"] + "\n")
    null_twin = tmp_path / "null"
    os.mknod(null_twin, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a real character device: /dev/null's numbers
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "dir").mkdir()
    real = tmp_path / "real_authorized_keys"
    real.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKz8TW+EbveXB99APvO2as7Zf5s7nNHwyNFg1d798fnZ other\n")
    (tmp_path / "link").symlink_to(real)
    dev_null = os.stat("/dev/null")
    # /dev/null last, and only once its twin was refused: code that replaces device nodes (as before
    # the fix) fails this test at the twin without ever reaching the host's own /dev/null.
    cases = {str(null_twin): "a character device", str(fifo): "a FIFO", str(tmp_path / "dir"): "a directory",
             str(tmp_path / "link"): "a symbolic link (to ", "/dev/null": "a character device"}
    def state() -> dict:  # every entry's lstat (snapshot() would read the FIFO and wait for a writer)
        return {p.name: (lambda st: (st.st_mode, st.st_ino, st.st_rdev, st.st_size, st.st_mtime_ns))(p.lstat())
                for p in tmp_path.iterdir()}

    before = state()
    for target, kind in cases.items():
        r = subprocess.run([*kiosk_argv(), "builders", "authorize", "--key", str(pub), "--authorized-keys", target],
                           capture_output=True, text=True, timeout=30)  # a FIFO must not block
        assert r.returncode == 2, (target, r.stdout, r.stderr)
        assert r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
        assert r.stderr.startswith(f"kiosk: --authorized-keys {target}: {kind}"), r.stderr
    assert state() == before
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (dev_null.st_ino, dev_null.st_rdev)
    # a FIFO, a device or a directory given as the key is refused the same way, without reading from it
    # (kiosk.core.inputs.read_small; a directory was an internal error, IsADirectoryError)
    for key, kind in ((str(fifo), "a FIFO"), ("/dev/zero", "a character device"),
                      (str(tmp_path / "dir"), "a directory")):
        r = subprocess.run([*kiosk_argv(), "builders", "authorize", "--key", key, "--authorized-keys", str(real)],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
        assert r.stderr.startswith(f"kiosk: --key {key}: the key must be a regular file, not {kind}"), r.stderr
    # the link's target itself, and a file that does not exist yet, are fine
    r = kiosk_cli("builders", "authorize", "--key", str(pub), "--authorized-keys", str(real))
    assert r.returncode == 0, r.stderr
    assert real.read_text().splitlines()[1].endswith(keys["stranger_pub"])
    r = kiosk_cli("builders", "authorize", "--key", str(pub), "--authorized-keys", str(tmp_path / "new/keys"))
    assert r.returncode == 0 and (tmp_path / "new/keys").read_text().endswith(keys["stranger_pub"] + "\n")


def test_check_with_a_missing_image_dir_is_one_line(tmp_path, archive, keys):
    """Issue 14: `kiosk builders check --image-dir /nonexistent` printed thread tracebacks and exited 0."""
    spec = tmp_path / "nixiosk.json"
    spec.write_text(json.dumps(device_spec(archive, keys, [
        {"hostName": "127.0.0.1", "port": free_port(), "publicHostKey": keys["b1_pub"]},
        {"hostName": "localhost", "port": free_port(), "publicHostKey": keys["b2_pub"]}])))
    (tmp_path / "empty").mkdir()
    for image_dir, says in (("/nonexistent", "kiosk: --image-dir /nonexistent: no such directory; "),
                            (str(tmp_path / "empty"), f"kiosk: --image-dir: {tmp_path}/empty/lobby-raspberryPi0.img"
                                                      ".builder: no builder key there; ")):
        r = kiosk_cli("builders", "check", str(spec), "--image-dir", image_dir)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert r.stdout == "" and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
        assert r.stderr.startswith(says), r.stderr
    r = kiosk_cli("builders", "check", str(spec), "-i", str(tmp_path / "no-such-key"))
    assert r.returncode == 2 and r.stderr == f"kiosk: -i {tmp_path}/no-such-key: No such file or directory\n"


def test_remote_build_unreachable_builder_writes_nothing(tmp_path, archive, keys):
    spec = tmp_path / "nixiosk.json"
    spec.write_text(json.dumps(device_spec(archive, keys)))
    port = free_port()
    r = kiosk_cli("build", str(spec), "-o", str(tmp_path / "out"), "--builder", f"me@127.0.0.1:{port}",
                  env={"KIOSK_SSH_COMMAND": "ssh -F /dev/null"})
    assert r.returncode == 1
    assert f"kiosk: builder me@127.0.0.1:{port} unreachable: connection refused; nothing was written" in r.stderr
    assert list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------- a device asks its builders (root)

def ask_for_packages(lab, packages: list[str]) -> tuple[list[dict] | None, list[str]]:
    """The lab's device asks its builders for .debs (builders_fixture.debs_from_builders): (.debs, log)."""
    from kiosk.spec.load import loads

    lines: list[str] = []
    work = lab.tmp / "incoming"
    work.mkdir()
    try:
        entries = debs_from_builders(lab.root, loads(json.dumps(lab.spec), "nixiosk.json").data, packages, work,
                                     lines.append)
    finally:
        shutil.rmtree(work)
    return entries, lines


@pytest.mark.root
def test_the_next_builder_answers_when_the_first_is_down(lab):
    lab = lab([{"host": "localhost", "up": False, "speed": 2}, {"host": "127.0.0.1", "speed": 1}])
    assert dpkg_installed(lab.root) == {"kiosk-test-kiosk": "1.0"}
    entries, lines = ask_for_packages(lab, ["kiosk-test-hello"])
    assert entries is not None, lines
    # the faster builder is down: one line, and the next one is used
    assert lines[0] == f"builder {lab.label(0)} unreachable (connection refused); trying {lab.label(1)}..."
    b2 = lab.label(1)
    assert f"{b2}: apt: 2 package(s) for armel, 1.5 KiB, in" in "\n".join(lines)
    assert any(line.startswith(f"builder {b2}: 2 .deb(s), ") and "checksums verified" in line for line in lines)
    assert "dpkg --install kiosk-test-libhello_1.0_all.deb kiosk-test-hello_1.0_armel.deb" in lines
    assert "installed: kiosk-test-hello 1.0" in lines
    assert dpkg_installed(lab.root) == {"kiosk-test-kiosk": "1.0", "kiosk-test-hello": "1.0",
                                        "kiosk-test-libhello": "1.0"}
    assert (lab.root / "usr/share/kiosk-test-hello/hello.txt").read_text() == "hello from kiosk-test-hello 1.0 (armel)\n"
    # a second package with the same dependency: only what the device lacks comes back
    entries, lines = ask_for_packages(lab, ["kiosk-test-hello", "kiosk-test-other"])
    assert [e["name"] for e in entries] == ["kiosk-test-other_1.0_armel.deb"], lines
    assert any(line.startswith(f"{b2}: apt: 1 package(s) for armel, ") and line.endswith(": kiosk-test-other")
               for line in lines)


@pytest.mark.root
def test_with_every_builder_down_nothing_comes_and_nothing_changes(lab):
    lab = lab([{"host": "localhost", "up": False, "speed": 2}, {"host": "127.0.0.1", "up": False}])
    before = snapshot(lab.root)
    entries, lines = ask_for_packages(lab, ["kiosk-test-hello"])
    assert entries is None
    assert lines == [f"builder {lab.label(0)} unreachable (connection refused); trying {lab.label(1)}...",
                     f"builder {lab.label(1)} unreachable (connection refused); no builder left"]
    assert snapshot(lab.root) == before


@pytest.mark.root
@pytest.mark.parametrize("damage", ["payload", "deb"])
def test_a_corrupted_transfer_is_refused(lab, damage):
    lab = lab([{"host": "127.0.0.1", "env": {"KIOSK_BUILDER_TEST_CORRUPT": damage}}])
    before = snapshot(lab.root)
    entries, lines = ask_for_packages(lab, ["kiosk-test-hello"])
    assert entries is None
    refusal = [line for line in lines if " REFUSED: " in line]
    assert len(refusal) == 1, lines
    if damage == "payload":  # damaged after the builder hashed the stream
        assert "checksum mismatch: the " in refusal[0] and "does not match the sha256 the builder announced" in refusal[0]
    else:  # the stream is what the builder sent, but a .deb in it is not what the manifest says
        assert "kiosk-test-libhello_1.0_all.deb: checksum mismatch" in refusal[0]
    assert refusal[0].endswith("nothing from it is used; no builder left")
    assert snapshot(lab.root) == before


@pytest.mark.root
def test_a_builder_with_the_wrong_host_key_is_refused(lab):
    lab = lab([{"host": "127.0.0.1", "wrong_host_key": True}])
    before = snapshot(lab.root)
    entries, lines = ask_for_packages(lab, ["kiosk-test-hello"])
    assert entries is None
    assert f"builder {lab.label(0)} refused (its host key does not match publicHostKey in the spec; not trusted " \
           "(a reinstalled builder, or someone in between)); no builder left" in lines
    assert "Accepted publickey" not in lab.servers[0].log.read_text()  # the device never logged in
    assert snapshot(lab.root) == before


@pytest.mark.root
def test_a_config_only_push_contacts_no_builder(lab):
    lab = lab([{"host": "localhost", "up": False, "speed": 2}, {"host": "127.0.0.1"}])
    # the stopped builder's port: a tripwire that counts connection attempts
    tripwire = socket.socket()
    tripwire.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tripwire.bind(("127.0.0.1", lab.builders[0]["port"]))
    tripwire.listen(8)
    tripwire.settimeout(0.2)
    attempts = []

    def watch():
        while not stop.is_set():
            try:
                conn, _ = tripwire.accept()
                attempts.append(1)
                conn.close()
            except OSError:
                pass

    stop = threading.Event()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        seen = lab.connections(1)
        r, lines = lab.push(program={"package": "kiosk-test-kiosk", "executable": "/usr/bin/kiosk-test-kiosk",
                                     "args": ["--big"]})
        assert r.returncode == 0, r.stderr
        assert "    packages: no change" in lines
        assert not any("builder" in line for line in lines)
        r, lines = lab.push(hostName="hall")  # and once more, something else
        assert r.returncode == 0, r.stderr
    finally:
        stop.set()
        watcher.join()
        tripwire.close()
    assert attempts == [] and lab.connections(1) == seen


@pytest.mark.root
def test_a_push_that_changes_the_system_of_a_device_without_root_slots_is_refused(lab):
    """A device that did not boot from a root slot (its image predates them) takes configuration pushes
    only: a package added is refused before anything changes, and no builder is asked."""
    lab = lab([{"host": "127.0.0.1"}])
    before = snapshot(lab.root)
    seen = lab.connections(0)
    r, lines = lab.push(packages=["kiosk-test-hello"])
    assert r.returncode != 0
    assert "nixiosk.json: /packages: +kiosk-test-hello changes the system, and this device has no root slot to " \
           "install a new one into; build and flash a new image for it (./deploy.sh /dev/mmcblk0): its root " \
           "slots take new systems" in lines, lines
    assert lines[-1] == "==> push refused: this change needs a new image; nothing on the device was changed"
    assert snapshot(lab.root) == before and lab.connections(0) == seen


@pytest.mark.root
def test_builders_check_reports_up_and_down(lab):
    lab = lab([{"host": "localhost", "up": False, "speed": 2}, {"host": "127.0.0.1"}])
    r = kiosk_cli("builders", "check", str(lab.spec_file), "--root", str(lab.root))
    assert r.returncode == 1, r.stderr  # one builder is not usable
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["BUILDER", "SPEED", "STATUS", "ARCHITECTURES", "FREE", "RTT"]
    assert lines[1].startswith(f"root@{lab.label(0)}") and "unreachable: connection refused" in lines[1]
    up = lines[2]
    assert up.startswith(f"root@{lab.label(1)}") and "ok (kiosk 0.1.0, amd64)" in up
    assert "amd64 arm64 armhf armel" in up and "GiB" in up and up.endswith(" ms")
    assert lines[3] == "lobby (raspberryPi0, armel): 1 of 2 builder(s) can build for it"
    r = kiosk_cli("builders", "check", str(lab.spec_file), "--root", str(lab.root), "--json")
    report = json.loads(r.stdout)
    down, ok = report["builders"]
    assert report["deviceArchitecture"] == "armel"
    assert (down["reachable"], down["ok"], down["error"]) == (False, False, "unreachable: connection refused")
    assert (ok["reachable"], ok["ok"], ok["buildsForDevice"], ok["key"]) == (True, True, True, BUILDER_KEY)
    assert ok["freeBytes"] > 0 and ok["rttMs"] > 0 and ok["connectMs"] >= 0 and "armel" in ok["architectures"]
    # from a laptop, with a key given (here the device's own)
    r = kiosk_cli("builders", "check", str(lab.spec_file), "-i", str(lab.root / "var/lib/kiosk/builder_ed25519"), "--json")
    assert json.loads(r.stdout)["builders"][1]["ok"] is True


@pytest.mark.root
def test_builders_check_counts_only_what_a_builder_can_build_images_for(lab, tmp_path):
    """A device asks a builder for its whole new system (every board has root slots): a builder whose apt
    could download .debs but that cannot build an image (no mmdebstrap there) cannot build for it, and
    check says so instead of "ok"."""
    from sshd_harness import VENV_BIN

    tools = tmp_path / "apt-only"
    tools.mkdir()
    for name in ("apt-get", "dpkg", "sh", "env"):
        (tools / name).symlink_to(shutil.which(name))
    lab = lab([{"host": "127.0.0.1", "env": {"PATH": f"{VENV_BIN}:{tools}"}}])
    r = kiosk_cli("builders", "check", str(lab.spec_file), "--root", str(lab.root), "--json")
    assert r.returncode == 1, r.stderr
    row = json.loads(r.stdout)["builders"][0]
    assert (row["reachable"], row["ok"], row["buildsForDevice"]) == (True, False, False), row
    assert row["apt"] and row["imageArchitectures"] == [] and row["architectures"] == [], row
    assert row["error"] == "builds no system of amd64 arm64 armel armhf (scripts/install-deps.sh build there)", row
    r = kiosk_cli("builders", "check", str(lab.spec_file), "--root", str(lab.root))
    assert "builds no system of amd64 arm64 armel armhf" in r.stdout.splitlines()[1], r.stdout
    assert r.stdout.splitlines()[2] == "lobby (raspberryPi0, armel): 0 of 1 builder(s) can build for it", r.stdout


@pytest.mark.root
def test_a_builder_that_refuses_the_device_key_says_how_to_authorize_it(lab, tmp_path):
    lab = lab([{"host": "127.0.0.1", "authorize": False}])
    r = kiosk_cli("builders", "check", str(lab.spec_file), "--root", str(lab.root))
    assert r.returncode == 1
    label = f"root@{lab.label(0)}"
    assert "refused: it does not accept this device's key" in r.stdout.splitlines()[1]
    hint = f"{label} does not accept this device's key; there, as root, run: echo '{lab.public}' | " \
           "kiosk builders authorize --key -"
    assert r.stdout.splitlines()[-1] == hint
    # a device asking it for anything says the same
    entries, lines = ask_for_packages(lab, ["kiosk-test-hello"])
    assert entries is None
    assert f"authorize this device there (as root): echo '{lab.public}' | kiosk builders authorize --key -" in lines
    # the hint's command, as given (with the test builder's authorized_keys), lets it in
    command = hint.split("run: ", 1)[1] + f" --authorized-keys {lab.servers[0].tmp / 'authorized_keys'}"
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"))
    assert done.returncode == 0, done.stderr
    r = kiosk_cli("builders", "check", str(lab.spec_file), "--root", str(lab.root))
    assert r.returncode == 0 and "does not accept" not in r.stdout, r.stdout


@pytest.mark.root
def test_authorize_limits_the_device_key_to_builder_serve(lab, tmp_path):
    lab = lab([{"host": "127.0.0.1", "authorize": False}])
    home = tmp_path / "home"
    home.mkdir()
    r = kiosk_cli("builders", "authorize", env={"HOME": str(home)}, cwd=tmp_path)  # which device?
    assert r.returncode == 2 and r.stderr.startswith("kiosk: which device? give its public key with --key FILE")
    assert "ssh root@DEVICE kiosk builders key | ssh USER@BUILDER kiosk builders authorize --key -" in r.stderr
    r = kiosk_cli("builders", "authorize", "--key", "-", input=lab.public, env={"HOME": str(home)})
    assert r.returncode == 0, r.stderr
    entry = (home / ".ssh/authorized_keys").read_text().splitlines()
    public = lab.pub.read_text().strip()
    assert len(entry) == 1 and entry[0].startswith('restrict,command="') and entry[0].endswith(
        '/kiosk builder-serve" ' + public)
    assert oct((home / ".ssh").stat().st_mode & 0o777) == "0o700"
    assert oct((home / ".ssh/authorized_keys").stat().st_mode & 0o777) == "0o600"
    again = kiosk_cli("builders", "authorize", "--key", str(lab.pub), env={"HOME": str(home)})
    assert "is already authorized" in again.stdout
    assert (home / ".ssh/authorized_keys").read_text().splitlines() == entry
    # the key can only run builder-serve, whatever it asks for
    (lab.servers[0].tmp / "authorized_keys").write_text(entry[0] + "\n")
    known = tmp_path / "known"
    known.write_text(f"[127.0.0.1]:{lab.servers[0].port} {lab.keys['b1_pub']}\n")
    r = subprocess.run(["ssh", "-F", "/dev/null", "-i", str(lab.root / "var/lib/kiosk/builder_ed25519"),
                        "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known}", "-o", "BatchMode=yes",
                        "-p", str(lab.servers[0].port), "root@127.0.0.1", "cat /etc/shadow"],
                       input="", capture_output=True, text=True, timeout=60)
    answer = json.loads(r.stdout)
    assert answer["ok"] is False and "expected one JSON request line" in answer["error"]


BAD_REQUESTS = {
    "empty": (b"", "expected one JSON request line on stdin, got none"),
    "not-json": (b"GET / HTTP/1.0\n", "the request at /: line 1 column 1: expected a value"),
    "latin1": (b'{"kiosk": 1, "op": "caf\xe9"}\n', "the request is not UTF-8 text (bad byte at offset 23)"),
    "deep": (b"[" * 100_000 + b"]" * 100_000 + b"\n", "the request at /0/0/0/0/0/0/0/0/0/0/0/0/0/0/0/0: nests more "
             "than 16 levels"),
    "bigint": (b'{"kiosk": 1' + b"0" * 5000 + b"}\n", "the request at /kiosk: a number with 5001 digits"),
    "nan": (b'{"kiosk": 1, "op": NaN}\n', "the request at /op: NaN is not a JSON number"),
    "surrogate": (b'{"kiosk": 1, "op": "\\ud800"}\n', "the request at /op: holds a lone UTF-16 surrogate"),
    "duplicate": (b'{"kiosk": 1, "op": "probe", "op": "build"}\n', "the request at /op: the key 'op' appears twice"),
    "array": (b"[1]\n", "the request is not a JSON object"),
    "protocol": (b'{"kiosk": 2, "op": "probe"}\n', "this builder speaks protocol 1"),
    "op": (b'{"kiosk": 1, "op": "shell"}\n', "unknown request 'shell'"),
    "huge": (b" " * (17 << 20) + b"\n", "the request is longer than 16.0 MiB"),
    "endless": (None, "the request is longer than 16.0 MiB"),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_a_bad_request_is_answered_and_is_one_line_and_exit_2(name, tmp_path):
    """builder-serve's stdin is whatever an ssh client sends: /dev/zero, 20 MB, 100,000-deep or non-UTF-8 JSON
    were a traceback inside the answer, an unbounded read, or exit 0. The device still gets an answer
    (ok false, the sentence, exitCode 2); whoever ran it gets one line and exit status 2; nothing is attempted."""
    data, said = BAD_REQUESTS[name]
    env = dict(os.environ, KIOSK_CACHE_DIR=str(tmp_path / "cache"))
    with open("/dev/zero", "rb") as zero:
        feed = {"stdin": zero} if data is None else {"input": data}
        r = subprocess.run([*kiosk_argv(), "builder-serve"], capture_output=True, timeout=60, env=env, **feed)
    answer = json.loads(r.stdout)
    assert r.stdout.count(b"\n") == 1 and answer["ok"] is False and answer["kiosk"] == 1, r.stdout
    assert answer["exitCode"] == 2 and answer["error"].startswith(said), answer
    assert r.returncode == 2 and r.stderr.decode() == f"kiosk: {answer['error']}\n", r.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.root
def test_rotating_a_device_key_with_the_readme_commands(lab, tmp_path):
    """README, Remote builders: a device gets a new key over ssh, the builder takes it and drops the old one
    (the way off a key that images built by earlier kiosk versions shared), through real ssh both ways."""
    lab = lab([{"host": "127.0.0.1"}])
    old_key = tmp_path / "old_key"
    shutil.copy(lab.root / "var/lib/kiosk/builder_ed25519", old_key)
    (tmp_path / "old.pub").write_text(lab.public + "\n")
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{lab.device.port} {lab.keys['device_host_pub']}\n"
                     f"[127.0.0.1]:{lab.servers[0].port} {lab.keys['b1_pub']}\n")
    ssh = f"ssh -F /dev/null -i {lab.keys['client']} -o IdentitiesOnly=yes -o UserKnownHostsFile={known} -o BatchMode=yes"
    device, builder = f"{ssh} -p {lab.device.port} root@127.0.0.1", f"{ssh} -p {lab.servers[0].port} root@127.0.0.1"
    # the README's commands; the test's device is a directory (--root) and its builder's file is elsewhere
    key, auth = f"{lab.root}/var/lib/kiosk/builder_ed25519", f"--authorized-keys {lab.servers[0].tmp / 'authorized_keys'}"
    legacy = f"{lab.root}/etc/kiosk/builder_ed25519"   # where images before 2026-12 kept it: removed too
    script = (f"{device} 'rm -f {legacy} {legacy}.pub {key} {key}.pub && kiosk builders key --root {lab.root}' | "
              f"{builder} kiosk builders authorize --key - {auth} && "
              f"{builder} kiosk builders authorize --revoke --key - {auth} < old.pub")
    done = subprocess.run(script, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "authorized kiosk-builder@lobby" in done.stdout and "removed kiosk-builder@lobby" in done.stdout
    new_public = (lab.root / "var/lib/kiosk/builder_ed25519.pub").read_text().strip()
    assert new_public != lab.public
    r = kiosk_cli("builders", "check", str(lab.spec_file), "--root", str(lab.root))
    assert r.returncode == 0, r.stdout + r.stderr
    r = kiosk_cli("builders", "check", str(lab.spec_file), "-i", str(old_key), "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["builders"][0]["error"].startswith(
        "refused: it does not accept this device's key")
    lines = (lab.servers[0].tmp / "authorized_keys").read_text().splitlines()
    assert lines[0] == lab.keys["client_pub"] and len(lines) == 2 and lines[1].endswith(new_public)


# ---------------------------------------------------------------- kiosk build --builder (root)

@pytest.fixture
def build_box(tmp_path, archive, keys):
    """A builder reachable with the user's own key (no forced command): what `kiosk build --builder` uses."""
    directory = tmp_path / "box"
    directory.mkdir()
    server = Device(directory, device_spec(archive, keys), keys["client_pub"], keys["b1"])
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{server.port} {keys['b1_pub']}\n")
    ssh = f"ssh -F /dev/null -i {keys['client']} -o IdentitiesOnly=yes -o UserKnownHostsFile={known}"
    yield SimpleNamespace(server=server, target=f"root@127.0.0.1:{server.port}", env={"KIOSK_SSH_COMMAND": ssh})
    server.close()


@pytest.mark.root
def test_remote_build_reports_the_builders_failure_and_writes_nothing(tmp_path, archive, keys, build_box):
    # the builder runs the real `kiosk build`; its mmdebstrap refuses the unsigned test archive
    spec = tmp_path / "nixiosk.json"
    spec.write_text(json.dumps(device_spec(archive, keys, hardware="qemu")))
    out = tmp_path / "out"
    r = kiosk_cli("build", str(spec), "-o", str(out), "--builder", build_box.target, env=build_box.env)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == f"==> building on {build_box.target}"
    assert "==> plan" in lines and "==> rootfs" in lines  # the builder's stages, streamed
    failed = [line for line in lines if line.startswith("kiosk: ")]
    assert failed[0].startswith(f"kiosk: the build on {build_box.target} failed: stage 'rootfs' failed after ")
    assert lines[-1].endswith("; nothing was written")
    assert list(out.iterdir()) == []
    # a spec the builder refuses: its problems, exit status 2
    bad = json.loads(spec.read_text())
    bad["packages"] = ["kiosk-test-nope"]
    spec.write_text(json.dumps(bad))
    r = kiosk_cli("build", str(spec), "-o", str(out), "--builder", build_box.target, env=build_box.env)
    assert r.returncode == 2 and 'Debian bookworm has no package "kiosk-test-nope"' in r.stderr


@pytest.mark.root
@pytest.mark.slow
def test_remote_build_brings_back_the_image_checksummed(tmp_path, keys, build_box):
    """A real image built on the builder from deb.debian.org (minutes): it comes back sparse, verified,
    with its .bmap, manifest and SBOM; the spec names builders, yet no builder key travels or is kept
    (each device makes its own), and a second build gives the same image bytes."""
    data = {"hostName": "remote", "hardware": "qemu", "authorizedKeys": [keys["client_pub"]],
            "program": {"package": "foot"},
            "builders": [{"hostName": "b1.example", "publicHostKey": keys["b1_pub"]}]}
    spec = tmp_path / "nixiosk.json"
    spec.write_text(json.dumps(data))
    out = tmp_path / "out"
    r = kiosk_cli("build", str(spec), "-o", str(out), "--builder", build_box.target, env=build_box.env)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    image = out / "remote-qemu.img"
    assert manifest["image"] == str(image) and manifest["builtOn"] == build_box.target
    assert hashlib.sha256(image.read_bytes()).hexdigest() == manifest["imageSha256"]
    assert image.stat().st_blocks * 512 < image.stat().st_size  # still sparse
    assert (out / "remote-qemu.img.bmap").is_file() and (out / "remote-qemu.spdx.json").is_file()
    assert not list(out.glob("*.builder*"))
    r = kiosk_cli("build", str(spec), "-o", str(out), "--builder", build_box.target, env=build_box.env)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "manifest.json").read_text())["imageSha256"] == manifest["imageSha256"]
