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

The loop is the one of :mod:`qlora_ref.train.finetune` (paged AdamW on the
adapters, gradient accumulation, gradient clipping, the batch order a
function of seed and epoch); the outputs are the same too: ``adapter/`` in
PEFT's layout (``peft.AutoPeftModelForCausalLM.from_pretrained`` opens it),
``loss_curve.png``, ``report.md`` and ``report.json``, with the completion
loss and a few greedy completions before and after fine-tuning.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from ..nn import load_adapter, prepare_model, save_adapter, trainable_parameters
from ..optim import make_optimizer
from . import checkpoint as ckpt
from .finetune import (FinetuneConfig, FinetuneResult, TrainingDiverged, _progress, batch_indices,
                       check_output_dir)
from .jsonl import Example, read_examples

__all__ = ["HFFinetuneConfig", "hf_finetune", "load_pretrained", "load_tokenizer", "load_model",
           "encode_examples",
           "completion_loss", "generate", "complete", "IGNORE_INDEX"]

#: The label of a token the loss leaves out (``torch.nn.CrossEntropyLoss``'s ``ignore_index``).
IGNORE_INDEX = -100

#: Examples shown before/after in the report (the first ones of the file).
REPORT_EXAMPLES = 3
#: Examples whose completion loss is reported before/after (the first ones of the file).
EVAL_EXAMPLES = 64


@dataclasses.dataclass
class HFFinetuneConfig(FinetuneConfig):
    """A :class:`~qlora_ref.train.finetune.FinetuneConfig` for a Hugging Face model and a JSONL file.

    ``base_model`` is a local model folder (``config.json``, weights and
    tokenizer files); ``dataset_path`` a JSONL file. ``task``,
    ``train_size`` and ``eval_size`` are set from the data. The defaults
    follow the paper's recipe for 7B-13B models where they differ from the
    tiny GPT's: learning rate 2e-4, dropout 0.05, batch 8.
    """

    base_model: str = ""
    task: str = "jsonl"
    learning_rate: float = 2e-4
    lora_dropout: float = 0.05
    per_device_train_batch_size: int = 8
    dataset_path: str = ""
    max_length: int = 512                   #: tokens per example (prompt + completion + EOS)
    truncate: bool = False                  #: cut over-long examples instead of refusing them

    EXTRA_FIELD_TYPES = {"dataset_path": (str,), "max_length": (int,), "truncate": (bool,)}

    def _check_data(self) -> None:
        if not self.base_model or self.base_model == "default":
            raise ValueError("base_model must name a local Hugging Face model folder (--model DIR)")
        if not self.dataset_path:
            raise ValueError("dataset_path must name a JSONL file (--data FILE.jsonl)")
        if isinstance(self.max_length, bool) or self.max_length < 2:
            raise ValueError(f"max_length must be an integer of at least 2, got {self.max_length!r}")


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
def complete(model, tokenizer, prompt: str, max_new_tokens: int = 32, device="cpu") -> str:
    """The greedy continuation of ``prompt`` (special tokens dropped), up to EOS or ``max_new_tokens``."""
    was_training = model.training
    model.eval()
    try:
        enc = tokenizer(prompt, return_tensors="pt") if prompt else \
            tokenizer("", return_tensors="pt", add_special_tokens=True)
        ids = enc["input_ids"].to(device)                                            # (1, T)
        if ids.shape[1] == 0:  # no BOS and no prompt: start from the EOS token
            ids = torch.tensor([[tokenizer.eos_token_id]], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)                    # (1, T + new)
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

def hf_finetune(config: HFFinetuneConfig, device=None, output_dir=None, progress: bool = True,
                max_new_tokens: int = 32) -> FinetuneResult:
    """Fine-tune ``config.base_model`` on ``config.dataset_path``; write adapter, plot and report.

    Parameters
    ----------
    config : HFFinetuneConfig
    device : "cpu", "cuda" or None
        ``None``: CUDA when available.
    output_dir : path, optional
        Where ``adapter/`` (PEFT layout), ``report.md``, ``report.json`` and
        ``loss_curve.png`` go; checked and locked before the model is loaded.
    progress : bool
        A progress bar on stderr.
    max_new_tokens : int
        Length of the greedy completions shown in the report.

    Raises
    ------
    ValueError
        A folder that is not a model, bad data (``FILE:LINE: ...``), a bad output folder.
    TrainingDiverged
        The loss or the gradient norm became NaN or infinite.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch.cuda.is_available() is False")
    out = Path(output_dir) if output_dir is not None else None
    examples = read_examples(config.dataset_path)       # bad data fails before the model loads
    with contextlib.ExitStack() as stack:
        if out is not None:
            check_output_dir(out)
            stack.enter_context(ckpt.output_lock(out))
        return _train(config, examples, device, out, progress, max_new_tokens)


def _train(config, examples, device, out, progress, max_new_tokens) -> FinetuneResult:
    tokenizer = load_tokenizer(config.base_model)
    encoded = encode_examples(examples, tokenizer, config.max_length, config.truncate,
                              source=str(config.dataset_path))   # before the (large) model loads
    model = load_model(config.base_model, device="cpu",
                       dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = dataclasses.replace(config, train_size=len(encoded), task=Path(config.dataset_path).name,
                                 eval_size=min(len(encoded), EVAL_EXAMPLES))
    torch.manual_seed(config.seed)
    compute = getattr(torch, config.bnb_4bit_compute_dtype) if config.bnb_4bit_compute_dtype \
        else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = prepare_model(
        model, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        quant_type=config.bnb_4bit_quant_type if config.quant_bits == 4 else None,
        double_quant=config.bnb_4bit_use_double_quant, quant_bits=config.quant_bits,
        compute_dtype=compute if config.quant_bits != 16 else None,
        init=config.init_lora_weights).to(device)
    pad = tokenizer.pad_token_id
    evaluated = encoded[:config.eval_size]
    shown = _shown_examples(examples, tokenizer)
    before = {"loss": completion_loss(model, evaluated, pad, device, config.batch_size),
              "completions": [complete(model, tokenizer, p, max_new_tokens, device) for p, _ in shown]}

    params = trainable_parameters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, name=config.optim, lr=config.learning_rate,
                               weight_decay=config.weight_decay)
    total = config.total_steps()
    history, step = [], 0
    bar = _progress(total, 0, enabled=progress)
    started = time.perf_counter()
    model.train()
    try:
        while step < total:
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in range(config.gradient_accumulation_steps):
                idx = batch_indices(step, micro, config, 0, 1)
                batch = {k: v.to(device) for k, v in collate([encoded[i] for i in idx], pad).items()}
                with (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                      else contextlib.nullcontext()):
                    loss = model(**batch).loss
                (loss / config.gradient_accumulation_steps).backward()
                step_loss += loss.item() / config.gradient_accumulation_steps
            norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm) \
                if config.max_grad_norm else None
            if not math.isfinite(step_loss) or (norm is not None and not bool(torch.isfinite(norm))):
                raise TrainingDiverged(f"the training loss became {step_loss} at step {step + 1} "
                                       f"(learning_rate={config.learning_rate}); stopped before "
                                       "the update, nothing saved")
            optimizer.step()
            step += 1
            history.append((step, step_loss))
            bar(step, step_loss)
    finally:
        bar(None, None)
    seconds = time.perf_counter() - started
    model.eval()
    after = {"loss": completion_loss(model, evaluated, pad, device, config.batch_size),
             "completions": [complete(model, tokenizer, p, max_new_tokens, device) for p, _ in shown]}
    result = FinetuneResult(
        config=config, before=before, after=after, history=history,
        parameters=dataclasses.asdict(params), seconds=seconds, steps=step, device=str(device),
        peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        output_dir=str(out) if out else None,
        examples=[{"prompt": p, "expected": e, "before": b, "after": a}
                  for (p, e), b, a in zip(shown, before["completions"], after["completions"])])
    if out is not None:
        with ckpt.disk_full_guard("the adapter and report", out, keep="no earlier adapter was replaced"):
            tmp = out / f".tmp-adapter-{os.getpid()}"
            try:
                save_adapter(model, tmp, base_model_name_or_path=str(Path(config.base_model).resolve()))
                ckpt.replace_directory(tmp, out / "adapter")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            from .report import write_report

            write_report(result, out)
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
             max_new_tokens: int = 32, device=None) -> str:
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
    if adapter is not None:
        adapter_base(adapter)  # a clear error if it is not an adapter folder
        # the base is rebuilt as the adapter records it (quantization, blocksize, ...);
        # only the matmul dtype follows the device generation runs on
        model = load_adapter(model, adapter, compute_dtype=(
            torch.bfloat16 if device.type == "cuda" else torch.float32))
    model = model.to(device)
    return complete(model, tokenizer, prompt, max_new_tokens, device)
