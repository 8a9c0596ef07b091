"""Tool-call parsing: each format as its real chat template renders an assistant's calls.

Oracle: the template itself. A conversation whose assistant turn calls tools is rendered with
``apply_chat_template`` (tests/data/chat_templates, the released models' templates); the text of that
turn is what a model trained on it writes, and parsing it must give back the same calls. Malformed
markup stays plain content; streaming gives the same content and calls as parsing the whole reply.
"""

from __future__ import annotations

import json

import pytest

from qlora.infer.messages import Message
from qlora.infer.template import render_chat, renders_tools
from qlora.infer.text_stream import TextStream
from qlora.infer.tool_calls import FORMATS, ToolCall, ToolCallStream, markup_token_ids, tool_call_format

from qlora.model.chat_format import stop_token_ids

from chat_families import FAMILIES as FAMILY_INFO
from chat_families import family_tokenizer

TOOLS = [{"type": "function", "function": {"name": name, "description": f"{name} of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    for name in ("get_weather", "get_time")]
CALLS = [ToolCall("get_weather", json.dumps({"city": "Paris"})),
         ToolCall("get_time", json.dumps({"city": "Tokyo", "utc": False, "days": [1, 2]}))]
# family -> (format, whether its template renders several calls in one turn)
FAMILIES = {"qwen2.5": ("hermes", True), "qwen3": ("hermes", True), "glm-4.5": ("glm-4.5", True),
            "mistral-v0.3": ("mistral", True), "mistral-nemo": ("mistral", True),
            "llama-3.1": ("json", False), "llama-3.2": ("json", False)}


def _turn(family: str, calls: list[ToolCall]) -> str:
    """The reply text of an assistant turn making ``calls`` as a model trained on the template writes it: the
    turn's tokens after the generation prompt, up to a stop token, decoded as generation decodes them."""
    tok = family_tokenizer(family)
    msgs = [Message("user", "Weather in Paris, time in Tokyo?")]
    ids = [f"abc{i}def{i}g" for i in range(len(calls))]  # 9 characters: what Mistral's templates require
    call_dicts = tuple({"id": i, "type": "function", "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                       for i, c in zip(ids, calls))
    before, after = (tok(text, add_special_tokens=False).input_ids for text in (
        render_chat(tok, msgs, tools=TOOLS),
        render_chat(tok, [*msgs, Message("assistant", "", call_dicts)], add_generation_prompt=False, tools=TOOLS)))
    common = 0
    while common < min(len(before), len(after)) and before[common] == after[common]:
        common += 1
    stops = stop_token_ids(tok, [tok.convert_tokens_to_ids(t) for t in FAMILY_INFO[family]["generation_eos"]])
    stream = TextStream(tok, keep=markup_token_ids(tool_call_format(tok.chat_template), tok))
    text = ""
    for token in after[common:]:
        if token in stops:
            break
        text += stream.push(token)
    return text + stream.flush()


@pytest.mark.parametrize("family", FAMILIES)
def test_format_is_read_from_the_template(family):
    tok = family_tokenizer(family)
    assert renders_tools(tok)
    assert tool_call_format(tok.chat_template).name == FAMILIES[family][0]


@pytest.mark.parametrize("family", FAMILIES)
def test_calls_rendered_by_the_template_parse_back(family):
    fmt = tool_call_format(family_tokenizer(family).chat_template)
    calls = CALLS if FAMILIES[family][1] else CALLS[:1]
    turn = _turn(family, calls)
    content, parsed = fmt.parse(turn, [t["function"]["name"] for t in TOOLS])
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == [(c.name, json.loads(c.arguments)) for c in calls]
    for marker in fmt.starts:
        assert marker not in content
    assert "get_weather" not in content


@pytest.mark.parametrize("name, text", [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),  # cut off by the limit
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"arguments": {}}\n</tool_call>'),  # second call has no name: none count
    ("hermes", "<tool_call>\nnot json\n</tool_call>"),
    ("hermes", '<tool_call>{"name": "f", "arguments": "[1, 2]"}</tool_call>'),  # arguments not an object
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}'),  # list not closed
    ("mistral", "[TOOL_CALLS]get_weather[ARGS]{oops}"),
    ("deepseek-v3", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"c"),
    ("glm-4.5", "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris"),
    ("json", '{"name": "get_weather", "parameters": {"city": "Paris"}'),  # not closed
    ("json", '{"name": "not_a_tool", "parameters": {"city": "Paris"}}'),  # JSON, but no offered tool
    ("json", '{"answer": 42}'),
    ("json", 'The call is {"name": "get_weather", "parameters": {"city": "Paris"}}'),  # not at the start
])
def test_malformed_calls_stay_content(name, text):
    fmt = FORMATS[name]
    assert fmt.parse(text, ["get_weather", "get_time"]) == (text, [])
    stream = ToolCallStream(fmt, ["get_weather", "get_time"])
    shown = "".join(stream.push(text[i:i + 3]) for i in range(0, len(text), 3))
    tail, calls = stream.finish()
    assert shown + tail == text and calls == []


@pytest.mark.parametrize("name, text, content", [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {"city": "Tokyo"}}\n</tool_call>', "Let me check.\n\n"),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"city": "Tokyo"}', ""),
    ("json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
             '{"name": "get_time", "arguments": {"city": "Tokyo"}}', ""),
])
def test_several_calls_and_content_stream_like_the_whole(name, text, content):
    fmt = FORMATS[name]
    whole = fmt.parse(text, ["get_weather", "get_time"])
    assert whole == (content, [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_time", '{"city": "Tokyo"}')])
    for size in (1, 2, 5, len(text)):
        stream = ToolCallStream(fmt, ["get_weather", "get_time"])
        pieces = [stream.push(text[i:i + size]) for i in range(0, len(text), size)]
        tail, calls = stream.finish()
        assert "".join(pieces) + tail == content and calls == whole[1]
        assert "<tool_call" not in "".join(pieces) and "[TOOL" not in "".join(pieces)


def test_deepseek_v3_calls_as_its_template_renders_them():
    """DeepSeek V3's template renders calls in history but not tool definitions (serve refuses tools for it);
    a fine-tune whose template shows tools writes this markup."""
    tok = family_tokenizer("deepseek-v3")
    assert tool_call_format(tok.chat_template).name == "deepseek-v3" and not renders_tools(tok)
    text = ("Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
            '{"city": "Paris"}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n'
            '{"city": "Tokyo"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
    assert FORMATS["deepseek-v3"].parse(text) == ("Checking.", [ToolCall("get_weather", '{"city": "Paris"}'),
                                                                ToolCall("get_time", '{"city": "Tokyo"}')])


def test_plain_text_streams_at_once_and_a_marker_prefix_is_held_only_while_it_may_grow():
    stream = ToolCallStream(FORMATS["hermes"])
    assert stream.push("Hello <tool") == "Hello "
    assert stream.push("box> world") == "<toolbox> world"  # it did not become <tool_call>
    json_stream = ToolCallStream(FORMATS["json"], ["get_weather"])
    assert json_stream.push("  ") == ""  # could still start a JSON call
    assert json_stream.push("Four.") == "  Four."
    assert json_stream.push(' {"name": "get_weather"}') == ' {"name": "get_weather"}'  # not at the start: text
    assert json_stream.finish() == ("", [])


def test_mistral_ids_fit_its_template_and_special_markup_is_decoded():
    fmt = FORMATS["mistral"]
    ids = {fmt.new_id() for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 9 and i.isalnum() for i in ids)
    assert FORMATS["hermes"].new_id().startswith("call_")
    tok = family_tokenizer("mistral-v0.3")
    keep = markup_token_ids(fmt, tok)
    assert keep == {tok.convert_tokens_to_ids("[TOOL_CALLS]")}
    text = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
    plain, kept = TextStream(tok), TextStream(tok, keep=keep)
    assert "".join(plain.push(t) for t in ids) + plain.flush() == text.replace("[TOOL_CALLS]", "")  # dropped
    decoded = "".join(kept.push(t) for t in ids) + kept.flush()
    assert decoded == text  # kept, and EOS still dropped
    assert fmt.parse(decoded)[1] == [ToolCall("get_weather", '{"city": "Paris"}')]


def test_templates_without_tools_are_told_apart(tiny_tokenizer):
    assert not renders_tools(tiny_tokenizer)  # the tiny models' ChatML template ignores tools
    assert not renders_tools(family_tokenizer("gemma-2"))
