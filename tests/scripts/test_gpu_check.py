"""``scripts/gpu_check``: its CPU fall-back runs every part; it refuses CUDA it does not have.

The GPU run itself needs a GPU (see the README, "On a GPU"); this keeps its
code from rotting: ``--device cpu --dry-run`` runs every part with tiny
sizes, and the target verdicts the GPU run will print are checked here on
made-up numbers.
"""
import json
import subprocess
import sys

import pytest

from scripts.gpu_check import context, e_real_model, parts, run, summary, targets
from scripts.gpu_check.a_cuda_tests import parity_counts, parse_junit
from tests.helpers import ROOT

SCRIPT = ROOT / "scripts" / "gpu_check"   # run as `python scripts/gpu_check`, as the README says

# what each part's result.json must hold (beyond part, status, device, dry_run, environment)
RESULT_KEYS = {
    "a_cuda_tests": ("collected", "passed", "failed", "errors", "skipped", "parity",
                     "pytest_summary", "pytest_exit_code", "files"),
    "b_layer_bench": ("sizes", "variants", "ratios", "max_abs_output_diff_qlora_ref_vs_bnb"),
    "c_finetune": ("command", "steps", "training_seconds", "seconds_per_step",
                   "peak_memory_bytes"),
    "d_llama_memory": ("config", "tokens", "r", "lora_params_predicted", "variants",
                       "activations_in_prediction"),
    "e_real_model": ("model", "folder", "config", "tokens", "variants", "ratios",
                     "max_abs_logit_diff_qlora_ref_vs_bnb", "max_abs_logit_bnb",
                     "same_argmax_qlora_ref_vs_bnb"),
    "f_fsdp": ("backend", "world_size", "hooks_ran", "loss_sharded", "loss_unsharded",
               "loss_equal", "max_abs_grad_diff", "dcp_round_trip_equal"),
}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--device", "cpu",
                             "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return out, result


@pytest.mark.slow
def test_dry_run_runs_every_part_and_writes_its_results(dry_run):
    out, result = dry_run
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    for folder, keys in RESULT_KEYS.items():
        assert (out / folder / "result.md").is_file(), folder
        assert (out / folder / "log.txt").is_file(), folder
        r = json.loads((out / folder / "result.json").read_text())
        tail = r.get("log_tail", "")
        assert r["status"] == "ok", f"{folder}: {r.get('error')}\n{tail}"
        assert r["device"] == "cpu" and r["dry_run"] is True
        assert {"environment", "wall_seconds", "timeout_s"} <= set(r), folder
        missing = [k for k in keys if k not in r]
        assert not missing, f"{folder}/result.json lacks {missing}"

    a = json.loads((out / "a_cuda_tests" / "result.json").read_text())
    assert (out / "a_cuda_tests" / "pytest.log").is_file()
    # without a GPU the CUDA tests are collected and skipped, with the reason, never failed
    assert a["collected"] > 0 and a["skipped"] == a["collected"], a["pytest_summary"]
    assert a["failed"] == a["errors"] == 0
    assert all("GPU" in reason for reason in a["skip_reasons"]), a["skip_reasons"]
    assert sum(a["parity"]["no_double_quant"].values()) > 0
    assert sum(a["parity"]["double_quant"].values()) > 0

    b = json.loads((out / "b_layer_bench" / "result.json").read_text())
    assert set(b["variants"]) == {"qlora_ref", "bnb_peft", "lora16_peft"}
    assert all(v["ms_per_step"] > 0 for v in b["variants"].values())
    assert b["ratios"]["time_qlora_ref_vs_bnb_peft"] > 0
    # the adapters start at zero and both bases hold the same NF4 codes
    assert b["max_abs_output_diff_qlora_ref_vs_bnb"] < 1e-2

    c = json.loads((out / "c_finetune" / "result.json").read_text())
    assert c["steps"] == 2 and c["seconds_per_step"] > 0
    assert (out / "c_finetune" / "run" / "report.json").is_file()

    d = json.loads((out / "d_llama_memory" / "result.json").read_text())
    assert set(d["variants"]) == {"lora16", "qlora"}
    for name, v in d["variants"].items():
        assert v["lora_params_match_prediction"], name
        assert v["prediction"]["total_bytes"] > 0 and v["seconds_per_step"] > 0
    stored = {name: v["base_bytes_as_stored"] for name, v in d["variants"].items()}
    assert stored["qlora"] < stored["lora16"], stored

    # the real model's part, on the dry run's tiny Llama in SmolLM2's place
    e = json.loads((out / "e_real_model" / "result.json").read_text())
    assert e["model"].startswith("tiny Llama") and e["config"]["tie_word_embeddings"]
    assert set(e["variants"]) == {"qlora_ref", "bnb_peft", "bf16"}
    ours, bnb = e["variants"]["qlora_ref"], e["variants"]["bnb_peft"]
    # the same adapters on the same layers: PEFT's "all-linear" and ours pick the same ones
    assert ours["trainable_params"] == bnb["trainable_params"] > 0
    assert all(v["steps_per_s"] > 0 for v in (ours, bnb))
    assert all(v["decode_tokens_per_s"] > 0 for v in e["variants"].values())
    assert all(r > 0 for r in e["ratios"].values() if r is not None), e["ratios"]
    # before training the adapters are zero and both bases hold the same NF4 codes: the
    # logits differ by bfloat16 roundings (0.0039 of 1.2 when written), far below 5% of them
    diff, largest = e["max_abs_logit_diff_qlora_ref_vs_bnb"], e["max_abs_logit_bnb"]
    assert largest > 0 and diff <= 0.05 * largest, (diff, largest)

    # FSDP2 over one process (gloo here): the gathers ran, and nothing else changed a byte
    f = json.loads((out / "f_fsdp" / "result.json").read_text())
    assert f["backend"] == "gloo" and f["forward_calls_seen"] > 0
    assert f["hooks_ran"] and f["loss_equal"] and f["grads_equal"], f
    assert f["dcp_round_trip_equal"]


@pytest.mark.slow
def test_dry_run_summary_states_every_target(dry_run):
    out, result = dry_run
    assert result.returncode == 0, result.stderr[-3000:]
    text = (out / "summary.md").read_text()
    written = json.loads((out / "summary.json").read_text())
    for target in targets.TARGETS:
        assert target.key in text and target.text in text, target.key
    assert [t["target"] for t in written["targets"]] == [t.key for t in targets.TARGETS]
    # a CPU dry run measures nothing the targets are about, and says so
    assert all(t["verdict"].startswith("not judged") for t in written["targets"])
    for part in parts.PARTS:
        assert f"{part.folder}/result.md" in text
        assert written["parts"][part.key]["status"] == "ok"


def test_without_cuda_and_without_dry_run_exits_2_with_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: the script would run, not refuse")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2, lines
    assert len(lines) == 1 and "CUDA" in lines[0] and "--dry-run" in lines[0], lines
    assert not out.exists()  # nothing written


def test_cpu_without_dry_run_is_refused_before_anything_runs(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "o"),
                             "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "--dry-run" in lines[0], lines


# -- the verdicts of a GPU run, on made-up numbers ---------------------------------------------

def gpu_results(parity_failed=0, time_ratio=1.1, peak_ratio=0.9, memory_ratio=1.05,
                fsdp_loss_equal=True, real_time_ratio=1.2, real_peak_ratio=1.0):
    """Results shaped as the parts write them on a GPU, with the numbers the verdicts read."""
    def counts(failed):
        return {"passed": 48 - failed, "failed": failed, "error": 0, "skipped": 0}

    bnb_ms, bnb_peak, predicted = 2.0, 100e6, 2e9
    return {
        "a": {"status": "ok", "parity": {"no_double_quant": counts(parity_failed),
                                         "double_quant": counts(0)}},
        "b": {"status": "ok",
              "ratios": {"time_qlora_ref_vs_bnb_peft": time_ratio,
                         "peak_qlora_ref_vs_bnb_peft": peak_ratio},
              "variants": {"qlora_ref": {"ms_per_step": bnb_ms * time_ratio,
                                         "peak_bytes": bnb_peak * peak_ratio},
                           "bnb_peft": {"ms_per_step": bnb_ms, "peak_bytes": bnb_peak}}},
        "d": {"status": "ok", "activations_in_prediction": False,
              "variants": {"qlora": {"peak_vs_prediction": memory_ratio,
                                     "static_vs_prediction": 0.9,
                                     "prediction": {"total_bytes": predicted},
                                     "measured": {"peak_bytes": predicted * memory_ratio}}}},
        "e": {"status": "ok",
              "ratios": {"time_qlora_ref_vs_bnb_peft": real_time_ratio,
                         "peak_qlora_ref_vs_bnb_peft": real_peak_ratio},
              "variants": {"qlora_ref": {"ms_per_step": 50 * real_time_ratio,
                                         "steps_per_s": 20 / real_time_ratio,
                                         "peak_bytes": 2e9 * real_peak_ratio},
                           "bnb_peft": {"ms_per_step": 50.0, "steps_per_s": 20.0,
                                        "peak_bytes": 2e9}}},
        "f": {"status": "ok", "hooks_ran": True, "loss_equal": fsdp_loss_equal,
              "loss_sharded": 2.5, "loss_unsharded": 2.5 if fsdp_loss_equal else 2.501,
              "max_abs_grad_diff": 0.0, "dcp_round_trip_equal": True},
    }


def verdicts(results, dry_run=False, device="cuda"):
    return {t["target"]: t["verdict"]
            for t in targets.judge_targets(results, dry_run, device)}


def test_targets_met_on_a_gpu():
    assert set(verdicts(gpu_results()).values()) == {"met"}


def test_each_target_can_fail_on_its_own():
    assert verdicts(gpu_results(parity_failed=1))["T1"] == "NOT met"
    assert verdicts(gpu_results(time_ratio=1.31))["T3"] == "NOT met"
    assert verdicts(gpu_results(peak_ratio=1.01))["T4"] == "NOT met"
    assert verdicts(gpu_results(memory_ratio=1.11))["T5"] == "NOT met"
    assert verdicts(gpu_results(memory_ratio=0.89))["T5"] == "NOT met"
    assert verdicts(gpu_results(memory_ratio=1.11))["T1"] == "met"
    assert verdicts(gpu_results(fsdp_loss_equal=False))["T6"] == "NOT met"
    assert verdicts(gpu_results(real_time_ratio=1.31))["T7"] == "NOT met"
    assert verdicts(gpu_results(real_time_ratio=1.31))["T8"] == "met"
    assert verdicts(gpu_results(real_peak_ratio=1.01))["T8"] == "NOT met"
    assert verdicts(gpu_results(real_peak_ratio=1.01))["T7"] == "met"


def test_a_part_that_did_not_finish_leaves_its_targets_unmeasured():
    results = gpu_results()
    results["b"] = {"status": "timeout"}
    del results["d"]
    got = verdicts(results)
    assert got["T1"] == got["T2"] == "met"
    assert got["T3"] == got["T4"] == got["T5"] == "not measured"
    assert got["T6"] == got["T7"] == got["T8"] == "met"


# -- (e) without the real model's extra: skipped, said why, the script does not fail -------------

def test_real_model_part_is_skipped_without_the_extra(monkeypatch, tmp_path):
    from qlora_ref import models

    monkeypatch.setattr(models, "extra_installed", lambda: False)
    ctx = context.Context(tmp_path, "cuda", dry_run=False)   # the GPU run's model source
    with pytest.raises(context.PartSkipped, match="extra not installed"):
        e_real_model.real_model_folder(ctx)


def test_a_skipped_part_is_recorded_with_its_reason_and_fails_nothing(monkeypatch, tmp_path):
    import dataclasses

    def skip(ctx):
        raise context.PartSkipped("extra not installed (pip install ...)")

    part = dataclasses.replace(parts.PART_BY_KEY["e"], run=skip)
    monkeypatch.setitem(parts.PART_BY_KEY, "e", part)
    ctx = context.Context(tmp_path / "e", "cpu", dry_run=True)
    assert run.run_part_here("e", ctx) == 0
    r = json.loads((tmp_path / "e" / "result.json").read_text())
    assert r["status"] == "skipped" and r["reason"].startswith("extra not installed"), r

    results = gpu_results()
    results["e"] = {**r, "wall_seconds": 1.0, "timeout_s": 150}
    rows = {t["target"]: t for t in targets.judge_targets(results, False, "cuda")}
    assert rows["T7"]["verdict"] == rows["T8"]["verdict"] == "not measured"
    assert "skipped: extra not installed" in rows["T7"]["measured"]
    assert rows["T1"]["verdict"] == "met"
    assert summary.exit_status(results) == 0
    results["b"] = {"status": "failed"}
    assert summary.exit_status(results) == 1


def test_once_the_total_limit_is_spent_no_part_starts(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--device",
                             "cpu", "--dry-run", "--parts", "a,e", "--total-limit", "0.5"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    written = json.loads((tmp_path / "summary.json").read_text())
    assert set(written["parts"]) == {"a", "e"}
    for folder in ("a_cuda_tests", "e_real_model"):
        r = json.loads((tmp_path / folder / "result.json").read_text())
        assert r["status"] == "timeout" and "not started" in r["error"], r
        assert not (tmp_path / folder / "log.txt").exists()   # no process was started
    assert all(t["verdict"] == "not measured" for t in written["targets"])


def test_parity_counts_split_by_double_quant_and_read_junit(tmp_path):
    module, test = "tests.interop.test_bitsandbytes_parity", "test_cuda_kernels_give_our_bytes"
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<?xml version="1.0"?><testsuites><testsuite>'
        f'<testcase classname="{module}" name="{test}[64-float32-False-nf4]"/>'
        f'<testcase classname="{module}" name="{test}[64-float32-True-nf4]">'
        '<failure message="bytes differ"/></testcase>'
        '<testcase classname="tests.nn.test_optim_paged" name="test_on_cuda">'
        '<skipped message="needs an NVIDIA GPU"/></testcase>'
        '</testsuite></testsuites>')
    cases = parse_junit(junit)
    assert [c["outcome"] for c in cases] == ["passed", "failed", "skipped"]
    counts = parity_counts(cases)
    assert counts["no_double_quant"] == {"passed": 1, "failed": 0, "error": 0, "skipped": 0}
    assert counts["double_quant"] == {"passed": 0, "failed": 1, "error": 0, "skipped": 0}
