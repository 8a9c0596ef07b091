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

Llama 4's experts predate those flags: ``gate_up_proj`` ``(E, H, 2I)`` and
``down_proj`` ``(E, I, H)``, applied as ``x @ W`` by a ``forward(hidden_states)``
that receives every expert's copy of the tokens, already scaled by the router
(zero rows for tokens routed elsewhere). :func:`experts_layout` recognises that
shape too (``prerouted``); such a module is run expert by expert on its non-zero
rows only, which is exact, since a zero row maps to a zero row.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .linear4bit import Linear4bit

_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertsLayout:
    """How an experts module stores and applies its 3-D weights."""

    names: tuple[str, ...]  # its 3-D weights, in registration order
    has_gate: bool  # a gate_up_proj whose two halves are gated (else up_proj and an activation)
    is_transposed: bool  # each expert's weight is (in, out), applied as x @ W
    has_post_expert_norm: bool = False
    prerouted: bool = False  # forward(hidden_states (E*T, H)): each expert's rows, router-scaled (Llama 4)


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of a transformers experts module (or of an :class:`Experts4bit`), None for any other module."""
    layout = getattr(module, "layout", None)
    if isinstance(layout, ExpertsLayout):
        return layout
    params = {n: p for n, p in module._parameters.items() if p is not None}
    if all(hasattr(module, flag) for flag in ("has_gate", "has_bias", "is_transposed")):
        names = tuple(n for n in params if n in _WEIGHTS and params[n].dim() == 3)
        if set(params) - set(names) - {n + "_bias" for n in names}:
            return None  # a tensor whose role Experts4bit does not know (scales...): the module stays as it is
        if "down_proj" not in names or len(names) != 2:
            return None
        return ExpertsLayout(names, bool(module.has_gate), bool(module.is_transposed),
                             bool(getattr(module, "has_post_expert_norm", False)))
    if list(params) != ["gate_up_proj", "down_proj"] or not hasattr(module, "act_fn"):
        return None
    gate_up, down = params["gate_up_proj"], params["down_proj"]
    if gate_up.dim() != 3 or down.dim() != 3 or list(inspect.signature(type(module).forward).parameters)[1:] != [
            "hidden_states"]:
        return None
    experts, hidden, inner2 = gate_up.shape
    if tuple(down.shape) != (experts, inner2 // 2, hidden) or inner2 % 2:
        return None
    return ExpertsLayout(("gate_up_proj", "down_proj"), has_gate=True, is_transposed=True, prerouted=True)


def expert_weight_names(module: nn.Module) -> tuple[str, ...]:
    """Names of the 3-D expert weights of a transformers experts module, ``()`` for any other module."""
    layout = experts_layout(module)
    return layout.names if layout is not None else ()


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


def _split_gate(act_fn: Callable, gate_up: torch.Tensor) -> torch.Tensor:
    """transformers' default gate: ``act(gate) * up`` of the two halves of the gate_up projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act_fn(gate) * up


def gating(experts: nn.Module) -> tuple[Callable, nn.Module | None]:
    """The source experts module's gate (``_apply_gate``) or activation, and its post-expert norm (or None)."""
    source = getattr(experts, "_source", experts)
    layout = experts_layout(experts)
    if not layout.has_gate:
        gate = source.act_fn
    else:
        gate = getattr(source, "_apply_gate", None) or (lambda h: _split_gate(source.act_fn, h))
    norm = experts.post_expert_norm if layout.has_post_expert_norm else None
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
    up_name = "gate_up_proj" if experts_layout(experts).has_gate else "up_proj"
    for expert in hit:
        token_idx, k_pos = torch.where(top_k_index == expert)
        h = gate(project(hidden_states[token_idx], up_name, expert))
        h = project(h, "down_proj", expert)
        if norm is not None:
            h = norm(h)
        h = h * top_k_weights[token_idx, k_pos, None]
        out.index_add_(0, token_idx, h.to(out.dtype))
    return out


def run_prerouted(experts: nn.Module, num_experts: int, hidden_states: torch.Tensor,
                  project: Callable[[torch.Tensor, str, int], torch.Tensor]) -> torch.Tensor:
    """Llama 4's experts on ``(E * T, H)`` rows, expert ``e`` taking rows ``e*T .. (e+1)*T``: each
    expert runs on its non-zero rows only (a token routed elsewhere is a zero row, whose output is zero)."""
    gate, _ = gating(experts)
    out = torch.zeros_like(hidden_states)
    rows = hidden_states.shape[0] // num_experts
    with torch.no_grad():
        active = hidden_states.view(num_experts, rows, -1).ne(0).any(-1)
    for expert in torch.nonzero(active.any(-1)).flatten().tolist():
        idx = torch.nonzero(active[expert]).flatten() + expert * rows
        h = project(gate(project(hidden_states[idx], "gate_up_proj", expert)), "down_proj", expert)
        out.index_add_(0, idx, h.to(out.dtype))
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
        layout = experts_layout(experts)
        if layout is None:
            raise ValueError(f"{type(experts).__name__} is not a transformers experts module with 3-D weights")
        self.layout = layout
        self.weight_names = names = layout.names
        self.is_transposed = layout.is_transposed
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
        self._arg_names = None if layout.prerouted else routing_arg_names(experts)

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
        if self.layout.prerouted:
            return run_prerouted(self, self.num_experts, hidden_states, self._project)
        top_k_index, top_k_weights = routing(self._arg_names, args, kwargs)
        return run_experts(self, self.num_experts, hidden_states, top_k_index, top_k_weights, self._project)

    def extra_repr(self) -> str:
        layer = getattr(self, self.weight_names[0])[0]
        biases = [n for n in self.weight_names if getattr(self, n + "_bias", None) is not None]
        return (f"num_experts={self.num_experts}, weights={list(self.weight_names)}, has_gate={self.layout.has_gate}, "
                f"biases={biases}, is_transposed={self.is_transposed}, {layer.quant_type}, "
                f"blocksize={layer.blocksize}")
