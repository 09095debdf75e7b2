"""`qlora-ref finetune --model DIR --data FILE.jsonl` and `qlora-ref generate` on a Hugging Face model.

The model is a tiny Llama built here from ``LlamaConfig`` (hidden 64, 2
layers) with a word-level tokenizer trained here by ``tokenizers`` on the
data's own words; both are saved with ``save_pretrained`` and read back by
the command through ``AutoModelForCausalLM`` / ``AutoTokenizer``. The
oracles are the other libraries' own entry points: the tokenizer's ids for
the labels, ``transformers``' ``generate`` for the base model's continuation,
and ``peft.AutoPeftModelForCausalLM`` for the saved adapter.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tests.robustness.zygote import zygote_source
import torch

from qlora_ref.cli import main
from tests.helpers import PAIRS, cli, save_tiny_llama, write_jsonl

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer, saved as a Hugging Face model folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory):
    """One 4-bit NF4 fine-tune of the tiny Llama on PAIRS through the command line."""
    tmp = tmp_path_factory.mktemp("hf-run")
    data = write_jsonl(tmp / "train.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    out = tmp / "out"
    code = main(["finetune", "--model", str(model_dir), "--data", str(data), "--output-dir",
                 str(out), "--max-steps", "40", "--lr", "1e-2", "--batch-size", "4",
                 "--lora-dropout", "0", "--quiet"])
    assert code == 0
    return out


@pytest.mark.slow  # shares the module's fine-tuning run (about 25 s on 2 loaded cores)
def test_finetune_learns_the_completions_and_writes_adapter_plot_report(run):
    report = json.loads((run / "report.json").read_text())
    before, after = report["before"]["loss"], report["after"]["loss"]
    assert after < 0.2 * before, f"completion loss {before:.3f} -> {after:.3f}"
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "loss_curve.png", "report.md"):
        assert (run / name).is_file(), name
    md = (run / "report.md").read_text()
    assert "![training loss](loss_curve.png)" in md and "## The task" in md
    assert [e["prompt"] for e in report["examples"]] == [p for p, _ in PAIRS[:3]]
    for p, c in PAIRS[:3]:
        assert f"| `{p}` | `{c}` |" in md, p  # input and expected, then before and after


@pytest.mark.slow  # shares the module's fine-tuning run (about 25 s on 2 loaded cores)
def test_adapter_opens_in_peft_and_gives_our_logits_over_the_dequantized_base(run, model_dir):
    """PEFT's model from the saved adapter, given our dequantized NF4 base weights, computes our logits."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qlora_ref
    from qlora_ref.nn import LoRALinear

    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(run / "adapter")).eval()
    ours = qlora_ref.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), run / "adapter",
                                  quant_type="nf4", double_quant=True,
                                  compute_dtype=torch.float32).eval()
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    assert layers
    peft_modules = dict(peft_model.base_model.model.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            peft_modules[name].base_layer.weight.copy_(layer.base_layer.dequantize(torch.float32))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer([p for p, _ in PAIRS], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        theirs, mine = peft_model(input_ids=ids).logits, ours(input_ids=ids).logits
    assert torch.allclose(theirs, mine, atol=1e-5, rtol=1e-5), (theirs - mine).abs().max()


@pytest.mark.slow  # shares the module's fine-tuning run (about 25 s on 2 loaded cores)
def test_generate_with_the_adapter_gives_the_learned_completion(capsys, run, model_dir):
    for prompt, completion in PAIRS[:2]:
        code, out, err = cli(capsys, "generate", "--model", model_dir, "--adapter",
                             run / "adapter", "--prompt", prompt, "--max-new-tokens", "3")
        assert code == 0, err
        assert out.strip() == completion
    # --adapter alone: the base folder the adapter records
    code, out, err = cli(capsys, "generate", "--adapter", run / "adapter", "--prompt", PAIRS[0][0],
                         "--max-new-tokens", "3")
    assert code == 0 and out.strip() == PAIRS[0][1], err


def test_generate_without_adapter_is_transformers_greedy_continuation(capsys, model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tokenizer(PAIRS[0][0], return_tensors="pt")["input_ids"]
    expected = tokenizer.decode(model.generate(ids, attention_mask=torch.ones_like(ids),
                                               max_new_tokens=5, do_sample=False,
                                               pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:],
                                skip_special_tokens=True)
    code, out, err = cli(capsys, "generate", "--model", model_dir, "--prompt", PAIRS[0][0],
                         "--max-new-tokens", "5")
    assert code == 0, err
    assert out.rstrip("\n") == expected


@pytest.mark.parametrize("record, prompt, completion", [
    ({"text": "the cat sat on the mat"}, "", "the cat sat on the mat"),
    ({"prompt": "review: great product ->", "completion": "positive"},
     "review: great product ->", "positive"),
    ({"instruction": "label this", "input": "great product", "output": "positive"},
     "### Instruction:\nlabel this\n\n### Input:\ngreat product\n\n### Response:\n", "positive"),
    ({"instruction": "label this", "output": "positive"},
     "### Instruction:\nlabel this\n\n### Response:\n", "positive"),
])
def test_each_layout_puts_the_loss_on_the_completion_only(tmp_path, model_dir, record, prompt,
                                                          completion):
    from transformers import AutoTokenizer

    from qlora_ref.train.hf_finetune import IGNORE_INDEX, encode_examples
    from qlora_ref.train.jsonl import read_examples

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    (example,) = read_examples(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert (example.prompt, example.completion) == (prompt, completion)
    ((ids, labels),) = encode_examples([example], tokenizer, max_length=64)
    prompt_ids = tokenizer(prompt)["input_ids"] if prompt else []
    target = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids == prompt_ids + target
    assert labels == [IGNORE_INDEX] * len(prompt_ids) + target


@pytest.mark.parametrize("content, line, needle", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', 2, "field 'completion' is missing"),
    ('{"instruction": "a", "input": "b"}\n', 1, "field 'output' is missing"),
    ('\n\n', None, "empty file"),
    ('', None, "empty file"),
    ('{"text": "a"}\n{"text": "b",\n', 2, "not valid JSON"),
    ('{"prompt": "a", "completion": 3}\n', 1, "field 'completion' must be a string"),
    ('["prompt", "completion"]\n', 1, "expected a JSON object"),
    ('{"question": "a", "answer": "b"}\n', 1, "no known fields"),
    ('{"prompt": "a", "completion": "  "}\n', 1, "is empty"),
    (b'{"text": "caf\xe9"}\n', 1, "not UTF-8"),
])
def test_bad_data_is_one_line_naming_file_and_line(capsys, tmp_path, model_dir, content, line,
                                                   needle):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, _, err = cli(capsys, "finetune", "--model", model_dir, "--data", data,
                       "--output-dir", tmp_path / "out")
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1, err
    where = f"{data}:{line}:" if line else f"{data}:"
    assert where in lines[0] and needle in lines[0], lines[0]


def test_an_over_long_example_is_refused_by_default_and_cut_with_truncate(capsys, tmp_path,
                                                                         model_dir):
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "review: great product ->",
                                                  "completion": "positive"},
                                                 {"text": "the cat sat on the mat " * 4}])
    code, _, err = cli(capsys, "finetune", "--model", model_dir, "--data", data,
                       "--output-dir", tmp_path / "out", "--max-length", "10", "--max-steps", "1")
    lines = [l for l in err.strip().splitlines() if l]
    assert code == 2 and len(lines) == 1 and f"{data}:2: example is 25 tokens" in lines[0], err
    code, _, err = cli(capsys, "finetune", "--model", model_dir, "--data", data, "--quiet",
                       "--output-dir", tmp_path / "out", "--max-length", "10", "--max-steps", "1",
                       "--truncate")
    assert code == 0, err


@pytest.mark.parametrize("what", ["missing", "no config", "no tokenizer"])
def test_a_folder_that_is_not_a_model_is_one_clear_line(capsys, tmp_path, model_dir, what):
    folder = tmp_path / "m"
    if what != "missing":
        folder.mkdir()
    if what == "no tokenizer":
        (folder / "config.json").write_text((model_dir / "config.json").read_text())
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat"}])
    code, _, err = cli(capsys, "finetune", "--model", folder, "--data", data,
                       "--output-dir", tmp_path / "out")
    lines = [l for l in err.strip().splitlines() if l]
    assert code == 2 and len(lines) == 1 and str(folder) in lines[0], err
    assert {"missing": "no such folder", "no config": "no config.json",
            "no tokenizer": "no tokenizer could be loaded"}[what] in lines[0]


def test_flags_of_the_other_form_are_refused(capsys, tmp_path, model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat"}])
    code, _, err = cli(capsys, "finetune", "--model", model_dir, "--data", data, "--task", "sort",
                       "--output-dir", tmp_path / "out")
    assert code == 2 and "--task applies only to the tiny GPT" in err
    code, _, err = cli(capsys, "finetune", "--model", model_dir, "--output-dir", tmp_path / "out")
    assert code == 2 and "--model DIR and --data FILE.jsonl go together" in err


def test_16bit_adapter_gives_peft_our_logits_on_the_same_base(capsys, tmp_path, model_dir):
    """A plain LoRA run (16-bit base): PEFT on the untouched base computes what our model does."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qlora_ref

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    code, _, err = cli(capsys, "finetune", "--model", model_dir, "--data", data, "--quant-bits",
                       "16", "--max-steps", "5", "--lr", "1e-2", "--output-dir", tmp_path / "o",
                       "--quiet")
    assert code == 0, err
    theirs_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "o" / "adapter")).eval()
    ours = qlora_ref.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir),
                                  tmp_path / "o" / "adapter").eval()
    ids = AutoTokenizer.from_pretrained(model_dir)([p for p, _ in PAIRS],
                                                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        theirs, mine = theirs_model(input_ids=ids).logits, ours(input_ids=ids).logits
    assert not torch.allclose(theirs, AutoModelForCausalLM.from_pretrained(model_dir)(
        input_ids=ids).logits), "control: the adapter changes the logits"
    assert torch.allclose(theirs, mine, atol=1e-5, rtol=1e-5), (theirs - mine).abs().max()


def test_generate_on_the_shipped_tiny_gpt(capsys):
    from qlora_ref.train.tasks import VOCAB

    code, out, err = cli(capsys, "generate", "--prompt", "s3141=", "--max-new-tokens", "5")
    assert code == 0, err
    assert set(out.strip()) <= set(VOCAB), out
    code, _, err = cli(capsys, "generate", "--prompt", "hello")
    assert code == 2 and "tiny GPT's prompt may use only" in err


def test_the_named_sentiment_configuration_takes_a_local_model_and_data(tmp_path, model_dir):
    """The shipped seed-style config (NF4, r 8, alpha 16, lr 2e-4, 3 epochs, batch 8, accumulation 4)
    names a hub model; --model DIR and --data FILE replace its folder and file."""
    from qlora_ref.cli import apply_defaults, build_parser
    from qlora_ref.cli.finetune import _finetune_config
    from qlora_ref.train.hf_finetune import HFFinetuneConfig

    shipped = __import__("qlora_ref").__file__.replace("__init__.py", "configs/finetune_configs.json")
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "the cat"}])
    args = apply_defaults(build_parser("finetune").parse_args(
        ["finetune", "--config", shipped, "sentiment_bloom560m_4bits_r8", "--model",
         str(model_dir), "--data", str(data)]))
    config = _finetune_config(args)
    assert isinstance(config, HFFinetuneConfig)
    assert (config.base_model, config.dataset_path) == (str(model_dir), str(data))
    assert (config.quant_bits, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == (4, "nf4", True)
    assert (config.r, config.lora_alpha, config.learning_rate, config.num_train_epochs) == (8, 16, 2e-4, 3)
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (8, 4)


# ----------------------------------------------------------------------------- the one loop on --model
# The --model path runs qlora_ref.train.loop, the tiny GPT's loop: checkpoints, --resume to
# byte-equal adapters, refusal of a changed config, divergence, --overwrite, checks first.

#: A short run with dropout (so a resume must restore the RNG) and a checkpoint every 2 steps.
LOOP = ["--max-steps", "6", "--save-steps", "2", "--lr", "1e-2", "--batch-size", "2",
        "--lora-dropout", "0.1", "--quiet"]


@pytest.fixture(scope="module")
def pairs_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl",
                       [{"prompt": p, "completion": c} for p, c in PAIRS])


@pytest.fixture(scope="module")
def straight(model_dir, pairs_data, tmp_path_factory):
    """An uninterrupted 6-step run of LOOP: the reference for every resume below."""
    out = tmp_path_factory.mktemp("straight") / "out"
    assert main(["finetune", "--model", str(model_dir), "--data", str(pairs_data),
                 "--output-dir", str(out), *LOOP]) == 0
    return out


def test_model_path_saves_checkpoints_and_a_resumed_run_ends_byte_equal(capsys, tmp_path, model_dir,
                                                                       pairs_data, straight):
    root = straight / "checkpoint"
    assert (root / "LATEST").read_text().strip() == "step-000006"
    assert {p.name for p in root.glob("step-*")} == {"step-000004", "step-000006"}
    assert (root / "step-000006" / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (straight / "adapter" / "adapter_model.safetensors").read_bytes()
    out = tmp_path / "out"
    base = ["finetune", "--model", model_dir, "--data", pairs_data, "--output-dir", out, *LOOP]
    code, _, err = cli(capsys, *base, "--stop-after", "3")
    assert code == 0, err
    assert (out / "checkpoint" / "LATEST").read_text().strip() == "step-000003"
    code, _, err = cli(capsys, *base, "--resume", out)
    assert code == 0, err
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / "adapter" / name).read_bytes() == (straight / "adapter" / name).read_bytes(), name
    got, want = (json.loads((d / "report.json").read_text()) for d in (out, straight))
    assert got["history"] == want["history"] and got["resumed_from_step"] == 3


def test_model_path_resume_refuses_another_config_or_data(capsys, tmp_path, model_dir, pairs_data,
                                                          straight):
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": p, "completion": "neutral"}
                                                   for p, _ in PAIRS])
    cases = [(["--data", pairs_data, "--lr", "2e-2"], "trained with learning_rate=0.01, this run "
                                                      "has learning_rate=0.02"),
             (["--data", pairs_data, "--r", "4"], "trained with r=8, this run has r=4"),
             (["--data", other], "was trained on another data file"),
             (["--data", pairs_data, "--max-steps", "4"], "is at step 6, past this run's 4 steps")]
    for extra, message in cases:
        args = [a for a in LOOP if a != "--quiet"]
        code, out, err = cli(capsys, "finetune", "--model", model_dir, *args, *extra,
                             "--resume", straight, "--output-dir", tmp_path / "o")
        lines = [l for l in err.splitlines() if l.strip()]
        assert code == 2 and len(lines) == 1 and message in lines[0], (extra, err)
        assert out == "" and not (tmp_path / "o").exists(), "refused after the banner or the folder"


ZYGOTE = zygote_source("\n".join([
    'import transformers, peft  # noqa: F401',
    'import qlora_ref.cli, qlora_ref.train.hf_finetune, qlora_ref.train.report  # noqa: F401']))

#: (QLORA_REF_FAULT_AFTER, the step LATEST names after the kill), a checkpoint every step:
#: a kill in the middle of writing each file of checkpoint s leaves checkpoint s - 1.
KILLS = [("training_state.safetensors:half@2", 1), ("trainer_state.json:half@3", 2),
         ("adapter/adapter_config.json:half@4", 3), ("adapter/adapter_model.safetensors:half@5", 4),
         ("manifest.json:half@6", 5), ("step@7", 6)]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="forks a warm parent and kills with SIGKILL (Linux)")
def test_model_path_killed_during_each_checkpoint_file_resumes_byte_equal(tmp_path, model_dir,
                                                                          pairs_data):
    """kill -9 while each checkpoint file is half written, then --resume: the uninterrupted adapter."""
    from qlora_ref.train import checkpoint as ckpt

    common = ["finetune", "--model", str(model_dir), "--data", str(pairs_data), "--max-steps", "8",
              "--save-steps", "1", "--lr", "1e-2", "--batch-size", "2", "--lora-dropout", "0.1",
              "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1")
    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    out, root = tmp_path / "run", tmp_path / "run" / "checkpoint"

    def run(argv, fault, name):
        zygote.stdin.write(json.dumps({"argv": [str(a) for a in argv], "log": str(tmp_path / name),
                                       "env": {ckpt.FAULT_ENV: fault} if fault else {}}) + "\n")
        zygote.stdin.flush()
        return json.loads(zygote.stdout.readline())["code"], (tmp_path / name).read_text()

    try:
        assert zygote.stdout.readline().strip() == "ready"
        code, log = run(common + ["--output-dir", tmp_path / "reference"], None, "reference.log")
        assert code == 0, log
        resume = []
        for i, (fault, expected) in enumerate(KILLS):
            code, log = run(common + ["--output-dir", out, *resume], fault, f"{i}.log")
            assert code == -signal.SIGKILL, f"{fault}: exit {code}, not killed\n{log}"
            assert ckpt.find_checkpoint(root) == (root / f"step-{expected:06d}", None), fault
            resume = ["--resume", out]
        code, log = run(common + ["--output-dir", out, *resume], None, "final.log")
        assert code == 0, log
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=60)
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json"):
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def test_model_path_infinite_gradient_norm_is_divergence_not_a_finite_loss(capsys, tmp_path,
                                                                          model_dir, pairs_data,
                                                                          monkeypatch):
    """A finite loss with an infinite gradient (what a float16 overflow in the backward gives)."""
    clip = torch.nn.utils.clip_grad_norm_

    def overflowing(parameters, *args, **kwargs):
        parameters = list(parameters)
        parameters[0].grad[0] = float("inf")
        return clip(parameters, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", overflowing)
    out = tmp_path / "out"
    code, _, err = cli(capsys, "finetune", "--model", model_dir, "--data", pairs_data,
                       "--output-dir", out, *LOOP)
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "gradient norm became inf at step 1" in lines[0] and "No checkpoint was written" in lines[0]
    assert not (out / "adapter").exists() and not (out / "report.json").exists()


def test_model_path_refuses_an_earlier_runs_folder_unless_overwrite(capsys, tmp_path, model_dir,
                                                                   pairs_data):
    out = tmp_path / "out"
    base = ["finetune", "--model", model_dir, "--data", pairs_data, "--output-dir", out,
            "--batch-size", "2", "--quiet"]
    code, _, err = cli(capsys, *base, "--max-steps", "3", "--save-steps", "1")
    assert code == 0, err
    first = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    code, _, err = cli(capsys, *base, "--max-steps", "2", "--lr", "1e-2")
    lines = [l for l in err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and f"{out} holds an earlier run's adapter" in lines[0], err
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == first, "the old one is kept"
    code, _, err = cli(capsys, *base, "--max-steps", "2", "--lr", "1e-2", "--overwrite")
    assert code == 0, err
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() != first
    # the earlier run's checkpoints (steps 2 and 3) are gone: a later --resume cannot mix the two runs
    assert sorted(p.name for p in (out / "checkpoint").glob("step-*")) == ["step-000002"]
    assert json.loads((out / "report.json").read_text())["steps"] == 2


def test_bad_input_creates_nothing_and_prints_no_banner(capsys, tmp_path, model_dir, pairs_data):
    import qlora_ref

    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"prompt": "a"}\n')
    bad_config = tmp_path / "c.json"
    bad_config.write_text(json.dumps({"c": {"dataset_path": str(pairs_data), "lora_rank": 4}}))
    inside = Path(qlora_ref.__file__).parent / "runs-test-never-created"
    out = tmp_path / "new" / "out"
    cases = [(["--model", model_dir, "--data", bad_data], out, "field 'completion' is missing"),
             (["--model", tmp_path / "nowhere", "--data", pairs_data], out, "no such folder"),
             (["--model", model_dir, "--data", tmp_path / "none.jsonl"], out, "none.jsonl"),
             (["--config", bad_config, "c", "--model", model_dir], out, "unknown field 'lora_rank'"),
             (["--model", model_dir, "--data", pairs_data, "--resume", tmp_path / "nowhere"], out,
              "no checkpoint at"),
             (["--model", model_dir, "--data", pairs_data], inside, "inside the installed package")]
    for args, where, message in cases:
        code, stdout, err = cli(capsys, "finetune", *args, "--output-dir", where, "--max-steps", "1")
        lines = [l for l in err.splitlines() if l.strip()]
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, err)
        assert stdout == "", f"{args}: the banner was printed before the check: {stdout!r}"
        assert not where.exists() and not (tmp_path / "new").exists(), f"{args}: {where} was created"


def test_full_finetune_on_a_model_trains_every_weight_and_saves_a_model_folder(capsys, tmp_path,
                                                                             model_dir, pairs_data):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    code, _, err = cli(capsys, "finetune", "--model", model_dir, "--data", pairs_data, "--output-dir",
                       out, "--full-finetune", "--max-steps", "3", "--lr", "1e-3", "--batch-size", "2",
                       "--quiet")
    assert code == 0, err
    assert not (out / "adapter").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["parameters"]["trainable"] == report["parameters"]["total"]
    tuned = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.embed_tokens.weight" in changed
    code, text, err = cli(capsys, "generate", "--model", out / "model", "--prompt", PAIRS[0][0],
                          "--max-new-tokens", "2")
    assert code == 0, err  # the folder holds the tokenizer too


def test_hf_finetune_as_a_library_call_writes_nothing_and_returns_model_and_history(tmp_path,
                                                                                   model_dir,
                                                                                   pairs_data,
                                                                                   monkeypatch):
    """What an experiment script loops over: no output folder, no evaluation, loss history back."""
    from qlora_ref.train.hf_finetune import (HFFinetuneConfig, completion_loss, encode_examples,
                                             hf_finetune, load_tokenizer)
    from qlora_ref.train.jsonl import read_examples

    monkeypatch.chdir(tmp_path)
    config = HFFinetuneConfig(base_model=str(model_dir), dataset_path=str(pairs_data), max_steps=4,
                              learning_rate=1e-2, per_device_train_batch_size=2, lora_dropout=0.0)
    result = hf_finetune(config, device="cpu", progress=False, evaluate=False)
    assert [s for s, _ in result.history] == [1, 2, 3, 4] and result.before == result.after == {}
    assert list(tmp_path.iterdir()) == [], "a library call without output_dir wrote files"
    tokenizer = load_tokenizer(model_dir)
    encoded = encode_examples(read_examples(pairs_data), tokenizer, max_length=64)
    loss = completion_loss(result.model, encoded, tokenizer.pad_token_id, "cpu")
    again = hf_finetune(config, device="cpu", progress=False, evaluate=False)
    assert again.history == result.history, "the same config gives the same run"
    assert completion_loss(again.model, encoded, tokenizer.pad_token_id, "cpu") == loss


def _shrunk_copy(model_dir, dest, **config_changes):
    """A copy of the tiny Llama folder whose config.json (and weights) differ as given."""
    from transformers import AutoConfig, LlamaForCausalLM

    shutil.copytree(model_dir, dest)
    config = AutoConfig.from_pretrained(dest)
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dest)
    return dest


@pytest.mark.parametrize("command", ["finetune", "generate"])
def test_a_vocabulary_smaller_than_the_tokenizer_is_one_line_not_an_index_error(
        capsys, tmp_path, model_dir, pairs_data, command):
    folder = _shrunk_copy(model_dir, tmp_path / "small-vocab", vocab_size=8)
    capsys.readouterr()  # transformers' "Writing model shards" bar
    args = (["finetune", "--model", folder, "--data", pairs_data, "--max-steps", "1",
             "--output-dir", tmp_path / "o", "--quiet"] if command == "finetune" else
            ["generate", "--model", folder, "--prompt", "review: great product ->"])
    code, _, err = cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "embedding has 8 rows" in lines[0], err


def test_sequences_longer_than_the_models_positions_are_one_line(capsys, tmp_path, model_dir):
    folder = _shrunk_copy(model_dir, tmp_path / "short", max_position_embeddings=4)
    capsys.readouterr()  # transformers' "Writing model shards" bar
    code, _, err = cli(capsys, "generate", "--model", folder, "--prompt", "review: great product ->",
                       "--max-new-tokens", "8")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "longer than the model's 4 positions" in lines[0], err


def test_an_adapter_whose_base_folder_is_gone_says_so(capsys, tmp_path, run):
    adapter = tmp_path / "adapter"
    shutil.copytree(run / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved-away")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = cli(capsys, "generate", "--adapter", adapter, "--prompt", "review: great product ->")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "which is missing" in lines[0], err
