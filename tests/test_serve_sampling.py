"""``qlora serve``'s sampling controls, driven by the official ``openai`` client: OpenAI's
``presence_penalty``, ``frequency_penalty`` and ``logit_bias``, and vLLM's extra body fields
``repetition_penalty``, ``min_p`` and ``top_k``.

Oracles: transformers' ``generate`` (greedy with ``repetition_penalty``, the model served in fp32),
:func:`qlora.infer.generate.stream_tokens` with the same options (itself checked against transformers
and hand-computed arithmetic in ``test_sampling_controls.py``), each request served alone (for
concurrent rows with different penalties), and the client's parsing of OpenAI's error shape.
"""

from __future__ import annotations

import threading

import pytest
import torch

import qlora
from qlora.infer.generate import SamplingOptions, encode_prompt, stream_tokens
from qlora.infer.messages import Message
from qlora.infer.template import render_chat, stop_token_ids

from test_serve import KEY, _together

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown"
HELLO = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tokenizer = qlora.load_model(tiny_model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=16, context_length=512).start()
    oracle = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with BackgroundServer(build_app(batcher, "tiny", [], api_key=KEY)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        yield batcher, client, tokenizer, oracle
    batcher.close()


def _complete(client, prompt, stream=False, **kw) -> str:
    kw = {"model": "tiny", "prompt": prompt, "max_tokens": 16, "temperature": 0, **kw}
    if not stream:
        return client.completions.create(**kw).choices[0].text
    return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)


def _chat(client, stream=False, **kw) -> str:
    kw = {"model": "tiny", "messages": HELLO, "max_tokens": 12, "temperature": 0, **kw}
    if not stream:
        return client.chat.completions.create(**kw).choices[0].message.content
    return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                   if c.choices)


def _chat_ids(tokenizer) -> list[int]:
    prompt = render_chat(tokenizer, [Message("user", "Hello")])
    return encode_prompt(torch.nn.Linear(1, 1), tokenizer, prompt, chat=True)[0].tolist()


def _reference(oracle, tokenizer, ids: list[int], max_new: int, stops, **generate) -> str:
    out = oracle.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new, eos_token_id=list(stops),
                          pad_token_id=tokenizer.pad_token_id, **generate)[0, len(ids):].tolist()
    return tokenizer.decode(out, skip_special_tokens=True)


@pytest.mark.parametrize("stream", [False, True])
def test_greedy_repetition_penalty_equals_transformers_generate(served, stream):
    batcher, client, tok, oracle = served
    ids = tok(PROMPT).input_ids
    stops = [tok.eos_token_id]
    want = _reference(oracle, tok, ids, 16, stops, repetition_penalty=1.3)
    assert want != _reference(oracle, tok, ids, 16, stops)  # the penalty changes this greedy continuation
    assert _complete(client, ids, stream, extra_body={"repetition_penalty": 1.3}) == want
    chat_ids = _chat_ids(tok)
    chat_stops = stop_token_ids(batcher.model, tok)
    want = _reference(oracle, tok, chat_ids, 12, chat_stops, repetition_penalty=1.3)
    assert want != _reference(oracle, tok, chat_ids, 12, chat_stops)
    assert _chat(client, stream, extra_body={"repetition_penalty": 1.3}) == want


def _word_token(tok) -> int:
    """A plain token whose repetition decodes to its text repeated."""
    token = tok(" fox", add_special_tokens=False).input_ids[-1]
    assert tok.decode([token] * 3) == tok.decode([token]) * 3
    return token


@pytest.mark.parametrize("stream", [False, True])
def test_logit_bias_of_100_forces_that_token_at_every_step(served, stream):
    _, client, tok, _ = served
    token = _word_token(tok)
    forced = tok.decode([token] * 8)
    assert _complete(client, PROMPT, stream, max_tokens=8) != forced
    for temperature in (0, 1.0):  # greedy and sampled alike
        assert _complete(client, PROMPT, stream, max_tokens=8, temperature=temperature, seed=1,
                         logit_bias={str(token): 100}) == forced
        assert _chat(client, stream, max_tokens=8, temperature=temperature, seed=1,
                     logit_bias={str(token): 100}) == forced
    # -100 bans a token: the greedy reply's first token never comes, and the reply is generation's with the ban
    ids = tok(PROMPT).input_ids
    plain = _greedy_ids(served, ids, SamplingOptions(max_new_tokens=16, temperature=0))
    banned = _greedy_ids(served, ids, SamplingOptions(max_new_tokens=16, temperature=0, logit_bias={plain[0]: -100}))
    assert plain[0] not in banned
    reply = _complete(client, ids, stream, logit_bias={str(plain[0]): -100})
    assert reply == tok.decode(banned, skip_special_tokens=True)


def _greedy_ids(served, ids: list[int], options: SamplingOptions) -> list[int]:
    batcher, _, tok, _ = served
    return list(stream_tokens(batcher.model, torch.tensor([ids]), options, [tok.eos_token_id]))


def _tokens(client, prompt, **kw) -> list[str]:
    kw = {"model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0, "logprobs": 0, **kw}
    reply = client.completions.create(**kw)
    return reply.choices[0].logprobs.tokens


def test_frequency_and_presence_penalties_stop_greedy_repetition(served):
    batcher, client, tok, _ = served
    ids = tok(PROMPT).input_ids
    plain = _tokens(client, ids)
    most = max(plain.count(t) for t in plain)
    assert most > 2  # this random model repeats a token greedily
    for penalty in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        penalized = _tokens(client, ids, **penalty)
        assert max(penalized.count(t) for t in penalized) < most
        # exactly the tokens generation with the same options gives (one row of the batcher or a plain loop)
        alone = _greedy_ids(served, ids, SamplingOptions(max_new_tokens=24, temperature=0, **penalty))
        assert _complete(client, ids, max_tokens=24, **penalty) == tok.decode(alone, skip_special_tokens=True)
    # vLLM's min_p and top_k ride along as extra body fields; top_k=1 is greedy whatever the temperature
    assert _tokens(client, ids, temperature=1.5, seed=0, extra_body={"top_k": 1, "min_p": 0.5}) == plain


BAD = [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-2.01), "frequency_penalty"),
    (dict(logit_bias={"100000": 1}), "logit_bias.100000"),
    (dict(logit_bias={"fox": 1}), "logit_bias.fox"),
    (dict(logit_bias={"5": 150}), "logit_bias.5"),
    (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
    (dict(extra_body={"min_p": 1.5}), "min_p"),
    (dict(extra_body={"top_k": -2}), "top_k"),
]


@pytest.mark.parametrize("bad, param", BAD, ids=[p for _, p in BAD])
def test_out_of_range_values_are_400_naming_the_parameter(served, bad, param):
    _, client, _, _ = served
    for call in (lambda: _complete(client, PROMPT, **bad), lambda: _chat(client, stream=True, **bad)):
        with pytest.raises(openai.BadRequestError) as exc:
            call()
        assert exc.value.status_code == 400 and exc.value.param == param
        assert param.split(".")[0] in exc.value.message
    assert _chat(client)  # the server still answers


def test_concurrent_rows_keep_their_own_penalties(served):
    """Rows with different penalties decoded in one batch each get what they get alone (greedy)."""
    batcher, client, tok, _ = served
    token = _word_token(tok)
    asks = {
        "plain": dict(),
        "frequency": dict(frequency_penalty=1.5, presence_penalty=0.5),
        "repetition": dict(extra_body={"repetition_penalty": 1.4}),
        "bias": dict(logit_bias={str(token): 3.0}, presence_penalty=-1.0),
    }
    alone = {name: _complete(client, PROMPT, max_tokens=20, **kw) for name, kw in asks.items()}
    assert len(set(alone.values())) == len(asks)  # the options make a difference
    replies: dict[str, str] = {}

    def ask(name: str) -> None:
        replies[name] = _complete(client, PROMPT, max_tokens=20, **asks[name])

    batcher.stats["max_rows_in_step"] = 0
    _together(batcher, [threading.Thread(target=ask, args=(name,)) for name in asks])
    assert batcher.load()["max_rows_in_step"] == len(asks)  # decoded together
    assert replies == alone


def test_fields_left_out_take_the_models_generation_config_values(sampled_model_dir):
    """As vLLM serves a checkpoint whose generation_config sets how to sample it (here top-k 1, so its draws are
    the greedy tokens, and 7 new tokens): a request that leaves those fields out gets the model's values, one that
    gives them its own. Oracle: transformers' ``generate`` with no options (the model's own config)."""
    from transformers import AutoModelForCausalLM

    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tok = qlora.load_model(sampled_model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    oracle = AutoModelForCausalLM.from_pretrained(sampled_model_dir, dtype=torch.float32).eval()
    chat_ids = _chat_ids(tok)
    out = oracle.generate(torch.tensor([chat_ids]), pad_token_id=tok.pad_token_id,
                          eos_token_id=list(stop_token_ids(model, tok)))[0, len(chat_ids):].tolist()
    assert len(out) == 7  # no stop token among them: the model's limit ends the reply
    want = tok.decode(out, skip_special_tokens=True)
    batcher = ContinuousBatcher(model.eval(), tok, max_batch_size=4, context_length=512).start()
    try:
        with BackgroundServer(build_app(batcher, "tiny", [], api_key=KEY)) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
            for seed in (1, 2):  # temperature left out: the model's 0.8 with its top-k 1, not OpenAI's 1.0 over all
                reply = client.chat.completions.create(model="tiny", messages=HELLO, seed=seed)
                assert reply.choices[0].message.content == want
                assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (7, "length")
            reply = client.chat.completions.create(model="tiny", messages=HELLO, max_completion_tokens=3,
                                                   temperature=0)
            assert reply.usage.completion_tokens == 3 and reply.choices[0].message.content == tok.decode(
                out[:3], skip_special_tokens=True)
            completion = client.completions.create(model="tiny", prompt=PROMPT, seed=1)  # OpenAI's 16, capped at 7
            assert completion.usage.completion_tokens == 7
            drawn = {client.chat.completions.create(model="tiny", messages=HELLO, seed=seed, extra_body={"top_k": 0})
                     .choices[0].message.content for seed in (1, 2, 3)}
            assert len(drawn) > 1  # top_k given: the request's, over the whole vocabulary
            response = client.responses.create(model="tiny", input="Hello", extra_body={"seed": 1})
            assert response.output_text == want and response.usage.output_tokens == 7
            assert (response.temperature, response.top_p) == (0.8, 1.0)  # the values used, as vLLM echoes them
    finally:
        batcher.close()
