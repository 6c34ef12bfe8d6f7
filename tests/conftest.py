import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.hookimpl(tryfirst=True)   # before -m deselects: the slow marks added here count
def pytest_collection_modifyitems(config, items):
    # @pytest.mark.slow_on("raspberryPi3"): that board's case of a boot test is in the slow suite only
    for item in items:
        boards = [arg for mark in item.iter_markers("slow_on") for arg in mark.args]
        param = getattr(getattr(item, "callspec", None), "params", {}).get("kiosk")
        if boards and param in boards:
            item.add_marker(pytest.mark.slow)
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (the CI runs as root)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    """The free disk where the run's images and VMs go: a full disk fails tests far from its cause (QEMU
    pauses, mkdir fails), and a CI log that names the free space says at once whether that was it."""
    import tempfile
    where = tempfile.gettempdir()
    free = shutil.disk_usage(where).free
    return f"disk: {free / 2**30:.1f} GiB free in {where} (a default run needs ~25 GiB at its peak)"


@pytest.fixture(scope="session")
def fake_mirror(tmp_path_factory):
    """A local Debian mirror over real HTTP; specs point debian.mirror at it."""
    from fake_mirror import Server, write_mirror

    root = tmp_path_factory.mktemp("mirror")
    write_mirror(root)
    server = Server(root)
    yield server.url
    server.close()


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Each test worker has its own kiosk cache, never the user's."""
    cache = tmp_path_factory.getbasetemp() / "kiosk-cache"
    monkeypatch.setenv("KIOSK_CACHE_DIR", str(cache))
    return cache


def kiosk_cli(*args, cwd=None, env=None, input=None):
    """Run the real `kiosk` command as a user would."""
    full_env = dict(os.environ, **(env or {}))
    exe = shutil.which("kiosk", path=str(Path(sys.executable).parent)) or "kiosk"
    return subprocess.run([exe, *args], cwd=cwd, env=full_env, input=input, capture_output=True, text=True)


@pytest.fixture
def monkeypatch_offline(monkeypatch):
    """Never touch the network for this test (fuzzing would otherwise fetch arbitrary mirrors)."""
    monkeypatch.setenv("KIOSK_OFFLINE", "1")
