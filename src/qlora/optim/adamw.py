"""AdamW with 32-bit or 8-bit moments, optionally paged.

The update is torch.optim.AdamW's (decoupled weight decay, bias correction, no
amsgrad). 32-bit moments are updated with ``torch._foreach`` ops in the order
torch's foreach implementation uses, so results agree with it to rounding.
8-bit moments follow :mod:`qlora.optim.state8bit`. Parameters with fewer than
``min_8bit_size`` elements keep 32-bit moments: for them quantization would
save almost nothing and cost accuracy.

State lives in a store (see :mod:`qlora.optim.state_store`); ``state_dict``
returns plain CPU tensors whatever the store, keyed like torch
(``step``, ``exp_avg``, ``exp_avg_sq``; 8-bit: ``exp_avg_codes``,
``exp_avg_absmax``, ``exp_avg_sq_codes``, ``exp_avg_sq_absmax``), so a
checkpoint loads on any device and into a paged or resident optimizer alike.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..errors import UsageError
from . import moments
from .pager import DEFAULT_PAGE_BYTES, DEFAULT_SAFETY_MARGIN_BYTES, Pager, page_slots
from .state8bit import adamw_update_8bit
from .state_store import Batch, Chunk, PagedStore, ResidentStore

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


def _adamw_update_32bit(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_size = (lr / (1 - beta1**step)) * -1
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, (1 - beta2**step) ** 0.5)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)


class AdamW(torch.optim.Optimizer):
    """AdamW whose moments are 32-bit or 8-bit, resident or paged.

    Args:
        params: parameters or parameter groups (dicts), as for torch optimizers.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
        state_bits: 32 or 8.
        paged: keep the moments in pages that a :class:`Pager` moves between
            the device and pinned host memory.
        min_8bit_size: parameters smaller than this keep 32-bit moments.
        page_budget_bytes: device bytes the pages may use (paged only);
            ``None``: free device memory minus ``safety_margin_bytes``
            (unlimited on CPU, where paging is then a no-op).
        page_bytes: size of one page.
        safety_margin_bytes: device memory a derived budget leaves free.

    Raises:
        UsageError (a ValueError): for out-of-range hyperparameters or unsupported options.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        state_bits: int = 32,
        paged: bool = False,
        min_8bit_size: int = 4096,
        page_budget_bytes: int | None = None,
        page_bytes: int = DEFAULT_PAGE_BYTES,
        safety_margin_bytes: int = DEFAULT_SAFETY_MARGIN_BYTES,
        amsgrad: bool = False,
    ) -> None:
        if not lr >= 0.0:
            raise UsageError(f"lr must be >= 0, got {lr}")
        if not eps >= 0.0:
            raise UsageError(f"eps must be >= 0, got {eps}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise UsageError(f"betas must be two values in [0, 1), got {betas}")
        if not weight_decay >= 0.0:
            raise UsageError(f"weight_decay must be >= 0, got {weight_decay}")
        if state_bits not in (32, 8):
            raise UsageError(f"state_bits must be 32 or 8, got {state_bits}")
        if amsgrad:
            raise UsageError("amsgrad is not supported")
        if not paged and page_budget_bytes is not None:
            raise UsageError("page_budget_bytes applies only to a paged optimizer (paged=True)")
        if paged:
            page_slots(page_bytes, page_budget_bytes)  # the pager is made at the first step
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.state_bits = state_bits
        self.paged = paged
        self.min_8bit_size = min_8bit_size
        self._pager_options = dict(
            budget_bytes=page_budget_bytes, page_bytes=page_bytes, safety_margin_bytes=safety_margin_bytes
        )
        self._stores: dict[torch.device, ResidentStore | PagedStore] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's, refusing a parameter that is not real floating point: the moments and the update are real (a
        complex one would silently lose its imaginary part, which torch's AdamW updates as a second real value)."""
        super().add_param_group(param_group)
        wrong = [p for p in self.param_groups[-1]["params"] if not p.is_floating_point()]
        if wrong:
            self.param_groups.pop()
            raise UsageError(f"{type(self).__name__} updates real floating-point parameters; got a {wrong[0].dtype} "
                             f"parameter of shape {tuple(wrong[0].shape)}. Train it as its real and imaginary parts "
                             "(torch.view_as_real) or with torch.optim.AdamW.")

    def pager(self, device: torch.device | str) -> Pager | None:
        """The pager of ``device``'s states (``None`` unless paged and in use)."""
        store = self._stores.get(torch.device(device))
        return store.pager if isinstance(store, PagedStore) else None

    def _store(self, device: torch.device) -> ResidentStore | PagedStore:
        if device not in self._stores:
            self._stores[device] = PagedStore(Pager(device, **self._pager_options)) if self.paged else ResidentStore()
        return self._stores[device]

    def _bits_for(self, p: torch.Tensor) -> int:
        return 8 if self.state_bits == 8 and p.numel() >= self.min_8bit_size else 32

    def _init_state(self, p: torch.Tensor, bits: int) -> dict[str, Any]:
        if not p.is_contiguous():
            p.data = p.data.contiguous()
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        state["chunks"] = self._store(p.device).allocate(p, bits)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One AdamW step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        chunks_by_device: dict[torch.device, list[Chunk]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("AdamW does not support sparse gradients")
                state = self.state[p] if p in self.state else self._init_state(p, self._bits_for(p))
                state["step"] += 1
                chunks_by_device.setdefault(p.device, []).extend(state["chunks"])
        hyper = {id(p): group for group in self.param_groups for p in group["params"]}
        for device, chunks in chunks_by_device.items():
            for batch in self._store(device).batches(chunks):
                self._update(batch, hyper)
        return loss

    @staticmethod
    def _hyperparameters(group: dict[str, Any]) -> tuple[float, float, float, float, float]:
        """(lr, beta1, beta2, eps, weight_decay) of a group as Python floats: torch optimizers also take the
        learning rate (and betas) as tensors, which a scheduler or ``torch.compile`` may have put there."""
        beta1, beta2 = group["betas"]
        return tuple(float(v) for v in (group["lr"], beta1, beta2, group["eps"], group["weight_decay"]))

    def _update(self, batch: Batch, hyper: dict[int, dict[str, Any]]) -> None:
        """Update every chunk of a batch; 32-bit chunks sharing hyperparameters
        and step go through one foreach call."""
        fused: dict[tuple[int, float], list[tuple[Chunk, dict[str, torch.Tensor]]]] = {}
        for chunk, m in batch:
            group = hyper[id(chunk.param)]
            step = int(self.state[chunk.param]["step"].item())
            if chunk.bits == 8:
                adamw_update_8bit(
                    chunk.param.view(-1)[chunk.start:chunk.stop], chunk.param.grad.reshape(-1)[chunk.start:chunk.stop],
                    m, step, *self._hyperparameters(group),
                )
            else:
                fused.setdefault((id(group), step), []).append((chunk, m))
        for (gid, step), items in fused.items():
            group = next(g for g in self.param_groups if id(g) == gid)
            params = [c.param.view(-1)[c.start:c.stop] for c, _ in items]
            work = [p if p.dtype == torch.float32 else p.float() for p in params]
            grads = [c.param.grad.reshape(-1)[c.start:c.stop].float() for c, _ in items]
            _adamw_update_32bit(
                work, grads, [m["exp_avg"] for _, m in items], [m["exp_avg_sq"] for _, m in items],
                step, *self._hyperparameters(group),
            )
            for p, w in zip(params, work):
                if w is not p:
                    p.copy_(w)

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters and moments as plain CPU tensors, each shaped like its
        parameter (``*_absmax``: one value per 256-element block)."""
        packed = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        index = {id(p): i for i, p in enumerate(params)}
        packed["state"] = {index[id(p)]: self._export(p, s) for p, s in self.state.items()}
        return packed

    def _export(self, p: torch.Tensor, state: dict[str, Any]) -> dict[str, torch.Tensor]:
        chunks = state["chunks"]
        parts = self._store(p.device).read(chunks)
        out = {"step": state["step"].clone()}
        for key in parts[0]:
            flat = torch.cat([part[key].cpu() for part in parts])
            out[key] = flat.reshape(p.shape) if key in ("exp_avg", "exp_avg_sq", "exp_avg_codes", "exp_avg_sq_codes") else flat
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore hyperparameters and moments (from any device, into this
        optimizer's resident or paged storage).

        Raises:
            ValueError: if the groups do not match or a state has unknown keys.
        """
        super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        self._stores = {}  # the old pages belong to the state just dropped
        params = [p for g in self.param_groups for p in g["params"]]
        for i, saved in state_dict["state"].items():
            self._restore(params[int(i)], saved, f"parameter {i}")

    def _restore(self, p: torch.Tensor, saved: dict[str, torch.Tensor], label: str) -> None:
        """Give ``p`` the moments of ``saved`` (as :meth:`_export` writes them), in this optimizer's storage."""
        keys = set(saved) - {"step"}
        bits = {frozenset(moments.KEYS_32BIT): 32, frozenset(moments.KEYS_8BIT): 8}.get(frozenset(keys))
        if bits is None:
            raise ValueError(f"state of {label} has keys {sorted(saved)}; not an AdamW state")
        state = self._init_state(p, bits)
        state["step"] = saved["step"].detach().to("cpu", torch.float32).clone()
        values = []
        for chunk in state["chunks"]:
            blocks = slice(chunk.start // moments.QUANT_BLOCK, -(-chunk.stop // moments.QUANT_BLOCK))
            values.append({
                k: saved[k].reshape(-1)[blocks if k.endswith("absmax") else slice(chunk.start, chunk.stop)]
                for k in keys
            })
        self._store(p.device).write(state["chunks"], values)

    _OPTIONS = ("state_bits", "paged", "min_8bit_size", "_pager_options")

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and pickle (torch's keeps only defaults, state and groups): the options too, and
        each parameter's moments as plain tensors; their pages are rebuilt on load, as by :meth:`load_state_dict`."""
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in self._OPTIONS},
                "state": {p: self._export(p, s) for p, s in self.state.items()}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        saved = state.pop("state")
        super().__setstate__({**state, "state": defaultdict(dict)})
        self._stores = {}
        for p, moments_of_p in saved.items():
            self._restore(p, moments_of_p, f"a parameter of shape {tuple(p.shape)}")


class AdamW8bit(AdamW):
    """AdamW with 8-bit blockwise-quantized moments, resident on the device."""

    def __init__(self, params: ParamsT, lr: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(params, lr, **kwargs, state_bits=8)


class PagedAdamW(AdamW):
    """AdamW with 32-bit moments in pages that move to CPU memory under pressure."""

    def __init__(self, params: ParamsT, lr: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(params, lr, **kwargs, paged=True)


class PagedAdamW8bit(AdamW):
    """AdamW with 8-bit moments in pages that move to CPU memory under pressure."""

    def __init__(self, params: ParamsT, lr: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(params, lr, **kwargs, state_bits=8, paged=True)
