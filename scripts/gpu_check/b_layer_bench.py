"""(b) One layer, forward and backward: qlora_ref vs bitsandbytes + PEFT vs 16-bit + PEFT.

A (layer x layer) bfloat16 weight, the three modules built from it; time and
peak ``torch.cuda.max_memory_allocated`` of one call, as ratios from one run.
"""
from __future__ import annotations

from . import device as dev
from .context import Context
from .report import gb, table, x

VARIANTS = {
    "qlora_ref": "qlora_ref LoRALinear over Linear4bit (NF4, double quant)",
    "bnb_peft": "bitsandbytes Linear4bit (NF4, double quant) + PEFT LoRA",
    "lora16_peft": "16-bit nn.Linear + PEFT LoRA",
}
METHOD = ("forward + backward (dE/dx and the adapter gradients) of one call; time: best over "
          "rounds of the mean of a round's calls, variants taking turns "
          "(qlora_ref.bench.timing.measure); peak: torch.cuda.max_memory_allocated during one "
          "call minus what was allocated before the variant was built (the shared input and "
          "output gradient are not counted)")


def layer_builders(weight, ctx: Context) -> dict:
    """One builder per variant: a module on the device whose trainable parameters are adapters."""
    import collections

    import bitsandbytes as bnb
    import peft
    import torch

    import qlora_ref

    s, n, bf16 = ctx.sizes, weight.shape[0], torch.bfloat16
    lora = dict(r=s.r, lora_alpha=s.lora_alpha, lora_dropout=0.0)

    def linear():
        layer = torch.nn.Linear(n, n, bias=False, dtype=bf16)
        layer.weight.data.copy_(weight)
        return layer

    def ours():
        layer = qlora_ref.nn.LoRALinear.from_linear(linear(), **lora, quant_bits=4,
                                                    quant_type="nf4", blocksize=64,
                                                    double_quant=True, compute_dtype=bf16)
        return layer.to(ctx.device)

    def with_peft(base, loaded_in_4bit):
        model = torch.nn.Sequential(collections.OrderedDict(proj=base))
        # PEFT takes its Linear4bit LoRA layer only for a model that says it is loaded in 4 bits
        model.is_loaded_in_4bit = loaded_in_4bit
        return peft.get_peft_model(model, peft.LoraConfig(target_modules=["proj"], **lora))

    def bnb_peft():
        base = bnb.nn.Linear4bit(n, n, bias=False, compute_dtype=bf16, compress_statistics=True,
                                 quant_type="nf4")
        base.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, blocksize=64,
                                        compress_statistics=True, quant_type="nf4")
        return with_peft(base.to(ctx.device), True)  # .to() quantizes, on that device

    def lora16_peft():
        return with_peft(linear().to(ctx.device), False)

    return {"qlora_ref": ours, "bnb_peft": bnb_peft, "lora16_peft": lora16_peft}


def _inputs(ctx: Context):
    """The weight (out, in) on the CPU, the input and the output gradient on the device."""
    import torch

    s, device = ctx.sizes, ctx.device
    torch.manual_seed(0)
    weight = (torch.randn(s.layer, s.layer) * 0.02).to(torch.bfloat16)       # (out, in)
    x_ = torch.randn(*s.tokens, s.layer, dtype=torch.bfloat16, device=device,
                     requires_grad=True)                                      # (batch, seq, in)
    grad_out = torch.randn(*s.tokens, s.layer, dtype=torch.bfloat16, device=device)
    (x_.detach() @ weight.to(device).T).sum().item()  # cuBLAS makes its workspace now, not in a row
    return weight, x_, grad_out


def _build_and_measure_memory(ctx: Context, build, step) -> tuple:
    """Build one variant, warm it up, and read what it holds and its peak during one step."""
    device = ctx.device
    dev.reset_peak(device)
    before = dev.allocated(device)
    layer = build()
    params = [p for p in layer.parameters() if p.requires_grad]
    resident = dev.minus(dev.allocated(device), before)
    for _ in range(ctx.sizes.warmup):
        step(layer, params)
    dev.sync(device)
    dev.reset_peak(device)
    step(layer, params)
    dev.sync(device)
    memory = {"resident_bytes": resident, "peak_bytes": dev.minus(dev.peak(device), before),
              "trainable_params": sum(p.numel() for p in params)}
    return layer, params, memory


def _ratios(v: dict) -> dict:
    ours, bnb_, lora16 = (v[k] for k in ("qlora_ref", "bnb_peft", "lora16_peft"))
    return {
        "time_qlora_ref_vs_bnb_peft": ours["ms_per_step"] / bnb_["ms_per_step"],
        "time_qlora_ref_vs_lora16_peft": ours["ms_per_step"] / lora16["ms_per_step"],
        "time_bnb_peft_vs_lora16_peft": bnb_["ms_per_step"] / lora16["ms_per_step"],
        "peak_qlora_ref_vs_bnb_peft": dev.ratio(ours["peak_bytes"], bnb_["peak_bytes"]),
        "peak_qlora_ref_vs_lora16_peft": dev.ratio(ours["peak_bytes"], lora16["peak_bytes"]),
        "peak_bnb_peft_vs_lora16_peft": dev.ratio(bnb_["peak_bytes"], lora16["peak_bytes"]),
    }


def run(ctx: Context) -> dict:
    """Time and peak memory of forward+backward through one layer, three implementations."""
    import torch

    s = ctx.sizes
    weight, x_, grad_out = _inputs(ctx)

    def step(layer, params):
        layer(x_).backward(grad_out)   # dE/dx is needed too, as for any layer but the first
        x_.grad = None
        for p in params:
            p.grad = None

    layers, memory, outputs = {}, {}, {}
    for name, build in layer_builders(weight, ctx).items():  # memory: one variant at a time
        layer, params, memory[name] = _build_and_measure_memory(ctx, build, step)
        with torch.no_grad():
            outputs[name] = layer(x_).float()
        layers[name] = (layer, params)
    timed = dev.seconds_in_turns({name: (lambda lp=lp: step(*lp)) for name, lp in layers.items()},
                                 ctx.device, rounds=s.rounds, calls=s.iters)
    variants = {name: {"what": VARIANTS[name], "ms_per_step": 1e3 * timed[name]["seconds"],
                       "samples": timed[name]["samples"], **memory[name]} for name in layers}
    # a sanity check, not a target: the adapters start at B = 0, so the outputs are the
    # base layers' (same NF4 codes; the double-quant offset may differ by a rounding)
    diff = (outputs["qlora_ref"] - outputs["bnb_peft"]).abs().max().item()
    return {"sizes": {"layer": [s.layer, s.layer], "tokens": list(s.tokens), "dtype": "bfloat16",
                      "r": s.r, "lora_alpha": s.lora_alpha, "warmup": s.warmup,
                      "rounds": s.rounds, "iters_per_round": s.iters},
            "variants": variants, "ratios": _ratios(variants),
            "max_abs_output_diff_qlora_ref_vs_bnb": diff, "method": METHOD}


def markdown(r: dict) -> str:
    s, v, q = r["sizes"], r["variants"], r["ratios"]
    bnb = v["bnb_peft"]
    rows = [(v[k]["what"], f"{v[k]['ms_per_step']:.3f}",
             x(v[k]["ms_per_step"] / bnb["ms_per_step"]),
             gb(v[k]["peak_bytes"], 4), x(dev.ratio(v[k]["peak_bytes"], bnb["peak_bytes"])),
             gb(v[k]["resident_bytes"], 4), f"{v[k]['trainable_params']:,}") for k in v]
    return (f"# (b) One layer, forward + backward\n\n{s['layer'][0]}x{s['layer'][1]} layer, "
            f"{s['tokens'][0]}x{s['tokens'][1]} {s['dtype']} tokens, LoRA r={s['r']}, "
            f"alpha={s['lora_alpha']}; {s['rounds']} rounds of {s['iters_per_round']} calls "
            f"after {s['warmup']} warm-up call(s).\n\n"
            + table(("layer", "ms / step", "x bnb+PEFT", "peak memory", "x bnb+PEFT",
                     "held between steps", "trainable"), rows)
            + f"\n\nqlora_ref / bnb+PEFT: time {x(q['time_qlora_ref_vs_bnb_peft'])}, "
              f"peak memory {x(q['peak_qlora_ref_vs_bnb_peft'])}. "
              f"max |output difference| qlora_ref vs bitsandbytes: "
              f"{r['max_abs_output_diff_qlora_ref_vs_bnb']:.3g}\n\nMethod: {r['method']}.\n")
