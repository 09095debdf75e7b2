"""A tiny decoder-only transformer: the base model that QLoRA fine-tunes.

This is a GPT in the style of Karpathy's nanoGPT (pre-LayerNorm blocks,
learned position embeddings, causal self-attention, GELU MLP), shrunk so it
trains on a laptop CPU in minutes. It plays the role that LLaMA plays in the
QLoRA paper (Dettmers et al. 2023, sec. 4): every projection is a plain
``nn.Linear`` with a LLaMA-like name, so the LoRA and NF4 code can find and
replace them by attribute name:

- attention: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``
- MLP: ``up_proj``, ``down_proj`` (GELU between)
- output head: ``lm_head`` (untied from the token embedding ``wte``)

Note (bias): the projections have no bias by default, as in LLaMA, so that a
quantized layer is fully described by its weight. ``GPTConfig(bias=True)``
adds biases for experiments.

Note (devices): nothing here is CPU-specific; the model runs on CUDA and in
bfloat16. The loss is always computed in float32.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..validation import check_int_range, check_real

__all__ = ["GPTConfig", "GPT"]


@dataclass
class GPTConfig:
    """Sizes of a :class:`GPT`.

    Parameters
    ----------
    vocab_size : int
        Number of token ids.
    block_size : int
        Longest sequence the model can read (number of position embeddings).
    n_layer : int
        Number of transformer blocks.
    n_head : int
        Attention heads per block; must divide ``n_embd``.
    n_embd : int
        Width of the residual stream.
    dropout : float, default 0.0
        Dropout probability on attention weights and residual branches.
    bias : bool, default False
        Whether the ``nn.Linear`` projections have a bias.
    """

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self):
        # every field checked before any use: n_head=0 was a ZeroDivisionError, and a config
        # read from a file must not ask for more memory than a tiny GPT can need
        for name, high in (("vocab_size", MAX_VOCAB), ("block_size", MAX_BLOCK), ("n_layer", 256),
                           ("n_head", 4096), ("n_embd", 2 ** 16)):
            check_int_range(getattr(self, name), f"GPTConfig.{name}", 1, high)
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}"
            )
        check_real(self.dropout, "GPTConfig.dropout", 0.0, 0.999)
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be true or false, got {self.bias!r}")
        n, c = self.n_parameters_estimate(), self.n_embd
        if n > MAX_PARAMETERS:
            raise ValueError(f"GPTConfig asks for about {n:,} parameters (vocab {self.vocab_size}, "
                             f"{self.n_layer} layers of width {c}); at most {MAX_PARAMETERS:,}")

    def n_parameters_estimate(self) -> int:
        """About how many parameters the model has: embeddings plus 12 C^2 a layer."""
        c = self.n_embd
        return (self.vocab_size + self.block_size) * c + self.n_layer * 12 * c * c


#: Bounds of a GPTConfig (a config read from a file is checked before anything is allocated).
MAX_VOCAB = 2 ** 20
MAX_BLOCK = 2 ** 16
MAX_PARAMETERS = 2 ** 30  # 4 GiB of float32


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t only sees positions <= t."""

    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.q_proj = nn.Linear(C, C, bias=config.bias)
        self.k_proj = nn.Linear(C, C, bias=config.bias)
        self.v_proj = nn.Linear(C, C, bias=config.bias)
        self.o_proj = nn.Linear(C, C, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.shape
        H = self.n_head

        def split_heads(t):
            return t.view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, C/H)

        q = split_heads(self.q_proj(x))
        k = split_heads(self.k_proj(x))
        v = split_heads(self.v_proj(x))
        # softmax(q k^T / sqrt(d) + causal mask) v, fused by torch
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, H, T, C/H)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C) heads side by side
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network: down_proj(gelu(up_proj(x)))."""

    def __init__(self, config):
        super().__init__()
        self.up_proj = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.down_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """Decoder-only transformer language model.

    Parameters
    ----------
    config : GPTConfig
        Model sizes.

    Examples
    --------
    >>> import torch
    >>> model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=8))
    >>> logits, loss = model(torch.zeros(3, 5, dtype=torch.long))
    >>> tuple(logits.shape), loss
    ((3, 5, 20), None)
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token embedding
        self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position embedding
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2 init: scale the projections that write into the residual
        # stream by 1/sqrt(2 n_layer) so its variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / (2 * config.n_layer) ** 0.5)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, loss_mask=None):
        """Next-token logits and, given targets, the masked cross-entropy.

        .. math::

            \\mathcal{L} = \\frac{\\sum_{b,t} m_{bt}\\,(-\\log p(y_{bt} \\mid x_{b,\\le t}))}
                               {\\sum_{b,t} m_{bt}}

        Parameters
        ----------
        idx : torch.LongTensor, shape (B, T)
            Input token ids, ``T <= config.block_size``.
        targets : torch.LongTensor, shape (B, T), optional
            Token that should follow each position.
        loss_mask : torch.Tensor, shape (B, T), optional
            1 where a target counts in the loss (the answer tokens), 0
            elsewhere. ``None`` counts every position.

        Returns
        -------
        logits : torch.Tensor, shape (B, T, vocab_size)
        loss : torch.Tensor or None
            Scalar float32 mean cross-entropy over counted positions, or
            ``None`` when ``targets`` is ``None``.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab_size)
        if targets is None:
            return logits, None
        token_loss = F.cross_entropy(
            logits.float().view(B * T, -1), targets.view(B * T), reduction="none"
        ).view(B, T)  # (B, T) float32
        if loss_mask is None:
            return logits, token_loss.mean()
        mask = loss_mask.to(token_loss.dtype)
        # clamp: a batch with no answer tokens has loss 0, not nan
        loss = (token_loss * mask).sum() / mask.sum().clamp(min=1.0)
        return logits, loss

    @torch.no_grad()
    def generate_greedy(self, idx, max_new_tokens):
        """Append ``max_new_tokens`` tokens, each the most likely next token.

        Parameters
        ----------
        idx : torch.LongTensor, shape (B, T)
            Prompt token ids (all rows the same length).
        max_new_tokens : int
            How many tokens to append. The context is cropped to the last
            ``block_size`` tokens when it grows longer.

        Returns
        -------
        torch.LongTensor, shape (B, T + max_new_tokens)
        """
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]  # (B, <= block_size)
            logits, _ = self(context)
            next_id = logits[:, -1, :].argmax(dim=-1, keepdim=True)  # (B, 1)
            idx = torch.cat([idx, next_id], dim=1)
        return idx
