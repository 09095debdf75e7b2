"""The decoder's one-token step in the step kernels (``LlamaDecoder._forward_token``) against its torch twin.

One sequence's new tokens go through ``decode_step.h`` and ``LeanProjection``
(one kernel call per projection, norm, attention and SiLU); every other call
(a prompt, a batch, padding) runs the torch lines of ``LlamaDecoder._forward``.
Both compute the same float32 residual stream with the same roundings of the
projections' inputs; the step kernels sum in another order. So greedy tokens
must agree wherever the twin's top-two margin is over twice the bound of
``tests/nn/test_lean_decoder.py``, and logits stay within it.
"""
from __future__ import annotations

import copy

import pytest
import torch

import qlora_ref
from qlora_ref.nn.decode import LlamaDecoder
from tests.helpers import randomize_adapters, tiny_llama
from tests.nn.test_lean_decoder import _compare

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.skipif(
    not qlora_ref.cython_available() or qlora_ref.backend.simd_level() == "portable",
    reason="the fused kernel needs the extension and an AVX2/AVX-512 CPU")


def _ours(dtype):
    dense = tiny_llama(seed=3).to(dtype)
    ours = qlora_ref.prepare_model(copy.deepcopy(dense), r=4, compute_dtype=dtype).eval()
    randomize_adapters(ours, 0.05)              # B = 0 would hide the adapters' update
    return dense, ours


def _spy(decoder, monkeypatch):
    """Count the steps each way runs: ``{"token": n, "torch": n}``."""
    counts = {"token": 0, "torch": 0}
    token, forward = decoder._forward_token, decoder._forward

    def token_spy(*args):
        counts["token"] += 1
        return token(*args)

    def torch_spy(*args):
        counts["torch"] += 1
        return forward(*args)

    monkeypatch.setattr(decoder, "_forward_token", token_spy)
    monkeypatch.setattr(decoder, "_forward", torch_spy)
    return counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_sequence_steps_agree_with_the_torch_twin(dtype, monkeypatch):
    _, ours = _ours(dtype)
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(4))
    fast, twin = LlamaDecoder(ours), LlamaDecoder(ours)
    twin.token_kernels = False
    counts = _spy(fast, monkeypatch)
    with torch.no_grad():
        tokens, logits = fast.generate(ids, 12, return_logits=True)
        expected, expected_logits = twin.generate(ids, 12, return_logits=True)
    assert counts == {"torch": 1, "token": 11}   # the prompt, then every new token
    # _compare's bound: 2 blocks (as here), inner dimension 256 (128 here: a looser bound)
    _compare(expected, torch.stack(expected_logits, 1), tokens, torch.stack(logits, 1), 10,
             dtype)


def test_the_step_agrees_with_transformers_forward_in_float32():
    """Against the other library's own forward (not our twin): every new token's logits."""
    _, ours = _ours(torch.float32)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        tokens, logits = LlamaDecoder(ours).generate(ids, 8, return_logits=True)
        forward = ours(tokens).logits[0, 5:-1]                          # (8, vocab)
    err = (torch.stack(logits, 1)[0] - forward).abs().max()
    # 2 blocks: 5 matmuls in a row, inner dimension at most 128, float32 (test_lean_decoder)
    bound = 4 * 5 * (128 * 2.0 ** -24) * float(forward.abs().max())
    assert err <= bound, f"logits off by {err:.3g} (bound {bound:.3g})"


def test_batches_padding_and_dense_models_take_the_torch_lines(monkeypatch):
    dense, ours = _ours(torch.float32)
    decoder = LlamaDecoder(ours)
    counts = _spy(decoder, monkeypatch)
    with torch.no_grad():
        decoder.generate(torch.randint(0, 96, (2, 5)), 3)              # a batch of two
        assert counts == {"token": 0, "torch": 3}
        mask = torch.tensor([[0, 1, 1, 1, 1]])
        decoder.generate(torch.randint(1, 96, (1, 5)), 3, attention_mask=mask)  # padding
        assert counts == {"token": 0, "torch": 6}
        decoder.generate(torch.randint(1, 96, (1, 5)), 3, attention_mask=torch.ones(1, 5))
        assert counts == {"token": 2, "torch": 7}                      # an all-ones mask
    plain = LlamaDecoder(dense)                                         # no 4-bit kernels
    counts = _spy(plain, monkeypatch)
    with torch.no_grad():
        plain.generate(torch.randint(0, 96, (1, 5)), 3)
    assert counts == {"token": 0, "torch": 3}


def test_the_step_sees_the_cache_the_prompt_wrote():
    """The prompt's K and V (torch lines) are the rows the step kernels attend to: a prompt
    one token longer gives the step the same logits as feeding that token as a step."""
    _, ours = _ours(torch.float32)
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(6))
    twin = LlamaDecoder(ours)
    twin.token_kernels = False
    with torch.no_grad():
        _, stepped = LlamaDecoder(ours).generate(ids[:, :6], 2, return_logits=True)
        first, _ = twin.generate(ids[:, :6], 1, return_logits=True)
        nxt = first[:, 6:]
        _, prompted = twin.generate(torch.cat([ids[:, :6], nxt], 1), 1, return_logits=True)
    # step 2 of the fast decoder read the prompt's cache rows 0..5 and its own row 6
    bound = 4 * 5 * (128 * 2.0 ** -24) * float(prompted[0].abs().max())
    assert (stepped[1] - prompted[0]).abs().max() <= bound
