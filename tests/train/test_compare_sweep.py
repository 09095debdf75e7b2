"""``compare``'s learning-rate sweep: each arm's rate is chosen on validation, never on test.

The sweep (:func:`qlora_ref.train.compare.run_sweep`) runs every learning rate
of an arm's grid on one seed, keeps the one with the best *validation*
accuracy (:func:`qlora_ref.train.tasks.validation_set`, disjoint from the test
examples), and reports the test results of fresh seeds at that rate.
"""
import json
import types

import pytest

from qlora_ref.train import compare, tasks
from qlora_ref.train.compare import choose_learning_rate, format_sweep, run_sweep, write_sweep
from qlora_ref.train.finetune import FinetuneConfig

ARM = "QLoRA NF4 + DQ"


def trial(val_acc, val_loss, test_acc):
    return {"validation": {"accuracy": val_acc, "loss": val_loss},
            "test": {"accuracy": test_acc, "loss": 1.0}}


def test_the_best_validation_accuracy_wins_whatever_the_test_says():
    trials = {1e-3: trial(0.50, 0.9, 0.99), 3e-3: trial(0.70, 0.5, 0.10), 1e-2: trial(0.60, 0.4, 0.90)}
    assert choose_learning_rate(trials) == 3e-3


def test_ties_go_to_the_lower_validation_loss_then_the_smaller_rate():
    assert choose_learning_rate({1e-3: trial(0.5, 0.9, 0), 3e-3: trial(0.5, 0.4, 0)}) == 3e-3
    assert choose_learning_rate({3e-3: trial(0.5, 0.4, 0), 1e-3: trial(0.5, 0.4, 0)}) == 1e-3


@pytest.mark.parametrize("bad", [{}, {1e-3: {"test": {"accuracy": 1.0, "loss": 0.0}}},
                                 {1e-3: trial(float("nan"), 0.1, 0.0)}])
def test_trials_without_finite_validation_results_are_refused(bad):
    with pytest.raises(ValueError):
        choose_learning_rate(bad)


def test_run_sweep_chooses_on_validation_and_reports_fresh_seeds_at_that_rate(monkeypatch, tmp_path):
    """With training replaced by a stand-in whose test and validation results disagree."""
    validation_acc = {1e-3: 0.2, 1e-2: 0.8}  # validation prefers 1e-2 ...
    test_acc = {1e-3: 0.9, 1e-2: 0.1}       # ... test would prefer 1e-3
    calls = []

    def fake_finetune(config, **kw):
        calls.append((config.learning_rate, config.seed))
        model = types.SimpleNamespace(lr=config.learning_rate)
        return types.SimpleNamespace(after={"accuracy": test_acc[config.learning_rate], "loss": 1.0},
                                     model=model, seconds=0.0, steps=1)

    seen_pairs = []

    def fake_evaluate_pairs(model, pairs):
        seen_pairs.append(list(pairs))
        return {"accuracy": validation_acc[model.lr], "loss": 1.0}

    monkeypatch.setattr(compare, "finetune", fake_finetune)
    monkeypatch.setattr(compare.tasks, "evaluate_pairs", fake_evaluate_pairs)
    base = FinetuneConfig(eval_size=100)
    result = run_sweep(arms=[ARM], lr_grid={ARM: (1e-3, 1e-2)}, sweep_seed=7, seeds=(0, 1, 2),
                       base_config=base, validation_size=50, output_dir=tmp_path, progress=False)
    arm = result["arms"][ARM]
    assert arm["chosen_lr"] == 1e-2
    assert calls == [(1e-3, 7), (1e-2, 7), (1e-2, 0), (1e-2, 1), (1e-2, 2)]
    assert [r["test"]["accuracy"] for r in arm["runs"]] == [0.1] * 3
    # validation examples: the task's validation split, none of the test examples
    test_prompts = {p for p, _ in tasks.held_out(base.task, base.eval_size)}
    assert all(pairs == tasks.validation_set(base.task, 50) for pairs in seen_pairs)
    assert not test_prompts & {p for p, _ in seen_pairs[0]}
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["summary"][ARM]["accuracy"] == pytest.approx({"mean": 0.1, "sd": 0.0, "min": 0.1, "max": 0.1})
    assert "| QLoRA NF4 + DQ | 0.01 |" in (tmp_path / "sweep.md").read_text()


def test_test_and_validation_sizes_that_would_overlap_are_refused():
    with pytest.raises(ValueError, match="overlap"):
        run_sweep(arms=[ARM], base_config=FinetuneConfig(eval_size=400), validation_size=200,
                  progress=False)


def test_a_real_sweep_of_two_steps_runs_end_to_end(tmp_path):
    base = FinetuneConfig(max_steps=2, train_size=64, eval_size=10)
    result = run_sweep(arms=[ARM], lr_grid={ARM: (1e-3, 1e-2)}, seeds=(0, 1), base_config=base,
                       validation_size=10, progress=False)
    arm = result["arms"][ARM]
    assert arm["chosen_lr"] == choose_learning_rate(arm["trials"])
    assert [r["seed"] for r in arm["runs"]] == [0, 1]
    assert all(r["learning_rate"] == arm["chosen_lr"] and r["steps"] == 2 for r in arm["runs"])
    write_sweep(result, tmp_path, name="s")
    assert "over 2 seeds" in format_sweep(result) and (tmp_path / "s.md").is_file()
