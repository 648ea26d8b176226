"""Which WebSocket close code one leg gets when the other leg closed (sans-IO).

A close the peer sent is mirrored with its code and reason. Codes that exist
only locally (1005 no status, 1006 abnormal, 1015 TLS failure) cannot be sent;
wsproto would silently turn them into 1000 ("normal"), which would tell the
other side that all is well. They become 1001 ("going away") with a reason
saying what happened.
"""

from __future__ import annotations

NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
INVALID_DATA = 1007
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013

_SENDABLE = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
_LOCAL_ONLY = {1005: "no close status", 1006: "connection lost", 1015: "TLS failure"}

#: RFC 6455: a close reason is at most 123 bytes of UTF-8.
MAX_REASON_BYTES = 123


def mirror(code: int, reason: str | None, side: str) -> tuple[int, str]:
    """Close code and reason for the other leg after ``side`` closed with ``code``."""
    if code == 1005:
        return NORMAL, truncate(reason or "")
    if code in _LOCAL_ONLY:
        return GOING_AWAY, truncate(f"{side} {_LOCAL_ONLY[code]}")
    if code in _SENDABLE or 3000 <= code <= 4999:
        return code, truncate(reason or "")
    return GOING_AWAY, truncate(f"{side} closed with {code}")


def after_violation(side: str, code: int) -> tuple[int, str]:
    """The proxy closed ``side`` for a protocol violation: the other leg is told why."""
    return GOING_AWAY, truncate(f"{side} closed by proxy with {code}")


def truncate(reason: str) -> str:
    data = reason.encode("utf-8")
    if len(data) <= MAX_REASON_BYTES:
        return reason
    return data[:MAX_REASON_BYTES].decode("utf-8", errors="ignore")
