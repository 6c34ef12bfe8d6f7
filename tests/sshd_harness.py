"""A device root in a temporary directory, served by a real OpenSSH sshd on a loopback port.

The device: generation 1 installed by install_first_generation (as the image build does), so
ROOT/etc/kiosk/configuration.git is a real bare repository with kiosk's hooks in it. The sshd:
a throwaway host key, its own sshd_config (keys only, no PAM, this test's authorized_keys), and
`SetEnv` giving the hooks KIOSK_ROOT (the temporary device root), KIOSK_ACTIVATOR (a recording
file: no systemctl is ever called) and a PATH where `kiosk` is this checkout's venv. None of that
can reach a real device: it exists only in this throwaway sshd_config.

Clients are the real git over the real ssh client, with StrictHostKeyChecking=yes against a
known_hosts file holding the throwaway host key.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from kiosk.device import provision
from kiosk.core import paths as resources
from kiosk.config.render import render
from kiosk.spec.plan import make_plan
from kiosk.spec.load import loads

VENV_BIN = str(Path(sys.executable).parent)
EPOCH = 1700000000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, comment: str) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True)
    return (path.with_suffix(".pub") if path.suffix else Path(str(path) + ".pub")).read_text().strip()


def key_set(directory: Path, names, comment: str = "test") -> dict:
    """{name: private key path, name + "_pub": public line} for fresh ed25519 keys (host and client keys)."""
    out = {}
    for name in names:
        out[name] = directory / f"{name}_ed25519"
        out[name + "_pub"] = keygen(out[name], f"{name}@{comment}")
    return out


def snapshot(root: Path) -> dict:
    """Everything under root that matters: type, mode, owner, contents or link target (no times)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir", oct(st.st_mode), st.st_uid, st.st_gid)
            else:
                out[rel] = ("file", oct(st.st_mode), st.st_uid, st.st_gid, path.read_bytes())
    return out


class Device:
    """ROOT with generation 1, and an sshd whose git pushes run the hooks against ROOT.

    device_paths=True: the repository is also reached as a real device's, ssh://root@HOST:PORT/etc/kiosk/...
    netns/address/port: sshd runs in that network namespace, listening there (a device on a test LAN, port 22)."""

    def __init__(self, tmp: Path, spec: dict, client_pub: str, host_key: Path, *, env: dict | None = None,
                 device_paths: bool = False, netns: str | None = None, address: str = "127.0.0.1",
                 port: int | None = None):
        self.tmp = tmp
        self.netns, self.address = netns, address
        self.root = tmp / "device"
        self.root.mkdir()
        self.recording = tmp / "recording.json"
        self.recording.write_text("{}")
        self.spec_text = json.dumps(spec, indent=2) + "\n"
        spec = loads(self.spec_text).data
        self.first_commit = provision.install_first_generation(self.root, self.spec_text, render(spec),
                                                               make_plan(spec), epoch=EPOCH,
                                                               hooks_dir=resources.hooks_dir())
        self.repo = self.root / resources.REPO
        self.port = port or free_port()
        (tmp / "authorized_keys").write_text(client_pub + "\n")
        hook_env = {
            "KIOSK_ROOT": str(self.root),
            "KIOSK_ACTIVATOR": f"recording:{self.recording}",
            "KIOSK_HEALTH_SECONDS": "0",
            "KIOSK_LOCK_TIMEOUT": "60",
            "KIOSK_CACHE_DIR": os.environ.get("KIOSK_CACHE_DIR", str(tmp / "cache")),
            "PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
        }
        hook_env.update(env or {})
        self.config = tmp / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\nListenAddress {address}\nHostKey {host_key}\nPidFile {tmp}/sshd.pid\n"
            f"AuthorizedKeysFile {tmp}/authorized_keys\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
            "MaxStartups 30:30:60\nMaxSessions 30\nLogLevel VERBOSE\n"
            "SetEnv " + " ".join(f"{k}={v}" for k, v in hook_env.items()) + "\n"
            # device_paths: reached as a real device is, at /etc/kiosk/configuration.git (see device_shell.py)
            + (f"ForceCommand {sys.executable} {Path(__file__).with_name('device_shell.py')}\n" if device_paths else ""))
        self.log = tmp / "sshd.log"
        self.start()

    def start(self) -> None:
        """Start sshd (again, after close(): the device is back on the network, same port and host key)."""
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        inside = ["ip", "netns", "exec", self.netns] if self.netns else []
        if self.netns:
            self.log.unlink(missing_ok=True)   # the readiness check below reads it
        self.proc = subprocess.Popen([*inside, "/usr/sbin/sshd", "-D", "-f", str(self.config), "-E", str(self.log)])
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.netns:   # not reachable from here: sshd says when it listens
                    if f"Server listening on {self.address} port {self.port}" not in self.log.read_text():
                        raise OSError("not yet")
                else:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not start: {self.log.read_text() if self.log.exists() else ''}")
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"ssh://root@127.0.0.1:{self.port}{self.repo}"

    def recorded(self) -> dict:
        return json.loads(self.recording.read_text() or "{}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Client:
    """A user's machine: a key, known_hosts, and `git` over `ssh`."""

    def __init__(self, tmp: Path, key: Path, host_pub: str, port: int):
        self.tmp = tmp
        known = tmp / "known_hosts"
        known.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
        self.env = dict(os.environ,
                        GIT_SSH_COMMAND=f"ssh -i {key} -o IdentitiesOnly=yes -o UserKnownHostsFile={known} "
                                        f"-o StrictHostKeyChecking=yes -o BatchMode=yes -p {port}",
                        GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null",
                        GIT_AUTHOR_NAME="tester", GIT_AUTHOR_EMAIL="tester@example.org",
                        GIT_COMMITTER_NAME="tester", GIT_COMMITTER_EMAIL="tester@example.org")

    def git(self, *args, cwd=None, check=True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["git", *args], cwd=cwd, env=self.env, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"git {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc

    def clone(self, url: str, name: str) -> Path:
        dest = self.tmp / name
        self.git("clone", "-q", url, str(dest))
        return dest

    def commit_spec(self, clone: Path, data=None, *, text: str | None = None, message: str = "edit") -> str:
        (clone / "nixiosk.json").write_text(text if text is not None else json.dumps(data, indent=2) + "\n")
        self.git("commit", "-q", "-am", message, cwd=clone)
        return self.git("rev-parse", "HEAD", cwd=clone).stdout.strip()

    def push(self, clone: Path, *args: str) -> subprocess.CompletedProcess:
        return self.git("push", "origin", *(args or ("main",)), cwd=clone, check=False)

    def popen_push(self, clone: Path, *args: str) -> subprocess.Popen:
        return subprocess.Popen(["git", "push", "origin", *(args or ("main",))], cwd=clone, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def remote_lines(output: str) -> list[str]:
    """What the hooks printed, as the pusher sees it (git's `remote: ` prefix removed, trailing space cut)."""
    return [line[len("remote: "):].rstrip() for line in output.splitlines() if line.startswith("remote: ")]


def copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst
