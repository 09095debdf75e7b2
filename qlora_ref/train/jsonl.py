"""Fine-tuning data from a JSONL file: one example per line, in one of three common layouts.

Each non-blank line is a JSON object in one of these layouts (decided per line
by its keys):

* ``{"text": ...}`` -- plain text; the loss counts every token of it;
* ``{"prompt": ..., "completion": ...}`` -- the loss counts the completion only;
* ``{"instruction": ..., "input": ..., "output": ...}`` -- the Alpaca layout of
  the paper's instruction datasets (``input`` may be absent or empty); the
  prompt is :data:`INSTRUCTION_TEMPLATE` (or :data:`INSTRUCTION_TEMPLATE_NO_INPUT`
  when ``input`` is empty) and the loss counts ``output`` only.

Extra keys are ignored. Every problem is a ``ValueError`` of one line that
starts ``FILE:LINE:`` (or ``FILE:`` for the whole file): a line that is not
JSON or not an object, a missing or empty field, a field that is not a
string, an empty file. The file is read as UTF-8 and nothing in it is run.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ..validation import check_text

__all__ = ["Example", "read_examples", "INSTRUCTION_TEMPLATE", "INSTRUCTION_TEMPLATE_NO_INPUT",
           "LAYOUTS"]

#: The prompt of an Alpaca-layout example with an ``input`` (our own wording; the
#: ``### Instruction`` / ``### Response`` headers are the layout's usual markers).
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
#: The same without an ``input``.
INSTRUCTION_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"

#: layout name -> (required string fields, optional string fields)
LAYOUTS = {
    "text": (("text",), ()),
    "prompt-completion": (("prompt", "completion"), ()),
    "instruction": (("instruction", "output"), ("input",)),
}


@dataclasses.dataclass(frozen=True)
class Example:
    """One training example: the loss counts ``completion`` only (all of it for ``text``)."""

    prompt: str       #: "" for the ``text`` layout
    completion: str
    line: int         #: 1-based line number in the file
    layout: str       #: a key of :data:`LAYOUTS`


def _layout(record: dict) -> str | None:
    if "text" in record:
        return "text"
    if "prompt" in record or "completion" in record:
        return "prompt-completion"
    if "instruction" in record or "output" in record:
        return "instruction"
    return None


def _shown(value) -> str:
    """The start of ``value`` as JSON, safe for any parsed value (huge ints, deep nesting)."""
    try:
        return json.dumps(value)[:40]
    except (ValueError, RecursionError):
        return type(value).__name__


def _example(record, where: str, line: int) -> Example:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got a {type(record).__name__}")
    layout = _layout(record)
    if layout is None:
        raise ValueError(f"{where}: no known fields (keys {sorted(record)[:8]}); expected "
                         '{"text"}, {"prompt", "completion"} or {"instruction", "input", "output"}')
    required, optional = LAYOUTS[layout]
    for key in required:
        if key not in record:
            raise ValueError(f"{where}: field {key!r} is missing (a {layout} example needs "
                             f"{', '.join(map(repr, required))})")
    for key in required + optional:
        if key in record and not isinstance(record[key], str):
            raise ValueError(f"{where}: field {key!r} must be a string, got "
                             f"{type(record[key]).__name__} {_shown(record[key])}")
        if key in record:
            check_text(record[key], f"{where}: field {key!r}")
    target = {"text": "text", "prompt-completion": "completion", "instruction": "output"}[layout]
    if not record[target].strip():
        raise ValueError(f"{where}: field {target!r} is empty; there is nothing to learn")
    if layout == "text":
        return Example("", record["text"], line, layout)
    if layout == "prompt-completion":
        return Example(record["prompt"], record["completion"], line, layout)
    if record.get("input", "").strip():
        prompt = INSTRUCTION_TEMPLATE.format(instruction=record["instruction"], input=record["input"])
    else:
        prompt = INSTRUCTION_TEMPLATE_NO_INPUT.format(instruction=record["instruction"])
    return Example(prompt, record["output"], line, layout)


def read_examples(path: str | os.PathLike) -> list[Example]:
    """Read every example of a JSONL file (blank lines skipped).

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        ``FILE:LINE: ...`` naming the first bad line and what is wrong with
        it, or ``FILE: ...`` for a folder, an empty file or one that is not UTF-8.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "d.jsonl"
    >>> _ = f.write_text('{"prompt": "2+2=", "completion": "4"}\\n\\n{"text": "hello"}\\n')
    >>> [(e.prompt, e.completion, e.line) for e in read_examples(f)]
    [('2+2=', '4', 1), ('', 'hello', 3)]
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a directory, not a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    examples = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
            if not text.strip():
                continue
            try:
                record = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            except ValueError as exc:  # an integer of more than 4300 digits
                raise ValueError(f"{where}: not usable JSON ({exc})") from None
            except RecursionError:  # arrays or objects nested thousands deep
                raise ValueError(f"{where}: not usable JSON (nested too deeply)") from None
            examples.append(_example(record, where, number))
    if not examples:
        raise ValueError(f"{path}: empty file, no examples (one JSON object per line, e.g. "
                         '{"prompt": "...", "completion": "..."})')
    return examples
