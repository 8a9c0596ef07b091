"""LoraLinear: low-rank adapters on a frozen linear layer.

``y = base(x) + sum_a  w_a * scale_a * B_a(A_a(dropout_a(x)))`` with
``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). The base may be a
:class:`~qlora.nn.linear4bit.Linear4bit`, an ``nn.Linear``, or GPT-2's
``Conv1D`` (a linear layer stored transposed: ``fan_in_fan_out``).

The module layout (``base_layer``, ``lora_A.<name>``, ``lora_B.<name>``,
``lora_dropout.<name>``) is PEFT's, so adapter keys translate one to one.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .linear4bit import Linear4bit


@dataclass(frozen=True)
class LoraSpec:
    """Hyper-parameters of one adapter, as users know them from PEFT."""

    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"  # "kaiming" (A Kaiming-uniform, B zeros) | "gaussian" (A ~ N(0, 1/r), B zeros)
    dtype: torch.dtype = torch.float32

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def _dense_shape(base: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a linear-like base."""
    if isinstance(base, (nn.Linear, Linear4bit)):
        return base.in_features, base.out_features, False
    if type(base).__name__ == "Conv1D":  # transformers' GPT-2 Conv1D: weight [in, out]
        in_f, out_f = base.weight.shape
        return in_f, out_f, True
    raise TypeError(f"LoRA can wrap nn.Linear, Linear4bit or Conv1D, not {type(base).__name__}")


class LoraLinear(nn.Module):
    """A frozen linear base with any number of named LoRA adapters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = _dense_shape(base_layer)
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.specs: dict[str, LoraSpec] = {}
        self.active: dict[str, float] = {}  # adapter name -> combination weight
        self.disabled = False
        self.merged: list[str] = []

    # --- adapters -----------------------------------------------------------
    def add_adapter(self, name: str, spec: LoraSpec) -> None:
        if name in self.specs:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if spec.r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {spec.r}")
        device = next((t.device for t in self.base_layer.buffers()), None) or next(
            (t.device for t in self.base_layer.parameters()), None)
        a = nn.Linear(self.in_features, spec.r, bias=False, device=device, dtype=spec.dtype)
        b = nn.Linear(spec.r, self.out_features, bias=False, device=device, dtype=spec.dtype)
        self.lora_A[name], self.lora_B[name] = a, b
        self.lora_dropout[name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.specs[name] = spec
        self.reset_adapter(name)
        if not self.active:
            self.active = {name: 1.0}

    @torch.no_grad()
    def reset_adapter(self, name: str) -> None:
        spec = self.specs[name]
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if spec.init == "gaussian":
            nn.init.normal_(a, std=1.0 / spec.r)
        elif spec.init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:
            raise ValueError(f"unknown LoRA init {spec.init!r}; use 'kaiming' or 'gaussian'")
        nn.init.zeros_(b)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise ValueError(f"unmerge adapter {name!r} before deleting it")
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        del self.specs[name]
        self.active.pop(name, None)

    def set_active(self, weights: dict[str, float]) -> None:
        """Activate adapters with combination weights (``{"a": 1.0}`` for one)."""
        unknown = set(weights) - set(self.specs)
        if unknown:
            raise KeyError(f"unknown adapter(s) {sorted(unknown)}; this layer has {sorted(self.specs)}")
        self.active = dict(weights)

    @contextlib.contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        prev, self.disabled = self.disabled, True
        try:
            yield
        finally:
            self.disabled = prev

    # --- math ---------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * B @ A`` as an ``[out, in]`` float32 matrix."""
        a = self.lora_A[name].weight.float()
        b = self.lora_B[name].weight.float()
        return (b @ a) * self.specs[name].scaling

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[out, in]`` weight of the base layer."""
        base = self.base_layer
        if isinstance(base, Linear4bit):
            return base.dequantize(dtype)
        w = base.weight.detach()
        return (w.t() if self.fan_in_fan_out else w).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        for name, weight in self.active.items():
            if name in self.merged or weight == 0:
                continue
            a = self.lora_A[name]
            h = self.lora_dropout[name](x)
            if not torch.is_autocast_enabled(x.device.type):
                h = h.to(a.weight.dtype)
            out = self.lora_B[name](a(h)) * (self.specs[name].scaling * weight)
            y = y + out.to(y.dtype)
        return y

    # --- merge --------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Fold adapters into the base weight (re-quantized if the base is 4-bit)."""
        names = [n for n in (names or list(self.active)) if n not in self.merged]
        if not names:
            return
        w = self.base_weight(torch.float32)
        for n in names:
            w = w + self.delta_weight(n) * self.active.get(n, 1.0)
        self._write_base(w)
        self.merged += names

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base_weight(torch.float32)
        for n in self.merged:
            w = w - self.delta_weight(n) * self.active.get(n, 1.0)
        self._write_base(w)
        self.merged = []

    def _write_base(self, w: torch.Tensor) -> None:
        base = self.base_layer
        if isinstance(base, Linear4bit):
            base.set_weight(w)
        else:
            target = w.t() if self.fan_in_fan_out else w
            base.weight.data.copy_(target.to(base.weight.dtype))

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={s.r}" for n, s in self.specs.items())
        return f"adapters=[{ranks}], active={list(self.active)}"
