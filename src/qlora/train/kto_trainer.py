"""KTO on a 4-bit base: ``qlora train --method kto``, TRL 1.16's KTOTrainer.

KTO (Ethayarajh et al. 2024) learns from single completions labelled desirable
or not (:mod:`qlora.train.data.unpaired`), against a reference model: the base
with the adapters off, or the starting ``--adapter`` (a frozen copy), as for DPO.
With ``r = log p(y|x) - log p_ref(y|x)`` (sums over the completion's tokens) and
the KL estimate ``z = max(0, mean(log p(y'|x) - log p_ref(y'|x)))`` over the
micro-batch's mismatched pairs ``(x, y')`` (no gradient; under several ranks the
global micro-batch's: its completions rotate across the ranks' shares, and the sum
and count of the KL rows are all-reduced before the clamp)::

    desirable:   w_d * (1 - sigmoid(beta * (r - z)))
    undesirable: w_u * (1 - sigmoid(beta * (z - r)))

and with ``--loss-type apo_zero_unpaired`` (no KL term) ``w_d * (1 - sigmoid(beta r))`` and
``w_u * sigmoid(beta r)``. The step loss is the mean over the step's examples (TRL's for one
micro-batch). The KL estimate is per micro-batch, as TRL's: with gradient accumulation each
micro-batch has its own. Across ranks TRL gathers the ranks' means and clamps their mean; ours is
the mean over all ranks' KL rows, the same value while every rank has ``--batch-size`` rows, and
in the short micro-batch that ends an epoch still that of one process, so N ranks x batch B equal
one process with batch N*B. (TRL's mismatched pairs rotate within each device's batch, so a TRL
run's pairs depend on the number of devices; ours do not. A micro-batch of one example pairs its
completion with its own prompt, in both.)
With ``--precompute-ref`` the reference log-probs of each example and of its KL row are computed once before
training, so each prompt's KL partner is fixed then: its predecessor within the global micro-batches of the data in
its order (:func:`~qlora.train.data.unpaired.fixed_kl_pairs`), the pairs of an unshuffled run, kept in every
(shuffled) epoch; as TRL, which fixes them when it prepares the dataset and so trains in order.
Rows with images (:mod:`qlora.train.data.unpaired`) give each example's row and its KL row the image tensors of
that row's prompt; the reference pass sees them too.
Metrics (TRL's names): ``kl``, and ``rewards/chosen``, ``logps/chosen`` (means over the
desirable examples), ``rewards/rejected``, ``logps/rejected`` (over the undesirable ones),
``rewards/margins`` (their difference).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from qlora.train.data import pad_token_id
from qlora.train.data.selection import read_sources
from qlora.train.data.unpaired import (TokenizedUnpaired, fixed_kl_pairs, kl_halves, normalize_unpaired,
                                       tokenize_unpaired, unpaired_collate)
from qlora.train.preference_loss import kto_losses, label_logps
from qlora.train.preference_trainer import PreferenceTrainer


class KTOTrainer(PreferenceTrainer):
    """One KTO run; ``Trainer(config)`` returns this for ``config.method`` kto."""

    METRIC_SUMS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "count/chosen",
                   "count/rejected", "kl")

    @property
    def _kl_rows(self) -> bool:
        return self.config.preference_losses()[0][0] == "kto"

    def _read_data(self, source: str, split: str, split_option: str = "--data-split") -> list:
        cfg = self.config
        subset, subset_option = self._subset(split_option)
        return read_sources(source, split, subset, cfg.max_samples,
                            lambda records: normalize_unpaired(records, cfg.data_fields, cfg.media_folder),
                            cfg.dataset_dir, self.sample_rng, "kto", split_option, subset_option)

    def _hold_out(self, examples: list) -> tuple[list, list]:
        """``--eval-split`` over rows: a preference pair's two answers, examples side by side from one row, are
        held out together, so no held-out prompt was trained with its other answer."""
        rows = [list(group) for _, group in itertools.groupby(examples, key=lambda e: e.where)]
        train, held = super()._hold_out(rows, "rows")
        return [e for row in train for e in row], [e for row in held for e in row]

    def _tokenize(self, examples: list) -> tuple[list[TokenizedUnpaired], Any]:
        units, report = tokenize_unpaired(examples, self.tokenizer, self.chat_format, self.config.seq_len,
                                          stop_ids=self._stop_ids(), processor=self._processor_for(examples))
        return self._deduped(units), report

    def _positions(self, units: list) -> int:
        """A KL row pairs one prompt with another example's completion, cut to --seq-len."""
        longest = super()._positions(units)
        if self._kl_rows and units:
            pairs = max(len(u.prompt_ids) for u in units) + max(len(u.kl_completion_ids) for u in units)
            longest = max(longest, min(pairs, self.config.seq_len))
        return longest

    def _fixed_rows(self, units: list, batch: int) -> list:
        """``units`` with their KL rows' partners fixed (:func:`fixed_kl_pairs`) in runs of ``batch``."""
        return fixed_kl_pairs(units, batch) if self._kl_rows else units

    def _reference_key(self, unit: TokenizedUnpaired) -> list:
        """The example's tokens and its KL row's, as cut to --seq-len."""
        kl_row = (unit.prompt_ids + unit.kl_pair_ids)[:self.config.seq_len] if self._kl_rows else None
        return [unit.prompt_ids, unit.completion_ids, kl_row]

    @property
    def _reference_columns(self) -> int:
        """The example's reference log-prob, and its KL row's."""
        return 2 if self._kl_rows else 1

    def _collate(self, units: list, kl_completions: list | None = None) -> dict[str, torch.Tensor]:
        batch = unpaired_collate(units, pad_token_id(self.tokenizer), self._kl_rows, self.config.seq_len,
                                 kl_completions)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _collate_share(self, units: list, start: int, size: int) -> dict[str, torch.Tensor]:
        """This rank's share, its KL rows rotated over the whole global micro-batch ``units`` unless fixed (a
        stand-in where a short micro-batch leaves it none)."""
        share = units[start:start + size]
        if not share:
            return self._stand_in(units)
        return self._collate(share, [units[(start + i - 1) % len(units)] for i in range(len(share))])

    @staticmethod
    def _units_in(batch: dict[str, torch.Tensor]) -> int:
        """Examples in ``batch``; none in a stand-in."""
        return 0 if "stand_in" in batch else batch["desirable"].shape[0]

    def _nll_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return 0  # KTO has no NLL term

    def _pair_terms(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                    across_ranks: bool = False) -> dict[str, torch.Tensor]:
        """Summed per-example losses and metric sums of one batch (see :meth:`_metrics_of`); with
        ``across_ranks`` the batch is this rank's share of a global micro-batch, whose KL estimate is the mean
        over all ranks' KL rows, taken before the clamp."""
        cfg = self.config
        n = batch["desirable"].shape[0]
        live = self._units_in(batch)  # n, none in a stand-in
        desirable = batch["desirable"][:live]
        ref = self._reference_logps(batch)  # the examples, then the KL rows
        main, kl_batch = kl_halves(batch) if self._kl_rows else (batch, None)  # each row with its prompt's images
        kl = torch.zeros((), device=self.device)
        if kl_batch is not None:
            with torch.no_grad(), self._autocast():  # the KL estimate carries no gradient, as in TRL
                kl_logps = label_logps(model, kl_batch, [kl_batch["labels"]], self.chunked_ce)[0]
            diffs = (kl_logps.float() - ref[n:].float())[:live]
            sums = torch.stack([diffs.sum(), diffs.new_tensor(live)])  # (sum, count): averaged after the all-reduce
            if across_ranks:
                self.dist.all_reduce_sum(sums)
            kl = (sums[0] / sums[1]).clamp(min=0)
        with self._autocast():
            all_logps = label_logps(model, main, [main["labels"]], self.chunked_ce)[0]
        losses, rewards = kto_losses(cfg.preference_losses()[0][0], all_logps[:live], ref[:live], desirable, kl,
                                     cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
        # a stand-in: a loss of exactly 0 that still reaches every adapter (DDP's hooks, FSDP)
        loss = losses.sum() if live else 0 * all_logps.sum()
        undesirable = ~desirable
        logps = all_logps[:live].detach().float()
        return {"pair_loss": loss, "kl": kl * live,
                "rewards/chosen": rewards[desirable].sum(), "rewards/rejected": rewards[undesirable].sum(),
                "logps/chosen": logps[desirable].sum(), "logps/rejected": logps[undesirable].sum(),
                "count/chosen": desirable.sum(), "count/rejected": undesirable.sum()}

    def _metrics_of(self, sums: dict[str, float], units: float, nll_tokens: float) -> dict[str, float]:
        """TRL's KTO metrics: desirable / undesirable means over their own examples, ``kl`` over all."""
        out = {"kl": sums["kl"] / units}
        for side in ("chosen", "rejected"):
            count = sums[f"count/{side}"]
            if count:
                out[f"rewards/{side}"] = sums[f"rewards/{side}"] / count
                out[f"logps/{side}"] = sums[f"logps/{side}"] / count
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out
