"""``qlora-ref generate``: print a model's greedy continuation of a prompt, with or without an adapter.

* ``--model DIR [--adapter DIR]`` -- a local Hugging Face causal LM (or
  ``--model smollm2``, the optional extra's real model); with an
  adapter, the base is stored as the fine-tuning run stored it and
  :func:`qlora_ref.load_adapter` puts the adapters in
  (:func:`qlora_ref.train.hf_finetune.generate`). ``--adapter`` alone uses the
  base folder the adapter records.
* ``--model OUT`` where ``OUT`` is a saved 4-bit model (``qlora-ref quantize
  --model DIR --save OUT``; its config.json holds a 4-bit bitsandbytes
  ``quantization_config``) -- loaded with
  :func:`qlora_ref.nn.saved4bit.load_quantized`, codes as stored, nothing
  quantized; ``--adapter`` goes on its 4-bit layers (also when the adapter
  records such a folder as its base).
* no ``--model`` -- the shipped tiny GPT (prompts in its task vocabulary,
  e.g. ``s3141=``), optionally with ``--adapter runs/finetune/adapter``.
"""
from __future__ import annotations

from pathlib import Path

from ..validation import DECODERS

#: The shared flags it uses: greedy decoding draws nothing, so no --seed.
COMMON = ("device", "quiet")

HELP = "print the greedy continuation of --prompt (a Hugging Face model or the tiny GPT)"


def add_arguments(p):
    p.add_argument("--model", metavar="DIR", help="a local Hugging Face causal LM folder, or "
                   "'smollm2' (the real extra, see docs/real_model.md) (default: the shipped tiny GPT, "
                   "or the base an --adapter records)")
    p.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter folder, e.g. "
                   "runs/finetune/adapter")
    p.add_argument("--prompt", required=True, help="the text to continue (tiny GPT: a task "
                   "prompt such as s3141=)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="at most this many new "
                   "tokens (default 32); generation stops at EOS")
    p.add_argument("--decoder", choices=DECODERS, default="lean",
                   help="a Hugging Face model's decoding loop: 'lean' (default) is qlora_ref's "
                   "Llama decoder (static KV cache, q/k/v and gate/up as one 4-bit matmul each; "
                   "Llama-family models on the CPU, others fall back), 'transformers' is "
                   "model.generate; both are greedy")
    p.add_argument("--greedy", action="store_true", default=True,
                   help="greedy decoding (the default and, for now, the only one)")
    return p


def run(args) -> int:
    from ..validation import check_text

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    check_text(args.prompt, "--prompt")  # a non-UTF-8 byte (a lone surrogate here) is one line
    if args.model is None and args.adapter is not None:
        from ..train.hf_finetune import adapter_base

        base = adapter_base(args.adapter)
        if base and Path(base).is_dir():  # an adapter of a Hugging Face model
            args.model = base
        elif base and Path(base).is_absolute():  # the folder it was trained on is gone
            raise ValueError(f"{args.adapter} was trained on {base}, which is missing; pass "
                             "--model DIR with that model")
    if args.model is not None and _is_saved_4bit(args.model):
        text = _saved_4bit(args)
    elif args.model is not None:
        from ..train.hf_finetune import generate

        text = generate(args.model, args.prompt, adapter=args.adapter,
                        max_new_tokens=args.max_new_tokens, device=args.device,
                        decoder=args.decoder)
    else:
        text = _tiny(args)
    print(text)
    return 0


def _is_saved_4bit(folder) -> bool:
    from ..nn.saved4bit import is_quantized_folder

    return is_quantized_folder(folder)


def _saved_4bit(args) -> str:
    """Greedy continuation by a saved 4-bit model (and adapter): its codes loaded, not quantized."""
    import torch

    from ..nn.saved4bit import load_quantized
    from ..train.hf_finetune import adapter_base, check_model_fits, complete, load_tokenizer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.adapter is not None:
        adapter_base(args.adapter)  # a clear error if it is not an adapter folder
    tokenizer = load_tokenizer(args.model)
    # the matmul dtype follows the device generation runs on (as for a float base + adapter)
    model = load_quantized(args.model, compute_dtype=(
        torch.bfloat16 if device.type == "cuda" else torch.float32), adapter=args.adapter)
    check_model_fits(model, tokenizer, len(tokenizer(args.prompt)["input_ids"])
                     + args.max_new_tokens, args.model)
    return complete(model.to(device), tokenizer, args.prompt, args.max_new_tokens, device,
                    args.decoder)


def _tiny(args) -> str:
    import torch

    from ..train.finetune import complete_tiny
    from ..train.pretrain import default_base_model_path, load_base_model
    from ..train.tasks import VOCAB

    bad = sorted(set(args.prompt) - set(VOCAB))
    if bad:
        raise ValueError(f"the tiny GPT's prompt may use only {VOCAB[3:]!r}; got {''.join(bad)!r} "
                         "(for a Hugging Face model pass --model DIR)")
    device = torch.device(args.device or "cpu")
    model = load_base_model(default_base_model_path(), device="cpu")
    if args.adapter is not None:
        from ..nn import load_adapter

        # the base as the adapter records it; the matmuls in float32 on the CPU
        model = load_adapter(model, args.adapter, compute_dtype=torch.float32)
    return complete_tiny(model.to(device), args.prompt, args.max_new_tokens, device)
