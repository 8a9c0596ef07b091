"""LLaMA-Factory's dataset registry (``dataset_info.json``): registered names read as LLaMA-Factory builds
their rows, checked against the same conversations written directly in qlora's own formats."""

from __future__ import annotations

import json

import pytest

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.train.data import normalize
from qlora.train.data.preference import normalize_preferences
from qlora.train.data.selection import read_sources

_TOOLS = json.dumps([{"name": "add", "description": "add", "parameters": {"type": "object", "properties": {}}}])
_INFO = {
    "alpaca_demo": {"file_name": "alpaca.json"},
    "qa": {"file_name": "qa.jsonl", "columns": {"prompt": "question", "response": "answer", "system": "sys",
                                                "history": "past"}},
    "glaive": {"file_name": "glaive.json", "formatting": "sharegpt", "columns": {"messages": "conversations",
                                                                                 "tools": "tools"}},
    "chat": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                      "system_tag": "system"}},
    "dpo_sharegpt": {"file_name": "dpo.json", "ranking": True, "formatting": "sharegpt",
                     "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    "dpo_alpaca": {"file_name": "dpo_alpaca.json", "ranking": True,
                   "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}},
    "first_two": {"file_name": "alpaca.json", "num_samples": 2},
    "kto": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "ok"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                     "system_tag": "system"}},
    "hub": {"hf_hub_url": "org/some-dataset"},
    "modelscope": {"ms_hub_url": "org/some-dataset"},
    "clips": {"file_name": "alpaca.json", "columns": {"prompt": "instruction", "videos": "videos"}},
    "hub_folder": {"hf_hub_url": "org/some-dataset", "folder": "python"},
    "five": {"file_name": "alpaca.json", "num_samples": 5},
    "dpo_tools": {"file_name": "dpo.json", "ranking": True, "formatting": "sharegpt",
                  "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                              "tools": "tools"}},
}
_ALPACA = [{"instruction": "Add 2 and 3.", "input": "Show the sum.", "output": "5"},
           {"instruction": "Name a colour.", "input": "", "output": "Blue."},
           {"instruction": "Say hi.", "input": "", "output": "Hi!"}]
_QA = [{"question": "What is 4 plus 4?", "answer": "8", "sys": "Be brief.", "past": [["Hi", "Hello!"]]}]
_GLAIVE = [{"conversations": [
    {"from": "human", "value": "What is 2 plus 2?"},
    {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 2, "b": 2}})},
    {"from": "observation", "value": "4"},
    {"from": "gpt", "value": "It is 4."}], "tools": _TOOLS}]
_CHAT = [{"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello."}]}]
_DPO = [{"conversations": [{"from": "human", "value": "Pick a number."}],
         "chosen": {"from": "gpt", "value": "7"}, "rejected": {"from": "gpt", "value": "no"}}]
_DPO_ALPACA = [{"instruction": "Pick a number", "input": "between 1 and 9", "chosen": "7", "rejected": "no"}]


@pytest.fixture()
def registry(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "dataset_info.json").write_text(json.dumps(_INFO))
    for name, rows in (("alpaca.json", _ALPACA), ("glaive.json", _GLAIVE), ("dpo.json", _DPO),
                       ("dpo_alpaca.json", _DPO_ALPACA)):
        (folder / name).write_text(json.dumps(rows))
    for name, rows in (("qa.jsonl", _QA), ("chat.jsonl", _CHAT)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _sft(spec: str, folder) -> list:
    return read_sources(spec, "train", None, 0, lambda records: normalize(records), str(folder))


def _direct(rows: list[dict], tmp_path, fmt: str = "auto") -> list:
    path = tmp_path / f"direct-{len(list(tmp_path.iterdir()))}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return normalize(read_sources(str(path), "train", None, 0, lambda records: records), fmt)


def _messages(examples) -> list:
    return [(e.messages, e.tools) for e in examples]


def test_alpaca_entries_join_prompt_and_query_with_a_newline_after_the_history(registry, tmp_path):
    got = _sft("alpaca_demo,qa", registry)
    expected = _direct([
        {"messages": [{"role": "user", "content": "Add 2 and 3.\nShow the sum."}, {"role": "assistant", "content": "5"}]},
        {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 4 plus 4?"},
                      {"role": "assistant", "content": "8"}]},
    ], tmp_path)
    assert _messages(got) == _messages(expected)
    assert "(alpaca_demo)" in got[0].where and "(qa)" in got[3].where
    assert len(_sft("first_two", registry)) == 2


def test_sharegpt_entries_map_speakers_by_their_tags(registry, tmp_path):
    got = _sft("glaive,chat", registry)
    expected = _direct(_GLAIVE, tmp_path) + _direct([{"messages": _CHAT[0]["messages"]}], tmp_path)
    assert _messages(got) == _messages(expected)
    assert got[0].messages[1]["tool_calls"][0]["function"]["name"] == "add" and got[0].tools
    assert got[1].messages[0] == {"role": "system", "content": "You are terse."}


def test_ranking_entries_are_preference_pairs(registry, tmp_path):
    got = read_sources("dpo_sharegpt,dpo_alpaca", "train", None, 0, normalize_preferences, str(registry))
    assert [(e.prompt, e.chosen, e.rejected) for e in got] == [
        (({"role": "user", "content": "Pick a number."},), ({"role": "assistant", "content": "7"},),
         ({"role": "assistant", "content": "no"},)),
        (({"role": "user", "content": "Pick a number\nbetween 1 and 9"},), ({"role": "assistant", "content": "7"},),
         ({"role": "assistant", "content": "no"},)),
    ]


def test_kto_entries_are_trl_unpaired_rows(registry):
    (registry / "chat.jsonl").write_text(json.dumps(_CHAT[0] | {"ok": False}) + "\n")
    rows = read_sources("kto", "train", None, 0, lambda records: records, str(registry))
    assert [r.fields for r in rows] == [{"prompt": [{"role": "system", "content": "You are terse."},
                                                    {"role": "user", "content": "Hi"}],
                                         "completion": [{"role": "assistant", "content": "Hello."}], "label": False}]
    from qlora.train.data.unpaired import normalize_unpaired

    (example,) = read_sources("kto", "train", None, 0, normalize_unpaired, str(registry))
    assert example.desirable is False


def test_entries_without_a_response_column_are_pretraining_texts(registry):
    """LLaMA-Factory's c4_demo / wiki_demo shape (``columns: {prompt: text}``): stage pt trains on each row's
    first prompt turn, the text itself."""
    info = json.loads((registry / "dataset_info.json").read_text())
    info |= {"web": {"file_name": "web.jsonl", "columns": {"prompt": "text"}},
             "wiki": {"file_name": "wiki.txt", "columns": {"prompt": "text"}},
             "dialogue": {"file_name": "qa.jsonl", "columns": {"prompt": "question", "history": "past"}}}
    (registry / "dataset_info.json").write_text(json.dumps(info))
    (registry / "web.jsonl").write_text(json.dumps({"text": "First page."}) + "\n" + json.dumps({"text": "Two."}) + "\n")
    (registry / "wiki.txt").write_text("Anarchism is a philosophy.\nIt is old.\n\nAutism is a condition.\n")  # a row a line
    got = read_sources("web,wiki,dialogue", "train", None, 0, lambda records: normalize(records, "text"),
                       str(registry))
    assert [(e.text, e.messages) for e in got] == [("First page.", None), ("Two.", None),
                                                    ("Anarchism is a philosophy.", None), ("It is old.", None),
                                                    ("Autism is a condition.", None), ("Hi", None)]


@pytest.mark.parametrize("spec,message", [
    ("alpaca_dmeo", r"neither a file nor a dataset registered in .*dataset_info.json; did you mean alpaca_demo"),
    ("modelscope", r"ms_hub_url is a source qlora does not read"),
    ("clips", r"videos columns: qlora trains on text and images, not video"),
    ("hub_folder", r"folder 'python': qlora reads a hub dataset's whole split"),
])
def test_unusable_entries_are_named(registry, spec, message):
    with pytest.raises(UsageError, match=message):
        _sft(spec, registry)


def test_num_samples_beyond_the_rows_repeats_them(registry):
    """LLaMA-Factory's num_samples above the row count up-samples: every row once, then drawn again
    (with qlora's default seed 42: the permutation 0 1 2, then rows 0 and 2)."""
    got = [e.messages[0]["content"] for e in _sft("five", registry)]
    assert got == ["Add 2 and 3.\nShow the sum.", "Name a colour.", "Say hi.", "Add 2 and 3.\nShow the sum.",
                   "Say hi."]


def _lf_num_samples(seed: int, declared: list[tuple[int, int]]) -> list[list[int]]:
    """LLaMA-Factory's loader (src/llamafactory/data/loader.py, _load_single_dataset), for each dataset in turn
    after transformers.set_seed(seed) seeded numpy's global generator."""
    import numpy as np

    np.random.seed(seed)
    picked = []
    for rows, target_num in declared:
        indexes = np.random.permutation(rows)[:target_num]
        target_num -= len(indexes)
        if target_num > 0:
            indexes = np.concatenate((indexes, np.random.choice(rows, target_num)), axis=0)
        picked.append(indexes.tolist())
    return picked


def test_num_samples_are_drawn_as_llama_factory_draws_them_with_the_run_seed(registry):
    """Each dataset's draw continues the same seeded generator, in the order of --data; the same seed reads the
    same rows (a rerun, a --resume), another seed others."""
    import numpy as np

    info = json.loads((registry / "dataset_info.json").read_text())
    info |= {"four": {"file_name": "ten.jsonl", "columns": {"prompt": "text"}, "num_samples": 4},
             "thirteen": {"file_name": "ten.jsonl", "columns": {"prompt": "text"}, "num_samples": 13}}
    (registry / "dataset_info.json").write_text(json.dumps(info))
    (registry / "ten.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(10)))

    def rows(seed):
        got = read_sources("four,thirteen", "train", None, 0, lambda records: normalize(records, "text"),
                           str(registry), np.random.RandomState(seed))
        return [int(e.text.split()[1]) for e in got]

    assert rows(3) == [5, 4, 1, 2] + [3, 8, 2, 1, 9, 4, 0, 6, 7, 5, 1, 6, 2]  # numpy 1.x/2.x's MT19937 stream
    assert rows(3) == [i for picked in _lf_num_samples(3, [(10, 4), (10, 13)]) for i in picked]
    assert rows(11) == [i for picked in _lf_num_samples(11, [(10, 4), (10, 13)]) for i in picked] != rows(3)
    got = read_sources("four", "train", None, 2, lambda records: normalize(records, "text"), str(registry),
                       np.random.RandomState(3))
    assert [e.text for e in got] == ["row 5", "row 4"]  # max_samples then keeps the first of the drawn rows


def test_preference_rows_keep_their_tools_and_kto_rows_with_another_label_are_refused(registry):
    """A ranking entry's tools column goes to the chat template with its pair, as TRL's DPOTrainer renders a row's
    tools (it was refused when preference training rendered none)."""
    (registry / "dpo.json").write_text(json.dumps([_DPO[0] | {"tools": _TOOLS}]))
    (pair,) = read_sources("dpo_tools", "train", None, 0, normalize_preferences, str(registry))
    assert pair.tools == tuple(json.loads(_TOOLS))
    (registry / "chat.jsonl").write_text(json.dumps(_CHAT[0] | {"ok": "false"}) + "\n")
    with pytest.raises(UsageError, match=r"chat.jsonl line 1 \(kto\): the kto_tag column 'ok' holds 'false'"):
        read_sources("kto", "train", None, 0, lambda records: records, str(registry))


def test_a_remote_registry_is_refused(registry):
    with pytest.raises(UsageError, match=r"--dataset-dir REMOTE:llamafactory/demo_data: LLaMA-Factory's registry on"):
        read_sources("alpaca_demo", "train", None, 0, lambda records: normalize(records), "REMOTE:llamafactory/demo_data")


def test_malformed_rows_are_named_instead_of_skipped(registry):
    (registry / "glaive.json").write_text(json.dumps([{"conversations": [{"from": "gpt", "value": "x"}],
                                                       "tools": _TOOLS}]))
    with pytest.raises(UsageError, match=r"glaive.json item 0 \(glaive\), message 0: speaker 'gpt' where 'human' or "
                                         "'observation' must come"):
        _sft("glaive", registry)


def test_hub_ids_and_files_are_not_looked_up(registry, tmp_path):
    from qlora.train.data.dataset_info import registered_dataset

    assert registered_dataset("org/other", registry) is None  # a hub id the file does not register
    assert registered_dataset("hub", registry).source == "org/some-dataset"
    assert registered_dataset(str(registry / "alpaca.json"), registry) is None
    assert registered_dataset("org/name", tmp_path / "elsewhere") is None  # a hub id: no registry needed
    with pytest.raises(UsageError, match="--dataset-dir .*elsewhere holds no dataset_info.json"):
        registered_dataset("alpaca_demo", tmp_path / "elsewhere")  # a plain name with a registry folder that has none


def test_a_llama_factory_run_trains_on_registered_names(registry, tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # dataset_dir defaults to ./data, as in LLaMA-Factory
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {tiny_model_dir}\nstage: sft\nfinetuning_type: lora\nlora_target: all\n"
                      "dataset: alpaca_demo,chat\neval_dataset: qa\ncutoff_len: 64\noutput_dir: out\nmax_steps: 2\n"
                      "per_device_train_batch_size: 2\nlearning_rate: 1.0e-3\n")
    assert main(["train", str(config), "--no-progress"]) == 0
    assert "data: 4 examples" in capsys.readouterr().out
    config.write_text(config.read_text().replace("output_dir: out", "output_dir: out2") + "dataset_dir: nowhere\n")
    assert main(["train", str(config), "--no-progress"]) == 2
    assert "alpaca_demo" in capsys.readouterr().err


_OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"}
_CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 2}"}}
_OPENAI = [
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}]},
    {"messages": [{"role": "user", "content": "What is 2 plus 2, and 2 plus 3?"},
                  {"role": "assistant", "content": None, "tool_calls": [_CALL, _CALL]},
                  {"role": "tool", "content": "4", "tool_call_id": "c1"}, {"role": "tool", "content": "5"},
                  {"role": "assistant", "content": "4 and 5."}], "tools": json.loads(_TOOLS)},
    {"messages": [{"role": "user", "content": "Think."}, {"role": "assistant", "content": "Done."}],
     "system": "Reason. detailed thinking on"},
]


def test_openai_entries_are_read_as_llama_factorys_openai_converter_reads_them(registry, tmp_path):
    """LLaMA-Factory's formatting openai (src/llamafactory/data/converter.py, OpenAIDatasetConverter): tool_calls
    become one function turn (the JSON list of the calls' "function" objects), consecutive tool results one
    observation, and the system prompt its "detailed thinking off" convention."""
    info = json.loads((registry / "dataset_info.json").read_text())
    info["oai"] = {"file_name": "oai.jsonl", "formatting": "openai", "tags": _OPENAI_TAGS,
                   "columns": {"messages": "messages", "system": "system", "tools": "tools"}}
    (registry / "dataset_info.json").write_text(json.dumps(info))
    (registry / "oai.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _OPENAI))
    functions = json.dumps([_CALL["function"], _CALL["function"]])
    expected = _direct([
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}],
         "system": "You are terse.\ndetailed thinking off"},
        {"conversations": [{"from": "human", "value": "What is 2 plus 2, and 2 plus 3?"},
                           {"from": "function_call", "value": functions},
                           {"from": "observation", "value": "4\n</tool_response>\n<tool_response>\n5"},
                           {"from": "gpt", "value": "4 and 5."}], "tools": _TOOLS},  # tools: no system added
        {"conversations": [{"from": "human", "value": "Think."}, {"from": "gpt", "value": "Done."}],
         "system": "Reason. detailed thinking on"},
    ], tmp_path)
    got = _sft("oai", registry)
    assert _messages(got) == _messages(expected)
    assert got[1].messages[1]["tool_calls"][1]["function"] == {"name": "add", "arguments": {"a": 2, "b": 2}}
    assert got[1].messages[2] == {"role": "tool", "content": "4\n</tool_response>\n<tool_response>\n5"}
    assert got[1].messages[0]["role"] == "user" and got[1].tools == tuple(json.loads(_TOOLS))

    # without a system column or message and without tools: LLaMA-Factory's system prompt is the switch alone
    (registry / "oai.jsonl").write_text(json.dumps({"messages": _OPENAI[2]["messages"], "system": None,
                                                    "tools": ""}) + "\n")
    assert _sft("oai", registry)[0].messages[0] == {"role": "system", "content": "detailed thinking off"}
    # a row LLaMA-Factory would skip is an error naming it
    (registry / "oai.jsonl").write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}], "system": "",
                                                    "tools": ""}) + "\n")
    with pytest.raises(UsageError, match=r"oai.jsonl line 1 \(oai\), message 0: speaker 'assistant' where 'user' or "
                                         r"'tool' must come"):
        _sft("oai", registry)


def test_an_unknown_formatting_is_refused_with_llama_factorys_formats(registry):
    info = json.loads((registry / "dataset_info.json").read_text()) | {"x": {"file_name": "a.json",
                                                                            "formatting": "chatml"}}
    (registry / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(UsageError, match=r"dataset_info.json, dataset 'x': formatting 'chatml'; LLaMA-Factory's "
                                         r"formats are alpaca, sharegpt and openai\."):
        _sft("x", registry)


def test_the_registry_folder_given_as_data_says_to_name_its_datasets(registry, tiny_model_dir, tmp_path, capsys):
    """The folder of dataset_info.json given as --data would be read as a folder of data files, every dataset of
    it mixed (then refused as mixed formats): it is refused as the registry it is, with its names and the options
    that read them; a save_to_disk folder, whose dataset_info.json is datasets' own, is still one dataset."""
    with pytest.raises(UsageError) as info:
        _sft(str(registry), tmp_path / "elsewhere")
    message = str(info.value)
    assert f"--data {registry}: this folder is a LLaMA-Factory dataset folder" in message
    assert f"--dataset-dir {registry} --data alpaca_demo" in message and f"({len(_INFO)} in all)" in message
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(registry), "--output", str(out),
                 "--max-steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "LLaMA-Factory dataset folder" in err and "Traceback" not in err and not out.exists()
    from datasets import Dataset

    saved = tmp_path / "saved"
    Dataset.from_list(_ALPACA).save_to_disk(str(saved))
    assert (saved / "dataset_info.json").is_file()
    assert len(_sft(str(saved), tmp_path / "elsewhere")) == 3


@pytest.mark.parametrize("column, value", [("videos", ["clips/a.mp4"]), ("audios", ["talk.wav"]),
                                           ("video", "clips/a.mp4")])
def test_rows_with_videos_or_audios_are_refused_naming_the_row(column, value, tmp_path):
    """LLaMA-Factory's video and audio rows (mllm_video_demo.json: a "videos" column, "<video>" in the text) and
    LLaVA-Video's ("video" beside the conversation): trained without their media, their answers would be about
    clips the model never saw; each reader (SFT, DPO, KTO) names the row and the column. An empty column is no
    media. (A registered entry reads only the columns its mapping names, as LLaMA-Factory does, and refuses a
    mapped "videos": test_unusable_entries_are_named.)"""
    from qlora.train.data.unpaired import normalize_unpaired

    refusal = rf'line 2: a "{column}" column; qlora trains on text and images, not video or audio'
    rows = [{"instruction": "Say hi.", "output": "Hi!", column: []},
            {"instruction": "<video>What happens?", "output": "A cat runs.", column: value}]
    with pytest.raises(UsageError, match=refusal):
        _direct(rows, tmp_path)
    sharegpt = [{"conversations": [{"from": "human", "value": "<video>What happens?"},
                                   {"from": "gpt", "value": "A cat runs."}], column: v} for v in ("", value)]
    with pytest.raises(UsageError, match=refusal):
        _direct(sharegpt, tmp_path)
    pairs = [{"prompt": "<video>What happens?", "chosen": "A cat runs.", "rejected": "Nothing.", column: v}
             for v in (None, value)]
    with pytest.raises(UsageError, match=refusal):
        normalize_preferences(read_sources(str(_jsonl(tmp_path / "dpo.jsonl", pairs)), "train", None, 0,
                                           lambda r: r))
    kto = [{"prompt": [{"role": "user", "content": "<video>What happens?"}],
            "completion": [{"role": "assistant", "content": "A cat runs."}], "label": True, column: v}
           for v in ([], value)]
    with pytest.raises(UsageError, match=refusal):
        normalize_unpaired(read_sources(str(_jsonl(tmp_path / "kto.jsonl", kto)), "train", None, 0, lambda r: r))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
