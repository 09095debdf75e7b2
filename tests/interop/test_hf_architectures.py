"""The Hugging Face drop-in, specified over nine architectures.

Each model is built from a tiny config (hidden 64, 2 layers, vocabulary 128,
seed 0), saved with ``save_pretrained`` and reloaded with
``AutoModelForCausalLM.from_pretrained`` (no download), then checked against
the other libraries through their own entry points:

* ``prepare_model`` wraps exactly the layers PEFT's ``"all-linear"`` wraps;
* a few training steps lower the loss and give gradients only to adapters;
* ``generate()`` runs;
* gradient checkpointing gives the gradients computed without it;
* adapters go both ways between us and PEFT with equal logits;
* every 4-bit base holds the bytes ``bitsandbytes.functional.quantize_4bit``
  makes of the layer's ``(out, in)`` weight;
* ``save_pretrained`` then a fresh model's ``load_state_dict``, and a
  ``Trainer`` run that saves and resumes, reproduce the model;
* merged weights equal PEFT's ``merge_and_unload`` (16-bit base), and on a
  bitsandbytes 4-bit base the codes of PEFT's merge (``"requantize"``).
"""
import copy

import pytest
import torch

import qlora_ref
from qlora_ref.nn import Linear4bit
from tests.helpers import logits, lora_layers, peft_layers, randomize_adapters

ADAPTER_SCALE = 0.05  # B ~ 0.05 * N(0, 1): trained-looking adapters (tests.helpers.randomize_adapters)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:Merge lora module to 4-bit linear"),
    pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to"),
]

VOCAB, R, ALPHA = 128, 4, 8
TOL = dict(rtol=1e-5, atol=1e-5)  # the same function, possibly another order of float32 sums
_IDS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, **_IDS)

CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                            **_IDS),
    "bloom": lambda: transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **_IDS),
    "llama": lambda: transformers.LlamaConfig(num_key_value_heads=2, **_DECODER),
    "mistral": lambda: transformers.MistralConfig(num_key_value_heads=2, **_DECODER),
    "qwen2": lambda: transformers.Qwen2Config(num_key_value_heads=2, **_DECODER),
    "opt": lambda: transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=64,
                                          word_embed_proj_dim=64, **_IDS),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**_DECODER),
    "phi": lambda: transformers.PhiConfig(**_DECODER),
    "gemma": lambda: transformers.GemmaConfig(num_key_value_heads=1, head_dim=16, **_DECODER),
}
ARCHS = sorted(CONFIGS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``{arch: directory}``: each tiny model saved once, on first use."""
    cache = {}

    def get(arch):
        if arch not in cache:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(CONFIGS[arch]())
            cache[arch] = tmp_path_factory.mktemp(arch)
            model.save_pretrained(cache[arch])
        return cache[arch]

    return get


def load(directory, **kwargs):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, **kwargs).eval()


@pytest.fixture(scope="module")
def batch():
    ids = torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    return ids


def lora_config(arch, **kwargs):
    return peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                           fan_in_fan_out=arch == "gpt2", **kwargs)


def prepared(directory, **kwargs):
    return qlora_ref.prepare_model(load(directory), r=R, lora_alpha=ALPHA, **kwargs)


# -------------------------------------------------------------------------------- the checks
@pytest.mark.parametrize("arch", ARCHS)
def test_all_linear_wraps_the_layers_peft_wraps(saved, arch):
    ours = prepared(saved(arch))
    theirs = peft.get_peft_model(load(saved(arch)), lora_config(arch))
    assert sorted(lora_layers(ours)) == sorted(peft_layers(theirs))
    assert all(isinstance(m.base_layer, Linear4bit) for m in lora_layers(ours).values())


@pytest.mark.parametrize("arch", ARCHS)
def test_training_lowers_the_loss_and_moves_only_adapters(saved, batch, arch):
    model = prepared(saved(arch)).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(batch, labels=batch).loss
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad and all(n.endswith(("lora_A", "lora_B")) for n in with_grad), with_grad
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    for n, p in model.named_parameters():
        assert n.endswith(("lora_A", "lora_B")) or torch.equal(p, before[n]), n


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_runs(saved, batch, arch):
    model = prepared(saved(arch))
    randomize_adapters(model, ADAPTER_SCALE)
    out = model.generate(batch[:, :5], max_new_tokens=3, do_sample=False,
                         attention_mask=torch.ones_like(batch[:, :5]))
    assert out.shape == (2, 8) and torch.equal(out[:, :5], batch[:, :5])


def adapter_grads(model, batch):
    model.zero_grad()
    torch.manual_seed(7)  # the same dropout masks (checkpointing replays the RNG state)
    model(batch, labels=batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# the name PEFT's and transformers' guides use (transformers 5: activation_checkpointing_*)
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_gives_the_same_gradients(saved, batch, arch):
    model = prepared(saved(arch)).train()
    randomize_adapters(model, ADAPTER_SCALE)
    calls = []
    next(iter(lora_layers(model).values())).register_forward_hook(lambda *_: calls.append(1))
    plain = adapter_grads(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    checkpointed = adapter_grads(model, batch)
    assert len(calls) == 1 + 2, "the checkpointed backward must run the layer's forward again"
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_adapters_round_trip_with_peft_both_ways(saved, batch, arch, tmp_path):
    ours = prepared(saved(arch), quant_type=None)
    randomize_adapters(ours, ADAPTER_SCALE)
    qlora_ref.save_adapter(ours, tmp_path / "ours")
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs, batch), logits(ours, batch), **TOL)

    torch.manual_seed(3)
    peft_model = peft.get_peft_model(load(saved(arch)),
                                     lora_config(arch, init_lora_weights=False)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = qlora_ref.load_adapter(load(saved(arch)), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, batch), logits(peft_model, batch), **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_4bit_bases_hold_the_bytes_of_bitsandbytes(saved, arch):
    """The 4-bit codes always; the float32 absmax without double quantization (with it,
    bitsandbytes' CPU constants differ as tests/interop/test_bitsandbytes_parity.py describes)."""
    original = load(saved(arch))
    model = prepared(saved(arch), quant_type="nf4", double_quant=False)
    double = prepared(saved(arch), quant_type="nf4", double_quant=True)
    for name, layer in lora_layers(model).items():
        weight = original.get_submodule(name).weight.detach()
        if arch == "gpt2":  # Conv1D stores (in, out)
            weight = weight.t().contiguous()
        packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4",
                                                     compress_statistics=False)
        assert torch.equal(layer.base_layer.packed, packed.reshape(-1)), name
        assert torch.equal(layer.base_layer.absmax, state.absmax), name
        assert torch.equal(double.get_submodule(name).base_layer.packed, packed.reshape(-1)), name


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_and_load_state_dict_reproduce_the_model(saved, batch, arch, tmp_path):
    from safetensors.torch import load_file

    model = prepared(saved(arch))
    randomize_adapters(model, ADAPTER_SCALE)
    model.save_pretrained(tmp_path)
    fresh = prepared(saved(arch))
    state = load_file(tmp_path / "model.safetensors")
    result = fresh.load_state_dict(state, strict=False)
    tensors = fresh.state_dict()
    loaded = {tensors[k].data_ptr() for k in state if k in tensors}
    renamed = [state[k] for k in result.unexpected_keys]  # checkpoint names transformers keeps
    for key in result.missing_keys:  # tied to a loaded tensor (saved once), or saved renamed
        assert (tensors[key].data_ptr() in loaded
                or any(torch.equal(tensors[key], t) for t in renamed)), key
    assert torch.equal(logits(fresh, batch), logits(model, batch))


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(model, output_dir, max_steps):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, save_steps=2,
        per_device_train_batch_size=2, learning_rate=1e-2, report_to=[], use_cpu=True,
        logging_steps=1, seed=0, data_seed=0, dataloader_num_workers=0, save_only_model=False)
    ids = torch.randint(3, VOCAB, (8, 16), generator=torch.Generator().manual_seed(4))
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens(ids))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_a_trainer_run_saves_and_resumes(saved, arch, tmp_path):
    straight = _trainer(prepared(saved(arch)), tmp_path / "straight", 4)
    straight.train()
    resumed = _trainer(prepared(saved(arch)), tmp_path / "straight", 4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    for (name, a), (_, b) in zip(straight.model.named_parameters(),
                                 resumed.model.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_merged_16bit_weights_equal_peft_merge(saved, batch, arch, tmp_path):
    torch.manual_seed(3)
    theirs = peft.get_peft_model(load(saved(arch)), lora_config(arch, init_lora_weights=False))
    ours = prepared(saved(arch), quant_type=None)
    with torch.no_grad():
        for name, layer in peft_layers(theirs).items():
            lora_layers(ours)[name].lora_A.copy_(layer.lora_A["default"].weight)
            lora_layers(ours)[name].lora_B.copy_(layer.lora_B["default"].weight)
    names = sorted(lora_layers(ours))
    merged_ours = qlora_ref.merge_and_unload(ours)
    merged_theirs = theirs.merge_and_unload()
    for name in names:
        a, b = merged_ours.get_submodule(name), merged_theirs.get_submodule(name)
        assert type(a) is type(b), name  # a Conv1D stays a Conv1D
        assert torch.equal(a.weight, b.weight), name
    merged_ours.save_pretrained(tmp_path)  # still the transformers model it was
    assert torch.equal(logits(load(tmp_path), batch), logits(merged_ours, batch))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_requantize_merge_has_the_codes_of_peft_merge_on_bitsandbytes(saved, arch, tmp_path):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=False,
                                             bnb_4bit_compute_dtype=torch.float32)
    base = load(saved(arch), quantization_config=config, device_map="cpu", dtype=torch.float32)
    ours = copy.deepcopy(base)
    torch.manual_seed(5)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=R, lora_alpha=ALPHA,
                                                       target_modules="all-linear",
                                                       init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = qlora_ref.load_adapter(ours, tmp_path, quant_type="nf4", double_quant=False)
    names = sorted(lora_layers(ours))
    assert names == sorted(peft_layers(theirs))
    merged_ours = qlora_ref.merge_and_unload(ours, "requantize")
    merged_theirs = theirs.merge_and_unload()
    for name in names:
        a, b = merged_ours.get_submodule(name), merged_theirs.get_submodule(name)
        assert torch.equal(a.packed, b.weight.data.reshape(-1)), name
        assert torch.equal(a.absmax, b.weight.quant_state.absmax), name
