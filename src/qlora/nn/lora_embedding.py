"""LoraEmbedding: low-rank adapters on a frozen token embedding (PEFT's LoRA ``Embedding``).

``y = base(x) + sum_a  w_a * scale_a * embed(x, A_a^T) @ B_a^T``: A is ``[r, vocab]``
and B ``[dim, r]``, the transpose of a linear layer's, so that one token reads one
column of A. As in PEFT, A starts at zero and B random (the reverse of a linear
layer, where a zero A would leave B without gradient), there is no dropout (a
dropped token id is not a thing), and an embedding that scales its output in
``forward`` (Gemma's ``embed_scale``) scales the adapter's share too.

DoRA, as PEFT applies it to an embedding: a trained magnitude per embedding
dimension over the column norms of the adapted table, ``W' = m * (W + s (BA)^T) /
||W + s (BA)^T||_col``, the norm detached; the adapter adds ``(m/n - 1) * base(x) +
(m/n) * s * embed(x, A^T) @ B^T``.

Parameters are ``lora_embedding_A.<name>``, ``lora_embedding_B.<name>`` and
``lora_magnitude_vector.<name>.weight``, PEFT's keys, so adapter files translate one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import AdapterSlots, LoraSpec, Magnitude, check_new_adapter, folded, to_merge, unfolded


class LoraEmbedding(AdapterSlots):
    """A frozen ``nn.Embedding`` (or a subclass) with any number of named LoRA adapters."""

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"LoraEmbedding wraps an nn.Embedding, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        base_layer.weight.requires_grad_(False)
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self._dora_scale: dict[str, torch.Tensor] = {}  # m / ||W + delta||_col of merged DoRA adapters, to unmerge

    @property
    def weight(self) -> torch.Tensor:
        """The base table: model code (weight tying, ``get_input_embeddings().weight``) reads it."""
        return self.base_layer.weight

    def add_adapter(self, name: str, spec: LoraSpec) -> None:
        check_new_adapter(self.specs, name, spec)
        if spec.lora_bias or spec.init in ("loftq", "olora") or spec.init.startswith("pissa"):
            what = "lora_bias" if spec.lora_bias else f"init={spec.init!r}"
            raise ValueError(f"LoRA on an embedding does not support {what} here; adapt only linear layers with "
                             "it, or train the embedding whole (modules_to_save)")
        w = self.base_layer.weight
        self.lora_embedding_A[name] = nn.Parameter(torch.zeros(spec.r, self.num_embeddings, device=w.device,
                                                               dtype=spec.dtype))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(self.embedding_dim, spec.r, device=w.device,
                                                               dtype=spec.dtype))
        self.specs[name] = spec
        self.reset_adapter(name)
        if spec.use_dora:
            self.lora_magnitude_vector[name] = Magnitude(self._weight_norm(name).to(spec.dtype))
        if not self.active:
            self.active = {name: 1.0}

    @torch.no_grad()
    def reset_adapter(self, name: str) -> None:
        nn.init.zeros_(self.lora_embedding_A[name])
        nn.init.normal_(self.lora_embedding_B[name])

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise ValueError(f"unmerge adapter {name!r} before deleting it")
        del self.lora_embedding_A[name], self.lora_embedding_B[name], self.specs[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self.active.pop(name, None)

    # --- math ---------------------------------------------------------------
    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale * (B @ A)^T`` as a ``[vocab, dim]`` float32 table."""
        a, b = self.lora_embedding_A[name].float(), self.lora_embedding_B[name].float()
        return (b @ a).t() * self.specs[name].scaling

    @torch.no_grad()
    def _weight_norm(self, name: str) -> torch.Tensor:
        """DoRA's per-dimension ``||W + delta||`` over the vocabulary (float32, detached, as PEFT's)."""
        return torch.linalg.norm(self.base_layer.weight.float() + self.delta_weight(name), dim=0)

    def _embed_scale(self) -> torch.Tensor | float | None:
        return getattr(self.base_layer, "embed_scale", None)

    def _adapter_out(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to the base output ``y`` of token ids ``x``."""
        base = self.base_layer
        after_a = F.embedding(x, self.lora_embedding_A[name].t(), padding_idx=base.padding_idx,
                              max_norm=base.max_norm, norm_type=base.norm_type,
                              scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        out = (after_a @ self.lora_embedding_B[name].t()) * self.specs[name].scaling
        scale = self._embed_scale()
        if scale is not None:
            out = out * (scale.to(out.dtype) if isinstance(scale, torch.Tensor) else scale)
        if name in self.lora_magnitude_vector:
            ratio = self.lora_magnitude_vector[name].weight / self._weight_norm(name)
            out = (ratio - 1) * y + ratio * out
        return out.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        if self.row_adapters is not None:
            if len(self.row_adapters) != x.shape[0]:
                raise ValueError(f"{len(self.row_adapters)} row adapters for a batch of {x.shape[0]} rows")
            if self.merged:
                raise ValueError("per-row adapters need unmerged adapters; unmerge first")
            for name in dict.fromkeys(self.row_adapters):
                if name in self.specs:
                    rows = torch.tensor([i for i, n in enumerate(self.row_adapters) if n == name], device=x.device)
                    y = y.index_add(0, rows, self._adapter_out(name, x[rows], y[rows]))
            return y
        out = y  # each adapter's DoRA term scales the base output, not what other adapters added to it
        for name, weight in self.active.items():
            if name not in self.merged and weight != 0:
                out = out + self._adapter_out(name, x, y) * weight
        return out

    # --- merge --------------------------------------------------------------
    def merged_weight(self, names: list[str]) -> torch.Tensor:
        """The float32 table with adapters ``names`` (weighted as in :attr:`active`) folded in."""
        with torch.no_grad():
            return folded(self, self.base_layer.weight.detach().float(), names, norm_dim=0)[0]

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Fold adapters ``names`` (default: the active ones) into the base table, keeping each DoRA adapter's
        column ratios for :meth:`unmerge`."""
        names = to_merge(self, names)
        if not names:
            return
        w = self.base_layer.weight
        merged, self._dora_scale = folded(self, w.detach().float(), names, norm_dim=0)
        w.copy_(merged.to(w.dtype))
        self.merged += names

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (DoRA's column ratios as :meth:`LoraLinear.unmerge` undoes its row ratios)."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_(unfolded(self, w.float(), norm_dim=0).to(w.dtype))
        self.merged, self._dora_scale = [], {}

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={s.r}{', dora' if s.use_dora else ''}" for n, s in self.specs.items())
        return f"adapters=[{ranks}], active={list(self.active)}"
