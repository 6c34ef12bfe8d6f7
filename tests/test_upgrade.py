"""--upgrade (issue 17): a cached base is built again only when the Debian archive has moved on since it
was cached (a suite's Release file is newer: a security fix or an update was published)."""

from __future__ import annotations

import email.utils
import json
from pathlib import Path

import pytest

from kiosk.image import rootfs


def _release(root: Path, suite: str, epoch: int) -> None:
    directory = root / "dists" / suite
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "InRelease").write_text(f"Origin: Debian\nSuite: {suite}\n"
                                         f"Date: {email.utils.formatdate(epoch, usegmt=True)}\n")


@pytest.fixture
def archive(tmp_path):
    from fake_mirror import Server

    root = tmp_path / "mirror"
    _release(root, "bookworm", 1_700_000_000)
    _release(root, "bookworm-security", 1_700_500_000)
    server = Server(root)
    yield root, server.url
    server.close()


def test_the_archive_has_moved_when_any_suite_is_newer(archive):
    root, url = archive
    sources = [(url, "bookworm"), (url, "bookworm-security")]
    assert rootfs.archive_moved(1_700_500_000, sources) is None           # the cache is the archive's state
    assert rootfs.archive_moved(1_700_000_000, sources) == 1_700_500_000   # a security fix since
    _release(root, "bookworm-security", 1_800_000_000)
    assert rootfs.archive_moved(1_700_500_000, sources) == 1_800_000_000
    assert rootfs.archive_moved(1_700_000_000, [("http://127.0.0.1:9/debian", "bookworm")], timeout=2) is None


def _cached(tmp_path: Path, name: str, epoch: int) -> Path:
    tar = tmp_path / name
    tar.write_bytes(b"")
    rootfs.metadata_path(tar).write_text(json.dumps({"sourceDateEpoch": epoch}))
    return tar


def test_only_upgrade_builds_a_stale_base_again_and_its_top_follows(archive, tmp_path, monkeypatch):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    _, url = archive
    stage = rootfs.Stage("bookworm", "amd64", url, ("a",), ("a",), sources=((url, "bookworm"),
                                                                          (url, "bookworm-security")))
    old = _cached(tmp_path, "base-old.tar", 1_700_000_000)
    lines = []
    assert not rootfs._stale(stage, old, None, False, lines.append)        # without --upgrade: the cache stands
    assert rootfs._stale(stage, old, None, True, lines.append)
    assert "the archive has changed since the cached base" in lines[-1]
    current = _cached(tmp_path, "base-new.tar", 1_700_500_000)
    assert not rootfs._stale(stage, current, None, True, lines.append)
    assert "the cached base is the archive's current state" in lines[-1]
    # a top layer is built again whenever its base is not the one it was built on
    top = _cached(tmp_path, "top.tar", 1_700_000_000)
    assert rootfs._stale(stage, top, current, False, lines.append)
    assert not rootfs._stale(stage, top, old, False, lines.append)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1")    # a pinned build never chases the archive
    assert not rootfs._stale(stage, old, None, True, lines.append)


def test_a_mirror_caught_syncing_is_tried_again_then_said(monkeypatch):
    """apt's "Mirror sync in progress?" (an index whose size does not match its Release, seen with
    bookworm-security armhf on 2026-12-05): mmdebstrap again after a wait; other failures at once."""
    from kiosk.core.errors import KioskError

    calls, waits = [], []
    monkeypatch.setattr(rootfs.time, "sleep", waits.append)

    def failing(message):
        def run(cmd, **kwargs):
            calls.append(cmd)
            raise KioskError(message)
        return run

    monkeypatch.setattr(rootfs, "run_logged", failing("E: Failed to fetch ... File has unexpected size (1 != 2). "
                                                      "Mirror sync in progress?"))
    lines = []
    with pytest.raises(KioskError, match="the mirror was being synced during 3 tries"):
        rootfs._mmdebstrap(["mmdebstrap"], log=lines.append, verbose=False, env={})
    assert len(calls) == 3 and waits == [60, 60] and "trying again in 60 s" in lines[0]
    calls.clear()
    monkeypatch.setattr(rootfs, "run_logged", failing("E: Unable to locate package nope"))
    with pytest.raises(KioskError, match="Unable to locate"):
        rootfs._mmdebstrap(["mmdebstrap"], log=lines.append, verbose=False, env={})
    assert len(calls) == 1
