"""The boards: hardware/<board>.json, each validated by schemas/hardware.schema.json."""

from __future__ import annotations

import json
from functools import lru_cache

from kiosk.core import paths
from kiosk.core.errors import KioskError

# Nixiosk targets that are the same thing here under another name.
ALIASES = {"qemu-no-virtfs": "qemu"}


def board_names() -> list[str]:
    return sorted(p.stem for p in paths.hardware_dir().glob("*.json"))


@lru_cache(maxsize=None)
def load_board(name: str) -> dict:
    """The board's data, validated; a broken hardware file is a bug in kiosk, reported as such."""
    import jsonschema

    name = ALIASES.get(name, name)
    path = paths.hardware_dir() / f"{name}.json"
    if not path.is_file():
        raise KioskError(f"unknown board {name!r}", hint=f"boards: {', '.join(board_names())}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise KioskError(f"{path}: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    schema = json.loads((paths.schemas_dir() / "hardware.schema.json").read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        lines = [f"{path}: /{'/'.join(map(str, e.path))}: {e.message}" for e in errors]
        raise KioskError("invalid hardware file:\n" + "\n".join(lines))
    if data["name"] != name:
        raise KioskError(f"{path}: /name: is {data['name']!r} but the file is named {name}.json")
    return data
