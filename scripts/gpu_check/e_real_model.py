"""(e) The real model, SmolLM2-135M-Instruct, in bfloat16: QLoRA training and greedy decoding.

Ours (``qlora_ref.prepare_model``, NF4, double quant, r=16 on all linear
layers) vs transformers + bitsandbytes 4-bit + PEFT LoRA with the same
settings, on the same 8x256 batch with torch's AdamW: training steps/s and
peak ``torch.cuda.max_memory_allocated``; then greedy decoding of 64 tokens
after a chat prompt, tokens/s for ours 4-bit, bitsandbytes 4-bit (adapters
attached) and the bfloat16 model, as ratios from one run. Without the
``real`` extra the part is skipped (:class:`PartSkipped`, the reason stated).
The dry run puts a tiny random Llama with a word-level chat tokenizer in
SmolLM2's place; the code after choosing the folder is the same.
"""
from __future__ import annotations

import time
from pathlib import Path

from . import device as dev
from .context import Context, PartSkipped
from .report import gb, table, x

#: The user turn of the chat prompt that (e) decodes from.
CHAT_PROMPT = "Explain in two sentences why a 4-bit base model still trains well with LoRA."
TINY_SPECIALS = ("<|im_start|>", "<|im_end|>", "<unk>")
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear")
TRAINED = ("qlora_ref", "bnb_peft")
VARIANTS = {
    "qlora_ref": "qlora_ref prepare_model (NF4, double quant, bf16 compute), LoRA r=16 on all "
                 "linear layers",
    "bnb_peft": "transformers + bitsandbytes 4-bit (NF4, double quant, bf16 compute) + PEFT "
                "LoRA r=16 on all linear layers",
    "bf16": "the bfloat16 model, no adapter (decoding only)",
}
METHOD = ("one process, all three models held on the device (the 4-bit ones built from the same "
          "bfloat16 weights). Training: the same random batch and torch.optim.AdamW(lr=1e-4) on "
          "the trainable parameters, forward with labels, backward, step; peak: "
          "torch.cuda.max_memory_allocated over the warm-up steps (the first makes the optimizer "
          "state) minus what was allocated before them, plus the model's resident bytes, so the "
          "other models held are not counted; time: best over rounds of the mean step of a "
          "round, the two models taking turns (qlora_ref.bench.timing.measure). Decoding, after "
          "training: model.generate(do_sample=False, min_new_tokens=max_new_tokens) after the "
          "chat prompt, adapters attached (not merged), one warm-up call each, then the models "
          "take turns; tokens/s is new tokens over the best call's time")


def tiny_llama_folder(folder: Path, config: dict) -> Path:
    """A Hugging Face folder in the shape of SmolLM2's: a random tiny Llama, a chat tokenizer.

    The tokenizer is a word-level one built here (no download): the special
    tokens, the prompt's words, then filler words up to the vocabulary size;
    its chat template writes the turns in SmolLM2's ChatML layout,
    ``<|im_start|>`` role text ``<|im_end|>`` (space-separated words here).
    """
    import tokenizers
    import torch
    import transformers

    words = list(dict.fromkeys([*TINY_SPECIALS, *CHAT_PROMPT.split(), "user", "assistant"]))
    words += [f"w{i}" for i in range(config["vocab_size"] - len(words))]
    if len(words) != config["vocab_size"]:
        raise ValueError(f"the tiny vocabulary needs {len(words)} words, the config has "
                         f"{config['vocab_size']}")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                           unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<unk>", pad_token="<|im_end|>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
        "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **config, bos_token_id=0, eos_token_id=1, pad_token_id=1))  # float32, as smollm2()'s
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def real_model_folder(ctx: Context) -> Path:
    """(e)'s model: SmolLM2-135M's local float32 folder, or the dry run's tiny Llama folder.

    Raises :class:`PartSkipped` when the real model's extra is not installed.
    """
    import importlib.util

    config = ctx.sizes.real_model
    if config is not None:
        return tiny_llama_folder(ctx.out / "tiny_llama", config)
    from qlora_ref import models

    if not models.extra_installed() or importlib.util.find_spec("gguf") is None:
        raise PartSkipped(f"extra not installed ({models.INSTALL_HINT})")
    return models.smollm2(quiet=True)


def model_builders(folder: Path, ctx: Context) -> dict:
    """One builder per variant: a model on the device, bfloat16 but for the 4-bit bases."""
    import peft
    import torch
    import transformers

    import qlora_ref

    bf16 = torch.bfloat16

    def load(**kwargs):
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=bf16, **kwargs)

    def ours():
        # quantized on the CPU (the Cython/NumPy kernels), then moved, as in (d)
        model = qlora_ref.prepare_model(load(), **LORA, quant_type="nf4", double_quant=True,
                                        compute_dtype=bf16)
        return model.to(ctx.device)

    def bnb_peft():
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=bf16)
        model = load(quantization_config=config, device_map=ctx.device)  # "cuda": cuda:0
        return peft.get_peft_model(model, peft.LoraConfig(**LORA, task_type="CAUSAL_LM"))

    def bf16_plain():
        return load().to(ctx.device)

    return {"qlora_ref": ours, "bnb_peft": bnb_peft, "bf16": bf16_plain}


def _inputs(tokenizer, ctx: Context):
    """The chat prompt on the device ((1, p) ids and mask), the pad id, a random (batch, seq) batch."""
    import torch

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    prompt = {k: v.to(ctx.device) for k, v in prompt.items()}  # input_ids, attention_mask (1, p)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(len(tokenizer), ctx.sizes.real_tokens, generator=g).to(ctx.device)
    return prompt, pad, batch


def _build(folder: Path, ctx: Context) -> tuple:
    """Every model, held for the whole part; resident bytes = what building it allocated."""
    import torch

    models, resident, build_seconds = {}, {}, {}
    for name, build in model_builders(folder, ctx).items():
        dev.reset_peak(ctx.device)
        before = dev.allocated(ctx.device)
        t0 = time.perf_counter()
        torch.manual_seed(1)
        models[name] = build()
        dev.sync(ctx.device)
        build_seconds[name] = time.perf_counter() - t0
        resident[name] = dev.minus(dev.allocated(ctx.device), before)
    return models, resident, build_seconds


def _logit_agreement(models: dict, prompt: dict) -> dict:
    """Ours vs bitsandbytes on the prompt before training: the adapters are zero, so the NF4 bases.

    Train mode under no_grad: bitsandbytes' CPU eval path would repack its
    weights for inference, and the training after this needs them as they are.
    """
    import torch

    for name in TRAINED:
        models[name].train()   # from_pretrained returns a model in eval mode
    with torch.no_grad():
        logits = {name: models[name](**prompt, use_cache=False).logits.float()  # (1, p, vocab)
                  for name in TRAINED}
    ours, bnb = logits["qlora_ref"], logits["bnb_peft"]
    return {"max_abs_logit_diff_qlora_ref_vs_bnb": (ours - bnb).abs().max().item(),
            "max_abs_logit_bnb": bnb.abs().max().item(),
            "same_argmax_qlora_ref_vs_bnb": (ours.argmax(-1) == bnb.argmax(-1)).sum().item()}


def _train(models: dict, resident: dict, batch, ctx: Context) -> dict:
    """Peak memory of each model's warm-up steps, then the models take turns: seconds per step."""
    import torch

    s, device = ctx.sizes, ctx.device
    trainable = {n: [p for p in models[n].parameters() if p.requires_grad] for n in TRAINED}
    optimizers = {n: torch.optim.AdamW(trainable[n], lr=1e-4) for n in TRAINED}

    def step(name):
        loss = models[name](input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return loss

    out = {}
    for name in TRAINED:
        dev.reset_peak(device)
        before = dev.allocated(device)   # the other models, held; this one's weights are resident
        first_loss = step(name).item()
        for _ in range(s.real_warmup - 1):
            step(name)
        dev.sync(device)
        peak = dev.minus(dev.peak(device), before)
        out[name] = {"peak_bytes": None if peak is None else peak + resident[name],
                     "first_loss": first_loss,
                     "trainable_params": sum(p.numel() for p in trainable[name])}
    timed = dev.seconds_in_turns({n: (lambda n=n: step(n)) for n in TRAINED}, device,
                                 rounds=s.real_rounds, calls=s.real_iters)
    for name in TRAINED:
        seconds = timed[name]["seconds"]
        out[name].update(ms_per_step=1e3 * seconds, steps_per_s=1 / seconds,
                         samples=timed[name]["samples"])
    return out


def _decode(models: dict, prompt: dict, pad: int, ctx: Context) -> dict:
    """Greedy decoding after training, adapters attached (not merged): tokens/s and the tokens."""
    import torch

    s, n_prompt = ctx.sizes, prompt["input_ids"].shape[1]

    def decode(name, n):
        with torch.no_grad():
            out = models[name].generate(**prompt, max_new_tokens=n, min_new_tokens=n,
                                        do_sample=False, pad_token_id=pad)
        return out[0, n_prompt:]

    for name in models:
        models[name].eval()
        decode(name, min(4, s.new_tokens))  # warm-up: kernels, caches, cuBLAS workspaces
    timed = dev.seconds_in_turns({n: (lambda n=n: decode(n, s.new_tokens)) for n in models},
                                 ctx.device, rounds=s.decode_rounds)
    return {name: {"decode_tokens_per_s": len(t["result"]) / t["seconds"],
                   "decode_samples": t["samples"], "tokens": t["result"].tolist()}
            for name, t in timed.items()}


def _ratios(v: dict) -> dict:
    ours, bnb_, bf16 = (v[k] for k in ("qlora_ref", "bnb_peft", "bf16"))
    return {
        "time_qlora_ref_vs_bnb_peft": ours["ms_per_step"] / bnb_["ms_per_step"],
        "peak_qlora_ref_vs_bnb_peft": dev.ratio(ours["peak_bytes"], bnb_["peak_bytes"]),
        "decode_qlora_ref_vs_bnb": ours["decode_tokens_per_s"] / bnb_["decode_tokens_per_s"],
        "decode_qlora_ref_vs_bf16": ours["decode_tokens_per_s"] / bf16["decode_tokens_per_s"],
        "decode_bnb_vs_bf16": bnb_["decode_tokens_per_s"] / bf16["decode_tokens_per_s"],
    }


def run(ctx: Context) -> dict:
    """QLoRA on the real model: training steps/s and peak memory, greedy decoding tokens/s."""
    import transformers

    s = ctx.sizes
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    folder = real_model_folder(ctx)
    folder_seconds = time.perf_counter() - started
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompt, pad, batch = _inputs(tokenizer, ctx)
    models, resident, build_seconds = _build(folder, ctx)
    agreement = _logit_agreement(models, prompt)
    trained = _train(models, resident, batch, ctx)
    decoded = _decode(models, prompt, pad, ctx)
    texts = {name: tokenizer.decode(decoded[name].pop("tokens"), skip_special_tokens=True)
             for name in models}
    variants = {name: {"what": VARIANTS[name], "resident_bytes": resident[name],
                       "build_seconds": build_seconds[name], **decoded[name],
                       "generated_text": texts[name], **trained.get(name, {})}
                for name in models}
    config = models["bf16"].config
    return {"model": "tiny Llama from a config (dry run)" if s.real_model else
                     "SmolLM2-135M-Instruct (qlora_ref.models.smollm2())",
            "folder": str(folder), "folder_seconds": folder_seconds,
            "config": {k: getattr(config, k) for k in (
                "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings")},
            "n_params": sum(p.numel() for p in models["bf16"].parameters()),
            "tokens": list(s.real_tokens), "r": LORA["r"], "lora_alpha": LORA["lora_alpha"],
            "warmup": s.real_warmup, "rounds": s.real_rounds, "iters_per_round": s.real_iters,
            "prompt_tokens": int(prompt["input_ids"].shape[1]), "new_tokens": s.new_tokens,
            "decode_rounds": s.decode_rounds, "chat_prompt": CHAT_PROMPT, **agreement,
            "variants": variants, "ratios": _ratios(variants), "method": METHOD}


def markdown(r: dict) -> str:
    v, q, c = r["variants"], r["ratios"], r["config"]
    bnb = v["bnb_peft"]
    train_rows = [(v[k]["what"], f"{v[k]['ms_per_step']:.2f}", f"{v[k]['steps_per_s']:.2f}",
                   x(v[k]["ms_per_step"] / bnb["ms_per_step"]), gb(v[k]["peak_bytes"], 4),
                   x(dev.ratio(v[k]["peak_bytes"], bnb["peak_bytes"]), 3),
                   gb(v[k]["resident_bytes"], 4), f"{v[k]['trainable_params']:,}")
                  for k in TRAINED]
    decode_rows = [(v[k]["what"], f"{v[k]['decode_tokens_per_s']:.1f}",
                    x(v[k]["decode_tokens_per_s"] / v["bf16"]["decode_tokens_per_s"]),
                    repr(v[k]["generated_text"][:120])) for k in v]
    return (f"# (e) The real model: QLoRA training and greedy decoding\n\n{r['model']}: hidden "
            f"{c['hidden_size']}, {c['num_hidden_layers']} layers, vocab {c['vocab_size']}, "
            f"{r['n_params']:,} parameters; folder `{r['folder']}` (ready in "
            f"{r['folder_seconds']:.1f} s).\n\n## Training\n\n{r['tokens'][0]}x{r['tokens'][1]} "
            f"tokens per step, LoRA r={r['r']}, alpha={r['lora_alpha']}; {r['rounds']} rounds of "
            f"{r['iters_per_round']} steps after {r['warmup']} warm-up step(s).\n\n"
            + table(("model", "ms / step", "steps / s", "x bnb+PEFT", "peak memory",
                     "x bnb+PEFT", "weights held", "trainable"), train_rows)
            + f"\n\n## Greedy decoding\n\n{r['new_tokens']} new tokens after a "
              f"{r['prompt_tokens']}-token chat prompt, {r['decode_rounds']} round(s).\n\n"
            + table(("model", "tokens / s", "x bfloat16", "text (start)"), decode_rows)
            + f"\n\nours 4-bit / bitsandbytes 4-bit: {x(q['decode_qlora_ref_vs_bnb'])}; "
              f"ours / bfloat16: {x(q['decode_qlora_ref_vs_bf16'])}; bitsandbytes / bfloat16: "
              f"{x(q['decode_bnb_vs_bf16'])}.\n\nBefore training (adapters zero, so the NF4 "
              f"bases alone): ours vs bitsandbytes on the prompt, max |logit difference| "
              f"{r['max_abs_logit_diff_qlora_ref_vs_bnb']:.3g} (largest |logit| "
              f"{r['max_abs_logit_bnb']:.3g}), the same most likely next "
              f"token at {r['same_argmax_qlora_ref_vs_bnb']} of {r['prompt_tokens']} "
              f"positions.\n\nMethod: {r['method']}.\n")
