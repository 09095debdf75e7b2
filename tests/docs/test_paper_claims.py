"""docs/paper.md cannot drift from the code: every row marked with an id is recomputed here.

Rows of the page's tables whose first cell is an id in backticks (`` `dq-saving` ``)
are machine-checked: :data:`CLAIMS` maps each id to the cells the code
produces and the column they sit in. Each id on the page must be here and
each id here must be on the page. The paper's own numbers (the "paper"
column) are quotations and are not recomputed, except the NF4 table of the
paper's Appendix E, which is compared with bitsandbytes' table.
"""
import re
from pathlib import Path

import numpy as np
import pytest

import qlora_ref
from qlora_ref import codebooks, memory
from qlora_ref.blockwise import dequantize_blockwise, quantize_blockwise

PAGE = Path(__file__).resolve().parents[2] / "docs" / "paper.md"
HERE = 3  # claim tables: | id | claim | paper | here | how |
LLAMA = memory.LLAMA_SHAPES
N_LORA_65B = memory.lora_param_count(**memory.LLAMA_65B, r=64)


def gb(n_bytes):
    return memory.format_bytes(n_bytes, "GB")


def mb(n_bytes):
    return f"{n_bytes / 1e6:,.1f} MB"


# ----------------------------------------------------------------------------- equations
def int8_absmax_agreement():
    """Eq. (1)/(2) with blockwise quantization and the linear code k/127, k = -127..127."""
    x = np.random.default_rng(0).standard_normal(1 << 16).astype(np.float32)
    code = np.arange(-127, 128, dtype=np.float32) / np.float32(127)  # (255,)
    codes, absmax = quantize_blockwise(x, code, 64)
    blocks = x.reshape(-1, 64)                                        # (1024, 64)
    expected = np.round(np.float32(127) / absmax[:, None] * blocks)   # eq. (1), X^Int8
    got = code[codes].reshape(-1, 64) * np.float32(127)
    equal = int(np.sum(np.round(got) == expected))
    deq = dequantize_blockwise(codes, absmax, code, 64).reshape(-1, 64)
    reference = expected / (np.float32(127) / absmax[:, None])        # eq. (2)
    rel = float(np.max(np.abs(deq - reference) / absmax[:, None]))
    return equal, x.size, rel


def lora_forward_difference(quantized: bool):
    import torch
    from qlora_ref.nn import Linear4bit, LoRALinear
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64, bias=False).double()
    base = Linear4bit.from_linear(linear) if quantized else linear
    layer = LoRALinear(base, r=8, lora_alpha=16).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 128, dtype=torch.float64)
    w = base.dequantize(torch.float64) if quantized else linear.weight  # (64, 128)
    s = 16 / 8
    with torch.no_grad():
        expected = x @ w.T + s * (x @ layer.lora_A.T) @ layer.lora_B.T   # eq. (3) / (5)
        return float((layer(x) - expected).abs().max())


def bitsandbytes_dequantize_agreement():
    import bitsandbytes.functional as F
    x = np.random.default_rng(1).standard_normal(1 << 16).astype(np.float32)
    state = qlora_ref.quantize_4bit(x)                                # NF4, 64, double quant
    packed, qs = qlora_ref.to_bitsandbytes(state)
    theirs = F.dequantize_4bit(packed, qs).numpy().ravel()
    return int(np.sum(theirs == qlora_ref.dequantize_4bit(state))), x.size


def eq1():
    equal, n, _ = int8_absmax_agreement()
    return f"round(127 x / absmax) on {equal:,} of {n:,} values"


def eq2():
    return f"max error {int8_absmax_agreement()[2]:.1e} x absmax (float32 rounding)"


def blocks():
    state = qlora_ref.quantize_4bit(np.ones((1024, 1024), np.float32), double_quant=False)
    return f"{state.absmax.size:,} constants for 1024 x 1024 weights"


def eq3():
    d = lora_forward_difference(quantized=False)
    assert d < 1e-12
    return "max difference < 1e-12 (float64)"


def eq5():
    d = lora_forward_difference(quantized=True)
    assert d < 1e-12
    return "max difference < 1e-12 (float64)"


def eq6():
    equal, n = bitsandbytes_dequantize_agreement()
    return f"equal to bitsandbytes on {equal:,} of {n:,} values"


def eq4():
    from scipy.stats import norm
    k = 4
    i = np.arange(2**k)
    q = 0.5 * (norm.ppf(i / (2**k + 1)) + norm.ppf((i + 1) / (2**k + 1)))  # eq. (4) as printed
    return f"q_0 = {q[0]}: not usable as printed"


# ----------------------------------------------------------------------------- numbers
def mse(quant_type):
    x = np.random.default_rng(0).standard_normal(1 << 18).astype(np.float32)
    q = qlora_ref.quantize_4bit(x, quant_type, 64, double_quant=False)
    return f"MSE {float(np.mean((qlora_ref.dequantize_4bit(q) - x) ** 2)):.5f}"


def paged_adamw():
    import torch
    from qlora_ref.optim import PagedAdamW
    torch.manual_seed(0)
    params = [torch.randn(300, requires_grad=True), torch.randn(7, 5, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    ours, theirs = PagedAdamW(params, lr=1e-2), torch.optim.AdamW(twins, lr=1e-2)
    for step in range(5):
        for group in (params, twins):
            for p in group:
                p.grad = torch.full_like(p, 0.1 * (step + 1)) + p.detach()
        ours.step()
        theirs.step()
    equal = sum(int(torch.equal(a, b)) for a, b in zip(params, twins))
    return f"bit-identical to torch AdamW after 5 steps ({equal} of {len(params)} tensors)"


def fig6_row(name):
    shape = LLAMA[name]
    lora = shape.lora_params(64)
    table = memory.finetune_memory(shape.n_params, "qlora", lora_params=lora)
    linear = memory.activation_memory(shape, 512, 1, gradient_checkpointing=True,
                                      linear_inputs_only=True)
    full = memory.activation_memory(shape, 512, 1, gradient_checkpointing=True)
    total = table.total_bytes + full.total_bytes
    return (f"{shape.n_params / 1e9:.2f}B", mb(table["weights"]), mb(table["adapters (LoRA weights)"]),
            mb(table["gradients"] + table["optimizer state"]),
            mb(linear["saved by the decoder layers"]), mb(full.total_bytes), gb(total))


def seven_b():
    return LLAMA["llama-7b"]


def nf4_masses_and_entropy():
    """Mass of N(0, 1) each NF4 level owns under round-to-nearest, and the entropy of the codes."""
    from scipy.stats import norm
    cuts = blockwise_boundaries() * norm.ppf(codebooks.NF4_OFFSET)   # (15,) midpoints, in sd
    mass = np.diff(norm.cdf(np.concatenate([[-np.inf], cuts, [np.inf]])))  # (16,)
    return mass, float(-(mass * np.log2(mass)).sum())


def blockwise_boundaries():
    from qlora_ref.blockwise import decision_boundaries
    return decision_boundaries(codebooks.nf4_code())[0]


def nf4_entropy():
    mass, entropy = nf4_masses_and_entropy()
    return f"{entropy:.3f} bits; bin masses {mass.min():.3f} to {mass.max():.3f}"


def with_16bit_embeddings_and_head(name, double_quant=True):
    """QLoRA bytes of a LLaMA shape, 512 tokens, checkpointing, embeddings and head in 16 bit."""
    shape = LLAMA[name]
    emb = 2 * shape.vocab_size * shape.hidden_size                   # input embedding + output head
    weights = memory.quantized_nbytes(shape.n_params - emb, double_quant=double_quant) + 2 * emb
    table = memory.finetune_memory(shape.n_params, lora_params=shape.lora_params(64), shape=shape,
                                   seq_len=512, gradient_checkpointing=True,
                                   double_quant=double_quant)
    return weights, table.total_bytes - table["weights"] + weights


CLAIMS = {
    # equations
    "eq1": (HERE, eq1),
    "eq2": (HERE, eq2),
    "blocks": (HERE, blocks),
    "eq3": (HERE, eq3),
    "eq4": (HERE, eq4),
    "eq5": (HERE, eq5),
    "eq6": (HERE, eq6),
    # NF4
    "nf4-delta": (HERE, lambda: f"{1 - (1 / 30 + 1 / 32) / 2:.8f} = 1 - (1/30 + 1/32)/2"),
    "nf4-sd": (HERE, lambda: f"{__import__('scipy.stats').stats.norm.ppf(codebooks.NF4_OFFSET):.3f}"),
    # double quantization and budgets
    "dq-before": (HERE, lambda: f"{memory.bits_per_param(double_quant=False) - 4}"),
    "dq-after": (HERE, lambda: f"{memory.bits_per_param() - 4}"),
    "dq-saving": (HERE, lambda: f"{memory.bits_per_param(double_quant=False) - memory.bits_per_param()}"),
    "dq-65b": (HERE, lambda: gb(65e9 * (memory.bits_per_param(double_quant=False)
                                        - memory.bits_per_param()) / 8)),
    "full-65b": (HERE, lambda: gb(memory.finetune_memory(65e9, "full").total_bytes)),
    "full-65b-shapes": (HERE, lambda: gb(memory.finetune_memory(LLAMA["llama-65b"].n_params,
                                                                "full").total_bytes)),
    "qlora-65b": (HERE, lambda: gb(memory.finetune_memory(65e9, lora_params=N_LORA_65B).total_bytes)),
    "qlora-65b-acts": (HERE, lambda: gb(memory.finetune_memory(
        LLAMA["llama-65b"].n_params, lora_params=LLAMA["llama-65b"].lora_params(64),
        shape=LLAMA["llama-65b"], seq_len=512, gradient_checkpointing=True).total_bytes)),
    "lora-65b": (HERE, lambda: f"{100 * N_LORA_65B / 65e9:.2f} %"),
    "7b-lora": (HERE, lambda: mb(2 * memory.generic_lora_param_count(seven_b().n_params))),
    "7b-base": (HERE, lambda: mb(memory.quantized_nbytes(seven_b().n_params))),
    "7b-grads": (HERE, lambda: mb(memory.activation_memory(
        seven_b(), 512, linear_inputs_only=True)["saved by the decoder layers"])),
    "7b-grads-ckpt": (HERE, lambda: mb(memory.activation_memory(
        seven_b(), 512, gradient_checkpointing=True, linear_inputs_only=True)["saved by the decoder layers"])),
    "nf4-entropy": (HERE, nf4_entropy),
    "qlora-65b-nodq-16bit-head": (HERE, lambda: gb(with_16bit_embeddings_and_head(
        "llama-65b", double_quant=False)[1])),
    "7b-base-16bit-head": (HERE, lambda: mb(with_16bit_embeddings_and_head("llama-7b")[0])),
    "mse-int4": (HERE, lambda: mse("int4")),
    "mse-fp4": (HERE, lambda: mse("fp4")),
    "mse-nf4": (HERE, lambda: mse("nf4")),
    "paged": (HERE, paged_adamw),
}
for _i in range(16):
    CLAIMS[f"nf4-{_i}"] = (HERE, lambda i=_i: repr(float(codebooks.nf4_code()[i])))
for _name in ("llama-7b", "llama-13b", "llama-33b", "llama-65b"):
    CLAIMS[f"fig6-{_name}"] = (slice(1, 8), lambda name=_name: fig6_row(name))


def page_rows() -> dict:
    rows = {}
    for line in PAGE.read_text(encoding="utf-8").splitlines():
        match = re.match(r"^\|\s*`([a-z0-9-]+)`\s*\|", line)
        if match:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert match.group(1) not in rows, f"id {match.group(1)} appears twice on the page"
            rows[match.group(1)] = cells
    return rows


def test_every_checked_row_of_the_page_is_known_here_and_vice_versa():
    assert sorted(page_rows()) == sorted(CLAIMS)


@pytest.mark.parametrize("claim_id", sorted(CLAIMS))
def test_the_page_shows_what_the_code_computes(claim_id):
    column, compute = CLAIMS[claim_id]
    cells = page_rows()[claim_id]
    expected = compute()
    got = cells[column] if isinstance(column, int) else tuple(cells[column])
    if isinstance(column, int):
        got = got.strip("`")
    assert got == expected, f"docs/paper.md row {claim_id!r}: page says {got!r}, code gives {expected!r}"


def test_the_papers_nf4_table_is_bitsandbytes_table():
    import bitsandbytes.functional as F
    rows = page_rows()
    paper = np.array([float(rows[f"nf4-{i}"][2]) for i in range(16)], dtype=np.float32)
    theirs = F.get_4bit_type("nf4", device="cpu").numpy()
    np.testing.assert_array_equal(paper, theirs)


# ----------------------------------------------------------------------------- where the paper says it
#: The paper's structure as verified (docs/paper_structure.json says how each entry was checked).
STRUCTURE_FILE = PAGE.parent / "paper_structure.json"
ROOT = PAGE.parents[1]
#: Files whose citations of "Section / Table / Figure / Appendix / equation" mean the QLoRA paper.
CITING_FILES = ["docs/paper.md", "docs/concepts.md", "docs/course_figures.md", "docs/experiments.md",
                "docs/huggingface.md", "docs/notation.md", "qlora_ref/codebooks.py", "qlora_ref/train/compare.py",
                "qlora_ref/train/datatypes.py", "qlora_ref/optim/paged_adamw.py"]
ITEM = re.compile(r"\b(Tables?|Figures?|Appendix|Sections?|sec\.|[Ee]q(?:uation|\.)?)\s*"
                  r"\(?(\d+(?:\.\d+)?|[A-H]\b)\)?((?:\s*(?:,|and|-|–)\s*\(?(?:\d+|[A-H]\b)\)?)*)")
KINDS = (("table", "tables"), ("figure", "figures"), ("appendix", "appendices"),
         ("sec", "sections"), ("eq", "equations"))
#: Words before a term that say the cited item does *not* have it ("no Int4", "not Int4").
NEGATION = re.compile(r"\b(no|not|without|lacks?)\s+(\w+\s+){0,2}$", re.I)


def structure() -> dict:
    import json
    return json.loads(STRUCTURE_FILE.read_text(encoding="utf-8"))


def notebook_markdown() -> list[tuple[str, str]]:
    """(name, text) of each notebook's markdown: only citations that say "paper" count there."""
    import json
    out = []
    paths = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for path in paths + sorted((ROOT / "notebooks").glob("appendix_*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        text = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        out.append((f"notebooks/{path.name}", text))
    return out


def clauses(text: str):
    """Sentences (and table cells) of a text: a citation and what it is about share one."""
    for cell in re.split(r"\|", text):
        yield from re.split(r"(?<=[.;:])\s+(?=[A-Z*(])|\n\s*\n", cell)


def citations(clause: str):
    """(kind, key) for each paper item a clause cites: ("tables", "3"), ("appendices", "G")..."""
    for m in ITEM.finditer(clause):
        kind = next(plural for word, plural in KINDS if m.group(1).lower().startswith(word))
        keys = [m.group(2)] + re.findall(r"\d+|[A-H]\b", m.group(3) or "")
        if "-" in (m.group(3) or "") or "–" in (m.group(3) or ""):      # "Sections 2-3"
            lo, hi = m.group(2), keys[-1]
            if lo.isdigit() and hi.isdigit():
                keys = [str(k) for k in range(int(lo), int(hi) + 1)]
        for key in keys:
            yield kind, key.split(".")[0] if kind == "sections" else key


def cited_texts() -> list[tuple[str, str]]:
    texts = [(name, (ROOT / name).read_text(encoding="utf-8")) for name in CITING_FILES]
    for name, text in notebook_markdown():
        # notebooks number their own sections: keep only clauses that name the paper
        texts.append((name, "\n\n".join(c for c in clauses(text) if re.search(r"\bpaper", c))))
    return texts


def test_the_structure_file_is_consistent():
    s = structure()
    for kind in ("tables", "figures"):
        for key, item in s[kind].items():
            where = item["section"]
            assert where in s["sections"] or where in s["appendices"], (
                f"{kind[:-1]} {key} is said to be in {where!r}, which the file does not list")
            assert item["source"], f"{kind[:-1]} {key}: say how it was verified"
    # the one location read in the paper's own text in this repository's history
    assert s["tables"]["2"]["section"] == "4" and s["sections"]["4"]["title"] == "QLoRA vs. Standard Finetuning"


def test_every_entry_says_which_described_source_it_was_checked_against():
    """A 'source' names one of the sources the file describes ("extract", "issue 23", ...)."""
    s = structure()
    names = set(s["sources"])
    entries = [(f"{kind} {key}", item) for kind in ("sections", "tables", "figures", "appendices",
                                                     "equations") for key, item in s[kind].items()]
    vague = [where for where, item in entries
             if not any(name in item.get("source", "") for name in names)]
    assert not vague, f"entries whose source names none of {sorted(names)}: {vague}"
    # entries read in the paper's text say where (a page), so a reader can find the passage
    unpaged = [where for where, item in entries
               if item["source"].startswith("extract") and "page" not in item["source"]]
    assert not unpaged, f"read in the extract but no page given: {unpaged}"


def test_every_cited_section_table_figure_and_appendix_exists():
    s, missing = structure(), []
    for name, text in cited_texts():
        for clause in clauses(text):
            for kind, key in citations(clause):
                if key not in s[kind]:
                    missing.append(f"{name}: {kind[:-1] if kind != 'appendices' else 'appendix'} "
                                   f"{key!r} in {clause.strip()[:120]!r}")
    assert not missing, "cited, but not in docs/paper_structure.json:\n" + "\n".join(missing)


def test_a_section_cited_with_a_table_or_figure_is_the_one_that_holds_it():
    """"(Section 3, Figure 3)" is wrong when Figure 3 is in Section 4."""
    s, wrong = structure(), []
    for name, text in cited_texts():
        for clause in clauses(text):
            for group in re.findall(r"\(([^()]*)\)", clause):
                cited = list(citations(group))
                sections = {k for kind, k in cited if kind in ("sections", "appendices")}
                items = [(kind, k) for kind, k in cited if kind in ("tables", "figures")]
                for kind, k in items:
                    home = s[kind].get(k, {}).get("section")
                    if sections and home and home not in sections:
                        wrong.append(f"{name}: ({group}) cites {kind[:-1]} {k}, which is in "
                                     f"{home}, with {sorted(sections)}")
    assert not wrong, "\n".join(wrong)


def test_nothing_is_credited_to_a_table_or_figure_that_lacks_it():
    """"matches full fine-tuning (Table 4)" credits Table 4 with full fine-tuning, which it lacks.

    What a citation credits: the words in its parentheses and up to 100 characters before them.
    """
    s, wrong = structure(), []
    for name, text in cited_texts():
        wrong += [f"{name}: {w}" for w in wrong_credits(text, s)]
    assert not wrong, "\n".join(wrong)


def wrong_credits(text: str, s: dict) -> list[str]:
    """Each term a citation in ``text`` credits to a table or figure whose 'lacks' lists it."""
    wrong = []
    for clause in clauses(text):
        for m in re.finditer(r"\(([^()]*)\)", clause):
            items = [(kind, k) for kind, k in citations(m.group(1)) if kind in ("tables", "figures")]
            lacking = [set(s[kind].get(k, {}).get("lacks", [])) for kind, k in items]
            window = clause[max(0, m.start() - 100):m.end()]
            for term in set.intersection(*lacking) if lacking else ():
                for t in re.finditer(re.escape(term), window, re.I):
                    if not NEGATION.search(window[:t.start()]):
                        wrong.append(f"{term!r} credited to {items} in {window!r}")
    return wrong


def test_the_checker_catches_the_errors_issue_23_found():
    """The three tests above reject the citations issue 23 corrected (so they can fail)."""
    s = structure()
    bad_section = "The paper compares NF4 with two other 4-bit types (Section 3, Figure 3)."
    group = re.findall(r"\(([^()]*)\)", bad_section)[0]
    cited = list(citations(group))
    assert ("figures", "3") in cited and ("sections", "3") in cited
    assert s["figures"]["3"]["section"] != "3"
    assert ("sections", "5") in list(citations("the paper's sec. 5.1, Table 2"))
    assert s["tables"]["2"]["section"] != "5"
    lacks = s["tables"]["4"]["lacks"]
    assert "full fine-tuning" in lacks
    # the chatbot tables: "99.3 %" is a GPT-4 score (Table 6), not a human preference or MMLU
    assert wrong_credits("Guanaco reaches 99.3 % as judged by human raters (Table 6).", s)
    assert wrong_credits("Guanaco's MMLU is 99.3 % of ChatGPT's (Table 6).", s)
    assert not wrong_credits("GPT-4 scores Guanaco at 99.3 % of ChatGPT (Table 6).", s)
    assert wrong_credits("Rank does not matter (Figure 2).", s)
    clause = "matches full fine-tuning (Table 4)"
    assert not NEGATION.search(clause[:clause.index("full")])
    assert NEGATION.search("the paper fine-tunes no ")
