"""LLaMA-Factory's stage pt blocks (``--group-texts``), token for token against its algorithm.

The reference is LLaMA-Factory's ``PretrainDatasetProcessor.preprocess_dataset`` (src/llamafactory/data/
processor/pretrain.py, packing branch) written out here as it reads, run the way its loader runs it:
through ``datasets.Dataset.map(batched=True, batch_size=preprocessing_batch_size, num_proc=...)``, and
labelled by transformers' ``DataCollatorForLanguageModeling(mlm=False)``, its stage pt collator, with the
pad token LLaMA-Factory sets (EOS where the tokenizer has none). LLaMA-Factory itself is not installable here.
"""

from __future__ import annotations

import copy
import re
from itertools import chain

import pytest

from qlora.chat.example import Example
from qlora.errors import UsageError
from qlora.model.tiny import train_sentencepiece_tokenizer, train_tokenizer
from qlora.train.config import TrainConfig, load_config
from qlora.train.data.text_blocks import group_bounds, text_blocks
from qlora.train.data.torchtune_tokenizers import text_pieces

_WORDS = "the cat sat on a mat while dogs ran over green hills and birds sang in tall trees".split()
_TEXTS = [" ".join(_WORDS[(3 * i) % len(_WORDS):][: 1 + (5 * i) % 9] or _WORDS[:2]) for i in range(23)]


@pytest.fixture(scope="module")
def llama_tokenizer():
    """SentencePiece Llama-style: adds BOS (``add_bos_token``), has no pad token."""
    tok = train_sentencepiece_tokenizer([" ".join(_WORDS)] * 20, vocab_size=80)
    assert tok.add_bos_token and tok.pad_token is None
    return tok


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """Byte-level BPE, Qwen-style: no BOS flag, its own pad token."""
    tok = train_tokenizer([" ".join(_WORDS)] * 20, vocab_size=300, add_bos=False)
    assert not getattr(tok, "add_bos_token", False) and tok.pad_token == "<|pad|>"
    return tok


def _lf_blocks(tokenizer, texts, cutoff_len, batch_size=1000, num_proc=None, eos_token=None):
    """LLaMA-Factory's stage pt with packing, as its loader and collator run it."""
    import datasets
    from transformers import DataCollatorForLanguageModeling

    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token_id is None:  # its template.fix_special_tokens
        tokenizer.pad_token = tokenizer.eos_token
    eos_token = eos_token or tokenizer.eos_token

    def preprocess(examples):
        text_examples = [text + eos_token for text in examples["text"]]
        tokenized = tokenizer(text_examples, add_special_tokens=False)
        concatenated = {k: list(chain(*tokenized[k])) for k in tokenized.keys()}
        total_length = len(concatenated["input_ids"])
        total_length = (total_length // cutoff_len) * cutoff_len
        result = {k: [t[i:i + cutoff_len] for i in range(0, total_length, cutoff_len)] for k, t in concatenated.items()}
        if getattr(tokenizer, "add_bos_token", False):
            for i in range(len(result["input_ids"])):
                result["input_ids"][i][0] = tokenizer.bos_token_id
        return result

    dataset = datasets.Dataset.from_dict({"text": list(texts)}).map(
        preprocess, batched=True, batch_size=batch_size, num_proc=num_proc, remove_columns=["text"],
        load_from_cache_file=False)
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
    rows = [collator([row]) for row in dataset]
    return [(r["input_ids"][0].tolist(), r["labels"][0].tolist()) for r in rows]


def _examples(texts):
    return [Example(None, t, f"data.jsonl line {i + 1}") for i, t in enumerate(texts)]


def _ours(tokenizer, texts, block, group=1000, shards=1, template="auto"):
    blocks, report = text_blocks(_examples(texts), tokenizer, block, group, shards, template)
    return [(b.input_ids, b.labels) for b in blocks], report


@pytest.mark.parametrize("block, group", [(7, 1000), (5, 4), (11, 3), (16, 23)])
def test_blocks_are_llama_factorys_with_a_bos_tokenizer_and_eos_as_pad(llama_tokenizer, block, group):
    """BOS replaces each block's first token; the EOS between texts is the pad token, so it gets no loss."""
    ours, report = _ours(llama_tokenizer, _TEXTS, block, group)
    assert ours == _lf_blocks(llama_tokenizer, _TEXTS, block, batch_size=group)
    eos, bos = llama_tokenizer.eos_token_id, llama_tokenizer.bos_token_id
    assert all(ids[0] == bos for ids, _ in ours) and len(ours) == report.blocks > 1
    assert any(eos in ids for ids, _ in ours) and all(label == -100 for ids, labels in ours
                                                      for t, label in zip(ids, labels) if t == eos)
    assert report.tokens - report.dropped == block * report.blocks


def test_blocks_are_llama_factorys_without_bos_and_with_a_pad_token(bpe_tokenizer):
    """No BOS flag: blocks are the stream cut as is; EOS is trained, a literal pad token in a text is not."""
    texts = _TEXTS[:10] + ["the cat<|pad|> sat"] + _TEXTS[10:]
    ours, _ = _ours(bpe_tokenizer, texts, 6, 5)
    assert ours == _lf_blocks(bpe_tokenizer, texts, 6, batch_size=5)
    stream = list(chain(*bpe_tokenizer([t + "<|eos|>" for t in texts[:5]], add_special_tokens=False)["input_ids"]))
    assert ours[0][0] == stream[:6] and ours[1][0] == stream[6:12]  # the first group, cut as it is
    eos, pad = bpe_tokenizer.eos_token_id, bpe_tokenizer.pad_token_id
    assert any(eos in labels for _, labels in ours) and any(pad in ids for ids, _ in ours)
    assert not any(pad in labels for _, labels in ours)


def test_worker_parts_are_grouped_separately_as_datasets_shards_them(bpe_tokenizer):
    """preprocessing_num_workers: datasets splits the rows into contiguous parts, each mapped in its own batches."""
    assert group_bounds(10, 2, 3) == [(0, 2), (2, 4), (4, 6), (6, 7), (7, 9), (9, 10)]  # parts 0-4, 4-7, 7-10
    assert group_bounds(2, 4, 5) == [(0, 1), (1, 2)]  # no more parts than rows
    ours, _ = _ours(bpe_tokenizer, _TEXTS, 4, 3, shards=3)
    assert ours == _lf_blocks(bpe_tokenizer, _TEXTS, 4, batch_size=3, num_proc=3)
    assert ours != _ours(bpe_tokenizer, _TEXTS, 4, 3)[0]


def test_chatml_ends_texts_with_im_end_and_refuses_a_tokenizer_without_it(bpe_tokenizer, llama_tokenizer):
    """LLaMA-Factory's chatml template replaces the EOS by <|im_end|>, which stage pt then appends."""
    ours, _ = _ours(bpe_tokenizer, _TEXTS, 9, template="chatml")
    assert ours == _lf_blocks(bpe_tokenizer, _TEXTS, 9, eos_token="<|im_end|>")
    im_end = bpe_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert any(im_end in labels for _, labels in ours)  # the tokenizer's own pad stays the pad
    with pytest.raises(UsageError, match=re.escape("--template llama-3 with --group-texts ends texts with "
                                                   "<|end_of_text|> and pads with <|eot_id|>")):
        _ours(bpe_tokenizer, _TEXTS, 9, template="llama-3")
    with pytest.raises(UsageError, match="this tokenizer has no <|im_end|> token"):
        _ours(llama_tokenizer, _TEXTS, 9, template="chatml")


def test_rows_that_are_not_plain_texts_and_too_little_text_are_refused(bpe_tokenizer):
    with pytest.raises(UsageError, match=r"data.jsonl line 2: --group-texts trains on plain texts, and this row is a "
                                         r"conversation row"):
        text_blocks(_examples(["a"]) + [Example(({"role": "user", "content": "hi"},), None, "data.jsonl line 2")],
                    bpe_tokenizer, 4, 1000)
    text = Example(None, None, "data.jsonl line 3", pieces=text_pieces("llama3_tokenizer", "a cat", add_eos=True))
    with pytest.raises(UsageError, match=r"data.jsonl line 3: --group-texts trains on plain texts, and this row is a "
                                         r"torchtune dataset's row written piece by piece") as error:
        text_blocks(_examples(["a"]) + [text], bpe_tokenizer, 4, 1000)
    assert "conversation" not in str(error.value)
    with pytest.raises(UsageError, match=r"the 2 texts of the data make no block of --seq-len 500 tokens \(\d+ tokens "
                                         r"with their EOS, \d+ in the longest group\); lower --seq-len"):
        _ours(bpe_tokenizer, _TEXTS[:2], 500)


_LF_PT = """\
model_name_or_path: m
stage: pt
do_train: true
finetuning_type: lora
dataset: c4_demo
cutoff_len: 64
max_samples: 1000
preprocessing_num_workers: 16
output_dir: o
"""


def _load(tmp_path, text, overrides=None):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return load_config(path, overrides or {})


def test_a_llama_factory_pt_file_trains_on_its_blocks(tmp_path):
    """Stage pt packs by default, in groups of preprocessing_batch_size (1000) per worker part; an explicit
    packing: true makes LLaMA-Factory lower cutoff_len by one first; packing: false trains each text alone."""
    cfg = _load(tmp_path, _LF_PT)
    assert (cfg.method, cfg.format, cfg.group_texts, cfg.group_shards, cfg.seq_len, cfg.packing) == (
        "sft", "text", 1000, 16, 64, False)
    cfg = _load(tmp_path, _LF_PT + "packing: true\npreprocessing_batch_size: 50\n")
    assert (cfg.group_texts, cfg.seq_len, cfg.packing) == (50, 63, False)
    cfg = _load(tmp_path, _LF_PT.replace("preprocessing_num_workers: 16\n", "") + "packing: false\n")
    assert (cfg.group_texts, cfg.group_shards, cfg.seq_len, cfg.packing) == (0, 1, 64, False)
    assert _load(tmp_path, _LF_PT.replace("cutoff_len: 64\n", "")).seq_len == 2048  # LLaMA-Factory's default


@pytest.mark.parametrize("text, message", [
    (_LF_PT + "neat_packing: true\n", "run.yaml line 10: neat_packing with stage pt; LLaMA-Factory refuses it"),
    (_LF_PT + "preprocessing_batch_size: 0\n", "run.yaml line 10: preprocessing_batch_size must be a positive"),
    (_LF_PT + "packing: maybe\n", "run.yaml line 10: packing must be true or false, got 'maybe'"),
])
def test_llama_factory_pt_settings_it_refuses_are_refused_by_line(tmp_path, text, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        _load(tmp_path, text)


@pytest.mark.parametrize("options, message", [
    ({"group_texts": 100, "packing": True}, "--group-texts and --packing both lay several texts in a row"),
    ({"group_shards": 4}, "--group-shards 4 splits the texts that --group-texts groups"),
    ({"group_texts": 100, "method": "dpo"}, "--group-texts applies to --method sft"),
])
def test_group_texts_combinations_are_checked(options, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        TrainConfig(model="m", data="d", output="o", **options).validate()


def test_a_llama_factory_pt_run_trains_on_blocks(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """LLaMA-Factory's pre-training example shape end to end: a c4_demo-style registered dataset, stage pt."""
    import json

    from qlora.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"c4_demo": {"file_name": "c4.jsonl",
                                                                                 "columns": {"prompt": "text"}}}))
    (tmp_path / "data" / "c4.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in _TEXTS))
    (tmp_path / "run.yaml").write_text(_LF_PT.replace("model_name_or_path: m", f"model_name_or_path: {tiny_model_dir}")
                                       .replace("cutoff_len: 64", "cutoff_len: 8") + "max_steps: 1\n"
                                       "per_device_train_batch_size: 2\n")
    assert main(["train", "run.yaml", "--no-progress"]) == 0
    out = capsys.readouterr().out
    blocks = re.search(r"data: 23 texts, (\d+) tokens with their EOS, cut into (\d+) blocks of 8 tokens \((\d+) left "
                       r"over at the ends of groups, not trained\); \2 blocks", out)
    assert blocks and int(blocks[1]) == 8 * int(blocks[2]) + int(blocks[3]) and int(blocks[3]) < 8 * 16


def test_a_batch_larger_than_the_blocks_is_refused(tiny_model_dir, tmp_path, capsys):
    from qlora.cli.main import main

    (tmp_path / "texts.jsonl").write_text("".join('{"text": "%s"}\n' % t for t in _TEXTS))
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(tmp_path / "texts.jsonl"), "--output",
                 str(tmp_path / "out"), "--group-texts", "1000", "--seq-len", "64", "--batch-size", "8",
                 "--max-steps", "1", "--no-progress"]) == 2
    assert re.search(r"--batch-size 8 is more than the \d blocks of --seq-len 64 tokens", capsys.readouterr().err)
