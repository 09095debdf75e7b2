"""The main job end to end: fine-tuning learns, resuming is exact, DDP syncs adapters, the CLI fails clearly."""
import json
import os
import subprocess
import sys

import pytest
import torch

from qlora_ref.train.finetune import FinetuneConfig, finetune, load_config
from qlora_ref.train.pretrain import default_base_model_path
from tests.helpers import cli

pytestmark = pytest.mark.skipif(not default_base_model_path().is_file(),
                                reason="the shipped base model is missing")

SMALL = dict(max_steps=40, eval_size=100, train_size=600)


@pytest.mark.slow
def test_finetune_command_learns_and_writes_adapters_plot_and_report(capsys, tmp_path):
    out = tmp_path / "run"
    # the main job with its defaults (282 steps; measured 0.075 -> 0.625 accuracy on seed 0)
    code, _, err = cli(capsys, "finetune", "--output-dir", str(out), "--quiet")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    before, after = report["before"]["accuracy"], report["after"]["accuracy"]
    assert after >= before + 0.3, f"accuracy {before:.3f} -> {after:.3f}: not well above the base"
    assert report["after"]["loss"] < 0.5 * report["before"]["loss"]
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "loss_curve.png", "report.md", "checkpoint/LATEST"):
        assert (out / name).is_file(), name


def test_only_adapters_train_and_the_base_is_4bit():
    result = finetune(FinetuneConfig(max_steps=2, eval_size=20, train_size=100), device="cpu",
                      progress=False)
    p = result.parameters
    assert 0 < p["trainable"] < 0.1 * p["total"]
    assert 8 * p["base_bytes"] / p["base_params"] < 4.2, "the frozen base is stored in ~4.13 bits"


@pytest.mark.slow
@pytest.mark.parametrize("accumulation", [1, 2])
def test_resumed_run_ends_with_the_same_adapters(tmp_path, accumulation):
    config = FinetuneConfig(**SMALL, lora_dropout=0.1, per_device_train_batch_size=16,
                            gradient_accumulation_steps=accumulation, save_steps=1000)
    straight = finetune(config, device="cpu", progress=False)
    finetune(config, device="cpu", output_dir=tmp_path, stop_after=17, progress=False)
    resumed = finetune(config, device="cpu", resume_from=tmp_path / "checkpoint", progress=False)
    a = {n: p for n, p in straight.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert straight.history == resumed.history


def test_named_configurations_load_with_aliases(tmp_path):
    shipped = os.path.join(os.path.dirname(__import__("qlora_ref").__file__), "configs",
                           "finetune_configs.json")
    config = load_config(shipped, "sort_tiny_4bits_r4_accum2")
    assert config.r == 4 and config.gradient_accumulation_steps == 2
    assert config.per_device_train_batch_size == 16
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"x": {"lora_rank": 4}}))
    with pytest.raises(ValueError, match="lora_rank"):
        load_config(bad, "x")
    with pytest.raises(ValueError, match="has no configuration"):
        load_config(shipped, "missing")


@pytest.mark.parametrize("args, message", [
    (["finetune", "--task", "juggle"], "unknown task 'juggle'"),
    (["finetune", "--base-model", "/nonexistent/model.safetensors"], "no base model file"),
    (["quantize", "/nonexistent.npy"], "no such file"),
    (["finetune", "--r", "0"], "r must be a positive integer"),
])
def test_cli_errors_are_one_clear_line(capsys, tmp_path, args, message):
    code, _, err = cli(capsys, *args, "--output-dir" if args[0] == "finetune" else "--quiet",
                    *([str(tmp_path)] if args[0] == "finetune" else []))
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and message in lines[0], err


def test_cli_unreadable_checkpoint(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    code, _, err = cli(capsys, "finetune", "--base-model", str(bad), "--output-dir", str(tmp_path))
    assert code == 2 and "not a valid qlora_ref base model" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cli_cuda_without_gpu(capsys):
    code, _, err = cli(capsys, "finetune", "--device", "cuda")
    assert code == 2 and "no CUDA GPU" in err


DDP_SCRIPT = """
import os, sys, torch
from qlora_ref.train.finetune import FinetuneConfig, finetune
config = FinetuneConfig(max_steps=30, eval_size=50, train_size=600, per_device_train_batch_size=16)
result = finetune(config, device="cpu", progress=False)
rank = int(os.environ["RANK"])
state = {n: p.detach() for n, p in result.model.named_parameters() if p.requires_grad}
torch.save({"adapters": state, "history": result.history}, os.path.join(sys.argv[1], f"rank{rank}.pt"))
"""


@pytest.mark.slow
def test_torchrun_two_processes_keep_identical_adapters_and_learn(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port=29533", str(script), str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name, value in r0["adapters"].items():
        assert torch.equal(value, r1["adapters"][name]), f"{name} differs across ranks"
    losses = [loss for _, loss in r0["history"]]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, "the loss did not fall"


@pytest.mark.slow
def test_quick_compare_nf4_qlora_is_within_the_seed_spread_of_16bit_lora(tmp_path):
    """Paper's central claim in miniature, on the quick profile (3 seeds per arm).

    "Spread" is the wider of the two arms' ranges over seeds; if NF4 QLoRA's mean
    is farther than that from 16-bit LoRA's, the claim does not hold here.
    """
    from qlora_ref.train.compare import run_compare

    results = run_compare("quick", device="cpu", arms=["LoRA, 16-bit base", "QLoRA NF4 + DQ"],
                          output_dir=tmp_path, progress=False)
    lora, qlora = results
    spread = max(max(r.accuracy) - min(r.accuracy) for r in results)
    gap = abs(sum(qlora.accuracy) / 3 - sum(lora.accuracy) / 3)
    assert gap <= spread, f"NF4 {qlora.accuracy} vs 16-bit {lora.accuracy}: gap {gap:.3f} > spread {spread:.3f}"
    # both arms learned: the untrained base's answer-token loss is about 7 on this task
    assert max(lora.loss + qlora.loss) < 2.5, (lora.loss, qlora.loss)
    assert (tmp_path / "compare.md").is_file() and (tmp_path / "compare.png").is_file()


def test_tiny_completion_stops_at_eos():
    """complete_tiny runs one forward per new token and stops at the first EOS (not max_new_tokens)."""
    from qlora_ref.train.finetune import complete_tiny
    from qlora_ref.train.pretrain import load_base_model

    model = load_base_model()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    text = complete_tiny(model, "c4821=", max_new_tokens=20)
    assert text == "4821", text  # the base model was pretrained on copy
    assert len(calls) == len(text) + 1, f"{len(calls)} forwards for {len(text)} tokens and an EOS"
