"""The "generate" table of ``qlora-ref bench --generate``: decoding in 4 bits against 16 and 32.

Decoding one token reads every weight once, so its speed is the speed of
reading the weights: 4 bits per weight in NF4, 16 in bfloat16, 32 in float32.
Training's forward dequantizes the whole weight first (a write and a re-read
of 4 bytes per weight); without a gradient, a few rows take the fused kernel
(:meth:`qlora_ref.nn.Linear4bit.matmul_few_rows`, ``gemv4.h``), which reads
only the codes and the constants.

Two tables, on one thread (torch's and the kernels'), best of ``repeat``:

* *layer*: a 4096 x 4096 layer for 1 and 8 tokens: the prepared QLoRA layer
  under ``torch.no_grad()`` (fused), the same through dequantize + ``F.linear``
  (what the training forward does), and ``F.linear`` in float32 and bfloat16;
* *model*: greedy generation of ``new_tokens`` tokens with the shipped tiny GPT
  and with a Llama built from a config (no download), in float32, in
  bfloat16 (Llama) and prepared with NF4 (:func:`qlora_ref.prepare_model`).

Every setting changed (torch's threads, ``QLORA_REF_NUM_THREADS``) is restored.
"""
from __future__ import annotations

import os

from .table import say_table
from .timing import best_seconds, process_settings

__all__ = ["layer_rows", "model_rows", "generate_table"]


def layer_rows(size: int = 4096, tokens=(1, 8), repeat: int = 11, seed: int = 0) -> list[dict]:
    """Seconds per forward of a ``size x size`` layer, per way of computing it and token count."""
    import torch
    import torch.nn.functional as F

    import qlora_ref

    torch.manual_seed(seed)
    linear = torch.nn.Linear(size, size, bias=False)
    w32 = linear.weight.detach().clone()                   # (out, in)
    w16 = w32.to(torch.bfloat16)
    layer = qlora_ref.prepare_model(linear, r=16)           # NF4, double quantization
    base = layer.base_layer
    rows = []
    for t in tokens:
        x = torch.randn(t, size)
        x16 = x.to(torch.bfloat16)
        with torch.no_grad():
            ways = {
                "QLoRA layer, fused 4-bit (no grad)": lambda: layer(x),
                "4-bit: dequantize + F.linear": lambda: F.linear(x, base.dequantize(torch.float32)),
                "float32 F.linear": lambda: F.linear(x, w32),
                "bfloat16 F.linear": lambda: F.linear(x16, w16),
            }
            for name, fn in ways.items():
                rows.append({"table": "layer", "what": f"{size}x{size}, {t} token{'s' * (t > 1)}",
                             "way": name, "seconds": best_seconds(fn, repeat)})
    return rows


def _tiny_gpt_generate(model, new_tokens: int):
    import torch

    idx = torch.ones(1, 4, dtype=torch.long)
    return lambda: model.generate_greedy(idx, new_tokens)


def model_rows(new_tokens: int = 16, repeat: int = 5, seed: int = 0) -> list[dict]:
    """Seconds to generate ``new_tokens`` greedily with the tiny GPT and a Llama from a config."""
    import copy

    import torch
    import transformers

    import qlora_ref
    from qlora_ref.train.pretrain import load_base_model

    rows = []
    gpt = load_base_model().eval()
    gpt4 = qlora_ref.prepare_model(copy.deepcopy(gpt), r=8).eval()
    with torch.no_grad():
        for way, model in (("float32", gpt), ("NF4 (prepare_model)", gpt4)):
            rows.append({"table": "model", "what": f"tiny GPT, {new_tokens} tokens", "way": way,
                         "seconds": best_seconds(_tiny_gpt_generate(model, new_tokens), repeat)})
    config = transformers.LlamaConfig(vocab_size=2048, hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=4, num_attention_heads=16,
                                      num_key_value_heads=16, max_position_embeddings=256)
    torch.manual_seed(seed)
    llama = transformers.LlamaForCausalLM(config).eval()
    models = {"float32": llama, "bfloat16": copy.deepcopy(llama).to(torch.bfloat16),
              "NF4 (prepare_model)": qlora_ref.prepare_model(copy.deepcopy(llama), r=8).eval()}
    prompt = torch.ones(1, 4, dtype=torch.long)
    for way, model in models.items():
        def run(model=model):
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0)
        rows.append({"table": "model", "what": f"Llama 4x1024 from a config, {new_tokens} tokens",
                     "way": way, "seconds": best_seconds(run, repeat)})
    return rows


def generate_table(fmt: str = "text", say=print, size: int = 4096, repeat: int = 11,
                   models: bool = True) -> list[dict]:
    """Measure :func:`layer_rows` (and :func:`model_rows`) on one thread, print them, return the rows."""
    import torch

    with process_settings():
        os.environ["QLORA_REF_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        rows = layer_rows(size=size, repeat=repeat)
        if models:
            rows += model_rows(repeat=max(3, repeat // 2))
    for table in ("layer", "model"):
        body, reference = [], {}
        for r in (r for r in rows if r["table"] == table):
            key = r["what"]
            reference.setdefault(key, {})[r["way"]] = r["seconds"]
        for key, ways in reference.items():
            f32 = ways.get("float32 F.linear", ways.get("float32"))
            for way, seconds in ways.items():
                body.append([key, way, f"{seconds * 1e3:.2f} ms", f"{f32 / seconds:.2f}x"])
        if body:
            say(f"generate ({table}), 1 thread, best of {repeat}; speed relative to float32")
            say_table(say, ["what", "way", "time", "vs float32"], body, fmt)
    return rows
