"""add_adalora: AdaLoRA adapters on the chosen linear layers, and their training hooks.

AdaLoRA (Zhang et al., 2023) starts every layer at ``init_r`` and prunes
singular triplets by importance until the average rank is ``target_r``, so the
rank goes where the loss needs it. Two things happen outside the forward pass,
both through :class:`AdaLoraHooks` (the trainer's ``adapter_hooks``): the
orthogonality penalty joins the loss, and the :class:`RankAllocator` masks
triplets after each optimizer step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UsageError
from ..nn import AdaLoraLinear
from .inject import _modules_to_save, adapter_configs, count_parameters, target_paths, train_whole
from .rank_allocator import AdaLoraSchedule, RankAllocator
from .tied_tables import with_tied_partner

log = logging.getLogger("qlora")


@dataclass
class AdaLoraConfig:
    """What ``save_adapter`` writes for an AdaLoRA adapter (PEFT's ``AdaLoraConfig`` fields)."""

    schedule: AdaLoraSchedule
    alpha: float
    dropout: float
    orth_reg_weight: float
    target_modules: list[str]
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    layers: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    rank_pattern: dict[str, list[bool]] | None = None  # layer path -> kept triplets, once pruned
    ensure_weight_tying: bool = False  # as AdapterConfig's


def adalora_layers(model: nn.Module, adapter_name: str = "default") -> dict[str, AdaLoraLinear]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, AdaLoraLinear) and m.adapter_name == adapter_name}


def add_adalora(
    model: nn.Module,
    init_r: int = 12,
    target_r: int = 8,
    tinit: int = 0,
    tfinal: int = 0,
    deltaT: int = 1,
    total_step: int = 1,
    beta1: float = 0.85,
    beta2: float = 0.85,
    orth_reg_weight: float = 0.5,
    alpha: float = 8.0,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    adapter_name: str = "default",
    dtype: torch.dtype = torch.float32,
    verbose: bool = True,
    modules_to_save: list[str] | None = None,
    ensure_weight_tying: bool = False,
) -> nn.Module:
    """Attach an AdaLoRA adapter to the matching linear layers; freeze everything else.

    Args:
        model: a transformers model (4-bit from :func:`qlora.load_model` or dense).
        init_r, target_r: starting rank of each layer, and the average rank left after pruning.
        tinit, tfinal, deltaT, total_step: no pruning for the first ``tinit`` steps, the budget
            falls (cubic) until ``total_step - tfinal``, masks are recomputed every ``deltaT`` steps.
        beta1, beta2: EMA factors of the sensitivity and its uncertainty.
        orth_reg_weight: weight of the orthogonality penalty added to the loss.
        alpha, dropout, target_modules, modules_to_save, ensure_weight_tying: as in :func:`qlora.add_lora`
            (the scale is ``alpha / init_r`` throughout, as in PEFT).

    Returns:
        The same model, modified in place; ``adalora_hooks(model)`` drives the schedule.

    Raises:
        UsageError: nothing matches, the model already has adapters, or the schedule is invalid.
    """
    configs = adapter_configs(model)
    if configs:
        raise UsageError(f"AdaLoRA trains one adapter alone; this model already has {sorted(configs)}")
    schedule = AdaLoraSchedule(init_r, target_r, tinit, tfinal, deltaT, total_step, beta1, beta2)
    try:
        schedule.validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if orth_reg_weight < 0:
        raise UsageError(f"orth_reg_weight must not be negative; got {orth_reg_weight}")
    for p in model.parameters():
        p.requires_grad_(False)
    paths = target_paths(model, target_modules)
    fan_in_fan_out = False
    for path in paths:
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        module = AdaLoraLinear(model.get_submodule(path), init_r, alpha, dropout, adapter_name, dtype)
        module.train(model.training)
        setattr(parent, child, module)
        fan_in_fan_out |= module.fan_in_fan_out or getattr(module.base_layer, "from_conv1d", False)
        for d in (module.lora_A, module.lora_B, module.lora_E):
            d.requires_grad_(True)
    save_paths = _modules_to_save(model, modules_to_save)
    if ensure_weight_tying:
        save_paths = with_tied_partner(model, save_paths)
    train_whole(model, save_paths, ensure_weight_tying)
    names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    configs[adapter_name] = AdaLoraConfig(schedule, alpha, dropout, orth_reg_weight, names, fan_in_fan_out,
                                          getattr(model, "name_or_path", None), paths, save_paths,
                                          ensure_weight_tying=ensure_weight_tying and bool(save_paths))
    if verbose:
        trainable, total = count_parameters(model)
        log.info("qlora: %d layers adapted with AdaLoRA (rank %d -> %d); trainable params %s of %s",
                 len(paths), init_r, target_r, f"{trainable:,}", f"{total:,}")
    return model


def orth_regularization(model: nn.Module, adapter_name: str = "default") -> torch.Tensor:
    """PEFT's penalty: the mean over all P and Q of ``||P^T P - I||_F`` and ``||Q Q^T - I||_F``.

    Unsquared Frobenius norms averaged over matrices, exactly as PEFT computes
    it, so a weight tuned there means the same here.
    """
    terms = []
    for layer in adalora_layers(model, adapter_name).values():
        for cov in (layer.A @ layer.A.T, layer.B.T @ layer.B):
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)))
    return torch.stack(terms).mean()


class AdaLoraHooks:
    """The trainer's ``adapter_hooks`` for AdaLoRA: penalty in the loss, rank allocation after each step."""

    def __init__(self, model: nn.Module, adapter_name: str = "default") -> None:
        self.model, self.adapter_name = model, adapter_name
        self.config: AdaLoraConfig = adapter_configs(model)[adapter_name]
        self.allocator = RankAllocator(adalora_layers(model, adapter_name), self.config.schedule)

    def extra_loss(self) -> torch.Tensor:
        return self.config.orth_reg_weight * orth_regularization(self.model, self.adapter_name)

    def after_step(self, step: int) -> None:
        """Run after ``optimizer.step()``, before ``zero_grad()``: importance uses this step's gradients."""
        self.allocator.update_and_allocate(step)
        self.config.rank_pattern = self.allocator.rank_pattern

    def summary(self) -> str:
        ranks = self.allocator.ranks()
        return (f"AdaLoRA ranks (total {sum(ranks.values())}, budget {self.allocator.target_bgt}): "
                + ", ".join(f"{path}={r}" for path, r in ranks.items()))

    def state_dict(self) -> dict:
        """What a checkpoint needs to continue the schedule exactly: the scores and pattern, and every triplet,
        the pruned ones too (the saved adapter keeps only the surviving ones; the pruned ones still learn from the
        orthogonality penalty and may come back at a later reallocation)."""
        layers = {f"{path}.{kind}": getattr(layer, kind).detach().clone()
                  for path, layer in self.allocator.layers.items() for kind in ("A", "B", "E")}
        return {"allocator": self.allocator.state_dict(), "layers": layers}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for path, layer in self.allocator.layers.items():
            for kind in ("A", "B", "E"):
                getattr(layer, kind).copy_(state["layers"][f"{path}.{kind}"])
        self.allocator.load_state_dict(state["allocator"])
        self.config.rank_pattern = self.allocator.rank_pattern
