"""Checks for the notebooks' exercises, with the solutions kept apart.

Each exercise in a notebook leaves a placeholder for the student (``None``,
or a function whose body returns ``None``) and is followed by a check cell::

    from exercises import check, require

    def test(nf_k):                      # what a right answer must satisfy
        levels = require(nf_k(4), "nf_k(4)")
        assert len(levels) == 16, f"NF4 has 16 levels, yours has {len(levels)}"

    nf_k = check("01", "nf_k", nf_k, test)

:func:`check` runs ``test(answer)`` and prints one line:

* ``[not done] ...`` -- the answer is still a placeholder (``None``, or
  :func:`require` met ``None``): nothing fails, the notebook runs on;
* ``[wrong] ...`` -- ``test`` raised ``AssertionError``; its message says what is wrong;
* ``[correct] ...`` -- ``test`` passed.

With ``QLORA_REF_SOLUTIONS=1`` in the environment, the answer is replaced by
the solution (``solutions/<notebook>.py``, the attribute named ``name``),
and anything but ``[correct]`` raises: the test suite runs every notebook
this way, which shows every exercise can be solved and every check passes
on a right answer. It also runs them as shipped, where every check must say
``[not done]``: that shows a placeholder is recognised. That a wrong answer,
or the shortcut of calling ``qlora_ref`` itself, is rejected is shown by
``tests/docs/test_exercises.py``, which feeds every check the solution, at least
two plausible wrong answers and the library shortcut.

:func:`check` returns the answer it checked (the solution in solutions mode),
so later cells can use it.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["NotDone", "require", "check", "solutions_mode", "solution"]

SOLUTIONS_DIR = Path(__file__).resolve().parent / "solutions"


class NotDone(Exception):
    """The exercise still holds its placeholder."""


def solutions_mode() -> bool:
    """Whether ``QLORA_REF_SOLUTIONS=1`` is set (checks then use the solutions and must pass)."""
    return os.environ.get("QLORA_REF_SOLUTIONS", "") == "1"


def require(value, what: str = "the answer"):
    """``value``, or :class:`NotDone` if it is still ``None`` (the placeholder)."""
    if value is None:
        raise NotDone(f"{what} is still None")
    return value


def solution(notebook: str, name: str):
    """The solution ``name`` of notebook ``notebook`` (``"01"`` reads ``solutions/01_*.py``)."""
    matches = sorted(SOLUTIONS_DIR.glob(f"{notebook}_*.py"))
    if len(matches) != 1:
        raise FileNotFoundError(f"expected one solutions/{notebook}_*.py, found "
                                f"{[p.name for p in matches]}")
    spec = importlib.util.spec_from_file_location(f"solutions_{notebook}", matches[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise AttributeError(f"{matches[0].name} has no solution named {name!r}")
    return getattr(module, name)


def check(notebook: str, name: str, answer, test):
    """Run ``test(answer)`` and print ``[correct]``, ``[wrong] why`` or ``[not done]``; return the answer.

    In solutions mode the answer is ``solution(notebook, name)`` and a result
    other than ``[correct]`` raises ``AssertionError``.
    """
    label = f"exercise {notebook}/{name}"
    if solutions_mode():
        answer = solution(notebook, name)
    try:
        require(answer, name)
        test(answer)
    except NotDone as exc:
        verdict = f"[not done] {label}: {exc} -- replace the placeholder with your answer"
    except AssertionError as exc:
        verdict = f"[wrong] {label}: {exc}"
    else:
        print(f"[correct] {label}")
        return answer
    if solutions_mode():
        raise AssertionError(f"the solution fails its own check: {verdict}")
    print(verdict)
    return answer


# ============================================================================ notebooks 01-08
# The checks of notebooks 01 to 08, kept here, out of the student's view. Three rules:
#
# * a check runs the student's function on inputs of its own making, under _forbidding(): the
#   package functions that would answer the exercise (and bitsandbytes, and torch's autograd
#   engine where the exercise is a hand-written gradient) are switched off while it runs;
# * where the package computes the answer, the check compares with the package's function,
#   called by the check itself, outside that guard: reading the check says "it must equal
#   qlora_ref.X", which the exercise says anyway, and nothing more;
# * where nothing in the package computes the answer (a number to derive, a count), the check
#   measures by a route that does not contain the derivation (a grid of values, every float32
#   of a binade, scipy's numerical integration), or compares a salted hash of the answer
#   (_digest): the expected value is not written anywhere a student can read.
# Messages say what is wrong with the answer, never what the answer is.

import hashlib  # noqa: E402 - this section's own imports
import sys  # noqa: E402


class _Forbidden(AssertionError):
    """The student's function called something the check forbids."""


def _forbidding(fn, args=(), *, forbid=("qlora_ref", "bitsandbytes"), allow=(), autograd=False):
    """``fn(*args)``; ``AssertionError`` if it called anything in ``forbid`` meanwhile.

    ``forbid`` and ``allow`` hold module names (a name covers its submodules) and
    functions. A profiler (``sys.setprofile``) sees every Python call and every call
    of a compiled function (the Cython kernels): a forbidden one is recorded and
    stopped. Inside an allowed function everything is allowed (``memory`` may call
    the package's validation). ``autograd=True`` also forbids torch's autograd
    engine (``backward``, ``torch.autograd.grad``, ``torch.func.vjp`` all end in
    ``run_backward``). The record decides, so catching the error does not help.
    """
    def split(items):
        names = tuple(i for i in items if isinstance(i, str))
        codes = {getattr(i, "__code__", None) for i in items} - {None}
        objects = [i for i in items if not isinstance(i, str) and not hasattr(i, "__code__")]
        return names, codes, objects

    forbid_names, forbid_codes, forbid_objects = split(forbid)
    allow_names, allow_codes, allow_objects = split(allow)

    def in_modules(module, names):
        return any(module == n or module.startswith(n + ".") for n in names)

    calls, inside_allowed = [], []

    def profiler(frame, event, arg):
        if event == "return" and inside_allowed and inside_allowed[-1] is frame:
            inside_allowed.pop()
            return
        if inside_allowed or event not in ("call", "c_call"):
            return
        if event == "call":
            code, module = frame.f_code, str(frame.f_globals.get("__name__", ""))
            if code in allow_codes or in_modules(module, allow_names):
                inside_allowed.append(frame)
                return
            bad = code in forbid_codes or in_modules(module, forbid_names)
            name = f"{module}.{code.co_name}"
        else:
            module = str(getattr(arg, "__module__", None) or "")
            if any(arg is o for o in allow_objects) or in_modules(module, allow_names):
                return
            name = f"{module}.{getattr(arg, '__name__', '?')}"
            bad = (any(arg is o for o in forbid_objects) or in_modules(module, forbid_names)
                   or (autograd and getattr(arg, "__name__", "") == "run_backward"))
        if bad:
            calls.append(name)
            raise _Forbidden(name)

    previous = sys.getprofile()
    sys.setprofile(profiler)
    try:
        result = fn(*args)
    except _Forbidden:
        result = None
    finally:
        sys.setprofile(previous)
    if calls:
        raise AssertionError(f"your answer calls {calls[0]}, which this exercise asks you to "
                             "do without: the check compares with it")
    return result


def _digest(exercise: str, text: str) -> str:
    """A salted hash of an answer written as ``text``: the check stores this, not the answer."""
    return hashlib.sha256(f"qlora_ref course {exercise}: {text}".encode()).hexdigest()[:20]


def _whole(value, what: str) -> int:
    """``value`` as an int; ``AssertionError`` unless it is a whole number (not a bool)."""
    import numpy as np

    require(value, what)
    assert not isinstance(value, (bool, np.bool_)), f"{what}: give a number, not {value!r}"
    try:
        ok = float(value) == int(value)
    except (TypeError, ValueError, OverflowError):
        ok = False
    assert ok, f"{what}: give a whole number, not {value!r}"
    return int(value)


def _number(value, what: str) -> float:
    import math as _math

    require(value, what)
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise AssertionError(f"{what}: give a number, not {type(value).__name__}") from None
    assert _math.isfinite(out), f"{what} is {out}"
    return out


# ---------------------------------------------------------------------------- notebook 01

def verify_nf_k(fn) -> None:
    """01/1: ``fn(bits)`` equals ``normal_float_code(bits)`` (2 float32 ulps), built without it."""
    import numpy as np

    from qlora_ref import codebooks

    allowed = (codebooks.linspace_float32,)          # bitsandbytes' float32 steps, a helper
    for bits in (2, 3, 4, 5, 6, 8):
        mine = np.asarray(require(_forbidding(fn, (bits,), allow=allowed), f"nf_k({bits})"))
        ref = codebooks.normal_float_code(bits)
        assert mine.shape == ref.shape, f"NF{bits} has {ref.size} levels, yours has {mine.size}"
        assert (mine == 0).sum() == 1, f"NF{bits} needs exactly one exact zero; yours has {(mine == 0).sum()}"
        npos, nneg = int((mine > 0).sum()), int((mine < 0).sum())
        assert (npos, nneg) == (2 ** (bits - 1), 2 ** (bits - 1) - 1), (
            f"NF{bits} has {2 ** (bits - 1)} positive and {2 ** (bits - 1) - 1} negative levels; "
            f"yours has {npos} and {nneg}")
        assert np.all(np.diff(mine) > 0), f"nf_k({bits}) is not sorted (or repeats a level)"
        worst = float(np.abs(mine.astype(np.float64) - ref).max())
        assert worst <= 2.4e-7, f"nf_k({bits}) differs from normal_float_code({bits}) by up to {worst:.3g}"


#: blocksize -> _digest of the exact median of a block's absmax, to 5 decimals (each median lies
#: at least 1e-6 from a rounding edge, so every answer within 1e-6 has this digest)
MEDIAN_ABSMAX_DIGESTS = {1: "31bd5a6609e0eb2c5d38", 64: "0df0721b6c9708d59fe6",
                         256: "71da967cd8ff92124622", 1000: "e8cd0c310a3350e5f5c5"}


def verify_median_block_absmax(fn) -> None:
    """01/2: ``fn(n)`` is the exact median of max |X_i| over n N(0, 1) draws (compared by hash)."""
    import numpy as np

    for n, digest in MEDIAN_ABSMAX_DIGESTS.items():
        m = _number(_forbidding(fn, (n,)), f"median_block_absmax({n})")
        if _digest(f"01/median_block_absmax/{n}", f"{m:.5f}") == digest:
            continue
        rng = np.random.default_rng(n)
        sampled = float(np.median(np.abs(rng.standard_normal((4000, n))).max(axis=1)))
        far = abs(m - sampled) > 0.05
        raise AssertionError(
            f"blocksize {n}: {m:.6f} is not the median of a block's absmax"
            + (f"; 4,000 sampled blocks put it near {sampled:.2f}" if far else
               " to 6 decimals (close to the sampled value: derive it exactly, no sampling)"))


def verify_lloyd_max(fn) -> None:
    """01/3: each level of ``fn(n)`` is the mean of N(0, 1) over its own cell (scipy integrates it)."""
    import numpy as np
    from scipy.stats import norm

    for n in (2, 5, 16):
        levels = np.asarray(require(_forbidding(fn, (n,)), f"lloyd_max({n})"), dtype=np.float64)
        assert levels.shape == (n,), f"lloyd_max({n}) must return {n} levels, not {levels.shape}"
        assert np.all(np.diff(levels) > 0), f"lloyd_max({n}) must be sorted, without repeats"
        edges = np.concatenate([[-np.inf], (levels[1:] + levels[:-1]) / 2, [np.inf]])
        for i in range(n):                                   # E[X | edge_i < X < edge_i+1], by quadrature
            mean = norm.expect(lambda x: x, lb=edges[i], ub=edges[i + 1], conditional=True)
            assert abs(mean - levels[i]) < 1e-5, (
                f"lloyd_max({n}): level {i} is {levels[i]:.5f}, but the values that round to it "
                f"average {mean:.5f}")


# ---------------------------------------------------------------------------- notebook 02

def _largest_rounding_error(code) -> float:
    """The largest |x - nearest level| over 400,001 points of [-1, 1] (a grid, no formula)."""
    import numpy as np

    code = np.sort(np.asarray(code, np.float64))
    grid = np.linspace(-1, 1, 400_001)
    idx = np.clip(np.searchsorted(code, grid), 1, code.size - 1)
    return float(np.minimum(np.abs(grid - code[idx - 1]), np.abs(grid - code[idx])).max())


def _random_codes():
    """Two sorted codes with ends -1 and 1 that no library names: 9 and 16 levels."""
    import numpy as np

    rng = np.random.default_rng(2)
    return [("a random 9-level code", np.sort(np.concatenate([[-1, 1], rng.uniform(-1, 1, 7)]))),
            ("a random 16-level code", np.sort(np.concatenate([[-1, 1], rng.uniform(-1, 1, 14) ** 3])))]


def verify_error_bound(fn) -> None:
    """02/1: ``fn(code, absmax)`` is the largest rounding error, measured on a grid."""
    import numpy as np

    from qlora_ref import codebooks

    codes = [(q, np.sort(codebooks.code_for(q)).astype(np.float64)) for q in ("nf4", "int4", "fp4")]
    for name, code in codes + _random_codes():
        worst = _largest_rounding_error(code)
        for absmax in (1.0, 0.02, 3.5):
            mine = _number(_forbidding(fn, (code.copy(), absmax)), "error_bound(code, absmax)")
            assert abs(mine - worst * absmax) <= 1e-4 * absmax, (
                f"{name}, absmax {absmax}: values of the block are rounded with errors up to "
                f"{worst * absmax:.5f}, you say {mine:.5f}")


def verify_worst_block(x) -> None:
    """02/2: ``x`` (64 float32) reaches 99.9 % of the largest NF4 error possible for its absmax."""
    import numpy as np

    import qlora_ref

    x = np.asarray(require(x, "worst_block"))
    assert x.shape == (64,) and x.dtype == np.float32, f"need float32 of shape (64,), got {x.dtype} {x.shape}"
    absmax = float(np.abs(x).max())
    assert absmax > 0, "an all-zero block is stored exactly: its error is 0"
    x_hat = qlora_ref.dequantize_4bit(qlora_ref.quantize_4bit(x, blocksize=64, double_quant=False))
    reached = float(np.abs(x_hat - x).max()) / (absmax * _largest_rounding_error(qlora_ref.nf4_code()))
    assert reached >= 0.999, (
        f"your block's largest error is {reached:.1%} of the largest possible for its absmax "
        f"{absmax:.4g} (the scale is your block's own largest value)")


def _outlier_cases():
    """(what, x, blocksize, threshold): partial blocks, negative outliers, a 2-D tensor."""
    import numpy as np

    tiny = np.zeros(100, np.float32)
    tiny[99] = 1.0                                           # an outlier in the trailing partial block
    two = tiny.copy()
    two[[0, 1]] = -1.0                                       # and two negative ones in the first block
    rng = np.random.default_rng(7)
    w = rng.standard_normal((37, 91)).astype(np.float32)     # 3,367 values: partial blocks at each size
    w.reshape(-1)[rng.choice(w.size, 15, replace=False)] = 12 * rng.choice([-1, 1], 15)
    return [("100 values, one outlier at index 99", tiny, 64, 0.5),
            ("100 values, outliers at 0, 1 (negative) and 99", two, 64, 0.5),
            *[(f"a (37, 91) tensor with 15 outliers, blocksize {b}", w, b, 10.0) for b in (16, 64, 4096)]]


#: _digest of the count for each of _outlier_cases()
OUTLIER_DIGESTS = ("3dd114dfd4999d816a23", "17947e3827e0c543e445", "0af380903f7776eed4a2",
                   "d591b30ab13836620d48", "9375a0b0dfa33c005965")


def verify_outlier_neighbours(fn) -> None:
    """02/3: ``fn(x, blocksize, threshold)`` counts ordinary values sharing a block with an outlier."""
    for i, ((what, x, b, t), digest) in enumerate(zip(_outlier_cases(), OUTLIER_DIGESTS, strict=True)):
        got = _whole(_forbidding(fn, (x.copy(), b, t)), "outlier_neighbours(x, blocksize, threshold)")
        assert _digest(f"02/outlier_neighbours/{i}", str(got)) == digest, (
            f"{what}: {got:,} is not the count (blocks run along the flattened x; the last one "
            "may be partial; an outlier is |x| above the threshold, either sign)")


# ---------------------------------------------------------------------------- notebook 03

DQ_PAIRS = ((64, 256), (64, 128), (128, 256), (32, 64), (256, 1024))


def verify_dq_bits_per_param(fn) -> None:
    """03/1: ``fn(b1, b2)`` equals ``memory.bits_per_param``, written without the package."""
    from qlora_ref import memory

    for b1, b2 in DQ_PAIRS:
        mine = _number(_forbidding(fn, (b1, b2)), f"dq_bits_per_param({b1}, {b2})")
        ref = memory.bits_per_param(blocksize=b1, nested_blocksize=b2)
        assert abs(mine - ref) < 1e-12, (
            f"B1 = {b1}, B2 = {b2}: the stored bytes give {ref:.6f} bits per parameter, you say {mine:.6f}")


def verify_n_c1(fn) -> None:
    """03/2: ``fn(shape)`` is the number of c1 that ``quantize_4bit`` stores, counted without it."""
    import numpy as np

    import qlora_ref

    for shape in [(2048, 3000), (1000, 70), (3,), (64 * 256 + 1,), (64 * 255 + 1,), (5, 7, 300)]:
        mine = _whole(_forbidding(fn, (shape,)), f"n_c1({shape})")
        stored = qlora_ref.quantize_4bit(np.zeros(shape, np.float32)).nested_absmax.size
        assert mine == stored, f"for shape {shape} quantize_4bit stores {stored} constants c1, you say {mine}"


def verify_equivalent_blocksize(fn) -> None:
    """03/3: float32 constants at ``fn(b1, b2)`` cost what double quantization at (b1, b2) costs."""
    from qlora_ref import memory

    for b1, b2 in DQ_PAIRS:
        b = _number(_forbidding(fn, (b1, b2)), f"equivalent_blocksize({b1}, {b2})")
        assert b > 0, f"equivalent_blocksize({b1}, {b2}) must be positive, not {b}"
        dq = memory.bits_per_param(blocksize=b1, nested_blocksize=b2)
        plain = memory.bits_per_param(blocksize=1, double_quant=False) - 32 + 32 / b   # 4 + 32 / B'
        assert abs(plain - dq) < 1e-9, (
            f"({b1}, {b2}): double quantization costs {dq:.6f} bits per parameter, float32 "
            f"constants at B' = {b:.4g} cost {plain:.6f}")


# ---------------------------------------------------------------------------- notebook 04

def verify_dequantize_nf4(fn) -> None:
    """04/1: ``fn(packed, absmax, n)`` equals ``dequantize_4bit`` of a plain (not nested) NF4 state."""
    import numpy as np

    import qlora_ref
    from qlora_ref import codebooks

    rng = np.random.default_rng(4)
    for n in (1, 2, 64, 65, 1001, 4099):
        x = (rng.standard_normal(n) * rng.uniform(0.01, 3)).astype(np.float32)
        state = qlora_ref.quantize_4bit(x, blocksize=64, double_quant=False)
        expected = qlora_ref.dequantize_4bit(state).reshape(-1)
        mine = require(_forbidding(fn, (state.packed.copy(), state.absmax.copy(), n),
                                   allow=(codebooks.nf4_code,)), "dequantize_nf4(packed, absmax, n)")
        mine = np.asarray(mine, dtype=np.float64).reshape(-1)
        assert mine.shape == (n,), f"{n} elements: return {n} values, not {mine.shape}"
        bad = np.flatnonzero(mine != expected)
        assert bad.size == 0, (
            f"{n} elements: {bad.size} differ, the first at element {bad[0]} (byte {bad[0] // 2}, "
            f"block {bad[0] // 64}): yours {mine[bad[0]]:.6g}, stored {expected[bad[0]]:.6g}")


def verify_state_nbytes(fn) -> None:
    """04/2: ``fn(n)`` is the bytes of a double-quantized NF4 state of n elements."""
    import numpy as np

    import qlora_ref

    for n in (1, 3, 64, 4097, 64 * 256 + 1, 1_000_003):
        mine = _whole(_forbidding(fn, (n,)), f"state_nbytes({n})")
        real = qlora_ref.quantize_4bit(np.zeros(n, np.float32)).nbytes
        assert mine == real, f"a QuantState of {n:,} elements takes {real:,} bytes, you predict {mine:,}"


def verify_pack(fn) -> None:
    """04/3: ``fn(codes, pad)`` equals ``pack_nibbles``, written without it."""
    import numpy as np

    import qlora_ref

    gen = np.random.default_rng(1)
    for n, pad in ((0, 7), (1, 7), (2, 3), (7, 7), (8, 0), (1001, 11)):
        codes = gen.integers(0, 16, n).astype(np.uint8)
        mine = np.asarray(require(_forbidding(fn, (codes.copy(), pad)), "pack(codes, pad)"))
        ref = qlora_ref.pack_nibbles(codes, pad=pad)
        assert mine.dtype == np.uint8 and mine.shape == ref.shape, (
            f"{n} codes pack into {ref.size} uint8 bytes; you return {mine.dtype} of shape {mine.shape}")
        bad = np.flatnonzero(mine != ref)
        assert bad.size == 0, (f"{n} codes, pad {pad}: byte {bad[0]} should be 0x{ref[bad[0]]:02X}, "
                               f"yours is 0x{mine[bad[0]]:02X}")


# ---------------------------------------------------------------------------- notebook 05

def _adapter_path(X, A, B, s, mask, p):
    return s * ((X * mask / (1 - p)) @ A.T) @ B.T                     # (tokens, out)


def verify_lora_backward(fn) -> None:
    """05/1: ``fn(G, X, A, B, s, mask, p)`` gives autograd's (dX, dA, dB), without autograd."""
    import torch

    from qlora_ref.nn.autograd import dropout_mask

    class AdapterPath(torch.autograd.Function):                     # fn as a backward, for gradcheck
        @staticmethod
        def forward(ctx, X, A, B, s, mask, p):
            ctx.save_for_backward(X, A, B)
            ctx.s, ctx.mask, ctx.p = s, mask, p
            return _adapter_path(X, A, B, s, mask, p)

        @staticmethod
        def backward(ctx, G):
            X, A, B = ctx.saved_tensors
            dX, dA, dB = fn(G, X, A, B, ctx.s, ctx.mask, ctx.p)
            return dX, dA, dB, None, None, None

    gen = torch.Generator().manual_seed(5)
    for (t, d_in, r, d_out), s, p in (((6, 7, 3, 5), 2.5, 0.25), ((4, 9, 2, 3), 0.5, 0.5)):
        X, A, B = (torch.randn(*shape, dtype=torch.float64, generator=gen)
                   for shape in [(t, d_in), (r, d_in), (d_out, r)])
        G = torch.randn(t, d_out, dtype=torch.float64, generator=gen)
        mask = dropout_mask(X, p, gen)
        grads = require(_forbidding(fn, (G, X, A, B, s, mask, p), autograd=True), "lora_backward(...)")
        assert isinstance(grads, (tuple, list)) and len(grads) == 3, "return a tuple (dX, dA, dB)"
        leaves = [v.clone().requires_grad_() for v in (X, A, B)]
        oracle = torch.autograd.grad(_adapter_path(*leaves, s, mask, p), leaves, G)
        for name, mine, right in zip(["dX", "dA", "dB"], grads, oracle):
            assert isinstance(mine, torch.Tensor) and tuple(mine.shape) == tuple(right.shape), (
                f"{name} must be a tensor of shape {tuple(right.shape)}")
            assert torch.allclose(mine.to(torch.float64), right), (
                f"{name} differs from autograd's by up to {(mine - right).abs().max():.3g}")
        inputs = tuple(v.clone().requires_grad_() for v in (X, A, B))
        assert torch.autograd.gradcheck(lambda X, A, B: AdapterPath.apply(X, A, B, s, mask, p), inputs,
                                        raise_exception=False), \
            "gradcheck disagrees with your gradients (finite differences)"


def _saved_bytes_measured(x_shape, d_out, r, dropout) -> int:
    """Bytes QLoRAMatmul saves between forward and backward, watched with saved_tensors_hooks."""
    import torch

    from qlora_ref.nn import Linear4bit, LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(Linear4bit.from_linear(torch.nn.Linear(x_shape[-1], d_out, bias=False)), r=r,
                       lora_dropout=0.1 if dropout else 0.0).train()
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(torch.randn(x_shape, requires_grad=True))
    return sum(saved)


def verify_saved_bytes(fn) -> None:
    """05/2: ``fn(x_shape, d_out, r, dropout)`` is what the layer saves, predicted without building it."""
    for x_shape, d_out, r, dropout in [((4, 32, 256), 512, 8, True), ((4, 32, 256), 512, 8, False),
                                       ((100, 64), 128, 16, True), ((3, 5, 64), 256, 2, False),
                                       ((7, 96), 40, 3, True)]:
        measured = _saved_bytes_measured(x_shape, d_out, r, dropout)
        predicted = _whole(_forbidding(fn, (x_shape, d_out, r, dropout), autograd=True), "saved_bytes(...)")
        assert predicted == measured, (
            f"x {x_shape}, d_out {d_out}, r {r}, dropout {dropout}: predicted {predicted:,} bytes, "
            f"measured {measured:,} ({predicted - measured:+,})")


def _two_sgd_steps_autograd(G, X, A, s, lr):
    """(A, B) after two SGD steps on E = sum(G * s (X A^T) B^T) from B = 0, by torch autograd."""
    import torch

    A = A.clone().requires_grad_()
    B = torch.zeros(G.shape[1], A.shape[0], dtype=A.dtype, requires_grad=True)
    for _ in range(2):
        dA, dB = torch.autograd.grad((G * (s * (X @ A.T) @ B.T)).sum(), (A, B))
        with torch.no_grad():
            A -= lr * dA
            B -= lr * dB
    return A.detach(), B.detach()


def verify_two_sgd_steps(fn) -> None:
    """05/3: ``fn(G, X, A, s, lr)`` is (A, B) after two SGD steps from B = 0, without autograd."""
    import torch

    gen = torch.Generator().manual_seed(3)
    for t, d_in, r, d_out, s, lr in ((10, 6, 2, 4, 2.0, 0.1), (5, 8, 3, 7, 0.5, 0.03)):
        X = torch.randn(t, d_in, dtype=torch.float64, generator=gen)
        A = torch.randn(r, d_in, dtype=torch.float64, generator=gen)
        G = torch.randn(t, d_out, dtype=torch.float64, generator=gen)
        answer = require(_forbidding(fn, (G, X, A.clone(), s, lr), autograd=True), "two_sgd_steps(...)")
        assert isinstance(answer, (tuple, list)) and len(answer) == 2, "return a tuple (A, B)"
        for name, mine, right in zip(("A", "B"), answer, _two_sgd_steps_autograd(G, X, A, s, lr)):
            assert isinstance(mine, torch.Tensor) and mine.shape == right.shape, (
                f"{name} must be a tensor of shape {tuple(right.shape)}")
            assert torch.allclose(mine.to(torch.float64), right, rtol=1e-9, atol=1e-12), (
                f"{t} tokens, in {d_in}, r {r}, out {d_out}: your {name} after two steps differs from "
                f"the trained one by up to {(mine - right).abs().max():.3g}")


# ---------------------------------------------------------------------------- notebook 06

def _gpt_configs():
    from qlora_ref.train.gpt import GPTConfig

    return [GPTConfig(vocab_size=21, block_size=16, n_layer=2, n_head=2, n_embd=32),
            GPTConfig(vocab_size=50, block_size=8, n_layer=3, n_head=3, n_embd=48)]


def _prepared_counts(config, r):
    import torch

    import qlora_ref
    from qlora_ref.train.gpt import GPT

    torch.manual_seed(0)
    return qlora_ref.trainable_parameters(qlora_ref.prepare_model(GPT(config), r=r))


def verify_lora_count(fn) -> None:
    """06/1: ``fn(config, r)`` is the trainable count ``prepare_model`` gives, counted from the shapes."""
    for config in _gpt_configs():
        for r in (1, 4, 8):
            n = _prepared_counts(config, r).trainable
            mine = _whole(_forbidding(fn, (config, r)), "lora_count(config, r)")
            assert mine == n, (f"{config}, r = {r}: prepare_model adds {n:,} parameters, you count "
                               f"{mine:,} ({(mine - n) / r:+,.0f} x r)")


def verify_nf4_base_bytes(fn) -> None:
    """06/2: ``fn(config)`` is the NF4 base's ``base_bytes``, from the shapes (``qlora_ref.memory`` allowed)."""
    for config in _gpt_configs():
        n = _prepared_counts(config, 8).base_bytes
        mine = _whole(_forbidding(fn, (config,), allow=("qlora_ref.memory", "qlora_ref.validation")),
                      "nf4_base_bytes(config)")
        assert mine == n, f"{config}: the NF4 base stores {n:,} bytes, you predict {mine:,} ({mine - n:+,})"


def verify_loss_before_qlora(fn, base, qlora_loss: float, sixteen_bit_loss: float) -> None:
    """06/3: ``fn(base)`` is the loss QLoRA starts from (``qlora_loss``, recorded by ``finetune``).

    ``fn`` must not call ``finetune``, must leave ``base`` as it was, and must depend on it:
    a model with other weights must give another loss.
    """
    import copy

    import torch

    from qlora_ref.train import finetune as finetune_module

    reference = copy.deepcopy(base)
    mine = _number(_forbidding(fn, (reference,), forbid=(finetune_module.__name__,)), "loss_before_qlora(base)")
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), base.state_dict().values())), \
        "your function changed the base model it was given"
    assert abs(mine - sixteen_bit_loss) > 1e-6, \
        "that is the 16-bit base model's loss: what does QLoRA change in the model before training?"
    assert abs(mine - qlora_loss) < 1e-5, f"QLoRA starts at another loss than your {mine:.5f}"
    other = copy.deepcopy(base)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.9)
    again = _number(_forbidding(fn, (other,), forbid=(finetune_module.__name__,)), "loss_before_qlora(other)")
    assert abs(again - mine) > 1e-6, "a model with other weights gets the same loss from your function"


# ---------------------------------------------------------------------------- notebook 07

def verify_qlora_gb(fn) -> None:
    """07/1: ``fn(n_params, n_lora)`` equals ``memory.finetune_memory(..., "qlora")`` in GB."""
    from qlora_ref import memory

    cases = [(n, memory.lora_param_count(s.hidden_size, s.intermediate_size, s.n_layers, r=64))
             for n, s in ((6.7e9, memory.LLAMA_SHAPES["llama-7b"]), (65.2e9, memory.LLAMA_SHAPES["llama-65b"]))]
    cases += [(1_000_000, 10_000), (123_456_789, 2_345_678), (3_000_000_001, 7)]
    for n, n_lora in cases:
        counted = memory.finetune_memory(n, "qlora", lora_params=n_lora).total_bytes / 1e9
        mine = _number(_forbidding(fn, (n, n_lora)), "qlora_gb(n_params, n_lora)")
        assert abs(mine - counted) <= 1e-9 * counted, (
            f"N = {n:.4g}, {n_lora:,} LoRA parameters: you estimate {mine:.6f} GB, "
            f"qlora_ref.memory counts {counted:.6f} GB")


def _largest_that_fits(fits) -> int:
    """The largest integer n >= 1 with ``fits(n)`` (0 if not even 1 fits); ``fits`` must be monotone."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:                                   # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _largest_rank_counted(budget_gb: float, activation_bytes: int) -> int:
    """The largest r (0 if none) with LLaMA-65B's QLoRA memory at most ``budget_gb``, by bisection."""
    from qlora_ref import memory

    def fits(r):
        lora = memory.lora_param_count(**memory.LLAMA_65B, r=r)
        table = memory.finetune_memory(65e9, "qlora", lora_params=lora, activation_bytes=activation_bytes)
        return table.total_bytes <= budget_gb * 1e9

    return _largest_that_fits(fits)


def verify_largest_rank(fn) -> None:
    """07/2: ``fn(budget_gb, activation_bytes)`` is the largest rank that fits, derived, not searched."""
    from qlora_ref import memory

    act = memory.activation_memory(memory.LLAMA_SHAPES["llama-65b"], 512).total_bytes
    for budget, activations in ((48, 0), (48, act), (80, 4 * act), (46.5, 123_456_789), (30, 0)):
        expected = _largest_rank_counted(budget, activations)
        mine = _whole(_forbidding(fn, (budget, activations)), f"largest_rank({budget}, {activations})")
        assert mine == expected, (
            f"budget {budget} GB with {activations:,} bytes of activations: r = {mine} is not the "
            "largest rank that fits (0 if none does)")


def _longest_sequence_counted(n_params, n_lora, shape, budget_gb, gradient_checkpointing) -> int:
    """The longest T (0 if none) with QLoRA's memory, activations of one sequence included, within budget."""
    from qlora_ref import memory

    def fits(t):
        table = memory.finetune_memory(n_params, "qlora", lora_params=n_lora, shape=shape, seq_len=t,
                                       gradient_checkpointing=gradient_checkpointing)
        return table.total_bytes <= budget_gb * 1e9

    return _largest_that_fits(fits)


def _sequence_cases():
    """(what, shape, r, budget GB): the LLaMA sizes at usual GPU sizes, one that cannot fit, a made-up model."""
    from qlora_ref import memory

    shapes = memory.LLAMA_SHAPES
    made_up = memory.DecoderShape(hidden_size=1000, intermediate_size=2700, n_layers=7, n_heads=10,
                                  vocab_size=50_000)
    return [("LLaMA-65B, r = 64", shapes["llama-65b"], 64, 48), ("LLaMA-65B, r = 64", shapes["llama-65b"], 64, 80),
            ("LLaMA-7B, r = 64", shapes["llama-7b"], 64, 24), ("LLaMA-33B, r = 16", shapes["llama-33b"], 16, 20),
            ("LLaMA-13B, r = 8", shapes["llama-13b"], 8, 16), ("LLaMA-65B, r = 64", shapes["llama-65b"], 64, 30),
            ("a model of hidden size 1,000, MLP 2,700, 7 layers, vocabulary 50,000, r = 4", made_up, 4, 1.5)]


def verify_longest_sequence(fn) -> None:
    """07/3: ``fn(n_params, n_lora, shape, budget_gb, gradient_checkpointing)`` is the longest sequence that fits."""
    for what, shape, r, budget in _sequence_cases():
        n_params, n_lora = shape.n_params, shape.lora_params(r)
        for checkpointing in (True, False):
            expected = _longest_sequence_counted(n_params, n_lora, shape, budget, checkpointing)
            mine = _whole(_forbidding(fn, (n_params, n_lora, shape, budget, checkpointing)),
                          "longest_sequence(...)")
            assert mine == expected, (
                f"{what}, {budget} GB, gradient checkpointing {'on' if checkpointing else 'off'}: "
                f"T = {mine:,} is not the longest sequence that fits (0 if none does)")


# ---------------------------------------------------------------------------- notebook 08

def _weights_to_code():
    """Float32 weights of a few shapes (a multiple of 64 elements), with outliers and a zero block."""
    import torch

    g = torch.Generator().manual_seed(8)
    big = torch.randn(256, 512, generator=g) * 0.02
    big.view(-1)[torch.randint(0, big.numel(), (20,), generator=g)] = 0.5
    odd = torch.randn(3, 64, generator=g) * 3
    tall = torch.randn(64, 2, generator=g)
    zeros = torch.zeros(2, 64)
    zeros[1, 5] = -1e-3
    return [big, odd, tall, zeros]


def verify_nf4_codes(fn) -> None:
    """08/1: ``fn(weight)`` gives the codes ``quantize_4bit`` stores (``nf4_code`` allowed)."""
    import numpy as np

    import qlora_ref
    from qlora_ref import codebooks

    for w in _weights_to_code():
        n = w.numel()
        state = qlora_ref.quantize_4bit(w.numpy(), blocksize=64, double_quant=False)
        expected = qlora_ref.unpack_nibbles(state.packed, n)
        mine = require(_forbidding(fn, (w.clone(),), allow=(codebooks.nf4_code,)), "nf4_codes(weight)")
        mine = np.asarray(mine).reshape(-1)
        assert mine.shape == (n,), f"a weight of shape {tuple(w.shape)}: expected {n:,} codes, got {mine.shape}"
        wrong = np.flatnonzero(mine != expected)
        if wrong.size:
            i = wrong[0]
            block = w.reshape(-1)[i // 64 * 64:(i // 64 + 1) * 64]
            raise AssertionError(
                f"shape {tuple(w.shape)}: {wrong.size:,} of {n:,} codes differ; e.g. element {i}, value "
                f"{w.reshape(-1)[i].item():.5f}, in a block with absmax {block.abs().max().item():.5f}: "
                f"yours {mine[i]}, NF4 stores {expected[i]}")


def _bf16_worst_relative_error() -> float:
    """The largest |bf16(w) - w| / |w| over every float32 w in [1, 2) (a binade: the rest scale)."""
    import torch

    bits = torch.arange(0x3F800000, 0x40000000, dtype=torch.int32)      # (2**23,) all of [1, 2)
    w = bits.view(torch.float32)
    return float(((w.to(torch.bfloat16).float() - w).abs() / w).max())


def verify_bf16_relative_error_bound(bound) -> None:
    """08/2: ``bound`` holds for every normal float32 and is tight (within a factor 1 + 2**-7)."""
    worst = _bf16_worst_relative_error()
    bound = _number(bound, "bf16_relative_error_bound")
    assert bound >= worst, "some normal float32 values are rounded to bfloat16 with a larger relative error"
    assert bound <= worst * (1 + 2 ** -7), (
        "your bound holds but is loose: how far can rounding to nearest be from a value, in units of "
        "the spacing, and what is the spacing relative to the value?")


def _requantize_cases():
    """(what, LoRALinear, x): NF4 bases without double quantization, updates small and large, an all-zero block.

    Each base is quantized from a float32 weight with outliers and one zero row; the update
    ``B`` is scaled to a mean |ΔW| of a fraction (or a multiple) of a typical NF4 step, with a
    zero row where the weight has one; the inputs are noise or noise plus a few strong directions.
    """
    import torch

    from qlora_ref.nn import Linear4bit, LoRALinear

    g = torch.Generator().manual_seed(83)
    cases = []
    for out_f, in_f, r, size, strong in ((64, 128, 4, 0.1, False), (96, 64, 8, 3.0, True),
                                         (32, 64, 2, 0.5, False), (128, 256, 16, 1.0, True)):
        w = torch.randn(out_f, in_f, generator=g) * 0.02                    # (out, in)
        w.view(-1)[torch.randint(0, w.numel(), (5,), generator=g)] = 0.3     # outliers
        w[3] = 0                                                             # all-zero block(s)
        linear = torch.nn.Linear(in_f, out_f, bias=False)
        with torch.no_grad():
            linear.weight.copy_(w)
        layer = LoRALinear(Linear4bit.from_linear(linear, double_quant=False), r=r, lora_alpha=2 * r)
        with torch.no_grad():                                  # A from g too: no global RNG state
            layer.lora_A.normal_(generator=g)
            layer.lora_B.normal_(generator=g)
            layer.lora_B[3] = 0
            step = 0.02 * 0.13                                    # about one NF4 step at this scale
            layer.lora_B.mul_(size * step / layer.delta_weight(torch.float32).abs().mean())
        x = torch.randn(40, in_f, generator=g)                                # (n, in)
        if strong:
            x = x + 6 * torch.randn(40, 3, generator=g) @ torch.randn(3, in_f, generator=g)
        what = (f"weight ({out_f}, {in_f}), rank-{r} update of mean size {size:g} NF4 steps, "
                f"{'inputs with 3 strong directions' if strong else 'noise inputs'}")
        cases.append((what, layer, x))
    return cases


def verify_requantize_error(fn) -> None:
    """08/3: ``fn(w_hat, delta, x)`` is ``merge_errors``' relative error of ``"requantize"`` (``nf4_code`` allowed)."""
    import math as _math

    import torch

    from qlora_ref import codebooks
    from qlora_ref.nn import merge_errors

    for what, layer, x in _requantize_cases():
        expected = merge_errors(torch.nn.Sequential(layer), x, strategies=("requantize",))["requantize"].relative
        w_hat = layer.base_layer.dequantize(torch.float32)                   # (out, in) Ŵ
        delta = layer.delta_weight(torch.float32).detach()                   # (out, in) s B A
        mine = _number(_forbidding(fn, (w_hat.clone(), delta.clone(), x.clone()), allow=(codebooks.nf4_code,)),
                       "requantize_error(w_hat, delta, x)")
        assert _math.isclose(mine, expected, rel_tol=1e-4), (
            f"{what}: {mine:.6g} is not the relative output error of the \"requantize\" merge on "
            "these inputs (Ŵ + ΔW stored in NF4 as in Exercise 1, one float32 absmax per block of 64; "
            "compared with the unmerged layer's output, Ŵx + ΔWx)")


# ============================================================================ notebook 09
# The checks of notebook 09 ("QLoRA on a real model"). Each one runs the student's function
# on inputs of its own making, with the package switched off (_without_qlora_ref): the answer
# must be written with torch alone, and a call into qlora_ref fails the check. The expected
# values come from the package's own functions, run by the check outside that guard.

import math  # noqa: E402 - this section's own import (the file is appended to, section by section)


def _without_qlora_ref(fn, *args):
    """``fn(*args)`` with the whole package switched off: :func:`_forbidding` over ``qlora_ref``."""
    return _forbidding(fn, args, forbid=("qlora_ref",))


def _replay_model(logits):
    """A stand-in causal LM whose forward returns the given logits, window after window.

    ``logits`` ``(n, T, V)``: call ``i`` returns ``logits[i:i + k]`` for a batch of ``k``
    rows, so a scorer that walks the windows in order sees exactly these logits.
    """
    import types

    import torch

    class Replay(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))   # a parameter: the scorers ask its device
            self.next = 0

        def forward(self, input_ids, attention_mask=None):
            k = input_ids.shape[0]
            out = logits[self.next:self.next + k]                # (k, T, V)
            assert out.shape[:2] == input_ids.shape, "the scorer asked for other windows"
            self.next += k
            return types.SimpleNamespace(logits=out)

    return Replay()


def _random_logits(n: int, t: int, v: int, seed: int):
    """(logits (n, T, V), ids (n, T)): each row sharper than the one before, so rows score differently."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sharpness = torch.arange(1, n + 1, dtype=torch.float32).reshape(n, 1, 1) * 2.0
    logits = torch.randn(n, t, v, generator=g) * sharpness                  # (n, T, V)
    ids = torch.randint(0, v, (n, t), generator=g)                          # (n, T)
    return logits, ids


#: (windows, tokens per window, vocabulary, seed) the perplexity check scores
PERPLEXITY_CASES = ((3, 17, 50, 1), (1, 2, 7, 2), (2, 40, 300, 3))


def verify_perplexity_from_logits(fn) -> None:
    """Notebook 09, exercise 1: ``fn(logits, ids)`` is the perplexity of the windows ``ids``."""
    from qlora_ref.train.perplexity import perplexity

    for n, t, v, seed in PERPLEXITY_CASES:
        logits, ids = _random_logits(n, t, v, seed)
        expected = perplexity(_replay_model(logits), ids)["perplexity"]
        mine = require(_without_qlora_ref(fn, logits.clone(), ids.clone()),
                       "perplexity_from_logits(logits, ids)")
        mine = float(mine)
        assert math.isfinite(mine) and math.isclose(mine, expected, rel_tol=1e-5), (
            f"{n} window(s) of {t} tokens, vocabulary {v}: yours {mine:.6g}, the package's "
            f"perplexity() {expected:.6g}")


#: Llama-shaped models the LoRA count is checked on: (what, LlamaConfig arguments)
LORA_CONFIGS = (
    ("SmolLM2-135M", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)),
    ("SmolLM2-1.7B", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                          num_attention_heads=32, num_key_value_heads=32, vocab_size=49152)),
    ("Llama-3-8B", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
)


def _peft_lora_count(config, r: int) -> int:
    """Trainable parameters of PEFT's LoRA (rank ``r``, all linear layers) on ``config``, built on the meta device."""
    import peft
    import torch
    import transformers

    with torch.device("meta"):                                   # shapes only, no memory
        model = transformers.LlamaForCausalLM(config)
    model = peft.get_peft_model(model, peft.LoraConfig(r=r, target_modules="all-linear"))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def verify_lora_parameters(fn) -> None:
    """Notebook 09, exercise 2: ``fn(config, r)`` counts the LoRA parameters of every projection."""
    import transformers

    for (what, kwargs), r in zip(LORA_CONFIGS, (8, 16, 64)):
        config = transformers.LlamaConfig(**kwargs, tie_word_embeddings=True)
        expected = _peft_lora_count(config, r)
        mine = require(_without_qlora_ref(fn, config, r), "lora_parameters(config, r)")
        assert not isinstance(mine, bool) and float(mine) == int(mine), \
            f"give a whole number, got {mine!r}"
        assert int(mine) == expected, (
            f"{what} (hidden {kwargs['hidden_size']}, MLP {kwargs['intermediate_size']}, "
            f"{kwargs['num_hidden_layers']} layers, {kwargs['num_attention_heads']} query heads, "
            f"{kwargs['num_key_value_heads']} key/value heads) at r = {r}: yours {int(mine):,}, "
            f"PEFT trains {expected:,}")


#: (rows, tokens per row, vocabulary, seed) the completion-loss check scores
COMPLETION_CASES = ((4, 12, 40, 11), (2, 6, 9, 12), (1, 3, 5, 13))


def _completion_labels(ids, seed: int):
    """Labels for ``ids`` ``(B, T)``: a prompt of a different length in each row (label -100), then the completion."""
    import torch

    g = torch.Generator().manual_seed(seed)
    labels = ids.clone()
    b, t = ids.shape
    for row in range(b):
        prompt = int(torch.randint(1, t - 1, (1,), generator=g)) if t > 2 else 1
        labels[row, :prompt] = -100                                         # IGNORE_INDEX
    return labels


def verify_completion_loss_from_logits(fn) -> None:
    """Notebook 09, exercise 3: ``fn(logits, labels)`` is the fine-tuning loss of Section 9.4."""
    from qlora_ref.train.hf_finetune import completion_loss

    for b, t, v, seed in COMPLETION_CASES:
        logits, ids = _random_logits(b, t, v, seed)
        labels = _completion_labels(ids, seed)
        encoded = [(ids[i].tolist(), labels[i].tolist()) for i in range(b)]   # no padding: equal lengths
        expected = completion_loss(_replay_model(logits), encoded, pad_id=0, device="cpu", batch_size=b)
        mine = require(_without_qlora_ref(fn, logits.clone(), labels.clone()),
                       "completion_loss_from_logits(logits, labels)")
        mine = float(mine)
        assert math.isfinite(mine) and math.isclose(mine, expected, rel_tol=1e-5), (
            f"{b} row(s) of {t} tokens, vocabulary {v}: yours {mine:.6g}, the package's "
            f"completion_loss() {expected:.6g}")
