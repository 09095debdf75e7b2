"""Table 3 in miniature on a real model (:mod:`qlora_ref.train.real_compare`): its parts, cheaply.

The experiment itself runs SmolLM2 for tens of minutes (``docs/experiments.md``);
here its pieces are specified on the shipped data file and on a tiny Llama
built from a config: the splits, the scorer, the learning-rate choice, the
paired table, one training step of each kind of arm, and the course page's
recipe as a named config.
"""
from pathlib import Path

import pytest
import torch

from qlora_ref.train import real_compare as rc
from qlora_ref.train.finetune import load_config
from qlora_ref.train.hf_finetune import completion_loss

CONFIGS = Path(rc.__file__).resolve().parents[1] / "configs" / "finetune_configs.json"


# ----------------------------------------------------------------------------- data

def test_the_shipped_pairs_are_unique_countries_with_one_capital_each():
    pairs = rc.load_pairs()
    assert len(pairs) >= 150
    countries = [c for c, _ in pairs]
    assert len(set(countries)) == len(countries)
    assert all(c.strip() == c and a.strip() == a and a for c, a in pairs)
    assert dict(pairs)["France"] == "Paris" and dict(pairs)["Japan"] == "Tokyo"


def test_splits_are_deterministic_disjoint_and_cover_every_pair():
    pairs = rc.load_pairs()
    first, again = rc.split_pairs(pairs), rc.split_pairs(list(reversed(pairs)))
    assert first == again  # the order of the file does not matter, only the split seed
    sizes = {k: len(v) for k, v in first.items()}
    assert sizes["test"] == rc.N_TEST and sizes["validation"] == rc.N_VALIDATION
    countries = {k: {c for c, _ in v} for k, v in first.items()}
    assert not countries["train"] & countries["validation"]
    assert not countries["train"] & countries["test"]
    assert not countries["validation"] & countries["test"]
    assert sorted(first["train"] + first["validation"] + first["test"]) == pairs
    assert rc.split_pairs(pairs, seed=rc.SPLIT_SEED + 1) != first  # the seed does choose


def test_a_split_that_leaves_no_training_pairs_is_refused():
    with pytest.raises(ValueError, match="no training pairs"):
        rc.split_pairs(rc.load_pairs()[:10], n_validation=5, n_test=5)


def test_a_duplicated_country_in_the_data_file_is_refused(tmp_path):
    path = tmp_path / "caps.json"
    path.write_text('{"pairs": [["France", "Paris"], ["France", "Lyon"]]}')
    with pytest.raises(ValueError, match="listed twice"):
        rc.load_pairs(path)


def test_examples_put_the_capital_after_the_prompt_with_a_space():
    (example,) = rc.to_examples([("France", "Paris")])
    assert example.prompt == "The capital of France is" and example.completion == " Paris"


def test_written_splits_read_back_as_the_same_examples(tmp_path):
    from qlora_ref.train.jsonl import read_examples

    paths = rc.write_splits(tmp_path)
    splits = rc.split_pairs(rc.load_pairs())
    for name, path in paths.items():
        got = [(e.prompt, e.completion) for e in read_examples(path)]
        assert got == [(e.prompt, e.completion) for e in rc.to_examples(splits[name])]


# ----------------------------------------------------------------------------- scorer

@pytest.mark.parametrize("generated", ["Paris", " Paris", " Paris\n"])
def test_exact_match_accepts_the_answer_alone(generated):
    assert rc.exact_match(generated, "Paris")


@pytest.mark.parametrize("generated", [" Paris.", " paris", " Lyon", " Parisian", "",
                                       " the capital of France is Paris", " Paris is big"])
def test_exact_match_rejects_anything_else(generated):
    assert not rc.exact_match(generated, "Paris")


@pytest.mark.parametrize("generated, ok", [(" Paris.", True), (" Paris\n\nThe", True),
                                           (" Paris", True), (" Parish", False),
                                           (" Paris2", False), (" Lyon. Paris", False),
                                           (" the city of Paris", False)])
def test_prefix_match_wants_the_answer_first_as_a_whole_word(generated, ok):
    assert rc.prefix_match(generated, "Paris") is ok


def test_prefix_match_of_a_capital_with_punctuation_inside():
    assert rc.prefix_match(" Washington, D.C. is", "Washington, D.C.")
    assert not rc.prefix_match(" Washington state", "Washington, D.C.")


# ----------------------------------------------------------------------------- choice and table

def trial(loss):
    return {"validation": {"completion_loss": loss}}


def test_the_learning_rate_with_the_lowest_validation_loss_is_chosen():
    assert rc.choose_learning_rate({1e-3: trial(2.0), 3e-3: trial(1.5), 1e-2: trial(1.7)}) == 3e-3
    assert rc.choose_learning_rate({3e-3: trial(1.5), 1e-3: trial(1.5)}) == 1e-3  # tie: smaller
    assert rc.choose_learning_rate({1e-2: trial(float("nan")), 1e-3: trial(9.0)}) == 1e-3
    with pytest.raises(ValueError):
        rc.choose_learning_rate({1e-2: trial(float("inf"))})


def fake_result(arm_scores: dict) -> dict:
    """A result whose runs have the given test exact match per seed."""
    arms = {}
    for arm, scores in arm_scores.items():
        runs = [{"seed": seed, "learning_rate": 1e-3, "seconds": 1.0,
                 "test": {"exact_match": s, "prefix_match": s, "answer_loss": 1 - s,
                          "completion_loss": 2 - s}} for seed, s in enumerate(scores)]
        arms[arm] = {"trials": {"0.001": {"validation": {"completion_loss": 1.0}}},
                     "chosen_lr": 1e-3, "runs": runs}
    base = {"exact_match": 0.0, "prefix_match": 0.2, "answer_loss": 2.0, "completion_loss": 6.0}
    return {"model": "m", "seeds": [0, 1, 2], "steps": 2, "batch_size": 8, "prompt": rc.PROMPT,
            "sizes": {"train": 1, "validation": 1, "test": 1}, "arms": arms,
            "base": {"test": base}, "seconds": 1.0}


def test_differences_to_16_bit_lora_are_paired_by_seed():
    # NF4 is 0.1 below LoRA at every seed, though both vary a lot across seeds
    result = fake_result({"LoRA, 16-bit base": [0.2, 0.5, 0.8], "QLoRA NF4 + DQ": [0.1, 0.4, 0.7]})
    s = rc.summary(result)
    mean, sd = s["QLoRA NF4 + DQ"]["exact_match_vs_lora16"]
    assert mean == pytest.approx(-0.1) and sd == pytest.approx(0.0, abs=1e-12)
    assert s["QLoRA NF4 + DQ"]["exact_match"][1] == pytest.approx(0.3)  # unpaired sd is large
    assert s["LoRA, 16-bit base"]["exact_match_vs_lora16"] is None
    table = rc.format_table(result)
    assert "-0.100 ± 0.000" in table and "float32 base, not fine-tuned" in table


def test_merging_parts_refuses_an_arm_twice_and_different_settings():
    a = fake_result({"QLoRA FP4": [0.1, 0.2, 0.3]})
    b = fake_result({"LoRA, 16-bit base": [0.2, 0.3, 0.4]})
    merged = rc.merge_results([a, b])
    assert list(merged["arms"]) == ["QLoRA FP4", "LoRA, 16-bit base"]
    with pytest.raises(ValueError, match="in two parts"):
        rc.merge_results([a, a])
    with pytest.raises(ValueError, match="differ in steps"):
        rc.merge_results([a, {**b, "steps": 3}])


# ----------------------------------------------------------------------------- arms on a tiny Llama

@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                         initializer_range=0.25, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def examples():
    """Eight 'prompt -> completion' sequences: prompt labels are -100, then two answer tokens."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(8):
        prompt = torch.randint(3, 40, (5,), generator=g).tolist()
        answer = [prompt[0], 1]                                    # copy the first token, then EOS
        out.append((prompt + answer, [-100] * 5 + answer))
    return out


@pytest.mark.parametrize("arm", list(rc.ARMS))
def test_two_steps_of_each_arm_lower_the_training_loss(tiny_llama, arm):
    data = examples()
    shared = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    model = rc.build_arm(tiny_llama, arm)
    rc.reset_adapters(model, seed=0)
    before = completion_loss(model, data, pad_id=0, device="cpu")
    lr = rc.LR_GRID[arm][-1]
    history = rc.train_steps(model, data, pad_id=0, steps=2, lr=lr, seed=0, batch_size=8)
    after = completion_loss(model, data, pad_id=0, device="cpu")
    assert [s for s, _ in history] == [1, 2]
    assert after < before, f"{arm}: loss {before:.4f} -> {after:.4f} after 2 steps at lr {lr}"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if arm == "full fine-tuning":
        assert trainable == {n for n, _ in model.named_parameters()}
    else:
        assert trainable and all("lora_" in n for n in trainable)
    # the arm trained a copy: the base the arms share is untouched
    assert all(torch.equal(v, shared[k]) for k, v in tiny_llama.state_dict().items())


def test_the_4bit_arms_store_their_base_in_their_data_type(tiny_llama):
    nf4 = rc.build_arm(tiny_llama, "QLoRA NF4 + DQ")
    fp4 = rc.build_arm(tiny_llama, "QLoRA FP4")
    layer = nf4.model.layers[0].self_attn.q_proj.base_layer
    assert layer.quant_config()["quant_type"] == "nf4"
    assert fp4.model.layers[0].self_attn.q_proj.base_layer.quant_config()["quant_type"] == "fp4"
    w = tiny_llama.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(layer.dequantize(), w)  # quantization changed the weights


def test_the_course_recipe_stores_every_linear_layer_in_nf4_but_adapts_only_q_k_v(tiny_llama):
    from qlora_ref.nn import Linear4bit, LoRALinear

    model = rc.build_arm(tiny_llama, "course recipe (NF4 + DQ, q/k/v, bfloat16)")
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {"q_proj", "k_proj", "v_proj"}   # as load_in_4bit + LoraConfig(target)
    plain = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert plain == ["lm_head"]
    four_bit = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert len(four_bit) == 7 * 2 and all(m.compute_dtype == torch.bfloat16 for m in four_bit)


def test_adapters_reset_from_the_seed_only(tiny_llama):
    model = rc.build_arm(tiny_llama, "LoRA, 16-bit base")
    a = model.model.layers[0].self_attn.q_proj.lora_A
    rc.reset_adapters(model, seed=3)
    first = a.detach().clone()
    rc.reset_adapters(model, seed=4)
    assert not torch.equal(a, first)
    rc.reset_adapters(model, seed=3)
    assert torch.equal(a, first)
    assert not model.model.layers[0].self_attn.q_proj.lora_B.any()  # B = 0: output unchanged


# ----------------------------------------------------------------------------- the course page's recipe

def test_the_course_recipe_for_smollm2_loads_as_a_named_config():
    config = load_config(CONFIGS, "capitals_smollm2_course_recipe", base_model="/some/folder")
    assert (config.quant_bits, config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == \
        (4, "nf4", True)
    assert config.bnb_4bit_compute_dtype == "bfloat16"
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 16, 0.05)
    assert sorted(config.target_modules) == ["k_proj", "q_proj", "v_proj"]  # BLOOM's query_key_value


# ----------------------------------------------------------------------------- command line

def test_compare_with_a_model_runs_table3_and_quick_makes_it_short(monkeypatch, tmp_path, capsys):
    from qlora_ref.cli import main

    calls = []

    def fake_run_table3(model_dir, **kw):
        calls.append((model_dir, kw))
        return fake_result({"QLoRA NF4 + DQ": [0.5]})

    monkeypatch.setattr(rc, "run_table3", fake_run_table3)
    code = main(["compare", "--model", str(tmp_path), "--quick", "--quiet",
                 "--output-dir", str(tmp_path / "out")])
    assert code == 0 and len(calls) == 1
    model_dir, kw = calls[0]
    assert model_dir == str(tmp_path) and kw["steps"] == 4 and kw["seeds"] == [0]
    assert kw["lr_grid"] == {arm: (rc.CHOSEN_LR[arm],) for arm in rc.TABLE3_ARMS}
    assert kw["output_dir"] == str(tmp_path / "out")
    assert "| QLoRA NF4 + DQ |" in capsys.readouterr().out


def test_the_recorded_table_chose_the_rates_the_code_names_inside_its_grids():
    """``CHOSEN_LR`` (used by --quick and the named config) is what the shipped sweep chose."""
    import json

    results = Path(__file__).resolve().parents[2] / "docs" / "results" / "real_table3.json"
    arms = json.loads(results.read_text())["arms"]
    for arm, entry in arms.items():
        assert entry["chosen_lr"] == rc.CHOSEN_LR[arm], arm
        tried = sorted(float(lr) for lr in entry["trials"])
        assert tried == sorted(rc.LR_GRID[arm]), arm
        assert tried[0] < entry["chosen_lr"] < tried[-1], f"{arm}: choice on the grid's edge"
    course = load_config(CONFIGS, "capitals_smollm2_course_recipe", base_model="/some/folder")
    assert course.learning_rate == rc.CHOSEN_LR["course recipe (NF4 + DQ, q/k/v, bfloat16)"]
