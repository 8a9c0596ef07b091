"""The Conversations API (``/v1/conversations``) and ``conversation`` on ``POST /v1/responses``,
driven by the official ``openai`` client.

Oracles: the same turns sent as one whole ``input`` (greedy: the same reply and prompt length),
the items a client put in and read back (ids, order, pages), and the client's own parsing.
"""

from __future__ import annotations

import pytest

from test_serve import KEY, adapters  # noqa: F401  (the fixture is shared: two saved random adapters)
from test_serve_responses import _respond, served  # noqa: F401

openai = pytest.importorskip("openai")


def _texts(items):
    return [(item.type, item.role, item.content[0].text) for item in items]


def test_conversations_and_their_items_round_trip(served):
    _, _, client = served
    conversation = client.conversations.create(items=[{"role": "user", "content": "Hi"}], metadata={"topic": "demo"})
    assert conversation.id.startswith("conv_") and conversation.object == "conversation"
    assert client.conversations.retrieve(conversation.id) == conversation and conversation.metadata == {"topic": "demo"}
    updated = client.conversations.update(conversation.id, metadata={"topic": "other"})
    assert updated.metadata == {"topic": "other"} and client.conversations.retrieve(conversation.id).metadata == {
        "topic": "other"}
    added = client.conversations.items.create(conversation.id, items=[
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hey"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "More"}]}])
    assert [item.content[0].text for item in added.data] == ["Hey", "More"] and not added.has_more
    listed = client.conversations.items.list(conversation.id, order="asc")
    assert _texts(listed.data) == [("message", "user", "Hi"), ("message", "assistant", "Hey"),
                                   ("message", "user", "More")]
    assert [item.id for item in listed.data[1:]] == [item.id for item in added.data]
    newest = client.conversations.items.list(conversation.id)  # newest first by default
    assert [item.id for item in newest.data] == [item.id for item in listed.data[::-1]]
    page = client.conversations.items.list(conversation.id, order="asc", limit=2)
    assert page.has_more and [item.id for item in page.data] == [item.id for item in listed.data[:2]]
    rest = client.conversations.items.list(conversation.id, order="asc", limit=2, after=page.data[-1].id)
    assert not rest.has_more and [item.id for item in rest.data] == [listed.data[2].id]
    middle = listed.data[1]
    assert client.conversations.items.retrieve(middle.id, conversation_id=conversation.id) == middle
    assert client.conversations.items.delete(middle.id, conversation_id=conversation.id).id == conversation.id
    assert _texts(client.conversations.items.list(conversation.id, order="asc").data) == [
        ("message", "user", "Hi"), ("message", "user", "More")]
    with pytest.raises(openai.NotFoundError) as exc:
        client.conversations.items.retrieve(middle.id, conversation_id=conversation.id)
    assert middle.id in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:  # items are checked as Responses input items
        client.conversations.items.create(conversation.id, items=[{"role": "tool", "content": "1"}])
    assert exc.value.param == "items.0.role"
    with pytest.raises(openai.BadRequestError) as exc:
        client.conversations.items.create(conversation.id, items=[{"role": "user", "content": "x"}] * 21)
    assert exc.value.param == "items"
    deleted = client.conversations.delete(conversation.id)
    assert deleted.deleted and deleted.id == conversation.id and deleted.object == "conversation.deleted"
    with pytest.raises(openai.NotFoundError) as exc:
        client.conversations.retrieve(conversation.id)
    assert conversation.id in exc.value.body["message"]


def test_a_conversation_carries_the_turns_of_its_responses(served):
    _, _, client = served
    conversation = client.conversations.create()
    first = _respond(client, "a", input="Hello", conversation=conversation.id)
    second = _respond(client, "a", input="Tell me more", conversation={"id": conversation.id})
    assert first.conversation.id == second.conversation.id == conversation.id
    whole = _respond(client, "a", input=[{"role": "user", "content": "Hello"},
                                         {"role": "assistant", "content": first.output_text},
                                         {"role": "user", "content": "Tell me more"}])
    assert second.output_text == whole.output_text and second.usage.input_tokens == whole.usage.input_tokens
    items = client.conversations.items.list(conversation.id, order="asc").data
    assert _texts(items) == [("message", "user", "Hello"), ("message", "assistant", first.output_text),
                             ("message", "user", "Tell me more"), ("message", "assistant", second.output_text)]
    assert items[1].id == first.output[0].id and items[3].id == second.output[0].id
    # the response's input items are the conversation it read, with the conversation's ids
    read = client.responses.input_items.list(second.id, order="asc").data
    assert [item.id for item in read] == [item.id for item in items[:3]]
    # a streamed response joins the conversation too
    with client.responses.stream(model="a", input="And then?", max_output_tokens=4, temperature=0,
                                 conversation=conversation.id) as stream:
        streamed = list(stream)[-1].response  # response.incomplete: the token limit cut it
    assert client.conversations.items.list(conversation.id, limit=1).data[0].id == streamed.output[0].id


def test_conversation_errors(served):
    _, _, client = served
    with pytest.raises(openai.NotFoundError) as exc:
        _respond(client, "a", conversation="conv_missing")
    assert exc.value.param == "conversation" and "'conv_missing' not found" in exc.value.body["message"]
    conversation = client.conversations.create()
    kept = _respond(client, "a")
    with pytest.raises(openai.BadRequestError) as exc:
        _respond(client, "a", conversation=conversation.id, previous_response_id=kept.id)
    assert exc.value.param == "conversation" and "previous_response_id" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        _respond(client, "a", conversation={"name": "x"})
    assert exc.value.param == "conversation"
    for call in (lambda: client.conversations.retrieve("conv_missing"),
                 lambda: client.conversations.items.list("conv_missing"),
                 lambda: client.conversations.delete("conv_missing")):
        with pytest.raises(openai.NotFoundError) as exc:
            call()
        assert "'conv_missing' not found" in exc.value.body["message"]
    assert client.conversations.items.list(conversation.id).data == []  # a refused response adds nothing


def test_the_conversation_store_keeps_the_most_recently_used():
    from qlora.serve.conversations import ConversationStore
    from qlora.serve.protocol import APIError

    store = ConversationStore(capacity=2)
    first, second = store.create([], None), store.create([], None)
    store.get(first.id)  # used: second is now the least recently used
    third = store.create([], {"k": "v"})
    assert len(store) == 2 and store.get(first.id) and store.get(third.id).metadata == {"k": "v"}
    with pytest.raises(APIError) as exc:
        store.get(second.id)
    assert exc.value.status == 404 and "last 2" in exc.value.message
    with pytest.raises(APIError) as exc:
        ConversationStore(capacity=0).create([], None)
    assert "--stored-conversations 0" in exc.value.message


def test_conversation_items_may_be_item_references_as_responses_input_may(served):
    """``item_reference`` items resolve to the stored items they name, as in a Responses ``input`` (they were a 400
    here): on creating a conversation and on adding items. Oracle: the referred items' own text and ids, and a
    response over the conversation equal to the same turns sent whole; an unknown id is a 404 naming it."""
    _, _, client = served
    first = _respond(client, "a", input="Hello")
    asked, said = client.responses.input_items.list(first.id).data[0], first.output[0]
    conversation = client.conversations.create(items=[{"type": "item_reference", "id": asked.id}])
    added = client.conversations.items.create(conversation.id, items=[{"type": "item_reference", "id": said.id}])
    assert added.data[0].id == said.id and added.data[0].content[0].text == first.output_text
    items = client.conversations.items.list(conversation.id, order="asc").data
    assert _texts(items) == [("message", "user", "Hello"), ("message", "assistant", first.output_text)]
    assert [item.id for item in items] == [asked.id, said.id]
    reply = _respond(client, "a", input="Tell me more", conversation=conversation.id)
    whole = _respond(client, "a", input=[{"role": "user", "content": "Hello"},
                                         {"role": "assistant", "content": first.output_text},
                                         {"role": "user", "content": "Tell me more"}])
    assert reply.output_text == whole.output_text and reply.usage.input_tokens == whole.usage.input_tokens
    for create in (lambda items: client.conversations.create(items=items),
                   lambda items: client.conversations.items.create(conversation.id, items=items)):
        with pytest.raises(openai.NotFoundError) as exc:
            create([{"role": "user", "content": "Hi"}, {"type": "item_reference", "id": "msg_nowhere"}])
        assert exc.value.body["param"] == "items.1.id" and "'msg_nowhere'" in exc.value.body["message"]
