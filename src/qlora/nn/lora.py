"""LoraLinear: low-rank adapters on a frozen linear layer.

``y = base(x) + sum_a  w_a * scale_a * B_a(A_a(dropout_a(x)))`` with
``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). The base may be a
:class:`~qlora.nn.linear4bit.Linear4bit`, an ``nn.Linear``, or GPT-2's
``Conv1D`` (a linear layer stored transposed: ``fan_in_fan_out``).

DoRA (Liu et al. 2024) splits the adapted weight into a trained magnitude ``m``
(one value per output row) and a direction: ``W' = m * (W + s BA) / ||W + s BA||``,
the row norm taken of the dequantized base and detached (the paper's section
4.3), so it adds ``(m/n - 1) * W x + (m/n) * s B A x`` to the base output.

The module layout (``base_layer``, ``lora_A.<name>``, ``lora_B.<name>``,
``lora_dropout.<name>``, ``lora_magnitude_vector.<name>.weight``) is PEFT's,
so adapter keys translate one to one.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from .linear4bit import Linear4bit, autocast_on
from .loftq import loftq_factors
from .residual_init import residual_split
from .residual_init_names import is_residual_init

if TYPE_CHECKING:
    from .lora_embedding import LoraEmbedding


@dataclass(frozen=True)
class LoraSpec:
    """Hyper-parameters of one adapter, as users know them from PEFT."""

    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"  # "kaiming" (A Kaiming-uniform, B zeros) | "gaussian" (A ~ N(0, 1/r), B zeros) | "loftq"
    # | "pissa", "pissa_niter_K", "olora" (qlora.nn.residual_init: the base keeps W - s B0 A0)
    dtype: torch.dtype = torch.float32
    use_dora: bool = False
    loftq_iter: int = 1  # alternating quantize/SVD steps of init="loftq"
    loftq_quant: tuple[str, int, bool] = ("nf4", 64, True)  # (quant_type, blocksize, double_quant) of its base
    lora_bias: bool = False  # PEFT's lora_bias: B has a bias, scaled with it (folds into the base bias)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def dense_shape(base: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out) of a linear-like base."""
    if isinstance(base, (nn.Linear, Linear4bit)):
        return base.in_features, base.out_features, False
    if type(base).__name__ == "Conv1D":  # transformers' GPT-2 Conv1D: weight [in, out]
        in_f, out_f = base.weight.shape
        return in_f, out_f, True
    raise TypeError(f"LoRA can wrap nn.Linear, Linear4bit or Conv1D, not {type(base).__name__}")


def factor_layers(in_features: int, out_features: int, spec: LoraSpec,
                  device: torch.device | None) -> tuple[nn.Linear, nn.Linear]:
    """An adapter's ``lora_A`` and ``lora_B``. Their construction draws from torch's generator (``nn.Linear``'s
    own init, overwritten by the adapter's), so every init after it depends on these draws, as in PEFT."""
    a = nn.Linear(in_features, spec.r, bias=False, device=device, dtype=spec.dtype)
    b = nn.Linear(spec.r, out_features, bias=spec.lora_bias, device=device, dtype=spec.dtype)
    return a, b


class Magnitude(nn.Module):
    """DoRA's magnitude vector; a module holding ``weight`` so keys match PEFT's."""

    def __init__(self, norm: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(norm)


def check_new_adapter(specs: dict[str, LoraSpec], name: str, spec: LoraSpec) -> None:
    """The checks every adapter layer makes before adding adapter ``name``."""
    if name in specs:
        raise ValueError(f"adapter {name!r} already exists on this layer")
    if spec.r <= 0:
        raise ValueError(f"LoRA rank must be positive, got {spec.r}")


@torch.no_grad()
def plain_init(a: torch.Tensor, b: torch.Tensor, spec: LoraSpec) -> None:
    """PEFT's start of a factor pair: A Kaiming-uniform (``init="gaussian"``: N(0, 1/r)) and B zeros, so that the
    adapter adds nothing until it is trained."""
    if spec.init == "gaussian":
        nn.init.normal_(a, std=1.0 / spec.r)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.zeros_(b)


def to_merge(layer: LoraLinear | LoraEmbedding, names: list[str] | None) -> list[str]:
    """Those of ``names`` (default: the active adapters) that ``layer`` has not merged yet.

    Raises:
        ValueError: a DoRA adapter would be merged beside others merged before or after it (its norm is of the
            unmerged base).
    """
    names = [n for n in (names or list(layer.active)) if n not in layer.merged]
    if names and layer.merged and any(n in layer.lora_magnitude_vector for n in names + layer.merged):
        raise ValueError("DoRA's norm is of the unmerged base: unmerge before merging more adapters")
    return names


def folded(layer: LoraLinear | LoraEmbedding, w: torch.Tensor, names: list[str],
           norm_dim: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``w`` (float32) with ``layer``'s adapters ``names`` folded in (weighted as in its ``active``), and each DoRA
    adapter's ratio ``r = m / ||W + delta||``, the norm over ``norm_dim`` (1: a linear weight's rows, 0: an
    embedding table's columns), which :func:`unfolded` needs to take it out again."""
    out, ratios = w.clone(), {}
    for n in names:
        weight, delta = layer.active.get(n, 1.0), layer.delta_weight(n)
        if n in layer.lora_magnitude_vector:
            norm = torch.linalg.norm(w + delta, dim=norm_dim)
            ratio = (layer.lora_magnitude_vector[n].weight.float() / norm).unsqueeze(norm_dim)
            out += weight * ((ratio - 1) * w + ratio * delta)
            ratios[n] = ratio
        else:
            out += weight * delta
    return out, ratios


def unfolded(layer: LoraLinear | LoraEmbedding, w: torch.Tensor, norm_dim: int) -> torch.Tensor:
    """``w`` (float32) with ``layer``'s merged adapters taken out: ``(W' - sum_a w_a r_a delta_a) / (1 + sum_a w_a
    (r_a - 1))``, ``r_a`` the ratio :func:`folded` kept for a DoRA adapter, 1 for a plain one."""
    shape = list(w.shape)
    shape[norm_dim] = 1
    scale = torch.ones(shape, device=w.device)
    for n in layer.merged:
        weight, ratio = layer.active.get(n, 1.0), layer._dora_scale.get(n, 1.0)
        w = w - weight * ratio * layer.delta_weight(n)
        scale = scale + weight * (ratio - 1)
    return w / scale


class AdapterSlots(nn.Module):
    """What every layer holding named adapters shares: their specs, which are active with which
    combination weights, and a switch that turns them all off."""

    def __init__(self) -> None:
        super().__init__()
        self.specs: dict[str, LoraSpec] = {}
        self.active: dict[str, float] = {}  # adapter name -> combination weight
        self.disabled = False
        self.merged: list[str] = []
        self.row_adapters: list[str | None] | None = None  # per batch row adapter (see qlora.model.multi_adapter)

    @property
    def unmerged_active(self) -> list[str]:
        """The active adapters not folded into the base yet: what a merge of this layer adds."""
        return [n for n in self.active if n not in self.merged]

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


class LoraLinear(AdapterSlots):
    """A frozen linear base with any number of named LoRA adapters."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = dense_shape(base_layer)
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self._dora_scale: dict[str, torch.Tensor] = {}  # m / ||W + s BA|| of merged DoRA adapters, to unmerge
        # (A0, B0) of adapters whose init moved s B0 A0 out of the base (PiSSA, OLoRA): what a save subtracts
        # so that the adapter it writes is valid on the original weights
        self.initial_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, as PEFT's LoRA layers expose it (model code reads ``.weight.dtype``)."""
        return self.base_layer.weight

    # --- adapters -----------------------------------------------------------
    def add_adapter(self, name: str, spec: LoraSpec, start: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Add adapter ``name``. ``start``: the ``(A0, B0)`` its LoftQ/PiSSA/OLoRA init already computed
        while the model was loaded (:class:`qlora.model.streamed_init.StreamedInit`), the base holding
        what that init leaves there; without it the init is computed here from the dense base."""
        check_new_adapter(self.specs, name, spec)
        if self.initial_factors:
            raise ValueError(f"the base of this layer holds the residual W - s B0 A0 of the "
                             f"{next(iter(self.initial_factors))!r} adapter (PiSSA/OLoRA), for which another adapter "
                             "was not made; save that adapter (converted) and load both on the original model")
        if spec.lora_bias and spec.use_dora:
            raise ValueError("lora_bias does not combine with DoRA (PEFT refuses it too)")
        if start is not None and spec.init != "loftq" and not is_residual_init(spec.init):
            raise ValueError(f"init {spec.init!r} starts from no computed factors (only LoftQ, PiSSA and OLoRA do)")
        if is_residual_init(spec.init):
            self._check_residual_init(spec, base_done=start is not None)
        elif start is not None:
            self._check_first_loftq(name)
        device = next((t.device for t in self.base_layer.buffers()), None) or next(
            (t.device for t in self.base_layer.parameters()), None)
        self.lora_A[name], self.lora_B[name] = factor_layers(self.in_features, self.out_features, spec, device)
        self.lora_dropout[name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.specs[name] = spec
        if start is None:
            self.reset_adapter(name)
        else:
            self._start_from(name, start)
        if spec.use_dora:
            norm = self._weight_norm(name).to(spec.dtype)
            self.lora_magnitude_vector[name] = Magnitude(norm)
        if not self.active:
            self.active = {name: 1.0}

    @torch.no_grad()
    def reset_adapter(self, name: str) -> None:
        spec = self.specs[name]
        if spec.init == "loftq":
            self._loftq_init(name)
            return
        if is_residual_init(spec.init):
            self._residual_init(name)
            return
        if spec.init not in ("gaussian", "kaiming"):
            raise ValueError(f"unknown LoRA init {spec.init!r}; use 'kaiming', 'gaussian', 'loftq', 'pissa', "
                             "'pissa_niter_K' or 'olora'")
        plain_init(self.lora_A[name].weight, self.lora_B[name].weight, spec)
        if self.lora_B[name].bias is not None:
            nn.init.zeros_(self.lora_B[name].bias)

    @torch.no_grad()
    def _loftq_init(self, name: str) -> None:
        """LoftQ (:mod:`qlora.nn.loftq`) of the dense base, which is replaced by a :class:`Linear4bit`
        holding Q (``spec.loftq_quant``, compute dtype = the dense weight's), so the adapter is only valid
        on this base, not on a plain quantization of W."""
        spec = self.specs[name]
        self._check_first_loftq(name)
        base = self.base_layer
        if isinstance(base, Linear4bit):
            raise ValueError("LoftQ needs the full-precision base weights; load the model with quant=None, "
                             "add_lora(init='loftq') quantizes the adapted layers itself (or, without the 16-bit "
                             "model in memory, load_model(weight_hook=StreamedInit('loftq', ...)) then "
                             "add_lora(initial=...): qlora.model.streamed_init)")
        quant_type, blocksize, double_quant = spec.loftq_quant
        quantized = Linear4bit.from_linear(base, quant_type, blocksize, double_quant, base.weight.dtype,
                                           transposed=self.fan_in_fan_out)
        quantized.from_conv1d = self.fan_in_fan_out
        a, b, _ = loftq_factors(self.base_weight(torch.float32), quantized, spec.r, spec.scaling, spec.loftq_iter)
        self.base_layer, self.fan_in_fan_out = quantized.requires_grad_(False), False
        self.lora_A[name].weight.copy_(a)
        self.lora_B[name].weight.copy_(b)

    def _check_first_loftq(self, name: str) -> None:
        if set(self.specs) - {name}:
            raise ValueError("LoftQ replaces the base weight, which the layer's other adapters were made for; "
                             "use init='loftq' only for a layer's first adapter")

    def _check_residual_init(self, spec: LoraSpec, base_done: bool = False) -> None:
        """Refuse a PiSSA/OLoRA adapter this layer cannot take, before any of it is made (``base_done``: the
        base already holds the residual, 4-bit or not)."""
        what = spec.init.split("_")[0].replace("pissa", "PiSSA").replace("olora", "OLoRA")
        if self.specs:
            raise ValueError(f"{what} moves part of the base weight into the adapter, and the layer's other "
                             f"adapters were made for the whole weight; use init={spec.init!r} only for a layer's "
                             "first adapter")
        if spec.use_dora or spec.lora_bias:
            raise ValueError(f"{what} does not combine with {'DoRA' if spec.use_dora else 'lora_bias'}: the saved "
                             "adapter is converted to plain LoRA on the original weights, which DoRA's magnitudes "
                             "and a LoRA bias do not survive; drop one of them")
        if isinstance(self.base_layer, Linear4bit) and not base_done:
            raise ValueError(f"{what} needs the 16-bit base weights, and this layer is already 4-bit (a model "
                             "saved in 4 bits, or loaded with quant nf4/fp4); start from the 16-bit model: qlora "
                             "train quantizes the residual itself (QPiSSA), in Python load_model(quant=None), "
                             "add_lora, then quantize_model, or load_model(weight_hook=StreamedInit(...)) then "
                             "add_lora(initial=...) (qlora.model.streamed_init)")

    @torch.no_grad()
    def _residual_init(self, name: str) -> None:
        """PiSSA/OLoRA (:mod:`qlora.nn.residual_init`): the adapter takes ``s B0 A0`` of the
        dense weight, the base keeps the rest in its own dtype (quantize it afterwards for QPiSSA)."""
        spec = self.specs[name]
        a, b, residual = residual_split(self.base_weight(torch.float32), spec.init, spec.r, spec.scaling)
        self._write_base(residual)
        self._start_from(name, (a, b))

    @torch.no_grad()
    def _start_from(self, name: str, factors: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Give adapter ``name`` the factors ``(A0, B0)`` of its init, the base already holding what the
        init leaves there (LoftQ's Q, PiSSA/OLoRA's residual, which a save subtracts them from)."""
        a, b = factors
        self.lora_A[name].weight.copy_(a)
        self.lora_B[name].weight.copy_(b)
        if is_residual_init(self.specs[name].init):
            self.initial_factors[name] = (self.lora_A[name].weight.detach().clone(),
                                          self.lora_B[name].weight.detach().clone())

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise ValueError(f"unmerge adapter {name!r} before deleting it")
        if name in self.initial_factors:  # give the base back the part the adapter was made of
            a0, b0 = self.initial_factors.pop(name)
            self._write_base(self.base_weight(torch.float32) + self.specs[name].scaling * (b0.float() @ a0.float()))
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        del self.specs[name]
        self.active.pop(name, None)

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

    @torch.no_grad()
    def _weight_norm(self, name: str) -> torch.Tensor:
        """DoRA's per-row ``||W + s BA||`` (float32), detached: the paper treats it
        as a constant in backward, which is what saves DoRA's memory."""
        w = self.base_weight(torch.float32) + self.delta_weight(name)
        return torch.linalg.norm(w, dim=1)

    def _without_bias(self, y: torch.Tensor) -> torch.Tensor:
        bias = getattr(self.base_layer, "bias", None)
        return y if bias is None else y - bias.to(y.dtype)

    def _adapter_out(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to the base output ``y`` of input ``x``.

        For DoRA with active dropout the base term is recomputed on the dropped
        input, as PEFT does; otherwise it is the base output without bias.
        """
        a, dropout = self.lora_A[name], self.lora_dropout[name]
        h = dropout(x)
        if not autocast_on(x):
            h = h.to(a.weight.dtype)
        out = self.lora_B[name](a(h)) * self.specs[name].scaling
        if name not in self.lora_magnitude_vector:
            return out.to(y.dtype)
        dropped = self.training and not isinstance(dropout, nn.Identity)
        base = self._without_bias(self.base_layer(h) if dropped else y)
        ratio = self.lora_magnitude_vector[name].weight / self._weight_norm(name)
        return ((ratio - 1) * base + ratio * out).to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        if self.row_adapters is not None:
            return self._forward_rows(x, y)
        out = y  # each adapter's DoRA term scales the base output, not what other adapters added to it
        for name, weight in self.active.items():
            if name in self.merged or weight == 0:
                continue
            out = out + self._adapter_out(name, x, y) * weight
        return out

    def _forward_rows(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Row ``i`` of the batch gets adapter ``row_adapters[i]`` (None or a name this
        layer lacks: base only); the base runs once for the whole batch."""
        if len(self.row_adapters) != x.shape[0]:
            raise ValueError(f"{len(self.row_adapters)} row adapters for a batch of {x.shape[0]} rows")
        if self.merged:
            raise ValueError("per-row adapters need unmerged adapters; unmerge first")
        out = y
        for name in dict.fromkeys(self.row_adapters):
            if name not in self.specs:
                continue
            rows = torch.tensor([i for i, n in enumerate(self.row_adapters) if n == name], device=x.device)
            out = out.index_add(0, rows, self._adapter_out(name, x[rows], y[rows]))
        return out

    # --- merge --------------------------------------------------------------
    def merged_weight(self, names: list[str]) -> torch.Tensor:
        """The dense float32 ``[out, in]`` weight with adapters ``names`` (weighted
        as in :attr:`active`) folded in, equal to the forward pass with them."""
        with torch.no_grad():
            return folded(self, self.base_weight(torch.float32), names, norm_dim=1)[0]

    @torch.no_grad()
    def bias_delta(self, names: list[str]) -> torch.Tensor | None:
        """What the adapters ``names`` add to the base bias (float32; PEFT's ``lora_bias``), or None."""
        deltas = [self.active.get(n, 1.0) * self.specs[n].scaling * self.lora_B[n].bias.float()
                  for n in names if self.lora_B[n].bias is not None]
        if not deltas:
            return None
        if getattr(self.base_layer, "bias", None) is None:
            raise ValueError("an adapter with lora_bias cannot be merged into a layer without a bias "
                             "(the merged checkpoint has nowhere to put it); PEFT refuses this merge too")
        return torch.stack(deltas).sum(0)

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Fold adapters into the base weight (re-quantized if the base is 4-bit)."""
        names = to_merge(self, names)
        if not names:
            return
        bias = self.bias_delta(names)
        w, self._dora_scale = folded(self, self.base_weight(torch.float32), names, norm_dim=1)
        self._write_base(w)
        if bias is not None:
            self.base_layer.bias.data += bias.to(self.base_layer.bias.dtype)
        self.merged += names

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`: ``W = (W' - sum_a w_a r_a s B_a A_a) / (1 + sum_a w_a (r_a - 1))``,
        ``r_a = m_a / ||W + s B_a A_a||`` for DoRA adapters, 1 for plain ones."""
        if not self.merged:
            return
        bias = self.bias_delta(self.merged)
        if bias is not None:
            self.base_layer.bias.data -= bias.to(self.base_layer.bias.dtype)
        self._write_base(unfolded(self, self.base_weight(torch.float32), norm_dim=1))
        self.merged, self._dora_scale = [], {}

    def _write_base(self, w: torch.Tensor) -> None:
        base = self.base_layer
        if isinstance(base, Linear4bit):
            base.set_weight(w)
        else:
            target = w.t() if self.fan_in_fan_out else w
            base.weight.data.copy_(target.to(base.weight.dtype))

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={s.r}{', dora' if s.use_dora else ''}{', bias' if s.lora_bias else ''}"
                          for n, s in self.specs.items())
        return f"adapters=[{ranks}], active={list(self.active)}"
