"""NEFTune (Jain et al. 2023): noisy token embeddings while fine-tuning.

Uniform noise in ``[-a, a]`` with ``a = alpha / sqrt(tokens x width)`` is added to the
output of the input embedding in training mode only (evaluation and generation see the
clean model), the scaling of the paper and of transformers' ``neftune_noise_alpha``.
It draws from torch's global generator, which the trainer seeds per step, so a resumed
run draws the same noise.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def add_neftune(model: nn.Module, alpha: float) -> RemovableHandle:
    """Add NEFTune noise of scale ``alpha`` to ``model``'s token embeddings; remove it with the handle."""
    if not alpha > 0:
        raise ValueError(f"NEFTune alpha must be positive, got {alpha}")

    def noisy(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        bound = alpha / math.sqrt(output.size(1) * output.size(-1))
        return output + torch.zeros_like(output).uniform_(-bound, bound)

    return model.get_input_embeddings().register_forward_hook(noisy)
