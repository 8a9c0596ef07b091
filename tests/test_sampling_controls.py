"""Repetition penalty, min-p, presence/frequency penalties and logit bias in generation.

Oracles: transformers' ``generate`` (greedy with ``repetition_penalty``) and the
``LogitsProcessorList`` its ``GenerationConfig`` builds (the filtered distribution of each
sampling step, on the same logits and token history); hand-computed arithmetic for OpenAI's
presence/frequency penalties and ``logit_bias``, which transformers does not have.
"""

from __future__ import annotations

import pytest
import torch

from qlora.errors import UsageError
from qlora.infer.generate import SamplingOptions, next_token, sampling_probs, stream_text, stream_tokens
from qlora.infer.penalties import Penalties


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown"


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_greedy_with_repetition_penalty_equals_transformers_generate(lm, penalty):
    model, tok = lm
    ids = tok(PROMPT, return_tensors="pt").input_ids
    ref = model.generate(ids, do_sample=False, max_new_tokens=24, repetition_penalty=penalty,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    plain = model.generate(ids, do_sample=False, max_new_tokens=24, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    assert ref != plain  # the penalty changes this greedy continuation, so the comparison means something
    options = SamplingOptions(max_new_tokens=24, temperature=0, repetition_penalty=penalty)
    assert list(stream_tokens(model, ids, options, [tok.eos_token_id])) == ref


# The tiny random model's next-token distribution is nearly flat (logit std ~0.16): low temperatures
# make min-p cut something.
CONFIGS = [
    dict(temperature=0.7, top_k=40),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=0.1, min_p=0.2),
    dict(temperature=0.2, top_k=60, top_p=0.95, min_p=0.3, repetition_penalty=1.3),
    dict(temperature=0.15, top_p=0.9, min_p=0.5, repetition_penalty=0.8),
    dict(temperature=0.2, typical_p=0.5),
    dict(temperature=0.1, top_k=60, min_p=0.2, typical_p=0.8),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_each_sampling_step_draws_from_the_distribution_transformers_warpers_give(lm, config):
    """Step by step along a seeded sampled reply: the probabilities qlora samples from equal the softmax of
    what ``model._get_logits_processor(GenerationConfig(...))`` makes of the same logits and history."""
    from transformers import GenerationConfig

    model, tok = lm
    ids = tok(PROMPT, return_tensors="pt").input_ids
    options = SamplingOptions(max_new_tokens=12, seed=3, **{"top_p": 1.0, **config})
    reply = list(stream_tokens(model, ids, options))
    gen = GenerationConfig(do_sample=True, **{"top_p": 1.0, "top_k": 0, **config})
    processors = model._get_logits_processor(gen, input_ids_seq_length=ids.shape[1])
    assert len(processors) == len(config)  # one warper/processor per option set (temperature included)
    penalties = Penalties.of(options, ids[0])
    cut = 0
    for k, token in enumerate(reply):
        history = torch.cat([ids[0], torch.tensor(reply[:k], dtype=torch.long)])
        with torch.no_grad():
            logits = model(history[None]).logits[0, -1]
        theirs = processors(history[None], logits[None].clone())[0].softmax(-1)
        ours = sampling_probs(penalties(logits) if penalties is not None else logits, options)
        assert torch.equal(ours > 0, theirs > 0), f"step {k}: different token sets"
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
        assert ours[token] > 0  # the sampled token was in the set
        cut += int((ours > 0).sum()) < logits.numel()
        if penalties is not None:
            penalties.add(token)
    assert cut  # the filters removed tokens at some step


def test_min_p_keeps_tokens_at_least_min_p_times_the_top_one():
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08])
    kept = sampling_probs(probs.log(), SamplingOptions(temperature=1.0, top_p=1.0, min_p=0.2))
    torch.testing.assert_close(kept, torch.tensor([0.5, 0.3, 0.12, 0.0]) / 0.92)  # 0.08 < 0.2 * 0.5
    # after temperature: T = 0.5 squares the ratios, 0.12/0.5 = 0.24 -> 0.0576 < 0.2
    kept = sampling_probs(probs.log(), SamplingOptions(temperature=0.5, top_p=1.0, min_p=0.2))
    assert (kept > 0).tolist() == [True, True, False, False]


def test_presence_frequency_penalties_and_logit_bias_arithmetic():
    """logit[t] += bias[t]; then -= frequency * count[t] + presence * (count[t] > 0), counts over the reply only;
    the repetition penalty also covers the prompt and comes after the bias (transformers' and vLLM's order)."""
    logits = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0, 2.0])
    options = SamplingOptions(presence_penalty=0.5, frequency_penalty=0.25, logit_bias={3: 10.0, 5: -100.0})
    penalties = Penalties(options, [4])  # a prompt token: no presence/frequency penalty
    for token in (0, 2, 2, 1):
        penalties.add(token)
    counts = torch.tensor([1.0, 1.0, 2.0, 0.0, 0.0, 0.0])
    expected = logits + torch.tensor([0.0, 0.0, 0.0, 10.0, 0.0, -100.0]) - 0.25 * counts - 0.5 * (counts > 0).float()
    torch.testing.assert_close(penalties(logits), expected)
    assert expected.tolist() == [0.25, -2.75, 2.0, 10.5, -1.0, -98.0]

    both = SamplingOptions(repetition_penalty=2.0, frequency_penalty=1.0, logit_bias={1: 3.0, 4: -1.0})
    penalties = Penalties(both, [4])
    penalties.add(1)
    # bias: [1, 1, 3, .5, -2, 2]; repetition on 1 (reply) and 4 (prompt): [1, .5, 3, .5, -4, 2]; frequency on 1
    torch.testing.assert_close(penalties(logits), torch.tensor([1.0, -0.5, 3.0, 0.5, -4.0, 2.0]))


def test_penalties_change_greedy_choices_and_stop_a_repeating_token():
    logits = torch.tensor([2.0, 1.9, 0.0])
    greedy = SamplingOptions(temperature=0, frequency_penalty=0.2)
    penalties = Penalties.of(greedy, [])
    chosen = []
    for _ in range(4):
        chosen.append(next_token(logits, greedy, None, penalties))
        penalties.add(chosen[-1])
    assert chosen == [0, 1, 0, 1]  # 2.0 - 0.2 = 1.8 < 1.9, then 1.9 - 0.2 = 1.7 < 1.8 ...
    forced = SamplingOptions(temperature=0, logit_bias={2: 100.0})
    assert next_token(logits, forced, None, Penalties.of(forced, [])) == 2
    assert Penalties.of(SamplingOptions(), [1, 2]) is None  # nothing asked: the logits are used as they are


@pytest.mark.parametrize("bad, option", [(dict(repetition_penalty=0.0), "--repetition-penalty"),
                                         (dict(min_p=1.5), "--min-p"),
                                         (dict(presence_penalty=2.5), "--presence-penalty"),
                                         (dict(frequency_penalty=-3), "--frequency-penalty"),
                                         (dict(logit_bias={5: 101.0}), "logit_bias[5]"),
                                         (dict(logit_bias={-1: 1.0}), "logit_bias")])
def test_out_of_range_options_are_refused_by_name(bad, option):
    with pytest.raises(UsageError, match=option.replace("[", r"\[")):
        SamplingOptions(**bad)


def test_frequency_penalty_stops_a_greedy_repetition(lm):
    model, tok = lm
    ids = tok(PROMPT, return_tensors="pt").input_ids
    plain = list(stream_tokens(model, ids, SamplingOptions(max_new_tokens=24, temperature=0)))
    assert max(plain.count(t) for t in set(plain)) > 2  # this random model repeats itself greedily
    penalized = list(stream_tokens(model, ids, SamplingOptions(max_new_tokens=24, temperature=0,
                                                               frequency_penalty=2.0, presence_penalty=2.0)))
    assert max(penalized.count(t) for t in set(penalized)) < max(plain.count(t) for t in set(plain))


def test_cli_generate_takes_the_new_options_and_stop_strings(tiny_model_dir, capsys):
    from transformers import AutoTokenizer

    from qlora.cli.main import main

    argv = ["generate", "--model", str(tiny_model_dir), "--template", "none", "--quant", "none", "--compute-dtype",
            "fp32", "--max-new-tokens", "16", "--temperature", "0", "--prompt", PROMPT]
    assert main(argv) == 0
    plain = capsys.readouterr().out[:-1]
    assert main(argv + ["--repetition-penalty", "1.3", "--min-p", "0.1"]) == 0
    penalized = capsys.readouterr().out[:-1]
    assert penalized != plain
    stop = plain.strip()[len(plain.strip()) // 2:][:3]
    assert stop and main(argv + ["--stop", stop, "--stop", "never-there"]) == 0
    assert capsys.readouterr().out[:-1] == plain[:plain.index(stop)]
    fox = AutoTokenizer.from_pretrained(tiny_model_dir)(" fox", add_special_tokens=False).input_ids[-1]
    assert main(argv + ["--logit-bias", f"{fox}=100", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == AutoTokenizer.from_pretrained(tiny_model_dir).decode([fox] * 4) + "\n"
    assert main(argv + ["--logit-bias", "100000=5"]) == 2  # checked against the tokenizer once it is loaded
    assert "--logit-bias 100000=...: the tokenizer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # refused as the command line is read
        main(argv + ["--repetition-penalty", "0"])
    assert exc.value.code == 2 and "--repetition-penalty: must be positive" in capsys.readouterr().err


def test_stop_strings_end_stream_text_as_serve_does(lm):
    model, tok = lm
    greedy = SamplingOptions(max_new_tokens=16, temperature=0)
    full = "".join(stream_text(model, tok, PROMPT, greedy))
    stop = full.strip()[:2]
    assert "".join(stream_text(model, tok, PROMPT, greedy, stop_strings=[stop])) == full[:full.index(stop)]


@pytest.mark.parametrize("config", [dict(min_p=0.3), dict(min_p=0.2, top_p=0.9), dict(min_p=0.5, top_k=3)])
def test_constrained_sampling_applies_min_p_among_the_allowed_tokens(config):
    """Oracle: :func:`sampling_probs` of the logits with the disallowed tokens masked out, counted over many draws."""
    from qlora.infer.constrained import choose_token

    logits = torch.tensor([3.0, 1.0, 2.5, 0.5, 1.5, -1.0, 1.2, 0.9])
    allowed = [1, 3, 4, 5, 6, 7]
    masked = torch.full_like(logits, float("-inf"))
    masked[allowed] = logits[allowed]
    options = SamplingOptions(temperature=1.0, **{"top_p": 1.0, **config})
    expected = sampling_probs(masked, options)
    assert 1 < int((expected > 0).sum()) < len(allowed)  # min-p cuts some allowed tokens, not all
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(len(logits))
    for _ in range(3000):
        counts[choose_token(logits, options, generator, set(allowed).__contains__)] += 1
    assert torch.equal(counts > 0, expected > 0)
    torch.testing.assert_close(counts / 3000, expected, atol=0.03, rtol=0)


SHIPPED = dict(do_sample=True, temperature=0.2, top_k=60, top_p=0.95, min_p=0.3, max_new_tokens=9)


def test_a_checkpoints_sampling_values_are_the_defaults_and_draw_as_its_generate_does(lm):
    """A generation config that sets temperature, top-k, top-p, min-p and a length (Qwen3's, Gemma 3's): options
    left out take its values, so each step draws from what transformers' warpers for that config give, and the
    reply stops at its ``max_new_tokens``; an option given replaces the model's."""
    from transformers import GenerationConfig

    from qlora.infer.sampling_options import model_defaults

    model, tok = lm
    ids = tok(PROMPT, return_tensors="pt").input_ids
    saved = model.generation_config
    model.generation_config = GenerationConfig(**{**saved.to_diff_dict(), **SHIPPED})
    try:
        options = SamplingOptions(**model_defaults(model), seed=5)
        assert (options.temperature, options.top_k, options.top_p, options.min_p, options.max_new_tokens) == \
            (0.2, 60, 0.95, 0.3, 9)
        assert len(list(stream_tokens(model, ids, options=None, stop_ids=()))) == 9
        processors = model._get_logits_processor(model.generation_config, input_ids_seq_length=ids.shape[1])
        history = ids[0]
        for token in stream_tokens(model, ids, options, stop_ids=()):
            with torch.no_grad():
                logits = model(history[None]).logits[0, -1]
            theirs = processors(history[None], logits[None].clone())[0].softmax(-1)
            torch.testing.assert_close(sampling_probs(logits, options), theirs, atol=1e-6, rtol=1e-5)
            history = torch.cat([history, torch.tensor([token])])
        given = SamplingOptions(**{**model_defaults(model), "top_k": 0})
        assert given.top_k == 0 and given.temperature == 0.2
    finally:
        model.generation_config = saved


def test_cli_generate_samples_as_the_checkpoint_says_unless_told_otherwise(sampled_model_dir, capsys):
    """Oracle: transformers' ``generate`` with no options, which samples as the model's generation_config says
    (top-k 1: the greedy tokens; 7 new tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora.cli.main import main

    tok = AutoTokenizer.from_pretrained(sampled_model_dir)
    model = AutoModelForCausalLM.from_pretrained(sampled_model_dir, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    theirs = model.generate(ids, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    assert len(theirs) == 7 and tok.eos_token_id not in theirs
    argv = ["generate", "--model", str(sampled_model_dir), "--template", "none", "--quant", "none",
            "--compute-dtype", "fp32", "--prompt", PROMPT]
    for seed in ("1", "2"):
        assert main(argv + ["--seed", seed]) == 0
        assert capsys.readouterr().out == tok.decode(theirs, skip_special_tokens=True) + "\n"
    assert main(argv + ["--max-new-tokens", "3"]) == 0  # the user's value replaces the model's
    assert capsys.readouterr().out == tok.decode(theirs[:3], skip_special_tokens=True) + "\n"
    drawn = set()
    for seed in ("1", "2", "3"):
        assert main(argv + ["--seed", seed, "--top-k", "0", "--temperature", "1"]) == 0
        drawn.add(capsys.readouterr().out)
    assert len(drawn) > 1  # with top-k 0 given, the draws are no longer the greedy tokens


def test_a_shipped_temperature_of_0_is_greedy_and_values_out_of_range_are_left_out():
    from types import SimpleNamespace

    from qlora.infer.sampling_options import model_defaults

    shipped = {"temperature": 0.0, "top_p": 1.5, "top_k": -1, "min_p": 0.05, "max_new_tokens": 0, "do_sample": False,
               "typical_p": 0.9, "eos_token_id": [1, 2]}
    model = SimpleNamespace(generation_config=SimpleNamespace(to_diff_dict=lambda: shipped))
    assert model_defaults(model, vllm=True) == {"temperature": 0.0, "min_p": 0.05}  # serve: what vLLM reads
    assert model_defaults(model) == {"temperature": 0.0, "min_p": 0.05, "typical_p": 0.9}  # generate and chat
    assert model_defaults(SimpleNamespace()) == {}  # no generation config: qlora's own defaults


@pytest.mark.parametrize("shipped,vllm,expected", [
    ({"do_sample": False, "temperature": 0.6, "top_p": 0.9}, True, {"temperature": 0.6, "top_p": 0.9}),
    ({"do_sample": False, "temperature": 0.6, "top_p": 0.9}, False, {"temperature": 0.0, "top_p": 0.9}),
    ({"do_sample": True, "temperature": 0.6, "max_length": 4096}, False, {"temperature": 0.6, "max_length": 4096}),
    ({"max_length": 4096, "max_new_tokens": 9}, False, {"max_new_tokens": 9}),  # max_new_tokens wins, as there
    ({"max_length": 4096, "typical_p": 0.9}, True, {})])
def test_generate_and_chat_read_what_transformers_reads_and_serve_what_vllm_reads(shipped, vllm, expected):
    """transformers' ``generate`` decodes greedily on ``do_sample: false`` (whatever temperature is set) and stops
    at ``max_length`` tokens in all where no ``max_new_tokens`` is set; vLLM reads neither, nor ``typical_p``."""
    from types import SimpleNamespace

    from qlora.infer.sampling_options import merged, model_defaults

    model = SimpleNamespace(generation_config=SimpleNamespace(to_diff_dict=lambda: shipped))
    assert model_defaults(model, vllm=vllm) == expected
    assert "max_length" not in merged(model_defaults(model), {"max_new_tokens": 3})  # a length given replaces it


@pytest.fixture(scope="module")
def greedy_model_dir(tmp_path_factory, tiny_model_dir):
    """``tiny_model_dir`` whose generation_config.json says ``do_sample: false`` and ``max_length``, as many
    checkpoints ship them (Llama 2: max_length 4096)."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("tiny-greedy") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(do_sample=False, temperature=0.9, max_length=22)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_cli_generate_stops_at_the_checkpoints_max_length_and_decodes_greedily_on_do_sample_false(
        greedy_model_dir, capsys):
    """Oracle: transformers' ``generate`` with no options: greedy (``do_sample: false``) and ``max_length`` 22
    tokens in all, prompt included."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora.cli.main import main

    tok = AutoTokenizer.from_pretrained(greedy_model_dir)
    model = AutoModelForCausalLM.from_pretrained(greedy_model_dir, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    theirs = model.generate(ids, pad_token_id=tok.pad_token_id)[0].tolist()
    assert len(theirs) == 22 and tok.eos_token_id not in theirs[ids.shape[1]:]

    def text(tokens):
        return tok.decode(tokens, skip_special_tokens=True)[len(tok.decode(ids[0], skip_special_tokens=True)):]

    import transformers

    argv = ["generate", "--model", str(greedy_model_dir), "--template", "none", "--quant", "none",
            "--compute-dtype", "fp32", "--prompt", PROMPT]
    if int(transformers.__version__.split(".")[0]) < 5:  # 4.x cannot tell do_sample: false from an unset value
        argv += ["--temperature", "0"]
    for seed in ("1", "2"):  # greedy: the seed changes nothing
        assert main(argv + ["--seed", seed]) == 0
        assert capsys.readouterr().out == text(theirs) + "\n"
    assert main(argv + ["--max-new-tokens", "3", "--temperature", "0"]) == 0  # the user's length replaces it
    assert capsys.readouterr().out == text(theirs[:ids.shape[1] + 3]) + "\n"


def test_top_p_keeps_the_tied_tokens_transformers_keeps():
    """16-bit logits tie often (bf16 tells 0.0625 apart near 10): where tied tokens straddle the top-p threshold, the
    ones kept are those ``TopPLogitsWarper`` keeps (with top-k and min-p around it as in ``generate``), not others of
    the same logit, so a seeded draw picks the token transformers' would."""
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    generator = torch.Generator().manual_seed(0)
    differ = 0
    for _ in range(100):
        logits = torch.randint(-4, 4, (50,), generator=generator).float() * 0.5  # many equal logits
        for top_p, top_k, min_p in ((0.3, 0, 0.0), (0.7, 10, 0.0), (0.9, 0, 0.2)):
            options = SamplingOptions(temperature=0.7, top_p=top_p, top_k=top_k, min_p=min_p)
            warpers = LogitsProcessorList([TemperatureLogitsWarper(0.7), *([TopKLogitsWarper(top_k)] if top_k else []),
                                           TopPLogitsWarper(top_p), *([MinPLogitsWarper(min_p)] if min_p else [])])
            theirs = warpers(torch.zeros(1, 1, dtype=torch.long), logits[None].clone())[0].softmax(-1)
            ours = sampling_probs(logits, options)
            assert torch.equal(ours > 0, theirs > 0)
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
            differ += int((theirs > 0).sum()) < int((logits >= logits[theirs > 0].min()).sum())
    assert differ  # some thresholds fell among equal logits
