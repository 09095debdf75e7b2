r"""On a GPU: one command that checks the CUDA parity, the GPU training loop and the memory claim.

Run it on a machine with an NVIDIA GPU, in the environment ``.ci/run`` installs
(this script installs nothing), from the repository's root::

    python scripts/gpu_check --out runs/gpu_check

(``python -m scripts.gpu_check`` is the same). It runs six parts, in this
order, each in its own subprocess with its own time limit (a hang or a CUDA
error in one part loses only that part), all within a total limit
(``--total-limit``, 470 s: a part gets at most what is left), and writes
everything under ``--out``. One module per part, each with ``run(ctx)`` and
``markdown(result)``:

(a) :mod:`.a_cuda_tests`: the ``@pytest.mark.cuda`` tests -- bitsandbytes' CUDA
    ``quantize_4bit`` against ours, the torch layer on CUDA, PagedAdamW on
    pinned memory -- with their pytest log and summary.
(b) :mod:`.b_layer_bench`: one 4096x4096 layer, 8x512 bf16 tokens, forward and
    backward: ``qlora_ref`` vs bitsandbytes ``Linear4bit`` + PEFT LoRA vs a
    16-bit ``nn.Linear`` + PEFT LoRA; time and peak memory as ratios from one run.
(c) :mod:`.c_finetune`: ``qlora-ref finetune --device cuda`` (the main job),
    its time per step and peak memory.
(d) :mod:`.d_llama_memory`: a ~1B-parameter Llama from a config (no download):
    one training step with 16-bit LoRA and with QLoRA, peak memory next to
    ``qlora-ref memory``'s prediction.
(e) :mod:`.e_real_model`: SmolLM2-135M-Instruct (the ``real`` extra; skipped
    with the reason without it): QLoRA steps/s and peak memory vs
    transformers + bitsandbytes + PEFT, then greedy decoding tokens/s.
(f) :mod:`.f_fsdp`: FSDP2 at world size 1 with NCCL: the all-gather hooks run,
    the loss and adapter gradients equal the unsharded model's, a DCP
    checkpoint round-trips. The dry run uses gloo on the CPU.

The driver: :mod:`.cli` (flags, the loop over the parts), :mod:`.run` (a part
in its own process session, killed at its limit), :mod:`.targets` (each GPU target
and how it is judged), :mod:`.summary` (``summary.md`` and
``summary.json``). Shared: :mod:`.context` (the sizes, the output folder),
:mod:`.device` (CUDA memory counters; timing through the benchmark's
:func:`qlora_ref.bench.timing.measure`), :mod:`.report` (units and tables,
through :func:`qlora_ref.bench.table.say_table`).

Without a GPU, ``--device cpu --dry-run`` runs every part with tiny sizes on
the CPU (the CUDA tests are collected and reported as skipped), so CI
exercises every code path (``tests/scripts/test_gpu_check.py``). Asking for
CUDA where there is none prints one line and exits with status 2.

Exit status: 0 when every part ran (or was skipped for a stated reason) and
every CUDA-marked test that ran passed (a target that is not met is a
measurement, not a failure); 1 when a part failed or ran out of time (or was
not started: the total limit was spent), or a CUDA-marked test failed; 2 for
bad usage.
"""
