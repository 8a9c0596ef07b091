"""The losses of preference tuning: DPO and its variants, CPO / SimPO, ORPO (odds ratio) and KTO.

All score an answer by the log-probability the policy gives its tokens,
``log p(y | x) = sum_t log p(y_t | x, y_<t)`` over the answer's tokens only,
computed for the chosen and rejected rows of one batch in one forward pass
(KTO: for each example's one completion).

DPO (Rafailov et al. 2023), with ``r(y) = beta * (log p(y|x) - log p_ref(y|x))``
and label smoothing ``eps`` (conservative DPO: the probability that a pair's
label is flipped)::

    loss = -(1 - eps) * log sigmoid(r(y_w) - r(y_l)) - eps * log sigmoid(r(y_l) - r(y_w))

ORPO (Hong et al. 2024), with per-token mean log-probs ``a = log p(y|x) / |y|``
and ``odds(y) = p / (1 - p)`` of ``p = exp(a)``::

    loss = NLL(chosen) - lambda * log sigmoid(log odds(y_w) - log odds(y_l))

DPO's other loss types (:func:`dpo_losses`, with f-DPO's scores :func:`f_divergence_scores`, LD-DPO's
answer split :func:`ld_label_sets` and WPO's pair weights :func:`wpo_weights`), CPO / SimPO
(:func:`cpo_losses`, no reference model, with AlphaPO's :func:`alphapo_rewards`) and KTO
(:func:`kto_losses`, single completions) are TRL 1.16's. All follow TRL 1.16
(``DPOTrainer``, ``CPOTrainer``, ``ORPOTrainer`` and ``KTOTrainer``)
to 1e-5 in fp32 (tests/test_preference_vs_trl.py), including
ORPO's NLL over the whole chosen sequence, prompt included, as in the ORPO
paper's code (CPO's and RPO's NLL covers the chosen answer's tokens only), and the
reward metrics (DPO: ``r``; CPO, SimPO: ``beta`` times the policy's log-probs; ORPO: ``lambda * a``).
TRL 1.16 dropped label smoothing from its sigmoid loss; ours is the
conservative-DPO form that earlier TRL and LLaMA-Factory use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qlora.nn.chunked_ce import CHUNK_ROWS, chunked_linear_cross_entropy
from qlora.train.data import IGNORE_INDEX
from qlora.train.f_divergences import F_DIVERGENCE_LOSSES
from qlora.train.loss import decoder_and_head, model_inputs


def label_logps(model: nn.Module, batch: dict[str, torch.Tensor], label_sets: list[torch.Tensor],
                chunked: bool = False, wpo_labels: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per-row sums of ``log p(label_t | tokens_<t)`` for each ``[rows, T]`` label tensor (-100: skipped).

    One forward pass serves every label set. With ``chunked`` the output head is
    applied row by row inside :func:`chunked_linear_cross_entropy`, so the float32
    ``[rows, T, vocab]`` log-probabilities never exist; rows with no label are
    not computed. With ``wpo_labels`` one more tensor follows, without gradient:
    per-row sums over those labels of ``log p(label_t) - log sum_v p(v)^2``, the
    aligned log-probs of WPO's weights (:func:`wpo_weights`).
    """
    inputs = model_inputs(batch, model)
    shifted = [labels[:, 1:] for labels in label_sets]
    if chunked:
        decoder, head = decoder_and_head(model)
        hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1]
        zero = hidden.new_zeros((), dtype=torch.float32)
        out = [torch.stack([-chunked_linear_cross_entropy(hidden[r], head.weight, labels[r])
                            if bool((labels[r] != IGNORE_INDEX).any()) else zero
                            for r in range(labels.shape[0])]) for labels in shifted]
        if wpo_labels is not None:
            out.append(_aligned_logps_chunked(hidden.detach(), head.weight.detach(), wpo_labels[:, 1:]))
        return out
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    out = [_picked_sum(logprobs, labels) for labels in shifted]
    if wpo_labels is not None:
        with torch.no_grad():
            out.append(_picked_sum(logprobs, wpo_labels[:, 1:], torch.logsumexp(2 * logprobs, dim=-1)))
    return out


def _picked_sum(logprobs: torch.Tensor, labels: torch.Tensor, minus: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_t (logprobs[t, label_t] - minus[t])`` over the labelled positions of each row."""
    picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    if minus is not None:
        picked = picked - minus
    return (picked * (labels != IGNORE_INDEX)).sum(-1)


@torch.no_grad()
def _aligned_logps_chunked(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """:func:`label_logps`' WPO sums with the head applied ``chunk`` tokens at a time (no ``[T, vocab]`` tensor)."""
    out = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
    for r in range(labels.shape[0]):
        for s in range(0, labels.shape[1], chunk):
            y = labels[r, s:s + chunk]
            if bool((y != IGNORE_INDEX).any()):
                logprobs = torch.log_softmax((hidden[r, s:s + chunk] @ weight.to(hidden.dtype).t()).float(), dim=-1)
                out[r] += _picked_sum(logprobs, y, torch.logsumexp(2 * logprobs, dim=-1))
    return out


def wpo_weights(aligned_logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """WPO's pair weights ``[pairs]`` (Zhou et al. 2024, Eq. 2, as TRL 1.16's ``use_weighting``), detached.

    Each answer weighs ``exp(mean_t (log p(y_t) - log sum_v p(v)^2))``, the probability of its tokens relative
    to the policy's own sampling, averaged over its tokens; a pair weighs its chosen weight times its rejected one.

    Args:
        aligned_logps: ``[2 * pairs]`` sums from :func:`label_logps` (``wpo_labels``), chosen rows then rejected.
        lengths: ``[2 * pairs]`` answer token counts.
    """
    weights = torch.exp(aligned_logps.detach().float() / lengths.float().clamp(min=1))
    n = weights.shape[0] // 2
    return weights[:n] * weights[n:]


def ld_label_sets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LD-DPO's split of each answer's labels (Liu et al. 2024; TRL's ``ld_alpha``): its first ``m`` tokens and the
    rest, ``m`` the shorter answer's length in its pair.

    ``log p(y) = shared + alpha * tail`` then counts the verbose tail of the longer answer by ``alpha`` only.

    Args:
        labels: ``[2 * pairs, T]`` labels, chosen rows then rejected (``-100`` outside the answers).
    """
    keep = labels[:, 1:] != IGNORE_INDEX  # the positions label_logps scores
    position = keep.cumsum(dim=1)
    lengths = keep.sum(dim=1)
    n = labels.shape[0] // 2
    shared = torch.minimum(lengths[:n], lengths[n:]).repeat(2).unsqueeze(1)
    first = labels[:, :1]
    in_shared = torch.cat([torch.zeros_like(first, dtype=torch.bool), keep & (position <= shared)], dim=1)
    in_tail = torch.cat([torch.zeros_like(first, dtype=torch.bool), keep & (position > shared)], dim=1)
    return labels.masked_fill(~in_shared, IGNORE_INDEX), labels.masked_fill(~in_tail, IGNORE_INDEX)


def _conservative(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """``-(1 - eps) log sigmoid(x) - eps log sigmoid(-x)``: the sigmoid loss when a label is wrong with probability eps."""
    losses = -(1 - eps) * F.logsigmoid(logits)
    return losses - eps * F.logsigmoid(-logits) if eps else losses


def f_divergence_scores(logratio: torch.Tensor, divergence: str = "reverse_kl", alpha: float = 0.5) -> torch.Tensor:
    """f-DPO's score ``f'(t)`` of a log-ratio ``log t = log p(y) - log p_ref(y)`` (Wang et al. 2023; TRL 1.16).

    reverse_kl (DPO): ``log t``; forward_kl: ``1 - 1/t``; js_divergence: ``log(2t / (1 + t))``;
    alpha_divergence: ``(t^(alpha - 1) - 1) / (alpha - 1)`` (``log t`` at alpha = 1; the exponent is clamped at
    80, as TRL does, so that ``exp`` stays finite).
    """
    if divergence == "reverse_kl" or (divergence == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratio
    if divergence == "forward_kl":
        return 1 - torch.exp(-logratio)
    if divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    if divergence == "alpha_divergence":
        return (torch.exp(torch.clamp((alpha - 1.0) * logratio, max=80.0)) - 1.0) / (alpha - 1.0)
    raise ValueError(f"unknown f-divergence {divergence!r}")


def dpo_losses(loss_type: str, logps: tuple[torch.Tensor, torch.Tensor], ref_logps: tuple[torch.Tensor, torch.Tensor],
               lengths: tuple[torch.Tensor, torch.Tensor], beta: float, label_smoothing: float = 0.0,
               discopop_tau: float = 0.05, f_divergence: str = "reverse_kl", f_alpha: float = 0.5) -> torch.Tensor:
    """Per-pair losses ``[pairs]`` (float32) of one of TRL 1.16's DPO loss types.

    With an f-divergence other than reverse_kl, ``c`` and ``r`` in ``x`` and in ipo's and sigmoid_norm's
    per-token difference are its scores :func:`f_divergence_scores` of the log-ratios (the losses of
    :data:`~qlora.train.f_divergences.F_DIVERGENCE_LOSSES` only).

    With ``c = log p(y_w) - log p_ref(y_w)`` and ``r = log p(y_l) - log p_ref(y_l)`` (sums over the answer's
    tokens), ``x = beta * (c - r)`` and ``eps`` = ``label_smoothing``:

    - sigmoid: ``-(1 - eps) log s(x) - eps log s(-x)`` (conservative DPO; TRL 1.16 has no eps here);
    - hinge (SLiC): ``relu(1 - x)``; ipo: ``(c / |y_w| - r / |y_l| - 1 / (2 beta))^2`` (per-token);
    - robust: ``(-(1 - eps) log s(x) + eps log s(-x)) / (1 - 2 eps)``;
    - exo_pair: ``KL([s(x), s(-x)] || [1 - eps, eps])`` (needs eps > 0);
    - nca_pair: ``-log s(beta c) - log s(-beta c) / 2 - log s(-beta r) / 2``; bco_pair: ``-log s(beta c) - log s(-beta r)``;
    - sppo_hard: ``(c - 1 / (2 beta))^2 + (r + 1 / (2 beta))^2``;
    - aot / aot_unpaired: the sigmoid loss over the batch's sorted ``log p(y_w) - log p(y_l)`` minus the sorted
      reference ones / sorted ``c`` minus sorted ``r`` (so a pair's loss depends on the micro-batch);
    - apo_zero: ``1 - s(beta c) + s(beta r)``; apo_down: ``s(beta c) + 1 - s(x)``;
    - discopop: ``(1 - m) (-log s(x)) + m exp(-x)`` with ``m = s(x / tau)``;
    - sigmoid_norm: ``-log s(beta (c / |y_w| - r / |y_l|))``.

    ``s`` is the logistic sigmoid, ``|y|`` an answer's token count (``lengths``).
    """
    chosen, rejected = (t.float() for t in logps)
    ref_chosen, ref_rejected = (t.float() for t in ref_logps)
    c, r = chosen - ref_chosen, rejected - ref_rejected
    score_c, score_r = (f_divergence_scores(t, f_divergence, f_alpha) for t in (c, r))
    if f_divergence != "reverse_kl" and loss_type not in F_DIVERGENCE_LOSSES:
        raise ValueError(f"f-divergence {f_divergence!r} does not apply to the DPO loss {loss_type!r}")
    x = beta * (score_c - score_r)
    eps = label_smoothing
    if loss_type == "sigmoid":
        return _conservative(x, eps)
    if loss_type == "hinge":
        return torch.relu(1 - x)
    if loss_type in ("ipo", "sigmoid_norm"):
        n_chosen, n_rejected = (n.float().clamp(min=1) for n in lengths)
        per_token = score_c / n_chosen - score_r / n_rejected
        return (per_token - 1 / (2 * beta)) ** 2 if loss_type == "ipo" else -F.logsigmoid(beta * per_token)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)
    if loss_type == "exo_pair":
        return (torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps))
                + torch.sigmoid(-x) * (F.logsigmoid(-x) - math.log(eps)))
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if loss_type == "aot":
        delta = torch.sort(chosen - rejected).values - torch.sort(ref_chosen - ref_rejected).values
        return _conservative(beta * delta, eps)
    if loss_type == "aot_unpaired":
        return _conservative(beta * (torch.sort(c).values - torch.sort(r).values), eps)
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * c) + 1 - torch.sigmoid(x)
    if loss_type == "discopop":
        mix = torch.sigmoid(x / discopop_tau)
        return -F.logsigmoid(x) * (1 - mix) + torch.exp(-x) * mix
    raise ValueError(f"unknown DPO loss type {loss_type!r}")


def alphapo_rewards(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward shape (Gupta et al. 2025; TRL 1.16 CPOConfig's ``alpha``): ``(1 - p^-alpha) / alpha`` of
    ``p = exp(logps)``, which is ``logps`` itself at alpha = 0 (its limit)."""
    if alpha == 0:
        return logps
    return (1 - torch.exp(-alpha * logps.float())) / alpha


def cpo_losses(loss_type: str, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float,
               label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> torch.Tensor:
    """Per-pair losses ``[pairs]`` of TRL 1.16's CPOTrainer (reference-free), from the policy's answer log-probs
    (sums for sigmoid and hinge, per-token means for ipo and simpo; with AlphaPO their :func:`alphapo_rewards`),
    ``d = log p(y_w) - log p(y_l)``:

    - sigmoid (CPO): ``-(1 - eps) log s(beta d) - eps log s(-beta d)``; hinge: ``relu(1 - beta d)``;
    - ipo: ``(d - 1 / (2 beta))^2``; simpo: the sigmoid loss of ``d - gamma / beta`` (SimPO's target margin).
    """
    d = chosen_logps.float() - rejected_logps.float()
    if loss_type == "sigmoid":
        return _conservative(beta * d, label_smoothing)
    if loss_type == "simpo":
        return _conservative(beta * (d - simpo_gamma / beta), label_smoothing)
    if loss_type == "hinge":
        return torch.relu(1 - beta * d)
    if loss_type == "ipo":
        return (d - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown CPO loss type {loss_type!r}")


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


def kto_losses(loss_type: str, logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor,
               kl: torch.Tensor, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """Per-example losses ``[B]`` of TRL 1.16's KTOTrainer and the rewards ``beta * r`` (detached).

    ``r = log p(y|x) - log p_ref(y|x)``; ``kl`` is the batch's (detached) KL estimate ``z``:
    kto: ``w_d (1 - s(beta (r - z)))`` for a desirable completion, ``w_u (1 - s(beta (z - r)))`` for an
    undesirable one; apo_zero_unpaired: ``w_d (1 - s(beta r))`` and ``w_u s(beta r)``.
    """
    r = logps.float() - ref_logps.float()
    if loss_type == "kto":
        chosen, rejected = 1 - torch.sigmoid(beta * (r - kl)), 1 - torch.sigmoid(beta * (kl - r))
    elif loss_type == "apo_zero_unpaired":
        chosen, rejected = 1 - torch.sigmoid(beta * r), torch.sigmoid(beta * r)
    else:
        raise ValueError(f"unknown KTO loss type {loss_type!r}")
    return torch.where(desirable, desirable_weight * chosen, undesirable_weight * rejected), beta * r.detach()
