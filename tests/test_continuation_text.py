"""A raw continuation's text starts where its prompt's ends: ``qlora generate`` without a chat format and
``/v1/completions`` keep the leading space of the first word, which SentencePiece-style decoders (Llama 2,
Mistral) drop from the first token of what they decode.

Oracle: vLLM's completion text, which its detokenizer decodes after the prompt's last tokens, i.e.
``tokenizer.decode(prompt + reply)[len(tokenizer.decode(prompt)):]``, for byte-level BPE, Llama-style (legacy
``Strip`` decoder), Gemma-style and Unigram (``Metaspace`` decoder) tokenizers built locally.
"""

from __future__ import annotations

import random

import pytest
import torch

from qlora.cli.main import main
from qlora.infer.text_stream import TextStream, byte_token_ids, prompt_context
from qlora.model.tiny import _DEFAULT_TEXT, build_tiny_model, train_sentencepiece_tokenizer, train_tokenizer

TEXT = _DEFAULT_TEXT + ["The capital of France is Paris. naïve café, 世界"] * 5
PROMPTS = ["The capital of France is", "naïve café", "你好", "Hello 🙂", "x", "line\n", "two  spaces "]
REPLIES = [" Paris.", " naïve", "你好 world", " 🙂🚀", "\n  indented", "s", " The quick brown fox."]


def tokenizer(kind: str):
    return train_tokenizer(TEXT, vocab_size=300) if kind == "bpe" else train_sentencepiece_tokenizer(TEXT, family=kind)


def oracle(tok, prompt_ids: list[int], reply: list[int]) -> str:
    return tok.decode(prompt_ids + reply, skip_special_tokens=True)[len(tok.decode(prompt_ids,
                                                                                   skip_special_tokens=True)):]


def streamed(tok, prompt_ids: list[int], reply: list[int], stops=()) -> list[str]:
    text = TextStream(tok, stops, context=prompt_context(tok, prompt_ids))
    return [text.push(t) for t in reply] + [text.flush()]


@pytest.mark.parametrize("kind", ["llama", "gemma", "unigram", "bpe"])
def test_continuation_pieces_join_to_the_text_after_the_prompt(kind):
    tok = tokenizer(kind)
    prompt = tok("The capital of France is").input_ids
    reply = tok(" Paris.", add_special_tokens=False).input_ids
    assert "".join(streamed(tok, prompt, reply)) == " Paris."
    for p in PROMPTS:
        for r in REPLIES:
            ids, more = tok(p).input_ids, tok(r, add_special_tokens=False).input_ids
            pieces = streamed(tok, ids, more)
            assert "".join(pieces) == oracle(tok, ids, more), (p, r)
            assert not any("\ufffd" in piece for piece in pieces)
    rng = random.Random(0)  # a random model's ids; a reply opening with stray bytes after a prompt's byte run
    byte_ids = byte_token_ids(tok)  # spoils the prompt's characters in the oracle's decode, not in the reply's text
    for _ in range(200):
        ids = tok(rng.choice(PROMPTS)).input_ids
        more = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 12))]
        if not (ids[-1] in byte_ids and more[0] in byte_ids | set(tok.all_special_ids)):
            assert "".join(streamed(tok, ids, more)) == oracle(tok, ids, more), (ids, more)


def test_a_stop_string_is_found_in_the_continuation_with_its_leading_space():
    tok = tokenizer("llama")
    prompt = tok("The capital of France is").input_ids
    reply = tok(" Paris. The quick", add_special_tokens=False).input_ids
    assert "".join(streamed(tok, prompt, reply, [" The"])) == " Paris."
    assert "".join(streamed(tok, prompt, reply, [" Paris"])) == ""


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A tiny Llama with a Llama 2-style tokenizer, weights large enough that its greedy words vary."""
    tok = train_sentencepiece_tokenizer(TEXT, family="llama")
    return build_tiny_model(tmp_path_factory.mktemp("spm-continuation") / "m", tokenizer=tok, arch="llama",
                            initializer_range=0.2)


def greedy(model_dir, prompt: str, steps: int) -> tuple[list[int], list[int]]:
    """transformers' greedy ``generate``: the prompt's ids and the reply's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                         pad_token_id=tok.eos_token_id)
    return ids[0].tolist(), out[0, ids.shape[1]:].tolist()



def word_start_prompt(model_dir, tok) -> str:
    """A prompt of TEXT's words whose greedy reply opens with a word-start token (``▁...``), whose space a
    decode of the reply alone drops."""
    for words in range(3, 12):
        for start in range(0, 20):
            prompt = " ".join(" ".join(TEXT).split()[start:start + words])
            ids, reply = greedy(model_dir, prompt, 1)
            if tok.convert_ids_to_tokens(reply[0]).startswith("\u2581"):
                return prompt
    raise AssertionError("no prompt whose reply opens a word")


def test_generate_prints_the_continuation_with_its_leading_space(spm_model, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spm_model)
    prompt = word_start_prompt(spm_model, tok)
    ids, reply = greedy(spm_model, prompt, 8)
    assert main(["generate", "--model", str(spm_model), "--quant", "none", "--compute-dtype", "fp32",
                 "--temperature", "0", "--max-new-tokens", "8", "--prompt", prompt, "--template", "none"]) == 0
    out = capsys.readouterr().out
    assert out == oracle(tok, ids, reply) + "\n"
    assert out.startswith(" ")


def test_completions_keep_the_leading_space_streamed_or_not_and_echo_joins(spm_model):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    import qlora
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tok = qlora.load_model(spm_model, quant="none", compute_dtype=torch.float32, device="cpu")
    prompt = word_start_prompt(spm_model, tok)
    ids, reply = greedy(spm_model, prompt, 6)
    expected = oracle(tok, ids, reply)
    assert expected.startswith(" ")
    batcher = ContinuousBatcher(model.eval(), tok, max_batch_size=4, context_length=256).start()
    try:
        with BackgroundServer(build_app(batcher, "tiny", [])) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
            plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=0)
            assert plain.choices[0].text == expected
            tokens = plain.choices[0].logprobs  # the first token's text (its space kept) opens the text
            assert tokens.text_offset[0] == 0 and expected.startswith(tokens.tokens[0])
            chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                               stream=True)
            assert "".join(c.choices[0].text for c in chunks) == expected
            echoed = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, echo=True)
            assert echoed.choices[0].text == tok.decode(ids + reply, skip_special_tokens=True)
            by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
            assert by_ids.choices[0].text == expected
            for sent in (prompt, ids):  # text_offset indexes the echoed text, whose first word has no space
                scored = client.completions.create(model="tiny", prompt=sent, max_tokens=6, temperature=0,
                                                   echo=True, logprobs=0).choices[0]
                text, lp = scored.text, scored.logprobs
                assert lp.text_offset[len(ids)] == len(text) - len(expected)  # the reply starts where the prompt ends
                assert lp.text_offset[:2] == [0, 0] and text.startswith(lp.tokens[1].removeprefix(" "))
                assert all(text[o:].startswith(t) for o, t in zip(lp.text_offset[2:len(ids)], lp.tokens[2:len(ids)]))
    finally:
        batcher.close()


def test_generate_per_adapter_prints_each_continuation_with_its_leading_space(spm_model, tmp_path, capsys):
    """Several adapters are decoded in one batch (one row each): each row's text follows the prompt as one alone."""
    import qlora
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spm_model)
    prompt = word_start_prompt(spm_model, tok)
    ids, reply = greedy(spm_model, prompt, 6)
    model, _ = qlora.load_model(spm_model, quant="none", compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=4, dropout=0.0, verbose=False)  # B = 0: the base's reply, row by row
    for name in ("a", "b"):
        qlora.save_adapter(model, tmp_path / name)
    assert main(["generate", "--model", str(spm_model), "--quant", "none", "--compute-dtype", "fp32",
                 "--temperature", "0", "--max-new-tokens", "6", "--prompt", prompt, "--template", "none",
                 "--adapter", str(tmp_path / "a"), "--adapter", str(tmp_path / "b")]) == 0
    text = oracle(tok, ids, reply)
    assert capsys.readouterr().out.splitlines() == [f"[a] {text}", f"[b] {text}"]


def test_a_continued_final_message_keeps_its_leading_space(spm_model):
    """/v1/chat/completions with continue_final_message (the assistant's message left open and continued): the reply
    goes on after the message's text, as a raw continuation does, so its first word keeps its space (vLLM decodes it
    after the prompt), and echo joins the message and the reply to the text their tokens spell."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    import qlora
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.model.chat_format import ChatFormat
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tok = qlora.load_model(spm_model, quant="none", compute_dtype=torch.float32, device="cpu")
    started = word_start_prompt(spm_model, tok)
    template = ("{% for m in messages %}{{ m.content }}{% if not (loop.last and continue_final_message) %}\n"
                "{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": started}]
    rendered = tok.apply_chat_template(messages, chat_template=template, continue_final_message=True, tokenize=False)
    assert rendered.endswith(started)
    ids = tok(rendered, add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    reply = out[0, len(ids):].tolist()
    expected = oracle(tok, ids, reply)
    assert expected.startswith(" ") and not tok.decode(reply, skip_special_tokens=True).startswith(" ")
    batcher = ContinuousBatcher(model.eval(), tok, max_batch_size=4, context_length=256).start()
    body = {"continue_final_message": True, "add_generation_prompt": False}
    try:
        app = build_app(batcher, "tiny", [], chat_formats={None: ChatFormat(template, "test template")})
        with BackgroundServer(app) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
            whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                   extra_body=body)
            assert whole.choices[0].message.content == expected
            chunks = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                    stream=True, extra_body=body)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
            echoed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                    extra_body={**body, "echo": True})
            assert echoed.choices[0].message.content == started + expected
    finally:
        batcher.close()
