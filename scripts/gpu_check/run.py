"""Running a part: in a child process of its own (the driver's side), or here (the child's side).

A hang or a CUDA error in one part loses only that part: the driver starts
each in a new process session and kills that session at the part's limit.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from . import parts
from .context import ROOT, Context, PartSkipped
from .report import environment, log_file, write_file


def run_part_here(key: str, ctx: Context) -> int:
    """Child process: run one part, write its result.json and result.md; 0 on success."""
    part = parts.PART_BY_KEY[key]
    ctx.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {"part": key, "title": part.title, "device": ctx.device, "dry_run": ctx.dry_run}
    try:
        result["environment"] = environment(ctx.device)
        result.update(part.run(ctx))
        result.update(status="ok", part_seconds=time.perf_counter() - started)
        write_file(ctx.out / "result.md", part.markdown(result))
        code = 0
    except PartSkipped as exc:  # not a failure: the summary says why
        result.update(status="skipped", reason=str(exc), part_seconds=time.perf_counter() - started)
        print(f"({key}) skipped: {exc}")
        code = 0
    except Exception as exc:  # the driver reads the status; the traceback is in log.txt
        traceback.print_exc()
        result.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                      part_seconds=time.perf_counter() - started)
        code = 1
    write_file(ctx.out / "result.json", json.dumps(result, indent=1, default=str))
    return code


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _child(part, args, out: Path, folder: Path, timeout_s: float) -> tuple:
    """Start ``python -m scripts.gpu_check --part-here KEY`` in its own session; (exit status, timed out)."""
    command = [sys.executable, "-m", "scripts.gpu_check", "--out", str(out),
               "--device", args.device, "--part-here", part.key, *(["--dry-run"] * args.dry_run)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.device == "cpu":
        # bitsandbytes wraps CPU fallbacks in torch.compile: minutes of compiling on a small
        # CPU, for nothing the dry run checks (as tests/conftest.py does)
        env.setdefault("TORCHDYNAMO_DISABLE", "1")
        env.setdefault("OMP_WAIT_POLICY", "passive")
    with log_file(folder / "log.txt") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
            return proc.returncode, False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session we started, and only it
            proc.wait()
            return proc.returncode, True


def run_part_subprocess(part, args, out: Path, timeout_s: float) -> dict:
    """Run one part in a new process session; on timeout, kill that whole session (pytest too)."""
    folder = out / part.folder
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", "result.md"):
        (folder / stale).unlink(missing_ok=True)
    started = time.perf_counter()
    code, timed_out = _child(part, args, out, folder, timeout_s)
    seconds = time.perf_counter() - started
    try:
        result = json.loads((folder / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        result = {"part": part.key, "title": part.title, "device": args.device,
                  "dry_run": args.dry_run, "status": "failed",
                  "error": f"no result.json (exit status {code})"}
    if timed_out:
        result.update(status="timeout", error=f"killed after its limit of {timeout_s:.0f} s")
    result.update(wall_seconds=seconds, timeout_s=timeout_s, exit_status=code)
    if result["status"] != "ok":
        result["log_tail"] = _tail(folder / "log.txt")
    write_file(folder / "result.json", json.dumps(result, indent=1, default=str))
    if result["status"] != "ok":
        why = result.get("error") or result.get("reason")
        write_file(folder / "result.md", 
            f"# ({part.key}) {part.title}\n\n**{result['status']}**: {why}\n\n"
            f"```\n{result['log_tail']}\n```\n")
    return result


def not_started(part, args, out: Path, total_s: float) -> dict:
    """The result of a part the driver did not start: the script's total limit was spent."""
    folder = out / part.folder
    folder.mkdir(parents=True, exist_ok=True)
    error = f"not started: the script's total limit of {total_s:.0f} s was spent"
    result = {"part": part.key, "title": part.title, "device": args.device,
              "dry_run": args.dry_run, "status": "timeout", "error": error,
              "wall_seconds": 0.0, "timeout_s": 0.0}
    write_file(folder / "result.json", json.dumps(result, indent=1))
    write_file(folder / "result.md", f"# ({part.key}) {part.title}\n\n**timeout**: {error}\n")
    return result


def earlier_result(part, args, out: Path):
    """A part's result.json from an earlier run into the same folder, in the same mode, or None."""
    try:
        result = json.loads((out / part.folder / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = (result.get("device"), result.get("dry_run")) == (args.device, args.dry_run)
    return {**result, "earlier_run": True} if same and "wall_seconds" in result else None
