"""README.md and docs/: every relative link and image resolves, and images/ holds only what the README shows."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def targets(path):
    """Relative targets of Markdown links/images and HTML src attributes in a file, without #anchors."""
    text = path.read_text()
    found = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)
    return [t.split("#")[0] for t in found if not re.match(r"[a-z]+:", t) and t.split("#")[0]]


def test_every_relative_link_and_image_in_the_docs_exists():
    missing = [f"{p.name}: {t}" for p in DOCS for t in targets(p) if not (p.parent / t).exists()]
    assert not missing, missing


def test_images_holds_only_the_figures_the_readme_shows():
    shown = {(ROOT / t).resolve() for t in targets(ROOT / "README.md") if t.startswith("images/")}
    kept = {p.resolve() for p in (ROOT / "images").iterdir() if p.name != ".gitkeep"}
    assert shown and kept == shown
