"""Hostile and malformed input: every one is a clear error, never a hang, a traceback or a NaN.

The issue "Runs survive faults and hostile files" lists the inputs; each has
a test here. The API raises ``ValueError`` naming the field; the command
line prints one line on stderr and exits with status 2. Bounds are stated
where they are checked: a crafted regex is refused in well under a second,
and a lying ``.npz`` / ``.npy`` header is refused before any array is
allocated (tracemalloc sees NumPy's allocations).
"""
import io
import json
import re
import time
import tracemalloc
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, strategies as st

import qlora_ref
from qlora_ref import QuantState
from qlora_ref.cli import main
from tests.helpers import cli

FLOAT32_MAX = float(np.finfo(np.float32).max)


def assert_one_line_error(code, err, *needles):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("qlora-ref: error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def peak_allocation(fn):
    """Run ``fn`` (which must raise ``ValueError``); return (error, peak bytes traced)."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as info:
            fn()
        return info.value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ============================================================================ adapters

@pytest.fixture
def adapter_dir(tmp_path):
    """A saved adapter over layers with long module paths (where backtracking explodes)."""
    import torch

    torch.manual_seed(0)
    blocks = torch.nn.ModuleDict({
        "transformer_block_0_attention_query": torch.nn.Linear(8, 8),
        "transformer_block_0_attention_value": torch.nn.Linear(8, 8)})
    model = qlora_ref.prepare_model(torch.nn.ModuleDict({"layers": blocks}), r=2, lora_alpha=4,
                                    quant_type=None)
    qlora_ref.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def fresh_model():
    import torch

    return torch.nn.ModuleDict({"layers": torch.nn.ModuleDict({
        "transformer_block_0_attention_query": torch.nn.Linear(8, 8),
        "transformer_block_0_attention_value": torch.nn.Linear(8, 8)})})


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_crafted_alpha_pattern_is_refused_within_a_second(adapter_dir):
    # PEFT's re.match(r"(.*\.)?((.*.*)*Z)$", name) takes minutes on these 45-character paths
    edit_config(adapter_dir, alpha_pattern={"(.*.*)*Z": 2})
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"alpha_pattern.*nests a repetition"):
        qlora_ref.load_adapter(fresh_model(), adapter_dir)
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("key, message", [
    ("[", "not a valid regular expression"),
    ("a)|(.*", "not a valid regular expression"),   # would escape PEFT's group
    (r"(a)\1", "back-reference"),
    ("(query|value)+", "repeats an alternation"),
    (".*.*.*Z", "3 repetitions"),
    ("(?i)query", "not valid inside PEFT's pattern"),
    ("x" * 300 + "*", "at most 256"),
])
def test_invalid_pattern_keys_are_value_errors(adapter_dir, key, message):
    edit_config(adapter_dir, rank_pattern={key: 4})
    with pytest.raises(ValueError, match=re.escape(message)):
        qlora_ref.load_adapter(fresh_model(), adapter_dir)


def test_a_regex_alpha_pattern_still_applies_as_in_peft(adapter_dir):
    edit_config(adapter_dir, alpha_pattern={r".*_value": 8, "attention_query": 2})
    model = qlora_ref.load_adapter(fresh_model(), adapter_dir)
    assert model.layers.transformer_block_0_attention_value.lora_alpha == 8
    assert model.layers.transformer_block_0_attention_query.lora_alpha == 4  # not a suffix after "."
    edit_config(adapter_dir, alpha_pattern={"layers.transformer_block_0_attention_query": 2})
    model = qlora_ref.load_adapter(fresh_model(), adapter_dir)
    assert model.layers.transformer_block_0_attention_query.lora_alpha == 2


@given(key=st.text("ab._-", max_size=5), name=st.text("ab._-", max_size=9))
def test_plain_keys_match_exactly_as_peft_does(key, name):
    from qlora_ref.nn.targets import pattern_matcher

    peft_answer = re.match(rf"(.*\.)?({key})$", name) is not None  # peft.utils.other.get_pattern_key
    assert pattern_matcher(key)(name) == peft_answer


def test_accepted_regex_keys_cost_milliseconds_on_long_paths():
    from qlora_ref.nn.targets import pattern_matcher

    name = "a.b." * 50                                            # a 200-character module path
    for key in (".*.*Z", "[a.]*[a.]*Z", r".*\..*Z"):
        match = pattern_matcher(key)
        started = time.perf_counter()
        assert not match(name)
        assert time.perf_counter() - started < 0.1, key


@pytest.mark.parametrize("config, field", [
    ({"peft_type": 3}, "peft_type"),
    ({"r": 4.7}, "r"),
    ({"r": True}, "r"),
    ({"lora_alpha": "8"}, "lora_alpha"),
    ({"lora_alpha": float("nan")}, "lora_alpha"),
    ({"lora_dropout": "0.1"}, "lora_dropout"),
    ({"rank_pattern": ["a"]}, "rank_pattern"),
    ({"rank_pattern": {"attention_query": 2.5}}, "rank_pattern['attention_query']"),
    ({"alpha_pattern": {"attention_query": "2"}}, "alpha_pattern['attention_query']"),
])
def test_wrong_types_in_adapter_config_name_the_field(adapter_dir, config, field):
    edit_config(adapter_dir, **config)
    with pytest.raises(ValueError, match=re.escape(f"adapter_config.json: {field} must be")):
        qlora_ref.load_adapter(fresh_model(), adapter_dir)


def test_another_peft_type_is_refused(adapter_dir):
    edit_config(adapter_dir, peft_type="LOHA")
    with pytest.raises(ValueError, match="peft_type 'LOHA' is not LORA"):
        qlora_ref.load_adapter(fresh_model(), adapter_dir)


@pytest.mark.parametrize("text", ["[1, 2]", '"LORA"', "{not json"])
def test_adapter_config_that_is_not_an_object_is_a_value_error(adapter_dir, text):
    (adapter_dir / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match="adapter_config.json"):
        qlora_ref.load_adapter(fresh_model(), adapter_dir)


def test_corrupt_adapter_weights_are_a_value_error(adapter_dir):
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        qlora_ref.load_adapter(fresh_model(), adapter_dir)


# ============================================================================ QuantState files

def small_state(double_quant=True):
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    return qlora_ref.quantize_4bit(x, blocksize=64, double_quant=double_quant)


def npy_bytes(array=None, header_shape=None, dtype=np.uint8, body=b""):
    """A ``.npy`` member; ``header_shape`` makes its header claim another shape than ``body``."""
    buf = io.BytesIO()
    if array is not None:
        np.save(buf, array, allow_pickle=False)
        return buf.getvalue()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": header_shape})
    return buf.getvalue() + body


def write_npz(path, state, replace=None, compression=zipfile.ZIP_STORED):
    """``state.save`` by hand, with some members replaced by raw ``.npy`` bytes."""
    members = {k: npy_bytes(np.asarray(v, dtype=np.int64) if k == "shape" else np.asarray(v))
               for k, v in state.to_dict().items() if v is not None}
    members.update(replace or {})
    with zipfile.ZipFile(path, "w", compression=compression) as z:
        for key, data in members.items():
            if data is not None:
                z.writestr(key + ".npy", data)
    return path


def test_a_member_claiming_3_gib_is_refused_before_any_allocation(tmp_path):
    # 3 MB of zeros, deflated to a few KB, under a header claiming 3 GiB: np.load would
    # allocate 3 GiB before finding out
    lying = npy_bytes(header_shape=(3 << 30,), body=bytes(3 << 20))
    path = write_npz(tmp_path / "bomb.npz", small_state(), {"packed": lying}, zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 100_000
    error, peak = peak_allocation(lambda: QuantState.load(path))
    # refused by its uncompressed size (3 MB in a 100 KB file) before its header is read
    assert "'packed.npy' claims 3145856 bytes" in str(error)
    assert peak < 1 << 20, f"peak allocation {peak} bytes, bound 1 MiB"


def test_a_header_claiming_3_gib_over_a_small_body_is_refused_before_any_allocation(tmp_path):
    lying = npy_bytes(header_shape=(3 << 30,), body=bytes(1024))
    path = write_npz(tmp_path / "liar.npz", small_state(), {"packed": lying}, zipfile.ZIP_DEFLATED)
    error, peak = peak_allocation(lambda: QuantState.load(path))
    assert "'packed.npy' claims shape (3221225472,)" in str(error)
    assert peak < 1 << 20, f"peak allocation {peak} bytes, bound 1 MiB"


def test_a_consistent_member_that_disagrees_with_the_metadata_is_not_read(tmp_path):
    # header and zip entry agree on 4 MiB, but shape (8, 64) needs 256 packed bytes
    big = npy_bytes(header_shape=(4 << 20,), body=bytes(4 << 20))
    # stored, not deflated: a deflated 4 MiB in a 7 kB file is refused earlier, by its size
    path = write_npz(tmp_path / "big.npz", small_state(), {"packed": big}, zipfile.ZIP_STORED)
    error, peak = peak_allocation(lambda: QuantState.load(path))
    assert "member 'packed' claims shape (4194304,)" in str(error) and "needs (256,)" in str(error)
    assert peak < 1 << 20, f"peak allocation {peak} bytes, bound 1 MiB"


@pytest.mark.parametrize("member, data, message", [
    ("shape", npy_bytes(header_shape=(1 << 30,), dtype=np.int64, body=bytes(64)), "claims shape"),
    ("shape", npy_bytes(np.array([8.5, 64.0])), "member 'shape'"),
    ("blocksize", npy_bytes(np.array([64, 64])), "member 'blocksize'"),
    ("blocksize", npy_bytes(np.array(65)), "blocksize 65"),
    ("nested_blocksize", npy_bytes(np.array(0)), "nested_blocksize is 0"),
    ("offset", npy_bytes(np.array(np.nan, np.float32)), "QuantState.offset must be finite"),
    ("absmax", npy_bytes(np.zeros(8, np.float32)), "member 'absmax' claims"),
    ("code", None, "member 'code' is missing"),
    ("quant_type", npy_bytes(np.array("nf5")), "quant_type"),
])
def test_bad_members_are_named(tmp_path, member, data, message):
    path = write_npz(tmp_path / "s.npz", small_state(), {member: data})
    with pytest.raises(ValueError, match=re.escape(message)):
        QuantState.load(path)


def test_pickles_and_strangers_are_refused(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    path = write_npz(tmp_path / "p.npz", small_state(), {"code": buf.getvalue()})
    with pytest.raises(ValueError, match="plain numbers"):
        QuantState.load(path)
    path = write_npz(tmp_path / "x.npz", small_state(), {"extra": npy_bytes(np.zeros(2))})
    with pytest.raises(ValueError, match="unexpected member 'extra.npy'"):
        QuantState.load(path)
    (tmp_path / "not.npz").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="not a QuantState .npz file"):
        QuantState.load(tmp_path / "not.npz")


def test_a_zero_dimensional_state_still_round_trips(tmp_path):
    state = qlora_ref.quantize_4bit(np.float32(1.5))
    state.save(tmp_path / "s.npz")
    assert QuantState.load(tmp_path / "s.npz").equals(state)


# ============================================================================ QuantState values

def with_field(state, **changes):
    fields = state.to_dict()
    fields.update(changes)
    return fields


@pytest.mark.parametrize("double_quant, field, value, message", [
    (False, "absmax", "nan", "QuantState.absmax holds 1 NaN"),
    (False, "absmax", "inf", "QuantState.absmax holds 1 NaN or infinite"),
    (False, "absmax", "neg", "QuantState.absmax holds negative values"),
    (True, "nested_absmax", "nan", "QuantState.nested_absmax holds 1 NaN"),
    (True, "nested_absmax", "neg", "QuantState.nested_absmax holds negative"),
    (True, "offset", np.float32(np.nan), "QuantState.offset must be finite"),
    (True, "offset", "abc", "QuantState.offset must be one real number"),
    (False, "code", "big", "QuantState.code holds values outside [-1.0, 1.0]"),
    (False, "code", "nan", "QuantState.code holds 1 NaN"),
    (True, "nested_code", "nan", "QuantState.nested_code holds 1 NaN"),
    (True, "nested_code", "short", "QuantState.nested_code has 255 values"),
    (True, "nested_blocksize", 0, "nested_blocksize must be a positive integer"),
    (True, "nested_blocksize", 2.5, "nested_blocksize must be an integer"),
    (True, "nested_blocksize", True, "nested_blocksize must be an integer"),
    (False, "blocksize", 64.0, "blocksize must be an integer"),
    (False, "shape", (-8, -64), "shape must hold non-negative integers"),
    (False, "dtype", "int8", "QuantState.dtype must be one of"),
])
def test_bad_values_in_a_state_name_the_field(double_quant, field, value, message):
    state = small_state(double_quant)
    if isinstance(value, str) and value in ("nan", "inf", "neg", "big", "short"):
        array = getattr(state, field).copy()
        if value == "short":
            array = array[:-1]
        else:
            array[0] = {"nan": np.nan, "inf": np.inf, "neg": -1.0, "big": 1.5}[value]
        value = array
    with pytest.raises(ValueError, match=re.escape(message)):
        QuantState.from_dict(with_field(state, **{field: value}))


def test_dequantize_refuses_a_nan_written_into_a_state_after_construction():
    state = small_state(double_quant=False)
    state.absmax[3] = np.nan
    with pytest.raises(ValueError, match="QuantState.absmax holds 1 NaN"):
        qlora_ref.dequantize_4bit(state)


# ============================================================================ float32 max

def near_float32_max():
    """63 blocks at float32 max beside one small block: mean and c1 both near 3.4e38."""
    x = np.full(64 * 64, FLOAT32_MAX, np.float32)
    x[-64:] = 1.0
    return x


@pytest.mark.parametrize("backend", ["numpy", "cython"])
def test_double_quant_overflow_near_float32_max_is_a_value_error(backend):
    if backend == "cython" and not qlora_ref.cython_available():
        pytest.skip("the Cython extension is not built")
    with pytest.raises(ValueError, match=r"overflows.*float32 value 3\.4028235e38.*double_quant=False"):
        qlora_ref.quantize_4bit(near_float32_max(), double_quant=True, backend=backend)
    # without double quantization the constants are exact: finite, and the maxima come back exactly
    state = qlora_ref.quantize_4bit(near_float32_max(), double_quant=False, backend=backend)
    out = qlora_ref.dequantize_4bit(state, backend=backend)
    assert np.isfinite(out).all() and out.max() == FLOAT32_MAX


def test_double_quant_overflow_of_float16_is_a_value_error():
    x = np.full(64 * 64, 65504.0, np.float16)
    x[:64 * 20] = np.float16(2000.0)
    with pytest.raises(ValueError, match="largest float16 value 65504"):
        qlora_ref.quantize_4bit(x, double_quant=True)


@given(big_blocks=st.integers(1, 63), scale=st.floats(0.0, 1.0))
def test_finite_input_never_dequantizes_to_inf(big_blocks, scale):
    x = np.full(64 * 64, FLOAT32_MAX, np.float32)
    x[64 * big_blocks:] = np.float32(scale * FLOAT32_MAX)
    try:
        state = qlora_ref.quantize_4bit(x, double_quant=True)
    except ValueError as exc:
        assert "overflows" in str(exc)
        return
    assert np.isfinite(qlora_ref.dequantize_4bit(state)).all()


# ============================================================================ bitsandbytes interop

def bnb_like(state, **changes):
    """An object with bitsandbytes.functional.QuantState's attributes (bitsandbytes not needed)."""
    import torch

    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731
    fields = dict(quant_type=state.quant_type, shape=torch.Size(state.shape), dtype=torch.float32,
                  blocksize=state.blocksize, code=t(state.code), absmax=t(state.absmax),
                  nested=state.double_quant, offset=torch.tensor(np.float32(state.offset)),
                  state2=SimpleNamespace(absmax=t(state.nested_absmax), code=t(state.nested_code),
                                         blocksize=state.nested_blocksize))
    fields.update(changes)
    return SimpleNamespace(**fields)


def test_from_bitsandbytes_accepts_the_lookalike():
    import torch

    state = small_state()
    back = qlora_ref.from_bitsandbytes(torch.from_numpy(state.packed), bnb_like(state))
    assert back.equals(state)


@pytest.mark.parametrize("make, message", [
    (lambda s: None, "quant_state must be a bitsandbytes.functional.QuantState, got NoneType"),
    (lambda s: {"quant_type": "nf4"}, "got dict"),
    (lambda s: bnb_like(s, absmax=None), "quant_state.absmax is missing"),
    (lambda s: bnb_like(s, state2=None), "quant_state.state2 is missing"),
    (lambda s: bnb_like(s, offset=None), "quant_state.offset is missing"),
    (lambda s: bnb_like(s, offset="x"), "quant_state.offset must be a number"),
    (lambda s: bnb_like(s, blocksize="64"), "quant_state.blocksize must be an integer"),
    (lambda s: bnb_like(s, shape=None), "quant_state.shape is missing"),
    (lambda s: bnb_like(s, shape=5), "quant_state.shape must be a sequence"),
    (lambda s: bnb_like(s, code=[0.0] * 16), "code table must be a float32 tensor or array"),
    (lambda s: bnb_like(s, state2=SimpleNamespace(absmax=None, code=None, blocksize=256)),
     "quant_state.state2.absmax is missing"),
])
def test_from_bitsandbytes_names_the_bad_field(make, message):
    import torch

    state = small_state()
    with pytest.raises(ValueError, match=re.escape(message)):
        qlora_ref.from_bitsandbytes(torch.from_numpy(state.packed), make(state))


def test_linear4bit_state_dict_with_bad_metadata_is_a_value_error():
    import torch

    from qlora_ref.interop.bitsandbytes import from_linear4bit_state_dict, to_linear4bit_state_dict

    sd = to_linear4bit_state_dict(small_state())
    key = "weight.quant_state.bitsandbytes__nf4"
    for payload, message in ((b"\xff", "does not hold JSON"), (b"[1]", "must hold a JSON object"),
                             (b'{"quant_type": "nf4"}', "lacks"),
                             (json.dumps({"quant_type": "nf4", "blocksize": "64", "dtype": "float32",
                                          "shape": [8, 64]}).encode(), "blocksize must be an integer")):
        bad = dict(sd, **{key: torch.tensor(list(payload), dtype=torch.uint8)})
        with pytest.raises(ValueError, match=message):
            from_linear4bit_state_dict(bad)
    with pytest.raises(ValueError, match="state_dict must be a dict"):
        from_linear4bit_state_dict(None)


# ============================================================================ command line

def write_config(tmp_path, content, name="bad.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


@pytest.mark.parametrize("content, needles", [
    ({"c": {"learning_rate": "abc"}}, ["bad.json:c: learning_rate must be a number", "'abc'"]),
    ({"c": {"num_train_epochs": "3"}}, ["bad.json:c: num_train_epochs must be a number"]),
    ({"c": {"r": 4.7}}, ["bad.json:c: r must be an integer"]),
    ({"c": {"r": True}}, ["bad.json:c: r must be an integer"]),
    ({"c": {"seed": -1}}, ["bad.json:c: seed must be an integer in [0, 2**63)"]),
    ({"c": {"bnb_4bit_use_double_quant": "yes"}}, ["bnb_4bit_use_double_quant must be true or false"]),
    ({"c": {"target_modules": [1, 2]}}, ["target_modules must be a string or a list of strings"]),
    ({"c": {"target_modules": "(.*.*)*Z"}}, ["target_modules", "nests a repetition"]),
    ({"c": {"optim": "sgd"}}, ["optim must be one of"]),
    ({"c": {"learning_rte": 0.1}}, ["bad.json:c: unknown field 'learning_rte'"]),
    ([{"c": {}}], ["bad.json must hold a JSON object of named configurations", "got a list"]),
    ({"c": [1, 2]}, ["bad.json:c: must be a JSON object of fields, got a list"]),
    ("{not json", ["bad.json is not valid JSON"]),
])
def test_finetune_config_errors_are_one_line_naming_file_and_key(capsys, tmp_path, content, needles):
    path = write_config(tmp_path, content)
    code, _, err = cli(capsys, "finetune", "--config", path, "c", "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, *needles)


def test_the_shipped_named_configs_pass_the_schema():
    from pathlib import Path

    from qlora_ref.train.finetune import load_config

    path = Path(qlora_ref.__file__).parent / "configs" / "finetune_configs.json"
    for name in json.loads(path.read_text()):
        load_config(path, name)


def parsed_finetune_config(*argv):
    """The FinetuneConfig ``qlora-ref finetune ARGV`` would run (main's --seed default applied)."""
    from qlora_ref.cli import apply_defaults, build_parser
    from qlora_ref.cli.finetune import _finetune_config

    return _finetune_config(apply_defaults(build_parser().parse_args(["finetune", *argv])))


def test_a_configs_seed_is_not_replaced_by_the_cli_default(tmp_path):
    path = write_config(tmp_path, {"c": {"seed": 5}})
    assert parsed_finetune_config("--config", path, "c").seed == 5
    assert parsed_finetune_config("--config", path, "c", "--seed", "7").seed == 7
    assert parsed_finetune_config("--config", path, "c", "--seed", "0").seed == 0  # explicit
    assert parsed_finetune_config().seed == 0


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_finetune_epochs_must_be_finite(capsys, tmp_path, value):
    code, _, err = cli(capsys, "finetune", f"--epochs={value}", "--output-dir", str(tmp_path / "o"))
    assert_one_line_error(code, err, "num_train_epochs must be a finite number")


@pytest.mark.parametrize("text", ["inf", "1e400", "nan", "1e300t"])
def test_memory_refuses_infinite_counts(capsys, text):
    code, _, err = cli(capsys, "memory", text)       # argparse's usage line, then the error
    assert code == 2 and "a parameter count must be a finite number" in err and "Traceback" not in err


def test_quantize_refuses_a_float8_safetensors_file(capsys, tmp_path):
    import torch
    from safetensors.torch import save_file

    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    save_file({"w": torch.ones(64, 64).to(torch.float8_e4m3fn)}, str(tmp_path / "w.safetensors"))
    code, _, err = cli(capsys, "quantize", str(tmp_path / "w.safetensors"))
    assert_one_line_error(code, err, "'w' is float8_e4m3fn", "float16, bfloat16, float32 or float64")


def test_quantize_refuses_a_npy_header_claiming_64_gib(capsys, tmp_path):
    path = tmp_path / "w.npy"
    path.write_bytes(npy_bytes(header_shape=(1 << 34,), dtype=np.float32, body=bytes(1024)))
    tracemalloc.start()
    try:
        code, _, err = cli(capsys, "quantize", str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert_one_line_error(code, err, "claims shape (17179869184,)", "holds 1,024 bytes")
    assert peak < 16 << 20, f"peak allocation {peak} bytes, bound 16 MiB"


def test_pretrain_refuses_a_directory_as_output(capsys, tmp_path):
    code, _, err = cli(capsys, "pretrain", "--output", str(tmp_path), "--steps", "1")
    assert_one_line_error(code, err, "is a directory")


def test_prepare_model_refuses_a_regex_that_would_backtrack_for_minutes():
    import torch
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="target_modules"):
        qlora_ref.prepare_model(model, target_modules="(.*.*)*Z")
    assert time.perf_counter() - start < 1.0


def test_a_batch_larger_than_the_training_set_is_refused_before_any_allocation(capsys):
    # 5000 is under the batch-size bound (65,536) but over the 3000-example training set
    code = main(["finetune", "--batch-size", "5000", "--max-steps", "1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "per_device_train_batch_size 5000 is larger than the training set" in err[0]
    # far over the bound: refused by the bound itself, before the comparison
    code = main(["finetune", "--batch-size", "100000000", "--max-steps", "1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "per_device_train_batch_size" in err[0] \
        and "65,536" in err[0], err
