"""The command line: every subcommand has a useful --help, and the small ones run."""
import subprocess
import sys

import numpy as np
import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "qlora_ref", *args], capture_output=True, text=True)


@pytest.mark.parametrize("command", ["info", "finetune", "compare", "pretrain", "quantize",
                                     "memory", "bench"])
def test_every_subcommand_explains_itself(command):
    result = run(command, "--help")
    assert result.returncode == 0 and "usage: qlora-ref " + command in result.stdout


def test_quantize_a_npy_file_with_histogram(tmp_path):
    w = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    result = run("quantize", str(tmp_path / "w.npy"), "--histogram", str(tmp_path / "h.png"))
    assert result.returncode == 0, result.stderr
    assert "bits per parameter      4.1" in result.stdout
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_quantize_a_safetensors_file_needs_a_key_when_ambiguous(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.ones(64), "b": torch.ones(64)}, str(tmp_path / "t.safetensors"))
    result = run("quantize", str(tmp_path / "t.safetensors"))
    assert result.returncode == 2 and "--key" in result.stderr
    assert run("quantize", str(tmp_path / "t.safetensors"), "--key", "b").returncode == 0


def test_memory_reproduces_the_papers_65b_numbers():
    result = run("memory", "65e9", "--preset", "llama-65b")
    assert result.returncode == 0
    total = [line for line in result.stdout.splitlines() if "total" in line][0]
    assert "780.00 GB" in total, total            # paper: > 780 GB for full 16-bit fine-tuning
    qlora_gb = float(total.split("|")[-2].split()[0])
    assert qlora_gb < 48, total                    # paper: < 48 GB with QLoRA


@pytest.mark.parametrize("text", ["abc", "0", "-5"])
def test_memory_rejects_bad_counts(text):
    result = run("memory", text)
    assert result.returncode == 2 and "parameter count" in result.stderr
