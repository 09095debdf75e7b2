"""Make docs/results/datatypes.{md,json,png}: the data-type table of the shipped base model.

    nice -n 10 python docs/scripts/datatypes_table.py

The table ``qlora-ref datatypes --plot docs/results/datatypes.png`` prints,
plus the JSON of every row and task.
"""
import json
import sys
import time
from pathlib import Path

import torch

from qlora_ref._atomic import write_atomic
from qlora_ref.train.datatypes import datatype_table, format_datatype_table, plot_datatype_table


if __name__ == "__main__":
    out = Path(__file__).resolve().parent.parent / "results"
    out.mkdir(exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    table = datatype_table()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    text = format_datatype_table(table)
    print(text)
    print(f"torch {torch.__version__}: {wall:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr)
    # the table is also a page of the Sphinx site that no toctree lists
    write_atomic(out / "datatypes.md", "---\norphan: true\n---\n\n" + text + "\n")
    write_atomic(out / "datatypes.json", json.dumps(table, indent=1) + "\n")
    plot_datatype_table(table, out / "datatypes.png")
