"""Specification of the main job's pieces: the tiny GPT, the toy tasks, the base model."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file

from qlora_ref.train.gpt import GPT, GPTConfig
from qlora_ref.train.pretrain import (
    default_base_model_path, default_config, load_base_model, pretrain, save_base_model,
)
from qlora_ref.train.tasks import (
    DEFAULT_FINETUNE_TASK, EOS, EVAL_SIZE, FINETUNE_DIGITS, FINETUNE_TASKS, PAD_ID,
    PRETRAIN_DIGITS, PRETRAIN_TASKS, TASKS, VOCAB, decode, encode, evaluate, evaluate_pairs,
    get_task, held_out, make_batch, validation_set,
)

TINY = GPTConfig(vocab_size=len(VOCAB), block_size=32, n_layer=2, n_head=2, n_embd=16)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base():
    return load_base_model()


# ---------------------------------------------------------------- GPT


def test_logits_shape_and_named_linear_projections():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx = torch.randint(0, TINY.vocab_size, (3, 7))
    logits, loss = model(idx)
    assert logits.shape == (3, 7, TINY.vocab_size) and loss is None
    for block in model.blocks:
        for name in PROJECTIONS:
            owner = block.attn if name in PROJECTIONS[:4] else block.mlp
            assert type(getattr(owner, name)) is torch.nn.Linear, name
    assert type(model.lm_head) is torch.nn.Linear
    assert model.lm_head.weight.data_ptr() != model.wte.weight.data_ptr(), "lm_head must be untied"


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 12))
    t = 8
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % TINY.vocab_size
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:]), "the changed position should matter"


def test_sequence_longer_than_block_size_is_rejected():
    with pytest.raises(ValueError, match="block_size"):
        GPT(TINY)(torch.zeros(1, TINY.block_size + 1, dtype=torch.long))


def test_loss_counts_only_answer_tokens():
    torch.manual_seed(0)
    model = GPT(TINY)
    x, y, mask = make_batch("sort", 8, np.random.default_rng(0), TINY.block_size)
    logits, loss = model(x, y, mask)
    # the same loss whatever the targets are where the mask is 0
    scrambled = torch.where(mask.bool(), y, torch.randint_like(y, TINY.vocab_size))
    torch.testing.assert_close(model(x, scrambled, mask)[1], loss)
    # and it is the mean cross-entropy over the masked positions
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, y[..., None])[..., 0]
    torch.testing.assert_close(loss, nll[mask.bool()].mean())


def test_generate_greedy_appends_tokens():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    out = model.generate_greedy(torch.zeros(2, 3, dtype=torch.long), 5)
    assert out.shape == (2, 8) and torch.equal(out[:, :3], torch.zeros(2, 3, dtype=torch.long))


# ---------------------------------------------------------------- tasks


@given(st.text(alphabet=VOCAB, max_size=40))
def test_encode_decode_round_trip(text):
    ids = encode(text)
    assert all(0 <= i < len(VOCAB) for i in ids)
    assert decode(ids) == text


def test_vocabulary_is_small_and_unknown_characters_are_rejected():
    assert len(VOCAB) == len(set(VOCAB)) <= 32
    with pytest.raises(ValueError, match="not in VOCAB"):
        encode("x")


def test_unknown_task_lists_known_names():
    with pytest.raises(ValueError, match="known tasks: .*sort"):
        get_task("nope")
    with pytest.raises(ValueError):
        make_batch("nope", 4, np.random.default_rng(0), 32)


def test_task_families():
    assert set(PRETRAIN_TASKS) | set(FINETUNE_TASKS) | {"pretrain"} == set(TASKS)
    assert not set(PRETRAIN_TASKS) & set(FINETUNE_TASKS)
    assert DEFAULT_FINETUNE_TASK in FINETUNE_TASKS


@pytest.mark.parametrize("name", sorted(TASKS))
def test_answers_follow_the_task_rule(name):
    rules = {
        "c": lambda s: s,
        "r": lambda s: s[::-1],
        "i": lambda s: "".join(str((int(d) + 1) % 10) for d in s),
        "s": lambda s: "".join(sorted(s)),
        "u": lambda s: "".join(dict.fromkeys(s)),
        "a": lambda s: str(sum(int(n) for n in s.split("+"))),
    }
    rng = np.random.default_rng(0)
    for _ in range(200):
        prompt, answer = TASKS[name](rng)
        assert prompt.endswith("=")
        assert answer == rules[prompt[0]](prompt[1:-1]), (prompt, answer)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_batches_are_deterministic_from_the_seed(name):
    a = make_batch(name, 16, np.random.default_rng(7), 32)
    b = make_batch(name, 16, np.random.default_rng(7), 32)
    c = make_batch(name, 16, np.random.default_rng(8), 32)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(u.shape == v.shape and torch.equal(u, v) for u, v in zip(a, c))
    assert held_out(name, 50) == held_out(name, 50)


def test_batch_layout_next_token_and_answer_mask():
    x, y, mask = make_batch("reverse", 32, np.random.default_rng(0), 32)
    assert x.dtype == y.dtype == mask.dtype == torch.long
    assert x.shape == y.shape == mask.shape and x.shape[1] <= 32
    real = x[:, 1:] != PAD_ID  # x ends one token early: where y has EOS, x has PAD
    assert torch.equal(x[:, 1:][real], y[:, :-1][real])  # y is x shifted by one
    for row_x, row_y, row_m in zip(x, y, mask):
        text = decode([row_x[0].item()] + row_y.tolist()).rstrip(VOCAB[PAD_ID])  # ^prompt answer$
        prompt = text[1: text.index("=") + 1]
        answer = decode(row_y[row_m.bool()])
        assert answer == prompt[1:-1][::-1] + EOS, (text, answer)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_held_out_prompts_never_appear_in_training_batches(name):
    x, _, _ = make_batch(name, 2000, np.random.default_rng(0), 32)
    train = {decode(row).split("=")[0][1:] + "=" for row in x.tolist()}
    evaluation = {p for p, _ in held_out(name)}
    assert len(evaluation) == len(held_out(name))  # distinct
    assert not train & evaluation


@pytest.mark.parametrize("name, lengths", [*((t, PRETRAIN_DIGITS) for t in PRETRAIN_TASKS),
                                           ("sort", FINETUNE_DIGITS), ("dedup", FINETUNE_DIGITS)])
def test_inputs_have_their_family_s_digit_counts_and_every_count_occurs(name, lengths):
    # the base is pretrained on 3-8 digits, the fine-tune tasks use 3-6 (tasks.py, note on lengths)
    assert PRETRAIN_DIGITS == (3, 8) and FINETUNE_DIGITS == (3, 6)
    rng = np.random.default_rng(1)
    counts = {len(get_task(name)(rng)[0]) - 2 for _ in range(600)}  # prompt = letter digits "="
    assert counts == set(range(lengths[0], lengths[1] + 1)), (name, sorted(counts))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_the_validation_split_is_disjoint_from_the_test_examples(name):
    test = held_out(name, EVAL_SIZE - 200)
    validation = validation_set(name, 200)
    assert len(validation) == 200 and not {p for p, _ in test} & {p for p, _ in validation}
    assert validation == held_out(name)[-200:]  # fixed: the last examples of the held-out set
    with pytest.raises(ValueError, match="n must be"):
        validation_set(name, EVAL_SIZE + 1)


def test_evaluate_is_evaluate_pairs_on_the_held_out_examples():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    assert evaluate(model, "sort", n=20) == evaluate_pairs(model, held_out("sort", 20))
    with pytest.raises(ValueError, match="at least one"):
        evaluate_pairs(model, [])


# ---------------------------------------------------------------- base model


def test_save_load_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = GPT(TINY)
    path = tmp_path / "m.safetensors"
    save_base_model(model, path)
    loaded = load_base_model(path)
    assert loaded.config == TINY
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_base_model(missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        load_base_model(corrupt)


def test_pretraining_is_deterministic_from_the_seed():
    a = pretrain(TINY, steps=3, batch_size=4, seed=3, progress=False)
    b = pretrain(TINY, steps=3, batch_size=4, seed=3, progress=False)
    for k, v in a.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k


def test_shipped_base_model_loads_bit_exactly(base):
    path = default_base_model_path()
    assert path.is_file(), f"shipped base model missing at {path}"
    assert path.stat().st_size < 8 * 2**20, "the shipped model should be a few MB"
    assert base.config == default_config()
    raw = load_file(str(path))
    state = base.state_dict()
    assert raw.keys() == state.keys()
    for k, v in raw.items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize("name", PRETRAIN_TASKS)
def test_base_model_solves_its_pretraining_tasks(base, name):
    # chance of guessing 3-8 digits exactly is at most 1e-3
    result = evaluate(base, name, n=200)
    assert result["accuracy"] >= 0.95, f"{name}: accuracy {result['accuracy']:.3f} < 0.95"


def test_base_model_cannot_do_the_default_finetune_task(base):
    result = evaluate(base, DEFAULT_FINETUNE_TASK, n=200)
    assert result["accuracy"] <= 0.2, (
        f"{DEFAULT_FINETUNE_TASK}: base accuracy {result['accuracy']:.3f} > 0.2; "
        "the fine-tune would have nothing to learn"
    )
