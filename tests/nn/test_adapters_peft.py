"""Specification of qlora_ref.save_adapter / load_adapter: PEFT's format, checked with the real PEFT.

A tiny LLaMA built from a config (no download) is the base. Adapters saved
by qlora_ref open in ``peft.PeftModel.from_pretrained`` and give the same
logits; adapters saved by PEFT load into qlora_ref. With a 4-bit base, PEFT's
base is given our dequantized weights.
"""
import copy
import json

import pytest
import torch

import qlora_ref
from qlora_ref.nn import LoRALinear
from tests.helpers import logits, randomize_adapters

ADAPTER_SCALE = 0.02  # B ~ 0.02 * N(0, 1): trained-looking adapters (tests.helpers.randomize_adapters)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# PEFT calls a transformers method that transformers 5 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

TOL = dict(rtol=1e-5, atol=1e-5)  # same function, possibly another order of float32 sums


@pytest.fixture(scope="module")
def llama():
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def with_weights_of(model, prepared):
    """A copy of ``model`` whose adapted layers hold ``prepared``'s dequantized base weights."""
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in prepared.named_modules():
            if isinstance(m, LoRALinear):
                dense.get_submodule(name).weight.copy_(m.base_layer.dequantize(torch.float32))
    return dense


def test_saved_files_use_peft_keys_and_config(llama, tmp_path):
    model = qlora_ref.prepare_model(copy.deepcopy(llama), r=4, lora_alpha=8,
                                    target_modules=["q_proj", "v_proj"], quant_type=None)
    qlora_ref.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == sorted(n for n, m in model.named_modules()
                                              if isinstance(m, LoRALinear))
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert tensors[key].shape == (4, 256)
    assert len(tensors) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


def test_peft_opens_our_adapter_with_a_16bit_base(llama, tokens, tmp_path):
    ours = qlora_ref.prepare_model(copy.deepcopy(llama), r=4, lora_alpha=8, quant_type=None)
    randomize_adapters(ours, ADAPTER_SCALE)
    assert not torch.allclose(logits(ours, tokens), logits(llama, tokens), **TOL)
    qlora_ref.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path).eval()
    # bit-identical: LoRALinear computes base(x) + B(A(x)) * scaling in PEFT's order
    assert torch.equal(logits(theirs, tokens), logits(ours, tokens))


def test_peft_opens_our_adapter_over_our_dequantized_4bit_base(llama, tokens, tmp_path):
    ours = qlora_ref.prepare_model(copy.deepcopy(llama), r=4, lora_alpha=8, quant_type="nf4")
    randomize_adapters(ours, ADAPTER_SCALE)
    qlora_ref.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(with_weights_of(llama, ours), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, tokens), logits(ours, tokens), **TOL)


def test_we_load_what_peft_saved_including_a_rank_pattern(llama, tokens, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                             rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 4},
                             init_lora_weights=False)  # random B: a non-trivial adapter
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(llama), config).eval()
    theirs.save_pretrained(tmp_path)
    ours = qlora_ref.load_adapter(copy.deepcopy(llama), tmp_path)  # prepares a 16-bit base
    down = ours.get_submodule("model.layers.1.mlp.down_proj")
    assert down.r == 2 and down.scaling == 16 / 2
    assert ours.get_submodule("model.layers.0.self_attn.v_proj").scaling == 4 / 4
    torch.testing.assert_close(logits(ours, tokens), logits(theirs, tokens), **TOL)


def test_we_load_peft_adapter_over_a_4bit_base(llama, tokens, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                             init_lora_weights=False)
    torch.manual_seed(4)
    saved = peft.get_peft_model(copy.deepcopy(llama), config)
    saved.save_pretrained(tmp_path)
    ours = qlora_ref.load_adapter(copy.deepcopy(llama), tmp_path, quant_type="nf4")
    assert len([m for m in ours.modules() if isinstance(m, LoRALinear)]) == 2 * 7
    theirs = peft.PeftModel.from_pretrained(with_weights_of(llama, ours), tmp_path).eval()
    torch.testing.assert_close(logits(ours, tokens), logits(theirs, tokens), **TOL)


def test_round_trip_through_our_own_files(llama, tokens, tmp_path):
    ours = qlora_ref.prepare_model(copy.deepcopy(llama), r=4, quant_type="nf4")
    randomize_adapters(ours, ADAPTER_SCALE)
    qlora_ref.save_adapter(ours, tmp_path)
    fresh = qlora_ref.prepare_model(copy.deepcopy(llama), r=4, quant_type="nf4")
    qlora_ref.load_adapter(fresh, tmp_path)
    for (name, a), (_, b) in zip(ours.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(logits(fresh, tokens), logits(ours, tokens))


def test_loading_an_adapter_of_another_shape_is_a_value_error(llama, tmp_path):
    small = qlora_ref.prepare_model(copy.deepcopy(llama), r=4, target_modules=["q_proj"],
                                    quant_type=None)
    qlora_ref.save_adapter(small, tmp_path)
    other_rank = qlora_ref.prepare_model(copy.deepcopy(llama), r=8, target_modules=["q_proj"],
                                         quant_type=None)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj'.*lora_A has shape "
                                         r"\(4, 256\).*needs \(8, 256\)"):
        qlora_ref.load_adapter(other_rank, tmp_path)
    fewer = qlora_ref.prepare_model(copy.deepcopy(llama), r=4, target_modules=["k_proj"],
                                    quant_type=None)
    with pytest.raises(ValueError, match="not LoRA layers of the model"):
        qlora_ref.load_adapter(fewer, tmp_path)
    more = qlora_ref.prepare_model(copy.deepcopy(llama), r=4, target_modules=["q_proj", "k_proj"],
                                   quant_type=None)
    with pytest.raises(ValueError, match="no weights for the model's LoRA layers"):
        qlora_ref.load_adapter(more, tmp_path)
    qlora_ref.load_adapter(more, tmp_path, strict=False)  # k_proj keeps its own adapters


def test_options_that_change_the_formula_are_refused(llama, tmp_path):
    model = qlora_ref.prepare_model(copy.deepcopy(llama), r=4, target_modules=["q_proj"],
                                    quant_type=None)
    qlora_ref.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    with pytest.raises(ValueError, match="use_rslora"):
        qlora_ref.load_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        qlora_ref.load_adapter(model, tmp_path / "missing")
    with pytest.raises(ValueError, match="no LoRALinear layers"):
        qlora_ref.save_adapter(torch.nn.Linear(2, 2), tmp_path)


# ------------------------------------------------ PEFT's auto classes, the recorded base, GPT-2
@pytest.fixture(scope="module")
def llama_dir(llama, tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    llama.save_pretrained(directory)
    return directory


def test_auto_peft_model_opens_our_adapter_with_its_base(llama_dir, tokens, tmp_path):
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    ours = qlora_ref.prepare_model(base, r=4, lora_alpha=8, quant_type=None)
    randomize_adapters(ours, ADAPTER_SCALE)
    qlora_ref.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(llama_dir)
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(theirs, tokens), logits(ours, tokens))


def test_task_type_follows_the_transformers_class_and_an_argument_overrides(llama, tmp_path):
    assert qlora_ref.nn.adapters.task_type_of(llama) == "CAUSAL_LM"
    assert qlora_ref.nn.adapters.task_type_of(llama.model) == "FEATURE_EXTRACTION"
    assert qlora_ref.nn.adapters.task_type_of(torch.nn.Linear(2, 2)) is None
    model = qlora_ref.prepare_model(copy.deepcopy(llama), r=2, target_modules=["q_proj"],
                                    quant_type=None)
    qlora_ref.save_adapter(model, tmp_path, base_model_name_or_path="org/base", task_type=None)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] is None and config["base_model_name_or_path"] == "org/base"
    with pytest.raises(ValueError, match="task_type must be None or one of PEFT's"):
        qlora_ref.save_adapter(model, tmp_path, task_type="CAUSAL")


@pytest.mark.parametrize("prepare", [dict(quant_type="nf4"),
                                     dict(quant_type="fp4", double_quant=False, blocksize=128),
                                     dict(quant_bits=8), dict(quant_type=None)])
def test_load_adapter_rebuilds_the_recorded_base(llama, tokens, tmp_path, prepare):
    saved = qlora_ref.prepare_model(copy.deepcopy(llama), r=4, **prepare)
    randomize_adapters(saved, ADAPTER_SCALE)
    qlora_ref.save_adapter(saved, tmp_path)
    loaded = qlora_ref.load_adapter(copy.deepcopy(llama), tmp_path)  # no base arguments
    assert torch.equal(logits(loaded, tokens), logits(saved, tokens))
    record = qlora_ref.nn.adapters.read_base_record(tmp_path / "adapter_model.safetensors")
    assert record["quant_bits"] == {None: 16}.get(prepare.get("quant_type", 4),
                                                   prepare.get("quant_bits", 4))
    # PEFT ignores the record: it opens the adapter as any other
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(llama), tmp_path)
    assert len([m for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]) == 14


def test_explicit_base_arguments_override_the_record(llama, tmp_path):
    saved = qlora_ref.prepare_model(copy.deepcopy(llama), r=4, target_modules=["q_proj"],
                                    quant_type="nf4")
    qlora_ref.save_adapter(saved, tmp_path)
    sixteen = qlora_ref.load_adapter(copy.deepcopy(llama), tmp_path, quant_type=None)
    assert isinstance(sixteen.model.layers[0].self_attn.q_proj.base_layer, torch.nn.Linear)
    bf16 = qlora_ref.load_adapter(copy.deepcopy(llama), tmp_path, compute_dtype=torch.bfloat16)
    base = bf16.model.layers[0].self_attn.q_proj.base_layer
    assert (base.quant_type, base.compute_dtype) == ("nf4", torch.bfloat16)


def write_record(directory, text):
    from safetensors.torch import load_file, save_file

    path = directory / "adapter_model.safetensors"
    save_file(load_file(path), path, metadata={"format": "pt", "qlora_ref.base": text})


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[4]", "must be a JSON object"),
    ('{"quant_bits": 4, "quant_type": "nf4", "blocksize": 64, "double_quant": true, "x": 1}',
     r"unknown fields \['x'\]"),
    ('{"quant_bits": 3}', "quant_bits must be 4, 8 or 16"),
    ('{"quant_bits": true}', "quant_bits must be 4, 8 or 16"),
    ('{"quant_bits": 4, "quant_type": "nf5", "blocksize": 64, "double_quant": true}',
     "quant_type must be one of"),
    ('{"quant_bits": 4, "quant_type": "nf4", "blocksize": "64", "double_quant": true}',
     "blocksize must be a positive integer"),
    ('{"quant_bits": 4, "quant_type": "nf4", "blocksize": 64, "double_quant": 1}',
     "double_quant must be true or false"),
    ('{"quant_bits": 8, "blocksize": 256, "compute_dtype": "int8"}', "compute_dtype must be"),
    ('{"quant_bits": 4, "quant_type": "nf4"}', r"needs \['blocksize', 'double_quant'\]"),
    ('{"blocksize": 64}', "has no quant_bits"),
])
def test_a_hostile_base_record_is_a_value_error_naming_the_field(llama, tmp_path, text, message):
    saved = qlora_ref.prepare_model(copy.deepcopy(llama), r=2, target_modules=["q_proj"])
    qlora_ref.save_adapter(saved, tmp_path)
    write_record(tmp_path, text)
    with pytest.raises(ValueError, match="qlora_ref.base.*" + message):
        qlora_ref.load_adapter(copy.deepcopy(llama), tmp_path)


def test_fan_in_fan_out_must_describe_the_layers(llama, tmp_path):
    model = qlora_ref.prepare_model(copy.deepcopy(llama), r=2, target_modules=["q_proj"],
                                    quant_type=None)
    qlora_ref.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is False
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    with pytest.raises(ValueError, match="fan_in_fan_out=True but the layers .* are nn.Linear"):
        qlora_ref.load_adapter(copy.deepcopy(llama), tmp_path)


@pytest.fixture(scope="module")
def gpt2():
    config = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_adapters_are_fan_in_fan_out_both_ways(gpt2, tokens, tmp_path):
    ours = qlora_ref.prepare_model(copy.deepcopy(gpt2), r=4, lora_alpha=8, quant_type=None)
    randomize_adapters(ours, ADAPTER_SCALE)
    qlora_ref.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(gpt2), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, tokens), logits(ours, tokens), **TOL)

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", fan_in_fan_out=True,
                             init_lora_weights=False)
    torch.manual_seed(6)
    peft_model = peft.get_peft_model(copy.deepcopy(gpt2), config).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = qlora_ref.load_adapter(copy.deepcopy(gpt2), tmp_path / "peft")
    assert all(m.fan_in_fan_out for m in loaded.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(logits(loaded, tokens), logits(peft_model, tokens), **TOL)
    llama_like = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(
        json.dumps({**llama_like, "fan_in_fan_out": False}))
    with pytest.raises(ValueError, match="fan_in_fan_out=False but the layers .* Conv1D"):
        qlora_ref.load_adapter(copy.deepcopy(gpt2), tmp_path / "peft")


def test_the_adapter_file_is_a_function_of_its_content():
    """safetensors writes its metadata from a hash map, so the order of two keys varies between
    saves; the adapter file's header is rewritten in one order, so equal adapters give equal bytes
    (the fault-injection test compares resumed adapters byte for byte)."""
    from safetensors.torch import load, save

    from qlora_ref.nn.adapters import canonical_safetensors

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(5, dtype=torch.int32)}
    metadata = {"format": "pt", "qlora_ref.base": '{"quant_bits": 4}', "z": "last"}
    raw = {save(tensors, metadata=metadata) for _ in range(30)}
    canonical = {canonical_safetensors(data) for data in raw}
    assert len(canonical) == 1
    data = canonical.pop()
    assert int.from_bytes(data[:8], "little") % 8 == 0          # the data stays 8-byte aligned
    loaded = load(data)
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    assert header["__metadata__"] == metadata


def test_saving_the_same_adapters_twice_gives_the_same_bytes(llama, tmp_path):
    model = qlora_ref.prepare_model(copy.deepcopy(llama), r=4, target_modules=["q_proj"])
    randomize_adapters(model, ADAPTER_SCALE)
    files = []
    for i in range(5):
        qlora_ref.save_adapter(model, tmp_path / str(i))
        files.append((tmp_path / str(i) / "adapter_model.safetensors").read_bytes())
    assert len(set(files)) == 1
