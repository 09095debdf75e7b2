"""The GPU targets: which part measures each, and how its result is judged met or not."""
from __future__ import annotations

from dataclasses import dataclass

from .report import gb, x


@dataclass(frozen=True)
class Target:
    key: str
    part: str
    text: str
    judge: object   #: result of the part -> (met: bool | None, measured: str)


def _judge_parity(group):
    def judge(r):
        c = r["parity"][group]
        ran = c["passed"] + c["failed"] + c["error"]
        text = f"{c['passed']} of {sum(c.values())} passed, {c['failed'] + c['error']} failed"
        if not ran:
            return None, text + f", {c['skipped']} skipped"
        return c["passed"] == sum(c.values()), text
    return judge


def _judge_time(limit: float, digits: int):
    """Ours within ``limit`` times bitsandbytes + PEFT's time (parts (b) and (e))."""
    def judge(r):
        q, v = r["ratios"]["time_qlora_ref_vs_bnb_peft"], r["variants"]
        ours, bnb = v["qlora_ref"], v["bnb_peft"]
        text = f"{x(q)} ({ours['ms_per_step']:.{digits}f} ms vs {bnb['ms_per_step']:.{digits}f} ms"
        if "steps_per_s" in ours:
            text += f" per step; {ours['steps_per_s']:.2f} vs {bnb['steps_per_s']:.2f} steps/s"
        return q <= limit, text + ")"
    return judge


def _judge_peak(r):
    """Ours at most bitsandbytes + PEFT's peak memory (parts (b) and (e))."""
    q, v = r["ratios"]["peak_qlora_ref_vs_bnb_peft"], r["variants"]
    if q is None:
        return None, "peak memory is not measured on the CPU"
    return q <= 1.0, (f"{x(q, 3)} ({gb(v['qlora_ref']['peak_bytes'], 4)} vs "
                      f"{gb(v['bnb_peft']['peak_bytes'], 4)})")


def _judge_memory(r):
    v = r["variants"]["qlora"]
    q, predicted = v["peak_vs_prediction"], v["prediction"]["total_bytes"]
    note = ("" if r["activations_in_prediction"]
            else "; the prediction leaves out activations")
    if q is None:
        return None, f"predicted {gb(predicted)}; peak memory is not measured on the CPU"
    return abs(q - 1) <= 0.10, (f"{x(q)}: measured {gb(v['measured']['peak_bytes'])}, "
                                f"predicted {gb(predicted)} (before activations "
                                f"{x(v['static_vs_prediction'])}){note}")


def _judge_fsdp(r):
    met = r["hooks_ran"] and r["loss_equal"] and r["dcp_round_trip_equal"]
    return met, (f"hooks ran: {r['hooks_ran']}, loss {r['loss_sharded']:.6f} vs "
                 f"{r['loss_unsharded']:.6f} (equal: {r['loss_equal']}), max |grad diff| "
                 f"{r['max_abs_grad_diff']:.3g}, DCP round trip equal: {r['dcp_round_trip_equal']}")


TARGETS = (
    Target("T1", "a", "zero differing bytes against bitsandbytes' CUDA kernels without double "
           "quantization (every blocksize, dtype, quant type)", _judge_parity("no_double_quant")),
    Target("T2", "a", "with double quantization: within the documented bounds (same codes; the "
           "offset within the float32 summation bound)", _judge_parity("double_quant")),
    Target("T3", "b", "the layer's forward+backward within 1.3x of bitsandbytes Linear4bit + "
           "PEFT LoRA's time", _judge_time(1.3, 3)),
    Target("T4", "b", "the layer's peak memory no more than bitsandbytes Linear4bit + PEFT "
           "LoRA's", _judge_peak),
    Target("T5", "d", "QLoRA's measured peak memory within 10% of qlora-ref memory's "
           "prediction for the same model", _judge_memory),
    Target("T6", "f", "FSDP2 at world size 1 with NCCL: the all-gather hooks run, the loss "
           "equals the unsharded model's, a DCP checkpoint round-trips", _judge_fsdp),
    Target("T7", "e", "SmolLM2-135M QLoRA training step within 1.3x of bitsandbytes 4-bit + "
           "PEFT LoRA's time", _judge_time(1.3, 1)),
    Target("T8", "e", "SmolLM2-135M QLoRA training peak memory no more than bitsandbytes "
           "4-bit + PEFT LoRA's", _judge_peak),
)


def status(result: dict) -> str:
    """A part's status for the summary: ``ok``, ``failed``, ... or ``skipped: <why>``."""
    s = result.get("status", "not run")
    return f"{s}: {result['reason']}" if s == "skipped" and "reason" in result else s


def judge_targets(results: dict, dry_run: bool, device: str) -> list[dict]:
    """One row per target: met / NOT met / not judged, with the numbers it was judged on."""
    rows = []
    for t in TARGETS:
        result = results.get(t.part, {})
        if result.get("status") != "ok":
            verdict, measured = "not measured", f"part ({t.part}) {status(result)}"
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
