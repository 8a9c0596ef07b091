"""Chat messages as OpenAI clients send them to ``qlora serve``: content parts, a participant ``name``, and the
options around them, driven by the official ``openai`` client.

Oracles: ``apply_chat_template`` on the messages as vLLM hands them to the template (the ``name`` key kept, text
parts read as text), compared token by token through vLLM's ``prompt_logprobs`` (one entry per prompt token, keyed
by its id), and the errors OpenAI and vLLM answer.
"""

from __future__ import annotations

import pytest

from test_serve_vllm_extras import _serve, served  # noqa: F401 (the tiny model's fixture: its tokenizer adds BOS)
from test_serve import KEY

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

ASK = {"role": "user", "content": "What is two plus two?"}


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    """A tiny model with Kimi K2 Thinking's real template, which writes a message's ``name`` in place of its role."""
    from chat_families import model_for

    batcher, server, tokenizer, _ = _serve(model_for("kimi-k2-thinking", tmp_path_factory.mktemp("kimi")))
    with server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60), tokenizer
    batcher.close()


def _prompt_ids(client, messages: list[dict]) -> list[int]:
    """The prompt's token ids as the server rendered and tokenized it (vLLM's ``prompt_logprobs``, one a token)."""
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, temperature=0,
                                           extra_body={"prompt_logprobs": 0})
    return [int(next(iter(entry))) for entry in reply.model_extra["prompt_logprobs"][1:]]


def _template_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids[1:]  # the first has no prompt_logprobs entry


def test_a_name_reaches_the_template_as_vllm_passes_it(kimi):
    client, tokenizer = kimi
    named = [{"role": "system", "content": "Be brief.", "name": "rules"}, ASK | {"name": "alice"},
             {"role": "assistant", "content": "Four.", "name": "bot"}, {"role": "user", "content": "Thanks"}]
    rendered = _prompt_ids(client, named)
    assert rendered == _template_ids(tokenizer, named)
    assert "alice" in tokenizer.decode(rendered) and "rules" in tokenizer.decode(rendered)
    unnamed = [{k: v for k, v in m.items() if k != "name"} for m in named]
    assert _prompt_ids(client, unnamed) == _template_ids(tokenizer, unnamed) != rendered


PARTS = [{"role": "user", "content": [{"type": "input_text", "text": "What is two"},
                                      {"type": "text", "text": " plus two?"}]},
         {"role": "assistant", "content": [{"type": "output_text", "text": "I would rather"},
                                           {"type": "refusal", "refusal": "not say."}]},
         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]


def _texts(message: dict) -> list[str]:
    return [part.get("text", part.get("refusal")) for part in message["content"]]


def test_text_parts_of_every_kind_read_as_their_text_joined_by_newlines(kimi):
    """Kimi K2 Thinking's template reads a content as a string (it loops over none): the parts' texts joined with
    newlines, vLLM's join."""
    client, tokenizer = kimi
    joined = [m | {"content": "\n".join(_texts(m))} for m in PARTS]
    assert joined[0]["content"] == "What is two\n plus two?"
    assert _prompt_ids(client, PARTS) == _template_ids(tokenizer, joined)
    assert _prompt_ids(client, [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]) == \
        _template_ids(tokenizer, [{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize("family", ["gemma-3", "llama-4"])
def test_a_template_reading_parts_gets_the_parts_as_vllm_hands_them(tmp_path_factory, family):
    """Gemma 3's and Llama 4's templates loop over a message's content: they get its parts (each a text part, as
    vLLM normalizes them), which Gemma 3 trims one by one; a content sent as a string stays a string."""
    from chat_families import model_for

    batcher, server, tokenizer, _ = _serve(model_for(family, tmp_path_factory.mktemp(family)))
    as_parts = [m | {"content": [{"type": "text", "text": t} for t in _texts(m)]} for m in PARTS]
    with server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        rendered = _prompt_ids(client, PARTS)
        plain = _prompt_ids(client, [ASK])
    batcher.close()
    assert rendered == _template_ids(tokenizer, as_parts)
    assert rendered != _template_ids(tokenizer, [m | {"content": "\n".join(_texts(m))} for m in PARTS])
    assert plain == _template_ids(tokenizer, [ASK])


@pytest.mark.parametrize("part, param", [
    ({"type": "text"}, "messages.0.content.0.text"),
    ({"type": "text", "text": None}, "messages.0.content.0.text"),
    ({"type": "input_text", "text": 5}, "messages.0.content.0.text"),
    ({"type": "refusal", "refusal": "No."}, "messages.0.content"),  # a refusal is the assistant's
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "messages.0.content"),
])
def test_a_part_without_its_text_or_of_another_kind_is_a_400_naming_it(kimi, part, param):
    client, _ = kimi
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [part]}], max_tokens=1)
    assert exc.value.body["param"] == param
    assert exc.value.body["type"] == "invalid_request_error"


@pytest.mark.parametrize("stop", ["", ["\n", ""]])
def test_an_empty_stop_string_is_a_400_as_vllm_answers(kimi, stop):
    client, _ = kimi
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=[ASK], max_tokens=2, stop=stop)
    assert exc.value.body["param"] == "stop"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="tiny", prompt="Two plus two", max_tokens=2, stop=stop)
    assert exc.value.body["param"] == "stop"


def test_models_give_vllm_s_max_model_len(kimi):
    client, _ = kimi
    cards = list(client.models.list())
    assert [card.model_extra["max_model_len"] for card in cards] == [256]  # _serve's context length
    assert client.models.retrieve("tiny").model_extra["max_model_len"] == 256



def test_an_empty_text_prompt_is_its_special_tokens_alone_as_in_a_batch(served, kimi):  # noqa: F811
    """``prompt: ""`` is what ``[""]`` is: the tokenizer's BOS alone (OpenAI takes it); with nothing to start
    from (Kimi's tokenizer adds no BOS) both are a 400 naming the prompt, as vLLM answers."""
    _, client, tokenizer, _ = served
    assert tokenizer("").input_ids == [tokenizer.bos_token_id]
    texts = [client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0).choices[0].text
             for prompt in ("", [""], [tokenizer.bos_token_id])]
    assert texts[0] == texts[1] == texts[2]
    client, tokenizer = kimi
    assert tokenizer("").input_ids == []
    for prompt in ("", [""], []):
        with pytest.raises(openai.BadRequestError) as exc:
            client.completions.create(model="tiny", prompt=prompt, max_tokens=4)
        assert exc.value.body["param"] == "prompt"


@pytest.mark.parametrize("message", [{"role": "user"}, {"role": "user", "content": None},
                                     {"role": "system"}, {"role": "developer", "content": None},
                                     {"role": "tool", "tool_call_id": "call_1"}])
def test_a_message_without_content_is_a_400_naming_it_as_openai_answers(kimi, message):
    """OpenAI requires the content of every message but an assistant's (which may only call tools)."""
    client, _ = kimi
    messages = [ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]}, message]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=1)
    assert exc.value.body["param"] == "messages.2.content"
    assert exc.value.body["type"] == "invalid_request_error"
    assert ("null" in exc.value.body["message"]) == ("content" in message)


def test_an_assistant_message_may_have_no_content(kimi):
    client, tokenizer = kimi
    for said in ({"role": "assistant"}, {"role": "assistant", "content": None}):
        assert _prompt_ids(client, [ASK, said, {"role": "user", "content": "Hi"}]) == _template_ids(
            tokenizer, [ASK, {"role": "assistant", "content": ""}, {"role": "user", "content": "Hi"}])
