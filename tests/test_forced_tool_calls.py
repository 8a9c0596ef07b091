"""Forced tool calls (``tool_choice`` 'required' or a named function).

Oracles: each family's real chat template (the call text it renders is what the forced markup must
produce), each format's parser (a forced reply must parse to exactly one call), ``json.loads`` (the
arguments), and the official ``openai`` client against ``qlora serve`` with a random tiny model, which
writes garbage unless constrained, and the trained tool model (tests/tool_model.py).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import qlora
from qlora.infer.forced_call import CallMatcher, ForcedCall, ForcedCallUnsupported, call_markup, tool_arguments
from qlora.infer.generate import SamplingOptions
from qlora.infer.text_stream import TextStream
from qlora.infer.tool_calls import FORMATS, ToolCall, markup_token_ids, tool_call_format
from qlora.model.chat_format import ChatFormat, stop_token_ids
from qlora.model.tiny import build_tiny_model, train_sentencepiece_tokenizer

from chat_families import FAMILIES as FAMILY_INFO
from chat_families import family_tokenizer
from test_tool_calls import _turn
from tool_model import ASK, TOOLS

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
# Tools whose arguments are bounded by their schema, so even a random model must finish the call.
SET_UNIT = {"type": "function", "function": {"name": "set_unit", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}, "on": {"type": "boolean"}},
    "required": ["unit", "on"], "additionalProperties": False}}}
PING = {"type": "function", "function": {"name": "ping", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}
BOUNDED = [SET_UNIT, PING]
NAMES = {"set_unit", "ping"}


def _schemas(tools):
    return {t["function"]["name"]: tool_arguments(t["function"]["parameters"]) for t in tools}


@pytest.mark.parametrize("family, fmt", [("qwen2.5", "hermes"), ("qwen3", "hermes"), ("mistral-v0.3", "mistral"),
                                         ("mistral-nemo", "mistral"), ("llama-3.1", "json"), ("llama-3.2", "json")])
def test_forced_markup_is_what_the_template_renders_and_parses_to_the_call(family, fmt):
    template = (TEMPLATES / f"{family}.jinja").read_text()
    assert tool_call_format(template).name == fmt
    markup = call_markup(fmt, template)
    call = ToolCall("get_weather", json.dumps({"city": "Paris"}))
    text = markup.opening + call.name + markup.after_name + call.arguments + markup.closing
    rendered = _turn(family, [call])  # the template's own rendering of this call
    if fmt == "mistral":  # the template adds the call id; the parser reads the call the same without it
        assert rendered.strip().replace(', "id": "abc0def0g"', "") == text
    else:
        assert rendered.strip().endswith(text)
    assert FORMATS[fmt].parse(text, ["get_weather"]) == ("", [call])
    for name in ("get_weather", None):
        matcher = CallMatcher.start(markup, _schemas(TOOLS), name)
        assert matcher.feed(text).done
        assert not matcher.feed(text[:-1]).done and matcher.feed(text + " ") is None


def test_deepseek_and_mistral_v11_markup_parse_to_the_call():
    call = ToolCall("get_weather", '{"city": "Paris"}')
    for fmt, template in (("deepseek-v3", (TEMPLATES / "deepseek-v3.jinja").read_text()), ("mistral", "[TOOL_CALLS]x[ARGS]")):
        markup = call_markup(fmt, template)
        text = markup.opening + call.name + markup.after_name + call.arguments + markup.closing
        assert FORMATS[fmt].parse(text, ["get_weather"])[1] == [call]
        assert CallMatcher.start(markup, _schemas(TOOLS)).feed(text).done


def test_formats_without_forceable_markup_are_refused_with_the_reason():
    with pytest.raises(ForcedCallUnsupported, match="arg_key"):
        call_markup("glm-4.5", (TEMPLATES / "glm-4.5.jinja").read_text())
    with pytest.raises(ForcedCallUnsupported, match="no call markup qlora knows"):
        call_markup("json", "{{ tools | tojson }}{% for m in messages %}{{ m.content }}{% endfor %}")


def test_arguments_may_not_hold_text_that_ends_the_markup():
    markup = call_markup("hermes", "<tool_call>")
    matcher = CallMatcher.start(markup, _schemas(TOOLS), "get_weather")
    start = markup.opening + 'get_weather", "arguments": {"city": "'
    assert matcher.feed(start + "</tool_ca") is not None
    assert matcher.feed(start + "</tool_call>") is None and matcher.feed(start + "</tool_c").feed("all>") is None


def _sentencepiece_mistral():
    info = FAMILY_INFO["mistral-v0.3"]
    tok = train_sentencepiece_tokenizer(["Paris est la capitale. naïve café"] * 5 + ['{"name": "unit", "on": true}'],
                                        family="llama", chat_template=(TEMPLATES / "mistral-v0.3.jinja").read_text())
    tok.add_special_tokens({"eos_token": info["eos_token"], "additional_special_tokens": info["special_tokens"]})
    return tok, info


@pytest.mark.parametrize("family", ["qwen2.5", "mistral-v0.3", "llama-3.1", "sentencepiece mistral-v0.3"])
@pytest.mark.parametrize("seed", range(3))
def test_random_logits_under_the_constraint_always_give_one_parseable_call(family, seed):
    """No model: random logits at every step, on the family's tokenizer (byte-level BPE, or SentencePiece whose
    word-start spaces must not leak into the markup). The decoded reply parses to one valid call."""
    if family.startswith("sentencepiece"):
        tok, info = _sentencepiece_mistral()
    else:
        tok, info = family_tokenizer(family), FAMILY_INFO[family]
    fmt = tool_call_format(tok.chat_template)
    keep = markup_token_ids(fmt, tok)
    stops = frozenset(stop_token_ids(tok, [tok.convert_tokens_to_ids(t) for t in info["generation_eos"]]))
    generator = torch.Generator().manual_seed(seed)
    for name in ("set_unit", None):
        forced = ForcedCall(tok, call_markup(fmt.name, tok.chat_template), BOUNDED, name, keep, stops)
        stream = TextStream(tok, keep=keep)
        text = "".join(stream.push(t) for t in forced.prefix_ids)
        options = SamplingOptions(temperature=1.0 + seed / 2, top_p=0.95 if seed else 1.0)
        for _ in range(400):
            token = forced.choose(torch.randn(len(tok), generator=generator) * 3, options, generator)
            assert token is not None
            if token in stops:
                break
            text += stream.push(token)
        else:
            pytest.fail(f"no end of turn: {text!r}")
        text += stream.flush()
        content, calls = fmt.parse(text, sorted(NAMES))
        assert len(calls) == 1 and content.strip() == "", text
        args = json.loads(calls[0].arguments)
        assert calls[0].name == (name or calls[0].name) and calls[0].name in NAMES
        assert args == {} if calls[0].name == "ping" else (set(args) == {"unit", "on"} and isinstance(args["on"], bool))


# Nested and bounded: a list of sub-objects through $ref, an Optional enum, a constant.
PLAN = {"type": "function", "function": {"name": "plan", "strict": True, "parameters": {
    "type": "object", "additionalProperties": False, "required": ["steps", "mode", "v"],
    "properties": {"steps": {"type": "array", "items": {"$ref": "#/$defs/Step"}, "maxItems": 3},
                   "mode": {"anyOf": [{"enum": ["fast", "slow"]}, {"type": "null"}]}, "v": {"const": 2}},
    "$defs": {"Step": {"type": "object", "additionalProperties": False, "required": ["on", "level"],
                       "properties": {"on": {"type": "boolean"}, "level": {"enum": [1, 2, 3]}}}}}}}


@pytest.mark.parametrize("seed", range(4))
def test_random_logits_under_a_nested_schema_give_arguments_valid_at_every_depth(seed):
    """Oracle: ``jsonschema`` validates the parsed arguments against the tool's whole ``parameters``."""
    jsonschema = pytest.importorskip("jsonschema")
    tok, info = family_tokenizer("qwen2.5"), FAMILY_INFO["qwen2.5"]
    fmt = tool_call_format(tok.chat_template)
    keep = markup_token_ids(fmt, tok)
    stops = frozenset(stop_token_ids(tok, [tok.convert_tokens_to_ids(t) for t in info["generation_eos"]]))
    generator = torch.Generator().manual_seed(seed)
    forced = ForcedCall(tok, call_markup(fmt.name, tok.chat_template), [PLAN], "plan", keep, stops)
    stream = TextStream(tok, keep=keep)
    text = "".join(stream.push(t) for t in forced.prefix_ids)
    for _ in range(600):
        token = forced.choose(torch.randn(len(tok), generator=generator) * 3, SamplingOptions(temperature=1.0),
                              generator)
        assert token is not None
        if token in stops:
            break
        text += stream.push(token)
    else:
        pytest.fail(f"no end of turn: {text!r}")
    _, calls = fmt.parse(text + stream.flush(), ["plan"])
    args = json.loads(calls[0].arguments)
    jsonschema.validate(args, PLAN["function"]["parameters"])


# --- through qlora serve, with the openai client ---------------------------------------------------------------


@pytest.fixture(scope="module")
def random_served(tool_model_dir, tmp_path_factory):
    """A random (untrained) Qwen2 with the tool model's tokenizer and Qwen 2.5's template, served."""
    from transformers import AutoTokenizer

    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    folder = build_tiny_model(tmp_path_factory.mktemp("random-tool") / "m",
                              tokenizer=AutoTokenizer.from_pretrained(tool_model_dir), arch="qwen2", seed=1)
    model, tokenizer = qlora.load_model(folder, compute_dtype=torch.float32, device="cpu")
    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=4, context_length=1024).start()
    with BackgroundServer(build_app(batcher, "tiny", [])) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        yield server, batcher, client
    batcher.close()


def _named(name):
    return {"type": "function", "function": {"name": name}}


def _streamed(client, **kw):
    chunks = list(client.chat.completions.create(stream=True, **kw))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    calls = [(tc.function.name, tc.function.arguments) for d in deltas for tc in d.tool_calls or ()]
    return "".join(d.content or "" for d in deltas), calls, finish


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (0.8, 0.9), (1.5, 1.0)])
def test_a_random_model_forced_to_call_always_returns_a_valid_call(random_served, temperature, top_p):
    _, _, client = random_served
    for seed in range(1 if temperature == 0 else 2):
        for choice in (_named("set_unit"), "required"):
            kw = dict(model="tiny", messages=[ASK], tools=BOUNDED, tool_choice=choice, temperature=temperature,
                      top_p=top_p, seed=seed, max_tokens=300)
            reply = client.chat.completions.create(**kw).choices[0]
            assert reply.finish_reason == "tool_calls" and reply.message.content is None
            (call,) = reply.message.tool_calls
            assert call.function.name in NAMES and call.id.startswith("call_")
            if choice != "required":
                assert call.function.name == "set_unit"
            args = json.loads(call.function.arguments)
            assert args == {} if call.function.name == "ping" else args["unit"] in ("celsius", "fahrenheit")
            content, calls, finish = _streamed(client, **kw)
            assert content == "" and finish == ["tool_calls"]
            assert calls == [(call.function.name, call.function.arguments)]  # greedy or the same seed: same call


def test_unbounded_arguments_are_valid_json_or_cut_by_the_limit_never_malformed(random_served):
    _, _, client = random_served
    outcomes = set()
    for seed in range(4):
        reply = client.chat.completions.create(model="tiny", messages=[ASK], tools=TOOLS, tool_choice="required",
                                               temperature=1.0, seed=seed, max_tokens=60).choices[0]
        outcomes.add(reply.finish_reason)
        if reply.finish_reason == "tool_calls":
            (call,) = reply.message.tool_calls
            assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
            assert isinstance(json.loads(call.function.arguments)["city"], str)  # required, a string
        else:
            assert reply.finish_reason == "length" and not reply.message.tool_calls
            assert reply.message.content.startswith('<tool_call>\n{"name": "get_weather", "arguments": {')
    assert outcomes <= {"tool_calls", "length"}


@pytest.mark.parametrize("max_tokens", [2, 12])
def test_a_length_cut_inside_the_call_is_text_with_finish_length(random_served, max_tokens):
    _, _, client = random_served
    kw = dict(model="tiny", messages=[ASK], tools=BOUNDED, tool_choice=_named("set_unit"), temperature=0,
              max_tokens=max_tokens)
    reply = client.chat.completions.create(**kw)
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert reply.usage.completion_tokens == max_tokens
    full = '<tool_call>\n{"name": "set_unit", "arguments": '
    assert choice.message.content and (full.startswith(choice.message.content) or choice.message.content.startswith(full))
    content, calls, finish = _streamed(client, **kw)
    assert (content, calls, finish) == (choice.message.content, [], ["length"])


def test_forced_and_free_requests_share_a_batch_and_the_free_one_is_unchanged(random_served):
    _, batcher, client = random_served
    free = dict(model="tiny", messages=[{"role": "user", "content": "Tell me about Paris."}], temperature=0,
                max_tokens=40)
    alone = client.chat.completions.create(**free).choices[0].message.content
    forced = dict(model="tiny", messages=[ASK], tools=BOUNDED, tool_choice="required", temperature=1.0, max_tokens=300)
    with ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(client.chat.completions.create, seed=s, **forced) for s in range(2)]
        mixed = [pool.submit(client.chat.completions.create, **free) for _ in range(2)]
        assert [m.result().choices[0].message.content for m in mixed] == [alone, alone]
        assert all(c.result().choices[0].finish_reason == "tool_calls" for c in calls)
    assert batcher.stats["max_rows_in_step"] >= 2  # the other tests of this module send one request at a time


def test_a_named_function_not_offered_is_a_400_naming_it(random_served):
    _, _, client = random_served
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=[ASK], tools=BOUNDED, tool_choice=_named("get_time"))
    assert exc.value.param == "tool_choice" and "'get_time'" in exc.value.body["message"]
    assert "set_unit, ping" in exc.value.body["message"]


def test_forced_tools_with_schemas_that_cannot_be_kept_are_a_400(random_served):
    _, _, client = random_served
    strict = {"type": "function", "function": {"name": "find", "strict": True, "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "pattern": "^(?!x)[a-z]+$"}}, "required": ["q"],
        "additionalProperties": False}}}
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=[ASK], tools=[strict], tool_choice="required")
    assert exc.value.param == "tools.0.function.parameters" and "properties.q.pattern" in exc.value.message
    loose = {"type": "function", "function": {**strict["function"], "strict": False}}
    reply = client.chat.completions.create(model="tiny", messages=[ASK], tools=[loose], tool_choice="required",
                                           max_tokens=2).choices[0]
    assert reply.finish_reason == "length"  # accepted, 'pattern' unchecked
    endless = {"type": "function", "function": {"name": "loop", "parameters": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/A"}}, "required": ["a"],
        "$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"$ref": "#/$defs/A"}}}}}
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=[ASK], tools=[endless, PING],
                                       tool_choice=_named("loop"))
    assert exc.value.param == "tools.0.function.parameters" and "reference cycle" in exc.value.message
    assert "$defs.A" in exc.value.message


@pytest.mark.parametrize("template, reason", [
    ((TEMPLATES / "glm-4.5.jinja").read_text(), "<arg_key>"),
    ("{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}{% for m in messages %}"
     "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n", "no call markup"),
])
def test_a_template_whose_calls_cannot_be_forced_is_a_400_saying_why(random_served, template, reason):
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    _, batcher, _ = random_served
    app = build_app(batcher, "other", [], chat_formats={None: ChatFormat(template, origin="other.jinja")})
    with BackgroundServer(app) as server:
        body = {"model": "other", "messages": [ASK], "tools": BOUNDED, "max_tokens": 2}
        forced = httpx.post(server.url + "/v1/chat/completions", json=body | {"tool_choice": "required"}, timeout=60)
        auto = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert forced.status_code == 400 and auto.status_code == 200
    error = forced.json()["error"]
    assert error["param"] == "tool_choice" and reason in error["message"] and "'auto'" in error["message"]


def test_constrained_sampling_is_the_allowed_tokens_renormalized_distribution():
    """Oracle: softmax over the allowed tokens only (then top-p among them), counted over many draws."""
    from qlora.infer.constrained import choose_token

    logits = torch.tensor([3.0, 1.0, 2.5, 0.5, 1.5, -1.0])
    allowed = {1, 3, 4, 5}
    accepts = allowed.__contains__
    generator = torch.Generator().manual_seed(0)
    assert choose_token(logits, SamplingOptions(temperature=0), None, accepts) == 4  # the best allowed
    assert choose_token(logits, SamplingOptions(temperature=0), None, accepts, preferred=[0, 3]) == 3
    assert choose_token(logits, SamplingOptions(temperature=1.0, top_p=1.0), generator, lambda t: False) is None
    for temperature, top_p in ((1.0, 1.0), (0.7, 1.0), (1.0, 0.6)):
        ids = sorted(allowed)
        expected = torch.zeros(6)
        expected[ids] = (logits[ids] / temperature).softmax(-1)
        if top_p < 1:  # the smallest set of allowed tokens, best first, holding top_p of their mass
            order = expected.argsort(descending=True)
            cumulative = expected[order].cumsum(0)
            expected[order[(cumulative - expected[order]) >= top_p]] = 0
            expected /= expected.sum()
        options = SamplingOptions(temperature=temperature, top_p=top_p)
        counts = torch.zeros(6)
        for _ in range(4000):
            counts[choose_token(logits, options, generator, accepts)] += 1
        assert torch.allclose(counts / 4000, expected, atol=0.025), (temperature, top_p, counts / 4000, expected)
