"""AdamW numerics: 32-bit against torch.optim.AdamW, 8-bit against bitsandbytes'
CPU AdamW8bit and against the 32-bit result on a regression problem."""

from __future__ import annotations

import pytest
import torch

from qlora.optim import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit, create_optimizer


def _groups(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(5, 123), (123,), (17, 3, 7), (300,)]]


def _grads(params, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) for p in params]


def _param_groups(params):
    return [
        {"params": params[:2], "lr": 3e-3, "weight_decay": 0.1},
        {"params": params[2:3], "lr": 1e-2, "weight_decay": 0.0},
        {"params": params[3:], "lr": 5e-4, "weight_decay": 0.5, "betas": (0.8, 0.99)},
    ]


def test_adamw_32bit_matches_torch_over_200_steps():
    ours, ref = _groups(0), _groups(0)
    opt = AdamW(_param_groups(ours), eps=1e-8)
    ref_opt = torch.optim.AdamW(_param_groups(ref), eps=1e-8)
    for step in range(200):
        for ps in (ours, ref):
            for p, g in zip(ps, _grads(ps, step)):
                p.grad = g
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["adamw", "paged_adamw_32bit"])
@pytest.mark.parametrize("betas, eps", [((0.9, 0.95), 1e-6), ((0.85, 0.99), 1e-5), ((0.0, 0.5), 1e-3)])
def test_32bit_matches_torch_with_other_betas_and_eps(name, betas, eps):
    """--adam-beta1/--adam-beta2/--adam-epsilon reach the update as torch.optim.AdamW uses them."""
    ours, ref = _groups(1), _groups(1)
    opt = create_optimizer(name, _param_groups(ours)[:2], betas=betas, eps=eps, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(_param_groups(ref)[:2], betas=betas, eps=eps, weight_decay=0.01)
    default = torch.optim.AdamW(_param_groups(_groups(1))[:2], weight_decay=0.01)
    for step in range(100):
        for ps in (ours, ref, default.param_groups[0]["params"] + default.param_groups[1]["params"]):
            for p, g in zip(ps, _grads(ps, step)):
                p.grad = g
        opt.step()
        ref_opt.step()
        default.step()
    for a, b in zip(ours[:3], ref[:3]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(ours[0], default.param_groups[0]["params"][0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cls", [PagedAdamW, PagedAdamW8bit, AdamW8bit])
def test_paged_and_chunked_states_update_exactly_like_resident_ones(cls):
    """A tiny budget forces evictions and splits parameters across pages; the
    updates are elementwise, so every parameter must be bit-identical."""
    eight = cls is not PagedAdamW
    page = 1024 if eight else 4096
    ours = [torch.nn.Parameter(torch.randn(s)) for s in [(40, 64), (1000,), (33,)]]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    paged = dict(page_budget_bytes=2 * page, page_bytes=page) if cls is not AdamW8bit else {}
    opt = cls(ours, lr=1e-2, **paged, **({"min_8bit_size": 256} if eight else {}))
    ref_opt = AdamW(ref, lr=1e-2, **({"min_8bit_size": 256, "state_bits": 8} if eight else {}))
    for step in range(5):
        for ps in (ours, ref):
            for p, g in zip(ps, _grads(ps, step)):
                p.grad = g
        opt.step()
        ref_opt.step()
    if cls is not AdamW8bit:
        assert opt.pager("cpu").stats.to_host > 0
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def _regression(opt_cls, steps: int = 200, lr: float = 1e-2) -> float:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    w_true = torch.randn(64, 96, generator=g)
    y = x @ w_true + 0.01 * torch.randn(512, 96, generator=g)
    w = torch.nn.Parameter(torch.zeros(64, 96))  # 6144 elements: 8-bit state
    opt = opt_cls([w], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(x @ w, y)
        loss.backward()
        opt.step()
    return torch.nn.functional.mse_loss(x @ w, y).item()


def test_8bit_tracks_32bit_on_regression():
    """Stopped mid-descent (loss ~2.7 from ~60), where the moments' precision
    still shows in the loss, unlike at the noise floor."""
    full, eight = _regression(AdamW), _regression(AdamW8bit)
    assert eight == pytest.approx(full, rel=0.02)


@pytest.mark.parametrize("betas, eps", [((0.9, 0.999), 1e-8), ((0.85, 0.95), 1e-6)])
def test_8bit_step_matches_bitsandbytes_cpu(betas, eps):
    """Per-step parameters and quantized states equal bitsandbytes' CPU kernel
    bit for bit: same dequantize -> float32 update -> requantize order, and our
    blockwise quantizer reproduces its lookup-table rounding."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(70, 77))  # 5390 elements: a partial last block
    theirs = torch.nn.Parameter(ours.detach().clone())
    opt = AdamW8bit([ours], lr=1e-2, weight_decay=0.1, betas=betas, eps=eps)
    ref = bnb.optim.AdamW8bit([theirs], lr=1e-2, weight_decay=0.1, betas=betas, eps=eps)
    for step in range(10):
        g = torch.randn_like(ours) * (10.0 ** (step % 3 - 1))
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        assert torch.equal(ours, theirs), f"step {step}"
        sd, rs = opt.state_dict()["state"][0], ref.state[theirs]
        assert torch.equal(sd["exp_avg_codes"], rs["state1"])
        assert torch.equal(sd["exp_avg_sq_codes"], rs["state2"])
        assert torch.equal(sd["exp_avg_absmax"], rs["absmax1"])
        assert torch.equal(sd["exp_avg_sq_absmax"], rs["absmax2"])


def test_8bit_vanishing_gradients_match_bitsandbytes_cpu():
    """Gradients around 1e-20 make the second moment subnormal (about 1e-43): its blocks' absmax has
    an infinite reciprocal, which bitsandbytes' kernel clamps; the step must neither crash nor differ."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(64, 80))
    theirs = torch.nn.Parameter(ours.detach().clone())
    opt = AdamW8bit([ours], lr=1e-2)
    ref = bnb.optim.AdamW8bit([theirs], lr=1e-2)
    for step in range(4):
        g = torch.randn_like(ours) * 1e-20
        g[:, :8] = 0.0  # zeros inside the subnormal blocks: 0 * inf
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        assert torch.equal(ours, theirs), f"step {step}"
        sd, rs = opt.state_dict()["state"][0], ref.state[theirs]
        assert torch.equal(sd["exp_avg_sq_codes"], rs["state2"]) and torch.equal(sd["exp_avg_codes"], rs["state1"])


def test_small_tensors_keep_32bit_state_in_8bit_mode():
    small, big = torch.nn.Parameter(torch.randn(4095)), torch.nn.Parameter(torch.randn(4096))
    opt = AdamW8bit([small, big])
    small.grad, big.grad = torch.randn(4095), torch.randn(4096)
    opt.step()
    state = opt.state_dict()["state"]
    assert set(state[0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert state[1]["exp_avg_codes"].dtype == torch.uint8


def test_bf16_params_update_through_float32():
    p = torch.nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    ref = torch.nn.Parameter(p.detach().float())
    opt, ref_opt = AdamW([p], lr=1e-2), AdamW([ref], lr=1e-2)
    g = torch.randn(64)
    p.grad, ref.grad = g.bfloat16(), g.bfloat16().float()
    opt.step()
    ref_opt.step()
    assert p.dtype == torch.bfloat16
    assert torch.equal(p, ref.bfloat16())


def test_8bit_matches_bitsandbytes_across_dtypes_missing_grads_and_a_resume():
    """bitsandbytes' CPU AdamW8bit over mixed parameters: float32 and bfloat16 ones with 8-bit moments, 16-bit
    ones under ``min_8bit_size`` with 32-bit moments (both update 16-bit parameters through float32), steps where
    a parameter has no gradient (not stepped, its step count held) or a zero one (decayed), and a resume from
    ``state_dict`` halfway: every parameter bit for bit at every step, and the same step counts."""
    bnb = pytest.importorskip("bitsandbytes")
    g = torch.Generator().manual_seed(0)
    shapes = [((70, 77), torch.float32), ((64, 80), torch.bfloat16), ((100,), torch.float16), ((5,), torch.bfloat16)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g).to(d)) for s, d in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kwargs = dict(lr=1e-2, betas=(0.85, 0.98), eps=1e-6, weight_decay=0.1)
    opt, ref = AdamW8bit(ours, **kwargs), bnb.optim.AdamW8bit(theirs, **kwargs)
    for step in range(8):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            grad = None if (step + i) % 5 == 2 else torch.randn(a.shape, generator=g).to(a.dtype)
            if grad is not None and (step + i) % 5 == 4:
                grad.zero_()
            a.grad, b.grad = grad, None if grad is None else grad.clone()
        opt.step()
        ref.step()
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert torch.equal(a, b), f"step {step}, parameter {i} {a.dtype}{tuple(a.shape)}"
        if step == 3:  # resume: a fresh optimizer from the saved state
            saved = opt.state_dict()
            opt = AdamW8bit(ours, **kwargs)
            opt.load_state_dict(saved)
    state = opt.state_dict()["state"]
    assert [int(state[i]["step"]) for i in range(len(ours))] == [ref.state[p]["step"] for p in theirs]
    assert {"exp_avg_codes"} <= set(state[0]) and {"exp_avg_codes"} <= set(state[1])
    assert set(state[2]) == set(state[3]) == {"step", "exp_avg", "exp_avg_sq"}
