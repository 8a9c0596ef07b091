"""Experts4bit: a mixture-of-experts block whose expert weights live in 4 bits.

transformers v5 stores the experts of an MoE layer as 3-D parameters
(``gate_up_proj`` ``(E, 2I, H)``, ``down_proj`` ``(E, H, I)``, or transposed),
in a module whose class is decorated by ``use_experts_implementation``: flags
``has_gate``, ``has_bias``, ``is_transposed``, ``has_post_expert_norm`` and a
gating function ``_apply_gate``. Experts are most of an MoE's weights, so they
must be 4-bit for QLoRA to pay off.

Each expert's projection is one :class:`Linear4bit`, quantized as its own
``[out, in]`` matrix (NF4/FP4, double quantization, exactly as a dense layer),
so dequantizing one expert gives that matrix and the backward pass saves no
16-bit weight. The forward pass mirrors transformers' eager experts loop: only
the experts some token was routed to run, one at a time, so at most one
expert's 16-bit weight exists at once. The gate is the replaced module's own
``_apply_gate`` (GPT-OSS clamps and scales it; others split gate and up), and
its post-expert norm is reused as a submodule, so the maths stay transformers'.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from .linear4bit import Linear4bit

_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


def expert_weight_names(module: nn.Module) -> tuple[str, ...]:
    """Names of the 3-D expert weights of a transformers v5 experts module, ``()`` for any other module."""
    if not all(hasattr(module, flag) for flag in ("has_gate", "has_bias", "is_transposed")):
        return ()
    names = tuple(n for n in _WEIGHTS if isinstance(module._parameters.get(n), torch.Tensor)
                  and module._parameters[n].dim() == 3)
    known = set(names) | {n + "_bias" for n in names}
    if any(p is not None and n not in known for n, p in module._parameters.items()):
        return ()  # a tensor whose role Experts4bit does not know (scales...): the module stays as it is
    return names if "down_proj" in names and len(names) == 2 else ()


def routing_arg_names(experts: nn.Module) -> list[str]:
    """Names of ``(hidden_states, top_k_index, top_k_weights)`` in the experts module's ``forward``."""
    params = list(inspect.signature(type(experts).forward).parameters)
    if len(params) < 4:
        raise ValueError(f"{type(experts).__name__}.forward does not take (hidden_states, indices, weights)")
    return params[1:4]


def routing(arg_names: list[str], args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top_k_index, top_k_weights)`` from the arguments after ``hidden_states``."""
    if args and arg_names[0] in kwargs:
        raise TypeError("hidden_states given twice")
    values = dict(zip(arg_names[1:], args))
    values.update(kwargs)
    return values[arg_names[1]], values[arg_names[2]]


def gating(experts: nn.Module) -> tuple[Callable, nn.Module | None]:
    """The source experts module's gate (``_apply_gate``) or activation, and its post-expert norm (or None)."""
    source = getattr(experts, "_source", experts)
    gate = source._apply_gate if experts.has_gate else source.act_fn
    norm = experts.post_expert_norm if getattr(experts, "has_post_expert_norm", False) else None
    return gate, norm


def run_experts(experts: nn.Module, num_experts: int, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor, project: Callable[[torch.Tensor, str, int], torch.Tensor]) -> torch.Tensor:
    """transformers' eager experts loop: only the experts some token was routed to run, one at a
    time; ``project(x, weight_name, expert)`` applies one expert's projection (with its bias).
    ``experts`` (an :class:`Experts4bit` or transformers' module) supplies the gate and norm."""
    gate, norm = gating(experts)
    out = torch.zeros_like(hidden_states)
    with torch.no_grad():
        hit = [e for e in torch.unique(top_k_index).tolist() if 0 <= e < num_experts]
    up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    for expert in hit:
        token_idx, k_pos = torch.where(top_k_index == expert)
        h = gate(project(hidden_states[token_idx], up_name, expert))
        h = project(h, "down_proj", expert)
        if norm is not None:
            h = norm(h)
        h = h * top_k_weights[token_idx, k_pos, None]
        out.index_add_(0, token_idx, h.to(out.dtype))
    return out


class Experts4bit(nn.Module):
    """Frozen 4-bit replacement for a transformers experts module.

    Args:
        experts: the module it replaces (its 3-D weights may be on ``meta``);
            kept, outside the module tree, for its gating function.
        compute_dtype, quant_type, blocksize, double_quant: as in :class:`Linear4bit`.
        device: where the 4-bit buffers live.
    """

    def __init__(self, experts: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True, device: torch.device | str | None = None) -> None:
        super().__init__()
        names = expert_weight_names(experts)
        if not names:
            raise ValueError(f"{type(experts).__name__} is not a transformers experts module with 3-D weights")
        self.weight_names = names
        self.has_gate = bool(experts.has_gate)
        self.has_bias = bool(experts.has_bias)
        self.is_transposed = bool(experts.is_transposed)
        self.has_post_expert_norm = bool(getattr(experts, "has_post_expert_norm", False))
        first = experts._parameters[names[0]]
        self.num_experts = first.shape[0]
        for name in names:
            shape = experts._parameters[name].shape[1:]
            out_f, in_f = (shape[1], shape[0]) if self.is_transposed else (shape[0], shape[1])
            self.add_module(name, nn.ModuleList(
                Linear4bit(in_f, out_f, bias=False, compute_dtype=compute_dtype, quant_type=quant_type,
                           blocksize=blocksize, double_quant=double_quant, device=device)
                for _ in range(self.num_experts)))
            bias = experts._parameters.get(name + "_bias")
            if bias is not None:  # (E, out): small, stays dense and frozen
                self.register_parameter(name + "_bias", nn.Parameter(
                    torch.empty(bias.shape, dtype=compute_dtype, device=bias.device), requires_grad=False))
            experts._parameters[name] = None  # the 16-bit (meta) copy is not kept
        for child_name, child in experts.named_children():  # act_fn, post_expert_norm: shared, loaded here
            self.add_module(child_name, child)
        # The replaced module supplies the gating maths; not a submodule (its weights are gone).
        object.__setattr__(self, "_source", experts)
        self._arg_names = routing_arg_names(experts)

    @torch.no_grad()
    def set_weight(self, name: str, weight: torch.Tensor) -> None:
        """Quantize a 3-D expert weight (transformers' layout), one expert at a time."""
        layers = getattr(self, name)
        if weight.dim() != 3 or weight.shape[0] != len(layers):
            raise ValueError(f"{name}: expected {len(layers)} experts, got a tensor of shape {tuple(weight.shape)}")
        for e, layer in enumerate(layers):
            w = weight[e]
            layer.set_weight(w.t() if self.is_transposed else w)

    def dequantize(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The 3-D weight ``name`` in transformers' layout (for merging and tests)."""
        mats = [layer.dequantize(dtype) for layer in getattr(self, name)]
        return torch.stack([m.t() for m in mats] if self.is_transposed else mats)

    @torch.no_grad()
    def to_dense(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The replaced transformers module, holding the dequantized weights (merging)."""
        source = self._source
        for name in self.weight_names:
            weight = self.dequantize(name, dtype)
            source._parameters[name] = nn.Parameter(weight, requires_grad=False)
            bias = getattr(self, name + "_bias", None)
            if bias is not None:
                source._parameters[name + "_bias"] = nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)
        return source

    def _project(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        y = getattr(self, name)[expert](x)
        bias = getattr(self, name + "_bias", None)
        return y if bias is None else y + bias[expert].to(y.dtype)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        top_k_index, top_k_weights = routing(self._arg_names, args, kwargs)
        return run_experts(self, self.num_experts, hidden_states, top_k_index, top_k_weights, self._project)

    def extra_repr(self) -> str:
        layer = getattr(self, self.weight_names[0])[0]
        return (f"num_experts={self.num_experts}, weights={list(self.weight_names)}, has_gate={self.has_gate}, "
                f"has_bias={self.has_bias}, is_transposed={self.is_transposed}, {layer.quant_type}, "
                f"blocksize={layer.blocksize}")
