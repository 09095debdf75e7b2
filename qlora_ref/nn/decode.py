r"""A lean greedy decoder for Llama-family models: a static KV cache and one kernel call per shared input.

Transformers' ``generate`` is the readable twin: this module computes the
same Llama forward (Touvron et al. 2023: pre-norm blocks with RMSNorm,
rotary position embeddings, grouped-query attention and a SwiGLU MLP),

.. math::

    \mathbf h &\leftarrow \mathbf h + \mathbf W_o\,\operatorname{attn}
               \bigl(\operatorname{RoPE}(\mathbf W_q \bar{\mathbf h}),
                     \operatorname{RoPE}(\mathbf W_k \bar{\mathbf h}),
                     \mathbf W_v \bar{\mathbf h}\bigr),
    \qquad \bar{\mathbf h} = \operatorname{RMSNorm}(\mathbf h), \\
    \mathbf h &\leftarrow \mathbf h + \mathbf W_d\bigl(\operatorname{silu}(\mathbf W_g\bar{\mathbf h})
               \odot \mathbf W_u \bar{\mathbf h}\bigr),
    \qquad \text{next} = \arg\max\, \mathbf W_{\text{head}}\operatorname{RMSNorm}(\mathbf h),

reading the prepared Hugging Face model's own modules and weights, with
less per-token work than the general loop:

* **one kernel call per shared input** (:class:`Projection`): q, k and v read
  the same normalised input, and so do gate and up. Their 4-bit codes are
  concatenated row-wise, with their first-level constants as float32 (the
  double-quantized absmax of two layers cannot be concatenated: their nested
  blocks would straddle the seam), and ``gemv_4bit`` runs once. A row of
  the output is the same float32 sum in the same order as the layer's own
  fused path (:meth:`~qlora_ref.nn.LoRALinear._decode`), so the kernel's
  bytes are equal (``tests/nn/test_lean_decoder.py``). The adapters become one small update: :math:`\mathbf A` stacked,
  :math:`\mathbf B` block-diagonal (one product for the stacked A, one ``addmm_`` per block);
* **few torch calls per step**: each projection holds its output and adapter
  buffers (``reuse=True``); codes whose rows span two kernel tiles are first
  copied into a held buffer (:data:`STAGE_MIN_IN`); torch's own ops run on one
  thread during decoding steps (:attr:`LlamaDecoder.kernel_heavy`);
* a **static KV cache** allocated once per call, RoPE from a precomputed table,
  ``F.rms_norm`` and ``F.scaled_dot_product_attention`` (one op each);
* **one sequence's new tokens in the step kernels** (:meth:`LlamaDecoder._forward_token`):
  each norm, projection (4-bit product, adapters, bias and residual sum in one
  ``LeanProjection.run``), attention and SiLU is one call into the extension
  (``_kernels/decode_step.h``) on NumPy views of the same buffers, eight per block,
  instead of about thirty torch calls. The torch lines of :meth:`LlamaDecoder._forward`
  are its readable twin and run every other call (a prompt, a batch, padding);
  ``tests/nn/test_decode_step.py`` checks the two agree within the float32 bound;
* a float32 residual stream: every matmul input is rounded to the layer's
  compute dtype exactly as the layer does; its output and everything between
  (norms, RoPE, attention, residual sums) stay in float32. (Where the
  layer itself would round its output to the compute dtype, this skips that
  rounding: one rounding fewer per projection, and two small ops fewer per
  call. The tests bound the difference to transformers' forward.)

Prompts longer than :data:`~qlora_ref.nn.Linear4bit.FUSED_MAX_ROWS` rows
(prefill) dequantize each group's concatenated codes once and run one matmul
in the compute dtype (the training forward's way, one call per group).

Note (memory): the concatenated codes are a copy, about the size of the
4-bit q/k/v and gate/up weights (~45 MB for SmolLM2-135M), made when the
decoder is built. The decoder is a snapshot: rebuild it after the weights
or adapters change.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from ..backend import default_num_threads, kernels
from ..fourbit import run_dequantize_kernel
from .linear4bit import Linear4bit

__all__ = ["Projection", "LlamaDecoder", "lean_generate", "unsupported_reason"]

#: ``config.model_type`` values whose forward is the one in the module docstring.
MODEL_TYPES = ("llama",)


def unsupported_reason(model) -> str | None:
    """None if :class:`LlamaDecoder` computes ``model``'s forward; else why not, in one line.

    It does for a Llama-family model (``config.model_type`` in
    :data:`MODEL_TYPES`, SiLU MLP, a RoPE that does not depend on the
    sequence length) held on the CPU.
    """
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in MODEL_TYPES:
        return f"the lean decoder handles {MODEL_TYPES} models, not {kind!r}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"the lean decoder handles hidden_act='silu', not {config.hidden_act!r}"
    rope = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
            or {})
    if rope.get("rope_type", rope.get("type", "default")) == "dynamic":
        return "the lean decoder does not handle the 'dynamic' RoPE (it depends on the length)"
    if any(t.device.type != "cpu" for t in list(model.parameters()) + list(model.buffers())):
        return "the lean decoder runs on the CPU; the model is elsewhere"
    return None


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

#: Fewest inputs for which a decoding step first copies the codes into a held buffer
#: (:attr:`Projection.stage`). The kernel walks 16 rows of W a tile of 512 inputs
#: (256 bytes) at a time; with rows of two tiles or more it hops between 16 strided
#: streams, and out of DRAM (a step reads ~60 MB, more than the cache) SmolLM2's down
#: projection (576 x 1536) read 5 GB/s, against 17 GB/s from cache. ``memcpy`` streams
#: the codes at the copy rate, then the kernel reads them from cache. Measured on SmolLM2
#: (2-core EPYC, 1 thread, load 1.4, 2026-12-06, both decoders in one process, 32 tokens
#: after the benchmark's chat prompt): 63.6 -> 69.2 tokens/s staging the down projections;
#: staging every projection gained less (3-4%).
STAGE_MIN_IN = 1024


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
        lora = {}
        if self.lora is not None:
            a_t, blocks = self.lora
            lora = dict(
                a_t=a_t.numpy(),                                           # (in, sum r)
                b_t=np.concatenate([b_t.reshape(-1).numpy() for *_, b_t, _ in blocks]),
                blocks=np.array([blk[:4] for blk in blocks], dtype=np.intp).reshape(-1),
                scales=np.array([blk[5] for blk in blocks], dtype=np.float32))
        bias = None if self.bias is None else self.bias.numpy()
        return kernels().LeanProjection(
            self.plan.packed, self.plan.absmax, self.plan.code, self.plan.blocksize,
            self.in_features, self.out_features, self.compute_dtype == torch.bfloat16,
            bias=bias, **lora)

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

    #: Set by :class:`LlamaDecoder` where ``in_features >= STAGE_MIN_IN``: a uint8 buffer of
    #: the codes' size they are copied into before a decoding call's kernel reads them
    #: (shared by the decoder's projections); None: the kernel reads them in place.
    stage = None

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
            packed = self.plan.packed
            if self.stage is not None:  # stream the codes into cache first (STAGE_MIN_IN)
                np.copyto(self.stage, packed)
                packed = self.stage
            kernels().gemv_4bit(packed, self.plan.absmax, self.plan.code,
                                self.plan.blocksize, x32.numpy(), buf.y_np,
                                threads if self.parallel else 1)
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


def _rotate_table(rotary, positions: int, head_dim: int):
    r"""cos and signed sin of every position, float32 ``(positions, head_dim)``, from the model's own RoPE module.

    :math:`\operatorname{RoPE}(\mathbf q) = \mathbf q\cos + \operatorname{rotate\_half}(\mathbf q)\sin`
    with ``rotate_half(q) = cat(-q2, q1)`` = ``roll(q, d/2) * [-1...,+1...]``: the sign
    is folded into the sine table so a rotation is a roll, two products and a sum.
    """
    ids = torch.arange(positions)[None]                                   # (1, positions)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), ids)           # (1, positions, d)
    sign = torch.cat([-torch.ones(head_dim // 2), torch.ones(head_dim // 2)])
    return cos[0].float(), (sin[0].float() * sign)


def _padding(attention_mask, batch: int, prompt: int, total: int):
    """``(valid, positions)``: which cache slots each row may attend to (None: all), and the
    prompt's positions, counted over real tokens only when the prompt is left-padded (as
    transformers' ``generate`` counts them)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None, torch.arange(prompt)[None].expand(batch, prompt)
    valid = torch.zeros(batch, total, dtype=torch.bool)                  # keys a row may see
    valid[:, :prompt] = attention_mask.bool()
    valid[:, prompt:] = True
    return valid, (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


class LlamaDecoder:
    """Greedy decoding of a (prepared) ``LlamaForCausalLM``-style model without transformers' loop.

    Parameters
    ----------
    model : transformers model
        Anything shaped like ``LlamaForCausalLM``: ``model.model.layers[i]``
        with ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``,
        ``input_layernorm``, ``post_attention_layernorm``; ``model.model.norm``,
        ``model.model.rotary_emb``, ``model.model.embed_tokens`` and
        ``model.lm_head``. Its linear layers may be ``LoRALinear``,
        ``Linear4bit`` or ``nn.Linear``.
    head : {"model", "nf4"}
        ``"model"``: the model's own output layer (bfloat16 for a bfloat16
        model). ``"nf4"``: opt in to a 4-bit copy of the head (NF4, blocksize
        64, float32 constants) through the fused kernel: a quarter of the
        bytes of bfloat16, and logits off by the NF4 rounding of the head.
    """

    def __init__(self, model, head: str = "model"):
        config = model.config
        if head not in ("model", "nf4"):
            raise ValueError(f"head must be 'model' or 'nf4', got {head!r}")
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        inner = model.model
        self.config = config
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.hidden = config.hidden_size
        self.max_positions = config.max_position_embeddings
        self.rotary = inner.rotary_emb
        self.embed = inner.embed_tokens.weight.detach()                  # (vocab, hidden)
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(SimpleNamespace(
                norm1=(layer.input_layernorm.weight.detach().float(),
                       layer.input_layernorm.variance_epsilon),
                qkv=Projection([attn.q_proj, attn.k_proj, attn.v_proj]),
                o=Projection([attn.o_proj]),
                norm2=(layer.post_attention_layernorm.weight.detach().float(),
                       layer.post_attention_layernorm.variance_epsilon),
                gate_up=Projection([mlp.gate_proj, mlp.up_proj]),
                down=Projection([mlp.down_proj]),
                scaling=attn.scaling))
        self.norm = (inner.norm.weight.detach().float(), inner.norm.variance_epsilon)
        lm_head = model.get_output_embeddings()
        if head == "nf4":
            lm_head = Linear4bit.from_weight(lm_head.weight.detach().float(), double_quant=False,
                                             bias=None if lm_head.bias is None
                                             else lm_head.bias.detach().float())
        self.head = Projection([lm_head])
        self._table = None
        self._token = None  # _token_kernels' buffers, made on first use (False: none)
        #: Set False to run every step through the torch lines of :meth:`_forward` (the
        #: readable twin of :meth:`_forward_token`).
        self.token_kernels = True
        fused = [p for layer in self.layers for p in (layer.qkv, layer.o, layer.gate_up,
                                                      layer.down) if p.way == "fused4"]
        #: True when the layers' projections run in the 4-bit kernels: then a decoding step
        #: (at most FUSED_MAX_ROWS rows) runs torch's own ops on one thread. Measured on
        #: SmolLM2 (2 cores, OMP_WAIT_POLICY=passive, load 0.9, 2026-12-06, the benchmark's
        #: 8 padded prompts, 32 tokens): torch on 2 threads 1601 ms, on 1 thread 1173 ms; one
        #: prompt 69.9 -> 71.8 tokens/s. A prompt (more rows) keeps torch's threads.
        self.kernel_heavy = bool(fused)
        if fused:  # one dequantize buffer for all (Projection.scratch)
            scratch = torch.empty(max((p.out_features + (0 if p.lora is None else
                                                         p.lora_a.shape[0])) * p.in_features
                                          for p in fused))
            for p in fused:
                p.scratch = scratch
            staged = [p for p in fused if p.in_features >= STAGE_MIN_IN]
            if staged:  # one staging buffer for all (Projection.stage)
                stage = np.empty(max(p.plan.packed.size for p in staged), np.uint8)
                for p in staged:
                    p.stage = stage[:p.plan.packed.size]                   # (sum out * in / 2,)

    def _token_kernels(self):
        """Buffers of :meth:`_forward_token`, or None where a projection has no lean kernel.

        Note (one token, one sequence): most decoding is this case, and it is where the
        torch calls of :meth:`_forward` cost most against the arithmetic (about 110 us of
        a SmolLM2 layer's 250 us were norms, RoPE, attention and sums). The step kernels
        (``decode_step.h``) do each of them in one call on float32 NumPy views.
        """
        if self._token is not None:
            return self._token or None
        projections = [p for layer in self.layers for p in (layer.qkv, layer.o, layer.gate_up,
                                                            layer.down)]
        if not self.layers or any(p.lean is None for p in projections):
            self._token = False
            return None
        first = self.layers[0]
        width = lambda p: p.out_features                                   # noqa: E731
        self._token = SimpleNamespace(
            x=np.empty((1, self.hidden), np.float32),                      # residual stream
            xn=np.empty((1, self.hidden), np.float32),                     # its norm
            qkv=np.empty((1, width(first.qkv)), np.float32),
            attn=np.empty((1, self.n_heads * self.head_dim), np.float32),
            gate_up=np.empty((1, width(first.gate_up)), np.float32),
            act=np.empty((1, width(first.gate_up) // 2), np.float32),
            norms=[(layer.norm1[0].numpy(), layer.norm1[1], layer.norm2[0].numpy(),
                    layer.norm2[1]) for layer in self.layers],
            final=(self.norm[0].numpy(), self.norm[1]))
        return self._token

    def _forward_token(self, token, pos, cache, cos, sin, threads):
        """:meth:`_forward` for one token of one sequence (position ``pos``), in the step kernels.

        ``cache``: each layer's ``(n_kv, total, d)`` float32 K and V as NumPy views;
        ``cos``, ``sin``: the RoPE table as NumPy. The same float32 residual stream,
        input roundings and order of operations as :meth:`_forward` (its readable twin);
        only the order of float32 sums inside a norm, a dot product or a softmax differs
        (``tests/nn/test_decode_step.py``). Returns the logits ``(1, vocab)``.
        """
        k, b = kernels(), self._token
        x, xn = b.x, b.xn
        x[0] = self.embed[token].float().numpy()                          # (hidden,)
        for layer, (k_cache, v_cache), (w1, eps1, w2, eps2) in zip(self.layers, cache, b.norms):
            k.rms_norm(x, w1, eps1, xn)
            layer.qkv.lean.run(xn, b.qkv, False, threads if layer.qkv.parallel else 1)
            k.attend_token(b.qkv[0], cos[pos], sin[pos], k_cache, v_cache, pos, self.n_heads,
                           layer.scaling, b.attn[0])
            layer.o.lean.run(b.attn, x, True, threads if layer.o.parallel else 1)   # x += o(a)
            k.rms_norm(x, w2, eps2, xn)
            layer.gate_up.lean.run(xn, b.gate_up, False,
                                   threads if layer.gate_up.parallel else 1)
            k.silu_mul(b.gate_up, b.act)
            layer.down.lean.run(b.act, x, True, threads if layer.down.parallel else 1)
        k.rms_norm(x, *b.final, xn)
        return self.head(torch.from_numpy(xn), threads)                    # (1, vocab)

    def _rope(self, positions: int):
        if self._table is None or self._table[0].shape[0] < positions:
            self._table = _rotate_table(self.rotary, max(positions, 64), self.head_dim)
        return self._table

    def _norm(self, x, weights):
        weight, eps = weights
        return F.rms_norm(x, (self.hidden,), weight, eps)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 attention_mask: torch.Tensor | None = None, eos_token_id=None,
                 pad_token_id: int | None = None, return_logits: bool = False):
        """Greedy continuation: ``(batch, prompt + new)`` token ids (and the logits of each new token).

        ``attention_mask`` ``(batch, prompt)`` marks real tokens (1) and
        padding (0), padding on the left as for ``model.generate``. With
        ``eos_token_id`` (an int or a list of them), a sequence that produced
        one continues with ``pad_token_id`` (default: the first EOS id) and
        decoding stops once all have, as ``model.generate`` does; without
        it, exactly ``max_new_tokens`` are produced.
        """
        self._check_request(input_ids, max_new_tokens, attention_mask)
        batch, prompt = input_ids.shape
        total = prompt + max_new_tokens
        valid, positions = _padding(attention_mask, batch, prompt, total)
        threads = default_num_threads(self.hidden * self.hidden)
        cache = [(torch.zeros(batch, self.n_kv, total, self.head_dim),
                  torch.zeros(batch, self.n_kv, total, self.head_dim)) for _ in self.layers]
        cos, sin = self._rope(total)
        out = torch.empty(batch, total, dtype=torch.long)
        out[:, :prompt] = input_ids
        logits_seen = []
        done = torch.zeros(batch, dtype=torch.bool)
        if eos_token_id is not None:
            eos = torch.tensor(eos_token_id, dtype=torch.long).reshape(-1)    # (n_eos,)
            if pad_token_id is None:
                pad_token_id = int(eos[0])
        ids, start = input_ids, 0
        last_pos = positions[:, -1]
        torch_threads = torch.get_num_threads()
        one = (batch == 1 and valid is None and self.token_kernels
               and self._token_kernels() is not None)
        if one:  # one sequence: its tokens after the prompt go through _forward_token
            cache_np = [(k[0].numpy(), v[0].numpy()) for k, v in cache]  # (n_kv, total, d)
            cos_np, sin_np = cos.numpy(), sin.numpy()                    # (positions, d)
        try:
            for step in range(max_new_tokens):
                # Note (one torch thread): a few rows through the 4-bit kernels leave torch
                # only small ops; with OMP_WAIT_POLICY=passive each pays a thread wake-up on
                # 2 threads (measured: see kernel_heavy). The kernels keep ``threads``. A
                # step of the step kernels leaves torch only the head, one large matmul: it
                # keeps torch's threads (SmolLM2's bfloat16 head, 1 token: 3.1 ms on 1
                # thread, 1.6 ms on 2, passive wait policy, load 0.9, 2026-12-06).
                token_step = one and ids.shape[1] == 1
                few = (self.kernel_heavy and ids.numel() <= Linear4bit.FUSED_MAX_ROWS
                       and not token_step)
                torch.set_num_threads(1 if few else torch_threads)
                if token_step:
                    logits = self._forward_token(ids[0, 0], start, cache_np, cos_np, sin_np,
                                                 threads)
                else:
                    logits = self._forward(ids, positions, start, cache, valid, cos, sin,
                                           threads)
                nxt = logits.argmax(-1)                                        # (batch,)
                if eos_token_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
                    done |= torch.isin(nxt, eos)
                out[:, prompt + step] = nxt
                if return_logits:
                    logits_seen.append(logits)
                if eos_token_id is not None and bool(done.all()):
                    out = out[:, :prompt + step + 1]
                    break
                start += ids.shape[1]
                ids = nxt[:, None]                                             # (batch, 1)
                last_pos = last_pos + 1
                positions = last_pos[:, None]
        finally:
            torch.set_num_threads(torch_threads)
        return (out, logits_seen) if return_logits else out

    def _check_request(self, input_ids, max_new_tokens, attention_mask) -> None:
        """One ``ValueError`` line for token ids, a length or a mask :meth:`generate` cannot take."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or not input_ids.numel():
            raise ValueError("input_ids must be a non-empty (batch, prompt) tensor of token ids, "
                             f"got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        vocab = self.embed.shape[0]
        if input_ids.dtype != torch.long or int(input_ids.min()) < 0 \
                or int(input_ids.max()) >= vocab:
            raise ValueError(f"input_ids must be int64 token ids in [0, {vocab}), got "
                             f"{input_ids.dtype} in [{int(input_ids.min())}, "
                             f"{int(input_ids.max())}]")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                             f"input_ids {tuple(input_ids.shape)}")
        total = input_ids.shape[1] + max_new_tokens
        if total > self.max_positions:
            raise ValueError(f"prompt + new tokens = {total} is over the model's "
                             f"max_position_embeddings = {self.max_positions}")

    def _forward(self, ids, positions, start, cache, valid, cos, sin, threads):
        """Logits (float32, ``(batch, vocab)``) of the last position, writing K and V at ``start:``."""
        batch, n = ids.shape
        end = start + n
        h, d, nh, nkv = self.hidden, self.head_dim, self.n_heads, self.n_kv
        x = self.embed[ids].to(torch.float32).reshape(batch * n, h)       # (rows, hidden)
        c, s = cos[positions][:, :, None], sin[positions][:, :, None]     # (batch, n, 1, d)
        mask, causal = None, False
        if valid is not None:  # padding: which keys each query row may see
            keys = valid[:, None, None, :end].expand(batch, 1, n, end)      # (batch, 1, n, end)
            if n > 1:
                tri = torch.ones(n, end, dtype=torch.bool).tril(start)
                keys = keys & tri
                own = torch.zeros(n, end, dtype=torch.bool)
                own[:, start:] = torch.eye(n, dtype=torch.bool)
                keys = keys | own                                          # a pad row sees itself
            mask = keys
        elif n > 1:
            causal = start == 0
            if not causal:
                mask = torch.ones(n, end, dtype=torch.bool).tril(start)
        half = d // 2
        for layer, (k_cache, v_cache) in zip(self.layers, cache):
            qkv = layer.qkv(self._norm(x, layer.norm1), threads, reuse=True)  # (rows, (nh+2nkv) d)
            qk = qkv[:, :(nh + nkv) * d].reshape(batch, n, nh + nkv, d)
            qk = torch.addcmul(qk * c, qk.roll(half, -1), s)              # RoPE on q and k
            q = qk[:, :, :nh].transpose(1, 2)                             # (batch, nh, n, d)
            k_cache[:, :, start:end] = qk[:, :, nh:].transpose(1, 2)
            v_cache[:, :, start:end] = qkv[:, (nh + nkv) * d:].reshape(
                batch, n, nkv, d).transpose(1, 2)
            a = F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end],
                                               attn_mask=mask, is_causal=causal,
                                               scale=layer.scaling, enable_gqa=nkv != nh)
            x += layer.o(a.transpose(1, 2).reshape(batch * n, nh * d), threads, reuse=True)
            gu = layer.gate_up(self._norm(x, layer.norm2), threads, reuse=True)  # (rows, 2 inter)
            inter = gu.shape[1] // 2
            x += layer.down(F.silu(gu[:, :inter]) * gu[:, inter:], threads, reuse=True)
        last = x.reshape(batch, n, h)[:, -1]                              # (batch, hidden)
        return self.head(self._norm(last, self.norm), threads)            # (batch, vocab)


def lean_generate(model, input_ids, max_new_tokens: int, attention_mask=None,
                  eos_token_id=None, pad_token_id: int | None = None, head: str = "model"):
    """Greedy tokens of ``model`` with :class:`LlamaDecoder` (built for this call)."""
    return LlamaDecoder(model, head=head).generate(
        input_ids, max_new_tokens, attention_mask=attention_mask, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id)
