"""Reaching a builder: the ssh options a device uses, a TCP probe of all at once, ssh's complaints in a word."""

from __future__ import annotations

import shlex
import socket
import threading
import time
from pathlib import Path

from kiosk.builders.select import Builder
from kiosk.core.errors import KioskError
from kiosk.core.paths import number_setting, setting


class BuilderFailure(KioskError):
    """One builder could not do the work (kind: unreachable, refused or failed); the next may do better."""

    def __init__(self, kind: str, reason: str, hint: str = ""):
        super().__init__(reason, hint=hint)
        self.kind = kind
        self.reason = reason


def connect_timeout() -> float:
    return max(0.2, number_setting("KIOSK_BUILDER_CONNECT_TIMEOUT", 5))


def transfer_timeout() -> float:
    return max(1.0, number_setting("KIOSK_BUILDER_TIMEOUT", 3600))


def ssh_options(key: str | Path | None, known_hosts: str | Path | None,
                timeout: float | None = None) -> list[tuple[str, str]]:
    """The device's ssh settings for builders: pinned host keys, no prompts, no forwarding."""
    options = [("BatchMode", "yes"), ("StrictHostKeyChecking", "yes"),
               ("ConnectTimeout", str(max(1, round(timeout if timeout is not None else connect_timeout())))),
               ("ServerAliveInterval", "15"), ("ServerAliveCountMax", "4"), ("UpdateHostKeys", "no"),
               ("ForwardAgent", "no"), ("ForwardX11", "no"), ("RequestTTY", "no"), ("ControlMaster", "no"),
               ("ControlPath", "none"), ("LogLevel", "ERROR")]
    if key is not None:
        options += [("IdentityFile", str(key)), ("IdentitiesOnly", "yes")]
    if known_hosts is not None:
        options += [("UserKnownHostsFile", str(known_hosts)), ("GlobalKnownHostsFile", "/dev/null")]
    return options


def remote_command() -> list[str]:
    """What the device asks the builder to run (a forced command in authorized_keys wins anyway)."""
    return shlex.split(setting("KIOSK_BUILDER_COMMAND", "kiosk builder-serve"))


def ssh_argv(builder: Builder, options: list[tuple[str, str]], *, config: str | None = "/dev/null") -> list[str]:
    argv = ["ssh"]
    if config is not None:
        argv += ["-F", config]
    for name, value in options:
        argv += ["-o", f"{name}={value}"]
    argv += ["-p", str(builder.port), "-l", builder.sshUser, "--", builder.hostName, *remote_command()]
    return argv


def tcp_probe(host: str, port: int, timeout: float) -> tuple[str | None, float]:
    """(None, seconds) when something accepts TCP at host:port, else (why not, seconds)."""
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror:
        return "unknown host name", time.monotonic() - started
    except ConnectionRefusedError:
        return "connection refused", time.monotonic() - started
    except (TimeoutError, socket.timeout):
        return f"no answer within {timeout:g} s", time.monotonic() - started
    except OSError as exc:
        return (exc.strerror or str(exc)).lower(), time.monotonic() - started
    return None, time.monotonic() - started


def probe_all(builders: list[Builder], timeout: float) -> list[tuple[str | None, float]]:
    """tcp_probe of every builder at the same time (one slow builder does not delay the others)."""
    results: list[tuple[str | None, float]] = [(f"no answer within {timeout:g} s", timeout)] * len(builders)

    def run(i: int, b: Builder) -> None:
        results[i] = tcp_probe(b.hostName, b.port, timeout)

    threads = [threading.Thread(target=run, args=(i, b), daemon=True) for i, b in enumerate(builders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 2)
    return results


def ssh_problem(stderr: str, code: int, key: str | Path | None = None) -> BuilderFailure:
    """ssh's complaint as one short reason."""
    text = stderr.lower()
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if "host key verification failed" in text or "remote host identification has changed" in text:
        return BuilderFailure("refused", "its host key does not match publicHostKey in the spec; not trusted "
                                         "(a reinstalled builder, or someone in between)")
    if "permission denied" in text:
        return BuilderFailure("refused", "it does not accept this device's key" + (f" {key}.pub" if key else ""),
                              hint="on the builder: kiosk builders authorize")
    if "bad permissions" in text or "load key" in text or "no such identity" in text:
        return BuilderFailure("failed", f"the key {key} cannot be used: {lines[-1] if lines else ''}")
    for needle, reason in (("connection refused", "connection refused"), ("timed out", "timed out"),
                           ("no route to host", "no route to host"), ("network is unreachable", "network unreachable"),
                           ("could not resolve hostname", "unknown host name"),
                           ("name or service not known", "unknown host name")):
        if needle in text:
            return BuilderFailure("unreachable", reason)
    if code == 127 or "command not found" in text or "no such file or directory" in text:
        return BuilderFailure("failed", "kiosk is not installed there, or not on the PATH of ssh sessions",
                              hint="install it, or set KIOSK_BUILDER_COMMAND")
    if "connection closed" in text or "connection reset" in text or "broken pipe" in text:
        return BuilderFailure("failed", lines[-1] if lines else "the connection was closed")
    if lines:
        return BuilderFailure("failed", lines[-1][:300])
    return BuilderFailure("failed", f"ssh exited with status {code} without an answer")
