r"""What a whole fine-tuning run needs: the table of the paper's 780 GB and 48 GB figures.

Paper Section 1, Section 2 and Appendix G (Figure 6); also the per-GPU share
under FSDP2. See :mod:`qlora_ref.memory` for the units and what is not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..validation import check_count
from .activations import _Rows, activation_memory
from .shapes import DecoderShape, generic_lora_param_count
from .storage import _ceil_div, bits_per_param, quantized_nbytes

__all__ = ["METHODS", "format_bytes", "MemoryTable", "MemoryComparison", "finetune_memory",
           "memory_table", "fsdp_memory", "fsdp_memory_table"]

METHODS = ("full", "lora", "qlora")

_BYTES_16BIT = 2        # float16 / bfloat16 weight, adapter or gradient
_ADAM_STATE_BYTES = 8   # Adam's two moments, float32 each


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
    >>> from qlora_ref.memory import LLAMA_65B, LLAMA_SHAPES, lora_param_count
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
    >>> from qlora_ref.memory import LLAMA_SHAPES
    >>> t = fsdp_memory_table(LLAMA_SHAPES["llama-65b"])
    >>> t["1 GPU"].total_bytes == finetune_memory(
    ...     LLAMA_SHAPES["llama-65b"].n_params, "qlora",
    ...     lora_params=LLAMA_SHAPES["llama-65b"].lora_params(64)).total_bytes
    True
    >>> format_bytes(t["8 GPUs"]["weights"])
    '4.21 GB'
    """
    return MemoryComparison(tables=tuple(fsdp_memory(shape, n, **kwargs) for n in shards))
