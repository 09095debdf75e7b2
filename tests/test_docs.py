"""The documentation builds with no warning (``sphinx -W``), and the notebooks render with their plots."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


@pytest.mark.slow
def test_sphinx_build_has_no_warnings(tmp_path):
    out = tmp_path / "html"
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
           "-d", str(tmp_path / "doctrees"), str(DOCS), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"sphinx failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    for page in ("index", "concepts", "api", "names"):
        assert (out / f"{page}.html").is_file(), page
    api = (out / "api.html").read_text(encoding="utf-8")
    for name in ("quantize_4bit", "QuantState", "QLoRAMatmul", "PagedAdamW", "finetune_memory"):
        assert name in api, f"the API page does not document {name}"
    rendered = sorted((out / "notebooks").glob("[0-9][0-9]_*.html"))
    assert len(rendered) == 8, [p.name for p in rendered]
    for page in rendered:
        assert "<img" in page.read_text(encoding="utf-8"), f"{page.name} shows no plot"
