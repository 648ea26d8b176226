"""Configuration problems: what is wrong, under which key, on which line."""

from __future__ import annotations

import errno
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    line: int | None

    def render(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line else source
        return f"{where}: {self.key}: {self.message}"


class ConfigError(Exception):
    """The file cannot be used; ``problems`` lists every reason at once."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(p.render(source) for p in problems))


class LineIndex:
    """Dotted key → line number, by a light scan of the TOML text.

    tomllib gives no positions; this scan covers tables, arrays of tables and
    ``key = value`` lines, which is what configuration files are made of.
    """

    _HEADER = re.compile(r"\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")
    _KEY = re.compile(r"\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=")

    def __init__(self, text: str) -> None:
        self.lines: dict[str, int] = {}
        counts: dict[str, int] = {}
        prefix = ""
        for number, line in enumerate(text.splitlines(), start=1):
            header = self._HEADER.match(line)
            if header:
                name = header.group(2).replace('"', "").replace(" ", "")
                prefix = self._resolve(name, header.group(1) == "[[", counts)
                self.lines.setdefault(prefix, number)
                continue
            key = self._KEY.match(line)
            if key:
                dotted = f"{prefix}.{key.group(1).strip(chr(34))}" if prefix else key.group(1)
                self.lines.setdefault(dotted, number)

    @staticmethod
    def _resolve(name: str, array: bool, counts: dict[str, int]) -> str:
        """``chargers.secondary`` inside the third ``[[chargers]]`` → ``chargers[2].secondary[n]``."""
        parts = name.split(".")
        path = ""
        for n, part in enumerate(parts):
            path = f"{path}.{part}" if path else part
            if array and n == len(parts) - 1:
                counts[path] = counts.get(path, -1) + 1
                path = f"{path}[{counts[path]}]"
            elif path in counts:
                path = f"{path}[{counts[path]}]"
        return path

    def find(self, dotted: str) -> int | None:
        while dotted:
            if dotted in self.lines:
                return self.lines[dotted]
            item = re.fullmatch(r"(.+)\[\d+\]", dotted)  # an element of a list value: the list's line
            dotted = item.group(1) if item and item.group(1) in self.lines else dotted.rpartition(".")[0]
        return None


class StartupError(OSError):
    """Start-up failed on a configured value (a port in use, an unusable data directory).

    Raised where the value is used, so the message names the key and the value instead of a bare
    ``[Errno 98] Address already in use``.
    """

    def __init__(self, key: str, value: str, why: str) -> None:
        super().__init__(f"{key} = {value!r}: {why}")
        self.key = key
        self.value = value
        self.why = why


@contextmanager
def startup_step(key: str, value: str) -> Iterator[None]:
    """OS and SQLite errors inside the block become a :class:`StartupError` naming ``key``."""
    try:
        yield
    except StartupError:
        raise
    except (OSError, sqlite3.Error) as exc:
        raise StartupError(key, value, _why(exc, value)) from exc


def _why(exc: BaseException, value: str) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        port = value.rpartition(":")[2]
        return (f"port {port} is already in use (another ocpp-proxy or another program; "
                f"`ss -tlnp 'sport = :{port}'` shows which)")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return str(exc)
