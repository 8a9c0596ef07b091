"""Public vision SFT datasets as they are stored: each replica keeps the real columns and value types (from the
datasets' cards and viewers: LLaVA's JSON lists, parquet Image cells of ``{"bytes", "path"}``, nullable images,
answer lists) and trains on a tiny LLaVA.

Oracle: transformers' processor on the conversation as TRL's vision collator gives it (contents as parts, an
image part where the row puts its image) gives the ids; the trained spans are the assistant answers, each through
its end of turn.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoProcessor

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.train.config import load_config
from qlora.train.trainer import Trainer
from image_models import build_image_model, write_png

IMAGE_CELL = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature in parquet


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return build_image_model(tmp_path_factory.mktemp("llava") / "llava", "llava")


def _cell(tmp_path, seed, width=40, height=30):
    return {"bytes": write_png(tmp_path / f"cell{seed}.png", width, height, seed).read_bytes(), "path": None}


def _setup(model, data, out, **kw):
    cfg = dict(model=str(model), data=str(data), output=str(out), max_steps=1, batch_size=1, progress=False,
               seq_len=1024, quant="none", precision="fp32", **kw)
    trainer = Trainer(load_config(None, cfg))
    trainer.setup()
    return trainer


def _check(model, trainer, conversations):
    """Each unit against the processor: ``conversations`` are (messages as parts, PIL images, answers)."""
    processor = AutoProcessor.from_pretrained(model)
    tok = processor.tokenizer
    assert len(trainer.train_units) == len(conversations)
    for unit, (messages, images, answers) in zip(trainer.train_units, conversations):
        text = processor.apply_chat_template(messages, tokenize=False)
        ids = processor(text=[text], images=images or None, add_special_tokens=False)["input_ids"][0]
        assert unit.input_ids == list(ids)
        assert (unit.media is not None and "pixel_values" in unit.media) == bool(images)
        spans, run = [], []
        for token, label in zip(unit.input_ids, unit.labels):
            if label != -100:
                run.append(token)
            elif run:
                spans, run = spans + [tok.decode(run).strip()], []
        spans += [tok.decode(run).strip()] if run else []
        assert spans == [a + tok.eos_token for a in answers]


def _user(*parts):
    return {"role": "user", "content": [{"type": "image"} if p is None else {"type": "text", "text": p}
                                        for p in parts]}


def _assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def _png(path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def test_llava_instruct_json_with_text_only_rows(llava, tmp_path, capsys):
    """liuhaotian/LLaVA-Instruct-150K (llava_v1_5_mix665k.json): one JSON list, an "image" file name and
    "<image>\\n" in the first human turn; its ShareGPT text rows have no "image" (LLaVA-Pretrain and ShareGPT4V:
    "\\n<image>" after the text). The text rows trained on nothing the template renders (LLaVA's template reads
    only content parts) and were refused; they train as text beside the rows with images, in one batch too."""
    (tmp_path / "coco").mkdir()
    a = write_png(tmp_path / "coco" / "000000033471.jpg", 40, 30, 0)
    b = write_png(tmp_path / "coco" / "000000052846.jpg", 60, 50, 1)
    rows = [{"id": "000000033471", "image": "coco/000000033471.jpg", "conversations": [
                {"from": "human", "value": "<image>\nWhat colors is the bus?"}, {"from": "gpt", "value": "White and red."},
                {"from": "human", "value": "What is on its back?"}, {"from": "gpt", "value": "An advertisement."}]},
            {"id": "i6IyJda_0", "model": "", "conversations": [
                {"from": "human", "value": "How to tell a segment is good?"}, {"from": "gpt", "value": "Check three things."}]},
            {"id": "004539375", "image": "coco/000000052846.jpg", "conversations": [
                {"from": "human", "value": "Summarize the photo.\n<image>"}, {"from": "gpt", "value": "A grey painting."}]}]
    data = tmp_path / "llava_v1_5_mix665k.json"
    data.write_text(json.dumps(rows))
    _check(llava, _setup(llava, data, tmp_path / "run"), [
        ([_user(None, "\nWhat colors is the bus?"), _assistant("White and red."), _user("What is on its back?"),
          _assistant("An advertisement.")], [_png(a)], ["White and red.", "An advertisement."]),
        ([_user("How to tell a segment is good?"), _assistant("Check three things.")], [], ["Check three things."]),
        ([_user("Summarize the photo.\n", None), _assistant("A grey painting.")], [_png(b)], ["A grey painting."])])
    assert main(["train", "--model", str(llava), "--data", str(data), "--output", str(tmp_path / "cli"), "--quant",
                 "none", "--max-steps", "1", "--batch-size", "3", "--no-progress"]) == 0, capsys.readouterr().err


def test_the_cauldron_texts_exchanges(llava, tmp_path):
    """HuggingFaceM4/the_cauldron (and FineVision): parquet, an "images" list of Image cells and a "texts" list of
    {"user", "assistant", "source"} exchanges, no placeholder: the images go before the first user text. It was
    refused ("cannot tell the data format from the fields ['images', 'texts']")."""
    exchange = pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())])
    cells = [[_cell(tmp_path, 2)], [_cell(tmp_path, 3, 60, 50), _cell(tmp_path, 4)]]
    table = pa.table({
        "images": pa.array(cells, pa.list_(IMAGE_CELL)),
        "texts": pa.array([[{"user": "What is shown?", "assistant": "A red square.", "source": "VQAv2"},
                            {"user": "What color?", "assistant": "Red.", "source": "VQAv2"}],
                           [{"user": "Compare the two images.", "assistant": "The first is larger.", "source": "NLVR2"}]],
                          pa.list_(exchange))})
    pq.write_table(table, tmp_path / "the_cauldron.parquet")
    pngs = [_png(tmp_path / f"cell{k}.png") for k in (2, 3, 4)]
    _check(llava, _setup(llava, tmp_path / "the_cauldron.parquet", tmp_path / "run"), [
        ([_user(None, "What is shown?"), _assistant("A red square."), _user("What color?"), _assistant("Red.")],
         pngs[:1], ["A red square.", "Red."]),
        ([_user(None, None, "Compare the two images."), _assistant("The first is larger.")], pngs[1:],
         ["The first is larger."])])


def test_llava_instruct_mix_vsft_parquet(llava, tmp_path):
    """HuggingFaceH4/llava-instruct-mix-vsft: parquet "messages" whose parts are one struct ({"index", "text",
    "type"}, the unused fields null) and an "images" list of Image cells, the bare image parts filled in order."""
    part = pa.struct([("index", pa.int64()), ("text", pa.string()), ("type", pa.string())])
    message = pa.struct([("content", pa.list_(part)), ("role", pa.string())])
    messages = [[{"content": [{"index": None, "text": "What is in the picture?\n", "type": "text"},
                              {"index": 0, "text": None, "type": "image"}], "role": "user"},
                 {"content": [{"index": None, "text": "A red square.", "type": "text"}], "role": "assistant"}]]
    pq.write_table(pa.table({"messages": pa.array(messages, pa.list_(message)),
                             "images": pa.array([[_cell(tmp_path, 5)]], pa.list_(IMAGE_CELL))}), tmp_path / "mix.parquet")
    _check(llava, _setup(llava, tmp_path / "mix.parquet", tmp_path / "run"), [
        ([_user("What is in the picture?\n", None), _assistant("A red square.")], [_png(tmp_path / "cell5.png")],
         ["A red square."])])


def test_chartqa_answer_lists(llava, tmp_path):
    """HuggingFaceM4/ChartQA: "image", "query", "label" (a list holding the answer); with
    --data-fields instruction=query,output=label a one-answer list trains its answer (it was refused: 'field
    "output" must be a string, got list'). DocVQA's "answers" with several spellings are refused by name."""
    table = pa.table({"image": pa.array([_cell(tmp_path, 7)], IMAGE_CELL), "query": ["How many bars?"],
                      "label": [["14"]], "human_or_machine": [0]})
    pq.write_table(table, tmp_path / "chartqa.parquet")
    trainer = _setup(llava, tmp_path / "chartqa.parquet", tmp_path / "run", data_fields="instruction=query,output=label")
    _check(llava, trainer, [([_user(None, "How many bars?"), _assistant("14")], [_png(tmp_path / "cell7.png")],
                             ["14"])])
    table = pa.table({"questionId": ["338"], "question": ["Who is the contact?"],
                      "image": pa.array([_cell(tmp_path, 8)], IMAGE_CELL), "answers": [["P. Carter", "p. carter"]]})
    pq.write_table(table, tmp_path / "docvqa.parquet")
    with pytest.raises(UsageError, match=r"docvqa\.parquet row 0: field \"output\" holds 2 texts \('P\. Carter', "
                                         r"'p\. carter'\); a row trains one\..*--data-fields output=COLUMN"):
        _setup(llava, tmp_path / "docvqa.parquet", tmp_path / "doc", data_fields="instruction=question,output=answers")


def test_scienceqa_null_image_is_a_text_only_row(llava, tmp_path):
    """derek-thomas/ScienceQA: "image" is null in its text-only questions; mapped with
    --data-fields instruction=question,output=solution, such a row trains as text beside the rows with images."""
    table = pa.table({"image": pa.array([_cell(tmp_path, 9), None], IMAGE_CELL),
                      "question": ["Which state is farthest north?", "Which word is on the page?"],
                      "choices": [["West Virginia", "Arizona"], ["badge", "bright"]], "answer": pa.array([0, 1], pa.int8()),
                      "hint": ["", "Guide words: bag - brave"], "solution": ["West Virginia.", "Badge."]})
    pq.write_table(table, tmp_path / "scienceqa.parquet")
    trainer = _setup(llava, tmp_path / "scienceqa.parquet", tmp_path / "run",
                     data_fields="instruction=question,output=solution")
    _check(llava, trainer, [
        ([_user(None, "Which state is farthest north?"), _assistant("West Virginia.")], [_png(tmp_path / "cell9.png")],
         ["West Virginia."]),
        ([_user("Which word is on the page?"), _assistant("Badge.")], [], ["Badge."])])


def test_image_to_text_rows_are_told_the_mapping(llava, tmp_path):
    """unsloth/LaTeX_OCR ("image", "text"): no request to answer; the refusal names the "image" column (it said
    "images") and the mapping that trains it."""
    pq.write_table(pa.table({"image": pa.array([_cell(tmp_path, 12)], IMAGE_CELL), "text": ["x ^ { 2 }"]}),
                   tmp_path / "latex.parquet")
    with pytest.raises(UsageError, match=r'latex\.parquet row 0: an "image" column beside a plain text .*'
                                         r"--data-fields instruction=THAT_COLUMN,output=TEXT_COLUMN"):
        _setup(llava, tmp_path / "latex.parquet", tmp_path / "run")
