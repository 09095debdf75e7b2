"""The checks of notebook 09's exercises reject wrong answers and the package itself, and accept the solutions.

Each check (``notebooks/exercises.py``, ``verify_*``) is fed two plausible
wrong answers, a "shortcut" that calls ``qlora_ref`` instead of computing
the answer (the exercises ask for torch alone; the check compares with the
package), and the solution from ``notebooks/solutions/09_*.py``.
"""
import importlib.util
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")
import torch.nn.functional as F  # noqa: E402

# PEFT calls a transformers method that transformers 5 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"
_spec = importlib.util.spec_from_file_location("notebooks_exercises_09", NOTEBOOKS_DIR / "exercises.py")
exercises = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(exercises)


def solution(name):
    return exercises.solution("09", name)


def rejected(verify, answer) -> str:
    with pytest.raises(AssertionError) as info:
        verify(answer)
    return str(info.value)


# ---------------------------------------------------------------- exercise 1: perplexity

def ppl_unshifted(logits, ids):
    """Scores each position's own token (no shift)."""
    return math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1)).item())


def ppl_mean_of_windows(logits, ids):
    """The mean of the windows' perplexities instead of the perplexity of all tokens."""
    return sum(math.exp(F.cross_entropy(lg[:-1], i[1:]).item()) for lg, i in zip(logits, ids)) / len(ids)


def ppl_through_the_package(logits, ids):
    from qlora_ref.train.perplexity import perplexity
    return perplexity(exercises._replay_model(logits), ids)["perplexity"]


# ---------------------------------------------------------------- exercise 2: LoRA parameters

def lora_without_gqa(config, r):
    """k and v as wide as q (forgets grouped-query attention)."""
    h, m = config.hidden_size, config.intermediate_size
    return config.num_hidden_layers * r * (4 * 2 * h + 3 * (h + m))


def lora_with_the_head(config, r):
    """Right per layer, but also adapts the output head."""
    return solution("lora_parameters")(config, r) + r * (config.hidden_size + config.vocab_size)


def lora_through_the_package(config, r):
    import transformers

    import qlora_ref
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    return qlora_ref.trainable_parameters(qlora_ref.prepare_model(model, r=r, quant_type=None)).trainable


# ---------------------------------------------------------------- exercise 3: completion loss

def loss_unshifted(logits, labels):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)).item()


def loss_mean_of_rows(logits, labels):
    """Each row's mean, then the mean over rows (rows with short completions weigh too much)."""
    rows = [F.cross_entropy(lg[:-1], lab[1:], ignore_index=-100) for lg, lab in zip(logits, labels)]
    return torch.stack(rows).mean().item()


def loss_through_the_package(logits, labels):
    from qlora_ref.train.hf_finetune import completion_loss
    encoded = [(row.tolist(), lab.tolist()) for row, lab in zip(labels.clamp(min=0), labels)]
    return completion_loss(exercises._replay_model(logits), encoded, 0, "cpu", len(encoded))


# ---------------------------------------------------------------- every check, one table

#: check -> (solution name, plausible wrong answers, what the rejection says, the package shortcut)
CHECKS = {
    "perplexity": (exercises.verify_perplexity_from_logits, "perplexity_from_logits",
                   [ppl_unshifted, ppl_mean_of_windows], "yours", ppl_through_the_package),
    "lora parameters": (exercises.verify_lora_parameters, "lora_parameters",
                        [lora_without_gqa, lora_with_the_head], "PEFT trains",
                        lora_through_the_package),
    "completion loss": (exercises.verify_completion_loss_from_logits, "completion_loss_from_logits",
                        [loss_unshifted, loss_mean_of_rows], "yours", loss_through_the_package),
}
WRONG = [(name, i) for name, case in CHECKS.items() for i in range(len(case[2]))]


@pytest.mark.parametrize("name, i", WRONG)
def test_each_check_rejects_its_wrong_answers(name, i):
    verify, _, wrong, says, _ = CHECKS[name]
    assert says in rejected(verify, wrong[i])


@pytest.mark.parametrize("name", CHECKS)
def test_each_check_rejects_calling_the_package(name):
    verify, _, _, _, shortcut = CHECKS[name]
    assert "calls qlora_ref" in rejected(verify, shortcut)


@pytest.mark.parametrize("name", CHECKS)
def test_each_check_accepts_the_solution(name):
    verify, solution_name, _, _, _ = CHECKS[name]
    verify(solution(solution_name))


def test_catching_the_guard_does_not_help():
    """A function that swallows the guard's error and answers anyway is still rejected."""
    def sly(logits, ids):
        try:
            return ppl_through_the_package(logits, ids)
        except AssertionError:
            return ppl_through_the_package(logits, ids)   # the profiler is off now
    assert "calls qlora_ref" in rejected(exercises.verify_perplexity_from_logits, sly)


def test_placeholder_is_not_done():
    with pytest.raises(exercises.NotDone):
        exercises.verify_perplexity_from_logits(lambda logits, ids: None)
