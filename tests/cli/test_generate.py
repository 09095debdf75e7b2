"""``qlora-ref quantize --model DIR --save OUT`` and ``qlora-ref generate --model OUT [--adapter A]``;
the lean decoder against transformers' ``generate`` through the command line.

The model is a tiny random Llama with a word-level tokenizer, saved as a
Hugging Face folder. The oracles: the saved model continues a prompt as the
same model quantized in memory does (the same codes), and with an adapter as
``generate --model FLOAT --adapter A`` does (which quantizes at every start);
bad input is one line and exit status 2.
"""
import json

import pytest

from qlora_ref.nn import prepare_model, save_adapter
from qlora_ref.nn.saved4bit import is_quantized_folder, quantize_model
from tests.helpers import cli, one_line, randomize_adapters, save_tiny_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

PROMPT = "review : great product ->"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny float32 Llama (2 layers, width 64) and its word-level tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def saved_dir(model_dir, tmp_path_factory):
    from qlora_ref.cli import main

    out = tmp_path_factory.mktemp("saved") / "tiny-4bit"
    assert main(["quantize", "--model", str(model_dir), "--save", str(out), "--quiet"]) == 0
    return out


def generate(capsys, *args):
    code, out, err = cli(capsys, "generate", "--prompt", PROMPT, "--max-new-tokens", "6",
                         "--device", "cpu", *args)
    assert code == 0, err
    return out


def test_quantize_saves_a_folder_generate_continues_as_the_model_quantized_in_memory(
        capsys, model_dir, saved_dir):
    from qlora_ref.train.hf_finetune import complete, load_pretrained

    assert is_quantized_folder(saved_dir)
    config = json.loads((saved_dir / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert (saved_dir / "tokenizer.json").is_file()
    model, tokenizer = load_pretrained(model_dir)
    expected = complete(quantize_model(model), tokenizer, PROMPT, 6) + "\n"
    assert generate(capsys, "--model", saved_dir) == expected


def test_an_adapter_on_the_saved_base_generates_what_the_float_base_path_generates(
        capsys, model_dir, saved_dir, tmp_path):
    from qlora_ref.train.hf_finetune import load_pretrained

    model, _ = load_pretrained(model_dir)
    prepared = randomize_adapters(prepare_model(model, r=4, lora_alpha=8), 0.5)
    save_adapter(prepared, tmp_path / "on-float", base_model_name_or_path=str(model_dir))
    save_adapter(prepared, tmp_path / "on-saved", base_model_name_or_path=str(saved_dir))
    float_path = generate(capsys, "--model", model_dir, "--adapter", tmp_path / "on-float")
    assert generate(capsys, "--model", saved_dir, "--adapter", tmp_path / "on-float") == float_path
    # --adapter alone: the base it records is the saved folder
    assert generate(capsys, "--adapter", tmp_path / "on-saved") == float_path
    assert generate(capsys, "--model", saved_dir) != float_path  # the adapter changes the text


def test_bad_requests_are_one_line_and_status_2(capsys, model_dir, saved_dir, tmp_path):
    cases = [
        (("quantize", "--model", model_dir), "needs both --model DIR and --save OUT"),
        (("quantize", "--model", model_dir, "--save", saved_dir), "is not empty; pass --overwrite"),
        (("quantize", "--model", model_dir, "--save", tmp_path / "x", "--quant-type", "int4"),
         "int4 is not a bitsandbytes type"),
        (("quantize", "--model", model_dir, "--save", tmp_path / "x", "--blocksize", "48"),
         "blocksize must be one of"),
        (("quantize", "--model", model_dir, "--save", tmp_path / "x", "--histogram", tmp_path / "h.png"),
         "--model takes no FILE, --key or --histogram"),
        (("quantize",), "quantize needs FILE"),
    ]
    for args, message in cases:
        code, _, err = cli(capsys, *args)
        assert code == 2 and message in one_line(err), (args, err)
    assert not (tmp_path / "x").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in saved_dir.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 15)
    code, _, err = cli(capsys, "generate", "--model", broken, "--prompt", PROMPT)
    assert code == 2 and "model.safetensors is not a readable safetensors file" in one_line(err)


def test_overwrite_replaces_a_saved_model(capsys, model_dir, saved_dir, tmp_path):
    out = tmp_path / "m"
    assert cli(capsys, "quantize", "--model", model_dir, "--save", out, "--quiet")[0] == 0
    code, stdout, err = cli(capsys, "quantize", "--model", model_dir, "--save", out,
                            "--quant-type", "fp4", "--overwrite")
    assert code == 0, err
    assert "fp4" in stdout
    assert json.loads((out / "config.json").read_text())["quantization_config"][
        "bnb_4bit_quant_type"] == "fp4"


def test_the_lean_decoder_continues_as_transformers_generate_does(capsys, model_dir, saved_dir,
                                                                   tmp_path, monkeypatch):
    """``--decoder lean`` (the default) and ``--decoder transformers`` print the same text for a
    float model, a saved 4-bit model and a float base with an adapter, and lean really ran."""
    from qlora_ref.nn import decode
    from qlora_ref.train.hf_finetune import load_pretrained

    model, _ = load_pretrained(model_dir)
    prepared = randomize_adapters(prepare_model(model, r=4, lora_alpha=8), 0.5)
    save_adapter(prepared, tmp_path / "adapter", base_model_name_or_path=str(model_dir))
    calls = []
    real = decode.LlamaDecoder.generate

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(decode.LlamaDecoder, "generate", counted)
    for model_args in (["--model", model_dir], ["--model", saved_dir],
                       ["--model", model_dir, "--adapter", tmp_path / "adapter"]):
        before = len(calls)
        lean = generate(capsys, *model_args)
        assert len(calls) == before + 1, f"{model_args}: the lean decoder did not run"
        assert generate(capsys, *model_args, "--decoder", "transformers") == lean, model_args
        assert len(calls) == before + 1
