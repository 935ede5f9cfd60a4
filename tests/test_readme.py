"""README.md's offline quick start (`make demo`) and docs/DESIGN.md's Python snippet run as written."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.trains  # every test here trains a model

ROOT = Path(__file__).resolve().parents[1]
DEMO_RUN = Path("runs/pathmnist-synthetic_28")


def doc(name):
    """A documentation file's text, by its path from the repository root (e.g. "docs/DESIGN.md")."""
    return (ROOT / name).read_text()


def readme():
    return doc("README.md")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A copy of the repo (sharing its .venv) after `make demo`: (folder, make's output)."""
    repo = tmp_path_factory.mktemp("repo")
    shutil.copytree(ROOT, repo, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".git", ".venv", "runs", "data", "*.png", "__pycache__"))
    (repo / ".venv").symlink_to(ROOT / ".venv")
    result = subprocess.run(["make", "-o", ".venv/.installed", "demo"], cwd=repo, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return repo, result.stdout


def test_make_demo_writes_what_the_readme_says(demo):
    repo, _ = demo
    listed = re.search(r"It writes\s+`runs/pathmnist-synthetic_28/\{(.*?)\}` and\s+`runs/pathmnist-synthetic_28/"
                       r"images/\{(.*?)\}\.png`", readme(), re.S)
    files = [f.strip() for f in listed.group(1).replace("\n", "").split(",")]
    figures = [f.strip() for f in listed.group(2).replace("\n", "").split(",")]
    assert len(files) == 9 and len(figures) == 7
    for name in files:
        assert (repo / DEMO_RUN / name).is_file(), name
    for name in figures:
        assert (repo / DEMO_RUN / "images" / f"{name}.png").is_file(), name


def test_make_demo_marks_everything_synthetic_and_ends_with_the_reports_path(demo):
    repo, out = demo
    assert "SYNTHETIC data, not PathMNIST" in out and "quality ig: 100 images" in out
    last = [line for line in out.strip().splitlines() if not line.startswith("make[")][-1]  # a sub-make's -w lines
    assert last.startswith("report: runs/pathmnist-synthetic_28/report.html")
    assert (repo / "runs/pathmnist-synthetic_28/report.html").is_file()


def test_the_demo_learns_leads_with_a_method_that_passes_and_its_model_free_maps_find_no_evidence(demo):
    import json
    repo, _ = demo
    m = json.loads((repo / DEMO_RUN / "metrics.json").read_text())
    assert m["acc"] >= 0.95  # the structure-only evidence is learnt in 8 epochs
    rec = m["recommended"]
    assert rec and all(t["pass"] for t in m["trust"][rec].values())
    for control in ("control:input", "control:edge"):
        q = m["controls"][control]
        assert abs(q["mask_mass"] - q["mask_area"]) < 0.05, control
        assert not m["trust"][control]["mprt"]["pass"] and not m["trust"][control]["smooth_mprt"]["pass"]


def test_the_sql_snippet_reads_an_attribution_from_the_demo_store(demo):
    repo, _ = demo
    snippets = re.findall(r"```python\n(.*?)```", doc("docs/DESIGN.md"), re.S)
    snippet = next(s for s in snippets if "explanations.db" in s)
    result = subprocess.run([sys.executable, "-c", snippet], cwd=repo, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"test image \d+: true \d, predicted \d, attribution \(3, 28, 28\)\n", result.stdout)
