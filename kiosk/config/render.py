"""Spec -> configuration layer: every file the spec decides, and nothing else.

A pure function of (spec, board): no clock, no randomness, no reading of the
machine it runs on. The image build renders generation 1 with it and the device
renders generation N on every push, so both always agree. Secrets (the Wi-Fi
PSKs, authorized keys) get their modes here, not later.
"""

from __future__ import annotations

import json

from kiosk import __version__
from kiosk.core.paths import DATA_HOST_KEYS
from kiosk.spec.hardware import load_board
from kiosk.config.bootconfig import extra_cmdline, firmware_custom
from kiosk.config.display import (cursor_theme, display, kiosk_environment, mode_files, rotation_flags,
                                  screen_files, self_healing, touch_rule)
from kiosk.config.layer import Layer, directory, file, symlink
from kiosk.spec.sshkeys import parse_public_key
from kiosk.spec.load import network_psk

UNIT_DIR = "/etc/systemd/system"
LIB_UNITS = "/lib/systemd/system"
KIOSK_USER = "kiosk"
KIOSK_UID = 990  # fixed, so image bytes and file ownership do not depend on build order
HEADER = "# Written by kiosk from nixiosk.json; edit nixiosk.json and git push instead.\n"


def systemd_quote(arg: str) -> str:
    """One argv element as systemd's ExecStart= reads it back, byte for byte.

    systemd splits ExecStart itself (no shell), but it expands %specifiers and
    $VARIABLES and C-unescapes quoted words; all three are neutralised here.
    """
    out = []
    for c in arg:
        if c in '\\"':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02x}")
        elif c == "%":
            out.append("%%")
        elif c == "$":
            out.append("$$")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def program_argv(spec: dict) -> list[str]:
    """The exact argv cage starts: cage, its end-of-options, then the program and its args."""
    program = spec["program"]
    return ["/usr/bin/cage", "-d", *rotation_flags(spec), "--", program["executable"], *program["args"]]


def _wants(target: str, unit: str, unit_file: str) -> tuple[str, object]:
    """Enable `unit` for `target`, as `systemctl enable` would: a symlink in <target>.wants/."""
    return f"{UNIT_DIR}/{target}.wants/{unit}", symlink(unit_file)


def render(spec: dict) -> Layer:
    """The configuration layer for a validated spec (defaults filled in)."""
    board = load_board(spec["hardware"])
    layer: Layer = {}
    layer.update(_identity(spec))
    layer.update(_locale(spec))
    layer.update(_network(spec))
    layer.update(_ssh(spec))
    layer.update(_users(spec))
    layer.update(_display(spec, board))
    layer.update(_agent())
    layer.update(_boot_settings(spec, board))
    return layer


def _identity(spec: dict) -> Layer:
    host = spec["hostName"]
    return {
        "/etc/hostname": file(f"{host}\n"),
        "/etc/hosts": file(f"127.0.0.1\tlocalhost\n127.0.1.1\t{host}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                           "ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"),
        "/etc/kiosk/release.json": file(json.dumps({"kioskVersion": __version__, "hostName": host,
                                                    "hardware": spec["hardware"]}, sort_keys=True) + "\n"),
    }


def _locale(spec: dict) -> Layer:
    locale = spec["locale"]
    lang, charset = locale["lang"], "UTF-8"
    # locale-gen runs on the device (natively, seconds) rather than under emulation at build time;
    # the unit names the locale, so a push that changes it changes the unit and restarts it.
    unit = (HEADER + f"[Unit]\nDescription=Kiosk: generate the {lang} locale\nBefore=kiosk.service\n"
            "ConditionPathExists=/usr/sbin/locale-gen\n\n"
            "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/usr/sbin/locale-gen --keep-existing\n\n"
            "[Install]\nWantedBy=multi-user.target\n")
    path, link = _wants("multi-user.target", "kiosk-locale.service", f"{UNIT_DIR}/kiosk-locale.service")
    return {
        f"{UNIT_DIR}/kiosk-locale.service": file(unit),
        path: link,
        "/etc/default/locale": file(f"LANG={lang}\n"),
        "/etc/locale.gen": file(HEADER + f"{lang} {charset}\n"),
        "/etc/timezone": file(f"{locale['timeZone']}\n"),
        "/etc/localtime": symlink(f"/usr/share/zoneinfo/{locale['timeZone']}"),
        # Nixiosk sets the regulatory domain through cfg80211, and wpa_supplicant agrees (country=).
        "/etc/modprobe.d/kiosk-regdom.conf": file(HEADER + f"options cfg80211 ieee80211_regdom={locale['regDom']}\n"),
    }


def _network(spec: dict) -> Layer:
    layer: Layer = {
        # DHCP on every wired-ish link (eth*, en*, and usb0: QEMU's raspi machines) and on Wi-Fi.
        "/etc/systemd/network/20-kiosk-wired.network": file(
            HEADER + "[Match]\nName=eth* en* usb*\n\n[Network]\nDHCP=yes\nIPv6AcceptRA=yes\nLinkLocalAddressing=yes\n"),
        "/etc/systemd/network/25-kiosk-wireless.network": file(
            HEADER + "[Match]\nName=wlan*\n\n[Network]\nDHCP=yes\nIPv6AcceptRA=yes\nLinkLocalAddressing=yes\n"
            "IgnoreCarrierLoss=3s\n"),
        # The device agent answers mDNS; resolved must not bind 5353 too.
        "/etc/systemd/resolved.conf.d/kiosk.conf": file(HEADER + "[Resolve]\nMulticastDNS=no\nLLMNR=no\n"),
        "/etc/resolv.conf": symlink("/run/systemd/resolve/stub-resolv.conf"),
    }
    # No wait-online: a kiosk without network must still show its program at once.
    for target, unit in (("multi-user.target", "systemd-networkd.service"), ("sockets.target", "systemd-networkd.socket"),
                         ("multi-user.target", "systemd-resolved.service"),
                         ("sysinit.target", "systemd-timesyncd.service")):
        path, link = _wants(target, unit, f"{LIB_UNITS}/{unit}")
        layer[path] = link
    networks = spec["networks"]
    if networks:
        blocks = []
        for ssid in sorted(networks):
            psk = network_psk(ssid, networks[ssid])
            # ssid as hex: no quoting rules for the SSID's characters to get wrong.
            lines = [f"\t# ssid {json.dumps(ssid, ensure_ascii=True)}", f"\tssid={ssid.encode().hex()}",
                     "\tscan_ssid=1"]
            lines += [f"\tpsk={psk}", "\tkey_mgmt=WPA-PSK"] if psk else ["\tkey_mgmt=NONE"]
            blocks.append("network={\n" + "\n".join(lines) + "\n}\n")
        conf = (HEADER + "ctrl_interface=DIR=/run/wpa_supplicant GROUP=netdev\nupdate_config=0\n"
                f"country={spec['locale']['regDom']}\n\n" + "\n".join(blocks))
        layer["/etc/wpa_supplicant/wpa_supplicant-wlan0.conf"] = file(conf, mode=0o600)
        path, link = _wants("multi-user.target", "wpa_supplicant@wlan0.service", f"{LIB_UNITS}/wpa_supplicant@.service")
        layer[path] = link
    return layer


def _ssh(spec: dict) -> Layer:
    keys = "".join(parse_public_key(k).line() + "\n" for k in spec["authorizedKeys"])
    # The host keys live on the data partition: the device keeps its identity across slots.
    keygen = f"/usr/bin/ssh-keygen -A -f {DATA_HOST_KEYS}"
    host_keys = "".join(f"HostKey {DATA_HOST_KEYS}/etc/ssh/ssh_host_{kind}_key\n"
                        for kind in ("ecdsa", "ed25519", "rsa"))
    return {
        "/etc/ssh/sshd_config.d/kiosk.conf": file(
            HEADER + "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitEmptyPasswords no\n"
            "AuthenticationMethods publickey\nPermitRootLogin prohibit-password\n"
            "AuthorizedKeysFile .ssh/authorized_keys\n" + host_keys),
        # Host keys are made on the device at first start, never baked into an image.
        f"{UNIT_DIR}/ssh.service.d/kiosk-host-keys.conf": file(
            HEADER + "[Service]\n"
            # ssh.service's own ExecStartPre (sshd -t) would run first and fail without keys: reset the list.
            f"ExecStartPre=\nExecStartPre={keygen}\nExecStartPre=/usr/sbin/sshd -t\n"
            # The first start makes an RSA key: 40 s on a raspi0 under QEMU, over the 90 s default when busy.
            "TimeoutStartSec=10min\n"),
        "/root/.ssh": directory(0o700),
        "/root/.ssh/authorized_keys": file(keys, mode=0o600),
    }


def _users(spec: dict) -> Layer:
    shell = "/bin/bash" if spec["allowKioskLogin"] else "/usr/sbin/nologin"
    layer: Layer = {
        # systemd-sysusers creates the user with a locked password ("!*"): no hash anywhere.
        "/etc/sysusers.d/kiosk.conf": file(
            HEADER + f'u {KIOSK_USER} {KIOSK_UID} "Kiosk display" /home/{KIOSK_USER} {shell}\n'
            f"m {KIOSK_USER} video\nm {KIOSK_USER} render\nm {KIOSK_USER} input\nm {KIOSK_USER} audio\n"),
        "/etc/tmpfiles.d/kiosk.conf": file(HEADER + f"d /home/{KIOSK_USER} 0700 {KIOSK_USER} {KIOSK_USER} -\n"),
    }
    if spec["allowKioskLogin"]:
        # A console for debugging: the unprivileged kiosk user, still no password.
        layer[f"{UNIT_DIR}/serial-getty@.service.d/kiosk-autologin.conf"] = file(
            HEADER + f"[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin {KIOSK_USER} --keep-baud "
            "115200,57600,38400,9600 - $TERM\n")
        layer[f"{UNIT_DIR}/getty@tty2.service.d/kiosk-autologin.conf"] = file(
            HEADER + f"[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin {KIOSK_USER} --noclear - $TERM\n")
        path, link = _wants("getty.target", "getty@tty2.service", f"{LIB_UNITS}/getty@.service")
        layer[path] = link
    else:
        # No login prompt anywhere: not on the screen, not on the serial line.
        for unit in ("getty@.service", "serial-getty@.service", "autovt@.service", "console-getty.service"):
            layer[f"{UNIT_DIR}/{unit}"] = symlink("/dev/null")
    return layer


def _display(spec: dict, board: dict) -> Layer:
    cage, *rest = program_argv(spec)
    argv = " ".join([cage] + [systemd_quote(a) for a in rest])
    unit = (HEADER + "[Unit]\n"
            f"Description=Kiosk: {spec['program']['package']} full-screen under cage\n"
            "After=systemd-user-sessions.service plymouth-quit-wait.service systemd-logind.service seatd.service\n"
            "Wants=seatd.service\n"
            "Conflicts=getty@tty1.service\nStartLimitIntervalSec=0\n\n"
            "[Service]\n"
            # No PAMName= (no logind session): under PAM cage 0.1.4's final waitpid(0) waits for systemd's
            # (sd-pam) helper after a failed start and never exits, so Restart= never fires (notes/boot.md).
            # seatd gives the seat; the runtime directory is the unit's own; logs stay in the unit's journal.
            f"User={KIOSK_USER}\nTTYPath=/dev/tty1\nTTYReset=yes\nTTYVHangup=yes\n"
            "TTYVTDisallocate=yes\nStandardInput=tty-fail\nStandardOutput=journal\nStandardError=journal\n"
            "UtmpIdentifier=tty1\nUtmpMode=user\n"
            f"WorkingDirectory=/home/{KIOSK_USER}\n"
            "RuntimeDirectory=kiosk\nRuntimeDirectoryMode=0700\n"
            "Environment=XDG_RUNTIME_DIR=/run/kiosk\n"
            "EnvironmentFile=-/etc/default/locale\n"
            "Environment=XDG_SESSION_TYPE=wayland\n"
            # seatd, not logind: logind refuses Activate to a non-root session owner without polkit.
            "Environment=LIBSEAT_BACKEND=seatd\n"
            # Software rendering where the board has no GPU driver (QEMU); harmless on real boards.
            "Environment=WLR_RENDERER_ALLOW_SOFTWARE=1\n"
            "Environment=WLR_NO_HARDWARE_CURSORS=1\n"
            + kiosk_environment(spec) +
            f"ExecStart={argv}\n"
            # Runs as root after every stop: says why the program ended and waits out the back-off
            # (2 s doubling to 60 s while it keeps failing fast) before Restart= starts it again.
            "ExecStopPost=+/usr/bin/kiosk program-exited\nTimeoutStopSec=120\n"
            "Restart=always\nRestartSec=2\n\n"
            "[Install]\nWantedBy=graphical.target\n")
    layer: Layer = {
        f"{UNIT_DIR}/kiosk.service": file(unit),
        f"{UNIT_DIR}/default.target": symlink(f"{LIB_UNITS}/graphical.target"),
        "/etc/plymouth/plymouthd.conf": file(HEADER + "[Daemon]\nTheme=spinner\nShowDelay=0\n"),
        "/etc/kiosk/program.json": file(json.dumps(program_argv(spec)) + "\n"),
    }
    path, link = _wants("graphical.target", "kiosk.service", f"{UNIT_DIR}/kiosk.service")
    layer[path] = link
    if display(spec)["cursor"] == "hidden":
        layer.update(cursor_theme())
    layer.update(screen_files(spec))
    layer.update(touch_rule(board))
    layer.update(mode_files(spec))
    layer.update(self_healing(spec, program_argv(spec)))
    return layer


def _agent() -> Layer:
    unit = (HEADER + "[Unit]\nDescription=Kiosk device agent: <hostName>.local over mDNS\n"
            "After=network.target\nWants=network.target\n\n"
            "[Service]\nExecStart=/usr/bin/kiosk agent\nExecReload=/bin/kill -HUP $MAINPID\nRestart=always\nRestartSec=2\n"
            "NoNewPrivileges=yes\nProtectSystem=strict\nProtectHome=yes\nPrivateTmp=yes\n\n"
            "[Install]\nWantedBy=multi-user.target\n")
    path, link = _wants("multi-user.target", "kiosk-agent.service", f"{UNIT_DIR}/kiosk-agent.service")
    return {f"{UNIT_DIR}/kiosk-agent.service": file(unit), path: link}


def _boot_settings(spec: dict, board: dict) -> Layer:
    """What config.txt and cmdline.txt are made from (config.bootconfig): by the image build, by every
    switch (device.bootconfig writes them to the firmware partition), and by raspi-firmware's own hook
    after a kernel update on the device."""
    if board["bootloader"] == "grub-efi":   # grub.cfg reads cmdline.cfg, which the switch writes from this
        from kiosk.config.bootconfig import KIOSK_CMDLINE, efi_kernel_arguments

        return {KIOSK_CMDLINE: file(" ".join(efi_kernel_arguments(board, spec)) + "\n")}
    return {
        "/etc/default/raspi-firmware-custom": file(HEADER + firmware_custom(spec, board)),
        "/etc/default/raspi-extra-cmdline": file(extra_cmdline(board, spec)),
    }