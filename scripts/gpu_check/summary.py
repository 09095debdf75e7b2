"""``summary.md`` and ``summary.json``: each target with its verdict, each part with its status, the exit status."""
from __future__ import annotations

import json
from pathlib import Path

from .parts import PART_BY_KEY
from .report import gb, table, write_file, x
from .targets import judge_targets, status


def exit_status(results: dict) -> int:
    """0 when every part ran or was skipped for a stated reason and no CUDA test failed, else 1."""
    a = results.get("a", {})
    failed_tests = a.get("failed", 0) + a.get("errors", 0) if a.get("status") == "ok" else 0
    ran = all(r["status"] in ("ok", "skipped") for r in results.values())
    return 0 if ran and not failed_tests else 1


def _where(env: dict) -> str:
    return (f"{env.get('gpu', 'no GPU')}, torch {env.get('torch')} "
            f"(CUDA {env.get('torch_cuda')}), "
            f"bitsandbytes {env.get('bitsandbytes')}, peft {env.get('peft')}, "
            f"transformers {env.get('transformers')}, qlora_ref backend "
            f"{env.get('qlora_ref_backend')}, Python {env.get('python')}")


def _part_rows(results: dict) -> list:
    return [(f"({k})", PART_BY_KEY[k].title,
             status(r) + (" (earlier run)" if r.get("earlier_run") else ""),
             f"{r['wall_seconds']:.0f} s", f"{r['timeout_s']:.0f} s",
             f"[{PART_BY_KEY[k].folder}/result.md]({PART_BY_KEY[k].folder}/result.md)")
            for k, r in results.items()]


def _stated_numbers(results: dict) -> str:
    """(c)'s and (e)'s numbers that no target judges, stated under the tables."""
    text = ""
    if results.get("c", {}).get("status") == "ok":
        c = results["c"]
        text += (f"\n(c) `qlora-ref finetune`: {c['steps']} steps, "
                 f"{1e3 * c['seconds_per_step']:.1f} ms per step, peak memory "
                 f"{gb(c['peak_memory_bytes'], 4)}.\n")
    if results.get("e", {}).get("status") == "ok":
        e = results["e"]
        v, q = e["variants"], e["ratios"]
        text += (f"\n(e) {e['model']}, greedy decoding of {e['new_tokens']} tokens (no target; "
                 f"stated only): ours 4-bit {v['qlora_ref']['decode_tokens_per_s']:.1f} tokens/s, "
                 f"bitsandbytes 4-bit {v['bnb_peft']['decode_tokens_per_s']:.1f}, bfloat16 "
                 f"{v['bf16']['decode_tokens_per_s']:.1f}; ours / bitsandbytes "
                 f"{x(q['decode_qlora_ref_vs_bnb'])}, ours / bfloat16 "
                 f"{x(q['decode_qlora_ref_vs_bf16'])}, bitsandbytes / bfloat16 "
                 f"{x(q['decode_bnb_vs_bf16'])}. Training: ours "
                 f"{v['qlora_ref']['steps_per_s']:.2f} steps/s, bitsandbytes + PEFT "
                 f"{v['bnb_peft']['steps_per_s']:.2f} steps/s.\n")
    return text


def write_summary(out: Path, results: dict, args, seconds: float) -> dict:
    """Write ``summary.md`` and ``summary.json`` into ``out``; return the summary."""
    targets = judge_targets(results, args.dry_run, args.device)
    env = next((r["environment"] for r in results.values() if "environment" in r), {})
    mode = ("CPU dry run (tiny sizes): every code path ran, no target is judged"
            if args.dry_run or args.device != "cuda" else "GPU run at the full sizes")
    target_rows = [(t["target"], f"({t['part']})", t["text"], f"**{t['verdict']}**",
                    t["measured"]) for t in targets]
    text = (f"# GPU check: summary\n\n`python scripts/gpu_check --out {args.out} --device "
            f"{args.device}{' --dry-run' if args.dry_run else ''}`: {mode}.\n\n{_where(env)}.\n\n"
            f"Total {seconds:.0f} s.\n\n## Targets\n\n"
            + table(("", "part", "target", "verdict", "measured"), target_rows)
            + "\n\n## Parts\n\n"
            + table(("part", "what", "status", "time", "limit", "details"), _part_rows(results))
            + "\n" + _stated_numbers(results))
    write_file(out / "summary.md", text)
    summary = {"mode": mode, "device": args.device, "dry_run": args.dry_run, "seconds": seconds,
               "environment": env, "targets": targets,
               "parts": {k: {"status": r["status"], "reason": r.get("reason"),
                             "wall_seconds": r["wall_seconds"],
                             "timeout_s": r["timeout_s"], "folder": PART_BY_KEY[k].folder}
                         for k, r in results.items()}}
    write_file(out / "summary.json", json.dumps(summary, indent=1, default=str))
    return summary
