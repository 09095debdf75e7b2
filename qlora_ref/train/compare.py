"""``compare``: the paper's central claims, in miniature, over several seeds.

Paper section 4 and Figure/Table results, asked of the tiny model:

1. **Data type** (paper: NF4 QLoRA matches 16-bit LoRA; FP4 and Int4 do
   worse): full fine-tuning, LoRA on a 16-bit base, QLoRA with NF4 + double
   quantization, QLoRA FP4, QLoRA Int4.
2. **Where the adapters go** (paper: LoRA on all linear layers is needed to
   match full fine-tuning): all linear layers against attention only.
3. **Rank** (paper: the rank matters little): NF4 QLoRA at several ranks.

Every arm runs the same :func:`~qlora_ref.train.finetune.finetune` loop
with its own overrides, once per seed; the table reports the mean and the
standard deviation over seeds of the held-out exact-match accuracy and the
answer-token loss.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from pathlib import Path

from .finetune import FinetuneConfig, finetune
from .report import draw_loss_curves

__all__ = ["ARMS", "PROFILES", "run_compare", "format_table"]

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

#: name -> (question it answers, overrides of FinetuneConfig)
ARMS = {
    "full fine-tuning": ("data type", dict(full_finetune=True, quant_bits=16, learning_rate=1e-3)),
    "LoRA, 16-bit base": ("data type", dict(quant_bits=16)),
    "QLoRA NF4 + DQ": ("data type", dict(quant_bits=4, bnb_4bit_quant_type="nf4")),
    "QLoRA FP4": ("data type", dict(quant_bits=4, bnb_4bit_quant_type="fp4")),
    "QLoRA Int4": ("data type", dict(quant_bits=4, bnb_4bit_quant_type="int4")),
    "QLoRA NF4, attention only": ("placement", dict(target_modules=ATTENTION)),
    "QLoRA NF4, r=2": ("rank", dict(r=2)),
    "QLoRA NF4, r=32": ("rank", dict(r=32)),
}

#: profile -> (seeds, overrides for every arm)
PROFILES = {
    "quick": ((0, 1, 2), dict(num_train_epochs=0.5, train_size=2000, eval_size=100)),
    "full": ((0, 1, 2), dict()),
}


@dataclasses.dataclass
class ArmResult:
    arm: str
    question: str
    seeds: list
    accuracy: list
    loss: list
    seconds: list
    histories: list

    def summary(self) -> dict:
        def stats(values):
            return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        return {"accuracy": stats(self.accuracy), "loss": stats(self.loss),
                "seconds": stats(self.seconds)}


def run_compare(profile: str = "quick", device=None, seeds=None, arms=None, base_config=None,
                output_dir=None, progress: bool = True) -> list[ArmResult]:
    """Run every arm over the profile's seeds; write a table, JSON and a plot if ``output_dir``."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    profile_seeds, overrides = PROFILES[profile]
    seeds = list(seeds if seeds is not None else profile_seeds)
    arms = list(arms if arms is not None else ARMS)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {list(ARMS)}")
    base = dataclasses.asdict(base_config or FinetuneConfig())
    results = []
    started = time.perf_counter()
    for arm in arms:
        question, arm_overrides = ARMS[arm]
        r = ArmResult(arm, question, seeds, [], [], [], [])
        for seed in seeds:
            config = FinetuneConfig(**{**base, **overrides, **arm_overrides, "seed": seed})
            res = finetune(config, device=device, progress=False, evaluate_before=False)
            r.accuracy.append(res.after["accuracy"])
            r.loss.append(res.after["loss"])
            r.seconds.append(res.seconds)
            r.histories.append(res.history)
            if progress:
                print(f"  {arm:<28} seed {seed}: accuracy {res.after['accuracy']:.3f}  "
                      f"loss {res.after['loss']:.4f}  ({res.seconds:.1f} s)", flush=True)
        results.append(r)
    elapsed = time.perf_counter() - started
    if output_dir is not None:
        write_compare(results, Path(output_dir), profile, seeds, elapsed)
    return results


def format_table(results: list[ArmResult]) -> str:
    """Markdown: one row per arm, mean ± standard deviation over seeds."""
    lines = ["| question | arm | accuracy (mean ± sd) | loss (mean ± sd) | train s / run |",
             "|---|---|---:|---:|---:|"]
    for r in results:
        s = r.summary()
        lines.append(f"| {r.question} | {r.arm} | {s['accuracy'][0]:.3f} ± {s['accuracy'][1]:.3f} "
                     f"| {s['loss'][0]:.4f} ± {s['loss'][1]:.4f} | {s['seconds'][0]:.1f} |")
    return "\n".join(lines)


def write_compare(results, directory: Path, profile, seeds, elapsed) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    (directory / "compare.md").write_text(
        f"# compare ({profile} profile, seeds {seeds}, {elapsed:.0f} s in all)\n\n{table}\n")
    (directory / "compare.json").write_text(json.dumps([dataclasses.asdict(r) for r in results]))
    _plot(results, directory / "compare.png")


def _plot(results, path) -> None:
    from matplotlib.figure import Figure  # not pyplot: leaves the caller's backend alone

    fig = Figure(figsize=(11, 4.2), dpi=110)
    left, right = fig.subplots(1, 2)
    names = [r.arm for r in results]
    means = [r.summary()["accuracy"][0] for r in results]
    sds = [r.summary()["accuracy"][1] for r in results]
    left.barh(range(len(names)), means, xerr=sds, color="#4C72B0", capsize=3)
    for i, r in enumerate(results):
        left.plot(r.accuracy, [i] * len(r.accuracy), "k.", markersize=4)
    left.set_yticks(range(len(names)), names)
    left.invert_yaxis()
    left.set_xlabel("held-out exact-match accuracy (bars: mean ± sd; dots: seeds)")
    left.set_xlim(0, 1)
    # the loss curves of the first seed, one line per arm, on the right
    draw_loss_curves(right, {r.arm: r.histories[0] for r in results}, "training loss (seed 0)")
    fig.tight_layout()
    fig.savefig(path)


