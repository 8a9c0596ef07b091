"""Preference and KTO rows under other column names (``--data-fields``) and with a ``system`` column.

Popular DPO sets name their prompt otherwise (Intel/orca_dpo_pairs: ``system``, ``question``,
``chosen``, ``rejected``) or carry a system prompt (jondurbin/truthy-dpo). The mapping renames
columns, message keys and roles as for SFT; a source with a system column is read as conversations,
the system prompt first, so the tokens are the chat template's rendering of it.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from transformers import AutoTokenizer

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.train.data import Record, resolve_chat_template
from qlora.train.data.preference import normalize_preferences, tokenize_pairs
from qlora.train.data.unpaired import normalize_unpaired

SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "What is 2+2?"}


def _records(*rows: dict) -> list[Record]:
    return [Record(r, f"d.jsonl line {i + 1}") for i, r in enumerate(rows)]


def test_a_system_column_makes_the_source_conversational_with_the_system_prompt_first():
    rows = _records({"system": "You are terse.", "question": "What is 2+2?", "chosen": "4", "rejected": "5"},
                    {"system": "", "question": "What is 3+3?", "chosen": "6", "rejected": "7"})
    first, second = normalize_preferences(rows, "prompt=question")
    assert first.prompt == (SYSTEM, USER)
    assert first.chosen == ({"role": "assistant", "content": "4"},)
    assert first.rejected == ({"role": "assistant", "content": "5"},)
    # an empty system prompt adds no message, but the row is rendered as a conversation like its source
    assert second.prompt == ({"role": "user", "content": "What is 3+3?"},) and second.conversational


def test_without_a_system_column_string_pairs_stay_plain_text_as_in_trl():
    (pair,) = normalize_preferences(_records({"question": "2+2?", "chosen": " 4", "rejected": " 5"}),
                                    "prompt=question")
    assert (pair.prompt, pair.chosen, pair.rejected) == ("2+2?", " 4", " 5") and not pair.conversational


def test_a_prompt_holding_its_own_system_message_keeps_it():
    own = {"role": "system", "content": "Answer in French."}
    (pair,) = normalize_preferences(_records({"system": "You are terse.", "prompt": [own, USER], "chosen": "4",
                                              "rejected": "5"}))
    assert pair.prompt == (own, USER)


def test_implicit_conversation_prompts_get_the_system_message():
    chosen = [USER, {"role": "assistant", "content": "4"}]
    rejected = [USER, {"role": "assistant", "content": "5"}]
    (pair,) = normalize_preferences(_records({"system": "You are terse.", "chosen": chosen, "rejected": rejected}))
    assert pair.prompt == (SYSTEM, USER) and pair.chosen == (chosen[1],)


def test_message_keys_and_roles_inside_pairs_are_mapped():
    row = {"prompt": [{"speaker": "human", "text": "What is 2+2?"}], "better": [{"speaker": "bot", "text": "4"}],
           "worse": [{"speaker": "bot", "text": "5"}]}
    (pair,) = normalize_preferences(_records(row), "chosen=better,rejected=worse,role=speaker,content=text,"
                                                   "assistant=bot")
    assert pair.prompt == (USER,) and pair.chosen == ({"role": "assistant", "content": "4"},)


def test_a_prompt_under_another_name_is_named_in_the_error():
    with pytest.raises(UsageError, match=r"d\.jsonl line 1: .*If 'question' is the prompt, map it with "
                                         r"--data-fields prompt=question\."):
        normalize_preferences(_records({"question": "What?", "chosen": "4", "rejected": "5"}))
    with pytest.raises(UsageError, match=r'"system" column.*--data-fields prompt=question'):
        normalize_preferences(_records({"system": "s", "question": "What?", "chosen": "4", "rejected": "5"}))
    with pytest.raises(UsageError, match=r'field "system" must be a string'):
        normalize_preferences(_records({"system": ["s"], "prompt": "What?", "chosen": "4", "rejected": "5"}))
    with pytest.raises(UsageError, match=r"--data-fields maps prompt=question, but this row has no field"):
        normalize_preferences(_records({"prompt": "What?", "chosen": "4", "rejected": "5"}), "prompt=question")


def test_kto_rows_are_mapped_and_take_the_system_column():
    rows = _records({"system": "You are terse.", "query": "What is 2+2?", "answer": "4", "good": True},
                    {"system": "You are terse.", "query": "What is 2+2?", "answer": "5", "good": False})
    good, bad = normalize_unpaired(rows, {"prompt": "query", "completion": "answer", "label": "good"})
    assert good.prompt == (SYSTEM, USER) and good.completion == ({"role": "assistant", "content": "4"},)
    assert good.desirable and not bad.desirable
    pairs = normalize_unpaired(_records({"system": "You are terse.", "question": "What is 2+2?", "chosen": "4",
                                         "rejected": "5"}), "prompt=question")
    assert [(e.prompt, e.desirable) for e in pairs] == [((SYSTEM, USER), True), ((SYSTEM, USER), False)]
    with pytest.raises(UsageError, match=r"If 'query' is the prompt, map it with --data-fields prompt=query"):
        normalize_unpaired(_records({"query": "q", "completion": "c", "label": True}))


def test_the_system_prompt_is_rendered_by_the_chat_template(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    (pair,) = normalize_preferences(_records({"system": "You are terse.", "question": "What is 2+2?",
                                              "chosen": "4", "rejected": "5"}), "prompt=question")
    (tokens,), _ = tokenize_pairs([pair], tok, resolve_chat_template(tok, "auto"), seq_len=128)
    expected = tok.apply_chat_template([SYSTEM, USER], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"]
    assert tokens.prompt_ids == list(expected)
    assert "You are terse." in tok.decode(tokens.prompt_ids)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_cli_trains_an_orca_style_file_with_a_mapping(tmp_path, tiny_model_dir, method, capsys):
    data = tmp_path / "orca.jsonl"
    rows = [{"system": "You are terse.", "question": f"What is {i}+{i}?", "chosen": str(2 * i),
             "rejected": str(2 * i + 1)} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--method", method,
            "--max-steps", "2", "--batch-size", "2", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--data-fields prompt=question" in err and "Traceback" not in err and not out.exists()
    assert main(argv + ["--data-fields", "prompt=question"]) == 0
    assert (out / "adapter_model.safetensors").exists()
    assert "data_fields: prompt=question" in (out / "config.yaml").read_text()


def _csv(path, header: list[str], *rows: list) -> list[Record]:
    import csv

    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    from qlora.train.data import load_records

    return load_records(path)


def test_csv_cells_holding_message_lists_are_conversations_as_in_sft(tmp_path):
    """A CSV has no list cells: a conversation is written there as JSON text, which SFT reads as messages; a pair's
    and a KTO row's cells are read so too, not trained as the JSON text itself."""
    prompt, chosen, rejected = [USER], [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]
    records = _csv(tmp_path / "pairs.csv", ["prompt", "chosen", "rejected"],
                   [json.dumps(prompt), json.dumps(chosen), json.dumps(rejected)])
    (pair,) = normalize_preferences(records)
    listed = normalize_preferences(_records({"prompt": prompt, "chosen": chosen, "rejected": rejected}))[0]
    assert replace(pair, where=listed.where) == listed and pair.chosen == tuple(chosen)
    records = _csv(tmp_path / "kto.csv", ["prompt", "completion", "label"],
                   [json.dumps(prompt), json.dumps(chosen), "true"])
    (kto,) = normalize_unpaired(records)
    assert (kto.prompt, kto.completion, kto.desirable) == (tuple(prompt), tuple(chosen), True)


@pytest.mark.parametrize("method", ["sft", "dpo", "kto"])
def test_message_lists_written_as_python_text_are_refused_naming_the_cell(tmp_path, method):
    """pandas' and datasets' to_csv write a list column as Python text (single quotes, numpy's line breaks): not
    JSON, so the conversation cannot be read back, and read as text it would teach the model to write dicts."""
    from datasets import Dataset

    from qlora.train.data import load_records, normalize

    rows = {"sft": {"messages": [USER, {"role": "assistant", "content": "4"}]},
            "dpo": {"prompt": [USER], "chosen": [{"role": "assistant", "content": "4"}],
                    "rejected": [{"role": "assistant", "content": "5"}]},
            "kto": {"prompt": [USER], "completion": [{"role": "assistant", "content": "4"}], "label": True}}[method]
    path = tmp_path / "data.csv"
    Dataset.from_list([rows]).to_csv(str(path), index=False)
    read = {"sft": normalize, "dpo": normalize_preferences, "kto": normalize_unpaired}[method]
    field = "messages" if method == "sft" else "prompt"
    with pytest.raises(UsageError, match=rf'data\.csv line 2: field "{field}" holds a message list written as Python '
                                         r"text .*to_csv.*Dataset\.to_json"):
        read(load_records(path))
