"""The command line: every subcommand has a useful --help, and the small ones run.

The commands are called in-process through ``qlora_ref.cli.main`` (the function
the ``qlora-ref`` script and ``python -m qlora_ref`` run); the last two tests
start real processes to show that both entry points work and that a bad
argument gives one line on stderr and exit status 2.
"""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from qlora_ref.cli import main
from tests.helpers import cli


@pytest.mark.parametrize("command", ["info", "finetune", "generate", "compare", "datatypes", "pretrain",
                                     "quantize", "memory", "bench"])
def test_every_subcommand_explains_itself(capsys, command):
    code, out, _ = cli(capsys, command, "--help")
    assert code == 0 and "usage: qlora-ref " + command in out


def test_quantize_a_npy_file_with_histogram(capsys, tmp_path):
    w = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32)
    np.save(tmp_path / "w.npy", w)
    code, out, err = cli(capsys, "quantize", str(tmp_path / "w.npy"),
                         "--histogram", str(tmp_path / "h.png"))
    assert code == 0, err
    assert "bits per parameter      4.1" in out
    assert (tmp_path / "h.png").stat().st_size > 1000


def test_quantize_a_safetensors_file_needs_a_key_when_ambiguous(capsys, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"a": torch.ones(64), "b": torch.ones(64)}, str(tmp_path / "t.safetensors"))
    code, _, err = cli(capsys, "quantize", str(tmp_path / "t.safetensors"))
    assert code == 2 and "--key" in err
    assert cli(capsys, "quantize", str(tmp_path / "t.safetensors"), "--key", "b")[0] == 0


def test_memory_reproduces_the_papers_65b_numbers(capsys):
    code, out, _ = cli(capsys, "memory", "65e9", "--preset", "llama-65b")
    assert code == 0
    total = [line for line in out.splitlines() if "total" in line][0]
    assert "780.00 GB" in total, total            # paper: > 780 GB for full 16-bit fine-tuning
    qlora_gb = float(total.split("|")[-2].split()[0])
    assert qlora_gb < 48, total                    # paper: < 48 GB with QLoRA


def _activations_gb(out: str) -> float:
    row = [line for line in out.splitlines() if line.startswith("| activations")][0]
    return float(row.split("|")[-2].split()[0])


def test_memory_counts_activations_for_a_sequence_length(capsys):
    """With --seq-len the table adds what training keeps; checkpointing keeps less, batch more."""
    from qlora_ref import memory

    base = ["memory", "--preset", "llama-7b", "--seq-len", "512"]
    code, plain, _ = cli(capsys, *base)
    assert code == 0
    checkpointed = _activations_gb(cli(capsys, *base, "--gradient-checkpointing")[1])
    batch4 = _activations_gb(cli(capsys, *base, "--batch-size", "4")[1])
    assert 0 < checkpointed < _activations_gb(plain) < batch4
    expected = memory.activation_memory(memory.LLAMA_SHAPES["llama-7b"], 512).total_bytes / 1e9
    assert _activations_gb(plain) == pytest.approx(expected, abs=0.005)   # the table shows 2 digits
    assert _activations_gb(cli(capsys, "memory", "--preset", "llama-7b")[1]) == 0.0


def test_memory_seq_len_without_a_model_shape_is_one_clear_line(capsys):
    code, _, err = cli(capsys, "memory", "7B", "--seq-len", "512")
    assert code == 2 and "--seq-len needs --preset" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("text", ["abc", "0", "-5"])
def test_memory_rejects_bad_counts(capsys, text):
    code, _, err = cli(capsys, "memory", text)
    assert code == 2 and "parameter count" in err


# ----------------------------------------------------------------------------- real processes

def test_console_script_runs():
    """The ``qlora-ref`` script that installing the package writes runs ``main``."""
    script = shutil.which("qlora-ref", path=os.pathsep.join(
        [os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    if script is None:
        pytest.skip("the qlora-ref script is not installed (pip install -e . writes it)")
    result = subprocess.run([script, "memory", "7B"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "total" in result.stdout and not result.stderr


def test_python_dash_m_bad_input_is_one_line_and_status_2(tmp_path):
    """From a real process (torch imported, warnings and all), an error is one stderr line
    and status 2."""
    result = subprocess.run([sys.executable, "-m", "qlora_ref", "finetune", "--task", "juggle",
                             "--output-dir", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 2
    lines = [l for l in result.stderr.strip().splitlines() if l]
    assert len(lines) == 1 and "unknown task 'juggle'" in lines[0], result.stderr


def test_top_level_help_imports_no_torch():
    """`qlora-ref --help` fills in no command's flags, so no torch module is imported for it."""
    code = ("import sys\nfrom qlora_ref.cli import main\ntry:\n    main(['--help'])\n"
            "except SystemExit:\n    pass\nprint('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "COMMAND" in done.stdout and done.stdout.strip().splitlines()[-1] == "False"


def test_bench_in_process_prints_its_table_and_restores_the_process(capsys, monkeypatch):
    """`qlora-ref bench --fresh-pages` measures in this process: every setting it changes
    (threads of torch and libgomp, environment, dynamo) is as before, and the allocator untouched."""
    import torch

    from qlora_ref.cli import bench
    calls = []
    monkeypatch.setattr(bench, "_reuse_heap_memory", lambda: calls.append(1) or True)
    torch.set_num_threads(1)  # not the benchmark's "all threads", so a leak would show
    before = bench.process_settings_now()
    code = main(["bench", "--size", "64", "--repeat", "1", "--warmup", "0", "--no-layer",
                 "--format", "md", "--fresh-pages", "--threads", "2"])
    out = capsys.readouterr().out
    assert code == 0
    for row in ("numpy reference", "| memory copy |", "Cython == NumPy bytes"):
        assert row in out, row
    assert bench.process_settings_now() == before
    assert calls == []


@pytest.mark.slow
def test_bench_with_heap_reuse_measures_in_a_child_process():
    """The allocator change (`mallopt`, which cannot be undone) happens in a child process."""
    import io

    from qlora_ref.cli import bench
    before = bench.process_settings_now()
    text = io.StringIO()
    report = bench.run_benchmarks(sizes=[(64, 64)], repeat=1, warmup=0, layer=False,
                                  fresh_pages=False, file=text)
    assert report["settings"]["pid"] != os.getpid()
    assert "numpy reference" in text.getvalue() and "| memory copy |" not in text.getvalue()
    assert "64x64" in report["sizes"]
    assert bench.process_settings_now() == before
