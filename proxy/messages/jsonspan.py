"""Where a value sits inside JSON text, so one field can be edited in place (sans-IO).

Mirroring a wallbox to a second backend means changing exactly one number
(the transactionId) in frames that also carry signed meter data, which must
stay byte-identical. Parsing and re-serializing would change escapes, number
formats and key order, so this module finds the *span* of a value by walking
the text and leaves every other character alone.

The walk only descends along the requested path and skips everything else
with regular expressions (C speed), so a frame with a 100 KiB string costs one
regex match, not a character loop. Text that is not well-formed JSON along
the path gives ``None``: callers then forward the frame unchanged.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
import re
from collections.abc import Sequence
from typing import Any

Span = tuple[int, int]

# "Unrolled" string patterns: one regex step per run of plain characters, not per character.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SCALAR = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null")
_STRUCTURE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_WS = re.compile(r"[ \t\r\n]*")
_INTEGER = re.compile(r"-?(?:0|[1-9]\d*)")


class _Bad(Exception):
    """The text is not JSON where the walk needed it to be."""


def _ws(text: str, pos: int) -> int:
    match = _WS.match(text, pos)
    return pos if match is None else match.end()


def _skip(text: str, pos: int) -> int:
    """End of the JSON value starting at ``pos`` (no leading whitespace)."""
    if pos >= len(text):
        raise _Bad
    first = text[pos]
    if first == '"':
        match = _STRING.match(text, pos)
        if match is None:
            raise _Bad
        return match.end()
    if first in "[{":
        depth = 0
        for token in _STRUCTURE.finditer(text, pos):
            char = token.group()
            if char in "[{":
                depth += 1
            elif char in "]}":
                depth -= 1
                if depth == 0:
                    return token.end()
        raise _Bad
    match = _SCALAR.match(text, pos)
    if match is None:
        raise _Bad
    return match.end()


def _members(text: str, pos: int) -> list[tuple[str, Span, Span]]:
    """(key, member span from key to value end, value span) of the object at ``pos``."""
    if pos >= len(text) or text[pos] != "{":
        raise _Bad
    found: list[tuple[str, Span, Span]] = []
    pos = _ws(text, pos + 1)
    if pos < len(text) and text[pos] == "}":
        return found
    while True:
        key_match = _STRING.match(text, pos)
        if key_match is None:
            raise _Bad
        key = _decode(key_match.group())
        pos = _ws(text, key_match.end())
        if pos >= len(text) or text[pos] != ":":
            raise _Bad
        start = _ws(text, pos + 1)
        end = _skip(text, start)
        found.append((key, (key_match.start(), end), (start, end)))
        pos = _ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = _ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "}":
            return found
        raise _Bad


def _element(text: str, pos: int, index: int) -> int | None:
    """Start of element ``index`` of the array at ``pos``; the elements after it are not read."""
    if pos >= len(text) or text[pos] != "[":
        raise _Bad
    pos = _ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        return None
    for _ in range(index):
        pos = _ws(text, _skip(text, pos))
        if pos < len(text) and text[pos] == "]":
            return None
        if pos >= len(text) or text[pos] != ",":
            raise _Bad
        pos = _ws(text, pos + 1)
    return pos


def _decode(quoted: str) -> str:
    if "\\" not in quoted:
        return quoted[1:-1]
    value = json.loads(quoted)
    assert isinstance(value, str)
    return value


def _locate(text: str, path: Sequence[int | str]) -> tuple[Span, Span | None] | None:
    """Value span at ``path``; for an object member also the span from its key to its value's end."""
    pos = _ws(text, 0)
    member: Span | None = None
    for step in path:
        if isinstance(step, int):
            found = _element(text, pos, step)
            if found is None:
                return None
            pos, member = found, None
        else:
            # Like json.loads, the last of duplicate keys is the one that counts.
            matches = [(span, value) for key, span, value in _members(text, pos) if key == step]
            if not matches:
                return None
            member, value = matches[-1]
            pos = value[0]
    return (pos, _skip(text, pos)), member


def value_span(text: str, path: Sequence[int | str]) -> Span | None:
    """Span of the value at ``path`` (array indexes and object keys), or None."""
    try:
        found = _locate(text, path)
    except (_Bad, ValueError):
        return None
    return None if found is None else found[0]


def integer_at(text: str, path: Sequence[int | str]) -> int | None:
    """The integer literal at ``path`` (``12``, not ``12.0`` or ``"12"``), or None."""
    found = integer_span(text, path)
    return None if found is None else found[0]


def integer_span(text: str, path: Sequence[int | str]) -> tuple[int, Span] | None:
    """The integer at ``path`` and its span (to replace it without walking the text again)."""
    span = value_span(text, path)
    if span is None:
        return None
    literal = text[span[0]:span[1]]
    return (int(literal), span) if _INTEGER.fullmatch(literal) else None


def replace_value(text: str, path: Sequence[int | str], literal: str) -> str | None:
    """``text`` with only the value at ``path`` replaced by ``literal``; None if not found."""
    span = value_span(text, path)
    if span is None:
        return None
    return text[:span[0]] + literal + text[span[1]:]


def remove_member(text: str, path: Sequence[int | str]) -> str | None:
    """``text`` without the object member at ``path`` (and one separating comma)."""
    if not path or not isinstance(path[-1], str):
        return None
    try:
        found = _locate(text, path)
        if found is None or found[1] is None:
            return None
        start, end = found[1]
        after = _ws(text, end)
        if text[after] == ",":  # not the last member: take the comma after it
            return text[:start] + text[_ws(text, after + 1):]
        before = start - 1
        while text[before] in " \t\r\n":
            before -= 1
        if text[before] == ",":  # the last of several: take the comma before it
            return text[:before] + text[end:]
        return text[:start] + text[end:]  # the only member
    except (_Bad, ValueError, IndexError):
        return None


# --- parse once, keeping the spans of chosen values -----------------------------------------

#: One path step of a pattern: an array index, an object key, or None for every element / member.
Step = int | str | None

#: json's own scanner (C where available): parses one value at a position and says where it ends.
_scan_once: Any = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
_scanstring = json.decoder.scanstring  # type: ignore[attr-defined]


def parse_with_spans(text: str, pattern: Sequence[Step]) -> tuple[Any, dict[tuple[int | str, ...], Span]]:
    """``json.loads(text)`` and, for every value whose path matches ``pattern``, its span in ``text``.

    One pass: only the containers along ``pattern`` are walked in Python;
    every other value (and each matched one) is parsed by json's C scanner,
    which also gives its end. So cutting the signed sampledValues out of a
    MeterValues costs about one ``json.loads``, not a walk per value (the
    session log does this for every transaction frame). Raises ValueError for
    text that is not JSON.
    """
    spans: dict[tuple[int | str, ...], Span] = {}
    try:
        value, end = _walk(text, _ws(text, 0), (), pattern, spans)
    except (StopIteration, IndexError) as exc:
        raise ValueError("not JSON") from exc
    if _ws(text, end) != len(text):
        raise ValueError("text after the JSON value")
    return value, spans


def _walk(text: str, pos: int, path: tuple[int | str, ...], pattern: Sequence[Step],
          spans: dict[tuple[int | str, ...], Span]) -> tuple[Any, int]:
    if len(path) == len(pattern):
        value, end = _scan_once(text, pos)
        spans[path] = (pos, end)
        return value, end
    opening = text[pos]
    if opening == "[":
        return _walk_array(text, pos, path, pattern, spans)
    if opening == "{":
        return _walk_object(text, pos, path, pattern, spans)
    result: tuple[Any, int] = _scan_once(text, pos)
    return result


def _skip_ws(text: str, pos: int) -> int:
    """Past any whitespace at ``pos`` (compact JSON, the usual case, costs one index)."""
    return _ws(text, pos) if text[pos] in " \t\r\n" else pos


def _walk_array(text: str, pos: int, path: tuple[int | str, ...], pattern: Sequence[Step],
                spans: dict[tuple[int | str, ...], Span]) -> tuple[list[Any], int]:
    step = pattern[len(path)]
    items: list[Any] = []
    pos = _skip_ws(text, pos + 1)
    if text[pos] == "]":
        return items, pos + 1
    while True:
        index = len(items)
        if step is None or step == index:
            value, pos = _walk(text, pos, (*path, index), pattern, spans)
        else:
            value, pos = _scan_once(text, pos)
        items.append(value)
        pos, more = _separator(text, pos, "]")
        if not more:
            return items, pos


def _walk_object(text: str, pos: int, path: tuple[int | str, ...], pattern: Sequence[Step],
                 spans: dict[tuple[int | str, ...], Span]) -> tuple[dict[str, Any], int]:
    step = pattern[len(path)]
    members: dict[str, Any] = {}
    pos = _skip_ws(text, pos + 1)
    if text[pos] == "}":
        return members, pos + 1
    while True:
        if text[pos] != '"':
            raise ValueError("bad key")
        key, pos = _scanstring(text, pos + 1)
        pos = _skip_ws(text, pos)
        if text[pos] != ":":
            raise ValueError("bad member")
        pos = _skip_ws(text, pos + 1)
        if step is None or step == key:
            if key in members:  # like json.loads, a later duplicate key replaces the earlier value (and its spans)
                _forget(spans, (*path, key))
            members[key], pos = _walk(text, pos, (*path, key), pattern, spans)
        else:
            members[key], pos = _scan_once(text, pos)
        pos, more = _separator(text, pos, "}")
        if not more:
            return members, pos


def _separator(text: str, pos: int, closing: str) -> tuple[int, bool]:
    """After an element or member: (where the next one starts, True), or (past ``closing``, False)."""
    char = text[pos]
    if char in " \t\r\n":
        pos = _ws(text, pos)
        char = text[pos]
    if char == ",":
        return _skip_ws(text, pos + 1), True
    if char == closing:
        return pos + 1, False
    raise ValueError(f"expected ',' or {closing!r}")


def _forget(spans: dict[tuple[int | str, ...], Span], prefix: tuple[int | str, ...]) -> None:
    for path in [p for p in spans if p[:len(prefix)] == prefix]:
        del spans[path]
