#!/usr/bin/env bash
# deploy.sh TARGET [SPEC]: validate the spec, build its SD image (reusing the cache), write it to TARGET.
#
#   TARGET  an SD card (/dev/mmcblk0, /dev/sdX, /dev/disk/by-id/...) or a plain file path (the image is
#           copied there, e.g. ./deploy.sh out/card.img)
#   SPEC    the spec (default: nixiosk.json; without one, nixiosk.json.sample is used and you are told so)
#
# Installs what it needs on Debian/Ubuntu first, asking for sudo only for that and for writing the card.
# Extra options go to `kiosk flash` (e.g. --yes, --no-verify); see `.venv/bin/kiosk flash --help`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

usage() { sed -n '2,10s/^# \{0,1\}//p' "$0"; }
case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    "") usage >&2; echo "deploy.sh: missing TARGET" >&2; exit 2 ;;
esac
target=$1; shift
spec=""
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then spec=$1; shift; fi
flash_opts=("$@")

if [ -z "$spec" ]; then
    if [ -f nixiosk.json ]; then
        spec=nixiosk.json
    else
        spec="$here/nixiosk.json.sample"
        echo "deploy.sh: no nixiosk.json here: using the sample ($spec)." >&2
        echo "deploy.sh: copy it to nixiosk.json and put your own SSH key in authorizedKeys to log in to the device." >&2
    fi
fi

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

"$here/scripts/install-deps.sh" build
if [ ! -x "$here/.venv/bin/kiosk" ]; then
    echo "deploy.sh: setting up kiosk in $here/.venv" >&2
    python3 -m venv "$here/.venv"
    "$here/.venv/bin/python" -m pip install -q -e "$here"
fi
kiosk="$here/.venv/bin/kiosk"

"$kiosk" validate "$spec"

out="$here/out"
# kiosk build also runs as a user (README, "Building as a user"); here root builds, as root writes the card.
as_root "$kiosk" build "$spec" -o "$out"

image=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["image"])' "$out/manifest.json")
if [ -b "$target" ] || [ -b "$(readlink -f "$target" 2>/dev/null || echo "$target")" ]; then
    as_root "$kiosk" flash "$image" "$target" "${flash_opts[@]}"
else
    "$kiosk" flash "$image" "$target" "${flash_opts[@]}"
fi
