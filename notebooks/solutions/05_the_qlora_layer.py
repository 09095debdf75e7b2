"""Solutions to the exercises of notebook 05, "The QLoRA layer" (checked by its check cells)."""
import math


def lora_backward(G, X, A, B, s, mask, p):
    """Exercise 1. The adapter path is Y = s (D A^T) B^T with D = d(X) = X * mask / (1 - p).

    dD = s G B A and dropout is elementwise linear, so dX = dD * mask / (1 - p);
    dA and dB are the no-dropout formulas with X replaced by D.
    """
    D = X * mask / (1 - p)                       # (tokens, in) what the adapter actually sees
    GB = G @ B                                   # (tokens, r)
    dX = s * (GB @ A) * mask / (1 - p)           # (tokens, in)
    dA = s * GB.T @ D                            # (r, in)
    dB = s * G.T @ (D @ A.T)                     # (out, r)
    return dX, dA, dB


def saved_bytes(x_shape, d_out, r, dropout):
    """Exercise 2. The backward needs X (for dA), the mask if any (one byte per element,
    torch.bool), A and B (float32); never the weight, which it dequantizes again.
    d_out enters only through B's shape."""
    d_in = x_shape[-1]
    n_x = math.prod(x_shape)
    return 4 * n_x + (n_x if dropout else 0) + 4 * r * d_in + 4 * d_out * r


#: Exercise 3. dA = s (G B)^T X is zero while B = 0; dB = s G^T (X A^T) is not, A being random.
nonzero_at_first_step = {"lora_B"}
