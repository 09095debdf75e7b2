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
  bfloat16 (Llama) and prepared with NF4 (:func:`qlora_ref.prepare_model`),
  through transformers' ``generate`` and (Llama, bfloat16 and NF4) through
  the lean decoder :class:`qlora_ref.nn.decode.LlamaDecoder`.

With ``--model DIR`` (or ``--model smollm2``, the optional extra), the
tables of :func:`real_model_table` instead: greedy decoding of a real model
after a chat prompt on 1 and 2 threads, ours (NF4 + double quantization, a
LoRA adapter attached, bfloat16) against bitsandbytes' 4-bit model with the
same settings and the model in float32 and bfloat16, with the bytes each
token reads, the copy rate measured in the same run and the share of the
bandwidth limit (copy rate / bytes per token) each way reaches. Each row
names its loop: transformers' ``generate``, or the lean decoder
(:class:`qlora_ref.nn.decode.LlamaDecoder`) for ours and for the bfloat16
model, so that the lean rows compare weights, not loops. A second table
has a 256-token prefill and a batch of 8 padded prompts.

Every setting changed (torch's and libgomp's threads, ``QLORA_REF_NUM_THREADS``) is restored.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .table import say_table
from .timing import best_seconds, omp_set_num_threads, process_settings

__all__ = ["layer_rows", "model_rows", "generate_table", "real_model_rows", "real_model_table",
           "copy_rate"]


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
    from qlora_ref.nn.decode import LlamaDecoder

    for way in ("bfloat16", "NF4 (prepare_model)"):
        decoder = LlamaDecoder(models[way])
        rows.append({"table": "model", "what": f"Llama 4x1024 from a config, {new_tokens} tokens",
                     "way": f"{way}, lean decoder",
                     "seconds": best_seconds(lambda: decoder.generate(prompt, new_tokens), repeat)})
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


# -- a real model: SmolLM2-135M-Instruct ---------------------------------------------------
#: The chat prompt every arm of :func:`real_model_rows` continues.
PROMPT = "Explain in one paragraph why the sky is blue."


def _fourbit_bytes(model) -> int:
    """Bytes one token reads from the 4-bit linear layers (codes and constants) of ``model``.

    Ours: :attr:`qlora_ref.nn.Linear4bit.nbytes`; bitsandbytes: the packed
    weight plus its ``quant_state``'s tensors (absmax, nested absmax, ...).
    """
    from qlora_ref.nn import Linear4bit

    total = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            total += module.nbytes
        elif Linear4bit.is_bitsandbytes_layer(module):
            state = module.weight.quant_state
            total += module.weight.numel() * module.weight.element_size()
            total += state.absmax.numel() * state.absmax.element_size()
            if getattr(state, "state2", None) is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size() + 4
    return total


def _adapter_bytes(model) -> int:
    """Bytes of the unmerged LoRA adapters (A and B) of ``model``: every decoded token reads them too."""
    from qlora_ref.nn import LoRALinear

    return sum(t.numel() * t.element_size() for m in model.modules()
               if isinstance(m, LoRALinear) and not m.merged for t in (m.lora_A, m.lora_B))


def _head_bytes(model) -> int:
    head = model.get_output_embeddings().weight
    return head.numel() * head.element_size()


def _dense_linear_bytes(model) -> int:
    """Bytes of the weights of the plain ``nn.Linear`` layers (the head included)."""
    import torch

    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules()
               if type(m) is torch.nn.Linear)


def copy_rate(nbytes: int = 1 << 28, repeat: int = 5) -> float:
    """Bytes per second ``np.copyto`` moves between two page-aligned buffers (bytes of the source)."""
    from .storage import _copy_buffers

    src, dst = _copy_buffers(nbytes)
    return nbytes / best_seconds(lambda: np.copyto(dst, src), repeat)


def _lean_bytes(decoder) -> int:
    """Bytes one token reads through :class:`~qlora_ref.nn.decode.LlamaDecoder`'s projections and head.

    A ``"fused4"`` projection reads its codes, its float32 constants and its
    float32 adapters (the stacked A and each block of B).
    """
    total = 0
    for proj in [p for layer in decoder.layers for p in (layer.qkv, layer.o, layer.gate_up,
                                                         layer.down)] + [decoder.head]:
        if proj.way == "fused4":
            total += proj.plan.packed.nbytes + proj.plan.absmax.nbytes
            if proj.lora is not None:
                a_t, blocks = proj.lora
                total += sum(t.numel() * t.element_size()
                             for t in [a_t] + [block[4] for block in blocks])
        elif proj.way == "dense":
            total += proj.weight.numel() * proj.weight.element_size()
        else:
            total += sum(_fourbit_bytes(m) or _dense_linear_bytes(m) for m in proj.modules)
    return total


def _padded_prompts(ids, lengths, pad_token_id: int):
    """``len(lengths)`` prefixes of ``ids`` ``(1, n)``, left-padded: ``(input_ids, attention_mask)``."""
    import torch

    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        input_ids[row, width - n:] = ids[0, :n]
        mask[row, width - n:] = 1
    return input_ids, mask


#: Prompt lengths of the batched row: 8 prompts, all different (left-padded to the longest).
BATCH_LENGTHS = (12, 20, 28, 36, 44, 52, 60, 68)


def real_model_rows(folder, new_tokens: int = 32, threads=(1, 2), repeat: int = 3, r: int = 16,
                    say=None, prefill: int = 256, batch_lengths=BATCH_LENGTHS) -> list[dict]:
    """Tokens per second of greedy decoding with a Hugging Face folder, several ways, arms alternated.

    Models: ours (:func:`qlora_ref.prepare_model`, NF4 + double
    quantization, an ``r``-rank adapter attached and not merged, bfloat16
    model and compute), bitsandbytes' 4-bit model with the same settings
    (``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)``,
    its default CPU path), and the model in float32 and in bfloat16.
    Loops: transformers' ``model.generate`` ("generate") for every model,
    and :class:`~qlora_ref.nn.decode.LlamaDecoder` ("lean") for ours and
    for the bfloat16 model (so that "lean ours / lean bfloat16" compares
    the weights, not the loops); ours also with the opt-in 4-bit head
    ("lean, NF4 head": the tied bfloat16 head quantized to NF4).

    Rows (``table`` key): ``"decode"``: the same chat prompt continued by
    ``new_tokens`` greedy tokens, batch 1; ``"prefill"``: a ``prefill``-token
    prompt and one new token (prompt tokens per second); ``"batched"``: 8
    prompts of ``batch_lengths`` tokens, left-padded, ``new_tokens`` each
    with a KV cache (tokens per second per prompt). Prefill and batched
    rows: ours and the bfloat16 model through the lean decoder, and the
    bfloat16 model through ``generate``. For each thread count
    the ways take turns ``repeat`` times; the best time is kept.

    ``bytes_per_token`` (decode rows) is what one token reads from the
    linear weights (4-bit codes and constants, or 16/32-bit weights), the
    unmerged adapters (ours: float32 A and B, about 19.5 MB on SmolLM2 with
    ``r=16``) and the head; the bandwidth limit is ``copy rate / bytes_per_token``, with the
    copy rate measured in the same run (:func:`copy_rate`).
    """
    import torch

    from qlora_ref.nn.decode import LlamaDecoder

    say = say or (lambda *a: None)
    m = _real_models(folder, r, say)
    lean = {m.ours_name: LlamaDecoder(m.ours), "bfloat16": LlamaDecoder(m.bf16)}
    lean_nf4_head = LlamaDecoder(m.ours, head="nf4")
    text = m.prompt["input_ids"]
    arms = _real_arms(m, lean, lean_nf4_head, new_tokens, prefill, batch_lengths)
    nbytes = {}
    for way, model in m.models.items():
        fourbit = _fourbit_bytes(model)
        nbytes[way, "generate"] = fourbit + (_head_bytes(model) + _adapter_bytes(model)
                                             if fourbit else _dense_linear_bytes(model))
    for way, decoder in lean.items():
        nbytes[way, "lean"] = _lean_bytes(decoder)
    nbytes[m.ours_name, "lean, NF4 head"] = _lean_bytes(lean_nf4_head)
    say(_nf4_head_effect(lean[m.ours_name], lean_nf4_head, text, new_tokens))
    set_omp = omp_set_num_threads()
    rows = []
    for t in threads:
        os.environ["QLORA_REF_NUM_THREADS"] = str(t)
        torch.set_num_threads(t)
        set_omp(t)
        rate = copy_rate()
        for (table, way, loop), seconds in _best_seconds(arms, repeat).items():
            row = {"table": table, "threads": t, "way": way, "loop": loop, "seconds": seconds}
            if table == "decode":
                tps = new_tokens / seconds
                limit = rate / nbytes[way, loop]
                row.update(tokens_per_s=tps, bytes_per_token=nbytes[way, loop], copy_rate=rate,
                           limit_tokens_per_s=limit, percent_of_limit=100 * tps / limit)
            elif table == "prefill":
                row.update(tokens_per_s=prefill / seconds, prompt_tokens=prefill)
            else:
                row.update(tokens_per_s=new_tokens / seconds, prompts=len(batch_lengths))
            rows.append(row)
    return rows


def _real_models(folder, r: int, say):
    """The tokenizer, the chat prompt and the models of :func:`real_model_rows`, by way."""
    import copy
    from types import SimpleNamespace

    import torch
    import transformers

    import qlora_ref

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    load = transformers.AutoModelForCausalLM.from_pretrained
    f32 = load(folder, dtype=torch.float32).eval()
    bf16 = load(folder, dtype=torch.bfloat16).eval()
    ours = qlora_ref.prepare_model(copy.deepcopy(bf16), r=r,
                                   compute_dtype=torch.bfloat16).eval()
    ours_name = "ours (NF4 + DQ, LoRA r=%d, bf16)" % r
    models = {ours_name: ours}
    try:
        bnb_config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        models["bitsandbytes 4-bit (NF4 + DQ, bf16)"] = load(
            folder, dtype=torch.bfloat16, quantization_config=bnb_config).eval()
    except Exception as exc:  # noqa: BLE001  (bitsandbytes missing or refusing the CPU)
        say(f"bitsandbytes 4-bit model not measured: {type(exc).__name__}: {exc}")
    models["float32"] = f32
    models["bfloat16"] = bf16
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return SimpleNamespace(tokenizer=tokenizer, prompt=prompt, models=models, ours=ours,
                           bf16=bf16, ours_name=ours_name, pad=pad)


def _real_arms(m, lean: dict, lean_nf4_head, new_tokens: int, prefill: int,
               batch_lengths) -> dict:
    """``(table, way, loop) -> a function that runs it once``, for every row of the tables."""
    import torch

    text = m.prompt["input_ids"]
    long_ids = text.repeat(1, -(-max(prefill, max(batch_lengths)) // text.shape[1]))
    batch_ids, batch_mask = _padded_prompts(long_ids, batch_lengths, m.pad)
    prefill_ids = long_ids[:, :prefill]

    def hf(model, ids, mask, n):
        return lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=m.pad)

    def ours_lean(decoder, ids, mask, n):
        return lambda: decoder.generate(ids, n, attention_mask=mask)

    arms = {}
    for way, model in m.models.items():
        arms["decode", way, "generate"] = hf(model, text, m.prompt["attention_mask"], new_tokens)
    for way, decoder in lean.items():
        arms["decode", way, "lean"] = ours_lean(decoder, text, None, new_tokens)
    arms["decode", m.ours_name, "lean, NF4 head"] = ours_lean(lean_nf4_head, text, None,
                                                             new_tokens)
    # prefill and batched: against the bfloat16 model through either loop
    arms["prefill", "bfloat16", "generate"] = hf(m.bf16, prefill_ids,
                                                 torch.ones_like(prefill_ids), 1)
    arms["batched", "bfloat16", "generate"] = hf(m.bf16, batch_ids, batch_mask, new_tokens)
    for way in (m.ours_name, "bfloat16"):
        arms["prefill", way, "lean"] = ours_lean(lean[way], prefill_ids, None, 1)
        arms["batched", way, "lean"] = ours_lean(lean[way], batch_ids, batch_mask, new_tokens)
    return arms


def _nf4_head_effect(own_decoder, nf4_decoder, text, new_tokens: int) -> str:
    """What the opt-in 4-bit head changes: how many greedy tokens stay, how far the logits move."""
    import torch

    with torch.no_grad():
        own, own_logits = own_decoder.generate(text, new_tokens, return_logits=True)
        nf4, nf4_logits = nf4_decoder.generate(text, new_tokens, return_logits=True)
    new = own[0, text.shape[1]:] != nf4[0, text.shape[1]:]
    same = int(new.nonzero()[0, 0]) if bool(new.any()) else new_tokens
    first = (own_logits[0] - nf4_logits[0]).abs().max().item()
    return (f"NF4 head vs the model's bfloat16 head (lean decoder, ours): the first {same} of "
            f"{new_tokens} greedy tokens equal; first token's logits differ by at most {first:.3g} "
            f"(largest |logit| {own_logits[0].abs().max().item():.3g})")


def _best_seconds(arms: dict, repeat: int) -> dict:
    """Each arm's best time of ``repeat`` runs, the arms taking turns after one warm-up run each."""
    import time

    import torch

    best = {key: math.inf for key in arms}
    with torch.no_grad():
        for run in arms.values():  # warm-up: first calls, repacking, caches
            run()
        for _ in range(repeat):
            for key, run in arms.items():  # interleaved: load changes hit all ways
                start = time.perf_counter()
                run()
                best[key] = min(best[key], time.perf_counter() - start)
    return best


def real_model_table(folder, fmt: str = "text", say=print, new_tokens: int = 32,
                     threads=(1, 2), repeat: int = 3) -> list[dict]:
    """Measure :func:`real_model_rows`, print the tables (with the load average), return the rows."""
    if not Path(str(folder)).is_dir():  # from_pretrained would take it for a Hub name
        raise FileNotFoundError(f"--model {folder}: not a folder (a Hugging Face model folder, "
                                "or smollm2)")
    with process_settings():
        load = os.getloadavg()
        rows = real_model_rows(folder, new_tokens=new_tokens, threads=threads, repeat=repeat,
                               say=say)
        after = os.getloadavg()
    loads = (f"load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
             f"after {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}")

    def ratio(r, way, loop):
        ref = [x["tokens_per_s"] for x in rows if x["threads"] == r["threads"]
               and x["table"] == r["table"] and x["way"] == way and x["loop"] == loop]
        return f"{r['tokens_per_s'] / ref[0]:.2f}x" if ref else "-"

    decode = [r for r in rows if r["table"] == "decode"]
    body = [[str(r["threads"]), r["way"], r["loop"], f"{r['tokens_per_s']:.1f}",
             ratio(r, "bfloat16", "generate"), ratio(r, "bfloat16", "lean"),
             f"{r['bytes_per_token'] / 1e6:.1f} MB", f"{r['copy_rate'] / 1e9:.1f} GB/s",
             f"{r['limit_tokens_per_s']:.0f}", f"{r['percent_of_limit']:.0f}%"] for r in decode]
    say(f"generate ({Path(str(folder)).name}): {new_tokens} greedy tokens after a chat prompt, "
        f"batch 1, best of {repeat} (ways interleaved); loop: transformers' generate or "
        f"qlora_ref.nn.decode.LlamaDecoder (lean); {loads}")
    say_table(say, ["threads", "way", "loop", "tokens/s", "vs bf16 generate", "vs bf16 lean",
                    "bytes/token", "copy rate", "limit tok/s", "% of limit"], body, fmt)
    other = [r for r in rows if r["table"] != "decode"]
    body = [[str(r["threads"]), r["table"], r["way"], r["loop"],
             f"{r['seconds'] * 1e3:.0f} ms", f"{r['tokens_per_s']:.1f}",
             ratio(r, "bfloat16", "generate"), ratio(r, "bfloat16", "lean")] for r in other]
    if body:
        n = max((r.get("prompts", 0) for r in other), default=0)
        say(f"prefill: a {max(r.get('prompt_tokens', 0) for r in other)}-token prompt and 1 new "
            f"token (prompt tokens/s); batched: {n} prompts of different lengths, left-padded, "
            f"{new_tokens} new tokens each with a KV cache (tokens/s per prompt)")
        say_table(say, ["threads", "row", "way", "loop", "time", "tokens/s",
                        "vs bf16 generate", "vs bf16 lean"], body, fmt)
    return rows
