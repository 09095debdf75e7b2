"""Solutions to the exercises of notebook 09, "QLoRA on a real model" (checked by its check cells)."""
import torch
import torch.nn.functional as F


def perplexity_from_logits(logits, ids):
    """Exercise 1. Position t predicts token t + 1, so the logits of positions 0..T-2 score tokens
    1..T-1 of each window; the mean negative log-likelihood is taken over all scored tokens of all
    windows together, and its exponential is the perplexity."""
    scores = logits[:, :-1].reshape(-1, logits.shape[-1]).double()      # (n (T-1), V)
    targets = ids[:, 1:].reshape(-1)                                      # (n (T-1),)
    return torch.exp(F.cross_entropy(scores, targets)).item()


def lora_parameters(config, r):
    """Exercise 2. A rank-r adapter on an (out, in) projection is A (r, in) plus B (out, r). Each
    decoder layer has q, k, v, o (k and v are only num_key_value_heads heads wide: grouped-query
    attention) and the MLP's gate, up (hidden -> intermediate) and down (intermediate -> hidden);
    the output head gets none."""
    hidden, mlp = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),    # q, k, v, o
              (mlp, hidden), (mlp, hidden), (hidden, mlp)]                       # gate, up, down
    return config.num_hidden_layers * sum(r * (n_in + n_out) for n_out, n_in in shapes)


def completion_loss_from_logits(logits, labels):
    """Exercise 3. Shift by one (position t predicts label t + 1) and average the cross-entropy over
    the labels that are not -100, counting tokens, not rows."""
    scores = logits[:, :-1].reshape(-1, logits.shape[-1])                # (B (T-1), V)
    targets = labels[:, 1:].reshape(-1)                                   # (B (T-1),)
    return F.cross_entropy(scores, targets, ignore_index=-100).item()
