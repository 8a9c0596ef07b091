"""YAML configs written for PEFT/TRL/axolotl/LLaMA-Factory load; errors name the file and line."""

from __future__ import annotations

import pytest

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.train.config import ALIASES, TrainConfig, load_config


def _yaml(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_keys_of_other_tools_are_accepted(tmp_path):
    axolotl = _yaml(tmp_path, """
base_model: ./models/llama
dataset: data.jsonl
output_dir: ./out
learning_rate: 2e-5
lora_r: 32
lora_alpha: 64
lora_dropout: 0.1
num_epochs: 3
sequence_len: 1024
micro_batch_size: 4
gradient_accumulation_steps: 8
lora_target_modules: [q_proj, v_proj]
lr_scheduler: cosine
optimizer: paged_adamw_8bit
train_on_inputs: false
bf16: true
sample_packing: true
""")
    cfg = load_config(axolotl, {})
    assert (cfg.model, cfg.data, cfg.output) == ("./models/llama", "data.jsonl", "./out")
    assert (cfg.lr, cfg.rank, cfg.alpha, cfg.dropout, cfg.epochs) == (2e-5, 32, 64.0, 0.1, 3.0)
    assert (cfg.seq_len, cfg.batch_size, cfg.grad_accum) == (1024, 4, 8)
    assert cfg.target_modules == "q_proj,v_proj" and cfg.lr_scheduler == "cosine" and cfg.optim == "paged_adamw_8bit"
    assert cfg.train_on == "assistant" and cfg.precision == "bf16" and cfg.packing

    trl = _yaml(tmp_path, """
model_name_or_path: m
dataset: d.jsonl
output_dir: o
per_device_train_batch_size: 2
num_train_epochs: 1
cutoff_len: 256
lora_rank: 8
lr_scheduler_type: linear
overwrite_output_dir: true
fp16: false
""")
    cfg = load_config(trl, {"lr": "1e-3"})  # flags still win
    assert (cfg.model, cfg.batch_size, cfg.seq_len, cfg.rank, cfg.lr_scheduler) == ("m", 2, 256, 8, "linear")
    assert cfg.overwrite and cfg.precision == "auto" and cfg.lr == 1e-3
    assert all(v in TrainConfig.__dataclass_fields__ for v in ALIASES.values())


@pytest.mark.parametrize("text, message", [
    ("model: m\ndata: d\noutput: o\nlearning_rat: 1e-4\n", "run.yaml line 4: unknown option 'learning_rat'; did you mean lr"),
    ("model: m\ndata: d\noutput: o\nlora_alpa: 16\n", "did you mean alpha"),
    ("model: m\ndata: d\noutput: o\nlr: 1e-4\nlearning_rate: 2e-4\n", "run.yaml line 5: learning_rate and lr both set lr"),
    ("model: m\ndata: d\noutput: o\nrank: 8\nrank: 16\n", "run.yaml line 5: 'rank' is given twice (first on line 4)"),
    ("model: m\ndata: d\n  output: [o\n", "run.yaml line 3"),
    ("model: m\nrank: eight\n", "run.yaml line 2: rank expects int"),
    ("- a\n- b\n", "run.yaml: expected a mapping"),
])
def test_yaml_errors_name_the_file_and_line(tmp_path, text, message):
    with pytest.raises(UsageError) as info:
        load_config(_yaml(tmp_path, text), {})
    assert message in str(info.value), str(info.value)


def test_cli_reports_yaml_errors_and_suggests_flags(tmp_path, capsys):
    path = _yaml(tmp_path, "model: m\ndata: d\noutput: o\nnum_epoch: 2\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "line 4" in err and "epochs" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        main(["train", "--model", "m", "--learning-rate", "1e-4"])
    assert exc.value.code == 2 and "did you mean --lr" in capsys.readouterr().err
