"""The docs cannot drift: the parameter reference is the table's, and every link and path resolves."""

import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"`((?:ttkd|docs|tests|benchmarks|entry|experiments|\.ci)/[\w./-]*[\w/])`")


def test_the_parameter_reference_is_what_the_script_generates_from_the_table():
    done = subprocess.run([sys.executable, "docs/parameters.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from ttkd import config
    page = (REPO / "docs" / "parameters.md").read_text()
    assert all(f"| `{name}` |" in page for name in config.PARAMS)


def slugs(text: str) -> set[str]:
    """GitHub's anchors of a page's headings."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_and_path_in_the_docs_resolves(page):
    text = page.read_text()
    bad = []
    for target in LINK.findall(text):
        parsed = urllib.parse.urlparse(target)
        if parsed.scheme in ("http", "https"):
            if not parsed.netloc:
                bad.append(target)
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path) if path else page
        if not file.exists():
            bad.append(target)
        elif anchor and file.suffix == ".md" and anchor not in slugs(file.read_text()):
            bad.append(target)
    bad += [p for p in REPO_PATH.findall(text)  # a placeholder (experiments/NAME.toml) names no file
            if not re.search(r"[A-Z]{2,}", p) and not (REPO / p).exists()]
    assert bad == []
