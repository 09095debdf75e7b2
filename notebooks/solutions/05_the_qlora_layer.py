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


def two_sgd_steps(G, X, A, s, lr):
    """Exercise 3. With dE/dY = G: dA = s (G B)^T X and dB = s G^T (X A^T).

    Step 1, B = 0: dA = 0, so only B moves, to B1 = -lr s G^T (X A^T). Step 2: A moves by
    -lr s (G B1)^T X, and dB is computed with the A of step 1 (unchanged), so B2 = 2 B1.
    """
    B1 = -lr * s * G.T @ (X @ A.T)               # (out, r)
    A2 = A - lr * s * (G @ B1).T @ X             # (r, in)
    B2 = B1 - lr * s * G.T @ (X @ A.T)           # (out, r) dB of step 2 uses A before its update
    return A2, B2
