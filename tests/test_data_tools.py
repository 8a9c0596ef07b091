"""Messages as users write them: text parts, tool calls (content null), tool results, a ``tools`` column,
glaive / LLaMA-Factory ShareGPT speakers and the developer role, on the real templates that render tools.

Oracles: ``tokenizer.apply_chat_template(messages, tools=...)`` for the ids; for the loss mask, the trained
runs must be exactly the tool-call turn (all of it: markers, name, arguments, end of turn) and the final
answer, and never the tool result.
"""

from __future__ import annotations

import json

import pytest

from qlora.errors import UsageError
from qlora.model.chat_format import ChatFormat, stop_token_ids
from qlora.train.data import Record, normalize, tokenize_example

from chat_families import DATE, FAMILIES, family_tokenizer
from trained_runs import trained_runs

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
OPENAI_ROW = {
    "messages": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in"}, {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call00001", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call00001", "content": '{"temp_c": 21}'},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ],
    "tools": json.dumps(TOOLS),
}
GLAIVE_ROW = {  # LLaMA-Factory's ShareGPT with tools: system and tools columns, function_call / observation turns
    "conversations": [
        {"from": "human", "value": "Weather in\nParis?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp_c": 21}'},
        {"from": "gpt", "value": "It is 21 degrees in Paris."},
    ],
    "system": "You are helpful.",
    "tools": TOOLS,
}
CALL_STARTS = {"qwen2.5": "<tool_call>", "qwen3": "<tool_call>", "llama": '{"name": "get_weather"',
               "mistral": "[TOOL_CALLS]", "deepseek": "<｜tool▁calls▁begin｜>", "glm": "<think></think>\n<tool_call>"}
TOOL_FAMILIES = ["qwen2.5", "qwen3", "qwen3-2507", "llama-3.1", "llama-3.2", "mistral-nemo", "mistral-v0.3",
                 "deepseek-r1", "deepseek-v3", "glm-4.5"]


def _runs(tokenized) -> list[list[int]]:
    return trained_runs(tokenized.input_ids, tokenized.labels)


def _example(row=OPENAI_ROW):
    return normalize([Record(row, "tools.jsonl line 1")])[0]


def test_openai_and_glaive_rows_normalize_alike():
    openai, glaive = _example(OPENAI_ROW), _example(GLAIVE_ROW)
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert openai.messages[1] == {"role": "user", "content": "Weather in\nParis?"}  # text parts joined
    assert openai.messages[2] == {"role": "assistant", "content": None, "tool_calls": [{**call, "id": "call00001"}]}
    assert openai.messages[3] == {"role": "tool", "content": '{"temp_c": 21}', "tool_call_id": "call00001"}
    assert glaive.messages[2] == {"role": "assistant", "content": None, "tool_calls": [call]}
    assert [m["role"] for m in glaive.messages] == [m["role"] for m in openai.messages]
    assert openai.tools == glaive.tools == tuple(TOOLS)


@pytest.mark.parametrize("family", TOOL_FAMILIES)
def test_tool_call_turn_trained_tool_result_not(family):
    tok = family_tokenizer(family)
    fmt = ChatFormat(tok.chat_template, origin=f"{family}.jinja", date=DATE)
    stops = stop_token_ids(tok, [tok.convert_tokens_to_ids(t) for t in FAMILIES[family]["generation_eos"]])
    example = _example()
    tokenized = tokenize_example(example, tok, fmt, stop_ids=stops)
    from qlora.chat.tokenize import for_template

    expected = fmt.render(tok, for_template(example.messages, fmt.template), tokenize=True, return_dict=True,
                          tools=TOOLS)["input_ids"]
    extra = tokenized.input_ids[len(expected):]  # EOS, added where the template ends the last turn with nothing
    assert tokenized.input_ids[:len(expected)] == list(expected) and extra in ([], [tok.eos_token_id])
    call, answer = (tok.decode(r) for r in _runs(tokenized))
    assert "get_weather" in call and "Paris" in call and "temp_c" not in call
    # the answer, after the empty reasoning block a thinking template writes before it (Qwen3, GLM)
    assert answer.startswith("It is 21 degrees in Paris.") or (
        answer.startswith("<think>") and answer.split("</think>", 1)[1].lstrip().startswith("It is 21 degrees"))
    for run in _runs(tokenized):
        assert run[-1] in stops  # each trained turn ends with the token that stops generation
    # The whole turn the model writes, from its first token after the assistant header.
    assert call.startswith(CALL_STARTS[family.split("-")[0]]), call


def test_openai_legacy_function_call_rows_train_as_their_tool_calls_equivalent():
    """OpenAI's legacy function-calling fine-tuning rows: an assistant "function_call" (no content), a "function"
    result turn, bare definitions in "functions"; read as the tool_calls row they stand for, not skipped as a row
    with an empty answer. A "functions" column that holds no definitions is no tools."""
    messages = OPENAI_ROW["messages"]
    call = messages[2]["tool_calls"][0]["function"]
    legacy = {"messages": [*messages[:2], {"role": "assistant", "function_call": call},
                           {"role": "function", "name": "get_weather", "content": '{"temp_c": 21}'}, messages[4]],
              "functions": [t["function"] for t in TOOLS]}
    modern = {"messages": [*messages[:2], {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": call}]}, {"role": "tool", "name": "get_weather", "content": '{"temp_c": 21}'},
        messages[4]], "tools": TOOLS}
    assert _example(legacy) == _example(modern)
    tok = family_tokenizer("qwen2.5")
    tokenized = tokenize_example(_example(legacy), tok, ChatFormat(tok.chat_template))
    assert [tok.decode(r) for r in _runs(tokenized)] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 21 degrees in Paris.<|im_end|>"]
    assert _example({**modern, "tools": None, "functions": "math, physics"}).tools is None


def test_glaive_row_trains_the_same_tokens_as_the_openai_row():
    tok = family_tokenizer("qwen2.5")
    fmt = ChatFormat(tok.chat_template)
    openai, glaive = (tokenize_example(_example(r), tok, fmt) for r in (OPENAI_ROW, GLAIVE_ROW))
    assert glaive.input_ids == openai.input_ids and glaive.labels == openai.labels


def test_a_template_that_drops_tool_calls_is_refused():
    """DeepSeek-R1-Distill's template renders a tool call only for content None, which transformers drops."""
    tok = family_tokenizer("deepseek-r1-distill")
    with pytest.raises(UsageError, match=r"tools\.jsonl line 1: .*(drops these tool calls|failed on this conv)"):
        tokenize_example(_example(), tok, ChatFormat(tok.chat_template, origin="deepseek-r1-distill.jinja"))
    all_tokens = tokenize_example(_example({**OPENAI_ROW, "messages": OPENAI_ROW["messages"][:2] + [
        {"role": "assistant", "content": "Sunny."}]}), tok, ChatFormat(tok.chat_template))
    assert all_tokens.num_trainable > 0


def test_a_generation_marked_template_that_drops_tool_calls_is_refused():
    """SmolLM3's template marks a {% generation %} block for a tool-calling turn but writes no call in it: training
    it would teach the model to answer a tool request with an empty turn."""
    tok = family_tokenizer("smollm3")
    with pytest.raises(UsageError, match=r"tools\.jsonl line 1: assistant message 1 of 2 .*drops these tool calls"):
        tokenize_example(_example(), tok, ChatFormat(tok.chat_template, origin="smollm3.jinja"))


def test_developer_role_is_system_where_the_template_has_none():
    tok = family_tokenizer("qwen2.5")
    fmt = ChatFormat(tok.chat_template)
    rows = [{"messages": [{"role": role, "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}]} for role in ("developer", "system")]
    developer, system = (tokenize_example(_example(r), tok, fmt) for r in rows)
    assert developer.input_ids == system.input_ids and developer.labels == system.labels
    own = ChatFormat("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                     "{# a template that knows the developer role #}")
    text = tok.decode(tokenize_example(_example(rows[0]), tok, own).input_ids)
    assert "developer: Be brief." in text


@pytest.mark.parametrize("message, error", [
    ({"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": "x"}}]},
     r"tools\.jsonl line 1: image 'x' not found"),
    ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
     "content part 0 is of type 'input_audio'; qlora trains on text and images"),
    ({"role": "user", "content": None}, r'message 0: the user message has no "content"'),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
     r"message 0: the arguments of tool call 0 is not valid JSON"),
    ({"role": "assistant", "content": "x", "tool_calls": [{"function": {"arguments": "{}"}}]},
     r'message 0: tool call 0 needs a "name"'),
])
def test_bad_messages_name_file_line_and_message(message, error):
    with pytest.raises(UsageError, match=error):
        _example({"messages": [message, {"role": "assistant", "content": "ok"}]})


def test_bad_tools_column_names_the_line():
    with pytest.raises(UsageError, match=r'tools\.jsonl line 1: the "tools" field is not valid JSON'):
        _example({**OPENAI_ROW, "tools": "[{"})
    with pytest.raises(UsageError, match=r'tools\.jsonl line 1: "tools" must be a list of tool definitions'):
        _example({**OPENAI_ROW, "tools": [1, 2]})


def test_openai_export_quirks():
    """tool_calls stored as JSON text or as an empty list, and a tool result given as a JSON value."""
    calls = OPENAI_ROW["messages"][2]["tool_calls"]
    messages = [OPENAI_ROW["messages"][1], {**OPENAI_ROW["messages"][2], "tool_calls": json.dumps(calls)},
                {"role": "tool", "content": {"temp_c": 21}}, {"role": "assistant", "content": "Warm.", "tool_calls": []}]
    example = _example({"messages": messages})
    assert example.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert example.messages[2]["content"] == '{"temp_c": 21}'
    assert "tool_calls" not in example.messages[3]


@pytest.mark.parametrize("family", ["qwen2.5", "llama-3.1", "smollm3"])
def test_openai_weight_0_keeps_a_turn_in_the_context_untrained(family):
    tok = family_tokenizer(family)
    fmt = ChatFormat(tok.chat_template, date=DATE)
    turns = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Lyon."},
             {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Paris, sorry."}]
    full = tokenize_example(_example({"messages": turns}), tok, fmt)
    turns[1] = {**turns[1], "weight": 0}
    weighted = tokenize_example(_example({"messages": turns}), tok, fmt)
    assert weighted.input_ids == full.input_ids
    assert [tok.decode(r) for r in _runs(weighted)] == [tok.decode(r) for r in _runs(full)][1:]
    with pytest.raises(UsageError, match=r'message 1: "weight" must be 0'):
        _example({"messages": [turns[0], {**turns[1], "weight": 0.5}]})


@pytest.mark.parametrize("tools", [TOOLS, json.dumps(TOOLS)])
def test_preference_and_kto_rows_render_their_tools_column_as_trl_does(tools):
    """TRL's DPOTrainer and KTOTrainer give a conversational row's "tools" (a list, or its JSON text) to the chat
    template, for the prompt and for prompt + answer alike: the pair's and the KTO example's ids are those."""
    from qlora.train.data.preference import normalize_preferences, tokenize_pairs
    from qlora.train.data.unpaired import normalize_unpaired, tokenize_unpaired

    tok = family_tokenizer("qwen2.5")
    fmt = ChatFormat(tok.chat_template)
    prompt = [{"role": "user", "content": "Weather in Paris?"}]
    chosen, rejected = ([{"role": "assistant", "content": text}] for text in ("Let me check.", "No idea."))
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "tools": tools}

    def ids(messages, **kw):
        return list(tok.apply_chat_template(messages, tools=TOOLS, tokenize=True, return_dict=True, **kw)["input_ids"])

    (pair,), _ = tokenize_pairs(normalize_preferences([Record(row, "p.jsonl line 1")]), tok, fmt)
    assert pair.prompt_ids == ids(prompt, add_generation_prompt=True)
    assert pair.prompt_ids + pair.chosen_ids == ids(prompt + chosen)
    assert pair.prompt_ids + pair.rejected_ids == ids(prompt + rejected)
    assert "get_weather" in tok.decode(pair.prompt_ids)
    kto_row = {"prompt": prompt, "completion": chosen, "label": True, "tools": tools}
    for rows in ([row], [kto_row]):
        units, _ = tokenize_unpaired(normalize_unpaired([Record(r, "k.jsonl line 1") for r in rows]), tok, fmt)
        assert units[0].prompt_ids == ids(prompt, add_generation_prompt=True)
        assert units[0].prompt_ids + units[0].completion_ids == ids(prompt + chosen)
