"""The data-type table (qlora_ref.train.datatypes): what its rows must satisfy.

The table quantizes the shipped base model's projections with Int4/FP4/NF4,
with and without double quantization, and measures the held-out answer-token
loss without fine-tuning. These tests check the parts that could go wrong:
the reference row is the plain model's loss, a quantized layer holds the
bytes bitsandbytes writes for the same weight, and double quantization moves
the loss no more than its (exactly bounded) change of the weights allows.
"""
import math

import numpy as np
import pytest
import torch

from qlora_ref.train import tasks
from qlora_ref.train.datatypes import (ROWS, datatype_table, format_datatype_table,
                                       plot_datatype_table, quantize_model)
from qlora_ref.train.pretrain import load_base_model

N = 40  # held-out examples per task: enough tokens for a stable mean, fast
LAYER = "blocks.0.attn.q_proj"


@pytest.fixture(scope="module")
def base():
    return load_base_model()


def _pairs():
    return [p for t in tasks.PRETRAIN_TASKS for p in tasks.held_out(t, N)]


def _float64_answer_loss(model, pairs):
    """Mean -log p(answer token) from the model's logits, in float64 with torch's log_softmax only."""
    total, count = 0.0, 0
    for t in tasks.PRETRAIN_TASKS:
        x, y, mask = tasks.encode_pairs(tasks.held_out(t, N), model.config.block_size)
        with torch.no_grad():
            logits, _ = model(x)  # (B, T, V); no targets: GPT computes no loss
        logp = torch.log_softmax(logits.double(), dim=-1).gather(-1, y[..., None])[..., 0]  # (B, T)
        total += float(-(logp * mask).sum())
        count += int(mask.sum())
    return total / count


def test_the_float32_row_is_the_plain_models_loss_computed_independently(base):
    (row,) = datatype_table(base, n=N, accuracy=False, rows=[ROWS[0]])
    expected = _float64_answer_loss(base, _pairs())
    # float32 logits and a float32 mean over ~1,000 tokens: a few float32 ulps of the loss
    assert row["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7), (row["loss"], expected)
    assert row["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_quantized_rows_store_4bit_layers_and_leave_the_base_alone(base):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = quantize_model(base, "nf4", double_quant=True)
    layer = model.get_submodule(LAYER).base_layer
    assert type(layer).__name__ == "Linear4bit" and layer.quant_config()["quant_type"] == "nf4"
    assert type(model.lm_head).__name__ == "Linear"  # the output head stays 16-bit, as in the paper
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_a_quantized_layer_holds_the_bytes_bitsandbytes_writes(base, quant_type, double_quant):
    F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes is not installed")
    weight = base.get_submodule(LAYER).weight.detach()
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type=quant_type,
                                    compress_statistics=double_quant)
    ours = quantize_model(base, quant_type, double_quant).get_submodule(LAYER).base_layer
    # 128x128 weights, 256 full blocks of 64: no partial block where the two may differ
    np.testing.assert_array_equal(ours.packed.numpy(), packed.numpy().reshape(-1))
    if not double_quant:
        np.testing.assert_array_equal(ours.absmax.numpy(), state.absmax.numpy())


def test_double_quantization_moves_the_loss_within_its_weight_change_bound(base):
    """|L(W_dq) - L(W)| <= 2 * ||grad L||_1 * max |W_dq - W|, per layer summed.

    With ``q`` the 4-bit code values (|q| <= 1) and ``c`` a block's absmax, a
    weight is ``q * c`` without and ``q * c_dq`` with double quantization, so
    ``max |W_dq - W| <= max_blocks |c_dq - c|`` exactly (checked first). The
    mean value theorem then bounds the loss change by the gradient's l1 norm
    somewhere between the two weight sets times that max; the factor 2 allows
    the gradient to change along a segment this short (|W_dq - W| is about
    1e-3 of the weights).
    """
    pairs = _pairs()
    plain = quantize_model(base, "nf4", double_quant=False)
    dq = quantize_model(base, "nf4", double_quant=True)
    names = [n for n, m in plain.named_modules() if type(m).__name__ == "Linear4bit"]
    w = {n: plain.get_submodule(n).dequantize(torch.float32) for n in names}
    w_dq = {n: dq.get_submodule(n).dequantize(torch.float32) for n in names}
    for n in names:
        c = plain.get_submodule(n).quant_state().absmax.astype(np.float64)
        c_dq = _dequantized_absmax(dq.get_submodule(n))
        assert float((w_dq[n] - w[n]).abs().max()) <= np.abs(c_dq - c).max() * (1 + 1e-6), n

    def loss_and_grads(weights):
        model = quantize_model(base, "float32")
        for n, value in weights.items():
            model.get_submodule(n.removesuffix(".base_layer")).weight.data.copy_(value)
        x, y, mask = tasks.encode_pairs(pairs, model.config.block_size)
        _, loss = model(x, y, mask)
        loss.backward()
        return loss.item(), {n: model.get_submodule(n.removesuffix(".base_layer")).weight.grad
                             for n in weights}

    loss, grads = loss_and_grads(w)
    loss_dq, grads_dq = loss_and_grads(w_dq)
    bound = 2 * sum(max(float(grads[n].abs().sum()), float(grads_dq[n].abs().sum()))
                    * float((w_dq[n] - w[n]).abs().max()) for n in names)
    assert abs(loss_dq - loss) <= bound, f"|dL| = {abs(loss_dq - loss):.3g} > bound {bound:.3g}"


def _dequantized_absmax(layer):
    from qlora_ref import double_dequantize

    s = layer.quant_state()
    return np.asarray(double_dequantize(s.absmax, s.nested_absmax, s.offset,
                                        nested_code=s.nested_code), dtype=np.float64)


def test_the_table_formats_and_plots_every_row(base, tmp_path):
    rows = [ROWS[0], ROWS[-1]]
    table = datatype_table(base, n=5, accuracy=True, rows=rows)
    text = format_datatype_table(table)
    assert [line.split("|")[1].strip() for line in text.splitlines()[2:]] == [r[0] for r in rows]
    assert all(0 <= r["accuracy"] <= 1 for r in table)
    path = plot_datatype_table(table, tmp_path / "datatypes.png")
    assert path.read_bytes().startswith(b"\x89PNG") and not list(tmp_path.glob(".*tmp*"))


def test_a_bad_kind_is_refused_by_name(base):
    with pytest.raises(ValueError, match="'nf5'"):
        quantize_model(base, "nf5")
