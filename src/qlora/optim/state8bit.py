"""The AdamW update on 8-bit blockwise-quantized moments (8-bit optimizers
paper, Dettmers et al. 2022), in bitsandbytes' order of operations.

Each step dequantizes both moments to float32, updates them and the parameter
in float32, then requantizes each moment with fresh per-block absmax. The
first moment may be negative (signed dynamic code); the second is not
(unsigned code, twice the resolution). The order below is the one of
bitsandbytes' CPU kernel, so per-step results match it bit for bit.
"""

from __future__ import annotations

import math

import torch

from ..quant import dequantize_blockwise, dynamic_code, quantize_blockwise
from .moments import QUANT_BLOCK


@torch.no_grad()
def adamw_update_8bit(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, torch.Tensor],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step of flat ``param`` (updated in place) with 8-bit ``state``
    (``exp_avg_codes``/``_absmax``, ``exp_avg_sq_codes``/``_absmax``, rewritten in place)."""
    signed, unsigned = dynamic_code(True, param.device), dynamic_code(False, param.device)
    m = dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], signed, QUANT_BLOCK)
    v = dequantize_blockwise(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], unsigned, QUANT_BLOCK)
    g = grad.float()
    p = param.float()

    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    denom = (v.sqrt() / correction2).add_(eps)
    if weight_decay > 0.0:
        p.mul_(1.0 - lr * weight_decay)
    p.addcdiv_(m, denom, value=-lr / correction1)
    if p is not param:
        param.copy_(p)

    for key, moment, code in (("exp_avg", m, signed), ("exp_avg_sq", v, unsigned)):
        codes, absmax = quantize_blockwise(moment, code, QUANT_BLOCK)
        state[f"{key}_codes"].copy_(codes)
        state[f"{key}_absmax"].copy_(absmax)
