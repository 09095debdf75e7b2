"""Built-in toy tasks: generated (prompt, answer) strings over a tiny vocabulary.

The QLoRA paper fine-tunes a pretrained LLaMA on instruction data and scores
exact answers (Dettmers et al. 2023, sec. 4-5). Here the "language" is a few
digit-manipulation tasks, small enough that a CPU pretrains a base model in
minutes and a LoRA fine-tune takes about a minute. Nothing is downloaded.

Every example is one character per token::

    ^ r 3 1 4 =  4 1 3 $ _ _
    BOS prompt   answer EOS PAD...

The first prompt character names the task. The base model is pretrained on
the PRETRAIN tasks; the FINE-TUNE tasks use task letters it has never seen.

=========  ======  ============  ===========================================
task       family  example       rule
=========  ======  ============  ===========================================
copy       pre     c3141=  3141  repeat the digits (3-8 of them)
reverse    pre     r3141=  1413  digits in reverse order (3-8)
increment  pre     i3149=  4250  add 1 to each digit, 9 wraps to 0 (3-8)
sort       fine    s3141=  1134  digits in ascending order (3-6; the default)
dedup      fine    u3141=  314   drop repeated digits, keep first one (3-6)
add        fine    a31+4=  35    sum of two numbers of 1-3 digits
=========  ======  ============  ===========================================

``pretrain`` is the uniform mixture of the PRETRAIN tasks.

Note (lengths): the base is pretrained on longer inputs (3-8 digits,
``PRETRAIN_DIGITS``) than the fine-tune tasks use (3-6, ``FINETUNE_DIGITS``),
as a real base model has seen more than any one fine-tune needs (see
``qlora_ref/assets/README.md``). The fine-tune tasks' examples, held-out sets
and training sets do not depend on the pretraining lengths.

Note (held-out sets): each task has a fixed evaluation set drawn from its own
seed (``EVAL_SEED``). :func:`make_batch` rejects any prompt that is in some
task's evaluation set, so training never sees an evaluation prompt. The test
examples are the first ``n`` of that set (:func:`held_out`), a validation
split for choosing hyperparameters its last ``n`` (:func:`validation_set`);
they are disjoint while the two sizes add up to at most ``EVAL_SIZE``.
"""

import zlib
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "VOCAB", "PAD", "BOS", "EOS", "PAD_ID", "BOS_ID", "EOS_ID",
    "PRETRAIN_DIGITS", "FINETUNE_DIGITS", "EVAL_SEED", "EVAL_SIZE",
    "TASKS", "PRETRAIN_TASKS", "FINETUNE_TASKS", "DEFAULT_FINETUNE_TASK",
    "encode", "decode", "get_task", "held_out", "validation_set", "make_batch", "evaluate",
    "evaluate_pairs", "sample_pairs", "encode_pairs",
]

# ----------------------------------------------------------------------------
# vocabulary: one token per character

PAD, BOS, EOS = "_", "^", "$"
VOCAB = PAD + BOS + EOS + "0123456789" + "=+" + "criusa"  # 21 tokens
PAD_ID, BOS_ID, EOS_ID = VOCAB.index(PAD), VOCAB.index(BOS), VOCAB.index(EOS)
_ID = {ch: i for i, ch in enumerate(VOCAB)}


def encode(text):
    """Token ids of a string, one per character.

    Parameters
    ----------
    text : str
        Characters from ``VOCAB``.

    Returns
    -------
    list of int

    Examples
    --------
    >>> decode(encode("^r31=13$"))
    '^r31=13$'
    """
    try:
        return [_ID[ch] for ch in text]
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} is not in VOCAB {VOCAB!r}") from None


def decode(ids):
    """The string of a sequence of token ids (inverse of :func:`encode`)."""
    return "".join(VOCAB[int(i)] for i in ids)


# ----------------------------------------------------------------------------
# task generators: numpy Generator -> (prompt, answer)

PRETRAIN_DIGITS = (3, 8)  # (fewest, most) digits of a pretrain task's input
FINETUNE_DIGITS = (3, 6)  # the same for sort and dedup; see the note on lengths


def _digits(rng, lengths):
    lo, hi = lengths
    n = int(rng.integers(lo, hi + 1))
    return "".join(str(d) for d in rng.integers(0, 10, size=n))


def copy(rng):
    """``c3141=`` -> ``3141``."""
    s = _digits(rng, PRETRAIN_DIGITS)
    return f"c{s}=", s


def reverse(rng):
    """``r3141=`` -> ``1413``."""
    s = _digits(rng, PRETRAIN_DIGITS)
    return f"r{s}=", s[::-1]


def increment(rng):
    """``i3149=`` -> ``4250`` (each digit plus one, modulo 10)."""
    s = _digits(rng, PRETRAIN_DIGITS)
    return f"i{s}=", "".join(str((int(d) + 1) % 10) for d in s)


def sort(rng):
    """``s3141=`` -> ``1134``."""
    s = _digits(rng, FINETUNE_DIGITS)
    return f"s{s}=", "".join(sorted(s))


def dedup(rng):
    """``u3141=`` -> ``314`` (first occurrence of each digit, in order)."""
    s = _digits(rng, FINETUNE_DIGITS)
    return f"u{s}=", "".join(dict.fromkeys(s))


def add(rng):
    """``a31+4=`` -> ``35``."""
    a, b = (int(rng.integers(0, 10 ** int(rng.integers(1, 4)))) for _ in range(2))
    return f"a{a}+{b}=", str(a + b)


PRETRAIN_TASKS = ("copy", "reverse", "increment")
FINETUNE_TASKS = ("sort", "dedup", "add")
DEFAULT_FINETUNE_TASK = "sort"


def pretrain(rng):
    """One example of a PRETRAIN task chosen uniformly at random."""
    name = PRETRAIN_TASKS[int(rng.integers(len(PRETRAIN_TASKS)))]
    return TASKS[name](rng)


TASKS = {
    "copy": copy,
    "reverse": reverse,
    "increment": increment,
    "pretrain": pretrain,
    "sort": sort,
    "dedup": dedup,
    "add": add,
}


def get_task(name):
    """The generator registered under ``name``; ValueError if unknown."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


# ----------------------------------------------------------------------------
# fixed held-out evaluation sets

EVAL_SEED = 20230523  # QLoRA arXiv date; any fixed number disjoint from training seeds
EVAL_SIZE = 500


@lru_cache(maxsize=None)
def _held_out(name):
    # seed from the task name (crc32 is stable across runs, unlike hash())
    rng = np.random.default_rng([EVAL_SEED, zlib.crc32(name.encode())])
    gen, pairs, seen = get_task(name), [], set()
    while len(pairs) < EVAL_SIZE:
        prompt, answer = gen(rng)
        if prompt not in seen:  # distinct prompts
            seen.add(prompt)
            pairs.append((prompt, answer))
    return tuple(pairs)


def held_out(task, n=EVAL_SIZE):
    """The fixed evaluation examples of a task.

    Parameters
    ----------
    task : str
        A name in ``TASKS``.
    n : int, default EVAL_SIZE
        How many examples, at most ``EVAL_SIZE``; always the same first ``n``.

    Returns
    -------
    list of (str, str)
        Distinct (prompt, answer) pairs.
    """
    if not 0 < n <= EVAL_SIZE:
        raise ValueError(f"n must be in 1..{EVAL_SIZE}, got {n}")
    return list(_held_out(task)[:n])


def validation_set(task, n=200):
    """The last ``n`` fixed held-out examples of a task: a validation split.

    Disjoint from the test examples ``held_out(task, m)`` whenever
    ``n + m <= EVAL_SIZE``; choose hyperparameters on this, report on those.

    Parameters
    ----------
    task : str
        A name in ``TASKS``.
    n : int, default 200
        How many examples, at most ``EVAL_SIZE``.

    Returns
    -------
    list of (str, str)
    """
    if not 0 < n <= EVAL_SIZE:
        raise ValueError(f"n must be in 1..{EVAL_SIZE}, got {n}")
    return list(_held_out(task)[EVAL_SIZE - n:])


@lru_cache(maxsize=None)
def _all_held_out_prompts():
    return frozenset(p for name in TASKS for p, _ in _held_out(name))


# ----------------------------------------------------------------------------
# batches for next-token prediction


def _encode_pairs(pairs, block_size):
    """(x, y, loss_mask) for a list of (prompt, answer) pairs.

    Row i is ``^ prompt answer $`` right-padded with PAD; x is it without its
    last token and y without its first, so y[t] is the token after x[t]. The
    mask is 1 where y is an answer token or the closing EOS.
    """
    rows = [[BOS_ID] + encode(p) + encode(a) + [EOS_ID] for p, a in pairs]
    T = max(len(r) for r in rows) - 1
    if T > block_size:
        raise ValueError(f"an example needs {T} positions but block_size is {block_size}")
    x = torch.full((len(rows), T), PAD_ID, dtype=torch.long)  # (B, T)
    y = torch.full((len(rows), T), PAD_ID, dtype=torch.long)  # (B, T)
    loss_mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T)
    for i, ((p, _), row) in enumerate(zip(pairs, rows)):
        n = len(row) - 1
        x[i, :n] = torch.tensor(row[:-1])
        y[i, :n] = torch.tensor(row[1:])
        # y[t] is row[t + 1]; the answer starts at row index 1 + len(p)
        loss_mask[i, len(p):n] = 1
    return x, y, loss_mask


def make_batch(task, batch_size, rng, block_size):
    """A random training batch for next-token prediction on a task.

    Parameters
    ----------
    task : str
        A name in ``TASKS``.
    batch_size : int
        Number of examples.
    rng : numpy.random.Generator
        Source of randomness; the same state gives the same batch.
    block_size : int
        Model context length; ValueError if an example does not fit.

    Returns
    -------
    x, y, loss_mask : torch.LongTensor, each shape (batch_size, T)
        Inputs, next-token targets, and 1 where the target is an answer
        token (or the EOS after it). ``T`` is the longest example in the
        batch minus one, so ``T <= block_size``. Never contains a prompt of
        any task's held-out set.
    """
    return _encode_pairs(sample_pairs(task, batch_size, rng), block_size)


# ----------------------------------------------------------------------------
# evaluation


def evaluate(model, task, n=200, device=None, batch_size=256):
    """Exact-match accuracy of greedy answers, and answer-token loss.

    Parameters
    ----------
    model : qlora_ref.train.gpt.GPT
        Or any module with GPT's ``forward``, ``generate_greedy`` and
        ``config.block_size`` (such as a GPT whose layers LoRA replaced).
    task : str
        A name in ``TASKS``; scored on its first ``n`` held-out examples.
    n : int, default 200
        Number of held-out examples.
    device : str or torch.device, optional
        Where to put the inputs; default: the device of the model.
    batch_size : int, default 256
        Examples per forward pass.

    Returns
    -------
    dict
        ``accuracy``: fraction of examples whose greedy continuation is the
        answer followed by EOS; ``loss``: mean cross-entropy per answer token
        (EOS included) under teacher forcing.
    """
    return evaluate_pairs(model, held_out(task, n), device=device, batch_size=batch_size)


@torch.no_grad()
def evaluate_pairs(model, pairs, device=None, batch_size=256):
    """:func:`evaluate` on given (prompt, answer) pairs, e.g. :func:`validation_set`'s."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("evaluate_pairs needs at least one (prompt, answer) pair")
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        # loss: teacher forcing, weighted by answer tokens
        loss_sum, n_tokens = 0.0, 0
        for i in range(0, len(pairs), batch_size):
            x, y, m = _encode_pairs(pairs[i:i + batch_size], model.config.block_size)
            _, loss = model(x.to(device), y.to(device), m.to(device))
            loss_sum += loss.item() * m.sum().item()
            n_tokens += m.sum().item()
        # accuracy: greedy generation, batched over prompts of equal length
        correct = 0
        by_len = {}
        for p, a in pairs:
            by_len.setdefault(len(p), []).append((p, a))
        for plen, group in by_len.items():
            for i in range(0, len(group), batch_size):
                chunk = group[i:i + batch_size]
                idx = torch.tensor([[BOS_ID] + encode(p) for p, _ in chunk], device=device)
                new = max(len(a) for _, a in chunk) + 1  # answer + EOS
                out = model.generate_greedy(idx, new)[:, 1 + plen:]  # (b, new)
                for (_, a), row in zip(chunk, out.tolist()):
                    text = decode(row)
                    correct += EOS in text and text[: text.index(EOS)] == a
    finally:
        model.train(was_training)
    return {"accuracy": correct / len(pairs), "loss": loss_sum / n_tokens}


def sample_pairs(task, n, rng):
    """``n`` generated (prompt, answer) pairs of ``task``, none from any held-out set.

    The fixed training set of :mod:`qlora_ref.train.finetune` is drawn with this.
    """
    gen, forbidden, pairs = get_task(task), _all_held_out_prompts(), []
    while len(pairs) < n:
        prompt, answer = gen(rng)
        if prompt not in forbidden:
            pairs.append((prompt, answer))
    return pairs


def encode_pairs(pairs, block_size):
    """(x, y, loss_mask) LongTensors for a list of (prompt, answer) pairs; see :func:`make_batch`."""
    return _encode_pairs(pairs, block_size)
