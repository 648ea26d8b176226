"""The repository stands alone: code, docs and deploy files cite docs/, not notes outside it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: The product notes this project started from live outside the repository (built up here so
#: this file does not match itself).
OUTSIDE = re.compile("|".join(["SP" + "EC", "STACK" + "-NOTES", re.escape("../" + "shared")]))
SKIP = {"node_modules", "__pycache__", ".mypy_cache", ".pytest_cache", ".hypothesis"}


def cited_files() -> list[Path]:
    roots = [ROOT / name for name in ("proxy", "bench", "tests", "docs", "deploy")]
    files = [ROOT / "README.md"]
    for root in roots:
        files += [p for p in root.rglob("*") if p.is_file() and not SKIP & set(p.relative_to(ROOT).parts)]
    return files


def test_nothing_cites_documents_outside_the_repository() -> None:
    found = []
    for path in cited_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary (certificates in DER, images)
        found += [f"{path.relative_to(ROOT)}:{n}: {line.strip()[:80]}"
                  for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert len(cited_files()) > 100 and found == []


def test_the_readme_table_has_one_row_per_package() -> None:
    """README's "How it is built" names each package of proxy/ once, and nothing that is gone."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## How it is built", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(proxy/[a-z_]+)` \|", table, re.MULTILINE)
    packages = sorted(f"proxy/{p.parent.name}" for p in (ROOT / "proxy").glob("*/__init__.py"))
    assert sorted(rows) == packages
