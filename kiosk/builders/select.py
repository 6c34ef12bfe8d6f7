"""Which builders a spec names, with every default filled in, best first."""

from __future__ import annotations

from dataclasses import dataclass

from kiosk.core.errors import KioskError
from kiosk.core.paths import BUILDER_KEY

ARCHITECTURES = ("amd64", "arm64", "armhf", "armel")


@dataclass(frozen=True)
class Builder:
    """One machine that builds for the device, every default filled in."""

    hostName: str
    sshUser: str = "root"
    port: int = 22
    sshKey: str = BUILDER_KEY
    publicHostKey: str | None = None
    systems: tuple[str, ...] = ARCHITECTURES
    maxJobs: int = 1
    speedFactor: float = 1.0
    origin: str = "/builders/0"

    @property
    def label(self) -> str:
        host = f"[{self.hostName}]" if ":" in self.hostName else self.hostName
        return f"{host}:{self.port}"

    @property
    def known_hosts_name(self) -> str:
        return self.hostName if self.port == 22 else f"[{self.hostName}]:{self.port}"


def spec_data(spec) -> dict:
    """A loaded spec's data, or the dict itself (callers hold either)."""
    return getattr(spec, "data", spec)


def board_of(data: dict) -> dict | None:
    from kiosk.spec.hardware import load_board
    try:
        return load_board(data["hardware"])
    except (KeyError, KioskError):
        return None


def device_architecture(spec) -> str:
    board = board_of(spec_data(spec))
    if board is None:
        raise KioskError(f"unknown board {spec_data(spec).get('hardware')!r}")
    return board["architecture"]


def effective_builders(spec) -> list[Builder]:
    """The spec's builders, best first: `builders`, then Nixiosk's `localSystem` (when its hostName
    is set), sorted by speedFactor (highest first), ties in the order they are written.

    localSystem is Nixiosk's build platform: the machine that cross-built the device's system.
    So it builds for its own `system` AND for the device it is named in."""
    from kiosk.spec.load import builder_architectures

    data = spec_data(spec)
    found: list[Builder] = []
    for index, item in enumerate(data.get("builders") or []):
        found.append(Builder(
            hostName=item["hostName"], sshUser=item.get("sshUser") or "root", port=int(item.get("port") or 22),
            sshKey=item.get("sshKey") or BUILDER_KEY, publicHostKey=item.get("publicHostKey") or None,
            systems=tuple(builder_architectures(item.get("systems") or list(ARCHITECTURES))),
            maxJobs=int(item.get("maxJobs") or 1), speedFactor=float(item.get("speedFactor") or 1),
            origin=f"/builders/{index}"))
    local = data.get("localSystem") or {}
    if local.get("hostName"):
        systems = set(builder_architectures([local["system"]])) if local.get("system") else set(ARCHITECTURES)
        board = board_of(data)
        if board:
            systems.add(board["architecture"])
        builder = Builder(hostName=local["hostName"], sshUser=local.get("sshUser") or "root",
                          systems=tuple(sorted(systems)), origin="/localSystem")
        if not any((b.hostName, b.port, b.sshUser) == (builder.hostName, builder.port, builder.sshUser)
                   for b in found):
            found.append(builder)
    return [b for _, b in sorted(enumerate(found), key=lambda pair: (-pair[1].speedFactor, pair[0]))]


def names_builders(spec) -> bool:
    data = spec_data(spec)
    return bool(data.get("builders") or (data.get("localSystem") or {}).get("hostName"))


def known_hosts_text(builders: list[Builder]) -> str:
    """known_hosts lines for the builders whose host key the spec pins ([host]:port for other ports)."""
    from kiosk.spec.sshkeys import parse_public_key

    lines = []
    for b in builders:
        if b.publicHostKey:
            key = parse_public_key(b.publicHostKey)
            lines.append(f"{b.known_hosts_name} {key.type} {key.line().split()[1]}")
    return "".join(line + "\n" for line in dict.fromkeys(lines))
