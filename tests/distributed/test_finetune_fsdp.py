"""``qlora-ref finetune --fsdp`` under torchrun on CPU (gloo): the tiny GPT and a local Hugging Face Llama.

Two launches of ``python -m torch.distributed.run --standalone`` (a free
port each), each running the command line in-process several times (one
process start-up for several runs):

* 2 processes: the tiny GPT for 4 steps with a checkpoint every 2
  (uninterrupted); the same resumed from its step-2 checkpoint into another
  folder; a tiny transformers Llama on a JSONL file (with LoRA dropout);
* 1 process: the tiny GPT resumed from the 2-process step-2 checkpoint,
  with twice the micro-batch (the same global batch).

What is asserted:

* the adapter is a PEFT folder (``adapter_config.json`` +
  ``adapter_model.safetensors``), the checkpoint folders hold the DCP shards
  of both ranks, listed in the manifest;
* resumed on the same process count: the adapter file is byte-equal;
* resumed on 1 process: the adapters agree within ``1e-3 * lr * steps``
  per entry (``steps`` the 2 resumed steps): what differs is only the order
  of the float32 sums of the batch mean (the ranks' means are weighted by
  their loss tokens, :func:`qlora_ref.train.loop._one_step`), and an AdamW
  step moves an entry by about ``lr`` at most -- the bound of
  ``tests/distributed/test_fsdp2.py``.

About 45 s on 2 loaded cores, most of it the process start-ups.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import PAIRS, save_tiny_llama, write_jsonl

HERE = Path(__file__).resolve().parent
LR = 3e-3
TINY = ["--max-steps", "4", "--save-steps", "2", "--lr", str(LR), "--batch-size", "8", "--quiet"]
CONFIG = {"fsdp_test": {"train_size": 64, "eval_size": 8}}  # a small training and eval set

DRIVER = r'''
import json, sys
from qlora_ref.cli import main
for argv in json.loads(sys.argv[1]):
    assert main(argv) == 0, argv
'''


def torchrun(nproc: int, runs: list, tmp: Path) -> None:
    driver = tmp / f"driver{nproc}.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHDYNAMO_DISABLE": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc-per-node={nproc}", str(driver), json.dumps(runs)],
                            capture_output=True, text=True, timeout=600, env=env, cwd=tmp)
    assert result.returncode == 0, (result.stdout[-3000:] + result.stderr[-5000:])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_cli")
    config = tmp / "configs.json"
    config.write_text(json.dumps(CONFIG))
    tiny = ["finetune", "--fsdp", "--device", "cpu", "--config", str(config), "fsdp_test", *TINY]
    model_dir = _tiny_llama(tmp / "tiny-llama")
    data = write_jsonl(tmp / "train.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    hf = ["finetune", "--fsdp", "--device", "cpu", "--model", str(model_dir), "--data", str(data),
          "--max-steps", "4", "--save-steps", "2", "--lr", "1e-2", "--batch-size", "2",
          "--lora-dropout", "0.1", "--quiet"]
    step2 = str(tmp / "straight" / "checkpoint" / "step-000002")
    torchrun(2, [tiny + ["--output-dir", str(tmp / "straight")],
                 tiny + ["--output-dir", str(tmp / "resumed"), "--resume", step2],
                 hf + ["--output-dir", str(tmp / "llama")]], tmp)
    one = [a if a != "8" else "16" for a in tiny]  # --batch-size 16: the same global batch
    torchrun(1, [one + ["--output-dir", str(tmp / "resumed_on_1"), "--resume", step2]], tmp)
    return tmp


def _tiny_llama(folder: Path) -> Path:
    """The tiny Llama of ``tests/interop/test_hf_finetune.py`` (its words, its sizes), saved in ``folder``."""
    return save_tiny_llama(folder, initializer_range=0.02)  # transformers' default, as before


def adapter(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["straight", "llama"])
def test_fsdp_run_writes_a_peft_adapter_and_dcp_checkpoints(runs, name):
    out = runs / name
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json",
                                                                  "adapter_model.safetensors"]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 4 and report["after"]
    for step in ("step-000002", "step-000004"):
        folder = out / "checkpoint" / step
        files = json.loads((folder / "manifest.json").read_text())["files"]
        assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp",
                "adapter/adapter_model.safetensors"} <= set(files), sorted(files)
        assert json.loads((folder / "trainer_state.json").read_text())["sharded"] == "dcp"
    assert not list((out / "checkpoint").glob(".dcp-*")), "a staging folder was left behind"


@pytest.mark.slow
def test_checkpoint_adapter_is_the_gathered_sharded_adapter(runs):
    # the PEFT copy inside the last checkpoint equals the final adapter, byte for byte
    final = runs / "straight" / "adapter" / "adapter_model.safetensors"
    saved = runs / "straight" / "checkpoint" / "step-000004" / "adapter" / "adapter_model.safetensors"
    assert final.read_bytes() == saved.read_bytes()


@pytest.mark.slow
def test_resume_on_the_same_process_count_is_byte_equal(runs):
    a = runs / "straight" / "adapter" / "adapter_model.safetensors"
    b = runs / "resumed" / "adapter" / "adapter_model.safetensors"
    assert a.read_bytes() == b.read_bytes()
    history = json.loads((runs / "straight" / "report.json").read_text())["history"]
    assert json.loads((runs / "resumed" / "report.json").read_text())["history"] == history


@pytest.mark.slow
def test_resume_on_one_process_is_within_the_reduction_bound(runs):
    want, got = adapter(runs / "straight"), adapter(runs / "resumed_on_1")
    assert want.keys() == got.keys()
    bound = 1e-3 * LR * 2  # 2 steps after the checkpoint
    worst = max((want[k] - got[k]).abs().max().item() for k in want)
    assert worst <= bound, f"max |1 process - 2 processes| = {worst:.3g} > bound {bound:.3g}"


# -- bad input, in this process ----------------------------------------------------------

def test_fsdp_without_torchrun_is_one_line(capsys, tmp_path, monkeypatch):
    from qlora_ref.cli import main
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = main(["finetune", "--fsdp", "--device", "cpu", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "torchrun" in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, message", [
    (["--optim", "paged_adamw"], "use --optim adamw"),
    (["--full-finetune"], "--full-finetune is not supported with --fsdp"),
    (["--quant-bits", "8"], "--quant-bits 8 is not supported"),
])
def test_what_fsdp_cannot_train_is_one_line(capsys, tmp_path, flags, message):
    from qlora_ref.cli import main
    code = main(["finetune", "--fsdp", "--device", "cpu", "--output-dir", str(tmp_path / "o"),
                 *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and message in err[0], err


def test_sharded_checkpoint_resumes_only_with_the_same_global_batch(tmp_path):
    from qlora_ref.train import checkpoint as ckpt
    from qlora_ref.train.config import FinetuneConfig
    from qlora_ref.train.loop import check_resumable
    import dataclasses

    saved_config = FinetuneConfig(optim="adamw", per_device_train_batch_size=8, max_steps=4)
    saved = {"config": dataclasses.asdict(saved_config), "world_size": 2, "step": 2,
             "sharded": "dcp"}
    same_global = dataclasses.replace(saved_config, per_device_train_batch_size=16)
    check_resumable(saved, tmp_path, same_global, 4, world_size=1, fsdp=True)
    with pytest.raises(ckpt.CheckpointError, match="keep the global batch: --batch-size 16"):
        check_resumable(saved, tmp_path, saved_config, 4, world_size=1, fsdp=True)
    with pytest.raises(ckpt.CheckpointError, match="written by a run with --fsdp"):
        check_resumable(saved, tmp_path, saved_config, 4, world_size=2, fsdp=False)
    with pytest.raises(ckpt.CheckpointError, match="without --fsdp"):
        check_resumable({**saved, "sharded": None}, tmp_path, saved_config, 4, 2, fsdp=True)


def test_staging_cleanup_deletes_only_dcp_leftovers(tmp_path):
    from qlora_ref.train.sharded_checkpoint import clear_staging
    ours = tmp_path / ".dcp-step-000002"
    ours.mkdir()
    (ours / ".metadata").write_bytes(b"x")
    (ours / "__0_0.distcp").write_bytes(b"x")
    foreign = tmp_path / ".dcp-step-000004"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone else's")
    clear_staging(tmp_path)
    assert not ours.exists() and (foreign / "notes.txt").is_file()
