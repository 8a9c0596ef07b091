"""RankAllocator: AdaLoRA's importance-driven pruning of singular triplets.

Each adapter entry ``w`` gets a sensitivity ``I = |w * grad|``, smoothed
``Ī ← β1 Ī + (1-β1) I`` and an uncertainty ``Ū ← β2 Ū + (1-β2) |I - Ī|``;
its score is ``Ī * Ū`` (AdaLoRA paper, eq. 8-10). A triplet ``i`` scores
``s(λ_i) + mean_j s(Q_ij) + mean_j s(P_ji)``. The total budget (sum of ranks
over all layers) falls from ``init_r * n`` to ``target_r * n`` on a cubic
schedule between ``tinit`` and ``total_step - tfinal``; every ``deltaT`` steps
the lowest-scoring triplets across *all* layers are masked (λ_i = 0), so ranks
move to the layers that need them. The arithmetic follows PEFT's
``RankAllocator`` step for step, so both prune the same triplets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nn import AdaLoraLinear


@dataclass(frozen=True)
class AdaLoraSchedule:
    """The rank schedule, as users know it from PEFT's ``AdaLoraConfig``."""

    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    total_step: int = 1
    beta1: float = 0.85
    beta2: float = 0.85

    def validate(self) -> None:
        """Raises ValueError where PEFT would, with the reason."""
        if self.total_step <= 0:
            raise ValueError("AdaLoRA needs total_step > 0")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"the AdaLoRA schedule leaves no budgeting phase: tinit ({self.tinit}) must be below "
                             f"total_step - tfinal ({self.total_step} - {self.tfinal})")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError("AdaLoRA beta1 and beta2 must lie in (0, 1)")
        if not 0 < self.target_r <= self.init_r:
            raise ValueError(f"AdaLoRA needs 0 < target_r <= init_r; got {self.target_r} and {self.init_r}")
        if self.deltaT < 1:
            raise ValueError(f"AdaLoRA deltaT must be at least 1; got {self.deltaT}")


class RankAllocator:
    """Tracks importance scores of ``layers`` and masks triplets to the scheduled budget."""

    def __init__(self, layers: dict[str, AdaLoraLinear], schedule: AdaLoraSchedule) -> None:
        self.layers = layers
        self.schedule = schedule
        self.init_bgt = sum(layer.A.shape[0] for layer in layers.values())
        self.target_bgt = schedule.target_r * len(layers)
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.reset_ipt()

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def _params(self):
        for path, layer in self.layers.items():
            for kind in ("A", "B", "E"):
                yield f"{path}.{kind}", getattr(layer, kind)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at ``step``, whether to mask at this step)."""
        s = self.schedule
        if step <= s.tinit:
            return self.init_bgt, False
        if step > s.total_step - s.tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - s.tinit) / (s.total_step - s.tfinal - s.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff ** 3) + self.target_bgt)
        return budget, step % s.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        """Fold this step's sensitivity ``|w * grad|`` into the smoothed scores."""
        b1, b2 = self.schedule.beta1, self.schedule.beta2
        for key, p in self._params():
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            avg = self.exp_avg_ipt.get(key, torch.zeros_like(p))
            unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
            avg = b1 * avg + (1 - b1) * ipt
            self.exp_avg_ipt[key] = avg
            self.exp_avg_unc[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def _score(self, key: str) -> torch.Tensor:
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero the singular values of the ``init_bgt - budget`` least important triplets."""
        triplet = {}
        for path in self.layers:
            ipt_a = self._score(f"{path}.A").mean(dim=1, keepdim=True)
            ipt_b = self._score(f"{path}.B").mean(dim=0).view(-1, 1)
            ipt_ab = torch.cat([ipt_a, ipt_b], dim=1).sum(dim=1)
            triplet[path] = self._score(f"{path}.E").view(-1) + ipt_ab.view(-1)
        threshold = torch.kthvalue(torch.cat(list(triplet.values())), k=self.init_bgt - budget)[0].item()
        pattern = {}
        for path, layer in self.layers.items():
            pruned = triplet[path].view(-1, 1) <= threshold
            layer.E.masked_fill_(pruned, 0.0)
            pattern[path] = (~pruned).view(-1).tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self) -> None:
        for path, layer in self.layers.items():
            keep = torch.tensor(self.rank_pattern[path], dtype=torch.bool, device=layer.E.device).view(-1, 1)
            layer.E.masked_fill_(~keep, 0.0)

    def update_and_allocate(self, step: int) -> int:
        """Call after ``optimizer.step()`` and before ``zero_grad()`` (needs this step's gradients).

        Returns the budget (total rank) in force after ``step``.
        """
        final_start = self.schedule.total_step - self.schedule.tfinal
        if step < final_start:
            self.update_ipt()
            budget, mask = self.budget_schedule(step)
            if mask:
                self.rank_pattern = self.mask_to_budget(budget)
            return budget
        if step == final_start:
            self.rank_pattern = self.mask_to_budget(self.budget_schedule(step)[0])
            self.reset_ipt()
        else:
            self.mask_using_rank_pattern()
        return self.target_bgt

    def ranks(self) -> dict[str, int]:
        """Rank of each layer under the current pattern (``init_r`` before the first masking)."""
        if self.rank_pattern is None:
            return {path: layer.A.shape[0] for path, layer in self.layers.items()}
        return {path: sum(keep) for path, keep in self.rank_pattern.items()}

    def state_dict(self) -> dict:
        return {"exp_avg_ipt": self.exp_avg_ipt, "exp_avg_unc": self.exp_avg_unc, "rank_pattern": self.rank_pattern}

    def load_state_dict(self, state: dict) -> None:
        self.exp_avg_ipt, self.exp_avg_unc = dict(state["exp_avg_ipt"]), dict(state["exp_avg_unc"])
        self.rank_pattern = state["rank_pattern"]
