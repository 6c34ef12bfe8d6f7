"""sshd's ForceCommand for a harness device that is reached as a real one: /etc/kiosk/configuration.git is
$KIOSK_ROOT/etc/kiosk/configuration.git (the device root of tests/sshd_harness.py), as `kiosk fleet` names it.

git asks for `git-receive-pack '/etc/kiosk/configuration.git'` (or upload-pack); that one quoted path is
moved under the device root, anything else runs as the client asked (`kiosk generations --json`, which
reads KIOSK_ROOT itself). Only the tests' throwaway sshd_config names this script.
"""

import os
import sys

REPO = "'/etc/kiosk/configuration.git'"

command = os.environ.get("SSH_ORIGINAL_COMMAND", "")
root = os.environ["KIOSK_ROOT"]
if command.startswith(("git-receive-pack ", "git-upload-pack ")) and command.endswith(" " + REPO):
    command = command[: -len(REPO)] + f"'{root}/etc/kiosk/configuration.git'"
os.execv("/bin/sh", ["sh", "-c", command] if command else ["sh"])
sys.exit(127)
