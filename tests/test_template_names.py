"""``--template`` takes the common spellings of the built-in names (LLaMA-Factory's and axolotl's
``llama3``, ``ChatML``, ``tokenizer_default``, ...) in every command and in YAML, from one table;
an unknown name is refused with the choices and the closest of them."""

from __future__ import annotations

import pytest

from qlora.cli.main import build_parser, main
from qlora.template_names import TEMPLATE_NAMES, TRAIN_TEMPLATE_NAMES, template_name
from qlora.train.config import load_config
from qlora.train.data.templates import TEMPLATES

SPELLINGS = {"llama3": "llama-3", "Llama-3": "llama-3", "LLAMA_3": "llama-3", "llama-3": "llama-3",
             "ChatML": "chatml", "chat_ml": "chatml", "Alpaca": "alpaca", "tokenizer_default": "tokenizer",
             "AUTO": "auto"}
# each command and what it needs besides --template to parse
COMMANDS = {"train": [], "eval": ["--model", "m", "--data", "d"], "generate": ["--model", "m", "--prompt", "p"],
            "chat": ["--model", "m"], "serve": ["--model", "m"]}


def test_the_names_are_the_built_in_templates_and_the_models_own():
    assert set(TEMPLATE_NAMES) == {"auto", "tokenizer", "none", *TEMPLATES}
    assert "none" not in TRAIN_TEMPLATE_NAMES


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_takes_the_common_spellings(command):
    for spelling, name in SPELLINGS.items():
        args = build_parser(command).parse_args([command, *COMMANDS[command], "--template", spelling])
        assert args.template == name, (command, spelling)


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_name_is_refused_with_the_choices_and_the_closest(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, *COMMANDS[command], "--template", "llama2"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert "unknown chat template 'llama2'" in err and "did you mean llama-3?" in err
    choices = TEMPLATE_NAMES if command in ("generate", "chat") else TRAIN_TEMPLATE_NAMES
    assert f"choose from {', '.join(choices)}" in err


def test_none_is_raw_text_and_refused_where_a_chat_format_is_needed():
    assert template_name("None", TEMPLATE_NAMES) == "none"
    with pytest.raises(ValueError, match="choose from auto, tokenizer, chatml, llama-3, alpaca .none, raw text without a template, is for generate only"):
        template_name("none")
    with pytest.raises(ValueError, match="unknown chat template 'qwen'; choose from auto, tokenizer, chatml, "
                                         "llama-3, alpaca$"):
        template_name("qwen")  # nothing close: no guess


def test_the_python_api_takes_them_too(tiny_tokenizer):
    from qlora.errors import UsageError
    from qlora.train.data import resolve_chat_format
    from qlora.train.data.templates import resolve_chat_template

    assert resolve_chat_template(tiny_tokenizer, "Llama3") == TEMPLATES["llama-3"]
    assert resolve_chat_format(tiny_tokenizer, "chat_ml").name == "chatml"
    with pytest.raises(UsageError, match="unknown chat template 'chatlm'.*did you mean chatml"):
        resolve_chat_template(tiny_tokenizer, "chatlm")


def test_yaml_and_python_configs_take_the_spellings_too(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model: m\ndata: d.jsonl\noutput: out\ntemplate: Llama3\n")
    assert load_config(config, {}).template == "llama-3"
    assert load_config(None, {"model": "m", "data": "d.jsonl", "output": "o", "template": "chat_ml"}).template == "chatml"
    from qlora.errors import UsageError

    with pytest.raises(UsageError, match="--template: unknown chat template 'alpacca'; choose from auto, tokenizer, "
                                         "chatml, llama-3, alpaca .did you mean alpaca"):
        load_config(None, {"model": "m", "data": "d.jsonl", "output": "o", "template": "alpacca"})
    # in a YAML file, `template` is LLaMA-Factory's key too: a name of theirs qlora lacks means the model's own
    config.write_text("model: m\ndata: d.jsonl\noutput: out\ntemplate: qwen\n")
    assert load_config(config, {}).template == "auto" and "'qwen' is a LLaMA-Factory name" in capsys.readouterr().err
