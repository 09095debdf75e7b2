"""(c) ``qlora-ref finetune --device DEVICE`` (the main job) through its command line, in this process.

The numbers are the run's own ``report.json``: time per step and peak memory.
"""
from __future__ import annotations

import json
import time

from .context import Context
from .report import gb, table, write_file

# the dry run's finetune reads this named configuration: a small training and eval set
DRY_FINETUNE_CONFIG = {"gpu_check_dry_run": {"train_size": 64, "eval_size": 8}}


def _argv(ctx: Context, run_dir) -> list[str]:
    argv = ["finetune", "--device", ctx.device, "--quiet", "--output-dir", str(run_dir),
            *ctx.sizes.finetune_flags]
    if ctx.dry_run:
        config = ctx.out / "finetune_dry_run.json"
        write_file(config, json.dumps(DRY_FINETUNE_CONFIG, indent=1))
        argv += ["--config", str(config), next(iter(DRY_FINETUNE_CONFIG))]
    return argv


def run(ctx: Context) -> dict:
    """``qlora-ref finetune`` through its command line, in this process (numbers: report.json)."""
    from qlora_ref import cli

    run_dir = ctx.out / "run"
    argv = _argv(ctx, run_dir)
    started = time.perf_counter()
    code = cli.main(argv)
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"qlora-ref finetune exited with status {code}")
    report = json.loads((run_dir / "report.json").read_text())
    steps, seconds = report["steps"], report["seconds"]
    return {"command": "qlora-ref " + " ".join(argv), "steps": steps, "training_seconds": seconds,
            "seconds_per_step": seconds / steps, "cli_wall_seconds": wall,
            "peak_memory_bytes": report["peak_memory_bytes"], "device": report["device"],
            "before": report["before"], "after": report["after"],
            "trainable_params": report["parameters"].get("trainable"),
            "report": str((run_dir / "report.md").relative_to(ctx.out))}


def markdown(r: dict) -> str:
    def accuracy(d):
        return d.get("accuracy", "n/a") if d else "n/a"

    rows = [(r["steps"], f"{r['training_seconds']:.2f}", f"{1e3 * r['seconds_per_step']:.1f}",
             gb(r["peak_memory_bytes"], 4), accuracy(r["before"]), accuracy(r["after"]))]
    return (f"# (c) The main job on the device\n\n`{r['command']}`\n\n"
            + table(("steps", "training s", "ms / step", "peak memory (training loop)",
                     "accuracy before", "after"), rows)
            + f"\n\nWall time with evaluation and saving: {r['cli_wall_seconds']:.1f} s. "
              f"Full report: `{r['report']}`.\n")
