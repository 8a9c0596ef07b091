"""A turn end the vocabulary spells as text ends a chat reply, as a stop string would.

ChatML on Gemma 2's vocabulary, which has no ``<|im_end|>`` token: a fine-tune writes ``hi<|im_end|>\\n`` and then
its EOS, or runs on into another turn. The model here is a real GPT-2 checkpoint whose greedy reply is scripted
(tests/scripted_model.py), so each command's text is known: ``qlora generate``, ``qlora chat`` (its
:class:`~qlora.infer.chat.Chat`) and ``qlora serve`` (the openai client: chat completions and responses, streamed
and not) reply ``hi`` with finish_reason ``stop``; raw text (``--template none``, completions) is no chat and keeps
the text. Oracles: the real
templates of tests/data/chat_templates rendered by ``apply_chat_template``, and which of their turn ends are tokens of
their vocabulary.
"""

from __future__ import annotations

import copy

import pytest
import torch

import qlora
from chat_families import FAMILIES, family_tokenizer
from qlora.cli.main import main
from qlora.infer.chat import Chat
from qlora.infer.messages import Message
from qlora.infer.template import render_chat
from qlora.infer.turn_end import TurnEnds, turn_end_stops
from qlora.model.chat_format import ChatFormat
from qlora.model.chat_format import stop_token_ids as vocabulary_stop_ids
from qlora.train.data.templates import TEMPLATES, resolve_chat_format
from scripted_model import build_scripted_model

TURN = "hi<|im_end|>\n"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_only_a_turn_end_that_is_text_becomes_a_stop_string(family):
    """A family's own template ends each turn with a stop token (Llama 3's <|eot_id|>, Qwen's <|im_end|>, Gemma's
    <end_of_turn>, those its generation_config lists): no stop string, as before. ChatML gets <|im_end|> as one
    exactly on the vocabularies without that token; Alpaca ends a turn with EOS, a stop token."""
    tok = family_tokenizer(family)
    vocab = tok.get_vocab()
    stops = vocabulary_stop_ids(tok, [vocab[t] for t in FAMILIES[family]["generation_eos"]])
    assert turn_end_stops(tok, stops) == ()
    expected = () if "<|im_end|>" in vocab else ("<|im_end|>",)
    assert turn_end_stops(tok, stops, ChatFormat(TEMPLATES["chatml"])) == expected
    assert turn_end_stops(tok, stops, ChatFormat(TEMPLATES["alpaca"])) == ()


def test_a_custom_templates_text_turn_end_up_to_the_next_turn():
    """A user's template whose turn ends in a text line: that line, stripped, without the next turn's opening; one
    whose turn ends in whitespace or punctuation only (common inside answers) gets none; markup or a word is kept."""
    tok = family_tokenizer("llama-2")
    stops = vocabulary_stop_ids(tok)
    ended = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\n' }}"
             "{% else %}{{ 'A: ' + m['content'] + '\n### End\n\n' }}{% endif %}{% endfor %}")
    assert turn_end_stops(tok, stops, ChatFormat(ended, "t.jinja", "custom")) == ("### End",)
    blank = ended.replace("### End\n", "")
    assert turn_end_stops(tok, stops, ChatFormat(blank, "t.jinja", "custom")) == ()
    for common in (".", " !\n", "---", "...", "\u3002", ":)"):  # punctuation alone is inside answers: no stop
        custom = ended.replace("### End", common)
        assert turn_end_stops(tok, stops, ChatFormat(custom, "t.jinja", "custom")) == (), common
    for marker in ("END", "</answer>", "[/A]", "#"):
        custom = ended.replace("### End", marker)
        assert turn_end_stops(tok, stops, ChatFormat(custom, "t.jinja", "custom")) == (marker,), marker


class CountedFormat(ChatFormat):
    """A chat format that counts its renders (each template render of a prompt or of the turn-end probe)."""

    renders: list[int] = []

    def render(self, *args, **kwargs) -> str:
        CountedFormat.renders.append(1)
        return super().render(*args, **kwargs)


def test_turn_ends_are_computed_once_per_format_and_options():
    """:class:`TurnEnds` answers what :func:`turn_end_stops` answers, each format's and template variables' once:
    asked again, the format renders nothing more (the function renders twice per call)."""
    tok = family_tokenizer("llama-2")
    stops = vocabulary_stop_ids(tok)
    ends = TurnEnds(tok, stops)
    for fmt in (None, ChatFormat(TEMPLATES["chatml"]), ChatFormat(TEMPLATES["alpaca"])):
        for kwargs in (None, {"enable_thinking": False}):
            assert ends(fmt, kwargs) == turn_end_stops(tok, stops, fmt, kwargs)
    counted = CountedFormat(TEMPLATES["chatml"], "chatml", "chatml")
    CountedFormat.renders.clear()
    assert turn_end_stops(tok, stops, counted) == ("<|im_end|>",) and len(CountedFormat.renders) == 2
    CountedFormat.renders.clear()
    assert [ends(counted) for _ in range(3)] == [("<|im_end|>",)] * 3 and len(CountedFormat.renders) == 2
    assert ends(counted, {"add_generation_prompt": True}) == ("<|im_end|>",)  # the prompt's end: the same probe
    assert len(CountedFormat.renders) == 2
    assert ends(counted, {"enable_thinking": True}) == ("<|im_end|>",) and len(CountedFormat.renders) == 4


@pytest.fixture(scope="module")
def chatml_tokenizer():
    tok = copy.deepcopy(family_tokenizer("gemma-2"))
    assert "<|im_end|>" not in tok.get_vocab()
    tok.chat_template = TEMPLATES["chatml"]
    return tok


@pytest.fixture(scope="module", params=["then EOS", "runs on"])
def scripted(request, tmp_path_factory, chatml_tokenizer):
    """A model replying ``hi<|im_end|>\\n`` to "Hello" in ChatML, then EOS, or running on into more turns."""
    tok = chatml_tokenizer
    prompt = render_chat(tok, [Message("user", "Hello")])
    turn = tok(TURN, add_special_tokens=False).input_ids
    script = turn + [tok.eos_token_id] if request.param == "then EOS" else turn * 4
    prompt_len = len(tok(prompt, add_special_tokens=False).input_ids)
    return build_scripted_model(tmp_path_factory.mktemp("scripted"), tok, prompt_len, script), request.param


def test_generate_stops_at_the_turn_end(scripted, chatml_tokenizer, capsys):
    model_dir, _ = scripted
    common = ["generate", "--model", str(model_dir), "--template", "chatml", "--prompt", "Hello", "--temperature", "0",
              "--max-new-tokens", "40", "--compute-dtype", "fp32"]
    assert main(common) == 0
    assert capsys.readouterr().out == "hi\n"
    assert main([*common, "--stop", "i"]) == 0  # the user's stops still end it where they come first
    assert capsys.readouterr().out == "h\n"
    raw = render_chat(chatml_tokenizer, [Message("user", "Hello")])  # the same prompt as raw text: no chat turn
    assert main([*common, "--template", "none", "--prompt", raw]) == 0
    assert capsys.readouterr().out.startswith(TURN)


def test_chat_stops_at_the_turn_end_and_remembers_the_reply(scripted):
    model_dir, _ = scripted
    model, tok = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    chat = Chat(model, tok, chat_format=resolve_chat_format(tok, "chatml"), temperature=0, max_new_tokens=40)
    pieces = list(chat.send("Hello"))
    assert "".join(pieces) == "hi" and chat.last_reply == "hi"
    assert not any("<" in p for p in pieces)  # no part of the turn end is streamed before it is recognized


@pytest.fixture(scope="module")
def served(scripted):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model_dir, kind = scripted
    model, tok = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    batcher = ContinuousBatcher(model.eval(), tok, max_batch_size=2, context_length=128).start()
    with BackgroundServer(build_app(batcher, "tiny", [])) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60), kind
    batcher.close()


def test_serve_chat_completions_stop_at_the_turn_end(served, chatml_tokenizer):
    client, kind = served
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Hello"}], temperature=0, max_tokens=40)
    choice = client.chat.completions.create(**ask).choices[0]
    assert (choice.message.content, choice.finish_reason) == ("hi", "stop")
    chunks = [c.choices[0] for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    pieces = [c.delta.content for c in chunks if c.delta.content]
    assert "".join(pieces) == "hi" and chunks[-1].finish_reason == "stop"
    assert not any("<" in p for p in pieces)
    choice = client.chat.completions.create(**ask, stop=["i"]).choices[0]
    assert (choice.message.content, choice.finish_reason) == ("h", "stop")
    # a raw completion is no chat turn: its text goes on as the model writes it
    prompt = render_chat(chatml_tokenizer, [Message("user", "Hello")]).removeprefix("<bos>")  # the tokenizer adds BOS
    choice = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=20).choices[0]
    assert choice.text.startswith(TURN) and (TURN if kind == "then EOS" else TURN * 2).startswith(choice.text)


def test_include_stop_str_in_output_keeps_the_turn_end_only_as_vllm_keeps_an_end_of_turn_token(served,
                                                                                               chatml_tokenizer):
    """``include_stop_str_in_output`` keeps a user's stop string; the turn end is no user's stop but the end-of-turn
    token this vocabulary lacks, kept only where vLLM keeps such a token, a special one: with ``skip_special_tokens``
    off (it was kept whenever the option was on). The oracle is the stop token itself, in a raw completion: EOS after
    the turn, kept with the option only when special tokens are shown."""
    client, kind = served
    ask = dict(model="tiny", messages=[{"role": "user", "content": "Hello"}], temperature=0, max_tokens=40)

    def chat(stream: bool = False, **extra) -> str:
        if not stream:
            choice = client.chat.completions.create(**ask, extra_body=extra).choices[0]
            assert choice.finish_reason == "stop"
            return choice.message.content
        chunks = [c.choices[0] for c in client.chat.completions.create(**ask, stream=True, extra_body=extra)
                  if c.choices]
        assert chunks[-1].finish_reason == "stop"
        return "".join(c.delta.content or "" for c in chunks)

    for stream in (False, True):
        assert chat(stream, include_stop_str_in_output=True) == "hi"
        assert chat(stream, skip_special_tokens=False) == "hi"
        assert chat(stream, include_stop_str_in_output=True, skip_special_tokens=False) == "hi<|im_end|>"
        assert chat(stream, include_stop_str_in_output=True, stop=["i"]) == "hi"  # the user's stop is kept
        assert chat(stream, include_stop_str_in_output=True, stop=["<|im_end|>"]) == "hi<|im_end|>"  # named: kept
    assert client.responses.create(model="tiny", input="Hello", temperature=0, max_output_tokens=40,
                                   extra_body={"include_stop_str_in_output": True}).output_text == "hi"
    if kind == "then EOS":
        prompt = render_chat(chatml_tokenizer, [Message("user", "Hello")]).removeprefix("<bos>")
        raw = dict(model="tiny", prompt=prompt, temperature=0, max_tokens=20)
        texts = [client.completions.create(**raw, extra_body=extra).choices[0].text for extra in (
            {"include_stop_str_in_output": True}, {"include_stop_str_in_output": True, "skip_special_tokens": False})]
        assert texts == [TURN, TURN + chatml_tokenizer.eos_token]


def test_serve_responses_stop_at_the_turn_end(served):
    client, _ = served
    reply = client.responses.create(model="tiny", input="Hello", temperature=0, max_output_tokens=40)
    assert (reply.output_text, reply.status) == ("hi", "completed")
    events = list(client.responses.create(model="tiny", input="Hello", temperature=0, max_output_tokens=40,
                                          stream=True))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "hi" and not any("<" in d for d in deltas)
    assert events[-1].type == "response.completed"


def test_serve_derives_the_turn_end_once_per_format(scripted):
    """A server renders each chat request's prompt, and the format's turn-end probe only for its first request (it
    rendered the probe's two turns for every request): the replies stay the turn-ended ``hi``."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model_dir, _ = scripted
    model, tok = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    batcher = ContinuousBatcher(model.eval(), tok, max_batch_size=2, context_length=128).start()
    counted = CountedFormat(TEMPLATES["chatml"], "chatml", "chatml")
    CountedFormat.renders.clear()
    try:
        with BackgroundServer(build_app(batcher, "tiny", [], chat_formats={None: counted})) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
            for _ in range(4):
                reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                                       temperature=0, max_tokens=40)
                assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("hi", "stop")
            assert client.responses.create(model="tiny", input="Hello", temperature=0,
                                           max_output_tokens=40).output_text == "hi"
    finally:
        batcher.close()
    assert len(CountedFormat.renders) == 5 + 2  # each prompt once, the probe's two turns once
