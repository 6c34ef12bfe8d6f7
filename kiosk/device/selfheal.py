"""A kiosk that comes back by itself: the program's restarts with a back-off, and the page once its URL answers.

`kiosk program-exited` is kiosk.service's ExecStopPost= (as root): systemd hands it SERVICE_RESULT,
EXIT_CODE and EXIT_STATUS; it writes one journal line saying how the program ended and, when it ended
by itself soon after starting, sleeps the back-off (2 s, doubling up to 60 s) before systemd's
Restart= starts it again. A deliberate stop (a push, `kiosk screen off`) is said and not delayed.

`kiosk watch-url` (kiosk-url-watch.service, rendered only when the program's arguments hold an http(s)
URL) probes that URL every few seconds; once it answers after failed probes (the network or the
server was down at boot or later), it restarts kiosk.service so the page is loaded again instead of
the browser's error page staying on screen. Nothing of the spec reaches a shell: the URL is read
from /etc/kiosk/program.json and fetched with urllib.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from kiosk.config.display import web_url
from kiosk.core.errors import KioskError
from kiosk.core.paths import device_root
from kiosk.core.run import run

BACKOFF_STATE = "run/kiosk-restarts.json"
FIRST_DELAY, MAX_DELAY = 2, 60
HEALTHY_SECONDS = 60        # a program that ran this long before ending starts the back-off afresh
PROBE_EVERY, PROBE_TIMEOUT = 5, 10


def _say(line: str) -> None:
    print(line, flush=True)


def _ran_seconds() -> float | None:
    """How long kiosk.service's main process ran (systemd's monotonic timestamps), None if unknown."""
    out = run(["systemctl", "show", "kiosk.service", "-p", "ExecMainStartTimestampMonotonic",
               "-p", "ExecMainExitTimestampMonotonic"], check=False, timeout=30).stdout
    values = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    try:
        start, end = int(values["ExecMainStartTimestampMonotonic"]), int(values["ExecMainExitTimestampMonotonic"])
    except (KeyError, ValueError):
        return None
    return (end - start) / 1e6 if start and end >= start else None


def backoff(state_path: Path, ran: float | None) -> tuple[int, int]:
    """(restart number, seconds to wait) after the program ended by itself; state kept in /run."""
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        state = {}
    count = 0 if ran is not None and ran >= HEALTHY_SECONDS else int(state.get("count", 0))
    delay = min(MAX_DELAY, FIRST_DELAY * 2 ** count)
    state_path.parent.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps({"count": count + 1}) + "\n")
    return count + 1, delay


def _stopped_on_purpose() -> bool:
    """A stop or restart job for kiosk.service is queued (systemctl stop/restart, a push, `kiosk screen off`);
    when the program ended by itself there is none while ExecStopPost runs."""
    jobs = run(["systemctl", "list-jobs", "--plain", "--no-legend", "--no-pager"], check=False, timeout=30).stdout
    return any(line.split()[1:3] in (["kiosk.service", "stop"], ["kiosk.service", "restart"])
               for line in jobs.splitlines() if len(line.split()) >= 3)


def program_exited(root: Path, env=os.environ) -> int:
    result, code, status = env.get("SERVICE_RESULT", "?"), env.get("EXIT_CODE", "?"), env.get("EXIT_STATUS", "?")
    ran = _ran_seconds()
    lasted = f" after {ran:.0f} s" if ran is not None else ""
    if _stopped_on_purpose():
        _say(f"kiosk: the program was stopped ({code} {status}){lasted}")
        return 0
    number, delay = backoff(Path(root) / BACKOFF_STATE, ran)
    how = f"exited with status {status}" if code == "exited" else f"was {code} by signal {status}"
    _say(f"kiosk: the program {how}{lasted} ({result}); restart {number} in {delay} s"
         + (" (backing off: it keeps failing)" if delay > FIRST_DELAY else ""))
    time.sleep(max(0, delay - FIRST_DELAY))   # Restart= waits RestartSec=2 s more
    return 0


def answers(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """None when the URL answers (2xx/3xx after redirects), else why not."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout) as response:
            response.read(1)
            return None if response.status < 400 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return str(getattr(exc, "reason", exc))


def restart_kiosk() -> None:
    # try-restart: a kiosk switched off (kiosk screen off) stays off
    run(["systemctl", "try-restart", "kiosk.service"], check=False, timeout=180)


def watch_url(root: Path, *, every: float = PROBE_EVERY, rounds: int | None = None, restart=restart_kiosk) -> int:
    failures, since, url = 0, None, None
    while rounds is None or rounds > 0:
        # read every round: a push that changes the URL restarts the kiosk, not this watcher
        now_url = web_url(json.loads((Path(root) / "etc/kiosk/program.json").read_text()))
        if now_url != url:
            url, failures = now_url, 0
            _say(f"kiosk watch-url: watching {url}" if url else
                 "kiosk watch-url: the program's arguments hold no http(s) URL; nothing to watch")
        if not url:
            return 0
        why = answers(url)
        if why is not None:
            if failures == 0:
                since = time.strftime("%H:%M:%S")
                _say(f"kiosk watch-url: {url} does not answer ({why}); the page is shown again once it does")
            failures += 1
        elif failures:
            _say(f"kiosk watch-url: {url} answers again after {failures} failed probes since {since}; "
                 "restarting kiosk.service to show it")
            restart()
            failures = 0
        rounds = None if rounds is None else rounds - 1
        time.sleep(every)
    return 0


def _on_device() -> Path:
    root = device_root()
    if not (root / "etc/kiosk/release.json").is_file():
        raise KioskError("this command runs on a kiosk device (kiosk.service runs it)")
    return root


def register(sub) -> None:
    p = sub.add_parser("program-exited", help="on the device: kiosk.service's ExecStopPost (journal line, back-off)")
    p.set_defaults(func=lambda args: program_exited(_on_device()))
    p = sub.add_parser("watch-url", help="on the device: restart the kiosk once the program's URL answers again")
    p.set_defaults(func=lambda args: watch_url(_on_device()))
