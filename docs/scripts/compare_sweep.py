"""Make docs/results/compare_sweep.{json,md}: the data-type arms of ``compare``,
each at its own learning rate chosen on the validation split, over 5 seeds.

    nice -n 10 python docs/scripts/compare_sweep.py          # 40 runs of 120 steps: compare_sweep.*
    nice -n 10 python docs/scripts/compare_sweep.py 282      # 282 steps: compare_sweep_282steps.*

The same runs as ``qlora-ref compare --sweep --max-steps 120``, with the
output in docs/results. Every run uses the default
FinetuneConfig (3,000 training examples, batch 32, r=8, alpha 16, paged
AdamW; 200 test examples) on the shipped base, except ``max_steps=120``
(1.3 epochs instead of 3: the whole sweep had to fit in an hour on a
2-core machine shared with other jobs).
"""
import platform
import sys
import time
from pathlib import Path

import torch

from qlora_ref._atomic import write_atomic
from qlora_ref.train.compare import LR_GRID, format_sweep, run_sweep
from qlora_ref.train.finetune import FinetuneConfig

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 120

if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}",
          flush=True)
    print(f"learning-rate grid: {LR_GRID}", flush=True)
    t0 = time.perf_counter()
    out = Path(__file__).resolve().parent.parent / "results"
    name = "compare_sweep" if STEPS == 120 else f"compare_sweep_{STEPS}steps"
    result = run_sweep(sweep_seed=100, seeds=(0, 1, 2, 3, 4), base_config=FinetuneConfig(
        max_steps=STEPS), output_dir=out, output_name=name)
    # the table is also a page of the Sphinx site that no toctree lists
    table = out / f"{name}.md"
    text = "---\norphan: true\n---\n\n" + table.read_text()
    write_atomic(table, text)
    print(format_sweep(result))
    print(f"wall {time.perf_counter() - t0:.0f} s", file=sys.stderr)
