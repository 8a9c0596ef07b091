"""Supervised fine-tuning on images: conversations whose user turns hold images, through each family's processor.

Oracles: transformers' own forward on the processor's output, with the assistant answer (through its
end-of-turn token) as the only labels, gives qlora's first-step loss; PEFT loads the saved adapter on the base
model and gives qlora's logits on an image+text input.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForImageTextToText

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.train.config import load_config
from qlora.train.trainer import Trainer
from image_models import (FAMILIES, KINDS, NEEDS_TORCHVISION, PROCESSORS, build_image_model, kind_params,
                          oracle_processor, render, write_png)

QUESTION, ANSWERS = "what is in the picture?", ("a red square", "two green circles")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("image-models")
    return {kind: build_image_model(root / kind, kind) for kind in KINDS}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two rows: an image part naming its file, and a bare part filled from the "images" column (TRL's vision
    datasets); images of different sizes, so batches pad and concatenate unlike tensors."""
    root = tmp_path_factory.mktemp("image-data")
    (root / "img").mkdir()
    write_png(root / "img" / "a.png", 40, 30, 0)
    write_png(root / "img" / "b.png", 70, 60, 1)
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "img/a.png"},
                                                       {"type": "text", "text": QUESTION}]},
                          {"role": "assistant", "content": ANSWERS[0]}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[1]}]}],
             "images": ["img/b.png"]}]
    path = root / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _trainer(model, data, out, **kw):
    cfg = dict(model=str(model), data=str(data), output=str(out), optim="adamw", lr=1e-2, max_steps=3, batch_size=2,
               progress=False, seq_len=512, quant="none", precision="fp32", dropout=0.0, warmup_ratio=0.0)
    trainer = Trainer(load_config(None, {**cfg, **kw}))
    trainer.setup()
    return trainer


def _oracle_rows(model_dir, data):
    """Each row as transformers sees it: the processor's inputs of the rendered conversation, and labels that
    are the ids from where they part from the prompt's (rendered with the generation prompt; TRL's
    completion mask), less a whitespace token the template writes before the answer (SmolVLM's "Assistant: "
    after a generation prompt "Assistant:"), through the first EOS."""
    from PIL import Image

    processor = oracle_processor(model_dir)
    eos = processor.tokenizer.eos_token_id
    out = []
    for k, image in enumerate(("a.png", "b.png")):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                    {"role": "assistant", "content": [{"type": "text", "text": ANSWERS[k]}]}]
        if k == 1:
            messages[0]["content"].reverse()
        images = [Image.open(data.parent / "img" / image).convert("RGB")]
        full = render(processor, messages)
        prompt = render(processor, messages[:1], add_generation_prompt=True)
        inputs = processor(text=[full], images=images, add_special_tokens=False, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        prompt_ids = processor(text=[prompt], images=images, add_special_tokens=False)["input_ids"][0]
        start = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), len(prompt_ids))  # as TRL
        while not processor.tokenizer.decode(ids[start]).strip():  # the template's space before the answer
            start += 1
        end = ids.index(eos, start) + 1
        labels = torch.full((1, len(ids)), -100)
        labels[0, start:end] = inputs["input_ids"][0, start:end]
        out.append((inputs, labels))
    return out


@pytest.mark.parametrize("kind", kind_params(FAMILIES))
def test_first_step_loss_is_transformers_loss_and_adapter_loads_in_peft(kind, models, data, tmp_path):
    from peft import PeftModel

    rows = _oracle_rows(models[kind], data)
    trainer = _trainer(models[kind], data, tmp_path / "run")
    by_index = {u.index: u for u in trainer.train_units}
    for k, (inputs, labels) in enumerate(rows):
        assert by_index[k].input_ids == inputs["input_ids"][0].tolist()
        assert by_index[k].labels == labels[0].tolist()
    ref = AutoModelForImageTextToText.from_pretrained(models[kind], dtype=torch.float32).train()
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, labels in rows:
            logits = ref(**inputs).logits[0, :-1]
            total += F.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum").item()
            count += int((labels[0, 1:] != -100).sum())
    trainer.train()
    assert trainer.losses[0] == pytest.approx(total / count, rel=1e-5, abs=1e-6)
    assert trainer.losses[-1] < trainer.losses[0]
    trainer.save_final()

    inputs = rows[1][0]
    trainer.model.eval()
    with torch.no_grad():
        ours = trainer.model(**inputs).logits
        peft = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(models[kind],
                                                                                     dtype=torch.float32),
                                         tmp_path / "run").eval()
        theirs = peft(**inputs).logits
        base = ref.eval()(**inputs).logits
    assert not torch.allclose(theirs, base, atol=1e-4)  # the adapter changed the model
    assert torch.allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("kind", kind_params(("hunyuan_vl", "qwen2_vl", "glm4v", "vipllava", "idefics2", "gemma4", "qwen3_5",
                                                "lfm3_vl")))
def test_per_token_losses_of_a_padded_batch_are_the_models_on_the_processors_batch(kind, models, data, tmp_path):
    """Two rows of different lengths in one padded batch: transformers' forward on the processor's own batch of them
    (its padding, its multimodal positions from the attention mask: HunyuanVL's 4 rotary axes, Qwen2-VL's 3) gives
    qlora's per-token losses, each row's tokens where the processor put them."""
    from PIL import Image

    from qlora.train.loss import model_inputs

    questions = (QUESTION, "describe the image: " + QUESTION + " the cat sat on the mat")
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
                 {"role": "assistant", "content": [{"type": "text", "text": a}]}] for q, a in zip(questions, ANSWERS)]
    rows = [{"messages": m, "images": [str(data.parent / "img" / name)]}
            for m, name in zip(messages, ("a.png", "b.png"))]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    processor = oracle_processor(models[kind])
    images = [[Image.open(data.parent / "img" / name).convert("RGB")] for name in ("a.png", "b.png")]
    inputs = processor(text=[render(processor, m) for m in messages], images=images, padding=True,
                       add_special_tokens=False, return_tensors="pt")
    lengths = inputs["attention_mask"].sum(1).tolist()
    assert lengths[0] != lengths[1]
    trainer = _trainer(models[kind], path, tmp_path / "run", shuffle=False)
    trainer.model.eval()
    batch = trainer._collate(trainer.train_units)
    ref = AutoModelForImageTextToText.from_pretrained(models[kind], dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(**inputs).logits
        ours = trainer.model(**model_inputs(batch, trainer.model), use_cache=False).logits
    for row, n in enumerate(lengths):
        mask = inputs["attention_mask"][row].bool()
        assert batch["input_ids"][row, :n].tolist() == inputs["input_ids"][row][mask].tolist()
        labels = batch["labels"][row, 1:n]
        expected = F.cross_entropy(theirs[row][mask][:-1], labels, ignore_index=-100, reduction="none")
        got = F.cross_entropy(ours[row, :n - 1], labels, ignore_index=-100, reduction="none")
        assert (labels != -100).sum() > 0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", kind_params(("gemma3", "llava", "idefics3", "qwen2_vl")))
@pytest.mark.parametrize("train_on", ["all", "completion"])
def test_a_conversation_trained_whole_trains_its_image_tokens(kind, train_on, models, data, tmp_path):
    """train_on all (and completion, TRL's SFT default, for conversations) trains every token of a row with images,
    the processor's image tokens included, as TRL's vision collator labels every token but padding (the text
    path's labels had no place for the expanded image tokens, and every row was refused as holding an image
    placeholder inside a trained turn)."""
    rows = _oracle_rows(models[kind], data)
    trainer = _trainer(models[kind], data, tmp_path / "run", train_on=train_on)
    by_index = {u.index: u for u in trainer.train_units}
    for k, (inputs, _) in enumerate(rows):
        ids = inputs["input_ids"][0].tolist()
        assert by_index[k].input_ids == ids
        assert by_index[k].labels == [-100] + ids[1:]


def test_four_bit_training_on_images(models, data, tmp_path):
    trainer = _trainer(models["gemma3"], data, tmp_path / "run", quant="nf4", max_steps=4)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(trainer.losses))) and trainer.losses[-1] < trainer.losses[0]


def test_llama_factory_sharegpt_with_image_placeholders(models, data, tmp_path):
    """LLaMA-Factory's rows: <image> placeholders in the text, paths in an "images" column, taken in order."""
    rows = [{"conversations": [{"from": "human", "value": f"<image>{QUESTION}"}, {"from": "gpt", "value": a}],
             "images": [f"img/{name}"]} for a, name in zip(ANSWERS, ("a.png", "b.png"))]
    path = data.parent / "sharegpt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer = _trainer(models["llava"], path, tmp_path / "run")
    oracle = _oracle_rows(models["llava"], data)
    assert trainer.train_units[0].input_ids == oracle[0][0]["input_ids"][0].tolist()
    assert trainer.train_units[0].labels == oracle[0][1][0].tolist()


def test_a_single_image_column_is_the_rows_image(models, data, tmp_path):
    """Vision datasets often store one image a row in an "image" column: it is read as that row's image (it was
    ignored, and the row trained on its text alone)."""
    texts = (f"<image>{QUESTION}", f"{QUESTION}<image>")  # where the fixture's two rows hold their image
    rows = [{"conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": a}], "image": f"img/{name}"}
            for text, a, name in zip(texts, ANSWERS, ("a.png", "b.png"))]
    trainer = _trainer(models["llava"], _jsonl(data.parent / "single.jsonl", rows), tmp_path / "run")
    oracle = _oracle_rows(models["llava"], data)
    assert [u.input_ids for u in trainer.train_units] == [o[0]["input_ids"][0].tolist() for o in oracle]
    assert [u.labels for u in trainer.train_units] == [o[1][0].tolist() for o in oracle]


def test_llama_factory_registry_with_an_images_column(models, data, tmp_path):
    """A dataset_info.json entry mapping its images column (LLaMA-Factory's ``columns: {images: ...}``): the
    paths, relative to the dataset folder, fill the <image> placeholders as a plain file's "images" column does."""
    registry = data.parent
    texts = (f"<image>{QUESTION}", f"{QUESTION}<image>")  # where the fixture's two rows hold their image
    rows = [{"talk": [{"from": "human", "value": text}, {"from": "gpt", "value": a}], "pics": [f"img/{name}"]}
            for text, a, name in zip(texts, ANSWERS, ("a.png", "b.png"))]
    _jsonl(registry / "registered.jsonl", rows)
    (registry / "dataset_info.json").write_text(json.dumps({"mine": {
        "file_name": "registered.jsonl", "formatting": "sharegpt",
        "columns": {"messages": "talk", "images": "pics"}}}))
    trainer = _trainer(models["llava"], "mine", tmp_path / "run", dataset_dir=str(registry))
    oracle = _oracle_rows(models["llava"], data)
    assert [u.input_ids for u in trainer.train_units] == [o[0]["input_ids"][0].tolist() for o in oracle]
    assert [u.labels for u in trainer.train_units] == [o[1][0].tolist() for o in oracle]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(model, data, out, *extra):
    return main(["train", "--model", str(model), "--data", str(data), "--output", str(out), "--quant", "none",
                 "--max-steps", "2", "--batch-size", "1", "--no-progress", *extra])


def test_cli_trains_on_png_files_and_names_a_bad_image(models, data, tmp_path, capsys):
    assert _train(models["idefics3"], data, tmp_path / "ok") == 0
    assert (tmp_path / "ok" / "adapter_model.safetensors").exists()
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows[1]["images"] = ["img/missing.png"]
    bad = _jsonl(data.parent / "bad.jsonl", rows)
    assert _train(models["idefics3"], bad, tmp_path / "bad") == 2
    err = capsys.readouterr().err
    assert f"{bad} line 2: image 'img/missing.png' not found" in err and "Traceback" not in err
    (data.parent / "img" / "broken.png").write_bytes(b"not a png")
    rows[1]["images"] = ["img/broken.png"]
    _jsonl(bad, rows)
    assert _train(models["idefics3"], bad, tmp_path / "bad") == 2
    err = capsys.readouterr().err
    assert f"{bad} line 2: image 'img/broken.png' is not an image" in err and "Traceback" not in err


def test_data_uri_and_absolute_paths(models, data, tmp_path):
    import base64

    uri = "data:image/png;base64," + base64.b64encode((data.parent / "img" / "a.png").read_bytes()).decode()
    rows = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": src}},
                                                       {"type": "text", "text": QUESTION}]},
                          {"role": "assistant", "content": ANSWERS[0]}]}
            for src in (uri, str(data.parent / "img" / "a.png"))]
    trainer = _trainer(models["gemma3"], _jsonl(tmp_path / "uri.jsonl", rows), tmp_path / "run", batch_size=1)
    first, second = trainer.train_units
    assert first.input_ids == second.input_ids and torch.equal(first.media["pixel_values"],
                                                               second.media["pixel_values"])


def test_refusals(models, data, tiny_model_dir, tmp_path):
    with pytest.raises(UsageError, match=r"chat\.jsonl line 1: this row holds images, but .* has no vision tower"):
        _trainer(tiny_model_dir, data, tmp_path / "text")
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "url": "https://example.com/a.png"}]},
                          {"role": "assistant", "content": "x"}]}]
    with pytest.raises(UsageError, match=r"url\.jsonl line 1: image 'https://example.com/a.png' is a URL"):
        _trainer(models["gemma3"], _jsonl(tmp_path / "url.jsonl", rows), tmp_path / "url", batch_size=1)
    rows = [{"conversations": [{"from": "human", "value": "<image><image>hi"}, {"from": "gpt", "value": "x"}],
             "images": ["img/a.png"]}]
    with pytest.raises(UsageError, match="more images in the messages than in the \"images\" column"):
        _trainer(models["gemma3"], _jsonl(data.parent / "two.jsonl", rows), tmp_path / "two", batch_size=1)


@pytest.mark.parametrize("kind", NEEDS_TORCHVISION or [pytest.param("-", marks=pytest.mark.skip(
    reason="every family's processor class builds here (torchvision is installed, or none needs it)"))])
def test_a_processor_that_needs_torchvision_is_named(kind, data, tmp_path, capsys):
    """A processor class that needs torchvision itself (transformers 5's PixtralProcessor, 4.x's SmolVLMProcessor,
    whose module imports its video processor's): not even a processor for images alone builds."""
    model = build_image_model(tmp_path / kind, kind)
    assert _train(model, data, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert (f"{data} line 1: the processor of {kind} models ({model}) needs torchvision, which is not installed, "
            f"so images cannot be turned into its inputs (transformers' {PROCESSORS[kind]} itself needs it): pip "
            "install torchvision" in " ".join(err.split()) and "Traceback" not in err), err


def test_rows_whose_images_do_not_fit_seq_len_are_skipped_and_counted(models, data, tmp_path):
    """A row is cut after its image like any text, but one whose image tokens would be cut is skipped and
    counted (its image placed after a long question)."""
    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": str(data.parent / "img" / "a.png")},
                                                       {"type": "text", "text": text}]},
                          {"role": "assistant", "content": ANSWERS[0]}]} for text in (QUESTION, QUESTION * 6)]
    rows[1]["messages"][0]["content"].reverse()
    path = _jsonl(tmp_path / "long.jsonl", rows)
    whole = _trainer(models["gemma3"], path, tmp_path / "whole", batch_size=1).train_units[0]
    trainer = _trainer(models["gemma3"], path, tmp_path / "cut", batch_size=1, seq_len=len(whole.input_ids) - 1)
    (unit,) = trainer.train_units
    assert unit.index == 0 and unit.truncated and unit.input_ids == whole.input_ids[:-1]
    assert unit.media["token_type_ids"].shape[-1] == len(whole.input_ids) - 1
    assert f"1 skipped with images that do not fit --seq-len (first: {path} line 2)" in trainer.report.summary()


@pytest.mark.parametrize("kind", ["gemma3", "llava_next"])
def test_eval_on_rows_with_images_is_transformers_loss(kind, models, data, capsys):
    """``qlora eval`` tokenizes rows with images as training does: its loss and token count are transformers'
    forward on the processor's inputs with the answers as labels (Gemma 3's token_type_ids, LLaVA-NeXT's
    image_sizes and crops of two sizes in one batch)."""
    ref = AutoModelForImageTextToText.from_pretrained(models[kind], dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, labels in _oracle_rows(models[kind], data):
            logits = ref(**inputs).logits[0, :-1]
            total += F.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum").item()
            count += int((labels[0, 1:] != -100).sum())
    capsys.readouterr()
    assert main(["eval", "--model", str(models[kind]), "--data", str(data), "--quant", "none", "--batch-size",
                 "2"]) == 0
    out = capsys.readouterr().out
    loss, tokens = out.split("loss ")[1].split()[0], out.split("(")[-1].split()[0]
    assert float(loss) == pytest.approx(total / count, abs=1e-4) and int(tokens) == count


def test_the_runs_eval_data_with_images_is_transformers_loss(models, data, tmp_path):
    ref = AutoModelForImageTextToText.from_pretrained(models["idefics3"], dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, labels in _oracle_rows(models["idefics3"], data):
            logits = ref(**inputs).logits[0, :-1]
            total += F.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum").item()
            count += int((labels[0, 1:] != -100).sum())
    trainer = _trainer(models["idefics3"], data, tmp_path / "run", eval_data=str(data), max_steps=1)
    assert trainer.evaluate()["loss"] == pytest.approx(total / count, rel=1e-5)


def test_a_processor_failure_without_a_message_is_still_one_paragraph(tmp_path, monkeypatch):
    """Some exceptions carry no text (a bare assert in a processor's code): the refusal names the type."""

    from qlora.model.image_processor import load_image_processor
    from qlora.model.load import load_model

    folder = build_image_model(tmp_path / "g", "gemma3")
    model, tokenizer = load_model(folder, quant=None)

    def fail(*args, **kwargs):
        raise AssertionError()

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", fail)
    with pytest.raises(UsageError, match=r"^row 1: images need the model's processor, which transformers "
                                         r"cannot build from .* \(AssertionError\)"):
        load_image_processor(folder, model, tokenizer, "row 1")


def test_a_missing_package_is_named_by_what_pip_installs(tmp_path, monkeypatch):
    """An ImportError names the module (PIL); the refusal says the distribution to install (pillow)."""

    from qlora.model.image_processor import load_image_processor
    from qlora.model.load import load_model

    folder = build_image_model(tmp_path / "g", "gemma3")
    model, tokenizer = load_model(folder, quant=None)

    def fail(*args, **kwargs):
        raise ImportError("No module named 'PIL'", name="PIL")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", fail)
    with pytest.raises(UsageError, match=r"needs pillow, which is not installed.*pip install pillow"):
        load_image_processor(folder, model, tokenizer, "row 1")


def test_a_processor_failing_on_a_training_row_names_the_row(models, data, tmp_path, monkeypatch):
    """A processor that cannot take a row's image (one it cannot resize, say) stops the run naming the row and
    the processor's error, as generate and serve name it; a wrong call (TypeError) stays a bug."""
    from qlora.model import image_processor

    real = image_processor.process

    def failing(processor, text, images, where="", names=()):
        class Refusing:
            def __call__(self, **kwargs):
                raise IndexError("index 3 is out of bounds")

        return real(Refusing(), text, images, where, names)

    monkeypatch.setattr("qlora.chat.image_examples.process", failing)
    with pytest.raises(UsageError, match=rf"^{data} line 1: the model's processor \(Refusing\) cannot take 1 "
                                         r"image\(s\) with this text \(IndexError: index 3 is out of bounds\)"):
        _trainer(models["llava"], data, tmp_path / "run")


@pytest.mark.parametrize("kind, how", [("fuyu", "embeds image patches with a linear layer of its decoder"),
                                       ("chameleon", "turns images into tokens of its vocabulary with a VQ-VAE"),
                                       ("emu3", "turns images into tokens of its vocabulary with a VQ-VAE")])
def test_models_that_see_images_without_a_vision_tower_are_refused_saying_how(kind, how):
    """Fuyu (patches through a decoder linear layer) and Chameleon and Emu3 (VQ image tokens) take images without a
    vision tower: the refusal says how they see them, not that they cannot (their default configs, on the meta
    device: nothing is allocated)."""
    from transformers import AutoConfig

    from qlora.model.image_processor import load_image_processor

    extra = {} if kind == "fuyu" else {"vocabulary_map": {"<image>": 7}}
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(kind, **extra))
    with pytest.raises(UsageError, match=rf"^row 1: images are not supported for {kind} models: \w+ {how}"):
        load_image_processor("folder", model, None, "row 1")
