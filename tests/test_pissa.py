"""PiSSA and OLoRA inits against PEFT's, QPiSSA on a 4-bit base, and the adapter converted for the original model."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file

import qlora
from qlora.errors import UsageError
from qlora.model.inject import lora_layers
from qlora.nn import Linear4bit, LoraLinear
from qlora.train.config import load_config
from qlora.train.trainer import Trainer

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64], [5, 6, 7, 8, 9, 10, 11, 12]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _dense(model_dir):
    model, _ = qlora.load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    return model


def _ours(model_dir, init, seed=0, **kw):
    model = _dense(model_dir)
    torch.manual_seed(seed)
    return qlora.add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=TARGETS, init=init, verbose=False, **kw)


def _peft(model_dir, init, seed=0, **kw):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    return get_peft_model(ref, LoraConfig(**dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS,
                                                 init_lora_weights=init) | kw))


def _params(model, prefix=""):
    return {k[len(prefix):].replace(".default", ""): v.detach() for k, v in model.named_parameters()
            if k.startswith(prefix)}


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_init_equals_peft_init_and_keeps_the_outputs(tiny_model_dir, init):
    model = _ours(tiny_model_dir, init)
    ours, theirs = _params(model), _params(_peft(tiny_model_dir, init), "base_model.model.")
    assert ours.keys() == theirs.keys()
    for key in ours:  # A, B and the residual base weights alike (BLAS sums may round differently per buffer)
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-5, msg=key)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.lora_B["default"].weight.abs().sum() > 0  # the adapter is not zero: the base gave it its part
    torch.testing.assert_close(model(IDS).logits, _dense(tiny_model_dir)(IDS).logits, rtol=1e-5, atol=1e-5)


def test_randomized_pissa_depends_on_the_seed_as_peft_does(tiny_model_dir):
    """Without subspace iterations the random start shows: PEFT's result is seed-dependent, and ours draws the
    same numbers from torch's generator."""
    a = _params(_ours(tiny_model_dir, "pissa_niter_0", seed=0))
    b = _params(_ours(tiny_model_dir, "pissa_niter_0", seed=1))
    theirs = _params(_peft(tiny_model_dir, "pissa_niter_0", seed=1), "base_model.model.")
    for key in [k for k in a if ".lora_" in k]:
        assert not torch.allclose(a[key], b[key], rtol=1e-2, atol=1e-3), key
        torch.testing.assert_close(b[key], theirs[key], rtol=1e-4, atol=1e-5, msg=key)


@torch.no_grad()
def _train_in_place(model, seed=3):
    """Stand-in for training: move every A and B by the same seeded amounts."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if ".lora_" in name:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("init, rslora", [("pissa", False), ("olora", True)])
def test_saved_adapter_is_peft_conversion_and_works_on_the_original_model(tmp_path, tiny_model_dir, init, rslora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = _ours(tiny_model_dir, init, rslora=rslora)
    peft_model = _peft(tiny_model_dir, init, use_rslora=rslora)
    peft_model.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter, before training
    peft_model.save_pretrained(tmp_path / "peft-init")
    peft_model.peft_config["default"].init_lora_weights = init
    _train_in_place(model)
    _train_in_place(peft_model)
    trained = model(IDS).logits
    qlora.save_adapter(model, tmp_path / "ours")
    peft_model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "peft-init"))
    ours, theirs = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "peft"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    config, peft_config = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (
        peft_config["r"], peft_config["lora_alpha"], True) and config["r"] == 8
    # on the original 16-bit model, with qlora and with PEFT, the converted adapter gives the trained outputs
    again = qlora.load_adapter(_dense(tiny_model_dir), tmp_path / "ours")
    torch.testing.assert_close(again(IDS).logits, trained, rtol=1e-4, atol=1e-4)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                       tmp_path / "ours")
    torch.testing.assert_close(loaded(IDS).logits, trained, rtol=1e-4, atol=1e-4)
    qlora.save_adapter(model, tmp_path / "raw", convert=False)  # as trained: PEFT's plain save_pretrained
    raw = json.loads((tmp_path / "raw" / "adapter_config.json").read_text())
    assert (raw["r"], raw["init_lora_weights"]) == (4, init)


def _low_rank_weights(model, rank=4, seed=0):
    """Trained weights have a few large directions (random ones have none, and nothing for PiSSA to find)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.out_features != model.config.vocab_size:
                out_f, in_f = module.weight.shape
                w = torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g) / rank
                module.weight.copy_(w + 0.02 * torch.randn(out_f, in_f, generator=g))
    return model


@torch.no_grad()
def test_qpissa_base_is_closer_to_the_16bit_model_than_plain_nf4(tiny_model_dir):
    dense = _low_rank_weights(_dense(tiny_model_dir))
    expected = dense(IDS).logits
    plain = copy.deepcopy(dense)
    qlora.quantize_model(plain, compute_dtype=torch.float32)
    qpissa = copy.deepcopy(dense)
    qlora.add_lora(qpissa, r=4, alpha=8, dropout=0.0, target_modules="all-linear", init="pissa", verbose=False)
    qlora.quantize_model(qpissa, compute_dtype=torch.float32, skip_modules=("lm_head", r".*\.lora_[AB]\..*"))
    assert isinstance(qpissa.get_submodule("model.layers.0.self_attn.q_proj").base_layer, Linear4bit)
    plain_error = float((plain(IDS).logits - expected).norm())
    qpissa_error = float((qpissa(IDS).logits - expected).norm())
    print(f"\nlogit error vs the 16-bit model: plain NF4 {plain_error:.4f}, QPiSSA r=4 {qpissa_error:.4f}")
    assert qpissa_error < 0.5 * plain_error


def _data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"The sky is blue and the grass is green {i}."}) + "\n"
                            for i in range(6)))
    return path


def _config(tmp_path, model_dir, out, **kw):
    base = dict(model=str(model_dir), data=str(_data(tmp_path)), output=str(tmp_path / out), optim="adamw",
                lr=1e-2, max_steps=8, batch_size=2, progress=False, seq_len=32, init="pissa_niter_2", rank=4,
                target_modules="q_proj,v_proj,down_proj")
    return load_config(None, base | kw)


def test_qpissa_training_lowers_the_loss_and_its_adapter_loads_on_the_original(tmp_path, tiny_model_dir):
    trainer = Trainer(_config(tmp_path, tiny_model_dir, "out", max_steps=20))
    losses = trainer.run()
    assert sum(losses[-4:]) / 4 < 0.95 * sum(losses[:4]) / 4
    layer = trainer.model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer.base_layer, Linear4bit)  # the residual was quantized
    out = tmp_path / "out"
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (8, True) and not (out / "loftq-base").exists()
    # layer by layer, the converted adapter on the 16-bit original is the trained layer with its 4-bit residual
    # replaced by the 16-bit one, W - s B0 A0: it differs from the trained model by that rounding only
    original = qlora.load_adapter(_dense(tiny_model_dir), out)
    for path, layer in lora_layers(trainer.model).items():
        w = _dense_weight(tiny_model_dir, path)
        a0, b0 = layer.initial_factors["default"]
        residual = w - layer.specs["default"].scaling * b0 @ a0
        rounding = residual - layer.base_weight()
        assert float(rounding.norm()) < 0.2 * float(residual.norm())  # the base holds the quantized residual
        torch.testing.assert_close(original.get_submodule(path).merged_weight(["default"]),
                                   layer.merged_weight(["default"]) + rounding, rtol=1e-5, atol=1e-5)


def _dense_weight(model_dir, path):
    return _dense(model_dir).get_submodule(path).weight.detach()


def test_16bit_pissa_run_saves_an_adapter_exact_on_the_original(tmp_path, tiny_model_dir):
    trainer = Trainer(_config(tmp_path, tiny_model_dir, "out", quant="none", init="pissa", max_steps=3))
    trainer.run()
    trainer.model.eval()
    again = qlora.load_adapter(_dense(tiny_model_dir), tmp_path / "out")
    torch.testing.assert_close(again(IDS).logits, trainer.model(IDS).logits, rtol=1e-4, atol=1e-4)


def test_resume_recomputes_the_init_from_the_original_and_reproduces_the_losses(tmp_path, tiny_model_dir):
    kw = dict(save_steps=4, dropout=0.1)
    full = Trainer(_config(tmp_path, tiny_model_dir, "full", **kw)).run()
    first = Trainer(_config(tmp_path, tiny_model_dir, "part", **kw))
    first.setup()
    first.total_steps = 4  # stop as if killed right after the step-4 checkpoint
    first.train()
    first.cleanup()
    saved = json.loads((tmp_path / "part" / "checkpoints" / "step-0000004" / "adapter" / "adapter_config.json"
                        ).read_text())
    assert saved["r"] == 8  # checkpoints hold the converted adapter too: usable on the original model
    resumed = Trainer(_config(tmp_path, tiny_model_dir, "part", resume=True, **kw)).run()
    assert resumed == full  # bit-identical on CPU


def test_what_does_not_compose_is_refused(tiny_model_dir):
    dense = _dense(tiny_model_dir)
    cases = [
        (dict(init="pissa", use_dora=True), "does not combine with DoRA"),
        (dict(init="olora", lora_bias=True), "does not combine with lora_bias"),
        (dict(init="pissa_niter_x"), "unknown init 'pissa_niter_x'"),
        (dict(init="pissa", target_modules=["embed_tokens"]), "is a token embedding"),
        (dict(init="pissa", r=512), "at most"),
        (dict(init="olora", target_parameters=["mlp.experts.gate_up_proj"]), "target_parameters"),
    ]
    for kw, message in cases:
        with pytest.raises(UsageError, match=re.escape(message)):
            qlora.add_lora(copy.deepcopy(dense), **({"r": 4, "target_modules": TARGETS} | kw))
    q4, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match="needs the 16-bit base weights, and this layer is already 4-bit"):
        qlora.add_lora(q4, r=4, target_modules=TARGETS, init="pissa")
    qlora.add_lora(dense, r=4, target_modules=["q_proj"])
    with pytest.raises(UsageError, match="first adapter"):
        qlora.add_lora(dense, r=4, target_modules=["q_proj"], init="olora", adapter_name="second")
    with pytest.raises(UsageError, match="holds the residual W - s B0 A0 of the 'default' adapter"):
        qlora.add_lora(_ours(tiny_model_dir, "pissa"), r=4, target_modules=["v_proj"], adapter_name="second")
    for kw, message in [(dict(init="pissa", dora=True), "does not combine with --dora"),
                        (dict(init="pissa_niter_-1"), "--init must be one of")]:
        with pytest.raises(UsageError, match=re.escape(message)):
            load_config(None, {"model": "m", "data": "d", "output": "o"} | kw)


def test_a_tied_output_head_is_refused(tmp_path, tiny_tokenizer):
    from qlora.model.tiny import build_tiny_model

    tied = build_tiny_model(tmp_path / "tied", tokenizer=tiny_tokenizer, arch="llama", tie_word_embeddings=True)
    model = _dense(tied)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(UsageError, match="shares its weight with model.embed_tokens"):
        qlora.add_lora(model, r=4, target_modules=["lm_head"], init="pissa")


def test_deleting_the_adapter_gives_the_base_its_weights_back(tiny_model_dir):
    model = _ours(tiny_model_dir, "olora")
    original = _dense(tiny_model_dir).get_submodule("model.layers.0.self_attn.q_proj").weight
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert not torch.allclose(layer.base_layer.weight, original, atol=1e-3)
    layer.delete_adapter("default")
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=1e-5, atol=1e-5)
    assert isinstance(layer, LoraLinear) and not layer.initial_factors


@pytest.mark.parametrize("keys, init", [("pissa_init: true\n", "pissa_niter_16"),
                                        ("pissa_init: true\npissa_iter: -1\npissa_convert: true\n", "pissa"),
                                        ("pissa_init: true\npissa_iter: 4\n", "pissa_niter_4"),
                                        ("pissa_init: false\npissa_iter: 4\n", "kaiming")])
def test_llama_factory_pissa_keys(tmp_path, keys, init):
    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: m\ndataset: d\noutput_dir: o\nstage: sft\nquantization_bit: 4\n" + keys)
    cfg = load_config(path, {})
    assert (cfg.init, cfg.quant) == (init, "nf4")


def test_llama_factory_pissa_convert_false_is_said_to_save_converted(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: m\ndataset: d\noutput_dir: o\nstage: sft\npissa_init: true\n"
                    "pissa_convert: false\n")
    assert load_config(path, {}).init == "pissa_niter_16"
    assert "line 6: pissa_convert false: qlora writes the PiSSA adapter converted" in capsys.readouterr().err


@pytest.mark.parametrize("rslora", [False, True])
def test_converted_adapter_with_rank_and_alpha_patterns_loads_in_peft(tmp_path, tiny_model_dir, rslora):
    """PEFT refuses this conversion with rsLoRA and patterns; ours scales the patterns' alphas by sqrt 2 then."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = _ours(tiny_model_dir, "pissa", rslora=rslora, rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 4})
    _train_in_place(model)
    trained = model(IDS).logits
    qlora.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"v_proj": 4}
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                       tmp_path / "ours")
    torch.testing.assert_close(loaded(IDS).logits, trained, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_peft_adapter_is_split_again_as_peft_loads_it(tmp_path, tiny_model_dir, init, capsys):
    """PEFT's plain save_pretrained keeps init_lora_weights 'pissa'/'olora' and the trained A, B for the
    residual base; PEFT loading it splits the original weights again, which gives the trained model back.
    qlora does the same (before, it loaded A, B onto the whole weights: logits off by 0.18); the split is
    of the 16-bit weights, so a quantized base is refused, as are the splits that cannot be redone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora.cli.main import main

    peft_model = _peft(tiny_model_dir, init)
    _train_in_place(peft_model)
    peft_model.save_pretrained(tmp_path / "raw")
    trained = peft_model(IDS).logits
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.testing.assert_close(PeftModel.from_pretrained(original, tmp_path / "raw")(IDS).logits, trained)
    model = qlora.load_adapter(_dense(tiny_model_dir), tmp_path / "raw")
    torch.testing.assert_close(model(IDS).logits, trained, rtol=1e-5, atol=1e-5)
    qlora.save_adapter(model, tmp_path / "converted")  # written back converted: PEFT needs no split for it
    assert json.loads((tmp_path / "converted" / "adapter_config.json").read_text())["init_lora_weights"] is True
    again = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.testing.assert_close(PeftModel.from_pretrained(again, tmp_path / "converted")(IDS).logits, trained,
                               rtol=1e-5, atol=1e-5)
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "raw"), "--output",
                 str(tmp_path / "merged"), "--quant", "none", "--dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(merged(IDS).logits, trained, rtol=1e-5, atol=1e-5)

    capsys.readouterr()  # a 4-bit base (generate's default for a PEFT adapter) no longer has the 16-bit weights
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "raw"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'raw'}: init_lora_weights is {init!r} and the adapter was saved unconverted" in err
    assert "--quant none" in err and "path_initial_model_for_weight_conversion" in err and "Traceback" not in err


@pytest.mark.parametrize("changes, why", [
    ({"init_lora_weights": "pissa_niter_4"}, "randomized SVD.* cannot be rebuilt exactly"),
    ({"init_lora_weights": "corda"}, "calibration data.* cannot be rebuilt exactly"),
    ({"init_lora_weights": "lora_ga"}, "gradients.* cannot be rebuilt exactly"),
    ({"use_dora": True}, "linear layers only, not with DoRA"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "not with LoRA on the embedding model.embed_tokens")])
def test_unconverted_adapter_whose_split_cannot_be_redone_is_refused(tmp_path, tiny_model_dir, changes, why):
    # PiSSA with DoRA as PEFT builds it (its file holds the magnitudes a hand-set use_dora would lack)
    peft_model = _peft(tiny_model_dir, "pissa", target_modules=changes.get("target_modules", TARGETS),
                       use_dora=changes.get("use_dora", False))
    peft_model.save_pretrained(tmp_path / "raw")
    path = tmp_path / "raw" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    with pytest.raises(UsageError, match=rf"raw: init_lora_weights is '.*' and the adapter was saved unconverted.*{why}"
                                         r".*path_initial_model_for_weight_conversion"):
        qlora.load_adapter(_dense(tiny_model_dir), tmp_path / "raw")
