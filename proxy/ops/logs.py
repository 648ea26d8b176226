"""structlog set-up: one pipeline, JSON in containers, readable on a terminal.

Events are short names with key/value context (``log.info("upstream_closed",
charger=..., code=...)``). Two processors run last before rendering, so that
whatever a caller passes, even by mistake:

* no password, key or Authorization header value reaches any output, and no
  URL's ``user:password@`` part (:func:`redact`);
* no value is longer than :data:`MAX_VALUE` characters (:func:`cut`): ids,
  paths, subprotocols and headers come from the network, and one 60 KB id
  must not become one 60 KB log line per request (docs/security.md).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_SECRET_KEYS = ("password", "authorization", "secret", "private_key", "token")
#: Longest string value in a log line, in characters (docs/security.md).
MAX_VALUE = 200
#: Longest traceback kept in the ``exception`` value.
MAX_TRACEBACK = 4000
#: Most items of a list or table value shown; the rest is summarised.
MAX_ITEMS = 20
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#@\s]*@")


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in event:
        lowered = key.lower()
        if any(marker in lowered for marker in _SECRET_KEYS):
            event[key] = "***"
    return event


def cut(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Every string value at most MAX_VALUE characters, URL userinfo replaced by ``***``."""
    for key, value in event.items():
        if key == "exception" and isinstance(value, str):  # a traceback: longer, but bounded too
            event[key] = _USERINFO.sub(r"\1***@", value[:MAX_TRACEBACK])
        else:
            event[key] = _bounded(value, 0)
    return event


def _bounded(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        if "@" in value:
            value = _USERINFO.sub(r"\1***@", value)
        return value if len(value) <= MAX_VALUE else value[:MAX_VALUE] + f"…(+{len(value) - MAX_VALUE})"
    if isinstance(value, (bytes, bytearray)):
        return _bounded(bytes(value[:MAX_VALUE]).decode("utf-8", "replace"), depth)
    if depth > 3:
        return _bounded(repr(value), depth)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_bounded(v, depth + 1) for v in list(value)[:MAX_ITEMS]]
        return items + [f"…(+{len(value) - MAX_ITEMS})"] if len(value) > MAX_ITEMS else items
    if isinstance(value, dict):
        shown = {_bounded(str(k), depth + 1): _bounded(v, depth + 1) for k, v in list(value.items())[:MAX_ITEMS]}
        if len(value) > MAX_ITEMS:
            shown["…"] = f"+{len(value) - MAX_ITEMS}"
        return shown
    return value


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(ensure_ascii=False)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            cut,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get_logger(**context: Any) -> Any:
    return structlog.get_logger("ocpp-proxy").bind(**context)
