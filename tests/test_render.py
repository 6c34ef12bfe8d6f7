"""The configuration layer: what each spec field puts on the device, secrets' modes, and argv quoting."""

import copy

import pytest
from test_spec import ED25519, RSA

from kiosk.config import render
from kiosk.spec.load import check

BASE = {
    "hostName": "lobby", "hardware": "raspberryPi3", "authorizedKeys": [ED25519, RSA],
    "program": {"package": "cog", "executable": "/usr/bin/cog", "args": ["https://example.org/"]},
    "networks": {"cafe": "correct horse battery", "open-lounge": None},
    "locale": {"lang": "de_DE.UTF-8", "regDom": "DE", "timeZone": "Europe/Berlin"},
}


@pytest.fixture
def spec(monkeypatch_offline):
    return check(copy.deepcopy(BASE)).data


def text(layer, path):
    return layer[path].data.decode()


def test_render_is_a_pure_function(spec):
    first, second = render.render(spec), render.render(copy.deepcopy(spec))
    assert {p: e.digest() for p, e in first.items()} == {p: e.digest() for p, e in second.items()}


def test_identity_and_locale(spec):
    layer = render.render(spec)
    assert text(layer, "/etc/hostname") == "lobby\n"
    assert "127.0.1.1\tlobby\n" in text(layer, "/etc/hosts")
    assert text(layer, "/etc/default/locale") == "LANG=de_DE.UTF-8\n"
    assert text(layer, "/etc/locale.gen").endswith("\nde_DE.UTF-8 UTF-8\n")
    assert layer["/etc/localtime"].target == "/usr/share/zoneinfo/Europe/Berlin"
    assert text(layer, "/etc/timezone") == "Europe/Berlin\n"
    assert text(layer, "/etc/modprobe.d/kiosk-regdom.conf").endswith("options cfg80211 ieee80211_regdom=DE\n")


def test_ssh_is_key_only_and_keys_are_root_only(spec):
    layer = render.render(spec)
    sshd = text(layer, "/etc/ssh/sshd_config.d/kiosk.conf")
    for line in ("PasswordAuthentication no", "KbdInteractiveAuthentication no", "AuthenticationMethods publickey",
                 "PermitEmptyPasswords no", "PermitRootLogin prohibit-password"):
        assert f"\n{line}\n" in sshd
    keys = layer["/root/.ssh/authorized_keys"]
    assert (keys.kind, keys.mode, keys.uid) == ("file", 0o600, 0)
    assert keys.data.decode() == f"{ED25519}\n{RSA}\n"
    assert layer["/root/.ssh"].mode == 0o700
    assert "ExecStartPre=/usr/bin/ssh-keygen -A" in text(layer, "/etc/systemd/system/ssh.service.d/kiosk-host-keys.conf")


def test_wifi_psk_file_is_0600_with_derived_psk_and_hex_ssids(spec):
    layer = render.render(spec)
    entry = layer["/etc/wpa_supplicant/wpa_supplicant-wlan0.conf"]
    assert entry.mode == 0o600 and entry.uid == 0
    conf = entry.data.decode()
    assert "country=DE\n" in conf
    from kiosk.spec.load import network_psk
    assert f"\tssid={b'cafe'.hex()}\n\tscan_ssid=1\n\tpsk={network_psk('cafe', 'correct horse battery')}\n" in conf
    assert "correct horse battery" not in conf  # only the derived PSK is stored
    assert f"\tssid={b'open-lounge'.hex()}\n\tscan_ssid=1\n\tkey_mgmt=NONE\n" in conf
    assert layer["/etc/systemd/system/multi-user.target.wants/wpa_supplicant@wlan0.service"].target == \
        "/lib/systemd/system/wpa_supplicant@.service"


def test_hostile_ssid_cannot_break_the_config(spec):
    spec["networks"] = {'evil"\n}\nnetwork={': "correct horse battery"}
    conf = text(render.render(spec), "/etc/wpa_supplicant/wpa_supplicant-wlan0.conf")
    assert [line for line in conf.splitlines() if line.startswith("network={")] == ["network={"]
    assert [line for line in conf.splitlines() if line == "}"] == ["}"]
    assert 'evil"\n' not in conf


def test_no_networks_no_wpa_supplicant(spec):
    spec["networks"] = {}
    layer = render.render(spec)
    assert not any("wpa_supplicant" in p for p in layer)


def test_no_login_console_unless_allowed(spec):
    layer = render.render(spec)
    for unit in ("getty@.service", "serial-getty@.service", "autovt@.service"):
        assert layer[f"/etc/systemd/system/{unit}"].target == "/dev/null"
    assert '/usr/sbin/nologin' in text(layer, "/etc/sysusers.d/kiosk.conf")
    spec["allowKioskLogin"] = True
    layer = render.render(spec)
    assert "/etc/systemd/system/getty@.service" not in layer
    assert "--autologin kiosk" in text(layer, "/etc/systemd/system/serial-getty@.service.d/kiosk-autologin.conf")
    assert '/bin/bash' in text(layer, "/etc/sysusers.d/kiosk.conf")


def test_kiosk_user_has_no_password(spec):
    sysusers = text(render.render(spec), "/etc/sysusers.d/kiosk.conf")
    # sysusers 'u' lines create a locked account; no layer file may carry a password hash
    assert sysusers.splitlines()[1] == 'u kiosk 990 "Kiosk display" /home/kiosk /usr/sbin/nologin'
    assert not any(p in ("/etc/shadow", "/etc/passwd") for p in render.render(spec))


def test_kiosk_unit_passes_argv_without_a_shell(spec):
    spec["program"] = {"package": "cog", "executable": "/usr/bin/cog",
                       "args": ["https://example.org/?a=1&b=$HOME", "two words", 'say "hi"', "100%", "back\\slash",
                                "line\nbreak", "; rm -rf /", "`id`"]}
    unit = text(render.render(spec), "/etc/systemd/system/kiosk.service")
    exec_start = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert exec_start == ['ExecStart=/usr/bin/cage "-d" "--" "/usr/bin/cog" "https://example.org/?a=1&b=$$HOME" '
                          '"two words" "say \\"hi\\"" "100%%" "back\\\\slash" "line\\nbreak" "; rm -rf /" "`id`"']
    assert "User=kiosk" in unit and "TTYPath=/dev/tty1" in unit and "Restart=always" in unit
    assert render.program_argv(spec)[3:] == ["/usr/bin/cog", *spec["program"]["args"]]


def test_services_are_enabled(spec):
    layer = render.render(spec)
    assert layer["/etc/systemd/system/graphical.target.wants/kiosk.service"].target == "/etc/systemd/system/kiosk.service"
    assert layer["/etc/systemd/system/multi-user.target.wants/kiosk-agent.service"].kind == "symlink"
    assert layer["/etc/systemd/system/default.target"].target == "/lib/systemd/system/graphical.target"
    assert "MulticastDNS=no" in text(layer, "/etc/systemd/resolved.conf.d/kiosk.conf")


def test_firmware_config_is_appended_for_raspberry_pi_only(spec):
    spec["raspberryPi"]["firmwareConfig"] = "dtparam=audio=on\nhdmi_force_hotplug=1"
    layer = render.render(spec)
    custom = text(layer, "/etc/default/raspi-firmware-custom")
    assert custom.endswith("arm_64bit=1\nenable_uart=1\nupstream_kernel=1\n# raspberryPi.firmwareConfig from "
                           "nixiosk.json\ndtparam=audio=on\nhdmi_force_hotplug=1\n")
    spec["hardware"] = "qemu"
    assert "/etc/default/raspi-firmware-custom" not in render.render(spec)
