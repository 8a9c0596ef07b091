"""The losses of preference tuning: DPO (sigmoid) and ORPO (odds ratio).

Both score an answer by the log-probability the policy gives its tokens,
``log p(y | x) = sum_t log p(y_t | x, y_<t)`` over the answer's tokens only,
computed for the chosen and rejected rows of one batch in one forward pass.

DPO (Rafailov et al. 2023), with ``r(y) = beta * (log p(y|x) - log p_ref(y|x))``
and label smoothing ``eps`` (conservative DPO: the probability that a pair's
label is flipped)::

    loss = -(1 - eps) * log sigmoid(r(y_w) - r(y_l)) - eps * log sigmoid(r(y_l) - r(y_w))

ORPO (Hong et al. 2024), with per-token mean log-probs ``a = log p(y|x) / |y|``
and ``odds(y) = p / (1 - p)`` of ``p = exp(a)``::

    loss = NLL(chosen) - lambda * log sigmoid(log odds(y_w) - log odds(y_l))

Both follow TRL 1.16 (``DPOTrainer`` with ``loss_type="sigmoid"``, and
``ORPOTrainer``) to 1e-5 in fp32 (tests/test_preference_vs_trl.py), including
ORPO's NLL over the whole chosen sequence, prompt included, as in the ORPO
paper's code, and the reward metrics (DPO: ``r``; ORPO: ``lambda * a``).
TRL 1.16 dropped label smoothing from its sigmoid loss; ours is the
conservative-DPO form that earlier TRL and LLaMA-Factory use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qlora.nn.chunked_ce import chunked_linear_cross_entropy
from qlora.train.data import IGNORE_INDEX
from qlora.train.loss import decoder_and_head, model_inputs


def label_logps(model: nn.Module, batch: dict[str, torch.Tensor], label_sets: list[torch.Tensor],
                chunked: bool = False) -> list[torch.Tensor]:
    """Per-row sums of ``log p(label_t | tokens_<t)`` for each ``[rows, T]`` label tensor (-100: skipped).

    One forward pass serves every label set. With ``chunked`` the output head is
    applied row by row inside :func:`chunked_linear_cross_entropy`, so the float32
    ``[rows, T, vocab]`` log-probabilities never exist; rows with no label are
    not computed.
    """
    inputs = model_inputs(batch)
    shifted = [labels[:, 1:] for labels in label_sets]
    if chunked:
        decoder, head = decoder_and_head(model)
        hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1]
        zero = hidden.new_zeros((), dtype=torch.float32)
        return [torch.stack([-chunked_linear_cross_entropy(hidden[r], head.weight, labels[r])
                             if bool((labels[r] != IGNORE_INDEX).any()) else zero
                             for r in range(labels.shape[0])]) for labels in shifted]
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    out = []
    for labels in shifted:
        keep = labels != IGNORE_INDEX
        picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out.append((picked * keep).sum(-1))
    return out


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float, label_smoothing: float = 0.0):
    """Per-pair DPO losses and the implicit rewards ``beta * (log p - log p_ref)`` (detached).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[pairs]`` float32.
    """
    chosen_ratio = chosen_logps.float() - ref_chosen_logps.float()
    rejected_ratio = rejected_logps.float() - ref_rejected_logps.float()
    margin = beta * (chosen_ratio - rejected_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(margin)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-margin)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-log 2`` (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor):
    """ORPO's ``log sigmoid(log odds ratio)`` per pair and the log odds ratio itself.

    Args:
        chosen_mean_logps, rejected_mean_logps: per-token mean log-probs ``[pairs]``.
    """
    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return F.logsigmoid(log_odds), log_odds
