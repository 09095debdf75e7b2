r"""Codebooks: the 16 (or 256) values a 4-bit (8-bit) code can stand for.

Paper section 3, "4-bit NormalFloat Quantization". A codebook is a sorted
table of values in [-1, 1]; quantizing a number means storing the *index* of
the nearest table entry (after dividing by the block's absmax, see
:mod:`qlora_ref.blockwise`).

Mirrors ``bitsandbytes.functional.create_normal_map``,
``get_4bit_type`` and ``create_dynamic_map``. Every table is *derived* here,
never pasted, and the tests check each one against bitsandbytes' table.

Note (the paper's equation (4) and the table in use): the paper defines the
levels of a k-bit quantile code by averaging neighbouring quantiles,
:math:`q_i = \tfrac12\big(Q_X(\tfrac{i}{2^k+1}) + Q_X(\tfrac{i+1}{2^k+1})\big)`,
:math:`i = 0, \dots, 2^k - 1`. Taken literally for N(0, 1) and k = 4 that
gives :math:`q_0 = -\infty` (because :math:`Q_X(0) = \Phi^{-1}(0)`), seven
finite negative levels, an exact 0 at :math:`i = 8`, and seven positive
levels up to 1.3758. bitsandbytes' ``create_normal_map``, which NF4 is in
practice and which :func:`normal_float_code` follows bit for bit, is built
differently: 8 positive levels :math:`\Phi^{-1}(p)` for
``p = linspace(offset, 0.5, 9)[:-1]``, 7 negative levels from
``linspace(offset, 0.5, 8)[:-1]``, and 0, all divided by the largest. In
standard deviations, before that division::

    eq. (4), k = 4  : -inf  -1.3758 -1.0579 -0.8252 -0.6315 -0.4594 -0.3002 -0.1484
                       0.    0.1484  0.3002  0.4594  0.6315  0.8252  1.0579  1.3758
    bitsandbytes    : -1.8481 -1.2867 -0.9704 -0.7299 -0.5257 -0.3415 -0.1683  0.
                       0.1471  0.2974  0.4548  0.6245  0.8145  1.0398  1.3361  1.8481

(printed by notebook 1, section 1.3, from ``scipy.stats.norm.ppf``). Both
build the levels from evenly spaced probabilities; they differ in where the
outermost levels sit (:math:`\pm\infty` or :math:`\pm\Phi^{-1}(\delta)`),
in the spacing of the two halves, and in how the zero is made.

Note (float32 steps): bitsandbytes builds its tables with ``torch.linspace``
in float32 and divides in float32, so its NF4 values sit up to ~1.2e-7 away
from an all-float64 derivation. Quantization must use the *same* float32
values as bitsandbytes to produce the same bytes, so :func:`nf4_code`
reproduces those float32 steps (:func:`linspace_float32`), and
:func:`normal_float_code` with ``float32_steps=False`` gives the float64
version for comparison.
"""
from __future__ import annotations

import functools

import numpy as np

__all__ = [
    "NF4_OFFSET",
    "linspace_float32",
    "normal_float_code",
    "nf4_code",
    "fp4_code",
    "int4_code",
    "dynamic_code",
    "code_for",
]

#: The outermost probability used by NF4: bitsandbytes' ``create_normal_map`` default, which
#: bitsandbytes calls empirically chosen. See :func:`normal_float_code` for a rule that gives it.
NF4_OFFSET = 0.9677083


def linspace_float32(start: float, stop: float, num: int) -> np.ndarray:
    r"""``torch.linspace(start, stop, num)`` in float32, bit for bit.

    torch fills the first half forwards from ``start`` and the second half
    backwards from ``stop``; the step is a float32 division:

    .. math::

        \Delta = \operatorname{fl}\!\left(\frac{b - a}{n - 1}\right),\qquad
        v_i = \begin{cases} \operatorname{fl}(a + i\Delta) & i < \lfloor n/2 \rfloor \\
                            \operatorname{fl}(b - (n - 1 - i)\Delta) & \text{otherwise} \end{cases}

    where :math:`\operatorname{fl}` rounds to float32 *once*: torch's CPU
    kernel evaluates :math:`a + i\Delta` as a fused multiply-add. We get the
    same single rounding by computing in float64 and rounding at the end.
    That is exact while :math:`i\Delta` (24 + 9 bits for ``num`` <= 512)
    and :math:`a` differ by fewer than 20 binary orders of magnitude, e.g.
    :math:`|b - a| \ge 2^{-10}` and each endpoint 0 or of magnitude in
    :math:`[2^{-10}, 2]`: true of every
    table in this module (the tests check that domain against torch). NumPy's own
    ``linspace`` differs in the last bit for some entries, which would
    shift bitsandbytes' 8-bit dynamic code (see the module note).
    """
    a, b = np.float32(start), np.float32(stop)
    if num <= 1:  # torch: no points, or just ``start``
        return np.full(max(num, 0), a, dtype=np.float32)
    step = np.float64((b - a) / np.float32(num - 1))  # the float32 step, held exactly
    i = np.arange(num, dtype=np.float64)
    forward = np.float64(a) + i * step                 # exact in float64
    backward = np.float64(b) - (num - 1 - i) * step    # exact in float64
    return np.where(i < num // 2, forward, backward).astype(np.float32)  # one rounding


def normal_float_code(bits: int = 4, offset: float = NF4_OFFSET,
                      float32_steps: bool = True) -> np.ndarray:
    r"""The k-bit NormalFloat codebook NF\ *k*: quantiles of N(0, 1) scaled to [-1, 1].

    The paper calls such a type *information-theoretically optimal*, meaning
    that each code gets the same share of the input's probability mass, so
    that the code's entropy is the largest possible (k bits). For NF4 the
    shares are only *approximately* equal: values are rounded to the nearest
    level, so each level owns the interval between the midpoints to its
    neighbours, not an interval between quantiles, and the halves have 7 and
    8 levels. On N(0, 1) in units of :math:`\Phi^{-1}(\delta)` the 16 masses
    run from 0.056 to 0.071 and the entropy is 3.996 bits, not 4 (notebook 1,
    section 1.5); Yoshida (2023), "NF4 Isn't Information Theoretically
    Optimal (and that's Good)", arXiv:2306.06965, shows that blockwise absmax
    scaling also changes the distribution being quantized. Nor is
    "optimal" about the rounding error: the code with the least mean squared
    error (Lloyd-Max) spends its levels differently (notebook 1 compares the
    two). The levels sit at quantiles of N(0, 1). To
    have an *exact zero* (padding and zero weights must round-trip) the
    type is asymmetric: :math:`2^{k-1}` positive levels from the quantiles of
    the upper half, :math:`2^{k-1} - 1` negative levels from the lower half,
    and 0 itself:

    .. math::

        q^+_i = \Phi^{-1}\!\left(\delta + (\tfrac12 - \delta)\tfrac{i}{2^{k-1}}\right)
              \;\text{(}p\text{ from }\delta\text{ down to } \tfrac12\text{, } 2^{k-1}+1
              \text{ points, last dropped)}

        q^-_j = -\Phi^{-1}\!\left(\delta + (\tfrac12 - \delta)\tfrac{j}{2^{k-1}-1}\right)
              \;\text{(}2^{k-1}\text{ points, last dropped)}

        \text{NF}k = \operatorname{sort}(q^-, 0, q^+) \,/\, \max_i q^+_i

    with :math:`\delta` = ``offset`` = 0.9677083 and :math:`\Phi^{-1}` the
    normal quantile function (``scipy.stats.norm.ppf``).

    Why 0.9677083 and not 1? :math:`\Phi^{-1}(1) = \infty`, so the outermost
    probability must stop short of 1. Neither the paper nor bitsandbytes
    derives the value (bitsandbytes' docstring calls it empirically
    optimized). One rule that reproduces it, a reconstruction of ours: take
    :math:`1 - \delta` halfway between the centres of the outermost bins of
    a 15-bin and a 16-bin equal-mass grid,

    .. math::

        1 - \delta = \tfrac12\left(\tfrac{1}{2\cdot 15} + \tfrac{1}{2\cdot 16}\right)
        = 0.0322917, \qquad \delta = 0.96770833\ldots

    which rounds to bitsandbytes' 0.9677083 at 7 digits (notebook 1,
    section 1.4, checks it). The largest level then sits at
    :math:`\Phi^{-1}(0.9677083) \approx 1.848` standard deviations before
    normalisation to 1.

    Parameters
    ----------
    bits : int
        2 to 8. NF4 is ``bits=4``.
    offset : float
        The outermost probability :math:`\delta`, in (0.5, 1).
    float32_steps : bool
        If True (default), compute the probabilities with
        :func:`linspace_float32` and divide by the maximum in float32,
        exactly as bitsandbytes does; if False, compute in float64 and
        round once at the end.

    Returns
    -------
    numpy.ndarray
        float32, shape ``(2**bits,)``, sorted, ``[0] == -1``, ``[-1] == 1``,
        exactly one zero.
    """
    if not 2 <= int(bits) <= 8 or int(bits) != bits:
        raise ValueError(f"bits must be an integer from 2 to 8, got {bits!r}")
    if not 0.5 < offset < 1.0:
        raise ValueError(f"offset must lie in (0.5, 1), got {offset!r}")
    half = 2 ** (bits - 1)
    if float32_steps:
        p_pos = linspace_float32(offset, 0.5, half + 1)[:-1]  # (half,)
        p_neg = linspace_float32(offset, 0.5, half)[:-1]      # (half - 1,)
    else:
        p_pos = np.linspace(offset, 0.5, half + 1)[:-1]
        p_neg = np.linspace(offset, 0.5, half)[:-1]
    # imported here, not at the top: scipy.stats takes 1-8 s to import, which every
    # `import qlora_ref` and `qlora-ref --help` would otherwise pay
    from scipy.stats import norm

    positive = norm.ppf(p_pos.astype(np.float64))             # q+, float64
    negative = -norm.ppf(p_neg.astype(np.float64))            # q-, float64
    levels = np.sort(np.concatenate([negative, [0.0], positive]))
    if float32_steps:
        levels = levels.astype(np.float32)
        return levels / levels.max()                          # float32 division
    return (levels / levels.max()).astype(np.float32)


def nf4_code() -> np.ndarray:
    """The NF4 codebook used for quantizing: 16 sorted float32 values.

    ``normal_float_code(4)``; equal, value for value, to bitsandbytes'
    ``get_4bit_type("nf4")`` (see :func:`normal_float_code` for the
    derivation and the module note on float32 steps).

    Examples
    --------
    >>> code = nf4_code()
    >>> code.shape, code.dtype, float(code[0]), float(code[7]), float(code[-1])
    ((16,), dtype('float32'), -1.0, 0.0, 1.0)

    Note (computed once): the table is derived on the first call and kept
    (every layer a model quantizes asks for it); each call returns a copy.
    """
    return _nf4_table().copy()


@functools.lru_cache(maxsize=1)
def _nf4_table() -> np.ndarray:
    return normal_float_code(4)


def fp4_code() -> np.ndarray:
    r"""bitsandbytes' FP4: 1 sign bit, 2 exponent bits, 1 mantissa bit, in *code order*.

    Index bit 3 is the sign; bits 2..1 are the exponent field :math:`e`,
    bit 0 the mantissa :math:`m`. bitsandbytes' kernels read the exponent
    field *downwards* (a larger field means a smaller power of two) and
    field 0 is subnormal:

    .. math::

        |v| = \begin{cases} m \cdot 2^{-4} & e = 0 \\
                            (1 + m/2) \cdot 2^{\,4 - e} & e = 1, 2, 3 \end{cases}

    ==========  =====  ======  =====  =====  =====  =====  =====  =====
    bits 2..0   000    001     010    011    100    101    110    111
    magnitude   0      0.0625  8      12     4      6      2      3
    ==========  =====  ======  =====  =====  =====  =====  =====  =====

    Divided by the largest magnitude (12, float32 division) so the table
    spans [-1, 1]. The table is *not sorted*: index 0b0011 is +1.0.

    Note (negative zero): index 0b1000 is -0.0, which is how bitsandbytes'
    compiled kernels (C++ on CPU, CUDA) decode it. Its Python table
    ``get_4bit_type("fp4")`` writes the integer ``-0``, i.e. +0.0; the two
    are equal as numbers, and only the sign bit of a dequantized zero differs. Matches ``bitsandbytes.functional.get_4bit_type("fp4")``.
    """
    magnitudes = []
    for bits in range(8):
        e, m = bits >> 1, bits & 1
        if e == 0:  # subnormal: no implicit leading 1
            magnitudes.append(m * 2.0 ** -4)
        else:
            magnitudes.append((1 + m / 2) * 2.0 ** (4 - e))
    magnitudes = np.array(magnitudes, dtype=np.float32)                    # (8,)
    table = np.concatenate([magnitudes, -magnitudes])                        # (16,) bit 3 = sign
    return table / np.float32(12.0)


def int4_code() -> np.ndarray:
    r"""Symmetric uniform 4-bit integers :math:`\{-7, \dots, 7\}/7`, sorted.

    For comparison only (paper Table 2, Section 4, has Int4; Figure 3 does not). 15 distinct
    levels: the 16th index repeats 0 so that the table has 16 entries and
    one exact zero is reachable. Sorted so it can use the same midpoint
    search as NF4.
    """
    levels = np.arange(-7, 8, dtype=np.float32) / np.float32(7.0)  # (15,)
    return np.sort(np.concatenate([levels, np.zeros(1, np.float32)])).astype(np.float32)


def dynamic_code(signed: bool = True, max_exponent_bits: int = 7,
                 total_bits: int = 8) -> np.ndarray:
    r"""The 8-bit dynamic-exponent map (Dettmers 2016) used for double quantization.

    Each code has a sign, an exponent :math:`e` written in unary (leading
    zeros, at most ``max_exponent_bits``) and a linear fraction in the bits
    that remain. Exponent level :math:`i` contributes the midpoints of
    :math:`n_i` evenly spaced points in [0.1, 1], scaled by
    :math:`10^{i-(E-1)}`:

    .. math::

        \text{code} = \operatorname{sort}\Big( \bigcup_{i=0}^{E-1}
            \pm 10^{\,i-E+1} \cdot \frac{b_j + b_{j+1}}{2}
            \;\Big|\; b = \operatorname{linspace}(0.1, 1, n_i) \Big)
            \cup \{0, 1\},
        \qquad n_i = \lfloor 2^{\,i + T - 1 - E} \rfloor + 1 \;(\text{signed; } 2^{\,i+T-E} \text{ unsigned})

    with :math:`T` = ``total_bits``. All steps in float32, as bitsandbytes'
    ``create_dynamic_map`` does, so the result is bit-identical to it for
    every argument it accepts, including its two habits: :math:`n_i` is
    truncated to an integer (so ``max_exponent_bits`` may exceed the bits
    that remain), and a code of fewer than 256 values is padded with zeros
    to 256 entries before sorting (the 8-bit kernels index 256 entries).

    Returns
    -------
    numpy.ndarray
        float32, shape ``(256,)``, sorted.

    Raises
    ------
    ValueError
        For settings bitsandbytes rejects: the levels must give exactly
        :math:`2^T` values.
    """
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
               for v in (max_exponent_bits, total_bits)) or not 1 <= total_bits <= 8 \
            or max_exponent_bits < 0:
        raise ValueError("dynamic_code needs integers 0 <= max_exponent_bits and "
                         f"1 <= total_bits <= 8; got {max_exponent_bits!r}, {total_bits!r}")
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1   # may be fractional: < 1

    def scaled_means(n_points: int, i: int) -> np.ndarray:
        boundaries = linspace_float32(0.1, 1.0, n_points)
        means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)  # float32
        return np.float32(10.0 ** (-(max_exponent_bits - 1) + i)) * means

    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                             else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)  # n_i
        means = scaled_means(fraction_items, i)
        data += means.tolist()
        if signed:
            data += (-means).tolist()
    if additional_items > 0:
        if max_exponent_bits == 0:  # bitsandbytes scales these by its last level, which is missing
            raise ValueError("max_exponent_bits=0 leaves no exponent level for the "
                             f"{int(additional_items)} extra codes of total_bits={total_bits}")
        means = scaled_means(int(additional_items) + 1, max_exponent_bits - 1)
        data += means.tolist()
        if signed:
            data += (-means).tolist()
    data += [0.0, 1.0]
    if len(data) != 2 ** total_bits:
        raise ValueError(f"dynamic_code(signed={signed}, max_exponent_bits={max_exponent_bits}, "
                         f"total_bits={total_bits}) gives {len(data)} codes, not "
                         f"2**total_bits = {2 ** total_bits}")
    data += [0.0] * (256 - len(data))  # padded to the 256 entries an 8-bit index addresses
    return np.sort(np.array(data, dtype=np.float32))


def code_for(quant_type: str) -> np.ndarray:
    """The 16-entry codebook for a 4-bit ``quant_type``: ``"nf4"``, ``"fp4"`` or ``"int4"``."""
    tables = {"nf4": nf4_code, "fp4": fp4_code, "int4": int4_code}
    if quant_type not in tables:
        raise ValueError(f"quant_type must be one of {sorted(tables)}, got {quant_type!r}")
    return tables[quant_type]()
