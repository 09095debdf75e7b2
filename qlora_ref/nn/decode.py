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

* **one kernel call per shared input** (:class:`~qlora_ref.nn.projection.Projection`):
  q, k and v through one ``gemv_4bit`` on their concatenated codes, and so gate
  and up; the row sums are the layer's own fused path's, byte for byte, and the
  adapters one stacked update;
* **few torch calls per step**: each projection holds its output and adapter
  buffers (``reuse=True``); torch's own ops run on one thread during decoding
  steps (:attr:`LlamaDecoder.kernel_heavy`);
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
from .linear4bit import Linear4bit
from .projection import Projection

__all__ = ["LlamaDecoder", "lean_generate", "unsupported_reason"]  # + Projection, from .projection

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

    Notes
    -----
    One call at a time: the decoder holds its step buffers between steps, so
    one instance serves one :meth:`generate` at a time; build one per thread
    (the model's weights are shared, not copied, except the joined codes).
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
        self._token = SimpleNamespace(
            x=np.empty((1, self.hidden), np.float32),                      # residual stream
            xn=np.empty((1, self.hidden), np.float32),                     # its norm
            qkv=np.empty((1, first.qkv.out_features), np.float32),
            attn=np.empty((1, self.n_heads * self.head_dim), np.float32),
            gate_up=np.empty((1, first.gate_up.out_features), np.float32),
            act=np.empty((1, first.gate_up.out_features // 2), np.float32),
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
            layer.qkv.lean.run(xn, b.qkv, False, layer.qkv.kernel_threads(threads))
            k.attend_token(b.qkv[0], cos[pos], sin[pos], k_cache, v_cache, pos, self.n_heads,
                           layer.scaling, b.attn[0])
            layer.o.lean.run(b.attn, x, True, layer.o.kernel_threads(threads))   # x += o(a)
            k.rms_norm(x, w2, eps2, xn)
            layer.gate_up.lean.run(xn, b.gate_up, False, layer.gate_up.kernel_threads(threads))
            k.silu_mul(b.gate_up, b.act)
            layer.down.lean.run(b.act, x, True, layer.down.kernel_threads(threads))
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
