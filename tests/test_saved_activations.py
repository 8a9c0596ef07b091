"""The activation row of ``qlora estimate``, measured on ``meta``, against what autograd saves in a real forward:
a plain bf16 model (full fine-tuning) and the same model quantized with LoRA adapters as qlora trains it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qlora.model.estimate import (
    TrainingOptions, activation_bytes, count_parameters, estimate, measured_activation_bytes, select_targets,
)
from qlora.model.inject import add_lora
from qlora.model.quantize import quantize_model
from qlora.model.saved_activations import NotMeasurable, measure

SIZES = dict(vocab_size=300, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512,
             num_hidden_layers=2, pad_token_id=0)
FAMILIES = {
    "llama": {},
    "gemma3_text": dict(head_dim=64),  # four norms a layer
    "qwen3": dict(head_dim=64),  # q/k norms
    "olmo2": {},  # norms after attention and MLP, q/k norms over all heads
    # DeepSeek-V3's latent attention, a dense then a MoE layer; q/k heads as wide as v heads, so that PyTorch's CPU
    # flash kernel runs (with other widths it falls back to the math path, which keeps the L x L scores)
    "deepseek_v3": dict(num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16,
                        qk_nope_head_dim=16, v_head_dim=32, moe_intermediate_size=128, n_routed_experts=8,
                        num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1),
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "phi3": {},  # fused qkv and gate_up projections
    "gpt_neox": dict(num_key_value_heads=4),  # LayerNorm, parallel attention and MLP
    "llama4_text": dict(intermediate_size_mlp=1024, num_local_experts=4, num_experts_per_tok=1,
                        interleave_moe_layer_step=2, head_dim=64),  # a dense layer then a MoE layer
}
TOKENS = 128
RANK = 16
_V5 = __import__("importlib").util.find_spec("transformers.conversion_mapping") is not None
# transformers 4.x's experts are a list of per-expert MLPs run by a loop over the routed tokens (torch.nonzero,
# torch.where on the routing), which meta tensors cannot run: the estimate takes its formula there
_PER_EXPERT_LOOPS = {"deepseek_v3", "mixtral"}


def _config(model_type: str):
    return AutoConfig.for_model(model_type, **{**SIZES, **FAMILIES[model_type]})


def _saved_per_token(config, qlora: bool) -> float:
    """Bytes of the distinct storages autograd saves in the decoder's bf16 forward (weights left out), per token."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    if qlora:  # as qlora train adapts it; the adapters in bf16, as autocast runs them on a GPU
        quantize_model(model)
        add_lora(model, r=RANK, dropout=0.0, dtype=torch.bfloat16, verbose=False)
    held = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}
    alive: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        alive.append(t)
        return t

    x = torch.randn(1, TOKENS, config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model.get_decoder()(inputs_embeds=x, use_cache=False)
    return sum(n for ptr, n in saved.items() if ptr not in held) / TOKENS


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_measured_layers_save_what_autograd_saves(model_type):
    """Within 10% of a real forward, fully trained and with QLoRA adapters, for the families the Llama-block
    formula missed (fully trained: Gemma 3 0.56x, Llama 4 0.64x, OLMo 2 0.71x, Qwen3 0.83x of these forwards;
    with QLoRA it overcounted frozen norms, Llama 1.15x, MoE loops up to 1.29x).
    Phi-3 and GPT-NeoX come out a few percent under: PyTorch's CPU flash kernel returns its output laid out
    ``(B, H, L, D)``, so the output projection saves a transposed copy, which the GPU kernels' layout avoids."""
    if not _V5 and model_type in _PER_EXPERT_LOOPS:
        pytest.skip("transformers 4.x runs these experts in a per-expert loop over the routed tokens, which has no "
                    "meta forward")
    config = _config(model_type)
    targets = tuple(lin.name for lin in select_targets(count_parameters(config), None))
    saves = measure(config, model_type, targets, RANK)
    for measured, real in ((sum(saves.full) + saves.outside_full, _saved_per_token(config, qlora=False)),
                           (sum(saves.adapted) + saves.outside_adapted, _saved_per_token(config, qlora=True))):
        assert abs(measured - real) / real < 0.10, (model_type, measured, real)


def test_the_estimate_reads_the_measured_layers():
    """Without checkpointing, the activation row is every layer's measured saves, what outside the layers saves
    and the MLP's backward transients; with it, each layer's input and the largest layer's saves."""
    config = _config("gemma3_text")
    targets = select_targets(count_parameters(config), None)
    saves = measure(config, "gemma3_text", tuple(lin.name for lin in targets), RANK)
    for gc in (False, True):
        opts = TrainingOptions(seq_len=64, gradient_checkpointing=gc, rank=RANK)
        est = estimate(config, opts)
        row = dict(est.rows)[f"activations (checkpointing {'on' if gc else 'off'})"]
        assert row["QLoRA"] == measured_activation_bytes(config, opts, saves, adapted=True)
        assert row["full fine-tuning"] == measured_activation_bytes(config, opts, saves, adapted=False)
        assert any("measured by a forward pass on the meta device" in note for note in est.notes)
        kept = (len(saves.adapted) * 2 * config.hidden_size + max(saves.adapted)) if gc else sum(saves.adapted)
        transient = 4 * config.intermediate_size
        assert row["QLoRA"] == int(64 * (kept + saves.outside_adapted + transient))
    # the formula it replaces missed Gemma 3's norms
    no_gc = TrainingOptions(seq_len=64, gradient_checkpointing=False, rank=RANK)
    assert activation_bytes(config, no_gc, 0) < 0.8 * measured_activation_bytes(config, no_gc, saves, adapted=False)


def test_a_model_that_cannot_run_on_meta_falls_back_to_the_formula_and_says_so():
    """JetMoE's parallel experts (inputs sorted by expert, sizes per expert) have no stand-in on meta (transformers
    4.x's JetMoE does not even take an attention registered by name)."""
    config = AutoConfig.for_model("jetmoe", vocab_size=300, hidden_size=64, num_hidden_layers=2,
                                  num_key_value_heads=2, kv_channels=16, intermediate_size=128, num_local_experts=4,
                                  num_experts_per_tok=2)
    why = "layout of their own" if _V5 else "not built with a swappable attention"
    with pytest.raises(NotMeasurable, match=why):
        measure(config, "jetmoe", (), RANK)
    opts = TrainingOptions(seq_len=64, gradient_checkpointing=False)
    est = estimate(config, opts)
    targets = select_targets(count_parameters(config), None)
    per_layer = len(targets) / config.num_hidden_layers
    assert dict(est.rows)["activations (checkpointing off)"]["QLoRA"] == activation_bytes(config, opts, per_layer)
    assert any("from a formula of a Llama block" in note and why in note for note in est.notes)


def test_layers_a_text_forward_skips_count_as_the_largest():
    """Llama 3.2 Vision's cross-attention layers (tests/data/model_configs) run only with images: on text alone they
    save nothing, and the estimate counts them as the largest layer measured rather than as free."""
    from pathlib import Path

    from qlora.model.estimate import load_config

    config = load_config(str(Path(__file__).parent / "data" / "model_configs" / "llama-3.2-11b-vision.json"))
    cross = config.text_config.cross_attention_layers
    saves = measure(config, "llama-3.2-11b-vision", (), RANK)
    assert len(saves.full) == config.text_config.num_hidden_layers
    for per_layer in (saves.full, saves.adapted):
        assert all(per_layer[i] == max(per_layer) for i in cross)
        assert min(per_layer) > 0
