r"""The main job on a real model: QLoRA fine-tuning of a local Hugging Face causal LM on a JSONL file.

Paper section 4 on the user's own model and data. The model folder is read
with ``transformers.AutoModelForCausalLM`` and ``AutoTokenizer``
(``local_files_only``: nothing is downloaded); :func:`qlora_ref.prepare_model`
stores the chosen linear layers in NF4 with double quantization (or 8/16-bit)
and puts LoRA adapters beside them; the data is read by
:mod:`qlora_ref.train.jsonl`. The loss counts completion tokens only:

.. math::

    \mathcal L = -\frac{1}{|C|}\sum_{t \in C} \log p_\theta(x_t \mid x_{<t}),

with :math:`C` the completion tokens and the end-of-sequence token after
them (every token of a ``{"text"}`` example); prompt tokens and padding get
the label -100, which ``transformers`` leaves out of its cross-entropy.

An example is the prompt's tokens (with the tokenizer's own special tokens,
e.g. a BOS) followed by the completion's tokens (without) and the EOS token.
One longer than ``max_length`` tokens is an error naming its file and line;
with ``truncate`` it is cut to ``max_length`` instead (and refused only if no
completion token is left).

The loop is the one of :mod:`qlora_ref.train.loop`, shared with the tiny
GPT (paged AdamW on the adapters, gradient accumulation, gradient clipping,
the batch order a function of seed and epoch, checkpoints every
``save_steps``, ``--resume`` to byte-equal adapters, divergence stops); the
outputs are the same too: ``adapter/`` in PEFT's layout
(``peft.AutoPeftModelForCausalLM.from_pretrained`` opens it), or with
``full_finetune`` ``model/``, a ``save_pretrained`` folder of every trained
weight and the tokenizer (``--model OUTPUT_DIR/model`` opens it);
``loss_curve.png``, ``report.md`` and ``report.json``, with the completion
loss and a few greedy completions before and after fine-tuning. The
configuration is :class:`~qlora_ref.train.config.HFFinetuneConfig`
(re-exported here).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch

from ..nn import load_adapter, trainable_parameters
from ..validation import DECODERS
from . import checkpoint as ckpt
from . import loop
from .config import HFFinetuneConfig
from .jsonl import Example, read_examples
from .loop import FinetuneResult, TrainingDiverged  # noqa: F401  (raised by hf_finetune)

__all__ = ["HFFinetuneConfig", "hf_finetune", "load_pretrained", "load_tokenizer", "load_model",
           "encode_examples", "collate", "completion_loss", "generate", "complete", "folder_sha256",
           "check_model_fits",
           "IGNORE_INDEX"]

#: The label of a token the loss leaves out (``torch.nn.CrossEntropyLoss``'s ``ignore_index``).
IGNORE_INDEX = -100

#: Examples shown before/after in the report (the first ones of the file).
REPORT_EXAMPLES = 3
#: Examples whose completion loss is reported before/after (the first ones of the file).
EVAL_EXAMPLES = 64


# ----------------------------------------------------------------------------- model and data

def load_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer of a local Hugging Face model folder; one-line ``ValueError`` if it has none.

    It gets a pad token (its EOS) when it has none; a tokenizer without an
    EOS token is refused (the completions end with it).
    """
    from transformers import AutoTokenizer

    folder = Path(model_dir)
    if not folder.is_dir():
        raise ValueError(f"--model {folder}: no such folder (a local Hugging Face model folder "
                         "with config.json, weights and tokenizer files; nothing is downloaded)")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds here
        raise ValueError(f"{folder}: no tokenizer could be loaded ({type(exc).__name__}: "
                         f"{_first_line(exc)})") from None
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{folder}: the tokenizer has no EOS token; completions end with one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


@contextlib.contextmanager
def _quiet_transformers():
    """No "Loading weights" progress bar: an error must stay one line on stderr."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def load_model(model_dir: str | os.PathLike, device="cpu", dtype=None):
    """The causal LM of a local Hugging Face folder (``local_files_only``), in eval mode."""
    from transformers import AutoModelForCausalLM

    folder = Path(model_dir)
    dtype = dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{folder}: no causal language model could be loaded "
                         f"({type(exc).__name__}: {_first_line(exc)})") from None
    return model.to(device).eval()


def check_model_fits(model, tokenizer, n_tokens: int, folder) -> None:
    """Refuse, in one line, a model whose embedding or positions cannot take the run's tokens.

    A tokenizer with more ids than the model has embedding rows, or sequences
    longer than the model's learned positions (GPT-2's ``n_positions``, or
    ``max_position_embeddings``), would fail deep inside the model with an
    ``IndexError`` on the first batch.
    """
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"{folder}: the tokenizer has {len(tokenizer):,} token ids but the model's "
                         f"embedding has {rows:,} rows (config vocab_size {model.config.vocab_size}); "
                         "they are not a pair")
    limit = getattr(model.config, "n_positions", None) or \
        getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and n_tokens > limit:
        raise ValueError(f"{folder}: sequences of {n_tokens} tokens are longer than the model's "
                         f"{limit} positions; use a shorter --max-length (or --max-new-tokens)")


def load_pretrained(model_dir: str | os.PathLike, device="cpu", dtype=None):
    """(model, tokenizer) from a local Hugging Face folder; one-line ``ValueError`` if it is not one."""
    tokenizer = load_tokenizer(model_dir)
    return load_model(model_dir, device, dtype), tokenizer


def encode_example(example: Example, tokenizer) -> tuple[list, list]:
    """(input ids, labels) of one example: prompt tokens labelled -100, then completion + EOS."""
    prompt = tokenizer(example.prompt)["input_ids"] if example.prompt else \
        tokenizer("", add_special_tokens=True)["input_ids"]          # a BOS, if the model has one
    completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
    ids = [*prompt, *completion, tokenizer.eos_token_id]
    labels = [IGNORE_INDEX] * len(prompt) + [*completion, tokenizer.eos_token_id]
    return ids, labels


def encode_examples(examples: list, tokenizer, max_length: int, truncate: bool = False,
                    source: str = "data") -> list[tuple[list, list]]:
    """Encode every example; an over-long one is refused (``FILE:LINE``) or, with ``truncate``, cut."""
    encoded = []
    for example in examples:
        ids, labels = encode_example(example, tokenizer)
        if len(ids) > max_length:
            if not truncate:
                raise ValueError(f"{source}:{example.line}: example is {len(ids)} tokens, over "
                                 f"--max-length {max_length} (raise --max-length, or pass "
                                 "--truncate to cut such examples)")
            ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE_INDEX for label in labels[1:]):
                raise ValueError(f"{source}:{example.line}: the prompt alone fills --max-length "
                                 f"{max_length}; no completion token would be trained")
        encoded.append((ids, labels))
    return encoded


def collate(batch: list, pad_id: int) -> dict:
    """Right-pad a list of (ids, labels) to one batch: padding has attention 0 and label -100."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)       # (B, T)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)    # (B, T)
    attention = torch.zeros((len(batch), width), dtype=torch.long)              # (B, T)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        attention[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


@torch.no_grad()
def completion_loss(model, encoded: list, pad_id: int, device, batch_size: int = 8) -> float:
    """Mean cross-entropy per completion token (EOS included) over ``encoded``, teacher-forced."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(encoded), batch_size):
            batch = {k: v.to(device) for k, v in collate(encoded[start:start + batch_size],
                                                           pad_id).items()}
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits.float()  # (B, T, V)
            targets = batch["labels"][:, 1:]                                         # (B, T-1)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                ignore_index=IGNORE_INDEX, reduction="sum")
            total += float(loss)
            count += int((targets != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def complete(model, tokenizer, prompt: str, max_new_tokens: int = 32, device="cpu",
             decoder: str = "transformers") -> str:
    """The greedy continuation of ``prompt`` (special tokens dropped), up to EOS or ``max_new_tokens``.

    ``decoder="lean"`` decodes with :class:`qlora_ref.nn.decode.LlamaDecoder`
    where it applies (a Llama-family model on the CPU; otherwise transformers'
    ``generate``, as with ``decoder="transformers"``).
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    was_training = model.training
    model.eval()
    try:
        enc = tokenizer(prompt, return_tensors="pt") if prompt else \
            tokenizer("", return_tensors="pt", add_special_tokens=True)
        ids = enc["input_ids"].to(device)                                            # (1, T)
        if ids.shape[1] == 0:  # no BOS and no prompt: start from the EOS token
            ids = torch.tensor([[tokenizer.eos_token_id]], device=device)
        lean = None
        if decoder == "lean":
            from ..nn.decode import LlamaDecoder, unsupported_reason

            lean = LlamaDecoder(model) if unsupported_reason(model) is None else None
        if lean is not None:
            out = lean.generate(ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)                # (1, T + new)
        else:
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)                # (1, T + new)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _shown_examples(examples: list, tokenizer) -> list[tuple[str, str]]:
    """(prompt, expected completion) of the first examples; a text example is split after 8 tokens."""
    shown = []
    for example in examples[:REPORT_EXAMPLES]:
        if example.prompt:
            shown.append((example.prompt, example.completion))
            continue
        ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"]
        cut = min(8, max(1, len(ids) // 2))
        shown.append((tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut:])))
    return shown


# ----------------------------------------------------------------------------- the run

def folder_sha256(model_dir: str | os.PathLike) -> str:
    """One sha256 of a model folder's files (config, weights, tokenizer): a resume's base-model check.

    Every regular file directly in the folder with a suffix in
    :data:`MODEL_FILE_SUFFIXES` counts, by name and content, in name order.
    """
    h = hashlib.sha256()
    for path in sorted(Path(model_dir).iterdir()):
        if path.suffix in MODEL_FILE_SUFFIXES and path.is_file() and not path.is_symlink():
            h.update(f"{path.name}\0{ckpt.sha256_file(path)}\n".encode())
    return h.hexdigest()


#: The files of a model folder :func:`folder_sha256` reads.
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt")


def _trainee(config: HFFinetuneConfig, device, encoded: list, tokenizer,
             fingerprints: dict, fsdp: bool = False) -> loop.Trainee:
    """Load the model (float32 for full fine-tuning, else bfloat16 on CUDA) and make it trainable.

    With ``fsdp`` the model is read, quantized and sharded one layer at a time
    (:func:`qlora_ref.distributed.load_sharded`), so no rank ever holds the
    whole model; the shards are byte-equal to sharding the whole prepared model.
    """
    dtype = torch.bfloat16 if device.type == "cuda" and not config.full_finetune else torch.float32
    n_tokens = max(len(ids) for ids, _ in encoded)
    if fsdp:
        from ..distributed import load_sharded

        torch.manual_seed(config.seed)  # the adapters' draws, as on the path below
        model = load_sharded(config.base_model, dtype=dtype, device=device,
                             **loop.prepare_kwargs(config, device))
        check_model_fits(model, tokenizer, n_tokens, config.base_model)
    else:
        model = load_model(config.base_model, device="cpu", dtype=dtype)
        check_model_fits(model, tokenizer, n_tokens, config.base_model)
        torch.manual_seed(config.seed)
        model = loop.make_trainable(model, config, device)
    pad = tokenizer.pad_token_id

    def micro_batch_loss(train_model, idx):
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad).items()}
        # transformers shifts the labels: the mean is over the completion tokens after the first
        return train_model(**batch).loss, int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def save_full(trained, folder):  # a folder --model (and AutoModelForCausalLM) can open
        trained.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return loop.Trainee(model, micro_batch_loss, fingerprints, save_full=save_full,
                        adapter_kwargs={"base_model_name_or_path": str(Path(config.base_model).resolve())})


def _prepare_data(config: HFFinetuneConfig):
    """Read and encode the data (bad lines fail here, before the model loads): (config, encoded, ...)."""
    examples = read_examples(config.dataset_path)
    tokenizer = load_tokenizer(config.base_model)
    encoded = encode_examples(examples, tokenizer, config.max_length, config.truncate,
                              source=str(config.dataset_path))
    config = dataclasses.replace(config, train_size=len(encoded), task=Path(config.dataset_path).name,
                                 eval_size=min(len(encoded), EVAL_EXAMPLES))
    return config, examples, encoded, tokenizer


def hf_finetune(config: HFFinetuneConfig, device=None, output_dir=None, progress: bool = True,
                max_new_tokens: int = 32, resume_from=None, stop_after: int | None = None,
                overwrite: bool = False, evaluate: bool = True, on_ready=None,
                fsdp: bool = False) -> FinetuneResult:
    """Fine-tune ``config.base_model`` on ``config.dataset_path``; write adapter, plot and report.

    The loop is :func:`qlora_ref.train.loop.train`, as for the tiny GPT: the
    same checkpoints, ``resume_from`` (byte-equal adapters to an
    uninterrupted run), divergence handling and torchrun support. As a
    library call (``output_dir=None``) nothing is written; the result holds
    ``model``, ``tokenizer`` and ``history``, and :func:`completion_loss`
    scores the model on any encoded examples.

    Parameters
    ----------
    config : HFFinetuneConfig
    device : "cpu", "cuda" or None
        ``None``: CUDA when available.
    output_dir : path, optional
        Where ``adapter/`` (PEFT layout; with ``full_finetune`` ``model/``, a
        ``save_pretrained`` folder with the tokenizer), ``checkpoint/``,
        ``report.md``, ``report.json`` and ``loss_curve.png`` go; checked
        before anything is read or created, and locked while the run writes.
        A folder holding an earlier run's results is refused unless
        ``overwrite`` or ``resume_from`` is given.
    progress : bool
        A progress bar on stderr.
    max_new_tokens : int
        Length of the greedy completions shown in the report.
    resume_from, stop_after, overwrite, on_ready
        As for :func:`qlora_ref.train.finetune.finetune`; a checkpoint made
        from another model folder or data file (by sha256) is refused.
    evaluate : bool
        Score the model before and after (completion loss, greedy
        completions); ``False`` (only without ``output_dir``) skips both.
    fsdp : bool
        Under ``torchrun``: shard the model with FSDP2, as for
        :func:`qlora_ref.train.finetune.finetune` (``config.optim`` must be ``"adamw"``).

    Raises
    ------
    ValueError
        A folder that is not a model, bad data (``FILE:LINE: ...``), a bad
        output folder, a checkpoint that does not fit.
    TrainingDiverged
        The loss or the gradient norm became NaN or infinite.
    """
    if not evaluate and output_dir is not None:
        raise ValueError("evaluate=False writes no report: call it without output_dir")
    rank, world, device, out, writer = loop.start_run(
        config, device, stop_after, fsdp, output_dir, overwrite, resuming=resume_from is not None)
    config, examples, encoded, tokenizer = _prepare_data(config)
    fingerprints = {} if out is None and resume_from is None else {
        "base_model_sha256": (folder_sha256(config.base_model), str(config.base_model)),
        "dataset_sha256": (ckpt.sha256_file(Path(config.dataset_path)), str(config.dataset_path))}
    resumed = loop.read_resume(resume_from, config, world, fingerprints, rank, fsdp) \
        if resume_from is not None else None
    with loop.locked_output(out, writer, clear_checkpoints=overwrite and resume_from is None) as ready:
        if on_ready is not None:
            on_ready()
        trainee = _trainee(config, device, encoded, tokenizer, fingerprints, fsdp)
        ready()
        return _run(config, trainee, tokenizer, examples, encoded, device, out, resumed, stop_after,
                    progress, evaluate, max_new_tokens, rank, world, fsdp)


def _scores(model, tokenizer, evaluated, shown, device, config, max_new_tokens) -> dict:
    return {"loss": completion_loss(model, evaluated, tokenizer.pad_token_id, device, config.batch_size),
            "completions": [complete(model, tokenizer, p, max_new_tokens, device) for p, _ in shown]}


def _run(config, trainee, tokenizer, examples, encoded, device, out, resumed, stop_after, progress,
         evaluate, max_new_tokens, rank, world, fsdp=False) -> FinetuneResult:
    """Evaluate, train with the shared loop, evaluate again, write the outputs (rank 0).

    With ``fsdp`` the model is sharded (already before training, when
    :func:`~qlora_ref.distributed.load_sharded` loaded it), so every rank runs
    the scoring forwards, before and after; rank 0 keeps the scores.
    """
    model = trainee.model
    params = trainable_parameters(model)
    evaluated = encoded[:config.eval_size]
    shown = _shown_examples(examples, tokenizer) if evaluate and (rank == 0 or fsdp) else []
    before = _scores(model, tokenizer, evaluated, shown, device, config, max_new_tokens) \
        if evaluate and (rank == 0 or fsdp) else {}
    if rank != 0:
        before = {}
    state = loop.train(trainee, config, device, out, resumed, stop_after, progress, rank, world,
                       fsdp)
    after = _scores(model, tokenizer, evaluated, shown, device, config, max_new_tokens) \
        if evaluate and (rank == 0 or fsdp) else {}
    if rank != 0:
        after = {}
    result = FinetuneResult(
        config=config, before=before, after=after, history=state.history,
        parameters=dataclasses.asdict(params), seconds=state.seconds, steps=state.steps,
        device=str(device), peak_memory_bytes=state.peak_memory_bytes,
        output_dir=str(out) if out else None, resumed_from_step=state.resumed_from,
        examples=[{"prompt": p, "expected": e, "before": b, "after": a}
                  for (p, e), b, a in zip(shown, before.get("completions", []),
                                          after.get("completions", []))])
    if out is not None:
        with loop.whole_adapters(model, fsdp):  # a collective with fsdp
            if rank == 0:
                loop.run_outputs(result, trainee, out)
    result.model, result.tokenizer = model, tokenizer
    return result


# ----------------------------------------------------------------------------- generation

def adapter_base(adapter_dir: str | os.PathLike) -> str | None:
    """The base model folder an adapter records (``base_model_name_or_path``), or None."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise ValueError(f"--adapter {adapter_dir}: no adapter_config.json (not a PEFT adapter folder)")
    try:
        return json.loads(path.read_text()).get("base_model_name_or_path")
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{path} is not a JSON object: {exc}") from None


def generate(model_dir: str | os.PathLike | None, prompt: str, adapter: str | os.PathLike | None = None,
             max_new_tokens: int = 32, device=None, decoder: str = "transformers") -> str:
    """The greedy continuation of ``prompt`` by a Hugging Face model, with an adapter if given.

    With ``adapter`` the model is rebuilt as in training: the base it
    records (or ``model_dir``), stored as the adapter's ``qlora_ref.base``
    record says (:func:`qlora_ref.load_adapter` reads it), then the adapters.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if model_dir is None:
        if adapter is None:
            raise ValueError("generate needs --model DIR or --adapter DIR")
        model_dir = adapter_base(adapter)
        if not model_dir:
            raise ValueError(f"{adapter}/adapter_config.json records no base model; pass --model DIR")
    model, tokenizer = load_pretrained(model_dir, device="cpu")
    check_model_fits(model, tokenizer, len(tokenizer(prompt)["input_ids"]) + max_new_tokens, model_dir)
    if adapter is not None:
        adapter_base(adapter)  # a clear error if it is not an adapter folder
        # the base is rebuilt as the adapter records it (quantization, blocksize, ...);
        # only the matmul dtype follows the device generation runs on
        model = load_adapter(model, adapter, compute_dtype=(
            torch.bfloat16 if device.type == "cuda" else torch.float32))
    model = model.to(device)
    return complete(model, tokenizer, prompt, max_new_tokens, device, decoder)
