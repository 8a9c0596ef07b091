"""DPO (every loss type, RPO, weighted loss lists, LD-DPO, WPO, f-DPO), CPO / SimPO (and AlphaPO) and ORPO
against TRL 1.16 (test-only oracle):
losses, gradients and reward metrics.

qlora trains a 4-bit (NF4) tiny Llama with LoRA or DoRA adapters; TRL gets the
same model as a plain transformers model whose linear weights are the
dequantized NF4 weights, wrapped by PEFT from the same ``LoraConfig``, and the
adapter values are copied over (B made non-zero, so every gradient is
informative). The two then see the same pairs: TRL's own tokenization of
string rows is compared token for token with qlora's, and the batch goes
through ``DPOTrainer`` / ``CPOTrainer`` / ``ORPOTrainer.compute_loss`` on one
side and qlora's training step on the other, in fp32.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from qlora.train.config import load_config
from qlora.train.trainer import Trainer

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

ROWS = [
    {"prompt": "What is two plus two?", "chosen": " four", "rejected": " five, I think"},
    {"prompt": "Say hello.", "chosen": " Hello there!", "rejected": " no"},
    {"prompt": "What does the fox do?", "chosen": " The quick brown fox jumps.", "rejected": " It sleeps."},
]
# Anthropic HH's shape: whole texts, the prompt implicit in their shared start (TRL's extract_prompt)
HH_ROWS = [
    {"chosen": "\n\nHuman: What is two plus two?\n\nAssistant: four",
     "rejected": "\n\nHuman: What is two plus two?\n\nAssistant: five, I think"},
    {"chosen": "\n\nHuman: Say hello.\n\nAssistant: Hello there!", "rejected": "\n\nHuman: Say hello.\n\nAssistant: no"},
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RTOL = 1e-5


def _qlora(tmp_path, model_dir, method, dora=False, rows=ROWS, **kw):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(None, dict(model=str(model_dir), data=str(data), output=str(tmp_path / f"q-{method}"),
                                    method=method, rank=4, alpha=8, dropout=0.0, dora=dora,
                                    target_modules=",".join(TARGETS),
                                    batch_size=len(rows), seq_len=64, optim="adamw", max_steps=1, progress=False,
                                    precision="fp32", **kw))
    trainer = Trainer(config)
    trainer.setup()
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero B (and a moved DoRA magnitude) so the adapters matter
        for name, p in trainer.model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "magnitude" in name):
                p.add_(torch.randn_like(p) * 0.05)
    return trainer


def _hf_twin(trainer, model_dir):
    """A plain transformers model with qlora's dequantized base weights."""
    from transformers import AutoModelForCausalLM

    from qlora.model.inject import lora_layers

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, layer in lora_layers(trainer.model).items():
            hf.get_submodule(name).weight.copy_(layer.base_weight(torch.float32))
    return hf


def _copy_adapters(trainer, peft_model) -> dict[str, torch.nn.Parameter]:
    """Copy qlora's adapter values into PEFT's and return PEFT's parameters by qlora name."""
    theirs = dict(peft_model.named_parameters())
    pairs = {}
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if not p.requires_grad:
                continue
            their = theirs["base_model.model." + name]
            their.copy_(p)
            pairs[name] = their
    return pairs


def _qlora_step(trainer):
    """Loss, gradients and metrics of qlora's step over all ROWS in one micro-batch."""
    batch = trainer._collate(trainer.train_units)
    trainer.model.zero_grad(set_to_none=True)
    norm = trainer._step_normalizer([batch])
    loss, sums = trainer._micro_loss(batch, norm)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, trainer._step_metrics(sums)


def _assert_grads_equal(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name, g in ours.items():
        other = theirs[name].grad
        assert other is not None, name
        scale = other.abs().max()
        assert scale > 0, name
        torch.testing.assert_close(g, other, rtol=RTOL, atol=RTOL * float(scale), msg=name)


# TRL 1.16 applies no label smoothing to its sigmoid loss; its "aot_unpaired" loss is conservative DPO
# (qlora's --label-smoothing) for a batch of one pair, where sorting the batch changes nothing.
CASES = {"lora": dict(), "dora": dict(dora=True), "label-smoothing": dict(label_smoothing=0.2, rows=ROWS[1:2]),
         "implicit-text-prompt": dict(rows=HH_ROWS)}


def _dpo_vs_trl(tmp_path, model_dir, rows=ROWS, dora=False, beta=0.3, trl_args=None, **ours):
    """One DPO step of qlora (options ``ours``) against TRL's DPOTrainer (DPOConfig ``trl_args``)."""
    from trl import DPOConfig, DPOTrainer

    trainer = _qlora(tmp_path, model_dir, "dpo", dora=dora, rows=rows, beta=beta, **ours)
    hf = _hf_twin(trainer, model_dir)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, per_device_train_batch_size=len(rows),
                     max_length=64, report_to=[], use_cpu=True, bf16=False, fp16=False, disable_dropout=True,
                     **(trl_args or {}))
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, use_dora=dora,
                             task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = DPOTrainer(model=hf, args=args, train_dataset=datasets.Dataset.from_list(rows),
                            processing_class=trainer.tokenizer, peft_config=config)
    params = _copy_adapters(trainer, oracle.model)

    # The same tokens: TRL's tokenization of the string rows is qlora's.
    tokenized = oracle.train_dataset
    for pair in trainer.train_units:
        row = tokenized[pair.index]
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == \
            (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids)

    inputs = oracle.data_collator([tokenized[p.index] for p in trainer.train_units])
    oracle.model.train()
    their_loss = oracle.compute_loss(oracle.model, inputs)
    their_loss.backward()
    loss, grads, metrics = _qlora_step(trainer)

    torch.testing.assert_close(loss, their_loss.detach(), rtol=RTOL, atol=1e-7)
    assert float(loss) != 0
    _assert_grads_equal(grads, params)
    theirs = oracle._metrics["train"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert metrics[key] == pytest.approx(theirs[key][-1], rel=RTOL, abs=1e-6), key
    assert metrics["rewards/margins"] != 0
    return loss


@pytest.mark.parametrize("case", sorted(CASES))
def test_dpo_equals_trl_dpotrainer(tmp_path, tiny_model_dir, case):
    kw = dict(CASES[case])
    smoothing = kw.get("label_smoothing", 0.0)
    _dpo_vs_trl(tmp_path, tiny_model_dir, trl_args=dict(loss_type=["aot_unpaired"] if smoothing else ["sigmoid"],
                                                        label_smoothing=smoothing), **kw)


# TRL 1.16's other DPO loss types, each with the label smoothing / tau it reads (--loss-type NAME on our side).
LOSSES = {"hinge": {}, "ipo": {}, "robust": dict(label_smoothing=0.2), "exo_pair": dict(label_smoothing=1e-3),
          "nca_pair": {}, "bco_pair": {}, "sppo_hard": {}, "aot": dict(label_smoothing=0.1),
          "aot_unpaired": dict(label_smoothing=0.1), "apo_zero": {}, "apo_down": {},
          "discopop": dict(discopop_tau=0.5), "sigmoid_norm": {}}


@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_dpo_loss_types_equal_trl(tmp_path, tiny_model_dir, loss_type):
    kw = LOSSES[loss_type]
    _dpo_vs_trl(tmp_path, tiny_model_dir, loss_type=loss_type, trl_args=dict(loss_type=[loss_type], **kw), **kw)


@pytest.mark.parametrize("ours", [dict(rpo_alpha=0.5), dict(loss_type="sigmoid,sft", loss_weights="1,0.5"),
                                  dict(loss_type="ipo,sft,hinge", loss_weights="0.8,0.5,0.3")],
                         ids=["rpo-alpha", "loss-list", "three-losses"])
def test_dpo_rpo_and_weighted_losses_equal_trl(tmp_path, tiny_model_dir, ours):
    """RPO (TRL's former rpo_alpha, now its loss type sft) and TRL's weighted list of loss types (MPO)."""
    names = ours.get("loss_type", "sigmoid").split(",") + (["sft"] if "rpo_alpha" in ours else [])
    weights = [float(w) for w in ours.get("loss_weights", "1").split(",")] + [ours.get("rpo_alpha")] * ("rpo_alpha" in ours)
    _dpo_vs_trl(tmp_path, tiny_model_dir, trl_args=dict(loss_type=names, loss_weights=weights), **ours)


# TRL 1.16 DPOConfig's LD-DPO (ld_alpha), WPO (use_weighting) and f-DPO (f_divergence_type), alone and together:
# (qlora's options, TRL's). ROWS' chosen and rejected answers differ in length, so LD-DPO's tails are live.
DPO_EXTRAS = {
    "ld-alpha": (dict(ld_alpha=0.4), dict(ld_alpha=0.4)),
    "ld-alpha-0-ipo": (dict(ld_alpha=0.0, loss_type="ipo"), dict(ld_alpha=0.0, loss_type=["ipo"])),
    "ld-alpha-rpo": (dict(ld_alpha=0.6, rpo_alpha=0.5), dict(ld_alpha=0.6, loss_type=["sigmoid", "sft"],
                                                              loss_weights=[1.0, 0.5])),
    "wpo": (dict(wpo=True), dict(use_weighting=True)),
    "wpo-ipo-nca-pair": (dict(wpo=True, loss_type="ipo,nca_pair", loss_weights="1,0.5"),
                      dict(use_weighting=True, loss_type=["ipo", "nca_pair"], loss_weights=[1.0, 0.5])),
    "ld-alpha-wpo-full-logits": (dict(ld_alpha=0.3, wpo=True, chunked_ce=False),
                                 dict(ld_alpha=0.3, use_weighting=True)),
    "ld-alpha-precomputed-reference": (dict(ld_alpha=0.3, precompute_ref=True), dict(ld_alpha=0.3)),
    "forward-kl": (dict(f_divergence_type="forward_kl"), dict(f_divergence_type="forward_kl")),
    "js-divergence": (dict(f_divergence_type="js_divergence"), dict(f_divergence_type="js_divergence")),
    "alpha-divergence": (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
                         dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)),
    "alpha-divergence-sigmoid-norm": (
        dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.7, loss_type="sigmoid_norm"),
        dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.7, loss_type=["sigmoid_norm"])),
    "js-hinge-ipo-discopop": (dict(f_divergence_type="js_divergence", loss_type="hinge,ipo,discopop"),
                              dict(f_divergence_type="js_divergence", loss_type=["hinge", "ipo", "discopop"])),
    "alpha-divergence-robust-rpo": (
        dict(f_divergence_type="alpha_divergence", loss_type="robust", label_smoothing=0.1, rpo_alpha=0.5),
        dict(f_divergence_type="alpha_divergence", loss_type=["robust", "sft"], loss_weights=[1.0, 0.5],
             label_smoothing=0.1)),
    "all-three": (dict(ld_alpha=0.5, wpo=True, f_divergence_type="forward_kl"),
                  dict(ld_alpha=0.5, use_weighting=True, f_divergence_type="forward_kl")),
}


def test_ld_dpo_splits_each_answer_at_the_shorter_answer_of_its_pair():
    """LD-DPO's label split by hand: two pairs (chosen rows, then rejected), answers of 3 vs 1 and 2 vs 4 tokens."""
    from qlora.train.preference_loss import ld_label_sets

    x = -100
    labels = torch.tensor([[x, x, 5, 6, 7, x], [x, 8, 9, x, x, x],  # chosen: 3 tokens, 2 tokens
                           [x, x, 4, x, x, x], [x, 1, 2, 3, 4, x]])  # rejected: 1 token, 4 tokens
    shared, tail = ld_label_sets(labels)
    assert shared.tolist() == [[x, x, 5, x, x, x], [x, 8, 9, x, x, x], [x, x, 4, x, x, x], [x, 1, 2, x, x, x]]
    assert tail.tolist() == [[x, x, x, 6, 7, x], [x, x, x, x, x, x], [x, x, x, x, x, x], [x, x, x, 3, 4, x]]


@pytest.mark.parametrize("case", sorted(DPO_EXTRAS))
def test_dpo_ld_wpo_f_divergence_equal_trl(tmp_path, tiny_model_dir, case):
    ours, theirs = DPO_EXTRAS[case]
    loss = _dpo_vs_trl(tmp_path, tiny_model_dir, trl_args=theirs, **ours)
    plain = {k: v for k, v in ours.items() if k in ("loss_type", "loss_weights", "rpo_alpha", "label_smoothing",
                                                    "chunked_ce")}
    (tmp_path / "plain").mkdir()
    trainer = _qlora(tmp_path / "plain", tiny_model_dir, "dpo", beta=0.3, **plain)
    assert trainer.chunked_ce == ours.get("chunked_ce", True)  # the output head's path under test
    assert abs(float(_qlora_step(trainer)[0]) - float(loss)) > 1e-4  # the option changes the loss


def _reference_free_vs_trl(tmp_path, model_dir, method, classes, beta, trl_args, atol, **ours):
    """One step of qlora's reference-free ``method`` (cpo, simpo, orpo) against TRL's trainer of it (``classes``:
    its config and trainer classes): the same tokens, loss and gradients. Returns qlora's metrics, TRL's stored
    metrics, qlora's trainer and TRL's tokenized rows, for the method's own checks."""
    config_cls, trainer_cls = classes
    trainer = _qlora(tmp_path, model_dir, method, beta=beta, **ours)
    hf = _hf_twin(trainer, model_dir)
    args = config_cls(output_dir=str(tmp_path / "trl"), beta=beta, per_device_train_batch_size=len(ROWS),
                      max_length=64, report_to=[], use_cpu=True, bf16=False, fp16=False, disable_dropout=True,
                      remove_unused_columns=False, **trl_args)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = trainer_cls(model=hf, args=args, train_dataset=datasets.Dataset.from_list(ROWS),
                             processing_class=trainer.tokenizer, peft_config=config)
    params = _copy_adapters(trainer, oracle.model)
    tokenized = oracle.train_dataset
    for pair in trainer.train_units:  # TRL's tokenization of the strings is qlora's
        row = tokenized[pair.index]
        assert row["chosen_input_ids"] == pair.prompt_ids + pair.chosen_ids
        assert row["rejected_input_ids"] == pair.prompt_ids + pair.rejected_ids

    inputs = oracle.data_collator([tokenized[p.index] for p in trainer.train_units])
    oracle.model.train()
    their_loss = oracle.compute_loss(oracle.model, inputs)
    their_loss.backward()
    loss, grads, metrics = _qlora_step(trainer)

    torch.testing.assert_close(loss, their_loss.detach(), rtol=RTOL, atol=atol)
    _assert_grads_equal(grads, params)
    return metrics, oracle._stored_metrics["train"], trainer, tokenized


def _cpo_vs_trl(tmp_path, model_dir, method, trl_args, **ours):
    """One step of qlora's --method cpo/simpo against TRL's experimental CPOTrainer."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    metrics, theirs, _, _ = _reference_free_vs_trl(tmp_path, model_dir, method, (CPOConfig, CPOTrainer), 0.3,
                                                   trl_args, 1e-7, **ours)
    keys = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"] + (["nll_loss"] if "nll_loss" in metrics else [])
    for key in keys:
        assert metrics[key] == pytest.approx(theirs[key][-1], rel=RTOL, abs=1e-6), key
    return metrics


CPO_CASES = {
    "cpo-sigmoid": ("cpo", dict(), dict()),
    "cpo-sigmoid-smoothed": ("cpo", dict(label_smoothing=0.1, cpo_alpha=0.5), dict(label_smoothing=0.1, cpo_alpha=0.5)),
    "cpo-hinge": ("cpo", dict(loss_type="hinge"), dict(loss_type="hinge")),
    "cpo-ipo": ("cpo", dict(loss_type="ipo"), dict(loss_type="ipo")),
    "cpo-simpo": ("cpo", dict(loss_type="simpo", simpo_gamma=0.8), dict(loss_type="simpo", simpo_gamma=0.8)),
    "simpo": ("simpo", dict(simpo_gamma=0.8), dict(loss_type="simpo", simpo_gamma=0.8, cpo_alpha=0.0)),
    "cpo-simpo-alpha": ("simpo", dict(cpo_alpha=0.3), dict(loss_type="simpo", cpo_alpha=0.3)),
    # AlphaPO: TRL's loss_type alphapo is simpo with cpo_alpha 0, its reward shape CPOConfig's alpha
    "alphapo": ("simpo", dict(alphapo_alpha=0.25, simpo_gamma=0.8), dict(loss_type="alphapo", simpo_gamma=0.8,
                                                                          alpha=0.25)),
    "alphapo-negative": ("simpo", dict(alphapo_alpha=-0.5), dict(loss_type="simpo", cpo_alpha=0.0, alpha=-0.5)),
    "cpo-sigmoid-alpha": ("cpo", dict(alphapo_alpha=0.02), dict(alpha=0.02)),
    "cpo-ipo-alpha": ("cpo", dict(loss_type="ipo", alphapo_alpha=0.3), dict(loss_type="ipo", alpha=0.3)),
}


@pytest.mark.parametrize("case", sorted(CPO_CASES))
def test_cpo_and_simpo_equal_trl_cpotrainer(tmp_path, tiny_model_dir, case):
    method, ours, theirs = CPO_CASES[case]
    metrics = _cpo_vs_trl(tmp_path, tiny_model_dir, method, theirs, **ours)
    assert ("nll_loss" in metrics) == (method == "cpo" or bool(ours.get("cpo_alpha")))


def test_orpo_equals_trl_orpotrainer(tmp_path, tiny_model_dir):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    metrics, theirs, trainer, tokenized = _reference_free_vs_trl(tmp_path, tiny_model_dir, "orpo",
                                                                 (ORPOConfig, ORPOTrainer), 0.25, {}, 0)
    for pair in trainer.train_units:  # the prompt gets no label in the log-probs (the NLL reads the input ids)
        assert tokenized[pair.index]["chosen_labels"][:len(pair.prompt_ids)] == [-100] * len(pair.prompt_ids)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert metrics[key] == pytest.approx(theirs[key][-1], rel=RTOL, abs=1e-6), key


KTO_ROWS = [
    {"prompt": "What is two plus two?", "completion": " four", "label": True},
    {"prompt": "Say hello.", "completion": " no", "label": False},
    {"prompt": "What does the fox do?", "completion": " The quick brown fox jumps.", "label": True},
    {"prompt": "What is two plus two?", "completion": " five, I think", "label": False},
]


@pytest.mark.parametrize("case", ["kto", "kto-weighted", "apo_zero_unpaired"])
def test_kto_equals_trl_ktotrainer(tmp_path, tiny_model_dir, case):
    """KTO: the reference is the base with the adapters off, the KL term is estimated from the batch's
    prompts paired with the previous example's completion (no gradient), desirable/undesirable weights."""
    from trl import KTOConfig, KTOTrainer

    ours = {"kto": {}, "kto-weighted": dict(desirable_weight=1.5, undesirable_weight=0.7),
            "apo_zero_unpaired": dict(loss_type="apo_zero_unpaired")}[case]
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in KTO_ROWS))
    config = load_config(None, dict(model=str(tiny_model_dir), data=str(data), output=str(tmp_path / "q"), method="kto",
                                    rank=4, alpha=8, dropout=0.0, target_modules=",".join(TARGETS), beta=0.3,
                                    batch_size=len(KTO_ROWS), seq_len=64, optim="adamw", max_steps=1, progress=False,
                                    precision="fp32", **ours))
    trainer = Trainer(config)
    trainer.setup()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)
    hf = _hf_twin(trainer, tiny_model_dir)
    args = KTOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, per_device_train_batch_size=len(KTO_ROWS),
                     max_length=64, report_to=[], use_cpu=True, bf16=False, fp16=False, disable_dropout=True,
                     train_sampling_strategy="sequential", **ours)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = KTOTrainer(model=hf, args=args, train_dataset=datasets.Dataset.from_list(KTO_ROWS),
                            processing_class=trainer.tokenizer, peft_config=lora)
    params = _copy_adapters(trainer, oracle.model)
    tokenized = oracle.train_dataset
    for unit in trainer.train_units:  # TRL's KTO tokenization of the strings is qlora's
        row = tokenized[unit.index]
        assert (row["prompt_ids"], row["completion_ids"]) == (unit.prompt_ids, unit.completion_ids)
        assert row["label"] == unit.desirable

    inputs = oracle.data_collator([tokenized[u.index] for u in trainer.train_units])
    oracle.model.train()
    their_loss = oracle.compute_loss(oracle.model, inputs)
    their_loss.backward()
    loss, grads, metrics = _qlora_step(trainer)

    torch.testing.assert_close(loss, their_loss.detach(), rtol=RTOL, atol=1e-7)
    _assert_grads_equal(grads, params)
    theirs = oracle._metrics["train"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl"):
        assert metrics[key] == pytest.approx(theirs[key][-1], rel=RTOL, abs=1e-6), key
    assert (metrics["kl"] > 0) == (case != "apo_zero_unpaired")  # the KL term is live where it is used
