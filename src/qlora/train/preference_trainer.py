"""Preference tuning on a 4-bit base: ``qlora train --method dpo|orpo|cpo|simpo``.

:class:`PreferenceTrainer` is the QLoRA training loop of
:class:`qlora.train.trainer.Trainer` (accumulation, clipping, checkpoints,
resume, DDP/FSDP, metrics) with preference pairs as data and DPO (any of TRL's
loss types; LD-DPO, WPO, f-DPO), CPO / SimPO (AlphaPO) or ORPO
(:mod:`qlora.train.preference_loss`) as the loss. What differs:

- Each micro-batch of ``B`` pairs is one forward pass over ``2B`` rows, the
  chosen answers then the rejected ones.
- The step loss is normalized over the whole optimizer step (all micro-batches,
  all ranks), as for SFT: the pair losses (DPO's, CPO's, ORPO's odds-ratio term)
  are means over the step's pairs, the NLL term (ORPO; CPO's cpo_alpha; DPO's
  rpo_alpha / sft loss type) a mean over the step's chosen tokens. With one
  micro-batch this is exactly TRL's loss.
- DPO's reference model is the policy training starts from: the same 4-bit base
  with the adapters switched off (:func:`qlora.model.inject.adapters_disabled`),
  or, when the start is not the base (``--adapter``, LoftQ/PiSSA/OLoRA, weights
  trained in place), the start's trainable tensors swapped in; run without
  gradient and in eval mode (no dropout) right before the policy pass; no second
  model is loaded. With ``--precompute-ref`` the reference log-probs of every pair (KTO:
  of every example and its KL row) are computed once before training, split over the
  ranks, and stored in ``--output/reference/`` with a fingerprint of the model and
  data, so that a resumed run reuses them.
- Metrics (TRL's names): ``rewards/chosen``, ``rewards/rejected``,
  ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``,
  ``logps/rejected``, ``nll_loss`` with an NLL term and, for ORPO, ``log_odds_ratio``,
  ``log_odds_chosen``: means over the step's pairs, in metrics.jsonl,
  TensorBoard, the progress bar and the plot.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import replace
from typing import Any, Iterator

import torch

from qlora.atomic import atomic_dir
from qlora.model.inject import adapter_configs, adapters_disabled
from qlora.errors import UsageError
from qlora.train.data import IGNORE_INDEX, pad_token_id
from qlora.train.data.preference import PreferenceExample, TokenizedPair, normalize_preferences, preference_collate, tokenize_pairs
from qlora.chat.prefix_lm import prefix_type
from qlora.train.data.selection import read_sources
from qlora.train.preference_loss import (
    alphapo_rewards, cpo_losses, dpo_losses, label_logps, ld_label_sets, orpo_odds_ratio, wpo_weights,
)
from qlora.train.trainer import Trainer

REFERENCE_DIR = "reference"
REFERENCE_FILE = "logps.safetensors"
REFERENCE_METHODS = ("dpo", "kto")  # the methods with a reference model
BATCH_COUPLED = ("aot", "aot_unpaired")  # DPO losses of a pair that depend on the other pairs of its micro-batch


class PreferenceTrainer(Trainer):
    """One preference run; ``Trainer(config)`` returns this for dpo, orpo, cpo and simpo."""

    # per-pair metrics summed over a step's batches, logged as means over its pairs
    METRIC_SUMS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                   "logps/rejected", "log_odds_ratio", "log_odds_chosen")

    def _load_model(self) -> None:
        """DPO's and KTO's reference is the policy training starts from. That is the base with the adapters off,
        unless the start differs from it: an adapter given with --adapter (an SFT run: TRL's ``ref_adapter_name``),
        an init that rewrites the base (LoftQ; PiSSA/OLoRA leave the residual W - s B0 A0), or weights of the
        model trained in place (new tokens' embeddings and output head, biases). Then the trainable tensors
        are copied once as they start (before --resume restores later ones) and swapped in for the reference pass
        (:meth:`_swap_start`, which copies nothing)."""
        super()._load_model()
        cfg = self.config
        start = adapter_configs(self.model).get("default")
        in_place = start is not None and bool(start.modules_to_save or start.bias != "none" or start.trainable_tokens)
        self._start_is_base = not (cfg.adapter or cfg.rewrites_base or in_place)
        self._start: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        if cfg.method in REFERENCE_METHODS and not cfg.precompute_ref and not self._start_is_base:
            self._start = [(p, p.detach().clone()) for p in self.model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def _reference_model(self) -> Iterator[None]:
        """The model as DPO's or KTO's reference: the starting policy (see :meth:`_load_model`)."""
        if self._start:
            self._swap_start()
            try:
                yield
            finally:
                self._swap_start()
        elif self._start_is_base:
            with adapters_disabled(self.model):
                yield
        else:  # --precompute-ref: the log-probs are taken before training moves the model from its start
            yield

    @torch.no_grad()
    def _swap_start(self) -> None:
        """Exchange the trainable tensors with their starting values without copying any: each parameter is
        pointed at the other tensor (``param.data``), and its own tensor kept in its place. The parameters stay the
        same objects, so the optimizer's state (keyed by them), gradients and DDP's hooks are untouched, and the
        second swap restores the very storage the optimizer updates. Under FSDP2 too: the trainable parameters are
        FSDP-ignored, whole plain tensors on every rank (:func:`qlora.train.distributed.shard_fsdp`); only the frozen
        base is sharded into DTensors, whose local shards FSDP's gather buffers alias, and none of them is swapped."""
        for k, (param, start) in enumerate(self._start):
            now = param.data
            param.data = start
            self._start[k] = (param, now)

    # ------------------------------------------------------------------ data
    def _read_data(self, source: str, split: str, split_option: str = "--data-split") -> list[PreferenceExample]:
        cfg = self.config
        subset, subset_option = self._subset(split_option)
        return read_sources(source, split, subset, cfg.max_samples,
                            lambda records: normalize_preferences(records, cfg.data_fields, cfg.media_folder),
                            cfg.dataset_dir, self.sample_rng, cfg.method, split_option, subset_option)

    def _tokenize(self, examples: list[PreferenceExample]) -> tuple[list[TokenizedPair], Any]:
        pairs, report = tokenize_pairs(examples, self.tokenizer, self.chat_format, self.config.seq_len,
                                       stop_ids=self._stop_ids(), processor=self._processor_for(examples))
        return self._deduped(pairs), report

    def _processor_for(self, examples: list) -> Any:
        """The model's processor when some of ``examples`` hold images (loaded at the first), else None.

        Raises:
            UsageError: images for a prefix-LM (PaliGemma), whose images train only as its processor's prefix and
                suffix, a row's one answer.
        """
        first = next((e for e in examples if e.images), None)
        if first is not None and prefix_type(self.model) is not None:
            kind = getattr(self.model.config, "model_type", "?")
            raise UsageError(f"{first.where}: this row holds images, and {kind} models train on images only as "
                             "their processor's prefix (the images and the prompt, read both ways) and suffix (one "
                             f"answer), which is --method sft's form, not --method {self.config.method}'s answers "
                             "after a chat prompt. Train it on these images with --method sft (a row per prompt and "
                             "its good answer), or give the preference rows without images.")
        return self._image_processor(first.where) if first else None

    def _collate(self, units: list) -> dict[str, torch.Tensor]:
        batch = preference_collate(units, pad_token_id(self.tokenizer))
        return {k: v.to(self.device) for k, v in batch.items()}

    def _stand_in(self, units: list) -> dict[str, torch.Tensor]:
        """The first unit, counted as no pair (:meth:`_units_in`) and no NLL token: its labels stay, so that its
        per-token terms (CPO, ORPO) stay finite, but none of its rows enters the loss or the metrics."""
        return {**self._collate_share(units, 0, 1), "stand_in": True}

    # ------------------------------------------------------------- reference
    def _prepare_method(self) -> None:
        """With --precompute-ref: reuse the stored reference log-probs of this run, or compute and store them."""
        cfg = self.config
        if cfg.method not in REFERENCE_METHODS or not cfg.precompute_ref:
            return
        # what the reference scores is fixed first: the training units in global micro-batches, eval's in batches
        self.train_units = self._fixed_rows(self.train_units, cfg.batch_size * self.dist.world_size)
        self.eval_units = self._fixed_rows(self.eval_units, cfg.batch_size)
        fingerprint = self._fingerprint()
        stored = self._read_reference(fingerprint)
        if stored is None:
            stored = {"train": self._compute_reference(self.train_units)}
            if self.eval_units:
                stored["eval"] = self._compute_reference(self.eval_units)
            if self.dist.is_main:
                from safetensors.torch import save_file

                with atomic_dir(self.out / REFERENCE_DIR) as tmp:
                    save_file(stored, str(tmp / REFERENCE_FILE), metadata={"fingerprint": fingerprint})
            self.dist.barrier()
        self.train_units = _with_reference(self.train_units, stored["train"])
        if self.eval_units:
            self.eval_units = _with_reference(self.eval_units, stored["eval"])

    def _fixed_rows(self, units: list, batch: int) -> list:
        """``units`` with every row the reference scores fixed before training; a pair's rows are its own."""
        return units

    def _reference_key(self, unit: Any) -> list:
        """The tokens of ``unit``'s rows that the reference scores."""
        return [unit.prompt_ids, unit.chosen_ids, unit.rejected_ids, unit.trained]

    @property
    def _reference_columns(self) -> int:
        """Reference log-probs a unit has: a pair's chosen and rejected answer."""
        return 2

    def _fingerprint(self) -> str:
        """What the reference log-probs depend on: base model, quantization, precision, the tokens and LD-DPO's
        weight."""
        cfg = self.config
        digest = hashlib.sha256(json.dumps([cfg.model, cfg.adapter, cfg.quant, cfg.double_quant, cfg.blocksize,
                                            cfg.init, str(self.dtype)] + [cfg.ld_alpha] * (cfg.ld_alpha is not None)
                                           ).encode())
        for units in (self.train_units, self.eval_units):
            for p in units:
                digest.update(json.dumps(self._reference_key(p)).encode())
                for key, tensor in sorted(p.media.items()):  # the images (the ids show only their sizes)
                    digest.update(key.encode() + tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _read_reference(self, fingerprint: str) -> dict[str, torch.Tensor] | None:
        from safetensors import safe_open

        path = self.out / REFERENCE_DIR / REFERENCE_FILE
        if not self.config.resume or not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                return None  # other data or model: recompute
            return {k: f.get_tensor(k) for k in f.keys()}

    @torch.no_grad()
    def _compute_reference(self, units: list) -> torch.Tensor:
        """``[units, columns]`` float64 reference log-probs (a pair's chosen and rejected answer; KTO's example and
        KL row); ranks split the batches."""
        columns = self._reference_columns
        out = torch.zeros((len(units), columns), dtype=torch.float64, device=self.device)
        bs = self.config.batch_size
        starts = range(0, len(units), bs)
        for k, start in enumerate(starts):
            if k % self.dist.world_size != self.dist.rank:
                continue
            batch = self._collate(units[start:start + bs])
            logps = self._reference_logps(batch).double()  # each column's rows in turn
            out[start:start + logps.shape[0] // columns] = logps.view(columns, -1).T
        return self.dist.all_reduce_sum(out).cpu()

    @torch.no_grad()
    def _reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[2B]`` answer log-probs of the base model (adapters off, eval mode), or the precomputed ones."""
        if "ref_logps" in batch:
            return batch["ref_logps"]
        was_training = self.model.training
        self.model.eval()
        try:
            with self._reference_model(), self._autocast():
                return self._answer_logps(label_logps(self.model, batch, self._answer_labels(batch), self.chunked_ce))
        finally:
            self.model.train(was_training)

    def _answer_labels(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The label sets that score the answers: their labels, or with --ld-alpha (DPO) their shared part and
        their tail (:func:`ld_label_sets`)."""
        if self.config.method == "dpo" and self.config.ld_alpha is not None:
            return list(ld_label_sets(batch["labels"]))
        return [batch["labels"]]

    def _answer_logps(self, sums: list[torch.Tensor]) -> torch.Tensor:
        """The answers' log-probs from the sums of :meth:`_answer_labels` (LD-DPO: ``shared + alpha * tail``)."""
        return sums[0] + self.config.ld_alpha * sums[1] if len(sums) == 2 else sums[0]

    # ------------------------------------------------------------------ loss
    def _nll_labels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Labels of the NLL term: the chosen rows only; their answer tokens (DPO's sft/RPO, CPO), or
        their whole sequence, prompt included (ORPO, as the ORPO paper's code and TRL)."""
        n = batch["input_ids"].shape[0] // 2
        if self.config.method == "orpo":  # not the tokens standing for images, which are never trained
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
            if "image_tokens" in batch:
                labels = labels.masked_fill(batch["image_tokens"], IGNORE_INDEX)
        else:
            labels = batch["labels"].clone()
        labels[0 if "stand_in" in batch else n:] = IGNORE_INDEX
        return labels

    def _pair_terms(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                    across_ranks: bool = False) -> dict[str, torch.Tensor]:
        """Per-pair loss terms and metrics of one batch (sums; see :meth:`_combine`); with ``across_ranks`` the
        batch is this rank's share of a global micro-batch, which DPO losses coupling their pairs see whole."""
        cfg = self.config
        n = batch["input_ids"].shape[0] // 2
        live = self._units_in(batch)  # n, none in a stand-in
        c, r = slice(0, live), slice(n, n + live)  # the rows that count: chosen, rejected
        labels = batch["labels"]
        answer_sets = self._answer_labels(batch)
        label_sets = answer_sets + [self._nll_labels(batch)] * bool(cfg.nll_weight)
        wpo = cfg.method == "dpo" and cfg.wpo
        ref = self._reference_logps(batch) if cfg.method == "dpo" else None
        with self._autocast():
            sums = label_logps(model, batch, label_sets, self.chunked_ce, wpo_labels=labels if wpo else None)
        logps = self._answer_logps(sums[:len(answer_sets)])
        lengths = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
        weights = wpo_weights(sums[-1], lengths) if wpo else None  # WPO (TRL's use_weighting): each pair's weight
        terms = {"nll": -sums[len(answer_sets)][:n].sum()} if cfg.nll_weight else {}
        if cfg.method == "dpo":
            losses = cfg.preference_losses()
            coupled = across_ranks and self.dist.enabled and any(t in BATCH_COUPLED for t, _ in losses)
            # a loss that couples the pairs of a micro-batch sees the global one (all ranks' pairs)
            rows = [logps[c], logps[r], ref[c], ref[r], lengths[c], lengths[r]]
            if weights is not None:
                rows.append(weights[c])
            if coupled:
                rows = [self.dist.all_gather_cat(t) for t in rows]
            policy, reference, length = tuple(rows[0:2]), tuple(rows[2:4]), tuple(rows[4:6])
            pair = policy[0].new_zeros(policy[0].shape[0], dtype=torch.float32)
            for loss_type, weight in losses:
                if loss_type != "sft":  # the NLL term, weighted in _combine
                    pair = pair + weight * dpo_losses(loss_type, policy, reference, length, cfg.beta,
                                                      cfg.label_smoothing, cfg.discopop_tau, cfg.f_divergence_type,
                                                      cfg.f_alpha_divergence_coef)
            if weights is not None:
                pair = pair * rows[6]  # the WPO weights, gathered with the rows they weigh
            chosen_r, rejected_r = cfg.beta * (logps[c] - ref[c]).detach(), cfg.beta * (logps[r] - ref[r]).detach()
            total = pair.sum()
            # coupled: every rank holds the global sum; its value counts once over the ranks, while each rank's
            # gradient is the global loss's gradient through its own rows (the others' are detached), and the
            # ranks' gradients add up to the one-process gradient
            terms["pair_loss"] = total - total.detach() * (1 - 1 / self.dist.world_size) if coupled else total
        elif cfg.method in ("cpo", "simpo"):
            loss_type = cfg.preference_losses()[0][0]
            if loss_type in ("ipo", "simpo"):  # per-token mean log-probs, as TRL's CPOTrainer
                logps = logps / lengths
            rewards = alphapo_rewards(logps, cfg.alphapo_alpha)
            pair = cpo_losses(loss_type, rewards[c], rewards[r], cfg.beta, cfg.label_smoothing, cfg.simpo_gamma)
            chosen_r, rejected_r = cfg.beta * rewards[c].detach(), cfg.beta * rewards[r].detach()
            terms["pair_loss"] = pair.sum()
        else:
            logps = logps / lengths  # ORPO: per-token mean log-probs
            ratio, log_odds = orpo_odds_ratio(logps[c], logps[r])
            chosen_r, rejected_r = cfg.beta * logps[c].detach(), cfg.beta * logps[r].detach()
            terms.update({"pair_loss": -cfg.beta * ratio.sum(), "log_odds_ratio": ratio.detach().sum(),
                          "log_odds_chosen": log_odds.detach().sum()})
        terms.update({
            "rewards/chosen": chosen_r.sum(), "rewards/rejected": rejected_r.sum(),
            "rewards/accuracies": (chosen_r > rejected_r).float().sum(),
            "rewards/margins": (chosen_r - rejected_r).sum(),
            "logps/chosen": logps[c].detach().float().sum(), "logps/rejected": logps[r].detach().float().sum(),
        })
        if not live:  # a stand-in: a loss of exactly 0 that still reaches every adapter (DDP's hooks, FSDP)
            terms["pair_loss"] = terms["pair_loss"] + 0 * sums[0].sum()
        return terms

    def _combine(self, terms: dict[str, Any], pairs: float, nll_tokens: float) -> Any:
        """The loss: pair terms averaged over ``pairs``, plus the weighted NLL averaged over ``nll_tokens``."""
        loss = terms["pair_loss"] / pairs
        return loss + self.config.nll_weight * terms["nll"] / nll_tokens if "nll" in terms else loss

    @staticmethod
    def _units_in(batch: dict[str, torch.Tensor]) -> int:
        """Pairs in ``batch`` (its chosen rows, then its rejected ones); none in a stand-in."""
        return 0 if "stand_in" in batch else batch["input_ids"].shape[0] // 2

    def _nll_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int((self._nll_labels(batch)[:, 1:] != IGNORE_INDEX).sum())

    def _step_normalizer(self, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
        """(pairs, tokens of the NLL term) of the whole step, over all ranks."""
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)
        for b in batches:
            counts[0] += self._units_in(b)
            counts[1] += self._nll_tokens(b)
        self._norm = tuple(self.dist.all_reduce_sum(counts).tolist())
        return self._norm

    def _micro_loss(self, batch: dict[str, torch.Tensor], norm: tuple[float, float]):
        terms = self._pair_terms(self.forward_model, batch, across_ranks=True)
        sums = {k: float(v) for k, v in terms.items() if k in self.METRIC_SUMS}
        if "nll" in terms:
            sums["nll"] = float(terms["nll"].detach())
        return self._combine(terms, *norm), sums

    def _step_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        keys = sorted(sums)  # the same order on every rank
        totals = self.dist.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64,
                                                       device=self.device)).tolist()
        return self._metrics_of(dict(zip(keys, totals)), *self._norm)

    def _metrics_of(self, sums: dict[str, float], units: float, nll_tokens: float) -> dict[str, float]:
        """The logged metrics from a step's (or the eval set's) sums: means over its pairs, ``nll_loss``
        over its NLL tokens."""
        out = {k: sums[k] / units for k in self.METRIC_SUMS if k in sums}
        if "nll" in sums:
            out["nll_loss"] = sums["nll"] / max(nll_tokens, 1)
        return out

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Loss and reward metrics on --eval-data (the policy in eval mode, no dropout)."""
        self.model.eval()
        totals: dict[str, float] = {}
        for batch, mine, _ in self._eval_batches():
            terms = {k: float(v) for k, v in self._pair_terms(self.model, batch).items()}
            terms.update(units=self._units_in(batch), nll_tokens=self._nll_tokens(batch))
            for k, v in terms.items():
                totals[k] = totals.get(k, 0.0) + (v if mine else 0.0)
        keys = sorted(totals)  # the same on every rank: the method's terms
        summed = self.dist.all_reduce_sum(torch.tensor([totals[k] for k in keys], dtype=torch.float64,
                                                       device=self.device)).tolist()
        sums = dict(zip(keys, summed))
        units, nll_tokens = sums.pop("units"), sums.pop("nll_tokens")
        record = {"split": "eval", "step": self.step, "loss": float(self._combine(sums, units, max(nll_tokens, 1)))}
        record.update(self._metrics_of(sums, units, nll_tokens))
        self.metrics.log(record)
        shown = ", ".join(f"{k.split('/')[-1]} {record[k]:.4f}" for k in ("rewards/accuracies", "rewards/margins", "kl")
                          if k in record)
        self.metrics.write(f"step {self.step}: eval loss {record['loss']:.4f}" + (f", reward {shown}" if shown else ""))
        return record


def _with_reference(units: list, logps: torch.Tensor) -> list:
    return [replace(u, ref_logps=tuple(row)) for u, row in zip(units, logps.tolist())]
