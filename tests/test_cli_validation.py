"""Bad options and inputs: one line naming the option, exit 2, no traceback, nothing loaded.

Every numeric option of every command is checked against its declared range
(a sweep over all commands' parsers, not a list of known flags), and the
cases users hit: non-UTF-8 data, a misspelled target module beside a valid
one, an adapter loaded onto another base with equal shapes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math

import pytest
import torch

import qlora
from qlora.cli.main import COMMANDS, build_parser, main
from qlora.errors import UsageError
from qlora.train.config import TrainConfig


def _run(argv, capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--model", "m", "--data", "d.jsonl", "--batch-size", "0"], "--batch-size"),
    (["eval", "--model", "m", "--data", "d.jsonl", "--seq-len", "-3"], "--seq-len"),
    (["train", "--model", "m", "--data", "d", "--output", "o", "--blocksize", "7"], "--blocksize"),
    (["train", "--model", "m", "--data", "d", "--output", "o", "--blocksize", "0"], "--blocksize"),
    (["quantize", "--model", "m", "--output", "o", "--blocksize", "7"], "--blocksize"),
    (["estimate", "llama-3-8b", "--blocksize", "7"], "--blocksize"),
    (["generate", "--model", "m", "--prompt", "p", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["generate", "--model", "m", "--prompt", "p", "--temperature", "-1"], "--temperature"),
    (["generate", "--model", "m", "--prompt", "p", "--top-p", "2"], "--top-p"),
    (["generate", "--model", "m", "--prompt", "p", "--top-p", "nan"], "--top-p"),
    (["generate", "--model", "m", "--prompt", "p", "--top-k", "-2"], "--top-k"),
    (["generate", "--model", "m", "--prompt", "p", "--adapter", "a", "--adapter-weights", "inf"], "--adapter-weights"),
    (["chat", "--model", "m", "--k", "0"], "--k"),
    (["train", "--model", "m", "--data", "d", "--output", "o", "--alpha", "-5"], "--alpha"),
    (["train", "--model", "m", "--data", "d", "--output", "o", "--logging-steps", "0"], "--logging-steps"),
    (["train", "--model", "m", "--data", "d", "--output", "o", "--weight-decay", "-0.1"], "--weight-decay"),
    (["train", "--model", "m", "--data", "d", "--output", "o", "--lr", "nan"], "--lr"),
    (["train", "--model", "m", "--data", "d", "--output", "o", "--seed", "-1"], "--seed"),
    (["train", "--model", "m", "--data", "d", "--output", "o", "--nproc", "0"], "--nproc"),
    (["demo", "--steps", "0"], "--steps"),
    (["quant-error", "--numel", "1"], "--numel"),
])
def test_out_of_range_options_exit_2_naming_the_option(argv, flag, capsys):
    code, err = _run(argv, capsys)
    assert code == 2 and flag in err, err


def test_an_option_refused_by_the_parser_is_reported_under_its_command(capsys):
    """As every later check reports it (``qlora eval: error: ...``), not as the top-level ``qlora``'s."""
    code, err = _run(["eval", "--model", "m", "--data", "d.jsonl", "--batch-size", "0"], capsys)
    assert code == 2 and err.splitlines()[-1].startswith("qlora eval: error: argument --batch-size"), err
    code, err = _run(["generate", "--model", "m", "--prompt", "hi", "--template", "missing.jinja"], capsys)
    assert code == 2 and err.splitlines()[-1].startswith("qlora generate: error: argument --template"), err


@pytest.mark.parametrize("argv", [["train", "--modle", "m"], ["serve", "--model", "m", "--lr", "1"],
                                  ["demo", "--bogus"], ["estimate", "m", "--bogus"],
                                  ["generate", "--model", "m", "--promt", "hi"],  # not "required: --prompt"
                                  ["eval", "--modle", "m", "--data", "d.jsonl"], ["quantize", "--modle", "m"]])
def test_an_unknown_option_is_reported_under_its_command(argv, capsys):
    """argparse reports unknown options from the top-level parser (``usage: qlora [-h] COMMAND ...``, ``qlora:
    error:``), which names neither the command nor where its options are listed."""
    code, err = _run(argv, capsys)
    usage, message = err.splitlines()
    command, flag = argv[0], next(a for a in argv[1:] if a in ("--modle", "--lr", "--bogus", "--promt"))
    assert code == 2 and message.startswith(f"qlora {command}: error: unrecognized arguments: {flag}"), err
    assert f"qlora {command} --help" in usage or usage.startswith(f"usage: qlora {command} "), err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_parser_error_is_two_lines_whatever_the_commands_options(command, capsys):
    """README: bad input is one line naming the option; a command's usage (train's lists ~200 options) is not
    printed whole before it, only where to read it."""
    code, err = _run([command, "--no-such-option-here", "1"], capsys)
    assert code == 2 and len(err.splitlines()) == 2, err
    assert ": error: " in err.splitlines()[-1] and err.startswith("usage: qlora"), err


def test_a_misspelled_command_is_named_with_the_closest_one(capsys):
    code, err = _run(["trian", "--model", "m"], capsys)
    assert code == 2 and "unknown command 'trian' (did you mean train?)" in err
    code, err = _run(["serve", "--model", "m", "--lr", "1"], capsys)
    assert code == 2 and "(did you mean --port for --lr?)" in err, err  # each flag once, never --help


def _numeric_options():
    """Every int/float option of every command, with its parser action."""
    for command in COMMANDS:
        sub = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction))
        for action in sub.choices[command]._actions:
            if (action.option_strings and action.type is not None and action.type not in (str,)
                    and action.type.__name__ not in ("template", "template_kwargs_option")):
                # --template also takes a file: no choices; --chat-template-kwargs takes a JSON object
                yield command, action


def test_every_numeric_option_of_every_command_declares_a_range():
    seen = list(_numeric_options())
    assert len(seen) > 15
    for command, action in seen:
        if action.choices:  # e.g. --blocksize: one of the listed values
            continue
        assert hasattr(action.type, "allowed"), f"qlora {command} {action.option_strings[0]} has no checked range"
        with pytest.raises(argparse.ArgumentTypeError):
            action.type("nan")
    ranged = [f for f in TrainConfig.__dataclass_fields__.values() if f.type in ("int", "float")]
    unchecked = [f.name for f in ranged if f.metadata["range"] is None and f.name != "blocksize"]
    assert not unchecked, f"TrainConfig numeric fields without a range: {unchecked}"


def test_help_shows_choices_ranges_and_defaults(capsys):
    for argv, expected in ((["train", "--help"], ["constant, linear, cosine, cosine_with_restarts, polynomial",
                                                  "one of nf4, fp4, none; default: nf4", "at least 1; default: 16",
                                                  "existing --output (only files qlora wrote", "(default: off)",
                                                  "transformers' name for one of them (adamw_torch,",
                                                  "default: paged_adamw_32bit", "in [0, 1)"]),
                           (["generate", "--help"], ["in (0, 1]", "default: 0",
                                                     "default: the model's generation_config value, else 0.9"]),
                           (["eval", "--help"], ["one of auto, alpaca", "default: 4"])):
        with pytest.raises(SystemExit):
            main(argv)
        out = " ".join(capsys.readouterr().out.split())
        for text in expected:
            assert text in out, (argv, text)
        for text in ("default: None", "default: )", "default: False", "default: True"):  # no empty defaults
            assert text not in out, (argv, text)


def test_non_utf8_data_names_the_line(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes('{"text": "ok"}\n{"text": "café"}\n'.encode("latin-1"))
    for argv in (["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "o")],
                 ["eval", "--model", str(tiny_model_dir), "--data", str(data)]):
        code, err = _run(argv, capsys)
        assert code == 2 and "latin1.jsonl line 2" in err and "UTF-8" in err


def test_misspelled_target_module_next_to_a_valid_one_is_an_error(tiny_model_dir):
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError) as info:
        qlora.add_lora(model, r=4, target_modules=["q_proj", "v_porj"])
    message = str(info.value)
    assert "'v_porj'" in message and "did you mean v_proj" in message and "q_proj" in message
    assert not any("lora" in n for n, _ in model.named_modules())  # nothing half-added
    qlora.add_lora(model, r=4, target_modules=["q_proj", "v_proj"])  # the valid spelling works


def test_an_adapter_for_another_base_with_equal_shapes_warns(tmp_path, tiny_model_dir, tiny_tokenizer, caplog,
                                                             monkeypatch):
    import shutil

    from qlora.model.tiny import build_tiny_model

    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=4)
    adapter = qlora.save_adapter(model, tmp_path / "a")
    saved = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert saved == str(tiny_model_dir.resolve())  # absolute, so it still names the model from anywhere

    other = build_tiny_model(tmp_path / "other", tokenizer=tiny_tokenizer, arch="llama", seed=123)  # same shapes
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    monkeypatch.chdir(tiny_model_dir.parent)
    for base, warns in ((other, True), (copy, False), (tiny_model_dir.name, False)):
        fresh, _ = qlora.load_model(base, compute_dtype=torch.float32, device="cpu")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="qlora"):
            qlora.load_adapter(fresh, adapter)
        assert ("was trained on the base model" in caplog.text) == warns, (base, caplog.text)


def test_sampling_options_are_checked_in_python_too():
    from qlora.infer.generate import SamplingOptions

    for bad in ({"top_p": 0.0}, {"temperature": math.inf}, {"max_new_tokens": 0}):
        with pytest.raises(UsageError):
            SamplingOptions(**bad)
    with pytest.raises(UsageError, match="--alpha must be positive"):
        TrainConfig(model="m", data="d", output="o", alpha=-5.0).validate()


@pytest.mark.parametrize("argv, expected", [
    (["generate", "--model", "m", "--prompt", "p", "--adapter", "a", "--adapter-weights", ""], "--adapter-weights"),
    (["serve", "--model", "m", "--api-key", ""], "--api-key is empty"),
    (["serve", "--model", "m", "--served-model-name", " "], "--served-model-name is empty"),
    (["merge", "--model", "m", "--adapter", "a", "--output", ""], "--output is empty"),
    (["quant-error", "--numel", str(10**9)], "--numel"),
    (["train", "--model", "m", "--data", "{tmp}/d.jsonl", "--output", "{tmp}/o", "--lr", "abc"],
     "--lr expects a number, got 'abc'"),
    (["train", "--model", "m", "--data", "{tmp}/d.jsonl", "--output", "{tmp}/o", "--rank", "8.5"],
     "--rank expects an integer, got '8.5'"),
    (["train", "{tmp}/cfg", "--model", "m", "--data", "{tmp}/d.jsonl", "--output", "{tmp}/o"], "is a folder"),
    (["train", "--model", "m", "--data", "{tmp}/d.jsonl", "--output", "{tmp}/o", "--batch-size", "4"],
     "--batch-size 4 is more than the 3 examples"),
])
def test_empty_or_senseless_values_exit_2_before_anything_loads(argv, expected, tmp_path, capsys):
    """Values an unset shell variable or a typo gives: refused by name instead of silently meaning something."""
    _jsonl(tmp_path / "d.jsonl", 3)
    (tmp_path / "cfg").mkdir()
    code, err = _run([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert code == 2 and expected in err, err
    assert not (tmp_path / "o").exists()


def test_a_value_that_begins_with_a_dash_is_shown_how_to_give(capsys):
    """argparse reads ``--max-shard-size -5GB``'s value as another option and says only "expected one argument"."""
    code, err = _run(["quantize", "--model", "m", "--output", "o", "--max-shard-size", "-5GB"], capsys)
    assert code == 2 and "write --max-shard-size=VALUE" in err, err
    code, err = _run(["quantize", "--model", "m", "--output", "o", "--max-shard-size=-5GB"], capsys)
    assert code == 2 and "'-5GB' is not a size" in err, err


def _text_options(command):
    """The options of ``command`` that take free text (no type, no choices), with its required ones."""
    sub = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    text = [a for a in sub._actions if a.option_strings and a.nargs != 0 and not a.choices and a.type is None
            and a.default != ""]
    return text, [a.option_strings[-1] for a in sub._actions if a.required]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "train"])
def test_every_text_option_given_empty_is_refused_by_name(command, tmp_path, capsys, monkeypatch):
    """An unset shell variable (``--adapter "$A"``) gives an empty value: a path read as the working folder, or an
    optional value read as left out (a chat not saved, an adapter not loaded, a server on every interface)."""
    monkeypatch.chdir(tmp_path)
    text, required = _text_options(command)
    # no system prompt; no turn ends; an --image's own prompt; the experts alone (with --target-parameters)
    meaningful = {"--system", "--eot-tokens", "--prompt", "--target-modules"}
    for action in text:
        flag = action.option_strings[-1]
        if flag in meaningful:
            continue
        argv = [command] + [x for r in required if r != flag for x in (r, "x")] + [flag, " " if flag == "--db" else ""]
        code, err = _run(argv, capsys)
        assert code == 2 and f"{flag} is empty" in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert list(tmp_path.iterdir()) == []
    if command == "estimate":
        code, err = _run(["estimate", ""], capsys)
        assert code == 2 and "MODEL is empty" in err, err


@pytest.mark.parametrize("argv", [["--adapter", ""], ["--eval-data", " "], ["--template", ""], ["--data-split", ""],
                                  ["--model", ""], [""]])
def test_train_flags_given_empty_are_refused_by_name(argv, tmp_path, capsys):
    base = ["train", "--model", "m", "--data", str(_jsonl(tmp_path / "d.jsonl", 3)), "--output", str(tmp_path / "o")]
    code, err = _run(base + argv, capsys)
    expected = "config file's path is empty" if argv == [""] else f"{argv[0]} is empty"
    assert code == 2 and expected in err, err
    assert not (tmp_path / "o").exists()


def _jsonl(path, n):
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(n)))
    return path


def test_yaml_true_is_not_a_number(tmp_path):
    from qlora.train.config import load_config

    for line in ("rank: true", "lr: false", "seed: yes"):
        (tmp_path / "c.yaml").write_text(f"model: m\ndata: d\noutput: o\n{line}\n")
        with pytest.raises(UsageError, match=r"c\.yaml line 4: \w+ expects (int|float), got (True|False)"):
            load_config(tmp_path / "c.yaml", {})


def test_chat_tools_file_not_utf8_exits_2(tmp_path, capsys):
    tools = tmp_path / "tools.json"
    tools.write_bytes('[{"type": "function", "function": {"name": "caf\u00e9"}}]'.encode("latin-1"))
    code, err = _run(["chat", "--model", "m", "--tools", str(tools)], capsys)
    assert code == 2 and "--tools" in err and "not UTF-8" in err, err
    tools.write_bytes(b"\xef\xbb\xbf[]")  # a BOM is read past: the complaint is about the content
    code, err = _run(["chat", "--model", "m", "--tools", str(tools)], capsys)
    assert code == 2 and "non-empty JSON list" in err, err


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError(
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
    "allocate 256000000000 bytes. Error code 12 (Cannot allocate memory)")])
def test_out_of_memory_is_one_paragraph_without_traceback(exc, monkeypatch, capsys):
    import qlora.quant.error_report as error_report  # what quant-error's run imports

    def fail(*args):
        raise exc
    monkeypatch.setattr(error_report, "quant_error_report", fail)
    code, err = _run(["quant-error"], capsys)
    assert code == 1 and "out of memory" in err and "--batch-size" in err and len(err.strip().splitlines()) == 1


def test_other_runtime_errors_still_propagate(monkeypatch):
    import qlora.quant.error_report as error_report  # what quant-error's run imports

    def fail(*args):
        raise RuntimeError("a bug")
    monkeypatch.setattr(error_report, "quant_error_report", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["quant-error"])


_ADAPTER_CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj"],
                   "rank_pattern": {"q_proj": 4}}


@pytest.mark.parametrize("edit, named", [
    ({"r": "abc"}, "r must be a positive integer"), ({"r": 0}, "r must be a positive integer"),
    ({"r": ...}, "has no r"), ({"lora_alpha": None}, "lora_alpha must be a number"),
    ({"lora_alpha": "x"}, "lora_alpha must be a number"), ({"lora_dropout": "x"}, "lora_dropout must be"),
    ({"target_modules": 5}, "target_modules must be"), ({"rank_pattern": [1]}, "rank_pattern must be"),
    ({"alpha_pattern": {"q_proj": None}}, "alpha_pattern must be"), (b'{"r": 8, "x": "caf\xe9"}', "not UTF-8"),
])
def test_a_damaged_adapter_config_is_named(edit, named, tmp_path):
    from qlora.model.adapter_io import read_adapter_config

    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps(_ADAPTER_CONFIG))
    assert read_adapter_config(tmp_path)["r"] == 8  # the undamaged file reads
    if isinstance(edit, bytes):
        path.write_bytes(edit)
    else:
        path.write_text(json.dumps({k: v for k, v in (_ADAPTER_CONFIG | edit).items() if v is not ...}))
    with pytest.raises(UsageError, match=named) as info:
        read_adapter_config(tmp_path)
    assert "adapter_config.json" in str(info.value)


def test_a_damaged_adapter_config_exits_2_from_the_command(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(_ADAPTER_CONFIG | {"lora_alpha": None}))
    data = _jsonl(tmp_path / "d.jsonl", 3)
    code, err = _run(["train", "--model", "m", "--adapter", str(tmp_path / "a"), "--data", str(data),
                      "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and "lora_alpha must be a number" in err, err


@pytest.mark.parametrize("edit, named", [
    ({"num_hidden_layers": "x"}, "num_hidden_layers"), ({"vocab_size": -1}, "vocab_size must be"),
    ({"model_type": None}, "model_type"), ({"model_type": "bogus"}, "bogus"), (b'{"model_type": "lla', "JSON"),
])
def test_a_damaged_model_config_is_named(edit, named, tmp_path, tiny_model_dir, capsys):
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    if isinstance(edit, bytes):  # a truncated file: an input error (exit 2), not a failing disk (exit 1)
        (model / "config.json").write_bytes(edit)
    else:
        (model / "config.json").write_text(json.dumps({k: v for k, v in (config | edit).items() if v is not None}))
    for argv in (["estimate", str(model)], ["quantize", "--model", str(model), "--output", str(tmp_path / "q")],
                 ["export", "--model", str(model), "--output", str(tmp_path / "q")]):
        code, err = _run(argv, capsys)
        assert code == 2 and "config.json" in err and named in err, (argv, err)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("index", ["{oops", "{}", "[1]"])
def test_a_damaged_safetensors_index_is_named(index, tmp_path, tiny_model_dir, capsys):
    import shutil

    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    (model / "model.safetensors.index.json").write_text(index)
    code, err = _run(["quantize", "--model", str(model), "--output", str(tmp_path / "q")], capsys)
    assert code == 2 and "model.safetensors.index.json is not a weight index" in err, err


def test_a_broken_chat_template_or_chat_format_is_named(tmp_path, tiny_tokenizer):
    import copy

    from qlora.infer.messages import Message
    from qlora.infer.template import render_chat
    from qlora.model.chat_format import ChatFormat

    broken = copy.deepcopy(tiny_tokenizer)
    broken.chat_template = "{% if %}"
    with pytest.raises(UsageError, match="chat template is not valid Jinja.*--template chatml"):
        render_chat(broken, [Message("user", "hi")])
    (tmp_path / "chat_format.json").write_text('{"template": 5}')
    with pytest.raises(UsageError, match="not a valid chat format file.*template must be a str"):
        ChatFormat.load(tmp_path)


def test_on_off_options_take_the_boolean_words_of_transformers_scripts(tmp_path, tiny_model_dir, capsys):
    """``--packing true`` / ``--progress=False`` (HfArgumentParser's style) set the flag; another word is an
    error naming the flag, not a missing config file."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"text number {i}"}) + "\n" for i in range(4)))
    out = tmp_path / "o"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--max-steps",
                 "1", "--packing", "True", "--progress=false", "--gradient-checkpointing", "no", "--rslora"]) == 0
    config = (out / "config.yaml").read_text()
    assert "packing: true" in config and "progress: false" in config and "gradient_checkpointing: false" in config
    assert "rslora: true" in config
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--progress=maybe"])
    assert exit_.value.code == 2
    assert "--progress is on or off: give --progress or --no-progress" in capsys.readouterr().err


def test_plain_switches_take_the_boolean_words_too(tmp_path, tiny_model_dir, capsys):
    """``--overwrite true`` (merge, quantize, export, demo: a switch without a --no- form) sets it; false leaves
    it out, so an existing folder is refused as without the switch."""
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_model_dir), "--output", str(out)]) == 0
    assert main(["quantize", "--model", str(tiny_model_dir), "--output", str(out), "--overwrite", "true"]) == 0
    code, err = _run(["quantize", "--model", str(tiny_model_dir), "--output", str(out), "--overwrite=no"], capsys)
    assert code == 2 and "already exists and is not empty; pass --overwrite" in err
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--overwrite=maybe"])
    assert exit_.value.code == 2
    assert "--overwrite is on or off: give --overwrite or leave it out" in capsys.readouterr().err


def test_a_models_own_input_check_exits_2_naming_it(tmp_path, tiny_tokenizer, capsys):
    """transformers' Reformer trains only on sequences exactly as long as its axial position shape: its own
    ValueError ends the command with exit 2 and that message, not a traceback. A ValueError of qlora's own code
    still ends in a traceback (a bug)."""
    from transformers import ReformerConfig, ReformerModelWithLMHead

    config = ReformerConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, num_attention_heads=2,
                            attention_head_size=16, feed_forward_size=64, attn_layers=["local", "local"],
                            axial_pos_shape=[8, 8], axial_pos_embds_dim=[16, 16], max_position_embeddings=64,
                            is_decoder=True, pad_token_id=tiny_tokenizer.pad_token_id,
                            eos_token_id=tiny_tokenizer.eos_token_id)
    ReformerModelWithLMHead(config).save_pretrained(tmp_path / "reformer")
    tiny_tokenizer.save_pretrained(tmp_path / "reformer")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "The quick brown fox jumps over the lazy dog."}\n' * 2)
    argv = ["train", "--model", str(tmp_path / "reformer"), "--data", str(data), "--output", str(tmp_path / "out"),
            "--max-steps", "1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "models/reformer/modeling_reformer.py" in err and "axial_pos_shape" in err, err


def test_a_value_error_of_qlora_itself_is_not_blamed_on_the_model():
    from qlora.cli.main import _model_code_that_raised

    try:
        int("x")
    except ValueError as exc:
        assert _model_code_that_raised(exc) is None


def test_only_a_missing_field_of_transformers_own_object_in_its_model_code_is_blamed_on_transformers(tmp_path):
    """An AttributeError raised in a transformers model file on one of transformers' own objects (5.24's Llama 4
    asks its text model's output for image_outputs) is that release's fault; the same error on one of qlora's
    modules, or raised in qlora's own code, is not, and keeps its traceback."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from qlora.cli.main import _transformers_inconsistency
    from qlora.nn import Linear4bit

    model_file = tmp_path / "transformers" / "models" / "toy" / "modeling_toy.py"
    code = compile("obj.image_outputs", str(model_file), "eval")  # a line of a transformers model's forward

    def raised(obj) -> AttributeError:
        try:
            eval(code, {"obj": obj})
        except AttributeError as exc:
            return exc
        raise AssertionError("no AttributeError")

    assert _transformers_inconsistency(raised(CausalLMOutputWithPast())) == "models/toy/modeling_toy.py"
    assert _transformers_inconsistency(raised(Linear4bit(64, 64, bias=False))) is None  # qlora's module
    assert _transformers_inconsistency(raised(None)) is None
    try:
        CausalLMOutputWithPast().image_outputs  # noqa: B018 - the same object, read by qlora's code (here)
    except AttributeError as exc:
        assert _transformers_inconsistency(exc) is None


@pytest.mark.parametrize("short, dtype", [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32"),
                                          ("float32", "float32")])
def test_merge_dtype_takes_the_short_names_the_other_commands_use(short, dtype):
    args = build_parser("merge").parse_args(["merge", "--model", "m", "--adapter", "a", "--output", "o",
                                             "--dtype", short])
    assert args.dtype == dtype


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.csv", "rows.parquet", "rows.jsonl.gz"])
def test_a_data_file_given_as_the_config_file_says_to_pass_it_as_data(name, tmp_path, capsys):
    path = tmp_path / name
    path.write_text('{"instruction": "a", "output": "b"}\n')
    code, err = _run(["train", str(path), "--model", "m", "--output", str(tmp_path / "o")], capsys)
    assert code == 2 and f"give the data with --data {path}" in err, err


def test_chat_db_without_a_session_is_refused_before_the_model_loads(tmp_path, capsys):
    code, err = _run(["chat", "--model", "no-model", "--db", str(tmp_path / "c.sqlite")], capsys)
    assert code == 2 and "add --session NAME" in err and not (tmp_path / "c.sqlite").exists(), err


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["serve"], ["chat"]])
def test_an_adapter_name_without_a_folder_is_named(command, tmp_path, capsys):
    code, err = _run([command[0], "--model", str(tmp_path), "--adapter", "sql=", *command[1:]], capsys)
    assert code == 2 and "--adapter sql=: no folder after the name" in err, err


@pytest.mark.parametrize("argv, shown", [
    (["generate", "--model", "m", "--prompt", "caf\udce9 au lait"], "--prompt 'caf\\xe9 au lait'"),
    (["train", "--model", "m", "--data", "d.jsonl", "--output", "{tmp}/caf\udce9"], "--output '{tmp}/caf\\xe9'"),
    (["merge", "--model", "m", "--adapter", "caf\udce9", "--output", "{tmp}/o"], "--adapter 'caf\\xe9'"),
])
def test_an_argument_that_is_not_utf8_is_refused_by_name(argv, shown, tmp_path, capsys):
    """Bytes of a Latin-1 terminal arrive as lone surrogates: refused naming the option and the byte, before a
    tokenizer or a UTF-8 file of the output fails on them with a traceback after part of it was written."""
    code, err = _run([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert code == 2 and shown.replace("{tmp}", str(tmp_path)) in err and "byte 0xe9" in err, err
    assert list(tmp_path.iterdir()) == []


def _stdin(monkeypatch, data: bytes, errors: str) -> None:
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors=errors))


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_generate_prompt_from_stdin_that_is_not_utf8_exits_2(errors, monkeypatch, capsys):
    _stdin(monkeypatch, b"caf\xe9 au lait\n", errors)
    code, err = _run(["generate", "--model", "m", "--prompt", "-"], capsys)
    assert code == 2 and "--prompt - : standard input is not UTF-8 text (byte 0xe9" in err, err


@pytest.mark.parametrize("errors", ["strict", "surrogateescape"])
def test_chat_skips_a_line_that_is_not_utf8_and_goes_on(errors, tiny_model_dir, monkeypatch, capsys):
    _stdin(monkeypatch, b"caf\xe9\nhello\n", errors)
    code, err = _run(["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "2", "--template", "chatml"], capsys)
    assert code == 0 and "not sent: the line is not UTF-8 text (byte 0xe9" in err, err


def test_closed_standard_streams_read_as_empty_and_take_writes(tiny_model_dir, monkeypatch):
    """``qlora chat <&-`` or ``>&-``: Python's None streams, not a traceback."""
    import sys

    monkeypatch.setattr(sys, "stdin", None)
    assert main(["chat", "--model", str(tiny_model_dir), "--max-new-tokens", "2"]) == 0  # ends at once, as on EOF
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "hello", "--max-new-tokens", "2"]) == 0


@pytest.mark.parametrize("argv, asked", [
    (["eval", "--data-split", "validation"], "--data-split validation"),
    (["eval", "--data-subset", "en"], "--data-subset en"),
    (["train", "--output", "{tmp}/o", "--data-split", "test"], "--data-split test"),
    (["train", "--output", "{tmp}/o", "--eval-data", "{tmp}/d.jsonl", "--eval-data-split", "validation"],
     "--eval-data-split validation"),
])
def test_a_split_or_subset_of_a_data_file_is_refused_not_ignored(argv, asked, tmp_path, capsys):
    """A file has no splits: it was read whole while the user believed they evaluated or trained on a part."""
    data = _jsonl(tmp_path / "d.jsonl", 3)
    argv = [argv[0], "--model", "m", "--data", str(data), *(a.replace("{tmp}", str(tmp_path)) for a in argv[1:])]
    code, err = _run(argv, capsys)
    assert code == 2 and f"{asked}: {data} is a data file" in err, err
    assert not (tmp_path / "o").exists()


def test_the_train_split_of_a_data_file_and_splits_of_folders_are_left_to_the_reader(tmp_path):
    from qlora.train.data.selection import check_split_of_files

    data = _jsonl(tmp_path / "d.jsonl", 3)
    options = ("--data-split", "--data-subset")
    check_split_of_files(str(data), "train", None, "data", options, "test")  # datasets' name for a lone file's rows
    check_split_of_files(str(data), "test", None, "data", options, "test")  # the option's default: not asked
    check_split_of_files(str(tmp_path), "validation", "en", "data", options, "test")  # a folder may hold splits
    with pytest.raises(UsageError, match="--data-split validation"):
        check_split_of_files(f"{data},{data}", "validation", None, "data", options, "test")


def test_available_memory_is_read_from_meminfo(tmp_path):
    from qlora.cpu_memory import available_bytes

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000 kB\nMemAvailable:   2048 kB\n")
    assert available_bytes(meminfo) == 2048 * 1024
    assert available_bytes(tmp_path / "absent") is None


def test_lora_factors_larger_than_the_cpu_memory_left_are_refused_before_allocation(tiny_model_dir, monkeypatch):
    """Linux grants an allocation it cannot back and kills the process as it is filled (SIGKILL, no message)."""
    import qlora.cpu_memory

    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    hidden = model.config.hidden_size
    monkeypatch.setattr(qlora.cpu_memory, "available_bytes", lambda: 10**6)
    with pytest.raises(UsageError, match=rf"rank 100000 \(--rank\).*as low as {hidden // 2}"):
        qlora.add_lora(model, r=100000, target_modules=["q_proj", "k_proj"])
    assert not any("lora" in n for n, _ in model.named_modules())  # nothing allocated
    qlora.add_lora(model, r=4, target_modules=["q_proj", "k_proj"])  # 4 x (64 + 64 or 32) x 4 bytes a layer fit


def test_a_run_whose_gradients_and_moments_cannot_fit_exits_2(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import qlora.cpu_memory

    # the factors fit (28,672 fp32 numbers at rank 64: 115 kB), their gradients and AdamW's moments (3x more) do not
    monkeypatch.setattr(qlora.cpu_memory, "available_bytes", lambda: 200_000)
    out = tmp_path / "o"
    code, err = _run(["train", "--model", str(tiny_model_dir), "--data", str(_jsonl(tmp_path / "d.jsonl", 8)),
                      "--output", str(out), "--rank", "64", "--target-modules", "q_proj,v_proj", "--optim", "adamw",
                      "--max-steps", "1", "--no-progress"], capsys)
    assert code == 2 and "--rank 64: training the" in err and "--optim adamw moments" in err, err
    assert not out.exists()


@pytest.mark.parametrize("command", ["eval", "merge", "export", "train"])
def test_a_second_adapter_for_a_command_that_takes_one_is_refused_not_dropped(command, tmp_path, capsys):
    """generate, chat and serve load every --adapter; these kept the last alone without a word."""
    extra = {"eval": ["--data", "d.jsonl"], "train": ["--data", "d.jsonl", "--output", str(tmp_path / "o")]}
    argv = [command, "--model", "m", "--adapter", "a1", "--adapter=a2", *extra.get(command, ["--output", "o"])]
    code, err = _run(argv, capsys)
    assert code == 2 and f"--adapter is given 2 times, and qlora {command} takes one adapter" in err, err
    assert list(tmp_path.iterdir()) == []
