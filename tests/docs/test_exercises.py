"""The exercise checks of notebooks 01-08 reject wrong answers and library shortcuts.

``tests/docs/test_notebooks.py`` shows every check says ``[correct]`` on its solution and
``[not done]`` on the placeholder. This file feeds each check of ``notebooks/exercises.py``
the solution (accepted), at least two plausible wrong answers (each rejected), and, where
the package computes the answer, the shortcut of calling it (rejected): the slips a student
makes, and the call that would pass without solving anything.
"""
import copy
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import norm

import qlora_ref
from qlora_ref import codebooks, memory

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
_spec = importlib.util.spec_from_file_location("notebooks_exercises", NOTEBOOKS_DIR / "exercises.py")
ex = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ex)


def verdict(verify, answer, *context) -> str:
    """What ``exercises.check`` would print for ``answer``: correct, wrong or not done."""
    try:
        ex.require(answer)
        verify(answer, *context)
    except ex.NotDone:
        return "not done"
    except AssertionError:
        return "wrong"
    return "correct"


def sol(notebook, name):
    return ex.solution(notebook, name)


# ---------------------------------------------------------------- the wrong answers, per exercise
# Each entry: (verify, notebook, solution name, {label: wrong answer or shortcut}).

def _nf_k_symmetric(bits):                     # 2**k quantiles, no zero
    q = norm.ppf((np.arange(2 ** bits) + 0.5) / 2 ** bits)
    return (q / q.max()).astype(np.float32)


def _nf_k_mirrored(bits):                      # 8 negative, 7 positive
    return -sol("01", "nf_k")(bits)[::-1].copy()


def _median_of_max(n):                         # the largest value, not the largest |value|
    return float(norm.ppf(0.5 ** (1 / n)))


def _median_sampled(n):
    rng = np.random.default_rng(0)
    return float(np.median(np.abs(rng.standard_normal((20_000, n))).max(axis=1)))


def _lloyd_few_iterations(n):
    return sol("01", "lloyd_max")(n, iterations=3)


def _quantile_levels(n):
    return norm.ppf((np.arange(n) + 0.5) / n)


def _outliers_ignoring_partial(x, b, t):       # pads the last block and counts the padding
    flat = np.abs(np.asarray(x).ravel()) > t
    flat = np.concatenate([flat, np.zeros(-flat.size % b, bool)]).reshape(-1, b)
    return int((flat.any(axis=1)[:, None] & ~flat).sum())


def _outliers_signed(x, b, t):                 # forgets the negative outliers
    x = np.asarray(x, np.float64).ravel()
    n = 0
    for start in range(0, x.size, b):
        block = x[start:start + b]
        if (block > t).any():
            n += int((np.abs(block) <= t).sum())
    return n


def _dq_no_c1(b1, b2):
    return 4 + 8 / b1


def _dq_per_b2(b1, b2):
    return 4 + 8 / b1 + 32 / b2


def _n_c1_floor(shape):
    return math.prod(shape) // 64 // 256


def _n_c1_per_row(shape):
    rows = math.prod(shape[:-1])
    return -(-rows * -(-shape[-1] // 64) // 256)


def _dequantize_low_first(packed, absmax, n):
    p = np.asarray(packed)
    codes = np.stack([p & 0x0F, p >> 4], axis=1).reshape(-1)[:n]
    return codebooks.nf4_code()[codes] * np.repeat(absmax, 64)[:n]


def _dequantize_no_scale(packed, absmax, n):
    p = np.asarray(packed)
    return codebooks.nf4_code()[np.stack([p >> 4, p & 0x0F], axis=1).reshape(-1)[:n]]


def _state_no_offset(n):
    return sol("04", "state_nbytes")(n) - 4


def _state_floor(n):
    return n // 2 + n // 64 + 4 * (n // 64 // 256) + 4


def _pack_low_first(codes, pad):
    codes = np.asarray(codes, np.uint8)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(pad))
    p = codes.reshape(-1, 2)
    return ((p[:, 1] << 4) | p[:, 0]).astype(np.uint8)


def _pack_pad_zero(codes, pad):
    return sol("04", "pack")(codes, 0)


def _backward_no_dropout(G, X, A, B, s, mask, p):
    return s * (G @ B) @ A, s * (G @ B).T @ X, s * G.T @ (X @ A.T)


def _backward_no_rescale(G, X, A, B, s, mask, p):
    dX, dA, dB = sol("05", "lora_backward")(G, X, A, B, s, mask, p)
    return dX * (1 - p), dA * (1 - p), dB * (1 - p)


def _backward_by_autograd(G, X, A, B, s, mask, p):
    leaves = [t.clone().requires_grad_() for t in (X, A, B)]
    out = s * ((leaves[0] * mask / (1 - p)) @ leaves[1].T) @ leaves[2].T
    return torch.autograd.grad(out, leaves, G)


def _backward_by_vjp(G, X, A, B, s, mask, p):
    return torch.func.vjp(lambda X, A, B: s * ((X * mask / (1 - p)) @ A.T) @ B.T, X, A, B)[1](G)


def _saved_no_mask(x_shape, d_out, r, dropout):
    return sol("05", "saved_bytes")(x_shape, d_out, r, False)


def _saved_with_weight(x_shape, d_out, r, dropout):
    return sol("05", "saved_bytes")(x_shape, d_out, r, dropout) + 4 * x_shape[-1] * d_out


def _saved_by_measuring(x_shape, d_out, r, dropout):
    return ex._saved_bytes_measured(x_shape, d_out, r, dropout)


def _two_steps_a_fixed(G, X, A, s, lr):        # A never moves
    A2, B2 = sol("05", "two_sgd_steps")(G, X, A, s, lr)
    return A, B2


def _two_steps_one_b_step(G, X, A, s, lr):     # B moves only once
    A2, B2 = sol("05", "two_sgd_steps")(G, X, A, s, lr)
    return A2, B2 / 2


def _two_steps_by_autograd(G, X, A, s, lr):
    return ex._two_sgd_steps_autograd(G, X, A, s, lr)


def _lora_count_with_head(config, r):
    return sol("06", "lora_count")(config, r) + r * (config.n_embd + config.vocab_size)


def _lora_count_attention_only(config, r):
    return config.n_layer * 4 * r * 2 * config.n_embd


def _lora_count_by_prepare(config, r):
    return qlora_ref.trainable_parameters(qlora_ref.prepare_model(
        __import__("qlora_ref.train.gpt", fromlist=["GPT"]).GPT(config), r=r)).trainable


def _base_bytes_one_tensor(config):
    shapes = sol("06", "_linear_shapes")(config)
    return memory.quantized_nbytes(sum(a * b for a, b in shapes))


def _base_bytes_no_dq(config):
    return sum(memory.quantized_nbytes(a * b, double_quant=False) for a, b in sol("06", "_linear_shapes")(config))


def _base_bytes_by_prepare(config):
    from qlora_ref.train.gpt import GPT
    return qlora_ref.trainable_parameters(qlora_ref.prepare_model(GPT(config))).base_bytes


def _gb_no_dq(n, n_lora):
    return memory.quantized_nbytes(int(n), double_quant=False) / 1e9 + 12 * n_lora / 1e9 if False else \
        (math.ceil(n / 2) + 4 * math.ceil(n / 64) + 12 * n_lora) / 1e9


def _gb_16bit_moments(n, n_lora):
    return sol("07", "qlora_gb")(n, n_lora) - 4 * n_lora / 1e9


def _gb_by_memory(n, n_lora):
    return memory.finetune_memory(n, "qlora", lora_params=n_lora).total_bytes / 1e9


def _rank_ignoring_activations(budget, activations):
    return sol("07", "largest_rank")(budget, 0)


def _rank_gib(budget, activations):
    return sol("07", "largest_rank")(budget * 2 ** 30 / 1e9, activations)


def _rank_by_search(budget, activations):
    return ex._largest_rank_counted(budget, activations)


def _sequence_per_token(shape, gc, value_bytes=2, logits=True):
    """Activation bytes per token of memory.activation_memory, with the slips below as switches."""
    h, i, L, V = shape.hidden_size, shape.intermediate_size, shape.n_layers, shape.vocab_size
    head = h + (V if logits else 0)
    return value_bytes * ((L * h + 8 * h + 3 * i + head) if gc else (L * (8 * h + 3 * i) + head))


def _sequence_with(n, n_lora, shape, budget, gc, **slip):
    left = budget * 1e9 - sol("07", "qlora_gb")(n, n_lora) * 1e9
    return max(0, math.floor(left / _sequence_per_token(shape, gc, **slip)))


def _sequence_no_checkpointing(n, n_lora, shape, budget, gc):      # the flag ignored
    return _sequence_with(n, n_lora, shape, budget, False)


def _sequence_no_logits(n, n_lora, shape, budget, gc):
    return _sequence_with(n, n_lora, shape, budget, gc, logits=False)


def _sequence_float32(n, n_lora, shape, budget, gc):
    return _sequence_with(n, n_lora, shape, budget, gc, value_bytes=4)


def _sequence_all_layers_recomputed(n, n_lora, shape, budget, gc):  # checkpoints, plus every layer's set
    if not gc:
        return _sequence_with(n, n_lora, shape, budget, gc)
    h, i, L, V = shape.hidden_size, shape.intermediate_size, shape.n_layers, shape.vocab_size
    left = budget * 1e9 - sol("07", "qlora_gb")(n, n_lora) * 1e9
    return max(0, math.floor(left / (2 * (L * h + L * (8 * h + 3 * i) + h + V))))


def _sequence_gib(n, n_lora, shape, budget, gc):
    return sol("07", "longest_sequence")(n, n_lora, shape, budget * 2 ** 30 / 1e9, gc)


def _sequence_by_search(n, n_lora, shape, budget, gc):
    return ex._longest_sequence_counted(n, n_lora, shape, budget, gc)


def _sequence_by_activation_memory(n, n_lora, shape, budget, gc):
    per_token = memory.activation_memory(shape, 1, gradient_checkpointing=gc).total_bytes
    static = memory.finetune_memory(n, "qlora", lora_params=n_lora).total_bytes
    return max(0, int((budget * 1e9 - static) // per_token))


def _requantize_parts(w_hat, delta, x, scales_from=None, levels=None):
    """(requantized weight, unmerged weight): Ŵ + ΔW in NF4, with the absmax of ``scales_from``."""
    merged = w_hat + delta
    blocks = merged.reshape(-1, 64)
    absmax = (merged if scales_from is None else scales_from).reshape(-1, 64).abs().amax(1, keepdim=True)
    levels = torch.tensor(codebooks.nf4_code() if levels is None else np.sort(levels), dtype=torch.float32)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    codes = ((blocks / scale).unsqueeze(-1) - levels).abs().argmin(-1)
    return (levels[codes] * absmax).reshape(merged.shape), merged


def _relative(x, w_new, w_ref):
    y = x @ w_ref.T
    return float((x @ w_new.T - y).norm() / y.norm())


def _requantize_old_scales(w_hat, delta, x):        # the base's absmax kept
    return _relative(x, *_requantize_parts(w_hat, delta, x, scales_from=w_hat))


def _requantize_update_alone(w_hat, delta, x):      # ΔW quantized on its own and added to Ŵ
    q, _ = _requantize_parts(torch.zeros_like(delta), delta, x)
    return _relative(x, w_hat + q, w_hat + delta)


def _requantize_max_abs(w_hat, delta, x):
    w_new, w_ref = _requantize_parts(w_hat, delta, x)
    return float((x @ w_new.T - x @ w_ref.T).abs().max())


def _requantize_weight_error(w_hat, delta, x):      # the weights' relative error, not the outputs'
    w_new, w_ref = _requantize_parts(w_hat, delta, x)
    return float((w_new - w_ref).norm() / w_ref.norm())


def _requantize_int4(w_hat, delta, x):
    return _relative(x, *_requantize_parts(w_hat, delta, x, levels=INT4_LEVELS))


def _requantize_by_quantize_4bit(w_hat, delta, x):
    merged = (w_hat + delta).numpy()
    back = qlora_ref.dequantize_4bit(qlora_ref.quantize_4bit(merged, blocksize=64, double_quant=False))
    return _relative(x, torch.from_numpy(np.asarray(back)).reshape(w_hat.shape), w_hat + delta)


def _requantize_by_merge_errors(w_hat, delta, x):
    from qlora_ref.nn import Linear4bit, LoRALinear, merge_errors
    linear = torch.nn.Linear(w_hat.shape[1], w_hat.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(w_hat)
    layer = LoRALinear(Linear4bit.from_linear(linear, double_quant=False), r=1, lora_alpha=1)
    with torch.no_grad():                            # a rank-1 stand-in is not ΔW, but the call is the point
        layer.lora_B.fill_(0.0)
    return merge_errors(torch.nn.Sequential(layer), x, strategies=("requantize",))["requantize"].relative


#: Int4's levels, read here: a wrong answer that called int4_code would be rejected by the guard,
#: not by its value
INT4_LEVELS = np.sort(codebooks.int4_code()).astype(np.float32)


def _codes_unscaled(w):
    levels = torch.tensor(codebooks.nf4_code())
    return (w.reshape(-1, 1) - levels).abs().argmin(dim=1).numpy()


def _codes_int4(w):
    blocks = w.reshape(-1, 64)
    x = blocks / blocks.abs().amax(dim=1, keepdim=True)
    levels = torch.tensor(INT4_LEVELS)
    return (x.unsqueeze(-1) - levels).abs().argmin(-1).reshape(-1).numpy()


def _codes_by_quantize(w):
    state = qlora_ref.quantize_4bit(w.numpy(), blocksize=64, double_quant=False)
    return qlora_ref.unpack_nibbles(state.packed, w.numel())


def _codes_by_bitsandbytes(w):
    import bitsandbytes.functional as F
    packed, _ = F.quantize_4bit(w.reshape(-1), blocksize=64, quant_type="nf4")
    return qlora_ref.unpack_nibbles(packed.reshape(-1).numpy(), w.numel())


CASES = [
    (ex.verify_nf_k, "01", "nf_k", {"16 symmetric quantiles": _nf_k_symmetric, "mirrored": _nf_k_mirrored,
                                    "shortcut normal_float_code": codebooks.normal_float_code}),
    (ex.verify_median_block_absmax, "01", "median_block_absmax", {
        "median of the max": _median_of_max, "sampled": _median_sampled,
        "mean of the absmax": lambda n: float(np.abs(np.random.default_rng(1).standard_normal((20_000, n))).max(1).mean())}),
    (ex.verify_lloyd_max, "01", "lloyd_max", {"3 iterations": _lloyd_few_iterations,
                                              "quantiles": _quantile_levels}),
    (ex.verify_error_bound, "02", "error_bound", {
        "the whole gap": lambda code, a: 2 * sol("02", "error_bound")(code, a),
        "the narrowest gap": lambda code, a: a * np.diff(np.sort(code)).min() / 2,
        "no absmax": lambda code, a: sol("02", "error_bound")(code, 1.0)}),
    (ex.verify_outlier_neighbours, "02", "outlier_neighbours", {
        "partial block padded": _outliers_ignoring_partial, "positive outliers only": _outliers_signed,
        "outliers counted too": lambda x, b, t: sol("02", "outlier_neighbours")(x, b, t)
        + int((np.abs(np.asarray(x)) > t).sum())}),
    (ex.verify_dq_bits_per_param, "03", "dq_bits_per_param", {
        "no c1": _dq_no_c1, "c1 per b2 weights": _dq_per_b2,
        "shortcut bits_per_param": lambda b1, b2: memory.bits_per_param(blocksize=b1, nested_blocksize=b2)}),
    (ex.verify_n_c1, "03", "n_c1", {
        "floor": _n_c1_floor, "per row": _n_c1_per_row,
        "shortcut quantize_4bit": lambda shape: qlora_ref.quantize_4bit(np.zeros(shape, np.float32)).nested_absmax.size}),
    (ex.verify_equivalent_blocksize, "03", "equivalent_blocksize", {
        "c1 forgotten": lambda b1, b2: 4 * b1, "4 bits not subtracted": lambda b1, b2: 32 / (4 + 8 / b1 + 32 / (b1 * b2)),
        "shortcut 32 / (bpp - 4)": lambda b1, b2: 32 / (memory.bits_per_param(blocksize=b1, nested_blocksize=b2) - 4)}),
    (ex.verify_dequantize_nf4, "04", "dequantize_nf4", {
        "low nibble first": _dequantize_low_first, "no scale": _dequantize_no_scale,
        "shortcut dequantize_blockwise": lambda p, a, n: qlora_ref.dequantize_blockwise(
            qlora_ref.unpack_nibbles(p, n), a, codebooks.nf4_code(), 64)}),
    (ex.verify_state_nbytes, "04", "state_nbytes", {
        "no offset": _state_no_offset, "floors": _state_floor,
        "shortcut quantize_4bit": lambda n: qlora_ref.quantize_4bit(np.zeros(n, np.float32)).nbytes,
        "shortcut memory": lambda n: memory.quantized_nbytes(n)}),
    (ex.verify_pack, "04", "pack", {"low nibble first": _pack_low_first, "pad 0": _pack_pad_zero,
                                    "shortcut pack_nibbles": lambda c, pad: qlora_ref.pack_nibbles(c, pad=pad)}),
    (ex.verify_lora_backward, "05", "lora_backward", {
        "no dropout": _backward_no_dropout, "no 1 / (1 - p)": _backward_no_rescale,
        "shortcut autograd.grad": _backward_by_autograd, "shortcut torch.func.vjp": _backward_by_vjp}),
    (ex.verify_saved_bytes, "05", "saved_bytes", {
        "mask forgotten": _saved_no_mask, "weight counted": _saved_with_weight,
        "shortcut measuring the layer": _saved_by_measuring}),
    (ex.verify_two_sgd_steps, "05", "two_sgd_steps", {
        "A never moves": _two_steps_a_fixed, "B moves once": _two_steps_one_b_step,
        "shortcut autograd": _two_steps_by_autograd}),
    (ex.verify_lora_count, "06", "lora_count", {
        "head adapted too": _lora_count_with_head, "attention only": _lora_count_attention_only,
        "shortcut prepare_model": _lora_count_by_prepare}),
    (ex.verify_nf4_base_bytes, "06", "nf4_base_bytes", {
        "one tensor": _base_bytes_one_tensor, "no double quantization": _base_bytes_no_dq,
        "shortcut prepare_model": _base_bytes_by_prepare}),
    (ex.verify_qlora_gb, "07", "qlora_gb", {
        "no double quantization": _gb_no_dq, "16-bit moments": _gb_16bit_moments,
        "shortcut finetune_memory": _gb_by_memory}),
    (ex.verify_largest_rank, "07", "largest_rank", {
        "activations ignored": _rank_ignoring_activations, "GiB": _rank_gib,
        "one too many": lambda b, a: sol("07", "largest_rank")(b, a) + 1,
        "shortcut searching with memory": _rank_by_search}),
    (ex.verify_longest_sequence, "07", "longest_sequence", {
        "checkpointing ignored": _sequence_no_checkpointing, "logits forgotten": _sequence_no_logits,
        "float32 activations": _sequence_float32, "every layer kept as well": _sequence_all_layers_recomputed,
        "GiB": _sequence_gib, "one too many": lambda *a: sol("07", "longest_sequence")(*a) + 1,
        "shortcut searching with finetune_memory": _sequence_by_search,
        "shortcut activation_memory": _sequence_by_activation_memory}),
    (ex.verify_nf4_codes, "08", "nf4_codes", {
        "not scaled by absmax": _codes_unscaled, "Int4 levels": _codes_int4,
        "shortcut quantize_4bit": _codes_by_quantize, "shortcut bitsandbytes": _codes_by_bitsandbytes}),
    (ex.verify_requantize_error, "08", "requantize_error", {
        "no requantization": lambda w_hat, delta, x: 0.0, "the base's absmax kept": _requantize_old_scales,
        "update quantized alone": _requantize_update_alone, "max |error|": _requantize_max_abs,
        "weights, not outputs": _requantize_weight_error, "Int4 levels": _requantize_int4,
        "shortcut quantize_4bit": _requantize_by_quantize_4bit,
        "shortcut merge_errors": _requantize_by_merge_errors}),
]

VALUE_CASES = [
    (ex.verify_worst_block, "02", "worst_block", {
        "a normal block": np.random.default_rng(0).standard_normal(64).astype(np.float32),
        "no absmax anchor": np.full(64, sol("02", "worst_block")[1], np.float32),
        "float64": sol("02", "worst_block").astype(np.float64)}),
    (ex.verify_bf16_relative_error_bound, "08", "bf16_relative_error_bound", {
        "the spacing, not half": 2.0 ** -7, "float32's": 2.0 ** -24, "float16's": 2.0 ** -11,
        "half again too large": 1.5 * 2.0 ** -8,
        "measured on normal weights (the shortcut)": float(
            ((lambda w: ((w.to(torch.bfloat16).float() - w).abs() / w.abs()).max())(
                torch.randn(100_000, generator=torch.Generator().manual_seed(0)))))}),
]

IDS = [f"{nb}/{name}" for _, nb, name, _ in CASES]


@pytest.mark.parametrize("verify, notebook, name, wrong", CASES, ids=IDS)
def test_a_function_check_accepts_the_solution_and_rejects_slips_and_shortcuts(verify, notebook, name, wrong):
    assert verdict(verify, sol(notebook, name)) == "correct"
    assert len([k for k in wrong if not k.startswith("shortcut")]) >= 2
    accepted = [label for label, answer in wrong.items() if verdict(verify, answer) != "wrong"]
    assert not accepted, f"{notebook}/{name} does not reject: {accepted}"


@pytest.mark.parametrize("verify, notebook, name, wrong", VALUE_CASES,
                         ids=[f"{nb}/{name}" for _, nb, name, _ in VALUE_CASES])
def test_a_value_check_accepts_the_solution_and_rejects_slips(verify, notebook, name, wrong):
    assert verdict(verify, sol(notebook, name)) == "correct"
    accepted = [label for label, answer in wrong.items() if verdict(verify, answer) != "wrong"]
    assert not accepted, f"{notebook}/{name} does not reject: {accepted}"


def test_bf16_accepts_the_exact_worst_case_too():
    u = 2.0 ** -8
    assert verdict(ex.verify_bf16_relative_error_bound, u / (1 + u)) == "correct"


def test_loss_before_qlora_rejects_the_16_bit_loss_a_constant_and_finetune():
    from qlora_ref.train import tasks
    from qlora_ref.train.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=21, block_size=24, n_layer=1, n_head=2, n_embd=32))
    right = sol("06", "loss_before_qlora")
    qlora, sixteen = right(copy.deepcopy(base)), tasks.evaluate(base, "sort", n=50)["loss"]
    context = (base, qlora, sixteen)
    assert verdict(ex.verify_loss_before_qlora, right, *context) == "correct"
    wrong = {"16-bit": lambda m: tasks.evaluate(m, "sort", n=50)["loss"],
             "FP4": lambda m: tasks.evaluate(qlora_ref.prepare_model(copy.deepcopy(m), quant_type="fp4"),
                                             "sort", n=50)["loss"],
             "the recorded number": lambda m: qlora,
             "changes the model": lambda m: tasks.evaluate(qlora_ref.prepare_model(m), "sort", n=50)["loss"]}
    accepted = [k for k, f in wrong.items() if verdict(ex.verify_loss_before_qlora, f, *context) != "wrong"]
    assert not accepted, accepted


def test_the_guard_records_a_caught_call():
    def sneaky(n):
        try:
            return memory.bits_per_param()
        except AssertionError:
            return memory.bits_per_param()

    with pytest.raises(AssertionError, match="bits_per_param"):
        ex._forbidding(sneaky, (1,))
    assert ex._forbidding(lambda n: n + 1, (1,)) == 2
    assert ex._forbidding(lambda: memory.quantized_nbytes(100), allow=("qlora_ref.memory",
                                                                       "qlora_ref.validation")) > 0


def test_median_digests_are_far_from_a_rounding_edge():
    """An answer within 1e-6 of the median has the stored digest (its 5-decimal rounding is fixed)."""
    f = sol("01", "median_block_absmax")
    for n in ex.MEDIAN_ABSMAX_DIGESTS:
        for nudge in (-1e-6, 0.0, 1e-6):
            assert verdict(ex.verify_median_block_absmax, lambda k, d=nudge: f(k) + d) == "correct"
