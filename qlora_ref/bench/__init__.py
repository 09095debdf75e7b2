r"""The benchmark: speed of the 4-bit storage paths, against bitsandbytes, torchao and a memory copy.

``qlora-ref bench`` (also ``python -m qlora_ref.cli.bench``, the command
line in :mod:`qlora_ref.cli.bench`) prints one table per matrix size, every
number from the same run. One module per table, one for the timing:

* :mod:`.timing` -- :func:`measure` (the method below), page faults,
  the process settings a run changes and restores, libgomp's thread count;
* :mod:`.storage` -- the storage table, :func:`run_benchmarks`;
* :mod:`.layer` -- :func:`qlora_layer_step_time`, a LoRA layer's step;
* :mod:`.generate` -- ``--generate``: decoding in 4 bits against 16 and 32;
* :mod:`.contention` -- ``--contention``: :func:`contention_table`;
* :mod:`.table` -- text or Markdown tables.

Floor: above the training package (the contention and generate tables
fine-tune and load the tiny GPT), below the command line
(``tests/test_architecture.py``). Like the command line, it imports torch
only inside functions.

Storage operations (NF4, blocksize 64, double quantization as in the paper):

* ``quantize``     -- :func:`qlora_ref.quantize_4bit` (float32 in, packed codes
  and double-quantized constants out);
* ``dequant f32`` / ``dequant bf16`` -- :func:`qlora_ref.dequantize_4bit` to
  float32, and to a bfloat16 ``torch.Tensor``;
* ``pack`` / ``unpack`` -- two 4-bit codes per byte and back
  (:mod:`qlora_ref.packing` and its Cython twins).

Implementations: the NumPy reference; the Cython kernels on 1 thread and on
``--threads`` threads; bitsandbytes' CPU path
(``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` on CPU
tensors, ``compress_statistics=True``); torchao's ``NF4Tensor`` (``to_nf4``,
``get_original_weight``) when torchao is installed; and ``np.copyto`` of as
many bytes as the operation writes -- the rate at which this machine moves
that output, the bandwidth limit.

Method: best of ``--repeat`` runs, the implementations taking turns, thread
counts set for every library, dynamo off, outputs from heap memory in a
child process, page-aligned copies, and a CPU-time table; each choice and
why is written out in ``docs/benchmarks.md`` ("Method"). A benchmark, not a
test: nothing here asserts a speed.

:func:`qlora_layer_step_time` times a LoRA layer over a 4-bit base
(``qlora_ref.nn``), forward and backward, against the same layer over a
16-bit base.

``--contention`` prints :func:`contention_table` instead: what a user of a
*shared* machine meets. The benchmark starts busy processes of its own (2
by default; each ends by itself after a deadline and is killed in a
``finally``), then runs, in a fresh process per row, a 30-step
``finetune`` of the tiny GPT and the Cython dequantization on 1 and 2
threads, for each way a process may be set up: the package's default
OpenMP policy (:mod:`qlora_ref._runtime`), torch imported before
``qlora_ref``, libgomp's own spinning default, ``OMP_NUM_THREADS=1``.
"""
from .contention import CONTENTION_SETUPS, contention_table
from .layer import qlora_layer_step_time
from .storage import OPERATIONS, Libraries, Row, run_benchmarks
from .timing import machine_info, measure, process_settings, process_settings_now

__all__ = ["run_benchmarks", "qlora_layer_step_time", "contention_table", "measure", "machine_info",
           "process_settings", "process_settings_now", "Row", "Libraries", "OPERATIONS",
           "CONTENTION_SETUPS"]
