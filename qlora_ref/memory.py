r"""Memory accounting: bits per parameter, bytes per tensor, bytes per fine-tuning run.

Paper: Dettmers et al. (2023), "QLoRA: Efficient Finetuning of Quantized LLMs".

* Section 3, "4-bit NormalFloat Quantization" and "Double Quantization": what one
  stored weight costs, quantization constants included (:func:`bits_per_param`,
  :func:`quantized_nbytes`). With blocksize 64 the float32 constants
  :math:`c_2` add 32/64 = 0.5 bits per weight; double quantization stores
  :math:`c_2` in 8 bits plus one float32 :math:`c_1` per 256 of them,
  8/64 + 32/(64 * 256) ≈ 0.127 bits, saving 0.373 bits per parameter.
* Section 1 (">780 GB of GPU memory" for regular 16-bit finetuning of a 65B
  model), Section 2, "Memory Requirement of Parameter-Efficient Finetuning"
  (LoRA weights of "0.2 %" of the model, input gradients, gradient
  checkpointing), and Appendix G's memory breakdown of LLaMA 7B to 65B
  (Figure 6): what a whole run costs (:func:`finetune_memory`,
  :func:`memory_table`, :func:`activation_memory`).

Notation (one table for the whole package: ``docs/notation.md``): as in the
paper, :math:`c_2` are the first-level constants (one absmax per block of
:math:`B = 64` weights) and :math:`c_1` the second-level float32 constants
that double quantization adds (one per :math:`B_{c_2} = 256` values of
:math:`c_2`). Bit *widths* are never called :math:`c`: they are
:math:`k` (a code), :math:`b_\mathrm{f}` (``absmax_bits``, a float32
constant) and :math:`b_\mathrm{q}` (``nested_absmax_bits``, a quantized
:math:`c_2`).

The byte layout mirrors ``bitsandbytes.functional.quantize_4bit`` (and
``quantize_blockwise`` for 8 bits): packed codes, one absmax per block and,
with ``compress_statistics=True``, the absmax quantized to uint8 in blocks of
256 with their own float32 absmax, plus one float32 ``offset`` (the mean
absmax, subtracted before the second quantization).

Units: every count is in bytes, as a Python ``int``; "GB" means 1e9 bytes, the
unit of the paper's 780 GB and 48 GB figures (:func:`format_bytes` also knows GiB).

Note (what is not counted): the code tables (16 NF4 values, the 256-value
dynamic map of the nested absmax) are shared constants and not counted, although
bitsandbytes writes a copy of them when it serializes a tensor. Activations
depend on batch size, sequence length and gradient checkpointing: they are 0
unless given, either as bytes or through a model shape and ``seq_len``
(:func:`activation_memory`). Paged optimizers (the paper's third idea) move
memory to the CPU on spikes; they change no totals here.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Optional

from .validation import check_count, is_int

__all__ = [
    "fsdp_memory",
    "fsdp_memory_table",
    "shape_from_config",
    "BLOCKWISE_BITS",
    "PLAIN_BITS",
    "METHODS",
    "PROJECTIONS",
    "LLAMA_65B",
    "DecoderShape",
    "LLAMA_SHAPES",
    "DEFAULT_LORA_FRACTION",
    "bits_per_param",
    "quantized_nbytes",
    "lora_param_count",
    "generic_lora_param_count",
    "format_bytes",
    "ActivationMemory",
    "activation_memory",
    "MemoryTable",
    "MemoryComparison",
    "finetune_memory",
    "memory_table",
]

#: Bit widths stored blockwise with one absmax per block (NF4/FP4, blockwise 8-bit).
BLOCKWISE_BITS = (4, 8)
#: Bit widths stored as plain floats, with no quantization constants.
PLAIN_BITS = (16, 32)
METHODS = ("full", "lora", "qlora")

#: Linear projections of one LLaMA decoder layer: name -> (d_in, d_out) in units of
#: "h" (hidden size) or "i" (intermediate size). Attention then the gated MLP.
PROJECTIONS = MappingProxyType({
    "q": ("h", "h"), "k": ("h", "kv"), "v": ("h", "kv"), "o": ("h", "h"),
    "gate": ("h", "i"), "up": ("h", "i"), "down": ("i", "h"),
})

#: LLaMA-65B shapes (Touvron et al. 2023), for ``lora_param_count(**LLAMA_65B)``.
#: The QLoRA paper puts LoRA with r = 64 on all of these projections.
LLAMA_65B = MappingProxyType({"hidden_size": 8192, "intermediate_size": 22016, "n_layers": 80})

#: Fallback LoRA size as a fraction of the model, when the architecture is unknown:
#: Section 2 of the paper calls 0.2 % of the original weights "commonly used".
#: r = 64 on all seven projections of LLaMA-65B is larger, about 1.2 %.
DEFAULT_LORA_FRACTION = 0.002

_BYTES_16BIT = 2        # float16 / bfloat16 weight, adapter or gradient
_ADAM_STATE_BYTES = 8   # Adam's two moments, float32 each
_OFFSET_BYTES = 4       # bitsandbytes' one float32 offset per double-quantized tensor


# ----------------------------------------------------------------------------- validation
def _power_of_two(value, name: str) -> int:
    value = check_count(value, name)
    if value & (value - 1):
        raise ValueError(f"{name} must be a positive power of two, got {value!r}")
    return value


def _check_storage(bits, blocksize, nested_blocksize, absmax_bits, nested_absmax_bits):
    if not is_int(bits) or bits not in BLOCKWISE_BITS + PLAIN_BITS:
        raise ValueError(f"bits must be one of {BLOCKWISE_BITS + PLAIN_BITS}, got {bits!r}")
    for value, name in ((absmax_bits, "absmax_bits"), (nested_absmax_bits, "nested_absmax_bits")):
        if check_count(value, name) % 8:
            raise ValueError(f"{name} must be a whole number of bytes (a multiple of 8), got {value!r}")
    return (_power_of_two(blocksize, "blocksize"), _power_of_two(nested_blocksize, "nested_blocksize"))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------- one tensor
def bits_per_param(bits: int = 4, blocksize: int = 64, double_quant: bool = True,
                   nested_blocksize: int = 256, absmax_bits: int = 32,
                   nested_absmax_bits: int = 8) -> float:
    r"""Storage per weight, in bits, including the quantization constants.

    A blockwise code of :math:`k` bits stores one constant :math:`c_2` (the
    block's absmax) per block of :math:`B` weights. Kept as
    :math:`b_\mathrm{f}`-bit floats (float32) they cost

    .. math::

        b = k + \frac{b_\mathrm{f}}{B}.

    With double quantization the :math:`c_2` are themselves quantized to
    :math:`b_\mathrm{q}` bits (uint8) in blocks of :math:`B_{c_2}`, each such
    block keeping one :math:`b_\mathrm{f}`-bit second-level constant
    :math:`c_1` (the paper's names, see ``docs/notation.md``):

    .. math::

        b_{\mathrm{DQ}} = k + \frac{b_\mathrm{q}}{B} + \frac{b_\mathrm{f}}{B\,B_{c_2}}.

    This is the per-weight cost of a long tensor. Per-tensor terms, the one
    float32 offset of double quantization and the rounding up of a trailing
    partial block, shrink like :math:`1/n` and are left out here; use
    :func:`quantized_nbytes` for the exact bytes of a tensor.

    Parameters
    ----------
    bits : {4, 8, 16, 32}
        :math:`k`, bits per stored code: 4 (NF4 or FP4), 8 (blockwise 8-bit),
        or 16 / 32 (plain floats: no constants, the other arguments are only
        validated).
    blocksize : int
        :math:`B`, weights per constant :math:`c_2`; a positive power of two.
    double_quant : bool
        Quantize the :math:`c_2` (bitsandbytes' ``compress_statistics``).
    nested_blocksize : int
        :math:`B_{c_2}`, constants :math:`c_2` per second-level constant
        :math:`c_1`; a positive power of two.
    absmax_bits : int
        :math:`b_\mathrm{f}`, bits of a constant kept as a float (float32: 32):
        every :math:`c_2` without double quantization, every :math:`c_1` with it.
    nested_absmax_bits : int
        :math:`b_\mathrm{q}`, bits of a quantized :math:`c_2` (uint8: 8).

    Returns
    -------
    float
        Bits per weight.

    Examples
    --------
    >>> bits_per_param(double_quant=False)
    4.5
    >>> bits_per_param()  # NF4 as in QLoRA: 4 + 8/64 + 32/16384
    4.126953125
    >>> bits_per_param(bits=16)
    16.0
    """
    blocksize, nested_blocksize = _check_storage(bits, blocksize, nested_blocksize,
                                                 absmax_bits, nested_absmax_bits)
    if bits in PLAIN_BITS:
        return float(bits)
    if not double_quant:
        return bits + absmax_bits / blocksize  # eq. b: k + b_f / B
    return (bits + nested_absmax_bits / blocksize  # eq. b_DQ: k + b_q / B + b_f / (B B_c2)
            + absmax_bits / (blocksize * nested_blocksize))


def quantized_nbytes(n_params: int, bits: int = 4, blocksize: int = 64, double_quant: bool = True,
                     nested_blocksize: int = 256, absmax_bits: int = 32,
                     nested_absmax_bits: int = 8) -> int:
    r"""Exact bytes of one tensor of ``n_params`` elements, in bitsandbytes' layout.

    A trailing partial block is a block of its own, so with
    :math:`m = \lceil n / B \rceil` constants :math:`c_2` and
    :math:`\lceil m / B_{c_2} \rceil` constants :math:`c_1`

    .. math::

        \mathrm{bytes}(n) = \left\lceil \frac{n k}{8} \right\rceil
            + \begin{cases}
                m \, b_\mathrm{f} / 8 & \text{without double quantization} \\
                m \, b_\mathrm{q} / 8 + \lceil m / B_{c_2} \rceil \, b_\mathrm{f} / 8 + 4 & \text{with it}
              \end{cases}

    where the 4 is the float32 ``offset``. For :math:`k = 4` the first term is
    ``(n + 1) // 2``: two codes per byte, the last byte half empty when
    :math:`n` is odd. Plain 16/32-bit storage is just :math:`n k / 8`.

    Parameters
    ----------
    n_params : int
        Number of elements in the tensor, >= 1.
    bits, blocksize, double_quant, nested_blocksize, absmax_bits, nested_absmax_bits
        As in :func:`bits_per_param`.

    Returns
    -------
    int
        Bytes.

    Examples
    --------
    >>> quantized_nbytes(4096 * 4096)  # one 4096 x 4096 NF4 matrix
    8654852
    >>> quantized_nbytes(65, double_quant=False)  # 33 packed bytes + 2 float32 absmax
    41
    """
    n = check_count(n_params, "n_params")
    blocksize, nested_blocksize = _check_storage(bits, blocksize, nested_blocksize,
                                                 absmax_bits, nested_absmax_bits)
    codes = _ceil_div(n * bits, 8)  # matches bitsandbytes: 4-bit out has (n + 1) // 2 bytes
    if bits in PLAIN_BITS:
        return codes
    n_blocks = _ceil_div(n, blocksize)  # a trailing partial block is its own block
    if not double_quant:
        return codes + n_blocks * absmax_bits // 8
    n_nested_blocks = _ceil_div(n_blocks, nested_blocksize)
    return (codes + n_blocks * nested_absmax_bits // 8
            + n_nested_blocks * absmax_bits // 8 + _OFFSET_BYTES)


# ----------------------------------------------------------------------------- adapters
def lora_param_count(hidden_size: int, intermediate_size: int, n_layers: int, r: int = 64,
                     projections=tuple(PROJECTIONS), kv_size: int | None = None) -> int:
    r"""Trainable LoRA parameters of a LLaMA-style decoder.

    A linear map :math:`W \in \mathbb{R}^{d_\mathrm{out} \times d_\mathrm{in}}`
    gets :math:`A \in \mathbb{R}^{r \times d_\mathrm{in}}` and
    :math:`B \in \mathbb{R}^{d_\mathrm{out} \times r}`, so

    .. math::

        N_\mathrm{LoRA} = L \sum_{p \in \mathrm{projections}} r\,(d^p_\mathrm{in} + d^p_\mathrm{out}).

    Shapes follow :data:`PROJECTIONS`: q and o are ``h x h``; k and v map
    ``h -> kv``, where ``kv`` is ``h`` without grouped-query attention (LLaMA-1)
    and ``h`` times key/value heads over query heads with it (SmolLM2: 576 x
    3 / 9 = 192); gate and up map ``h -> i``, down ``i -> h``.
    Embeddings and the output head get no adapters.

    Parameters
    ----------
    hidden_size, intermediate_size, n_layers : int
        :math:`h`, :math:`i` and :math:`L`.
    r : int
        LoRA rank; the paper uses 64.
    projections : iterable of str
        Adapted projections, from ``q k v o gate up down``; the Hugging Face
        spelling ``q_proj`` etc. is accepted. Default: all seven, as in the paper.
    kv_size : int, optional
        Output size of the k and v projections (grouped-query attention); default ``hidden_size``.

    Examples
    --------
    >>> lora_param_count(**LLAMA_65B, r=64)
    799539200
    """
    sizes = {"h": check_count(hidden_size, "hidden_size"), "i": check_count(intermediate_size, "intermediate_size")}
    sizes["kv"] = sizes["h"] if kv_size is None else check_count(kv_size, "kv_size")
    n_layers, r = check_count(n_layers, "n_layers"), check_count(r, "r")
    names = [p.removesuffix("_proj") if isinstance(p, str) else p for p in projections]
    unknown = [p for p in names if p not in PROJECTIONS]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"projections must be distinct names from {tuple(PROJECTIONS)}, got {projections!r}")
    per_layer = sum(r * (sizes[PROJECTIONS[p][0]] + sizes[PROJECTIONS[p][1]]) for p in names)
    return n_layers * per_layer  # eq. N_LoRA


def generic_lora_param_count(n_params: int, fraction: float = DEFAULT_LORA_FRACTION) -> int:
    """LoRA parameters as a fraction of the model, for when the shapes are unknown.

    Returns ``round(n_params * fraction)``; see :data:`DEFAULT_LORA_FRACTION`
    for where the default comes from.
    """
    n = check_count(n_params, "n_params")
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    return round(n * fraction)


# ----------------------------------------------------------------------------- model shapes
@dataclass(frozen=True)
class DecoderShape:
    """The shapes of a LLaMA-style decoder: what the memory model needs to know.

    Attributes
    ----------
    hidden_size, intermediate_size, n_layers, n_heads, vocab_size : int
        :math:`h`, :math:`i`, :math:`L`, :math:`a` and :math:`V`.
    n_kv_heads : int, optional
        Key/value heads (grouped-query attention); default ``n_heads`` (LLaMA-1).
    tied_embeddings : bool
        The output head shares the input embedding's matrix (SmolLM2, GPT-2).

    Examples
    --------
    >>> LLAMA_SHAPES["llama-7b"].n_params
    6738415616
    """

    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    vocab_size: int = 32000
    n_kv_heads: Optional[int] = None
    tied_embeddings: bool = False

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "n_layers", "n_heads", "vocab_size"):
            object.__setattr__(self, name, check_count(getattr(self, name), name))
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size must be a multiple of n_heads, got "
                             f"{self.hidden_size} and {self.n_heads}")
        kv = self.n_heads if self.n_kv_heads is None else check_count(self.n_kv_heads, "n_kv_heads")
        if self.n_heads % kv:
            raise ValueError(f"n_heads must be a multiple of n_kv_heads, got {self.n_heads} and {kv}")
        object.__setattr__(self, "n_kv_heads", kv)
        if not isinstance(self.tied_embeddings, bool):
            raise ValueError(f"tied_embeddings must be True or False, got {self.tied_embeddings!r}")

    @property
    def kv_size(self) -> int:
        r"""Output size of the k and v projections: :math:`h\,a_{kv}/a`."""
        return self.hidden_size * self.n_kv_heads // self.n_heads

    @property
    def n_params(self) -> int:
        r"""Parameters of the LLaMA layout: :math:`2Vh + L(2h^2 + 2h\,kv + 3hi + 2h) + h`.

        Input embedding and output head (:math:`Vh` once when tied), then per
        layer the four attention projections (k and v of size :math:`kv = h`
        without grouped-query attention), the three MLP projections and two
        RMSNorm weights, then the final RMSNorm. No biases.
        """
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_size
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
        embeddings = (1 if self.tied_embeddings else 2) * self.vocab_size * h
        return embeddings + self.n_layers * per_layer + h

    def lora_params(self, r: int = 64, projections=tuple(PROJECTIONS)) -> int:
        """:func:`lora_param_count` for this shape."""
        return lora_param_count(self.hidden_size, self.intermediate_size, self.n_layers,
                                r=r, projections=projections, kv_size=self.kv_size)


#: LLaMA-1 shapes (Touvron et al. 2023, Table 2; the Hugging Face configs), the four
#: sizes of the QLoRA paper's Figure 6. ``LLAMA_SHAPES["llama-65b"]`` agrees with
#: :data:`LLAMA_65B`.
LLAMA_SHAPES = MappingProxyType({
    "llama-7b": DecoderShape(hidden_size=4096, intermediate_size=11008, n_layers=32, n_heads=32),
    "llama-13b": DecoderShape(hidden_size=5120, intermediate_size=13824, n_layers=40, n_heads=40),
    "llama-33b": DecoderShape(hidden_size=6656, intermediate_size=17920, n_layers=60, n_heads=52),
    "llama-65b": DecoderShape(hidden_size=8192, intermediate_size=22016, n_layers=80, n_heads=64),
})


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


# ----------------------------------------------------------------------------- tables
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def _in_unit(n_bytes: int, unit: str, digits: int = 2) -> str:
    if unit not in _UNITS:
        raise ValueError(f"unit must be one of {tuple(_UNITS)}, got {unit!r}")
    return f"{n_bytes / _UNITS[unit]:,.{digits}f}"


def format_bytes(n_bytes: int, unit: str = "GB", digits: int = 2) -> str:
    """``n_bytes`` in ``unit`` (GB = 1e9 bytes, GiB = 2**30 bytes).

    Examples
    --------
    >>> format_bytes(780e9)
    '780.00 GB'
    """
    return f"{_in_unit(n_bytes, unit, digits)} {unit}"


@dataclass(frozen=True)
class MemoryTable(_Rows):
    """Bytes of one fine-tuning method, term by term.

    Attributes
    ----------
    method : str
        ``"full"``, ``"lora"`` or ``"qlora"``.
    n_params, lora_params : int
        Base model and adapter parameter counts.
    rows : tuple of (str, int)
        ``(term, bytes)`` for weights, adapters, gradients, optimizer state, activations.
    details : tuple of str
        How each row was computed, aligned with ``rows``.
    """

    method: str
    n_params: int
    lora_params: int
    rows: tuple
    details: tuple

    def to_markdown(self, unit: str = "GB") -> str:
        """A Markdown table with one line per term and the total."""
        lines = [f"| {self.method} | bytes | {unit} | how |", "|---|---:|---:|---|"]
        for (term, nbytes), how in zip(self.rows, self.details):
            lines.append(f"| {term} | {nbytes:,} | {_in_unit(nbytes, unit)} | {how} |")
        total = self.total_bytes
        lines.append(f"| **total** | {total:,} | {_in_unit(total, unit)} | |")
        return "\n".join(lines)

    __str__ = to_markdown


@dataclass(frozen=True)
class MemoryComparison:
    """Several :class:`MemoryTable` side by side; index by method name."""

    tables: tuple

    def __getitem__(self, method: str) -> MemoryTable:
        return {t.method: t for t in self.tables}[method]

    def to_markdown(self, unit: str = "GB") -> str:
        """One column per method, values in ``unit``."""
        head = "| term | " + " | ".join(t.method for t in self.tables) + " |"
        lines = [head, "|---|" + "---:|" * len(self.tables)]
        for term, _ in self.tables[0].rows:
            cells = (format_bytes(t[term], unit) for t in self.tables)
            lines.append(f"| {term} | " + " | ".join(cells) + " |")
        totals = (format_bytes(t.total_bytes, unit) for t in self.tables)
        lines.append("| **total** | " + " | ".join(totals) + " |")
        return "\n".join(lines)

    __str__ = to_markdown


def finetune_memory(n_params: int, method: str = "qlora", *, lora_params: int | None = None,
                    activation_bytes: int = 0, shape: DecoderShape | None = None,
                    seq_len: int | None = None, batch_size: int = 1,
                    gradient_checkpointing: bool = False, activation_dtype_bytes: int = 2,
                    bits: int = 4, blocksize: int = 64,
                    double_quant: bool = True, nested_blocksize: int = 256) -> MemoryTable:
    r"""GPU memory to fine-tune an ``n_params`` model with Adam, term by term.

    With :math:`N` base and :math:`N_L` LoRA parameters:

    .. math::

        \begin{aligned}
        \text{full:}  &\quad 2N + 2N + 8N = 12N \\
        \text{lora:}  &\quad 2N + 12 N_L \\
        \text{qlora:} &\quad \mathrm{bytes}_\mathrm{NF4}(N) + 12 N_L
        \end{aligned}

    2 bytes for each 16-bit weight, adapter weight and gradient; 8 bytes of
    Adam state (two float32 moments) per trained parameter; the frozen
    base has neither gradients nor optimizer state. For 65e9 parameters the
    full line gives 780e9 bytes, the paper's ">780 GB" (the lower bound: mixed
    precision usually adds a float32 master copy, 4 more bytes per parameter).

    Note (QLoRA base): the whole base is counted as one NF4 tensor with
    :func:`quantized_nbytes`; real models keep a partial block and an offset
    per matrix (a few bytes each) and often leave embeddings and output head
    in 16-bit, which this does not model.

    Parameters
    ----------
    n_params : int
        Base model parameters (``65e9`` is accepted).
    method : {"qlora", "lora", "full"}
    lora_params : int, optional
        Trainable adapter parameters, e.g. from :func:`lora_param_count`.
        Default: :func:`generic_lora_param_count` (0.2 % of ``n_params``).
        Must be left out for ``"full"``.
    activation_bytes : int
        Activations, in bytes, when you know them: 0 unless given. Or leave it
        0 and give ``shape`` and ``seq_len`` to have them estimated.
    shape : DecoderShape, optional
        The model's shapes, e.g. ``LLAMA_SHAPES["llama-65b"]``; needed with ``seq_len``.
    seq_len, batch_size, gradient_checkpointing, activation_dtype_bytes
        As ``seq_len``, ``batch_size``, ``gradient_checkpointing`` and
        ``dtype_bytes`` of :func:`activation_memory`. ``seq_len=None`` (the
        default) estimates nothing: the activations row is ``activation_bytes``.
    bits, blocksize, double_quant, nested_blocksize
        Storage of the QLoRA base, as in :func:`quantized_nbytes`; ignored otherwise.

    Returns
    -------
    MemoryTable
    """
    n = check_count(n_params, "n_params")
    activation_bytes = check_count(activation_bytes, "activation_bytes", minimum=0)
    activations_how = "given" if activation_bytes else "not estimated (0 unless given)"
    if seq_len is not None:
        if activation_bytes:
            raise ValueError("activation_bytes must be 0 when seq_len is given: "
                             "give the bytes or the shapes to estimate them, not both")
        if shape is None:
            raise ValueError("shape must be given with seq_len, e.g. shape=LLAMA_SHAPES['llama-7b']")
        estimate = activation_memory(shape, seq_len, batch_size,
                                     gradient_checkpointing=gradient_checkpointing,
                                     dtype_bytes=activation_dtype_bytes)
        activation_bytes, activations_how = estimate.total_bytes, estimate.describe()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "full":
        if lora_params is not None:
            raise ValueError("lora_params must be None for method='full': every weight is trained")
        trained, n_lora, weights = n, 0, _BYTES_16BIT * n
        weights_how, adapters_how = "16-bit, 2 B/param", "none"
    else:
        n_lora = (generic_lora_param_count(n) if lora_params is None
                  else check_count(lora_params, "lora_params", minimum=0))
        trained, adapters_how = n_lora, f"16-bit, 2 B x {n_lora:,}"
        if method == "lora":
            weights, weights_how = _BYTES_16BIT * n, "16-bit, 2 B/param, frozen"
        else:
            weights = quantized_nbytes(n, bits=bits, blocksize=blocksize, double_quant=double_quant,
                                       nested_blocksize=nested_blocksize)
            bpp = bits_per_param(bits=bits, blocksize=blocksize, double_quant=double_quant,
                                 nested_blocksize=nested_blocksize)
            weights_how = f"{bits}-bit blockwise, {bpp:.4g} bits/param, frozen"
    rows = (("weights", weights),
            ("adapters (LoRA weights)", _BYTES_16BIT * n_lora),
            ("gradients", _BYTES_16BIT * trained),
            ("optimizer state", _ADAM_STATE_BYTES * trained),
            ("activations", activation_bytes))
    details = (weights_how, adapters_how,
               f"16-bit, 2 B x {trained:,} trained params",
               f"Adam, 2 x float32 = 8 B x {trained:,}",
               activations_how)
    return MemoryTable(method=method, n_params=n, lora_params=n_lora, rows=rows, details=details)


def memory_table(n_params: int, *, lora_params: int | None = None, activation_bytes: int = 0,
                 shape: DecoderShape | None = None, seq_len: int | None = None,
                 batch_size: int = 1, gradient_checkpointing: bool = False,
                 activation_dtype_bytes: int = 2, **storage) -> MemoryComparison:
    """:func:`finetune_memory` for ``"full"``, ``"lora"`` and ``"qlora"``, side by side.

    ``lora_params`` goes to the two LoRA methods, ``storage`` (``bits``,
    ``blocksize``, ...) to QLoRA's base, the activation arguments to all three
    (the same activations: a frozen base still passes gradients to its input).

    Examples
    --------
    >>> t = memory_table(65e9, lora_params=lora_param_count(**LLAMA_65B))
    >>> t["full"].total_bytes
    780000000000
    >>> t["qlora"].total_bytes < 48e9
    True
    >>> llama = LLAMA_SHAPES["llama-65b"]
    >>> t = memory_table(llama.n_params, lora_params=llama.lora_params(64), shape=llama,
    ...                  seq_len=512, gradient_checkpointing=True)
    >>> format_bytes(t["qlora"]["activations"])
    '0.85 GB'
    """
    acts = dict(activation_bytes=activation_bytes, shape=shape, seq_len=seq_len,
                batch_size=batch_size, gradient_checkpointing=gradient_checkpointing,
                activation_dtype_bytes=activation_dtype_bytes)
    return MemoryComparison(tables=(
        finetune_memory(n_params, "full", **acts),
        finetune_memory(n_params, "lora", lora_params=lora_params, **acts),
        finetune_memory(n_params, "qlora", lora_params=lora_params, **acts, **storage),
    ))


def fsdp_memory(shape: DecoderShape, shards: int, *, r: int = 64, seq_len: int | None = None,
                batch_size: int = 1, gradient_checkpointing: bool = False) -> MemoryTable:
    r"""Per-GPU memory of QLoRA sharded over ``shards`` GPUs with FSDP2 (``qlora_ref.distributed``).

    FSDP2 keeps :math:`1/N` of every parameter, gradient and optimizer state
    on each GPU and all-gathers one decoder block's stored (4-bit) weight
    before it runs:

    .. math::

        \text{per GPU} = \frac{\mathrm{bytes}_\mathrm{NF4}(N_\text{base})}{N}
            + [N > 1]\,\mathrm{bytes}_\mathrm{NF4}(N_\text{block})
            + \frac{12\,N_L}{N} + \text{activations} .

    The activations are one GPU's batch and do not shrink with :math:`N`.
    Not modelled: FSDP2 may prefetch the next block (a second gathered block),
    the gathered adapter gradients of one block before the reduce-scatter
    (:math:`2 N_{L,\text{block}}` bytes), communication buffers and the
    framework's own memory. With ``shards=1`` this is :func:`finetune_memory`'s
    ``"qlora"`` table exactly.
    """
    shards = check_count(shards, "shards")
    n_lora = shape.lora_params(r)
    one = finetune_memory(shape.n_params, "qlora", lora_params=n_lora, shape=shape,
                          seq_len=seq_len, batch_size=batch_size,
                          gradient_checkpointing=gradient_checkpointing)
    block = quantized_nbytes(4 * shape.hidden_size ** 2
                             + 3 * shape.hidden_size * shape.intermediate_size)
    rows, details = [], []
    for (term, nbytes), how in zip(one.rows, one.details):
        if term != "activations":
            nbytes, how = _ceil_div(nbytes, shards), (how if shards == 1 else f"1/{shards} of: {how}")
        rows.append((term, nbytes))
        details.append(how)
        if term == "weights":
            rows.append(("gathered block", block if shards > 1 else 0))
            details.append("one decoder block's 4-bit weights, all-gathered" if shards > 1
                           else "none: nothing is sharded")
    return MemoryTable(method=f"{shards} GPU" + ("s" if shards > 1 else ""),
                       n_params=one.n_params, lora_params=n_lora, rows=tuple(rows),
                       details=tuple(details))


def fsdp_memory_table(shape: DecoderShape, shards=(1, 2, 4, 8), **kwargs) -> MemoryComparison:
    """:func:`fsdp_memory` for each shard count, side by side.

    Examples
    --------
    >>> t = fsdp_memory_table(LLAMA_SHAPES["llama-65b"])
    >>> t["1 GPU"].total_bytes == finetune_memory(
    ...     LLAMA_SHAPES["llama-65b"].n_params, "qlora",
    ...     lora_params=LLAMA_SHAPES["llama-65b"].lora_params(64)).total_bytes
    True
    >>> format_bytes(t["8 GPUs"]["weights"])
    '4.21 GB'
    """
    return MemoryComparison(tables=tuple(fsdp_memory(shape, n, **kwargs) for n in shards))


def shape_from_config(directory) -> DecoderShape:
    """The :class:`DecoderShape` of a local Hugging Face model folder, read from its ``config.json``.

    Reads ``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
    ``num_attention_heads`` and ``vocab_size`` (GPT-2's ``n_embd``, ``n_layer``,
    ``n_head``, ``n_inner`` or 4 ``n_embd`` too). Only the JSON is read.
    """
    import json
    from pathlib import Path
    path = Path(directory) / "config.json"
    if path.is_symlink() or not path.is_file():
        raise ValueError(f"{path}: not a regular file (--model wants a Hugging Face model folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    hidden = config.get("hidden_size", config.get("n_embd"))
    fields = {"hidden_size": hidden,
              "intermediate_size": config.get("intermediate_size",
                                              config.get("n_inner") or (4 * hidden if isinstance(hidden, int) else None)),
              "n_layers": config.get("num_hidden_layers", config.get("n_layer")),
              "n_heads": config.get("num_attention_heads", config.get("n_head")),
              "vocab_size": config.get("vocab_size")}
    missing = [k for k, v in fields.items() if not isinstance(v, int) or isinstance(v, bool)]
    if missing:
        raise ValueError(f"{path}: no integer {', '.join(missing)} (not a decoder config?)")
    kv = config.get("num_key_value_heads", fields["n_heads"])
    if not isinstance(kv, int) or isinstance(kv, bool):
        raise ValueError(f"{path}: num_key_value_heads must be an integer, got {kv!r}")
    # transformers' default for tie_word_embeddings is True (GPT-2 ties; LLaMA-1 configs say false)
    tied = config.get("tie_word_embeddings", True)
    if not isinstance(tied, bool):
        raise ValueError(f"{path}: tie_word_embeddings must be true or false, got {tied!r}")
    return DecoderShape(**fields, n_kv_heads=kv, tied_embeddings=tied)
