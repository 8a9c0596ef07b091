"""AdaLoRA on a 4-bit base against PEFT's AdaLoRA (forward, penalty, rank allocation, files)."""

from __future__ import annotations

import json

import torch

import qlora
from qlora.model.adalora import AdaLoraHooks, adalora_layers, add_adalora, orth_regularization
from test_model_api import IDS, _dequantized_reference

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _ours(model_dir, **kw):
    model, _ = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    add_adalora(model, **{"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 1, "total_step": 6, "alpha": 8.0,
                          "target_modules": TARGETS, **kw})
    return model


def _peft(model_dir, model, **kw):
    from peft import AdaLoraConfig, get_peft_model

    cfg = AdaLoraConfig(**{"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 1, "total_step": 6, "lora_alpha": 8,
                           "target_modules": TARGETS, **kw})
    return get_peft_model(_dequantized_reference(model_dir, model), cfg)


def _copy_to_peft(model, pm) -> None:
    """Our A, B, E (made non-trivial) into PEFT's model."""
    theirs = dict(pm.base_model.model.named_parameters())
    with torch.no_grad():
        for path, layer in adalora_layers(model).items():
            torch.nn.init.normal_(layer.E, std=0.5)
            for kind in ("A", "B", "E"):
                theirs[f"{path}.lora_{kind}.default"].copy_(getattr(layer, kind))


def test_forward_and_orth_penalty_equal_peft(tiny_model_dir):
    model = _ours(tiny_model_dir)
    pm = _peft(tiny_model_dir, model)
    _copy_to_peft(model, pm)
    torch.testing.assert_close(model(IDS).logits, pm(IDS).logits, rtol=1e-5, atol=1e-5)
    plain = pm.base_model.model(input_ids=IDS, labels=IDS).loss
    penalty_peft = (pm.base_model(input_ids=IDS, labels=IDS).loss - plain) / 0.5
    torch.testing.assert_close(orth_regularization(model), penalty_peft, rtol=1e-5, atol=1e-6)


def test_rank_allocator_masks_like_peft_and_reaches_target(tiny_model_dir):
    model = _ours(tiny_model_dir)
    pm = _peft(tiny_model_dir, model)
    _copy_to_peft(model, pm)
    hooks = AdaLoraHooks(model)
    theirs = dict(pm.base_model.model.named_parameters())
    layers = adalora_layers(model)
    g = torch.Generator().manual_seed(3)
    for step in range(6):
        with torch.no_grad():  # identical params and gradients on both sides
            for path, layer in layers.items():
                for kind in ("A", "B", "E"):
                    p, q = getattr(layer, kind), theirs[f"{path}.lora_{kind}.default"]
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
                    q.copy_(p)
                    p.grad = torch.randn(p.shape, generator=g)
                    q.grad = p.grad.clone()
        hooks.after_step(step)
        pm.base_model.update_and_allocate(step)
        for path, layer in layers.items():
            torch.testing.assert_close(layer.E, theirs[f"{path}.lora_E.default"], rtol=0, atol=0)
    peft_pattern = pm.peft_config["default"].rank_pattern
    assert hooks.config.rank_pattern == {k.rsplit(".lora_E", 1)[0]: v for k, v in peft_pattern.items()}
    assert sum(hooks.allocator.ranks().values()) == 2 * len(layers)
    schedule = [hooks.allocator.budget_schedule(s)[0] for s in range(7)]
    assert schedule[0] == schedule[1] == 6 * len(layers) and schedule[5] == schedule[6] == 2 * len(layers)
    assert schedule == sorted(schedule, reverse=True)


def test_peft_round_trips(tmp_path, tiny_model_dir):
    from peft import PeftModel

    model = _ours(tiny_model_dir)
    hooks = AdaLoraHooks(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(6):
        loss = model(IDS, labels=IDS).loss + hooks.extra_loss()
        loss.backward()
        opt.step()
        hooks.after_step(step)
        opt.zero_grad()
    model.eval()
    qlora.save_adapter(model, tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["init_r"] == 6 and cfg["target_r"] == 2
    assert sum(sum(v) for v in cfg["rank_pattern"].values()) == 2 * len(adalora_layers(model))
    ours = model(IDS).logits
    peft_model = PeftModel.from_pretrained(_dequantized_reference(tiny_model_dir, model), tmp_path / "ours")
    torch.testing.assert_close(peft_model(IDS).logits, ours, rtol=1e-5, atol=1e-5)

    # PEFT -> qlora: a trained, pruned PEFT AdaLoRA adapter loads with the same logits.
    pm = _peft(tiny_model_dir, model, target_modules=["k_proj", "o_proj"])
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for step in range(6):
        pm(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.eval()
    pm.save_pretrained(tmp_path / "theirs")
    theirs = pm(IDS).logits
    model2, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(model2, tmp_path / "theirs")
    torch.testing.assert_close(model2(IDS).logits, theirs, rtol=1e-5, atol=1e-5)
    qlora.save_adapter(model2, tmp_path / "again")  # a loaded, shrunk adapter saves the same pattern
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())["rank_pattern"]
    assert again == json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())["rank_pattern"]


def test_train_cli_with_adalora_trains_and_reports_final_ranks(tmp_path, tiny_model_dir, capsys):
    from qlora.cli.main import main

    rows = [{"text": f"The quick brown fox number {i} jumps over the lazy dog."} for i in range(8)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--optim", "adamw",
            "--lr", "1e-2", "--max-steps", "30", "--batch-size", "4", "--seq-len", "32", "--no-progress",
            "--target-modules", "q_proj,v_proj", "--dropout", "0", "--adalora", "--adalora-init-r", "6",
            "--adalora-target-r", "2", "--adalora-tinit", "5", "--adalora-tfinal", "10", "--adalora-delta-t", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert "AdaLoRA ranks (total 8, budget 8)" in printed.out + printed.err
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("split") == "train"]
    assert sum(losses[-5:]) < 0.9 * sum(losses[:5])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "ADALORA" and cfg["total_step"] == 30 and cfg["tinit"] == 5 and cfg["deltaT"] == 2
    assert sum(sum(v) for v in cfg["rank_pattern"].values()) == 2 * 4
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(model, out)
    assert sum(layer.A.shape[0] for layer in adalora_layers(model).values()) == 8


def test_merge_folds_adalora_and_reloads_in_plain_transformers(tmp_path, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = _ours(tiny_model_dir)
    with torch.no_grad():
        for layer in adalora_layers(model).values():
            torch.nn.init.normal_(layer.E, std=0.5)
    model.eval()
    expected = model(IDS).logits
    merged = qlora.merge(model, into="dequantized", dtype=torch.float32)
    assert not adalora_layers(merged)
    qlora.save_merged(merged, tmp_path / "m", tokenizer=tiny_tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    torch.testing.assert_close(plain(IDS).logits, expected, rtol=1e-4, atol=1e-4)


def test_adalora_with_a_module_saved_whole_loads_as_peft_and_alone(tmp_path, tiny_model_dir):
    """A PEFT AdaLoRA adapter that trained lm_head whole gives PEFT's logits; its head is written into the base
    in place, so beside a LoRA adapter it is refused in either order, naming the module and what to do."""
    import pytest

    from qlora.errors import UsageError
    from random_adapters import save_random_peft_adapter

    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    pm = _peft(tiny_model_dir, model, modules_to_save=["lm_head"])
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    pm.eval().save_pretrained(tmp_path / "ada")
    save_random_peft_adapter(tiny_model_dir, tmp_path / "plain", 0, r=2, target_modules=["v_proj"])
    qlora.load_adapter(model, tmp_path / "ada", adapter_name="ada")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS).logits, pm(IDS).logits, rtol=1e-5, atol=1e-5)
    for first, second in (("ada", "plain"), ("plain", "ada")):
        model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
        qlora.load_adapter(model, tmp_path / first, adapter_name=first)
        with pytest.raises(UsageError, match=r"lm_head whole \(modules_to_save\).*Load that adapter on its own"):
            qlora.load_adapter(model, tmp_path / second, adapter_name=second)
