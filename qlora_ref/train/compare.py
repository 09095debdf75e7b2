"""``compare``: the paper's central claims, in miniature, over several seeds.

Paper section 4 and Figure/Table results, asked of the tiny model:

1. **Data type** (paper, Tables 3 and 4: NF4 + DQ QLoRA matches 16-bit; the
   paper fine-tunes no Int4 QLoRA, and its FP4 QLoRA matches 16-bit on GLUE,
   beats NF4 + DQ on T5-3B and trails it only on MMLU): full fine-tuning, LoRA on a 16-bit base, QLoRA with NF4 + double
   quantization, QLoRA FP4, QLoRA Int4.
2. **Where the adapters go** (paper: LoRA on all linear layers is needed to
   match full fine-tuning): all linear layers against attention only.
3. **Rank** (paper, Appendix A: the rank matters little): NF4 QLoRA at several ranks.

Every arm runs the same :func:`~qlora_ref.train.finetune.finetune` loop
with its own overrides, once per seed; the table reports the mean and the
standard deviation over seeds of the held-out exact-match accuracy and the
answer-token loss.

:func:`run_sweep` is the fairer version of question 1: each arm gets its own
learning rate, chosen from a small grid on a *validation* split
(:func:`~qlora_ref.train.tasks.validation_set`, disjoint from the test
examples), and is then run over several seeds at that learning rate. The
test numbers of the sweep runs are recorded but never used to choose.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

from . import tasks
from .finetune import FinetuneConfig, finetune
from .._atomic import atomic_path, write_atomic
from .report import draw_loss_curves

__all__ = ["ARMS", "PROFILES", "run_compare", "format_table", "SWEEP_ARMS", "LR_GRID",
           "choose_learning_rate", "run_sweep", "format_sweep", "add_arguments", "run"]

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

#: name -> (question it answers, overrides of FinetuneConfig)
ARMS = {
    "full fine-tuning": ("data type", dict(full_finetune=True, quant_bits=16, learning_rate=1e-3)),
    "LoRA, 16-bit base": ("data type", dict(quant_bits=16)),
    "QLoRA NF4 + DQ": ("data type", dict(quant_bits=4, bnb_4bit_quant_type="nf4")),
    "QLoRA FP4": ("data type", dict(quant_bits=4, bnb_4bit_quant_type="fp4")),
    "QLoRA Int4": ("data type", dict(quant_bits=4, bnb_4bit_quant_type="int4")),
    "QLoRA NF4, attention only": ("placement", dict(target_modules=ATTENTION)),
    # the paper's LoRA baseline adapts the query and value projections only
    "QLoRA NF4, query and value only": ("placement", dict(target_modules=["q_proj", "v_proj"])),
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
    write_atomic(directory / "compare.md", (
        f"# compare ({profile} profile, seeds {seeds}, {elapsed:.0f} s in all)\n\n{table}\n").encode())
    write_atomic(directory / "compare.json",
                  json.dumps([dataclasses.asdict(r) for r in results]).encode())
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
    with atomic_path(path) as tmp:
        fig.savefig(tmp)




# ----------------------------------------------------------------------------- learning-rate sweep

#: the arms of question 1 (data type), each swept over its own learning rates
SWEEP_ARMS = ("full fine-tuning", "LoRA, 16-bit base", "QLoRA NF4 + DQ", "QLoRA FP4", "QLoRA Int4")

#: arm -> learning rates tried; full fine-tuning moves every weight, so its grid sits lower.
#: Its grid reaches 1e-4 because at 282 steps it chose 3e-4, the lowest rate of a first
#: grid (3e-4, 1e-3, 3e-3): a choice at the edge of a grid does not show the best rate.
LR_GRID = {arm: (1e-3, 3e-3, 1e-2) for arm in SWEEP_ARMS}
LR_GRID["full fine-tuning"] = (1e-4, 3e-4, 1e-3, 3e-3)


def choose_learning_rate(trials: dict) -> float:
    """The learning rate with the best *validation* result.

    ``trials`` maps a learning rate to a dict with ``"validation"`` (and
    maybe ``"test"``) results, each ``{"accuracy": ..., "loss": ...}``.
    Highest validation accuracy wins, then lowest validation loss, then the
    smaller learning rate; the test results are never looked at.
    """
    if not trials:
        raise ValueError("choose_learning_rate needs at least one trial")
    for lr, t in trials.items():
        v = t.get("validation") if isinstance(t, dict) else None
        if not v or not all(isinstance(v.get(k), (int, float)) and math.isfinite(v[k])
                            for k in ("accuracy", "loss")):
            raise ValueError(f"trial at learning rate {lr!r} has no finite validation accuracy/loss")
    return min(trials, key=lambda lr: (-trials[lr]["validation"]["accuracy"],
                                       trials[lr]["validation"]["loss"], lr))


def _one_run(base: dict, overrides: dict, lr: float, seed: int, validation, device) -> dict:
    config = FinetuneConfig(**{**base, **overrides, "learning_rate": lr, "seed": seed})
    res = finetune(config, device=device, progress=False, evaluate_before=False)
    val = tasks.evaluate_pairs(res.model, validation)
    return {"seed": seed, "learning_rate": lr, "test": res.after, "validation": val,
            "seconds": res.seconds, "steps": res.steps}


def run_sweep(arms=None, lr_grid=None, sweep_seed: int = 100, seeds=(0, 1, 2, 3, 4),
              base_config=None, validation_size: int = 200, device=None, output_dir=None,
              output_name: str = "sweep", progress: bool = True) -> dict:
    """Per arm: choose the learning rate on validation with one seed, then run every seed at it.

    Parameters
    ----------
    arms : list of str, optional
        Names from ``ARMS``; default ``SWEEP_ARMS``.
    lr_grid : dict, optional
        arm -> learning rates; default ``LR_GRID``.
    sweep_seed : int, default 100
        The seed of the sweep runs (its training set and initialisation);
        not one of ``seeds``, so the reported runs are fresh.
    seeds : sequence of int, default 0..4
        Seeds of the reported runs at each arm's chosen learning rate.
    base_config : FinetuneConfig, optional
        Settings shared by every run (the arm's overrides and the learning
        rate replace its fields).
    validation_size : int, default 200
        Examples of :func:`~qlora_ref.train.tasks.validation_set`; with the
        config's ``eval_size`` test examples at most ``EVAL_SIZE`` in all, so
        the two are disjoint.
    output_dir : path, optional
        Writes ``{output_name}.json`` and ``{output_name}.md`` there
        (atomically), after every arm.

    Returns
    -------
    dict
        ``{"arms": {arm: {"trials": {lr: run}, "chosen_lr": lr, "runs": [run, ...]}}, ...}``;
        a run is ``{"seed", "learning_rate", "test", "validation", "seconds", "steps"}``.
    """
    arms = list(arms if arms is not None else SWEEP_ARMS)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {list(ARMS)}")
    lr_grid = dict(lr_grid if lr_grid is not None else LR_GRID)
    missing = [a for a in arms if not lr_grid.get(a)]
    if missing:
        raise ValueError(f"no learning rates given for arms {missing}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("run_sweep needs at least one seed")
    base = dataclasses.asdict(base_config or FinetuneConfig())
    if base["eval_size"] + validation_size > tasks.EVAL_SIZE:
        raise ValueError(f"eval_size {base['eval_size']} + validation_size {validation_size} is "
                         f"more than the {tasks.EVAL_SIZE} held-out examples: test and validation "
                         "would overlap")
    validation = tasks.validation_set(base["task"], validation_size)
    started = time.perf_counter()
    out = {"seconds": 0.0, "sweep_seed": sweep_seed, "seeds": seeds, "validation_size": validation_size,
           "base_config": base, "arms": {}}
    for arm in arms:
        overrides = {k: v for k, v in ARMS[arm][1].items() if k != "learning_rate"}
        trials = {}
        for lr in lr_grid[arm]:
            trials[lr] = _one_run(base, overrides, lr, sweep_seed, validation, device)
            if progress:
                v = trials[lr]["validation"]
                print(f"  sweep {arm:<20} lr {lr:g}: validation accuracy {v['accuracy']:.3f} "
                      f"loss {v['loss']:.4f}  ({trials[lr]['seconds']:.1f} s)", flush=True)
        chosen = choose_learning_rate(trials)
        runs = []
        for seed in seeds:
            runs.append(_one_run(base, overrides, chosen, seed, validation, device))
            if progress:
                t = runs[-1]["test"]
                print(f"  {arm:<26} lr {chosen:g} seed {seed}: test accuracy {t['accuracy']:.3f} "
                      f"loss {t['loss']:.4f}  ({runs[-1]['seconds']:.1f} s)", flush=True)
        out["arms"][arm] = {"trials": trials, "chosen_lr": chosen, "runs": runs}
        out["seconds"] = time.perf_counter() - started
        if output_dir is not None:  # after every arm: a long sweep cut short keeps what it did
            write_sweep(out, Path(output_dir), name=output_name)
    return out


def _stats(values) -> dict:
    return {"mean": statistics.fmean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def sweep_summary(result: dict) -> dict:
    """arm -> chosen lr and test accuracy/loss statistics (mean, sd, min, max) over the seeds."""
    return {arm: {"chosen_lr": a["chosen_lr"],
                  "accuracy": _stats([r["test"]["accuracy"] for r in a["runs"]]),
                  "loss": _stats([r["test"]["loss"] for r in a["runs"]]),
                  "seconds": statistics.fmean(r["seconds"] for r in a["runs"])}
            for arm, a in result["arms"].items()}


def format_sweep(result: dict) -> str:
    """Markdown: the validation sweep per arm, then test mean ± sd [min, max] at the chosen lr."""
    lines = ["| arm | " + "validation accuracy at lr | " + "chosen lr |", "|---|---|---:|"]
    for arm, a in result["arms"].items():
        tried = ", ".join(f"{lr:g}: {t['validation']['accuracy']:.3f}" for lr, t in a["trials"].items())
        lines.append(f"| {arm} | {tried} | {a['chosen_lr']:g} |")
    lines += ["", f"| arm | lr | test accuracy, mean ± sd [min, max] over {len(result['seeds'])} seeds "
              "| test loss, mean ± sd [min, max] | train s / run |", "|---|---:|---:|---:|---:|"]
    for arm, s in sweep_summary(result).items():
        acc, loss = s["accuracy"], s["loss"]
        lines.append(f"| {arm} | {s['chosen_lr']:g} | {acc['mean']:.3f} ± {acc['sd']:.3f} "
                     f"[{acc['min']:.3f}, {acc['max']:.3f}] | {loss['mean']:.4f} ± {loss['sd']:.4f} "
                     f"[{loss['min']:.4f}, {loss['max']:.4f}] | {s['seconds']:.1f} |")
    return "\n".join(lines)


def write_sweep(result: dict, directory: Path, name: str = "sweep") -> None:
    """``{name}.json`` (every run; learning rates as strings, JSON keys) and ``{name}.md``."""
    directory.mkdir(parents=True, exist_ok=True)
    as_json = {**result, "arms": {arm: {**a, "trials": {repr(lr): t for lr, t in a["trials"].items()}}
                                  for arm, a in result["arms"].items()},
               "summary": sweep_summary(result)}
    write_atomic(directory / f"{name}.json", json.dumps(as_json, indent=1).encode())
    head = (f"# compare: learning-rate sweep (seed {result['sweep_seed']}, chosen on "
            f"{result['validation_size']} validation examples), then seeds {result['seeds']}; "
            f"{result['seconds']:.0f} s in all\n\n")
    write_atomic(directory / f"{name}.md", (head + format_sweep(result) + "\n").encode())


# ----------------------------------------------------------------------------- command line


def add_arguments(parser):
    """Add the ``compare`` command's own flags (``--device``, ``--seed``, ``--quiet`` are common)."""
    parser.add_argument("--quick", action="store_true", help="the short profile (under 2 minutes)")
    parser.add_argument("--profile", choices=["quick", "full"], default="full")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2; "
                        "with --sweep 0 1 2 3 4)")
    parser.add_argument("--base-model", help="a base model .safetensors (default: the shipped one)")
    parser.add_argument("--output-dir", default="runs/compare", help="default runs/compare")
    parser.add_argument("--sweep", action="store_true", help="the data-type arms with a "
                        "learning-rate sweep per arm chosen on a validation split, then --seeds "
                        "at each arm's chosen rate")
    parser.add_argument("--sweep-seed", type=int, default=100, help="seed of the sweep runs "
                        "(default 100)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps per run (default: 3 "
                        "epochs, 282 steps)")
    return parser


def run(args) -> int:
    """Run the ``compare`` command from parsed arguments; return the exit status (0)."""
    base = FinetuneConfig(base_model=args.base_model or "default",
                          **({"max_steps": args.max_steps}
                             if getattr(args, "max_steps", None) is not None else {}))  # 0 is refused
    started = time.perf_counter()
    if getattr(args, "sweep", False):
        result = run_sweep(sweep_seed=args.sweep_seed, seeds=args.seeds or (0, 1, 2, 3, 4),
                           base_config=base, device=args.device, output_dir=args.output_dir,
                           progress=not args.quiet)
        print(format_sweep(result))
        print(f"\n{time.perf_counter() - started:.0f} s; sweep.md and sweep.json in {args.output_dir}")
        return 0
    profile = "quick" if args.quick else args.profile
    results = run_compare(profile, device=args.device, seeds=args.seeds or None, base_config=base,
                          output_dir=args.output_dir, progress=not args.quiet)
    print(format_table(results))
    print(f"\n{time.perf_counter() - started:.0f} s; table, JSON and plot in {args.output_dir}")
    return 0
