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

Some experts modules have a layout of their own, which no flag describes; each is
described here as its ``forward`` slices its weights (:data:`_DESCRIBED`):

- DBRX (``DbrxExperts``): ``mlp.w1``, ``mlp.v1``, ``mlp.w2``, each 2-D ``(E * I, H)``,
  viewed ``(E, I, H)``; expert ``e`` computes ``(act(x w1_e^T) * (x v1_e^T)) w2_e``, so
  ``w2_e`` is applied transposed (``x @ W``), ``w1``/``v1`` as linear weights.
- JetMoE (``JetMoeParallelExperts``, in its MoE and its mixture of attention heads):
  one ``weight`` ``(E, out, in)``; ``forward(inputs, expert_size)`` takes rows sorted by
  expert and applies expert ``e`` to its ``expert_size[e]`` rows (the gating is the
  parent's).
- LongCat-Flash (``LongcatFlashExperts``): Mixtral-like ``gate_up_proj``/``down_proj``, but
  router indices ``E .. E + zero_expert_num`` are identity experts, and ``gate_up_proj`` has a
  slice for each of them that the forward never reads (not stored; zeros when dense again).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .linear4bit import Linear4bit

_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertsLayout:
    """How an experts module stores and applies its expert weights."""

    names: tuple[str, ...]  # its expert weights (paths in the module: DBRX's "mlp.w1"), in registration order
    has_gate: bool  # a gate_up_proj whose two halves are gated (else up_proj and an activation)
    is_transposed: bool  # each expert's weight is (in, out), applied as x @ W
    has_post_expert_norm: bool = False
    prerouted: bool = False  # forward(hidden_states (E*T, H)): each expert's rows, router-scaled (Llama 4)
    grouped: bool = False  # forward(inputs, expert_size): rows sorted by expert, one projection, no gate (JetMoE)
    gate: str | None = None  # a separate gate projection: act(x gate_e^T) * (x up_e^T) (DBRX's mlp.w1)
    up: str | None = None  # the up (or fused gate-up) projection when not named gate_up_proj / up_proj
    down: str = "down_proj"
    act: str = "act_fn"  # path of the activation in the module
    rows: int = 0  # > 0: each weight 2-D (E * rows, cols), expert e its rows e*rows .. (e+1)*rows (DBRX)
    transposed: tuple[str, ...] = ()  # weights applied as x @ W_e in a layout that is not is_transposed (DBRX's w2)
    identity_experts: int = 0  # router indices E .. E + n are identity experts (LongCat-Flash's zero experts)
    routing: tuple[str, ...] = ()  # forward's (indices, weights) arguments when not its 2nd and 3rd (4.x's DBRX)

    @property
    def up_name(self) -> str:
        return self.up or ("gate_up_proj" if self.has_gate else "up_proj")

    def applied_transposed(self, name: str) -> bool:
        """Whether expert weight ``name`` is stored ``(in, out)`` per expert and applied as ``x @ W``."""
        return self.is_transposed or name in self.transposed

    @property
    def standard(self) -> bool:
        """A layout PEFT's ``target_parameters`` adapts as qlora's :class:`ExpertsLora` does: 3-D weights, one
        slice per routed expert, applied by transformers' experts loop (or Llama 4's)."""
        return not (self.grouped or self.gate or self.rows or self.transposed or self.identity_experts)


def _owner(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module holding the parameter at ``path`` (DBRX's ``mlp.w1``: ``mlp``), and the parameter's name there."""
    owner, _, leaf = path.rpartition(".")
    return (module.get_submodule(owner) if owner else module), leaf


def expert_weight(module: nn.Module, path: str) -> torch.Tensor | None:
    """The expert weight at ``path`` (DBRX's ``mlp.w1``) of a transformers experts module."""
    owner, leaf = _owner(module, path)
    return owner._parameters.get(leaf)


def _dbrx(module: nn.Module) -> ExpertsLayout | None:
    """DbrxExperts.forward: ``mlp.{w1,v1,w2}.view(-1, ffn_hidden_size, hidden_size)[e]`` and
    ``DbrxExpertGLU.forward``: ``(act(x @ w1.T) * (x @ v1.T)) @ w2``. transformers 4.x's keeps the sizes on its
    ``mlp`` and is called ``forward(x, weights, top_weights, top_experts)`` (``weights``: every expert's router
    probability); the maths and the checkpoint are the same."""
    names = ("mlp.w1", "mlp.v1", "mlp.w2")
    legacy = not hasattr(module, "num_experts")
    holder, count_name = (getattr(module, "mlp", None), "moe_num_experts") if legacy else (module, "num_experts")
    rows, cols, count = (getattr(holder, a, None) for a in ("ffn_hidden_size", "hidden_size", count_name))
    if None in (rows, cols, count):
        return None
    routing = ("top_experts", "top_weights") if legacy else ()
    if not set(routing) <= set(inspect.signature(type(module).forward).parameters):
        return None
    if {n for n, _ in module.named_parameters()} != set(names) or not hasattr(module.mlp, "activation_fn"):
        return None
    if any(tuple(expert_weight(module, n).shape) != (count * rows, cols) for n in names):
        return None
    return ExpertsLayout(names, has_gate=False, is_transposed=False, gate="mlp.w1", up="mlp.v1", down="mlp.w2",
                         act="mlp.activation_fn", rows=rows, transposed=("mlp.w2",), routing=routing)


def _jetmoe(module: nn.Module) -> ExpertsLayout | None:
    """JetMoeParallelExperts.forward(inputs, expert_size): ``F.linear`` of ``inputs.split(expert_size)[e]`` and
    ``weight[e]``, concatenated."""
    weight = module._parameters.get("weight")
    if list(module._parameters) != ["weight"] or weight is None or weight.dim() != 3:
        return None
    return ExpertsLayout(("weight",), has_gate=False, is_transposed=False, grouped=True, down="weight")


def _longcat(module: nn.Module) -> ExpertsLayout | None:
    """LongcatFlashExperts.forward: expert ``e < num_routed_experts`` is ``F.linear(x, gate_up_proj[e]).chunk(2)``,
    ``act(gate) * up``, ``F.linear(., down_proj[e])``; a higher index (a zero expert) is the identity."""
    up, down = module._parameters.get("gate_up_proj"), module._parameters.get("down_proj")
    routed = getattr(module, "num_routed_experts", None)
    if up is None or down is None or up.dim() != 3 or down.dim() != 3 or down.shape[0] != routed:
        return None
    return ExpertsLayout(("gate_up_proj", "down_proj"), has_gate=True, is_transposed=False,
                         identity_experts=int(getattr(module, "zero_expert_num", 0) or 0))


# Experts modules whose layout no flag describes, by class name, each read from its forward.
_DESCRIBED: dict[str, Callable[[nn.Module], ExpertsLayout | None]] = {
    "DbrxExperts": _dbrx, "JetMoeParallelExperts": _jetmoe, "LongcatFlashExperts": _longcat}


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of a transformers experts module (or of an :class:`Experts4bit`), None for any other module."""
    layout = getattr(module, "layout", None)
    if isinstance(layout, ExpertsLayout):
        return layout
    described = _DESCRIBED.get(type(module).__name__)
    if described is not None:
        return described(module)
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
    """Names (paths in the module) of the expert weights of a transformers experts module, ``()`` for any other."""
    layout = experts_layout(module)
    return layout.names if layout is not None else ()


def expert_matrix(layout: ExpertsLayout, weight: torch.Tensor) -> tuple[int, int, int]:
    """``(slices, rows, cols)``: the per-expert matrices of ``weight`` as stored, before any transposition
    (slices the forward never reads, LongCat-Flash's zero experts', counted too)."""
    shape = tuple(weight.shape)
    if layout.rows:
        shape = (shape[0] // layout.rows, layout.rows, shape[1])
    return shape


def computed_experts(layout: ExpertsLayout, experts: nn.Module) -> int:
    """How many experts a transformers experts module's forward computes: the fewest slices any of its expert
    weights holds (LongCat-Flash's ``gate_up_proj`` also has a slice for each zero expert, never read)."""
    return min(expert_matrix(layout, expert_weight(experts, n))[0] for n in layout.names)


@dataclass(frozen=True)
class RoutingArgs:
    """How an experts module's ``forward`` is called: its arguments in order (the hidden states first), and
    which of them are the top-k expert indices and their weights."""

    names: tuple[str, ...]
    index: str
    weights: str


def routing_arg_names(experts: nn.Module) -> RoutingArgs:
    """The arguments of the experts module's ``forward``: ``(hidden_states, top_k_index, top_k_weights)``, or
    as its layout names them (transformers 4.x's DBRX: ``(x, weights, top_weights, top_experts)``)."""
    names = tuple(inspect.signature(type(experts).forward).parameters)[1:]
    if len(names) < 3:
        raise ValueError(f"{type(experts).__name__}.forward does not take (hidden_states, indices, weights)")
    layout = experts_layout(experts)
    index, weights = layout.routing if layout is not None and layout.routing else names[1:3]
    return RoutingArgs(names, index, weights)


def routing(arg_names: RoutingArgs, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top_k_index, top_k_weights)`` from the arguments after ``hidden_states``."""
    if args and arg_names.names[0] in kwargs:
        raise TypeError("hidden_states given twice")
    values = dict(zip(arg_names.names[1:], args))
    values.update(kwargs)
    return values[arg_names.index], values[arg_names.weights]


def _split_gate(act_fn: Callable, gate_up: torch.Tensor) -> torch.Tensor:
    """transformers' default gate: ``act(gate) * up`` of the two halves of the gate_up projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act_fn(gate) * up


def gating(experts: nn.Module) -> tuple[Callable, nn.Module | None]:
    """The source experts module's gate (``_apply_gate``) or activation, and its post-expert norm (or None)."""
    source = getattr(experts, "_source", experts)
    layout = experts_layout(experts)
    act = functools.reduce(lambda m, a: getattr(m, a, None), layout.act.split("."), source)
    if not layout.has_gate:
        gate = act
    else:
        gate = getattr(source, "_apply_gate", None) or (lambda h: _split_gate(act, h))
    norm = experts.post_expert_norm if layout.has_post_expert_norm else None
    return gate, norm


def run_experts(experts: nn.Module, num_experts: int, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor, project: Callable[[torch.Tensor, str, int], torch.Tensor]) -> torch.Tensor:
    """transformers' eager experts loop: only the experts some token was routed to run, one at a
    time; ``project(x, weight_name, expert)`` applies one expert's projection (with its bias).
    ``experts`` (an :class:`Experts4bit` or transformers' module) supplies the gate and norm. Tokens
    come as ``(..., H)`` (DBRX passes ``(B, S, H)``) and leave in that shape."""
    layout = experts_layout(experts)
    gate, norm = gating(experts)
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    out = torch.zeros_like(x)
    with torch.no_grad():
        hit = [e for e in torch.unique(top_k_index).tolist() if 0 <= e < num_experts + layout.identity_experts]
    for expert in hit:
        token_idx, k_pos = torch.where(top_k_index == expert)
        if expert >= num_experts:  # an identity (zero-compute) expert
            h = x[token_idx]
        elif layout.gate:
            h = gate(project(x[token_idx], layout.gate, expert)) * project(x[token_idx], layout.up_name, expert)
            h = project(h, layout.down, expert)
        else:
            h = project(gate(project(x[token_idx], layout.up_name, expert)), layout.down, expert)
        if norm is not None:
            h = norm(h)
        h = h * top_k_weights[token_idx, k_pos, None]
        out.index_add_(0, token_idx, h.to(out.dtype))
    return out.view(hidden_states.shape)


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


def run_grouped(num_experts: int, inputs: torch.Tensor, expert_size: list[int], name: str,
                project: Callable[[torch.Tensor, str, int], torch.Tensor]) -> torch.Tensor:
    """JetMoE's parallel experts: ``inputs`` sorted by expert, expert ``e`` projecting its ``expert_size[e]`` rows."""
    chunks = inputs.split(expert_size, dim=0)
    return torch.cat([project(chunks[e], name, e) for e in range(num_experts)], dim=0)


class Experts4bit(nn.Module):
    """Frozen 4-bit replacement for a transformers experts module.

    Each expert weight (a path: ``gate_up_proj``, DBRX's ``mlp.w1``) becomes a
    ``ModuleList`` of per-expert :class:`Linear4bit` at that path, so the state-dict
    keys follow the replaced module's.

    Args:
        experts: the module it replaces (its weights may be on ``meta``);
            kept, outside the module tree, for its gating function.
        compute_dtype, quant_type, blocksize, double_quant: as in :class:`Linear4bit`.
        device: where the 4-bit buffers live.
    """

    def __init__(self, experts: nn.Module, compute_dtype: torch.dtype = torch.bfloat16, quant_type: str = "nf4",
                 blocksize: int = 64, double_quant: bool = True, device: torch.device | str | None = None) -> None:
        super().__init__()
        layout = experts_layout(experts)
        if layout is None:
            raise ValueError(f"{type(experts).__name__} is not a transformers experts module qlora knows the layout of")
        self.layout = layout
        # read before the weights are taken out of ``experts`` (its layout is then no longer recognised)
        self._arg_names = None if layout.prerouted or layout.grouped else routing_arg_names(experts)
        self.weight_names = names = layout.names
        self.is_transposed = layout.is_transposed
        self.shapes = {n: tuple(expert_weight(experts, n).shape) for n in names}  # as transformers stores them
        self.num_experts = computed_experts(layout, experts)
        for name in names:
            _, rows, cols = expert_matrix(layout, expert_weight(experts, name))
            out_f, in_f = (cols, rows) if layout.applied_transposed(name) else (rows, cols)
            layers = nn.ModuleList(
                Linear4bit(in_f, out_f, bias=False, compute_dtype=compute_dtype, quant_type=quant_type,
                           blocksize=blocksize, double_quant=double_quant, device=device)
                for _ in range(self.num_experts))
            owner, _, leaf = name.rpartition(".")
            container = self
            for part in owner.split(".") if owner else ():
                if part not in container._modules:
                    container.add_module(part, nn.Module())
                container = container._modules[part]
            container.add_module(leaf, layers)
            bias = experts._parameters.get(name + "_bias")
            if bias is not None:  # (E, out): small, stays dense and frozen
                self.register_parameter(name + "_bias", nn.Parameter(
                    torch.empty(bias.shape, dtype=compute_dtype, device=bias.device), requires_grad=False))
            source_owner, leaf = _owner(experts, name)
            source_owner._parameters[leaf] = None  # the 16-bit (meta) copy is not kept
        for child_name, child in experts.named_children():  # act_fn, post_expert_norm: shared, loaded here
            if child_name not in self._modules:  # (DBRX's mlp holds the weights: its activation is read from _source)
                self.add_module(child_name, child)
        # The replaced module supplies the gating maths; not a submodule (its weights are gone).
        object.__setattr__(self, "_source", experts)

    def layers(self, name: str) -> nn.ModuleList:
        """The per-expert 4-bit layers of expert weight ``name``."""
        return self.get_submodule(name)

    @torch.no_grad()
    def set_weight(self, name: str, weight: torch.Tensor) -> None:
        """Quantize an expert weight (transformers' layout), one expert at a time; slices past the experts the
        forward computes (LongCat-Flash's zero experts) are not stored."""
        layers = self.layers(name)
        if tuple(weight.shape[1:]) != self.shapes[name][1:] or weight.shape[0] < (
                len(layers) * (self.layout.rows or 1)):
            raise ValueError(f"{name}: expected a tensor of shape {self.shapes[name]}, got {tuple(weight.shape)}")
        if self.layout.rows:
            weight = weight.view(-1, self.layout.rows, weight.shape[-1])
        transposed = self.layout.applied_transposed(name)
        for e, layer in enumerate(layers):
            w = weight[e]
            layer.set_weight(w.t() if transposed else w)

    def dequantize(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The expert weight ``name`` in transformers' layout and shape (for merging and tests); the slices of
        identity experts are zeros."""
        mats = [layer.dequantize(dtype) for layer in self.layers(name)]
        stack = torch.stack([m.t() for m in mats] if self.layout.applied_transposed(name) else mats)
        stack = stack.reshape(-1, stack.shape[-1]) if self.layout.rows else stack
        missing = self.shapes[name][0] - stack.shape[0]
        return torch.cat([stack, stack.new_zeros(missing, *stack.shape[1:])]) if missing else stack

    @torch.no_grad()
    def to_dense(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The replaced transformers module, holding the dequantized weights (merging)."""
        source = self._source
        for name in self.weight_names:
            weight = self.dequantize(name, dtype)
            owner, leaf = _owner(source, name)
            owner._parameters[leaf] = nn.Parameter(weight, requires_grad=False)
            bias = getattr(self, name + "_bias", None)
            if bias is not None:
                source._parameters[name + "_bias"] = nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)
        return source

    def _project(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        y = self.layers(name)[expert](x)
        bias = getattr(self, name + "_bias", None)
        return y if bias is None else y + bias[expert].to(y.dtype)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.layout.prerouted:
            return run_prerouted(self, self.num_experts, hidden_states, self._project)
        if self.layout.grouped:
            sizes = args[0] if args else next(iter(kwargs.values()))
            return run_grouped(self.num_experts, hidden_states, sizes, self.weight_names[0], self._project)
        top_k_index, top_k_weights = routing(self._arg_names, args, kwargs)
        return run_experts(self, self.num_experts, hidden_states, top_k_index, top_k_weights, self._project)

    def extra_repr(self) -> str:
        layer = self.layers(self.weight_names[0])[0]
        biases = [n for n in self.weight_names if getattr(self, n + "_bias", None) is not None]
        return (f"num_experts={self.num_experts}, weights={list(self.weight_names)}, has_gate={self.layout.has_gate}, "
                f"biases={biases}, is_transposed={self.is_transposed}, {layer.quant_type}, "
                f"blocksize={layer.blocksize}")
