"""Tampered inputs: every path raises ``ValueError`` or returns the NumPy reference's bytes.

Issue "Trustworthy on every host", section 2. Valid inputs are built first
(a :class:`~qlora_ref.QuantState` from :func:`qlora_ref.quantize_4bit`, with
and without double quantization; 8-bit blockwise codes from
:func:`qlora_ref.quantize_blockwise`), then broken at random: arrays made
shorter or longer, code tables of the wrong length or with NaN entries,
NaN / negative / infinite constants, shapes that do not match, odd, zero or
negative block sizes, pads outside 0..15, ``num_threads`` 0 or -1, wrong
dtypes and layouts. Each one is fed to

(a) the NumPy reference (``backend="numpy"``),
(b) the Cython kernels (``backend="cython"``), and
(c) the torch path (:func:`qlora_ref.nn.dequantize_4bit_torch`,
    :func:`qlora_ref.nn.dequantize_blockwise_torch`),

and the property is: *a call raises ValueError, or it returns exactly (bit
for bit) what the NumPy reference returns for the same input*; never
garbage, never another exception, never a crash. The raw kernels
(``qlora_ref.backend.kernels().<name>``), which bypass every Python-side
check, are called too: a wrong length must raise ValueError there, before
any loop (the checks at the top of each ``def`` in ``_kernels/quant4.pyx``).

``.ci/run`` runs this module a second time against the debug build of the
extension (``QLORA_REF_DEBUG_CYTHON=1``: bounds and wraparound checks on), where
an out-of-range access the length checks missed would raise IndexError.

The pure-torch path once let wrong lengths, shapes, blocksizes, dtypes and code
values through (``TORCH_CASES`` below, one deterministic example each); it now
runs the same checks (``qlora_ref.nn.functional.check_quant_tensors``).
"""
import copy

import numpy as np
import pytest
from hypothesis import given, strategies as st

import qlora_ref
from qlora_ref import blockwise, packing
from qlora_ref.codebooks import code_for, dynamic_code

torch = pytest.importorskip("torch")
from qlora_ref.nn.functional import (  # noqa: E402  (after the torch check)
    dequantize_4bit_torch, dequantize_blockwise_torch, quant_state_tensors)
from tests.helpers import bf16_bits, quantize_4bit_reference  # noqa: E402

# NaN and infinite constants are the point here: NumPy's warnings about them are expected
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

needs_cython = pytest.mark.skipif(not qlora_ref.cython_available(),
                                  reason="the Cython extension is not built in this environment")

#: Tampers the pure-torch path used to let through, each with a deterministic example below.
TORCH_CASES = [("torch-4bit", kind) for kind in ("length", "code_length", "shape", "blocksize",
                                                 "nested_blocksize", "dtype", "code_values",
                                                 "nested_code_values")] + \
              [("torch-8bit", kind) for kind in ("code_values", "dtype", "length", "code_length",
                                                 "blocksize")]

BAD_SCALES = [np.nan, -np.nan, np.inf, -np.inf, -1.0, -0.0, 0.0, 3.4e38, 1e-45]


# -- the property ------------------------------------------------------------------

def _run(call):
    """``("ok", float32 or uint16 array)`` or ``(ValueError, message)``; anything else raises."""
    try:
        out = call()
    except ValueError as exc:
        return ValueError, str(exc)
    if isinstance(out, torch.Tensor):
        out = out.numpy()
    return "ok", np.asarray(out)


def _assert_valueerror_or_equal(result, reference, what):
    """The property: ``result`` raised ValueError, or equals ``reference`` bit for bit."""
    kind, value = result
    if kind is ValueError:
        return
    ref_kind, ref_value = reference
    assert ref_kind == "ok", (f"{what} returned a result where the NumPy reference raised "
                              f"ValueError: {ref_value}")
    assert value.shape == ref_value.shape and value.dtype == ref_value.dtype, (
        f"{what}: {value.dtype}{value.shape}, reference {ref_value.dtype}{ref_value.shape}")
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[value.dtype.itemsize]
    np.testing.assert_array_equal(value.view(bits), ref_value.view(bits),
                                  err_msg=f"{what} differs from the NumPy reference bit for bit")


# -- 4-bit states ------------------------------------------------------------------

@st.composite
def _states(draw):
    """A valid QuantState: 1 to 20000 values (several nested blocks), 1-D or 2-D."""
    n = draw(st.one_of(st.integers(1, 700), st.integers(8000, 20000)))
    rows = draw(st.sampled_from([d for d in (1, 2, 3, 5, 8) if n % d == 0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * np.float32(10.0) ** rng.integers(-20, 20)).astype(np.float32)
    x[rng.random(n) < 0.05] = 0.0
    state = qlora_ref.quantize_4bit(
        x.reshape(rows, n // rows), quant_type=draw(st.sampled_from(["nf4", "fp4", "int4"])),
        blocksize=draw(st.sampled_from([32, 64, 128, 256, 4096])),
        double_quant=draw(st.booleans()), backend="numpy")
    return state


def _resized(array, length, rng):
    """``array`` cut or extended (with random values of its dtype) to ``length``."""
    if length <= array.size:
        return array[:length].copy()
    extra = rng.integers(0, 256, length - array.size) if array.dtype == np.uint8 \
        else rng.standard_normal(length - array.size)
    return np.concatenate([array, extra.astype(array.dtype)])


def _poisoned(array, draw, rng, values=BAD_SCALES):
    """``array`` with one to three entries replaced by NaN, infinity, a negative number..."""
    out = array.copy()
    for _ in range(draw(st.integers(1, 3))):
        out[rng.integers(0, out.size)] = draw(st.sampled_from(values))
    return out


STATE_TAMPERS = ["length", "code_length", "absmax_values", "code_values", "offset",
                 "nested_code_values", "shape", "reshape", "blocksize", "nested_blocksize",
                 "dtype"]


def _tamper_state(state, kind, draw):
    """A shallow copy of ``state`` broken in one way (``copy.copy`` skips ``__post_init__``)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    t = copy.copy(state)
    dq = state.double_quant
    if kind == "length":                  # packed, absmax or nested_absmax: longer or shorter
        name = draw(st.sampled_from(["packed", "absmax"] + (["nested_absmax"] if dq else [])))
        array = getattr(state, name)
        delta = draw(st.sampled_from([-3, -2, -1, 1, 2, 3, 1000]))
        setattr(t, name, _resized(array, max(0, array.size + delta), rng))
    elif kind == "code_length":           # 15, 17, 255, 257 entries
        name = draw(st.sampled_from(["code"] + (["nested_code"] if dq else [])))
        length = draw(st.sampled_from([0, 1, 15, 17, 255, 257]))
        setattr(t, name, _resized(getattr(state, name), length, rng))
    elif kind == "absmax_values":         # NaN, negative, infinite first- or second-level constants
        name = "nested_absmax" if dq else "absmax"
        setattr(t, name, _poisoned(getattr(state, name), draw, rng))
    elif kind == "code_values":
        t.code = _poisoned(state.code, draw, rng)
    elif kind == "offset":
        t.offset = np.float32(draw(st.sampled_from(BAD_SCALES))) if dq else None
    elif kind == "nested_code_values":    # the right length, other numbers (NaN included)
        if dq:
            t.nested_code = _poisoned(state.nested_code, draw, rng, BAD_SCALES + [0.5, -0.25])
    elif kind == "shape":                 # a shape whose size is not the state's
        n = state.n_elements
        t.shape = draw(st.sampled_from([(n + 1,), (n - 1,), (n + 2,), (0,), (n, 0), (-n,),
                                        (2 * n,), (1, n + 7)]))
    elif kind == "reshape":               # the same size: valid
        n = state.n_elements
        t.shape = draw(st.sampled_from([(n,), (1, n), (n, 1), (1, 1, n)]))
    elif kind == "blocksize":             # odd, zero, negative; absmax resized to match, or not
        blocksize = draw(st.sampled_from([0, -64, 1, 33, 48, 2, 16, 8192,
                                          2 * state.blocksize, max(32, state.blocksize // 2)]))
        t.blocksize = blocksize
        if blocksize > 0 and draw(st.booleans()):
            n_blocks = -(-state.n_elements // blocksize)
            t.absmax = _resized(state.absmax, n_blocks, rng)
            if dq:
                t.nested_absmax = _resized(state.nested_absmax,
                                           -(-n_blocks // state.nested_blocksize), rng)
    elif kind == "nested_blocksize":
        if dq:
            t.nested_blocksize = draw(st.sampled_from([0, -1, -256, 1, 3, 128, 512]))
            if t.nested_blocksize > 0 and draw(st.booleans()):
                t.nested_absmax = _resized(state.nested_absmax,
                                           -(-state.n_blocks // t.nested_blocksize), rng)
    elif kind == "dtype":
        name = draw(st.sampled_from(["packed", "absmax", "code"]))
        dtype = draw(st.sampled_from([np.float64, np.float16, np.int8, np.uint16, np.int64]))
        setattr(t, name, getattr(state, name).astype(dtype))
    return t


def _numpy_reference(state):
    return _run(lambda: qlora_ref.dequantize_4bit(state, dtype="float32", backend="numpy"))


@needs_cython
@given(state=_states(), kind=st.sampled_from(STATE_TAMPERS), num_threads=st.sampled_from([1, 2]),
       as_dict=st.booleans(), data=st.data())
def test_tampered_state_numpy_and_cython_paths(state, kind, num_threads, as_dict, data):
    """(a) The reference raises ValueError or returns; (b) Cython agrees with it or raises."""
    t = _tamper_state(state, kind, data.draw)
    reference = _numpy_reference(t)                       # (a): no exception but ValueError
    given_state = quant_state_tensors(t) if as_dict else t
    calls = {
        "dequantize_4bit(backend='cython')":
            lambda: qlora_ref.dequantize_4bit(t, dtype="float32", backend="cython",
                                              num_threads=num_threads),
        "dequantize_4bit_torch(backend='cython')":
            lambda: dequantize_4bit_torch(given_state, backend="cython"),
        "dequantize_4bit_torch(backend='numpy')":
            lambda: dequantize_4bit_torch(given_state, backend="numpy"),
    }
    for what, call in calls.items():
        _assert_valueerror_or_equal(_run(call), reference, f"{what} after tamper {kind!r}")


@given(state=_states(), kind=st.sampled_from(list(STATE_TAMPERS)),
       as_dict=st.booleans(), data=st.data())
def test_tampered_state_torch_path(state, kind, as_dict, data):
    """(c) The pure-torch path agrees with the reference or raises ValueError."""
    t = _tamper_state(state, kind, data.draw)
    reference = _numpy_reference(t)
    given_state = quant_state_tensors(t) if as_dict else t
    _assert_valueerror_or_equal(_run(lambda: dequantize_4bit_torch(given_state, backend="torch")),
                                reference, f"dequantize_4bit_torch(backend='torch') after {kind!r}")


# -- 8-bit blockwise inputs ----------------------------------------------------------

BLOCKWISE_TAMPERS = ["length", "code_length", "absmax_values", "code_values", "blocksize",
                     "dtype"]


@st.composite
def _blockwise_inputs(draw):
    """Valid 8-bit inputs: codes and absmax from ``quantize_blockwise`` with the dynamic code."""
    n = draw(st.integers(1, 3000))
    blocksize = draw(st.sampled_from([1, 7, 32, 64, 256, 4096]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = (rng.standard_normal(n) * np.float32(10.0) ** rng.integers(-20, 20)).astype(np.float32)
    codes, absmax = blockwise.quantize_blockwise(x, dynamic_code(), blocksize)
    return codes, absmax, dynamic_code(), blocksize


def _tamper_blockwise(inputs, kind, draw):
    codes, absmax, code, blocksize = inputs
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "length":
        delta = draw(st.sampled_from([-3, -2, -1, 1, 2, 3, 1000]))
        absmax = _resized(absmax, max(0, absmax.size + delta), rng)
    elif kind == "code_length":
        code = _resized(code, draw(st.sampled_from([0, 15, 16, 17, 255, 257])), rng)
    elif kind == "absmax_values":
        absmax = _poisoned(absmax, draw, rng)
    elif kind == "code_values":
        code = _poisoned(code, draw, rng)
    elif kind == "blocksize":             # zero, negative, or another size (absmax resized or not)
        blocksize = draw(st.sampled_from([0, -1, -64, 3, 33, 2 * blocksize]))
        if blocksize > 0 and draw(st.booleans()):
            absmax = _resized(absmax, -(-codes.size // blocksize), rng)
    elif kind == "dtype":
        absmax = absmax.astype(draw(st.sampled_from([np.float64, np.float16])))
    if draw(st.booleans()):               # any shape of codes is valid: the output takes it
        codes = codes.reshape(1, -1)
    return codes, absmax, code, blocksize


@needs_cython
@given(inputs=_blockwise_inputs(), kind=st.sampled_from(BLOCKWISE_TAMPERS), data=st.data())
def test_tampered_blockwise_inputs(inputs, kind, data):
    """The 8-bit path: the reference, its Cython kernel and the torch path agree or raise."""
    codes, absmax, code, blocksize = _tamper_blockwise(inputs, kind, data.draw)
    as_torch = [torch.from_numpy(np.ascontiguousarray(a)) for a in (codes, absmax, code)]
    reference = _run(lambda: blockwise.dequantize_blockwise(codes, absmax, code, blocksize))
    _assert_valueerror_or_equal(
        _run(lambda: qlora_ref.dequantize_blockwise(codes, absmax, code, blocksize)),
        reference, f"qlora_ref.dequantize_blockwise after {kind!r}")
    _assert_valueerror_or_equal(
        _run(lambda: dequantize_blockwise_torch(*as_torch, blocksize, backend="numpy")),
        reference, f"dequantize_blockwise_torch(backend='numpy') after {kind!r}")
    _assert_valueerror_or_equal(
        _run(lambda: dequantize_blockwise_torch(*as_torch, blocksize, backend="cython")),
        reference, f"dequantize_blockwise_torch(backend='cython') after {kind!r}")
    _assert_valueerror_or_equal(
        _run(lambda: dequantize_blockwise_torch(*as_torch, blocksize, backend="torch")),
        reference, f"dequantize_blockwise_torch(backend='torch') after {kind!r}")


# -- the raw kernels -------------------------------------------------------------------
#
# Each case: the kernel's arguments in order, which are outputs, which array sets n
# (changing its length may leave a consistent call), and the NumPy expression the
# kernel equals (its docstring), computed from the same arguments.

def _assert_bf16_bits_of(bits, ref32, what):
    """``bits`` is ``ref32`` rounded to bfloat16 (the kernels' rule); where ``ref32`` is NaN, a NaN.

    Note (bfloat16 NaN): the kernels keep the NaN's sign and top bits and set the
    quiet bit (as ``qlora_ref.dtypes.bfloat16_bits`` and VCVTNEPS2BF16 do); torch
    2.13's CPU conversion writes 0xFFFF; every one is a quiet NaN, so that is what
    is checked.
    """
    nan = np.isnan(ref32)
    np.testing.assert_array_equal(bits[~nan], bf16_bits(ref32)[~nan], err_msg=what)
    assert ((bits[nan] & 0x7F80) == 0x7F80).all() and ((bits[nan] & 0x7F) != 0).all(), (
        f"{what}: {bits[nan][:4]} are not NaN bit patterns")


def _kernel_dequantize_blockwise(codes, absmax, code, blocksize):
    """What a raw kernel computes: the twin's argument checks, then ``code[q] * c_b``
    whatever the constants hold. The public functions refuse a NaN or infinite
    constant before any kernel runs (an O(n / blocksize) check, not the kernel's)."""
    finite = np.where(np.isfinite(absmax), absmax, np.float32(1)).astype(absmax.dtype)
    blockwise.dequantize_blockwise(codes, finite, code, blocksize)        # raises as the twin
    values = np.asarray(code, np.float32)[np.asarray(codes).reshape(-1)]
    with np.errstate(invalid="ignore", over="ignore"):
        return blockwise.scale_by_block(values, absmax, blocksize).reshape(np.shape(codes))


def _dequantize_4bit_reference(a):
    absmax = a["absmax"] if "absmax" in a else (
        _kernel_dequantize_blockwise(a["absmax_codes"], a["nested_absmax"], a["nested_code"],
                                     a["nested_blocksize"]) + np.float32(a["offset"]))
    return [_kernel_dequantize_blockwise(packing.unpack_nibbles(a["packed"], a["out"].size),
                                         absmax, a["code"], a["blocksize"])]


def _quantize_4bit_reference(a, code):
    return list(quantize_4bit_reference(a["x"], code, a["blocksize"], a["pad_code"]))


def _kernel_case(name, n, seed, choose):
    """A valid call of ``kernels().<name>``: (arguments in order, output names, the
    array whose length is n, reference(arguments) -> outputs). ``choose(options)``
    picks one option (hypothesis draws it; the fixed cases take the first).
    """
    rng = np.random.default_rng(seed)
    threads = choose([1, 2])
    x = (rng.standard_normal(n) * np.float32(10.0) ** rng.integers(-20, 20)).astype(np.float32)
    code4 = code_for(choose(["nf4", "fp4", "int4"]))
    even_bs = choose([32, 2, 6, 64, 256])          # packed kernels: even
    any_bs = choose([32, 1, 3, 64, 256])
    n_blocks = -(-n // even_bs)
    packed = rng.integers(0, 256, (n + 1) // 2).astype(np.uint8)

    if name == "quantize_blockwise":
        code = choose([code4, dynamic_code()])
        midpoints, order = blockwise.decision_boundaries(code)
        a = dict(x=x, midpoints=midpoints, order=order.astype(np.uint8),
                 log2_levels=int(np.log2(code.size)), blocksize=any_bs,
                 codes=np.full(n, 0xAA, np.uint8),
                 absmax=np.full(-(-n // any_bs), np.nan, np.float32), num_threads=threads)
        return a, ["codes", "absmax"], "x", lambda a: list(
            blockwise.quantize_blockwise(a["x"], code, a["blocksize"]))
    if name == "quantize_4bit_packed":
        midpoints, order = blockwise.decision_boundaries(code4)
        a = dict(x=x, midpoints=midpoints, order=order.astype(np.uint8), blocksize=even_bs,
                 pad_code=choose([7] + list(range(16))),
                 packed=np.full((n + 1) // 2, 0xAA, np.uint8),
                 absmax=np.full(n_blocks, np.nan, np.float32), num_threads=threads)
        return a, ["packed", "absmax"], "x", lambda a: _quantize_4bit_reference(a, code4)
    if name == "dequantize_blockwise":
        a = dict(codes=rng.integers(0, 256, n).astype(np.uint8),
                 absmax=rng.standard_normal(-(-n // any_bs)).astype(np.float32),
                 code=dynamic_code(), blocksize=any_bs, out=np.full(n, np.nan, np.float32),
                 num_threads=threads)
        return a, ["out"], "codes", lambda a: [_kernel_dequantize_blockwise(
            a["codes"], a["absmax"], a["code"], a["blocksize"])]
    bf16 = name.endswith("_bf16")
    out = np.full(n, 0xFFFF, np.uint16) if bf16 else np.full(n, np.nan, np.float32)
    if name.startswith("dequantize_4bit_packed_nested"):
        nested_bs = choose([256, 1, 3])
        a = dict(packed=packed, absmax_codes=rng.integers(0, 256, n_blocks).astype(np.uint8),
                 nested_absmax=rng.random(-(-n_blocks // nested_bs)).astype(np.float32),
                 nested_code=dynamic_code(), offset=float(np.float32(rng.random())),
                 nested_blocksize=nested_bs, code=code4, blocksize=even_bs, out=out,
                 num_threads=threads)
        return a, ["out"], "out", _dequantize_4bit_reference
    if name.startswith("dequantize_4bit_packed"):
        a = dict(packed=packed, absmax=rng.random(n_blocks).astype(np.float32), code=code4,
                 blocksize=even_bs, out=out, num_threads=threads)
        return a, ["out"], "out", _dequantize_4bit_reference
    if name == "pack_nibbles":
        a = dict(codes=rng.integers(0, 16, n).astype(np.uint8), pad=choose([7] + list(range(16))),
                 packed=np.full((n + 1) // 2, 0xAA, np.uint8), num_threads=threads)
        return a, ["packed"], "codes", lambda a: [packing.pack_nibbles(a["codes"], a["pad"])]
    assert name == "unpack_nibbles"
    a = dict(packed=packed, codes=np.full(n, 0xAA, np.uint8), num_threads=threads)
    return a, ["codes"], "codes", lambda a: [packing.unpack_nibbles(a["packed"], a["codes"].size)]


KERNELS = ["quantize_blockwise", "quantize_4bit_packed", "dequantize_blockwise",
           "dequantize_4bit_packed", "dequantize_4bit_packed_bf16",
           "dequantize_4bit_packed_nested", "dequantize_4bit_packed_nested_bf16",
           "pack_nibbles", "unpack_nibbles"]

_BAD_PADS = [-1, 16, 0x23, 255, 256, 2**70, 7.0, None, True, "7"]
#: Scalars no kernel may accept (each raises ValueError before any loop).
BAD_SCALARS = {"num_threads": [0, -1, -64], "blocksize": [0, -1, -64],
               "nested_blocksize": [0, -1, -256], "log2_levels": [0, -1, 9, 3],
               "pad_code": _BAD_PADS, "pad": _BAD_PADS}
#: Values that may or may not make a valid call (the result must then equal NumPy's).
MAYBE_SCALARS = {"blocksize": [1, 2, 3, 4, 5, 6, 7, 8, 33, 100, 1 << 20],
                 "nested_blocksize": [1, 2, 3, 100, 255, 257], "offset": BAD_SCALES}


def _call_kernel(name, a):
    from qlora_ref.backend import kernels
    return getattr(kernels(), name)(*a.values())


@needs_cython
@pytest.mark.parametrize("name", KERNELS)
@given(n=st.integers(0, 700), seed=st.integers(0, 2**32 - 1), data=st.data(),
       tamper=st.sampled_from(["length", "scalar", "table", "dtype", "layout", "readonly",
                               "maybe", "none"]))
def test_raw_kernel_rejects_tampered_arguments(name, n, seed, data, tamper):
    """Wrong lengths, scalars, dtypes, layouts: ValueError; whatever it accepts equals NumPy."""
    def choose(options):
        return data.draw(st.sampled_from(options))
    a, outputs, sets_n, reference = _kernel_case(name, n, seed, choose)
    arrays = [k for k, v in a.items() if isinstance(v, np.ndarray)]
    # midpoints and order are derived from a code (no twin takes them): only broken by
    # "table"; x must be finite (the public functions reject NaN and infinity first,
    # qlora_ref.validation; an O(n) check is not the kernel's), so it is not poisoned
    inputs = [k for k in arrays if k not in outputs and k not in ("midpoints", "order", "x")]
    rng = np.random.default_rng(seed)
    if tamper == "table" and "midpoints" not in a:
        tamper = "none"
    if tamper == "maybe" and not any(k in MAYBE_SCALARS or a[k].dtype == np.float32 and a[k].size
                                     for k in [*a.keys() & MAYBE_SCALARS.keys(), *inputs]):
        tamper = "none"
    must_raise = tamper in ("scalar", "table", "dtype", "layout", "readonly")
    if tamper == "length":                # one array a few values shorter or longer
        k = choose(arrays)
        before = a[k].size
        a[k] = _resized(a[k], max(0, before + choose([-3, -2, -1, 1, 2, 3, 1000])), rng)
        # every length is fixed by n; only n's own array may change and stay consistent
        must_raise = k != sets_n and a[k].size != before
    elif tamper == "scalar":              # num_threads 0, blocksize -1, pad 16, ...
        k = choose([k for k in a if k in BAD_SCALARS])
        a[k] = choose(BAD_SCALARS[k])
    elif tamper == "table":               # a NaN midpoint, two swapped, an order index too big
        too_big = [v for v in (a["order"].size, 16, 255) if a["order"].size <= v <= 255]
        k = choose(["nan", "swap"] + (["order"] if too_big else []))
        if k == "nan":
            a["midpoints"] = a["midpoints"].copy()
            a["midpoints"][choose(range(a["midpoints"].size))] = np.nan
        elif k == "swap":
            i = choose(range(a["midpoints"].size - 1))
            a["midpoints"] = a["midpoints"].copy()
            a["midpoints"][[i, i + 1]] = a["midpoints"][[i + 1, i]]
            must_raise = a["midpoints"][i] != a["midpoints"][i + 1]
        else:
            a["order"] = a["order"].copy()
            a["order"][choose(range(a["order"].size))] = choose(too_big)
    elif tamper == "dtype":               # the same length, another dtype
        k = choose(arrays)
        a[k] = a[k].astype(np.float64 if a[k].dtype == np.float32 else np.int8)
    elif tamper == "layout":              # 2-D, or every other element of a longer array
        k = choose(arrays)
        a[k] = a[k].reshape(1, -1) if a[k].size < 2 or choose([True, False]) \
            else np.repeat(a[k], 2)[::2]
    elif tamper == "readonly":            # an output the kernel may not write
        a[choose(outputs)].setflags(write=False)
    elif tamper == "maybe":               # NaN, infinite, negative entries; another block size
        k = choose([k for k in a if k in MAYBE_SCALARS] + [k for k in inputs if a[k].size
                                                           and a[k].dtype == np.float32])
        a[k] = choose(MAYBE_SCALARS[k]) if k in MAYBE_SCALARS else _poisoned(a[k], data.draw, rng)

    result = _run(lambda: _call_kernel(name, a))
    if must_raise:
        assert result[0] is ValueError, f"kernels().{name} accepted a {tamper!r} tamper"
    if result[0] is ValueError:
        return
    try:
        expected = reference(a)
    except ValueError as exc:
        pytest.fail(f"kernels().{name} accepted arguments the NumPy twin rejects ({exc})")
    for k, ref in zip(outputs, expected):
        what = f"kernels().{name}: output {k!r} after {tamper!r}"
        if name.endswith("_bf16"):
            _assert_bf16_bits_of(a[k], ref, what)
        else:
            _assert_valueerror_or_equal(("ok", a[k]), ("ok", np.asarray(ref)), what)


@needs_cython
@pytest.mark.parametrize("name", KERNELS)
def test_raw_kernel_error_names_the_argument(name):
    """Each array one value too long: the message names it, the expected and the given length."""
    valid, _, sets_n, _ = _kernel_case(name, 101, 0, lambda options: options[0])
    for victim in [k for k, v in valid.items() if isinstance(v, np.ndarray) and k != sets_n]:
        a = dict(valid)
        a[victim] = np.concatenate([a[victim], a[victim][:1]])
        with pytest.raises(ValueError) as info:
            _call_kernel(name, a)
        message = str(info.value)
        assert message.startswith(f"{victim} has length {a[victim].size}; expected "), message
        assert str(valid[victim].size) in message, message


# -- the reports that started this -----------------------------------------------------

@needs_cython
def test_reported_short_absmax_and_16_entry_table_raise():
    """Was: uninitialised floats (7.0e-45) from a short absmax; NaN from a 16-entry table."""
    codes = torch.arange(100, dtype=torch.uint8)
    with pytest.raises(ValueError, match="absmax has length 1; expected .* = 4"):
        dequantize_blockwise_torch(codes, torch.ones(1), torch.from_numpy(dynamic_code()), 32,
                                   backend="cython")
    with pytest.raises(ValueError, match="code has length 16; expected 256"):
        dequantize_blockwise_torch(codes, torch.ones(4), torch.from_numpy(code_for("nf4")), 32,
                                   backend="cython")


@needs_cython
def test_reported_one_absmax_too_many_raises():
    """Was: ``(end - start) % 2`` < 0 under cdivision, and the last output became 1000.0."""
    from qlora_ref.backend import kernels
    out = np.empty(5, np.float32)
    with pytest.raises(ValueError, match="absmax has length 2; expected"):
        kernels().dequantize_4bit_packed(np.full(3, 0xFF, np.uint8),
                                         np.array([1.0, 1000.0], np.float32),
                                         np.ones(16, np.float32), 32, out, 1)


@needs_cython
@pytest.mark.parametrize("pad", [0x23, 16, -1, 255])
def test_reported_pad_above_15_raises_in_both_twins(pad):
    """Was: 0xf3 from the NumPy twin against 0x73 from the kernel for pad 0x23."""
    from qlora_ref.backend import kernels
    code = code_for("nf4")
    midpoints, order = blockwise.decision_boundaries(code)
    with pytest.raises(ValueError, match="pad must be"):
        packing.pack_nibbles(np.array([15, 15, 7], np.uint8), pad=pad)
    with pytest.raises(ValueError, match="pad must be"):
        kernels().quantize_4bit_packed(np.ones(3, np.float32), midpoints, order.astype(np.uint8),
                                       64, pad, np.empty(2, np.uint8), np.empty(1, np.float32), 1)


def test_reported_codes_of_16_or_more_raise():
    """Was: ``pack_nibbles([16, 1])`` returned ``[1]``."""
    for codes in ([16, 1], np.array([1, 255], np.uint8), np.array([256, 1]), [-1, 2]):
        with pytest.raises(ValueError, match="codes must be 4-bit codes"):
            packing.pack_nibbles(codes)


def test_unpack_needs_exactly_ceil_n_over_2_bytes():
    """Was: a short ``packed`` gave fewer than ``n`` codes, silently."""
    with pytest.raises(ValueError, match="packed has length 1; expected ceil"):
        packing.unpack_nibbles(np.array([0x12], np.uint8), 5)
    with pytest.raises(ValueError, match="packed has length 3; expected ceil"):
        packing.unpack_nibbles(np.zeros(3, np.uint8), 4)
    assert packing.unpack_nibbles(np.array([0x12, 0x30], np.uint8), 3).tolist() == [1, 2, 3]


# -- the pure-torch path's former gaps, one example each --------------------------------

def _gap_example(path, kind):
    """One deterministic tampered input of ``kind`` for the pure-torch ``path``."""
    x = np.random.default_rng(0).standard_normal((3, 100)).astype(np.float32)
    state = qlora_ref.quantize_4bit(x, blocksize=64, double_quant=True, backend="numpy")
    t = copy.copy(state)
    if path.endswith("4bit"):
        if kind == "length":
            t.packed = np.append(state.packed, np.uint8(0))
        elif kind == "shape":
            t.shape = (state.n_elements - 3,)
        elif kind == "blocksize":
            t.blocksize, t.absmax = 100, state.absmax[:3]
        elif kind == "nested_blocksize":
            t.nested_blocksize = 0
        elif kind == "dtype":
            t.code = state.code.astype(np.float64)
        elif kind == "code_length":
            t.code = state.code[:15]
        elif kind == "code_values":
            t.code = state.code.copy()
            t.code[3] = np.nan
        elif kind == "nested_code_values":
            t.nested_code = state.nested_code.copy()
            t.nested_code[:] = np.nan
        return _run(lambda: dequantize_4bit_torch(t, backend="torch")), _numpy_reference(t)
    codes, absmax = blockwise.quantize_blockwise(x.reshape(-1), dynamic_code(), 64)
    code, blocksize = dynamic_code(), 64
    if kind == "length":
        absmax = np.append(absmax, np.float32(1.0))
    elif kind == "code_length":
        code = code[:16]
    elif kind == "code_values":
        code = code.copy()
        code[-1] = np.nan
    elif kind == "blocksize":
        blocksize = 0
    elif kind == "dtype":
        absmax = absmax.astype(np.float64)
    args = [torch.from_numpy(a) for a in (codes, absmax, code)]
    reference = _run(lambda: blockwise.dequantize_blockwise(codes, absmax, code, blocksize))
    return _run(lambda: dequantize_blockwise_torch(*args, blocksize, backend="torch")), reference


@pytest.mark.parametrize("path, kind", TORCH_CASES)
def test_the_torch_path_rejects_what_the_reference_rejects(path, kind):
    """Each former gap, once, deterministically: ValueError, as the reference gives."""
    result, reference = _gap_example(path, kind)
    assert reference[0] is ValueError, f"the example for {kind!r} is not a bad input"
    _assert_valueerror_or_equal(result, reference, f"{path} with tamper {kind!r}")
