r"""``PagedAdamW``: AdamW whose state lives in host memory and is copied to the device, a page at a time, during ``step()``.

Paper Section 3, "Paged Optimizers": the activations of a gradient-checkpointed
backward pass over a long sequence make memory spike, and a spike that
crosses the GPU's capacity crashes the run. QLoRA keeps the optimizer state
in paged (NVIDIA unified) memory: under memory pressure the driver evicts
pages of that *state* to CPU RAM, and pages them back when the update needs
them. Pages move only when memory runs out.

This class is **not** that. It is CPU offload of the optimizer state,
written out: every page of every moment is copied to the device and back on
every ``step()``, whether memory is short or not (notebook 7, section 7.6:
30 pages moved in 5 steps), so no budget is checked and nothing is evicted.
What it shows is the data movement and the bound it buys:

* the two Adam moments :math:`m, v` of every parameter live in host memory
  (pinned when the parameter is on CUDA, so copies can be asynchronous);
* ``step()`` walks each parameter in pages of ``page_size`` elements: copy
  the page of :math:`m, v` to the parameter's device (``non_blocking``),
  update, copy it back (``non_blocking``), and synchronize once at the end;
* so at most one page of state is on the device at a time, instead of
  :math:`2 \times` the trainable parameters.

The update is ``torch.optim.AdamW``'s (its single-tensor path, operation by
operation), so the parameters are bit-identical to AdamW's:

.. math::

    \theta &\leftarrow \theta\,(1 - \eta\lambda) \\
    m &\leftarrow \beta_1 m + (1 - \beta_1)\, g \\
    v &\leftarrow \beta_2 v + (1 - \beta_2)\, g^2 \\
    \theta &\leftarrow \theta - \frac{\eta}{1 - \beta_1^t}\;
        \frac{m}{\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon}

The production path is ``bitsandbytes.optim.PagedAdamW`` (CUDA unified
memory, fused kernels); :func:`make_optimizer` chooses between them.

Note (page size): a precaution. Every page but the last is a multiple of
1024 elements, so the vectorised loops of the elementwise kernels split
each page exactly as they split the whole tensor (a SIMD body and a scalar
tail could round differently if compiled differently). On the CPUs we
tested any page size gave identical results.

Note (overlap): a production pager would prefetch page k + 1 on a side
stream while page k is updated. We keep one stream for readability; the
copies are still asynchronous with respect to the host.
"""
from __future__ import annotations

import torch

__all__ = ["PagedAdamW", "adamw_update", "make_optimizer", "OPTIMIZERS"]

#: Names :func:`make_optimizer` accepts.
OPTIMIZERS = ("paged_adamw", "adamw", "bnb_paged_adamw")

_PAGE_ALIGN = 1024


def adamw_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor, step: float, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float) -> None:
    r"""One AdamW update, in place, in the order of ``torch.optim.adam._single_tensor_adam``.

    All tensors have the same shape and device; ``step`` is :math:`t \ge 1`.
    See the module docstring for the equations.
    """
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)                                # decoupled decay
    exp_avg.lerp_(grad, 1 - beta1)                                       # m
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)         # v
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


class PagedAdamW(torch.optim.Optimizer):
    r"""AdamW with its state in host memory, paged to the device in chunks during :meth:`step`.

    Same hyperparameters and defaults as ``torch.optim.AdamW`` (no amsgrad,
    no maximize); bit-identical parameters.

    Parameters
    ----------
    params : iterable
        Parameters or parameter groups.
    lr : float
    betas : tuple of float
    eps : float
    weight_decay : float
        Decoupled weight decay :math:`\lambda`.
    page_size : int
        Elements of each state tensor moved per page; a positive multiple of 1024.
    pin_memory : bool, optional
        Pin the host state (default: when the parameter is on CUDA).

    Attributes
    ----------
    pages_moved : int
        Pages copied to the device and back so far (both moments count as one page).

    Examples
    --------
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(3000))
    >>> opt = PagedAdamW([w], lr=0.1, page_size=1024)
    >>> w.sum().backward(); opt.step()
    >>> opt.pages_moved, opt.offloaded_state_bytes(), opt.device_page_bytes()
    (3, 24000, 8192)
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, page_size: int = 1 << 20,
                 pin_memory: bool | None = None):
        if not lr >= 0.0:
            raise ValueError(f"PagedAdamW: lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"PagedAdamW: betas must be in [0, 1), got {betas}")
        if not eps >= 0.0 or not weight_decay >= 0.0:
            raise ValueError(f"PagedAdamW: eps and weight_decay must be >= 0, got {eps}, "
                             f"{weight_decay}")
        if not isinstance(page_size, int) or page_size <= 0 or page_size % _PAGE_ALIGN:
            raise ValueError(f"PagedAdamW: page_size must be a positive multiple of "
                             f"{_PAGE_ALIGN}, got {page_size!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        self.page_size = page_size
        self.pin_memory = pin_memory
        self.pages_moved = 0

    # -- host state -----------------------------------------------------------------
    def _to_host(self, tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        host = tensor.detach().to("cpu", copy=tensor.device.type == "cpu").contiguous()
        pin = self.pin_memory if self.pin_memory is not None else param.device.type == "cuda"
        return host.pin_memory() if pin and torch.cuda.is_available() else host

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            zeros = torch.zeros(p.shape, dtype=p.dtype)
            state["step"] = torch.tensor(0.0)                       # as torch.optim.AdamW
            state["exp_avg"] = self._to_host(zeros, p)              # m, host memory
            state["exp_avg_sq"] = self._to_host(zeros, p)           # v, host memory
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``Optimizer.load_state_dict``, then move the moments back to host memory."""
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = self._to_host(state[key], p)
            if "step" in state:
                state["step"] = state["step"].detach().to("cpu", copy=True)

    # -- the step -------------------------------------------------------------------
    def _pages(self, n: int):
        for start in range(0, n, self.page_size):
            yield start, min(start + self.page_size, n)

    @torch.no_grad()
    def step(self, closure=None):
        """Update every parameter with a gradient, paging its state in and out."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        devices = set()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("PagedAdamW does not support sparse gradients")
                state = self._state(p)
                state["step"] += 1
                step = state["step"].item()
                devices.add(p.device)
                flat = p.is_contiguous() and p.grad.is_contiguous()
                # pages are slices of the flattened tensors: (numel,) views, nothing copied;
                # a non-contiguous parameter is paged whole
                param, grad = (p.view(-1), p.grad.view(-1)) if flat else (p, p.grad)
                m_host, v_host = state["exp_avg"], state["exp_avg_sq"]
                m_host, v_host = (m_host.view(-1), v_host.view(-1)) if flat else (m_host, v_host)
                for start, end in (self._pages(p.numel()) if flat else [(None, None)]):
                    page = slice(start, end)
                    m = m_host[page].to(p.device, non_blocking=True)   # page in
                    v = v_host[page].to(p.device, non_blocking=True)
                    adamw_update(param[page], grad[page], m, v, step, group["lr"], beta1, beta2,
                                 group["eps"], group["weight_decay"])
                    if m.data_ptr() != m_host[page].data_ptr():        # page out
                        m_host[page].copy_(m, non_blocking=True)
                        v_host[page].copy_(v, non_blocking=True)
                    self.pages_moved += 1
        for device in devices:  # the host copies must land before anyone reads them
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return loss

    # -- memory report ----------------------------------------------------------------
    def offloaded_state_bytes(self) -> int:
        """Bytes of optimizer state (both moments) kept in host memory between steps.

        ``torch.optim.AdamW`` keeps exactly these bytes on the parameters'
        device, so for parameters on an accelerator this is the device
        memory saved (less :meth:`device_page_bytes` while a step runs). On
        a CPU-only run host and device are the same memory; the number is
        then what it would save on an accelerator.
        """
        return int(sum(s[k].numel() * s[k].element_size() for s in self.state.values()
                       for k in ("exp_avg", "exp_avg_sq") if k in s))

    def device_page_bytes(self) -> int:
        """Most state bytes on the device at once during :meth:`step`: one page of both moments."""
        sizes = [min(self.page_size, s["exp_avg"].numel()) * s["exp_avg"].element_size()
                 for s in self.state.values() if "exp_avg" in s]
        return 2 * max(sizes, default=0)


def make_optimizer(params, name: str = "paged_adamw", lr: float = 1e-3, betas=(0.9, 0.999),
                   eps: float = 1e-8, weight_decay: float = 1e-2, **kwargs):
    """Build the optimizer a training config names.

    Parameters
    ----------
    params : iterable
    name : {"paged_adamw", "adamw", "bnb_paged_adamw"}
        ``"paged_adamw"``: :class:`PagedAdamW` (this module);
        ``"adamw"``: ``torch.optim.AdamW``; ``"bnb_paged_adamw"``:
        ``bitsandbytes.optim.PagedAdamW``, the production path (CUDA only).
    lr, betas, eps, weight_decay
        AdamW's hyperparameters, passed to every choice.
    **kwargs
        Passed on (e.g. ``page_size`` for :class:`PagedAdamW`).
    """
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
    if name == "paged_adamw":
        return PagedAdamW(params, **hyper)
    if name == "adamw":
        return torch.optim.AdamW(params, **hyper)
    if name == "bnb_paged_adamw":
        if not torch.cuda.is_available():
            raise ValueError("bnb_paged_adamw needs CUDA (bitsandbytes pages through CUDA "
                             "unified memory); use 'paged_adamw' on this machine")
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW(params, **hyper)
    raise ValueError(f"optimizer name must be one of {OPTIMIZERS}, got {name!r}")
