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

import pytest
import torch

from qlora_ref.cli import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

#: A memorisable data set: each review word maps to one label.
PAIRS = [("review: great product ->", "positive"), ("review: awful product ->", "negative"),
         ("review: plain product ->", "neutral"), ("review: lovely product ->", "positive")]
WORDS = ("review : great awful plain lovely product -> positive negative neutral the cat sat on "
         "mat ### Instruction Input Response label this")


def cli(capsys, *args):
    """Run ``qlora-ref ARGS`` in-process; return (status, stdout, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer, saved as a Hugging Face model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([WORDS], trainers.WordLevelTrainer(
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, initializer_range=0.25,
                         # (0.25, not 0.02: the frozen output head must allow confident logits)
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


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
    from qlora_ref.cli import _finetune_config, apply_defaults, build_parser
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
