"""Preference training on images (DPO, ORPO, CPO, SimPO): the prompt's images processed once per pair, both
answers' rows given them, the reference pass too.

Oracle: TRL 1.16's DPOTrainer (test-only) with the model's processor, on a plain transformers model wrapped by
PEFT with qlora's adapter values (B made non-zero): its loss, reward metrics and gradients equal qlora's first
step. For Gemma 3 and Idefics3 TRL's own vision collator gives the batch, so the ids and image tensors are
checked too; LLaVA's template ends its generation prompt with a space that the tiny tokenizer merges into the
answer's first word, where TRL (which tokenizes the answer apart) and qlora (which cuts ``prompt + answer`` where
it leaves the prompt, as TRL's text path does) part, so there TRL's loss is taken on qlora's batch.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from qlora.cli.main import main
from qlora.train.config import load_config
from qlora.train.trainer import Trainer
from image_models import build_image_model, oracle_processor, write_png

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

QUESTION = "what is in the picture?"
RTOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    return {kind: build_image_model(root / kind, kind) for kind in ("gemma3", "idefics3", "llava", "qwen2_vl")}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    (root / "img").mkdir()
    write_png(root / "img" / "a.png", 40, 30, 0)
    write_png(root / "img" / "b.png", 70, 60, 1)
    return root


def _trl_rows():
    """TRL's vision preference shape: an "images" column and bare image parts in a conversational prompt."""
    return [{"images": ["img/a.png"],
             "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
             "chosen": [{"role": "assistant", "content": "a red square"}],
             "rejected": [{"role": "assistant", "content": "two green circles"}]},
            {"images": ["img/b.png"],
             "prompt": [{"role": "user", "content": [{"type": "text", "text": "describe it"}, {"type": "image"}]}],
             "chosen": [{"role": "assistant", "content": "two green circles"}],
             "rejected": [{"role": "assistant", "content": "the cat sat on the mat"}]}]


def _rlaif_rows():
    """openbmb/RLAIF-V-Dataset's shape: one "image" a row, the prompt under "question", string answers."""
    return [{"image": "img/a.png", "question": QUESTION, "chosen": "a red square", "rejected": "two green circles"},
            {"image": "img/b.png", "question": "describe it", "chosen": "two green circles",
             "rejected": "the cat sat on the mat"}]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(model, data, out, **kw):
    cfg = dict(model=str(model), data=str(data), output=str(out), method="dpo", optim="adamw", lr=1e-2, max_steps=3,
               batch_size=2, progress=False, seq_len=512, quant="none", precision="fp32", dropout=0.0,
               warmup_ratio=0.0, beta=0.3)
    return load_config(None, {**cfg, **kw})


def _trainer(model, data, out, **kw):
    trainer = Trainer(_config(model, data, out, **kw))
    trainer.setup()
    return trainer


# DPO's aot and aot_unpaired (TRL 1.16's name for aot_pair) losses sort the micro-batch's pairs: both pairs, each
# with its own image, enter one loss
@pytest.mark.parametrize("kind, loss", [("gemma3", "sigmoid"), ("idefics3", "sigmoid"), ("llava", "sigmoid"),
                                        ("qwen2_vl", "sigmoid"),  # Qwen2-VL's: for images alone
                                        ("gemma3", "aot"), ("idefics3", "aot_unpaired")])
def test_first_dpo_step_equals_trl_dpotrainer_on_images(kind, loss, models, folder, tmp_path):
    from PIL import Image
    from transformers import AutoModelForImageTextToText
    from trl import DPOConfig, DPOTrainer

    rows = _trl_rows()
    smoothing = 0.0 if loss == "sigmoid" else 0.1
    trainer = _trainer(models[kind], _jsonl(folder / f"trl-{kind}.jsonl", rows), tmp_path / "q", max_steps=1,
                       loss_type=loss, label_smoothing=smoothing)
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero B, so the policy is not the reference
        for name, p in trainer.model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.add_(torch.randn_like(p) * 0.05)
    adapted = sorted({n.split(".lora_A")[0] for n, _ in trainer.model.named_parameters() if ".lora_A" in n})
    config = peft.LoraConfig(r=trainer.config.rank, lora_alpha=trainer.config.alpha, lora_dropout=0.0,
                             target_modules=adapted)
    dataset = datasets.Dataset.from_list([{**r, "images": [Image.open(folder / i).convert("RGB") for i in r["images"]]}
                                          for r in rows])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, per_device_train_batch_size=2, max_length=None,
                     report_to=[], use_cpu=True, bf16=False, fp16=False, disable_dropout=True, loss_type=[loss],
                     label_smoothing=smoothing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = DPOTrainer(model=AutoModelForImageTextToText.from_pretrained(models[kind], dtype=torch.float32),
                            args=args, train_dataset=dataset,
                            processing_class=oracle_processor(models[kind]),
                            peft_config=config)
    theirs = dict(oracle.model.named_parameters())
    ours = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, p in ours.items():
            theirs["base_model.model." + name].copy_(p)

    batch = trainer._collate(trainer.train_units)
    per_image = batch.get("image_grid_thw", batch["pixel_values"])  # Qwen2-VL's pixel_values are patches
    assert batch["input_ids"].shape[0] == 4 and per_image.shape[0] == 4  # each pair's image, twice
    assert torch.equal(per_image[0], per_image[2])
    inputs = oracle.data_collator([dataset[i] for i in range(len(rows))])
    if kind == "llava":  # the answers' first tokens differ (see the module docstring): TRL's loss on our batch
        assert not torch.equal(inputs["input_ids"][inputs["attention_mask"].bool()],
                               batch["input_ids"][batch["attention_mask"].bool()])
        inputs = {**{k: v for k, v in batch.items() if k not in ("labels", "image_tokens")},
                  "completion_mask": (batch["labels"] != -100).long()}
    else:  # TRL's collator (left-flushed as ours): the same ids, answer masks and image tensors
        mask = inputs["attention_mask"].bool()
        for row in range(4):
            n = int(mask[row].sum())
            assert inputs["input_ids"][row, :n].tolist() == batch["input_ids"][row, :n].tolist()
            assert inputs["completion_mask"][row, 1:n].tolist() == (batch["labels"][row, 1:n] != -100).long().tolist()
        for key in ("pixel_values", "token_type_ids", "pixel_attention_mask", "image_grid_thw"):
            if key in inputs:
                torch.testing.assert_close(inputs[key][:, :batch[key].shape[1]].to(batch[key].dtype), batch[key])
    oracle.model.train()
    their_loss = oracle.compute_loss(oracle.model, inputs)
    their_loss.backward()

    trainer.model.zero_grad(set_to_none=True)
    norm = trainer._step_normalizer([batch])
    loss, sums = trainer._micro_loss(batch, norm)
    loss.backward()
    metrics = trainer._step_metrics(sums)
    torch.testing.assert_close(loss.detach(), their_loss.detach(), rtol=RTOL, atol=1e-7)
    assert abs(float(loss) - 0.6931472) > 1e-3  # the adapters matter
    logged = oracle._metrics["train"]
    # A reward is beta times a difference of fp32 sums of log-probabilities: apart by a unit in the sums' last place
    # where the oracle sums in another order (TRL's fused head on transformers 4.x), so a few of those are allowed.
    last_place = torch.finfo(torch.float32).eps * max(abs(metrics["logps/chosen"]), abs(metrics["logps/rejected"]))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert metrics[key] == pytest.approx(logged[key][-1], rel=RTOL, abs=max(1e-6, 4 * args.beta * last_place)), key
    for name, p in ours.items():
        other = theirs["base_model.model." + name].grad
        scale = float(other.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(p.grad, other, rtol=RTOL, atol=RTOL * scale, msg=name)


def test_rlaif_v_rows_are_trl_rows(models, folder, tmp_path):
    """The "image" column with "question" mapped to the prompt: the prompt is a user turn with the image before
    its text (as TRL's RLAIF-V example writes it), so the pairs are those of the conversational rows."""
    rows = _trl_rows()
    rows[1]["prompt"][0]["content"].reverse()
    conversational = _trainer(models["gemma3"], _jsonl(folder / "conv.jsonl", rows), tmp_path / "c").train_units
    rlaif = _trainer(models["gemma3"], _jsonl(folder / "rlaif.jsonl", _rlaif_rows()), tmp_path / "r",
                     data_fields="prompt=question").train_units
    for a, b in zip(conversational, rlaif):
        assert (a.prompt_ids, a.chosen_ids, a.rejected_ids) == (b.prompt_ids, b.chosen_ids, b.rejected_ids)
        assert torch.equal(a.media["pixel_values"], b.media["pixel_values"])


@pytest.mark.parametrize("method", ["dpo", "dpo-precompute-ref", "kto-precompute-ref", "orpo", "cpo", "simpo"])
def test_each_method_trains_on_images(method, models, folder, tmp_path):
    from dataclasses import replace

    precompute = method.endswith("-precompute-ref")
    trainer = _trainer(models["idefics3"], _jsonl(folder / "rlaif.jsonl", _rlaif_rows()), tmp_path / method,
                       method=method.split("-")[0], data_fields="prompt=question", max_steps=4,
                       precompute_ref=precompute)
    trainer.train()
    assert trainer.losses[-1] < trainer.losses[0]
    if precompute:  # the stored reference log-probs are the base's on the images, as the live reference pass on
        # the same rows (KTO: its KL rows, each prompt with its images and its fixed partner's completion)
        live = _trainer(models["idefics3"], folder / "rlaif.jsonl", tmp_path / "live", data_fields="prompt=question",
                        method=method.split("-")[0])
        units = [replace(u, ref_logps=None) for u in trainer.train_units]
        torch.testing.assert_close(trainer._collate(trainer.train_units)["ref_logps"],
                                   live._reference_logps(live._collate(units)).double(), rtol=1e-5, atol=1e-5)
    if method == "orpo":  # its NLL covers the prompt's text but not the tokens standing for the image
        batch = trainer._collate(trainer.train_units)
        labels = trainer._nll_labels(batch)
        image_id = trainer.processor.image_token_id
        assert (batch["input_ids"][:2] == image_id).any() and not (labels == image_id).any()
        assert (labels[:2, :5] != -100).any()


def test_4bit_run_and_resume_reproduce_losses(models, folder, tmp_path):
    data = _jsonl(folder / "rlaif.jsonl", _rlaif_rows())
    kw = dict(quant="nf4", precision="bf16", data_fields="prompt=question", max_steps=4, save_steps=2, batch_size=1,
              dropout=0.1)
    losses = Trainer(_config(models["gemma3"], data, tmp_path / "full", **kw)).run()
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    part = _trainer(models["gemma3"], data, tmp_path / "part", **kw)
    assert part.model.model.language_model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.uint8  # NF4
    part.total_steps = 2
    part.train()
    part.cleanup()
    assert Trainer(_config(models["gemma3"], data, tmp_path / "part", resume=True, **kw)).run() == losses


def test_seq_len_skips_a_pair_whose_image_does_not_fit(models, folder, tmp_path):
    """A pair is cut after its prompt's image like any text; one whose image tokens would be cut is skipped and
    counted (its image after a long question)."""
    rows = _trl_rows()
    rows[1]["prompt"][0]["content"][0]["text"] = QUESTION * 8
    data = _jsonl(folder / "long.jsonl", rows)
    whole = _trainer(models["gemma3"], data, tmp_path / "w").train_units
    trainer = _trainer(models["gemma3"], data, tmp_path / "s", seq_len=len(whole[0].prompt_ids) + 4, batch_size=1)
    (unit,) = trainer.train_units
    assert unit.index == 0 and unit.truncated and unit.chosen_ids == whole[0].chosen_ids[:4]
    assert unit.media["token_type_ids"].shape[-1] == len(unit.prompt_ids)
    assert f"1 skipped with images that do not fit --seq-len (first: {data} line 2)" in trainer.report.summary()


def _train(model, data, out, *extra):
    return main(["train", "--model", str(model), "--data", str(data), "--output", str(out), "--quant", "none",
                 "--max-steps", "2", "--batch-size", "2", "--no-progress", *extra])


def test_cli_trains_and_names_bad_images(models, folder, tmp_path, capsys):
    data = _jsonl(folder / "rlaif.jsonl", _rlaif_rows())
    assert _train(models["llava"], data, tmp_path / "ok", "--method", "dpo", "--data-fields", "prompt=question") == 0
    assert (tmp_path / "ok" / "adapter_model.safetensors").exists()
    (folder / "img" / "bad.png").write_bytes(b"not a png")
    rlaif, trl_row = _rlaif_rows(), _trl_rows()
    cases = [([{**rlaif[0], "image": "img/missing.png"}, rlaif[1]], "image 'img/missing.png' not found"),
             ([{**rlaif[0], "image": "img/bad.png"}, rlaif[1]], "image 'img/bad.png' is not an image Pillow can read"),
             ([{**rlaif[0], "chosen": "a <image> here"}, rlaif[1]], "an answer holds the model's image token"),
             ([{**trl_row[0], "chosen": [{"role": "assistant", "content": [{"type": "image"}]}]}, trl_row[1]],
              '"chosen" holds images')]
    for k, (rows, said) in enumerate(cases):
        path = _jsonl(folder / f"bad{k}.jsonl", rows)
        fields = ["--data-fields", "prompt=question"] if "question" in rows[0] else []
        assert _train(models["llava"], path, tmp_path / f"bad{k}", "--method", "dpo", *fields) == 2
        err = capsys.readouterr().err
        assert f"{path} line 1" in err and said in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err  # one paragraph


def _kto_rows():
    """TRL's unpaired shape with images: each pair's answers as a desirable and an undesirable completion."""
    return [{"images": r["images"], "prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in _trl_rows() for side in ("chosen", "rejected")]


def test_kto_trains_on_images_and_its_kl_rows_keep_their_prompts_images(models, folder, tmp_path):
    """KTO on rows with images: each example's prompt through the processor once, its image tensors given to its
    row and to its KL row (its prompt with the previous example's completion), the reference pass too. As on text:
    the reference is the starting policy (first step: rewards and KL 0), and the loss falls."""
    from qlora.chat.image_examples import image_batch
    from qlora.train.data import IGNORE_INDEX
    from qlora.train.data.unpaired import kl_halves
    from qlora.train.preference_loss import label_logps

    data = _jsonl(folder / "kto.jsonl", _kto_rows())
    trainer = _trainer(models["idefics3"], data, tmp_path / "kto", method="kto", batch_size=4, max_steps=5)
    units = trainer.train_units
    assert [u.desirable for u in units] == [True, False, True, False] and all(u.media for u in units)
    batch = trainer._collate(units)
    n = len(units)
    images = batch["pixel_values"]
    assert images.shape[0] == 2 * n and torch.equal(images[:n], images[n:])  # each KL row: its prompt's image
    assert not torch.equal(images[0], images[2])
    main, kl = kl_halves(batch)
    assert torch.equal(kl["pixel_values"], images[n:]) and torch.equal(kl["input_ids"], batch["input_ids"][n:])
    trainer.model.eval()
    with torch.no_grad():
        kl_logps = label_logps(trainer.model, kl, [kl["labels"]])[0]
        for k, unit in enumerate(units):  # oracle: the KL row built alone from its prompt and the other's completion
            for owner, expected in ((k, True), ((k + 2) % n, False)):  # its prompt's image, not the other pair's
                ids = unit.prompt_ids + units[k - 1].completion_ids
                row = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                       "labels": torch.tensor([[IGNORE_INDEX] * len(unit.prompt_ids) + units[k - 1].completion_ids]),
                       **image_batch([units[owner]], len(ids))}
                alone = label_logps(trainer.model, row, [row["labels"]])[0]
                assert torch.allclose(alone, kl_logps[k:k + 1], rtol=1e-5, atol=1e-5) is expected, (k, owner)
        # the main rows see their images too: the same rows with dimmed images score otherwise
        dimmed = {**main, "pixel_values": main["pixel_values"] * 0.5}
        assert not torch.allclose(label_logps(trainer.model, dimmed, [main["labels"]])[0],
                                  label_logps(trainer.model, main, [main["labels"]])[0], atol=1e-4)
    trainer.model.train()
    trainer.train()
    trainer.cleanup()
    records = [json.loads(line) for line in (tmp_path / "kto" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["split"] == "train"]
    first = records[0]
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5 and first["kl"] < 1e-5
    assert trainer.losses[-1] < trainer.losses[0], trainer.losses
    assert records[-1]["rewards/margins"] > 0


def test_kto_unpairs_preference_pairs_with_images(models, folder, tmp_path):
    """Preference pairs with images trained by KTO: each half keeps the pair's images (the RLAIF-V shape too)."""
    pairs = _trainer(models["gemma3"], _jsonl(folder / "rlaif.jsonl", _rlaif_rows()), tmp_path / "dpo",
                     data_fields="prompt=question").train_units
    kto = _trainer(models["gemma3"], folder / "rlaif.jsonl", tmp_path / "kto", method="kto", batch_size=2,
                   data_fields="prompt=question").train_units
    assert len(kto) == 2 * len(pairs)
    for pair, chosen, rejected in zip(pairs, kto[0::2], kto[1::2]):
        assert chosen.prompt_ids == rejected.prompt_ids == pair.prompt_ids
        assert (chosen.completion_ids, rejected.completion_ids) == (pair.chosen_ids, pair.rejected_ids)
        for key, tensor in pair.media.items():
            assert torch.equal(chosen.media[key], tensor) and torch.equal(rejected.media[key], tensor)


def test_cli_trains_kto_on_images(models, folder, tmp_path, capsys):
    path = _jsonl(folder / "kto-cli.jsonl", _kto_rows())
    assert _train(models["llava"], path, tmp_path / "kto", "--method", "kto") == 0
    assert (tmp_path / "kto" / "adapter_model.safetensors").exists()
    bad = _kto_rows()
    bad[0]["completion"] = [{"role": "assistant", "content": [{"type": "image"}]}]
    path = _jsonl(folder / "kto-bad.jsonl", bad)
    assert _train(models["llava"], path, tmp_path / "bad", "--method", "kto") == 2
    err = capsys.readouterr().err
    assert f'{path} line 1: "completion" holds images' in err and "Traceback" not in err, err
