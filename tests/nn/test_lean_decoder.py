"""The lean Llama decoder (``qlora_ref.nn.decode``) against its readable twin, transformers' forward and ``generate``.

Bounds: two float32 computations of the same function that differ in the
order of their sums differ by at most :math:`\\gamma_n = n u / (1 - n u)`,
:math:`u = 2^{-24}`, per matmul of inner dimension ``n`` (Higham, "Accuracy and
Stability of Numerical Algorithms", section 3.1), relative to the terms'
magnitudes; a tiny Llama of ``L`` blocks runs ``2L + 1`` matmuls in a row on
the path to a logit. We allow ``4 (2L + 1) gamma_n`` relative to the largest
logit in float32, and ``2 (2L + 1) u`` with :math:`u = 2^{-8}` when the matmuls
round to bfloat16. Greedy tokens must agree wherever transformers' top-two
logit margin is over twice that bound (below it, either token is a correct
greedy choice); after the first step where they may differ, the sequences
are no longer comparable and the check stops.
"""
from __future__ import annotations

import copy

import pytest
import torch

import qlora_ref
from qlora_ref.nn import LoRALinear
from qlora_ref.nn.decode import LlamaDecoder, lean_generate, unsupported_reason
from qlora_ref.nn.projection import Projection

transformers = pytest.importorskip("transformers")

needs_kernel = pytest.mark.skipif(
    not qlora_ref.cython_available() or qlora_ref.backend.simd_level() == "portable",
    reason="the fused kernel needs the extension and an AVX2/AVX-512 CPU")

LAYERS, HIDDEN, INTER, VOCAB = 2, 128, 256, 256


def _gamma(n, u=2.0 ** -24):
    return n * u / (1 - n * u)


def _bound(dtype, logits):
    steps = 2 * LAYERS + 1
    rel = 4 * steps * _gamma(INTER) if dtype == torch.float32 else 2 * steps * 2.0 ** -8
    return rel * float(logits.abs().max())


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN,
                                      intermediate_size=INTER, num_hidden_layers=LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128)
    return transformers.LlamaForCausalLM(config).eval()


def _models(llama, dtype):
    """The model in ``dtype`` and ours over it (NF4 + DQ, adapters with a real update)."""
    dense = copy.deepcopy(llama).to(dtype)
    ours = qlora_ref.prepare_model(copy.deepcopy(dense), r=4, compute_dtype=dtype).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for module in ours.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(std=0.05)  # B = 0 would hide the adapter branch
    return {"dense": dense, "ours": ours}


def _compare(reference_tokens, reference_logits, tokens, logits, prompt, dtype):
    """Tokens equal where the margin allows, logits within the bound on the common prefix."""
    steps = reference_tokens.shape[1] - prompt
    compared = 0
    for i in range(steps):
        bound = _bound(dtype, reference_logits[:, i])
        err = (logits[:, i].double() - reference_logits[:, i].double()).abs().max()
        assert err <= bound, f"step {i}: logits off by {err:.3g}, over the bound {bound:.3g}"
        top2 = reference_logits[:, i].topk(2, dim=-1).values
        sure = (top2[:, 0] - top2[:, 1]) > 2 * bound                      # (batch,)
        same = tokens[:, prompt + i] == reference_tokens[:, prompt + i]
        assert torch.all(same | ~sure), f"step {i}: a greedy token differs with a clear margin"
        compared += 1
        if not bool(same.all()):
            break  # the sequences diverge (on a near tie): nothing after is comparable
    assert compared >= 1


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["dense", "ours"])
def test_greedy_tokens_and_logits_equal_transformers(llama, dtype, which):
    model = _models(llama, dtype)[which]
    torch.manual_seed(2)
    prompt = 40  # over Linear4bit.FUSED_MAX_ROWS: the prefill takes the dequantize path
    ids = torch.randint(0, VOCAB, (1, prompt))
    decoder = LlamaDecoder(model)
    if which == "ours":
        assert {decoder.layers[0].qkv.way, decoder.layers[0].gate_up.way} == {"fused4"}
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                  pad_token_id=0)
        tokens, logits = decoder.generate(ids, 8, return_logits=True)
        forward = model(tokens).logits[:, prompt - 1:-1].float()          # (1, 8, vocab)
    assert tokens.shape == expected.shape and torch.equal(tokens[:, :prompt], ids)
    _compare(expected, forward, tokens, torch.stack(logits, 1), prompt, dtype)


@needs_kernel
@pytest.mark.parametrize("which", ["dense", "ours"])
def test_padded_batch_equals_transformers_generate(llama, which):
    model = _models(llama, torch.float32)[which]
    torch.manual_seed(3)
    ids = torch.randint(1, VOCAB, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :5] = mask[2, :2] = 0              # left padding, as generate expects
    ids[mask == 0] = 0
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                  min_new_tokens=6, do_sample=False, pad_token_id=0,
                                  output_logits=True, return_dict_in_generate=True)
        tokens, logits = LlamaDecoder(model).generate(ids, 6, attention_mask=mask,
                                                      return_logits=True)
    _compare(expected.sequences, torch.stack(expected.logits, 1).float(), tokens,
             torch.stack(logits, 1), 12, torch.float32)


@needs_kernel
def test_one_kernel_call_gives_the_bytes_of_the_layers_own_lean_path(llama):
    """q, k, v through one gemv on concatenated codes: byte-equal per row to each layer's _decode.

    With B = 0 the adapters add exact zeros, so the outputs are the kernel's
    and its sums run in the same order row by row; with B != 0 the stacked
    adapter update differs from the per-layer one only in float32 sum order.
    """
    ours = _models(llama, torch.float32)["ours"]
    attn = ours.model.layers[1].self_attn
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    x = torch.randn(3, HIDDEN)
    with torch.no_grad():
        joined = Projection(layers)
        assert joined.way == "fused4"
        per_layer = torch.cat([m._decode(x) for m in layers], dim=-1)
        got = joined(x)
        magnitude = torch.cat([(x.abs() @ m.base_layer.dequantize(torch.float32).abs().T)
                               + m.scaling * (x.abs() @ m.lora_A.abs().T) @ m.lora_B.abs().T
                               for m in layers], dim=-1)
        bound = 2 * _gamma(HIDDEN + 8) * magnitude
        assert torch.all((got - per_layer).abs() <= bound)
        for m in layers:
            m.lora_B.zero_()
        assert torch.equal(Projection(layers)(x), torch.cat([m._decode(x) for m in layers], -1))


@needs_kernel
def test_held_buffers_give_the_same_bytes(llama):
    """``reuse=True`` (held output and adapter buffers) changes no byte."""
    ours = _models(llama, torch.float32)["ours"]
    mlp = ours.model.layers[0].mlp
    x = torch.randn(3, HIDDEN)
    with torch.no_grad():
        joined = Projection([mlp.gate_proj, mlp.up_proj])
        fresh = joined(x).clone()
        held = joined(x, reuse=True)
        assert torch.equal(held, fresh)
        again = joined(2 * x, reuse=True)
        assert again.data_ptr() == held.data_ptr()            # the buffer is the projection's
        assert torch.equal(again, joined(2 * x))


@needs_kernel
def test_a_prompt_joins_base_and_adapter_in_one_matmul_within_the_float32_bound(llama):
    """Over FUSED_MAX_ROWS rows: ``[Y | H] = X [W; A]^T``, ``Y + s H B^T``, against float64."""
    ours = _models(llama, torch.float32)["ours"]
    attn = ours.model.layers[0].self_attn
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    rows = qlora_ref.nn.Linear4bit.FUSED_MAX_ROWS + 8
    x = torch.randn(rows, HIDDEN)
    with torch.no_grad():
        got = Projection(layers)(x)
        x64 = x.double()
        parts, magnitude = [], []
        for m in layers:
            w = m.base_layer.dequantize(torch.float32).double()
            a, b = m.lora_A.double(), m.lora_B.double()
            parts.append(x64 @ w.T + m.scaling * (x64 @ a.T) @ b.T)
            magnitude.append(x64.abs() @ w.abs().T
                             + m.scaling * (x64.abs() @ a.abs().T) @ b.abs().T)
        expected, magnitude = torch.cat(parts, -1), torch.cat(magnitude, -1)
    bound = 2 * _gamma(HIDDEN + 4) * magnitude
    err = (got.double() - expected).abs()
    assert torch.all(err <= bound), f"off by {(err - bound).max():.3g} over the bound"


@needs_kernel
def test_the_layers_decode_sees_adapters_changed_in_place_or_replaced(llama):
    """``LoRALinear._decode`` keeps float32 views of A and B; a step, a copy or a new parameter is seen."""
    layer = _models(llama, torch.float32)["ours"].model.layers[0].self_attn.q_proj
    x = torch.randn(2, HIDDEN)
    with torch.no_grad():
        before = layer(x)
        layer.lora_B.add_(0.5)                                 # an optimizer step: in place
        stepped = layer(x)
        assert not torch.equal(stepped, before)
        assert torch.equal(stepped, copy.deepcopy(layer)(x))  # a copy makes its own views
        layer.lora_A = torch.nn.Parameter(torch.randn_like(layer.lora_A))
        replaced = layer(x)
        assert not torch.equal(replaced, stepped)
        assert torch.equal(replaced, copy.deepcopy(layer)(x))
        for p in (layer.lora_A, layer.lora_B):                 # 16-bit adapters: float32 copies
            p.data = p.data.to(torch.bfloat16)
        cast = layer(x)
        layer.lora_B.mul_(2)                                   # the copy must be remade
        doubled = layer(x)
        assert not torch.equal(doubled, cast)
        assert torch.equal(doubled, copy.deepcopy(layer)(x))


@needs_kernel
@pytest.mark.parametrize("token_kernels", [False, True])
def test_decoding_steps_run_torch_on_one_thread_and_give_the_threads_back(llama, monkeypatch,
                                                                         token_kernels):
    """Steps of a few rows through the torch lines set torch to 1 thread; a prompt, a step of
    the step kernels (torch runs only the head there) and the caller keep theirs."""
    ours = _models(llama, torch.float32)["ours"]
    decoder = LlamaDecoder(ours)
    decoder.token_kernels = token_kernels
    assert decoder.kernel_heavy and not LlamaDecoder(llama).kernel_heavy
    seen, forward, token = [], decoder._forward, decoder._forward_token

    def spy(ids, *args):
        seen.append((ids.numel(), torch.get_num_threads()))
        return forward(ids, *args)

    def token_spy(*args):  # one sequence's new tokens: the step kernels (test_decode_step.py)
        seen.append(("token", torch.get_num_threads()))
        return token(*args)

    monkeypatch.setattr(decoder, "_forward", spy)
    monkeypatch.setattr(decoder, "_forward_token", token_spy)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with torch.no_grad():
            decoder.generate(torch.randint(0, VOCAB, (1, 40)), 3)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert after == 3
    steps = [("token", 3)] * 2 if token_kernels else [(1, 1)] * 2
    assert seen == [(40, 3)] + steps


@needs_kernel
def test_the_decoder_stops_at_eos_as_generate_does(llama):
    model = _models(llama, torch.float32)["ours"]
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        free = lean_generate(model, ids, 6)
        eos = int(free[0, 8])                   # the third new token of row 0 becomes "eos"
        expected = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=eos,
                                  pad_token_id=0)
        got = lean_generate(model, ids, 6, eos_token_id=eos, pad_token_id=0)
        several = lean_generate(model, ids, 6, eos_token_id=[VOCAB + 5, eos], pad_token_id=0)
    assert torch.equal(got, expected) and torch.equal(several, expected)


def test_models_it_does_not_compute_are_named_not_guessed(llama):
    assert unsupported_reason(llama) is None
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2,
                                                               vocab_size=64, n_positions=16))
    assert "gpt2" in unsupported_reason(gpt2)
    gelu = copy.deepcopy(llama)
    gelu.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act"):
        LlamaDecoder(gelu)


def test_the_nf4_head_is_a_quarter_of_the_bfloat16_bytes(llama):
    model = copy.deepcopy(llama).to(torch.bfloat16)
    nf4 = LlamaDecoder(model, head="nf4").head
    if nf4.way != "fused4":
        pytest.skip("the fused kernel is not available here (extension or CPU)")
    weight = model.lm_head.weight
    assert nf4.plan.packed.nbytes * 4 == weight.numel() * weight.element_size()


def test_bad_arguments_are_one_clear_error(llama):
    decoder = LlamaDecoder(llama)
    with pytest.raises(ValueError, match="input_ids"):
        decoder.generate(torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate(torch.zeros(1, 4, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        decoder.generate(torch.zeros(1, 100, dtype=torch.long), 40)
    with pytest.raises(ValueError, match="token ids"):
        decoder.generate(torch.full((1, 4), VOCAB), 2)
    with pytest.raises(ValueError, match="head"):
        LlamaDecoder(llama, head="fp8")
    with pytest.raises(ValueError, match="attention_mask"):
        decoder.generate(torch.zeros(1, 4, dtype=torch.long), 2,
                         attention_mask=torch.tensor([[1, 1, 1]]))


@needs_kernel
def test_smollm2_greedy_tokens_equal_generate(smollm2_dir):
    """A few tokens of the real model, ours in bfloat16: the decoder against ``model.generate``."""
    folder = smollm2_dir
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ours = qlora_ref.prepare_model(copy.deepcopy(bf16), r=16, compute_dtype=torch.bfloat16).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The sky is blue because", return_tensors="pt")["input_ids"]
    for model in (ours, bf16):
        with torch.no_grad():
            expected = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                      output_logits=True, return_dict_in_generate=True)
            tokens, logits = LlamaDecoder(model).generate(ids, 4, return_logits=True)
        # 30 blocks: the bfloat16 budget of the module docstring with L = 30
        reference = torch.stack(expected.logits, 1).float()
        bound = 2 * (2 * 30 + 1) * 2.0 ** -8 * float(reference.abs().max())
        err = (torch.stack(logits, 1)[:, 0] - reference[:, 0]).abs().max()
        assert err <= bound, f"first new token: logits off by {err:.3g} (bound {bound:.3g})"
        top2 = reference[0, 0].topk(2).values
        if top2[0] - top2[1] > 2 * bound:
            assert tokens[0, ids.shape[1]] == expected.sequences[0, ids.shape[1]]
        assert tokens.shape == expected.sequences.shape


def test_the_benchmark_counts_the_bytes_the_decoder_reads(llama):
    """``bench --generate --model``: the lean rows' bytes per token are the codes, float32 constants, adapters and head."""
    from qlora_ref.bench.generate import _lean_bytes, _padded_prompts

    ours = _models(llama, torch.float32)["ours"]
    decoder = LlamaDecoder(ours)
    if decoder.layers[0].qkv.way != "fused4":
        pytest.skip("the fused kernel is not available here (extension or CPU)")
    fourbit = [m for m in ours.modules() if isinstance(m, qlora_ref.nn.Linear4bit)]
    expected = sum(m.packed.numel() + 4 * m.absmax.numel() for m in fourbit)  # float32 absmax
    expected += ours.lm_head.weight.numel() * 4                               # float32 head
    expected += sum(4 * (m.lora_A.numel() + m.lora_B.numel())                 # float32 adapters
                    for m in ours.modules() if isinstance(m, LoRALinear))
    assert _lean_bytes(decoder) == expected
    ids, mask = _padded_prompts(torch.arange(1, 10)[None], (3, 5), pad_token_id=0)
    assert ids.tolist() == [[0, 0, 1, 2, 3], [1, 2, 3, 4, 5]]
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
