"""What each decoder layer saves for backward, measured on the ``meta`` device.

A formula of the Llama block misses what other architectures keep (Gemma 3's four norms, Qwen3's q/k norms,
DeepSeek's latent attention, Llama 4's router-scaled copies): this runs the model's own layers instead, built
from its config on ``meta`` (no memory, no weights), over a few token counts, under
``torch.autograd.graph.saved_tensors_hooks``, and counts the bytes of every distinct storage saved, weights left
out. Three things are arranged as training has them:

- attention is PyTorch's fused kernel (SDPA's flash or memory-efficient path), which keeps q, k, v, its output
  and a float32 log-sum-exp per head and token, never the ``L x L`` scores (on ``meta`` SDPA would take the
  math path); keys and values at their own head count, as transformers' SDPA passes them without a mask;
- the adapted linears are qlora's :class:`~qlora.nn.lora.LoraLinear` on a :class:`~qlora.nn.linear4bit.Linear4bit`
  (4-bit base: saves nothing; adapter in bf16, as under autocast: ``A``'s input and ``B``'s input); a frozen
  16-bit base saves no more. The full fine-tuning variant trains every weight instead;
- a MoE's experts loop depends on the routing (which experts run, on how many rows), which ``meta`` tensors do
  not have: each token's top-k rows run through one expert's weights, the ops and sizes of qlora's experts loop
  (:func:`qlora.nn.experts4bit.run_experts`) over top-k experts. Full fine-tuning keeps transformers' own loop:
  Llama 4's runs on ``meta`` (every expert over every row) and is run; the others' are taken as qlora's.

Saved bytes are ``a L^2 + b L + c`` in the sequence length ``L``; ``b`` is taken (the ``L^2`` part belongs to
kernels that keep scores, which the estimate assumes away). A model this cannot run raises
:class:`NotMeasurable`, and the caller falls back to its formula.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import experts_layout
from ..nn.experts4bit import expert_weight, gating, routing, routing_arg_names
from ..nn.linear4bit import Linear4bit
from ..nn.lora import LoraLinear, LoraSpec

ATTENTION = "qlora_saved_activations"  # the attention implementation registered for the measurement
LENGTHS = (16, 32, 64)  # token counts run; three fix a quadratic


class NotMeasurable(Exception):
    """The model's layers could not be built or run on ``meta``; the message says why."""


@dataclass(frozen=True)
class LayerSaves:
    """Bytes per token that autograd keeps, per decoder layer and outside them (final norm...)."""

    full: tuple[float, ...]  # every weight trained, no adapter (full fine-tuning)
    adapted: tuple[float, ...]  # frozen (4-bit or 16-bit) base, LoRA on the targets
    outside_full: float
    outside_adapted: float
    layer_input: float  # one layer's input, what checkpointing keeps of each layer


class _FusedAttentionSaves(torch.autograd.Function):
    """The saves of PyTorch's fused attention kernels: q, k, v, the output (laid out ``(B, L, H, D)``, so
    transformers' transpose back is free) and a float32 log-sum-exp per head and token."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        b, h, length, _ = query.shape
        out = query.new_empty(b, length, h, value.shape[-1]).transpose(1, 2)
        lse = query.new_empty(b, h, length, dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out  # no backward: the measurement never goes backward


def _fused_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    return _FusedAttentionSaves.apply(query, key, value).transpose(1, 2).contiguous(), None


class _TopKRows(nn.Module):
    """Stand-in for a transformers experts module on ``meta``: every token's top-k rows through expert 0."""

    def __init__(self, experts: nn.Module, top_k: int) -> None:
        super().__init__()
        self.experts, self.top_k, self.layout = experts, top_k, experts_layout(experts)
        self.own_loop = False  # True: Llama 4's own experts (full fine-tuning keeps them), which run on meta
        self.gate, self.norm = gating(experts)
        self._arg_names = [] if self.layout.prerouted else routing_arg_names(experts)

    def _project(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w = expert_weight(self.experts, name)[0]
        y = F.linear(x, w.t() if self.layout.applied_transposed(name) else w)
        bias = getattr(self.experts, name + "_bias", None)
        return y if bias is None else y + bias[0].to(y.dtype)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        if layout.has_gate or not layout.gate:
            h = self.gate(self._project(x, layout.up_name))
        else:
            h = self.gate(self._project(x, layout.gate)) * self._project(x, layout.up_name)
        h = self._project(h, layout.down)
        return h if self.norm is None else self.norm(h)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.layout.prerouted and self.own_loop:  # every expert over all E * T rows, as transformers runs them
            return self.experts(hidden_states)
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        out = torch.zeros_like(x)
        if self.layout.prerouted:  # (E * T, H): T * top_k rows are non-zero
            tokens = x.shape[0] // expert_weight(self.experts, self.layout.names[0]).shape[0]
            idx = torch.arange(tokens * self.top_k, device=x.device)
            out.index_add_(0, idx, self._rows(x[idx]).to(out.dtype))
            return out
        top_k_index, top_k_weights = routing(self._arg_names, args, kwargs)
        k = top_k_index.shape[-1]
        flat = torch.arange(x.shape[0] * k, device=x.device)
        token_idx, k_pos = flat // k, flat % k
        h = self._rows(x[token_idx]) * top_k_weights[token_idx, k_pos, None]
        out.index_add_(0, token_idx, h.to(out.dtype))
        return out.view(hidden_states.shape)


class _RotaryOffMeta(nn.Module):
    """A rotary embedding that also runs where transformers 4.x's does not on ``meta``: its forward opens
    ``torch.autocast(device_type="meta", enabled=False)``, which torch refuses (transformers 5 opens none where it
    is disabled). Its cos/sin, saved by the layers, matter here by shape and dtype alone: where the module fails
    on ``meta`` a CPU copy of it computes them from inputs of the same shapes, returned as ``meta`` tensors."""

    def __init__(self, rotary: nn.Module) -> None:
        super().__init__()
        self.rotary = rotary
        self._on_cpu: list[nn.Module] = []  # (a list: not a submodule, its buffers are not the model's)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
        try:
            return self.rotary(x, position_ids, *args, **kwargs)
        except RuntimeError:
            if not self._on_cpu:
                self._on_cpu.append(copy.deepcopy(self.rotary).to_empty(device="cpu"))
            out = self._on_cpu[0](torch.zeros(x.shape, dtype=x.dtype), torch.zeros(position_ids.shape,
                                                                                    dtype=position_ids.dtype),
                                  *args, **kwargs)
            if isinstance(out, torch.Tensor):  # Llama 4's complex frequencies
                return torch.empty_like(out, device="meta")
            return tuple(torch.empty_like(t, device="meta") for t in out)


def _decoder_layers(decoder: nn.Module, count: int) -> nn.ModuleList:
    lists = [m for m in decoder.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if not lists:
        raise NotMeasurable(f"no list of {count} decoder layers found")
    return lists[0]


def _top_k(config) -> int:
    text = config.get_text_config()
    return next((v for n in ("num_experts_per_tok", "moe_topk", "experts_per_token", "num_experts_per_token")
                 if isinstance(v := getattr(text, n, None), int) and v > 0), 1)


def _build(config, source: str) -> tuple[nn.Module, nn.Module, nn.ModuleList]:
    from transformers import AttentionInterface

    from .architecture import text_model_from_config
    from .quantize import text_decoder_path

    AttentionInterface.register(ATTENTION, _fused_attention)
    config = copy.deepcopy(config)
    try:
        with torch.device("meta"):
            model = text_model_from_config(config, source, attn_implementation=ATTENTION, dtype=torch.bfloat16)
    except Exception as exc:  # noqa: BLE001 - any failure means: use the formula
        raise NotMeasurable(f"the model was not built with a swappable attention ({_said(exc)})") from None
    decoder = model.get_submodule(text_decoder_path(model))
    layers = _decoder_layers(decoder, config.get_text_config().num_hidden_layers)
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):  # transformers' name for them in every model
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, _RotaryOffMeta(module))
    top_k = _top_k(config)
    for name, module in list(model.named_modules()):
        layout = experts_layout(module)
        if layout is None:
            continue
        if not (layout.standard or layout.prerouted) or layout.rows:
            raise NotMeasurable(f"its experts ({type(module).__name__}) have a layout of their own")
        try:
            stand_in = _TopKRows(module, top_k)
        except (ValueError, AttributeError) as exc:  # a forward not taking (hidden_states, indices, weights)...
            raise NotMeasurable(f"its experts ({type(module).__name__}) could not be stood in for ({_said(exc)})")
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, stand_in)
    return model, decoder, layers


def _said(exc: Exception) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def _adapt(model: nn.Module, targets: tuple[str, ...], rank: int) -> None:
    """Every weight frozen; each target a LoRA (bf16, as autocast runs it) on a meta Linear4bit."""
    model.requires_grad_(False)
    for name in targets:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent)
        base = getattr(owner, leaf)
        if isinstance(base, nn.Linear):
            in_f, out_f = base.in_features, base.out_features
        else:  # GPT-2's Conv1D: weight (in, out)
            in_f, out_f = base.weight.shape
        four_bit = Linear4bit(in_f, out_f, bias=getattr(base, "bias", None) is not None, device="meta")
        layer = LoraLinear(four_bit)
        layer.add_adapter("default", LoraSpec(r=rank, dtype=torch.bfloat16))
        setattr(owner, leaf, layer)


def _per_token(model: nn.Module, decoder: nn.Module, layers: nn.ModuleList, hidden: int) -> tuple[list[float], float]:
    """Linear-in-L bytes per token, per layer and outside the layers."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    weights |= {b.untyped_storage()._cdata for b in model.buffers()}
    current: list[int | None] = [None]
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
        hooks.append(layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
    totals = []
    try:
        for length in LENGTHS:
            first: dict[int, tuple[int | None, int]] = {}
            alive: list[torch.Tensor] = []  # a freed storage's address may come back: hold each one

            def keep(t: torch.Tensor) -> torch.Tensor:
                storage = t.untyped_storage()
                if storage._cdata not in weights:
                    first.setdefault(storage._cdata, (current[0], storage.nbytes()))
                    alive.append(t)
                return t

            x = torch.empty(1, length, hidden, device="meta", dtype=torch.bfloat16, requires_grad=True)
            with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
                decoder(inputs_embeds=x, use_cache=False)
            row = [0.0] * (len(layers) + 1)
            for where, nbytes in first.values():
                row[len(layers) if where is None else where] += nbytes
            totals.append(row)
    except Exception as exc:  # noqa: BLE001 - a forward that needs real values (data-dependent control flow)
        raise NotMeasurable(f"its forward does not run on meta tensors ({_said(exc)})") from None
    finally:
        for h in hooks:
            h.remove()
    # a L^2 + b L + c through the three lengths: b by divided differences
    (l1, l2, l3), out = LENGTHS, []
    for f1, f2, f3 in zip(*totals):
        d12, d23 = (f2 - f1) / (l2 - l1), (f3 - f2) / (l3 - l2)
        a = (d23 - d12) / (l3 - l1)
        out.append(d12 - a * (l1 + l2))
    return out[:-1], out[-1]


def measure(config, source: str, targets: tuple[str, ...], rank: int) -> LayerSaves:
    """Per-token saved bytes of ``config``'s layers, trained fully and with LoRA rank ``rank`` on ``targets``
    (module paths, as :func:`qlora.model.estimate.count_parameters` names them). The decoder runs on text
    alone (``inputs_embeds``); layers it skips then count as its largest.

    Raises:
        NotMeasurable: the layers cannot be built or run on ``meta``.
    """
    hidden = config.get_text_config().hidden_size
    if not isinstance(hidden, int):
        raise NotMeasurable("its hidden size differs per layer")
    model, decoder, layers = _build(config, source)
    model.requires_grad_(True)
    for module in model.modules():
        if isinstance(module, _TopKRows):
            module.own_loop = True
    full, outside_full = _per_token(model, decoder, layers, hidden)
    for module in model.modules():
        if isinstance(module, _TopKRows):
            module.own_loop = False
    try:
        _adapt(model, targets, rank)
    except Exception as exc:  # noqa: BLE001
        raise NotMeasurable(f"its adapted layers could not be built ({_said(exc)})") from None
    adapted, outside_adapted = _per_token(model, decoder, layers, hidden)
    return LayerSaves(_skipped_as_largest(full), _skipped_as_largest(adapted), outside_full, outside_adapted,
                      layer_input=2 * hidden)


def _skipped_as_largest(per_layer: list[float]) -> tuple[float, ...]:
    """A layer that saved nothing did not run on text alone (Mllama's cross-attention layers run with images):
    it counts as the largest layer measured, an upper bound."""
    largest = max(per_layer, default=0.0)
    return tuple(v if v > 0 else largest for v in per_layer)
