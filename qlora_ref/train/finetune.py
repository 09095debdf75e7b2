r"""The main job: fine-tune the tiny base GPT with QLoRA, evaluate, save, report.

Paper section 4 ("QLoRA vs. Standard Finetuning") in miniature: the base
model's linear layers are stored in NF4 with double quantization and
frozen; LoRA adapters on every linear layer are the only trainable
weights; the optimizer is a paged AdamW; the loss counts answer tokens
only. The same job also trains the comparison arms of ``compare``: a
16-bit LoRA base (``quant_bits=16``), an 8-bit blockwise base
(``quant_bits=8``), FP4/Int4 bases, and full fine-tuning (``full_finetune``).

This module says what is trained (the shipped base model, a fixed set of
``train_size`` generated examples) and how it is scored (exact match and
answer-token loss on held-out prompts); the optimizer steps, checkpoints,
``--resume`` and divergence handling are the one loop of
:mod:`qlora_ref.train.loop`, shared with the Hugging Face job
(:mod:`qlora_ref.train.hf_finetune`). The configuration is
:class:`~qlora_ref.train.config.FinetuneConfig` (re-exported here).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import torch

from ..nn import trainable_parameters
from . import checkpoint as ckpt
from . import loop, tasks
from .config import (CONFIG_ALIASES, FIELD_TYPES, RESUMABLE_CHANGES, FinetuneConfig,  # noqa: F401
                     load_config)
from .loop import (FinetuneResult, TrainingDiverged, batch_indices, check_output_dir,  # noqa: F401
                   check_resumable, restore_checkpoint, save_checkpoint)
from .pretrain import default_base_model_path, load_base_model, save_base_model

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "load_config", "CONFIG_ALIASES",
           "TrainingDiverged", "check_output_dir", "RESUMABLE_CHANGES", "FIELD_TYPES",
           "complete_tiny", "build_model", "training_set"]

#: Held-out examples shown with the model's answers before and after, in the report.
REPORT_EXAMPLES = 3


def training_set(task: str, size: int, seed: int) -> list:
    """The fixed training set: ``size`` generated (prompt, answer) pairs, no held-out prompt."""
    return tasks.sample_pairs(task, size, np.random.default_rng([seed, 1]))


def _base_model_file(config: FinetuneConfig) -> Path:
    return Path(default_base_model_path() if config.base_model in ("default", "", None)
                else config.base_model)


def build_model(config: FinetuneConfig, device: torch.device):
    """Load the base model and make it trainable as ``config`` says."""
    return loop.make_trainable(load_base_model(_base_model_file(config), device="cpu"), config, device)


def _trainee(config: FinetuneConfig, device, fingerprints: dict) -> loop.Trainee:
    model = build_model(config, device)
    pairs = training_set(config.task, config.train_size, config.seed)
    block = model.config.block_size

    def micro_batch_loss(train_model, idx):
        x, y, mask = tasks.encode_pairs([pairs[i] for i in idx], block)  # (B, T) each
        _, loss = train_model(x.to(device), y.to(device), mask.to(device))
        return loss, int(mask.sum())  # the answer tokens the mean is over

    return loop.Trainee(model, micro_batch_loss, fingerprints,
                        save_full=lambda m, folder: save_base_model(m, folder / "model.safetensors"))


def finetune(config: FinetuneConfig, device: str | torch.device | None = None,
             output_dir: str | os.PathLike | None = None, resume_from: str | os.PathLike | None = None,
             stop_after: int | None = None, progress: bool = True,
             evaluate_before: bool = True, overwrite: bool = False, on_ready=None,
             fsdp: bool = False) -> FinetuneResult:
    """Run one fine-tuning job of the tiny GPT and return what it measured.

    Parameters
    ----------
    config : FinetuneConfig
    device : "cpu", "cuda" or None
        ``None``: CUDA when available. Asking for CUDA without a GPU is a ``RuntimeError``.
    output_dir : path, optional
        Where ``adapter/`` (PEFT layout; ``model/model.safetensors`` with
        ``full_finetune``), ``checkpoint/``, ``report.md``, ``report.json`` and
        ``loss_curve.png`` go. Nothing is written without it. It is checked
        before anything else and locked (``.qlora-ref.lock``) while the run
        writes; a folder that holds an earlier run's results is refused
        unless ``overwrite`` or ``resume_from`` is given.
    resume_from : path, optional
        A checkpoint written by an earlier run with the same config: a
        ``step-NNNNNN`` folder, the ``checkpoint`` folder (its newest complete
        one), or the earlier run's output folder. It is verified first; a
        torn one, or one made with another config or base model, is refused.
    stop_after : int, optional
        Stop (and checkpoint) after this many optimizer steps, as if interrupted.
    progress : bool
        Show a progress bar (rank 0 only).
    evaluate_before : bool
        Also evaluate the untrained model (``compare`` skips it to save time).
    overwrite : bool
        Replace an earlier run's results in ``output_dir`` (its checkpoints are deleted).
    on_ready : callable, optional
        Called once every input is checked, before anything is created (the CLI's banner).
    fsdp : bool
        Under ``torchrun``: shard the model with FSDP2 instead of replicating
        it with DistributedDataParallel (``config.optim`` must be ``"adamw"``);
        checkpoints are DCP folders (:mod:`qlora_ref.train.sharded_checkpoint`),
        evaluation runs on every rank, the adapter is written by rank 0. The
        returned ``model`` stays sharded.

    Raises
    ------
    ValueError
        A bad output folder, or a checkpoint that is torn or does not fit
        (:class:`~qlora_ref.train.checkpoint.CheckpointError`).
    TrainingDiverged
        The loss or the gradient norm became NaN or infinite; the last good checkpoint is kept.
    qlora_ref.train.checkpoint.DiskFullError
        No space left on the device; the previous checkpoint is kept.
    """
    rank, world, device, out, writer = loop.start_run(
        config, device, stop_after, fsdp, output_dir, overwrite, resuming=resume_from is not None)
    base = _base_model_file(config)
    load_base_model(base)  # a missing or unreadable file: one line, before anything is created
    fingerprints = {"base_model_sha256": (ckpt.sha256_file(base), str(base))} \
        if out is not None or resume_from is not None else {}
    resumed = loop.read_resume(resume_from, config, world, fingerprints, rank, fsdp) \
        if resume_from is not None else None
    with loop.locked_output(out, writer, clear_checkpoints=overwrite and resume_from is None) as ready:
        if on_ready is not None:
            on_ready()
        torch.manual_seed(config.seed)
        trainee = _trainee(config, device, fingerprints)
        ready()
        return _run(config, trainee, device, out, resumed, stop_after, progress, evaluate_before,
                    rank, world, fsdp)


def _run(config, trainee, device, out, resumed, stop_after, progress, evaluate_before, rank,
         world, fsdp=False) -> FinetuneResult:
    """Evaluate, train with the shared loop, evaluate again, write the outputs (rank 0).

    With ``fsdp`` the trained model is sharded, so every rank runs the
    evaluation after training (the same forwards; rank 0 keeps the scores).
    """
    model = trainee.model
    params = trainable_parameters(model)
    before = tasks.evaluate(model, config.task, n=config.eval_size, device=device) \
        if rank == 0 and evaluate_before else {}
    shown = tasks.held_out(config.task, REPORT_EXAMPLES) if rank == 0 or fsdp else []
    shown_before = [complete_tiny(model, p, len(a) + 1, device) if evaluate_before and rank == 0
                    else None for p, a in shown]
    state = loop.train(trainee, config, device, out, resumed, stop_after, progress, rank, world,
                       fsdp)
    after = tasks.evaluate(model, config.task, n=config.eval_size, device=device) \
        if rank == 0 or fsdp else {}
    after = after if rank == 0 else {}
    result = FinetuneResult(config=config, before=before, after=after, history=state.history,
                            parameters=dataclasses.asdict(params), seconds=state.seconds,
                            steps=state.steps, device=str(device),
                            peak_memory_bytes=state.peak_memory_bytes,
                            output_dir=str(out) if out else None,
                            resumed_from_step=state.resumed_from,
                            examples=[{"prompt": p, "expected": a, "before": b,
                                       "after": complete_tiny(model, p, len(a) + 1, device)}
                                      for (p, a), b in zip(shown, shown_before)])
    if out is not None:
        with loop.whole_adapters(model, fsdp):  # a collective with fsdp
            if rank == 0:
                loop.run_outputs(result, trainee, out)
    result.model = model  # for callers that keep working with it (not serialised)
    return result


@torch.no_grad()
def complete_tiny(model, prompt: str, max_new_tokens: int = 16, device=None) -> str:
    """The tiny GPT's greedy continuation of a task prompt (``tasks`` vocabulary), up to EOS.

    Decoding stops at the first EOS token (or after ``max_new_tokens`` tokens);
    the EOS is not part of the answer.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    new = []
    try:
        idx = torch.tensor([[tasks.BOS_ID] + tasks.encode(prompt)], device=device)  # (1, T)
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -model.config.block_size:])                     # (1, T, V)
            next_id = int(logits[0, -1].argmax())
            if next_id == tasks.EOS_ID:
                break
            new.append(next_id)
            idx = torch.cat([idx, torch.tensor([[next_id]], device=device)], dim=1)  # (1, T + 1)
    finally:
        model.train(was_training)
    return tasks.decode(new)
