r"""Layers that share an input, as one matmul: the decoding call of a group of (4-bit) layers.

In a Llama block q, k and v read the same normalised input, and so do gate
and up. :class:`Projection` joins such layers: their 4-bit codes are
concatenated row-wise, with their first-level constants as float32 (the
double-quantized absmax of two layers cannot be concatenated: their nested
blocks would straddle the seam), and ``gemv_4bit`` runs once. A row of the
output is the same float32 sum in the same order as the layer's own fused
path (:meth:`~qlora_ref.nn.LoRALinear._decode`), so the kernel's bytes are
equal (``tests/nn/test_lean_decoder.py``). The adapters become one small
update: :math:`\mathbf A` stacked, one product for it and one ``addmm_`` per
layer's block of :math:`\mathbf B`. A prompt (more rows) dequantizes the
joined codes once and runs one matmul in the compute dtype.

:class:`~qlora_ref.nn.decode.LlamaDecoder` is its user. Each projection also
holds a ``LeanProjection`` (``_kernels/decode_step.pxi``): the same decoding
call in one kernel call, for the decoder's step kernels; the torch code here
is its readable twin.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from ..backend import kernels
from ..fourbit import run_dequantize_kernel
from .linear4bit import Linear4bit, lean_kernel

__all__ = ["Projection", "PARALLEL_MIN_WEIGHTS"]


def _lora_parts(module):
    """``(base, A, B, scaling)`` of a module: a LoRALinear's pieces, or ``(module, None, None, 0)``."""
    from .lora import LoRALinear

    if isinstance(module, LoRALinear):
        if module.merged:
            return None  # merged: its forward is the readable path (see Projection)
        return module.base_layer, module.lora_A, module.lora_B, module.scaling
    return module, None, None, 0.0


#: Fewest weights for which a decoding step's kernel call uses more than one thread.
#: Measured on SmolLM2 (2-core EPYC, OMP_WAIT_POLICY=passive as the CLI sets it, load
#: average 0.9, 2026-12-06): 2 threads on every call 52.7 tokens/s, on calls of at least
#: 2**20 weights 61.5, on none 65.9 (1 thread: 63.5). A passive wake-up costs more than
#: half of a call of SmolLM2's size (at most 1.8 M weights) saves. (Counting rows x
#: weights instead, for a batch of 8, changed nothing once torch runs on one thread
#: during decoding steps: 1271 against 1275 ms, see LlamaDecoder.kernel_heavy.)
PARALLEL_MIN_WEIGHTS = 1 << 22


class Projection:
    r""":math:`[\mathbf Y_1 \,|\, \dots \,|\, \mathbf Y_k] = \mathbf X\,[\mathbf W_1;\dots;\mathbf W_k]^\top + \dots`: the layers that share an input, as one matmul.

    ``modules`` are ``LoRALinear`` (4-bit or 16-bit base), ``Linear4bit`` or
    ``nn.Linear`` layers of the same ``in_features``. :meth:`__call__` takes
    ``(rows, in)`` float32 and returns ``(rows, sum of out)`` float32. The way:

    * ``"fused4"``: every base is a ``Linear4bit`` whose fused kernel applies
      (:meth:`~qlora_ref.nn.Linear4bit.fused_plan`) with the same block size,
      code table and compute dtype: one ``gemv_4bit`` call on the concatenated
      codes, then :math:`s\,(\mathbf X\mathbf A_{\text{cat}}^\top)\mathbf B_{\text{bd}}^\top`
      (one ``addmm_`` per layer's block of B);
    * ``"dense"``: ``nn.Linear`` layers of one dtype (no adapters): one
      ``F.linear`` on the concatenated weight;
    * ``"modules"``: anything else (a merged adapter, a 16-bit base with
      adapters, mixed layers): each module's own forward, concatenated.

    A ``"fused4"`` call of more than ``Linear4bit.FUSED_MAX_ROWS`` rows (a
    prompt) dequantizes the concatenated codes once (:meth:`dequantize`) and
    runs one matmul in the compute dtype (float32 where the layers have none),
    then the same adapter update.
    """

    def __init__(self, modules):
        self.modules = list(modules)
        self.sizes = [m.out_features for m in self.modules]
        self.out_features = sum(self.sizes)
        self.way = "modules"
        self.lean = None  # "fused4": the kernel that runs a decoding call whole (_lean_kernel)
        self._held = {}  # rows -> buffers of a decoding call (_buffers)
        parts = [_lora_parts(m) for m in self.modules]
        if all(p is not None for p in parts):
            bases = [p[0] for p in parts]
            if all(isinstance(b, Linear4bit) for b in bases):
                self._try_fused4(bases, parts)
            elif all(type(b) is torch.nn.Linear for b in bases) and all(p[1] is None for p in parts):
                self._dense(bases)
        # what each module's own forward takes: an nn.Linear its weight's dtype, ours any
        self.input_dtypes = [m.weight.dtype if isinstance(m, torch.nn.Linear) else torch.float32
                             for m in self.modules]

    def _try_fused4(self, bases, parts):
        plans = [b.fused_plan() for b in bases]
        if any(p is None for p in plans):
            return
        same = {(b.in_features, b.blocksize, b.compute_dtype, tuple(b.code.tolist())) for b in bases}
        if len(same) != 1:
            return
        self.compute_dtype = bases[0].compute_dtype or torch.float32
        # rows of W are whole blocks (fused_plan checked in % blocksize == 0), so the
        # codes of layer 2 start on a byte and a block right after those of layer 1
        join = (lambda arrays: arrays[0]) if len(plans) == 1 else np.concatenate
        self.plan = SimpleNamespace(
            packed=join([p.packed for p in plans]),                       # (sum out * in / 2,)
            absmax=join([p.absmax for p in plans]),                       # (blocks,) float32
            code=plans[0].code, blocksize=plans[0].blocksize, nested_absmax=None)
        self.in_features = bases[0].in_features
        # Note (wake-ups): with OMP_WAIT_POLICY=passive (qlora_ref._runtime) each parallel
        # region pays a futex wake-up; below PARALLEL_MIN_WEIGHTS one thread is faster
        self.parallel = self.out_features * self.in_features >= PARALLEL_MIN_WEIGHTS
        biases = [b.bias for b in bases]
        self.bias = (None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(b.out_features) if bb is None else bb.detach().float()
             for b, bb in zip(bases, biases)]))                        # (sum out,)
        self.lora = None
        if any(p[1] is not None for p in parts):
            with torch.no_grad():
                A = torch.cat([p[1].detach().float() for p in parts if p[1] is not None])
                blocks, prompt_blocks, row, col = [], [], 0, 0
                for size, (_, a, b, s) in zip(self.sizes, parts):
                    if a is not None:
                        r = a.shape[0]
                        # y[:, row:row+size] += s h[:, col:col+r] B_i^T, as the layer adds it
                        blocks.append((row, row + size, col, col + r,
                                       b.detach().float().t().contiguous(), s))  # (r, size)
                        # a prompt's, in the compute dtype as the training forward: (s B_i)^T
                        prompt_blocks.append((row, row + size, col, col + r, (
                            b.detach().float() * s).to(self.compute_dtype).t().contiguous()))
                        col += r
                    row += size
            # Note (zeros): a block-diagonal B would be one addmm, but on SmolLM2 its zeros
            # are 2-3x B's bytes (about 10 MB a token in float32) and, for a prompt, its
            # multiply-adds (256 rows, 1 thread: gate/up 165 us as one addmm, 101 us per
            # block); each block is its own addmm
            self.lora = (A.t().contiguous(), blocks)                   # (in, sum r), blocks
            self.lora_prompt = prompt_blocks
            self.lora_a = A.to(self.compute_dtype)                     # (sum r, in)
        self.way = "fused4"
        self.lean = self._lean_kernel()

    def _lean_kernel(self):
        """The whole decoding call in one kernel call (``LeanProjection``), or None where the
        layers round their input to a dtype other than bfloat16 or float32."""
        if self.compute_dtype not in (torch.bfloat16, torch.float32):
            return None
        a_t, blocks = self.lora if self.lora is not None else (None, ())
        return lean_kernel(self.plan, self.in_features, self.out_features,
                           self.compute_dtype == torch.bfloat16, a_t, blocks, self.bias)

    def kernel_threads(self, threads: int) -> int:
        """Threads of a decoding call's kernel: ``threads`` from :data:`PARALLEL_MIN_WEIGHTS` on, else 1."""
        return threads if self.parallel else 1

    def _dense(self, bases):
        dtypes = {b.weight.dtype for b in bases}
        if len(dtypes) != 1:
            return
        with torch.no_grad():
            weights = [b.weight.detach() for b in bases]
            self.weight = weights[0] if len(weights) == 1 else torch.cat(weights)  # (sum out, in)
            biases = [b.bias for b in bases]
            self.bias = (None if all(b is None for b in biases) else torch.cat(
                [torch.zeros(b.out_features, dtype=b.weight.dtype) if b.bias is None
                 else b.bias.detach() for b in bases]))
        self.way = "dense"

    #: Set by :class:`LlamaDecoder`: one float32 buffer its projections dequantize into in
    #: turn (a prompt's matmul reads the weight while it is still in cache, and a fresh
    #: multi-megabyte allocation per call would page-fault its way in); None: a new tensor.
    scratch = None

    def dequantize(self, threads: int = 1, extra_rows: int = 0) -> torch.Tensor:
        """The concatenated 4-bit weight ``(sum out, in)`` in the compute dtype (``"fused4"`` only).

        With ``extra_rows``, ``(sum out + extra_rows, in)``: the rows after the
        weight's are left for the caller to fill (:meth:`_prompt` puts A there).
        """
        bf16 = self.compute_dtype == torch.bfloat16  # the kernel rounds to bfloat16 itself
        n = self.out_features * self.in_features
        total = n + extra_rows * self.in_features
        dtype = torch.int16 if bf16 else torch.float32
        if self.scratch is not None and self.scratch.numel() * 4 >= total * (2 if bf16 else 4):
            w = self.scratch.view(dtype)[:total]
        else:
            w = torch.empty(total, dtype=dtype)                            # (total,)
        flat = w[:n].numpy()                                              # zero-copy view
        run_dequantize_kernel(self.plan, flat.view(np.uint16) if bf16 else flat, threads)
        w = w.view(-1, self.in_features)                                  # (sum out + extra, in)
        return w.view(torch.bfloat16) if bf16 else w.to(self.compute_dtype)

    def _prompt(self, xc, threads):
        r"""Many rows: one dequantize and one matmul in the compute dtype, as the training forward.

        .. math::

            [\mathbf Y \,|\, \mathbf H] = \mathbf X\,[\hat{\mathbf W}; \mathbf A]^\top,
            \qquad \mathbf Y + s\,\mathbf H\mathbf B^\top

        Note (one matmul): A's rows go into the dequantize buffer right after W's,
        so the base and the adapter's first product are one ``F.linear`` in the
        compute dtype. On SmolLM2's q/k/v (256 rows, bfloat16, 1 thread) a
        projection took 679 us this way, 854 us with ``x A^T`` in float32 and a
        second matmul (``x @ A`` in float32 alone was about 125 us).
        """
        out = self.out_features
        if self.lora is None:
            y = F.linear(xc, self.dequantize(threads))                     # (rows, sum out)
        else:
            wa = self.dequantize(threads, extra_rows=self.lora_a.shape[0])
            wa[out:] = self.lora_a                                       # (sum out + sum r, in)
            yh = F.linear(xc, wa)                                        # (rows, sum out + sum r)
            y = yh[:, :out]
            for o0, o1, r0, r1, sb_t in self.lora_prompt:                 # + s H_i B_i^T
                y[:, o0:o1].addmm_(yh[:, out + r0:out + r1], sb_t)
        y = y.to(torch.float32)
        return y if self.bias is None else y.add_(self.bias)

    def _buffers(self, rows: int) -> SimpleNamespace:
        """The output ``y``, the adapter product ``h`` and their per-block views for ``rows`` rows.

        Note (small calls): a decoding step's projection is tens of microseconds, and each
        torch call (an allocation, a slice, ``.numpy()``) costs one or two; holding the
        buffers and their views leaves the kernel, one ``mm`` and one ``addmm_`` per block.
        """
        y = torch.empty(rows, self.out_features, dtype=torch.float32)      # (rows, sum out)
        buf = SimpleNamespace(y=y, y_np=y.numpy(), h=None, updates=())
        if self.lora is not None:
            a_t, blocks = self.lora
            buf.h = torch.empty(rows, a_t.shape[1], dtype=torch.float32)   # (rows, sum r)
            buf.updates = tuple((y[:, o0:o1], buf.h[:, r0:r1], b_t, s)
                                for o0, o1, r0, r1, b_t, s in blocks)
        return buf

    def __call__(self, x32: torch.Tensor, threads: int = 1, reuse: bool = False) -> torch.Tensor:
        """``(rows, sum out)`` float32 of ``(rows, in)`` float32 ``x32``.

        ``reuse=True`` (the decoder's layers): a few rows are written into a buffer
        this projection holds and overwrites on its next call with as many rows
        (:meth:`_buffers`); the caller must be done with it by then.
        """
        rows = x32.shape[0]
        if self.way == "fused4":
            cdt = self.compute_dtype
            xc = x32.to(cdt)                  # the layer rounds its input to the compute dtype
            if rows > Linear4bit.FUSED_MAX_ROWS:
                return self._prompt(xc, threads)
            if cdt != torch.float32:
                x32 = xc.to(torch.float32)
            buf = self._held.get(rows) if reuse else None
            if buf is None:
                buf = self._buffers(rows)
                if reuse:
                    self._held[rows] = buf
            kernels().gemv_4bit(self.plan.packed, self.plan.absmax, self.plan.code,
                                self.plan.blocksize, x32.numpy(), buf.y_np,
                                self.kernel_threads(threads))
            if buf.h is not None:
                torch.mm(x32, self.lora[0], out=buf.h)                     # (rows, sum r)
                for y_block, h_block, b_t, s in buf.updates:               # + s (x A^T) B^T
                    y_block.addmm_(h_block, b_t, alpha=s)
            if self.bias is not None:
                buf.y += self.bias
            return buf.y  # float32: the decoder's residual stream (module note)
        if self.way == "dense":
            return F.linear(x32.to(self.weight.dtype), self.weight, self.bias).to(torch.float32)
        return torch.cat([m(x32.to(dt)).to(torch.float32)
                          for m, dt in zip(self.modules, self.input_dtypes)], dim=-1)
