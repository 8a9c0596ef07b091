"""A row's own ``chat_template_kwargs`` (SmolTalk2's ``{"enable_thinking": false}``): TRL's SFTTrainer,
DPOTrainer and KTOTrainer pass them to ``apply_chat_template`` for that row (the oracle), so qlora renders the
row with them too, in SFT, eval and preference prompts alike, and its mask stays the tokens the model writes."""

from __future__ import annotations

import json

import pytest

from qlora.errors import UsageError
from qlora.model.chat_format import ChatFormat, stop_token_ids
from qlora.train.data import IGNORE_INDEX, Record, normalize, tokenize_dataset, tokenize_example
from qlora.train.data.preference import normalize_preferences, tokenize_pair
from qlora.train.data.unpaired import normalize_unpaired, tokenize_unpaired

from chat_families import DATE, FAMILIES, U1, family_tokenizer
from trained_runs import trained_runs
from trl_sft import trl_sft

trl = pytest.importorskip("trl")

HELLO = [{"role": "user", "content": "Hello"}]
HI = [{"role": "assistant", "content": "Hi there!"}]
OFF = {"enable_thinking": False}


def _stops(tok, name: str) -> set[int]:
    return stop_token_ids(tok, [tok.convert_tokens_to_ids(t) for t in FAMILIES[name]["generation_eos"]])


def _ours(tok, row: dict, where: str = "d.jsonl line 1"):
    example = normalize([Record(row, where)])[0]
    return tokenize_example(example, tok, ChatFormat(tok.chat_template, date=DATE), stop_ids=_stops(tok, "qwen3"))


@pytest.mark.parametrize("kwargs", [OFF, {"enable_thinking": True}])
def test_prompt_completion_rows_render_with_their_kwargs_as_trl_sft(kwargs):
    """Qwen3 with enable_thinking off writes the empty think block in the generation prompt: the completion the
    model learns starts after it (TRL's completion mask), not at it."""
    tok = family_tokenizer("qwen3")
    row = {"prompt": HELLO, "completion": HI, "chat_template_kwargs": kwargs}
    (theirs,) = trl_sft(tok, [row])
    ours = _ours(tok, row)
    assert ours.input_ids == theirs["input_ids"]
    assert ours.labels == theirs["labels"]
    trained = tok.decode([t for t in ours.labels if t != IGNORE_INDEX])
    assert ("<think>" in trained) == kwargs["enable_thinking"]


def test_kwargs_as_a_json_string_cell_are_read_as_the_object():
    """A CSV (or parquet string) column holds the object as JSON text."""
    tok = family_tokenizer("qwen3")
    row = {"prompt": HELLO, "completion": HI, "chat_template_kwargs": OFF}
    (theirs,) = trl_sft(tok, [row])
    assert _ours(tok, {**row, "chat_template_kwargs": json.dumps(OFF)}).labels == theirs["labels"]


def test_a_conversation_in_non_thinking_mode_trains_exactly_the_answer():
    """A ``messages`` row: the ids are apply_chat_template's with the row's kwargs, and the trained tokens are the
    answer and its end, not the empty think block the generation prompt writes in non-thinking mode (the model is
    given it at inference); in thinking mode the model writes that block, so it is trained."""
    tok = family_tokenizer("qwen3")
    for kwargs, answer in ((OFF, "Hi there!<|im_end|>"), ({}, "<think>\n\n</think>\n\nHi there!<|im_end|>")):
        ours = _ours(tok, {"messages": HELLO + HI, "chat_template_kwargs": kwargs})
        expected = tok.apply_chat_template(HELLO + HI, tokenize=True, return_dict=True, **kwargs)["input_ids"]
        assert ours.input_ids == list(expected)
        assert [tok.decode(run) for run in trained_runs(ours.input_ids, ours.labels)] == [answer]


def test_dpo_and_kto_prompts_render_with_the_rows_kwargs():
    """TRL's DPOTrainer and KTOTrainer render a row's prompt with its kwargs: in non-thinking mode the prompt
    holds the empty think block, and each answer follows it."""
    tok = family_tokenizer("qwen3")
    fmt = ChatFormat(tok.chat_template, date=DATE)
    prompt = tok.apply_chat_template(HELLO, tokenize=True, return_dict=True, add_generation_prompt=True,
                                     enable_thinking=False)["input_ids"]
    pair = {"prompt": HELLO, "chosen": HI, "rejected": [{"role": "assistant", "content": "Go away."}],
            "chat_template_kwargs": OFF}
    full = tok.apply_chat_template(HELLO + HI, tokenize=True, return_dict=True, enable_thinking=False)["input_ids"]
    tokenized = tokenize_pair(normalize_preferences([Record(pair, "p.jsonl line 1")])[0], tok, fmt)
    kto = [tokenize_unpaired(normalize_unpaired([Record(row, "k.jsonl line 1")]), tok, fmt)[0][0]
           for row in ({"prompt": HELLO, "completion": HI, "label": True, "chat_template_kwargs": OFF}, pair)]
    for ids, answer in ((tokenized.prompt_ids, tokenized.chosen_ids), *((k.prompt_ids, k.completion_ids) for k in kto)):
        # the answer starts where prompt + answer stop agreeing with the prompt alone (a BPE merge across them)
        assert ids == list(prompt[:len(ids)]) and len(ids) >= len(prompt) - 1
        assert ids + answer == list(full)
        assert "</think>" in tok.decode(ids) and "<think>" not in tok.decode(answer)


def test_a_row_that_turns_thinking_off_is_not_rendered_in_thinking_mode():
    """Gemma 4 shows a final answer's reasoning only in thinking mode, which qlora turns on for such a row; a row
    whose kwargs turn it off is rendered off, as TRL renders it (its reasoning is dropped and counted), and that
    switch is the row's, not one to save with the adapter."""
    tok = family_tokenizer("gemma-4")
    fmt = ChatFormat(tok.chat_template, origin="gemma-4.jinja", date=DATE)
    answer = {"role": "assistant", "content": "Four.", "reasoning_content": "Two and two."}
    rows = [Record({"messages": [U1, answer], "chat_template_kwargs": kw}, f"d.jsonl line {i}")
            for i, kw in enumerate(({"enable_thinking": False}, {"enable_thinking": True}), 1)]
    (off, on), report = tokenize_dataset(normalize(rows), tok, fmt, stop_ids=_stops(tok, "gemma-4"))
    unset = [Record({"messages": [U1, answer], "chat_template_kwargs": {"enable_thinking": None}}, "d.jsonl line 3")]
    (null,), by_qlora = tokenize_dataset(normalize(unset), tok, fmt, stop_ids=_stops(tok, "gemma-4"))
    assert null.input_ids == on.input_ids and by_qlora.thinking_rows == 1  # null (a struct's gap): as unset
    plain = tok.apply_chat_template([U1, answer], tokenize=True, return_dict=True, enable_thinking=False)
    assert off.input_ids == list(plain["input_ids"])
    assert "Two and two." not in tok.decode(off.input_ids) and off.reasoning_hidden == 1
    assert "<|channel>thought\nTwo and two.<channel|>Four." in tok.decode(on.input_ids)
    assert report.thinking_rows == 0 and report.thinking_mode == {}


@pytest.mark.parametrize("value, problem", [
    (5, "must be a JSON object"), ('["enable_thinking"]', "must be a JSON object"), ("{oops", "not valid JSON"),
    ({"tokenize": True}, "'tokenize' is a parameter of the rendering"),
    ({"chat_template": "{{ x }}"}, "--template"),
    ({"add_generation_prompt": True}, "training places the generation prompt")])
def test_a_malformed_value_names_the_row_and_the_column(value, problem):
    row = {"messages": HELLO + HI, "chat_template_kwargs": value}
    for read in (lambda: normalize([Record(row, "d.csv line 7")]),
                 lambda: normalize_preferences([Record({"prompt": HELLO, "chosen": HI, "rejected": HI,
                                                        "chat_template_kwargs": value}, "d.csv line 7")]),
                 lambda: normalize_unpaired([Record({"prompt": HELLO, "completion": HI, "label": True,
                                                     "chat_template_kwargs": value}, "d.csv line 7")])):
        with pytest.raises(UsageError, match=r"d\.csv line 7") as info:
            read()
        assert "chat_template_kwargs" in str(info.value) and problem in str(info.value)


def test_empty_values_and_keys_the_template_never_reads():
    """Null, an empty cell or ``{}`` render as no kwargs; a key the template does not read is passed as TRL passes
    it (SmolTalk2's ``xml_tools``), changing nothing."""
    tok = family_tokenizer("qwen3")
    base = _ours(tok, {"messages": HELLO + HI})
    for value in (None, "", {}, {"xml_tools": None, "custom_instructions": "none"}):
        ours = _ours(tok, {"messages": HELLO + HI, "chat_template_kwargs": value})
        assert (ours.input_ids, ours.labels) == (base.input_ids, base.labels)


def test_a_template_variable_may_share_a_name_with_the_renderings_own_arguments():
    """``where`` (the row, for error messages) and ``tokenizer`` are the rendering's own arguments in qlora, not
    transformers': a template that reads variables of those names gets the row's values, as apply_chat_template
    gives them."""
    tok = family_tokenizer("qwen3")
    template = ("{% for m in messages %}<|im_start|>{{ m.role }} {{ where }} {{ tokenizer }}\n"
                "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}\n{% endfor %}")
    row = {"messages": HELLO + HI, "chat_template_kwargs": {"where": "north", "tokenizer": "bpe"}}
    example = normalize([Record(row, "d.jsonl line 1")])[0]
    ours = tokenize_example(example, tok, ChatFormat(template, date=DATE), stop_ids=_stops(tok, "qwen3"))
    expected = tok.apply_chat_template(HELLO + HI, chat_template=template, tokenize=False, where="north",
                                       tokenizer="bpe")
    assert "north bpe" in expected and tok.decode(ours.input_ids) == expected


def test_kwargs_stored_as_a_struct_hold_only_the_rows_own_variables(tmp_path):
    """Parquet stores the column as one struct for all rows, so a row lacking another row's variable holds it as
    null: gpt-oss' template keeps a null reasoning_effort (it is defined) and failed adding it to a string, blaming
    the row. A struct's null is an absent variable: the row renders with the template's default, as its JSON twin."""
    datasets = pytest.importorskip("datasets")
    from qlora.train.data import load_records

    tok = family_tokenizer("gpt-oss")
    fmt = ChatFormat(tok.chat_template, origin="gpt-oss.jinja", date=DATE)
    rows = [{"messages": HELLO + HI, "chat_template_kwargs": {"reasoning_effort": "high"}},
            {"messages": HELLO + HI, "chat_template_kwargs": {"enable_thinking": False}}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    records = load_records(tmp_path / "d.parquet")
    assert [r.fields["chat_template_kwargs"] for r in records] == [r["chat_template_kwargs"] for r in rows]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ours, _ = tokenize_dataset(normalize(records), tok, fmt)
    twin, _ = tokenize_dataset(normalize(load_records(tmp_path / "d.jsonl")), tok, fmt)
    assert [t.input_ids for t in ours] == [t.input_ids for t in twin]
    assert "Reasoning: medium" in tok.decode(ours[1].input_ids)
