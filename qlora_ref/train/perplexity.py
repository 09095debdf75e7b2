r"""Perplexity of a causal language model on fixed token windows.

Each window of :math:`T` tokens :math:`t_1 \dots t_T` is scored on its own
(no context carried over from the window before), every token but the first
predicted from the ones before it:

.. math::
    \text{NLL} = -\sum_{w}\sum_{i=2}^{T} \log p_\theta(t^{(w)}_i \mid t^{(w)}_{<i}),
    \qquad
    \text{perplexity} = \exp\!\Big(\frac{\text{NLL}}{n_\text{windows}\,(T-1)}\Big).

The sums are taken in float64 over per-window float32 sums, in window order,
so the same weights and the same windows give the same number on every run
(one process, one host). Works with any Hugging Face causal LM (anything
whose ``model(input_ids=...)`` returns ``.logits``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["window_nll", "perplexity"]


@torch.no_grad()
def window_nll(model, window: torch.Tensor) -> float:
    """Summed negative log-likelihood (nats) of tokens 2..T of one window ``(T,)``."""
    ids = window.reshape(1, -1).to(next(model.parameters()).device)  # (1, T)
    logits = model(input_ids=ids).logits[0, :-1].float()             # (T-1, vocab)
    return float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))


def perplexity(model, windows: torch.Tensor, progress=None) -> dict:
    """Score ``windows`` ``(n, T)``; ``{"nll", "tokens", "loss", "perplexity", "window_nll"}``.

    ``loss`` is the mean NLL per predicted token, ``perplexity`` its
    exponential; ``window_nll`` lists each window's sum. ``progress`` (a
    callable of the window index) is called after each window.
    """
    model.eval()
    sums = []
    for i, window in enumerate(windows):
        sums.append(window_nll(model, window))
        if progress is not None:
            progress(i)
    tokens = int(windows.shape[0]) * (int(windows.shape[1]) - 1)
    nll = math.fsum(sums)
    return {"nll": nll, "tokens": tokens, "loss": nll / tokens,
            "perplexity": math.exp(nll / tokens), "window_nll": sums}
