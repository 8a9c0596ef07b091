"""Official example files of axolotl and LLaMA-Factory as users copy them (tests/data/foreign_examples, origins in
its SOURCES.md): today's keys load with their meaning, and what is not a qlora training run is refused at its line,
saying which qlora command does it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.train.config import load_config

EXAMPLES = Path(__file__).parent / "data" / "foreign_examples"


def _local(name: str, tmp_path: Path, model: str = "./models/m", data: str = "./data.jsonl") -> Path:
    """The example with its hub model, hub datasets and output folder replaced by local paths, line for line."""
    text = (EXAMPLES / name).read_text()
    text = re.sub(r"^(base_model|model_name_or_path|model):.*$", rf"\1: {model}", text, flags=re.M)
    text = re.sub(r"^(\s*- path:).*$", rf"\1 {data}", text, flags=re.M)
    text = re.sub(r"^output_dir:.*$", f"output_dir: {tmp_path / 'out'}", text, flags=re.M)
    path = tmp_path / name
    path.write_text(text)
    return path


def _line(name: str, key: str) -> int:
    return next(i for i, line in enumerate((EXAMPLES / name).read_text().splitlines(), 1) if line.startswith(key))


def test_axolotl_llama3_qlora_of_today_loads(tmp_path, capsys):
    """attn_implementation replaced its flash_attention switch: the attention kernel, passed over by name."""
    cfg = load_config(_local("axolotl_llama-3_qlora.yml", tmp_path), {})
    assert (cfg.quant, cfg.double_quant, cfg.target_modules, cfg.packing, cfg.seq_len) == (
        "nf4", True, "all-linear", True, 4096)
    assert (cfg.optim, cfg.lr_scheduler, cfg.lr, cfg.batch_size, cfg.grad_accum) == (
        "paged_adamw_32bit", "cosine", 2e-4, 2, 4)
    err = capsys.readouterr().err
    assert re.search(r"passing over [^\n]*attn_implementation", err), err


def test_axolotl_kernel_and_logging_keys_are_passed_over_and_peft_keys_read(tmp_path, capsys):
    cfg = load_config(_local("axolotl_deepseek-v2_qlora-fsdp-2_5.yaml", tmp_path), {})
    assert (cfg.rslora, cfg.rank, cfg.alpha, cfg.quant, cfg.fsdp) == (True, 256, 256.0, "nf4", True)  # peft_use_rslora
    err = capsys.readouterr().err
    for key in ("liger_rms_norm", "liger_fused_linear_cross_entropy", "gradient_checkpointing_kwargs",
                "attn_implementation"):
        assert re.search(rf"passing over [^\n]*{key}", err), (key, err)

    cfg = load_config(_local("axolotl_llama-3_lora-1b-kernels.yml", tmp_path), {})
    assert (cfg.quant, cfg.dropout, cfg.optim) == ("none", 0.0, "adamw_8bit")
    assert re.search(r"passing over [^\n]*lora_mlp_kernel, lora_qkv_kernel, lora_o_kernel", capsys.readouterr().err)

    load_config(_local("axolotl_swanlab_lora-swanlab-profiling.yml", tmp_path), {})
    err = capsys.readouterr().err
    assert re.search(r"passing over [^\n]*use_swanlab, swanlab_project, swanlab_experiment_name", err), err


def test_a_value_checked_after_reading_names_its_line(tmp_path, capsys):
    """GLM-4.7-Flash's example asks torchao's 8-bit AdamW: refused at the line of its optimizer key."""
    name = "axolotl_glm47-flash_qlora.yaml"
    path = _local(name, tmp_path)
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{path} line {_line(name, 'optimizer:')} (optimizer): --optim: 'adamw_torch_8bit'" in err, err
    assert "Traceback" not in err
    # the same value given as a flag is the command line's, not the file's
    with pytest.raises(UsageError) as info:
        load_config(path, {"optim": "adamw_torch_8bit"})
    assert str(info.value).startswith("--optim: 'adamw_torch_8bit'")
    assert load_config(path, {"optim": "adamw_8bit"}).optim == "adamw_8bit"  # quantize_moe_experts: true is ours


@pytest.mark.parametrize("name, key, says", [
    ("llamafactory_merge_lora_qwen3_lora_sft.yaml", "export_dir", "qlora merge --model BASE --adapter ADAPTER"),
    ("llamafactory_inference_qwen3_lora_sft.yaml", "infer_backend", "qlora chat --model BASE --adapter ADAPTER"),
    ("llamafactory_v1_train_lora_train_lora_sft.yaml", "model_class", "LLaMA-Factory v1 file"),
])
def test_llama_factory_files_that_are_no_training_run_are_refused_at_their_line(tmp_path, capsys, name, key, says):
    path = _local(name, tmp_path)
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{path} line {_line(name, key)}: {key}: " in err and says in err and "Traceback" not in err, err


def test_a_llama_factory_training_file_passes_over_the_settings_of_its_later_export_and_inference(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: m\nstage: sft\ndo_train: true\nfinetuning_type: lora\ndataset: d.jsonl\n"
                    "output_dir: o\ninfer_backend: huggingface\nexport_dir: merged\nexport_size: 5\n"
                    "vllm_maxlen: 4096\n")
    cfg = load_config(path, {})
    assert (cfg.model, cfg.method, cfg.output) == ("m", "sft", "o")
    err = capsys.readouterr().err
    assert "passing over infer_backend, export_dir, export_size, vllm_maxlen: LLaMA-Factory's export" in err, err


@pytest.mark.parametrize("text, says", [
    ("attn_implementation: sage\n", "attn_implementation 'sage': qlora computes attention exactly"),
    ("attn_implementation: kernels-community/vllm-flash-attn3\n", "set it to sdpa"),
    ("plugins:\n  - axolotl.integrations.kd.KDPlugin\n", "plugins axolotl.integrations.kd.KDPlugin: an axolotl"),
    ("attn_implementation: [sdpa]\n", "attn_implementation ['sdpa']"),  # not a name: refused, not a crash
    ("plugins:\n  - {name: x}\n", "plugins {'name': 'x'}: an axolotl"),
])
def test_axolotl_keys_that_change_the_maths_are_refused_by_line(tmp_path, capsys, text, says):
    path = tmp_path / "run.yaml"
    path.write_text("base_model: m\noutput_dir: o\nadapter: lora\ndatasets: [d.jsonl]\n" + text)
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{path} line 5" in err and says in err and "Traceback" not in err, err


def test_the_axolotl_lora_kernels_example_trains(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"{2 * i}"} for i in range(8)]
    (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = _local("axolotl_llama-3_lora-1b-kernels.yml", tmp_path, model=str(tiny_model_dir), data="./alpaca.jsonl")
    assert main(["train", str(path), "--max-steps", "2", "--seq-len", "256", "--no-progress"]) == 0
    saved = (tmp_path / "out" / "config.yaml").read_text()
    assert "quant: none" in saved and "optim: adamw_8bit" in saved
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
