"""The docs cannot drift: the parameter reference is the table's, and every link and path resolves."""

import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"`((?:ttkd|docs|tests|benchmarks|entry|experiments|\.ci)/[\w./-]*[\w/])`")


def test_the_parameter_reference_is_what_the_script_generates_from_the_table():
    done = subprocess.run([sys.executable, "docs/parameters.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from ttkd import config
    page = (REPO / "docs" / "reference" / "parameters.md").read_text()
    assert all(f"| `{name}` |" in page for name in config.PARAMS)


def slugs(text: str) -> set[str]:
    """GitHub's anchors of a page's headings."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
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


def test_the_readme_is_a_front_page_and_the_manual_lists_every_page_in_its_reading_order():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300
    index = REPO / "docs" / "README.md"
    listed = [(index.parent / target).resolve() for target in LINK.findall(index.read_text())
              if not urllib.parse.urlparse(target).scheme]
    pages = {p.resolve() for p in PAGES if p.parent != REPO and p != index}
    assert pages - set(listed) == set()  # a page the manual does not list cannot be found in order
    tutorial = [p.name for p in listed if p.parent.name == "tutorial"]
    assert tutorial == sorted(tutorial) and len(tutorial) == len(set((REPO / "docs" / "tutorial").glob("*.md")))


def test_the_ci_runs_the_readmes_install_study_and_test_commands():
    script = (REPO / ".ci" / "run").read_text()
    blocks = re.findall(r"^```sh\n(.*?)^```$", (REPO / "README.md").read_text(), flags=re.M | re.S)
    assert "awk" in script and "n<=2" in script  # it runs the README's first two sh blocks
    assert "mlflow run . --env-manager local" in blocks[0] and "pytest" in blocks[1]


def test_the_kd_method_how_to_builds_a_method_that_registers_and_computes_its_maths(monkeypatch):
    """The guide's code, run as written: its module registers with its parameter, its loss is CE + β·MSE."""
    import torch
    import torch.nn.functional as F

    from ttkd import config, kd

    module, _ = re.findall(r"```python\n(.*?)```", (REPO / "docs/how-to/kd-method.md").read_text(), flags=re.S)
    monkeypatch.setattr(kd.base, "_REGISTRY", dict(kd.base._REGISTRY))  # the guide's method stays out of the real registry
    monkeypatch.setattr(config, "_DECLARED", dict(config._DECLARED))  # and its parameter out of the real table
    monkeypatch.setattr(config, "_USES", dict(config._USES))
    exec(compile(module, "logit.py", "exec"), {"__name__": "ttkd.kd.logit"})
    assert kd.names()[-1] == "logit" and kd.get("logit").params == ("logit_beta",)
    param = config.PARAMS["logit_beta"]  # declared where it registers: a run parameter of distill, study and sweep
    assert param.valid(param.default) and not param.valid(-1.0) and list(config.PARAMS)[-1] == "logit_beta"
    assert all("logit_beta" in config.STAGE_PARAMS[stage] for stage in ("distill", "main", "sweep"))

    torch.manual_seed(0)
    b = kd.Batch(logits=torch.randn(4, 3), labels=torch.tensor([0, 1, 2, 0]), epoch=1, partner_logits=torch.randn(4, 3))
    parts = kd.build("logit", kd.Context(3, torch.tensor([0, 1, 2])), logit_beta=0.5)(b)
    by_hand = F.cross_entropy(b.logits, b.labels) + 0.5 * ((b.logits - b.partner_logits) ** 2).mean()
    assert torch.allclose(parts["loss"], by_hand) and set(parts) == {"loss", "ce", "mse"}
