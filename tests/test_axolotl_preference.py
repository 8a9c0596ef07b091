"""axolotl's preference datasets (``rl: dpo|ipo|orpo|simpo|kto``): each prompt strategy, on a file in its column
layout, gives the prompt, chosen and rejected (or completion) that axolotl's strategy builds; the strings below
are written out from axolotl's src/axolotl/prompt_strategies/{dpo,kto,orpo}."""

from __future__ import annotations

import json

import pytest

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.train.config import load_config
from qlora.train.data.preference import normalize_preferences
from qlora.train.data.selection import read_sources
from qlora.train.data.unpaired import normalize_unpaired

# Each family's markup as axolotl's strategies write it: system turn, user turn up to the answer, answer's end.
_MARKUP = {
    "chatml": ("<|im_start|>system\n{}<|im_end|>\n", "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
               "<|im_end|>"),
    "llama3": ("<|start_header_id|>system<|end_header_id|>\n\n{}<|eot_id|>",
               "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
               "\n\n", "<|eot_id|>"),
}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(tmp_path, entry: dict, rows: list[dict], method: str = "dpo") -> list[tuple]:
    path = _write(tmp_path / "prefs.jsonl", rows)
    spec = json.dumps([{"path": str(path), **entry}])
    if method == "kto":
        return [(e.prompt, e.completion, e.desirable)
                for e in read_sources(spec, "train", None, 0, normalize_unpaired, method="kto")]
    return [(e.prompt, e.chosen, e.rejected) for e in read_sources(spec, "train", None, 0, normalize_preferences,
                                                                   method=method)]


def _turn(family: str, prompt: str, system: str = "") -> str:
    head, user, _ = _MARKUP[family]
    return (head.format(system) if system else "") + user.format(prompt)


@pytest.mark.parametrize("family", ["chatml", "llama3"])
@pytest.mark.parametrize("kind, rows", [
    ("intel", [{"system": "Be kind.", "question": "Q1?", "chosen": "Yes.", "rejected": "No."},
               {"system": "", "question": "Q2?", "chosen": "Up.", "rejected": "Down."}]),
    ("icr", [{"system": "Be kind.", "input": "Q1?", "chosen": "Yes.", "rejected": "No."},
             {"input": "Q2?", "chosen": "Up.", "rejected": "Down."}]),
    ("prompt_pairs", [{"system": "Be kind.", "prompt": "Q1?", "chosen": "Yes.", "rejected": "No."},
                      {"system": None, "prompt": "Q2?", "chosen": "Up.", "rejected": "Down."}]),
    # default: the prompt from prompt, input, question or instruction; answers chosen or chosen_response
    ("default", [{"system": "Be kind.", "question": "Q1?", "chosen": "Yes.", "rejected": "No."},
                 {"instruction": "Q2?", "chosen_response": "Up.", "rejected_response": "Down."}]),
    ("", [{"system": "Be kind.", "input": "Q1?", "chosen": "Yes.", "rejected": "No."},
          {"prompt": "Q2?", "instruction": "not this", "chosen": "Up.", "rejected": "Down."}]),
    # argilla (axolotl's name for default before it was renamed): argilla/ultrafeedback-binarized-preferences
    ("argilla", [{"system": "Be kind.", "instruction": "Q1?", "chosen_response": "Yes.", "rejected_response": "No."},
                 {"instruction": "Q2?", "chosen_response": "Up.", "rejected_response": "Down."}]),
    # ultra: the answers are the second message of each conversation
    ("ultra", [{"system": "Be kind.", "prompt": "Q1?", "chosen": [{"role": "user", "content": "Q1?"},
                                                                   {"role": "assistant", "content": "Yes."}],
                "rejected": [{"role": "user", "content": "Q1?"}, {"role": "assistant", "content": "No."}]},
               {"prompt": "Q2?", "chosen": [{"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "Up."}],
                "rejected": [{"role": "user", "content": "Q2?"}, {"role": "assistant", "content": "Down."}]}]),
])
def test_dpo_markup_strategies_build_axolotls_strings(tmp_path, family, kind, rows):
    end = _MARKUP[family][2]
    got = _read(tmp_path, {"type": f"{family}.{kind}" if kind else family}, rows)
    assert got == [(_turn(family, "Q1?", "Be kind."), "Yes." + end, "No." + end),
                   (_turn(family, "Q2?"), "Up." + end, "Down." + end)]


@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_dpo_argilla_chat_takes_the_conversations_first_two_messages(tmp_path, family):
    """argilla/dpo-mix-7k: the user message of ``chosen`` is the prompt (no system turn), the second the answer."""
    end = _MARKUP[family][2]
    row = {"system": "ignored", "chosen": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
           "rejected": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Go."}]}
    assert _read(tmp_path, {"type": f"{family}.argilla_chat"}, [row]) == [
        (_turn(family, "Hi?"), "Hello." + end, "Go." + end)]


def _m(role, content):
    return {"role": role, "content": content}


def test_chat_template_default_gives_message_rows(tmp_path):
    """The prompt conversation and each answer (a string, a message, or a conversation's last message), their keys
    and roles mapped; the run's chat template renders them, as axolotl renders them with its chat_template."""
    rows = [{"messages": [_m("system", "Be terse."), _m("user", "Hi?")], "chosen": _m("assistant", "Hello."),
             "rejected": "Go."},
            {"messages": "Bye?", "chosen": [_m("user", "Bye?"), _m("assistant", "Bye.")], "rejected": "No."}]
    expected = [((_m("system", "Be terse."), _m("user", "Hi?")), (_m("assistant", "Hello."),),
                 (_m("assistant", "Go."),)),
                ((_m("user", "Bye?"),), (_m("assistant", "Bye."),), (_m("assistant", "No."),))]
    assert _read(tmp_path, {"type": "chat_template.default"}, rows) == expected
    assert _read(tmp_path, {"type": "chat_template"}, rows) == expected  # chat_template: its default strategy
    speakers = {"system": "sys", "user": "human", "assistant": "gpt"}

    def theirs(m):
        return {"from": speakers[m["role"]], "value": m["content"]}
    mapped = [{"conversation": [theirs(m) for m in rows[0]["messages"]], "good": theirs(rows[0]["chosen"]),
               "bad": theirs(_m("assistant", "Go."))}]
    entry = {"type": "chat_template.default", "field_messages": "conversation", "field_chosen": "good",
             "field_rejected": "bad", "message_property_mappings": {"role": "from", "content": "value"},
             "roles": {"system": ["sys"], "user": ["human"], "assistant": ["gpt"]}}
    assert _read(tmp_path, entry, mapped) == expected[:1]
    entry["roles"] = {"user": ["human"], "assistant": ["gpt"]}
    with pytest.raises(UsageError, match=r"prefs.jsonl line 1 .*role 'sys' is not mapped"):
        _read(tmp_path, entry, mapped)
    # argilla_chat: the prompt is the chosen conversation but its last message
    argilla = [{"chosen": [_m("user", "Hi?"), _m("assistant", "Hello.")], "rejected": [_m("user", "Hi?"),
                                                                                     _m("assistant", "Go.")]}]
    assert _read(tmp_path, {"type": "chat_template.argilla_chat"}, argilla) == [
        ((_m("user", "Hi?"),), (_m("assistant", "Hello."),), (_m("assistant", "Go."),))]


def test_orpo_chat_template_argilla(tmp_path):
    """ORPO's strategy: system, then the chosen conversation's turns (each user message the row's prompt when it
    has one) but the last answer; the answers are the last messages."""
    chosen = [_m("user", "A?"), _m("assistant", "a."), _m("user", "B?"), _m("assistant", "b.")]
    rows = [{"system": "S.", "chosen": chosen, "rejected": chosen[:3] + [_m("assistant", "x.")]},
            {"prompt": "P?", "chosen": chosen, "rejected": chosen[:3] + [_m("assistant", "x.")]}]
    assert _read(tmp_path, {"type": "chat_template.argilla"}, rows, method="orpo") == [
        ((_m("system", "S."), _m("user", "A?"), _m("assistant", "a."), _m("user", "B?")), (_m("assistant", "b."),),
         (_m("assistant", "x."),)),
        ((_m("user", "P?"), _m("assistant", "a."), _m("user", "P?")), (_m("assistant", "b."),),
         (_m("assistant", "x."),))]


def test_user_defined_dpo_type(tmp_path):
    rows = [{"q": "Q1?", "sys": "S.", "good": "Yes.", "bad": "No."}, {"q": "Q2?", "good": "Up.", "bad": "Down."}]
    fmt = {"field_prompt": "q", "field_system": "sys", "field_chosen": "good", "field_rejected": "bad",
           "prompt_format": "[SYS]{system}[/SYS] {prompt} ->", "chosen_format": " {chosen}</s>",
           "rejected_format": " {rejected}</s>"}
    assert _read(tmp_path, {"type": fmt}, rows) == [("[SYS]S.[/SYS] Q1? ->", " Yes.</s>", " No.</s>"),
                                                    ("[SYS][/SYS] Q2? ->", " Up.</s>", " Down.</s>")]
    # axolotl's defaults: prompt, chosen, rejected columns, formats "{prompt}", "{chosen}", "{rejected}"
    plain = [{"prompt": "Q1?", "system": "S.", "chosen": " Yes.", "rejected": " No."}]
    assert _read(tmp_path, {"type": {}}, plain) == [("Q1?", " Yes.", " No.")]
    with pytest.raises(UsageError, match=r"chosen_format '\{answer\}' names a field it does not have"):
        _read(tmp_path, {"type": {"chosen_format": "{answer}"}}, plain)
    with pytest.raises(UsageError, match=r"field_completion: axolotl's user-defined DPO type reads"):
        _read(tmp_path, {"type": {"field_completion": "c"}}, plain)


@pytest.mark.parametrize("family", ["chatml", "llama3"])
@pytest.mark.parametrize("kind, column", [("argilla", "instruction"), ("intel", "question"),
                                          ("prompt_pairs", "prompt"), ("ultra", "prompt")])
def test_kto_markup_strategies(tmp_path, family, kind, column):
    end = _MARKUP[family][2]
    rows = [{"system": "Be kind.", column: "Q1?", "completion": "Yes.", "label": True},
            {column: "Q2?", "completion": "Down.", "label": False}]
    assert _read(tmp_path, {"type": f"{family}.{kind}"}, rows, method="kto") == [
        (_turn(family, "Q1?", "Be kind."), "Yes." + end, True), (_turn(family, "Q2?"), "Down." + end, False)]


@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_kto_argilla_chat(tmp_path, family):
    """argilla/kto-mix-15k: the completion conversation's first message is the prompt, its second the answer."""
    row = {"completion": [_m("user", "Hi?"), _m("assistant", "Hello.")], "label": True}
    assert _read(tmp_path, {"type": f"{family}.argilla_chat"}, [row], method="kto") == [
        (_turn(family, "Hi?"), "Hello." + _MARKUP[family][2], True)]


def test_user_defined_kto_type(tmp_path):
    rows = [{"q": "Q1?", "s": "S.", "a": "Yes.", "ok": True}, {"q": "Q2?", "a": "No.", "ok": False}]
    fmt = {"field_prompt": "q", "field_system": "s", "field_completion": "a", "field_label": "ok",
           "prompt_format": "<{system}> {prompt}", "completion_format": " {completion}."}
    assert _read(tmp_path, {"type": fmt}, rows, method="kto") == [("<S.> Q1?", " Yes..", True),
                                                                  ("<> Q2?", " No..", False)]


def test_strategies_axolotl_lacks_for_the_method_are_refused_by_name(tmp_path):
    row = [{"prompt": "Q?", "chosen": "a", "rejected": "b"}]
    with pytest.raises(UsageError, match=r"type 'zephyr.nectar': not one of axolotl's DPO/ORPO strategies"):
        _read(tmp_path, {"type": "zephyr.nectar"}, row)
    with pytest.raises(UsageError, match=r"type 'chatml.default': not one of axolotl's KTO strategies.*chatml.argilla"):
        _read(tmp_path, {"type": "chatml.default"}, row, method="kto")
    with pytest.raises(UsageError, match=r"type 'chatml.intel' is one of axolotl's preference strategies.*Set rl"):
        _read(tmp_path, {"type": "chatml.intel"}, row, method="sft")
    with pytest.raises(UsageError, match=r"type 'alpaca': not one of axolotl's DPO/ORPO strategies"):
        _read(tmp_path, {"type": "alpaca"}, row)
    with pytest.raises(UsageError, match=r"prefs.jsonl line 1 \(.*\): column 'question' must be a string"):
        _read(tmp_path, {"type": "chatml.intel"}, row)
    # passthrough, or no type: the rows are already prompt/chosen/rejected
    assert _read(tmp_path, {"type": "passthrough"}, row) == _read(tmp_path, {}, row) == [("Q?", "a", "b")]


_DPO_CONFIG = """base_model: {model}
load_in_8bit: false
load_in_4bit: true
adapter: qlora
rl: dpo
rl_beta: 0.1
chat_template: chatml
datasets:
  - path: {data}
    split: train
    type: chatml.intel
dataset_prepared_path: last_run_prepared
val_set_size: 0.0
output_dir: {output}
sequence_len: 64
lora_r: 8
lora_alpha: 16
lora_dropout: 0.0
lora_target_linear: true
gradient_accumulation_steps: 1
micro_batch_size: 3
max_steps: 8
optimizer: adamw_torch
lr_scheduler: constant
learning_rate: 0.01
logging_steps: 1
"""
_INTEL = [{"system": "You are helpful.", "question": q, "chosen": c, "rejected": r} for q, c, r in [
    ("What is two plus two?", "four", "five"), ("Say hello.", "Hello there!", "Go away."),
    ("Name a red fruit.", "An apple is red.", "A banana."), ("What colour is the sky?", "Blue.", "Green."),
    ("Count to three.", "one two three", "three two one"), ("What is a fox?", "A quick animal.", "A car.")]]


def test_an_axolotl_dpo_config_trains_from_the_cli(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "intel.jsonl", _INTEL)
    config = tmp_path / "dpo.yml"
    config.write_text(_DPO_CONFIG.format(model=tiny_model_dir, data="./intel.jsonl", output="./out"))
    cfg = load_config(config, {})
    assert (cfg.method, cfg.beta, cfg.template) == ("dpo", 0.1, "chatml")
    assert main(["train", str(config), "--no-progress"]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 8 and losses[0] == pytest.approx(0.6931472, abs=1e-5)  # step 1: policy == reference
    assert losses[-1] < losses[0] - 0.05, losses
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    # the same file without rl: its type is refused by line, before any model is loaded
    config.write_text(_DPO_CONFIG.format(model=tiny_model_dir, data="./intel.jsonl", output="./out2").replace(
        "rl: dpo\n", ""))
    capsys.readouterr()
    assert main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{config} line 7, datasets item 1: type 'chatml.intel' is one of axolotl's preference" in err, err
    assert "Traceback" not in err and not (tmp_path / "out2").exists()


def test_kto_config_types_are_checked_with_its_rl(tmp_path):
    text = ("base_model: m\nadapter: qlora\nload_in_4bit: true\nrl: kto\nmicro_batch_size: 2\noutput_dir: o\n"
            "datasets:\n  - path: d.jsonl\n    type: {type}\n")
    cfg = load_config(_write_text(tmp_path / "kto.yml", text.format(type="llama3.ultra")), {})
    assert cfg.method == "kto" and json.loads(cfg.data)[0]["type"] == "llama3.ultra"
    with pytest.raises(UsageError, match=r"kto.yml line 7, datasets item 1: type 'chat_template.default': not one "
                                         r"of axolotl's KTO strategies"):
        load_config(_write_text(tmp_path / "kto.yml", text.format(type="chat_template.default")), {})


def _write_text(path, text):
    path.write_text(text)
    return path


def test_an_axolotl_kto_config_trains_from_the_cli(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"instruction": r["question"], "completion": answer, "label": label}
            for r in _INTEL for answer, label in ((r["chosen"], True), (r["rejected"], False))]
    _write(tmp_path / "kto.jsonl", rows)
    config = tmp_path / "kto.yml"
    config.write_text(_DPO_CONFIG.format(model=tiny_model_dir, data="./kto.jsonl", output="./out").replace(
        "rl: dpo", "rl: kto").replace("type: chatml.intel", "type: chatml.argilla").replace(
        "micro_batch_size: 3", "micro_batch_size: 4"))
    assert load_config(config, {}).method == "kto"
    assert main(["train", str(config), "--no-progress"]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
