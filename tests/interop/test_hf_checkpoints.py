"""Specification of prepared models on disk, through transformers', safetensors' and bitsandbytes' own entry points.

* every value a prepared model saves is a tensor: ``save_pretrained`` and
  ``safetensors.torch.save_model`` work, for 4-, 8- and 16-bit bases and INT4;
* the recipe to reload (``prepare_model`` the same base with the same
  settings, then ``safetensors.torch.load_model``) gives exactly the saved
  model's logits, and strict loading still names a missing or extra key;
* ``transformers.Trainer`` writes checkpoints, ``save_model`` works, and
  resuming from a checkpoint ends with exactly the adapters of the
  uninterrupted run;
* the 4-bit base is stored as bitsandbytes stores it: with the adapters
  taken out, the model saved here loads with ``AutoModelForCausalLM`` (the
  ``quantization_config`` in config.json makes transformers use
  bitsandbytes) and gives our logits; a checkpoint bitsandbytes saved loads
  into a prepared model.
"""
import copy
import json

import pytest
import torch

from qlora_ref.nn import prepare_model
from qlora_ref.nn.model import replace_module
from tests.helpers import lora_layers, randomize_adapters, tiny_gpt2, tiny_llama, tokens

ADAPTER_SCALE = 0.1  # B ~ 0.1 * N(0, 1): trained-looking adapters (tests.helpers.randomize_adapters)

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytest.importorskip("bitsandbytes")

R, ALPHA = 4, 8
BNB_KW = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


SETTINGS = {"nf4": dict(), "fp4-no-dq": dict(quant_type="fp4", double_quant=False),
            "int4": dict(quant_type="int4"), "8bit": dict(quant_bits=8),
            "16bit": dict(quant_type=None)}


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_save_pretrained_and_save_model_write_tensors_that_reload_to_the_same_logits(
        setting, make, tmp_path):
    prepared = randomize_adapters(prepare_model(make(), r=R, lora_alpha=ALPHA, **SETTINGS[setting]),
                                  ADAPTER_SCALE)
    prepared.save_pretrained(tmp_path / "pretrained")
    safetensors_torch.save_model(prepared, str(tmp_path / "model.safetensors"))
    state = prepared.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    x = tokens()
    with torch.no_grad():
        expected = prepared(x).logits
    for file in (tmp_path / "pretrained" / "model.safetensors", tmp_path / "model.safetensors"):
        # the documented recipe: the same base, prepared with the same settings, then load
        fresh = prepare_model(make(seed=5), r=R, lora_alpha=ALPHA, **SETTINGS[setting])
        missing, unexpected = safetensors_torch.load_model(fresh, str(file))
        assert not missing and not unexpected, (missing, unexpected)
        with torch.no_grad():
            assert torch.equal(fresh(x).logits, expected), file


def test_strict_loading_names_missing_and_unexpected_base_entries():
    prepared = prepare_model(tiny_llama(), r=R)
    state = prepared.state_dict()
    key = "model.layers.0.self_attn.q_proj.base_layer.weight.absmax"
    del state[key]
    state["model.layers.0.self_attn.q_proj.base_layer.weight.bogus"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"q_proj.*lacks '.*q_proj.base_layer.weight.absmax'"):
        prepare_model(tiny_llama(), r=R).load_state_dict(state)
    state = prepared.state_dict()
    state["model.layers.0.self_attn.q_proj.base_layer.weight.bogus"] = torch.zeros(1)
    del state["model.layers.1.mlp.up_proj.base_layer.weight"]
    result = prepare_model(tiny_llama(), r=R).load_state_dict(state, strict=False)
    assert result.unexpected_keys == ["model.layers.0.self_attn.q_proj.base_layer.weight.bogus"]
    assert result.missing_keys == ["model.layers.1.mlp.up_proj.base_layer.weight"]
    with pytest.raises(RuntimeError, match="Unexpected key.*weight.bogus"):
        prepare_model(tiny_llama(), r=R).load_state_dict(state)


def test_a_state_dict_of_another_format_is_a_value_error_naming_the_layer():
    state = prepare_model(tiny_llama(), r=R, quant_type="nf4").state_dict()
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj'.*quant_type='nf4'"):
        prepare_model(tiny_llama(), r=R, quant_type="fp4").load_state_dict(state)
    state = prepare_model(tiny_llama(), r=R, quant_bits=8, blocksize=256).state_dict()
    with pytest.raises(ValueError, match="'model.layers.0.self_attn.q_proj'.*blocksize"):
        prepare_model(tiny_llama(), r=R, quant_bits=8, blocksize=128).load_state_dict(state)


# -- transformers.Trainer --------------------------------------------------------------------

class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=16, length=12):
        self.ids = tokens(seed=7, shape=(n, length))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train(output_dir, max_steps, resume=None):
    torch.manual_seed(0)
    model = prepare_model(tiny_gpt2(), r=R, lora_alpha=ALPHA).train()
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, save_steps=2, logging_steps=1,
        per_device_train_batch_size=4, learning_rate=1e-2, use_cpu=True, report_to=[],
        seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.slow
def test_trainer_checkpoints_and_resuming_gives_the_uninterrupted_run(tmp_path):
    full = train(tmp_path / "full", max_steps=6)
    assert sorted(p.name for p in (tmp_path / "full").glob("checkpoint-*")) == [
        "checkpoint-2", "checkpoint-4", "checkpoint-6"]
    full.save_model(str(tmp_path / "final"))
    resumed = train(tmp_path / "resumed", max_steps=6,
                    resume=str(tmp_path / "full" / "checkpoint-2"))
    def losses(trainer):  # the steps after the checkpoint (the resumed run restores 1 and 2)
        return [(e["step"], e["loss"]) for e in trainer.state.log_history
                if "loss" in e and e["step"] > 2]

    assert [s for s, _ in losses(full)] == [3, 4, 5, 6]
    assert losses(resumed) == losses(full)
    ours, theirs = full.model.state_dict(), resumed.model.state_dict()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    # the saved final model reloads (recipe above) to the trained adapters
    fresh = prepare_model(tiny_gpt2(seed=5), r=R, lora_alpha=ALPHA)
    safetensors_torch.load_model(fresh, str(tmp_path / "final" / "model.safetensors"))
    for key, value in ours.items():
        assert torch.equal(value, fresh.state_dict()[key]), key


# -- bitsandbytes' serialized layout, both ways --------------------------------------------------

def without_adapters(prepared):
    """The prepared model with each LoRALinear replaced by its (4-bit) base layer."""
    base = copy.deepcopy(prepared)
    for name, layer in lora_layers(base).items():
        base = replace_module(base, name, layer.base_layer)
    return base


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_a_base_quantized_here_loads_with_transformers_and_bitsandbytes(make, tmp_path):
    base = without_adapters(prepare_model(make(), r=R))
    base.config.quantization_config = transformers.BitsAndBytesConfig(**BNB_KW)
    base.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"][
        "quant_method"] == "bitsandbytes"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    loaded.train()  # no dropout in these configs; train mode keeps bitsandbytes from repacking
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, base(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_a_checkpoint_bitsandbytes_saved_loads_into_a_prepared_model(make, tmp_path):
    make().save_pretrained(tmp_path / "base")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=transformers.BitsAndBytesConfig(**BNB_KW),
        device_map="cpu").train()
    theirs.save_pretrained(tmp_path / "bnb")
    entries = safetensors_torch.load_file(str(tmp_path / "bnb" / "model.safetensors"))
    prepared = prepare_model(make(seed=5), r=R)  # another base: every byte must come from disk
    targets = set(lora_layers(prepared))

    def ours(key):  # "<layer>.weight..." -> "<layer>.base_layer.weight..." for wrapped layers
        layer = next((t for t in targets if key.startswith(t + ".")), None)
        return key if layer is None else f"{layer}.base_layer.{key[len(layer) + 1:]}"

    result = prepared.load_state_dict({ours(k): v for k, v in entries.items()}, strict=False)
    assert not result.unexpected_keys
    assert all(".lora_" in k or k == "lm_head.weight" for k in result.missing_keys)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(prepared(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)
