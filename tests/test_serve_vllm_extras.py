"""vLLM's extra body fields in ``qlora serve``, sent as a user sends them: the ``openai`` client's
``extra_body``.

Oracles: transformers' ``generate`` (greedy, fp32; ``min_new_tokens`` is vLLM's ``min_tokens``, a
list of ``eos_token_id`` its stop tokens), ``apply_chat_template`` with the same keyword arguments
(Qwen3's real template and its ``enable_thinking``; a template's own variables), the tokenizer's
decoding, Python's ``re`` and ``json`` for guided replies, and the semantics vLLM documents for
each field (its stop token or string left out of the text unless ``include_stop_str_in_output``).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

import qlora
from qlora.infer.template import stop_token_ids
from qlora.model.chat_format import ChatFormat

from test_serve import KEY

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown"
HELLO = [{"role": "user", "content": "Hello"}]


def _serve(model_dir, **app_kw):
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer
    from transformers import AutoModelForCausalLM

    model, tokenizer = qlora.load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=8, context_length=256).start()
    oracle = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    server = BackgroundServer(build_app(batcher, "tiny", [], api_key=KEY, **app_kw))
    return batcher, server, tokenizer, oracle


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    batcher, server, tokenizer, oracle = _serve(tiny_model_dir)
    with server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield batcher, client, tokenizer, oracle
    batcher.close()


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    from chat_families import model_for

    batcher, server, tokenizer, oracle = _serve(model_for("qwen3", tmp_path_factory.mktemp("qwen3")))
    with server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield batcher, client, tokenizer, oracle
    batcher.close()


def _greedy(oracle, ids: list[int], max_new: int, stops, **generate) -> list[int]:
    """transformers' greedy tokens after ``ids``, up to and including a stop token."""
    out = oracle.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new, eos_token_id=list(stops),
                          pad_token_id=0, **generate)[0, len(ids):].tolist()
    for k, token in enumerate(out):
        if token in stops:
            return out[:k + 1]
    return out


def _complete(client, prompt, **kw):
    return client.completions.create(**{"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, **kw})


def _chat(client, messages=HELLO, **kw):
    return client.chat.completions.create(**{"model": "tiny", "messages": messages, "max_tokens": 12,
                                             "temperature": 0, **kw})


def _streamed(client, **kw) -> str:
    return "".join(c.choices[0].text for c in client.completions.create(
        **{"model": "tiny", "max_tokens": 12, "temperature": 0, "stream": True, **kw}) if c.choices)


def _refused(call, param: str) -> str:
    with pytest.raises(openai.BadRequestError) as err:
        call()
    assert err.value.body["param"] == param, err.value.body
    return err.value.body["message"]


# --- chat templates ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("thinking", [False, True])
def test_chat_template_kwargs_reach_qwen3_template_as_apply_chat_template_kwargs(qwen3, thinking):
    batcher, client, tok, oracle = qwen3
    ids = tok.apply_chat_template(HELLO, add_generation_prompt=True, enable_thinking=thinking, tokenize=True,
                                  return_dict=False)
    plain = tok.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert (ids != plain) is (not thinking)  # enable_thinking=False writes an empty <think></think> block
    stops = stop_token_ids(batcher.model, tok)
    want = _greedy(oracle, ids, 10, stops)
    reply = _chat(client, max_tokens=10, extra_body={"chat_template_kwargs": {"enable_thinking": thinking}})
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.usage.completion_tokens == len(want)
    assert reply.choices[0].message.content == tok.decode([t for t in want if t not in stops], skip_special_tokens=True)


@pytest.mark.parametrize("saved", [None, {"enable_thinking": True}])
def test_server_template_kwargs_apply_under_each_request_s(saved, tmp_path):
    """``--default-chat-template-kwargs`` (vLLM's): every chat request renders with them, over the variables saved
    with the served format (an adapter's thinking mode), and a request's own ``chat_template_kwargs`` are merged over
    them, key by key."""
    from chat_families import family_tokenizer, model_for

    formats = {None: ChatFormat(family_tokenizer("qwen3").chat_template, "qwen3", template_kwargs=saved)} if saved \
        else None
    batcher, server, tok, oracle = _serve(model_for("qwen3", tmp_path), chat_formats=formats,
                                          template_kwargs={"enable_thinking": False, "persona": "fox"})
    stops = stop_token_ids(batcher.model, tok)
    with server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        for request, thinking in (({}, False), ({"enable_thinking": True}, True), ({"persona": "owl"}, False)):
            ids = tok.apply_chat_template(HELLO, add_generation_prompt=True, enable_thinking=thinking, tokenize=True,
                                          return_dict=False)
            want = _greedy(oracle, ids, 10, stops)
            reply = _chat(client, max_tokens=10, extra_body={"chat_template_kwargs": request})
            assert reply.usage.prompt_tokens == len(ids), request
            assert reply.choices[0].message.content == tok.decode([t for t in want if t not in stops],
                                                                  skip_special_tokens=True)
    batcher.close()


def test_template_variables_documents_and_prompt_ending_with_a_saved_chat_format(tiny_model_dir):
    template = ("{% if documents %}{% for d in documents %}[doc {{ d.title }}: {{ d.text }}]\n{% endfor %}{% endif %}"
                "{% for m in messages %}{{ m.role }}{% if persona is defined %} ({{ persona }}){% endif %}: "
                "{{ m.content }}{% if not (loop.last and continue_final_message) %}\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}assistant:{% endif %}")
    batcher, server, tok, oracle = _serve(tiny_model_dir, chat_formats={None: ChatFormat(template, "test template")})
    with server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        docs = [{"title": "fox", "text": "The fox is quick."}]
        options = {"chat_template_kwargs": {"persona": "a fox"}, "documents": docs}
        text = tok.apply_chat_template(HELLO, chat_template=template, add_generation_prompt=True, persona="a fox",
                                       documents=docs, tokenize=False)
        assert "[doc fox: The fox is quick.]" in text and "user (a fox): Hello" in text
        ids = tok(text, add_special_tokens=False).input_ids  # apply_chat_template(tokenize=True)'s ids
        stops = stop_token_ids(batcher.model, tok)
        want = _greedy(oracle, ids, 8, stops)
        reply = _chat(client, max_tokens=8, extra_body=options)
        assert reply.usage.prompt_tokens == len(ids)
        assert reply.choices[0].message.content == tok.decode([t for t in want if t not in stops],
                                                              skip_special_tokens=True)
        # continue_final_message: the assistant's turn is left open and continued
        start = [*HELLO, {"role": "assistant", "content": "The quick brown"}]
        text = tok.apply_chat_template(start, chat_template=template, continue_final_message=True, tokenize=False)
        assert text.endswith("assistant: The quick brown")
        ids = tok(text, add_special_tokens=False).input_ids  # apply_chat_template(tokenize=True)'s ids
        want = _greedy(oracle, ids, 8, stops)
        body = {"continue_final_message": True, "add_generation_prompt": False}
        reply = _chat(client, start, max_tokens=8, extra_body=body)
        assert reply.usage.prompt_tokens == len(ids)
        new = tok.decode([t for t in want if t not in stops], skip_special_tokens=True)
        assert reply.choices[0].message.content == new
        echoed = _chat(client, start, max_tokens=8, extra_body={**body, "echo": True}).choices[0].message
        assert (echoed.role, echoed.content) == ("assistant", "The quick brown" + new)
        stream = client.chat.completions.create(model="tiny", messages=start, max_tokens=8, temperature=0, stream=True,
                                                extra_body={**body, "echo": True})
        chunks = [c for c in stream if c.choices]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == echoed.content
        _refused(lambda: _chat(client, start, extra_body={"continue_final_message": True}), "continue_final_message")
    batcher.close()


def test_chat_template_refusals(served):
    _, client, _, _ = served
    assert "template variable" in _refused(
        lambda: _chat(client, extra_body={"chat_template_kwargs": {"tokenize": True}}), "chat_template_kwargs.tokenize")
    assert "no place for 'documents'" in _refused(  # the tiny model's ChatML template never reads them
        lambda: _chat(client, extra_body={"documents": [{"title": "a", "text": "b"}]}), "documents")


# --- stopping -----------------------------------------------------------------------------------------------


def test_stop_token_ids_and_min_tokens_equal_transformers_min_new_tokens(served):
    _, client, tok, oracle = served
    ids = tok(PROMPT).input_ids
    first = _greedy(oracle, ids, 1, [tok.eos_token_id])[0]
    assert first not in tok.all_special_ids
    reply = _complete(client, ids, extra_body={"stop_token_ids": [first]}).choices[0]
    assert (reply.text, reply.finish_reason) == ("", "stop")  # the stop token's text is left out, as vLLM
    stops = [tok.eos_token_id, first]
    for n in (1, 3):
        want = _greedy(oracle, ids, 12, stops, min_new_tokens=n)
        assert len(want) > n
        got = _complete(client, ids, extra_body={"stop_token_ids": [first], "min_tokens": n})
        shown = want[:-1] if want[-1] in stops else want
        assert got.choices[0].text == tok.decode(shown, skip_special_tokens=True)
        assert got.usage.completion_tokens == len(want)
    kept = _complete(client, ids, extra_body={"stop_token_ids": [first], "include_stop_str_in_output": True})
    assert kept.choices[0].text == tok.decode([first])


def test_min_tokens_holds_stop_strings_until_reached(served):
    _, client, tok, oracle = served
    ids = tok(PROMPT).input_ids
    plain = _complete(client, ids, max_tokens=16).choices[0].text
    words = _greedy(oracle, ids, 16, [tok.eos_token_id])
    early = tok.decode(words[:2], skip_special_tokens=True)
    stop = early.strip()[-1]  # a character the first two tokens write
    assert plain.startswith(early)
    assert _complete(client, ids, max_tokens=16, stop=stop).choices[0].text == plain[:plain.index(stop)]
    # with min_tokens 2, a match in the first two tokens' text does not count; later ones do
    late = tok.decode(words[:2], skip_special_tokens=True)
    rest = plain[len(late):]
    want = late + (rest[:rest.index(stop)] if stop in rest else rest)
    for stream in (False, True):
        kw = {"prompt": ids, "max_tokens": 16, "stop": stop, "extra_body": {"min_tokens": 2}}
        got = _streamed(client, **kw) if stream else _complete(client, **kw).choices[0].text
        assert got == want


def test_include_stop_str_in_output_keeps_the_stop_string(served):
    _, client, _, _ = served
    plain = _complete(client, PROMPT, max_tokens=16).choices[0].text
    stop = plain[3:6]
    cut = plain.index(stop)
    assert _complete(client, PROMPT, max_tokens=16, stop=stop).choices[0].text == plain[:cut]
    for stream in (False, True):
        kw = {"prompt": PROMPT, "max_tokens": 16, "stop": stop, "extra_body": {"include_stop_str_in_output": True}}
        got = _streamed(client, **kw) if stream else _complete(client, **kw).choices[0].text
        assert got == plain[:cut + len(stop)]


def test_ignore_eos_and_skip_special_tokens(served):
    _, client, tok, _ = served
    eos = tok.eos_token_id
    forced = {"logit_bias": {str(eos): 100}}
    reply = _complete(client, PROMPT, **forced)
    assert (reply.choices[0].text, reply.choices[0].finish_reason, reply.usage.completion_tokens) == ("", "stop", 1)
    reply = _complete(client, PROMPT, max_tokens=5, **forced, extra_body={"ignore_eos": True})
    assert (reply.choices[0].text, reply.choices[0].finish_reason, reply.usage.completion_tokens) == ("", "length", 5)
    shown = _complete(client, PROMPT, max_tokens=5, **forced,
                      extra_body={"ignore_eos": True, "skip_special_tokens": False}).choices[0].text
    assert shown == tok.decode([eos] * 5, skip_special_tokens=False) and tok.eos_token in shown
    chat = _chat(client, max_tokens=4, **forced, extra_body={"ignore_eos": True})
    assert (chat.choices[0].finish_reason, chat.usage.completion_tokens) == ("length", 4)
    response = client.responses.create(model="tiny", input="Hello", max_output_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True, **forced})
    assert (response.status, response.usage.output_tokens) == ("incomplete", 4)


def test_truncate_prompt_tokens_keeps_the_last_tokens(served):
    _, client, tok, _ = served
    ids = tok(PROMPT).input_ids
    reply = _complete(client, ids, extra_body={"truncate_prompt_tokens": 5})
    alone = _complete(client, ids[-5:])
    assert reply.choices[0].text == alone.choices[0].text and reply.usage.prompt_tokens == 5
    assert _chat(client, extra_body={"truncate_prompt_tokens": 3}).usage.prompt_tokens == 3
    _refused(lambda: _complete(client, ids, extra_body={"truncate_prompt_tokens": 0}), "truncate_prompt_tokens")


# --- guided decoding ------------------------------------------------------------------------------------------


# Every value bounded and keys closed, so that even a random model's reply ends
SCHEMA = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad", "ok"]}, "awake": {"type": "boolean"}},
          "required": ["mood", "awake"], "additionalProperties": False}


def _json_ok(text: str) -> bool:
    value = json.loads(text)
    return set(value) == {"mood", "awake"} and value["mood"] in ("happy", "sad", "ok") \
        and isinstance(value["awake"], bool)


@pytest.mark.parametrize("field", ["guided", "structured_outputs"])
def test_guided_choice_regex_and_json(served, field):
    _, client, _, _ = served
    choices = ["positive", "negative", "neutral: 50/50 (?)"]
    pattern = r"\d{3}-[a-z]{2}"

    def body(kind, value):
        return {f"guided_{kind}": value} if field == "guided" else {"structured_outputs": {kind: value}}

    assert not re.fullmatch(pattern, _chat(client).choices[0].message.content)
    for seed, temperature in ((None, 0), (1, 1.0), (2, 1.0)):
        kw = {"temperature": temperature, "seed": seed, "max_tokens": 40}
        reply = _chat(client, **kw, extra_body=body("choice", choices)).choices[0]
        assert reply.message.content in choices and reply.finish_reason == "stop"
        reply = _chat(client, **kw, extra_body=body("regex", pattern)).choices[0]
        assert re.fullmatch(pattern, reply.message.content) and reply.finish_reason == "stop"
        text = _complete(client, PROMPT, **kw, extra_body=body("regex", pattern)).choices[0].text
        assert re.fullmatch(pattern, text)
        kw["max_tokens"] = 200
        reply = _chat(client, **kw, extra_body=body("json", SCHEMA)).choices[0]
        assert _json_ok(reply.message.content) and reply.finish_reason == "stop"
        fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": True}}
        assert _chat(client, **kw, response_format=fmt).choices[0].message.content == reply.message.content
    as_text = _chat(client, max_tokens=200, extra_body=body("json", json.dumps(SCHEMA)))  # a schema sent as JSON text
    assert _json_ok(as_text.choices[0].message.content)
    streamed = _streamed(client, prompt=PROMPT, max_tokens=40, extra_body=body("choice", choices))
    assert streamed == _complete(client, PROMPT, max_tokens=40, extra_body=body("choice", choices)).choices[0].text
    assert streamed in choices


def test_guided_refusals(served):
    _, client, _, _ = served
    assert "no grammar engine" in _refused(lambda: _chat(client, extra_body={"guided_grammar": "root ::= \"a\""}),
                                           "guided_grammar")
    _refused(lambda: _chat(client, extra_body={"structured_outputs": {"grammar": "root ::= \"a\""}}),
             "structured_outputs.grammar")
    _refused(lambda: _chat(client, extra_body={"guided_regex": "(?=a)a"}), "guided_regex")
    _refused(lambda: _chat(client, extra_body={"guided_regex": "a", "guided_choice": ["a"]}), "guided_choice")
    _refused(lambda: _chat(client, extra_body={"guided_json": {"type": "array", "uniqueItems": True}}), "guided_json")
    _refused(lambda: _chat(client, response_format={"type": "json_object"}, extra_body={"guided_regex": "a"}),
             "guided_regex")
    _refused(lambda: _chat(client, extra_body={"guided_regex": "a", "ignore_eos": True}), "ignore_eos")


def test_a_guided_character_the_vocabulary_writes_only_in_byte_tokens(served):
    """Constrained decoding reads tokens as bytes: a character no token holds whole (an emoji in byte-level BPE) is
    written in pieces, at the start, later, or in JSON (raw or as an escape)."""
    _, client, tok, _ = served
    from qlora.infer.constrained import TokenTexts

    texts = TokenTexts.of(tok)
    assert not any("\U0001f600" in (texts.text(t) or "") for t in range(len(tok)))  # bytes only
    for stream in (False, True):
        for body, expected in (({"guided_choice": ["\U0001f600"]}, "\U0001f600"),
                               ({"guided_choice": ["a\U0001f600"]}, "a\U0001f600")):
            reply = _chat(client, stream=stream, extra_body=body)
            chunks = [c.choices[0] for c in reply if c.choices] if stream else None
            text = "".join(c.delta.content or "" for c in chunks) if stream else reply.choices[0].message.content
            finish = chunks[-1].finish_reason if stream else reply.choices[0].finish_reason
            assert (text, finish) == (expected, "stop")
    reply = _complete(client, PROMPT, max_tokens=20, extra_body={"guided_regex": "\U0001f600{1,3}"}).choices[0]
    assert re.fullmatch("\U0001f600{1,3}", reply.text) and reply.finish_reason == "stop"
    reply = _chat(client, max_tokens=40, extra_body={"guided_json": {"enum": ["\U0001f600"]}}).choices[0]
    assert reply.finish_reason == "stop" and json.loads(reply.message.content) == "\U0001f600"


# --- the rest -----------------------------------------------------------------------------------------------


def test_request_id_priority_beam_search(served):
    _, client, tok, _ = served
    reply = _chat(client, extra_body={"request_id": "abc123", "priority": 0, "length_penalty": 0.5})
    assert reply.id == "chatcmpl-abc123"
    assert reply.choices[0].message.content == _chat(client).choices[0].message.content
    assert _complete(client, PROMPT, extra_body={"request_id": "x"}).id == "cmpl-x"
    _refused(lambda: _chat(client, extra_body={"priority": 1}), "priority")
    _refused(lambda: _chat(client, extra_body={"use_beam_search": True}), "use_beam_search")
    _refused(lambda: _chat(client, max_tokens=2, extra_body={"min_tokens": 3}), "min_tokens")
    _refused(lambda: _complete(client, PROMPT, extra_body={"stop_token_ids": [len(tok)]}), "stop_token_ids.0")


def test_an_invalid_json_schema_is_a_400_naming_its_path_strict_or_not(served):
    """A schema JSON Schema itself does not allow was ignored where invalid and answered; now a 400 naming the value
    by path, as OpenAI validates schemas. A valid keyword left unenforced still decodes without strict."""
    _, client, _, _ = served
    bad = {"type": "object", "properties": {"a": {"type": "wat"}, "b": {"type": "string", "maxLength": -1}}}
    for strict in (False, True, None):
        spec = {"name": "x", "schema": bad} | ({} if strict is None else {"strict": strict})
        message = _refused(lambda: _chat(client, response_format={"type": "json_schema", "json_schema": spec}),
                           "response_format.json_schema.schema")
        assert "properties.a.type: 'wat'" in message and "properties.b.maxLength" in message
    _refused(lambda: _chat(client, extra_body={"guided_json": {"$ref": "#/$defs/none"}}), "guided_json")
    loose = {"type": "array", "uniqueItems": True, "maxItems": 2, "items": {"type": "integer"}}
    reply = _chat(client, max_tokens=40, response_format={"type": "json_schema",
                                                           "json_schema": {"name": "x", "schema": loose}})
    assert reply.choices[0].message.content.lstrip().startswith("[")  # answered, under the rest of the schema


def test_a_token_limit_beyond_the_context_left_is_a_400_naming_it(served):
    """A ``max_tokens`` (``max_completion_tokens``, ``max_output_tokens``) above the context the prompt leaves was
    silently lowered; vLLM and OpenAI answer 400 with the numbers (context, prompt, completion)."""
    batcher, client, _, _ = served
    context = batcher.context_length
    for kw, field in (({"max_tokens": context}, "max_tokens"), ({"max_completion_tokens": context},
                                                                  "max_completion_tokens")):
        with pytest.raises(openai.BadRequestError) as err:
            _chat(client, **{"max_tokens": None, **kw})
        body = err.value.body
        assert body["param"] == field and body["code"] == "context_length_exceeded", body
        used = int(re.search(r"\((\d+) in the messages", body["message"])[1])
        assert f"maximum context length is {context} tokens" in body["message"]
        assert f"you requested {used + context} tokens" in body["message"] and f"at most {context - used}" in \
            body["message"]
        assert _chat(client, **{"max_tokens": None, field: context - used}).choices[0].finish_reason
    with pytest.raises(openai.BadRequestError) as err:
        _complete(client, PROMPT, max_tokens=context)
    assert err.value.body["param"] == "max_tokens" and "in the prompt" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="tiny", input="Hello", max_output_tokens=context)
    assert err.value.body["param"] == "max_output_tokens" and "'max_output_tokens'" in err.value.body["message"]


def test_min_tokens_under_a_constraint_as_vllm_serves_it(served):
    """``min_tokens`` with a constraint was a 400; vLLM masks the stop tokens while the constraint may go on, and lets
    a reply its constraint must end stop before ``min_tokens``. The end-of-turn token is biased up so that it is
    chosen as soon as it is allowed: the oracle is then exact (greedy)."""
    _, client, tok, _ = served
    bias = {str(tok.eos_token_id): 100}
    regex = {"guided_regex": "[a-z ]+"}
    for min_tokens in (0, 5):
        reply = _complete(client, PROMPT, logit_bias=bias, extra_body=regex | {"min_tokens": min_tokens})
        text, finish = reply.choices[0].text, reply.choices[0].finish_reason
        assert finish == "stop" and re.fullmatch("[a-z ]+", text), (text, finish)
        # a regex that may grow: one token (the least the pattern takes) then the stop, or min_tokens then the stop
        assert reply.usage.completion_tokens == max(1, min_tokens) + 1
        if min_tokens:
            assert text.startswith(short)
        short = text
    for body in ({"guided_choice": ["yes"]}, {"guided_json": {"type": "boolean"}}):
        reply = _chat(client, max_tokens=12, extra_body=body | {"min_tokens": 10})
        choice = reply.choices[0]
        assert choice.finish_reason == "stop" and reply.usage.completion_tokens < 10  # the constraint must end
        assert json.loads(choice.message.content) in (True, False) if "guided_json" in body else \
            choice.message.content == "yes"
    spec = {"name": "flag", "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                       "required": ["ok"], "additionalProperties": False}}
    reply = _chat(client, max_tokens=60, response_format={"type": "json_schema", "json_schema": spec},
                  extra_body={"min_tokens": 60})
    assert reply.choices[0].finish_reason == "stop" and reply.usage.completion_tokens < 60, reply
    assert set(json.loads(reply.choices[0].message.content)) == {"ok"}
