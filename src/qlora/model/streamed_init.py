"""LoftQ, PiSSA and OLoRA inits computed layer by layer while a 4-bit model loads.

These inits rewrite the base from its 16-bit weights. Computed on the whole 16-bit
model (``load_model(quant=None)``, ``add_lora(init=...)``, ``quantize_model``) they
need it all in memory at once: 140 GB for a 70B model whose 4-bit form takes 40.
Given to :func:`~qlora.model.load.load_model` as its ``weight_hook``, a
:class:`StreamedInit` receives each adapted layer's weight as it is read, computes
the init there and returns what the 4-bit layer stores (PiSSA/OLoRA's residual
``W - s B0 A0``, the input of LoftQ's Q); ``add_lora(initial=...)`` then starts the
adapters from the factors it kept. The peak is the 4-bit model, one layer's 16-bit
weight and its factorization.

The adapted layers come out as on the whole dense model, bit for bit. The checkpoint
is read in its own order, not ``add_lora``'s, so ``pissa_niter_K``'s random draws are
replayed: each layer's init runs from the generator state it has in ``add_lora``'s
order after ``torch.manual_seed(seed)``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..errors import UsageError
from ..nn import Linear4bit, LoraSpec
from ..nn.lora import dense_shape, factor_layers
from ..nn.loftq import loftq_factors
from ..nn.residual_init import draw_like_svd_lowrank, residual_split
from ..nn.residual_init_names import is_residual_init
from .inject import check_init, check_patterns, layer_spec, target_paths


class StreamedInit:
    """The init of an adapter ``add_lora`` will add with these options (PEFT's meaning, see
    :func:`~qlora.model.inject.add_lora`), computed while ``load_model(weight_hook=self)`` reads the
    weights. ``seed`` is the one given to ``torch.manual_seed`` before ``add_lora`` (``pissa_niter_K``
    draws from it). Layers the load keeps dense (an output head named as a target) get their init from
    ``add_lora`` itself, from the same draws."""

    def __init__(self, init: str, r: int = 16, alpha: float = 16.0, target_modules: str | list[str] = "all-linear",
                 rslora: bool = False, rank_pattern: dict[str, int] | None = None,
                 alpha_pattern: dict[str, float] | None = None, loftq_iter: int = 1,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        check_init(init, loftq_iter)
        if init != "loftq" and not is_residual_init(init):
            raise UsageError(f"init {init!r} does not rewrite the base; only loftq, pissa, pissa_niter_K and olora "
                             "are computed while loading.")
        self.spec = LoraSpec(r=r, alpha=alpha, rslora=rslora, init=init, dtype=dtype, loftq_iter=loftq_iter)
        self.target_modules = target_modules
        self.rank_pattern, self.alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
        self.seed = seed
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (A0, B0) by layer path, until add_lora
        self._specs: dict[str, LoraSpec] = {}
        self._formats: dict[str, tuple[str, int, bool, torch.dtype]] = {}  # the 4-bit layers' (LoftQ's Q)
        self._states: dict[str, torch.Tensor] = {}  # generator state before each layer's adapter, in add_lora order
        self._shapes: dict[str, tuple[int, int]] = {}  # (in, out) of the layers with such a state
        self._device = torch.device("cpu")  # the model's, whose generator the inits draw from

    def prepare(self, model: nn.Module, device: torch.device) -> set[str]:
        """Choose the adapted layers on the model skeleton, as ``add_lora`` will (its refusals come now,
        before anything is read), and replay the draws of their inits; the 4-bit ones are streamed."""
        paths = target_paths(model, self.target_modules)
        check_patterns(self.rank_pattern, self.alpha_pattern, paths, warn=False)  # add_lora warns
        self._specs = {p: layer_spec(self.spec, p, self.rank_pattern, self.alpha_pattern) for p in paths}
        layers = {p: model.get_submodule(p) for p in paths}
        self._formats = {p: (m.quant_type, m.blocksize, m.double_quant, m.compute_dtype)
                         for p, m in layers.items() if isinstance(m, Linear4bit)}
        self._device = device
        if self.spec.init.startswith("pissa_niter_"):
            with self._forked():
                torch.manual_seed(self.seed)
                for path, module in layers.items():  # what add_lora draws for each layer, in its order
                    self._states[path] = self._state()
                    in_f, out_f, _ = dense_shape(module)
                    self._shapes[path] = (in_f, out_f)
                    factor_layers(in_f, out_f, self._specs[path], self._device)
                    draw_like_svd_lowrank(out_f, in_f, self._specs[path].r, self._device)
        return set(self._formats)

    @torch.no_grad()
    def __call__(self, path: str, weight: torch.Tensor) -> torch.Tensor:
        """Layer ``path``'s init from its ``[out, in]`` weight; returns what its 4-bit base stores."""
        spec = self._specs[path]
        w = weight.to(torch.float32)
        try:
            with self.draws(path, after_adapter=True):
                if spec.init == "loftq":
                    quant_type, blocksize, double_quant, compute_dtype = self._formats[path]
                    q = Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=compute_dtype,
                                   quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, device=w.device)
                    a, b, base = loftq_factors(w, q, spec.r, spec.scaling, spec.loftq_iter)
                else:
                    a, b, residual = residual_split(w, spec.init, spec.r, spec.scaling)
                    base = residual.to(weight.dtype)  # what the dense layer would hold before quantize_model
        except ValueError as exc:
            raise UsageError(f"{path}: {exc}") from None
        self.factors[path] = (a, b)
        return base

    def start(self, path: str, spec: LoraSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The factors computed for layer ``path`` (handed over once), or None where the load kept it dense.

        Raises:
            UsageError: ``add_lora`` was given other init options than this object.
        """
        ours = self._specs.get(path)
        mine = None if ours is None else (ours.init, ours.r, ours.scaling, ours.loftq_iter, ours.dtype)
        if mine is not None and mine != (spec.init, spec.r, spec.scaling, spec.loftq_iter, spec.dtype):
            raise UsageError(f"{path}: the init streamed while loading was computed with init={ours.init!r}, "
                             f"r={ours.r}, scale {ours.scaling}, but add_lora asks for init={spec.init!r}, r={spec.r}, "
                             f"scale {spec.scaling}; give both the same options.")
        return self.factors.pop(path, None)

    @contextlib.contextmanager
    def draws(self, path: str, after_adapter: bool = False) -> Iterator[None]:
        """Run with the generator state layer ``path``'s adapter starts from in ``add_lora``'s order, or
        (``after_adapter``) its init, once the adapter's layers made their draws; no change for inits that
        draw nothing. The generator is restored afterwards."""
        if path not in self._states:
            yield
            return
        with self._forked():
            if self._device.type == "cpu":
                torch.set_rng_state(self._states[path])
            else:
                torch.get_device_module(self._device.type).set_rng_state(self._states[path], self._device)
            if after_adapter:
                in_f, out_f = self._shapes[path]
                factor_layers(in_f, out_f, self._specs[path], self._device)
            yield

    def _state(self) -> torch.Tensor:
        if self._device.type == "cpu":
            return torch.get_rng_state()
        return torch.get_device_module(self._device.type).get_rng_state(self._device)

    def _forked(self):
        """Leave the caller's generators (CPU, and the load device's) as they were."""
        accelerator = self._device.type != "cpu"
        return torch.random.fork_rng(devices=[self._device] if accelerator else [],
                                     device_type=self._device.type if accelerator else "cuda")
