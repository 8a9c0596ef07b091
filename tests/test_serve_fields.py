"""``qlora serve``'s logprobs, echo scoring, ``n`` choices and structured (JSON) replies, driven by the
official ``openai`` client against a real server.

The model is served unquantized in fp32 so that an independent oracle exists: transformers'
own ``LlamaForCausalLM`` with the adapter loaded by PEFT, whose ``log_softmax`` the logprobs must
equal. Structured replies are checked by parsing them and checking them against their schema.
"""

from __future__ import annotations

import enum
import json
import threading
from typing import Literal, Optional

import httpx
import pytest
import torch
from pydantic import BaseModel, conlist, constr

import qlora
from qlora.infer.generate import encode_prompt
from qlora.infer.messages import Message
from qlora.infer.template import render_chat

from test_serve import KEY, _together, adapters  # noqa: F401  (the fixture is shared: two saved random adapters)

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
peft = pytest.importorskip("peft")

ATOL = 1e-4  # fp32, batched or not, against a separate implementation


@pytest.fixture(scope="module")
def served(tiny_model_dir, adapters):  # noqa: F811
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tokenizer = qlora.load_model(tiny_model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(model, adapters / "a", adapter_name="a")
    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=16, context_length=512).start()
    with BackgroundServer(build_app(batcher, "tiny", ["a"], api_key=KEY)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield server, batcher, client, tokenizer
    batcher.close()


@pytest.fixture(scope="module")
def oracle(tiny_model_dir, adapters):  # noqa: F811
    """transformers + PEFT: the model and adapter "a" as those libraries load them."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapters / "a").eval()


def _log_softmax(oracle, ids: list[int]) -> torch.Tensor:
    """``(len(ids), vocab)``: row i is the log-distribution of the token after ``ids[:i + 1]``."""
    with torch.no_grad():
        return oracle(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)


def _chat_prompt_ids(tokenizer, text: str) -> list[int]:
    prompt = render_chat(tokenizer, [Message("user", text)])
    return encode_prompt(torch.nn.Linear(1, 1), tokenizer, prompt, chat=True)[0].tolist()


def _check_chat_logprobs(content, prompt_ids, token_ids, oracle, top: int) -> None:
    """Each entry's logprob and top alternatives equal the oracle's log_softmax at its position."""
    table = _log_softmax(oracle, prompt_ids + token_ids)
    assert len(content) == len(token_ids)
    for k, (entry, token) in enumerate(zip(content, token_ids)):
        row = table[len(prompt_ids) - 1 + k]
        assert entry.logprob == pytest.approx(float(row[token]), abs=ATOL)
        assert len(entry.top_logprobs) == top
        values = torch.topk(row, top).values.tolist() if top else []
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(values, abs=ATOL)
        for alt in entry.top_logprobs:  # each alternative is the token its bytes spell, with its logprob
            assert alt.logprob == pytest.approx(float(row[_token_id(alt.bytes)]), abs=ATOL)


_IDS: dict[bytes | str, int] = {}


def _token_id(token: list[int] | str) -> int:
    """The vocabulary id with these bytes (chat) or this token text (completions); byte-level BPE: unique."""
    return _IDS[token if isinstance(token, str) else bytes(token)]


@pytest.fixture(scope="module", autouse=True)
def _vocabulary(served):
    from qlora.infer.logprobs import TokenPieces

    tokenizer = served[3]
    pieces = TokenPieces.of(tokenizer)
    _IDS.update({pieces.bytes(i): i for i in range(len(tokenizer))})
    _IDS.update({pieces.text(i): i for i in range(len(tokenizer))})


def _shown(content, tokenizer):
    """The entries of tokens that add text (special tokens, dropped from the reply's text, do not)."""
    specials = set(tokenizer.all_special_tokens)
    return [e for e in content if e.token not in specials]


def test_greedy_chat_logprobs_equal_transformers(served, oracle):
    _, _, client, tokenizer = served
    prompt_ids = _chat_prompt_ids(tokenizer, "Hello")
    reply = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hello"}], max_tokens=8,
                                           temperature=0, logprobs=True, top_logprobs=5)
    choice = reply.choices[0]
    content = choice.logprobs.content
    # greedy: each token is the oracle's argmax after the ones before it
    ids = []
    for _ in range(len(content)):
        ids.append(int(_log_softmax(oracle, prompt_ids + ids)[-1].argmax()))
    _check_chat_logprobs(content, prompt_ids, ids, oracle, top=5)
    assert [e.top_logprobs[0].logprob for e in content] == [e.logprob for e in content]  # greedy = top-1
    shown = _shown(content, tokenizer)
    assert b"".join(bytes(e.bytes) for e in shown).decode(errors="replace") == choice.message.content
    # streamed, the chunks' logprobs are the same entries
    chunks = list(client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hello"}],
                                                 max_tokens=8, temperature=0, logprobs=True, top_logprobs=5,
                                                 stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_sampled_logprobs_are_of_the_raw_logits_not_the_temperature(served, oracle):
    """vLLM's and OpenAI's convention: log_softmax of the model's logits, whatever temperature/top_p sampled."""
    _, _, client, tokenizer = served
    prompt_ids = _chat_prompt_ids(tokenizer, "Hi there")
    reply = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi there"}],
                                           max_tokens=12, temperature=1.7, top_p=0.95, seed=3, logprobs=True, n=3)
    assert len({c.message.content for c in reply.choices}) > 1
    for choice in reply.choices:  # three rows of one batch, each with its own tokens and cache length
        content = choice.logprobs.content
        ids = [_token_id(e.bytes) for e in content]
        _check_chat_logprobs(content, prompt_ids, ids, oracle, top=0)
    table = _log_softmax(oracle, prompt_ids + ids)
    scaled = [float((table[len(prompt_ids) - 1 + k] / 1.7).log_softmax(-1)[t]) for k, t in enumerate(ids)]
    assert [e.logprob for e in content] != pytest.approx(scaled, abs=1e-3)


def _loglikelihood(client, context: list[int], continuation: list[int], model: str = "a") -> tuple[float, bool]:
    """What lm-evaluation-harness's ``local-completions`` model sends and computes for a loglikelihood request."""
    body = client.completions.create(model=model, prompt=[context + continuation], temperature=0, max_tokens=1,
                                     logprobs=1, seed=1234, echo=True).model_dump()
    choice = sorted(body["choices"], key=lambda c: c["index"])[0]
    ctxlen = len(context)
    token_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
    tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
    return sum(token_logprobs), all(t == max(top.values()) for t, top in zip(token_logprobs, tops))


def test_echo_loglikelihood_equals_transformers(served, oracle):
    _, _, client, tokenizer = served
    context = tokenizer("Question: what is two plus two? Answer:").input_ids
    for continuation_text in (" four.", " The quick brown fox"):
        continuation = tokenizer(continuation_text, add_special_tokens=False).input_ids
        ll, greedy = _loglikelihood(client, context, continuation)
        table = _log_softmax(oracle, context + continuation)
        expected = sum(float(table[len(context) - 1 + k, t]) for k, t in enumerate(continuation))
        assert ll == pytest.approx(expected, abs=ATOL * len(continuation))
        expected_greedy = all(int(table[len(context) - 1 + k].argmax()) == t for k, t in enumerate(continuation))
        assert greedy == expected_greedy


def test_echo_with_max_tokens_0_scores_the_prompt_only(served, oracle):
    _, _, client, tokenizer = served
    text = "The quick brown fox jumps"
    ids = tokenizer(text).input_ids  # with BOS, as the server encodes a text prompt
    reply = client.completions.create(model="a", prompt=text, max_tokens=0, echo=True, logprobs=3)
    choice = reply.choices[0]
    assert choice.text == text and choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 0 and reply.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    table = _log_softmax(oracle, ids)
    assert lp.token_logprobs[1:] == pytest.approx([float(table[k, t]) for k, t in enumerate(ids[1:])], abs=ATOL)
    for k, top in enumerate(lp.top_logprobs[1:]):  # the 3 best and the prompt's own token
        best = torch.topk(table[k], 3)
        assert sorted(top.values(), reverse=True)[:3] == pytest.approx(best.values.tolist(), abs=ATOL)
        assert top[lp.tokens[k + 1]] == lp.token_logprobs[k + 1]
    # text_offset indexes the echoed text: BOS adds no text, each token's text starts where it says
    assert lp.text_offset[0] == lp.text_offset[1] == 0
    assert all(text[o:].startswith(t) for o, t in zip(lp.text_offset[1:], lp.tokens[1:]))


def test_completions_echo_and_logprobs_of_the_generated_tokens(served, oracle):
    _, _, client, tokenizer = served
    prompt = "def add(a, b):"
    ids = tokenizer(prompt).input_ids
    reply = client.completions.create(model="a", prompt=prompt, max_tokens=6, temperature=0, echo=True, logprobs=2)
    choice = reply.choices[0]
    plain = client.completions.create(model="a", prompt=prompt, max_tokens=6, temperature=0).choices[0].text
    assert choice.text == prompt + plain
    lp = choice.logprobs
    generated = len(lp.tokens) - len(ids)
    assert generated == reply.usage.completion_tokens == 6 or choice.finish_reason == "stop"
    all_ids = ids + [_token_id(t) for t in lp.tokens[len(ids):]]
    table = _log_softmax(oracle, all_ids)
    assert lp.token_logprobs[1:] == pytest.approx([float(table[k, t]) for k, t in enumerate(all_ids[1:])], abs=ATOL)
    # streamed: the same text and entries, offsets continuing across chunks
    chunks = list(client.completions.create(model="a", prompt=prompt, max_tokens=6, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == lp.text_offset
    assert [p for c in chunks if c.choices[0].logprobs for p in c.choices[0].logprobs.token_logprobs] == \
        lp.token_logprobs


def test_text_offset_counts_the_special_tokens_the_text_shows(served):
    _, _, client, tokenizer = served
    prompt = "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"  # written out: in the echoed text
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert start in tokenizer.all_special_ids
    kw = dict(model="a", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=0,
              logit_bias={str(start): 100}, extra_body={"skip_special_tokens": False})  # shown in the reply too
    choice = client.completions.create(**kw).choices[0]
    text, lp = choice.text, choice.logprobs
    assert text == prompt + "<|im_start|>" * 3
    assert lp.tokens[0] == tokenizer.bos_token and lp.text_offset[:2] == [0, 0]  # BOS, added, is not in the text
    assert all(text[o:].startswith(t) for o, t in zip(lp.text_offset[1:], lp.tokens[1:]))
    assert lp.text_offset[-3:] == [len(prompt) + 12 * k for k in range(3)]
    chunks = list(client.completions.create(stream=True, **kw))
    assert [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == lp.text_offset
    hidden = client.completions.create(**kw | {"extra_body": {}}).choices[0]  # special tokens left out of the text
    assert hidden.text == prompt and hidden.logprobs.text_offset[-3:] == [len(prompt)] * 3


def test_text_offset_of_a_reply_starts_where_the_echoed_prompt_ends(served):
    """The prompt "" is BOS alone, which the echoed text does not hold even where the reply shows special tokens:
    the reply's first offset is 0, streamed or not, for each of n choices."""
    _, _, client, tokenizer = served
    word = tokenizer.convert_tokens_to_ids("Hello")
    kw = dict(model="a", prompt="", max_tokens=3, temperature=0, echo=True, logprobs=0, n=2,
              logit_bias={str(word): 100}, extra_body={"skip_special_tokens": False})
    for choice in client.completions.create(**kw).choices:
        assert choice.text == "Hello" * 3
        assert choice.logprobs.tokens == [tokenizer.bos_token] + ["Hello"] * 3
        assert choice.logprobs.text_offset == [0, 0, 5, 10]
    chunks = list(client.completions.create(stream=True, **kw))
    for index in range(2):
        assert [o for c in chunks if c.choices[0].index == index and c.choices[0].logprobs
                for o in c.choices[0].logprobs.text_offset] == [0, 0, 5, 10]


def test_a_batch_of_prompts_gets_one_choice_each_in_order(served):
    _, _, client, tokenizer = served
    prompts = ["The quick brown fox", "Question: what is", "def add(a, b):"]
    alone = [client.completions.create(model="a", prompt=p, max_tokens=5, temperature=0) for p in prompts]
    batch = client.completions.create(model="a", prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in batch.choices] == list(range(6))
    assert [c.text for c in batch.choices] == [a.choices[0].text for a in alone for _ in range(2)]
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert batch.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)
    token_batch = client.completions.create(model="a", prompt=[tokenizer(p).input_ids for p in prompts], max_tokens=5,
                                            temperature=0)
    assert [c.text for c in token_batch.choices] == [a.choices[0].text for a in alone]


def test_n_choices_are_independent_rows_and_reproducible_with_a_seed(served):
    _, batcher, client, _ = served
    kw = dict(model="a", messages=[{"role": "user", "content": "Hello"}], max_tokens=12, temperature=1.0, seed=7)
    batcher.stats["max_rows_in_step"] = 0
    first = client.chat.completions.create(n=4, **kw)
    assert batcher.load()["max_rows_in_step"] == 4  # the choices are rows decoded together, not one after another
    again = client.chat.completions.create(n=4, **kw)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert texts == [c.message.content for c in again.choices]  # seeded: reproducible
    assert len(set(texts)) > 1  # sampled independently, not one sample copied
    assert texts[0] == client.chat.completions.create(n=1, **kw).choices[0].message.content
    if all(c.finish_reason == "length" for c in first.choices):
        assert first.usage.completion_tokens == 4 * 12  # every choice's tokens
    single = client.chat.completions.create(n=1, **kw).usage
    assert first.usage.prompt_tokens == single.prompt_tokens  # the prompt is counted once
    # streamed: chunks per index reassemble to the same choices, one finish_reason each
    chunks = list(client.chat.completions.create(n=4, stream=True, stream_options={"include_usage": True}, **kw))
    by_index: dict[int, str] = {}
    finishes: dict[int, list] = {}
    for c in chunks:
        for ch in c.choices:
            by_index[ch.index] = by_index.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                finishes.setdefault(ch.index, []).append(ch.finish_reason)
    assert [by_index[i] for i in range(4)] == texts
    assert all(len(finishes[i]) == 1 for i in range(4))
    assert chunks[-1].usage.completion_tokens == first.usage.completion_tokens and not chunks[-1].choices
    # a different seed gives different samples
    other = client.chat.completions.create(n=4, **{**kw, "seed": 8})
    assert [c.message.content for c in other.choices] != texts


def test_stop_strings_max_completion_tokens_and_usage(served):
    _, _, client, _ = served
    kw = dict(model="a", messages=[{"role": "user", "content": "Hello"}], temperature=0)
    full = client.chat.completions.create(max_completion_tokens=5, **kw)
    assert full.usage.completion_tokens == 5 and full.choices[0].finish_reason == "length"
    longer = client.chat.completions.create(max_completion_tokens=30, **kw).choices[0].message.content
    assert longer.startswith(full.choices[0].message.content)
    stops = [longer[12:14], "zzz", longer[6:8], "never", "<none>", "qq"]  # more than OpenAI's 4
    cut = longer[:min(longer.index(s) for s in stops if s in longer)]
    reply = client.chat.completions.create(max_completion_tokens=30, stop=stops, **kw).choices[0]
    assert reply.message.content == cut and reply.finish_reason == "stop"


# Every value bounded (enum, boolean, null) and keys closed, so that even a random model's reply ends.
PERSON = {"type": "object", "properties": {"mood": {"enum": ["happy", "sad", "ok"]}, "awake": {"type": "boolean"},
                                           "note": {"type": ["null", "boolean"]}},
          "required": ["mood", "awake", "note"], "additionalProperties": False}


def _check_person(value) -> None:
    assert isinstance(value, dict) and set(value) <= set(PERSON["properties"])
    assert {"mood", "awake", "note"} == set(value)
    assert value["mood"] in ("happy", "sad", "ok") and isinstance(value["awake"], bool)
    assert value["note"] is None or isinstance(value["note"], bool)


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_json_schema_replies_parse_and_follow_the_schema(served, temperature):
    _, _, client, _ = served
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    reply = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hello"}], max_tokens=200,
                                           temperature=temperature, seed=5, n=3, response_format=fmt)
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice.message.content
        _check_person(json.loads(choice.message.content))
    # the client's own structured-output parser reads it

    class Person(BaseModel):  # the client sends it as a strict schema, `bool | None` as an anyOf
        mood: Literal["happy", "sad", "ok"]
        awake: bool
        note: bool | None

    parsed = client.chat.completions.parse(model="a", messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=200, temperature=temperature, seed=5, response_format=Person)
    assert isinstance(parsed.choices[0].message.parsed, Person)


def test_json_object_reply_is_an_object_streamed_or_not(served):
    _, batcher, client, _ = served
    kw = dict(model="a", messages=[{"role": "user", "content": "Hi"}], max_tokens=300, temperature=0,
              response_format={"type": "json_object"})
    reply = client.chat.completions.create(**kw).choices[0]
    if reply.finish_reason == "stop":
        assert isinstance(json.loads(reply.message.content), dict)
    else:  # a random model may write one long string; what it wrote is still the start of an object
        assert reply.finish_reason == "length" and reply.message.content.startswith("{")
    streamed = list(client.chat.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply.message.content
    # plain requests beside it in the batch are not constrained
    plain = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}], max_tokens=8,
                                           temperature=0).choices[0].message.content
    results = {}

    def ask(key, **extra):
        results[key] = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}],
                                                      temperature=0, **extra).choices[0].message.content

    threads = [threading.Thread(target=ask, args=("json",),
                                kwargs={"max_tokens": 300, "response_format": {"type": "json_object"}}),
               threading.Thread(target=ask, args=("plain",), kwargs={"max_tokens": 8})]
    _together(batcher, threads)
    assert results == {"json": reply.message.content, "plain": plain}


def test_a_token_limit_cuts_json_with_finish_reason_length(served):
    _, _, client, _ = served
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    choice = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hello"}], max_tokens=3,
                                            temperature=0, response_format=fmt).choices[0]
    assert choice.finish_reason == "length" and choice.message.content.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.message.content)


class Mood(str, enum.Enum):
    happy = "happy"
    sad = "sad"


class Item(BaseModel):
    name: constr(max_length=3)
    mood: Mood


class Link(BaseModel):  # recursive, through an Optional
    label: Literal["a", "b"]
    next: Optional["Link"]


class Nested(BaseModel):
    """What ``client.chat.completions.parse`` sends as a strict schema with $defs, $ref, anyOf, items and enums;
    every value bounded so that even a random model's reply ends (it spends most tokens on whitespace runs)."""

    items: conlist(Item, max_length=2)
    note: Optional[constr(max_length=5)]
    mood: Mood
    chain: Link


@pytest.mark.parametrize("seed", range(4))
def test_nested_pydantic_models_parse_replies_that_follow_them_at_every_depth(served, seed):
    _, _, client, _ = served
    completion = client.chat.completions.parse(model="a", messages=[{"role": "user", "content": "Hello"}],
                                               max_tokens=480, temperature=1.0, seed=seed, response_format=Nested)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, Nested)  # the client parsed it: pydantic validated every depth
    assert Nested.model_validate_json(choice.message.content) == choice.message.parsed


def test_strict_schemas_asking_more_than_is_enforced_are_refused(served):
    _, _, client, _ = served
    strict = {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "pattern": "^a(?=b)"}},
                                         "name": {"type": "string", "format": "uri"}},
        "required": ["tags", "name"], "additionalProperties": False}}}
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}], response_format=strict)
    assert exc.value.param == "response_format.json_schema.schema"
    assert "properties.tags.items.pattern" in exc.value.message and "properties.name.format" in exc.value.message
    endless = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/A", "$defs": {
        "A": {"anyOf": [{"$ref": "#/$defs/A"}]}}}}}
    with pytest.raises(openai.BadRequestError, match="reference cycle") as exc:
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}], response_format=endless)
    assert exc.value.param == "response_format.json_schema.schema"
    # not strict: best effort, still valid JSON with the enforced part (keys, required, enum); 'not' is not
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "level": {"enum": [1, 2, 3],
                                                                                    "not": {"const": 2}}},
              "required": ["ok", "level"], "additionalProperties": False}
    with pytest.raises(openai.BadRequestError, match="properties.level.not"):
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}], response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    loose = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    for temperature in (0, 1.0):
        choice = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=300, temperature=temperature, seed=2,
                                                response_format=loose).choices[0]
        assert choice.finish_reason == "stop"
        value = json.loads(choice.message.content)
        assert set(value) == {"ok", "level"} and isinstance(value["ok"], bool) and value["level"] in (1, 2, 3)
    for bad, param in ((({"type": "xml"}), "response_format.type"),
                       ({"type": "json_schema"}, "response_format.json_schema"),
                       ({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": "yes"}},
                        "response_format.json_schema.strict")):  # a truthy string was read as strict
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}], response_format=bad)
        assert exc.value.param == param


# Strict with a pattern, a format and integer bounds: each value bounded, so a random model's reply ends.
TAGGED = {"type": "object", "properties": {
    "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
    "count": {"type": "integer", "minimum": -5, "exclusiveMaximum": 250},
    "day": {"type": "string", "format": "date"},
    "tags": {"type": "array", "items": {"type": "string", "pattern": "^(?:x|yz?)$"}, "maxItems": 3}},
    "required": ["code", "count", "day", "tags"], "additionalProperties": False}


@pytest.mark.parametrize("seed", range(3))
def test_strict_patterns_formats_and_integer_bounds_are_kept(served, seed):
    jsonschema = pytest.importorskip("jsonschema")
    _, _, client, _ = served
    fmt = {"type": "json_schema", "json_schema": {"name": "tagged", "schema": TAGGED, "strict": True}}
    choice = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=400, temperature=1.0, seed=seed, response_format=fmt).choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    value = json.loads(choice.message.content)
    jsonschema.validate(value, TAGGED, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


# Rules meeting on one value, strict: a pattern beside a format and a maxLength, a length-bounded email, draft 4's
# boolean exclusive bounds, and a oneOf whose string alternatives no string satisfies both of.
COMBINED = {"type": "object", "properties": {
    "day": {"type": "string", "format": "date", "pattern": "^20[0-9]{2}-0[1-9]", "maxLength": 10},
    "mail": {"type": "string", "format": "email", "minLength": 6, "maxLength": 12},
    "score": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1, "exclusiveMaximum": True},
    "ref": {"oneOf": [{"type": "string", "pattern": "^id-[0-9]{1,3}$"}, {"type": "string", "format": "uuid"},
                      {"type": "integer", "minimum": 0, "maximum": 99}]}},
    "required": ["day", "mail", "score", "ref"], "additionalProperties": False}


@pytest.mark.parametrize("seed", range(3))
def test_strict_rules_meeting_on_one_value_are_kept_together(served, seed):
    jsonschema = pytest.importorskip("jsonschema")
    _, _, client, _ = served
    fmt = {"type": "json_schema", "json_schema": {"name": "combined", "schema": COMBINED, "strict": True}}
    choice = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=400, temperature=1.0, seed=seed, response_format=fmt).choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    value = json.loads(choice.message.content)
    jsonschema.Draft4Validator(COMBINED, format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER).validate(value)
    assert 0 < value["score"] < 1 and 6 <= len(value["mail"]) <= 12
    overlapping = {**COMBINED, "properties": {**COMBINED["properties"], "ref": {"oneOf": [
        {"type": "string", "maxLength": 5}, {"type": "string", "pattern": "^id"}]}}}
    with pytest.raises(openai.BadRequestError, match=r"properties\.ref\.oneOf \(alternatives 0 and 1 may both hold"):
        client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}], response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": overlapping, "strict": True}})


def _nested(levels: int) -> str:
    """A response_format schema ``levels`` objects deep, as JSON text (too deep for json.dumps to write)."""
    schema = '{"type":"object","properties":{"a":' * levels + '{"type":"integer"}' + '},"required":["a"]}' * levels
    return ('{"model":"a","max_tokens":4,"messages":[{"role":"user","content":"Hi"}],'
            '"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":' + schema + '}}}')


def test_schemas_too_deep_or_too_long_are_400s_and_huge_bounds_do_not_hang(served):
    """A schema nested past the compiler's limit is a 400 naming it (it was a RecursionError 500), one past
    the JSON parser's depth an OpenAI-shaped 400 (it was starlette's {"detail"}), a minItems of 10^12 is
    answered at once (checking it counted to it), and an unknown path is an OpenAI-shaped 404."""
    import httpx

    from qlora.infer.json_schema import MAX_DEPTH

    server = served[0]
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
        def post(body: str) -> httpx.Response:
            return http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})

        chain = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(600)} | {"d600": {"type": "integer"}}
        refs = json.dumps({"model": "a", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}],
                           "response_format": {"type": "json_schema", "json_schema": {
                               "name": "x", "schema": {"$defs": chain, "$ref": "#/$defs/d0"}}}})
        for body in (refs, _nested(300)):  # flat JSON 600 references deep (was a 500); 300 objects deep
            deep = post(body)
            assert deep.status_code == 400, deep.text
            error = deep.json()["error"]
            assert error["param"] == "response_format.json_schema.schema"
            assert f"nests more than {MAX_DEPTH} levels deep" in error["message"]
        assert post(_nested(MAX_DEPTH - 2)).status_code == 200
        unparsable = post(_nested(5000))
        assert unparsable.status_code == 400 and unparsable.json()["error"]["code"] == "invalid_json"
        huge = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"},
                                                       "minItems": 10 ** 12}}, "required": ["a"]}
        reply = http.post("/v1/chat/completions", json={
            "model": "a", "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": huge}}})
        assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] == "length"
        missing = http.get("/v1/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_bad_logprob_requests_are_400(served):
    _, _, client, _ = served
    for kw, param in ((dict(top_logprobs=3), "top_logprobs"), (dict(logprobs=True, top_logprobs=21), "top_logprobs")):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="a", messages=[{"role": "user", "content": "Hi"}], **kw)
        assert exc.value.param == param
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="a", prompt="Hi", logprobs=21)
    assert exc.value.param == "logprobs"


def test_a_lone_surrogate_is_a_400_naming_its_field(served):
    """JSON may escape half a UTF-16 pair, which is no character (no tokenizer takes it: it was a 500): a 400 naming
    the field on every route, while the whole pair is the character it spells."""
    import httpx

    server = served[0]
    half = '"a\\ud83d b"'
    bodies = {
        "/v1/chat/completions": ('{"model":"a","max_tokens":2,"messages":[{"role":"user","content":%s}]}',
                                 "messages.0.content"),
        "/v1/completions": ('{"model":"a","max_tokens":2,"prompt":["x",%s]}', "prompt.1"),
        "/v1/responses": ('{"model":"a","max_output_tokens":2,"input":[{"role":"user","content":'
                          '[{"type":"input_text","text":%s}]}]}', "input.0.content.0.text"),
        "/v1/conversations": ('{"metadata":{"k":%s}}', "metadata.k"),
    }
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}",
                                                    "content-type": "application/json"}, timeout=30) as http:
        for route, (body, param) in bodies.items():
            reply = http.post(route, content=body % half)
            assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
            assert "lone UTF-16 surrogate" in reply.json()["error"]["message"]
        key = http.post("/v1/chat/completions", content='{"model":"a","max_tokens":2,"stream":true,"messages":[{"role":'
                                                        '"user","content":"x"}],"metadata":{%s:"v"}}' % half)
        assert key.status_code == 400 and key.json()["error"]["param"] == "metadata", key.text
        pair = http.post("/v1/chat/completions", content=bodies["/v1/chat/completions"][0] % '"\\ud83d\\ude00"')
        assert pair.status_code == 200, pair.text


def test_stream_options_go_with_a_stream_only(served):
    """vLLM's rule: stream_options without stream: true is a 400 naming it (it was silently dropped), and
    include_usage is a boolean; with a stream, include_usage adds the usage chunk."""
    _, _, client, _ = served
    hello = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="a", messages=hello, max_tokens=2, stream_options={"include_usage": True})
    assert exc.value.param == "stream_options"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="a", prompt="Hi", max_tokens=2, stream_options={"include_usage": True})
    assert exc.value.param == "stream_options"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="a", messages=hello, max_tokens=2, stream=True,
                                       stream_options={"include_usage": "yes"})
    assert exc.value.param == "stream_options.include_usage"
    chunks = list(client.chat.completions.create(model="a", messages=hello, max_tokens=2, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 2 and not chunks[-1].choices
    assert client.chat.completions.create(model="a", messages=hello, max_tokens=2, stream_options=None).usage


def test_stream_options_keys_and_usage_on_every_chunk(served):
    """OpenAI's stream format: with include_usage every chunk before the usage chunk carries ``"usage": null``;
    vLLM's continuous_usage_stats puts the usage so far there instead (each prompt once, the reply tokens sent so
    far: here as many as the logprob entries received); include_obfuscation is accepted (no obfuscation field is
    sent) and any other key is a 400 naming it."""
    server, _, client, _ = served
    body = {"model": "a", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6, "stream": True, "n": 2,
            "logprobs": True, "ignore_eos": True, "temperature": 0}

    def chunks(options: dict) -> list[dict]:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body | {"stream_options": options},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as reply:
            assert reply.status_code == 200
            lines = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return [json.loads(line) for line in lines[:-1]]

    plain = chunks({"include_usage": True, "include_obfuscation": False})
    final = plain[-1]["usage"]
    assert not plain[-1]["choices"] and final["completion_tokens"] == 12
    assert all("usage" in c and c["usage"] is None for c in plain[:-1])
    assert all("usage" not in c for c in chunks({"include_usage": False, "continuous_usage_stats": True}))

    running = chunks({"include_usage": True, "continuous_usage_stats": True})
    assert running[-1]["usage"] == final
    seen = 0
    for chunk in running[:-1]:
        seen += sum(len((c["logprobs"] or {}).get("content") or []) for c in chunk["choices"])
        assert chunk["usage"] == {"prompt_tokens": final["prompt_tokens"], "completion_tokens": seen,
                                  "total_tokens": final["prompt_tokens"] + seen}
    assert seen == 12

    for options, param in (({"include_usage": True, "include_usge": True}, "stream_options.include_usge"),
                           ({"continuous_usage_stats": "yes"}, "stream_options.continuous_usage_stats")):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="a", messages=body["messages"], max_tokens=2, stream=True,
                                           stream_options=options)
        assert exc.value.param == param
