"""The device-side logic of issue 20 without a device: the restart back-off, the URL watcher against a real
HTTP server on localhost, and the idle watcher's input reading. Booted end to end: tests/test_screen_boot.py."""

import http.server
import json
import os
import threading

import pytest

from kiosk.device import screen, selfheal


def test_the_back_off_doubles_to_a_minute_and_starts_afresh_after_a_healthy_run(tmp_path):
    state = tmp_path / "run/kiosk-restarts.json"
    waits = [selfheal.backoff(state, ran=1.0) for _ in range(7)]
    assert waits == [(1, 2), (2, 4), (3, 8), (4, 16), (5, 32), (6, 60), (7, 60)]
    assert selfheal.backoff(state, ran=600.0) == (1, 2)        # it ran for ten minutes: not "keeps failing"
    assert json.loads(state.read_text()) == {"count": 1}


@pytest.fixture
def server():
    status = {"code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status["code"])
            self.end_headers()
            self.wfile.write(b"page")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", status
    httpd.shutdown()
    httpd.server_close()


def test_a_url_answers_only_with_a_page(server):
    url, status = server
    assert selfheal.answers(url) is None
    status["code"] = 503
    assert selfheal.answers(url) == "HTTP 503"
    httpd_port = url.rsplit(":", 1)[1].strip("/")
    assert selfheal.answers(f"http://127.0.0.1:{int(httpd_port) + 1}/", timeout=2) is not None   # nothing listens


def test_the_watcher_restarts_the_kiosk_once_when_the_url_comes_back(server, tmp_path, capsys, monkeypatch):
    url, status = server
    (tmp_path / "etc/kiosk").mkdir(parents=True)
    (tmp_path / "etc/kiosk/program.json").write_text(json.dumps(["/usr/bin/cage", "-d", "--", "/usr/bin/cog", url]))
    restarts = []
    codes = iter([200, 500, 502, 200, 200])   # up (nothing to do), down twice, up (one restart), up (none)
    probe = selfheal.answers

    def answers(u, timeout=10):   # the real probe, the server's answer changed before each
        status["code"] = next(codes)
        return probe(u, timeout)

    monkeypatch.setattr(selfheal, "answers", answers)
    selfheal.watch_url(tmp_path, every=0, rounds=5, restart=lambda: restarts.append("restart"))
    assert restarts == ["restart"]
    out = capsys.readouterr().out
    assert f"{url} does not answer (HTTP 500)" in out
    assert f"{url} answers again after 2 failed probes" in out


def test_the_idle_watcher_sees_input_on_any_event_device(tmp_path):
    """InputWatch on FIFOs standing in for /dev/input/event*: silence is silence, a write is input."""
    (tmp_path / "dev/input").mkdir(parents=True)
    fifo = tmp_path / "dev/input/event0"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        watch = screen.InputWatch(tmp_path)
        assert watch.wait(0.2) is False
        os.write(writer, b"\0" * 24)          # one struct input_event
        assert watch.wait(1) is True
        assert watch.wait(0.2) is False
    finally:
        os.close(writer)


def _at(day: int, hhmm: str):
    """A local time on weekday `day` (0 = Monday) at HH:MM."""
    import time
    hour, minute = map(int, hhmm.split(":"))
    return time.struct_time((2026, 12, 7 + day, hour, minute, 0, day, 341 + day, 0))


def test_the_off_window_of_a_schedule_crossing_midnight_and_not():
    night = {"off": "22:00", "on": "07:30", "days": ["Fri", "Sat"]}
    assert screen.in_off_window(night, _at(4, "22:00")) and screen.in_off_window(night, _at(4, "23:59"))
    assert screen.in_off_window(night, _at(5, "07:29")) and not screen.in_off_window(night, _at(5, "07:30"))
    assert screen.in_off_window(night, _at(6, "03:00"))          # Saturday night into Sunday
    assert not screen.in_off_window(night, _at(4, "21:59"))
    assert not screen.in_off_window(night, _at(3, "23:00"))      # Thursday is not in days
    assert not screen.in_off_window(night, _at(4, "03:00"))      # Friday early: Thursday night was not off
    lunch = {"off": "12:00", "on": "13:00"}                       # every day
    assert screen.in_off_window(lunch, _at(2, "12:30")) and not screen.in_off_window(lunch, _at(2, "13:00"))
    assert not screen.in_off_window(lunch, _at(2, "11:59"))


def test_a_boot_inside_the_off_window_switches_the_screen_off(tmp_path, monkeypatch):
    (tmp_path / "etc/kiosk").mkdir(parents=True)
    (tmp_path / "etc/kiosk/screen.json").write_text(json.dumps({"schedule": {"off": "22:00", "on": "07:00"}}))
    calls = []
    monkeypatch.setattr(screen, "screen_off", lambda root, by: calls.append(("off", by)))
    monkeypatch.setattr(screen, "screen_on", lambda root, by: calls.append(("on", by)))
    assert screen.align(tmp_path, _at(0, "12:00")) is None and calls == []
    assert screen.align(tmp_path, _at(0, "23:00")) == "off" and calls == [("off", "schedule")]
    (tmp_path / "etc/kiosk/screen.json").write_text(json.dumps({"schedule": None}))
    assert screen.align(tmp_path, _at(0, "23:00")) is None and calls == [("off", "schedule")]


def test_the_schedule_asks_for_its_state_now_and_leaves_blanking_and_a_hand_alone():
    """What a push that changes display.schedule (or a boot) does to the screen: screen.schedule_asks."""
    night, asks = {"off": "22:00", "on": "07:00"}, screen.schedule_asks
    inside, outside = _at(0, "23:00"), _at(0, "12:00")
    assert asks(night, None, inside) == "off"                 # lit inside the (new) off window: dark now
    assert asks(night, "idle", inside) == "off"               # blanked: the schedule's now, input must not light it
    assert asks(night, "schedule", inside) is None            # already the schedule's
    assert asks(night, "schedule", inside, lit=True) == "off"  # a push restarted the kiosk: dark again
    assert asks(night, "hand", inside) is None                # a person switched it off: stays so
    assert asks(night, "schedule", outside) == "on"           # the off window moved away from now
    assert asks(None, "schedule", inside) == "on"             # the schedule removed
    assert asks(None, "idle", inside) is None and asks(night, "idle", outside) is None   # blanking's
    assert asks(None, "hand", outside) is None and asks(night, None, outside) is None


def test_the_device_time_follows_the_zone_etc_localtime_names_now(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/localtime").symlink_to("/usr/share/zoneinfo/Asia/Kolkata")   # +05:30, no summer time
    import time
    utc = time.gmtime()
    now = screen.local_now(tmp_path)
    assert (now.tm_hour * 60 + now.tm_min - utc.tm_hour * 60 - utc.tm_min) % 1440 in (330, 331)

def test_kiosk_screen_boot_stands_aside_during_a_switch(tmp_path, monkeypatch, capsys):
    """A push that adds or changes kiosk-screen-boot.service starts it mid-switch; the switch aligns the screen
    itself (after its health check when it switches it off), so the unit must not act before."""
    import argparse
    (tmp_path / "etc/kiosk").mkdir(parents=True)
    (tmp_path / "etc/kiosk/release.json").write_text("{}")
    (tmp_path / "etc/kiosk/screen.json").write_text(json.dumps({"schedule": {"off": "00:00", "on": "23:59"}}))
    (tmp_path / "var/lib/kiosk").mkdir(parents=True)
    (tmp_path / "var/lib/kiosk/switch.json").write_text("{}")
    monkeypatch.setenv("KIOSK_ROOT", str(tmp_path))
    monkeypatch.setattr(screen, "screen_off", lambda root, by: pytest.fail("switched off during a switch"))
    assert screen.cmd_screen(argparse.Namespace(action="boot", by="hand")) == 0
    assert "a switch is under way" in capsys.readouterr().out
