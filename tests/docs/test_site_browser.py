"""The built site works in a real browser with the network off (the course-room case).

Each page is opened in headless Chromium (Debian's ``chromium`` package,
driven through the DevTools protocol by ``playwright``; no browser is
downloaded). Every request that is not to a ``file://`` URL is recorded and
aborted, and the host resolver maps every name to nothing, so a page that
needs the network shows it here. On each page:

* no request leaves the machine, and every local file it asks for exists;
* every formula was typeset by the bundled MathJax 3 (an ``mjx-container``
  inside each Sphinx math node, no TeX error), and no raw TeX delimiters are
  left in the text;
* every ``<img>`` loaded (``naturalWidth > 0``).

Without a browser the tests skip with the reason locally, and fail where
``QLORA_REF_REQUIRE_BROWSER=1`` (CI installs Debian's chromium in ``.ci/run``).
``QLORA_REF_BROWSER`` names a Chromium binary to use instead of the one on ``PATH``.
"""
import os
import re
import shutil

import pytest

from tests.docs.test_docs import build_site

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# the pages whose formulas the brief names; each must hold math for the checks to mean anything
MATH_PAGES = ("concepts.html", "notebooks/05_the_qlora_layer.html")
TYPESET_TIMEOUT_MS = 30_000

# Wait for MathJax's first typesetting pass (or report why there is none), then for every image.
SETTLE_JS = """async (timeoutMs) => {
  const timeout = new Promise(r => setTimeout(() => r("timeout"), timeoutMs));
  let mathjax = "absent";
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    mathjax = await Promise.race([MathJax.startup.promise.then(() => "done"), timeout]);
  }
  const images = Array.from(document.images);
  images.forEach(img => { img.loading = "eager"; });
  await Promise.race([Promise.all(images.map(img => img.complete ? null
      : new Promise(r => { img.addEventListener("load", r); img.addEventListener("error", r); }))),
    timeout]);
  return mathjax;
}"""

# What the page shows, as the checks need it.
INSPECT_JS = r"""() => {
  const nodes = Array.from(document.querySelectorAll(".math"));
  const raw = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    if (n.parentElement.closest("pre, code, script, style, textarea, mjx-container, .highlight")) continue;
    if (/\$\$|\\\(|\\\[|\\begin\{|\$[^$\s][^$]*\$/.test(n.textContent)) raw.push(n.textContent.trim().slice(0, 80));
  }
  return {
    math: nodes.length,
    untypeset: nodes.filter(e => {
      const c = e.querySelector("mjx-container");
      return !c || c.getBoundingClientRect().width === 0 || !c.querySelector("mjx-math > *");
    }).map(e => e.textContent.slice(0, 80)),
    tex_errors: Array.from(document.querySelectorAll("mjx-merror")).map(e => e.textContent.slice(0, 80)),
    raw_tex: raw,
    images: Array.from(document.images).map(i => ({src: i.getAttribute("src"), width: i.naturalWidth})),
  };
}"""


def _browser_executable():
    explicit = os.environ.get("QLORA_REF_BROWSER")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return next(filter(None, map(shutil.which, BROWSER_NAMES)), None)


def _unavailable(reason: str):
    if os.environ.get("QLORA_REF_REQUIRE_BROWSER"):
        pytest.fail(f"{reason}, and QLORA_REF_REQUIRE_BROWSER is set "
                    "(CI: .ci/run installs Debian's chromium and the [docs] extra)")
    pytest.skip(f"{reason} (set QLORA_REF_REQUIRE_BROWSER=1 to make this a failure)")


class OfflineBrowser:
    """One headless Chromium context that records and aborts every request leaving file://."""

    def __init__(self, browser):
        self.context = browser.new_context()
        self.outside, self.failed = [], []
        self.context.on("request", self._record)
        self.context.on("requestfailed", lambda r: self.failed.append(f"{r.url} ({r.failure})"))
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.set_default_timeout(TYPESET_TIMEOUT_MS)

    def _record(self, request):
        if not request.url.startswith(("file://", "data:", "blob:", "about:")):
            self.outside.append(request.url)

    @staticmethod
    def _route(route):
        url = route.request.url
        if url.startswith(("file://", "data:", "blob:", "about:")):
            route.continue_()
        else:
            route.abort("internetdisconnected")

    def visit(self, path):
        """Open ``path``; return what it asked of the network and what it shows."""
        self.outside.clear()
        self.failed.clear()
        self.page.goto(path.as_uri(), wait_until="load")
        mathjax = self.page.evaluate(SETTLE_JS, TYPESET_TIMEOUT_MS)
        shown = self.page.evaluate(INSPECT_JS)
        return {"mathjax": mathjax, "outside": list(self.outside),
                "failed": [f for f in self.failed if not any(f.startswith(o) for o in self.outside)],
                **shown}


@pytest.fixture(scope="module")
def browser():
    executable = _browser_executable()
    if executable is None and os.environ.get("QLORA_REF_BROWSER"):
        _unavailable(f"QLORA_REF_BROWSER={os.environ['QLORA_REF_BROWSER']} is not an executable")
    if executable is None:
        _unavailable(f"no Chromium found (looked for {', '.join(BROWSER_NAMES)} on PATH)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[docs]')")
    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=executable, headless=True,
            # a second wall behind the request router: no host name resolves
            args=["--host-resolver-rules=MAP * ~NOTFOUND"])
        yield OfflineBrowser(chromium)
        chromium.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return build_site(tmp_path_factory)  # the same build as test_docs.py (once per session)


def _problems(name, seen):
    """Every way the page ``name`` failed offline, as readable lines (empty if none)."""
    lines = [f"{name}: requested {u} (outside the build directory)" for u in seen["outside"]]
    lines += [f"{name}: a local file failed to load: {f}" for f in seen["failed"]]
    if seen["math"] and seen["mathjax"] != "done":
        lines.append(f"{name}: {seen['math']} formulas, MathJax {seen['mathjax']}")
    lines += [f"{name}: formula not typeset: {t!r}" for t in seen["untypeset"]]
    lines += [f"{name}: TeX error: {t!r}" for t in seen["tex_errors"]]
    lines += [f"{name}: raw TeX left in the text: {t!r}" for t in seen["raw_tex"]]
    lines += [f"{name}: image did not load: {i['src']}" for i in seen["images"] if i["width"] == 0]
    return lines


def test_the_network_block_catches_what_a_page_asks_from_outside(browser, tmp_path):
    """The checks themselves: a page with one outside image and one CDN script is caught twice,
    and its local image loads (so a pass below means something)."""
    (tmp_path / "local.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="20" height="10"><rect width="20" height="10"/></svg>')
    page = tmp_path / "page.html"
    page.write_text('<!doctype html><html><body><p>plain text</p>'
                    '<img src="local.svg"><img src="https://example.org/remote.png">'
                    '<script src="https://cdn.example.org/mathjax/tex-chtml.js"></script>'
                    '<span class="math">\\(x^2\\)</span></body></html>')
    seen = browser.visit(page)
    assert sorted(seen["outside"]) == ["https://cdn.example.org/mathjax/tex-chtml.js",
                                       "https://example.org/remote.png"], seen["outside"]
    assert [i["width"] for i in seen["images"]] == [20, 0], seen["images"]
    assert seen["mathjax"] == "absent" and seen["untypeset"] == ["\\(x^2\\)"], seen
    assert seen["raw_tex"], "the raw-TeX check missed \\(x^2\\)"
    reported = "\n".join(_problems("page.html", seen))
    for part in ("requested https://example.org/remote.png", "requested https://cdn.example.org",
                 "1 formulas, MathJax absent", "formula not typeset", "raw TeX left",
                 "image did not load: https://example.org/remote.png"):
        assert part in reported, f"the report misses {part!r}:\n{reported}"


@pytest.mark.slow
def test_formulas_are_typeset_on_the_concepts_page_and_a_notebook(browser, site):
    for name in MATH_PAGES:
        html = (site / name).read_text(encoding="utf-8")
        in_source = len(re.findall(r'class="math notranslate nohighlight"', html))
        assert in_source > 0, f"{name} has no formulas to check"
        seen = browser.visit(site / name)
        assert seen["mathjax"] == "done", f"{name}: MathJax {seen['mathjax']}"
        assert seen["math"] == in_source, (name, seen["math"], in_source)
        assert not _problems(name, seen), "\n".join(_problems(name, seen))


@pytest.mark.slow
def test_every_page_renders_offline(browser, site):
    pages = sorted(site.glob("*.html")) + sorted((site / "notebooks").glob("*.html"))
    assert len(pages) > 10, [p.name for p in pages]
    problems = []
    for path in pages:
        problems += _problems(str(path.relative_to(site)), browser.visit(path))
    assert not problems, "\n".join(problems)
