"""Make the figures of docs/course_figures.md: ``docs/results/course_*.png`` and ``course_*.json``.

    OMP_NUM_THREADS=1 python docs/scripts/course_figures.py              # every figure
    OMP_NUM_THREADS=1 python docs/scripts/course_figures.py --only nf4_bins

One function per figure (``FIGURES`` lists them); each computes its numbers
with ``qlora_ref``, prints them, writes them to ``course_<name>.json`` and
draws ``course_<name>.png``. The cheap number functions (``*_numbers``) are
imported by ``tests/docs/test_course_figures.py``, which checks the page's numbers
against them. ``placement_rank`` trains the tiny GPT 25 times (564 s with one thread on
a loaded 2-core machine); the others take seconds.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from qlora_ref import codebooks, memory
from qlora_ref._atomic import write_atomic
from qlora_ref.blockwise import block_absmax, decision_boundaries, dequantize_blockwise, normalize, \
    quantize_blockwise

OUT = Path(__file__).resolve().parent.parent / "results"
BLOCKSIZE = 64
N_SAMPLES = 1 << 20          # Gaussian samples for the empirical bin masses
OFFSETS = tuple(np.round(np.linspace(0.90, 0.995, 20), 4)) + (codebooks.NF4_OFFSET,)


# ----------------------------------------------------------------------------- helpers
def entropy_bits(p) -> float:
    r""":math:`H = -\sum_k p_k \log_2 p_k` over the non-empty bins."""
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def gaussian_bin_masses(code: np.ndarray, offset: float) -> np.ndarray:
    r"""Mass of each code's rounding interval for :math:`x \sim N(0,1)` scaled by :math:`1/\Phi^{-1}(\delta)`.

    Level :math:`k` (sorted) owns :math:`(m_{k-1}, m_k]` with :math:`m` the
    midpoints (:func:`qlora_ref.blockwise.decision_boundaries`), :math:`m_{-1}
    = -\infty`, :math:`m_{15} = \infty`; its mass is
    :math:`\Phi(z m_k) - \Phi(z m_{k-1})`, :math:`z = \Phi^{-1}(\delta)`.
    """
    from scipy.stats import norm
    midpoints, _ = decision_boundaries(code)
    z = norm.ppf(offset)
    cdf = np.concatenate([[0.0], norm.cdf(z * midpoints.astype(np.float64)), [1.0]])
    return np.diff(cdf)                                            # (16,) in sorted order


def blockwise_masses_and_mse(code: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, float]:
    """Share of ``x`` on each sorted code after blockwise absmax quantization, and the relative MSE."""
    codes, absmax = quantize_blockwise(x, code, BLOCKSIZE)
    x_hat = dequantize_blockwise(codes, absmax, code, BLOCKSIZE)
    order = np.argsort(code, kind="stable")
    counts = np.bincount(codes, minlength=len(code))[order]
    rel_mse = float(np.sum((x.astype(np.float64) - x_hat) ** 2) / np.sum(x.astype(np.float64) ** 2))
    return counts / x.size, rel_mse


def gaussian_samples(n: int = N_SAMPLES, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def save(name: str, numbers: dict, fig=None) -> None:
    """Print ``numbers``, write ``course_<name>.json`` and (if given) ``course_<name>.png``."""
    text = json.dumps(numbers, indent=1)
    print(f"== {name}\n{text}")
    OUT.mkdir(exist_ok=True)
    write_atomic(OUT / f"course_{name}.json", text + "\n")
    if fig is not None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
        write_atomic(OUT / f"course_{name}.png", buf.getvalue())


def new_figure(ncols: int = 1, width: float = 6.4, height: float = 4.0):
    from matplotlib.figure import Figure  # not pyplot: no global state, no display needed
    fig = Figure(figsize=(width * ncols, height))
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


# ----------------------------------------------------------------------------- 6. NF4 bins
def nf4_bins_numbers() -> dict:
    """Bin masses of NF4: analytic (N(0,1) in units of Phi^-1(delta)) and measured (blocksize 64)."""
    code = codebooks.nf4_code()
    analytic = gaussian_bin_masses(code, codebooks.NF4_OFFSET)
    measured, _ = blockwise_masses_and_mse(code, gaussian_samples())
    return {"levels": [round(float(v), 4) for v in np.sort(code)],
            "analytic_masses": [round(float(p), 4) for p in analytic],
            "analytic_min": round(float(analytic.min()), 4),
            "analytic_max": round(float(analytic.max()), 4),
            "analytic_entropy_bits": round(entropy_bits(analytic), 4),
            "blockwise_masses": [round(float(p), 4) for p in measured],
            "blockwise_entropy_bits": round(entropy_bits(measured), 4),
            "blockwise_outer_mass": round(float(measured[0] + measured[-1]), 4),
            "uniform_mass": round(1 / 16, 4)}


def nf4_bins() -> None:
    n = nf4_bins_numbers()
    fig, (ax,) = new_figure(width=8)
    k = np.arange(16)
    ax.bar(k - 0.2, n["analytic_masses"], 0.4,
           label=f"N(0,1) / Φ⁻¹(δ), analytic: H = {n['analytic_entropy_bits']:.4f} bits")
    ax.bar(k + 0.2, n["blockwise_masses"], 0.4,
           label=f"N(0,1), absmax blocks of 64: H = {n['blockwise_entropy_bits']:.4f} bits")
    ax.axhline(1 / 16, color="k", lw=0.8, ls="--", label="1/16 (4.0 bits)")
    ax.set_xticks(k, [f"{v:.2f}" for v in n["levels"]], rotation=60)
    ax.set_xlabel("NF4 level")
    ax.set_ylabel("share of values rounded to it")
    ax.set_title("NF4 bin masses")
    ax.set_ylim(0, 0.12)                          # room for the legend above the bars
    ax.legend(fontsize=8, loc="upper right")
    save("nf4_bins", n, fig)


def nf4_offset_numbers() -> dict:
    """Relative MSE (blockwise, 2^18 Gaussian samples) and entropy against the offset delta."""
    x = gaussian_samples(1 << 18, seed=1)
    rows = []
    for delta in sorted(set(float(d) for d in OFFSETS)):
        code = codebooks.normal_float_code(4, offset=delta)
        masses, mse = blockwise_masses_and_mse(code, x)
        rows.append({"offset": delta, "relative_mse": round(mse, 6),
                     "blockwise_entropy_bits": round(entropy_bits(masses), 4),
                     "analytic_entropy_bits": round(entropy_bits(gaussian_bin_masses(code, delta)), 4)})
    best_mse = min(rows, key=lambda r: r["relative_mse"])
    best_h = max(rows, key=lambda r: r["analytic_entropy_bits"])
    nf4 = next(r for r in rows if r["offset"] == codebooks.NF4_OFFSET)
    return {"rows": rows, "nf4": nf4, "min_mse_offset": best_mse["offset"],
            "min_mse": best_mse["relative_mse"], "max_analytic_entropy_offset": best_h["offset"],
            "max_analytic_entropy_bits": best_h["analytic_entropy_bits"]}


def nf4_offset() -> None:
    n = nf4_offset_numbers()
    d = [r["offset"] for r in n["rows"]]
    fig, (a, b) = new_figure(ncols=2, width=5)
    a.plot(d, [r["relative_mse"] for r in n["rows"]], "o-")
    a.set_ylabel("relative MSE, absmax blocks of 64")
    b.plot(d, [r["analytic_entropy_bits"] for r in n["rows"]], "o-", label="N(0,1) / Φ⁻¹(δ), analytic")
    b.plot(d, [r["blockwise_entropy_bits"] for r in n["rows"]], "s-", label="absmax blocks of 64")
    b.set_ylabel("entropy of the codes (bits)")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.axvline(codebooks.NF4_OFFSET, color="k", lw=0.8, ls="--")
        ax.set_xlabel("offset δ (NF4: 0.9677, dashed)")
    save("nf4_offset", n, fig)


# ----------------------------------------------------------------------------- 4. normality
def _qq_numbers(tensors: list[np.ndarray], seed: int = 0, n_points: int = 199) -> dict:
    """Standardized weights against N(0,1), and absmax-normalized weights against Gaussian ones."""
    from scipy.stats import kurtosis, norm
    rng = np.random.default_rng(seed)
    probs = (np.arange(n_points) + 0.5) / n_points
    standardized, normalized, gauss_normalized = [], [], []
    for w in tensors:
        flat = w.astype(np.float32).reshape(-1)
        standardized.append((flat - flat.mean()) / flat.std())
        normalized.append(normalize(flat, block_absmax(flat, BLOCKSIZE), BLOCKSIZE))
        g = rng.standard_normal(flat.size).astype(np.float32)       # same count, Gaussian
        gauss_normalized.append(normalize(g, block_absmax(g, BLOCKSIZE), BLOCKSIZE))
    s, v, gv = (np.concatenate(a) for a in (standardized, normalized, gauss_normalized))
    theory = norm.ppf(probs)
    q_s, q_v, q_gv = np.quantile(s, probs), np.quantile(v, probs), np.quantile(gv, probs)
    # distinct values per aligned block of 64 in the first tensor: a 4-bit grid shows as <= 32
    first = tensors[0].astype(np.float32).reshape(-1)
    usable = first[: first.size // BLOCKSIZE * BLOCKSIZE].reshape(-1, BLOCKSIZE)  # (n_blocks, 64)
    distinct = np.array([np.unique(b).size for b in usable[:2000]])
    return {"values": int(s.size), "tensors": len(tensors),
            "excess_kurtosis": round(float(kurtosis(s)), 3),
            "qq_r_standardized": round(float(np.corrcoef(theory, q_s)[0, 1]), 4),
            "qq_r_normalized_vs_gaussian": round(float(np.corrcoef(q_gv, q_v)[0, 1]), 4),
            "max_abs_quantile_gap_normalized": round(float(np.abs(q_v - q_gv).max()), 4),
            "mean_distinct_per_block_of_64": round(float(distinct.mean()), 2),
            "_curves": {"theory": theory.tolist(), "standardized": q_s.tolist(),
                        "normalized": q_v.tolist(), "gauss_normalized": q_gv.tolist()}}


def base_weights() -> list[np.ndarray]:
    """The 2-D linear weights of the shipped tiny GPT (not the embeddings)."""
    import torch
    from qlora_ref.train.pretrain import load_base_model
    model = load_base_model()
    return [m.weight.detach().numpy().copy() for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m.weight.shape[0] != model.config.vocab_size]


def smollm2_weights(layers=(0, 15, 29)) -> list[np.ndarray]:
    """The seven projections of three SmolLM2-135M layers (needs the ``real`` extra)."""
    from safetensors.numpy import load_file
    from qlora_ref.models import smollm2
    folder = smollm2(quiet=True)
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    return [tensors[name].astype(np.float32) for name in sorted(tensors)
            if name.endswith(".weight") and "_proj" in name
            and any(f"layers.{i}." in name for i in layers)]


def _qq_plot(n: dict, title: str):
    fig, (a, b) = new_figure(ncols=2, width=4.8, height=4.2)
    c = n["_curves"]
    a.plot(c["theory"], c["standardized"], ".", ms=3)
    a.plot(c["theory"], c["theory"], "k--", lw=0.8)
    a.set_xlabel("N(0,1) quantile")
    a.set_ylabel("weight quantile / std")
    a.set_title(f"{title}: before (r = {n['qq_r_standardized']})", fontsize=9)
    b.plot(c["gauss_normalized"], c["normalized"], ".", ms=3)
    b.plot([-1, 1], [-1, 1], "k--", lw=0.8)
    for level in codebooks.nf4_code():
        b.axhline(level, color="0.85", lw=0.5, zorder=0)
    b.set_xlabel("quantile of Gaussian blocks / absmax")
    b.set_ylabel("quantile of weight blocks / absmax")
    b.set_title(f"after absmax, blocks of 64 (grey: NF4 levels)", fontsize=9)
    return fig


def qq_base() -> None:
    n = _qq_numbers(base_weights())
    save("qq_base", n, _qq_plot(n, "shipped tiny GPT"))


def qq_smollm2() -> None:
    n = _qq_numbers(smollm2_weights())
    save("qq_smollm2", n, _qq_plot(n, "SmolLM2-135M, layers 0, 15, 29"))


# ----------------------------------------------------------------------------- 3. Figure 6 bars
GB = 1e9
SEQ_LEN = 512


def figure6_bytes(shape: memory.DecoderShape, seq_len: int = SEQ_LEN, r: int = 64) -> dict:
    """QLoRA memory of one LLaMA shape, in bytes per term: NF4 + DQ body, 16-bit embeddings and
    head, r = 64 on all seven projections, batch 1, gradient checkpointing, ``seq_len`` tokens."""
    embed = 2 * shape.vocab_size * shape.hidden_size                   # embedding + output head
    t = memory.finetune_memory(shape.n_params, "qlora", lora_params=shape.lora_params(r),
                               shape=shape, seq_len=seq_len, gradient_checkpointing=True)
    return {"4-bit weights (NF4 + DQ)": memory.quantized_nbytes(shape.n_params - embed),
            "16-bit embeddings + head": 2 * embed,
            "adapters": t["adapters (LoRA weights)"],
            "gradients + Adam state": t["gradients"] + t["optimizer state"],
            "activations (checkpointed)": t["activations"]}


def figure6_numbers(seq_len: int = SEQ_LEN) -> dict:
    """:func:`figure6_bytes` of LLaMA 7B-65B in GB (1e9 bytes), two decimals, with the total."""
    out = {}
    for name, s in memory.LLAMA_SHAPES.items():
        parts = figure6_bytes(s, seq_len)
        out[name] = {k: round(v / GB, 2) for k, v in parts.items()}
        out[name]["total"] = round(sum(parts.values()) / GB, 2)
    return out


def figure6() -> None:
    n = figure6_numbers()
    fig, (ax,) = new_figure(width=7, height=4.5)
    names = list(n)
    bottom = np.zeros(len(names))
    for term in [k for k in n[names[0]] if k != "total"]:
        vals = np.array([n[m][term] for m in names])
        ax.bar(names, vals, bottom=bottom, label=term)
        bottom += vals
    for limit in (24, 48):
        ax.axhline(limit, color="k", ls="--", lw=0.8)
        ax.text(-0.45, limit + 0.5, f"{limit} GB", fontsize=8)
    for i, m in enumerate(names):
        ax.text(i, n[m]["total"] + 0.5, f"{n[m]['total']:.2f}", ha="center", fontsize=8)
    ax.set_ylabel("GB (1e9 bytes)")
    ax.set_title(f"QLoRA memory, r = 64, batch 1, {SEQ_LEN} tokens, gradient checkpointing")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, 0.93))
    save("figure6", n, fig)


SEQ_LENS = (256, 512, 1024, 2048, 4096, 8192, 16384)


def seq_len_numbers() -> dict:
    """Activation GB against sequence length, with and without checkpointing, and the longest
    sequence (batch 1) at which QLoRA of 65B (16-bit embeddings and head) stays within 48 GB."""
    out = {"seq_lens": list(SEQ_LENS)}
    for name in ("llama-7b", "llama-65b"):
        s = memory.LLAMA_SHAPES[name]
        for ckpt in (False, True):
            key = f"{name} {'with' if ckpt else 'without'} checkpointing"
            out[key] = [round(memory.activation_memory(s, t, gradient_checkpointing=ckpt).total_bytes / GB, 2)
                        for t in SEQ_LENS]
    for name in ("llama-7b", "llama-65b"):
        s = memory.LLAMA_SHAPES[name]
        out[f"ratio without / with checkpointing, {name}"] = round(
            memory.activation_memory(s, 1).total_bytes
            / memory.activation_memory(s, 1, gradient_checkpointing=True).total_bytes, 1)
    s = memory.LLAMA_SHAPES["llama-65b"]
    parts = figure6_bytes(s, seq_len=1)
    fixed_bytes = sum(parts.values()) - parts["activations (checkpointed)"]
    for ckpt in (False, True):
        per_token = memory.activation_memory(s, 1, gradient_checkpointing=ckpt).total_bytes
        out[f"65b max tokens in 48 GB {'with' if ckpt else 'without'} checkpointing"] = \
            int((48 * GB - fixed_bytes) // per_token)
    return out


def seq_len() -> None:
    n = seq_len_numbers()
    fig, (ax,) = new_figure(width=7)
    for key in [k for k in n if k.startswith("llama")]:
        ax.plot(n["seq_lens"], n[key], "o-" if "with " in key else "s--", label=key)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens per sequence (batch 1)")
    ax.set_ylabel("activations kept for backward, GB")
    ax.legend(fontsize=8)
    save("seq_len", n, fig)


# ----------------------------------------------------------------------------- 2. activations of 7B
def activations_7b_numbers(seq_len: int = SEQ_LEN) -> dict:
    """Section 2's 7B numbers by our count: LoRA input gradients with and without checkpointing."""
    s = memory.LLAMA_SHAPES["llama-7b"]
    no = memory.activation_memory(s, seq_len, linear_inputs_only=True)
    yes = memory.activation_memory(s, seq_len, linear_inputs_only=True, gradient_checkpointing=True)
    per_token_layer = (3 * s.hidden_size + s.intermediate_size) * 2   # bytes, linear inputs, bf16
    tokens_for_567 = 567e6 / (s.n_layers * per_token_layer)
    return {"seq_len": seq_len,
            "lora_params_0.2pct_MB": round(2 * memory.generic_lora_param_count(s.n_params) / 1e6, 1),
            "input_grads_no_ckpt_MB": round(no["saved by the decoder layers"] / 1e6, 1),
            "input_grads_ckpt_MB": round(yes["saved by the decoder layers"] / 1e6, 1),
            "stored_layer_inputs_MB": round(yes["checkpoints (layer inputs)"] / 1e6, 1),
            "ratio_no_ckpt_to_ckpt": round(no["saved by the decoder layers"]
                                           / yes["saved by the decoder layers"], 1),
            "tokens_where_count_gives_567MB": round(tokens_for_567),
            "ckpt_MB_at_those_tokens": round(567 / s.n_layers, 1)}


def activations_7b() -> None:
    n = activations_7b_numbers()
    fig, (ax,) = new_figure(width=7)
    labels = ["LoRA weights\n(0.2 %, 16-bit)", "input grads,\nno checkpointing",
              "input grads,\ncheckpointing", "checkpoints\n(stored layer inputs)"]
    vals = [n["lora_params_0.2pct_MB"], n["input_grads_no_ckpt_MB"], n["input_grads_ckpt_MB"],
            n["stored_layer_inputs_MB"]]
    ax.bar(labels, vals, color=["C2", "C3", "C0", "C7"])
    for i, v in enumerate(vals):
        ax.text(i, v + 10, f"{v:,.1f} MB", ha="center", fontsize=8)
    ax.set_ylabel("MB (1e6 bytes)")
    ax.set_title(f"LLaMA 7B, batch 1, {n['seq_len']} tokens, linear-layer inputs only")
    save("activations_7b", n, fig)


def bf16_compute() -> None:
    """Measured: a prepared tiny GPT keeps uint8 (4-bit) storage; its matmuls run in bfloat16."""
    import torch
    from torch.overrides import TorchFunctionMode
    import qlora_ref
    from qlora_ref.train.pretrain import load_base_model

    class LogMatmuls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = {}

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.nn.functional.linear, torch.matmul, torch.Tensor.matmul, torch.mm,
                        torch.Tensor.__matmul__, torch.addmm, torch.bmm):
                key = f"{getattr(func, '__name__', func)}({args[0].dtype}, {args[1].dtype})"
                self.seen[key] = self.seen.get(key, 0) + 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    idx = torch.randint(0, 16, (2, 32))                       # (batch 2, 32 tokens)
    base = load_base_model()
    linear_numel = sum(m.weight.numel() for m in base.modules()
                       if isinstance(m, torch.nn.Linear) and m.weight.shape[0] != base.config.vocab_size)
    out = {"quantized_weights": linear_numel, "their_bytes_in_16_bit": 2 * linear_numel}
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = qlora_ref.prepare_model(load_base_model(), compute_dtype=dtype)
        storage = {}
        for _, buf in list(model.named_buffers()) + [(n, p) for n, p in model.named_parameters()
                                                      if not p.requires_grad]:
            storage[str(buf.dtype)] = storage.get(str(buf.dtype), 0) + buf.numel() * buf.element_size()
        log = LogMatmuls()
        with torch.no_grad(), log:
            y = model(idx)
        y = y[0] if isinstance(y, tuple) else y
        name = str(dtype).replace("torch.", "")
        logits[name] = y.float()
        out[name] = {"frozen_storage_bytes_by_dtype": storage,
                     "matmul_calls": log.seen, "output_dtype": str(y.dtype)}
    out["max_abs_logit"] = round(float(logits["float32"].abs().max()), 3)
    out["max_abs_diff_bf16_vs_float32_compute"] = round(
        float((logits["bfloat16"] - logits["float32"]).abs().max()), 4)
    save("bf16_compute", out)


# ----------------------------------------------------------------------------- 1. placement, rank
PLACEMENT_ARMS = ("QLoRA NF4 + DQ", "QLoRA NF4, attention only", "QLoRA NF4, query and value only",
                  "QLoRA NF4, r=2", "QLoRA NF4, r=32")


def paired_differences(numbers: dict, reference: str = PLACEMENT_ARMS[0]) -> dict:
    """Per seed, each arm's accuracy minus ``reference``'s (the arms share seeds, data and base)."""
    ref = numbers["arms"][reference]["accuracy"]
    return {arm: [round(a - b, 3) for a, b in zip(v["accuracy"], ref)]
            for arm, v in numbers["arms"].items()}


def placement_rank(seeds=(0, 1, 2, 3, 4), max_steps: int = 282, eval_size: int = 200) -> None:
    from qlora_ref.train.compare import run_compare
    from qlora_ref.train.finetune import FinetuneConfig
    t0 = time.perf_counter()
    results = run_compare("full", seeds=seeds, arms=list(PLACEMENT_ARMS),
                          base_config=FinetuneConfig(max_steps=max_steps, eval_size=eval_size),
                          progress=True)
    n = {"seeds": list(seeds), "max_steps": max_steps, "eval_size": eval_size, "seconds": round(time.perf_counter() - t0),
         "arms": {r.arm: {"accuracy": [round(a, 3) for a in r.accuracy],
                          "mean": round(float(np.mean(r.accuracy)), 3),
                          "sd": round(float(np.std(r.accuracy, ddof=1)), 3)} for r in results}}
    n["minus_all_linear_per_seed"] = paired_differences(n)
    fig, (ax,) = new_figure(width=7.5)
    for i, (arm, v) in enumerate(n["arms"].items()):
        ax.bar(i, v["mean"], yerr=v["sd"], capsize=4, color="C0" if i < 3 else "C1")
        ax.plot([i] * len(v["accuracy"]), v["accuracy"], "k.", ms=4)
    ax.set_xticks(range(len(n["arms"])), [a.replace("QLoRA NF4", "NF4").replace(", ", "\n")
                                          for a in n["arms"]], fontsize=8)
    ax.set_ylabel("held-out exact match (mean ± sd, dots: seeds)")
    ax.set_title(f"placement (blue, r = 8) and rank (orange, all linear): {max_steps} steps")
    save("placement_rank", n, fig)


FIGURES = {f.__name__: f for f in (nf4_bins, nf4_offset, qq_base, qq_smollm2, figure6, seq_len,
                                   activations_7b, bf16_compute, placement_rank)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(FIGURES), action="append",
                        help="make only this figure (repeatable)")
    args = parser.parse_args(argv)
    for name in args.only or FIGURES:
        t0 = time.perf_counter()
        FIGURES[name]()
        print(f"{name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
