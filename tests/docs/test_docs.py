"""The documentation builds with no warning (``sphinx -W``), and the notebooks render with their plots.

The site is built once per test session (:func:`build_site`); the browser
checks in ``test_site_browser.py`` open the same build.
"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

_BUILDS = {}  # one sphinx run per test session, shared by every test that asks for the site


def build_site(tmp_path_factory) -> Path:
    """Build the HTML site once per session and return its directory (fails with sphinx's output).

    Any warning fails the build for every test that uses it: with ``-W`` sphinx stops before
    it copies the static files (MathJax, the theme's CSS), so a warned build is not the site.
    """
    if "html" not in _BUILDS:
        base = tmp_path_factory.mktemp("site")
        cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
               "-d", str(base / "doctrees"), str(DOCS), str(base / "html")]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        _BUILDS["html"] = (base / "html", proc)
    out, proc = _BUILDS["html"]
    assert proc.returncode == 0, f"sphinx failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    return build_site(tmp_path_factory)


@pytest.mark.slow
def test_sphinx_build_has_no_warnings(site):
    out = site
    for page in ("index", "concepts", "api", "names"):
        assert (out / f"{page}.html").is_file(), page
    api = (out / "api.html").read_text(encoding="utf-8")
    for name in ("quantize_4bit", "QuantState", "QLoRAMatmul", "PagedAdamW", "finetune_memory"):
        assert name in api, f"the API page does not document {name}"
    rendered = sorted((out / "notebooks").glob("[0-9][0-9]_*.html"))
    shipped = sorted(Path(__file__).resolve().parents[2].glob("notebooks/[0-9][0-9]_*.ipynb"))
    assert [p.stem for p in rendered] == [p.stem for p in shipped] and len(shipped) == 9, \
        ([p.name for p in rendered], [p.name for p in shipped])
    for page in rendered:
        assert "<img" in page.read_text(encoding="utf-8"), f"{page.name} shows no plot"


@pytest.mark.slow
def test_the_site_carries_its_own_math_renderer(site):
    """MathJax is loaded from the build directory, never from a CDN (the course room is offline)."""
    concepts = (site / "concepts.html").read_text(encoding="utf-8")
    assert 'src="_static/mathjax/tex-chtml.js"' in concepts, "concepts.html does not load the local MathJax"
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()
    fonts = list((site / "_static" / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert fonts, "MathJax's CHTML fonts were not copied into the build"
    for page in [*site.glob("*.html"), *(site / "notebooks").glob("*.html")]:
        text = page.read_text(encoding="utf-8")
        for attr in ('src="http', "src='http", 'src="//', '<link rel="stylesheet" href="http'):
            assert attr not in text, f"{page.name} loads a resource from the network ({attr}...)"
