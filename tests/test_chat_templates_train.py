"""``qlora train --template auto`` on real chat templates, end to end (issue 20), and the chat format
saved with the adapter and used by ``qlora generate`` / ``qlora chat`` (issue 19, item 8)."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from qlora.cli.main import main
from qlora.model.chat_format import ChatFormat, today

from chat_families import family_tokenizer, model_for

THINK = {"role": "assistant", "content": "<think>\nTwo and two make four.\n</think>\n\nFour."}
ROWS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"}, THINK,
     {"role": "user", "content": "And three plus three?"}, {"role": "assistant", "content": "Six."}],
    [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
]


def data(tmp_path, rows=ROWS):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))
    return path


def train(model, data_path, out, *extra):
    return main(["train", "--model", str(model), "--data", str(data_path), "--output", str(out), "--seq-len", "256",
                 "--max-steps", "2", "--no-progress", "--template", "auto", *extra])


@pytest.mark.parametrize("family", ["qwen3", "llama-3.2", "phi-3.5", "mistral-v0.3", "deepseek-r1-distill", "olmo-2",
                                    "phi-4-mini", "command-r7b", "ministral-3-reasoning", "gpt-oss", "kimi-k2-thinking",
                                    "deepseek-v3.1", "minimax-m2"])
def test_train_template_auto_end_to_end(family, tmp_path):
    model = model_for(family, tmp_path)
    assert train(model, data(tmp_path), tmp_path / "run") == 0
    run = tmp_path / "run"
    assert (run / "adapter_model.safetensors").is_file() and (run / "adapter_config.json").is_file()
    saved = ChatFormat.load(run)
    assert saved.template == family_tokenizer(family).chat_template
    assert saved.date == yaml.safe_load((run / "config.yaml").read_text())["template_date"] == today()
    assert "chat_format" not in json.loads((run / "adapter_config.json").read_text())  # PEFT's file stays PEFT's


def test_template_error_exits_2_with_file_line_and_hint(tmp_path, capsys):
    model = model_for("gemma-2", tmp_path)
    assert train(model, data(tmp_path), tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "chat.jsonl line 1" in err and "chat_template.jinja, line 1" in err
    assert "System role not supported" in err and "--system-into-user" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    assert train(model, data(tmp_path), tmp_path / "run2", "--system-into-user") == 0
    assert ChatFormat.load(tmp_path / "run2").system_into_user


def test_pinned_date_is_recorded_and_reused_on_resume(tmp_path, monkeypatch):
    import qlora.train.trainer as trainer

    model = model_for("llama-3.2", tmp_path)
    run = tmp_path / "run"
    monkeypatch.setattr(trainer, "today", lambda: "2026-01-31")
    assert train(model, data(tmp_path), run, "--save-steps", "1") == 0
    monkeypatch.setattr(trainer, "today", lambda: "2026-02-01")  # the run is resumed the next day
    assert train(model, data(tmp_path), run, "--save-steps", "1", "--resume") == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["template_date"] == "2026-01-31"
    assert ChatFormat.load(run).date == "2026-01-31"
    assert "Today Date: 31 Jan 2026" in ChatFormat.load(run).render(family_tokenizer("llama-3.2"), ROWS[1])


def test_generate_and_chat_use_the_saved_format_by_default(tmp_path, tiny_model_dir, capsys):
    from qlora.cli.commands.generate import chat_format_from_args
    from qlora.infer.messages import Message
    from qlora.infer.template import render_chat
    from transformers import AutoTokenizer

    rows = [[{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}]] * 4
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data(tmp_path, rows)), "--output",
                 str(tmp_path / "run"), "--max-steps", "1", "--no-progress", "--template", "alpaca"]) == 0
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def args(template="auto"):
        return argparse.Namespace(model=str(tiny_model_dir), template=template, adapter=[str(tmp_path / "run")])

    fmt = chat_format_from_args(args(), tok, "generate")
    assert fmt.name == "alpaca"
    assert render_chat(tok, [Message("user", "Hi")], chat_format=fmt).endswith("### Instruction:\nHi\n\n### Response:\n")
    assert chat_format_from_args(args("none"), tok, "generate") is None
    assert chat_format_from_args(args("tokenizer"), tok, "chat").template == tok.chat_template
    (tmp_path / "run" / "chat_format.json").unlink()  # an adapter saved before formats were: as before
    assert chat_format_from_args(args(), tok, "generate") is None and chat_format_from_args(args(), tok, "chat") is None
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "run"), "--prompt", "Hi",
                 "--max-new-tokens", "2", "--quant", "none", "--compute-dtype", "fp32", "--template", "chatml"]) == 0


def test_continuing_an_adapter_under_a_chosen_template_keeps_its_saved_format(tmp_path, monkeypatch):
    """``qlora train --adapter A --template X``: X replaces only A's template, as in eval and generate. A Gemma 2 run
    trained with --system-into-user (no system role) goes on under --template tokenizer (the same template) folding
    system messages as A did, where it refused them, and with A's pinned date, not today's."""
    import qlora.train.trainer as trainer

    model = model_for("gemma-2", tmp_path)
    monkeypatch.setattr(trainer, "today", lambda: "2026-01-31")
    assert train(model, data(tmp_path), tmp_path / "a", "--system-into-user") == 0
    monkeypatch.setattr(trainer, "today", lambda: "2026-02-01")
    more = tmp_path / "more"
    assert main(["train", "--adapter", str(tmp_path / "a"), "--data", str(data(tmp_path)), "--output", str(more),
                 "--seq-len", "256", "--max-steps", "1", "--no-progress", "--template", "tokenizer"]) == 0
    saved = ChatFormat.load(more)
    assert saved.system_into_user and saved.date == "2026-01-31" and saved.name == "tokenizer"
    assert yaml.safe_load((more / "config.yaml").read_text())["template_date"] == "2026-01-31"
