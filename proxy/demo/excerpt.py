"""What a demo line shows of an OCPP-J frame: the action and the fields worth reading, first.

A frame cut at the terminal's width shows a message id and the start of a payload, and hides what
a viewer wants to see: whether the idTag was accepted, which transaction id the backend gave, which
limit a profile sets. An excerpt names the action (answers by the action of the CALL they answer:
``Authorize.conf``) and lists the payload's scalar fields, the telling ones first
(``idTagInfo.status=Accepted``), long values shortened. The frame itself is still relayed byte for
byte; only its display is condensed (``ocpp-proxy demo --raw`` prints frames whole). A line longer
than the terminal is cut, but never before the action and its first three fields.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

#: Field names shown first, in this order (by the last key of the field's path).
FIRST = ("status", "transactionId", "limit", "chargingRateUnit", "idTag", "idToken", "eventType", "triggerReason",
         "connectorId", "evseId", "connectorStatus", "errorCode", "reason", "meterStart", "meterStop", "measurand",
         "value", "unit", "vendorId", "messageId", "chargePointVendor", "chargePointModel", "interval")
#: Shown last: present in most frames and rarely the point.
LAST = ("timestamp", "currentTime", "seqNo", "signedMeterValue", "data")
#: Names that mean little alone: shown with their parent (``idTagInfo.status``).
_GENERIC = {"status", "value", "type", "unit", "id", "reason", "format", "context"}
_VALUE_WIDTH = 24


#: A line is never cut before this many fields (the telling ones come first).
KEEP = 3


@dataclass(frozen=True)
class Excerpt:
    head: str
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        return " ".join((self.head, *self.fields))

    def fit(self, room: int) -> str:
        """At most ``room`` characters, but never fewer than the head and the first KEEP fields."""
        text = self.head
        for n, item in enumerate(self.fields):
            if n >= KEEP and len(text) + 1 + len(item) > room - 2:
                return text + " …"
            text += " " + item
        return text


class Excerpts:
    """Per connection: remembers each CALL's action until its answer, to name the answer."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str, str], str] = {}

    def excerpt(self, connection: str, text: str) -> Excerpt:
        try:
            frame = json.loads(text)
            kind, msg_id = frame[0], str(frame[1])
        except (ValueError, TypeError, IndexError, KeyError):
            return Excerpt(text)  # not OCPP-J: shown as it came
        if kind == 2 and len(frame) == 4:
            self._pending[(connection, msg_id)] = str(frame[2])
            return join(f"{frame[2]}.req", frame[3])
        action = self._pending.pop((connection, msg_id), "?")
        if kind == 3 and len(frame) == 3:
            return join(f"{action}.conf", frame[2])
        if kind == 4 and len(frame) >= 4:
            return Excerpt(f"{action} CALLERROR {frame[2]}: {shorten(str(frame[3]))}")
        return Excerpt(text)


def join(head: str, payload: Any) -> Excerpt:
    return Excerpt(head, tuple(f"{label}={shorten(value)}" for label, value in ordered(payload)))


def ordered(payload: Any) -> list[tuple[str, Any]]:
    """(label, value) of every scalar in ``payload``: the telling ones first, repeats dropped."""
    seen: set[tuple[str, str]] = set()
    fields = []
    for path, value in leaves(payload, ()):
        label = ".".join(path[-2:]) if path and path[-1] in _GENERIC and len(path) > 1 else (path[-1] if path else "")
        if (label, str(value)) not in seen:
            seen.add((label, str(value)))
            fields.append((label, value, _rank(path[-1] if path else "")))
    fields.sort(key=lambda field: field[2])  # stable: equal ranks keep the payload's order
    return [(label, value) for label, value, _ in fields]


def _rank(name: str) -> int:
    if name in FIRST:
        return FIRST.index(name)
    return len(FIRST) + 1 + LAST.index(name) if name in LAST else len(FIRST)


def leaves(value: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, (*path, str(key)))
    elif isinstance(value, list):
        for item in value:
            yield from leaves(item, path)
    else:
        yield path, value


def shorten(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, bool) or value is None else str(value)
    return text if len(text) <= _VALUE_WIDTH else text[:_VALUE_WIDTH - 1] + "…"
