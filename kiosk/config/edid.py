"""display.mode as an EDID the kernel loads instead of the screen's own (drm.edid_firmware=).

cage 0.1.4 sets the output's *preferred* mode (wlr_output_preferred_mode) and offers no way to choose
another; the kernel's `video=CONNECTOR:MODE` adds a user-defined mode that wlroots 0.15 lists but never
picks (seen: cage stayed at 1280x800 on q35 with video=Virtual-1:1024x768@60). An EDID override makes
the wanted mode the connector's only, preferred, mode: cage then runs at 1024x768@60 (seen, with the
kernel's built-in edid/1024x768.bin). This module writes such an EDID for any WIDTHxHEIGHT@REFRESH:
one detailed timing with CVT reduced blanking (VESA CVT 1.1), in an EDID 1.3 base block.
"""

from __future__ import annotations

import math
import re
import struct

MODE = re.compile(r"([0-9]+)x([0-9]+)(?:@([0-9]+))?")


def parse_mode(mode: str) -> tuple[int, int, int]:
    match = MODE.fullmatch(mode)
    if not match:
        raise ValueError(f"not a mode: {mode!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 60)


def cvt_reduced_blanking(width: int, height: int, refresh: int) -> dict:
    """CVT 1.1 reduced-blanking timing: fixed 160-pixel horizontal blank, at least 460 us of vertical blank."""
    h_blank, h_front, h_sync = 160, 48, 32
    v_front, min_v_back = 3, 6
    ratio = width / height
    v_sync = next((lines for r, lines in ((4 / 3, 4), (16 / 9, 5), (16 / 10, 6), (5 / 4, 7), (15 / 9, 7))
                   if abs(ratio - r) < 0.01), 10)
    h_period = (1e6 / refresh - 460) / height                    # microseconds per line, estimated
    v_blank = max(math.floor(460 / h_period) + 1, v_front + v_sync + min_v_back)
    h_total, v_total = width + h_blank, height + v_blank
    clock_khz = int(refresh * h_total * v_total / 1000 / 250) * 250   # CVT's 0.25 MHz step
    return {"clock_khz": clock_khz, "width": width, "h_blank": h_blank, "h_front": h_front, "h_sync": h_sync,
            "height": height, "v_blank": v_blank, "v_front": v_front, "v_sync": v_sync}


def _detailed_timing(t: dict, width_mm: int, height_mm: int) -> bytes:
    w, hb, hf, hs = t["width"], t["h_blank"], t["h_front"], t["h_sync"]
    h, vb, vf, vs = t["height"], t["v_blank"], t["v_front"], t["v_sync"]
    return bytes([
        *struct.pack("<H", t["clock_khz"] // 10),
        w & 0xFF, hb & 0xFF, ((w >> 8) << 4) | (hb >> 8),
        h & 0xFF, vb & 0xFF, ((h >> 8) << 4) | (vb >> 8),
        hf & 0xFF, hs & 0xFF, ((vf & 0xF) << 4) | (vs & 0xF),
        ((hf >> 8) << 6) | ((hs >> 8) << 4) | ((vf >> 4) << 2) | (vs >> 4),
        width_mm & 0xFF, height_mm & 0xFF, ((width_mm >> 8) << 4) | (height_mm >> 8),
        0, 0,
        0x1A,   # digital separate sync, +hsync -vsync (CVT reduced blanking)
    ])


def _text_descriptor(tag: int, text: str) -> bytes:
    body = text.encode("ascii")[:13]
    body += b"\n" + b" " * (12 - len(body)) if len(body) < 13 else b""
    return bytes([0, 0, 0, tag, 0]) + body


def edid(mode: str) -> bytes:
    """A 128-byte EDID 1.3 whose preferred (and only) mode is `mode` ("1280x720@60")."""
    width, height, refresh = parse_mode(mode)
    timing = cvt_reduced_blanking(width, height, refresh)
    width_mm, height_mm = round(width * 25.4 / 96), round(height * 25.4 / 96)   # a 96 dpi screen
    h_rate_khz = timing["clock_khz"] / (width + timing["h_blank"])
    block = bytearray(b"\x00\xff\xff\xff\xff\xff\xff\x00")
    block += struct.pack(">H", (ord("L") - 64) << 10 | (ord("N") - 64) << 5 | (ord("X") - 64))   # "LNX" like the kernel's
    block += struct.pack("<HI", 0x4B10, 0) + bytes([1, 34, 1, 3])   # product, serial, week 1 of 2024, EDID 1.3
    block += bytes([0x80, max(1, width_mm // 10), max(1, height_mm // 10), 0x78, 0x0E])   # digital, cm, gamma 2.2, sRGB
    block += bytes([0xEE, 0x91, 0xA3, 0x54, 0x4C, 0x99, 0x26, 0x0F, 0x50, 0x54])          # sRGB chromaticity
    block += bytes([0, 0, 0]) + b"\x01\x01" * 8                                        # no other timings
    block += _detailed_timing(timing, width_mm, height_mm)
    block += bytes([0, 0, 0, 0xFD, 0, max(1, refresh - 1), refresh + 1, max(1, int(h_rate_khz) - 1),
                    int(h_rate_khz) + 2, math.ceil(timing["clock_khz"] / 10000) + 1, 0, 0x0A]) + b" " * 6
    block += _text_descriptor(0xFC, "kiosk")
    block += bytes([0, 0, 0, 0x10, 0]) + bytes(13)                                      # unused descriptor
    block += bytes([0])                                                                 # no extensions
    block += bytes([(-sum(block)) & 0xFF])
    assert len(block) == 128
    return bytes(block)
