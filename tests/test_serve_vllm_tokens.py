"""vLLM's token-level extras in ``qlora serve``: ``allowed_token_ids``, ``bad_words``, ``prompt_logprobs``,
``return_tokens_as_token_ids``, ``add_special_tokens`` and a request's own ``chat_template``, sent as the
``openai`` client's ``extra_body``.

Oracles: transformers' greedy ``generate`` (fp32) with ``prefix_allowed_tokens_fn`` (only the allowed ids)
and ``bad_words_ids`` (the token sequences vLLM derives from each word: as written, and after a space when
that is another sequence of the same length; vLLM matches a word's leading tokens in the reply only), the
``log_softmax`` of transformers' forward over the prompt, the tokenizer, and ``apply_chat_template`` with the
request's template.
"""

from __future__ import annotations

import json

import pytest
import torch

from qlora.infer.template import stop_token_ids
from qlora.model.chat_format import ChatFormat

from test_serve import KEY
from test_serve_vllm_extras import HELLO, PROMPT, _chat, _complete, _greedy, _refused, _serve

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

TEMPLATE = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}[bot]{% endif %}")


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    batcher, server, tokenizer, oracle = _serve(tiny_model_dir, trust_request_chat_template=True,
                                                chat_formats={None: ChatFormat("{{ messages[0].content }}", "saved")})
    with server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield batcher, client, tokenizer, oracle
    batcher.close()


def _ids(logprobs) -> list[int]:
    """The token ids of a completion's logprobs written with return_tokens_as_token_ids."""
    assert all(t.startswith("token_id:") for t in logprobs.tokens)
    return [int(t.removeprefix("token_id:")) for t in logprobs.tokens]


def _reply_ids(client, ids: list[int], **body) -> tuple[list[int], str]:
    """A greedy completion's token ids (the stop token left out, as logprobs leave it) and finish reason."""
    choice = _complete(client, ids, logprobs=0, extra_body={"return_tokens_as_token_ids": True, **body}).choices[0]
    return _ids(choice.logprobs), choice.finish_reason


def _shown(want: list[int], stops) -> list[int]:
    return want[:-1] if want and want[-1] in stops else want


def test_allowed_token_ids_equal_generate_restricted_to_them(served):
    _, client, tok, oracle = served
    ids = tok(PROMPT).input_ids
    allowed = sorted(set(tok("jumps over the lazy dog", add_special_tokens=False).input_ids))
    plain = _greedy(oracle, ids, 12, [tok.eos_token_id])
    assert not set(plain) <= set(allowed)  # the restriction changes the reply
    want = _greedy(oracle, ids, 12, [tok.eos_token_id], prefix_allowed_tokens_fn=lambda *_: allowed)
    assert set(want) <= set(allowed) and want != plain
    got, finish = _reply_ids(client, ids, allowed_token_ids=allowed)
    assert got == want and finish == "length"  # EOS is not allowed: the reply runs to max_tokens
    with_eos = allowed + [tok.eos_token_id]
    want = _greedy(oracle, ids, 12, [tok.eos_token_id], prefix_allowed_tokens_fn=lambda *_: with_eos)
    assert _reply_ids(client, ids, allowed_token_ids=with_eos)[0] == _shown(want, [tok.eos_token_id])
    for seed in (1, 2):  # sampled: only allowed ids, with penalties and top_p too
        choice = _complete(client, ids, temperature=1.0, seed=seed, logprobs=0, presence_penalty=1.0, top_p=0.9,
                           extra_body={"return_tokens_as_token_ids": True, "allowed_token_ids": allowed}).choices[0]
        assert set(_ids(choice.logprobs)) <= set(allowed) and len(choice.logprobs.tokens) == 12
    chat = _chat(client, logprobs=True, extra_body={"allowed_token_ids": allowed, "return_tokens_as_token_ids": True})
    assert {int(c.token.removeprefix("token_id:")) for c in chat.choices[0].logprobs.content} <= set(allowed)
    stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0, stream=True,
                                            extra_body={"allowed_token_ids": allowed})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == chat.choices[0].message.content
    response = client.responses.create(model="tiny", input="Hello", max_output_tokens=12, temperature=0,
                                       extra_body={"allowed_token_ids": allowed})
    assert response.output_text == chat.choices[0].message.content
    _refused(lambda: _chat(client, extra_body={"allowed_token_ids": []}), "allowed_token_ids")
    _refused(lambda: _chat(client, extra_body={"allowed_token_ids": [3, len(tok)]}), "allowed_token_ids.1")


def _bad_word_ids(tok, word: str) -> list[list[int]]:
    """vLLM's token sequences of a bad word (its documented derivation)."""
    bare = tok.encode(word.lstrip(), add_special_tokens=False)
    spaced = tok.encode(" " + word.lstrip(), add_special_tokens=False)
    return [bare] + ([spaced] if spaced[0] != bare[0] and len(spaced) == len(bare) else [])


def _pair_word(tok, reply: list[int]) -> tuple[int, str]:
    """A position k >= 1 of ``reply`` and a word written by exactly the tokens reply[k], reply[k + 1]."""
    for k in range(1, len(reply) - 1):
        word = tok.decode(reply[k:k + 2])
        if word == word.lstrip() and tok.encode(word, add_special_tokens=False) == reply[k:k + 2]:
            return k, word
    raise AssertionError("no two tokens of the reply spell a word")


def test_bad_words_equal_generate_bad_words_ids(served):
    _, client, tok, oracle = served
    ids = tok(PROMPT).input_ids
    stops = [tok.eos_token_id]
    plain = _greedy(oracle, ids, 16, stops)
    k, pair = _pair_word(tok, plain)
    one = tok.decode(plain[1:2]).strip()  # a one-token word of the reply
    words = [pair, one, "lazy dog"]
    banned = [s for w in words for s in _bad_word_ids(tok, w)]
    assert any(len(s) > 1 for s in banned)
    for s in banned:  # transformers also matches the prompt's tokens, vLLM the reply's only: here both agree
        assert s[:-1] != ids[len(ids) - len(s) + 1:] or len(s) == 1
    want = _greedy(oracle, ids, 16, stops, bad_words_ids=banned)
    assert want != plain
    got, _ = _reply_ids(client, ids, max_tokens=16, bad_words=words)
    assert got == _shown(want, stops)
    for a, b in zip(want, want[1:]):
        assert [a, b] not in banned
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=ids, max_tokens=16, temperature=0, stream=True, extra_body={"bad_words": words}))
    assert streamed == _complete(client, ids, max_tokens=16, extra_body={"bad_words": words}).choices[0].text
    # only the pair's second token was banned after its first: the reply up to there is the plain one
    alone, _ = _reply_ids(client, ids, max_tokens=16, bad_words=[pair])
    assert alone[:k + 1] == plain[:k + 1] and alone[k + 1] != plain[k + 1]


def test_bad_words_match_the_reply_only_not_the_prompt(served):
    _, client, tok, oracle = served
    ids = tok(PROMPT).input_ids
    plain = _greedy(oracle, ids, 16, [tok.eos_token_id])
    k, pair = _pair_word(tok, plain)
    prompt = ids + plain[:k + 1]  # ends with the pair's first token: its second comes next
    assert _bad_word_ids(tok, pair)[0] == plain[k:k + 2]
    got, _ = _reply_ids(client, prompt, max_tokens=3, bad_words=[pair])
    assert got[0] == plain[k + 1]  # vLLM's: the banned word's first token is the prompt's, not the reply's
    transformers = _greedy(oracle, prompt, 1, [tok.eos_token_id], bad_words_ids=[plain[k:k + 2]])
    assert transformers[0] != plain[k + 1]  # transformers' bad_words_ids would have banned it


def test_bad_words_refusals(served):
    _, client, _, _ = served
    _refused(lambda: _chat(client, extra_body={"bad_words": [""]}), "bad_words")
    _refused(lambda: _chat(client, extra_body={"bad_words": ["\x0c"]}), "bad_words")  # only whitespace: no token
    _refused(lambda: _chat(client, extra_body={"bad_words": [f"w{i}" for i in range(200)]}), "bad_words")



def test_masks_hold_under_guided_decoding(served):
    batcher, client, tok, _ = served
    guided = {"guided_choice": ["yes", "no"], "return_tokens_as_token_ids": True}
    for word in ("yes", "no", "es"):  # the constraint writes its choice with other tokens, or the other choice
        reply = _chat(client, logprobs=True, extra_body={**guided, "bad_words": [word]}).choices[0]
        assert reply.message.content in ("yes", "no")
        got = [int(e.token.removeprefix("token_id:")) for e in reply.logprobs.content]
        for banned in _bad_word_ids(tok, word):
            assert not any(got[i:i + len(banned)] == banned for i in range(len(got)))
    stops = sorted(stop_token_ids(batcher.model, tok))
    only_no = tok.encode("no", add_special_tokens=False) + stops
    assert not set(tok.encode("yes", add_special_tokens=False)) <= set(only_no)
    for seed in (None, 1, 2):
        reply = _chat(client, temperature=1.0 if seed else 0, seed=seed,
                      extra_body={"guided_choice": ["yes", "no"], "allowed_token_ids": only_no})
        assert reply.choices[0].message.content == "no"


def test_a_mask_without_the_end_of_turn_ends_a_guided_reply_where_its_constraint_does(served):
    """vLLM's allowed_token_ids leave EOS out: a guided reply made whole by the allowed tokens ends there ("stop",
    the constraint's end), one they cannot finish is cut ("length"), and ids that cannot begin it are a 400."""
    batcher, client, tok, _ = served
    stops = set(stop_token_ids(batcher.model, tok))
    yes = tok.encode("yes", add_special_tokens=False)
    assert not stops & set(yes)
    guided = {"guided_choice": ["yes", "no"], "allowed_token_ids": yes}
    for seed in (None, 3):
        reply = _chat(client, temperature=1.0 if seed else 0, seed=seed, extra_body=guided).choices[0]
        assert (reply.message.content, reply.finish_reason) == ("yes", "stop")
    chunks = [c.choices[0] for c in _chat(client, stream=True, extra_body=guided) if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == "yes" and chunks[-1].finish_reason == "stop"
    done = _complete(client, PROMPT, extra_body=guided).choices[0]
    assert (done.text, done.finish_reason) == ("yes", "stop")
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
              "additionalProperties": False}
    json_ids = sorted(set(tok.encode('{"a": true}', add_special_tokens=False)) - stops)
    reply = _chat(client, max_tokens=40, response_format={"type": "json_schema", "json_schema": {
        "name": "a", "schema": schema, "strict": True}}, extra_body={"allowed_token_ids": json_ids}).choices[0]
    assert reply.finish_reason == "stop" and json.loads(reply.message.content) == {"a": True}
    lazy = tok.encode("lazy", add_special_tokens=False)  # none of them writes the space that " dog" starts with
    assert not any(tok.decode([t]).startswith(" ") for t in lazy)
    cut = _chat(client, extra_body={"guided_choice": ["lazy dog"], "allowed_token_ids": lazy}).choices[0]
    assert (cut.message.content, cut.finish_reason) == ("lazy", "length")
    dog = tok.encode("dog", add_special_tokens=False)  # no token of "dog" starts "yes" or "no"
    for body in (guided | {"allowed_token_ids": dog}, {"guided_regex": "y+", "allowed_token_ids": dog}):
        message = _refused(lambda: _chat(client, extra_body=body), "allowed_token_ids")
        assert next(k for k in body if k.startswith("guided")) in message
        _refused(lambda: _complete(client, PROMPT, extra_body=body), "allowed_token_ids")
        _refused(lambda: _chat(client, stream=True, extra_body=body), "allowed_token_ids")
    _refused(lambda: _chat(client, response_format={"type": "json_object"}, extra_body={"allowed_token_ids": dog}),
             "allowed_token_ids")
    first = tok.decode(yes[:1])  # a bad word masking the only allowed token that begins "yes"
    assert tok.encode(first, add_special_tokens=False) == yes[:1] and yes[0] not in yes[1:]
    assert "bad_words" in _refused(lambda: _chat(client, extra_body={**guided, "bad_words": [first]}),
                                   "allowed_token_ids")
    _refused(lambda: _chat(client, extra_body={"allowed_token_ids": yes[:1], "bad_words": [first]}), "bad_words")


def test_prompt_logprobs_equal_log_softmax_of_the_forward(served):
    _, client, tok, oracle = served
    ids = tok(PROMPT).input_ids
    with torch.no_grad():
        logprobs = oracle(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    reply = _complete(client, ids, max_tokens=2, extra_body={"prompt_logprobs": 3})
    entries = reply.choices[0].prompt_logprobs
    assert len(entries) == len(ids) and entries[0] is None
    for i, entry in enumerate(entries[1:], 1):
        row, token = logprobs[i - 1], ids[i]
        top = torch.topk(row, 3).indices.tolist()
        assert list(entry)[0] == str(token)  # the prompt token first, then the top 3
        assert set(entry) == {str(token), *map(str, top)}
        assert entry[str(token)]["logprob"] == pytest.approx(float(row[token]), abs=1e-4)
        assert entry[str(token)]["rank"] == int((row >= row[token]).sum())
        assert entry[str(token)]["decoded_token"] == tok.decode([token])
        for rank, t in enumerate(top, 1):
            assert entry[str(t)]["logprob"] == pytest.approx(float(row[t]), abs=1e-4)
            if t != token:
                assert entry[str(t)]["rank"] == rank
    scored = _complete(client, ids, max_tokens=0, echo=True, logprobs=1, extra_body={"prompt_logprobs": 0})
    choice = scored.choices[0]
    assert all(e is None or list(e) == [str(t)] for e, t in zip(choice.prompt_logprobs, ids))
    assert all(t is None or len(t) <= 2 for t in choice.logprobs.top_logprobs)  # echo's own count: logprobs + 1
    # chat: beside the choices, for the rendered prompt's ids
    chat_ids = tok.apply_chat_template(HELLO, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=True,
                                       return_dict=False)
    chat = _chat(client, extra_body={"prompt_logprobs": 1, "chat_template": TEMPLATE}, n=2)
    entries = chat.model_extra["prompt_logprobs"]
    assert [int(list(e)[0]) for e in entries[1:]] == chat_ids[1:] and entries[0] is None
    assert all(len(e) <= 2 for e in entries[1:])


def test_prompt_logprobs_refusals(served):
    _, client, _, _ = served
    for value in (-1, 21):
        _refused(lambda: _complete(client, PROMPT, extra_body={"prompt_logprobs": value}), "prompt_logprobs")
    _refused(lambda: _complete(client, PROMPT, stream=True, extra_body={"prompt_logprobs": 2}), "prompt_logprobs")
    stream = _complete(client, PROMPT, stream=True, extra_body={"prompt_logprobs": 0})  # vLLM: accepted, none sent
    assert "".join(c.choices[0].text for c in stream if c.choices) == _complete(client, PROMPT).choices[0].text
    _refused(lambda: client.responses.create(model="tiny", input="Hi", extra_body={"prompt_logprobs": 1}),
             "prompt_logprobs")


def test_return_tokens_as_token_ids(served):
    batcher, client, tok, oracle = served
    ids = tok(PROMPT).input_ids
    plain = _complete(client, ids, logprobs=2).choices[0].logprobs
    as_ids = _complete(client, ids, logprobs=2, extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs
    assert _ids(as_ids) == _shown(_greedy(oracle, ids, 12, [tok.eos_token_id]), [tok.eos_token_id])
    assert as_ids.token_logprobs == plain.token_logprobs and as_ids.text_offset == plain.text_offset
    for top, text_top in zip(as_ids.top_logprobs, plain.top_logprobs):
        assert all(t.startswith("token_id:") for t in top) and sorted(top.values()) == sorted(text_top.values())
    stops = stop_token_ids(batcher.model, tok)
    want = _shown(_greedy(oracle, tok("Hello", add_special_tokens=False).input_ids, 12, stops), stops)
    chat = _chat(client, logprobs=True, top_logprobs=2, extra_body={"return_tokens_as_token_ids": True})
    text = _chat(client, logprobs=True, top_logprobs=2)
    assert [int(e.token.removeprefix("token_id:")) for e in chat.choices[0].logprobs.content] == want
    for a, b in zip(chat.choices[0].logprobs.content, text.choices[0].logprobs.content, strict=True):
        assert (a.logprob, a.bytes) == (b.logprob, b.bytes)  # the bytes stay the token's text's
        assert [t.logprob for t in a.top_logprobs] == [t.logprob for t in b.top_logprobs]
        assert all(t.token.startswith("token_id:") for t in a.top_logprobs)
    stream = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0, stream=True,
                                            logprobs=True, extra_body={"return_tokens_as_token_ids": True})
    streamed = [e.token for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == [e.token for e in chat.choices[0].logprobs.content]


def test_add_special_tokens(served):
    batcher, client, tok, oracle = served
    assert tok(PROMPT).input_ids[0] == tok.bos_token_id  # this tokenizer adds BOS
    bare = tok(PROMPT, add_special_tokens=False).input_ids
    reply = _complete(client, PROMPT, extra_body={"add_special_tokens": False})
    assert reply.usage.prompt_tokens == len(bare)
    want = _greedy(oracle, bare, 12, [tok.eos_token_id])
    assert reply.choices[0].text == tok.decode(_shown(want, [tok.eos_token_id]), skip_special_tokens=True)
    assert _complete(client, PROMPT).usage.prompt_tokens == len(bare) + 1
    text = tok.apply_chat_template(HELLO, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=False)
    body = {"chat_template": TEMPLATE}
    assert _chat(client, extra_body=body).usage.prompt_tokens == len(tok(text, add_special_tokens=False).input_ids)
    chat = _chat(client, extra_body={**body, "add_special_tokens": True})
    with_bos = tok(text).input_ids
    assert chat.usage.prompt_tokens == len(with_bos) == len(tok(text, add_special_tokens=False).input_ids) + 1
    stops = stop_token_ids(batcher.model, tok)
    want = _greedy(oracle, with_bos, 12, stops)
    assert chat.choices[0].message.content == tok.decode(_shown(want, stops), skip_special_tokens=True)


def test_request_chat_template_replaces_the_models(served, tiny_model_dir):
    batcher, client, tok, oracle = served
    ids = tok.apply_chat_template(HELLO, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    assert ids != tok("Hello", add_special_tokens=False).input_ids  # the saved format would render only "Hello"
    stops = stop_token_ids(batcher.model, tok)
    want = _greedy(oracle, ids, 10, stops)
    reply = _chat(client, max_tokens=10, extra_body={"chat_template": TEMPLATE})
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].message.content == tok.decode(_shown(want, stops), skip_special_tokens=True)
    assert _chat(client, max_tokens=10).usage.prompt_tokens == len(tok("Hello", add_special_tokens=False).input_ids)
    assert "not valid Jinja" in _refused(lambda: _chat(client, extra_body={"chat_template": "{% for %}"}),
                                         "chat_template")
    _refused(lambda: _chat(client, extra_body={"chat_template": "{{ raise_exception('no') }}"}), "chat_template")
    _refused(lambda: _chat(client, extra_body={"chat_template_kwargs": {"chat_template": TEMPLATE}}),
             "chat_template_kwargs.chat_template")
    untrusted_batcher, server, _, _ = _serve(tiny_model_dir)
    with server:
        untrusted = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert "--trust-request-chat-template" in _refused(
            lambda: _chat(untrusted, extra_body={"chat_template": TEMPLATE}), "chat_template")
    untrusted_batcher.close()
