"""PaliGemma (1 and 2) trains on images as its processor's prefix (the images and the prompt) and suffix (the answer).

Oracle: PaliGemmaProcessor(images, text="<image>" + prompt, suffix=answer) gives the ids, token_type_ids (0 on the
images and prompt, 1 on the answer), pixel_values and labels (the answer and EOS); transformers' forward on them
gives the per-token losses qlora's batch of the same rows must give (two rows of different lengths, padded), and
transformers' generate on the processor's prompt gives the tokens qlora's generation with that image writes.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from qlora.errors import UsageError
from qlora.train.config import load_config
from qlora.train.data import IGNORE_INDEX
from qlora.train.loss import model_inputs, token_loss_sum
from qlora.train.trainer import Trainer
from image_models import build_paligemma, write_png

ROWS = (("caption en", "a red square on a blue field"), ("answer en what is in the picture?", "two circles"))


@pytest.fixture(scope="module", params=["gemma", "gemma2"])
def model_dir(request, tmp_path_factory):
    """A tiny PaliGemma (Gemma text model) or PaliGemma 2 (Gemma 2, with sliding-window layers)."""
    return build_paligemma(tmp_path_factory.mktemp("paligemma") / "model", request.param, sliding_window=64)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("paligemma-images")
    return [write_png(root / "a.png", 40, 30, 0), write_png(root / "b.png", 70, 60, 1)]


def _rows(images):
    """A conversation with an image part naming its file, and one whose bare part after the text is filled from the
    "images" column (the processor puts images before the prompt wherever the row shows them)."""
    (prompt_a, answer_a), (prompt_b, answer_b) = ROWS
    return [{"messages": [{"role": "user", "content": [{"type": "image", "image": str(images[0])},
                                                       {"type": "text", "text": prompt_a}]},
                          {"role": "assistant", "content": answer_a}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": prompt_b}, {"type": "image"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": answer_b}]}],
             "images": [str(images[1])]}]


def _trainer(model_dir, tmp_path, rows, **kw):
    tmp_path.mkdir(exist_ok=True)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = dict(model=str(model_dir), data=str(data), output=str(tmp_path / "out"), max_steps=1, batch_size=len(rows),
               progress=False, seq_len=256, quant="none", precision="fp32", dropout=0.0, warmup_ratio=0.0,
               overwrite=True, shuffle=False)
    trainer = Trainer(load_config(None, {**cfg, **kw}))
    trainer.setup()
    trainer.model.eval()
    return trainer


def _oracle(model_dir, images, attn):
    """Each row's processor inputs (prefix and suffix) and transformers' per-token losses on them."""
    from PIL import Image

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)
    out = []
    for (prompt, answer), path in zip(ROWS, images):
        inputs = processor(images=[Image.open(path).convert("RGB")], text="<image>" + prompt, suffix=answer,
                           return_tensors="pt")
        with torch.no_grad():
            logits = model.eval()(**inputs).logits
        losses = F.cross_entropy(logits[0, :-1], inputs["labels"][0, 1:], ignore_index=IGNORE_INDEX, reduction="none")
        out.append((inputs, losses))
    return out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_image_rows_are_the_processors_prefix_and_suffix(model_dir, images, attn, tmp_path):
    if attn == "sdpa" and AutoConfig.from_pretrained(model_dir).text_config.model_type == "gemma2":
        pytest.skip("transformers' Gemma 2 has no sdpa attention (its logits are soft-capped)")
    oracle = _oracle(model_dir, images, attn)
    trainer = _trainer(model_dir, tmp_path, _rows(images))
    trainer.model.set_attn_implementation(attn)
    batch = trainer._collate(trainer.train_units)
    assert batch["input_ids"].shape[0] == 2
    with torch.no_grad():
        logits = trainer.model(**model_inputs(batch, trainer.model), use_cache=False).logits
    ours = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX,
                           reduction="none")
    for row, (inputs, losses) in enumerate(oracle):
        n = inputs["input_ids"].shape[1]
        assert batch["input_ids"][row, :n].tolist() == inputs["input_ids"][0].tolist()
        assert batch["labels"][row, :n].tolist() == [IGNORE_INDEX] + inputs["labels"][0, 1:].tolist()
        assert batch["token_type_ids"][row, :n].tolist() == inputs["token_type_ids"][0].tolist()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        torch.testing.assert_close(batch["pixel_values"][row], inputs["pixel_values"][0])
        torch.testing.assert_close(ours[row, :n - 1], losses, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        total = sum(losses.sum().item() for _, losses in oracle)
        assert token_loss_sum(trainer.model, batch).item() == pytest.approx(total, rel=1e-5)


def test_a_row_without_images_beside_them_is_the_chat_turns_generation_prompts_without_images(model_dir, images,
                                                                                               tmp_path):
    """The processor takes no prompt without images, and generation (generate, chat, serve) prompts a question without
    images with the run's chat format: such a row trains as those chat turns (transformers' apply_chat_template with
    the run's template; its prompt what a generation prompt renders), its prompt the prefix, its answer type 1 and
    causal (changing the last answer token leaves every earlier logit as it was), as a text-only run's."""
    rows = _rows(images)
    user, answer = {"role": "user", "content": ROWS[0][0]}, {"role": "assistant", "content": ROWS[0][1]}
    rows.append({"messages": [user, answer]})
    trainer = _trainer(model_dir, tmp_path, rows)
    batch = trainer._collate(trainer.train_units)
    tok, template = trainer.tokenizer, trainer.chat_format.template
    prompt = tok.apply_chat_template([user], chat_template=template, add_generation_prompt=True, tokenize=False)
    whole = tok.apply_chat_template([user, answer], chat_template=template, tokenize=False)
    prompt_ids, ids = (tok(t, add_special_tokens=False)["input_ids"] for t in (prompt, whole))
    assert ids[:len(prompt_ids)] == prompt_ids
    n = len(ids)
    assert batch["input_ids"][2, :n].tolist() == ids
    assert (batch["labels"][2, :len(prompt_ids)] == IGNORE_INDEX).all()
    assert batch["labels"][2, len(prompt_ids)].item() == ids[len(prompt_ids)]
    assert batch["token_type_ids"][2, :n].tolist() == [0] * len(prompt_ids) + [1] * (n - len(prompt_ids))
    changed = {k: v.clone() for k, v in batch.items()}
    last = int((batch["labels"][2] != IGNORE_INDEX).nonzero()[-1]) - 1
    changed["input_ids"][2, last] = (changed["input_ids"][2, last] + 1) % len(trainer.tokenizer)
    with torch.no_grad():
        before = trainer.model(**model_inputs(batch, trainer.model), use_cache=False).logits[2, :last]
        after = trainer.model(**model_inputs(changed, trainer.model), use_cache=False).logits[2, :last]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    text_only = _trainer(model_dir, tmp_path / "text", rows[2:])
    (unit,) = text_only.train_units
    assert (unit.input_ids, unit.labels) == (ids, batch["labels"][2, :n].tolist())


def test_a_plain_text_row_beside_image_rows_reads_its_completion_causally(model_dir, images, tmp_path):
    """A prompt-completion row of another source beside the image rows (a text-only run's form: ids and labels those
    of the same row trained alone) gets its own token types, the prompt 0 and the completion 1, not the zeros that
    would read all of it both ways: changing its last completion token leaves every earlier logit as it was."""
    plain = tmp_path / "plain.jsonl"
    tmp_path.mkdir(exist_ok=True)
    plain.write_text(json.dumps({"prompt": "the capital of France is", "completion": " Paris, a city"}) + "\n")
    mixed = tmp_path / "mixed"
    trainer = _trainer(model_dir, mixed, _rows(images), data=f"{mixed / 'rows.jsonl'},{plain}", batch_size=3)
    alone = Trainer(load_config(None, dict(model=str(model_dir), data=str(plain), output=str(tmp_path / "alone"),
                                           quant="none", precision="fp32", seq_len=256, progress=False)))
    alone.setup()
    (unit,) = alone.train_units
    batch = trainer._collate(trainer.train_units)
    n, first = len(unit.input_ids), next(k for k, t in enumerate(unit.labels) if t != IGNORE_INDEX)
    assert batch["input_ids"][2, :n].tolist() == unit.input_ids and batch["labels"][2, :n].tolist() == unit.labels
    assert batch["token_type_ids"][2, :n].tolist() == [0] * first + [1] * (n - first)
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][2, n - 1] = (changed["input_ids"][2, n - 1] + 1) % len(trainer.tokenizer)
    with torch.no_grad():
        before = trainer.model(**model_inputs(batch, trainer.model), use_cache=False).logits[2, :n - 1]
        after = trainer.model(**model_inputs(changed, trainer.model), use_cache=False).logits[2, :n - 1]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_an_answer_of_weight_0_is_not_trained(model_dir, images, tmp_path):
    """OpenAI's fine-tuning ``weight`` 0 marks an answer as context: that row has nothing to train and is skipped,
    as any model's, the other row trained."""
    rows = _rows(images)
    rows[0]["messages"][-1]["weight"] = 0
    trainer = _trainer(model_dir, tmp_path, rows, batch_size=1)
    assert [u.index for u in trainer.train_units] == [1]
    assert any(label != IGNORE_INDEX for label in trainer.train_units[0].labels)


def _two_answers(images) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": str(images[0])},
                                                      {"type": "text", "text": "caption en"}]},
                         {"role": "assistant", "content": "a square"},
                         {"role": "user", "content": "and its colour?"},
                         {"role": "assistant", "content": "red"}]}


def test_a_conversation_of_several_trained_answers_is_refused(model_dir, images, tmp_path):
    with pytest.raises(UsageError, match=r"rows.jsonl line 1: PaliGemma trains on one prompt and one answer per row "
                                         r"with images .* has 2 assistant answers \(1 trained before the last: no "
                                         r"\"weight\": 0\).*Split the conversation.*\"weight\": 0, which puts them in "
                                         r"the prompt"):
        _trainer(model_dir, tmp_path, [_two_answers(images)])
    row = _two_answers(images)
    row["messages"][1]["tool_calls"] = [{"type": "function", "function": {"name": "look", "arguments": {}}}]
    row["messages"][1]["weight"] = 0
    with pytest.raises(UsageError, match=r"line 1: PaliGemma reads plain text; message 1, an earlier answer in its "
                                         r"prompt \(its processor's prefix\), holds tool calls"):
        _trainer(model_dir, tmp_path, [row])


def test_an_earlier_answer_of_weight_0_is_context_in_the_processors_prefix(model_dir, images, tmp_path):
    """OpenAI's ``weight`` 0 marks an answer as context, and the processor takes one prompt before its suffix: the
    earlier turns, that answer among them, are that prompt, a line each (the processor's ids, token types, pixels
    and labels for ``text="<image>caption en\\na square\\nand its colour?", suffix="red"``)."""
    from PIL import Image

    row = _two_answers(images)
    row["messages"][1]["weight"] = 0
    trainer = _trainer(model_dir, tmp_path, [row])
    batch = trainer._collate(trainer.train_units)
    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = processor(images=[Image.open(images[0]).convert("RGB")], text="<image>caption en\na square\nand its "
                       "colour?", suffix="red", return_tensors="pt")
    assert batch["input_ids"].tolist() == inputs["input_ids"].tolist()
    assert batch["token_type_ids"].tolist() == inputs["token_type_ids"].tolist()
    assert batch["labels"][0, 1:].tolist() == inputs["labels"][0, 1:].tolist()
    torch.testing.assert_close(batch["pixel_values"], inputs["pixel_values"])
    with pytest.raises(UsageError, match=r"--train-on all trains the prompt, but PaliGemma reads its prompt both ways"):
        _trainer(model_dir, tmp_path, _rows(images), train_on="all")


def test_a_question_after_an_answer_is_prompted_as_a_row_with_that_history_trains(model_dir, images, tmp_path):
    """``qlora chat``'s (and serve's) next question about the images, after an answer: the processor's prompt the model
    sees is the prefix a row with that history trained on (its earlier answer of ``weight`` 0 in it): the same ids
    and pixels, token for token; messages that end with an answer, or an earlier one with tool calls, are refused."""
    import qlora
    from qlora.chat.images import resolve_image
    from qlora.chat.prefix_suffix import image_prompt
    from qlora.infer.images import encode_with_images, image_processor

    row = _two_answers(images)
    row["messages"].insert(0, {"role": "system", "content": "be brief"})
    row["messages"][2]["weight"] = 0
    trainer = _trainer(model_dir, tmp_path, [row])
    batch = trainer._collate(trainer.train_units)
    prefix = batch["input_ids"][0][batch["token_type_ids"][0] == 0].tolist()
    model, tokenizer = qlora.load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    processor = image_processor(model, tokenizer, model_dir, "test")
    asked = [{k: v for k, v in m.items() if k != "weight"} for m in row["messages"][:-1]]
    asked[1] = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "caption en"}]}
    ids, media = encode_with_images(processor, model, image_prompt(processor, asked),
                                    (resolve_image(str(images[0]), "test"),))
    assert ids[0].tolist() == prefix and tokenizer.decode(prefix).endswith("be brief\ncaption en\na square\nand its "
                                                                          "colour?\n")
    torch.testing.assert_close(media["pixel_values"], batch["pixel_values"])
    with pytest.raises(UsageError, match="these messages end with an answer"):
        image_prompt(processor, asked[:3])
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    with pytest.raises(UsageError, match="message 2, an earlier answer in its prompt .* holds tool calls"):
        image_prompt(processor, [*asked[:2], {"role": "assistant", "content": "", "tool_calls": calls}, asked[3]])


@pytest.mark.parametrize("where", ["a row without images", "an answer"])
def test_the_image_token_written_in_the_text_is_refused_naming_the_row(model_dir, images, tmp_path, where):
    """``<image>`` is the token PaliGemma replaces by image features: written in a row without images, or in an
    answer, it has none (before, the forward failed mid-run: image features and image tokens do not match)."""
    rows = _rows(images)
    if where == "an answer":
        rows[1]["messages"][-1]["content"] = "see <image> here"
    else:
        rows.append({"messages": [{"role": "user", "content": "what does <image> mean?"},
                                  {"role": "assistant", "content": "a tag"}]})
    line = 2 if where == "an answer" else 3
    with pytest.raises(UsageError, match=rf"rows.jsonl line {line}: the row's text holds PaliGemma's image token "
                                         r"'<image>'.*Remove it from the text"):
        _trainer(model_dir, tmp_path, rows)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_preference_rows_with_images_are_refused_naming_sft(model_dir, images, tmp_path, method):
    """A preference pair's answers follow a chat prompt, which is not PaliGemma's prefix and suffix: refused naming
    the row and the method that trains its images (before, the built-in template failed on the image parts and the
    error said to fix the data)."""
    user = [{"role": "user", "content": [{"type": "image", "image": str(images[0])}, {"type": "text", "text": "cap"}]}]
    good, bad = [{"role": "assistant", "content": "a square"}], [{"role": "assistant", "content": "a circle"}]
    rows = [{"prompt": user, "chosen": good, "rejected": bad}] if method == "dpo" else \
        [{"prompt": user, "completion": good, "label": True}, {"prompt": user, "completion": bad, "label": False}]
    with pytest.raises(UsageError, match=r"rows.jsonl line 1: this row holds images, and paligemma models train on "
                                         rf"images only as their processor's prefix .* not --method {method}'s .*"
                                         r"--method sft"):
        _trainer(model_dir, tmp_path, rows, method=method)


def test_generate_with_an_image_is_transformers_generate(model_dir, images, tmp_path, capsys):
    """A run trained on the rows, then ``qlora generate --image``: the prompt with its image is the processor's prefix
    without a suffix (all type 0), and the reply is transformers' greedy generate on the processor's inputs with
    PEFT's merged adapter, up to EOS."""
    from peft import PeftModel
    from PIL import Image

    from qlora.cli.main import main

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(images)))
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(tmp_path / "run"), "--quant",
                 "none", "--precision", "fp32", "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--adapter", str(tmp_path / "run"), "--quant", "none",
                 "--compute-dtype", "fp32", "--temperature", "0", "--max-new-tokens", "8", "--prompt", ROWS[0][0],
                 "--image", str(images[0])]) == 0
    ours = capsys.readouterr().out
    marked = ["--prompt", "<image>" + ROWS[0][0]]  # a placeholder where the image goes: dropped, as in a training row
    assert main(["generate", "--model", str(model_dir), "--adapter", str(tmp_path / "run"), "--quant", "none",
                 "--compute-dtype", "fp32", "--temperature", "0", "--max-new-tokens", "8", *marked,
                 "--image", str(images[0])]) == 0
    assert capsys.readouterr().out == ours
    processor = AutoProcessor.from_pretrained(model_dir)
    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp_path / "run").merge_and_unload().eval()
    inputs = processor(images=[Image.open(images[0]).convert("RGB")], text="<image>" + ROWS[0][0], return_tensors="pt")
    tokens = model.generate(**inputs, do_sample=False, max_new_tokens=8)[0, inputs["input_ids"].shape[1]:].tolist()
    eos = processor.tokenizer.eos_token_id
    tokens = tokens[:tokens.index(eos)] if eos in tokens else tokens
    assert ours == processor.tokenizer.decode(tokens, skip_special_tokens=True) + "\n"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_image_rows_are_each_row_alone(model_dir, images, attn, tmp_path):
    """Packed, each example's images and prompt are one block read both ways in the packed mask, its answer causal:
    the packed row's loss is the sum of the rows' own (PaliGemma 2 within its window)."""
    if attn == "sdpa" and AutoConfig.from_pretrained(model_dir).text_config.model_type == "gemma2":
        pytest.skip("transformers' Gemma 2 has no sdpa attention (its logits are soft-capped)")
    rows = _rows(images) + [{"messages": [{"role": "user", "content": "say hello"},
                                          {"role": "assistant", "content": "hello there"}]}]
    alone = _trainer(model_dir, tmp_path / "alone", rows, seq_len=64)
    alone.model.set_attn_implementation(attn)
    packed = _trainer(model_dir, tmp_path / "packed", rows, seq_len=64, packing=True, batch_size=1)
    packed.model.set_attn_implementation(attn)
    packed.attn = attn
    assert len(packed.train_units) < len(rows)
    with torch.no_grad():
        expected = sum(token_loss_sum(alone.model, alone._collate([u])).item() for u in alone.train_units)
        got = sum(token_loss_sum(packed.model, packed._collate([u])).item() for u in packed.train_units)
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def trained(model_dir, images, tmp_path_factory):
    """A run trained on the image rows (its adapter folder)."""
    from qlora.cli.main import main

    root = tmp_path_factory.mktemp("paligemma-run")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(images)))
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--output", str(root / "run"), "--quant",
                 "none", "--precision", "fp32", "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3",
                 "--no-progress"]) == 0
    return root / "run"


def _greedy(model_dir, adapter, image_paths, prompt, new=8):
    """transformers' greedy reply on the processor's prompt (``"<image>" * n + prompt``) with PEFT's merged adapter,
    up to EOS, decoded; and the processor's ids."""
    from peft import PeftModel
    from PIL import Image

    processor = AutoProcessor.from_pretrained(model_dir)
    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    inputs = processor(images=[Image.open(p).convert("RGB") for p in image_paths],
                       text="<image>" * len(image_paths) + prompt, return_tensors="pt")
    tokens = model.generate(**inputs, do_sample=False, max_new_tokens=new)[0, inputs["input_ids"].shape[1]:].tolist()
    eos = processor.tokenizer.eos_token_id
    tokens = tokens[:tokens.index(eos)] if eos in tokens else tokens
    return processor.tokenizer.decode(tokens, skip_special_tokens=True), inputs["input_ids"][0].tolist()


def test_chat_image_prompt_is_the_processors_and_its_reply_transformers(model_dir, images, trained, monkeypatch,
                                                                         capsys):
    """``/image`` in ``qlora chat``: the system message and the user's text, a line each after the image tokens, as
    the rows trained (no chat turn around them); a second question about the images is the prompt a row with that
    history trains on, the earlier answer a line in it (transformers' reply to that processor prompt); after /reset
    the question is answered alike."""
    import io

    from qlora.cli.main import main

    expected, _ = _greedy(model_dir, trained, [images[0]], "be brief\n" + ROWS[0][0])
    later, _ = _greedy(model_dir, trained, [images[0]], f"be brief\n{ROWS[0][0]}\n{expected.strip()}\nand its colour?")
    lines = [f"/image {images[0]}", ROWS[0][0], "and its colour?", "/reset", f"/image {images[0]}", ROWS[0][0],
             "/exit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    capsys.readouterr()
    assert main(["chat", "--model", str(model_dir), "--adapter", str(trained), "--quant", "none", "--compute-dtype",
                 "fp32", "--temperature", "0", "--max-new-tokens", "8", "--system", "be brief"]) == 0
    captured = capsys.readouterr()
    replies = [line.split("assistant> ", 1)[1] for line in captured.out.splitlines() if "assistant> " in line]
    assert [r.strip() for r in replies] == [expected.strip(), later.strip(), expected.strip()]
    assert "PaliGemma" not in captured.err


def test_generate_places_an_image_placeholder_as_the_processor(model_dir, images, trained, capsys):
    """``--prompt "<image>..."`` with one ``--image``: one image, its placeholder not sent as a second one."""
    from qlora.cli.main import main

    expected, _ = _greedy(model_dir, trained, [images[1]], ROWS[1][0])
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--adapter", str(trained), "--quant", "none",
                 "--compute-dtype", "fp32", "--temperature", "0", "--max-new-tokens", "8", "--prompt",
                 "<image>" + ROWS[1][0], "--image", str(images[1])]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_served_images_are_the_processors_prompt_and_transformers_reply(model_dir, images, trained):
    """``qlora serve``'s chat completions (and the Responses API) with image parts: the processor's prompt, the system
    message a line before the user's text, and transformers' greedy reply; a conversation going on after an answer
    is the prompt a row with that history trains on (the answer a line in it); messages ending with an answer, and
    tools with the images, are a 400 naming the field."""
    import base64

    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    import qlora
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    expected, _ = _greedy(model_dir, trained, [images[0]], "be brief\n" + ROWS[0][0])
    uri = "data:image/png;base64," + base64.b64encode(images[0].read_bytes()).decode()
    user = {"role": "user", "content": [{"type": "text", "text": ROWS[0][0]},
                                        {"type": "image_url", "image_url": {"url": uri}}]}
    messages = [{"role": "system", "content": "be brief"}, user]
    model, tokenizer = qlora.load_model(model_dir, quant="none", compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(model, trained, adapter_name="img")
    batcher = ContinuousBatcher(model.eval(), tokenizer, context_length=512).start()
    with BackgroundServer(build_app(batcher, "base", ["img"], model_dir=str(model_dir))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="img", messages=messages, max_tokens=8, temperature=0)
        assert reply.choices[0].message.content == expected
        response = client.responses.create(model="img", instructions="be brief", input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": uri}, {"type": "input_text", "text": ROWS[0][0]}]}],
            max_output_tokens=8, temperature=0)
        assert response.output_text == expected
        later = [*messages, {"role": "assistant", "content": "a square"}, {"role": "user", "content": "its colour?"}]
        reply = client.chat.completions.create(model="img", messages=later, max_tokens=8, temperature=0)
        assert reply.choices[0].message.content == _greedy(model_dir, trained, [images[0]],
                                                           f"be brief\n{ROWS[0][0]}\na square\nits colour?")[0]
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="img", messages=later[:3], max_tokens=2)
        assert err.value.body["param"] == "messages" and "end with an answer" in err.value.body["message"]
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="img", messages=messages, tools=tools, max_tokens=2)
        assert err.value.body["param"] == "tools"
    batcher.close()


def _image_prompt(model_dir, images):
    """qlora's model and its encoding of the first row's prompt with its image, the processor's inputs of it, the
    oracle and its log-probabilities of that prompt with every token causal (type 1, as a scored prompt's)."""
    from PIL import Image

    import qlora
    from qlora.chat.images import resolve_image
    from qlora.chat.prefix_suffix import image_prompt
    from qlora.infer.images import encode_with_images, image_processor

    model, tokenizer = qlora.load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    processor = image_processor(model, tokenizer, model_dir, "test")
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ROWS[0][0]}]}
    ids, media = encode_with_images(processor, model, image_prompt(processor, [user]),
                                    (resolve_image(str(images[0]), "test"),))
    inputs = AutoProcessor.from_pretrained(model_dir)(images=[Image.open(images[0]).convert("RGB")],
                                                      text="<image>" + ROWS[0][0], return_tensors="pt")
    oracle = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        causal = oracle(**inputs | {"token_type_ids": torch.ones_like(ids)}).logits[0].log_softmax(-1)
    return model, tokenizer, ids, media, inputs, oracle, causal


def _serve(batcher, requests) -> list[list]:
    """The events of ``requests(emitter)`` (``emitter(k)``: request ``k``'s callback) served by ``batcher``, started
    here; none an error."""
    import threading

    events, done = [[], []], [threading.Event(), threading.Event()]

    def emitter(k):
        def emit(event):
            events[k].append(event)
            if event.finish_reason is not None:
                done[k].set()
        return emit

    batcher.start()
    try:
        batcher.submit_all(requests(emitter))
        assert all(d.wait(120) for d in done)
    finally:
        batcher.close()
    assert not any(e.error for e in events[0] + events[1])
    return events


def _assert_scored_causally(events, ids, causal) -> None:
    scored = next(e.prompt_logprobs for e in events if e.prompt_logprobs is not None)
    assert [e.token for e in scored] == ids[0].tolist()
    for k, entry in enumerate(scored[1:], 1):
        assert entry.logprob == pytest.approx(float(causal[k - 1, ids[0, k]]), abs=1e-4)


def test_a_batched_row_with_an_image_is_transformers_generate_and_scores_causally(model_dir, images):
    """The batcher's prefill (qlora serve's) of the processor's prompt with its image: its greedy tokens are
    transformers' generate on the processor's inputs (type 0 on the whole prompt), and a scored prompt's logprobs are
    transformers' with every token causal (type 1), as a prompt's are scored without its images."""
    from qlora.infer.batcher import ContinuousBatcher, Request
    from qlora.infer.generate import SamplingOptions

    new = 6
    model, tokenizer, ids, media, inputs, oracle, causal = _image_prompt(model_dir, images)
    assert ids.tolist() == inputs["input_ids"].tolist()
    expected = oracle.generate(**inputs, do_sample=False, max_new_tokens=new, min_new_tokens=new)[0, ids.shape[1]:]
    options = SamplingOptions(max_new_tokens=new, temperature=0)
    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    events = _serve(ContinuousBatcher(model.eval(), tokenizer, context_length=512), lambda emitter: [
        Request(ids[0].tolist(), None, options, emitter(0), logprobs=0, media=media, token_filter=None,
                min_tokens=new, stop_ids=frozenset(eos)),
        Request(ids[0].tolist(), None, options, emitter(1), prompt_logprobs=0, generate=False, media=media)])
    assert [e.token for event in events[0] for e in event.logprobs] == expected.tolist()
    _assert_scored_causally(events[1], ids, causal)


class _Forced:
    """A reply that starts with ``prefix_ids`` and goes on greedily (a forced tool call's fixed start)."""

    complete = True

    def __init__(self, prefix_ids: list[int]) -> None:
        self.prefix_ids = prefix_ids

    def accepts(self, token: int) -> bool:
        return True

    def choose(self, logits, options, generator, allows=None) -> int:
        return int(logits.argmax())


@pytest.mark.parametrize("alone", [False, True], ids=["batched", "unbatchable"])
def test_a_forced_or_scored_prompt_has_the_same_token_types_batched_or_alone(model_dir, images, alone):
    """A model served one request at a time (``unbatchable``) prefills as the batch does: a scored prompt all causal
    (type 1), a forced reply start causal after the prompt's prefix (type 0 then 1); its forced tokens' logprobs are
    transformers' forward's with those types and the rest of its reply transformers' generate from them."""
    from qlora.infer.batcher import ContinuousBatcher, Request
    from qlora.infer.generate import SamplingOptions

    new, forced = 6, [17, 23]
    model, tokenizer, ids, media, inputs, oracle, causal = _image_prompt(model_dir, images)
    started = torch.cat([ids, torch.tensor([forced])], 1)
    types = torch.tensor([[0] * ids.shape[1] + [1] * len(forced)])
    start = dict({k: v for k, v in inputs.items() if k != "labels"}, input_ids=started,  # labels: all -100
                 attention_mask=torch.ones_like(started), token_type_ids=types)
    with torch.no_grad():
        after = oracle(**start).logits[0].log_softmax(-1)
    rest = oracle.generate(**start, do_sample=False, max_new_tokens=new - len(forced),
                           min_new_tokens=new - len(forced))[0, started.shape[1]:].tolist()
    options = SamplingOptions(max_new_tokens=new, temperature=0)
    batcher = ContinuousBatcher(model.eval(), tokenizer, context_length=512)
    assert batcher.unbatchable is None
    if alone:  # as a model whose cache cannot join a batch is served
        batcher.unbatchable = "served one request at a time for this test"
    events = _serve(batcher, lambda emitter: [
        Request(ids[0].tolist(), None, options, emitter(0), logprobs=0, media=media, min_tokens=new,
                constraint=_Forced(forced)),
        Request(ids[0].tolist(), None, options, emitter(1), prompt_logprobs=0, generate=False, media=media)])
    reply = [e for event in events[0] for e in event.logprobs]
    assert [e.token for e in reply] == forced + rest
    for k, entry in enumerate(reply[:len(forced)]):
        assert entry.logprob == pytest.approx(float(after[ids.shape[1] - 1 + k, forced[k]]), abs=1e-4)
    _assert_scored_causally(events[1], ids, causal)
