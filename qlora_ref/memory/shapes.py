r"""The shapes of decoder-only models, and how many LoRA parameters a shape gets.

Paper Section 2 ("0.2 %" of the weights as the usual LoRA size) and the
LLaMA shapes of Appendix G's memory breakdown (Figure 6); see
:mod:`qlora_ref.memory` for the whole accounting.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Optional

from ..validation import check_count

__all__ = ["PROJECTIONS", "LLAMA_65B", "DEFAULT_LORA_FRACTION", "lora_param_count",
           "generic_lora_param_count", "DecoderShape", "LLAMA_SHAPES", "shape_from_config"]

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
