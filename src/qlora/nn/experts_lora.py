"""ExpertsLora: LoRA on the 3-D expert weights of an MoE block (PEFT's ``target_parameters``).

PEFT's ``LoraConfig(target_parameters=["mlp.experts.gate_up_proj", ...])`` wraps
a 3-D parameter ``(E, out, in)`` (or ``(E, in, out)`` when the module is
``is_transposed``) in a ``ParamWrapper`` holding, per adapter, one
``lora_A: (r * E, in)`` and one ``lora_B: (out, r * E)``. Expert ``e`` owns
rows ``e*r .. e*r + r`` of A and the *strided* columns ``e, e + E, e + 2E, ...``
of B (PEFT reshapes B to ``(out, r, E)``), so its delta is
``scale * B[:, e::E] @ A[e*r:(e+1)*r]`` in ``[out, in]`` orientation, scale =
alpha / r (alpha / sqrt(r) with rsLoRA). The tensors here are stored in exactly
that layout, so adapter files copy one to one. Each weight has its own rank and
alpha (PEFT matches ``rank_pattern`` against ``<module path>.<weight>``).

PEFT adds the delta of all experts to the whole 3-D weight before the forward;
here each routed expert computes ``base_e(x) + scale * (x @ A_e^T) @ B_e^T``:
equal maths, ``n r (in + out)`` flops for its ``n`` tokens instead of ``r in out``
for a delta plus a second weight, no dense copy of the expert stack (3.6x faster
and 2.6x less memory than PEFT in bench/moe_expert_lora.py), and the base may be
4-bit (:class:`Experts4bit`, one expert dequantized at a time) or transformers'
own 16-bit experts module. PEFT has no dropout for these adapters, nor DoRA.
"""

from __future__ import annotations

import torch
from torch import nn

from .experts4bit import Experts4bit, experts_layout, routing, routing_arg_names, run_experts, run_prerouted
from .lora import AdapterSlots, LoraSpec, check_new_adapter, plain_init


def peft_transposed(experts: nn.Module) -> bool:
    """Whether PEFT reads the 3-D weights as ``(E, in, out)``: only when the module says ``is_transposed``
    (Llama 4's experts, ``(E, in, out)`` but without the flag, get factors sized as ``(E, out, in)``)."""
    return bool(getattr(getattr(experts, "_source", experts), "is_transposed", False))


def expert_shapes(experts: nn.Module) -> dict[str, tuple[int, int]]:
    """``{weight name: (in_features, out_features)}`` as PEFT sizes the LoRA factors of each 3-D weight
    of an Experts4bit or transformers experts module, in the order the source module registered them
    (PEFT nests its wrappers in that order)."""
    layout = experts_layout(experts)
    if isinstance(experts, Experts4bit):
        order = [n for n in experts._source._parameters if n in layout.names]
        dims = {n: (getattr(experts, n)[0].in_features, getattr(experts, n)[0].out_features) for n in order}
        dims = {n: (i, o) if layout.is_transposed else (o, i) for n, (i, o) in dims.items()}  # the 3-D layout's
    else:
        dims = {n: tuple(experts._parameters[n].shape[1:]) for n in experts._parameters if layout and n in layout.names}
    swap = not peft_transposed(experts)
    return {n: (d2, d1) if swap else (d1, d2) for n, (d1, d2) in dims.items()}


class ExpertsLora(AdapterSlots):
    """An experts module (4-bit or 16-bit, frozen) with named LoRA adapters on some of its 3-D weights.

    ``lora_A[weight][adapter]`` and ``lora_B[weight][adapter]`` are ``nn.Linear``
    holding PEFT's ``(r * E, in)`` and ``(out, r * E)`` tensors.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        layout = experts_layout(base_layer)
        if layout is None or not layout.standard:
            raise ValueError(f"{type(base_layer).__name__} is not a standard experts module with 3-D weights")
        self.shapes = expert_shapes(base_layer)
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        first = getattr(base_layer, next(iter(self.shapes)))
        self.num_experts = len(first) if isinstance(base_layer, Experts4bit) else first.shape[0]
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        # specs: adapter -> the spec of its first adapted weight (AdapterSlots)
        self.weight_specs: dict[str, dict[str, LoraSpec]] = {}  # adapter -> weight -> its own rank and alpha
        self.targets: dict[str, list[str]] = {}  # adapter -> adapted weight names
        self.layout = experts_layout(base_layer)
        self.peft_transposed = peft_transposed(base_layer)
        # PEFT's factors of Llama 4's (E, in, out) weights are sized as for (E, out, in): x @ B_e @ A_e
        self.swapped = self.layout.is_transposed != self.peft_transposed
        self._arg_names = None if isinstance(base_layer, Experts4bit) or self.layout.prerouted else routing_arg_names(
            base_layer)

    # --- adapters -----------------------------------------------------------
    def add_adapter(self, name: str, spec: LoraSpec | dict[str, LoraSpec], weights: list[str]) -> None:
        """Adapter ``name`` on ``weights``, with ``spec`` for all of them or one spec per weight."""
        specs = spec if isinstance(spec, dict) else dict.fromkeys(weights, spec)
        for w in weights:
            check_new_adapter(self.specs, name, specs[w])
            if specs[w].dropout or specs[w].use_dora or specs[w].lora_bias or specs[w].init not in ("kaiming",
                                                                                                    "gaussian"):
                raise ValueError("LoRA on expert weights (target_parameters) has no dropout, DoRA, lora_bias or "
                                 "LoftQ, as in PEFT")
        device = next((t.device for t in self.base_layer.buffers()), None) or next(
            (t.device for t in self.base_layer.parameters()), None)
        for w in weights:
            in_f, out_f = self.shapes[w]
            rows = specs[w].r * self.num_experts
            for dicts in (self.lora_A, self.lora_B):
                if w not in dicts:
                    dicts[w] = nn.ModuleDict()
            self.lora_A[w][name] = nn.Linear(in_f, rows, bias=False, device=device, dtype=specs[w].dtype)
            self.lora_B[w][name] = nn.Linear(rows, out_f, bias=False, device=device, dtype=specs[w].dtype)
        self.specs[name], self.targets[name] = specs[weights[0]], list(weights)
        self.weight_specs[name] = {w: specs[w] for w in weights}
        self.reset_adapter(name)
        if not self.active:
            self.active = {name: 1.0}

    @torch.no_grad()
    def reset_adapter(self, name: str) -> None:
        """PEFT's init over the whole ``(r * E, in)`` A (Kaiming-uniform or N(0, 1/r)); B zeros."""
        for w in self.targets[name]:
            plain_init(self.lora_A[w][name].weight, self.lora_B[w][name].weight, self.weight_specs[name][w])

    def delete_adapter(self, name: str) -> None:
        for w in self.targets.pop(name, []):
            del self.lora_A[w][name], self.lora_B[w][name]
        self.specs.pop(name, None)
        self.weight_specs.pop(name, None)
        self.active.pop(name, None)

    def factors(self, weight: str, name: str, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_e [r, in], B_e [out, r])`` of one expert: PEFT's row block of A, strided columns of B."""
        r = self.weight_specs[name][weight].r
        a = self.lora_A[weight][name].weight[expert * r:(expert + 1) * r]
        b = self.lora_B[weight][name].weight[:, expert::self.num_experts]
        return a, b

    @torch.no_grad()
    def delta_weight(self, weight: str, name: str) -> torch.Tensor:
        """Adapter ``name``'s float32 delta of ``weight`` in transformers' 3-D layout (PEFT's get_delta_weight)."""
        r, E = self.weight_specs[name][weight].r, self.num_experts
        a = self.lora_A[weight][name].weight.float().reshape(E, r, -1)  # (E, r, in)
        b = self.lora_B[weight][name].weight.float().reshape(-1, r, E).permute(2, 0, 1)  # (E, out, r)
        delta = torch.bmm(b, a) * self.weight_specs[name][weight].scaling  # (E, out, in)
        return delta.transpose(1, 2) if self.peft_transposed else delta

    def weight_shape(self, weight: str) -> tuple[int, int, int]:
        """The 3-D ``weight``'s shape in transformers' layout."""
        in_f, out_f = self.shapes[weight]
        return (self.num_experts, in_f, out_f) if self.peft_transposed else (self.num_experts, out_f, in_f)

    def base_weight(self, weight: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base's 3-D ``weight`` (transformers' layout), dequantized if 4-bit."""
        if isinstance(self.base_layer, Experts4bit):
            return self.base_layer.dequantize(weight, dtype)
        return self.base_layer._parameters[weight].detach().to(dtype, copy=True)  # callers add deltas in place

    @torch.no_grad()
    def merged_weight(self, weight: str) -> torch.Tensor:
        """The float32 3-D ``weight`` with the active adapters (with their weights) folded in."""
        w = self.base_weight(weight)
        for name, coef in self.active.items():
            if weight in self.targets.get(name, ()):
                w += self.delta_weight(weight, name).to(w.device) * coef
        return w

    # --- forward ------------------------------------------------------------
    def _base_project(self, x: torch.Tensor, weight: str, expert: int) -> torch.Tensor:
        base = self.base_layer
        if isinstance(base, Experts4bit):
            return base._project(x, weight, expert)
        w = base._parameters[weight][expert]
        y = x @ w if self.layout.is_transposed else nn.functional.linear(x, w)
        bias = base._parameters.get(weight + "_bias")
        return y if bias is None else y + bias[expert].to(y.dtype)

    def _project(self, x: torch.Tensor, weight: str, expert: int) -> torch.Tensor:
        y = self._base_project(x, weight, expert)
        for name, coef in self.active.items():
            if coef == 0 or weight not in self.targets.get(name, ()):
                continue
            a, b = self.factors(weight, name, expert)
            h = x if torch.is_autocast_enabled(x.device.type) else x.to(a.dtype)
            lora = (h @ b) @ a if self.swapped else (h @ a.t()) @ b.t()
            y = y + (lora * (self.weight_specs[name][weight].scaling * coef)).to(y.dtype)
        return y

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled or not self.active:
            return self.base_layer(hidden_states, *args, **kwargs)
        if self.layout.prerouted:
            return run_prerouted(self.base_layer, self.num_experts, hidden_states, self._project)
        names = self.base_layer._arg_names if self._arg_names is None else self._arg_names
        top_k_index, top_k_weights = routing(names, args, kwargs)
        return run_experts(self.base_layer, self.num_experts, hidden_states, top_k_index, top_k_weights, self._project)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: " + ", ".join(f"{w} r={s.r}" for w, s in self.weight_specs[n].items())
                          for n in self.specs)
        return f"experts={self.num_experts}, adapters=[{ranks}], active={list(self.active)}"
