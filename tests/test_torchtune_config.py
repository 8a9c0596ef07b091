"""torchtune's LoRA/QLoRA recipe configs (tests/data/torchtune, origins in its SOURCES.md) load to the run they
describe and train; their dataset rows are the tokens torchtune's Llama 3 tokenizer trains; what qlora would
train otherwise is refused by file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chat_families import model_for
from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.train.config import load_config
from qlora.train.data import normalize
from qlora.train.data.selection import read_sources
from qlora.train.data.tokenize import IGNORE_INDEX, tokenize_example

DATA = Path(__file__).parent / "data" / "torchtune"
# Llama 3's split rule (its tokenizer.json's pre-tokenizer regex, tiktoken's cl100k-style pat_str): "\n\n" is a
# piece of its own before any stripped content, so the joined text tokenizes as torchtune's pieces do
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
ROWS = [{"instruction": f"Add {i} and {i}.", "input": "" if i % 2 else f"numbers {i}", "output": f" {2 * i}\n"}
        for i in range(8)]


def _config(tmp_path, name: str, model, data=None, edit=lambda text: text) -> Path:
    """The shipped file, its /tmp model folder, output_dir and hub dataset made local."""
    text = (DATA / name).read_text()
    folder = next(line.split(":", 1)[1].strip() for line in text.splitlines() if "checkpoint_dir:" in line
                  and not line.lstrip().startswith("#"))
    text = text.replace(folder.rstrip("/"), str(model)).replace("/tmp/torchtune", str(tmp_path / "out"))
    if data is not None:
        text = text.replace("  packed: False", f"  source: json\n  data_files: {data}\n  packed: False", 1)
    path = tmp_path / name
    path.write_text(edit(text))
    return path


def _rows(tmp_path) -> Path:
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_llama3_1_qlora_single_device_loads_as_torchtune_runs_it(tmp_path, capsys):
    model = model_for("llama-3.1", tmp_path)
    config = load_config(_config(tmp_path, "llama3_1_8B_qlora_single_device.yaml", model, _rows(tmp_path)), {})
    assert (config.model, config.quant, config.double_quant) == (str(model), "nf4", True)
    assert (config.rank, config.alpha, config.dropout, config.dora) == (8, 16.0, 0.0, False)
    assert config.target_modules == "q_proj,v_proj,o_proj,gate_proj,down_proj,up_proj"
    assert (config.batch_size, config.grad_accum, config.epochs, config.max_steps) == (2, 8, 1.0, 0)
    assert (config.optim, config.lr, config.weight_decay) == ("adamw", 3e-4, 0.01)
    assert (config.lr_scheduler, config.warmup_steps, config.warmup_ratio) == ("cosine", 100, 0.0)
    assert (config.max_grad_norm, config.gradient_checkpointing, config.precision) == (0.0, True, "bf16")
    assert config.output == str(tmp_path / "out" / "llama3_1_8B" / "qlora_single_device")
    assert config.seq_len == json.loads((Path(model) / "config.json").read_text())["max_position_embeddings"]
    err = capsys.readouterr().err
    assert "torchtune recipe config" in err and "metric_logger" in err and "profiler" in err


def test_llama3_rows_train_the_tokens_torchtune_trains(tmp_path):
    """Oracle: torchtune's Llama3Tokenizer.tokenize_messages built piece by piece (header, stripped content,
    <|eot_id|>; BOS first; alpaca's train_on_input default: every token but BOS and the final EOS)."""
    from chat_families import family_tokenizer

    tok = family_tokenizer("llama-3.1", LLAMA3_SPLIT)
    model = model_for("llama-3.1", tmp_path)
    for train_on_input in (True, False):
        edit = (lambda t: t.replace("  packed: False", "  packed: False\n  train_on_input: False", 1)) if not \
            train_on_input else (lambda t: t)
        config = load_config(_config(tmp_path, "llama3_1_8B_qlora_single_device.yaml", model, _rows(tmp_path),
                                     edit), {})
        examples = read_sources(config.data, "train", None, 0, normalize)
        for row, example in zip(ROWS, examples):
            got = tokenize_example(example, tok, "", train_on=config.train_on)
            prompt = ("Below is an instruction that describes a task, paired with an input that provides further "
                      "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                      f"{row['instruction']}\n\n### Input:\n{row['input']}\n\n### Response:\n") if row["input"] else (
                "Below is an instruction that describes a task. Write a response that appropriately completes the "
                f"request.\n\n### Instruction:\n{row['instruction']}\n\n### Response:\n")
            ids, mask = [tok.bos_token_id], [False]
            for role, content, trained in (("user", prompt, train_on_input), ("assistant", row["output"], True)):
                piece = (tok.convert_tokens_to_ids(["<|start_header_id|>"]) + tok.encode(role, add_special_tokens=False)
                         + tok.convert_tokens_to_ids(["<|end_header_id|>"]) + tok.encode("\n\n", add_special_tokens=False)
                         + tok.encode(content.strip(), add_special_tokens=False)
                         + tok.convert_tokens_to_ids(["<|eot_id|>"]))
                ids, mask = ids + piece, mask + [trained] * len(piece)
            assert got.input_ids == ids
            assert got.labels == [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def test_llama3_1_qlora_config_trains(tmp_path):
    model = model_for("llama-3.1", tmp_path)
    path = _config(tmp_path, "llama3_1_8B_qlora_single_device.yaml", model, _rows(tmp_path),
                   lambda t: t.replace("max_steps_per_epoch: null", "max_steps_per_epoch: 2")
                   .replace("gradient_accumulation_steps: 8", "gradient_accumulation_steps: 1"))
    out = tmp_path / "run"
    assert main(["train", str(path), "--output", str(out), "--precision", "fp32",
                 "--no-progress"]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj",
                                                        "up_proj"])


def test_qwen2_5_lora_needs_a_template_then_loads(tmp_path):
    model = model_for("qwen2.5", tmp_path)
    path = _config(tmp_path, "qwen2_5_0.5B_lora_single_device.yaml", model, _rows(tmp_path))
    with pytest.raises(UsageError, match=r"line \d+: torchtune.models.qwen2_5.qwen2_5_tokenizer.*--template"):
        load_config(path, {})
    config = load_config(path, {"template": "tokenizer"})
    assert (config.quant, config.rank, config.alpha, config.template) == ("none", 32, 64.0, "tokenizer")
    assert config.target_modules == "q_proj,v_proj,o_proj,gate_proj,down_proj,up_proj"
    examples = read_sources(config.data, "train", None, 0, normalize)
    assert [m["role"] for m in examples[0].messages] == ["user", "assistant"]
    assert examples[0].messages[0]["content"].startswith("Below is an instruction")


@pytest.mark.parametrize("name, edit, match", [
    ("phi3_mini_qlora_single_device.yaml", None, "fused qkv_proj"),
    ("llama3_1_8B_lora_dpo_single_device.yaml", None, "stack_exchange_paired_dataset"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("packed: False", "packed: True"), "packed: true"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("qlora_llama3_1_8b", "llama3_1_8b"),
     "full fine-tuning"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("epochs: 1", "epochs: 2").replace(
        "max_steps_per_epoch: null", "max_steps_per_epoch: 5"), "max_steps_per_epoch with epochs 2"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t + "teacher_model:\n  _component_: x\n",
     "knowledge distillation"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("LinearCrossEntropyLoss", "DPOLoss"), "DPOLoss"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("shuffle: True", "shuffle: False"), "shuffle"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("FullModelHFCheckpointer",
                                                                 "FullModelMetaCheckpointer"), "transformers"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("resume_from_checkpoint: False",
                                                                 "resume_from_checkpoint: True"), "resume"),
])
def test_what_trains_otherwise_is_refused_by_line(tmp_path, name, edit, match):
    model = model_for("llama-3.1", tmp_path)
    path = _config(tmp_path, name, model, None, edit or (lambda t: t))
    with pytest.raises(UsageError, match=match) as info:
        load_config(path, {})
    assert f"{path} line " in str(info.value)


def test_defaults_where_the_file_is_silent(tmp_path):
    """The builders' lora_rank 8, alpha 16, dropout 0, no MLP; torch AdamW's lr 1e-3 and weight decay 0.01; no
    schedule: a constant rate; no clip_grad_norm: none; max_seq_len: one less (torchtune's last kept token is an
    untrained EOS)."""
    model = model_for("llama-3.1", tmp_path)
    path = tmp_path / "short.yaml"
    path.write_text(f"""output_dir: {tmp_path}/o
model:
  _component_: torchtune.models.llama3_2.lora_llama3_2_1b
  lora_attn_modules: [q_proj, k_proj]
tokenizer:
  _component_: torchtune.models.llama3.llama3_tokenizer
  path: {model}/original/tokenizer.model
  max_seq_len: 64
checkpointer:
  _component_: torchtune.training.FullModelHFCheckpointer
  checkpoint_dir: {model}
  output_dir: ${{output_dir}}
dataset:
  _component_: torchtune.datasets.instruct_dataset
  source: json
  data_files: {_rows(tmp_path)}
  column_map: {{input: instruction}}
optimizer:
  _component_: torch.optim.AdamW
loss:
  _component_: torchtune.modules.loss.CEWithChunkedOutputLoss
batch_size: 1
epochs: 1
""")
    config = load_config(path, {})
    assert (config.rank, config.alpha, config.dropout, config.quant) == (8, 16.0, 0.0, "none")
    assert config.target_modules == "q_proj,k_proj"
    assert (config.lr, config.weight_decay, config.lr_scheduler, config.warmup_steps, config.warmup_ratio) == (
        1e-3, 0.01, "constant", 0, 0.0)
    assert (config.max_grad_norm, config.seq_len, config.output) == (0.0, 63, f"{tmp_path}/o")
    examples = read_sources(config.data, "train", None, 0, normalize)
    assert examples[0].prompt.startswith("<|start_header_id|>user<|end_header_id|>\n\nAdd 0 and 0.<|eot_id|>")
