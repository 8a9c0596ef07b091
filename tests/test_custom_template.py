"""A user's own Jinja chat template (``--template FILE.jinja``, TRL's ``chat_template_path``, the handbook's inline
``chat_template``, axolotl's ``chat_template_jinja``): trained with exactly as the same template installed as the
model's own (token ids of ``apply_chat_template``, the same mask), saved with the adapter for generate and serve,
a changed file noticed on --resume, and a bad file refused by name and line."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest
import yaml

from chat_families import family_tokenizer, model_for
from qlora.cli.main import main
from qlora.model.chat_format import ChatFormat
from qlora.train.config import load_config
from qlora.train.data import normalize, resolve_chat_format, tokenize_example
from qlora.train.data.sources import Record

# Written for these tests: headings unlike any built-in format, one turn per line, EOS after each turn.
TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
{%- if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + eos_token }}
{%- elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + eos_token }}
{%- elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + eos_token }}
{%- else %}{{ raise_exception('unknown role ' + message['role']) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{%- endif %}
"""
ROWS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"},
     {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And three plus three?"},
     {"role": "assistant", "content": "Six."}],
    [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
]


def _file(tmp_path, text=TEMPLATE, name="mine.jinja"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _data(tmp_path, rows=ROWS):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    return path


def _ids(encoded):
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.mark.parametrize("family", ["llama-3", "qwen3"])
def test_a_template_file_tokenizes_as_apply_chat_template_and_masks_as_the_models_own(family, tmp_path):
    tokenizer = family_tokenizer(family)
    path = _file(tmp_path)
    fmt = resolve_chat_format(tokenizer, str(path))
    assert (fmt.template, fmt.origin, fmt.name) == (TEMPLATE, str(path), "custom")
    installed = copy.deepcopy(tokenizer)
    installed.chat_template = TEMPLATE
    own = resolve_chat_format(installed, "tokenizer")
    for i, row in enumerate(ROWS):
        example, = normalize([Record({"messages": row}, f"row {i}")])
        ours, theirs = tokenize_example(example, tokenizer, fmt, "assistant"), tokenize_example(
            example, installed, own, "assistant")
        assert ours.input_ids == _ids(tokenizer.apply_chat_template(row, chat_template=TEMPLATE, tokenize=True))
        assert ours.input_ids == theirs.input_ids and ours.labels == theirs.labels
        trained = tokenizer.decode([t for t in ours.labels if t != -100])
        answers = [m["content"] for m in row if m["role"] == "assistant"]
        assert all(a in trained for a in answers) and "two plus two" not in trained and "color" not in trained


def test_training_saves_the_template_for_generate_serve_and_resume(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoTokenizer

    from qlora.cli.commands.generate import chat_format_from_args
    from qlora.cli.commands.serve import chat_formats
    from qlora.infer.messages import Message
    from qlora.infer.template import render_chat

    path, run = _file(tmp_path), tmp_path / "run"
    train = ["train", "--model", str(tiny_model_dir), "--data", str(_data(tmp_path)), "--output", str(run),
             "--max-steps", "2", "--save-steps", "1", "--no-progress", "--template", str(path)]
    assert main(train) == 0
    assert ChatFormat.load(run).template == TEMPLATE and ChatFormat.load(run).origin == str(path)
    assert yaml.safe_load((run / "config.yaml").read_text())["template"] == str(path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], chat_template=TEMPLATE,
                                             add_generation_prompt=True, tokenize=False)
    assert expected.endswith("<|user|>\nHi" + tokenizer.eos_token + "<|assistant|>\n")
    fmt = chat_format_from_args(argparse.Namespace(model=str(tiny_model_dir), template="auto", adapter=[str(run)]),
                                tokenizer, "generate")
    assert render_chat(tokenizer, [Message("user", "Hi")], chat_format=fmt) == expected
    served = chat_formats(argparse.Namespace(model=str(tiny_model_dir), template="auto", adapter=[f"c={run}"]),
                          tokenizer)
    assert render_chat(tokenizer, [Message("user", "Hi")], chat_format=served["c"]) == expected
    capsys.readouterr()
    path.write_text(TEMPLATE.replace("<|user|>", "<|human|>"))  # the same path, another template
    assert main([*train, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "different config" in err and "template_sha256" in err and "Traceback" not in err, err


@pytest.mark.parametrize("text, name, message", [
    (None, "missing.jinja", "no such file or folder"),
    (b"\xff\xfe\x00binary", "weights.jinja", "not UTF-8 text"),
    ("model: m\ndata: d\n", "config.jinja", "never uses `messages`"),
    ("{% for message in messages %}\n{{ message['content'] }\n{% endfor %}", "broken.jinja", "line 2"),
])
def test_a_bad_template_file_is_refused_by_name(tmp_path, tiny_model_dir, capsys, text, name, message):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(_data(tmp_path)), "--output",
                 str(tmp_path / "run"), "--max-steps", "1", "--no-progress", "--template", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"--template {path}" in err or f"--template: {path}" in err, err
    assert err.count("--template") == 1 and ".;" not in err, err  # said once, not wrapped in a second message
    assert message in err and "Traceback" not in err, err


def test_a_template_raising_on_a_row_names_the_file_line_and_row(tmp_path, tiny_model_dir, capsys):
    rows = [ROWS[1], [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42"},
                      {"role": "assistant", "content": "Hello."}]]
    path = _file(tmp_path)
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(_data(tmp_path, rows)), "--output",
                 str(tmp_path / "run"), "--max-steps", "1", "--no-progress", "--template", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}, line 6" in err and "unknown role tool" in err and "Traceback" not in err, err


def _trl(tmp_path, model, extra: str):
    path = tmp_path / "trl.yaml"
    path.write_text(f"model_name_or_path: {model}\ndataset_name: d\noutput_dir: o\nuse_peft: true\n"
                    f"lora_target_modules: [q_proj]\n{extra}")
    return path


def test_trl_chat_template_path_is_the_template(tmp_path):
    model = model_for("llama-3", tmp_path)
    path = _file(tmp_path)
    assert load_config(_trl(tmp_path, model, f"chat_template_path: {path}\n"), {}).template == str(path)
    folder = tmp_path / "other-tokenizer"
    folder.mkdir()
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    own_eos = json.loads((model / "tokenizer_config.json").read_text())["eos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": own_eos}))
    cfg = load_config(_trl(tmp_path, model, f"chat_template_path: {folder}\n"), {})
    assert cfg.template == str(folder)
    assert resolve_chat_format(family_tokenizer("llama-3"), cfg.template).template == TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|other_end|>"}))
    with pytest.raises(Exception, match=r"trl.yaml line 6: chat_template_path .* end token '<\|other_end\|>'"):
        load_config(_trl(tmp_path, model, f"chat_template_path: {folder}\n"), {})


def test_the_handbook_inline_chat_template_is_the_template(tmp_path):
    from test_trl_recipes import EXAMPLES, SFT, _local

    model = model_for("llama-3", tmp_path)
    inline = yaml.safe_load((EXAMPLES / SFT).read_text())["chat_template"]
    cfg = load_config(_local(SFT, tmp_path, str(model), "./ultrachat"), {})
    assert cfg.template == inline
    fmt = resolve_chat_format(family_tokenizer("llama-3"), cfg.template)
    assert fmt.template == inline and fmt.name == "custom"


@pytest.mark.parametrize("as_file", [False, True])
def test_axolotl_chat_template_jinja_is_the_template(tmp_path, as_file):
    value = str(_file(tmp_path)) if as_file else json.dumps(TEMPLATE)
    for head in ("chat_template: jinja\n", ""):
        path = tmp_path / "axolotl.yaml"
        path.write_text(f"base_model: m\nadapter: qlora\nload_in_4bit: true\ndatasets: [d.jsonl]\noutput_dir: o\n"
                        f"{head}chat_template_jinja: {value}\n")
        assert load_config(path, {}).template == (value if as_file else TEMPLATE)


@pytest.mark.parametrize("keys, message", [
    ("chat_template: jinja\n", "line 6: chat_template jinja takes its template from chat_template_jinja"),
    ("chat_template: chatml\nchat_template_jinja: '{{ messages }}'\n",
     "line 7: chat_template_jinja with chat_template"),
])
def test_axolotl_jinja_keys_that_disagree_are_refused_by_line(tmp_path, capsys, keys, message):
    path = tmp_path / "axolotl.yaml"
    path.write_text(f"base_model: m\nadapter: qlora\nload_in_4bit: true\ndatasets: [d.jsonl]\noutput_dir: o\n{keys}")
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def _eval_loss(capsys, *argv) -> float:
    import re

    capsys.readouterr()
    assert main(["eval", *argv]) == 0
    return float(re.search(r"loss (\S+)", capsys.readouterr().out).group(1))


def test_eval_with_a_template_file_scores_as_training_with_it_and_as_the_models_own(tmp_path, tiny_model_dir,
                                                                                      capsys):
    import shutil

    path, run, data = _file(tmp_path), tmp_path / "run", _data(tmp_path)
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(run), "--max-steps",
                 "2", "--no-progress", "--template", str(path), "--lr", "0.01"]) == 0
    common = ["--data", str(data), "--quant", "none", "--seq-len", "256"]
    with_adapter = ["--model", str(tiny_model_dir), "--adapter", str(run), *common]
    saved = _eval_loss(capsys, *with_adapter)  # auto: the template saved with the adapter
    assert _eval_loss(capsys, *with_adapter, "--template", str(path)) == saved
    assert _eval_loss(capsys, *with_adapter, "--template", "chatml") != saved  # the option is applied
    installed = tmp_path / "installed"  # the base model with the file as its own template: the same ids and mask
    shutil.copytree(tiny_model_dir, installed)
    (installed / "chat_template.jinja").write_text(TEMPLATE)
    own = _eval_loss(capsys, "--model", str(installed), *common, "--template", "tokenizer")
    assert _eval_loss(capsys, "--model", str(tiny_model_dir), *common, "--template", str(path)) == own
    assert _eval_loss(capsys, "--model", str(tiny_model_dir), *common, "--template", TEMPLATE) == own


@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_generate_chat_and_serve_render_with_the_users_template(command, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from qlora.cli.commands.generate import chat_format_from_args
    from qlora.cli.commands.serve import chat_formats
    from qlora.cli.main import build_parser
    from qlora.infer.messages import Message
    from qlora.infer.template import render_chat

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    adapter = tmp_path / "adapter"  # trained with chatml: --template overrides the saved format
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")  # an adapter folder to the option checks; never loaded here
    resolve_chat_format(tokenizer, "chatml").save(adapter)
    messages = [Message("system", "Be brief."), Message("user", "Hi")]
    expected = tokenizer.apply_chat_template([m.as_dict() for m in messages], chat_template=TEMPLATE,
                                             add_generation_prompt=True, tokenize=False)
    assert "<|system|>\nBe brief." in expected and expected.endswith("<|assistant|>\n")
    extra = ["--prompt", "p"] if command == "generate" else []
    for value in (str(_file(tmp_path)), str(folder), TEMPLATE):
        for adapters in ([], ["--adapter", f"a={adapter}"]):
            args = build_parser(command).parse_args([command, "--model", str(tiny_model_dir), "--template", value,
                                                     *adapters, *extra])
            if command == "serve":
                formats = chat_formats(args, tokenizer)
                assert set(formats) == {None, *(["a"] if adapters else [])}
            else:
                formats = {None: chat_format_from_args(args, tokenizer, command)}
            for fmt in formats.values():
                assert render_chat(tokenizer, messages, chat_format=fmt) == expected, (value, adapters)


REQUIRED = {"eval": ["--data", "d.jsonl"], "generate": ["--prompt", "p"]}


@pytest.mark.parametrize("command", ["eval", "generate", "chat", "serve"])
@pytest.mark.parametrize("text, name, message", [
    (None, "missing.jinja", "no such file or folder"),
    ("model: m\ndata: d\n", "config.jinja", "never uses `messages`"),
])
def test_every_command_refuses_a_bad_template_file_naming_the_option(tmp_path, capsys, command, text, name,
                                                                      message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as exit_:  # refused as the command line is read, before the model loads
        main([command, "--model", "no-model", *REQUIRED.get(command, []), "--template", str(path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--template: {path}: " in err and message in err, err
    assert "Traceback" not in err, err


def _axolotl(tmp_path, datasets: str, top: str = "") -> Path:
    path = tmp_path / "axolotl.yaml"
    path.write_text(f"base_model: m\nadapter: qlora\nload_in_4bit: true\noutput_dir: o\n{top}datasets:\n{datasets}")
    return path


@pytest.mark.parametrize("keys", ["chat_template: jinja\n    chat_template_jinja: {value}\n",
                                  "chat_template_jinja: {value}\n"])  # axolotl's schema: jinja implied
@pytest.mark.parametrize("top", ["", "chat_template: chatml\n"])  # a dataset's own template wins over the config's
def test_axolotl_dataset_chat_template_jinja_is_the_template(tmp_path, keys, top):
    """axolotl's extract_chat_template_args: a dataset's chat_template (with its chat_template_jinja) renders it."""
    value = json.dumps(TEMPLATE)
    entry = "  - path: d.jsonl\n    type: chat_template\n    " + keys.format(value=value)
    assert load_config(_axolotl(tmp_path, entry, top), {}).template == TEMPLATE
    both = entry + entry.replace("d.jsonl", "e.jsonl")
    assert load_config(_axolotl(tmp_path, both, top), {}).template == TEMPLATE


@pytest.mark.parametrize("datasets, top, message", [
    ("  - path: d.jsonl\n    type: chat_template\n    chat_template_jinja: '{{ messages }}'\n"
     "  - path: e.jsonl\n    type: chat_template\n", "", "datasets item 2"),  # the tokenizer's template for e.jsonl
    ("  - path: d.jsonl\n    type: chat_template\n    chat_template: jinja\n", "", "datasets item 1"),
    ("  - path: d.jsonl\n    type: chat_template\n    chat_template: chatml\n"
     "    chat_template_jinja: '{{ messages }}'\n", "", "datasets item 1"),
])
def test_axolotl_dataset_templates_qlora_cannot_train_with_are_refused_by_line(tmp_path, capsys, datasets, top,
                                                                               message):
    path = _axolotl(tmp_path, datasets, top)
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{path} line 5, {message}" in err and "chat_template" in err and "Traceback" not in err, err
