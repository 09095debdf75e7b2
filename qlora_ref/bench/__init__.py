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

Method (named notes):

* *Best of N.* Each cell is the fastest of ``--repeat`` wall-clock runs
  (``time.perf_counter``) after ``--warmup`` untimed runs; calls that take
  over a second get 3 runs. Calls shorter than 2 ms are repeated inside one
  sample (the sample is their mean), so timer and Python overheads stay small.
* *Interleaved.* Within an operation the implementations take turns (round
  robin), so a change in machine load hits all rows alike.
* *Threads.* bitsandbytes runs torch ops and its own OpenMP C kernels:
  ``torch.set_num_threads`` and ``omp_set_num_threads`` (of the system
  libgomp its library links) are set to the row's thread count. torchao is
  plain torch. Ratios ("x bnb") compare rows with the same thread count.
* *Dynamo off.* bitsandbytes wraps some CPU fallbacks in ``torch.compile``;
  compiling would dominate the first calls (and the fallbacks are not taken
  for these shapes). The measuring child process starts with
  ``TORCHDYNAMO_DISABLE=1`` (unless set), and the run sets
  ``torch._dynamo.config.disable`` (restored afterwards).
* *Allocation included, page faults not.* Every row returns a fresh output
  (as the APIs do); the copy row copies into a preallocated buffer. Whether
  a fresh 64 MiB output costs page faults depends on glibc's history: a
  large free chunk inside the heap is reused without faults, otherwise the
  request is a new ``mmap`` faulted in page by page (4 KiB pages for torch,
  2 MiB huge pages for NumPy; 16384 faults cost bitsandbytes about 40 ms
  here). To measure the operations rather than that history, the benchmark
  sets glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` high (``mallopt``)
  so that outputs reuse heap memory; ``--fresh-pages`` leaves the allocator
  alone. The tables print the page faults per call of the dequantization rows.
* *The caller's process is left as it was.* ``mallopt`` is process wide and
  cannot be undone (glibc's adaptive thresholds do not come back), so a
  heap-reuse run measures in a fresh child process
  (``python -m qlora_ref.cli.bench --report-json FILE ...``) whose tables are
  relayed and whose numbers come back as JSON. An in-process run
  (``fresh_pages=True``) sets thread counts, environment variables and
  ``torch._dynamo.config.disable`` for its rows and restores all of them
  afterwards (:func:`process_settings`, tested before == after).
* *Copy.* ``np.copyto`` between page-aligned buffers: two consecutive heap
  allocations sit 16 bytes past a multiple of 4096 apart, where glibc's
  ``rep movsb`` copy runs 10-20x slower on some CPUs (this one included).
* *CPU time.* On a shared machine a long call is more often interrupted
  than a short one, which flatters the fast rows. The second table of each
  size times the single-threaded rows by ``time.thread_time`` (CPU time of
  the calling thread, system time of its page faults included).
* *A benchmark, not a test*: nothing here asserts a speed. The Cython outputs
  are checked byte-identical to the NumPy ones on the benchmark data.

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
