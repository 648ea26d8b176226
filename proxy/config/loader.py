"""Reading a TOML file into the typed schema: types, secrets, paths, then the cross-field checks.

The generic part (walk a dataclass, convert and check each value, collect every problem with its
key and line) lives here; the rules that span several keys are in :mod:`proxy.config.checks`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

from proxy.config.checks import cross_checks
from proxy.config.security import security_problems
from proxy.config.problems import ConfigError, LineIndex, Problem
from proxy.config.schema import Config, unwrap_optional


class _Loader:
    def __init__(self, index: LineIndex, environ: typing.Mapping[str, str], base_dir: Path) -> None:
        self.index = index
        self.environ = environ
        self.base_dir = base_dir
        self.problems: list[Problem] = []

    def problem(self, key: str, message: str) -> None:
        self.problems.append(Problem(key, message, self.index.find(key)))

    def build(self, cls: type[Any], table: dict[str, Any], path: str) -> Any:
        hints = typing.get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f"{path}.{f.name}" if path else f.name
            present = self._take(f, table, key)
            if present is _MISSING:
                if f.metadata.get("required"):
                    self.problem(key, "is required")
                elif f.metadata.get("path") and f.default not in (dataclasses.MISSING, ""):
                    values[f.name] = self._path(f.default)  # a default directory follows the rule too
                elif dataclasses.is_dataclass(hints[f.name]) and f.default is dataclasses.MISSING:
                    values[f.name] = self.build(hints[f.name], {}, key)  # an absent table: its defaults, paths too
                continue
            value = self._convert(hints[f.name], present, key)
            if value is not _MISSING and self._valid(f, value, key):
                values[f.name] = self._path(value) if f.metadata.get("path") else value
        for name in table:
            base = name.removesuffix("_env").removesuffix("_file")
            if name not in known and not (base in known and _is_secret(cls, base)):
                self.problem(f"{path}.{name}" if path else name, "unknown key" + _did_you_mean(cls, name))
        try:
            return cls(**values)
        except TypeError:  # a required field had a problem; already reported
            return None

    def _path(self, value: Any) -> Any:
        """The one rule for file and directory names: relative to the config file's directory."""
        if isinstance(value, list):
            return [self._path(v) for v in value]
        return str(self.base_dir / value) if value else value

    def _take(self, f: dataclasses.Field[Any], table: dict[str, Any], key: str) -> Any:
        if f.name in table:
            return table[f.name]
        if not f.metadata.get("secret"):
            return _MISSING
        if f"{f.name}_env" in table:
            var = table[f"{f.name}_env"]
            if var not in self.environ:
                self.problem(f"{key}_env", f"environment variable {var!r} is not set")
                return _MISSING
            return self.environ[var]
        if f"{f.name}_file" in table:
            path = self.base_dir / str(table[f"{f.name}_file"])
            try:
                return path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                self.problem(f"{key}_file", f"cannot read {path}: {exc.strerror}")
        return _MISSING

    def _convert(self, hint: Any, value: Any, key: str) -> Any:
        hint = unwrap_optional(hint)
        origin = typing.get_origin(hint)
        if origin is list:
            (item,) = typing.get_args(hint)
            if not isinstance(value, list):
                self.problem(key, f"must be a list, got {_tname(value)}")
                return _MISSING
            items = [self._convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
            return _MISSING if any(i is _MISSING for i in items) else items
        if origin is dict:
            item = typing.get_args(hint)[1]
            if not isinstance(value, dict):
                self.problem(key, f"must be a table, got {_tname(value)}")
                return _MISSING
            entries = {k: self._convert(item, v, f"{key}.{k}") for k, v in value.items()}
            return _MISSING if any(v is _MISSING for v in entries.values()) else entries
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                self.problem(key, f"must be a table, got {_tname(value)}")
                return _MISSING
            built = self.build(typing.cast(type, hint), value, key)
            return _MISSING if built is None else built
        return self._scalar(hint, value, key)

    def _scalar(self, hint: Any, value: Any, key: str) -> Any:
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if hint is int and isinstance(value, bool) or not isinstance(value, hint):
            self.problem(key, f"must be {_tname_type(hint)}, got {_tname(value)}")
            return _MISSING
        return value

    def _valid(self, f: dataclasses.Field[Any], value: Any, key: str) -> bool:
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            self.problem(key, f"must be one of {', '.join(choices)}; got {value!r}")
            return False
        check = f.metadata.get("check")
        message = check(value) if check else None
        if message:
            self.problem(key, message)
            return False
        return True


_MISSING: Any = object()


def _did_you_mean(cls: type[Any], name: str) -> str:
    """'; did you mean max_current?' for a misspelt key (secrets also by their _env/_file forms)."""
    names = [f.name for f in dataclasses.fields(cls)]
    names += [f"{f.name}{suffix}" for f in dataclasses.fields(cls) if f.metadata.get("secret")
              for suffix in ("_env", "_file")]
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


def _is_secret(cls: type[Any], name: str) -> bool:
    return any(f.name == name and f.metadata.get("secret") for f in dataclasses.fields(cls))


def _tname(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def _tname_type(hint: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def loads(text: str, source: str = "<config>", *, environ: typing.Mapping[str, str] | None = None,
          base_dir: Path | None = None, deployed: bool = False) -> Config:
    """Parse and validate TOML text; raise ConfigError listing every problem.

    Relative paths (keys marked ``path`` and ``*_file`` secrets) are made absolute against
    ``base_dir``: the config file's directory (:func:`load`), else the working directory.

    ``deployed``: the text is what an operator runs (:func:`load`, i.e. check-config, run, reload), so
    the security rules of :mod:`proxy.config.security` apply too: no charger reachable without a
    credential unless it says so, OCPP ids only. In-process uses (tests, the demo) opt in.
    """
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        raise ConfigError(source, [Problem("(syntax)", str(exc), int(line.group(1)) if line else None)])
    index = LineIndex(text)
    loader = _Loader(index, os.environ if environ is None else environ, (base_dir or Path.cwd()).absolute())
    config = loader.build(Config, table, "")
    failed = frozenset(problem.key for problem in loader.problems)
    problems = loader.problems + ([] if config is None else cross_checks(config, index, failed))
    if deployed and config is not None:
        problems += security_problems(config, index)
    if problems or config is None:
        raise ConfigError(source, problems)
    return typing.cast(Config, config)


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [Problem("(file)", f"cannot read: {exc}", None)]) from exc
    return loads(text, str(path), base_dir=path.parent, deployed=True)
