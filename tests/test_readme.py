"""The README and docs/*.md as a newcomer reads them on a fresh clone: every link and every repository path they
name exists, and the commands they give work as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_TOP = (*(path.name for path in ROOT.iterdir() if path.is_dir() and not path.name.startswith(".")), ".ci")
_SKIPPED = {".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", "__pycache__"}


def _repository_files() -> set[str]:
    """Every file and folder of the checkout (relative, POSIX), without caches, the venv and .git."""
    found: set[str] = set()
    stack = [ROOT]
    while stack:
        folder = stack.pop()
        for path in folder.iterdir():
            if path.name in _SKIPPED or path.name.endswith(".egg-info"):
                continue
            found.add(path.relative_to(ROOT).as_posix())
            if path.is_dir() and not path.is_symlink():
                stack.append(path)
    return found


FILES = _repository_files()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in doc.read_text(encoding="utf-8").splitlines() if line.startswith("#")}


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(doc: Path) -> None:
    """`[text](target)`: a file or folder of the repository (relative to the document), and the heading named by
    `#anchor` exists. Links to the web are not followed (CI has no network)."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        if not resolved.exists() or not resolved.is_relative_to(ROOT):
            broken.append(f"{target}: no such file in the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    assert not broken, f"{doc.name}: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda doc: doc.relative_to(ROOT).as_posix())
def test_every_repository_path_named_exists(doc: Path) -> None:
    """A path in backticks that starts at a top-level folder (`rules/ingestd.example.yaml`, `bench/hostile.py`), or a
    file name of the repository's kinds (`pipeline/deliver.py`, `test_crash.py`), names something in the checkout
    (`rules/verdict.py` may be ingestd/rules/verdict.py). Placeholders (`<batch>`, `{path}`, `*.part`) are skipped."""
    text = doc.read_text(encoding="utf-8")
    named = set(re.findall(rf"`((?:{'|'.join(map(re.escape, _TOP))})/[^`\s]*)`", text))
    named |= set(re.findall(r"`([\w/-][\w./-]*\.(?:py|md|yaml|json|service|toml|cfg))`", text))
    missing = []
    for name in sorted(named):
        if re.search(r"[<>{}*…]", name):
            continue
        path = name.rstrip("/")
        if path not in FILES and not any(file.endswith(f"/{path}") for file in FILES):
            missing.append(name)
    assert not missing, f"{doc.name} names paths that are not in the repository: {missing}"
