"""OCPP-J frame classification without re-encoding (sans-IO).

The proxy forwards the text it received, so this module never builds a JSON
object from a forwarded frame. It reads just enough of the prefix
(``[type, "id", "Action"``) to route the frame and checks the framing at both
ends, so that a 1 MiB MeterValues costs the same as a Heartbeat. Full JSON
validation is only done where the caller asks for it (``strict`` mode), because
real wallboxes send frames that strict validators reject and the backend is the
party that should judge them.

The proxy's own frames (its CALLs, local answers) are built here too, with a
compact serializer: they are new text, not forwarded text.
"""

from __future__ import annotations

import json
import re
from enum import IntEnum
from typing import Any, NamedTuple

#: OCPP-J: "uniqueId ... maximum of 36 characters".
MAX_ID_LENGTH = 36

# A JSON string body without the quotes: plain characters or backslash escapes.
_JSON_STRING = r'"((?:[^"\\]|\\.)*)"'
_PREFIX = re.compile(
    r"\s*\[\s*([234])\s*,\s*" + _JSON_STRING + r"\s*(?:,\s*" + _JSON_STRING + r")?",
    re.DOTALL,
)
_WS = " \t\r\n"


class MessageType(IntEnum):
    CALL = 2
    CALLRESULT = 3
    CALLERROR = 4


class Frame(NamedTuple):
    """One classified text frame.

    ``kind`` is None for a frame that cannot be routed at all. A frame that can
    be routed but breaks a rule (an over-long id, a truncated tail) keeps its
    kind and carries ``problem``: non-strict sessions still forward it.

    A NamedTuple rather than a frozen dataclass: one is built for every frame
    relayed, and a frozen dataclass's ``__init__`` (one ``object.__setattr__``
    per field) cost five times as much (``python -m bench.profile``).
    """

    text: str
    kind: MessageType | None
    msg_id: str | None = None
    #: CALL: the action; CALLERROR: the error code.
    action: str | None = None
    #: Span of the id's characters inside ``text`` (without quotes), for
    #: rewriting the id on one leg while leaving every other byte alone.
    id_span: tuple[int, int] = (0, 0)
    problem: str | None = None

    @property
    def is_call(self) -> bool:
        return self.kind is MessageType.CALL

    @property
    def is_answer(self) -> bool:
        return self.kind is MessageType.CALLRESULT or self.kind is MessageType.CALLERROR

    @property
    def routable(self) -> bool:
        return self.kind is not None


def _decode_string(raw: str) -> str:
    if "\\" not in raw:
        return raw
    decoded = json.loads('"' + raw + '"')
    assert isinstance(decoded, str)
    return decoded


def _skip_ws(text: str, pos: int) -> int:
    n = len(text)
    while pos < n and text[pos] in _WS:
        pos += 1
    return pos


def _tail_problem(text: str, pos: int, kind: MessageType, has_third: bool) -> str | None:
    """Check what follows the routed prefix: a payload start and a closing bracket."""
    if kind is MessageType.CALL and not has_third:
        return "CALL without an action"
    if kind is MessageType.CALLRESULT and has_third:
        return "CALLRESULT payload is a string"
    pos = _skip_ws(text, pos)
    if pos >= len(text) or text[pos] != ",":
        return "missing payload"
    pos = _skip_ws(text, pos + 1)
    expected = '"' if kind is MessageType.CALLERROR else "{"
    if pos >= len(text) or text[pos] != expected:
        return "payload is not an object" if expected == "{" else "missing error description"
    end = len(text)
    while end > pos and text[end - 1] in _WS:
        end -= 1
    if text[end - 1] != "]":
        return "frame is not a closed JSON array"
    return None


_KINDS = {"2": MessageType.CALL, "3": MessageType.CALLRESULT, "4": MessageType.CALLERROR}
_CALL = MessageType.CALL
_new_frame = tuple.__new__


def classify(text: str) -> Frame:
    """Classify a frame from its prefix and framing; never raises."""
    match = _PREFIX.match(text)
    if match is None:
        return Frame(text, None, problem="not an OCPP-J array [type, id, ...]")
    digit, msg_id, action = match.groups()
    kind = _KINDS[digit]
    # Per frame: ids and actions without escapes (all but a few) are used as they are, without a call.
    if "\\" in msg_id or (action is not None and "\\" in action):
        try:
            msg_id = _decode_string(msg_id)
            action = _decode_string(action) if action is not None else None
        except ValueError:
            return Frame(text, None, problem="invalid string escape in id or action")
    end = match.end()
    # Compact frames (what nearly every peer sends) need no whitespace skipping.
    if (text[end:end + 2] == ",{" and text[-1] == "]" and (action is not None) is (kind is _CALL)):
        problem = None
    else:
        problem = _tail_problem(text, end, kind, action is not None)
    if problem is None and len(msg_id) > MAX_ID_LENGTH:
        problem = f"message id longer than {MAX_ID_LENGTH} characters"
    # tuple.__new__ directly: a NamedTuple's own __new__ is a Python function (one more call per frame).
    return _new_frame(Frame, (text, kind, msg_id, action, match.span(2), problem))


def strict_problem(frame: Frame) -> str | None:
    """Full structural check for ``strict`` mode: a parse, so not on the default path."""
    if frame.problem is not None or frame.kind is None:
        return frame.problem or "not an OCPP-J array"
    try:
        value = json.loads(frame.text)
    except ValueError as exc:
        return f"invalid JSON: {exc}"
    expected = {MessageType.CALL: 4, MessageType.CALLRESULT: 3, MessageType.CALLERROR: 5}[frame.kind]
    if not isinstance(value, list) or len(value) != expected:
        return f"expected {expected} elements"
    if frame.kind is MessageType.CALLERROR and not isinstance(value[4], dict):
        return "errorDetails is not an object"
    return None


def replace_id(frame: Frame, new_id: str, text: str | None = None) -> str:
    """The frame's text with only its message id replaced (for id namespaces per leg).

    ``text`` is a payload-rewritten version of ``frame.text`` with the same prefix.
    """
    start, end = frame.id_span
    text = frame.text if text is None else text
    return text[:start] + _encode_string(new_id) + text[end:]


def _encode_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)[1:-1]


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def build_call(msg_id: str, action: str, payload: dict[str, Any]) -> str:
    return _dumps([MessageType.CALL.value, msg_id, action, payload])


def build_result(msg_id: str, payload: dict[str, Any]) -> str:
    return _dumps([MessageType.CALLRESULT.value, msg_id, payload])


def build_error(
    msg_id: str, code: str, description: str = "", details: dict[str, Any] | None = None
) -> str:
    return _dumps([MessageType.CALLERROR.value, msg_id, code, description, details or {}])


def payload_of(frame: Frame) -> Any:
    """Parse a frame's payload for the few consumers that need its content.

    Only for frames the proxy reads (limit engine inputs, its own CALLs'
    answers); never used to produce forwarded text.
    """
    value = json.loads(frame.text)
    if frame.kind is MessageType.CALL:
        return value[3]
    if frame.kind is MessageType.CALLRESULT:
        return value[2]
    return value[4] if len(value) > 4 else {}
