"""Spec text to JSON data, one way for every reader, with limits that hold before anything is parsed.

Every spec kiosk reads (a file, a pushed commit, a request to a builder, a stored generation) goes
through parse_json: a UTF-8 byte-order mark is dropped, the text may be at most MAX_BYTES, nest at
most MAX_DEPTH containers (checked by a scan of the brackets before the recursive JSON parser runs),
hold no NaN or Infinity (not JSON), no integer with more than MAX_DIGITS digits and no number too
large for a float. value_problems checks parsed data the same way, and refuses lone UTF-16
surrogates ("\\ud800"), which are not characters and cannot be written out as UTF-8.
Every limit is one problem line with the JSON pointer of the place.
"""

from __future__ import annotations

import json
import math
import re

from kiosk.core.errors import InvalidSpec, Problem, one_line
from kiosk.core.files import human_size

BOM = "\ufeff"
MAX_BYTES = 1 << 20      # a real spec is a few KiB
MAX_DEPTH = 16           # the deepest real path is /builders/0/systems/0 (4 containers)
MAX_DIGITS = 30          # the largest real number is a port (5 digits)
MAX_KEY = 256            # field names are short; an SSID is at most 32 bytes

# A JSON string, or an unterminated one up to the end (the parser stops there too, without recursing).
_STRING = re.compile(r'"(?:[^"\\]++|\\[\s\S])*+\\?(?P<end>"|\Z)')
_BRACKET = re.compile(r"[\[\]{}]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def pointer(parts) -> str:
    """RFC 6901 JSON pointer of a path."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pointer_at(text: str, pos: int) -> str:
    """The JSON pointer of the value being parsed at `pos` (best effort, for syntax errors; long keys shortened)."""
    stack: list[list] = []  # [kind, key or index]
    i, in_string, start, last_string = 0, False, 0, None
    while i < min(pos, len(text)):
        c = text[i]
        if in_string:
            if c == "\\":
                i += 1
            elif c == '"':
                in_string = False
                last_string = text[start + 1:i]
        elif c == '"':
            in_string, start = True, i
        elif c == "{":
            stack.append(["{", None])
        elif c == "[":
            stack.append(["[", 0])
        elif c in "}]":
            if stack:
                stack.pop()
        elif c == ":" and stack and stack[-1][0] == "{":
            stack[-1][1] = last_string
        elif c == "," and stack:
            if stack[-1][0] == "[":
                stack[-1][1] += 1
            else:
                stack[-1][1] = None
        i += 1
    return pointer(_short(key, 64) if isinstance(key, str) else key for kind, key in stack if key is not None)


def _blank_strings(text: str) -> str:
    """The text with every string's inside replaced by spaces: same length, brackets and numbers only outside."""
    return _STRING.sub(lambda m: '"' + " " * (len(m.group()) - 1 - len(m["end"])) + m["end"], text)


# ---------------------------------------------------------------- limits on the text

class _BadNumber(Exception):
    def __init__(self, literal: str, message: str):
        self.literal, self.message = literal, message


def _parse_int(literal: str):
    digits = len(literal.lstrip("-"))
    if digits > MAX_DIGITS:
        raise _BadNumber(literal, f"a number with {digits} digits is far larger than any value a spec holds")
    return int(literal)


def _parse_float(literal: str):
    value = float(literal)
    if not math.isfinite(value):
        raise _BadNumber(literal, f"{_short(literal)} is too large for a number")
    return value


def _parse_constant(literal: str):
    raise _BadNumber(literal, f"{literal} is not a JSON number (JSON has no NaN or Infinity)")


def too_large(source: str) -> InvalidSpec:
    """The one problem of a spec over MAX_BYTES, whoever reads it."""
    return InvalidSpec(source, [Problem("", f"is larger than {human_size(MAX_BYTES)}, the most a spec may be",
                                        "a spec is a few KiB: look for a pasted file or a data: URL in it")])


def _text_limits(text: str, source: str, max_bytes: int) -> None:
    size = len(text.encode("utf-8", "surrogatepass")) if len(text) <= max_bytes else len(text)
    if size > max_bytes:
        raise too_large(source) if max_bytes == MAX_BYTES else InvalidSpec(source, [Problem(
            "", f"is larger than {human_size(max_bytes)}, the most kiosk reads here", "")])
    blanked = _blank_strings(text)
    depth = 0
    for match in _BRACKET.finditer(blanked):
        depth += 1 if match.group() in "[{" else -1
        if depth > MAX_DEPTH:
            where = pointer_at(text, match.start())
            raise InvalidSpec(source, [Problem(where or "", f"nests more than {MAX_DEPTH} levels of '[' and '{{' "
                                               "here", "no field of a spec is nested that deep; remove the extra "
                                               "levels")])


def _number_problem(text: str, bad: _BadNumber, source: str) -> InvalidSpec:
    blanked = _blank_strings(text)
    found = re.search(r"(?<![\w.+-])" + re.escape(bad.literal) + r"(?![\w.])", blanked)
    where = pointer_at(text, found.start()) if found else ""
    return InvalidSpec(source, [Problem(where, bad.message, "write an ordinary number, e.g. 22 or 1.5")])


# ---------------------------------------------------------------- syntax errors

class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _reject_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _excerpt(line: str, column: int, width: int = 60) -> tuple[str, int]:
    """The part of a (maybe very long) line around `column`, escaped to one line, and the caret's offset in it."""
    if len(line) <= 2 * width + 40:
        return one_line(line), len(one_line(line[:column - 1]))
    start = max(0, column - 1 - width)
    before, after = line[start:column - 1], line[column - 1:column - 1 + width]
    prefix = ("..." if start else "") + one_line(before)
    suffix = one_line(after) + ("..." if column - 1 + width < len(line) else "")
    return prefix + suffix, len(prefix)


def _syntax_error(text: str, exc: json.JSONDecodeError, source: str) -> InvalidSpec:
    lineno, colno, pos = exc.lineno, exc.colno, exc.pos
    message, fix = exc.msg, "fix the JSON syntax at that point"
    before = text[:pos].rstrip()
    if before.endswith(",") and text[pos:pos + 1] in ("}", "]"):
        comma = len(before) - 1
        lineno = text.count("\n", 0, comma) + 1
        colno = comma - (text.rfind("\n", 0, comma) + 1) + 1
        pos = comma
        message = f"trailing comma before '{text[exc.pos]}' (JSON allows no comma after the last item)"
        fix = "remove that comma"
    elif not text[pos:].strip():
        end = len(text.rstrip())
        lineno = text.count("\n", 0, end) + 1
        colno = end - (text.rfind("\n", 0, end) + 1) + 1
        pos = end
        message = "the file ends in the middle of the JSON" if text.strip() else "the file is empty"
        fix = "close every open '{' and '['" if text.strip() else "start from nixiosk.json.sample"
    elif "Expecting property name" in exc.msg:
        message, fix = "expected a key in double quotes", "quote the key with \" (JSON has no single quotes or bare keys)"
    elif exc.msg.startswith("Expecting ',' delimiter"):
        message, fix = "expected ',' between items", "add a comma after the previous item"
    elif exc.msg.startswith("Invalid control character"):
        message, fix = "a raw line break or tab inside a string", "write it as \\n or \\t"
    elif exc.msg.startswith("Unterminated string"):
        message, fix = "this string is never closed", "add the closing \" (and write a \" inside a string as \\\")"
    elif exc.msg.startswith("Expecting value"):
        message, fix = "expected a value", "write a string, number, true, false, null, object or array here"
    lines = text.splitlines()
    line_text = lines[lineno - 1] if 0 < lineno <= len(lines) else ""
    shown, caret = _excerpt(line_text, colno)
    where = pointer_at(text, pos) or "/"
    return InvalidSpec(source, [Problem(where, f"line {lineno} column {colno}: {message}", fix)],
                       detail=f"    {shown}\n    {' ' * caret}^")


def parse_json(text: str, source: str, *, max_bytes: int = MAX_BYTES):
    """Parse spec text (a leading BOM dropped); a syntax error or a broken limit becomes InvalidSpec.

    max_bytes: a larger bound for JSON that carries more than a spec (a builder request, which may
    hold a device's dpkg status); nesting and number limits stay the same."""
    text = text.removeprefix(BOM)
    _text_limits(text, source, max_bytes)
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicates, parse_int=_parse_int,
                          parse_float=_parse_float, parse_constant=_parse_constant)
    except _BadNumber as bad:
        raise _number_problem(text, bad, source) from None
    except _DuplicateKey as dup:
        first = text.find(json.dumps(dup.key))
        where = text.find(json.dumps(dup.key), first + 1)
        raise InvalidSpec(source, [Problem(
            pointer_at(text, where) + pointer([_short(dup.key, 64)]), f"the key {_short(repr(dup.key))} appears twice",
            "keep one of them (JSON readers disagree on which one wins)")]) from None
    except json.JSONDecodeError as exc:
        raise _syntax_error(text, exc, source) from None
    except (RecursionError, ValueError, MemoryError) as exc:  # the limits above should make these unreachable
        raise InvalidSpec(source, [Problem("", f"cannot be read as JSON ({type(exc).__name__})",
                                           "check the file is the spec you meant")]) from None


# ---------------------------------------------------------------- limits on parsed data

def value_problems(data) -> tuple[list[Problem], bool]:
    """Lone surrogates, non-finite or huge numbers, over-long keys and over-deep nesting, anywhere in `data`.

    Returns (problems, fatal): when fatal (too deep, or an integer Python cannot even print), nothing
    else (the schema validator) may look at the data."""
    problems: list[Problem] = []
    fatal = False
    stack = [((), data, 0)]
    while stack:
        path, value, depth = stack.pop()
        if isinstance(value, (dict, list)) and depth >= MAX_DEPTH:
            problems.append(Problem(pointer(path), f"nests more than {MAX_DEPTH} levels of '[' and '{{' here",
                                    "no field of a spec is nested that deep; remove the extra levels"))
            fatal = True
            continue
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    problems.append(Problem(pointer(path), "has a key that is not a string", "use string keys"))
                elif len(key) > MAX_KEY:
                    problems.append(Problem(pointer(path + (_short(key, 20),)),
                                            f"a key of {len(key)} characters; no field or SSID is that long",
                                            "check the key"))
                elif _SURROGATE.search(key):
                    problems.append(Problem(pointer(path + (key,)), "the key holds a lone UTF-16 surrogate "
                                            "(\\ud800-\\udfff), which is not a character",
                                            "write the character itself, or a \\ud83d\\ude00-style pair"))
                else:
                    stack.append((path + (key,), item, depth + 1))
        elif isinstance(value, list):
            stack.extend((path + (i,), item, depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            if _SURROGATE.search(value):
                problems.append(Problem(pointer(path), "holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is "
                                        "not a character", "write the character itself, or a \\ud83d\\ude00-style pair"))
        elif isinstance(value, float):
            if not math.isfinite(value):
                problems.append(Problem(pointer(path), f"{value} is not a JSON number",
                                        "write an ordinary number, e.g. 22 or 1.5"))
        elif isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 100:
            problems.append(Problem(pointer(path), "is far larger than any value a spec holds",
                                    "write an ordinary number, e.g. 22"))
            fatal = True
    return problems, fatal
