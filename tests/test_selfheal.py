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
