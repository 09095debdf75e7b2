"""(d) A transformers Llama of about 1B parameters (from a config, no download): memory vs prediction.

One training step with 16-bit LoRA and with QLoRA; the peak memory of each
next to what ``qlora-ref memory`` predicts (:func:`qlora_ref.memory.finetune_memory`).
"""
from __future__ import annotations

import statistics
import time

from . import device as dev
from .context import Context
from .report import gb, table, x


def prediction(n_params: int, method: str, lora_params: int) -> dict:
    """What ``qlora-ref memory N --lora-params L`` predicts (``qlora_ref.memory.finetune_memory``).

    Note (activations): ``finetune_memory`` takes activations as an input and
    counts 0 unless given; this passes none, so the prediction holds weights,
    adapters, gradients and optimizer state only. When ``qlora_ref.memory``
    estimates activations, pass the step's batch and sequence length here.
    """
    from qlora_ref import memory

    t = memory.finetune_memory(n_params, method, lora_params=lora_params)
    return {"rows": dict(t.rows), "total_bytes": t.total_bytes,
            "activations_included": t["activations"] > 0,
            "command": f"qlora-ref memory {n_params} --lora-params {lora_params}",
            "markdown": t.to_markdown()}


def _prepared_llama(ctx: Context, config, quant_type):
    """The Llama built on the device with random weights, prepared (16-bit LoRA or QLoRA), training."""
    import torch
    import transformers

    import qlora_ref

    s = ctx.sizes
    torch.manual_seed(0)
    with torch.device(ctx.device):  # random weights made where they will live: no download, no copy
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    # Linear4bit quantizes on the CPU (the Cython/NumPy kernels) and is moved back by .to()
    model = qlora_ref.prepare_model(model, r=s.r, lora_alpha=s.lora_alpha, quant_type=quant_type,
                                    compute_dtype=torch.bfloat16 if quant_type else None)
    model.to(ctx.device)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model, n_params


def _train_steps(ctx: Context, model, trainable, tokens, before) -> tuple:
    """``llama_steps`` steps; returns (seconds per step, bytes held after the first, last loss)."""
    import torch

    # torch's AdamW keeps its state on the device (qlora_ref's PagedAdamW would move it to the
    # host, out of the count); foreach=False: no temporary copies of all parameters at once
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=False)
    step_seconds, after_step = [], None
    for i in range(ctx.sizes.llama_steps):
        dev.sync(ctx.device)
        t0 = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        dev.sync(ctx.device)
        step_seconds.append(time.perf_counter() - t0)
        if i == 0:   # gradients still held, optimizer state made: everything but activations
            after_step = dev.minus(dev.allocated(ctx.device), before)
        optimizer.zero_grad(set_to_none=True)
    return step_seconds, after_step, float(loss)


def llama_step_memory(ctx: Context, config, quant_type, tokens) -> dict:
    """Build the Llama on the device, prepare it (16-bit LoRA or QLoRA), train, measure."""
    import qlora_ref

    device = ctx.device
    dev.reset_peak(device)
    before = dev.allocated(device)
    model, n_params = _prepared_llama(ctx, config, quant_type)
    counted = qlora_ref.trainable_parameters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapter_bytes = sum(p.numel() * p.element_size() for p in trainable)
    dev.reset_peak(device)
    held = dev.minus(dev.allocated(device), before)         # weights + adapters, nothing else
    step_seconds, after_step, loss = _train_steps(ctx, model, trainable, tokens, before)
    peak = dev.minus(dev.peak(device), before)
    del model, trainable
    dev.reset_peak(device)
    return {
        "quant_type": quant_type, "n_params": n_params, "trainable_params": counted.trainable,
        "base_params": counted.base_params, "base_bytes_as_stored": counted.base_bytes,
        "seconds_per_step": statistics.median(step_seconds[1:] or step_seconds),
        "step_seconds": step_seconds, "loss": loss,
        "measured": {"weights_bytes": dev.minus(held, adapter_bytes),
                     "adapter_bytes": adapter_bytes,
                     "gradients_and_optimizer_bytes": dev.minus(after_step, held),
                     "static_bytes": after_step,
                     "activations_and_temporaries_bytes": dev.minus(peak, after_step),
                     "peak_bytes": peak},
    }


def run(ctx: Context) -> dict:
    """16-bit LoRA and QLoRA on a ~1B-parameter Llama: measured peak memory vs the prediction."""
    import torch
    import transformers

    from qlora_ref import memory

    s = ctx.sizes
    config = transformers.LlamaConfig(tie_word_embeddings=False, **s.llama)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(config.vocab_size, s.llama_tokens, generator=g).to(ctx.device)
    lora_params = memory.lora_param_count(config.hidden_size, config.intermediate_size,
                                          config.num_hidden_layers, r=s.r)
    variants = {}
    for name, quant_type, method in (("lora16", None, "lora"), ("qlora", "nf4", "qlora")):
        v = llama_step_memory(ctx, config, quant_type, tokens)
        v["prediction"] = prediction(v["n_params"], method, lora_params)
        predicted = v["prediction"]["total_bytes"]
        v["peak_vs_prediction"] = dev.ratio(v["measured"]["peak_bytes"], predicted)
        v["static_vs_prediction"] = dev.ratio(v["measured"]["static_bytes"], predicted)
        v["lora_params_match_prediction"] = v["trainable_params"] == lora_params
        variants[name] = v
    return {"config": {**s.llama, "tie_word_embeddings": False},
            "tokens": list(s.llama_tokens), "r": s.r, "lora_alpha": s.lora_alpha,
            "lora_params_predicted": lora_params, "steps": s.llama_steps,
            "gradient_checkpointing": True, "optimizer": "torch.optim.AdamW(foreach=False)",
            "dtype": "bfloat16 base, float32 adapters",
            "activations_in_prediction": any(v["prediction"]["activations_included"]
                                             for v in variants.values()),
            "variants": variants}


#: (row label, measured key, predicted row: a row name, "total", or None for gradients + optimizer)
TERMS = (("weights", "weights_bytes", "weights"),
         ("adapters", "adapter_bytes", "adapters (LoRA weights)"),
         ("gradients + optimizer state", "gradients_and_optimizer_bytes", None),
         ("activations and temporaries", "activations_and_temporaries_bytes", "activations"),
         ("**peak**", "peak_bytes", "total"))


def _predicted(p: dict, row):
    if row == "total":
        return p["total_bytes"]
    if row is None:
        return p["rows"]["gradients"] + p["rows"]["optimizer state"]
    return p["rows"][row]


def markdown(r: dict) -> str:
    v = r["variants"]
    rows = [[term] + [cell for name in ("lora16", "qlora")
                      for cell in (gb(v[name]["measured"][key]),
                                   gb(_predicted(v[name]["prediction"], row)))]
            for term, key, row in TERMS]
    c, peaks = r["config"], {k: v[k]["measured"]["peak_bytes"] for k in v}
    included = "includes" if r["activations_in_prediction"] else "does NOT include"
    return (f"# (d) A ~1B Llama: 16-bit LoRA vs QLoRA, measured vs predicted\n\n"
            f"transformers `LlamaConfig` (no download): hidden {c['hidden_size']}, "
            f"{c['num_hidden_layers']} layers, intermediate {c['intermediate_size']}, "
            f"vocab {c['vocab_size']}: {v['qlora']['n_params']:,} parameters. LoRA r={r['r']}, "
            f"alpha={r['lora_alpha']} on all linear layers but the head "
            f"({r['lora_params_predicted']:,} adapter parameters predicted, "
            f"{v['qlora']['trainable_params']:,} trained); {r['tokens'][0]}x{r['tokens'][1]} "
            f"tokens per step, gradient checkpointing, {r['optimizer']}, {r['dtype']}.\n\n"
            + table(("term", "LoRA 16-bit measured", "predicted", "QLoRA measured", "predicted"),
                    rows)
            + f"\n\nQLoRA peak / prediction: {x(v['qlora']['peak_vs_prediction'])} "
              f"(before activations: {x(v['qlora']['static_vs_prediction'])}); "
              f"16-bit LoRA: {x(v['lora16']['peak_vs_prediction'])}. "
              f"QLoRA peak / 16-bit LoRA peak: {x(dev.ratio(peaks['qlora'], peaks['lora16']))}."
              f"\nTime per step: 16-bit LoRA {v['lora16']['seconds_per_step']:.3f} s, "
              f"QLoRA {v['qlora']['seconds_per_step']:.3f} s.\n\n"
              f"The prediction (`{v['qlora']['prediction']['command']}`) {included} activations. "
              "It counts the whole model as NF4, and the adapters and their gradients as 16-bit; "
              "here the embeddings and head stay bfloat16, and the adapters and their gradients "
              "are float32, as in PEFT.\n")
