"""Specification of the saved 4-bit model (:mod:`qlora_ref.nn.saved4bit`).

* saved and loaded, a model computes exactly what the model quantized in
  memory computed (the same codes: nothing is quantized on load), with or
  without an adapter, and byte-equal to the float folder + adapter path that
  ``generate`` used before (:func:`qlora_ref.load_adapter` over the float model);
* the folder is bitsandbytes' own: ``AutoModelForCausalLM.from_pretrained``
  with bitsandbytes loads it, and bitsandbytes' ``dequantize_4bit`` of its
  layers equals our dequantized weights byte for byte;
* what is read is checked: a tampered shape or dtype, a format that
  disagrees with config.json, a missing or extra tensor, a FIFO or a
  symlink in place of a file are each one ``ValueError`` line, and a FIFO
  never blocks (``signal.alarm``);
* the writer refuses INT4 (not a bitsandbytes type), a model with LoRA
  layers, a non-empty folder without ``overwrite`` and, even with it, a
  folder that is not a saved 4-bit model;
* an adapter trained on another base format is refused;
* on the real model (the ``real`` extra; skipped without it unless
  ``QLORA_REF_REQUIRE_REAL_MODEL=1``) the loaded logits equal those of the
  model prepared from the float folder, byte for byte.
"""
import copy
import json
import os
import signal

import pytest
import torch

from qlora_ref.codebooks import code_for
from qlora_ref.nn import LoRALinear, Linear4bit, load_adapter, prepare_model, save_adapter
from qlora_ref.nn.saved4bit import (attach_adapter, is_quantized_folder, load_quantized,
                                    quantize_model, save_quantized)
from tests import helpers
from tests.helpers import randomize_adapters, tiny_gpt2, tiny_llama, tokens

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

R = 4


def logits(model, x=None):
    return helpers.logits(model, tokens() if x is None else x)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(in-memory quantized tiny Llama with tied embeddings, its saved folder)."""
    model = quantize_model(tiny_llama(tie=True))
    folder = save_quantized(model, tmp_path_factory.mktemp("saved") / "nf4")
    return model, folder


def rewrite(src, dst, change):
    """A copy of the saved folder ``src`` in ``dst`` with its tensors passed through ``change(dict)``."""
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    tensors = safetensors_torch.load_file(str(src / "model.safetensors"))
    change(tensors)
    safetensors_torch.save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# -- round trip ------------------------------------------------------------------------------

@pytest.mark.parametrize("setting", [dict(), dict(quant_type="fp4", double_quant=False),
                                     dict(blocksize=128)], ids=["nf4-dq", "fp4", "blocksize128"])
@pytest.mark.parametrize("make", [tiny_llama, lambda: tiny_llama(tie=True), tiny_gpt2],
                         ids=["llama", "llama-tied", "gpt2"])
def test_a_saved_model_loads_to_the_same_codes_and_logits(make, setting, tmp_path):
    model = quantize_model(make(), **setting)
    save_quantized(model, tmp_path / "m")
    assert is_quantized_folder(tmp_path / "m")
    loaded = load_quantized(tmp_path / "m")
    ours = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    theirs = {n: m for n, m in loaded.named_modules() if isinstance(m, Linear4bit)}
    assert sorted(ours) == sorted(theirs) and ours
    for name, layer in ours.items():
        for buf in ("packed", "absmax", "nested_absmax", "offset", "code"):
            a, b = getattr(layer, buf), getattr(theirs[name], buf)
            assert (a is None and b is None) or torch.equal(a, b), (name, buf)
    assert torch.equal(logits(loaded), logits(model))
    assert not any(p.device.type == "meta" for p in loaded.parameters())


def test_the_codes_are_those_prepare_model_writes_and_an_adapter_gives_the_float_paths_logits(
        tmp_path):
    """``generate --model FLOAT --adapter A`` quantized at every start; the saved base is byte-equal."""
    prepared = randomize_adapters(prepare_model(tiny_llama(), r=R, lora_alpha=8), 0.1)
    save_adapter(prepared, tmp_path / "adapter")
    save_quantized(quantize_model(tiny_llama()), tmp_path / "base")
    # the float path of generate: the float model, the adapter's recorded base rebuilt, float32 matmuls
    expected = logits(load_adapter(tiny_llama(), tmp_path / "adapter", compute_dtype=torch.float32))
    loaded = load_quantized(tmp_path / "base", compute_dtype=torch.float32,
                            adapter=tmp_path / "adapter")
    assert sum(isinstance(m, LoRALinear) for m in loaded.modules()) == 14
    assert torch.equal(logits(loaded), expected)
    assert torch.equal(logits(loaded), logits(prepared))


def test_an_adapter_of_another_base_format_is_refused(tmp_path, saved):
    _, folder = saved
    save_adapter(prepare_model(tiny_llama(tie=True), r=R, quant_type="fp4"), tmp_path / "fp4")
    with pytest.raises(ValueError, match="trained on a base stored as .*fp4.*another base"):
        attach_adapter(load_quantized(folder), tmp_path / "fp4")


# -- transformers + bitsandbytes open the folder ------------------------------------------------

@pytest.mark.parametrize("make", [tiny_llama, lambda: tiny_llama(tie=True), tiny_gpt2],
                         ids=["llama", "llama-tied", "gpt2"])
def test_transformers_and_bitsandbytes_load_it_and_dequantize_to_our_weights(make, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    model = quantize_model(make())
    save_quantized(model, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    theirs.train()  # keeps bitsandbytes from repacking for its CPU kernel (interop module note)
    ours = load_quantized(tmp_path)
    layers = {n: m for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert sorted(layers) == sorted(n for n, m in ours.named_modules() if isinstance(m, Linear4bit))
    for name, layer in layers.items():
        w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert w.dtype == torch.float32
        assert torch.equal(w, ours.get_submodule(name).dequantize(torch.float32)), name
    for name, p in theirs.named_parameters():  # embeddings, norms, biases, the float head
        if not isinstance(theirs.get_submodule(name.rpartition(".")[0]), bnb.nn.Linear4bit) \
                or name.endswith("bias"):
            assert torch.equal(p.data, ours.get_parameter(name).data), name


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_folder_transformers_and_bitsandbytes_saved_loads_here_with_their_codes(tie, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    tiny_llama(tie=tie).save_pretrained(tmp_path / "float")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "float", device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)).train()
    theirs.save_pretrained(tmp_path / "bnb")
    ours = load_quantized(tmp_path / "bnb")
    layers = {n: m for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 14
    for name, layer in layers.items():
        w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(w, ours.get_submodule(name).dequantize(torch.float32)), name


# -- what is read is checked --------------------------------------------------------------------

Q = "model.layers.0.self_attn.q_proj.weight"


def _packed_halved(t):
    t[Q] = t[Q][: t[Q].shape[0] // 2].clone()


def _packed_reshaped(t):
    t[Q] = t[Q].reshape(-1, 2).clone()


def _absmax_float(t):
    t[Q + ".absmax"] = t[Q + ".absmax"].float()


def _norm_shape(t):
    t["model.norm.weight"] = torch.ones(65)


def _norm_int(t):
    t["model.norm.weight"] = torch.ones(64, dtype=torch.int32)


def _missing(t):
    del t["model.norm.weight"]


def _extra(t):
    t["model.bogus"] = torch.zeros(2)


def _fp4_meta(t):
    key = Q + ".quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(t.pop(key).tolist()))
    meta["quant_type"] = "fp4"
    t[Q + ".quant_state.bitsandbytes__fp4"] = torch.tensor(list(json.dumps(meta).encode()),
                                                           dtype=torch.uint8)
    t[Q + ".quant_map"] = torch.tensor(code_for("fp4"))  # a consistent fp4 layer


def _wrong_layer_shape(t):
    key = Q + ".quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(t[key].tolist()))
    meta["shape"] = [32, 128]  # the same number of weights, another shape
    t[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


TAMPERED = {
    "packed halved": (_packed_halved, r"q_proj.*packed has \d+ values of uint8, but shape"),
    "packed reshaped": (_packed_reshaped, r"q_proj.weight' has shape \(\d+, 2\), expected \(\d+, 1\)"),
    "absmax float32": (_absmax_float, r"q_proj.*absmax must be a uint8 tensor, got torch.float32"),
    "norm shape": (_norm_shape, r"'model.norm.weight' is float32 \(65,\); the model needs .* \(64,\)"),
    "norm int": (_norm_int, r"'model.norm.weight' is int32 \(64,\); the model needs a floating"),
    "missing": (_missing, r"has no tensor 'model.norm.weight'"),
    "extra": (_extra, r"unexpected tensor 'model.bogus'"),
    "fp4 in an nf4 config": (_fp4_meta, r"q_proj' is stored as quant_type='fp4'.*config.json says 'nf4'"),
    "layer shape": (_wrong_layer_shape, r"q_proj' holds a weight of shape \(32, 128\); the model's "
                                        r"layer is \(64, 64\)"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_file_is_one_line_naming_the_tensor(case, saved, tmp_path):
    change, message = TAMPERED[case]
    folder = rewrite(saved[1], tmp_path / "t", change)
    with pytest.raises(ValueError, match=message) as info:
        load_quantized(folder)
    assert "\n" not in str(info.value)


def test_a_fifo_in_place_of_the_weights_is_refused_without_blocking(saved, tmp_path):
    folder = tmp_path / "fifo"
    folder.mkdir()
    (folder / "config.json").write_bytes((saved[1] / "config.json").read_bytes())
    os.mkfifo(folder / "model.safetensors")
    old = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("reading the FIFO blocked"))
    signal.alarm(10)
    try:
        with pytest.raises(ValueError, match="model.safetensors is a FIFO .*not a regular file"):
            load_quantized(folder)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("what", ["model.safetensors", "config.json", "folder"])
def test_a_symlink_out_of_the_folder_is_refused(what, saved, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for p in saved[1].iterdir():
        (outside / p.name).write_bytes(p.read_bytes())
    if what == "folder":
        (tmp_path / "link").symlink_to(outside, target_is_directory=True)
        folder = tmp_path / "link"
    else:
        folder = tmp_path / "m"
        folder.mkdir()
        for p in outside.iterdir():
            if p.name == what:
                (folder / p.name).symlink_to(p)
            else:
                (folder / p.name).write_bytes(p.read_bytes())
    with pytest.raises(ValueError, match="symlink") as info:
        load_quantized(folder)
    assert "\n" not in str(info.value)


def test_a_float_folder_is_not_a_saved_4bit_model(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    assert not is_quantized_folder(tmp_path)
    with pytest.raises(ValueError, match="no 4-bit bitsandbytes quantization_config"):
        load_quantized(tmp_path)


# -- what the writer refuses --------------------------------------------------------------------

def test_the_writer_refuses_int4_lora_layers_and_folders_it_must_not_replace(saved, tmp_path):
    with pytest.raises(ValueError, match="int4 is not a bitsandbytes type"):
        save_quantized(quantize_model(tiny_llama(), quant_type="int4"), tmp_path / "int4")
    with pytest.raises(ValueError, match="has LoRALinear layers"):
        save_quantized(prepare_model(tiny_llama(), r=R), tmp_path / "lora")
    assert not (tmp_path / "int4").exists() and not (tmp_path / "lora").exists()
    model, folder = saved
    target = tmp_path / "again"
    save_quantized(model, target)
    before = (target / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="is not empty; pass --overwrite"):
        save_quantized(quantize_model(tiny_llama(seed=3, tie=True)), target)
    assert (target / "model.safetensors").read_bytes() == before
    save_quantized(quantize_model(tiny_llama(seed=3, tie=True)), target, overwrite=True)
    assert (target / "model.safetensors").read_bytes() != before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not a saved 4-bit model; refusing to replace it"):
        save_quantized(model, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"
    # two saves of one model are the same bytes (the header is written in one order)
    save_quantized(model, tmp_path / "twice")
    assert (tmp_path / "twice" / "model.safetensors").read_bytes() == \
        (folder / "model.safetensors").read_bytes()


# -- the real model -------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_real_model_saved_in_4_bits_gives_the_prepared_models_logits(tmp_path, smollm2_dir):
    """SmolLM2-135M: the saved base + an adapter computes what prepare_model on the float folder did."""
    from qlora_ref.train.hf_finetune import load_pretrained

    model, tokenizer = load_pretrained(smollm2_dir)
    prepared = randomize_adapters(prepare_model(copy.deepcopy(model), r=8), 0.02)
    save_adapter(prepared, tmp_path / "adapter")
    save_quantized(quantize_model(model), tmp_path / "smollm2-4bit", tokenizer=tokenizer)
    del model
    loaded = load_quantized(tmp_path / "smollm2-4bit", adapter=tmp_path / "adapter")
    assert sum(isinstance(m, LoRALinear) for m in loaded.modules()) == 210
    x = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    assert torch.equal(logits(loaded, x), logits(prepared, x))
