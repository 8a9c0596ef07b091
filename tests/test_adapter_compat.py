"""Adapters stay clean for PEFT and readable by qlora across versions; runs end with a checkpoint."""

from __future__ import annotations

import json
import warnings

import torch

import qlora
from qlora.cli.main import main


def _peft_warnings(adapter, tiny_model_dir) -> list[str]:
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PeftConfig.from_pretrained(str(adapter))
        PeftModel.from_pretrained(base, str(adapter))
    return [str(w.message) for w in caught if "peft" in (w.filename or "") or "Unexpected keyword" in str(w.message)]


def test_peft_loads_our_adapter_without_warnings_and_old_adapters_still_load(tmp_path, tiny_model_dir, caplog):
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=4, dropout=0.0)
    adapter = qlora.save_adapter(model, tmp_path / "a")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert not [k for k in cfg if k.startswith("qlora")]
    assert _peft_warnings(adapter, tiny_model_dir) == []

    # An adapter from before the side file: qlora's keys inside adapter_config.json. PEFT warns about
    # them (the reason they moved out); qlora loads it silently and still reads its format version.
    old = tmp_path / "old"
    old.mkdir()
    (old / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    (old / "adapter_config.json").write_text(json.dumps(cfg | {"qlora_version": "0.1.0", "qlora_format_version": 1}))
    assert any("Unexpected keyword" in w for w in _peft_warnings(old, tiny_model_dir))
    fresh, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    with caplog.at_level("WARNING", logger="qlora"):
        qlora.load_adapter(fresh, old)
    assert "unknown adapter config keys" not in caplog.text
    assert qlora.model.adapter_io.read_adapter_config(old)["qlora_format_version"] == 1


def test_trained_adapter_records_an_absolute_base_and_a_final_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of the data"}) + "\n" for i in range(6)))
    monkeypatch.chdir(tiny_model_dir.parent)
    out = tmp_path / "run"
    # --save-steps 0 (the default): no checkpoint during training, one for the last step
    assert main(["train", "--model", tiny_model_dir.name, "--data", str(data), "--output", str(out),
                 "--max-steps", "3", "--seq-len", "32", "--no-progress"]) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000003"]
    # with --save-steps 2 of 3: step 2 during training, step 3 at the end
    out2 = tmp_path / "run2"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out2),
                 "--max-steps", "3", "--seq-len", "32", "--no-progress", "--save-steps", "2"]) == 0
    assert sorted(p.name for p in (out2 / "checkpoints").iterdir()) == ["step-0000002", "step-0000003"]
    # a hub id is stored as given
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    model.name_or_path = "org/some-model"
    qlora.add_lora(model, r=2)
    qlora.save_adapter(model, tmp_path / "hub")
    assert json.loads((tmp_path / "hub" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "org/some-model"
