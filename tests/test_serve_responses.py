"""``POST /v1/responses`` (OpenAI's Responses API) driven by the official ``openai`` client.

Oracles: the chat route of the same server (greedy text, prompt token counts) for the same
conversation, the client's own parsing of response objects and of the event stream (its
``responses.stream`` helper accumulates the events and rejects a malformed sequence), JSON
Schema validation of structured replies, and the tool-calling model trained in tests/tool_model.py.
"""

from __future__ import annotations

import json
import time
from typing import Literal

import httpx
import pytest
import torch
from pydantic import BaseModel

import qlora

from test_serve import KEY, _wait, adapters  # noqa: F401  (the fixture is shared: two saved random adapters)
from tool_model import ANSWER, ASK, RESULT, TOOLS

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

MAX_TOKENS = 10
FLAT_TOOLS = [{"type": "function", **TOOLS[0]["function"]}]  # the Responses API's function-tool shape


@pytest.fixture(scope="module")
def served(tiny_model_dir, adapters):  # noqa: F811
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tokenizer = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(model, adapters / "a", adapter_name="a")
    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=8, context_length=512).start()
    with BackgroundServer(build_app(batcher, "tiny", ["a"], api_key=KEY)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield server, batcher, client
    batcher.close()


@pytest.fixture(scope="module")
def tool_served(tool_model_dir):
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tokenizer = qlora.load_model(tool_model_dir, compute_dtype=torch.float32, device="cpu")
    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=4, context_length=1024).start()
    with BackgroundServer(build_app(batcher, "tiny", [])) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    batcher.close()


def _chat(client, model, messages, max_tokens=MAX_TOKENS, **kw):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0, **kw)


def _respond(client, model="tiny", input="Hello", max_output_tokens=MAX_TOKENS, **kw):
    return client.responses.create(model=model, input=input, max_output_tokens=max_output_tokens, temperature=0, **kw)


@pytest.mark.parametrize("model_id", ["tiny", "a"])
def test_string_input_equals_the_chat_reply(served, model_id):
    _, _, client = served
    chat = _chat(client, model_id, [{"role": "user", "content": "Hello"}])
    reply = _respond(client, model_id)
    assert reply.output_text == chat.choices[0].message.content
    assert reply.id.startswith("resp_") and reply.object == "response" and reply.model == model_id
    (item,) = reply.output
    assert item.type == "message" and item.role == "assistant" and item.content[0].type == "output_text"
    # 10 tokens, no stop: the limit cut the reply, as chat's finish_reason "length" says
    assert chat.choices[0].finish_reason == "length"
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert item.status == "incomplete"
    assert reply.usage.input_tokens == chat.usage.prompt_tokens
    assert reply.usage.output_tokens == MAX_TOKENS == chat.usage.completion_tokens
    assert reply.usage.total_tokens == reply.usage.input_tokens + MAX_TOKENS
    assert reply.usage.input_tokens_details.cached_tokens == 0 and reply.usage.output_tokens_details.reasoning_tokens == 0
    assert reply.max_output_tokens == MAX_TOKENS and reply.temperature == 0 and reply.tools == []
    assert reply.tool_choice == "auto" and reply.text.format.type == "text" and reply.parallel_tool_calls


def test_base_and_adapter_differ_and_a_completed_reply(served):
    _, _, client = served
    assert _respond(client, "tiny").output_text != _respond(client, "a").output_text
    long = _respond(client, "a", max_output_tokens=300)
    chat = _chat(client, "a", [{"role": "user", "content": "Hello"}], max_tokens=300)
    assert long.output_text == chat.choices[0].message.content
    expected = "completed" if chat.choices[0].finish_reason == "stop" else "incomplete"
    assert long.status == expected and long.output[0].status == expected


def test_instructions_and_message_items_equal_chat_messages(served):
    _, _, client = served
    system, user = "You answer in French.", "Hello there"
    chat = _chat(client, "a", [{"role": "system", "content": system}, {"role": "user", "content": user}])
    by_instructions = _respond(client, "a", input=user, instructions=system)
    assert by_instructions.output_text == chat.choices[0].message.content
    assert by_instructions.usage.input_tokens == chat.usage.prompt_tokens
    assert by_instructions.instructions == system
    items = _respond(client, "a", input=[
        {"role": "developer", "content": system},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"},
                                                        {"type": "input_text", "text": "there"}]}])
    # the parts are read as the chat route reads them: for this template, which reads a string, joined with newlines
    chat = _chat(client, "a", [{"role": "system", "content": system}, {"role": "user", "content": "Hello\nthere"}])
    assert items.output_text == chat.choices[0].message.content
    assert items.usage.input_tokens == chat.usage.prompt_tokens
    # an earlier assistant turn (output_text parts), as a client replays a conversation
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
               {"role": "user", "content": "More"}]
    chat = _chat(client, "a", history)
    replay = _respond(client, "a", input=[history[0], {
        "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hey", "annotations": []}]},
        history[2]])
    assert replay.output_text == chat.choices[0].message.content
    assert replay.usage.input_tokens == chat.usage.prompt_tokens


def test_streaming_deltas_equal_the_reply(served):
    _, _, client = served
    whole = _respond(client, "a", max_output_tokens=12)
    with client.responses.stream(model="a", input="Hello", max_output_tokens=12, temperature=0) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]  # 12 tokens, cut by max_output_tokens
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 3 and "".join(d.delta for d in deltas) == whole.output_text
    assert all(d.item_id == deltas[0].item_id and d.output_index == 0 and d.content_index == 0 for d in deltas)
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(len(events)))
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output_text == whole.output_text and final.usage.output_tokens == 12
    assert final.id == events[0].response.id and events[0].response.status == "in_progress"
    # stream=True without the helper: the raw events, parsed by the client
    raw = list(client.responses.create(model="a", input="Hello", max_output_tokens=12, temperature=0, stream=True))
    assert "".join(e.delta for e in raw if e.type == "response.output_text.delta") == whole.output_text


def test_json_schema_format_gives_valid_json(served):
    _, _, client = served
    schema = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad", "ok"]}, "awake": {"type": "boolean"},
                                               "note": {"type": ["boolean", "null"]}},
              "required": ["mood", "awake", "note"], "additionalProperties": False}
    reply = _respond(client, "a", input="Describe a person", max_output_tokens=200,
                     text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}})
    value = json.loads(reply.output_text)
    assert set(value) == {"mood", "awake", "note"} and value["mood"] in ("happy", "sad", "ok")
    assert isinstance(value["awake"], bool) and value["note"] in (True, False, None)
    assert reply.status == "completed"
    assert reply.text.format.type == "json_schema" and reply.text.format.name == "person"

    class Person(BaseModel):  # the client's own structured-output helper sends it as a strict schema
        mood: Literal["happy", "sad", "ok"]
        awake: bool
        note: bool | None

    parsed = client.responses.parse(model="a", input="Describe a person", max_output_tokens=200, temperature=0,
                                    text_format=Person)
    assert isinstance(parsed.output_parsed, Person)
    obj = _respond(client, "tiny", input="JSON please", max_output_tokens=300, text={"format": {"type": "json_object"}})
    if obj.status == "completed":
        assert isinstance(json.loads(obj.output_text), dict)
    else:  # a random model may write one long string; what it wrote is still the start of an object
        assert obj.incomplete_details.reason == "max_output_tokens" and obj.output_text.startswith("{")
    plain = _respond(client, "a", text={"format": {"type": "text"}})
    assert plain.output_text == _respond(client, "a").output_text


def test_logprobs_are_the_chat_routes(served):
    _, _, client = served
    chat = _chat(client, "a", [{"role": "user", "content": "Hello"}], max_tokens=5, logprobs=True, top_logprobs=2)
    reply = _respond(client, "a", max_output_tokens=5, include=["message.output_text.logprobs"], top_logprobs=2)
    got = reply.output[0].content[0].logprobs
    want = chat.choices[0].logprobs.content
    assert [(g.token, g.logprob, [t.token for t in g.top_logprobs]) for g in got] == \
        [(w.token, w.logprob, [t.token for t in w.top_logprobs]) for w in want]
    assert _respond(client, "a", max_output_tokens=5).output[0].content[0].logprobs == []


def test_include_adds_logprobs_to_reads_and_unknown_values_are_400(served):
    server, _, client = served
    logprobs = ["message.output_text.logprobs"]
    kept = _respond(client, "a", max_output_tokens=5, include=logprobs)
    assert len(kept.output[0].content[0].logprobs) == 5
    # a read shows them when its own include asks (the openai client sends include[]=..., curl may send include=...)
    assert client.responses.retrieve(kept.id, include=logprobs).model_dump() == kept.model_dump()
    assert client.responses.retrieve(kept.id).output[0].content[0].logprobs == []
    raw = httpx.get(f"{server.url}/v1/responses/{kept.id}", params={"include": logprobs[0]},
                    headers={"Authorization": f"Bearer {KEY}"}).json()
    assert raw["output"][0]["content"][0]["logprobs"] == kept.model_dump()["output"][0]["content"][0]["logprobs"]
    follow = _respond(client, "a", input="Tell me more", previous_response_id=kept.id)
    listed = client.responses.input_items.list(follow.id, include=logprobs).data
    assert [i.content[0].logprobs for i in listed if i.role == "assistant"] == [kept.output[0].content[0].logprobs]
    listed = client.responses.input_items.list(follow.id).data
    assert [i.content[0].logprobs for i in listed if i.role == "assistant"] == [[]]
    # a value OpenAI knows for items qlora never makes adds nothing; one it does not know is a 400, on each route
    plain = _respond(client, "a").output_text
    assert _respond(client, "a", include=["reasoning.encrypted_content"]).output_text == plain
    conversation = client.conversations.create(items=[{"role": "user", "content": "Hi"}])
    (item,) = client.conversations.items.list(conversation.id).data
    bad = ["message.output_text.logprobs", "message.output_text.nonsense"]
    for call in (lambda: _respond(client, "a", include=bad), lambda: client.responses.retrieve(kept.id, include=bad),
                 lambda: client.responses.input_items.list(follow.id, include=bad),
                 lambda: client.conversations.items.list(conversation.id, include=bad),
                 lambda: client.conversations.items.retrieve(item.id, conversation_id=conversation.id, include=bad),
                 lambda: client.conversations.items.create(conversation.id, items=[{"role": "user", "content": "x"}],
                                                           include=bad)):
        with pytest.raises(openai.BadRequestError) as exc:
            call()
        assert exc.value.param == "include" and exc.value.code == "invalid_value"
        assert "'message.output_text.nonsense'" in exc.value.body["message"]
    assert len(client.conversations.items.list(conversation.id).data) == 1  # the refused add added nothing


def test_a_failing_stream_sends_error_then_response_failed(tiny_model_dir):
    """The batcher closing mid-reply fails the rows it was decoding; a stream then ends as OpenAI's does,
    with an ``error`` event and ``response.failed`` (the response, status failed, with its error)."""
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tokenizer = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    for _ in range(5):  # a client lagging far behind its stream may see both replies end before the close: again
        batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=4, context_length=512).start()
        with BackgroundServer(build_app(batcher, "tiny", [])) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
            polled = _respond(client, max_output_tokens=400, background=True)
            events = []
            with client.responses.stream(model="tiny", input="Hello", max_output_tokens=400, temperature=0) as stream:
                for event in stream:
                    events.append(event)
                    if [e.type for e in events].count("response.output_text.delta") == 1:
                        batcher.close()  # at the first token: the row's next event is its failure
            failed = client.responses.retrieve(polled.id)
        if events[-1].type == "response.failed" and failed.status == "failed":
            break
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-2:] == ["error", "response.failed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-2].code == "server_shutdown" and "shutting down" in events[-2].message
    response = events[-1].response
    assert response.status == "failed" and response.error.code == "server_error" and response.usage is None
    assert response.error.message == events[-2].message and response.id == events[0].response.id
    (item,) = response.output  # what was streamed before the failure is kept
    assert item.status == "incomplete" and item.content[0].text == "".join(
        e.delta for e in events if e.type == "response.output_text.delta")
    assert failed.status == "failed" and failed.error.code == "server_error" and failed.background


def test_function_call_items_render_as_chat_tool_messages(tool_served):
    client = tool_served
    call = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    result = {"type": "function_call_output", "call_id": "call_1", "output": RESULT}
    chat_history = [ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": RESULT}]
    chat = client.chat.completions.create(model="tiny", messages=chat_history, tools=TOOLS, temperature=0,
                                          max_tokens=40)
    reply = client.responses.create(model="tiny", input=[ASK, call, result], tools=FLAT_TOOLS, temperature=0,
                                    max_output_tokens=40)
    assert reply.usage.input_tokens == chat.usage.prompt_tokens  # the same rendered prompt
    assert reply.output_text == chat.choices[0].message.content  # the trained final answer
    assert reply.output_text == ANSWER and reply.status == "completed"
    # streamed: the helper's final response holds the same answer
    with client.responses.stream(model="tiny", input=[ASK, call, result], tools=FLAT_TOOLS, temperature=0,
                                 max_output_tokens=40) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == ANSWER and final.status == "completed"
    assert final.usage.input_tokens == chat.usage.prompt_tokens
    # without the call items the prompt is shorter: they were rendered, not dropped
    shorter = client.responses.create(model="tiny", input=[ASK], tools=FLAT_TOOLS, temperature=0, max_output_tokens=1)
    assert shorter.usage.input_tokens < reply.usage.input_tokens


def test_the_model_calls_the_tool(tool_served):
    client = tool_served
    chat = client.chat.completions.create(model="tiny", messages=[ASK], tools=TOOLS, temperature=0, max_tokens=80)
    reply = client.responses.create(model="tiny", input=[ASK], tools=FLAT_TOOLS, temperature=0, max_output_tokens=80)
    (call,) = [item for item in reply.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.status == "completed" and reply.status == "completed"
    assert call.arguments == chat.choices[0].message.tool_calls[0].function.arguments
    assert reply.output_text == "" and reply.tools[0].name == "get_weather"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_a_forced_call_streams_and_returns_a_function_call_item(tool_served, choice):
    client = tool_served
    other = [{"role": "user", "content": "Hello!"}]
    reply = client.responses.create(model="tiny", input=other, tools=FLAT_TOOLS, tool_choice=choice, temperature=0,
                                    max_output_tokens=80)
    (call,) = reply.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    with client.responses.stream(model="tiny", input=other, tools=FLAT_TOOLS, tool_choice=choice, temperature=0,
                                 max_output_tokens=80) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    (streamed,) = final.output
    assert (streamed.type, streamed.name, streamed.arguments) == ("function_call", "get_weather", call.arguments)
    assert events[4].arguments == call.arguments


@pytest.mark.parametrize("kw, param", [
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/a.png"}]}]),
     "input.0.content.0"),
    (dict(input=[{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]), "input.0.content.0"),
    (dict(previous_response_id="resp_123"), "previous_response_id"),
    (dict(tools=[{"type": "web_search"}]), "tools.0.type"),
    (dict(tools=TOOLS), "tools.0.name"),  # the Chat Completions shape
    (dict(tools=[{"type": "function", "name": "bad name", "parameters": {"type": "object"}}]), "tools.0.name"),
    (dict(tools=FLAT_TOOLS, tool_choice={"type": "function", "name": "get_time"}), "tool_choice"),
    (dict(tool_choice={"type": "web_search_preview"}, tools=FLAT_TOOLS), "tool_choice"),
    (dict(text={"format": {"type": "xml"}}), "text.format.type"),
    (dict(text={"format": {"type": "json_schema", "name": "x", "strict": True,
                           "schema": {"type": "string", "pattern": "a(?=b)"}}}), "text.format.schema"),
    (dict(input=[{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{oops"}]), "input.0.arguments"),
    (dict(input=[{"type": "function_call_output", "output": "1"}]), "input.0.call_id"),
    (dict(input=[{"type": "computer_call_output", "call_id": "c"}]), "input.0.type"),
    (dict(input=[{"type": "reasoning", "summary": "thought"}]), "input.0.summary"),
    (dict(input=[{"role": "tool", "content": "1"}]), "input.0.role"),
    (dict(input="fox " * 600), "input"),
    (dict(extra_body={"max_tokens": 5}), "max_tokens"),
    (dict(temperature=5), "temperature"),
])
def test_bad_requests_are_400_naming_the_field(served, kw, param):
    _, _, client = served
    kw = {"model": "a", "input": "Hello", "max_output_tokens": 4} | kw
    with pytest.raises(openai.APIStatusError) as exc:
        client.responses.create(**kw)
    assert exc.value.status_code == 400
    assert exc.value.body["param"] == param and "\n" not in exc.value.body["message"]


def test_errors_have_openai_shape_and_status(served):
    server, _, client = served
    with pytest.raises(openai.NotFoundError) as exc:
        _respond(client, "no-such-model")
    assert exc.value.code == "model_not_found" and exc.value.param == "model"
    with pytest.raises(openai.BadRequestError) as exc:
        _respond(client, "a", previous_response_id="resp_abc")
    assert exc.value.code == "previous_response_not_found" and exc.value.param == "previous_response_id"
    assert "'resp_abc' not found" in exc.value.body["message"] and "whole conversation" in exc.value.body["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).responses.create(
            model="a", input="Hello")
    assert httpx.post(server.url + "/v1/responses", json={"model": "a", "input": "Hi"}).status_code == 401
    response = httpx.post(server.url + "/v1/responses", json={"model": "a"},
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"
    assert _respond(client, "a", store=True, metadata={"k": "v"}).metadata == {"k": "v"}


def test_disconnect_mid_stream_frees_the_row(served):
    server, batcher, _ = served
    before = batcher.load()
    body = {"model": "tiny", "input": "Hello", "max_output_tokens": 300, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/responses", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as response:
        assert response.status_code == 200
        lines = (line for line in response.iter_lines() if line.startswith("event: "))
        while next(lines) != "event: response.output_text.delta":  # decoding has started
            pass
    assert_row_dropped(batcher, before)


def test_disconnect_while_waiting_for_a_slot_never_takes_one(served):
    server, batcher, _ = served
    before = batcher.load()
    body = {"model": "tiny", "input": "Hello", "max_output_tokens": 300, "temperature": 0, "stream": True}
    with batcher.paused():
        with httpx.stream("POST", server.url + "/v1/responses", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as response:
            assert response.status_code == 200
            _wait(lambda: batcher.load()["waiting"] == 1)
        _wait(lambda: batcher._waiting[0].cancelled)  # the disconnect reached it while the loop is held
    assert_row_dropped(batcher, before)
    assert batcher.load()["tokens_generated"] == before["tokens_generated"]


def test_a_replayed_turn_of_text_and_parallel_calls_is_one_assistant_message():
    """Output items sent back as input (a message, then two function_calls, then their outputs) are one
    assistant turn with its text and both calls, then one tool message per output, in order."""
    from qlora.serve.responses import ResponsesRequest

    calls = [{"type": "function_call", "call_id": f"call_{k}", "name": "get_weather",
              "arguments": json.dumps({"city": city})} for k, city in enumerate(("Paris", "Rome"))]
    body = ResponsesRequest(model="tiny", instructions="Be brief.", input=[
        ASK, {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        *calls, *({"type": "function_call_output", "call_id": c["call_id"], "output": RESULT} for c in calls)])
    chat, origins = body.chat_request(body.conversation_items([]))
    messages = [m.message(i) for i, m in enumerate(chat.messages)]
    assert [m.role for m in messages] == ["system", "user", "assistant", "tool", "tool"]
    assert origins == ["instructions", "input.0", "input.1", "input.4", "input.5"]
    turn = messages[2]
    assert turn.content == "Checking."
    assert [(c["id"], c["function"]["arguments"]) for c in turn.tool_calls] == \
        [("call_0", {"city": "Paris"}), ("call_1", {"city": "Rome"})]
    assert [(m.tool_call_id, m.content) for m in messages[3:]] == [("call_0", RESULT), ("call_1", RESULT)]


def _turns(client, model, *turns, **kw):
    """Responses chained by previous_response_id, one per user turn."""
    replies, previous = [], None
    for text in turns:
        replies.append(_respond(client, model, input=text, previous_response_id=previous, **kw))
        previous = replies[-1].id
    return replies


def test_previous_response_id_continues_the_conversation(served):
    _, _, client = served
    first, second, third = _turns(client, "a", "Hello", "Tell me more", "And then?")
    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first.output_text},
                {"role": "user", "content": "Tell me more"}, {"role": "assistant", "content": second.output_text},
                {"role": "user", "content": "And then?"}]
    chat = _chat(client, "a", messages)
    assert third.output_text == chat.choices[0].message.content
    assert third.usage.input_tokens == chat.usage.prompt_tokens  # the same rendered conversation
    assert third.previous_response_id == second.id and third.store and first.previous_response_id is None
    # instructions are not carried over to the continuation; the model is the request's own
    ruled = _respond(client, "tiny", input="Hello", instructions="Answer in French.")
    follow = _respond(client, "a", input="Tell me more", previous_response_id=ruled.id)
    chat = _chat(client, "a", [{"role": "user", "content": "Hello"},
                               {"role": "assistant", "content": ruled.output_text},
                               {"role": "user", "content": "Tell me more"}])
    assert follow.output_text == chat.choices[0].message.content and follow.instructions is None
    assert follow.usage.input_tokens == chat.usage.prompt_tokens
    # streamed responses are kept too, and continue the same way
    with client.responses.stream(model="a", input="Hello", max_output_tokens=MAX_TOKENS, temperature=0) as stream:
        streamed = list(stream)[-1].response  # response.incomplete: the token limit cut it
    assert streamed.status == "incomplete"
    assert client.responses.retrieve(streamed.id).output_text == streamed.output_text
    after = _respond(client, "a", input="Tell me more", previous_response_id=streamed.id)
    assert after.output_text == _turns(client, "a", "Hello", "Tell me more")[1].output_text


def test_kept_responses_are_retrieved_listed_and_deleted(served):
    _, _, client = served
    first, second = _turns(client, "a", "Hello", "Tell me more")
    assert client.responses.retrieve(second.id).model_dump() == second.model_dump()
    items = client.responses.input_items.list(second.id)  # the model's input: newest first
    texts = [(item.type, getattr(item, "role", None), item.content[0].text) for item in items.data]
    assert texts == [("message", "user", "Tell me more"), ("message", "assistant", first.output_text),
                     ("message", "user", "Hello")]
    assert items.data[1].id == first.output[0].id and all(item.id for item in items.data)
    page = client.responses.input_items.list(second.id, order="asc", limit=2)
    assert [item.content[0].text for item in page.data] == ["Hello", first.output_text] and page.has_more
    rest = client.responses.input_items.list(second.id, order="asc", limit=2, after=page.data[-1].id)
    assert [item.content[0].text for item in rest.data] == ["Tell me more"] and not rest.has_more
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as exc:
        client.responses.retrieve(first.id)
    assert first.id in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        _respond(client, "a", input="Again", previous_response_id=first.id)
    assert exc.value.code == "previous_response_not_found"
    assert client.responses.retrieve(second.id).id == second.id  # the one that continued it holds its own copy
    unkept = _respond(client, "a", store=False)
    assert unkept.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)


def test_a_function_call_output_continues_the_response_that_called(tool_served):
    client = tool_served
    called = client.responses.create(model="tiny", input=[ASK], tools=FLAT_TOOLS, temperature=0, max_output_tokens=80)
    (call,) = [item for item in called.output if item.type == "function_call"]
    reply = client.responses.create(model="tiny", previous_response_id=called.id, tools=FLAT_TOOLS, temperature=0,
                                    max_output_tokens=40, input=[
                                        {"type": "function_call_output", "call_id": call.call_id, "output": RESULT}])
    whole = client.responses.create(model="tiny", tools=FLAT_TOOLS, temperature=0, max_output_tokens=40, input=[
        ASK, {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": RESULT}])
    assert reply.output_text == whole.output_text == ANSWER
    assert reply.usage.input_tokens == whole.usage.input_tokens


def test_truncation_auto_drops_the_oldest_turns(served):
    _, batcher, client = served
    filler = "fox " * 120
    turns = [{"role": "system", "content": "Be brief."}]
    for k in range(4):
        turns += [{"role": "user", "content": f"{k} {filler}"}, {"role": "assistant", "content": f"{k} {filler}"}]
    turns.append({"role": "user", "content": "Hello"})
    with pytest.raises(openai.APIStatusError) as exc:
        _respond(client, "a", input=turns)
    assert exc.value.status_code == 400 and exc.value.body["param"] == "input"
    reply = _respond(client, "a", input=turns, truncation="auto")
    # the oracle: the longest tail of whole turns (the system message kept) that the chat route accepts
    for start in range(1, len(turns), 2):
        try:
            chat = _chat(client, "a", turns[:1] + turns[start:])
            break
        except openai.APIStatusError as error:
            assert error.code == "context_length_exceeded"
    assert 1 < start < len(turns) - 1
    assert reply.output_text == chat.choices[0].message.content and reply.truncation == "auto"
    assert reply.usage.input_tokens == chat.usage.prompt_tokens < batcher.context_length
    kept = client.responses.input_items.list(reply.id, order="asc", limit=100).data
    assert [item.content[0].text for item in kept] == [m["content"] for m in turns[:1] + turns[start:]]
    too_long = [{"role": "user", "content": filler * 5}]  # a single turn cannot be dropped: still a 400
    with pytest.raises(openai.APIStatusError) as exc:
        _respond(client, "a", input=too_long, truncation="auto")
    assert exc.value.status_code == 400 and exc.value.code == "context_length_exceeded"


def test_the_store_keeps_the_most_recently_used():
    from qlora.serve.protocol import APIError
    from qlora.serve.response_store import ResponseStore

    store = ResponseStore(capacity=2)
    for k in range(3):
        store.keep({"id": f"resp_{k}", "status": "completed", "output": []}, [])
        if k == 1:
            store.get("resp_0")  # used: resp_1 is now the least recently used
    assert len(store) == 2 and store.get("resp_0") and store.get("resp_2")
    with pytest.raises(APIError) as exc:
        store.previous("resp_1")
    assert exc.value.status == 400 and exc.value.param == "previous_response_id" and "last 2" in exc.value.message
    none = ResponseStore(capacity=0)
    none.keep({"id": "resp_x", "status": "completed", "output": []}, [])
    with pytest.raises(APIError) as exc:
        none.get("resp_x")
    assert exc.value.status == 404 and "--stored-responses 0" in exc.value.message


def assert_row_dropped(batcher, before: dict) -> None:
    """The one request counted since ``before`` was cancelled within a minute, its row freed early (under 300
    tokens decoded), and nothing is left running or waiting."""
    deadline = time.monotonic() + 60
    while batcher.load()["requests_cancelled"] != before["requests_cancelled"] + 1:
        assert time.monotonic() < deadline, "the row was not dropped"
        time.sleep(0.01)
    after = batcher.load()
    assert after["running"] == after["waiting"] == 0
    assert after["tokens_generated"] - before["tokens_generated"] < 300


def test_reasoning_items_are_dropped_and_item_references_resolved(served):
    """Clients sending ``store: false`` (the Agents SDK) return the reasoning items of earlier turns, and may refer
    to stored items by id (``item_reference``); both were a 400. A reasoning item is accepted and reaches no prompt
    (the chat messages rendered carry no earlier reasoning): the oracle is the same input without it. A reference
    reads as the item it names (oracle: that item's text sent in full); an unknown id is a 404 naming it."""
    _, _, client = served
    first = _respond(client, "tiny", input="Hello")
    said = first.output[0]
    asked = client.responses.input_items.list(first.id).data[0]
    plain = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first.output_text},
             {"role": "user", "content": "Again"}]
    oracle = _respond(client, "tiny", input=plain)
    referred = _respond(client, "tiny", input=[{"type": "item_reference", "id": asked.id},
                                               {"type": "item_reference", "id": said.id}, plain[2]])
    reasoning = {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Greet back."}]}
    thought = _respond(client, "tiny", input=[plain[0], reasoning, *plain[1:]])
    for reply in (referred, thought):
        assert reply.output_text == oracle.output_text and reply.usage.input_tokens == oracle.usage.input_tokens
    kept = client.responses.input_items.list(thought.id, order="asc").data
    assert [item.type for item in kept] == ["message", "reasoning", "message", "message"] and kept[1].id == "rs_1"
    kept = client.responses.input_items.list(referred.id, order="asc").data
    assert [item.id for item in kept[:2]] == [asked.id, said.id]
    with pytest.raises(openai.NotFoundError) as exc:
        _respond(client, "tiny", input=[plain[0], {"type": "item_reference", "id": "msg_nowhere"}])
    assert exc.value.body["param"] == "input.1.id" and "'msg_nowhere'" in exc.value.body["message"]
