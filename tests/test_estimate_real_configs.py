"""``qlora estimate`` on released models' config.json files (tests/data/model_configs, origins in SOURCES.md):
the features tiny configs miss, counted against the model transformers builds from the same config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora.model.estimate import count_parameters
from qlora.model.load import read_model_config
from qlora.model.quantize import kept_dense_names

CONFIGS = Path(__file__).parent / "data" / "model_configs"


def test_shared_expert_as_wide_as_the_expert_count_is_quantized_not_a_router():
    """Qwen3-Next-80B-A3B: 512 experts and a shared expert 512 wide. Its gate_proj and up_proj have one output
    per expert by coincidence; they are an MLP's layers (4-bit, LoRA targets), not routers. The routers are the
    top-k gate and the one-output shared_expert_gate."""
    config = read_model_config(CONFIGS / "qwen3-next-80b-a3b.json")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    dense = kept_dense_names(model)
    mlp = "model.layers.0.mlp"
    assert {f"{mlp}.shared_expert.{p}" for p in ("gate_proj", "up_proj", "down_proj")}.isdisjoint(dense)
    assert f"{mlp}.shared_expert_gate" in dense

    counts = count_parameters(config)
    assert counts.total_params == sum(p.numel() for p in model.parameters())
    linears = {lin.name: lin for lin in counts.linears}
    for p in ("gate_proj", "up_proj", "down_proj"):
        assert f"{mlp}.shared_expert.{p}" in linears
    head = model.get_output_embeddings()
    routers = {id(m.weight) for n, m in model.named_modules() if n.endswith(("shared_expert_gate", "mlp.gate"))}
    plain = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
                and id(m.weight) not in routers)
    # the fused 3-D expert weights (transformers 5); 4.x's per-expert linears are among the plain ones already
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n and p.dim() == 3)
    # every other linear of the decoder (attention, gated delta-net projections, shared experts) + the experts
    assert counts.quantized_params == plain + experts


def test_multimodal_config_under_its_text_model_type_is_refused_then_counted_when_restored(tmp_path, capsys):
    """MLC's copy of Ministral-3-3B-2512's config.json has the text model's type (``ministral3``) at the top,
    beside the nested text and vision configs: transformers keeps ``text_config`` a dict and the model's
    __init__ failed with an AttributeError traceback. It is refused by name; with the released top-level type
    (``mistral3``) it is counted as transformers builds it, the Pixtral tower and projector 16-bit."""
    from transformers import AutoModelForImageTextToText
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from qlora.cli.main import main

    if "ministral3" not in CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no 'ministral3' (Ministral 3) models")
    source = CONFIGS / "ministral-3-3b-2512-mlc.json"
    assert main(["estimate", str(source)]) == 2
    assert "takes no text_config" in capsys.readouterr().err

    fixed = json.loads(source.read_text()) | {"model_type": "mistral3"}
    (tmp_path / "config.json").write_text(json.dumps(fixed))
    assert main(["estimate", str(tmp_path)]) == 0
    config = read_model_config(tmp_path)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    counts = count_parameters(config)
    assert counts.total_params == sum(p.numel() for p in model.parameters())
    text = model.model.language_model
    assert counts.quantized_params == sum(m.weight.numel() for m in text.modules() if isinstance(m, torch.nn.Linear))


def test_a_projector_that_is_one_linear_layer_stays_16bit_and_is_not_adapted():
    """Llama 3.2 Vision's multi_modal_projector is a bare nn.Linear (7680 -> 4096) beside the vision tower. Towers
    were matched by the paths under them only, so this one was quantized and adapted by all-linear like a text
    layer (the estimate counted its 31.5M weights 4-bit). It stays 16-bit, as the vision tower does."""
    from transformers import AutoModelForImageTextToText

    from qlora.model.inject import target_paths

    config = read_model_config(CONFIGS / "llama-3.2-11b-vision.json")
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert type(model.model.multi_modal_projector) is torch.nn.Linear
    assert "model.multi_modal_projector" in kept_dense_names(model)
    assert "model.multi_modal_projector" not in target_paths(model, "all-linear")

    counts = count_parameters(config)
    assert counts.total_params == sum(p.numel() for p in model.parameters())
    text = model.model.language_model
    assert counts.quantized_params == sum(m.weight.numel() for m in text.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("model_type, near", [("qwen3-moe", "qwen3_moe"), ("kimi_k3_future", None)])
def test_a_model_type_transformers_lacks_is_named_whole_with_what_to_do(tmp_path, capsys, model_type, near):
    """A config.json naming an architecture this transformers does not have (a model newer than it, or a misspelt
    type) was refused with transformers' own message cut at 300 characters, mid-word in its advice
    ("pip install --upgrade tra)"). It names the type, the installed transformers and what to do, whole."""
    import transformers

    from cli_exit import cli_exit

    config = json.loads((CONFIGS / "qwen3-next-80b-a3b.json").read_text()) | {"model_type": model_type}
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, stderr = cli_exit(["estimate", str(tmp_path)], capsys)
    assert code == 2 and "Traceback" not in stderr, stderr
    message = " ".join(stderr.split())
    assert f"model_type {model_type!r}" in message and transformers.__version__ in message
    assert message.endswith("converted to one that transformers implements."), message
    assert "pip install -U transformers" in message
    assert (f"it has {near!r}" in message) == (near is not None)


def test_a_cached_hub_config_of_a_type_transformers_lacks_is_not_called_unfetched(tmp_path, monkeypatch, capsys):
    """``qlora estimate ORG/NAME`` whose config.json came from the hub (here its cache) but names a model_type this
    transformers lacks said the config "could not be fetched from the hub"; it was fetched, and its type is named."""
    import huggingface_hub.constants
    import transformers.utils.hub

    from cli_exit import cli_exit

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--newer" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--org--newer" / "refs").mkdir()
    (cache / "models--org--newer" / "refs" / "main").write_text("0" * 40)
    config = json.loads((CONFIGS / "qwen3-next-80b-a3b.json").read_text()) | {"model_type": "qwen9_next"}
    (snapshot / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import, from the env
    if hasattr(transformers.utils.hub, "TRANSFORMERS_CACHE"):  # transformers 4.x's own copy, also read at import
        monkeypatch.setattr(transformers.utils.hub, "TRANSFORMERS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, stderr = cli_exit(["estimate", "--model", "org/newer"], capsys)
    message = " ".join(stderr.split())
    assert code == 2 and "Traceback" not in stderr, stderr
    assert "--model org/newer: " in message and "model_type 'qwen9_next'" in message, message
    assert "could not be fetched" not in message


def test_kimi_k2_shipping_deepseek_v3_code_is_refused_with_the_type_that_builds_it(tmp_path, capsys):
    """Kimi K2's config.json says model_type ``kimi_k2`` (no transformers class) and ships DeepSeek-V3's code
    (``configuration_deepseek.DeepseekV3Config``). The refusal names the way out that keeps the model: transformers'
    own ``deepseek_v3``, whose build with that one field changed is the model transformers counts."""
    from transformers import AutoModelForCausalLM

    from cli_exit import cli_exit

    kimi = {  # moonshotai/Kimi-K2-Instruct's shape fields (2 of its 61 layers, to stay fast)
        "model_type": "kimi_k2", "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                                              "AutoModel": "modeling_deepseek.DeepseekV3Model",
                                              "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
        "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 2, "num_attention_heads": 64, "num_key_value_heads": 64, "q_lora_rank": 1536,
        "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 384, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 1,
        "n_group": 1, "topk_group": 1, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(kimi))
    code, stderr = cli_exit(["estimate", str(tmp_path)], capsys)
    message = " ".join(stderr.split())
    assert code == 2 and "Traceback" not in stderr and "modeling_deepseek.py" in message, stderr
    assert "\"model_type\": \"deepseek_v3\"" in message, message

    (tmp_path / "config.json").write_text(json.dumps(kimi | {"model_type": "deepseek_v3"}))
    config = read_model_config(tmp_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert count_parameters(config).total_params == sum(p.numel() for p in model.parameters())
