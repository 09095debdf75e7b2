"""Sphinx configuration for the qlora_ref documentation.

Build with ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.

* API pages come from the package's numpydoc docstrings (autodoc + napoleon);
  nothing is mocked, so the package and its dependencies must be importable.
* The notebooks in ``../notebooks`` are rendered by myst-nb from their stored
  outputs; they are never executed here (``nb_execution_mode = "off"``).
  ``docs/notebooks`` is a symlink to them; where a checkout has no symlinks
  (it then holds a small text file), the notebooks are copied in at build time.
* ``benchmarks.md`` and ``experiments.md`` are written by other parts of the
  project; each is listed in the "Results" toctree only if it exists.
* The site needs no network (a course room may have none): MathJax 3 comes
  from the ``sphinx-mathjax-offline`` package and is copied to
  ``_static/mathjax`` (fonts included), and the theme's scripts, styles and
  fonts are all local. ``tests/docs/test_site_browser.py`` opens every page in a
  headless browser with the network blocked to keep it so.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the package, if it is not installed

import qlora_ref  # noqa: E402

# -- project --------------------------------------------------------------------------
project = "qlora_ref"
author = "qlora_ref contributors"
copyright = "2026, qlora_ref contributors"
release = qlora_ref.__version__
version = release

# -- extensions -----------------------------------------------------------------------
extensions = [
    "myst_nb",                 # Markdown (MyST) pages and .ipynb notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",     # numpydoc-style sections
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 copied into _static: formulas render with no network
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "README.md", "Thumbs.db", ".DS_Store", "**/.ipynb_checkpoints",
                    "results/*.md"]  # tables the experiment scripts write; the pages quote them

# -- MyST and notebooks -------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"           # render the stored outputs; never run a notebook here
nb_merge_streams = True             # one block per cell for consecutive print() output
nb_render_markdown_format = "myst"  # display(Markdown(...)) tables render as tables
nb_output_stderr = "show"

# -- autodoc / napoleon -----------------------------------------------------------------------
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "none"          # the numpydoc "Parameters" sections carry the types
autodoc_preserve_defaults = True
autoclass_content = "class"
autodoc_inherit_docstrings = False  # torch's forward/backward docstrings cite labels of torch's docs
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_ivar = True            # dataclass "Attributes" sections as fields, not duplicates
napoleon_use_rtype = False

# -- HTML ---------------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"qlora_ref {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,
    "home_page_in_toc": True,
}

# -- notebooks: symlink, or copy where the checkout has no symlinks --------------------------
_NB_LINK = HERE / "notebooks"
_NB_SOURCE = ROOT / "notebooks"


def _ensure_notebooks() -> None:
    if _NB_LINK.is_dir():
        return                      # the symlink works (or a copy is already there)
    if _NB_LINK.exists() or _NB_LINK.is_symlink():
        _NB_LINK.unlink()           # a text stand-in for a symlink, or a broken link
    shutil.copytree(_NB_SOURCE, _NB_LINK, ignore=shutil.ignore_patterns("*.py", ".ipynb_*"))


_ensure_notebooks()
exclude_patterns += [str(p.relative_to(HERE)) for p in _NB_LINK.glob("*") if p.suffix != ".ipynb"]

# -- optional result pages ---------------------------------------------------------------------
OPTIONAL_PAGES = ("benchmarks", "experiments")
_PLACEHOLDER = "<!-- optional-results-toctree -->"


def _results_toctree() -> str:
    present = [name for name in OPTIONAL_PAGES if (HERE / f"{name}.md").is_file()]
    if not present:
        return ""
    return "\n```{toctree}\n:maxdepth: 1\n:caption: Results\n\n" + "\n".join(present) + "\n```\n"


def _insert_results(app, docname, source):
    if docname == "index":
        source[0] = source[0].replace(_PLACEHOLDER, _results_toctree())


def _reread_index(app, env, added, changed, removed):
    return ["index"]  # so that a results page added since the last build joins its toctree


def setup(app):
    app.connect("source-read", _insert_results)
    app.connect("env-get-outdated", _reread_index)
