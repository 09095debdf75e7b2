"""One rank of the FSDP2 tests (``tests/distributed/test_fsdp2.py``): train tiny QLoRA models sharded with gloo on CPU.

Run by the test as N plain processes (``python tests/distributed/fsdp_worker.py --rank R
--world N ...``) that meet through a ``file://`` store in a temporary folder,
so concurrent test runs never fight over a port. It also holds what the test
compares against: the same models trained in one process, unsharded
(:func:`train_reference`). Results are written as safetensors and JSON (no pickle).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

MODELS = ("gpt", "llama", "gpt2")
BATCH, SEQ, VOCAB, LR = 4, 16, 96, 1e-2  # global batch: 4 sequences, split over the ranks


def build(name: str) -> torch.nn.Module:
    """A tiny prepared QLoRA model, the same bytes on every call (seeded)."""
    from qlora_ref import prepare_model
    torch.manual_seed(0)
    if name == "gpt":
        from qlora_ref.train.gpt import GPT, GPTConfig
        model = GPT(GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=4, n_embd=64))
    else:
        import transformers
        transformers.logging.set_verbosity_error()
        if name == "llama":
            config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64,
                                              intermediate_size=128, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=SEQ)
            model = transformers.LlamaForCausalLM(config)
        else:
            config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB,
                                             n_positions=SEQ, resid_pdrop=0.0, embd_pdrop=0.0,
                                             attn_pdrop=0.0)
            model = transformers.GPT2LMHeadModel(config)
    torch.manual_seed(1)
    model = prepare_model(model, r=4, lora_alpha=8, init="gaussian")
    for m in model.modules():  # B = 0 would give A no gradient at the first step
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B, std=0.02)
    return model


def loss_of(name: str, model, ids: torch.Tensor) -> torch.Tensor:
    if name == "gpt":
        return model(ids[:, :-1].contiguous(), ids[:, 1:].contiguous())[1]
    return model(input_ids=ids, labels=ids).loss


def batches(steps: int) -> list:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(steps)]


def trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def train_reference(name: str, steps: int) -> dict:
    """The single-process, unsharded run: losses, last-step gradients, final adapters."""
    model = build(name)
    opt = torch.optim.AdamW(trainable(model), lr=LR)
    out = {}
    for step, ids in enumerate(batches(steps)):
        loss = loss_of(name, model, ids)
        loss.backward()
        out[f"loss.{step}"] = loss.detach().reshape(1)
        if step == steps - 1:
            out.update({f"grad.{n}": p.grad.clone() for n, p in model.named_parameters()
                        if p.requires_grad})
        opt.step()
        opt.zero_grad()
    out.update({f"adapter.{n}": p.detach().clone() for n, p in model.named_parameters()
                if p.requires_grad})
    return out


def run_rank(name: str, rank: int, world: int, steps: int, out: Path, save_at: int,
             resume: str | None, resume_step: int, mismatch: str | None = None) -> None:
    import torch.distributed as dist
    from qlora_ref import save_adapter
    from qlora_ref.distributed import (base_bytes, load_checkpoint, save_checkpoint,
                                       shard_model, unsharded)
    from qlora_ref.nn import Linear4bit

    model = shard_model(build(name))
    opt = torch.optim.AdamW(trainable(model), lr=LR)
    start = 0
    if resume:
        load_checkpoint(model, opt, resume)
        start = resume_step
    share = BATCH // world
    result = {}
    for step, ids in list(enumerate(batches(steps)))[start:]:
        loss = loss_of(name, model, ids[rank * share:(rank + 1) * share])  # this rank's rows
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)  # the mean over the global batch, as the reference computes it
        result[f"loss.{step}"] = (total / world).reshape(1)
        if step == steps - 1:
            result.update({f"grad.{n}": p.grad.full_tensor()  # collective
                           for n, p in model.named_parameters() if p.requires_grad})
        opt.step()
        opt.zero_grad()
        if step + 1 == save_at:
            save_checkpoint(model, opt, out / f"{name}_ckpt")
    result.update({f"adapter.{n}": p.full_tensor() for n, p in model.named_parameters()
                   if p.requires_grad})
    with unsharded(model):
        for n, m in model.named_modules():
            if isinstance(m, Linear4bit):
                result[f"dequant.{n}"] = m.dequantize(torch.float32)
        if rank == 0:
            save_adapter(model, out / f"{name}_adapter")
    info = {"base_bytes": base_bytes(model)}
    if save_at and not resume:  # resume on the same N in fresh objects: replay to the end
        again = shard_model(build(name))
        opt2 = torch.optim.AdamW(trainable(again), lr=LR)
        load_checkpoint(again, opt2, out / f"{name}_ckpt")
        for step, ids in list(enumerate(batches(steps)))[save_at:]:
            loss_of(name, again, ids[rank * share:(rank + 1) * share]).backward()
            opt2.step()
            opt2.zero_grad()
        result.update({f"resumed.{n}": p.full_tensor() for n, p in again.named_parameters()
                       if p.requires_grad})
    if mismatch:  # another model's checkpoint: must be one clear error
        try:
            load_checkpoint(model, opt, mismatch)
            info["mismatch_error"] = None
        except ValueError as exc:
            info["mismatch_error"] = str(exc)
    (out / f"{name}_rank{rank}.json").write_text(json.dumps(info))
    if rank == 0:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in result.items()},
                  str(out / f"{name}_result.safetensors"))
    dist.barrier()


LOADING_CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                      tie_word_embeddings=True)  # tied: one tensor in the file, two modules


def save_float_models(folder: Path) -> None:
    """What ``load_sharded`` reads: a tiny Llama folder (tied head) and the tiny GPT's safetensors."""
    import transformers
    from safetensors.torch import save_model
    from qlora_ref.train.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**LOADING_CONFIG)).save_pretrained(
        folder / "llama_float")
    torch.manual_seed(0)
    save_model(GPT(gpt_config()), str(folder / "gpt_float.safetensors"))


def gpt_config():
    from qlora_ref.train.gpt import GPTConfig
    return GPTConfig(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=4, n_embd=64)


def run_loading(rank: int, folder: Path, out: Path) -> None:
    """Old path (load whole, prepare_model, shard_model) against load_sharded: every local shard equal."""
    from safetensors.torch import load_model as load_safetensors
    from qlora_ref import prepare_model
    from qlora_ref.distributed import load_sharded, shard_model
    from qlora_ref.train.gpt import GPT
    from qlora_ref.train.hf_finetune import load_model

    lora = dict(r=4, lora_alpha=8, init="gaussian")
    info = {}
    for name in ("llama", "gpt"):
        if name == "llama":
            whole = load_model(folder / "llama_float")
            torch.manual_seed(1)
            old = shard_model(prepare_model(whole, **lora))
            torch.manual_seed(1)
            new = load_sharded(folder / "llama_float", **lora)
        else:
            whole = GPT(gpt_config())
            load_safetensors(whole, str(folder / "gpt_float.safetensors"))
            torch.manual_seed(1)
            old = shard_model(prepare_model(whole, **lora))
            torch.manual_seed(1)
            new = load_sharded(lambda: GPT(gpt_config()), folder / "gpt_float.safetensors", **lora)
        olds, news = dict(old.named_parameters()), dict(new.named_parameters())
        local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
        differ = [n for n in olds if n not in news or olds[n].dtype != news[n].dtype
                  or olds[n].requires_grad != news[n].requires_grad
                  or not torch.equal(local(olds[n]), local(news[n]))]
        ob, nb = dict(old.named_buffers()), dict(new.named_buffers())
        differ += [f"buffer {n}" for n in ob if n not in nb or not torch.equal(ob[n], nb[n])]
        ids = batches(1)[0][:2]
        with torch.no_grad():
            same_loss = torch.equal(loss_of(name, old, ids), loss_of(name, new, ids))
        info[name] = {"params": len(olds), "same_names": list(olds) == list(news),
                      "differ": differ, "same_loss": bool(same_loss),
                      "quantized": sum(n.endswith("base_layer.packed") for n in olds)}
    (out / f"loading_rank{rank}.json").write_text(json.dumps(info))


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--store", required=True, help="file for the file:// rendezvous")
    p.add_argument("--out", required=True)
    p.add_argument("--models", default="llama")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--save-at", type=int, default=0)
    p.add_argument("--resume", default=None, help="{name} is replaced by the model name")
    p.add_argument("--resume-step", type=int, default=0)
    p.add_argument("--mismatch", default=None, help="a checkpoint of another model to refuse")
    p.add_argument("--loading", default=None, help="folder of save_float_models: compare load_sharded")
    a = p.parse_args(argv)
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{a.store}", rank=a.rank,
                            world_size=a.world)
    try:
        for name in filter(None, a.models.split(",")):
            resume = a.resume.format(name=name) if a.resume else None
            mismatch = a.mismatch.format(name=name) if a.mismatch else None
            run_rank(name, a.rank, a.world, a.steps, Path(a.out), a.save_at, resume,
                     a.resume_step, mismatch)
        if a.loading:
            run_loading(a.rank, Path(a.loading), Path(a.out))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main()
