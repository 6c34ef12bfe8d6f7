"""The spec: every field's rules, exact pointers and messages, defaults, and the CLI's exit codes."""

import copy
import hashlib
import importlib
import json
import subprocess
import sys

import pytest
from conftest import ROOT, kiosk_cli

from kiosk.spec import load as specmod
from kiosk.core.errors import InvalidSpec

ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJm3XhbxwLjt9VB664C9Vr+iDThEr1j/adD4jr43+d79 sample@kiosk"
RSA = ("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC14yWU2rDsIrOqcQAwgWs+lSiKQNJh+26c/ehFn6G7mKEDlqSsfYgumgzp5TvQS6BVS2yZF"
       "TMNTB0FxjPg8SnqPMfqKADI/kTDevHqDUnVhodyUFytFpCbRS+gaOL9oyh5dzZNK9zpm8XmQWJzUN0V42G8cf9K6u/oF94gTnDpVdaqIMK2eV"
       "tkO1sXvC9VPJA55jFpXBn4cjAkmfvsBWvYWVq4TKoASLwjnStoB8XRDAPjkxYSFQ1JROy5pXBL24nM5nivunyVBt2xH1odb+AiQjRoAC7oa4J"
       "XFTR0xmbp0WI9gScGrMFYniiRc69tdAf5OCRerJAfN2O2FCgkJqLl rsa@test")
ECDSA = ("ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEGVL0Rz1/8/W2u8DCbI6oIIyT0NUPg7Zlay"
         "CjbTt2t2gPaHc2T3W6/8ongYPe80ZfPqGlcAuJg1koxrF7hCT3Q= ec@test")
# The ed25519 blob labelled as RSA: decodes, but embeds another type.
MISLABELLED = "ssh-rsa " + ED25519.split()[1]
DELETE = object()


@pytest.fixture
def base(fake_mirror):
    return {
        "hostName": "lobby",
        "hardware": "raspberryPi3",
        "authorizedKeys": [ED25519],
        "program": {"package": "cog", "executable": "/usr/bin/cog", "args": ["https://example.org/"]},
        "networks": {"cafe": "correct horse battery"},
        "locale": {"lang": "en_US.UTF-8", "regDom": "US", "timeZone": "America/New_York"},
        "debian": {"suite": "bookworm", "mirror": fake_mirror},
    }


def apply(spec, changes):
    spec = copy.deepcopy(spec)
    for ptr, value in changes:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in ptr.split("/")[1:]]
        node = spec
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = value
        elif value is DELETE:
            del node[last]
        else:
            node[last] = value
    return spec


def problems(data):
    with pytest.raises(InvalidSpec) as info:
        specmod.check(data, "nixiosk.json")
    assert info.value.exit_code == 2
    return [p.line("nixiosk.json").removeprefix("nixiosk.json: ") for p in info.value.problems]


HOST_FIX = 'use 1-63 letters, digits and hyphens, not starting or ending with a hyphen, e.g. "lobby-screen"'
KEY_FIX = "paste the whole line of your .pub file, e.g. ~/.ssh/id_ed25519.pub"
PKG_FIX = 'use a Debian package name (lower case, e.g. "htop")'
BOOL_FIX = "use true or false"
CASES = [
    # --- top level
    ("unknown-top", [("/hostname", "x")], ['/hostname: unknown field "hostname"; did you mean "hostName"?']),
    ("unknown-top-far", [("/colour", "x")],
     ['/colour: unknown field "colour"; remove it; fields here are: allowKioskLogin, allowLocalBuild, authorizedKeys, '
      'builders, debian, display, hardware, hostName, localSystem, locale, networks, packages, program, '
      'raspberryPi']),
    ("unknown-typo-network", [("/network", {})], ['/network: unknown field "network"; did you mean "networks"?']),
    ("unknown-typo-package", [("/package", [])], ['/package: unknown field "package"; did you mean "packages"?']),
    # --- hostName
    ("host-missing", [("/hostName", DELETE)], [f"/hostName: is required but missing; {HOST_FIX}"]),
    ("host-type", [("/hostName", 7)], [f"/hostName: must be a string, not a number; {HOST_FIX}"]),
    ("host-empty", [("/hostName", "")], [f"/hostName: must not be empty; {HOST_FIX}"]),
    ("host-long", [("/hostName", "a" * 64)], [f"/hostName: is 64 characters; the most allowed is 63; {HOST_FIX}"]),
    ("host-underscore", [("/hostName", "my_kiosk")],
     [f"/hostName: \"my_kiosk\" is not a valid host name: it contains '_'; {HOST_FIX}"]),
    ("host-hyphen", [("/hostName", "-kiosk")],
     [f'/hostName: "-kiosk" is not a valid host name: it starts or ends with a hyphen; {HOST_FIX}']),
    ("host-trailing-hyphen", [("/hostName", "kiosk-")],
     [f'/hostName: "kiosk-" is not a valid host name: it starts or ends with a hyphen; {HOST_FIX}']),
    ("host-dot", [("/hostName", "kiosk.local")],
     [f'/hostName: "kiosk.local" is not a valid host name: it contains a dot (give the name without .local or a '
      f'domain); {HOST_FIX}']),
    ("host-space", [("/hostName", "my kiosk")],
     [f"/hostName: \"my kiosk\" is not a valid host name: it contains ' '; {HOST_FIX}"]),
    ("host-unicode", [("/hostName", "kïosk")],
     [f"/hostName: \"kïosk\" is not a valid host name: it contains 'ï'; {HOST_FIX}"]),
    # --- hardware
    ("hw-missing", [("/hardware", DELETE)],
     ["/hardware: is required but missing; use one of raspberryPi0, raspberryPi1, raspberryPi2, raspberryPi3, "
      "raspberryPi4, qemu"]),
    ("hw-typo", [("/hardware", "raspberrypi3")], ['/hardware: "raspberrypi3" is not a valid choice; did you mean "raspberryPi3"?']),
    ("hw-typo2", [("/hardware", "raspberryPi5")], ['/hardware: "raspberryPi5" is not a valid choice; did you mean "raspberryPi4"?']),
    ("hw-nixiosk-only", [("/hardware", "ova")],
     ['/hardware: "ova" is not a valid choice; use one of raspberryPi0, raspberryPi1, raspberryPi2, raspberryPi3, '
      'raspberryPi4, qemu']),
    ("hw-type", [("/hardware", 3)],
     ["/hardware: 3 is not a valid choice; use one of raspberryPi0, raspberryPi1, raspberryPi2, raspberryPi3, "
      "raspberryPi4, qemu"]),
    # --- authorizedKeys
    ("keys-type", [("/authorizedKeys", ED25519)],
     ['/authorizedKeys: must be an array, not a string; give a list of public key lines, e.g. ["ssh-ed25519 AAAA... me@laptop"]']),
    ("keys-item-type", [("/authorizedKeys", [42])],
     ['/authorizedKeys/0: must be a string, not a number; paste one line of ~/.ssh/id_ed25519.pub, e.g. '
      '"ssh-ed25519 AAAA... me@laptop"']),
    ("keys-item-empty", [("/authorizedKeys", [""])],
     ['/authorizedKeys/0: must not be empty; paste one line of ~/.ssh/id_ed25519.pub, e.g. "ssh-ed25519 AAAA... me@laptop"']),
    ("keys-none", [("/authorizedKeys", [])],
     ["/authorizedKeys: no SSH key and allowKioskLogin is false: nobody could ever log in to the device or push "
      "to it; add your public key (cat ~/.ssh/id_ed25519.pub), or set allowKioskLogin to true"]),
    ("keys-absent", [("/authorizedKeys", DELETE)],
     ["/authorizedKeys: no SSH key and allowKioskLogin is false: nobody could ever log in to the device or push "
      "to it; add your public key (cat ~/.ssh/id_ed25519.pub), or set allowKioskLogin to true"]),
    ("key-unknown-type", [("/authorizedKeys", ["ssh-foo AAAA"])], [f"/authorizedKeys/0: this SSH key has unknown key type 'ssh-foo'; {KEY_FIX}"]),
    ("key-dss", [("/authorizedKeys", ["ssh-dss AAAAB3NzaC1kc3M="])],
     [f"/authorizedKeys/0: this SSH key is a DSA key, which OpenSSH no longer accepts; {KEY_FIX}"]),
    ("key-no-body", [("/authorizedKeys", ["ssh-ed25519"])],
     [f"/authorizedKeys/0: this SSH key has the type ssh-ed25519 but no base64 key body; {KEY_FIX}"]),
    ("key-bad-base64", [("/authorizedKeys", ["ssh-ed25519 AAAA!!!!"])],
     [f"/authorizedKeys/0: this SSH key has a key body that is not valid base64 (truncated or mangled paste?); {KEY_FIX}"]),
    ("key-truncated", [("/authorizedKeys", [ED25519[:60]])],
     [f"/authorizedKeys/0: this SSH key has a key body that is cut short or has extra bytes (truncated paste?); {KEY_FIX}"]),
    ("key-truncated-unaligned", [("/authorizedKeys", [ED25519[:61]])],
     [f"/authorizedKeys/0: this SSH key has a key body that is not valid base64 (truncated or mangled paste?); {KEY_FIX}"]),
    ("key-mislabelled", [("/authorizedKeys", [MISLABELLED])],
     [f"/authorizedKeys/0: this SSH key says ssh-rsa but its body is not a ssh-rsa key; {KEY_FIX}"]),
    ("key-private", [("/authorizedKeys", ["-----BEGIN OPENSSH PRIVATE KEY-----"])],
     [f"/authorizedKeys/0: this SSH key looks like a private key or a PEM file, not a public key line; {KEY_FIX}"]),
    ("key-two-lines", [("/authorizedKeys", [ED25519 + "\n" + RSA])],
     [f"/authorizedKeys/0: this SSH key holds more than one line; {KEY_FIX}"]),
    ("key-second-bad", [("/authorizedKeys", [RSA, ECDSA, "ssh-rsa AAAA"])],
     [f"/authorizedKeys/2: this SSH key has a key body too short to be a key; {KEY_FIX}"]),
    # --- program
    ("program-missing", [("/program", DELETE)],
     ['/program: is required but missing; give {"package": "cog", "executable": "/usr/bin/cog", "args": ["https://example.org/"]}']),
    ("program-type", [("/program", "cog")],
     ['/program: must be an object, not a string; give {"package": "cog", "executable": "/usr/bin/cog", "args": ["https://example.org/"]}']),
    ("program-unknown", [("/program/pakage", "cog")], ['/program/pakage: unknown field "pakage"; did you mean "package"?']),
    ("program-unknown-arguments", [("/program/arguments", [])],
     ['/program/arguments: unknown field "arguments"; did you mean "args"?']),
    ("package-missing", [("/program/package", DELETE)],
     ['/program/package: is required but missing; use a Debian package name (lower case, e.g. "cog")']),
    ("package-upper", [("/program/package", "Cog")],
     ['/program/package: "Cog" is not in the right form; use a Debian package name (lower case, e.g. "cog")']),
    ("package-type", [("/program/package", ["cog"])],
     ['/program/package: must be a string, not an array; use a Debian package name (lower case, e.g. "cog")']),
    ("package-not-in-archive", [("/program/package", "cogg")],
     ['/program/package: Debian bookworm has no package "cogg" for arm64 (raspberryPi3); did you mean "cog"?']),
    ("package-unknown-far", [("/program/package", "zzzzzz")],
     ['/program/package: Debian bookworm has no package "zzzzzz" for arm64 (raspberryPi3); check the name at '
      'https://packages.debian.org/bookworm/zzzzzz']),
    ("package-virtual", [("/program/package", "mail-transport-agent")],
     ['/program/package: "mail-transport-agent" is a virtual package in Debian bookworm arm64; name the package '
      'that provides it: exim4-daemon-light']),
    ("chromium-on-pi0", [("/hardware", "raspberryPi0"), ("/program/package", "chromium")],
     ['/program/package: "chromium" cannot run on raspberryPi0: Chromium needs an ARMv7 CPU (NEON); the Raspberry '
      'Pi 0/1 is ARMv6; use cog or epiphany-browser']),
    ("chromium-on-pi1", [("/hardware", "raspberryPi1"), ("/program/package", "chromium")],
     ['/program/package: "chromium" cannot run on raspberryPi1: Chromium needs an ARMv7 CPU (NEON); the Raspberry '
      'Pi 0/1 is ARMv6; use cog or epiphany-browser']),
    ("firefox-on-pi0", [("/hardware", "raspberryPi0"), ("/program/package", "firefox-esr")],
     ['/program/package: "firefox-esr" cannot run on raspberryPi0: Firefox needs an ARMv7 CPU; the Raspberry Pi '
      '0/1 is ARMv6; use cog or epiphany-browser']),
    ("executable-relative", [("/program/executable", "bin/cog")],
     ['/program/executable: "bin/cog" is not in the right form; use an absolute path inside the package, e.g. '
      '"/usr/bin/cog" (Nixiosk\'s "/bin/cog" works too)']),
    ("executable-type", [("/program/executable", None)],
     ['/program/executable: must be a string, not null; use an absolute path inside the package, e.g. '
      '"/usr/bin/cog" (Nixiosk\'s "/bin/cog" works too)']),
    ("args-string", [("/program/args", "--kiosk https://x")],
     ["/program/args: must be an array, not a string; give a list of strings; each is passed to the program as one "
      "argument, never through a shell"]),
    ("args-item-number", [("/program/args", ["--port", 80])],
     ["/program/args/1: must be a string, not a number; use a string without NUL characters"]),
    ("args-item-nul", [("/program/args", ["a\u0000b"])],
     ['/program/args/0: "a\\u0000b" is not in the right form; use a string without NUL characters']),
    # --- networks
    ("networks-type", [("/networks", ["cafe"])],
     ['/networks: must be an object, not an array; give an object {"ssid": "passphrase or 64-hex PSK"}']),
    ("network-value-type", [("/networks", {"cafe": 12345678})],
     ["/networks/cafe: must be a string or null, not a number; use the 64-hex PSK from wpa_passphrase, the 8-63 "
      "character passphrase, or null for an open network"]),
    ("network-short", [("/networks", {"cafe": "short"})],
     ["/networks/cafe: a Wi-Fi passphrase has 8 to 63 characters, this one has 5; check the passphrase, or use null "
      "for an open network"]),
    ("network-long", [("/networks", {"cafe": "x" * 70})],
     ["/networks/cafe: a Wi-Fi passphrase has 8 to 63 characters, this one has 70; check the passphrase, or use "
      "null for an open network"]),
    ("network-64-not-hex", [("/networks", {"cafe": "g" * 64})],
     ["/networks/cafe: is 64 characters but not hexadecimal, so it is neither a raw PSK nor a passphrase (8-63 "
      "characters); use the psk= line of wpa_passphrase, or the passphrase itself"]),
    ("network-non-ascii", [("/networks", {"cafe": "pässwörter"})],
     ["/networks/cafe: a Wi-Fi passphrase may only contain printable ASCII characters; give the 64-hex PSK from "
      "wpa_passphrase instead"]),
    ("network-ssid-empty", [("/networks", {"": "correct horse"})],
     ['/networks/: the name "" is empty; use the network\'s exact SSID']),
    ("network-ssid-long", [("/networks", {"s" * 33: "correct horse"})],
     [f'/networks/{"s" * 33}: the name "{"s" * 33}" is too long (an SSID has at most 32 characters); '
      "use the network's exact SSID"]),
    ("network-ssid-utf8-long", [("/networks", {"é" * 20: "correct horse"})],
     [f"/networks/{'é' * 20}: the SSID is 40 bytes in UTF-8; Wi-Fi allows 32; use the network's exact SSID"]),
    ("network-pointer-escaped", [("/networks", {"a/b": "short"})],
     ["/networks/a~1b: a Wi-Fi passphrase has 8 to 63 characters, this one has 5; check the passphrase, or use null "
      "for an open network"]),
    # --- allowKioskLogin
    ("login-type", [("/allowKioskLogin", "yes")], [f"/allowKioskLogin: must be true or false, not a string; {BOOL_FIX}"]),
    ("login-number", [("/allowKioskLogin", 1)], [f"/allowKioskLogin: must be true or false, not a number; {BOOL_FIX}"]),
    # --- locale
    ("locale-type", [("/locale", "en_US")],
     ['/locale: must be an object, not a string; give {"lang": "en_US.UTF-8", "regDom": "US", "timeZone": "America/New_York"}']),
    ("locale-unknown", [("/locale/timezone", "UTC")], ['/locale/timezone: unknown field "timezone"; did you mean "timeZone"?']),
    ("lang-form", [("/locale/lang", "english")],
     ['/locale/lang: "english" is not in the right form; use a glibc locale name such as "en_US.UTF-8" or "de_DE.UTF-8"']),
    ("lang-type", [("/locale/lang", None)],
     ['/locale/lang: must be a string, not null; use a glibc locale name such as "en_US.UTF-8" or "de_DE.UTF-8"']),
    ("regdom-lower", [("/locale/regDom", "us")],
     ['/locale/regDom: "us" is not in the right form; use an ISO 3166-1 alpha-2 country code in capitals (e.g. "US", '
      '"DE"), or "00" for world']),
    ("regdom-three", [("/locale/regDom", "USA")],
     ['/locale/regDom: "USA" is not in the right form; use an ISO 3166-1 alpha-2 country code in capitals (e.g. '
      '"US", "DE"), or "00" for world']),
    ("regdom-unknown", [("/locale/regDom", "XX")],
     ['/locale/regDom: "XX" is not an ISO 3166-1 alpha-2 country code; use your country\'s two-letter code (e.g. '
      '"US", "GB", "DE") or "00"']),
    ("tz-typo", [("/locale/timeZone", "Europe/Berln")],
     ['/locale/timeZone: "Europe/Berln" is not in the tz database; did you mean "Europe/Berlin"?']),
    ("tz-unknown", [("/locale/timeZone", "Mars/Olympus")],
     ['/locale/timeZone: "Mars/Olympus" is not in the tz database; use a tz database name such as "Europe/Berlin" or "UTC"']),
    ("tz-empty", [("/locale/timeZone", "")],
     ['/locale/timeZone: must not be empty; use a tz database name such as "Europe/Berlin" or "UTC"']),
    # --- localSystem
    ("localsystem-type", [("/localSystem", "laptop")],
     ['/localSystem: must be an object, not a string; give {"system": "x86_64-linux", "sshUser": "me", "hostName": "my-laptop"}']),
    ("localsystem-system", [("/localSystem", {"system": "x86-linux", "hostName": "h"})],
     ['/localSystem/system: "x86-linux" is not a valid choice; did you mean "x86_64-linux"?']),
    ("localsystem-user", [("/localSystem", {"sshUser": "Me Me", "hostName": "h"})],
     ['/localSystem/sshUser: "Me Me" is not in the right form; use a user name on the builder, e.g. "me"']),
    ("localsystem-host", [("/localSystem", {"hostName": "bad host"})],
     ['/localSystem/hostName: "bad host" is not in the right form; use a host name or address the device can '
      'reach, e.g. "my-laptop.local"']),
    ("localsystem-unknown", [("/localSystem", {"host": "h"})],
     ['/localSystem/host: unknown field "host"; did you mean "hostName"?']),
    # --- raspberryPi
    ("rpi-unknown", [("/raspberryPi", {"cec": True})], ['/raspberryPi/cec: unknown field "cec"; did you mean "cecSupport"?']),
    ("rpi-firmware-type", [("/raspberryPi", {"firmwareConfig": ["a=1"]})],
     ['/raspberryPi/firmwareConfig: must be a string, not an array; give config.txt lines as one string, e.g. '
      '"dtparam=audio=on\\nhdmi_force_hotplug=1"']),
    ("rpi-extra-type", [("/raspberryPi", {"enableExtraFirmware": "true"})],
     [f"/raspberryPi/enableExtraFirmware: must be true or false, not a string; {BOOL_FIX}"]),
    ("rpi-cec-type", [("/raspberryPi", {"cecSupport": None})],
     [f"/raspberryPi/cecSupport: must be true or false, not null; {BOOL_FIX}"]),
    # --- packages
    ("packages-type", [("/packages", "htop")],
     ['/packages: must be an array, not a string; give a list of Debian package names, e.g. ["htop"]']),
    ("packages-form", [("/packages", ["Htop"])], [f'/packages/0: "Htop" is not in the right form; {PKG_FIX}']),
    ("packages-dup", [("/packages", ["htop", "htop"])], ['/packages: lists "htop" more than once; list each item once']),
    ("packages-typo", [("/packages", ["htpo"])],
     ['/packages/0: Debian bookworm has no package "htpo" for arm64 (raspberryPi3); did you mean "htop"?']),
    ("packages-chromium-pi1", [("/hardware", "raspberryPi1"), ("/packages", ["chromium"])],
     ['/packages/0: "chromium" cannot run on raspberryPi1: Chromium needs an ARMv7 CPU (NEON); the Raspberry Pi '
      '0/1 is ARMv6; use cog or epiphany-browser']),
    # --- builders
    ("builders-type", [("/builders", {"hostName": "b"})], ["/builders: must be an array, not an object; give a list of builder objects"]),
    ("builder-missing-host", [("/builders", [{"port": 22}])],
     ["/builders/0/hostName: is required but missing; use a host name or address the device can reach"]),
    ("builder-port-high", [("/builders", [{"hostName": "b", "port": 70000}])],
     ["/builders/0/port: is 70000; it must be at most 65535; use a TCP port number from 1 to 65535"]),
    ("builder-port-zero", [("/builders", [{"hostName": "b", "port": 0}])],
     ["/builders/0/port: is 0; it must be at least 1; use a TCP port number from 1 to 65535"]),
    ("builder-port-float", [("/builders", [{"hostName": "b", "port": 22.5}])],
     ["/builders/0/port: must be a whole number, not a number; use a TCP port number from 1 to 65535"]),
    ("builder-speed", [("/builders", [{"hostName": "b", "speedFactor": 0}])],
     ["/builders/0/speedFactor: is 0; it must be more than 0; use a positive number; builders with higher "
      "speedFactor are tried first"]),
    ("builder-jobs", [("/builders", [{"hostName": "b", "maxJobs": 0}])],
     ["/builders/0/maxJobs: is 0; it must be at least 1; use a whole number from 1 to 256"]),
    ("builder-systems-empty", [("/builders", [{"hostName": "b", "systems": []}])],
     ["/builders/0/systems: must have at least 1 item(s); give a list of architectures the builder can build for"]),
    ("builder-systems-bad", [("/builders", [{"hostName": "b", "systems": ["arm64", "riscv64"]}])],
     ['/builders/0/systems/1: "riscv64" is not a valid choice; use Debian architectures (amd64, arm64, armhf, '
      'armel) or Nix systems (aarch64-linux, ...)']),
    ("builder-sshkey-relative", [("/builders", [{"hostName": "b", "sshKey": "id_ed25519"}])],
     ['/builders/0/sshKey: "id_ed25519" is not in the right form; use an absolute path on the device without \'..\' '
      'parts, e.g. "/var/lib/kiosk/builder_ed25519"']),
    ("builder-hostkey-bad", [("/builders", [{"hostName": "b", "publicHostKey": "ssh-ed25519 nope!"}])],
     ["/builders/0/publicHostKey: this host key has a key body that is not valid base64 (truncated or mangled "
      "paste?); paste the builder's host key line, e.g. from: ssh-keyscan -t ed25519 HOST"]),
    ("builder-dup", [("/builders", [{"hostName": "b"}, {"hostName": "b", "port": 22}])],
     ["/builders/1/hostName: builder root@b:22 is listed twice; list each builder once"]),
    ("local-build-type", [("/allowLocalBuild", "no")], [f"/allowLocalBuild: must be true or false, not a string; {BOOL_FIX}"]),
    ("builder-unknown", [("/builders", [{"hostName": "b", "user": "me"}])],
     ['/builders/0/user: unknown field "user"; remove it; fields here are: hostName, maxJobs, port, publicHostKey, '
      'speedFactor, sshKey, sshUser, systems']),
    ("builder-item-type", [("/builders", ["b"])],
     ['/builders/0: must be an object, not a string; give {"hostName": "builder.local", "sshUser": "kiosk", '
      '"publicHostKey": "ssh-ed25519 AAAA..."}']),
    # --- debian
    ("debian-suite", [("/debian/suite", "Bookworm")],
     ['/debian/suite: "Bookworm" is not in the right form; use a Debian suite name such as "bookworm"']),
    ("debian-mirror", [("/debian/mirror", "deb.debian.org/debian")],
     ['/debian/mirror: "deb.debian.org/debian" is not in the right form; use an http(s) URL of a Debian mirror, '
      'e.g. "http://deb.debian.org/debian"']),
    ("debian-unknown", [("/debian/components", ["main"])],
     ['/debian/components: unknown field "components"; remove it; fields here are: mirror, security, '
      'securityMirror, suite, updates, upgrade']),
    ("debian-upgrade", [("/debian/upgrade", "after lunch")],
     ['/debian/upgrade: "after lunch" is not in the right form; use a short label such as "2026-12-05" (letters, '
      'digits, . _ : + -)']),
    ("debian-security", [("/debian/security", "yes")],
     ['/debian/security: must be true or false, not a string; use true (Debian\'s security fixes) or false '
      '(no security suite)']),
    ("debian-updates", [("/debian/updates", 0)],
     ['/debian/updates: must be true or false, not a number; use true or false']),
    ("debian-security-mirror", [("/debian/securityMirror", "security.debian.org")],
     ['/debian/securityMirror: "security.debian.org" is not in the right form; use an http(s) URL of Debian\'s '
      'security archive, e.g. "http://deb.debian.org/debian-security"']),
    # --- several problems at once, in pointer order
    ("many", [("/hostName", "a_b"), ("/hardware", "pi3"), ("/locale/regDom", "XX")],
     ['/hardware: "pi3" is not a valid choice; use one of raspberryPi0, raspberryPi1, raspberryPi2, raspberryPi3, '
      'raspberryPi4, qemu',
      f"/hostName: \"a_b\" is not a valid host name: it contains '_'; {HOST_FIX}",
      '/locale/regDom: "XX" is not an ISO 3166-1 alpha-2 country code; use your country\'s two-letter code (e.g. '
      '"US", "GB", "DE") or "00"']),
    # --- display
    ("display-type", [("/display", "portrait")],
     ['/display: must be an object, not a string; give {"rotation": 0, "mode": "auto", "cursor": "hidden", '
      '"blanking": "never"}']),
    ("display-unknown", [("/display/rotate", 90)], ['/display/rotate: unknown field "rotate"; did you mean "rotation"?']),
    ("rotation-45", [("/display/rotation", 45)],
     ["/display/rotation: 45 is not a valid choice; use 0, 90, 180 or 270 (degrees clockwise)"]),
    ("rotation-string", [("/display/rotation", "90")],
     ['/display/rotation: "90" is not a valid choice; use 0, 90, 180 or 270 (degrees clockwise)']),
    ("mode-words", [("/display/mode", "full hd")],
     ['/display/mode: "full hd" is not in the right form; use "auto" or WIDTHxHEIGHT@REFRESH, e.g. "1920x1080@60" '
      'or "1280x720"']),
    ("mode-star", [("/display/mode", "1920*1080")],
     ['/display/mode: "1920*1080" is not in the right form; use "auto" or WIDTHxHEIGHT@REFRESH, e.g. "1920x1080@60" '
      'or "1280x720"']),
    ("mode-zero", [("/display/mode", "0x0")],
     ['/display/mode: "0x0" is not in the right form; use "auto" or WIDTHxHEIGHT@REFRESH, e.g. "1920x1080@60" '
      'or "1280x720"']),
    ("mode-newline", [("/display/mode", "auto\n")],
     ['/display/mode: "auto\\n" is not in the right form; use "auto" or WIDTHxHEIGHT@REFRESH, e.g. "1920x1080@60" '
      'or "1280x720"']),
    ("mode-number", [("/display/mode", 1080)],
     ['/display/mode: must be a string, not a number; use "auto" or WIDTHxHEIGHT@REFRESH, e.g. "1920x1080@60" '
      'or "1280x720"']),
    ("cursor-bool", [("/display/cursor", False)],
     ['/display/cursor: false is not a valid choice; use "hidden" or "visible"']),
    ("cursor-typo", [("/display/cursor", "hiden")], ['/display/cursor: "hiden" is not a valid choice; did you mean "hidden"?']),
    ("blanking-typo", [("/display/blanking", "nevr")],
     ['/display/blanking: "nevr" is not in the right form; use "never" or a number of seconds from 10 to 86400, '
      'e.g. 300']),
    ("blanking-short", [("/display/blanking", 5)],
     ['/display/blanking: is 5; it must be at least 10; use "never" or a number of seconds from 10 to 86400, e.g. 300']),
    ("blanking-long", [("/display/blanking", 100000)],
     ['/display/blanking: is 100000; it must be at most 86400; use "never" or a number of seconds from 10 to 86400, '
      'e.g. 300']),
    ("blanking-fraction", [("/display/blanking", 30.5)],
     ['/display/blanking: must be a string or a whole number, not a number; use "never" or a number of seconds from '
      '10 to 86400, e.g. 300']),
    ("blanking-bool", [("/display/blanking", False)],
     ['/display/blanking: must be a string or a whole number, not a boolean; use "never" or a number of seconds '
      'from 10 to 86400, e.g. 300']),
    ("schedule-string", [("/display/schedule", "22:00-07:00")],
     ['/display/schedule: must be an object, not a string; give {"off": "22:00", "on": "07:00", "days": ["Mon", '
      '"Tue", "Wed", "Thu", "Fri"]}']),
    ("schedule-no-on", [("/display/schedule", {"off": "22:00"})],
     ['/display/schedule/on: is required but missing; use a 24-hour time HH:MM, e.g. "07:00"']),
    ("schedule-hour", [("/display/schedule", {"off": "24:00", "on": "07:00"})],
     ['/display/schedule/off: "24:00" is not in the right form; use a 24-hour time HH:MM, e.g. "22:00"']),
    ("schedule-short-time", [("/display/schedule", {"off": "22:00", "on": "7:00"})],
     ['/display/schedule/on: "7:00" is not in the right form; use a 24-hour time HH:MM, e.g. "07:00"']),
    ("schedule-pm", [("/display/schedule", {"off": "10pm", "on": "07:00"})],
     ['/display/schedule/off: "10pm" is not in the right form; use a 24-hour time HH:MM, e.g. "22:00"']),
    ("schedule-same", [("/display/schedule", {"off": "07:00", "on": "07:00"})],
     ['/display/schedule/on: is the same time as "off" (07:00), so the screen would never be off; give two '
      'different times, e.g. "off": "22:00", "on": "07:00" (on may be the next morning)']),
    ("schedule-day-case", [("/display/schedule", {"off": "22:00", "on": "07:00", "days": ["mon"]})],
     ['/display/schedule/days/0: "mon" is not a valid choice; did you mean "Mon"?']),
    ("schedule-day-name", [("/display/schedule", {"off": "22:00", "on": "07:00", "days": ["Monday"]})],
     ['/display/schedule/days/0: "Monday" is not a valid choice; did you mean "Mon"?']),
    ("schedule-days-empty", [("/display/schedule", {"off": "22:00", "on": "07:00", "days": []})],
     ['/display/schedule/days: must have at least 1 item(s); give a list of days, e.g. ["Mon", "Tue", "Wed", '
      '"Thu", "Fri"]']),
    ("schedule-days-twice", [("/display/schedule", {"off": "22:00", "on": "07:00", "days": ["Mon", "Mon"]})],
     ['/display/schedule/days: lists "Mon" more than once; list each item once']),
    ("schedule-unknown", [("/display/schedule", {"off": "22:00", "on": "07:00", "weekdays": ["Mon"]})],
     ['/display/schedule/weekdays: unknown field "weekdays"; did you mean "days"?']),
]


def test_there_are_at_least_80_invalid_specs_covering_every_field():
    assert len(CASES) >= 80
    covered = {case[2][0].split(":")[0].split("/")[1] for case in CASES}
    assert covered >= set(specmod.schema()["properties"])


@pytest.mark.parametrize("name,changes,expected", CASES, ids=[c[0] for c in CASES])
def test_invalid_spec(base, name, changes, expected):
    assert problems(apply(base, changes)) == expected


def test_base_is_valid_and_defaults_are_filled(base):
    spec = specmod.check(base)
    data = spec.data
    assert data["allowKioskLogin"] is False
    assert data["packages"] == [] and data["builders"] == []
    assert data["raspberryPi"] == {"firmwareConfig": "", "enableExtraFirmware": False, "cecSupport": False}
    assert data["debian"]["suite"] == "bookworm"
    assert data["display"] == {"rotation": 0, "mode": "auto", "cursor": "hidden", "blanking": "never"}


def test_display_fields_that_are_valid(base):
    data = specmod.check(apply(base, [("/display", {"rotation": 270, "mode": "1920x1080@60", "cursor": "visible",
                                                   "blanking": 300, "schedule": {"off": "22:30", "on": "07:00"}})])).data
    assert data["display"]["schedule"] == {"off": "22:30", "on": "07:00",
                                           "days": ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]}
    for mode in ("auto", "1280x720", "800x480@60", "3840x2160@30"):
        assert specmod.check(apply(base, [("/display/mode", mode)])).data["display"]["mode"] == mode


def test_nixiosk_defaults(base):
    data = specmod.check(apply(base, [("/locale", DELETE), ("/program/executable", DELETE),
                                      ("/program/args", DELETE)])).data
    assert data["locale"] == {"lang": "en_US.UTF-8", "regDom": "US", "timeZone": "America/New_York"}
    assert data["program"] == {"package": "cog", "executable": "/usr/bin/cog", "args": []}
    builder = specmod.check(apply(base, [("/builders", [{"hostName": "big"}])])).data["builders"][0]
    assert builder == {"hostName": "big", "sshUser": "root", "port": 22, "sshKey": "/var/lib/kiosk/builder_ed25519",
                       "systems": ["amd64", "arm64", "armhf", "armel"], "maxJobs": 1, "speedFactor": 1}


def test_valid_variants(base):
    for changes in ([("/authorizedKeys", [RSA, ECDSA])], [("/authorizedKeys", []), ("/allowKioskLogin", True)],
                    [("/networks", {"open-cafe": None, "hexnet": "ab" * 32, "x" * 32: "12345678"})],
                    [("/locale/regDom", "00")], [("/hardware", "qemu")], [("/hardware", "raspberryPi2"),
                                                                          ("/program/package", "chromium")],
                    [("/localSystem", {"system": None, "sshUser": None, "hostName": None})],
                    [("/builders", [{"hostName": "b"}, {"hostName": "b", "port": 2222}])]):
        specmod.check(apply(base, changes))


def test_nixiosk_qemu_no_virtfs_is_accepted_with_a_warning(base):
    spec = specmod.check(apply(base, [("/hardware", "qemu-no-virtfs")]))
    assert spec.warnings == ['/hardware: "qemu-no-virtfs" is Nixiosk\'s name; kiosk builds the "qemu" target for it']


@pytest.mark.parametrize("ssid,secret,psk", [
    # IEEE 802.11i-2004 annex H.4 test vectors, the same values wpa_passphrase prints
    ("IEEE", "password", "f42c6fc52df0ebef9ebb4b90b38a5f902e83fe1b135a70e23aed762e9710a12e"),
    ("ThisIsASSID", "ThisIsAPassword", "0dc0d6eb90555ed6419756b9a15ec3e3209b63df707dd508d14581f8982721af"),
    ("my-network", "abcdefgh", "17e76a6490ac112dbeba996caa7cd1387c6ebf6ce721ef704f92b681bb2e9000"),  # Nixiosk's README
])
def test_psk_matches_wpa_passphrase(ssid, secret, psk):
    assert specmod.network_psk(ssid, secret) == psk
    assert specmod.network_psk(ssid, psk.upper()) == psk
    assert specmod.network_psk(ssid, None) is None


def test_offline_archive_is_a_warning_not_a_failure(base, monkeypatch):
    monkeypatch.setenv("KIOSK_OFFLINE", "1")
    spec = specmod.check(apply(base, [("/debian/mirror", "http://127.0.0.1:9/never")]))
    assert spec.warnings == ["/program/package: could not check the Debian archive (KIOSK_OFFLINE=1 and no cached "
                             "package index); package names were not checked for arm64"]


def test_packages_a_device_already_has_are_not_looked_up(base):
    """A push that keeps the package set never fetches the archive's index (the device has them all);
    a new package is still checked."""
    spec = apply(base, [("/debian/mirror", "http://127.0.0.1:9/debian"), ("/packages", ["less"])])
    assert specmod.check(spec, known_packages={"cog", "less"}).warnings == []
    warned = specmod.check(spec, known_packages={"cog"}).warnings
    assert len(warned) == 1 and "cannot reach http://127.0.0.1:9/debian" in warned[0]


def test_unreachable_mirror_is_a_warning(base):
    spec = specmod.check(apply(base, [("/debian/mirror", "http://127.0.0.1:9/debian")]))
    assert len(spec.warnings) == 1 and "cannot reach http://127.0.0.1:9/debian/dists/bookworm/main" in spec.warnings[0]


# ---------------------------------------------------------------- JSON syntax, through the real command

NIXIOSK_README = """{
    "hostName": "nixiosk",
    "hardware": "raspberryPi4",
    "authorizedKeys": [],
    "program": {
        "package": "cog",
        "executable": "/bin/cog",
        "args": ["https://en.wikipedia.org/"]
    },
    "networks": {
        "my-router": "0000000000000000000000000000000000000000000000000000000000000000",
    },
    "locale": {
        "timeZone": "America/New_York",
        "regDom": "US",
        "lang": "en_US.UTF-8"
    },
    "localSystem": {
        "system": "x86_64-linux",
        "sshUser": "me",
        "hostName": "my-laptop-host",
    }
}
"""


def test_nixiosk_readme_example_trailing_comma(tmp_path):
    path = tmp_path / "nixiosk.json"
    path.write_text(NIXIOSK_README)
    result = kiosk_cli("validate", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    line = '        "my-router": "0000000000000000000000000000000000000000000000000000000000000000",'
    assert result.stderr == (
        f"{path}: /networks/my-router: line 11 column 88: trailing comma before '}}' (JSON allows no comma after the "
        f"last item); remove that comma\n    {line}\n    {' ' * 87}^\n")


@pytest.mark.parametrize("text,expected", [
    ('{"hostName": "a" "hardware": "qemu"}', "/hostName: line 1 column 18: expected ',' between items; add a comma after the previous item"),
    ("{'hostName': 'a'}", "/: line 1 column 2: expected a key in double quotes; quote the key with \" (JSON has no single quotes or bare keys)"),
    ('{"program": {"args": [1,2', "/program/args/1: line 1 column 26: the file ends in the middle of the JSON; close every open '{' and '['"),
    ("", "/: line 1 column 1: the file is empty; start from nixiosk.json.sample"),
    ('{"hostName": "a\tb"}', "/hostName: line 1 column 16: a raw line break or tab inside a string; write it as \\n or \\t"),
    ('{"hostName": "a", "hostName": "b"}', "/hostName: the key 'hostName' appears twice; keep one of them (JSON readers disagree on which one wins)"),
    ("[1, 2]", "/: the spec must be a JSON object, not an array; start from nixiosk.json.sample"),
    ('{"hostName": }', "/hostName: line 1 column 14: expected a value; write a string, number, true, false, null, object or array here"),
])
def test_syntax_errors(tmp_path, text, expected):
    path = tmp_path / "s.json"
    path.write_text(text)
    result = kiosk_cli("validate", str(path))
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == f"{path}: {expected}"
    assert "Traceback" not in result.stderr


def test_unreadable_inputs(tmp_path):
    result = kiosk_cli("validate", str(tmp_path / "missing.json"))
    assert (result.returncode, result.stderr) == (
        2, f"{tmp_path}/missing.json: /: file not found; create it (cp nixiosk.json.sample nixiosk.json) or name another\n")
    (tmp_path / "latin1.json").write_bytes(b'{"hostName": "caf\xe9"}')
    result = kiosk_cli("validate", str(tmp_path / "latin1.json"))
    assert (result.returncode, result.stderr) == (
        2, f"{tmp_path}/latin1.json: /: is not UTF-8 text (bad byte at offset 17); save the file as UTF-8\n")
    result = kiosk_cli("validate", str(tmp_path))
    assert result.returncode == 2 and "must be a regular file, not a directory" in result.stderr


def test_every_problem_at_once_through_the_command(tmp_path, base):
    path = tmp_path / "nixiosk.json"
    path.write_text(json.dumps(apply(base, [("/hostName", "a_b"), ("/locale/regDom", "XX"), ("/colour", 1)])))
    result = kiosk_cli("validate", str(path))
    assert result.returncode == 2
    assert [line.split(": ")[1] for line in result.stderr.splitlines()] == ["/colour", "/hostName", "/locale/regDom"]
    assert all(line.startswith(f"{path}: /") for line in result.stderr.splitlines())


def test_default_spec_name_and_exit_zero(tmp_path, base):
    (tmp_path / "nixiosk.json").write_text(json.dumps(base))
    result = kiosk_cli("validate", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "nixiosk.json: valid: lobby on raspberryPi3, program cog (/usr/bin/cog)\n"


def test_show_json_fills_defaults_and_implies_the_board(tmp_path, base):
    (tmp_path / "nixiosk.json").write_text(json.dumps(base))
    result = kiosk_cli("show", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["spec"]["allowKioskLogin"] is False
    assert shown["specSha256"] == hashlib.sha256(specmod.canonical_json(shown["spec"]).encode()).hexdigest()
    implied = shown["implies"]
    assert implied["architecture"] == "arm64" and implied["kernel"] == "linux-image-arm64"
    assert {"cog", "cage", "linux-image-arm64", "raspi-firmware", "openssh-server"} <= set(implied["packages"])
    assert implied["packages"] == sorted(implied["packages"])
    human = kiosk_cli("show", cwd=tmp_path)
    assert human.returncode == 0 and "architecture: arm64" in human.stdout


def test_help_lists_the_commands():
    result = kiosk_cli("--help")
    assert result.returncode == 0
    for command in ("validate", "show"):
        assert command in result.stdout


def test_each_command_loads_only_its_own_stage():
    """cli.COMMANDS names the stage of every command the stages register, and nothing else."""
    import argparse

    from kiosk import cli

    registered = {}
    for stage in cli.COMMAND_MODULES:
        sub = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(stage).register(sub)
        registered.update(dict.fromkeys(sub.choices, stage))
    assert cli.COMMANDS == registered
    assert cli._stages_for(["--debug", "flash", "x.img", "/dev/sdb"]) == ("kiosk.flash.command",)
    assert cli._stages_for(["--help"]) == cli._stages_for(["nonsense"]) == cli.COMMAND_MODULES
    probe = ("import sys\nfrom kiosk import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in sys.modules if m.startswith('kiosk.')))")
    loaded = subprocess.run([sys.executable, "-c", probe, "validate", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert "kiosk.net.discover" not in loaded.stdout and "kiosk.qemu.command" not in loaded.stdout, loaded.stdout
    # Device commands run on a Pi 0, where GitPython alone takes seconds to import: only a push reads the repository.
    probe = ("import sys\nfrom kiosk import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in sys.modules if m == 'git' or m.startswith('kiosk.')))")
    for command in (["generations", "--help"], ["hook", "--help"], ["switch", "--help"]):
        loaded = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, cwd=ROOT)
        assert "kiosk.device" in loaded.stdout and "'git'" not in loaded.stdout, (command, loaded.stdout)


def test_sample_is_valid_against_the_real_archive():
    """The sample is a real kiosk: cog showing a web page on a Raspberry Pi 3 (checked against deb.debian.org)."""
    result = kiosk_cli("show", "--json", str(ROOT / "nixiosk.json.sample"))
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["spec"]["hardware"] == "raspberryPi3"
    assert shown["spec"]["program"]["package"] == "cog"
    assert shown["spec"]["program"]["args"][0].startswith("https://")
    if "could not check the Debian archive" in result.stderr:
        pytest.skip("the Debian archive is unreachable from here")
    assert result.stderr == ""


def test_every_board_has_root_slots_and_a_board_file_without_them_is_refused(tmp_path, monkeypatch):
    """Whole-system updates need root slots on every board (issue 16): the hardware schema requires them, so a
    board file without them (KIOSK_DATA_DIR names another data directory) is refused by name, not built as
    a one-root image that kiosk update could never reach."""
    import shutil

    from kiosk.core.errors import KioskError
    from kiosk.spec.hardware import board_names, load_board

    for name in board_names():
        board = load_board(name)
        assert board["slotDevicePrefix"] and board["updatePackages"], name
        assert board["bootloader"] == "grub-efi" or board["uboot"], name
    for path in ("schemas", "hardware", "hooks"):
        shutil.copytree(ROOT / path, tmp_path / path)
    pi3 = json.loads((tmp_path / "hardware/raspberryPi3.json").read_text())
    del pi3["uboot"]
    (tmp_path / "hardware/raspberryPi3.json").write_text(json.dumps(pi3))
    qemu = json.loads((tmp_path / "hardware/qemu.json").read_text())
    del qemu["slotDevicePrefix"]
    (tmp_path / "hardware/qemu.json").write_text(json.dumps(qemu))
    monkeypatch.setenv("KIOSK_DATA_DIR", str(tmp_path))
    load_board.cache_clear()
    try:
        for name, field in (("raspberryPi3", "'uboot' is a required property"),
                            ("qemu", "'slotDevicePrefix' is a required property")):
            with pytest.raises(KioskError) as info:
                load_board(name)
            assert str(info.value).splitlines()[1:] == [f"{tmp_path}/hardware/{name}.json: /: {field}"], str(info.value)
    finally:
        monkeypatch.delenv("KIOSK_DATA_DIR")
        load_board.cache_clear()
