"""axolotl's and LLaMA-Factory's keys of PEFT LoraConfig options (peft_layers_to_transform, peft_init_lora_weights,
peft.loftq_config, lora_target_parameters alone, ...) set what the LoraConfig those tools build sets, checked against
PEFT's own target matching; options without a qlora counterpart are refused naming the file, line and key."""

from __future__ import annotations

import re

import pytest

from qlora.errors import UsageError
from qlora.train.config import load_config
from qlora.train.peft_keys import layer_regex

_AXOLOTL = """base_model: m
adapter: qlora
load_in_4bit: true
output_dir: {out}
datasets:
  - path: {data}
    type: completion
lora_r: 8
lora_alpha: 16
"""
_LLAMA_FACTORY = """model_name_or_path: m
stage: sft
finetuning_type: lora
quantization_bit: 4
dataset: {data}
output_dir: {out}
"""


def _load(tmp_path, head: str, extra: str):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi"}\n')
    path = tmp_path / "c.yaml"
    path.write_text(head.format(out=tmp_path / "out", data=data) + extra)
    return load_config(path, {})


# module paths of real layouts: a decoder's layers, MoE experts under a layer (the expert index second), GPT-2's h,
# a block list holding layers, numbered components next to each other
_KEYS = [f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj")]
_KEYS += ["model.layers.1.mlp.experts.0.w1", "model.layers.0.mlp.experts.1.w1", "transformer.h.2.attn.v_proj",
          "model.blocks.0.layers.1.q_proj", "model.blocks.1.layers.0.q_proj", "model.0.layers.1.q_proj",
          "model.layers.1.2.q_proj", "lm_head", "model.embed_tokens", "q_proj", "layers.1.q_proj"]


@pytest.mark.parametrize("indices, patterns", [([0], []), ([1, 2], []), ([1], ["layers"]), ([0], ["blocks"]),
                                               ([1], ["h", "layers"]), ([0], ["blocks", "layers"])])
def test_layers_to_transform_adapts_the_layers_peft_adapts(indices, patterns):
    """The regex fully matches exactly the module paths PEFT's LoraConfig(target_modules, layers_to_transform,
    layers_pattern) adapts (the first numbered component, or the first pattern's number, is the layer index)."""
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import check_target_module_exists

    names = ["q_proj", "v_proj", "w1"]
    config = peft.LoraConfig(target_modules=names, layers_to_transform=indices, layers_pattern=patterns or None)
    regex = layer_regex(names, indices, patterns)
    for key in _KEYS:
        assert bool(re.fullmatch(regex, key)) == bool(check_target_module_exists(config, key)), key


def test_axolotl_layer_keys_become_a_target_regex(tmp_path):
    cfg = _load(tmp_path, _AXOLOTL, "lora_target_modules: [q_proj, v_proj]\npeft_layers_to_transform: [1]\n"
                                    "peft_layers_pattern: [layers]\n")
    assert re.fullmatch(cfg.target_modules, "model.layers.1.self_attn.q_proj")
    assert not re.fullmatch(cfg.target_modules, "model.layers.0.self_attn.q_proj")
    with pytest.raises(UsageError, match=r"line 11: peft_layers_to_transform with lora_target_linear: true"):
        _load(tmp_path, _AXOLOTL, "lora_target_linear: true\npeft_layers_to_transform: [1]\n")


@pytest.mark.parametrize("extra, init", [("peft_init_lora_weights: gaussian\n", "gaussian"),
                                         ("peft_init_lora_weights: pissa_niter_4\n", "pissa_niter_4"),
                                         ("peft_init_lora_weights: true\n", "kaiming"),
                                         ("peft_init_lora_weights: false\n", "kaiming"),  # axolotl passes it if set
                                         ("peft:\n  loftq_config:\n    loftq_bits: 4\n", "loftq"),
                                         ("peft:\n  loftq_config:\n    loftq_bits: 4\npeft_init_lora_weights: olora\n",
                                          "olora")])  # axolotl applies peft_init_lora_weights after loftq's
def test_axolotl_init_keys_set_the_adapter_init(tmp_path, extra, init):
    assert _load(tmp_path, _AXOLOTL, extra).init == init


def test_axolotl_peft_backend_block_is_the_nf4_base(tmp_path):
    cfg = _load(tmp_path, _AXOLOTL.replace("adapter: qlora\nload_in_4bit: true\n", "adapter: lora\n"),
                "peft:\n  backend: bnb\n  weight_dtype: nf4\n  group_size: 128\n")
    assert (cfg.quant, cfg.blocksize) == ("nf4", 128)
    with pytest.raises(UsageError, match=r"line 10: peft backend 'torchao'"):
        _load(tmp_path, _AXOLOTL, "peft:\n  backend: torchao\n  weight_dtype: int4\n")


def test_axolotl_target_parameters_alone_adapt_the_experts_alone(tmp_path):
    """axolotl's LoraConfig gets target_modules [] beside lora_target_parameters when no module is listed."""
    cfg = _load(tmp_path, _AXOLOTL, "lora_target_parameters: [mlp.experts.gate_up_proj]\n")
    assert (cfg.target_modules, cfg.target_parameters) == ("none", "mlp.experts.gate_up_proj")
    cfg = _load(tmp_path, _AXOLOTL, "lora_target_parameters: [mlp.experts.gate_up_proj]\nlora_target_linear: true\n")
    assert cfg.target_modules == "all-linear"


@pytest.mark.parametrize("head, extra, message", [
    (_AXOLOTL, "peft_layer_replication: [[0, 1]]\n", "peft_layer_replication"),
    (_AXOLOTL, "peft_trainable_token_indices: [5, 6]\n", "add_special_tokens"),
    (_AXOLOTL, "peft_autocast_adapter_dtype: false\n", "float32"),
    (_AXOLOTL, "peft_init_lora_weights: eva\n", "peft_init_lora_weights 'eva'"),
    (_AXOLOTL, "merge_lora: true\n", "qlora merge"),
    (_AXOLOTL, "loraplus_lr_embedding: 1.0e-6\nloraplus_lr_ratio: 16\nlora_target_modules: [q_proj, embed_tokens]\n",
     "loraplus_lr_embedding with LoRA on an embedding"),
    (_LLAMA_FACTORY, "additional_target: embed_tokens,lm_head\n", "modules_to_save"),
    (_LLAMA_FACTORY, "create_new_adapter: true\n", "qlora merge"),
], ids=lambda v: v.split(":")[0].strip() if isinstance(v, str) and not v.startswith(("base_model", "model_name")) else None)
def test_options_without_a_counterpart_are_refused_by_line(tmp_path, head, extra, message):
    line = head.count("\n") + 1
    with pytest.raises(UsageError, match=rf"c\.yaml line {line}: .*{re.escape(message)}"):
        _load(tmp_path, head, extra)


@pytest.mark.parametrize("head, extra", [
    (_AXOLOTL, "loraplus_lr_ratio: 16\nloraplus_lr_embedding: 1.0e-6\n"),  # no embedding adapted: changes nothing
    (_AXOLOTL, "lora_on_cpu: true\nqlora_sharded_model_loading: false\nmerge_method: memory_efficient\n"),
    (_AXOLOTL, "freeze_mm_modules: true\n"),  # axolotl's Gemma 4 docs ask it of every run
    (_AXOLOTL, "peft_autocast_adapter_dtype: true\nmerge_lora: false\n"),
    (_LLAMA_FACTORY, "create_new_adapter: false\nloraplus_lr_ratio: 16.0\nloraplus_lr_embedding: 1.0e-6\n"),
])
def test_settings_that_change_nothing_load(tmp_path, head, extra):
    _load(tmp_path, head, extra)


def test_a_run_with_layer_keys_writes_the_adapter_peft_builds(tmp_path, tiny_model_dir):
    """Trained from an axolotl file with peft_layers_to_transform, the adapter has LoRA on exactly the layers PEFT's
    LoraConfig(layers_to_transform) adapts, and PEFT loads it."""
    peft = pytest.importorskip("peft")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from qlora.cli.main import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join('{"text": "the quick brown fox %d"}\n' % i for i in range(4)))
    path = tmp_path / "c.yaml"
    path.write_text(f"base_model: {tiny_model_dir}\nadapter: lora\noutput_dir: {tmp_path / 'out'}\ndatasets:\n"
                    f"  - path: {data}\n    type: completion\nlora_r: 4\nlora_alpha: 8\n"
                    "lora_target_modules: [q_proj, up_proj]\npeft_layers_to_transform: [1]\nsequence_len: 32\n")
    assert main(["train", str(path), "--max-steps", "1", "--no-progress"]) == 0
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), framework="pt") as f:
        ours = {k.split(".lora_")[0] for k in f.keys() if ".lora_A." in k}
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft.LoraConfig(
        r=4, target_modules=["q_proj", "up_proj"], layers_to_transform=[1]))
    assert ours == {n for n, _ in theirs.named_parameters() if ".lora_A." in n for n in [n.split(".lora_")[0]]}
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "out")
    assert {n.split(".lora_")[0] for n, _ in loaded.named_parameters() if ".lora_A." in n} == ours


@pytest.mark.parametrize("head, extra, message", [
    (_LLAMA_FACTORY, "use_adam_mini: true\n", "use_adam_mini true: LLaMA-Factory's Adam-mini optimizer"),
    (_LLAMA_FACTORY, "use_galore: true\n", "use_galore true: LLaMA-Factory's GaLore optimizer"),
    (_AXOLOTL, "module_dropout: 0.1\n", "module_dropout 0.1: the dropout of PEFT's LoHa, LoKr and OFT adapters"),
    (_AXOLOTL, "relora: true\nrelora_steps: 150\n", "relora true: ReLoRA merges the adapter"),
    (_AXOLOTL, "relora_steps: 150\nrelora_warmup_steps: 10\n", "relora_steps 150: ReLoRA"),  # axolotl's older files
    (_AXOLOTL, "peft_ensure_weight_tying: true\nlora_target_modules: [q_proj, embed_tokens]\n",
     "peft_ensure_weight_tying true with LoRA on embed_tokens"),
], ids=lambda v: v.split(":")[0].strip() if isinstance(v, str) and not v.startswith(("base_model", "model_name")) else None)
def test_other_tools_training_keys_qlora_lacks_are_refused_by_line_saying_what_to_use(tmp_path, head, extra, message):
    """Keys of optimizers, adapters and schedules qlora does not have: one paragraph naming the file, line and key,
    and what to do instead (before, an unknown option with a wrong guess: wpo, dropout, rslora)."""
    line = head.count("\n") + 1
    with pytest.raises(UsageError, match=rf"c\.yaml line {line}: {re.escape(message)}.*(Remove|remove|leave)"):
        _load(tmp_path, head, extra)


@pytest.mark.parametrize("head, extra", [
    (_LLAMA_FACTORY, "use_adam_mini: false\nuse_muon: false\nsave_on_each_node: true\n"),
    (_AXOLOTL, "module_dropout: 0.0\nrelora: false\nrelora_steps: 150\nrelora_prune_ratio: 0.9\n"),
    (_AXOLOTL, "peft_ensure_weight_tying: true\n"),  # added tokens of a tied model: one table, as qlora trains them
    (_AXOLOTL, "peft_ensure_weight_tying: false\nsave_on_each_node: false\n"),
])
def test_other_tools_keys_that_change_nothing_here_load(tmp_path, head, extra):
    _load(tmp_path, head, extra)


def test_save_on_each_node_is_refused_over_several_nodes(tmp_path, monkeypatch, capsys):
    """On one node qlora's rank-0 checkpoints are the node's (said); over several, --output must be shared."""
    _load(tmp_path, _LLAMA_FACTORY, "save_on_each_node: true\n")
    assert "save_on_each_node true: on one node" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(UsageError, match=r"c\.yaml line 7: save_on_each_node true: this run spans 2 nodes"):
        _load(tmp_path, _LLAMA_FACTORY, "save_on_each_node: true\n")
