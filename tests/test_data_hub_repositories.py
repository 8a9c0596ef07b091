"""Downloaded hub dataset repositories given as --data: the folder layout the hub serves (``data/<split>-00000-of-
00001.parquet``, a README's ``configs``, one JSON file a subset) and the exact columns and types of popular
fine-tuning sets, read as their authors and TRL read them. HuggingFaceH4/ultrachat_200k (splits ``train_sft`` ...,
``prompt`` and ``prompt_id`` beside ``messages``), teknium/OpenHermes-2.5 (one JSON list, ShareGPT turns with a null
``weight``, many null columns), Open-Orca/SlimOrca (``weight`` 0.0 and 1.0), NousResearch/hermes-function-calling-v1
(a subset a JSON file, ``tool`` turns)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.model.chat_format import ChatFormat
from qlora.train.data import IGNORE_INDEX, load_records, normalize, tokenize_example

from chat_families import family_tokenizer
from trained_runs import trained_runs

datasets = pytest.importorskip("datasets")


TURNS = [{"content": "What is 2+2?", "role": "user"}, {"content": "It is 4.", "role": "assistant"},
         {"content": "And 3+3?", "role": "user"}, {"content": "It is 6.", "role": "assistant"}]


def _trained(tok, tokenized) -> list[str]:
    return [tok.decode(run) for run in trained_runs(tokenized.input_ids, tokenized.labels)]


def _hub_folder(root: Path, splits: dict[str, list[dict]]) -> Path:
    """The hub's layout: a parquet shard a split under data/, the README's YAML naming each split's files."""
    (root / "data").mkdir(parents=True)
    yaml = ["configs:", "- config_name: default", "  data_files:"]
    for split, rows in splits.items():
        datasets.Dataset.from_list(rows).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
        yaml += [f"  - split: {split}", f"    path: data/{split}-*"]
    (root / "README.md").write_text("---\n" + "\n".join(yaml) + "\n---\n# A dataset card\n")
    return root


def _ultrachat(i: int) -> dict:
    return {"prompt": TURNS[0]["content"], "prompt_id": f"{i:064x}", "messages": TURNS}


@pytest.mark.parametrize("train_on", ["all", "assistant"])
def test_ultrachat_splits_tokenize_as_trl(tmp_path, train_on):
    """Its ``messages`` are the conversation; ``prompt`` (the first user turn again) and ``prompt_id`` are left out,
    as the alignment handbook drops every other column before TRL's SFTTrainer (which, given the ``prompt`` column,
    would read the rows as prompt-completion data and fail for want of a completion)."""
    from trl_sft import trl_sft

    folder = _hub_folder(tmp_path / "ultrachat_200k", {s: [_ultrachat(i)] for i, s in enumerate(
        ["train_sft", "test_sft", "train_gen", "test_gen"])})
    with pytest.raises(UsageError, match="no split 'train'; it has train_sft, test_sft, train_gen, test_gen"):
        load_records(folder)
    tok = family_tokenizer("qwen2.5")
    records = load_records(folder, "test_sft")
    assert [r.fields["prompt_id"] for r in records] == [f"{1:064x}"]
    ours = tokenize_example(normalize(records)[0], tok, ChatFormat(tok.chat_template), train_on)
    messages = datasets.load_dataset(str(folder), split="test_sft").select_columns(["messages"])
    (theirs,) = trl_sft(tok, messages)
    assert ours.input_ids == theirs["input_ids"]
    if train_on == "all":  # TRL trains a conversation whole unless its template marks the assistant's turns
        assert ours.labels[1:] == theirs["labels"][1:]
    else:
        assert _trained(tok, ours) == ["It is 4.<|im_end|>", "It is 6.<|im_end|>"]


def test_openhermes_json_list_with_null_weights_and_columns(tmp_path, qwen_tokenizer):
    """OpenHermes-2.5 is one JSON list (openhermes2_5.json), every turn with ``"weight": null`` and most of the
    15 other columns null: a null weight is no weight (the answer is trained); SlimOrca's 0.0 on a human turn and
    1.0 on the answer read the same way, and a 0.0 on an answer keeps it untrained in the context."""
    nulls = dict.fromkeys(["custom_instruction", "topic", "model_name", "model", "views", "language", "id", "title",
                           "idx", "hash", "avatarUrl", "system_prompt"])
    rows = [{**nulls, "skip_prompt_formatting": False, "category": "orca", "source": "airoboros2.2",
             "conversations": [{"from": "system", "value": "You are an AI assistant.", "weight": None},
                               {"from": "human", "value": "What is 2+2?", "weight": None},
                               {"from": "gpt", "value": "It is 4.", "weight": None}]},
            {**nulls, "skip_prompt_formatting": None, "category": None, "source": "slimorca",
             "conversations": [{"from": "human", "value": "Hi", "weight": 0.0},
                               {"from": "gpt", "value": "Hello!", "weight": 0.0},
                               {"from": "human", "value": "Bye", "weight": 0.0},
                               {"from": "gpt", "value": "See you.", "weight": 1.0}]}]
    path = tmp_path / "openhermes2_5.json"
    path.write_text(json.dumps(rows, indent=4))
    first, second = (tokenize_example(e, qwen_tokenizer, ChatFormat(qwen_tokenizer.chat_template))
                     for e in normalize(load_records(path)))
    assert _trained(qwen_tokenizer, first) == ["It is 4.<|im_end|>"]
    assert qwen_tokenizer.decode(first.input_ids).startswith("<|im_start|>system\nYou are an AI assistant.<|im_end|>")
    assert _trained(qwen_tokenizer, second) == ["See you.<|im_end|>"]
    assert "Hello!<|im_end|>" in qwen_tokenizer.decode(second.input_ids)


def _hermes_function_calling(root: Path) -> Path:
    """hermes-function-calling-v1: each subset one JSON file, the README's configs naming them, none the default."""
    row = {"id": "85f6c398", "category": "Weather", "subcategory": "Current", "task": "Get the weather",
           "conversations": [
               {"from": "system", "value": "You are a function calling AI model. <tools> [{'type': 'function', "
                                           "'function': {'name': 'get_weather'}}] </tools>"},
               {"from": "human", "value": "Weather in Paris?"},
               {"from": "gpt", "value": "<tool_call>\n{'arguments': {'city': 'Paris'}, 'name': 'get_weather'}\n"
                                        "</tool_call>"},
               {"from": "tool", "value": '<tool_response>\n{"name": "get_weather", "content": {"temp": 21}}\n'
                                         "</tool_response>"},
               {"from": "gpt", "value": "It is 21 degrees in Paris."}]}
    root.mkdir()
    for name in ("func-calling-singleturn", "func-calling", "json-mode-agentic"):
        (root / f"{name}.json").write_text(json.dumps([row]))
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: func_calling_singleturn\n  data_files: func-calling-singleturn.json\n"
        "- config_name: func_calling\n  data_files: func-calling.json\n- config_name: json_mode_agentic\n"
        "  data_files: json-mode-agentic.json\n---\n")
    return root


def test_a_repository_of_several_subsets_names_them_and_the_option(tmp_path, tiny_model_dir, capsys):
    """Without --data-subset, datasets' refusal ran over four lines and showed a Python load_dataset call."""
    folder = _hermes_function_calling(tmp_path / "hermes-function-calling-v1")
    with pytest.raises(UsageError) as error:
        load_records(folder)
    assert str(error.value) == (f"{folder}: the dataset has several subsets (configurations) and no default: "
                                "func_calling_singleturn, func_calling, json_mode_agentic. Choose one with "
                                "--data-subset (e.g. --data-subset func_calling_singleturn).")
    with pytest.raises(UsageError, match=r"BuilderConfig 'json' not found\. Available: \['func_calling_singleturn', "
                                         r"'func_calling', 'json_mode_agentic'\] \(--data-subset\)$"):
        load_records(folder, subset="json")
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(folder), "--output", str(tmp_path / "run"),
                 "--max-steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    error = err[err.index("qlora train: error:"):]
    assert "Choose one with --data-subset" in error and "load_dataset(" not in error and error.count("\n") == 1

    example = normalize(load_records(folder, subset="func_calling"))[0]
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant", "tool", "assistant"]
    tok = family_tokenizer("qwen2.5")
    tokenized = tokenize_example(example, tok, ChatFormat(tok.chat_template))
    trained = tok.decode([t for t in tokenized.labels if t != IGNORE_INDEX])
    assert trained == ("<tool_call>\n{'arguments': {'city': 'Paris'}, 'name': 'get_weather'}\n</tool_call><|im_end|>"
                       "It is 21 degrees in Paris.<|im_end|>")


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_an_eval_split_not_there_names_the_eval_split_option(tmp_path, tiny_model_dir, capsys, method):
    """--eval-data of a repository without a ``test`` split (ultrachat_200k's test_sft, ultrafeedback_binarized's
    test_prefs): the refusal named --data-split, which chooses the training split and leaves the eval one as it was."""
    if method == "sft":
        folder = _hub_folder(tmp_path / "ultrachat_200k", {s: [_ultrachat(i)] for i, s in enumerate(
            ["train_sft", "test_sft"])})
        train_split, eval_split = "train_sft", "test_sft"
    else:
        pair = {"prompt": TURNS[0]["content"], "prompt_id": "0" * 64, "chosen": TURNS[:2], "messages": TURNS[:2],
                "rejected": [TURNS[0], {"content": "It is 5.", "role": "assistant"}], "score_chosen": 8.0,
                "score_rejected": 2.0}
        folder = _hub_folder(tmp_path / "ultrafeedback_binarized", {s: [pair] for s in ["train_prefs", "test_prefs"]})
        train_split, eval_split = "train_prefs", "test_prefs"
    args = ["train", "--method", method, "--model", str(tiny_model_dir), "--data", str(folder), "--data-split",
            train_split, "--eval-data", str(folder), "--output", str(tmp_path / "run"), "--max-steps", "1",
            "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{folder}: no split 'test'; it has {train_split}, {eval_split}. Choose one with --eval-data-split." in err
    assert main(args + ["--eval-data-split", eval_split]) == 0
    assert "eval loss" in capsys.readouterr().out


def _subsets_folder(root: Path, rows) -> Path:
    """A repository of two subsets, ``en`` and ``fr``, each its own test split; ``rows(lang)`` their rows."""
    root.mkdir()
    yaml = ["configs:"]
    for lang in ("en", "fr"):
        (root / f"{lang}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(lang)))
        yaml += [f"- config_name: {lang}", "  data_files:", "  - split: test", f"    path: {lang}.jsonl"]
    (root / "README.md").write_text("---\n" + "\n".join(yaml) + "\n---\n")
    return root


@pytest.mark.parametrize("method", ["sft", "dpo", "kto"])
def test_eval_data_of_several_subsets_is_read_by_its_own_subset_option(tmp_path, tiny_model_dir, capsys, method):
    """--eval-data of several subsets beside --data that has none (a data file): --eval-data-subset picks the eval
    subset (there was no option; --data-subset was refused for the file), named as --data-subset is where it is
    missing, wrong or asked of a file; without it, --eval-data reads --data-subset's, as TRL's dataset_config."""
    from qlora.train.config import load_config
    from qlora.train.trainer import Trainer

    def rows(lang):
        if method == "sft":
            return [{"instruction": f"{lang} q{i}", "output": f"{lang} a{i}"} for i in range(2)]
        if method == "dpo":
            return [{"prompt": f"{lang} q{i}", "chosen": f"{lang} a{i}", "rejected": "no"} for i in range(2)]
        return [{"prompt": f"{lang} q{i}", "completion": f"{lang} a{i}", "label": i == 0} for i in range(2)]

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows("xx")))
    folder = _subsets_folder(tmp_path / "multi", rows)
    args = ["train", "--method", method, "--model", str(tiny_model_dir), "--data", str(train), "--eval-data",
            str(folder), "--batch-size", "2", "--output", str(tmp_path / "run"), "--max-steps", "1", "--no-progress"]
    assert main(args) == 2
    assert ("several subsets (configurations) and no default: en, fr. Choose one with --eval-data-subset (e.g. "
            "--eval-data-subset en).") in capsys.readouterr().err
    assert main(args + ["--eval-data-subset", "de"]) == 2
    assert f"{folder}: BuilderConfig 'de' not found. Available: ['en', 'fr'] (--eval-data-subset)" in (
        capsys.readouterr().err)
    assert main(args[:-5] + ["--eval-data", str(train), "--eval-data-subset", "fr", "--output",
                             str(tmp_path / "run"), "--max-steps", "1"]) == 2
    assert f"--eval-data-subset fr: {train} is a data file" in capsys.readouterr().err
    cfg = dict(method=method, model=str(tiny_model_dir), data=str(train), eval_data=str(folder), output="o",
               max_steps=1, batch_size=2)
    trainer = Trainer(load_config(None, {**cfg, "eval_data_subset": "fr"}))
    trainer.sample_rng = None
    examples = trainer._read_data(str(folder), "test", "--eval-data-split")
    assert len(examples) == 2 and all("fr q" in repr(e) and "en q" not in repr(e) for e in examples)
    trainer = Trainer(load_config(None, {**cfg, "data_subset": "en"}))  # --data-subset's, when not given
    trainer.sample_rng = None
    assert all("en q" in repr(e) for e in trainer._read_data(str(folder), "test", "--eval-data-split"))
    assert main(args + ["--eval-data-subset", "fr"]) == 0
    assert "eval loss" in capsys.readouterr().out
