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


# ---------------------------------------------------------------- display (issue 20)

def exec_start(layer) -> str:
    return next(line for line in text(layer, "/etc/systemd/system/kiosk.service").splitlines()
                if line.startswith("ExecStart="))


def test_display_defaults_add_no_rotation_no_mode_no_timers_and_hide_the_pointer(spec):
    layer = render.render(spec)
    assert exec_start(layer).startswith('ExecStart=/usr/bin/cage "-d" "--" ')
    assert "video=" not in text(layer, "/etc/default/raspi-extra-cmdline")
    assert not any("kiosk-screen" in path for path in layer)
    import json
    assert json.loads(text(layer, "/etc/kiosk/screen.json")) == {"blanking": None, "cec": False, "schedule": None}
    unit = text(layer, "/etc/systemd/system/kiosk.service")
    assert "Environment=XCURSOR_PATH=/etc/kiosk/cursors\nEnvironment=XCURSOR_THEME=default\n" in unit
    # the same layer whether the defaults are spelled out or not
    explicit = copy.deepcopy(spec)
    explicit["display"] = {"rotation": 0, "mode": "auto", "cursor": "hidden", "blanking": "never"}
    assert {p: e.digest() for p, e in render.render(explicit).items()} == {p: e.digest() for p, e in layer.items()}


@pytest.mark.parametrize("degrees,flags", [(0, []), (90, ["-r"]), (180, ["-r", "-r"]), (270, ["-r", "-r", "-r"])])
def test_rotation_is_cage_r_once_per_quarter_turn(spec, degrees, flags):
    spec["display"]["rotation"] = degrees
    assert render.program_argv(spec)[:2 + len(flags) + 1] == ["/usr/bin/cage", "-d", *flags, "--"]
    assert exec_start(render.render(spec)).startswith(
        "ExecStart=/usr/bin/cage " + " ".join(['"-d"', *('"-r"' for _ in flags), '"--"']) + " ")


def test_touchscreens_are_mapped_to_the_boards_display(spec):
    rule = text(render.render(spec), "/etc/udev/rules.d/70-kiosk-touch.rules")
    assert 'ENV{ID_INPUT_TOUCHSCREEN}=="1", ENV{WL_OUTPUT}="HDMI-A-1"' in rule
    spec["hardware"] = "qemu"
    assert 'ENV{WL_OUTPUT}="Virtual-1"' in text(render.render(spec), "/etc/udev/rules.d/70-kiosk-touch.rules")


def test_mode_is_an_edid_for_each_connector_on_the_kernel_command_line(spec):
    from kiosk.config.bootconfig import kernel_arguments
    from kiosk.config.edid import edid
    from kiosk.spec.hardware import load_board

    spec["display"]["mode"] = "1920x1080@60"
    layer = render.render(spec)
    assert text(layer, "/etc/default/raspi-extra-cmdline") == (
        "net.ifnames=0 fsck.repair=yes rootwait firmware_class.path=/etc/kiosk/firmware "
        "drm.edid_firmware=HDMI-A-1:edid/kiosk-1920x1080-60.bin quiet splash\n")
    assert layer["/etc/kiosk/firmware/edid/kiosk-1920x1080-60.bin"].data == edid("1920x1080@60")
    spec["hardware"] = "raspberryPi4"
    assert "drm.edid_firmware=HDMI-A-1:edid/kiosk-1920x1080-60.bin,HDMI-A-2:edid/kiosk-1920x1080-60.bin" in text(
        render.render(spec), "/etc/default/raspi-extra-cmdline")
    args = kernel_arguments(load_board("qemu"), spec)
    at = args.index("firmware_class.path=/etc/kiosk/firmware")
    assert args[at + 1] == "drm.edid_firmware=Virtual-1:edid/kiosk-1920x1080-60.bin"


def test_grub_boots_the_display_mode_too(spec):
    """The A/B qemu target boots through grub.cfg: the mode's EDID arguments must be on its kernel line."""
    from kiosk.image.grub import grub_cfg
    from kiosk.spec.hardware import load_board

    spec["hardware"] = "qemu"
    spec["display"]["mode"] = "1024x768@60"
    cfg = grub_cfg(load_board("qemu"), spec)
    assert "drm.edid_firmware=Virtual-1:edid/kiosk-1024x768-60.bin" in cfg, cfg
    assert "console=tty1 console=ttyS0,115200 net.ifnames=0" in cfg, cfg
    spec["display"]["mode"] = "auto"
    assert "edid" not in grub_cfg(load_board("qemu"), spec)


@pytest.mark.parametrize("mode,clock_khz,v_blank", [("1920x1080@60", 138500, 31), ("1280x720@60", 64000, 21)])
def test_the_edid_is_valid_and_its_one_timing_is_cvt_reduced_blanking(mode, clock_khz, v_blank):
    """VESA's CVT-RB figures: 1920x1080@60 is 138.5 MHz with 2080x1111 total, 1280x720@60 64 MHz with 1440x741;
    the block sums to 0 mod 256 (edid-decode --check passed these and 3840x2160@30, 800x480, 1024x600)."""
    from kiosk.config.edid import cvt_reduced_blanking, edid, parse_mode

    width, height, refresh = parse_mode(mode)
    timing = cvt_reduced_blanking(width, height, refresh)
    assert (timing["clock_khz"], timing["v_blank"]) == (clock_khz, v_blank)
    block = edid(mode)
    assert len(block) == 128 and sum(block) % 256 == 0 and block[:8] == b"\x00\xff\xff\xff\xff\xff\xff\x00"
    dtd = block[54:72]
    assert int.from_bytes(dtd[:2], "little") * 10 == clock_khz
    assert dtd[2] | (dtd[4] >> 4) << 8 == width and dtd[5] | (dtd[7] >> 4) << 8 == height
    assert block[24] & 0x02      # the first detailed timing is the preferred one


def test_a_visible_cursor_has_no_theme(spec):
    spec["display"]["cursor"] = "visible"
    layer = render.render(spec)
    assert "XCURSOR" not in text(layer, "/etc/systemd/system/kiosk.service")
    assert not any(p.startswith("/etc/kiosk/cursors") for p in layer)


def test_the_hidden_cursor_is_a_transparent_xcursor_under_every_name(spec):
    import struct
    layer = render.render(spec)
    data = layer["/etc/kiosk/cursors/default/cursors/left_ptr"].data
    assert data[:4] == b"Xcur"
    header, _version, ntoc = struct.unpack("<III", data[4:16])
    kind, size, position = struct.unpack("<III", data[16:28])
    assert (header, ntoc, kind, size) == (16, 1, 0xFFFD0002, 24)
    width, height = struct.unpack("<II", data[position + 16:position + 24])
    assert data[position + 36:] == b"\0" * 4 * width * height       # every pixel transparent
    for name in ("text", "pointer", "xterm", "hand2", "default"):
        assert layer[f"/etc/kiosk/cursors/default/cursors/{name}"].target == "left_ptr"
    assert layer["/etc/kiosk/cursors/left_ptr"].target == "default"    # cage 0.1.4's Xwayland cursor theme


def test_schedule_timers_in_the_specs_time_zone(spec):
    spec["display"]["schedule"] = {"off": "22:00", "on": "07:30", "days": ["Fri", "Sat", "Sun"]}
    layer = render.render(spec)
    off = text(layer, "/etc/systemd/system/kiosk-screen-off.timer")
    on = text(layer, "/etc/systemd/system/kiosk-screen-on.timer")
    assert "OnCalendar=Fri,Sat,Sun *-*-* 22:00:00 Europe/Berlin\nAccuracySec=1s\n" in off
    assert "OnCalendar=Mon,Sat,Sun *-*-* 07:30:00 Europe/Berlin\n" in on      # the next mornings
    assert "ExecStart=/usr/bin/kiosk screen off --by schedule\n" in text(layer, "/etc/systemd/system/kiosk-screen-off.service")
    assert "ExecStart=/usr/bin/kiosk screen on --by schedule\n" in text(layer, "/etc/systemd/system/kiosk-screen-on.service")
    for state in ("off", "on"):
        link = layer[f"/etc/systemd/system/timers.target.wants/kiosk-screen-{state}.timer"]
        assert link.target == f"/etc/systemd/system/kiosk-screen-{state}.timer"
    boot = text(layer, "/etc/systemd/system/kiosk-screen-boot.service")   # a boot inside the off window
    assert "ExecStart=/usr/bin/kiosk screen boot\n" in boot and "After=kiosk.service\n" in boot
    assert "RemainAfterExit=yes\n" in boot   # a push starts it; its health check wants it active afterwards
    assert layer["/etc/systemd/system/multi-user.target.wants/kiosk-screen-boot.service"].kind == "symlink"
    spec["display"]["schedule"] = {"off": "12:00", "on": "13:00", "days": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]}
    layer = render.render(spec)
    assert "OnCalendar=*-*-* 13:00:00 Europe/Berlin\n" in text(layer, "/etc/systemd/system/kiosk-screen-on.timer")


def test_blanking_runs_the_idle_watcher_and_cec_follows_the_spec(spec):
    import json
    spec["display"]["blanking"] = 300
    spec["raspberryPi"]["cecSupport"] = True
    layer = render.render(spec)
    assert json.loads(text(layer, "/etc/kiosk/screen.json")) == {"blanking": 300, "cec": True, "schedule": None}
    assert "ExecStart=/usr/bin/kiosk screen idle\n" in text(layer, "/etc/systemd/system/kiosk-screen-idle.service")
    assert layer["/etc/systemd/system/multi-user.target.wants/kiosk-screen-idle.service"].kind == "symlink"


def test_self_healing_watchdog_backoff_and_the_url_watcher(spec):
    layer = render.render(spec)
    assert "RuntimeWatchdogSec=30s" in text(layer, "/etc/systemd/system.conf.d/kiosk-watchdog.conf")
    unit = text(layer, "/etc/systemd/system/kiosk.service")
    assert "ExecStopPost=+/usr/bin/kiosk program-exited\n" in unit and "Restart=always\n" in unit
    assert "ExecStart=/usr/bin/kiosk watch-url\n" in text(layer, "/etc/systemd/system/kiosk-url-watch.service")
    assert layer["/etc/systemd/system/multi-user.target.wants/kiosk-url-watch.service"].kind == "symlink"
    spec["program"] = {"package": "foot", "executable": "/usr/bin/foot", "args": ["--", "htop"]}
    assert "/etc/systemd/system/kiosk-url-watch.service" not in render.render(spec)


@pytest.mark.parametrize("args,url", [
    (["https://example.org/"], "https://example.org/"),
    (["--kiosk", "--app=http://10.0.2.2:8080/x?y=1"], "http://10.0.2.2:8080/x?y=1"),
    (["--", "sh", "-c", "echo https://not.this/ page"], None),
    (["file:///srv/index.html"], None),
])
def test_the_page_the_kiosk_shows_is_found_in_its_args(args, url):
    from kiosk.config.display import web_url
    assert web_url(["/usr/bin/cage", "-d", "--", "/usr/bin/cog", *args]) == url
