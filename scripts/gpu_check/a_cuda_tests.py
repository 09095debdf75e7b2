"""(a) The ``@pytest.mark.cuda`` tests, run by pytest; its JUnit XML gives the outcome of each.

bitsandbytes' CUDA ``quantize_4bit`` against ours for every blocksize, dtype
and quant type, with and without double quantization; the torch layer on
CUDA; PagedAdamW on pinned memory. On the CPU they are collected and skipped.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from .context import ROOT, Context
from .report import log_file, table


def cuda_test_files() -> list[str]:
    """The test modules that hold ``@pytest.mark.cuda`` tests (found, not listed by hand)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "pytest.mark.cuda" in p.read_text())


def parse_junit(path: Path) -> list[dict]:
    """``[{"name", "outcome", "message"}]`` for every test case of a pytest JUnit XML file."""
    import xml.etree.ElementTree as ET

    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error"}.get(child.tag, "skipped")
                message = child.get("message") or ""
                break
        cases.append({"name": f"{case.get('classname')}::{case.get('name')}",
                      "outcome": outcome, "message": message})
    return cases


def _count(cases, outcome) -> int:
    return sum(c["outcome"] == outcome for c in cases)


def parity_counts(cases) -> dict:
    """Outcomes of ``test_cuda_kernels_give_our_bytes``, split by its ``double_quant`` parameter.

    ``double_quant`` is the test's only boolean parameter, so ``True`` / ``False``
    among the ``-``-separated parts of the test id tell the two groups apart.
    """
    groups = {"no_double_quant": [], "double_quant": []}
    for case in cases:
        if "test_cuda_kernels_give_our_bytes[" not in case["name"]:
            continue
        params = case["name"].rsplit("[", 1)[1].rstrip("]").split("-")
        groups["double_quant" if "True" in params else "no_double_quant"].append(case)
    return {group: {o: _count(members, o) for o in ("passed", "failed", "error", "skipped")}
            for group, members in groups.items()}


def run(ctx: Context) -> dict:
    """Run the CUDA-marked tests with pytest; the JUnit XML gives the outcome of each."""
    files = cuda_test_files()
    junit, log = ctx.out / "junit.xml", ctx.out / "pytest.log"
    command = [sys.executable, "-m", "pytest", *files, "-m", "cuda", "-q", "-rs",
               "-p", "no:cacheprovider", f"--junitxml={junit}"]
    started = time.perf_counter()
    with log_file(log) as f:
        code = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else "(no output)"
    if code not in (0, 1):  # 0 all passed or skipped, 1 some failed; anything else: no run
        raise RuntimeError(f"pytest exited with status {code}: {summary}")
    cases = parse_junit(junit)
    skip_reasons = sorted({c["message"] for c in cases if c["outcome"] == "skipped"})
    return {"command": "python " + " ".join(command[1:]),
            "files": files, "pytest_exit_code": code, "pytest_summary": summary,
            "pytest_seconds": seconds, "collected": len(cases),
            "passed": _count(cases, "passed"), "failed": _count(cases, "failed"),
            "errors": _count(cases, "error"), "skipped": _count(cases, "skipped"),
            "skip_reasons": skip_reasons, "parity": parity_counts(cases),
            "not_passed": [c for c in cases if c["outcome"] in ("failed", "error")]}


def markdown(r: dict) -> str:
    p = r["parity"]
    rows = [("all CUDA-marked tests", r["collected"], r["passed"], r["failed"] + r["errors"],
             r["skipped"])]
    rows += [(f"bitsandbytes CUDA parity, {name.replace('_', ' ')}", sum(c.values()),
              c["passed"], c["failed"] + c["error"], c["skipped"]) for name, c in p.items()]
    text = (f"# (a) CUDA-marked tests\n\n`{r['command']}`\n\n"
            + table(("tests", "collected", "passed", "failed", "skipped"), rows)
            + f"\n\npytest: {r['pytest_summary']} ({r['pytest_seconds']:.0f} s); "
              "log: `pytest.log`\n")
    if r["skip_reasons"]:
        text += "\nskipped because: " + "; ".join(r["skip_reasons"]) + "\n"
    for case in r["not_passed"]:
        text += f"\n- {case['outcome']}: `{case['name']}`: {case['message'][:300]}"
    return text
