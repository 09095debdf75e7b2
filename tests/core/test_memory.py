"""Specification of qlora_ref.memory: bits per parameter, tensor bytes, fine-tuning footprints.

Figures from Dettmers et al. (2023), QLoRA: 0.5 -> 0.127 bits of constants
(0.373 saved) in "Double Quantization"; ">780 GB" for 16-bit fine-tuning of a
65B model and "a single 48GB GPU" for QLoRA of the same model. Activations
(batch size, sequence length, gradient checkpointing) as in the paper's Figure 6.
"""
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlora_ref.memory import (
    LLAMA_65B, LLAMA_SHAPES, DecoderShape, activation_memory, bits_per_param, finetune_memory,
    format_bytes, generic_lora_param_count, lora_param_count, memory_table, quantized_nbytes,
)

powers_of_two = st.integers(0, 12).map(lambda e: 2**e)
blockwise_bits = st.sampled_from([4, 8])

# LLaMA-65B counted from its shapes (vocab 32000): 80 layers of attention, MLP and
# two RMSNorms, plus input embedding, output head and the final norm.
LLAMA_65B_N_PARAMS = 80 * (4 * 8192**2 + 3 * 8192 * 22016 + 2 * 8192) + 2 * 32000 * 8192 + 8192
# r = 64 on q, k, v, o (8192 -> 8192) and gate, up, down (8192 <-> 22016), 80 layers.
LLAMA_65B_LORA = 80 * (4 * 64 * (8192 + 8192) + 3 * 64 * (8192 + 22016))


# ----------------------------------------------------------------------------- bits_per_param
def test_float32_absmax_per_64_weights_costs_half_a_bit():
    assert bits_per_param(bits=4, blocksize=64, double_quant=False) == 4.5


def test_double_quantization_at_blocksize_64_costs_4_127_bits():
    bpp = bits_per_param(bits=4, blocksize=64, double_quant=True, nested_blocksize=256)
    assert bpp == 4 + 8 / 64 + 32 / (64 * 256) == 4.126953125
    assert round(bpp, 3) == 4.127


def test_double_quantization_saves_the_papers_0_373_bits():
    saved = bits_per_param(double_quant=False) - bits_per_param(double_quant=True)
    assert saved == 0.373046875
    assert round(saved, 3) == 0.373


def test_blockwise_8_bit_pays_the_same_constants_as_4_bit():
    assert bits_per_param(bits=8, blocksize=4096, double_quant=False) == 8 + 32 / 4096
    assert bits_per_param(bits=8) - bits_per_param(bits=4) == 4


@pytest.mark.parametrize("bits", [16, 32])
@pytest.mark.parametrize("double_quant", [True, False])
def test_plain_floats_have_no_quantization_constants(bits, double_quant):
    assert bits_per_param(bits=bits, double_quant=double_quant) == bits


@given(bits=blockwise_bits, blocksize=powers_of_two, nested=powers_of_two, double_quant=st.booleans())
def test_larger_blocks_cost_fewer_bits(bits, blocksize, nested, double_quant):
    small = bits_per_param(bits, blocksize, double_quant, nested)
    assert bits_per_param(bits, 2 * blocksize, double_quant, nested) < small
    if double_quant:
        assert bits_per_param(bits, blocksize, double_quant, 2 * nested) < small
    assert small > bits  # constants never come for free


@given(bits=blockwise_bits, blocksize=powers_of_two, nested=powers_of_two.filter(lambda b: b >= 2))
def test_double_quantization_saves_bits_once_nested_blocks_hold_two_absmax(bits, blocksize, nested):
    # 8/B1 + 32/(B1 B2) < 32/B1  <=>  B2 > 4/3
    assert bits_per_param(bits, blocksize, True, nested) < bits_per_param(bits, blocksize, False, nested)


# ----------------------------------------------------------------------------- quantized_nbytes
def layout_nbytes(n, bits, blocksize, double_quant, nested_blocksize):
    """Build bitsandbytes' arrays for n elements with NumPy and add up their .nbytes."""
    x = np.linspace(-1.0, 1.0, n, dtype=np.float32)
    codes = np.zeros(n + n % 2 if bits == 4 else n, dtype=np.uint8)
    if bits == 4:
        codes = (codes[0::2] << 4) | codes[1::2]  # (ceil(n/2),) two nibbles per byte
    absmax = np.maximum.reduceat(np.abs(x), np.arange(0, n, blocksize))  # (n_blocks,) float32
    arrays = [codes, absmax]
    if double_quant:
        offset = np.float32(absmax.mean())
        nested = np.maximum.reduceat(np.abs(absmax - offset), np.arange(0, absmax.size, nested_blocksize))
        arrays = [codes, absmax.astype(np.uint8), nested, np.array([offset])]  # uint8 absmax, float32 rest
    return sum(a.nbytes for a in arrays)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300_000), bits=blockwise_bits, blocksize=powers_of_two,
       nested=powers_of_two, double_quant=st.booleans())
def test_quantized_nbytes_equals_the_bytes_of_the_arrays(n, bits, blocksize, nested, double_quant):
    expected = layout_nbytes(n, bits, blocksize, double_quant, nested)
    got = quantized_nbytes(n, bits=bits, blocksize=blocksize, double_quant=double_quant,
                           nested_blocksize=nested)
    assert got == expected, f"n={n}: {got} bytes, arrays hold {expected}"


@given(bits=blockwise_bits, blocksize=powers_of_two, nested=powers_of_two,
       n_full_blocks=st.integers(1, 1000), double_quant=st.booleans())
def test_whole_blocks_cost_exactly_bits_per_param_plus_the_offset(bits, blocksize, nested,
                                                                  n_full_blocks, double_quant):
    n = n_full_blocks * blocksize * nested * 2  # no partial block at either level, even n
    nbytes = quantized_nbytes(n, bits, blocksize, double_quant, nested)
    offset_bits = 32 if double_quant else 0
    assert 8 * nbytes == bits_per_param(bits, blocksize, double_quant, nested) * n + offset_bits


@given(n=st.integers(1, 10**12))
def test_exact_bytes_exceed_bits_per_param_only_by_per_tensor_terms(n):
    slack = quantized_nbytes(n) - bits_per_param() * n / 8
    # bound: < 1 B of nibbles + 1 B uint8 absmax + 4 B float32 absmax, plus the 4 B offset
    assert 0 <= slack < 10, f"n={n}: {slack} bytes over bits_per_param, bound is 10"


def test_a_single_weight_still_pays_a_whole_byte_and_block():
    assert quantized_nbytes(1, double_quant=False) == 1 + 4  # half-empty byte + float32 absmax
    assert quantized_nbytes(1) == 1 + 1 + 4 + 4  # byte + uint8 absmax + float32 absmax + offset


def test_a_partial_block_is_its_own_block():
    assert quantized_nbytes(65, double_quant=False) == 33 + 2 * 4
    assert quantized_nbytes(64, double_quant=False) == 32 + 1 * 4


@pytest.mark.parametrize("bits", [16, 32])
def test_plain_floats_take_n_times_their_width(bits):
    assert quantized_nbytes(1001, bits=bits) == 1001 * bits // 8


# ----------------------------------------------------------------------------- LoRA size
def test_llama_65b_lora_r64_on_all_seven_projections():
    assert lora_param_count(**LLAMA_65B, r=64) == LLAMA_65B_LORA == 799_539_200


def test_lora_count_accepts_hugging_face_names_and_adds_up_per_projection():
    one_layer = dict(hidden_size=8, intermediate_size=20, n_layers=1, r=2)
    assert lora_param_count(**one_layer, projections=["q_proj", "v_proj"]) == 2 * 2 * (8 + 8)
    parts = sum(lora_param_count(**one_layer, projections=[p]) for p in "q k v o gate up down".split())
    assert lora_param_count(**one_layer) == parts == 4 * 2 * 16 + 3 * 2 * 28


def test_generic_lora_fallback_is_the_papers_0_2_percent():
    assert generic_lora_param_count(65e9) == 130_000_000
    assert finetune_memory(65e9, "qlora").lora_params == 130_000_000


# ----------------------------------------------------------------------------- footprints
def test_full_16_bit_finetuning_of_65b_is_the_papers_780_gb():
    table = finetune_memory(65e9, "full")
    assert table["weights"] == table["gradients"] == 2 * 65 * 10**9
    assert table["optimizer state"] == 8 * 65 * 10**9
    assert table.total_bytes == 780 * 10**9  # 12 bytes/param; the paper says ">780 GB"


@pytest.mark.parametrize("n_params", [65e9, LLAMA_65B_N_PARAMS])
def test_qlora_of_llama_65b_fits_a_48_gb_gpu(n_params):
    table = finetune_memory(n_params, "qlora", lora_params=lora_param_count(**LLAMA_65B))
    assert table.total_bytes < 48e9, f"{format_bytes(table.total_bytes)} is not below 48 GB"


def test_qlora_of_65b_term_by_term():
    table = finetune_memory(65e9, "qlora", lora_params=LLAMA_65B_LORA)
    assert dict(table.rows) == {
        "weights": 32_500_000_000 + 1_015_625_000 + 4 * 3_967_286 + 4,  # nibbles, uint8 absmax, fp32, offset
        "adapters (LoRA weights)": 2 * LLAMA_65B_LORA,
        "gradients": 2 * LLAMA_65B_LORA,
        "optimizer state": 8 * LLAMA_65B_LORA,
        "activations": 0,
    }
    assert table.total_bytes == 43_125_964_548


def test_lora_keeps_the_16_bit_base_and_trains_only_adapters():
    table = finetune_memory(65e9, "lora", lora_params=LLAMA_65B_LORA)
    assert table.total_bytes == 130 * 10**9 + 12 * LLAMA_65B_LORA


@given(n=st.integers(1, 10**12))
def test_qlora_differs_from_lora_only_in_the_quantized_base(n):
    lora, qlora = finetune_memory(n, "lora"), finetune_memory(n, "qlora")
    assert (lora["weights"], qlora["weights"]) == (2 * n, quantized_nbytes(n))
    assert [r for r in lora.rows if r[0] != "weights"] == [r for r in qlora.rows if r[0] != "weights"]


def test_activations_are_zero_unless_given_and_then_add_to_the_total():
    assert finetune_memory(10**9)["activations"] == 0
    with_acts = finetune_memory(10**9, activation_bytes=123)
    assert with_acts.total_bytes == finetune_memory(10**9).total_bytes + 123


def test_memory_table_puts_the_three_methods_side_by_side():
    both = memory_table(65e9, lora_params=LLAMA_65B_LORA, activation_bytes=7)
    assert [t.method for t in both.tables] == ["full", "lora", "qlora"]
    for method in ("full", "lora", "qlora"):
        alone = finetune_memory(65e9, method, activation_bytes=7,
                                lora_params=None if method == "full" else LLAMA_65B_LORA)
        assert both[method] == alone
    text = str(both)
    assert "780.00 GB" in text and "43.13 GB" in text


def test_table_prints_every_term_and_the_total():
    table = finetune_memory(65e9, "qlora", lora_params=LLAMA_65B_LORA)
    text = table.to_markdown()
    assert str(table) == text
    for term in ("weights", "adapters (LoRA weights)", "gradients", "optimizer state", "activations"):
        assert f"| {term} |" in text
    assert "| **total** | 43,125,964,548 | 43.13 |" in text


def test_format_bytes_uses_decimal_gb_and_binary_gib():
    assert format_bytes(780e9) == "780.00 GB"
    assert format_bytes(2**30, "GiB") == "1.00 GiB"


# ----------------------------------------------------------------------------- model shapes
def test_llama_65b_shape_agrees_with_the_lora_preset_and_the_parameter_count():
    shape = LLAMA_SHAPES["llama-65b"]
    assert shape.n_params == LLAMA_65B_N_PARAMS
    assert shape.lora_params(64) == lora_param_count(**LLAMA_65B, r=64) == LLAMA_65B_LORA


@pytest.mark.parametrize("name, billions", [("llama-7b", 6.7), ("llama-13b", 13.0),
                                            ("llama-33b", 32.5), ("llama-65b", 65.3)])
def test_llama_shapes_have_the_published_parameter_counts(name, billions):
    # Touvron et al. (2023) report 6.7B, 13.0B, 32.5B and 65.2B; the 65B count
    # from its shapes rounds to 65.3B (their table truncates).
    assert round(LLAMA_SHAPES[name].n_params / 1e9, 1) == billions


@pytest.mark.slow  # importing transformers takes seconds
def test_decoder_shape_params_match_transformers_llama():
    import transformers

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=88, num_hidden_layers=3,
                                      num_attention_heads=4, vocab_size=50, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    shape = DecoderShape(hidden_size=32, intermediate_size=88, n_layers=3, n_heads=4, vocab_size=50)
    assert shape.n_params == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- activations
TINY = DecoderShape(hidden_size=8, intermediate_size=16, n_layers=3, n_heads=2, vocab_size=10)
shapes = st.builds(DecoderShape, hidden_size=st.integers(1, 64).map(lambda k: 4 * k),
                   intermediate_size=st.integers(1, 512), n_layers=st.integers(1, 100),
                   n_heads=st.just(4), vocab_size=st.integers(1, 10**5))


def test_activations_by_hand_for_a_tiny_decoder():
    h, i, L, V, s, b, d = 8, 16, 3, 10, 5, 2, 2
    tokens = s * b
    # per layer: q/k/v input, o input, gate/up input, down input; 2 norm inputs;
    # Q, K, V; gate and up outputs
    layer = (h + h + h + i) + 2 * h + 3 * h + 2 * i
    full = activation_memory(TINY, seq_len=s, batch_size=b, dtype_bytes=d)
    assert full.total_bytes == tokens * d * (L * layer + h + V)
    ckpt = activation_memory(TINY, seq_len=s, batch_size=b, dtype_bytes=d, gradient_checkpointing=True)
    assert ckpt["checkpoints (layer inputs)"] == L * tokens * h * d
    assert ckpt["saved by the decoder layers"] == tokens * layer * d  # one layer at a time
    assert ckpt.total_bytes == tokens * d * (L * h + layer + h + V)
    linear = activation_memory(TINY, seq_len=s, batch_size=b, dtype_bytes=d, linear_inputs_only=True)
    assert linear.total_bytes == tokens * d * (L * (3 * h + i) + h)


@given(shape=shapes, seq_len=st.integers(1, 4096), batch_size=st.integers(1, 64),
       checkpointing=st.booleans(), linear=st.booleans(), dtype_bytes=st.sampled_from([2, 4]))
def test_activations_grow_linearly_in_batch_times_seq_len(shape, seq_len, batch_size, checkpointing,
                                                          linear, dtype_bytes):
    options = dict(gradient_checkpointing=checkpointing, linear_inputs_only=linear, dtype_bytes=dtype_bytes)
    one_token = activation_memory(shape, 1, 1, **options).total_bytes
    assert activation_memory(shape, seq_len, batch_size, **options).total_bytes == (
        seq_len * batch_size * one_token)
    assert activation_memory(shape, seq_len, batch_size, **options) == (
        activation_memory(shape, seq_len * batch_size, 1, **options))


@given(shape=shapes.filter(lambda s: s.n_layers >= 2), seq_len=st.integers(1, 4096),
       linear=st.booleans())
def test_gradient_checkpointing_reduces_activations_of_two_or_more_layers(shape, seq_len, linear):
    without = activation_memory(shape, seq_len, linear_inputs_only=linear).total_bytes
    with_ckpt = activation_memory(shape, seq_len, linear_inputs_only=linear,
                                  gradient_checkpointing=True).total_bytes
    assert with_ckpt < without


def test_checkpointing_a_single_layer_only_adds_its_input():
    one = DecoderShape(hidden_size=8, intermediate_size=16, n_layers=1, n_heads=2, vocab_size=10)
    without = activation_memory(one, 7).total_bytes
    assert activation_memory(one, 7, gradient_checkpointing=True).total_bytes == without + 7 * 8 * 2


def test_no_sequence_length_means_zero_activations_and_todays_table():
    assert activation_memory(TINY, None).total_bytes == 0
    llama = LLAMA_SHAPES["llama-65b"]
    plain = finetune_memory(llama.n_params, lora_params=LLAMA_65B_LORA)
    assert finetune_memory(llama.n_params, lora_params=LLAMA_65B_LORA, shape=llama) == plain
    assert plain["activations"] == 0


def test_finetune_memory_adds_the_estimate_to_every_method():
    llama = LLAMA_SHAPES["llama-7b"]
    acts = activation_memory(llama, 512, gradient_checkpointing=True).total_bytes
    table = memory_table(llama.n_params, lora_params=llama.lora_params(64), shape=llama,
                         seq_len=512, gradient_checkpointing=True)
    plain = memory_table(llama.n_params, lora_params=llama.lora_params(64))
    for method in ("full", "lora", "qlora"):
        assert table[method]["activations"] == acts
        assert table[method].total_bytes == plain[method].total_bytes + acts
    assert "1 layer recomputed at a time" in str(table["qlora"])


def test_qlora_of_llama_65b_with_the_papers_batch_still_fits_48_gb():
    llama = LLAMA_SHAPES["llama-65b"]
    table = finetune_memory(llama.n_params, lora_params=llama.lora_params(64), shape=llama,
                            seq_len=512, batch_size=1, gradient_checkpointing=True)
    assert table.total_bytes < 48e9, format_bytes(table.total_bytes)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("call, name", [
    (lambda: bits_per_param(blocksize=0), "blocksize"),
    (lambda: bits_per_param(blocksize=63), "blocksize"),
    (lambda: bits_per_param(blocksize=-64), "blocksize"),
    (lambda: bits_per_param(blocksize=64.5), "blocksize"),
    (lambda: bits_per_param(nested_blocksize=100), "nested_blocksize"),
    (lambda: bits_per_param(bits=3), "bits"),
    (lambda: bits_per_param(bits=4.0), "bits"),
    (lambda: bits_per_param(absmax_bits=12), "absmax_bits"),
    (lambda: bits_per_param(nested_absmax_bits=0), "nested_absmax_bits"),
    (lambda: quantized_nbytes(0), "n_params"),
    (lambda: quantized_nbytes(1.5), "n_params"),
    (lambda: quantized_nbytes(True), "n_params"),
    (lambda: finetune_memory(-1), "n_params"),
    (lambda: finetune_memory(10**9, "qlora4"), "method"),
    (lambda: finetune_memory(10**9, lora_params=-1), "lora_params"),
    (lambda: finetune_memory(10**9, "full", lora_params=10), "lora_params"),
    (lambda: finetune_memory(10**9, activation_bytes=-1), "activation_bytes"),
    (lambda: finetune_memory(10**9, blocksize=48), "blocksize"),
    (lambda: lora_param_count(**LLAMA_65B, r=0), "r"),
    (lambda: lora_param_count(**LLAMA_65B, projections=["qq"]), "projections"),
    (lambda: lora_param_count(**LLAMA_65B, projections=["q", "q_proj"]), "projections"),
    (lambda: lora_param_count(hidden_size=0, intermediate_size=1, n_layers=1), "hidden_size"),
    (lambda: generic_lora_param_count(10**9, fraction=0), "fraction"),
    (lambda: format_bytes(1, unit="gb"), "unit"),
    (lambda: activation_memory(TINY, 0), "seq_len"),
    (lambda: activation_memory(TINY, 512.5), "seq_len"),
    (lambda: activation_memory(TINY, 512, batch_size=0), "batch_size"),
    (lambda: activation_memory(TINY, 512, dtype_bytes=0), "dtype_bytes"),
    (lambda: activation_memory(LLAMA_65B, 512), "shape"),
    (lambda: finetune_memory(10**9, seq_len=512), "shape"),
    (lambda: finetune_memory(10**9, shape=TINY, seq_len=512, activation_bytes=5), "activation_bytes"),
    (lambda: DecoderShape(hidden_size=10, intermediate_size=1, n_layers=1, n_heads=3), "hidden_size"),
    (lambda: DecoderShape(hidden_size=8, intermediate_size=1, n_layers=0, n_heads=2), "n_layers"),
])
def test_invalid_inputs_raise_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=rf"^{name} "):
        call()


def test_memory_module_does_not_import_torch():
    code = "import sys, qlora_ref.memory; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0, "qlora_ref.memory imported torch"


@pytest.mark.parametrize("kv_heads, tied", [(2, True), (4, False), (1, False)])
def test_a_config_folder_counts_what_transformers_builds(tmp_path, kv_heads, tied):
    """``memory --model DIR``: grouped-query attention and tied embeddings counted as transformers
    builds them (parameters, and LoRA r=8 on all seven projections as prepare_model adds them)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qlora_ref.memory import shape_from_config

    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    shape = shape_from_config(tmp_path)
    assert shape.n_params == sum(p.numel() for p in model.parameters())
    kv = 64 * kv_heads // 4
    per_layer = 8 * ((64 + 64) * 2 + (64 + kv) * 2 + (64 + 96) * 2 + (96 + 64))
    assert shape.lora_params(8) == 3 * per_layer
