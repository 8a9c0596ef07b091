"""A model's generation config rules decoding as in transformers' ``generate``.

BART, Marian and Pegasus configs force EOS as the last token at the length limit; other checkpoints force a first
token, suppress or ban tokens, forbid repeated n-grams, set a minimum length or a repetition penalty. The oracle is
``model.generate(do_sample=False)`` on the same loaded model with the same generation config; each case is checked
to change generate's tokens (a rule that changes nothing would prove nothing), and then qlora's three decoding
loops (``stream_tokens``: generate and chat; ``generate_per_adapter``; the continuous batcher: serve) must give
them token for token.
"""

from __future__ import annotations

import contextlib
import copy
import threading

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qlora.infer.batcher import ContinuousBatcher, Event, Request
from qlora.infer.generate import SamplingOptions, encode_prompt, generate_per_adapter, stream_tokens
from qlora.infer.token_filter import TokenFilter
from qlora.model.load import load_model
from qlora.model.tiny import build_tiny_model

from test_generate_architectures import _batched

SEQ2SEQ_DECODER = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=256,
                       init_std=0.5)


def _reference(model, prompt: torch.Tensor, new: int) -> list[int]:
    """generate's greedy reply, up to and with its first EOS."""
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False)
    return out[0, prompt.shape[1]:].tolist()[:_end(model, out[0, prompt.shape[1]:].tolist())]


@contextlib.contextmanager
def _generation_config(model, **fields):
    """``model`` with these fields set on (a copy of) its generation config."""
    original = model.generation_config
    model.generation_config = copy.deepcopy(original)
    for key, value in fields.items():
        setattr(model.generation_config, key, value)
    try:
        yield
    finally:
        model.generation_config = original


def _eos(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return {eos} if isinstance(eos, int) else set(eos or ())


def _end(model, tokens: list[int]) -> int:
    return next((i + 1 for i, t in enumerate(tokens) if t in _eos(model)), len(tokens))


def _check_loops(model, tokenizer, texts: list[str], new: int) -> list[list[int]]:
    """generate's tokens for each prompt text, after asserting that qlora's loops give the same."""
    prompts = [encode_prompt(model, tokenizer, t) for t in texts]
    expected = [_reference(model, p, new) for p in prompts]
    options = SamplingOptions(max_new_tokens=new, temperature=0)
    assert [list(stream_tokens(model, p, options, _eos(model))) for p in prompts] == expected
    assert [generate_per_adapter(model, tokenizer, t, [None, None], options, _eos(model)) for t in texts] == \
        [[tokenizer.decode(e, skip_special_tokens=True)] * 2 for e in expected]
    assert _batched(model, tokenizer, [(p[0].tolist(), new) for p in prompts], frozenset(_eos(model)))[0] == expected
    return expected


PROMPTS = ["The quick brown fox", "a b a b a b a b"]


@pytest.mark.parametrize("arch", ["bart", "marian", "pegasus"])
def test_forced_eos_of_seq2seq_decoders_ends_the_reply_at_the_limit(arch, tmp_path, tiny_tokenizer):
    if arch not in __import__("transformers").models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
        pytest.skip(f"this transformers has no {arch!r} models")
    tok = tiny_tokenizer
    config = AutoConfig.for_model(arch, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  decoder_start_token_id=tok.pad_token_id, forced_eos_token_id=tok.eos_token_id,
                                  **SEQ2SEQ_DECODER)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)  # generation_config.json carries it
    tok.save_pretrained(tmp_path)
    model, tokenizer = load_model(tmp_path, quant="nf4", compute_dtype=torch.float32, device="cpu")
    assert model.generation_config.forced_eos_token_id == tok.eos_token_id
    prompts = [encode_prompt(model, tokenizer, t) for t in PROMPTS]
    with _generation_config(model, forced_eos_token_id=None):
        unforced = [_reference(model, p, 12) for p in prompts]
    assert all(u[-1] != tok.eos_token_id for u in unforced), unforced  # the limit, not the model, ends them
    expected = _check_loops(model, tokenizer, PROMPTS, 12)
    assert [e[-1] for e in expected] == [tok.eos_token_id] * len(prompts)
    assert [e[:-1] for e in expected] == [u[:-1] for u in unforced]


@pytest.fixture(scope="module")
def llama(tmp_path_factory, tiny_tokenizer):
    path = build_tiny_model(tmp_path_factory.mktemp("rules"), tokenizer=tiny_tokenizer, initializer_range=0.2)
    return load_model(path, quant="nf4", compute_dtype=torch.float32, device="cpu")


# Each case: (fields the reply without the rule is made with, the rule's fields), given generate's greedy reply
# with neither (``free``, to pick tokens the rule must change), the first prompt's length and the tokenizer's EOS.
CASES = {
    "forced_eos_token_id": lambda free, prompt, eos: ({}, dict(forced_eos_token_id=eos)),
    "forced_bos_token_id (one-token prompt)": lambda free, prompt, eos: ({}, dict(forced_bos_token_id=free[0] + 1)),
    "suppress_tokens": lambda free, prompt, eos: ({}, dict(suppress_tokens=free[:2])),
    "begin_suppress_tokens": lambda free, prompt, eos: ({}, dict(begin_suppress_tokens=free[:1])),
    "bad_words_ids": lambda free, prompt, eos: ({}, dict(bad_words_ids=[[free[3]], free[:2], [eos]])),
    "no_repeat_ngram_size": lambda free, prompt, eos: ({}, dict(no_repeat_ngram_size=1)),
    "encoder_no_repeat_ngram_size": lambda free, prompt, eos: ({}, dict(encoder_no_repeat_ngram_size=1)),
    "min_new_tokens": lambda free, prompt, eos: (dict(eos_token_id=free[1]), dict(min_new_tokens=5)),
    "min_length": lambda free, prompt, eos: (dict(eos_token_id=free[1]), dict(min_length=prompt + 5)),
    "repetition_penalty": lambda free, prompt, eos: ({}, dict(repetition_penalty=3.0)),
    "exponential_decay_length_penalty": lambda free, prompt, eos: (
        dict(eos_token_id=free[10]), dict(exponential_decay_length_penalty=(1, 3.0))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_generation_config_rules_give_generates_tokens(case, llama):
    model, tokenizer = llama
    texts = [tokenizer.bos_token, PROMPTS[0]] if "one-token" in case else PROMPTS  # BOS alone: one token
    prompts = [encode_prompt(model, tokenizer, t) for t in texts]
    free = _reference(model, encode_prompt(model, tokenizer, PROMPTS[0]), 12)
    base, rule = CASES[case](free, prompts[0].shape[1], tokenizer.eos_token_id)
    with _generation_config(model, **base):
        plain = [_reference(model, p, 12) for p in prompts]
    with _generation_config(model, **base, **rule):
        ruled = _check_loops(model, tokenizer, texts, 12)
    assert ruled != plain, "the rule changed nothing: the case proves nothing"


def test_a_repetition_penalty_option_replaces_the_models(llama):
    model, tokenizer = llama
    prompt = encode_prompt(model, tokenizer, PROMPTS[0])
    with _generation_config(model, repetition_penalty=3.0):
        given = list(stream_tokens(model, prompt, SamplingOptions(max_new_tokens=12, temperature=0,
                                                                  repetition_penalty=1.0)))
    assert given == list(stream_tokens(model, prompt, SamplingOptions(max_new_tokens=12, temperature=0)))


def test_a_requests_token_filter_outranks_a_forced_eos_it_masks(llama):
    """vLLM's ``allowed_token_ids`` without EOS on a model whose config forces EOS at the limit: the reply runs to
    the limit with allowed tokens only (as generate's with ``prefix_allowed_tokens_fn`` and no forced EOS), rather
    than failing at its last token because the forced EOS is masked."""
    model, tokenizer = llama
    prompt = encode_prompt(model, tokenizer, PROMPTS[0])
    eos = tokenizer.eos_token_id
    allowed = [t for t in range(len(tokenizer)) if t != eos]
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                         prefix_allowed_tokens_fn=lambda *_: allowed)
    expected = out[0, prompt.shape[1]:].tolist()
    done, events, tokens = threading.Event(), [], []

    def emit(event: Event) -> None:
        events.append(event)
        if event.finish_reason:
            done.set()

    with _generation_config(model, forced_eos_token_id=eos):
        batcher = ContinuousBatcher(model, tokenizer, max_batch_size=1, context_length=256)
        advance = batcher._advance
        batcher._advance = lambda row, token, logits: tokens.append(token) or advance(row, token, logits)
        batcher.start()
        try:
            batcher.submit(Request(prompt[0].tolist(), None, SamplingOptions(max_new_tokens=8, temperature=0), emit,
                                   stop_ids=frozenset({eos}), token_filter=TokenFilter(allowed)))
            assert done.wait(60)
        finally:
            batcher.close()
    assert (events[-1].finish_reason, events[-1].error) == ("length", None)
    assert tokens == expected
