"""Specification of qlora_ref.optim: PagedAdamW equals torch.optim.AdamW, with its state off the device.

Paper section 3, "Paged Optimizers". The parameters after several steps are
bit-identical to ``torch.optim.AdamW`` with the same hyperparameters,
whatever the page size; the state lives in host memory and moves in pages.
"""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qlora_ref
from qlora_ref.optim import PagedAdamW, make_optimizer


def run(make, shapes, steps, seed=0, device="cpu"):
    """Parameters after ``steps`` updates with a fixed sequence of gradients."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
    opt = make(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(device)
        opt.step()
    return params, opt


@settings(max_examples=15, deadline=None)
@given(shapes=st.lists(st.sampled_from([(5,), (37, 29), (1024,), (3000,), (2, 1025)]),
                       min_size=1, max_size=3),
       lr=st.sampled_from([1e-3, 3e-2]), betas=st.sampled_from([(0.9, 0.999), (0.8, 0.95)]),
       eps=st.sampled_from([1e-8, 1e-6]), weight_decay=st.sampled_from([0.0, 0.01, 0.1]),
       page_size=st.sampled_from([1024, 2048, 1 << 20]))
def test_paged_adamw_is_bit_identical_to_adamw(shapes, lr, betas, eps, weight_decay, page_size):
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    ref, _ = run(lambda p: torch.optim.AdamW(p, **hyper), shapes, steps=6)
    got, opt = run(lambda p: PagedAdamW(p, page_size=page_size, **hyper), shapes, steps=6)
    for a, b in zip(ref, got):
        assert torch.equal(a, b), f"max |diff| {float((a - b).abs().max())} (bound 0)"
    # every page of every parameter was visited once per step
    assert opt.pages_moved == 6 * sum(-(-torch.Size(s).numel() // page_size) for s in shapes)


def test_training_a_prepared_model_matches_adamw_exactly():
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    models = [qlora_ref.prepare_model(copy.deepcopy(base), r=4) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.AdamW([p for p in models[0].parameters() if p.requires_grad], lr=1e-2),
            PagedAdamW([p for p in models[1].parameters() if p.requires_grad], lr=1e-2,
                       page_size=1024)]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x = torch.randn(8, 16, generator=g)
        for model, opt in zip(models, opts):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for (name, a), (_, b) in zip(models[0].named_parameters(), models[1].named_parameters()):
        assert torch.equal(a, b), name


def test_state_lives_in_host_memory_and_is_reported():
    params, opt = run(lambda p: PagedAdamW(p, page_size=1024), [(3000,), (64, 64)], steps=2)
    for p in params:
        state = opt.state[p]
        assert state["exp_avg"].device.type == "cpu" and state["exp_avg_sq"].device.type == "cpu"
        assert not state["exp_avg"].is_pinned()  # pinned only for CUDA parameters
    n = 3000 + 64 * 64
    assert opt.offloaded_state_bytes() == 2 * 4 * n       # m and v, float32, all off-device
    assert opt.device_page_bytes() == 2 * 4 * 1024        # at most one page of each on device


def test_state_dict_round_trip_continues_identically():
    params, opt = run(lambda p: PagedAdamW(p, lr=1e-2, page_size=1024), [(2000,)], steps=3)
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = PagedAdamW(clone, lr=1e-2, page_size=1024)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[clone[0]]["exp_avg"].device.type == "cpu"
    grad = torch.randn(2000)
    for p, o in ((params[0], opt), (clone[0], opt2)):
        p.grad = grad.clone()
        o.step()
    assert torch.equal(params[0], clone[0])


def test_make_optimizer_chooses_by_name():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert isinstance(make_optimizer(p, "paged_adamw", page_size=2048), PagedAdamW)
    adamw = make_optimizer(p, "adamw", lr=0.1, weight_decay=0.0)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["lr"] == 0.1
    with pytest.raises(ValueError, match="must be one of"):
        make_optimizer(p, "sgd")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error message")
def test_bitsandbytes_paged_adamw_needs_cuda():
    with pytest.raises(ValueError, match="needs CUDA"):
        make_optimizer([torch.nn.Parameter(torch.zeros(3))], "bnb_paged_adamw")


def test_bad_hyperparameters_are_value_errors():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="multiple of 1024"):
        PagedAdamW(p, page_size=1000)
    with pytest.raises(ValueError, match="lr"):
        PagedAdamW(p, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        PagedAdamW(p, betas=(1.0, 0.999))


@pytest.mark.cuda
def test_on_cuda_state_is_pinned_and_paged_and_equals_adamw():
    shapes = [(3000,), (129, 65)]
    ref, _ = run(lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False), shapes, 4, device="cuda")
    got, opt = run(lambda p: PagedAdamW(p, lr=1e-2, page_size=1024), shapes, 4, device="cuda")
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    for p in got:
        assert opt.state[p]["exp_avg"].is_pinned() and opt.state[p]["exp_avg"].device.type == "cpu"
    bnb, _ = run(lambda p: make_optimizer(p, "bnb_paged_adamw", lr=1e-2), shapes, 4, device="cuda")
    for a, b in zip(ref, bnb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
