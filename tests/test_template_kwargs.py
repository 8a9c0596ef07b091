"""Chat template variables at inference: ``--chat-template-kwargs`` of generate and chat (vLLM's name), and the
thinking mode an adapter trained in, saved with it (``chat_format.json``) and applied unless overridden.

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
from qlora.model.chat_format import ChatFormat

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
    # a saved format's variables apply, and the ones given override them
    fmt = ChatFormat(tok.chat_template, family, template_kwargs={"enable_thinking": not thinking})
    assert _ids(tok, render_chat(tok, USER, chat_format=fmt)) == _oracle(tok, enable_thinking=not thinking)
    overridden = render_chat(tok, USER, chat_format=fmt, template_kwargs={"enable_thinking": thinking})
    assert _ids(tok, overridden) == _oracle(tok, enable_thinking=thinking)


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


@pytest.mark.parametrize("saved", [[1], {"tokenize": True}])
def test_a_saved_format_with_bad_template_kwargs_is_refused(saved, tmp_path):
    from qlora.errors import UsageError

    (tmp_path / "chat_format.json").write_text(json.dumps({"template": "{{ messages }}", "template_kwargs": saved}))
    with pytest.raises(UsageError, match="not a valid chat format file.*template_kwargs"):
        ChatFormat.load(tmp_path)


def _train(model, rows: list[dict], out, tmp_path) -> None:
    data = tmp_path / f"{out.name}.jsonl"
    data.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    assert main(["train", "--model", str(model), "--data", str(data), "--output", str(out), "--max-steps", "1",
                 "--batch-size", "1", "--no-progress"]) == 0


def _generate_prompt_ids(model, adapter, tok, *options: str) -> list[int]:
    """The prompt ids ``qlora generate --adapter`` sends (its format read as generate reads it)."""
    from qlora.cli.commands.generate import chat_format_from_args

    args = build_parser("generate").parse_args(["generate", "--model", str(model), "--adapter", str(adapter),
                                                "--prompt", U1["content"], *options])
    return _ids(tok, render_chat(tok, USER, chat_format=chat_format_from_args(args, tok, "generate"),
                                 template_kwargs=args.chat_template_kwargs))


def test_an_adapter_trained_in_thinking_mode_is_prompted_in_it(tmp_path):
    """Gemma 4 trains a final answer's hidden reasoning in its thinking mode: the adapter records the switch
    (chat_format.json) and inference prompts in that mode, the prompt its training rows' answers followed, unless
    the user overrides it; an adapter trained on answers without reasoning records nothing."""
    model = model_for("gemma-4", tmp_path)
    tok = family_tokenizer("gemma-4")
    reasoning = [U1, {"role": "assistant", "content": "Four.", "reasoning_content": "Two and two."}]
    _train(model, [reasoning] * 2, tmp_path / "thinking", tmp_path)
    saved = ChatFormat.load(tmp_path / "thinking")
    assert saved.template_kwargs and all(saved.template_kwargs.values())
    prompt = _generate_prompt_ids(model, tmp_path / "thinking", tok)
    assert prompt == _oracle(tok, enable_thinking=True)
    trained = tok.apply_chat_template([U1], add_generation_prompt=True, tokenize=False, **saved.template_kwargs)
    assert tok.decode(prompt) == trained and "<|think|>" in trained
    off = _generate_prompt_ids(model, tmp_path / "thinking", tok, "--chat-template-kwargs",
                               '{"enable_thinking": false}')
    assert off == _oracle(tok, enable_thinking=False)

    _train(model, [[U1, {"role": "assistant", "content": "Four."}]] * 2, tmp_path / "plain", tmp_path)
    assert ChatFormat.load(tmp_path / "plain").template_kwargs == {}
    assert _generate_prompt_ids(model, tmp_path / "plain", tok) == _oracle(tok)


def test_a_chosen_template_keeps_the_adapters_variables(qwen3_model, tmp_path):
    """An adapter saved with thinking off: --template naming its own template (here the model's, as `tokenizer`)
    prompts with thinking off as auto does, --chat-template-kwargs still win; another template keeps only the saved
    variables it reads."""
    tok = family_tokenizer("qwen3")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")  # an adapter folder to the option checks; never loaded here
    saved = ChatFormat(template=tok.chat_template, name="tokenizer",
                       template_kwargs={"enable_thinking": False, "reasoning_effort": "high"})
    saved.save(adapter)
    assert _oracle(tok, enable_thinking=False) != _oracle(tok)
    for template in ("auto", "tokenizer"):
        assert _generate_prompt_ids(qwen3_model, adapter, tok, "--template", template) == \
            _oracle(tok, enable_thinking=False), template
    assert _generate_prompt_ids(qwen3_model, adapter, tok, "--template", "tokenizer", "--chat-template-kwargs",
                                '{"enable_thinking": true}') == _oracle(tok, enable_thinking=True)
    effort = "{{ reasoning_effort }}{% for m in messages %}{{ m.content }}{% endfor %}"
    assert ChatFormat(template=effort).keeping(saved).template_kwargs == {"reasoning_effort": "high"}
    assert ChatFormat(template="{{ messages }}").keeping(saved).template_kwargs == {}


def test_serve_with_a_chosen_template_keeps_each_saved_formats_variables(qwen3_model, tmp_path):
    """``qlora serve --template X``: each adapter, and the base of a merged fine-tune (its folder's
    chat_format.json), is prompted with the variables its run saved, as generate does (:meth:`ChatFormat.keeping`);
    an adapter that saved no format gets the chosen template as it is."""
    import shutil

    from qlora.cli.commands.serve import chat_formats

    tok = family_tokenizer("qwen3")
    off = ChatFormat(template=tok.chat_template, name="tokenizer", template_kwargs={"enable_thinking": False})
    merged = shutil.copytree(qwen3_model, tmp_path / "merged")
    off.save(merged)
    adapters = {name: tmp_path / name for name in ("off", "plain")}
    for folder in adapters.values():
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")  # adapter folders to the option checks; never loaded here
    off.save(adapters["off"])
    argv = ["serve", "--model", str(merged), "--template", "tokenizer", *(f"--adapter={n}={p}" for n, p in
                                                                         adapters.items())]
    formats = chat_formats(build_parser("serve").parse_args(argv), tok)
    prompts = {name: _ids(tok, render_chat(tok, USER, chat_format=fmt)) for name, fmt in formats.items()}
    assert _oracle(tok, enable_thinking=False) != _oracle(tok)
    assert prompts == {None: _oracle(tok, enable_thinking=False), "off": _oracle(tok, enable_thinking=False),
                       "plain": _oracle(tok)}
