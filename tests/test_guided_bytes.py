"""Guided decoding writes characters the vocabulary holds only in pieces: SentencePiece byte-fallback tokens
(``<0xE6>``) and byte-level BPE tokens that end inside a character.

Oracles: Python's incremental UTF-8 decoder and ``str.encode`` (partial sequences), the tokenizer's own ``decode``
(the reply's text), Python's ``re`` and ``json`` (the reply matches), the tokenizer's own encoding of an allowed
string (it must be accepted token by token).
"""

from __future__ import annotations

import codecs
import functools
import json
import random
import re

import pytest
import torch

from qlora.infer.constrained import TokenTexts
from qlora.infer.forced_call import ForcedCall, call_markup
from qlora.infer.generate import SamplingOptions
from qlora.infer.json_reply import JsonReply
from qlora.infer.json_schema import compile_schema
from qlora.infer.regex import Regex
from qlora.infer.regex_reply import RegexReply, choice_pattern
from qlora.infer.utf8 import span, split
from qlora.model.tiny import build_tiny_model, train_sentencepiece_tokenizer, train_tokenizer

ASCII = ["The quick brown fox jumps over the lazy dog.", "Question: what is two plus two? Answer: four."] * 10
CHOICES = ["旦未", "café", "🙂!"]  # 旦 and 未 share their first two bytes with 日 and 本


@functools.lru_cache(maxsize=1)
def _partials() -> dict[bytes, tuple[int, int]]:
    """Each proper prefix of a character's UTF-8 encoding: the lowest and highest code point it begins (beyond the
    BMP every 7th code point: every prefix is still seen, its range only roughly)."""
    out: dict[bytes, tuple[int, int]] = {}
    for code in [*range(0x80, 0xD800), *range(0xE000, 0x10000), *range(0x10000, 0x110000, 7), 0x10FFFF]:
        data = chr(code).encode()
        for k in range(1, len(data)):
            low, high = out.get(data[:k], (code, code))
            out[data[:k]] = (min(low, code), max(high, code))
    return out


def test_span_is_the_code_points_a_partial_sequence_completes_to():
    expected = _partials()
    for partial, (low, high) in expected.items():
        got = span(partial)
        assert got is not None and got[0] <= low and high <= got[1], partial
        assert chr(got[0]).encode().startswith(partial) and chr(got[1]).encode().startswith(partial)
        if partial[0] < 0xF0:  # every code point enumerated: exact
            assert got == (low, high), partial
    for a in range(256):
        for tail in ((), *((b,) for b in range(256))):
            partial = bytes([a, *tail])
            if partial not in expected:
                assert span(partial) is None, partial


def test_split_is_the_incremental_decoder():
    """Whole characters as Python's incremental decoder gives them; the tail kept when some character completes it
    (that decoder, lax there, also keeps a surrogate's first two bytes)."""
    rng = random.Random(0)
    pieces = ["a", "é", "日", "\U0001f642", "\x00", "\ud7ff", "\ue000"]
    for _ in range(4000):
        data = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 4))).encode()
        data = data[:rng.randint(0, len(data))]
        if rng.random() < 0.4:
            at = rng.randint(0, len(data))
            data = data[:at] + bytes([rng.randrange(256)]) + data[at:]
        try:
            text = codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
        except UnicodeDecodeError:
            assert split(data) is None, data
            continue
        tail = data[len(text.encode()):]
        assert split(data) == ((text, tail) if not tail or tail in _partials() else None), data


@pytest.fixture(scope="module")
def spm():
    """Llama 2-style: CJK, accents and emoji are outside the vocabulary, written as <0xNN> byte tokens."""
    return train_sentencepiece_tokenizer(ASCII, family="llama")


@pytest.fixture(scope="module")
def bpe():
    """Byte-level BPE trained on CJK text: its merges hold tokens ending inside a character (日's first two bytes)."""
    return train_tokenizer(ASCII + ["日本語の文 東京 本日"] * 20, vocab_size=400)


def _stops(tok) -> frozenset[int]:
    return frozenset({tok.eos_token_id})


def _sampled(tok, make, runs: int = 40, steps: int = 24) -> list[str]:
    """Replies decoded from random logits (sampling: any token the constraint allows may be drawn)."""
    out = []
    for seed in range(runs):
        torch.manual_seed(seed)
        reply = make()
        ids = list(reply.prefix_ids)
        for _ in range(steps):
            token = reply.choose(torch.randn(len(tok)) * 3, SamplingOptions(temperature=1.0), None)
            assert token is not None
            if token == tok.eos_token_id:
                break
            ids.append(token)
        assert reply.complete, tok.decode(ids)
        out.append(tok.decode(ids))
    return out


@pytest.mark.parametrize("kind", ["spm", "bpe"])
def test_choice_and_regex_replies_are_their_strings_written_in_byte_pieces(kind, request):
    tok = request.getfixturevalue(kind)
    texts = TokenTexts.of(tok)
    assert not any("旦" in (texts.text(t) or "") or "🙂" in (texts.text(t) or "") for t in range(len(tok)))
    stops = _stops(tok)
    choice = Regex(choice_pattern(CHOICES), anchored=True)
    for text in CHOICES if kind == "bpe" else ():  # its own spelling (SentencePiece's adds a "▁") is accepted
        reply = RegexReply(tok, choice, stops)
        ids = tok(text, add_special_tokens=False).input_ids
        assert any(texts.text(t) is None for t in ids) or text == "café"  # "é" is in its vocabulary
        if text == CHOICES[0]:  # a token holding a character's first two bytes
            assert any(texts.text(t) is None and len(texts.bytes(t)) > 1 for t in ids), ids
        for t in ids:
            only = torch.full((len(tok),), -1e9)
            only[t] = 0.0
            assert reply.choose(only, SamplingOptions(temperature=0), None) == t
        assert reply.complete and reply.accepts(tok.eos_token_id)
    assert set(_sampled(tok, lambda: RegexReply(tok, choice, stops))) == set(CHOICES)
    greek = Regex("[α-ω]{2,3}é", anchored=True)
    for text in _sampled(tok, lambda: RegexReply(tok, greek, stops), runs=15):
        assert re.fullmatch("[α-ω]{2,3}é", text), text


@pytest.mark.parametrize("kind", ["spm", "bpe"])
def test_json_strings_enums_and_tool_arguments_in_byte_pieces(kind, request):
    tok = request.getfixturevalue(kind)
    schema = {"type": "object", "properties": {"city": {"enum": ["東京", "Zürich"]},
                                               "kana": {"type": "string", "pattern": "^[ぁ-ゖ]+$", "minLength": 2,
                                                        "maxLength": 2},  # rules combined: StringRule
                                               "tag": {"const": "🙂"}, "数": {"type": "integer", "maximum": 9},
                                               "note": {"type": "string", "maxLength": 2}},
              "required": ["city", "kana", "tag", "数", "note"], "additionalProperties": False}
    root, stops = compile_schema(schema).root, _stops(tok)
    raw = 0
    for text in _sampled(tok, lambda: JsonReply(tok, root, stops), runs=12, steps=600):
        value = json.loads(text)
        assert value["city"] in ("東京", "Zürich") and re.fullmatch("[ぁ-ゖ]{2}", value["kana"]) \
            and value["tag"] == "🙂" and value["数"] <= 9 and len(value["note"]) <= 2 and len(value) == 5, text
        raw += any(ord(c) > 0x7F for c in text)
    assert raw  # not only escapes: characters written raw, in bytes
    markup = call_markup("hermes", "<tool_call>")

    def forced():
        return ForcedCall(tok, markup, [{"type": "function", "function": {"name": "go", "parameters": schema}}],
                          "go", frozenset(), stops)
    raw = 0
    for text in _sampled(tok, forced, runs=6, steps=600):
        call = json.loads(text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
        assert call["name"] == "go" and call["arguments"]["tag"] == "🙂" \
            and call["arguments"]["city"] in ("東京", "Zürich"), text
        raw += any(ord(c) > 0x7F for c in text)
    assert raw


# --- through qlora serve ----------------------------------------------------------------------------------


def _serve(model_dir):
    import qlora
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer
    from qlora.train.data import resolve_chat_format

    model, tok = qlora.load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    batcher = ContinuousBatcher(model.eval(), tok, max_batch_size=4, context_length=256).start()
    app = build_app(batcher, "m", [], api_key="k", chat_formats={None: resolve_chat_format(tok, "auto")})
    return batcher, BackgroundServer(app)


@pytest.fixture(scope="module")
def client(spm, tmp_path_factory):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    batcher, server = _serve(build_tiny_model(tmp_path_factory.mktemp("spm") / "m", tokenizer=spm, arch="llama",
                                              vocab_size=len(spm) + 8, initializer_range=0.2))
    with server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0, timeout=60)
    batcher.close()


def _chat(client, body, stream=False, **kw):
    reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=30,
                                           temperature=0, extra_body=body, stream=stream, **kw)
    if not stream:
        return reply.choices[0].message.content, reply.choices[0].finish_reason
    chunks = [c.choices[0] for c in reply if c.choices]
    return "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason


def test_served_guided_replies_write_byte_fallback_characters(client):
    for text in CHOICES:
        assert _chat(client, {"guided_choice": [text]}) == (text, "stop")
    for stream in (False, True):
        text, finish = _chat(client, {"guided_choice": CHOICES}, stream=stream)
        assert text in CHOICES and finish == "stop"
    completion = client.completions.create(model="m", prompt="The quick", max_tokens=30, temperature=0,
                                           extra_body={"guided_regex": "[α-ω]{2,3}é"}).choices[0]
    assert re.fullmatch("[α-ω]{2,3}é", completion.text) and completion.finish_reason == "stop"
    text, finish = _chat(client, {"guided_json": {"enum": ["東京", "naïve"]}})
    assert json.loads(text) in ("東京", "naïve") and finish == "stop"
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "strict": True, "schema": {
        "type": "string", "pattern": "^[一-龥]{2}$"}}}
    text, finish = _chat(client, None, response_format=fmt)
    assert re.fullmatch("[一-龥]{2}", json.loads(text)) and finish == "stop"


@pytest.fixture(scope="module")
def no_fallback_client(tmp_path_factory):
    """A tokenizer without byte fallback: a character outside its vocabulary cannot be written at all."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    raw.train_from_iterator(ASCII, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    batcher, server = _serve(build_tiny_model(tmp_path_factory.mktemp("nofb") / "m", tokenizer=tok, arch="llama"))
    with server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0, timeout=60)
    batcher.close()


def test_a_character_no_token_spells_is_a_400_or_cuts_the_reply(no_fallback_client):
    import openai

    for body in ({"guided_choice": ["🙂"]}, {"guided_regex": "🙂+"}):
        with pytest.raises(openai.BadRequestError) as err:
            _chat(no_fallback_client, body)
        assert err.value.body["param"] == next(iter(body))
        assert "no token spells its first character" in err.value.body["message"]
    assert _chat(no_fallback_client, {"guided_choice": ["a🙂"]}) == ("a", "length")
