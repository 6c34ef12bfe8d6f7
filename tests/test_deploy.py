"""./deploy.sh, the README's main command, run as a user runs it: from a directory without nixiosk.json
(so the sample is used, and it says so), onto a plain file target. The real set-up, validation, build
(reusing the test run's cached base root filesystem) and copy; the copy must be the image, byte for byte."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

from kiosk.core.files import sha256_file

DEPLOY = str(ROOT / "deploy.sh")


def test_deploy_sh_help_and_missing_target(tmp_path):
    helped = subprocess.run([DEPLOY, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert helped.returncode == 0 and helped.stdout.startswith("deploy.sh TARGET [SPEC]")
    missing = subprocess.run([DEPLOY], capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.splitlines()[-1] == "deploy.sh: missing TARGET"


def test_deploy_sh_refuses_a_bad_spec_before_building(tmp_path):
    spec = tmp_path / "nixiosk.json"
    spec.write_text('{"hostName": "my_kiosk", "hardware": "raspberryPi3", "program": {"package": "cog"}}\n')
    result = subprocess.run([DEPLOY, str(tmp_path / "card.img")], capture_output=True, text=True, cwd=tmp_path,
                            env=dict(os.environ, KIOSK_OFFLINE="1"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'nixiosk.json: /hostName: "my_kiosk" is not a valid host name' in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "card.img").exists()


@pytest.mark.root
def test_deploy_sh_builds_the_sample_and_copies_it_to_a_file(tmp_path, tmp_path_factory):
    from imagetools import _cache_dir, _shared_dir

    cache = _cache_dir(_shared_dir(tmp_path_factory))
    target = tmp_path / "card.img"
    result = subprocess.run([DEPLOY, str(target)], capture_output=True, text=True, cwd=tmp_path, timeout=3600,
                            env=dict(os.environ, KIOSK_CACHE_DIR=str(cache)))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "deploy.sh: no nixiosk.json here: using the sample" in result.stderr
    manifest = json.loads((ROOT / "out" / "manifest.json").read_text())
    assert Path(manifest["image"]).name == "nixiosk-raspberryPi3.img"
    assert sha256_file(target) == manifest["imageSha256"]
