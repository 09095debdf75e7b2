"""(f) FSDP2 at world size 1 (NCCL; gloo in the dry run) on a two-block Llama of (d)'s widths.

``qlora_ref.distributed.shard_model``'s all-gather hooks run (a 4-bit layer
sees its whole codes inside its forward, its shard outside), the loss and the
adapter gradients equal the unsharded model's, and a DCP checkpoint round-trips.
"""
from __future__ import annotations

from .context import Context
from .report import table


def _models(ctx: Context, llama: dict) -> tuple:
    """(the sharded model, an unsharded copy), adapters with B != 0 (else A has no gradient)."""
    import copy

    import torch
    import transformers

    from qlora_ref import prepare_model
    from qlora_ref.distributed import shard_model

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama))
    torch.manual_seed(1)
    model = prepare_model(base, r=ctx.sizes.r, lora_alpha=ctx.sizes.lora_alpha, init="gaussian")
    for m in model.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B, std=0.02)
    model = model.to(ctx.device)
    reference = copy.deepcopy(model)
    shard_model(model)
    return model, reference


def _forward_backward_watching_gathers(model, ids) -> tuple:
    """Loss of one forward+backward, and per 4-bit layer call: were its codes whole inside it?"""
    from qlora_ref.nn import Linear4bit

    seen = []

    def pre_hook(module, args):  # on the LoRA layer: it reads its base's tensors directly
        base = module.base_layer
        seen.append(not hasattr(base.packed, "to_local")
                    and base.packed.numel() * 2 == base.weight_numel)

    handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules()
               if isinstance(getattr(m, "base_layer", None), Linear4bit)]
    try:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    sharded_after = all(hasattr(m.packed, "to_local") for m in layers)
    return loss, seen, len(layers), sharded_after


def _max_grad_diff(model, reference) -> float:
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    return max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)


def _dcp_round_trip(model, folder) -> bool:
    """One optimizer step, save, zero the adapters, load: are the adapters back, byte for byte?"""
    import torch

    from qlora_ref.distributed import load_checkpoint, save_checkpoint

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    opt.step()
    adapters = {n: p.full_tensor().clone() for n, p in model.named_parameters()
                if p.requires_grad}
    save_checkpoint(model, opt, folder)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.zero_()
    load_checkpoint(model, opt, folder)
    return all(torch.equal(p.full_tensor(), adapters[n])
               for n, p in model.named_parameters() if p.requires_grad)


def run(ctx: Context) -> dict:
    """FSDP2 over one process: the all-gather hooks run, and the numbers equal the unsharded model's."""
    import torch
    import torch.distributed as dist
    import transformers

    backend = "nccl" if ctx.device == "cuda" else "gloo"
    store = ctx.out / "store"
    store.unlink(missing_ok=True)
    if ctx.device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    try:
        transformers.logging.set_verbosity_error()
        llama = {**ctx.sizes.llama, "num_hidden_layers": 2}  # (d)'s widths, two blocks
        model, reference = _models(ctx, llama)
        batch, seq = ctx.sizes.llama_tokens
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(0, llama["vocab_size"], (batch, seq), generator=g).to(ctx.device)
        loss, seen, n_layers, sharded_after = _forward_backward_watching_gathers(model, ids)
        want = reference(input_ids=ids, labels=ids).loss
        want.backward()
        grad_diff = _max_grad_diff(model, reference)
        round_trip = _dcp_round_trip(model, ctx.out / "dcp")
    finally:
        dist.destroy_process_group()
        store.unlink(missing_ok=True)
    return {"backend": backend, "world_size": 1, "llama": llama, "tokens": [batch, seq],
            "layers_4bit": n_layers, "forward_calls_seen": len(seen),
            "hooks_ran": bool(seen) and all(seen) and sharded_after,
            "loss_sharded": loss.item(), "loss_unsharded": want.item(),
            "loss_equal": bool(torch.equal(loss.detach(), want.detach())),
            "max_abs_grad_diff": grad_diff, "grads_equal": grad_diff == 0.0,
            "dcp_round_trip_equal": round_trip}


def markdown(r: dict) -> str:
    rows = [(r["backend"], r["layers_4bit"], r["forward_calls_seen"], r["hooks_ran"],
             f"{r['loss_sharded']:.6f}", f"{r['loss_unsharded']:.6f}", r["loss_equal"],
             f"{r['max_abs_grad_diff']:.3g}", r["dcp_round_trip_equal"])]
    return ("# (f) FSDP2 at world size 1\n\n"
            + table(("backend", "4-bit layers", "layer calls seen", "hooks ran", "loss sharded",
                     "unsharded", "equal", "max |grad diff|", "DCP round trip"), rows) + "\n")
