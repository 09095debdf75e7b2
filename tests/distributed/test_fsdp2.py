"""FSDP2 sharding of the 4-bit base (``qlora_ref.distributed``), with gloo on CPU.

Two launches of ``tests/distributed/fsdp_worker.py`` (plain processes meeting through a
``file://`` store in a temporary folder):

* 2 processes: the tiny GPT, a tiny transformers Llama and GPT-2 (Conv1D),
  each sharded per decoder block, 3 AdamW steps, a DCP checkpoint after step
  2, and a replay from it in fresh objects; then ``load_sharded`` (one layer
  at a time) against ``shard_model(prepare_model(...))`` on the same weights;
* 4 processes: the tiny GPT resumed from the 2-process checkpoint for step
  3, and a checkpoint of another model refused.

They are compared with the same models trained in this process, unsharded.

The bounds (float32; what changes is only the order of the sums):

* losses: ``|sharded - single| <= 1e-5 * |single|`` (the batch mean
  becomes a mean of per-rank means);
* adapter gradients: ``|sharded - single| <= 1e-5 * g_max``, ``g_max`` the
  largest adapter-gradient entry of the model (about 84 float32 ulps of it).
  Not of each tensor's own largest entry: the backward carries the rounding
  of the large upstream gradients into every layer, so a tensor whose
  gradient is small inherits absolute errors of the large ones;
* adapters after AdamW steps: ``|sharded - single| <= 1e-3 * lr * steps``
  per entry (an AdamW step moves an entry by about ``lr`` at most, so this is
  a thousandth of the distance the steps can travel);
* dequantized weights (gathered), a resume on the same process count, the
  per-rank share of the base: exact.
"""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("fsdp_worker", HERE / "fsdp_worker.py")
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)

STEPS, SAVE_AT = 3, 2


def launch(world: int, out: Path, *args: str) -> None:
    """Run ``world`` worker processes to the end; fail with their output if one fails."""
    out.mkdir(parents=True, exist_ok=True)
    store = out / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
    procs = [subprocess.Popen([sys.executable, str(HERE / "fsdp_worker.py"), "--rank", str(r),
                               "--world", str(world), "--store", str(store), "--out", str(out),
                               "--steps", str(STEPS), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
             for r in range(world)]
    logs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} of {world} failed:\n{log[-4000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    two = tmp_path_factory.mktemp("fsdp2")
    worker.save_float_models(two)
    launch(2, two, "--models", "gpt,llama,gpt2", "--save-at", str(SAVE_AT), "--loading", str(two))
    four = tmp_path_factory.mktemp("fsdp4")
    launch(4, four, "--models", "gpt", "--resume", str(two / "{name}_ckpt"),
           "--resume-step", str(SAVE_AT), "--mismatch", str(two / "llama_ckpt"))
    return {2: two, 4: four}


@pytest.fixture(scope="module")
def references():
    return {name: worker.train_reference(name, STEPS) for name in worker.MODELS}


def result(folder: Path, name: str) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / f"{name}_result.safetensors"))


def assert_close(got, want, atol, what):
    diff = (got - want).abs().max().item()
    assert diff <= atol, f"{what}: max |sharded - single| = {diff:.3g} > bound {atol:.3g}"


def check_against_reference(got: dict, ref: dict, first_step: int, name: str) -> None:
    for step in range(first_step, STEPS):
        key = f"loss.{step}"
        assert_close(got[key], ref[key], 1e-5 * ref[key].abs().max().item(), f"{name} {key}")
    grads = [k for k in ref if k.startswith("grad.")]
    assert grads and all(k in got for k in grads)
    scale = max(ref[k].abs().max().item() for k in grads)  # the model's largest gradient entry
    for k in grads:
        assert_close(got[k], ref[k], 1e-5 * scale, f"{name} {k}")
    for k in (k for k in ref if k.startswith("adapter.")):
        assert_close(got[k], ref[k], 1e-3 * worker.LR * STEPS, f"{name} {k}")


@pytest.mark.slow
@pytest.mark.parametrize("name", worker.MODELS)
def test_two_processes_train_as_one(runs, references, name):
    check_against_reference(result(runs[2], name), references[name], 0, name)


@pytest.mark.slow
def test_four_processes_resumed_from_two_train_as_one(runs, references):
    # step 3 on 4 ranks, from the checkpoint 2 ranks wrote after step 2
    check_against_reference(result(runs[4], "gpt"), references["gpt"], SAVE_AT, "gpt")


@pytest.mark.slow
@pytest.mark.parametrize("name", worker.MODELS)
def test_resume_on_same_count_is_byte_equal(runs, name):
    got = result(runs[2], name)
    resumed = [k for k in got if k.startswith("resumed.")]
    assert resumed
    for k in resumed:
        assert torch.equal(got[k], got["adapter." + k[len("resumed."):]]), k


@pytest.mark.slow
@pytest.mark.parametrize("world,name", [(2, "gpt"), (2, "llama"), (2, "gpt2"), (4, "gpt")])
def test_gathered_base_is_byte_equal(runs, world, name):
    from qlora_ref.nn import Linear4bit
    got = result(runs[world], name)
    layers = {n: m for n, m in worker.build(name).named_modules() if isinstance(m, Linear4bit)}
    assert layers and {f"dequant.{n}" for n in layers} == {k for k in got if k.startswith("dequant.")}
    for n, m in layers.items():
        assert torch.equal(got[f"dequant.{n}"], m.dequantize(torch.float32)), n


@pytest.mark.slow
@pytest.mark.parametrize("world,name", [(2, "gpt"), (2, "llama"), (2, "gpt2"), (4, "gpt")])
def test_each_rank_holds_one_nth_of_the_base(runs, world, name):
    from qlora_ref.nn import Linear4bit
    layers = [m for m in worker.build(name).modules() if isinstance(m, Linear4bit)]
    total = sum(m.nbytes for m in layers)
    offsets = 4 * sum(m.double_quant for m in layers)  # the scalar offsets stay whole
    for rank in range(world):
        info = json.loads((runs[world] / f"{name}_rank{rank}.json").read_text())["base_bytes"]
        assert info["total"] == total
        # each layer may be off by its padded nested-absmax piece (one float)
        slack = 4 * len(layers)
        assert abs(info["sharded"] - (total - offsets) / world) <= slack, (rank, info, total)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gpt"])
def test_loading_one_layer_at_a_time_is_byte_equal(runs, name):
    # load_sharded (a folder with a tied head; a function + a safetensors file) against
    # shard_model(prepare_model(whole model)): every rank's shards, buffers and a loss equal
    for rank in range(2):
        info = json.loads((runs[2] / f"loading_rank{rank}.json").read_text())[name]
        assert info["quantized"] > 0 and info["same_names"], (rank, info)
        assert info["differ"] == [], (rank, info["differ"][:5])
        assert info["same_loss"], rank


@pytest.mark.slow
def test_saved_adapter_is_a_peft_folder_written_once(runs):
    from qlora_ref import load_adapter
    for name in ("gpt", "llama"):
        folder = runs[2] / f"{name}_adapter"
        assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json",
                                                            "adapter_model.safetensors"]
    model = load_adapter(worker.build("llama"), runs[2] / "llama_adapter")
    got = result(runs[2], "llama")
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.detach(), got[f"adapter.{n}"]), n


@pytest.mark.slow
def test_checkpoint_of_another_model_is_one_clear_error(runs):
    for rank in range(4):
        message = json.loads((runs[4] / f"gpt_rank{rank}.json").read_text())["mismatch_error"]
        assert message is not None and "does not match the model's adapters" in message


# -- bad input, in this process (no process group needed) ------------------------------
def test_loading_needs_a_process_group_and_a_model_folder(tmp_path):
    from qlora_ref.distributed import load_sharded
    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialized"):
        load_sharded(tmp_path)


def test_shard_count_must_divide_the_blocks():
    from qlora_ref.distributed import check_shardable
    model = worker.build("gpt")  # 64x64 layers: 64 blocks of 64 weights
    check_shardable(model, 4)
    with pytest.raises(ValueError, match="3 shards do not divide its 64 blocks"):
        check_shardable(model, 3)


def test_missing_process_group_is_one_clear_error():
    import torch.distributed as dist
    from qlora_ref.distributed import shard_model
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialized"):
        shard_model(worker.build("gpt"))


def test_unprepared_model_is_refused():
    from qlora_ref.distributed import check_shardable
    with pytest.raises(ValueError, match="call qlora_ref.prepare_model"):
        check_shardable(torch.nn.Sequential(torch.nn.Linear(64, 64)), 2)


def test_checkpoint_index_that_runs_code_is_refused(tmp_path):
    from qlora_ref.distributed import SafeFileSystemReader

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        SafeFileSystemReader(tmp_path).read_metadata()


def test_shardable_storage_keeps_state_dict_and_output():
    from qlora_ref.nn import Linear4bit
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(128, 64))
    x = torch.randn(40, 128)
    before_sd, before_y = layer.state_dict(), layer(x)
    layer.hold_as_parameters()
    assert {n for n, _ in layer.named_parameters()} >= {"packed", "absmax", "nested_absmax"}
    assert not any(p.requires_grad for n, p in layer.named_parameters() if n != "bias")
    after_sd = layer.state_dict()
    assert list(after_sd) == list(before_sd)
    assert all(torch.equal(after_sd[k], before_sd[k]) for k in before_sd)
    assert torch.equal(layer(x), before_y)
    layer.to(torch.bfloat16)  # the constants keep float32 as parameters too
    assert layer.nested_absmax.dtype == torch.float32


# -- memory on paper: qlora-ref memory --shards -----------------------------------------
def test_fsdp_memory_divides_everything_but_activations(tmp_path):
    from qlora_ref import memory
    llama = memory.LLAMA_SHAPES["llama-65b"]
    one = memory.finetune_memory(llama.n_params, "qlora", lora_params=llama.lora_params(64))
    table = memory.fsdp_memory_table(llama, (1, 2, 8))
    assert table["1 GPU"].total_bytes == one.total_bytes
    for n, col in ((2, "2 GPUs"), (8, "8 GPUs")):
        assert table[col]["weights"] == -(-one["weights"] // n)
        assert table[col]["optimizer state"] == -(-one["optimizer state"] // n)
        assert table[col]["gathered block"] > 0
    (tmp_path / "config.json").write_text(json.dumps(
        {"hidden_size": 8192, "intermediate_size": 22016, "num_hidden_layers": 80,
         "num_attention_heads": 64, "vocab_size": 32000,
         "tie_word_embeddings": False}))  # LLaMA-1's config; transformers' default is True
    assert memory.shape_from_config(tmp_path) == llama
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no integer hidden_size"):
        memory.shape_from_config(tmp_path)
