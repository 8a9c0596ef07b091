"""Streamed generation: greedy equals model.generate, sampling is seeded, stops on EOS."""

from __future__ import annotations

import time

import pytest
import torch

from qlora.infer.generate import SamplingOptions, next_token, stream_text, stream_tokens


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


def _ids(tokenizer, text="The quick brown fox"):
    return tokenizer(text, return_tensors="pt").input_ids


def test_greedy_stream_equals_model_generate(lm):
    model, tok = lm
    ids = _ids(tok)
    ref = model.generate(ids, do_sample=False, max_new_tokens=24, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    greedy = SamplingOptions(max_new_tokens=24, temperature=0)
    assert list(stream_tokens(model, ids, greedy, [tok.eos_token_id])) == ref
    pieces = list(stream_text(model, tok, "The quick brown fox", greedy))
    assert len(pieces) > 1
    assert "".join(pieces) == tok.decode(ref, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible(lm):
    model, tok = lm
    ids = _ids(tok)

    def sample(seed):
        return list(stream_tokens(model, ids, SamplingOptions(max_new_tokens=16, temperature=1.0, top_p=1.0, seed=seed)))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert len(sample(3)) == 16


def test_top_k_one_is_greedy(lm):
    model, tok = lm
    ids = _ids(tok)
    greedy = list(stream_tokens(model, ids, SamplingOptions(max_new_tokens=10, temperature=0)))
    top1 = list(stream_tokens(model, ids, SamplingOptions(max_new_tokens=10, temperature=1.5, top_k=1, seed=0)))
    assert top1 == greedy


def test_stops_after_a_stop_token(lm):
    model, tok = lm
    ids = _ids(tok)
    first = next(stream_tokens(model, ids, SamplingOptions(max_new_tokens=10, temperature=0)))
    assert list(stream_tokens(model, ids, SamplingOptions(max_new_tokens=10, temperature=0), [first])) == [first]


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    g = torch.Generator().manual_seed(0)
    seen = {next_token(logits, SamplingOptions(temperature=1.0, top_p=0.6), g) for _ in range(200)}
    assert seen == {0, 1}
    seen = {next_token(logits, SamplingOptions(temperature=1.0, top_p=0.5), g) for _ in range(50)}
    assert seen == {0}
    seen = {next_token(logits, SamplingOptions(temperature=1.0, top_p=1.0, top_k=2), g) for _ in range(200)}
    assert seen == {0, 1}


def test_greedy_stream_equals_model_generate_on_nf4(tiny_model_dir):
    from qlora.model.load import load_model

    model, tok = load_model(tiny_model_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    ids = _ids(tok)
    ref = model.generate(ids, do_sample=False, max_new_tokens=12, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    assert list(stream_tokens(model, ids, SamplingOptions(max_new_tokens=12, temperature=0), [tok.eos_token_id])) == ref


def test_cli_prompt_from_stdin_equals_the_same_prompt_inline(tiny_model_dir, capsys, monkeypatch):
    import io

    from qlora.cli.main import main

    prompt = "Question: what is the capital of France?\nAnswer:"
    argv = ["generate", "--model", str(tiny_model_dir), "--template", "none", "--max-new-tokens", "6", "--temperature", "0"]
    assert main(argv + ["--prompt", prompt]) == 0
    inline = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(prompt))
    assert main(argv + ["--prompt", "-"]) == 0
    assert capsys.readouterr().out == inline and inline.strip()
    monkeypatch.setattr("sys.stdin", io.StringIO("  \n"))
    assert main(argv + ["--prompt", "-"]) == 2
    assert "--prompt is empty" in capsys.readouterr().err


def test_harmony_replies_do_not_stop_at_the_end_of_their_reasoning(tiny_tokenizer):
    """gpt-oss closes its analysis message with <|end|> and the reply with <|return|>; Phi-3 ends a
    turn with <|end|>. Generation stops on <|end|> only for the latter (or when generation_config says)."""
    import copy
    from types import SimpleNamespace

    from qlora.infer.template import stop_token_ids

    phi = copy.deepcopy(tiny_tokenizer)
    phi.add_special_tokens({"additional_special_tokens": ["<|end|>", "<|assistant|>"]})
    harmony = copy.deepcopy(tiny_tokenizer)
    harmony.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|end|>", "<|message|>", "<|channel|>",
                                                              "<|return|>", "<|call|>"]})
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=None))
    end, ret = harmony.convert_tokens_to_ids("<|end|>"), harmony.convert_tokens_to_ids("<|return|>")
    assert phi.convert_tokens_to_ids("<|end|>") in stop_token_ids(model, phi)
    assert ret in stop_token_ids(model, harmony) and end not in stop_token_ids(model, harmony)
    assert harmony.convert_tokens_to_ids("<|call|>") in stop_token_ids(model, harmony)  # a tool call ends a reply
    listed = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[ret, end]))
    assert end in stop_token_ids(listed, harmony)


def test_state_space_models_generate_with_their_own_cache_and_are_served_one_at_a_time(tmp_path, tiny_tokenizer):
    """Mamba keeps a recurrent state, not key/value pairs: generation passes it back (greedy equals
    recomputing the whole sequence each step); continuous batching, which re-batches key/value caches,
    says so at start and serves the model one request at a time, with the same tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora.infer.batcher import ContinuousBatcher, Request
    from qlora.model.load import load_model

    config = AutoConfig.for_model("mamba", vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2,
                                  state_size=8, initializer_range=0.5, bos_token_id=tiny_tokenizer.bos_token_id,
                                  eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, tokenizer = load_model(tmp_path, compute_dtype=torch.float32, device="cpu")
    ids = _ids(tokenizer)
    got = list(stream_tokens(model, ids, SamplingOptions(max_new_tokens=8, temperature=0.0)))
    expected, seq = [], ids
    with torch.no_grad():
        for _ in range(8):
            expected.append(int(model(seq).logits[0, -1].argmax()))
            seq = torch.cat([seq, torch.tensor([[expected[-1]]])], dim=1)
    assert got == expected and len(set(got)) > 1, (got, expected)
    batcher = ContinuousBatcher(model, tokenizer)
    # transformers 5 holds Mamba's state in cache layers (5.24's forward fails on a plain key/value cache it is
    # given), 4.x in its own cache_params: each is named
    assert any(why in batcher.unbatchable for why in ("cache holds", "recurrent state", "plain key/value cache")), \
        batcher.unbatchable
    events = []
    batcher.start()
    try:
        with batcher.paused():
            for n in (8, 5):
                batcher.submit(Request(ids[0].tolist(), None, SamplingOptions(max_new_tokens=n, temperature=0.0),
                                       events.append))
        deadline = time.monotonic() + 60
        while sum(e.finish_reason is not None for e in events) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        batcher.close()
    text = "".join(e.text for e in events)
    assert text == tokenizer.decode(got, skip_special_tokens=True) + tokenizer.decode(got[:5], skip_special_tokens=True)
    assert batcher.load()["max_rows_in_step"] == 1


def test_cli_chat_prompt_has_the_ids_training_used(lm, tiny_model_dir, capsys):
    """A chat-formatted --prompt is tokenized as apply_chat_template(tokenize=True) tokenizes it (and training
    does): a tokenizer that adds BOS to plain text adds none to a template's rendering without one."""
    from qlora.cli.main import main

    model, tok = lm
    conversation = [{"role": "user", "content": "what is two plus two?"}]
    text = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert tok.bos_token not in text and tok(text).input_ids[0] == tok.bos_token_id  # the case in question
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    ref = model.generate(ids, do_sample=False, max_new_tokens=16, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    assert main(["generate", "--model", str(tiny_model_dir), "--quant", "none", "--compute-dtype", "fp32",
                 "--template", "tokenizer", "--temperature", "0", "--max-new-tokens", "16",
                 "--prompt", conversation[0]["content"]]) == 0
    assert capsys.readouterr().out == tok.decode(ref, skip_special_tokens=True) + "\n"
