"""Optimizer API: state_dict round trips, LR schedulers, LoRA+ groups, the
by-name factory and its errors."""

from __future__ import annotations

import io
import re

import pytest
import torch
from transformers.training_args import OptimizerNames

from qlora.errors import UsageError
from qlora.optim import OPTIMIZER_ALIASES, OPTIMIZERS, AdamW, create_optimizer, lora_plus_param_groups

_PAGING = dict(page_budget_bytes=2 * 8192, page_bytes=8192)


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(80, 64), (5000,), (7, 3)]]


def _step(opt, params, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()


def _make(name: str, params):
    kw = dict(_PAGING) if name.startswith("paged") else {}
    groups = [{"params": params[:2], "lr": 1e-2}, {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0}]
    return create_optimizer(name, groups, weight_decay=0.1, **kw)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_round_trip_continues_bit_identically(name):
    a = _params()
    opt_a = _make(name, a)
    for s in range(3):
        _step(opt_a, a, s)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, map_location="cpu", weights_only=True)

    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = _make(name, b)
    opt_b.load_state_dict(saved)
    for s in range(3, 6):
        _step(opt_a, a, s)
        _step(opt_b, b, s)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for x, y in zip(opt_a.state_dict()["state"].values(), opt_b.state_dict()["state"].values()):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_paged_state_loads_into_resident_optimizer():
    a = _params()
    opt_a = _make("paged_adamw_8bit", a)
    for s in range(2):
        _step(opt_a, a, s)
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = _make("adamw_8bit", b)
    opt_b.load_state_dict(opt_a.state_dict())
    _step(opt_a, a, 2)
    _step(opt_b, b, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", ["adamw", "paged_adamw_8bit"])
def test_lr_schedulers_drive_the_learning_rate(name):
    params = _params()
    opt = _make(name, params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    for s in range(3):
        _step(opt, params, s)
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-2 / 8, 3e-3 / 8])
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    for s in range(4):
        _step(opt, params, s)
        cosine.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_zero_grad_clears_gradients():
    params = _params()
    opt = AdamW(params)
    _step(opt, params, 0)
    opt.zero_grad()
    assert all(p.grad is None for p in params)


class _Lora(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = torch.nn.Linear(8, 8)
        self.base.requires_grad_(False)
        self.lora_A = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.randn(2, 8))})
        self.lora_B = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.zeros(8, 2))})
        self.norm = torch.nn.Parameter(torch.ones(8))


def test_lora_plus_groups_scale_b_learning_rate():
    model = _Lora()
    groups = lora_plus_param_groups(model, lr=1e-4, ratio=16, weight_decay=0.01)
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 1.6e-3])
    assert {id(p) for p in groups[0]["params"]} == {id(model.lora_A["default"]), id(model.norm)}
    assert [id(p) for p in groups[1]["params"]] == [id(model.lora_B["default"])]
    opt = create_optimizer("paged_adamw_32bit", groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.01]


@pytest.mark.parametrize("kw", [dict(ratio=0), dict(ratio=-1.0), dict(lr=0.0)])
def test_lora_plus_rejects_bad_values(kw):
    with pytest.raises(UsageError):
        lora_plus_param_groups(_Lora(), **{"lr": 1e-4, **kw})


def test_unknown_name_lists_valid_names():
    with pytest.raises(UsageError, match=re.escape("Optimizers: adamw (= adamw_torch, adamw_torch_fused), adamw_8bit "
                                                   "(= adamw_bnb_8bit), paged_adamw_32bit, paged_adamw_8bit.")):
        create_optimizer("adam_9bit", _params())
    with pytest.raises(UsageError, match="adamw_torch_8bit'? is not available: torchao's 8-bit AdamW"):
        create_optimizer("adamw_torch_8bit", _params())


@pytest.mark.parametrize("alias, ours", sorted(OPTIMIZER_ALIASES.items()))
def test_transformers_names_build_the_same_optimizer(alias, ours):
    assert OptimizerNames(alias)  # a name transformers' optim takes
    by_alias, by_name = create_optimizer(alias, _params()), create_optimizer(ours, _params())
    assert type(by_alias) is type(by_name)
    assert (by_alias.state_bits, by_alias.paged) == (by_name.state_bits, by_name.paged)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(momentum=0.9), "does not take momentum"),
        (dict(state_bits=8), "does not take state_bits"),
        (dict(lr=-1.0), "lr must be"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(amsgrad=True), "amsgrad"),
        (dict(page_budget_bytes=1024), "paged"),
    ],
)
def test_bad_arguments_raise_clear_errors(kw, match):
    """qlora's UsageError, as the rest of the API raises for bad input; a ValueError still, as torch's optimizers
    raise for theirs."""
    with pytest.raises(UsageError, match=match) as caught:
        create_optimizer("adamw", _params(), **kw)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("kw, match", [(dict(page_bytes=0), "page_bytes must be positive"),
                                       (dict(page_bytes=8192, page_budget_bytes=8192), "at least 2")])
def test_bad_paging_options_raise_usage_errors(kw, match):
    with pytest.raises(UsageError, match=match):
        create_optimizer("paged_adamw_32bit", _params(), **kw)


def test_page_too_small_for_a_quantization_block():
    params = [torch.nn.Parameter(torch.randn(8192))]
    opt = create_optimizer("paged_adamw_8bit", params, page_bytes=256, page_budget_bytes=4096)
    params[0].grad = torch.randn(8192)
    with pytest.raises(ValueError, match="cannot hold one 8-bit quantization block"):
        opt.step()


@pytest.mark.parametrize("name", ["adamw", "paged_adamw_32bit", "paged_adamw_8bit"])
def test_a_complex_parameter_is_refused_not_stepped_as_its_real_part(name):
    """The moments are real: stepping a complex parameter would drop its imaginary part, where torch's AdamW
    updates both parts. Refused when the parameter is given, in the constructor or a later group."""
    complex_param = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    with pytest.raises(UsageError, match=r"real floating-point parameters; got a torch.complex64 parameter"):
        create_optimizer(name, [complex_param])
    opt = create_optimizer(name, _params())
    with pytest.raises(UsageError, match="torch.view_as_real"):
        opt.add_param_group({"params": [complex_param], "lr": 1e-3})
    assert len(opt.param_groups) == 1  # the refused group is not kept
