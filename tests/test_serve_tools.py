"""Function calling through ``qlora serve``, driven by the official ``openai`` client.

The model is real (``tool_model_dir``, tests/tool_model.py): a tiny model with Qwen 2.5's own chat template,
trained for a few seconds to call get_weather and then answer. It is served as ``qlora serve`` serves
(NF4 base). Oracles: ``apply_chat_template(...,
tools=...)`` for the prompt the model saw (its token count), the openai client's parsing of responses and
stream chunks, and the conversation it was trained on.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import httpx
import pytest
import torch

import qlora
from qlora.model.chat_format import ChatFormat
from qlora.model.tiny import CHATML_TEMPLATE

from tool_model import ANSWER, ASK, RESULT, TOOLS

_V5 = importlib.util.find_spec("transformers.initialization") is not None

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

@pytest.fixture(scope="module")
def served(tool_model_dir):
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tokenizer = qlora.load_model(tool_model_dir, compute_dtype=torch.float32, device="cpu")
    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=4, context_length=1024).start()
    with BackgroundServer(build_app(batcher, "tiny", [])) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        yield server, batcher, client, tokenizer
    batcher.close()


def _nested(levels: int) -> dict:
    """Parameters ``levels`` objects deep: too deep for the template's tojson (it was a 400 naming messages)."""
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def _ask(client, messages=(ASK,), **kw):
    return client.chat.completions.create(model="tiny", messages=list(messages), temperature=0, max_tokens=80, **kw)


def test_the_model_calls_the_tool_it_saw_in_its_prompt(served):
    _, _, client, tokenizer = served
    reply = _ask(client, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) == 29
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    # the prompt was the template's rendering with the tools: same token count as apply_chat_template's
    with_tools = tokenizer.apply_chat_template([ASK], tools=TOOLS, add_generation_prompt=True, tokenize=False)
    without = tokenizer.apply_chat_template([ASK], add_generation_prompt=True, tokenize=False)
    assert '"name": "get_weather"' in with_tools and "get_weather" not in without
    assert reply.usage.prompt_tokens == len(tokenizer(with_tools, add_special_tokens=False).input_ids)
    assert reply.usage.prompt_tokens > len(tokenizer(without, add_special_tokens=False).input_ids)


def test_streamed_calls_reassemble_to_the_same_calls(served):
    _, _, client, _ = served
    whole = _ask(client, tools=TOOLS).choices[0].message.tool_calls
    chunks = list(_ask(client, tools=TOOLS, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == ""  # the call markup is never sent as text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["tool_calls"]
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.tool_calls or ():
            entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += tc.id or ""
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in whole]
    assert all(c["id"].startswith("call_") for c in calls.values())
    # the client's own stream accumulator agrees
    with client.chat.completions.stream(model="tiny", messages=[ASK], tools=TOOLS, temperature=0,
                                        max_tokens=80) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in whole]


def test_round_trip_tool_result_gets_the_final_answer(served):
    _, _, client, _ = served
    first = _ask(client, tools=TOOLS).choices[0].message
    history = [ASK, first.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": RESULT}]
    assert history[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    reply = _ask(client, history, tools=TOOLS)
    assert reply.choices[0].message.content == ANSWER
    assert reply.choices[0].finish_reason == "stop" and not reply.choices[0].message.tool_calls
    streamed = list(_ask(client, history, tools=TOOLS, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == ANSWER


def test_tool_choice_none_returns_text(served):
    _, _, client, _ = served
    reply = _ask(client, tools=TOOLS, tool_choice="none").choices[0]
    assert reply.finish_reason == "stop" and not reply.message.tool_calls
    assert reply.message.content.startswith("<tool_call>") and "get_weather" in reply.message.content
    assert _ask(client, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False).choices[0].finish_reason == \
        "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_is_the_call_the_model_was_trained_to_make(served, choice, stream):
    """Asked something else, the trained model is still made to call, and writes the arguments it learned."""
    _, _, client, _ = served
    other = {"role": "user", "content": "Hello!"}
    if stream:
        chunks = list(_ask(client, [other], tools=TOOLS, tool_choice=choice, stream=True))
        calls = [tc.function for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    else:
        reply = _ask(client, [other], tools=TOOLS, tool_choice=choice).choices[0]
        assert reply.finish_reason == "tool_calls" and reply.message.content is None
        calls = [tc.function for tc in reply.message.tool_calls]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize("kw, param", [
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}), "tool_choice"),
    (dict(tools=TOOLS, tool_choice={"type": "function"}), "tool_choice"),
    (dict(tools=TOOLS, tool_choice="always"), "tool_choice"),
    (dict(tool_choice="auto"), "tool_choice"),
    (dict(functions=[TOOLS[0]["function"]]), "functions"),  # the deprecated form is refused, not ignored
    (dict(tools=[{"type": "custom", "custom": {"name": "x"}}]), "tools.0.type"),
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools.0.function.name"),
    (dict(tools=TOOLS, messages=[ASK, {"role": "tool", "content": "21"}]), "messages.1.tool_call_id"),
    (dict(tools=TOOLS, messages=[ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{oops"}}]}]),
     "messages.1.tool_calls.0.function.arguments"),
    (dict(tools=[{"type": "function", "function": TOOLS[0]["function"] | {"strict": "yes"}}]),
     "tools.0.function.strict"),  # was read as strict (a truthy string)
    # transformers 5's template rendering recurses past the limit on it: a 400 naming tools; 4.x's renders it, and
    # the prompt is then past the context: a 400 naming messages (neither a 500)
    (dict(tools="nested past the recursion limit"), "tools" if _V5 else "messages"),
])
def test_bad_tool_requests_are_400_naming_the_field(served, kw, param):
    _, _, client, _ = served
    kw, limit = dict(kw), sys.getrecursionlimit()
    messages = kw.pop("messages", [ASK])
    if kw.get("tools") == "nested past the recursion limit":
        sys.setrecursionlimit(1000)  # Python's default: torch's inductor raises it process-wide once it compiles
        kw["tools"] = [{"type": "function", "function": {"name": "f", "parameters": _nested(300)}}]
    try:
        with pytest.raises(openai.BadRequestError) as exc:
            _ask(client, messages, **kw)
    finally:
        sys.setrecursionlimit(limit)
    assert exc.value.status_code == 400 and exc.value.param == param
    assert "\n" not in exc.value.body["message"]


def test_parallel_tool_calls_false_keeps_the_first_call():
    from qlora.infer.tool_calls import FORMATS
    from qlora.serve.app import _ToolPlan

    text = ('<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>')
    both = _ToolPlan(FORMATS["hermes"], ("a", "b"), parallel=True).parse(text)
    first = _ToolPlan(FORMATS["hermes"], ("a", "b"), parallel=False).parse(text)
    assert [c["function"] for c in both[1]] == [{"name": "a", "arguments": '{"x": 1}'}, {"name": "b", "arguments": "{}"}]
    assert [c["function"] for c in first[1]] == [both[1][0]["function"]] and first[0] is both[0] is None
    assert len({c["id"] for c in both[1]}) == 2


def test_a_template_that_cannot_render_tools_is_refused(served):
    """The same model prompted with the tiny models' ChatML template, which ignores ``tools``: a clear 400."""
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    _, batcher, _, _ = served
    app = build_app(batcher, "plain", [], chat_formats={None: ChatFormat(CHATML_TEMPLATE, origin="chatml.jinja")})
    with BackgroundServer(app) as server:
        response = httpx.post(server.url + "/v1/chat/completions",
                              json={"model": "plain", "messages": [ASK], "tools": TOOLS}, timeout=60)
        plain = httpx.post(server.url + "/v1/chat/completions",
                           json={"model": "plain", "messages": [ASK], "max_tokens": 2}, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tools" and "does not render tools" in error["message"] and "chatml.jinja" in error["message"]
    assert plain.status_code == 200  # without tools the model is served as before


@pytest.mark.parametrize("extra", [{"bad_words": ["Paris"]}, {"allowed_token_ids": [5, 6]}])
def test_masked_tokens_are_refused_with_a_forced_call(served, extra):
    """vLLM's allowed_token_ids and bad_words could not hold back a forced call's fixed markup tokens."""
    _, _, client, _ = served
    with pytest.raises(openai.BadRequestError) as err:
        _ask(client, tools=TOOLS, tool_choice="required", extra_body=extra)
    assert err.value.body["param"] == next(iter(extra)) and "forced tool call" in err.value.body["message"]
