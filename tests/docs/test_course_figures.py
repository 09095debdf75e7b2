"""docs/course_figures.md cannot drift from the code that made its figures.

Rows of the page's tables whose first cell is an id in backticks are checked:
the cheap numbers (NF4 bin masses, entropy against the offset, the memory
counts) are recomputed with the functions of ``docs/scripts/course_figures.py``;
the expensive ones (QQ statistics of real weights, the bfloat16 forward pass,
the training runs) are compared with the JSON file the script wrote beside
each figure. A row's last cells must equal the expected strings.
"""
import functools
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "course_figures.md"
RESULTS = ROOT / "docs" / "results"


def _script():
    spec = importlib.util.spec_from_file_location("course_figures",
                                                  ROOT / "docs" / "scripts" / "course_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cf = _script()
# each number function is called by several rows: compute once per test session
for _name in ("nf4_bins_numbers", "nf4_offset_numbers", "figure6_numbers", "seq_len_numbers",
              "activations_7b_numbers"):
    setattr(cf, _name, functools.lru_cache(maxsize=None)(getattr(cf, _name)))


def page_rows() -> dict:
    rows = {}
    for line in PAGE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\|\s*`([a-z0-9-]+)`\s*\|", line)
        if match:
            assert match.group(1) not in rows, f"id {match.group(1)} appears twice on the page"
            rows[match.group(1)] = [c.strip() for c in line.strip().strip("|").split("|")]
    return rows


def recorded(name: str) -> dict:
    return json.loads((RESULTS / f"course_{name}.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- expected cells
def bins(kind):
    n = cf.nf4_bins_numbers()
    masses = n[f"{kind}_masses"]
    return (f"{min(masses):.4f}", f"{max(masses):.4f}", f"{n[f'{kind}_entropy_bits']:.4f} bits")


def offset(which):
    n = cf.nf4_offset_numbers()
    if which == "nf4":
        return (f"{n['nf4']['offset']}", f"{n['nf4']['relative_mse']:.6f}")
    if which == "mse":
        return (f"{n['min_mse_offset']}", f"{n['min_mse']:.6f}")
    return (f"{n['max_analytic_entropy_offset']}", f"{n['max_analytic_entropy_bits']:.4f} bits")


def fig6(model):
    return tuple(f"{v:.2f}" for v in cf.figure6_numbers()[model].values())


def seq(key):
    return tuple(f"{v:.2f}" for v in cf.seq_len_numbers()[key])


def seq_max():
    n = cf.seq_len_numbers()
    return tuple(f"{n[f'65b max tokens in 48 GB {w} checkpointing']:,}" for w in ("without", "with"))


def seq_ratio():
    n = cf.seq_len_numbers()
    return tuple(f"{n[f'ratio without / with checkpointing, {m}']:.1f}" for m in ("llama-7b", "llama-65b"))


def act_7b():
    n = cf.activations_7b_numbers()
    return (f"{n['lora_params_0.2pct_MB']:.1f} MB", f"{n['input_grads_no_ckpt_MB']:,.1f} MB",
            f"{n['input_grads_ckpt_MB']:.1f} MB", f"{n['stored_layer_inputs_MB']:.1f} MB",
            f"{n['tokens_where_count_gives_567MB']:,}", f"{n['ckpt_MB_at_those_tokens']:.1f} MB")


def qq(name):
    n = recorded(name)
    return (f"{n['values']:,}", str(n["excess_kurtosis"]), str(n["qq_r_standardized"]),
            str(n["qq_r_normalized_vs_gaussian"]), str(n["mean_distinct_per_block_of_64"]))


def bf16(dtype):
    n = recorded("bf16_compute")[dtype]
    calls = n["matmul_calls"]
    count = {d: sum(c for k, c in calls.items() if f"torch.{d}" in k) for d in ("bfloat16", "float32")}
    storage = n["frozen_storage_bytes_by_dtype"]
    return (f"{storage['torch.uint8']:,} B", f"{storage['torch.float32']:,} B",
            str(count["bfloat16"]), str(count["float32"]))


def placement(arm):
    n = recorded("placement_rank")
    v, diff = n["arms"][arm], cf.paired_differences(n)[arm]
    assert n["minus_all_linear_per_seed"][arm] == diff
    return (f"{v['mean']:.3f} ± {v['sd']:.3f}", ", ".join(f"{a:.3f}" for a in v["accuracy"]),
            "reference" if arm == cf.PLACEMENT_ARMS[0] else ", ".join(f"{x:+.3f}" for x in diff))


PLACEMENT_IDS = {"QLoRA NF4 + DQ": "placement-all-linear", "QLoRA NF4, attention only": "placement-qkvo",
                 "QLoRA NF4, query and value only": "placement-qv", "QLoRA NF4, r=2": "placement-r2",
                 "QLoRA NF4, r=32": "placement-r32"}


CHEAP = {
    "bins-analytic": lambda: bins("analytic"),
    "bins-blockwise": lambda: bins("blockwise"),
    "offset-nf4-mse": lambda: offset("nf4"),
    "offset-min-mse": lambda: offset("mse"),
    "offset-max-entropy": lambda: offset("entropy"),
    **{f"fig6-{m}": (lambda m=m: fig6(m)) for m in cf.memory.LLAMA_SHAPES},
    "seq-7b-plain": lambda: seq("llama-7b without checkpointing"),
    "seq-7b-ckpt": lambda: seq("llama-7b with checkpointing"),
    "seq-65b-plain": lambda: seq("llama-65b without checkpointing"),
    "seq-65b-ckpt": lambda: seq("llama-65b with checkpointing"),
    "seq-65b-max": seq_max,
    "seq-ratio": seq_ratio,
    "act-7b": act_7b,
}
RECORDED = {
    "qq-base": lambda: qq("qq_base"),
    "qq-smollm2": lambda: qq("qq_smollm2"),
    "bf16-float32": lambda: bf16("float32"),
    "bf16-bfloat16": lambda: bf16("bfloat16"),
    "bf16-logits": lambda: (str(recorded("bf16_compute")["max_abs_diff_bf16_vs_float32_compute"]),),
    **{PLACEMENT_IDS[a]: (lambda a=a: placement(a)) for a in cf.PLACEMENT_ARMS},
}
EXPECTED = {**CHEAP, **RECORDED}


def test_every_checked_row_of_the_page_is_known_here_and_vice_versa():
    assert sorted(page_rows()) == sorted(EXPECTED)


@pytest.mark.parametrize("row_id", sorted(EXPECTED))
def test_the_page_shows_what_the_code_computes(row_id):
    expected = EXPECTED[row_id]()
    cells = page_rows()[row_id]
    got = tuple(cells[-len(expected):])
    assert got == expected, f"docs/course_figures.md row {row_id!r}: page says {got}, code gives {expected}"


def test_numbers_in_the_prose_come_from_the_code():
    text = PAGE.read_text(encoding="utf-8")
    from scipy.stats import norm
    bins_n, off = cf.nf4_bins_numbers(), cf.nf4_offset_numbers()
    saving = 100 * (1 - off["min_mse"] / off["nf4"]["relative_mse"])
    fig6 = cf.figure6_numbers()
    act = cf.activations_7b_numbers()
    runs = recorded("placement_rank")
    qv = cf.paired_differences(runs)["QLoRA NF4, query and value only"]
    qkvo = cf.paired_differences(runs)["QLoRA NF4, attention only"]
    for phrase in (f"$\\Phi^{{-1}}(\\delta) = {norm.ppf(cf.codebooks.NF4_OFFSET):.3f}$",
                   f"hold {bins_n['blockwise_outer_mass']:.4f} of the values",
                   f"about {saving:.1f} % less squared error",
                   f"24 GB line by {24 - fig6['llama-33b']['total']:.2f} GB",
                   f"under 48 GB by {48 - fig6['llama-65b']['total']:.2f} GB",
                   f"ratio is the number of layers, {act['ratio_no_ckpt_to_ckpt']:.0f}",
                   f"{cf.seq_len_numbers()['65b max tokens in 48 GB without checkpointing']} tokens.",
                   f"by {-max(qv):.3f} to {-min(qv):.3f}",
                   f"{runs['seconds']} s in all",
                   f"({runs['arms']['QLoRA NF4, r=32']['mean']:.3f} against "
                   f"{runs['arms']['QLoRA NF4 + DQ']['mean']:.3f})",
                   f"lower on {sum(d < 0 for d in qkvo)} seeds, higher on {sum(d > 0 for d in qkvo)}, "
                   f"tied on {sum(d == 0 for d in qkvo)}"):
        assert phrase in " ".join(text.split()), f"docs/course_figures.md should say {phrase!r}"


def test_every_figure_the_page_shows_exists():
    names = re.findall(r"\]\((results/course_[a-z0-9_]+\.png)\)", PAGE.read_text(encoding="utf-8"))
    assert len(names) == len(cf.FIGURES) - 1  # bf16_compute is a table, not a figure
    for name in names:
        assert (ROOT / "docs" / name).is_file(), name
