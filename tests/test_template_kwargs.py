"""Chat template variables at inference: ``--chat-template-kwargs`` of generate and chat (vLLM's name).

Oracles: the real templates' ``apply_chat_template(..., enable_thinking=...)`` ids (tests/chat_families.py) and
transformers' greedy decoding."""

from __future__ import annotations

import json

import pytest
import torch

from chat_families import U1, family_tokenizer, model_for
from qlora.cli.main import build_parser, main
from qlora.infer.messages import Message
from qlora.infer.template import render_chat

USER = [Message("user", U1["content"])]


def _ids(tok, prompt: str) -> list[int]:
    return tok(prompt, add_special_tokens=False)["input_ids"]  # how generate, chat and serve tokenize the prompt


def _oracle(tok, **kwargs) -> list[int]:
    return list(tok.apply_chat_template([U1], add_generation_prompt=True, tokenize=True, return_dict=True,
                                        **kwargs)["input_ids"])


@pytest.mark.parametrize("family", ["qwen3", "gemma-4"])
@pytest.mark.parametrize("thinking", [False, True])
def test_template_kwargs_render_the_prompt_apply_chat_template_renders(family, thinking):
    tok = family_tokenizer(family)
    assert _oracle(tok, enable_thinking=False) != _oracle(tok, enable_thinking=True)  # the switch changes the prompt
    prompt = render_chat(tok, USER, template_kwargs={"enable_thinking": thinking})
    assert _ids(tok, prompt) == _oracle(tok, enable_thinking=thinking)


def _greedy_text(model_dir, tok, ids: list[int], max_new: int) -> str:
    from transformers import AutoModelForCausalLM

    from qlora.infer.template import stop_token_ids

    oracle = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stops = stop_token_ids(oracle, tok)
    out = oracle.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_new, eos_token_id=list(stops),
                          pad_token_id=0)[0, len(ids):].tolist()
    return tok.decode([t for t in out if t not in stops], skip_special_tokens=True)


@pytest.fixture(scope="module")
def qwen3_model(tmp_path_factory):
    return model_for("qwen3", tmp_path_factory.mktemp("qwen3"))


def test_generate_prompts_with_the_chat_template_kwargs(qwen3_model, capsys):
    model, tok = qwen3_model, family_tokenizer("qwen3")
    common = ["generate", "--model", str(model), "--prompt", U1["content"], "--max-new-tokens", "8",
              "--temperature", "0", "--quant", "none", "--compute-dtype", "fp32"]
    texts = {}
    for thinking in (False, True):
        assert main([*common, "--chat-template-kwargs", json.dumps({"enable_thinking": thinking})]) == 0
        texts[thinking] = capsys.readouterr().out
        assert texts[thinking] == _greedy_text(model, tok, _oracle(tok, enable_thinking=thinking), 8) + "\n"
    assert texts[False] != texts[True]  # the two prompts are told apart by the replies


def test_chat_prompts_with_the_chat_template_kwargs(qwen3_model, tmp_path, monkeypatch, capsys):
    import io

    tok = family_tokenizer("qwen3")
    monkeypatch.chdir(tmp_path)
    for thinking in (False, True):
        monkeypatch.setattr("sys.stdin", io.StringIO(U1["content"] + "\n"))
        assert main(["chat", "--model", str(qwen3_model), "--max-new-tokens", "8", "--temperature", "0", "--quant",
                     "none", "--compute-dtype", "fp32", "--chat-template-kwargs",
                     json.dumps({"enable_thinking": thinking})]) == 0
        want = _greedy_text(qwen3_model, tok, _oracle(tok, enable_thinking=thinking), 8)
        assert f"assistant> {want}\n" in capsys.readouterr().out


@pytest.mark.parametrize(("value", "words"), [
    ("{'enable_thinking': false}", "not valid JSON"),
    ('["enable_thinking"]', "expected a JSON object"),
    ('{"tokenize": true}', "'tokenize' is a parameter of the rendering"),
    ('{"chat_template": "x"}', "--template"),
])
@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_bad_template_kwargs_are_refused_naming_the_option(command, value, words, capsys):
    option = "--default-chat-template-kwargs" if command == "serve" else "--chat-template-kwargs"
    extra = ["--prompt", "hi"] if command == "generate" else []
    with pytest.raises(SystemExit) as exc:
        build_parser(command).parse_args([command, "--model", "m", *extra, option, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"argument {option}: " in err and words in err, err


def test_template_kwargs_with_raw_text_are_refused(capsys):
    assert main(["generate", "--model", "m", "--prompt", "hi", "--template", "none",
                 "--chat-template-kwargs", '{"enable_thinking": false}']) == 2
    assert "--chat-template-kwargs with --template none" in capsys.readouterr().err

