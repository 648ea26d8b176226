"""Generated documentation: the config reference and the example config.

Both come from the schema in :mod:`proxy.config` (``schema_rows()`` plus the
fields' metadata), so they cannot drift from what the loader accepts; a test
compares the committed files with a fresh rendering. After changing the
schema, run from the repository root::

    python -m proxy.config.docs          # rewrite docs/config.md and deploy/config.example.toml
    python -m proxy.config.docs --check  # exit 1 if either is out of date
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.config.schema import Config, unwrap_optional

def container_of(hint: Any) -> tuple[Any, str]:
    """(item type, key suffix) of a schema field: ``[]`` for arrays of tables, ``.<name>`` for named tables."""
    hint = unwrap_optional(hint)  # an optional section, e.g. [site]
    origin = typing.get_origin(hint)
    if origin is list:
        return typing.get_args(hint)[0], "[]"
    if origin is dict and dataclasses.is_dataclass(typing.get_args(hint)[1]):
        return typing.get_args(hint)[1], ".<name>"
    return hint, ""


def schema_rows(cls: type[Any] = Config, prefix: str = "") -> Iterator[tuple[str, str, Any, str]]:
    """(key, type, default, doc) for every setting: the source of the config reference."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        hint = hints[f.name]
        inner, suffix = container_of(hint)
        if dataclasses.is_dataclass(inner):
            yield from schema_rows(typing.cast(type, inner), key + suffix)
            continue
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        yield key, getattr(hint, "__name__", str(hint)), default, f.metadata.get("doc", "")


REFERENCE = Path("docs/config.md")
EXAMPLE = Path("deploy/config.example.toml")

#: Keys the example sets (the rest are shown commented out with their defaults):
#: what a Docker deployment of the gateway changes.
EXAMPLE_VALUES: dict[str, Any] = {
    "server.certs_dir": "/certs",
    "backend.url": "wss://ocpp.example.com/ocpp",
    "metrics.listen": "0.0.0.0:9520",
    "metrics.allow": ["127.0.0.1", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"],
    "offline.data_dir": "/data",
    "chargers[].id": "CP001",
    "chargers[].password": "replace-with-16-to-40-characters",
}
EXAMPLE_NOTES: dict[str, str] = {
    "server.certs_dir": "the /certs volume of the Docker image",
    "backend.url": "replace with your backend's OCPP URL (without the charge point id)",
    "metrics.listen": "all interfaces, for Prometheus in the compose network; "
                      "the default 127.0.0.1:9520 keeps metrics local",
    "offline.data_dir": "the /data volume of the Docker image (durable offline queue)",
    "chargers[].id": "one [[chargers]] table per wallbox",
    "metrics.allow": "private networks only (Prometheus in the compose network); see docs/security.md",
    "chargers[].password": "its Basic-auth password (username: the id); better password_env = \"CP001_PASSWORD\"",
}

SYSTEMD_EXAMPLE = Path("deploy/systemd/ocpp-proxy.toml")
#: What the systemd unit needs: everything the proxy writes under its StateDirectory (the only
#: writable place under ProtectSystem=strict), the backend password from its EnvironmentFile.
SYSTEMD_STATE = "/var/lib/ocpp-proxy"
SYSTEMD_VALUES: dict[str, Any] = {
    "server.certs_dir": f"{SYSTEMD_STATE}/certs",
    "backend.url": "wss://ocpp.example.com/ocpp",
    "backend.password_env": "BACKEND_PASSWORD",
    "offline.data_dir": f"{SYSTEMD_STATE}/data",
    "chargers[].id": "CP001",
    "chargers[].password": EXAMPLE_VALUES["chargers[].password"],
}
SYSTEMD_NOTES: dict[str, str] = {
    "server.certs_dir": "under the unit's StateDirectory: writable despite ProtectSystem=strict",
    "backend.url": EXAMPLE_NOTES["backend.url"],
    "backend.password_env": "set in /etc/ocpp-proxy/ocpp-proxy.env (the unit's EnvironmentFile)",
    "offline.data_dir": "under the unit's StateDirectory (durable offline queue)",
    "chargers[].id": EXAMPLE_NOTES["chargers[].id"],
    "chargers[].password": EXAMPLE_NOTES["chargers[].password"],
}


@dataclass(frozen=True)
class Row:
    key: str
    type: str
    default: Any
    doc: str
    choices: tuple[str, ...]
    secret: bool
    required: bool
    path: bool

    @property
    def section(self) -> str:
        return self.key.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.key.rpartition(".")[2]


def rows() -> list[Row]:
    """schema_rows() with each field's choices / secret / required flags."""
    meta = dict(_field_metadata(Config, ""))
    found = []
    for key, type_name, default, doc in schema_rows():
        info = meta.get(key, {})
        found.append(Row(key, type_name, default, doc, tuple(info.get("choices") or ()),
                         bool(info.get("secret")), bool(info.get("required")), bool(info.get("path"))))
    return found


def section_docs() -> dict[str, str]:
    return dict(_section_docs(Config, ""))


def _field_metadata(cls: type[Any], prefix: str) -> Iterator[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        inner, suffix = container_of(hints[f.name])
        if dataclasses.is_dataclass(inner):
            yield from _field_metadata(typing.cast(type, inner), key + suffix)
        else:
            yield key, f.metadata


def _section_docs(cls: type[Any], prefix: str) -> Iterator[tuple[str, str]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        inner, suffix = container_of(hints[f.name])
        if dataclasses.is_dataclass(inner):
            key = (f"{prefix}.{f.name}" if prefix else f.name) + suffix
            yield key, str(f.metadata.get("doc", ""))
            yield from _section_docs(typing.cast(type, inner), key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value), ensure_ascii=False)


_TYPE_NAMES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "list": "list",
               "dict": "table"}


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:].rstrip(".") + "."


def _mentions_all(row: Row) -> bool:
    return all(choice in row.doc for choice in row.choices)


def _header(section: str) -> str:
    """TOML header of a schema section: ``chargers[].secondary[]`` → ``[[chargers.secondary]]``."""
    name = section.removesuffix("[]").replace("[]", "")
    return f"[[{name}]]" if section.endswith("[]") else f"[{name}]"


def _grouped(all_rows: Sequence[Row]) -> list[tuple[str, list[Row]]]:
    groups: dict[str, list[Row]] = {}
    for row in all_rows:
        groups.setdefault(row.section, []).append(row)
    return list(groups.items())


# --- docs/config.md ------------------------------------------------------------------

def path_rule(all_rows: Sequence[Row]) -> str:
    """The one rule for relative paths, naming every key it covers."""
    names = ", ".join(f"`{name}`" for name in dict.fromkeys(row.name for row in all_rows if row.path))
    return (f"{names} and every `<key>_file`: a relative path is relative to the directory of the config "
            "file, whatever the working directory, so `ocpp-proxy run --config /etc/ocpp-proxy/site.toml` "
            "finds the same files from anywhere (the defaults `certs` and `data` too). "
            "An absolute path is used as written.")


def render_reference() -> str:
    docs = section_docs()
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from the schema in proxy/config/schema.py by `python -m proxy.config.docs`. Do not edit:",
        "     tests/test_deploy.py fails when this file and the schema differ. -->",
        "",
        "ocpp-proxy reads one TOML file (`ocpp-proxy run --config FILE`). "
        "`ocpp-proxy check-config FILE` validates it without starting, together with what it needs "
        "from the machine (certificate and key files readable, parsed and matching, listen addresses that "
        "resolve to this host, directories the proxy can write, a usable queue database): the checks `run` "
        "makes before it starts. Every error names the key and the line. Every key is optional unless marked *required*; a missing table means "
        "all its defaults. A commented example with every key is "
        "[`deploy/config.example.toml`](../deploy/config.example.toml).",
        "",
        "**Secrets** (marked *secret*) may instead be given as `<key>_env = \"VARIABLE\"` "
        "(read from that environment variable) or `<key>_file = \"path\"` (read from that file, "
        "relative to the config file; for Docker secrets). They never appear in logs.",
        "",
        "**Paths**: " + path_rule(rows()),
        "",
    ]
    for section, group in _grouped(rows()):
        title = f"`{_header(section)}`" if section else "Top level"
        out += [f"## {title}", ""]
        if docs.get(section):
            out += [_sentence(docs[section]), ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for row in group:
            default = "*required*" if row.required else f"`{toml_value(row.default)}`"
            notes = [row.doc]
            if row.choices and not _mentions_all(row):
                notes.append("one of " + ", ".join(f"`{c}`" for c in row.choices))
            if row.secret:
                notes.append(f"*secret*: or `{row.name}_env` / `{row.name}_file`")
            if row.path:
                notes.append("*path*, relative to the config file")
            meaning = "; ".join(notes).replace("|", "\\|")
            out.append(f"| `{row.name}` | {_TYPE_NAMES.get(row.type, row.type)} | {default} | {meaning} |")
        out.append("")
    return "\n".join(out)


# --- deploy/config.example.toml ---------------------------------------------------------

@dataclass(frozen=True)
class Example:
    """One example config: the keys a deployment sets (``<key>_env`` for a secret from the environment)."""

    path: Path
    intro: str
    values: dict[str, Any]
    notes: dict[str, str]


EXAMPLES = (
    Example(EXAMPLE, "a Docker deployment (compose.yaml, the image's /config/ocpp-proxy.toml)",
            EXAMPLE_VALUES, EXAMPLE_NOTES),
    Example(SYSTEMD_EXAMPLE, "a systemd install (systemd/ocpp-proxy.service; install it as "
            "/etc/ocpp-proxy/ocpp-proxy.toml)", SYSTEMD_VALUES, SYSTEMD_NOTES),
)


def render_example(example: Example = EXAMPLES[0]) -> str:
    docs = section_docs()
    out = [
        "# ocpp-proxy example configuration: every key, with its documentation and default.",
        "# Generated by `python -m proxy.config.docs` from the schema (docs/config.md is the reference).",
        f"# Uncommented keys are what {example.intro}",
        "# usually changes; everything else shows its default, commented out.",
        "# Relative paths are relative to this file's directory. Check your edits with: ocpp-proxy check-config FILE",
        "",
    ]
    values = example.values
    for section, group in _grouped(rows()):
        active = [row for row in group if _example_keys(row) & set(values)]
        if section:
            hash_ = "" if active else "# "
            out.append(f"{hash_}{_header(section)}" + (f"  # {docs[section]}" if docs.get(section) else ""))
        for row in group:
            doc = row.doc + (f" ({', '.join(row.choices)})" if row.choices and not _mentions_all(row) else "")
            out.append(f"# {doc}")
            if row.secret:
                out.append(f"#   secret: or {row.name}_env = \"VARIABLE\" / {row.name}_file = \"path\"")
            (key, *_) = sorted(_example_keys(row) & set(values)) or [""]
            if key:
                note = example.notes.get(key)
                name = row.name + key.removeprefix(row.key)
                out.append(f"{name} = {toml_value(values[key])}" + (f"  # {note}" if note else ""))
            elif row.required:
                out.append(f"# {row.name} = ...  (required)")
            else:
                out.append(f"# {row.name} = {toml_value(row.default)}")
        out.append("")
    return "\n".join(out)


def _example_keys(row: Row) -> set[str]:
    """The keys an example may set for ``row``: itself, and for a secret its _env and _file forms."""
    return {row.key, f"{row.key}_env", f"{row.key}_file"} if row.secret else {row.key}


def generated() -> dict[Path, str]:
    return {REFERENCE: render_reference(), **{example.path: render_example(example) for example in EXAMPLES}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.config.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a file is out of date")
    parser.add_argument("--root", default=".", help="repository root (default: current directory)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    stale = []
    for path, text in generated().items():
        target = root / path
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current == text:
            continue
        stale.append(str(path))
        if not args.check:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run: python -m proxy.config.docs", file=sys.stderr)
        return 1
    print(("updated: " + ", ".join(stale)) if stale else "up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
