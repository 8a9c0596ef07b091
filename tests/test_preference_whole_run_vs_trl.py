"""A whole short preference run (6 steps over 3 epochs) against TRL 1.16's ``DPOTrainer``, ``CPOTrainer``,
``ORPOTrainer`` and ``KTOTrainer`` with PEFT LoRA: every step's loss, learning rate, gradient norm and reward
metrics, and the adapter at the end.

The reference shares nothing with qlora's loop: transformers' own fp32 model (``--quant none``), a new
PEFT adapter (TRL's ``peft_config``) set to the one qlora starts from (its B matrices made non-zero, so the policy
as it starts is not the base and a reference taken from it instead of the adapter-disabled base would show), TRL's
own
tokenization, collator, reference pass (adapter disabled), ``precompute_ref_log_probs``, truncation
(``max_length``, keep_start), accumulation, clipping, AdamW and schedule, on the rows in their order
(``train_sampling_strategy="sequential"``, on transformers 4.x a sequential train sampler, against
``--no-shuffle``). From an ``--adapter`` start, TRL gets the loaded
PEFT adapter and keeps its starting copy as the reference, as qlora does.

Pairs differ in length, so a normalisation over tokens instead of pairs would show. TRL divides each micro-batch's
loss (a mean over its pairs) by the accumulation steps: with micro-batches of equal size that is qlora's mean over
the step's pairs, compared with accumulation on both sides. The NLL terms (CPO, ORPO, DPO's ``sft``) are means over
tokens: qlora's over the whole step's tokens (batch 4 x accumulation 1 equals 2 x 2, README), TRL's over each
micro-batch's; those runs are compared with TRL at batch 4 x accumulation 1, the same steps.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from qlora.model.adapter_io import save_adapter  # noqa: E402
from qlora.train.config import load_config  # noqa: E402
from qlora.train.trainer import Trainer  # noqa: E402
from random_adapters import randomize_lora_b  # noqa: E402
from trainer_records import IN_ORDER, LoggedRecords, in_order  # noqa: E402

_V5 = __import__("importlib").util.find_spec("transformers.conversion_mapping") is not None


WORDS = "alpha beta gamma delta fox dog lazy quick brown paged optimizer memory".split()


def _words(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 5 + j * 7) % len(WORDS)] for j in range(n))


# 8 pairs of prompts and answers of 1 to ~12 words: with batch 2 x accumulation 2 an epoch is 2 steps
PAIRS = [{"prompt": _words(i, 1 + (5 * i) % 7), "chosen": " " + _words(i + 1, 1 + (3 * i) % 11),
          "rejected": " " + _words(i + 2, 1 + (7 * i + 4) % 12)} for i in range(8)]
# 8 labelled completions, a desirable and an undesirable one in each micro-batch of 2
UNPAIRED = [{"prompt": p["prompt"], "completion": p["chosen" if i % 2 == 0 else "rejected"], "label": i % 2 == 0}
            for i, p in enumerate(PAIRS)]
# the prompt of the fourth pair fills --seq-len 24 (dropped by both); others lose part of their answers
LONG = [dict(p, prompt=_words(40, 14)) if i == 3 else p for i, p in enumerate(PAIRS)]

DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")

# name: (method, rows, qlora's options, TRL's config options, TRL's (batch, accumulation), extra metrics)
CASES = {
    "dpo-sigmoid-accum2": ("dpo", PAIRS, dict(), dict(), (2, 2), ()),
    "dpo-sigmoid-precompute-ref": ("dpo", PAIRS, dict(precompute_ref=True), dict(precompute_ref_log_probs=True),
                                   (2, 2), ()),
    "dpo-ipo-beta": ("dpo", PAIRS, dict(loss_type="ipo", beta=0.5), dict(loss_type=["ipo"], beta=0.5), (2, 2), ()),
    "dpo-hinge": ("dpo", PAIRS, dict(loss_type="hinge"), dict(loss_type=["hinge"]), (2, 2), ()),
    "dpo-robust-smoothing": ("dpo", PAIRS, dict(loss_type="robust", label_smoothing=0.2),
                             dict(loss_type=["robust"], label_smoothing=0.2), (2, 2), ()),
    # 7 pairs left: an epoch of 4 steps, the last one a single micro-batch (TRL divides by the 1 it has)
    "dpo-truncated-accum2-short-step": ("dpo", LONG, dict(seq_len=24, batch_size=1), dict(max_length=24), (1, 2), ()),
    # 7 pairs in micro-batches of 2 and 1 at the end of an epoch: qlora's mean over the step's 3 pairs is TRL's
    # at batch 4 (TRL at 2 x 2 averages the two micro-batches' means, weighting the lone pair double)
    "dpo-truncated-short-micro-batch": ("dpo", LONG, dict(seq_len=24), dict(max_length=24), (4, 1), ()),
    "dpo-rpo": ("dpo", PAIRS, dict(rpo_alpha=0.5), dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
                (4, 1), ()),
    "cpo": ("cpo", PAIRS, dict(), dict(), (4, 1), ("nll_loss",)),
    "simpo": ("simpo", PAIRS, dict(simpo_gamma=0.8, beta=2.0),
              dict(loss_type="simpo", simpo_gamma=0.8, cpo_alpha=0.0, beta=2.0), (2, 2), ()),
    "orpo": ("orpo", PAIRS, dict(), dict(), (4, 1), ("nll_loss", "log_odds_ratio", "log_odds_chosen")),
    "orpo-truncated": ("orpo", PAIRS, dict(seq_len=24), dict(max_length=24), (4, 1),
                       ("nll_loss", "log_odds_ratio", "log_odds_chosen")),
    "cpo-ipo-truncated": ("cpo", PAIRS, dict(seq_len=24, loss_type="ipo", cpo_alpha=0.5),
                          dict(max_length=24, loss_type="ipo", cpo_alpha=0.5), (4, 1), ("nll_loss",)),
    # KL rows after a shorter prompt take more of a completion cut after its own long prompt (TRL cuts the rows)
    "kto-batch4-truncated": ("kto", UNPAIRED, dict(seq_len=24, batch_size=4), dict(max_length=24), (4, 2), ("kl",)),
    "kto-weighted": ("kto", UNPAIRED, dict(desirable_weight=1.5, undesirable_weight=0.7),
                     dict(desirable_weight=1.5, undesirable_weight=0.7), (2, 2), ("kl",)),
}

# TRL 1.16's other DPO loss types, each with the smoothing / tau it reads
LOSSES = {"exo_pair": dict(label_smoothing=1e-3), "nca_pair": {}, "bco_pair": {}, "sppo_hard": {},
          "aot": dict(label_smoothing=0.1), "aot_unpaired": dict(label_smoothing=0.1), "apo_zero": {}, "apo_down": {},
          "discopop": dict(discopop_tau=0.5), "sigmoid_norm": {}}
CASES |= {f"dpo-{name}": ("dpo", PAIRS, dict(loss_type=name, **kw), dict(loss_type=[name], **kw), (2, 2), ())
          for name, kw in LOSSES.items()}
# micro-batches of 2 with 1 or 2 desirable examples: loss, KL and adapter equal TRL's; the reward metrics do not, as
# qlora's are means over the step's desirable / undesirable examples, TRL's means of its micro-batches' means (and
# its margins only over the micro-batches holding both kinds)
UNBALANCED = [dict(r, label=d) for r, d in zip(UNPAIRED, [True, False, True, True, False, False, True, False])]
CASES["kto-unbalanced-micro-batches"] = ("kto", UNBALANCED, dict(), dict(), (2, 2), ("kl",))
CASES |= {
    # qlora's conservative DPO is TRL 1.16's aot_unpaired for micro-batches of one pair (its sort then sorts nothing)
    "dpo-sigmoid-smoothing-batch1": ("dpo", PAIRS, dict(label_smoothing=0.2, batch_size=1),
                                     dict(loss_type=["aot_unpaired"], label_smoothing=0.2), (1, 2), ()),
    "dpo-ld-wpo-forward-kl": ("dpo", PAIRS, dict(ld_alpha=0.5, wpo=True, f_divergence_type="forward_kl"),
                              dict(ld_alpha=0.5, use_weighting=True, f_divergence_type="forward_kl"), (2, 2), ()),
    "dpo-logging-every-3": ("dpo", PAIRS, dict(logging_steps=3), dict(), (2, 2), ()),
    "kto-logging-every-3": ("kto", UNPAIRED, dict(logging_steps=3), dict(), (2, 2), ("kl",)),
    "dpo-from-adapter": ("dpo", PAIRS, dict(from_adapter=True), dict(), (2, 2), ()),
    "dpo-from-adapter-precompute-ref": ("dpo", PAIRS, dict(from_adapter=True, precompute_ref=True),
                                        dict(precompute_ref_log_probs=True), (2, 2), ()),
    "kto-from-adapter": ("kto", UNPAIRED, dict(from_adapter=True), dict(), (2, 2), ("kl",)),
    "kto-apo-zero-unpaired": ("kto", UNPAIRED, dict(loss_type="apo_zero_unpaired"),
                              dict(loss_type="apo_zero_unpaired"), (2, 2), ()),
    # the KL rows' reference log-probs precomputed with the examples', each prompt paired as TRL pairs it at
    # dataset preparation (the previous completion within its batch)
    "kto-precompute-ref": ("kto", UNPAIRED, dict(precompute_ref=True), dict(precompute_ref_log_probs=True), (2, 2),
                           ("kl",)),
    "kto-from-adapter-precompute-ref": ("kto", UNPAIRED, dict(from_adapter=True, precompute_ref=True),
                                        dict(precompute_ref_log_probs=True), (2, 2), ("kl",)),
    "kto-apo-zero-unpaired-precompute-ref": ("kto", UNPAIRED, dict(loss_type="apo_zero_unpaired", precompute_ref=True),
                                             dict(loss_type="apo_zero_unpaired", precompute_ref_log_probs=True),
                                             (2, 2), ()),
}
# steps of one micro-batch holding 2, 1 or 0 desirable examples, logged every 3 steps: each record's reward and
# log-prob metrics are TRL's, the mean over the window's steps holding that kind of the steps' means (not weighted
# by the steps' counts), and its margins the mean over the steps holding both kinds
UNEVEN = [dict(r, label=d) for r, d in zip(UNPAIRED, [True, True, False, True, False, False, True, False])]
CASES["kto-logging-every-3-uneven-steps"] = ("kto", UNEVEN, dict(logging_steps=3, grad_accum=1), dict(), (2, 1),
                                             ("kl",))


def _oracle(method: str, model, rows, tokenizer, args: dict, lora, callback):
    """TRL's trainer of ``method`` on ``model`` with a new PEFT adapter ``lora`` (DPO's and KTO's reference: the
    model with the adapter disabled)."""
    if method == "dpo":
        from trl import DPOConfig as Config, DPOTrainer as Cls
    elif method == "kto":
        from trl import KTOConfig as Config, KTOTrainer as Cls
    elif method == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Cls
    else:
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Cls
    if method in ("cpo", "simpo", "orpo"):
        args.setdefault("remove_unused_columns", False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return in_order(Cls)(model=model, args=Config(**args), train_dataset=Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=lora, callbacks=[callback])


@pytest.mark.parametrize("case", sorted(CASES))
def test_preference_run_equals_trl(tmp_path, tiny_model_dir, case):
    method, rows, ours, theirs, (trl_batch, trl_accum), extra = CASES[case]
    ours, theirs = dict(ours), dict(theirs)
    beta = ours.pop("beta", 0.2)
    from_adapter = ours.pop("from_adapter", False)
    opts = dict(model=str(tiny_model_dir), output=str(tmp_path / "run"), method=method, quant="none", rank=4, alpha=8,
                dropout=0.0, target_modules="all-linear", optim="adamw", lr=5e-3, lr_scheduler="linear",
                warmup_steps=1, max_steps=6, batch_size=2, grad_accum=2, max_grad_norm=0.5, weight_decay=0.0,
                adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, beta=beta, shuffle=False, seed=3, seq_len=64,
                progress=False, save_total_limit=0, precision="fp32") | ours
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if from_adapter:  # --adapter: an earlier run's adapter (B non-zero) trained further, itself the reference
        trainer = Trainer(load_config(None, opts | dict(data=str(data), output=str(tmp_path / "start"))))
        trainer.setup()
        randomize_lora_b(trainer.model, seed=1)
        save_adapter(trainer.model, tmp_path / "adapter")
        trainer.cleanup()
        opts = {k: v for k, v in opts.items() if k not in ("rank", "alpha", "target_modules", "dropout")}
        opts["adapter"] = str(tmp_path / "adapter")
    trainer = Trainer(load_config(None, opts | dict(data=str(data))))
    try:
        trainer.setup()
        if not from_adapter:
            randomize_lora_b(trainer.model, seed=1)
        start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        trainer.train()
        records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        mine = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        total_steps = trainer.total_steps
    finally:
        trainer.cleanup()

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = dict(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=trl_batch,
                gradient_accumulation_steps=trl_accum, learning_rate=opts["lr"], lr_scheduler_type="linear",
                warmup_steps=opts["warmup_steps"], max_steps=opts["max_steps"], max_grad_norm=opts["max_grad_norm"],
                weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch",
                **IN_ORDER, logging_steps=opts.get("logging_steps", 1), save_strategy="no", report_to=[], seed=3,
                use_cpu=True, bf16=False, fp16=False, disable_dropout=True, dataloader_num_workers=0,
                disable_tqdm=True, beta=beta, max_length=opts["seq_len"]) | theirs
    callback = LoggedRecords()
    if from_adapter:  # TRL keeps a copy of the loaded adapter as the reference ("ref")
        model = peft.PeftModel.from_pretrained(plain, tmp_path / "adapter", is_trainable=True)
        oracle = _oracle(method, model, rows, tokenizer, args, None, callback)
    else:
        lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                               task_type="CAUSAL_LM")
        oracle = _oracle(method, plain, rows, tokenizer, args, lora, callback)
    theirs = {n.removeprefix("base_model.model."): p for n, p in oracle.model.named_parameters() if p.requires_grad}
    assert theirs.keys() == start.keys()
    with torch.no_grad():  # qlora's starting adapter, after TRL took its reference (precomputed or not) from the base
        for name, p in theirs.items():
            p.copy_(start[name])
    oracle.train()
    reference = {n: p.detach() for n, p in theirs.items()}

    train = {r["step"]: r for r in records if r.get("split", "train") == "train"}
    assert total_steps == 6
    assert (tmp_path / "run" / "reference" / "logps.safetensors").is_file() == bool(ours.get("precompute_ref"))
    every = opts.get("logging_steps", 1)  # a record holds the means over the steps since the last one, as TRL's
    assert [t["step"] for t in callback.logs] == list(range(every, total_steps + 1, every))
    # LD-DPO with WPO's weights and the forward KL magnifies step 1's float noise (a few 1e-7 of the loss: qlora's
    # layers and TRL's PEFT ones run matrix products of other shapes) about 50-fold by step 6: measured 1.1e-5 of
    # the loss with MKL's AVX-512 kernels (2.3e-6 at step 4 with MKL_ENABLE_INSTRUCTIONS=AVX2); the other cases
    # stay within 2e-6
    loss_rel = 2e-5 if case == "dpo-ld-wpo-forward-kl" else 1e-5
    for their in callback.logs:
        step = their["step"]
        own = train[step]
        assert own["lr"] == pytest.approx(their["learning_rate"], rel=1e-9, abs=1e-15), step
        # transformers 4.x's Trainer logs the loss rounded to 4 decimals (5 logs it whole)
        assert own["loss"] == pytest.approx(their["loss"], rel=loss_rel, abs=1e-7 if _V5 else 5e-5), step
        assert own["grad_norm"] == pytest.approx(their["grad_norm"], rel=1e-4), step
        for key in (extra if rows is UNBALANCED else DPO_METRICS + extra):
            if key == "rewards/accuracies" and method == "kto":
                continue  # KTOTrainer has no accuracies
            assert own[key] == pytest.approx(their[key], rel=1e-4, abs=2e-5), (step, key)
    assert train[total_steps]["rewards/margins"] != train[min(train)]["rewards/margins"]  # the run moved the policy
    if rows is UNBALANCED:  # the one difference: step means against means of micro-batch means
        assert any(abs(train[t["step"]]["rewards/margins"] - t["rewards/margins"]) > 1e-3 for t in callback.logs)
    assert reference.keys() == mine.keys()
    for name, p in reference.items():
        torch.testing.assert_close(mine[name], p, rtol=1e-4, atol=1e-6, msg=name)
