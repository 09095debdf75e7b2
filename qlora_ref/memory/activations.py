r"""Activation memory of a training step, with and without gradient checkpointing.

Paper Section 2, "Memory Requirement of Parameter-Efficient Finetuning": the
input gradients dominate, and gradient checkpointing keeps one input per
layer instead; see :mod:`qlora_ref.memory` for the whole accounting.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..validation import check_count
from .shapes import DecoderShape

__all__ = ["ActivationMemory", "activation_memory"]

# ----------------------------------------------------------------------------- activations
class _Rows:
    """``rows`` of ``(term, bytes)``: their sum, and a term's bytes by name."""

    @property
    def total_bytes(self) -> int:
        return sum(nbytes for _, nbytes in self.rows)

    def __getitem__(self, term: str) -> int:
        return dict(self.rows)[term]


@dataclass(frozen=True)
class ActivationMemory(_Rows):
    """Bytes of the activations kept for the backward pass, term by term.

    Attributes
    ----------
    rows : tuple of (str, int)
        ``(term, bytes)``: checkpoints (layer inputs), the layers' saved
        tensors, the output head's.
    details : tuple of str
        How each row was computed, aligned with ``rows``.
    """

    rows: tuple
    details: tuple

    def describe(self) -> str:
        """One line: the total and how it was counted."""
        return "; ".join(how for (_, nbytes), how in zip(self.rows, self.details) if nbytes)


def activation_memory(shape: DecoderShape, seq_len: int | None, batch_size: int = 1, *,
                      gradient_checkpointing: bool = False, dtype_bytes: int = 2,
                      linear_inputs_only: bool = False) -> ActivationMemory:
    r"""Activations a LLaMA-style decoder keeps for its backward pass, in bytes.

    With :math:`t = b \cdot T` tokens (``batch_size`` times ``seq_len``),
    :math:`d` bytes per value (``dtype_bytes``, 2 for bfloat16), hidden size
    :math:`h`, MLP size :math:`i`, :math:`L` layers and vocabulary :math:`V`,
    one decoder layer saves, per token,

    .. math::

        e_\mathrm{lin} = \underbrace{h}_{\text{q,k,v input}} + \underbrace{h}_{\text{o input}}
            + \underbrace{h}_{\text{gate,up input}} + \underbrace{i}_{\text{down input}}
            = 3h + i

    values as inputs of its seven linear layers (the tensors needed to pass
    gradients through the frozen weights to the adapters and earlier layers),
    and in all

    .. math::

        e_\mathrm{layer} = e_\mathrm{lin} + \underbrace{2h}_{\text{RMSNorm inputs}}
            + \underbrace{3h}_{\text{Q, K (after RoPE), V}}
            + \underbrace{2i}_{\text{gate, up outputs}} = 8h + 3i .

    Then

    .. math::

        \text{without checkpointing:}\quad & t\,d\,\big(L\,e_\mathrm{layer} + h + V\big) \\
        \text{with checkpointing:}\quad & t\,d\,\big(L\,h + e_\mathrm{layer} + h + V\big)

    where :math:`h + V` is the output head's input and its logits. With
    gradient checkpointing (one checkpoint per decoder layer, as Hugging
    Face's ``gradient_checkpointing_enable``) only each layer's input is kept;
    the backward pass recomputes one layer at a time, so one layer's full set
    is alive at once.

    The counting follows Korthikanti et al. (2022), "Reducing Activation
    Recomputation in Large Transformer Models", Section 4.1 (per layer
    :math:`sbh(34 + 5as/h)` bytes for a GPT layer), redone for LLaMA's
    layer: RMSNorm, rotary embeddings, a gated MLP, no dropout.

    Note (approximations): attention is assumed to run in a fused kernel
    (PyTorch's ``scaled_dot_product_attention``, FlashAttention) that keeps
    its output and one log-sum-exp per head and token instead of the
    :math:`a\,T^2` attention probabilities, so the model is linear in
    :math:`t`; eager attention would add :math:`b\,a\,T^2 d` per layer.
    Not counted: the log-sum-exps and RMSNorm statistics (:math:`a` and 2
    values per token and layer), LoRA's own intermediates (:math:`r` values
    per adapted projection and token, about 2 % of :math:`e_\mathrm{lin}`
    for LLaMA at :math:`r = 64`), LoRA dropout masks, a float32 copy of the
    logits for the loss, the embedding's integer token ids, and the
    allocator's fragmentation.

    ``linear_inputs_only=True`` counts :math:`e_\mathrm{lin}` instead of
    :math:`e_\mathrm{layer}` and only the head's input: the scope of the
    paper's Figure 6, whose input gradients are "estimated only for adapters
    and the base model weights (no attention)".

    Parameters
    ----------
    shape : DecoderShape
        The model, e.g. ``LLAMA_SHAPES["llama-7b"]``.
    seq_len : int or None
        Tokens per sequence, :math:`T`. None means no estimate: every row is 0.
    batch_size : int
        Sequences per micro-batch, :math:`b`.
    gradient_checkpointing : bool
        Keep only layer inputs and recompute each layer in the backward pass.
    dtype_bytes : int
        Bytes per activation value (bfloat16 / float16: 2, float32: 4).
    linear_inputs_only : bool
        Count only the inputs of linear layers (the paper's Figure 6 scope).

    Returns
    -------
    ActivationMemory

    Examples
    --------
    >>> tiny = DecoderShape(hidden_size=8, intermediate_size=16, n_layers=2, n_heads=2, vocab_size=10)
    >>> activation_memory(tiny, seq_len=4).total_bytes  # 4 tokens x 2 B x (2 (64 + 48) + 8 + 10)
    1936
    """
    if not isinstance(shape, DecoderShape):
        raise ValueError(f"shape must be a DecoderShape (e.g. LLAMA_SHAPES['llama-7b']), got {shape!r}")
    batch_size = check_count(batch_size, "batch_size")
    dtype_bytes = check_count(dtype_bytes, "dtype_bytes")
    terms = ("checkpoints (layer inputs)", "saved by the decoder layers", "output head")
    if seq_len is None:
        return ActivationMemory(rows=tuple((term, 0) for term in terms),
                                details=("no sequence length given",) * 3)
    seq_len = check_count(seq_len, "seq_len")
    h, i, n_layers = shape.hidden_size, shape.intermediate_size, shape.n_layers
    tokens = batch_size * seq_len
    per_token = tokens * dtype_bytes                       # bytes of one value per token
    e_lin = 3 * h + i                                      # eq. e_lin
    e_layer = e_lin if linear_inputs_only else 8 * h + 3 * i  # eq. e_layer
    head = h if linear_inputs_only else h + shape.vocab_size
    what = "linear-layer inputs" if linear_inputs_only else "all saved tensors"
    if gradient_checkpointing:
        checkpoints, layers_alive = n_layers * h * per_token, 1
        ckpt_how = f"{n_layers} layers x {h} values x {tokens:,} tokens x {dtype_bytes} B"
        layers_how = f"1 layer recomputed at a time: {e_layer} values ({what}) x {tokens:,} tokens x {dtype_bytes} B"
    else:
        checkpoints, layers_alive = 0, n_layers
        ckpt_how = "no gradient checkpointing"
        layers_how = f"{n_layers} layers x {e_layer} values ({what}) x {tokens:,} tokens x {dtype_bytes} B"
    head_how = (f"head input ({h})" + ("" if linear_inputs_only else f" + logits ({shape.vocab_size})")
                + f" x {tokens:,} tokens x {dtype_bytes} B")
    rows = ((terms[0], checkpoints), (terms[1], layers_alive * e_layer * per_token),
            (terms[2], head * per_token))
    return ActivationMemory(rows=rows, details=(ckpt_how, layers_how, head_how))
