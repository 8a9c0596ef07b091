"""``background: true`` on ``POST /v1/responses``, driven by the official ``openai`` client.

Oracles: the same request without ``background`` (greedy: the same reply and usage), the batcher's
counters (a cancelled response's row is dropped), the client's own parsing of response objects and
stream events, and the stream's sequence numbers (a resumed stream is the tail of the whole one).
"""

from __future__ import annotations

import time

import pytest

from test_serve import KEY, adapters  # noqa: F401  (the fixture is shared: two saved random adapters)
from test_serve_responses import _respond, assert_row_dropped, served  # noqa: F401

openai = pytest.importorskip("openai")


def _until(client, response_id, done, timeout=60):
    """Poll the response until ``done(response)``."""
    deadline = time.monotonic() + timeout
    while not done(response := client.responses.retrieve(response_id)):
        assert time.monotonic() < deadline, f"still {response.status}"
        time.sleep(0.02)
    return response


def test_a_background_response_is_polled_to_the_reply_without_background(served):
    _, _, client = served
    whole = _respond(client, "a", max_output_tokens=12)
    queued = _respond(client, "a", max_output_tokens=12, background=True)
    assert queued.status in ("queued", "in_progress") and queued.background and queued.output == []
    assert queued.usage is None and queued.completed_at is None
    final = _until(client, queued.id, lambda r: r.status not in ("queued", "in_progress"))
    assert final.status == whole.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.output_text == whole.output_text and final.usage == whole.usage and final.background
    # it is kept and continues like any stored response
    follow = _respond(client, "a", input="Tell me more", previous_response_id=final.id)
    again = _respond(client, "a", input="Tell me more", previous_response_id=whole.id)
    assert follow.output_text == again.output_text
    # a finished response cannot be cancelled, nor one made without background
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.cancel(final.id)
    assert exc.value.body["message"] == "Cannot cancel an incomplete response."
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.cancel(whole.id)
    assert "synchronous" in exc.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_none")


def test_background_needs_store(served):
    _, _, client = served
    with pytest.raises(openai.BadRequestError) as exc:
        _respond(client, "a", background=True, store=False)
    assert exc.value.param == "background" and "store" in exc.value.body["message"]


def test_cancel_stops_a_running_background_response_and_frees_its_row(served):
    _, batcher, client = served
    before = batcher.load()
    started = _respond(client, "tiny", max_output_tokens=300, background=True)
    running = _until(client, started.id, lambda r: r.status == "in_progress")  # decoding has started
    with pytest.raises(openai.BadRequestError) as exc:  # not while it runs
        client.responses.delete(running.id)
    assert "in-flight" in exc.value.body["message"]
    cancelled = client.responses.cancel(started.id)
    assert cancelled.status == "cancelled" and cancelled.id == started.id and cancelled.usage is None
    assert_row_dropped(batcher, before)
    assert client.responses.retrieve(started.id).status == "cancelled"
    assert client.responses.cancel(started.id).status == "cancelled"  # cancelling again changes nothing
    client.responses.delete(started.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(started.id)


def test_a_background_stream_is_resumed_after_any_event(served):
    _, _, client = served
    whole = _respond(client, "a", max_output_tokens=12)
    events = list(client.responses.create(model="a", input="Hello", max_output_tokens=12, temperature=0,
                                          background=True, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.queued", "response.in_progress"]
    assert kinds[-1] == "response.incomplete" and [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "queued" and events[2].response.status == "in_progress"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage == whole.usage
    for after in (-1, 0, 3, len(events) - 2, len(events) - 1):
        resumed = list(client.responses.retrieve(final.id, stream=True, starting_after=after))
        assert [e.model_dump() for e in resumed] == [e.model_dump() for e in events[after + 1:]]
    # a client that hangs up mid-stream picks it up where it left off; the generation went on meanwhile
    stream = client.responses.create(model="a", input="Hello", max_output_tokens=12, temperature=0, background=True,
                                     stream=True)
    seen = [next(iter(stream)) for _ in range(4)]
    stream.close()
    rest = list(client.responses.retrieve(seen[0].response.id, stream=True, starting_after=seen[-1].sequence_number))
    assert [e.sequence_number for e in seen + rest] == list(range(len(events)))
    assert [e.type for e in seen + rest] == kinds and rest[-1].response.output_text == whole.output_text
    # only a background response made with stream=true has a stream to resume
    polled = _respond(client, "a", max_output_tokens=2, background=True)
    for response_id in (polled.id, whole.id):
        with pytest.raises(openai.BadRequestError) as exc:
            list(client.responses.retrieve(response_id, stream=True))
        assert exc.value.param == "stream"


def test_a_running_background_response_is_never_dropped_from_the_store():
    from qlora.serve.protocol import APIError
    from qlora.serve.response_store import ResponseStore

    store = ResponseStore(capacity=2)
    store.keep({"id": "resp_bg", "status": "queued", "output": []}, [])
    for k in range(3):
        store.keep({"id": f"resp_{k}", "status": "completed", "output": []}, [])
    assert len(store) == 3 and store.get("resp_bg").running  # two finished ones, and the running one
    with pytest.raises(APIError) as exc:
        store.previous("resp_bg")
    assert exc.value.param == "previous_response_id" and "queued" in exc.value.message
    with pytest.raises(APIError):
        store.get("resp_0")
    store.keep({"id": "resp_bg", "status": "completed", "output": []}, [])  # once finished it counts
    assert len(store) == 2 and store.get("resp_bg").response["status"] == "completed"
    with pytest.raises(APIError):
        store.get("resp_1")


def test_a_running_background_response_shows_the_text_streamed_so_far(served):
    _, batcher, client = served
    logprobs = ["message.output_text.logprobs"]
    for _ in range(5):  # a client that lags far behind its stream may see the reply end before the pause: again
        stream = client.responses.create(model="tiny", input="Hello", max_output_tokens=400, temperature=0,
                                         background=True, stream=True, include=logprobs)
        events, seen = iter(stream), []
        while sum(e.type == "response.output_text.delta" for e in seen) < 3:
            seen.append(next(events))
        response_id = seen[0].response.id
        with batcher.paused():  # no decode step meanwhile: the response holds still
            partial = client.responses.retrieve(response_id, include=logprobs)
            bare = client.responses.retrieve(response_id)
        seen += list(events)
        if partial.status != "incomplete":
            break
    final = seen[-1].response
    assert final.status == "incomplete" and final.usage.output_tokens == 400
    deltas = [e.delta for e in seen if e.type == "response.output_text.delta"]
    assert partial.status == bare.status == "in_progress" and partial.usage is None and partial.completed_at is None
    (item,) = partial.output
    assert item.type == "message" and item.status == "in_progress" and item.id == final.output[0].id
    # the text of the deltas sent so far (three at least), a strict prefix of the final text
    assert partial.output_text in {"".join(deltas[:j]) for j in range(3, len(deltas))}
    assert final.output_text.startswith(partial.output_text) and partial.output_text != final.output_text
    assert bare.output_text == partial.output_text and bare.output[0].content[0].logprobs == []
    # its logprobs are the final response's first ones, one per token of the text so far
    got, want = item.content[0].logprobs, final.output[0].content[0].logprobs
    assert 3 <= len(got) < len(want) and [g.model_dump() for g in got] == [w.model_dump() for w in want[:len(got)]]
    assert client.responses.retrieve(response_id, include=logprobs).model_dump() == final.model_dump()


LOGPROBS = ["message.output_text.logprobs"]


def _cut(response, whole, seen: str = "") -> None:
    """``response`` (cancelled or failed) keeps the text generated so far: one message item, ``incomplete``, whose
    text (and logprobs, one per token) begin the reply that went to the end, and begin with ``seen``."""
    (item,) = response.output
    assert item.type == "message" and item.status == "incomplete" and item.role == "assistant"
    text, full = item.content[0].text, whole.output[0].content[0]
    assert text and text.startswith(seen) and full.text.startswith(text) and text != full.text
    got, want = item.content[0].logprobs, full.logprobs
    assert 0 < len(got) < len(want) and [g.model_dump() for g in got] == [w.model_dump() for w in want[:len(got)]]


def test_a_cancelled_background_response_keeps_its_output_so_far(served):
    """OpenAI's cancelled response keeps what the model generated before the cancel: polled or streamed, the
    cancel's answer, a later retrieve and the stream's last event show the same partial message."""
    _, _, client = served
    whole = _respond(client, "tiny", max_output_tokens=300, include=LOGPROBS)
    started = _respond(client, "tiny", max_output_tokens=300, background=True, include=LOGPROBS)
    partial = _until(client, started.id, lambda r: r.status != "in_progress" or len(r.output_text) > 0,
                     ).output_text  # noqa: E124
    cancelled = client.responses.cancel(started.id)
    _cut(cancelled, whole, partial)
    assert client.responses.retrieve(started.id, include=LOGPROBS).model_dump() == cancelled.model_dump()
    assert client.responses.cancel(started.id).model_dump() == cancelled.model_dump()

    stream = client.responses.create(model="tiny", input="Hello", max_output_tokens=300, temperature=0,
                                     background=True, stream=True, include=LOGPROBS)
    events, seen = iter(stream), []
    while sum(e.type == "response.output_text.delta" for e in seen) < 3:
        seen.append(next(events))
    response_id = seen[0].response.id
    cancelled = client.responses.cancel(response_id)
    seen += list(events)
    assert seen[-1].type == "response.failed" and seen[-1].response.status == "cancelled"
    streamed = "".join(e.delta for e in seen if e.type == "response.output_text.delta")
    assert seen[-1].response.model_dump() == cancelled.model_dump()
    assert cancelled.output_text == streamed
    _cut(cancelled, whole)
    replayed = list(client.responses.retrieve(response_id, stream=True))
    assert [e.model_dump() for e in replayed] == [e.model_dump() for e in seen]


@pytest.fixture
def fault(monkeypatch):
    """An internal error (a bug) at the fourth piece of text a Responses stream writes."""
    from qlora.serve.responses import ResponseWriter

    real, calls = ResponseWriter.logprobs, []

    def failing(self, entries):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected fault")
        return real(self, entries)

    monkeypatch.setattr(ResponseWriter, "logprobs", failing)
    return calls


@pytest.mark.parametrize("background", [True, False])
def test_an_internal_error_ends_the_stream_with_error_then_failed_keeping_the_output(served, fault, background):
    """A bug while a response streams ends its stream as OpenAI's failures do: an ``error`` event, then
    ``response.failed`` whose response carries the error and the text streamed before it; a background
    response reads back the same."""
    _, batcher, client = served
    before = batcher.load()
    events = list(client.responses.create(model="tiny", input="Hello", max_output_tokens=300, temperature=0,
                                          background=background, stream=True))
    kinds = [e.type for e in events]
    assert kinds[-2:] == ["error", "response.failed"] and [e.sequence_number for e in events] == list(range(len(events)))
    error, failed = events[-2], events[-1].response
    assert error.code == "server_error" and error.message == "Internal error: RuntimeError: injected fault"
    assert failed.status == "failed" and failed.error.code == "server_error" and failed.error.message == error.message
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    (item,) = failed.output
    assert len(deltas) == 3 and item.status == "incomplete" and item.content[0].text == "".join(deltas)
    assert_row_dropped(batcher, before)
    if background:
        assert client.responses.retrieve(failed.id).model_dump() == failed.model_dump()
