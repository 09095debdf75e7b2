r"""Table 3 in miniature on a real model: does QLoRA recover 16-bit LoRA and full fine-tuning?

Paper section 4 ("QLoRA vs. Standard Finetuning", Table 3, Table 4, Figure 3)
asked of SmolLM2-135M-Instruct (any local Hugging Face causal LM folder):
4-bit NF4 QLoRA with double quantization against FP4 QLoRA, LoRA on the
unquantized base and full fine-tuning, each arm at its own learning rate
chosen on a validation split, over several seeds paired by seed.

The task is knowledge retention with a fixed answer format: the prompt
``"The capital of France is"`` and the completion ``" Paris"`` then EOS,
over the country/capital pairs of ``qlora_ref/assets/capitals.json``. The
pairs are split once, deterministically, into train / validation / test
countries with no country in two splits (:func:`split_pairs`). Fine-tuning
on the training countries teaches the format (answer, then stop); a test
country's capital must come from what the base model still knows after its
weights were stored in 4 bits, which is where quantization damage shows.

Scores, on the test countries:

* **exact match**: the greedy completion, stripped of surrounding
  whitespace, equals the capital (:func:`exact_match`);
* **prefix match**: it starts with the capital followed by a non-letter
  (:func:`prefix_match`) -- the knowledge without the format, so a model
  that has not been fine-tuned can be scored too;
* **answer loss**: mean cross-entropy per answer token, teacher-forced
  (EOS left out), and the **completion loss** (EOS included, what training
  minimizes):

.. math::

    \mathcal L = -\frac{1}{|C|}\sum_{t \in C} \log p_\theta(x_t \mid x_{<t}).

The learning rate of each arm is chosen on the validation completion loss of
the first seed's runs (:func:`choose_learning_rate`); the other seeds run at
the chosen rate. The test split is never used to choose. The training loop
is :func:`train_steps`: AdamW on the trainable parameters, gradient clipping
at 1, a batch order that is a function of the seed.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import statistics
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .._atomic import write_atomic
from ..nn import prepare_model
from ..optim import make_optimizer
from .hf_finetune import IGNORE_INDEX, collate, completion_loss, encode_examples
from .jsonl import Example

__all__ = ["PROMPT", "ARMS", "TABLE3_ARMS", "LR_GRID", "CHOSEN_LR", "load_pairs", "split_pairs",
           "to_examples", "write_splits", "exact_match", "prefix_match", "build_arm",
           "reset_adapters", "train_steps", "evaluate", "choose_learning_rate", "run_table3",
           "merge_results", "format_table", "add_arguments", "run"]

#: The prompt of a pair; the completion is ``" " + capital``, then EOS.
PROMPT = "The capital of {country} is"
#: Seed of the one permutation that splits the pairs (not a training seed).
SPLIT_SEED = 19
#: Countries in the validation and test splits; the rest are training countries.
N_VALIDATION, N_TEST = 30, 60

#: name -> how the base is stored and what trains (``prepare_model`` arguments, or full fine-tuning).
#: LoRA settings are the paper's for small models: r 8, alpha 16, dropout 0.05, all linear layers.
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
ARMS = {
    "QLoRA NF4 + DQ": dict(quant_type="nf4", double_quant=True, **LORA),
    "QLoRA FP4": dict(quant_type="fp4", double_quant=False, **LORA),
    "LoRA, 16-bit base": dict(quant_type=None, **LORA),   # the base as loaded (float32 here)
    "full fine-tuning": dict(full_finetune=True),
    # the course page's recipe (configs: capitals_smollm2_course_recipe): BLOOM's fused
    # query_key_value is q, k, v here; matmuls in bfloat16 as its bnb_4bit_compute_dtype says;
    # load_in_4bit stores every linear layer in NF4, adapters or not (quantize_rest)
    "course recipe (NF4 + DQ, q/k/v, bfloat16)": dict(
        quant_type="nf4", double_quant=True, r=8, lora_alpha=16, lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj"], compute_dtype=torch.bfloat16,
        quantize_rest=True),
}
#: The arms of the paper's Table 3 question, run by default (the course recipe only when asked).
TABLE3_ARMS = ("QLoRA NF4 + DQ", "QLoRA FP4", "LoRA, 16-bit base", "full fine-tuning")
#: arm -> learning rates tried on validation; full fine-tuning moves every weight, so lower.
#: These are the grids of docs/experiments.md: the first grids (1e-3, 3e-3, 1e-2; full
#: fine-tuning 3e-5, 1e-4, 3e-4) were extended down where the choice fell on their edge.
LR_GRID = {arm: (3e-4, 1e-3, 3e-3, 1e-2) for arm in TABLE3_ARMS}
LR_GRID["QLoRA FP4"] = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
LR_GRID["full fine-tuning"] = (1e-5, 3e-5, 1e-4, 3e-4)
LR_GRID["course recipe (NF4 + DQ, q/k/v, bfloat16)"] = (1e-3, 3e-3, 1e-2)
#: The rates those sweeps chose (seed 0, validation loss); ``--quick`` uses them without a sweep.
CHOSEN_LR = {"QLoRA NF4 + DQ": 1e-3, "QLoRA FP4": 3e-4, "LoRA, 16-bit base": 1e-3,
             "full fine-tuning": 3e-5, "course recipe (NF4 + DQ, q/k/v, bfloat16)": 3e-3}


# ----------------------------------------------------------------------------- data

def load_pairs(path=None) -> list[tuple[str, str]]:
    """The (country, capital) pairs of the shipped file (or ``path``), sorted by country."""
    text = Path(path).read_text() if path is not None else \
        resources.files("qlora_ref").joinpath("assets/capitals.json").read_text()
    pairs = json.loads(text)["pairs"]
    if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) and s for s in p)
               for p in pairs):
        raise ValueError(f"{path or 'capitals.json'}: every pair must be [country, capital] strings")
    countries = [c for c, _ in pairs]
    if len(set(countries)) != len(countries):
        raise ValueError(f"{path or 'capitals.json'}: a country is listed twice")
    return sorted((c, a) for c, a in pairs)


def split_pairs(pairs, n_validation: int = N_VALIDATION, n_test: int = N_TEST,
                seed: int = SPLIT_SEED) -> dict[str, list]:
    """``{"train", "validation", "test"}``: one seeded permutation of the sorted pairs, cut in three."""
    pairs = sorted(pairs)
    if n_validation + n_test >= len(pairs):
        raise ValueError(f"{n_validation} validation + {n_test} test pairs leave no training pairs "
                         f"out of {len(pairs)}")
    order = np.random.default_rng(seed).permutation(len(pairs))
    shuffled = [pairs[i] for i in order]
    return {"test": shuffled[:n_test], "validation": shuffled[n_test:n_test + n_validation],
            "train": shuffled[n_test + n_validation:]}


def to_examples(pairs) -> list[Example]:
    """Prompt/completion examples (``" " + capital``: the word as it follows "is")."""
    return [Example(prompt=PROMPT.format(country=c), completion=" " + a, line=i + 1,
                    layout="prompt_completion") for i, (c, a) in enumerate(pairs)]


def write_splits(directory) -> dict[str, Path]:
    """``train.jsonl``, ``validation.jsonl``, ``test.jsonl`` (prompt/completion lines), atomically.

    For ``qlora-ref finetune --data DIR/train.jsonl`` (the named config
    ``capitals_smollm2_course_recipe``); returns split -> path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, pairs in split_pairs(load_pairs()).items():
        lines = "".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n"
                        for e in to_examples(pairs))
        paths[name] = directory / f"{name}.jsonl"
        write_atomic(paths[name], lines.encode())
    return paths


def without_eos(encoded: list) -> list:
    """The same examples with the EOS label left out: the loss of the answer tokens alone."""
    return [(ids, labels[:-1] + [IGNORE_INDEX]) for ids, labels in encoded]


def exact_match(generated: str, answer: str) -> bool:
    """The completion, stripped of surrounding whitespace, is the answer and nothing else."""
    return generated.strip() == answer


def prefix_match(generated: str, answer: str) -> bool:
    """The completion starts with the answer as a whole word ("Paris." yes, "Parish" no)."""
    text = generated.strip()
    return text.startswith(answer) and not text[len(answer):len(answer) + 1].isalnum()


# ----------------------------------------------------------------------------- arms and loop

def build_arm(base: torch.nn.Module, arm: str) -> torch.nn.Module:
    """A copy of ``base`` as ``arm`` trains it: quantized + adapters, 16-bit + adapters, or all weights."""
    settings = dict(ARMS[arm])
    model = copy.deepcopy(base)
    if settings.pop("full_finetune", False):
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    quantize_rest = settings.pop("quantize_rest", False)
    model = prepare_model(model, **settings)
    if quantize_rest:  # the linear layers without adapters: frozen NF4 too, output head excluded
        from ..nn import Linear4bit
        from ..nn.model import find_target_modules, replace_module

        for name in find_target_modules(model, "all-linear"):
            layer = model.get_submodule(name)
            if type(layer) is torch.nn.Linear:
                replace_module(model, name, Linear4bit.from_linear(
                    layer, quant_type=settings["quant_type"], double_quant=settings["double_quant"],
                    compute_dtype=settings["compute_dtype"]))
    return model


def reset_adapters(model: torch.nn.Module, seed: int) -> None:
    """Fresh LoRA weights (A random, B zero) drawn from ``seed``: one quantized base, many seeds."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_lora_parameters"):
            module.reset_lora_parameters()


def train_steps(model, encoded: list, pad_id: int, steps: int, lr: float, seed: int,
                batch_size: int = 8, device="cpu") -> list[tuple[int, float]]:
    """AdamW on the trainable parameters for ``steps`` steps; returns ``[(step, loss)]``.

    Batches are drawn epoch by epoch from a permutation seeded by ``seed``;
    the dropout masks come from torch's generator, seeded too.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, name="adamw", lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    order: list = []
    history = []
    model.train()
    for step in range(1, steps + 1):
        if len(order) < batch_size:
            order += list(rng.permutation(len(encoded)))
        idx, order = order[:batch_size], order[batch_size:]
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad_id).items()}
        loss = model(**batch).loss
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"the training loss became {loss.item()} at step {step} "
                               f"(learning rate {lr:g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        history.append((step, loss.item()))
    model.eval()
    return history


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list, max_new_tokens: int = 8, device="cpu",
                   batch_size: int = 32) -> list[str]:
    """Greedy completions of a batch of prompts (left padding), cut at EOS, special tokens dropped."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True)
            ids = enc["input_ids"].to(device)                                    # (B, T)
            gen = model.generate(input_ids=ids, attention_mask=enc["attention_mask"].to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)            # (B, T + new)
            out += tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def evaluate(model, tokenizer, pairs, device="cpu", generate: bool = True) -> dict:
    """Completion and answer loss on ``pairs``; with ``generate``, exact and prefix match too."""
    encoded = encode_examples(to_examples(pairs), tokenizer, max_length=64)
    pad = tokenizer.pad_token_id
    result = {"completion_loss": completion_loss(model, encoded, pad, device),
              "answer_loss": completion_loss(model, without_eos(encoded), pad, device)}
    if generate:
        answers = greedy_answers(model, tokenizer, [PROMPT.format(country=c) for c, _ in pairs],
                                 device=device)
        result["exact_match"] = statistics.fmean(exact_match(g, a) for g, (_, a) in zip(answers, pairs))
        result["prefix_match"] = statistics.fmean(prefix_match(g, a) for g, (_, a) in zip(answers, pairs))
        result["answers"] = answers
    return result


def choose_learning_rate(trials: dict) -> float:
    """The learning rate of the lowest validation completion loss (ties: the smaller rate)."""
    if not trials:
        raise ValueError("choose_learning_rate needs at least one trial")
    finite = {lr: t for lr, t in trials.items() if math.isfinite(t["validation"]["completion_loss"])}
    if not finite:
        raise ValueError("no trial has a finite validation loss")
    return min(finite, key=lambda lr: (finite[lr]["validation"]["completion_loss"], lr))


# ----------------------------------------------------------------------------- the experiment

def _load(model_dir):
    from .hf_finetune import load_pretrained

    return load_pretrained(model_dir, device="cpu", dtype=torch.float32)


def run_table3(model_dir, seeds=(0, 1, 2), steps: int = 20, batch_size: int = 8, arms=None,
               lr_grid=None, output_dir=None, device="cpu", progress: bool = True,
               model_and_tokenizer=None) -> dict:
    """Every arm: before fine-tuning, the learning-rate sweep on ``seeds[0]``, then the other seeds.

    Returns ``{"arms": {arm: {"before", "trials", "chosen_lr", "runs"}}, "base": ...}``; a run
    is ``{"seed", "learning_rate", "validation", "test", "history", "seconds"}``. With
    ``output_dir``, ``real_table3.json`` and ``real_table3.md`` are rewritten after every run.
    """
    arms = list(arms if arms is not None else TABLE3_ARMS)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; known: {list(ARMS)}")
    lr_grid = {**LR_GRID, **(lr_grid or {})}
    seeds = list(seeds)
    if not seeds:
        raise ValueError("run_table3 needs at least one seed")
    splits = split_pairs(load_pairs())
    base, tokenizer = model_and_tokenizer or _load(model_dir)
    encoded = encode_examples(to_examples(splits["train"]), tokenizer, max_length=64)
    pad = tokenizer.pad_token_id
    started = time.perf_counter()
    out = {"model": str(model_dir), "seeds": seeds, "steps": steps, "batch_size": batch_size,
           "sizes": {k: len(v) for k, v in splits.items()}, "prompt": PROMPT,
           "test_answers": [a for _, a in splits["test"]], "arms": {}, "seconds": 0.0}

    def say(text):
        if progress:
            print(text, flush=True)

    def save():
        out["seconds"] = time.perf_counter() - started
        if output_dir is not None:
            write_results(out, Path(output_dir))

    on_device = copy.deepcopy(base).to(device)    # the base itself stays on the CPU, unchanged
    out["base"] = {"test": evaluate(on_device, tokenizer, splits["test"], device),
                   "validation": evaluate(on_device, tokenizer, splits["validation"], device, False)}
    del on_device
    say(f"  base model (float32, not fine-tuned): test {_brief(out['base']['test'])}")
    save()
    job = _Job(tokenizer, splits, encoded, pad, steps, batch_size, device, say, save)
    for arm in arms:
        _run_arm(job, arm, base, seeds, lr_grid[arm], out["arms"].setdefault(arm, {"trials": {},
                                                                                  "runs": []}))
    return out


@dataclasses.dataclass
class _Job:
    """What every run of :func:`run_table3` shares: data, settings, and how to report."""
    tokenizer: object
    splits: dict
    encoded: list
    pad: int
    steps: int
    batch_size: int
    device: object
    say: object
    save: object

    def one_run(self, prepared, lr: float, seed: int) -> tuple[dict, object]:
        """Fine-tune a copy of ``prepared`` (adapters reset by ``seed``); its validation scores."""
        model = copy.deepcopy(prepared)
        reset_adapters(model, seed)
        t0 = time.perf_counter()
        history = train_steps(model, self.encoded, self.pad, self.steps, lr, seed,
                              self.batch_size, self.device)
        run = {"seed": seed, "learning_rate": lr, "history": history,
               "seconds": time.perf_counter() - t0,
               "validation": evaluate(model, self.tokenizer, self.splits["validation"],
                                      self.device, False)}
        return run, model

    def test(self, model) -> dict:
        return evaluate(model, self.tokenizer, self.splits["test"], self.device)


def _run_arm(job: _Job, arm: str, base, seeds: list, grid, entry: dict) -> None:
    """One arm: its score before fine-tuning, the learning-rate sweep on ``seeds[0]``, the other seeds."""
    prepared = build_arm(base, arm).to(job.device)
    if ARMS[arm].get("quant_type"):  # B = 0: the prepared model is the quantized base
        entry["before"] = {"test": job.test(prepared)}
        job.say(f"  {arm:<18} before fine-tuning: test {_brief(entry['before']['test'])}")
    best = None
    for lr in grid:
        run, model = job.one_run(prepared, lr, seeds[0])
        entry["trials"][repr(lr)] = run
        job.say(f"  {arm:<18} lr {lr:g} seed {seeds[0]}: validation loss "
                f"{run['validation']['completion_loss']:.4f} ({run['seconds']:.0f} s)")
        if best is None or lr == choose_learning_rate({best[0]: best[1], lr: run}):
            best = (lr, run, model)
        job.save()
    chosen, run, model = best
    entry["chosen_lr"] = chosen
    entry["runs"].append({**run, "test": job.test(model)})
    job.say(f"  {arm:<18} lr {chosen:g} seed {seeds[0]}: test {_brief(entry['runs'][-1]['test'])}")
    del model, best
    job.save()
    for seed in seeds[1:]:
        run, model = job.one_run(prepared, chosen, seed)
        run["test"] = job.test(model)
        entry["runs"].append(run)
        job.say(f"  {arm:<18} lr {chosen:g} seed {seed}: test {_brief(run['test'])}")
        del model
        job.save()


def _brief(r: dict) -> str:
    return (f"exact {r['exact_match']:.3f} prefix {r['prefix_match']:.3f} "
            f"answer loss {r['answer_loss']:.3f} completion loss {r['completion_loss']:.3f}")


def merge_results(parts: list) -> dict:
    """One result from runs of disjoint arms (e.g. one process per arm); the first part's base."""
    if not parts:
        raise ValueError("merge_results needs at least one part")
    merged = {**parts[0], "arms": {}}
    for part in parts:
        for key in ("model", "seeds", "steps", "batch_size", "sizes", "prompt"):
            if part[key] != merged[key]:
                raise ValueError(f"parts differ in {key}: {part[key]!r} != {merged[key]!r}")
        overlap = set(part["arms"]) & set(merged["arms"])
        if overlap:
            raise ValueError(f"arms {sorted(overlap)} are in two parts")
        merged["arms"].update(part["arms"])
    merged["seconds"] = max(p["seconds"] for p in parts)   # the parts ran side by side
    return merged


# ----------------------------------------------------------------------------- tables

def _stats(values) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


METRICS = ("exact_match", "prefix_match", "answer_loss", "completion_loss")
REFERENCE = "LoRA, 16-bit base"


def summary(result: dict) -> dict:
    """arm -> metric -> (mean, sd) over seeds, and the paired difference to 16-bit LoRA by seed."""
    table = {}
    ref = result["arms"].get(REFERENCE, {}).get("runs", [])
    ref_by_seed = {r["seed"]: r["test"] for r in ref}
    for arm, a in result["arms"].items():
        runs = [r for r in a["runs"] if "test" in r]
        if not runs:
            continue
        row = {"chosen_lr": a["chosen_lr"], "seeds": [r["seed"] for r in runs]}
        for m in METRICS:
            row[m] = _stats([r["test"][m] for r in runs])
            diffs = [r["test"][m] - ref_by_seed[r["seed"]][m] for r in runs if r["seed"] in ref_by_seed]
            row[f"{m}_vs_lora16"] = _stats(diffs) if diffs and arm != REFERENCE else None
            row[f"{m}_below_lora16"] = (sum(d < 0 for d in diffs), len(diffs)) \
                if diffs and arm != REFERENCE else None
        row["seconds"] = statistics.fmean(r["seconds"] for r in runs)
        table[arm] = row
    return table


def format_table(result: dict) -> str:
    """Markdown: the sweep, the test table with paired differences, and the before/after view."""
    lines = ["| arm | validation completion loss at lr (seed "
             f"{result['seeds'][0]}) | chosen lr |", "|---|---|---:|"]
    for arm, a in result["arms"].items():
        tried = ", ".join(f"{float(lr):g}: {t['validation']['completion_loss']:.4f}"
                          for lr, t in sorted(a["trials"].items(), key=lambda kv: float(kv[0])))
        lines.append(f"| {arm} | {tried} | {a.get('chosen_lr', float('nan')):g} |")
    s = summary(result)
    n = max((len(r["seeds"]) for r in s.values()), default=0)
    lines += ["", f"| arm | lr | exact match | prefix match | answer loss | completion loss | "
              f"exact match − LoRA16 (paired) [seeds below] | answer loss − LoRA16 (paired) "
              f"[seeds below] | train s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ms(v, f="{:.3f}", below=None):
        if v is None:
            return "—"
        return f"{f.format(v[0])} ± {v[1]:.3f}" + (f" [{below[0]} of {below[1]}]" if below else "")
    for arm, r in s.items():
        lines.append(f"| {arm} | {r['chosen_lr']:g} | {ms(r['exact_match'])} | {ms(r['prefix_match'])} | "
                     f"{ms(r['answer_loss'])} | {ms(r['completion_loss'])} | "
                     f"{ms(r['exact_match_vs_lora16'], '{:+.3f}', r['exact_match_below_lora16'])} | "
                     f"{ms(r['answer_loss_vs_lora16'], '{:+.3f}', r['answer_loss_below_lora16'])} | "
                     f"{r['seconds']:.0f} |")
    lines.append(f"\n(mean ± sd over {n} seeds {result['seeds']}; test split of "
                 f"{result['sizes']['test']} countries; {result['steps']} steps of batch "
                 f"{result['batch_size']})")
    # the quantization loss recovered: each 4-bit arm against its 16-bit counterpart at the
    # same stage -- before fine-tuning the float32 base, after it 16-bit LoRA (mean over seeds)
    lines += ["", "| model | exact match | prefix match | answer loss | completion loss | "
              "prefix match − 16-bit | answer loss − 16-bit |", "|---|---:|---:|---:|---:|---:|---:|"]
    base = result["base"]["test"]
    ref = s.get(REFERENCE)

    def row(name, t, against):
        gap = (f"{t['prefix_match'] - against['prefix_match']:+.3f} | "
               f"{t['answer_loss'] - against['answer_loss']:+.3f}") if against else "— | —"
        return (f"| {name} | {t['exact_match']:.3f} | {t['prefix_match']:.3f} | "
                f"{t['answer_loss']:.3f} | {t['completion_loss']:.3f} | {gap} |")
    lines.append(row("float32 base, not fine-tuned", base, None))
    for arm, a in result["arms"].items():
        if "before" in a:
            lines.append(row(f"{arm}, before fine-tuning", a["before"]["test"], base))
    for arm, r in s.items():
        mean = {m: r[m][0] for m in METRICS}
        against = {m: ref[m][0] for m in METRICS} if ref and arm != REFERENCE else None
        lines.append(row(f"{arm}, after (mean of {len(r['seeds'])})", mean, against))
    return "\n".join(lines)


def write_results(result: dict, directory: Path) -> None:
    """``real_table3.json`` (every run, with its summary) and ``real_table3.md``, atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / "real_table3.json",
                 json.dumps({**result, "summary": summary(result)}, indent=1).encode())
    write_atomic(directory / "real_table3.md", (
        f"# Table 3 in miniature on {Path(result['model']).name} ({result['seconds']:.0f} s)\n\n"
        f"{format_table(result)}\n").encode())


# ----------------------------------------------------------------------------- command line

def add_arguments(parser):
    """``compare --model``'s flags (the model folder itself comes from ``--model``)."""
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run with "
                        "--model (default 30; --quick 4)")
    return parser


def run(args) -> int:
    """``qlora-ref compare --model DIR [--quick]``: print the table, write it to --output-dir."""
    quick = getattr(args, "quick", False)
    steps = args.steps or (4 if quick else 20)
    seeds = args.seeds or ([args.seed] if quick else [0, 1, 2])
    grid = {arm: (CHOSEN_LR[arm],) for arm in TABLE3_ARMS} if quick else None
    result = run_table3(args.model, seeds=seeds, steps=steps, lr_grid=grid,
                        output_dir=args.output_dir, device=args.device or "cpu",
                        progress=not args.quiet)
    print(format_table(result))
    print(f"\n{result['seconds']:.0f} s; real_table3.md and real_table3.json in {args.output_dir}")
    return 0
