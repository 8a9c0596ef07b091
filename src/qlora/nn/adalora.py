"""AdaLoraLinear: an SVD-shaped adapter whose rank is pruned during training.

``y = base(x) + dropout(x) @ (Q * λ)^T @ P^T * alpha / (ranknum + 1e-5)`` where
``Q = lora_A`` ([r, in], right singular vectors), ``λ = lora_E`` ([r, 1],
singular values) and ``P = lora_B`` ([out, r], left singular vectors). A triplet
``(P[:, i], λ_i, Q[i])`` is pruned by zeroing ``λ_i`` (the vectors stay, so a
pruned triplet can come back while the budget still moves). ``ranknum`` is the
initial rank and never changes, so pruning does not rescale the kept triplets.

Names, initialization and scaling are PEFT's ``SVDLinear`` so adapters
translate one to one; the base may be a 4-bit :class:`Linear4bit`.
"""

from __future__ import annotations

import torch
from torch import nn

from .linear4bit import Linear4bit
from .lora import dense_shape


class AdaLoraLinear(nn.Module):
    """A frozen linear base with one AdaLoRA adapter named ``adapter_name``."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 adapter_name: str = "default", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"AdaLoRA initial rank must be positive, got {r}")
        self.in_features, self.out_features, self.fan_in_fan_out = dense_shape(base_layer)
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.adapter_name = adapter_name
        self.ranknum = float(r)
        self.scaling = float(alpha) if alpha > 0 else float(r)
        device = next((t.device for t in base_layer.buffers()), None) or next(
            (t.device for t in base_layer.parameters()), None)
        self.lora_A = nn.ParameterDict({adapter_name: nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))})
        self.lora_B = nn.ParameterDict({adapter_name: nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))})
        self.lora_E = nn.ParameterDict({adapter_name: nn.Parameter(torch.zeros(r, 1, device=device, dtype=dtype))})
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.row_adapters: list[str | None] | None = None  # per batch row adapter (see qlora.model.multi_adapter)
        with torch.no_grad():
            nn.init.normal_(self.A, std=0.02)
            nn.init.normal_(self.B, std=0.02)

    @property
    def A(self) -> nn.Parameter:
        return self.lora_A[self.adapter_name]

    @property
    def B(self) -> nn.Parameter:
        return self.lora_B[self.adapter_name]

    @property
    def E(self) -> nn.Parameter:
        return self.lora_E[self.adapter_name]

    @torch.no_grad()
    def resize(self, keep: list[bool]) -> None:
        """Drop the triplets where ``keep`` is False (a saved, pruned adapter has only the kept ones)."""
        idx = torch.tensor(keep, dtype=torch.bool, device=self.A.device)
        name = self.adapter_name
        self.lora_A[name] = nn.Parameter(self.A[idx].clone(), requires_grad=self.A.requires_grad)
        self.lora_B[name] = nn.Parameter(self.B[:, idx].clone(), requires_grad=self.B.requires_grad)
        self.lora_E[name] = nn.Parameter(self.E[idx].clone(), requires_grad=self.E.requires_grad)

    def delta_weight(self) -> torch.Tensor:
        """``P @ (Q * λ) * scale / ranknum`` as an ``[out, in]`` float32 matrix."""
        return (self.B.float() @ (self.A.float() * self.E.float())) * self.scaling / (self.ranknum + 1e-5)

    def base_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[out, in]`` weight of the base layer."""
        if isinstance(self.base_layer, Linear4bit):
            return self.base_layer.dequantize(dtype)
        w = self.base_layer.weight.detach()
        return (w.t() if self.fan_in_fan_out else w).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        if self.row_adapters is None:
            return y + self._delta(x).to(y.dtype)
        if len(self.row_adapters) != x.shape[0]:
            raise ValueError(f"{len(self.row_adapters)} row adapters for a batch of {x.shape[0]} rows")
        rows = [i for i, name in enumerate(self.row_adapters) if name == self.adapter_name]
        if not rows:  # rows of the base or of other adapters: the base alone here
            return y
        rows = torch.tensor(rows, device=x.device)
        return y.index_add(0, rows, self._delta(x[rows]).to(y.dtype))

    def _delta(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            h = h.to(self.A.dtype)
        return (h @ (self.A * self.E).T @ self.B.T) * self.scaling / (self.ranknum + 1e-5)

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_name!r}, init_r={int(self.ranknum)}, r={self.A.shape[0]}"
