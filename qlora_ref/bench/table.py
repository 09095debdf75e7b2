"""The benchmark's tables: aligned text columns or Markdown, one function for every table."""
from __future__ import annotations

__all__ = ["say_table"]


def say_table(say, head, body, fmt: str) -> None:
    """A table as Markdown (``fmt == "md"``) or as aligned text columns, through ``say``."""
    rows = [[str(c) for c in line] for line in [head, *body]]
    if fmt == "md":  # blank lines around the table: Markdown needs them
        say("\n| " + " | ".join(rows[0]) + " |")
        say("|" + "---|" * len(rows[0]))
        for line in rows[1:]:
            say("| " + " | ".join(line) + " |")
        say("")
        return
    widths = [max(len(line[i]) for line in rows) for i in range(len(rows[0]))]
    for line in rows:
        say("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(line, widths))))
