"""Packing rows with images (--packing): each packed example, images and all, is the example alone.

Oracle: transformers' forward of each example alone (the model computing its own positions, Qwen2-VL's 3-D
rotary ones included, and its own mask, Gemma 3's images read both ways included, from the unpacked batch) with
a PEFT LoRA on it; the packed batch's logits at each example's tokens, per-example losses and its summed loss's
LoRA gradients must be those, on eager and sdpa attention.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForImageTextToText

from qlora.errors import UsageError
from qlora.train.config import load_config
from qlora.train.data import IGNORE_INDEX, attention_windows, pack_examples, packed_collate, pad_collate
from qlora.train.data.image_packing import check_image_packing, image_blocks_of, multimodal_positions
from qlora.train.trainer import Trainer
from image_models import KINDS, build_image_model, kind_params, write_png

QUESTION = "what is in the picture?"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three rows with images of different sizes (one image first, one after the question, one with two) and two
    text rows, so packs mix them."""
    root = tmp_path_factory.mktemp("packing-data")
    (root / "img").mkdir()
    for name, (w, h, seed) in {"a": (40, 30, 0), "b": (70, 60, 1), "c": (30, 50, 2)}.items():
        write_png(root / "img" / f"{name}.png", w, h, seed)

    def row(content, answer, images=()):
        out = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}
        return out | ({"images": list(images)} if images else {})

    image, text = {"type": "image"}, {"type": "text", "text": QUESTION}
    rows = [row([image, text], "a red square", ["img/a.png"]),
            row([text, image], "two green circles on a field", ["img/b.png"]),
            row([{"type": "text", "text": "say hello"}], "hello there"),
            row([image, text, image], "both", ["img/c.png", "img/a.png"]),
            row([{"type": "text", "text": "the cat sat on the mat"}], "and looked at it")]
    path = root / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _trainer(model, data, out, **kw):
    cfg = dict(model=str(model), data=str(data), output=str(out), max_steps=1, batch_size=1, progress=False,
               seq_len=512, quant="none", precision="fp32", dropout=0.0, warmup_ratio=0.0)
    trainer = Trainer(load_config(None, {**cfg, **kw}))
    trainer.setup()
    return trainer


def _per_token_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX,
                           reduction="none")


def _lora(model_dir, attn):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*(language_model|text_model)\..*\.(q|v)_proj",
                      init_lora_weights=False)  # B not zero: A's gradients are compared too
    return get_peft_model(base, lora).eval()


# Families whose packed image rows are refused (test_packing_refused_where_the_forward_takes_no_text_positions):
# GLM-4.1V's where transformers 4.x's decoder takes only its 3 rotary rows.
PACKING_REFUSED = ("hunyuan_vl", *(("glm4v",) if transformers.__version__.startswith("4.") else ()))
# Families with recurrent layers beside attention (Qwen3.5's gated delta-net, LFM3's short convolutions).
RECURRENT = ("qwen3_5", "lfm3_vl")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", kind_params([k for k in KINDS if k not in PACKING_REFUSED + RECURRENT]))
def test_packed_images_are_each_example_alone(kind, attn, data, tmp_path):
    model_dir = build_image_model(tmp_path / kind, kind)
    units = _trainer(model_dir, data, tmp_path / "run").train_units
    assert len(units) == 5 and sum(bool(u.media) for u in units) == 3
    rows = pack_examples(units, sum(len(u.input_ids) for u in units[:3]))
    assert [r.indices for r in rows] == [(0, 1, 2), (3, 4)]  # two rows with images, one image row with text
    model = _lora(model_dir, attn)
    batch = packed_collate(rows, 0, attn, torch.float32, attention_windows(model.config),
                           multimodal_positions(model), image_blocks_of(model))
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    packed = _per_token_loss(logits, batch["labels"])
    packed.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    alone = {}
    for u in units:
        single = pad_collate([u], 0)
        own = model(**{k: v for k, v in single.items() if k != "labels"}).logits
        loss = _per_token_loss(own, single["labels"]).sum()
        loss.backward()
        alone[u.index] = loss.detach()
        i, k = next((i, r.indices.index(u.index)) for i, r in enumerate(rows) if u.index in r.indices)
        start, end = rows[i].spans[k]  # every position's logits, image tokens' too (Gemma 3's see each other)
        torch.testing.assert_close(logits[i, start:end].detach(), own[0].detach(), atol=1e-4, rtol=0)
    for i, row in enumerate(rows):
        seq = torch.tensor(row.sequence_ids[1:])
        for k, index in enumerate(row.indices):
            torch.testing.assert_close(packed[i, :len(seq)][seq == k].sum().detach(), alone[index], atol=1e-4, rtol=0)
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().max() > 0, name
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", kind_params(["qwen2_vl", "idefics3"]))
def test_llama_factory_neat_packing_trains_image_rows_as_the_examples(kind, data, tmp_path):
    """A LLaMA-Factory file's neat_packing with rows holding images: one packed row, whose first-step loss is the
    loss of the five examples in one unpacked batch, and training goes on from there."""
    model_dir = build_image_model(tmp_path / kind, kind)
    config = tmp_path / "sft.yaml"
    config.write_text(f"model_name_or_path: {model_dir}\nstage: sft\nfinetuning_type: lora\nneat_packing: true\n"
                      "cutoff_len: 1025\n")
    cfg = dict(data=str(data), output=str(tmp_path / "packed"), max_steps=3, batch_size=1, progress=False,
               quant="none", precision="fp32", dropout=0.0, warmup_ratio=0.0, lr=1e-2, optim="adamw")
    packed = Trainer(load_config(config, cfg))
    packed.setup()
    assert packed.config.packing and packed.config.seq_len == 1024
    (row,) = packed.train_units
    assert sorted(row.indices) == [0, 1, 2, 3, 4]
    alone = _trainer(model_dir, data, tmp_path / "alone", batch_size=5)
    packed.train()
    alone.train()
    assert packed.losses[0] == pytest.approx(alone.losses[0], rel=1e-5)
    assert packed.losses[-1] < packed.losses[0]


@pytest.mark.parametrize("kind", kind_params(PACKING_REFUSED))
def test_packing_refused_where_the_forward_takes_no_text_positions(kind, data, tmp_path):
    """HunyuanVL's 4 rotary axes (position, width, height, image index): transformers 5.24's forward refuses the
    extra row of text positions that packed rows carry (ValueError: expected 4 channels), as transformers 4.x's
    GLM-4.1V decoder does its 3 (RuntimeError: size 3 against 4), so packing is refused before the model runs,
    naming why, and the same rows train unpacked."""
    model_dir = build_image_model(tmp_path / kind, kind)
    with pytest.raises(UsageError, match=rf"rows\.jsonl line 1: this row holds images, and --packing is not "
                                         rf"supported for {kind} models: .* takes only its \d rotary axes .* Train "
                                         "without --packing"):
        _trainer(model_dir, data, tmp_path / "packed", packing=True)
    assert len(_trainer(model_dir, data, tmp_path / "run").train_units) == 5


@pytest.mark.parametrize("kind", kind_params(RECURRENT))
def test_packing_refused_for_recurrent_layers_of_a_vision_language_model(kind, data, tmp_path):
    """A linear-attention or convolution layer's state would run from one packed example into the next."""
    model_dir = build_image_model(tmp_path / kind, kind)
    with pytest.raises(UsageError, match=r"--packing is not supported with this model's (linear_attention|conv) "
                                         "layers: their state or chunks would run from one packed example into the "
                                         "next"):
        _trainer(model_dir, data, tmp_path / "packed", packing=True)


def test_refused_where_the_model_masks_images_itself_and_with_group_texts(data, tmp_path):
    """PaliGemma's prompts (read both ways) and Gemma 3's image blocks need an explicit mask, which flash attention
    cannot take; --group-texts would cut images apart."""
    paligemma = build_image_model(tmp_path / "paligemma", "paligemma")
    model = AutoModelForImageTextToText.from_pretrained(paligemma, attn_implementation="flex_attention")
    with pytest.raises(UsageError, match="not supported for paligemma models with attention implementation "
                                         "'flex_attention': each example's prompt is read both ways"):
        check_image_packing(model, "row 1")
    gemma3 = build_image_model(tmp_path / "gemma3", "gemma3")
    model = AutoModelForImageTextToText.from_pretrained(gemma3, attn_implementation="flex_attention")
    with pytest.raises(UsageError, match="not supported for gemma3 models with attention implementation "
                                         "'flex_attention': each image's tokens attend to each other both ways"):
        check_image_packing(model, "row 1")
    with pytest.raises(UsageError, match=r"rows\.jsonl line 1: this row holds images; --group-texts cuts a stream"):
        _trainer(gemma3, data, tmp_path / "blocks", group_texts=8, format="auto")


def test_image_rows_are_packed_whole_and_rows_too_long_are_skipped(data, tmp_path):
    """Packs end before an example that does not fit, never inside it (nor its images); a row whose image tokens do
    not fit --seq-len (its image after a long question) is skipped and counted, as without --packing."""
    image, text = {"type": "image", "image": str(data.parent / "img" / "a.png")}, {"type": "text", "text": QUESTION}
    turns = [([image, text], "a red square"), ([{"type": "text", "text": QUESTION * 6}, image], "x"),
             ([{"type": "text", "text": "say hello"}], "hello there"), ([image, text], "two"),
             ([{"type": "text", "text": "the cat"}], "sat on the mat")]
    rows = [{"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}
            for content, answer in turns]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir = build_image_model(tmp_path / "llava", "llava")
    whole = {u.index: u for u in _trainer(model_dir, path, tmp_path / "whole").train_units}
    image_id = json.loads((model_dir / "config.json").read_text())["image_token_index"]
    seq_len = max(t for t, x in enumerate(whole[1].input_ids) if x == image_id)  # cuts row 2's image
    assert max(len(u.input_ids) for i, u in whole.items() if i != 1) <= seq_len
    trainer = _trainer(model_dir, path, tmp_path / "packed", packing=True, seq_len=seq_len)
    assert f"1 skipped with images that do not fit --seq-len (first: {path} line 2)" in trainer.report.summary()
    packs = trainer.train_units
    assert sorted(i for r in packs for i in r.indices) == [0, 2, 3, 4] and len(packs) < 4
    for pack in packs:
        assert len(pack.input_ids) <= seq_len
        for (start, end), index, media in zip(pack.spans, pack.indices, pack.media):
            assert pack.input_ids[start:end] == whole[index].input_ids
            assert media.keys() == whole[index].media.keys()
            assert all(torch.equal(media[k], whole[index].media[k]) for k in media)


def test_molmo2_image_rows_batched_and_packed_are_each_example_alone(tiny_tokenizer):
    """Molmo2's processor gives each image token the patches it pools as indices into the flattened patches of
    its call, and its forward lets all of a sequence's image tokens (start, patches, end) see each other both
    ways. Rows processed one at a time, then batched, pooled the first row's patches into the second row's
    image tokens (logits 0.77 off that row alone), and a packed row read its images causally (0.34 off). Its
    processor needs torchvision, so the rows are written as it writes them: crops of 14x14 patches, pooling
    indices from 0, grids and the token types (1 on every image token)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from qlora.chat.tokenize import TokenizedExample

    if "molmo2" not in CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no Molmo2 models")
    v = len(tiny_tokenizer)
    patch, start, end = v + 1, v + 2, v + 3
    sub = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
               initializer_range=0.5)  # the usual 0.02 leaves image features too small to change a logit
    config = AutoConfig.for_model(
        "molmo2", text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, head_dim=16, vocab_size=v + 8),
        vision_config=dict(sub, num_hidden_layers=1, image_size=[28, 28]),
        adapter_config=dict(sub, text_hidden_size=64, vision_feature_layer=[-1]),
        image_patch_id=patch, image_start_token_id=start, image_end_token_id=end)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa").eval()

    def example(index, crops, pooling, grid, before, after):
        ids = [*before, start, *[patch] * len(pooling), end, *after]
        media = {"pixel_values": torch.randn(crops, 4, 3 * 14 * 14), "image_token_pooling": torch.tensor(pooling),
                 "image_grids": torch.tensor([grid]), "image_num_crops": torch.tensor([crops]),
                 "mm_token_type_ids": torch.tensor([[int(t in (patch, start, end)) for t in ids]])}
        return TokenizedExample(ids, ids, index, media=media)

    examples = [example(0, 1, [[0, 1, 2, 3], [0, 1, -1, -1], [2, 3, -1, -1], [1, 2, 3, -1]], [1, 1, 1, 3],
                        [5, 6, 7], [8, 9, 10]),
                example(1, 2, [[4, 5, 6, 7], [0, 5, -1, -1], [7, 2, 3, -1]], [1, 1, 1, 2], [11, 12], [13, 14, 15])]
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([e.input_ids]), **e.media).logits[0] for e in examples]
        padded = pad_collate(examples, 0)
        padded = model(**{k: v for k, v in padded.items() if k != "labels"}).logits
        rows = pack_examples(examples, 64)
        packed = packed_collate(rows, 0, "sdpa", torch.float32, attention_windows(model.config), None,
                                image_blocks_of(model))
        packed = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
    assert len(rows) == 1
    for k, e in enumerate(examples):
        n = len(e.input_ids)
        torch.testing.assert_close(padded[k, :n], alone[k], atol=1e-5, rtol=0)
        start_, end_ = rows[0].spans[k]
        torch.testing.assert_close(packed[0, start_:end_], alone[k], atol=1e-5, rtol=0)
