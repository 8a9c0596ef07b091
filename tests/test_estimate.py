"""The memory calculator: exact counts against real models, the published
Llama-3-8B figures, and the ``qlora estimate`` command."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.model.estimate import (
    GIB, TrainingOptions, activation_bytes, count_parameters, estimate, load_config, optimizer_bytes, quantized_bytes,
    select_targets,
)
from qlora.model.tiny import ARCHITECTURES, tiny_config
from qlora.quant import quantize_4bit


def _config(arch: str, tied: bool):
    config = tiny_config(arch, vocab_size=300, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96)
    config.tie_word_embeddings = tied
    return config


def _real_weights(model) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(quantized linear weights, every other parameter) of an instantiated model, shared ones once."""
    head = model.get_output_embeddings()
    linear_ids = {id(m.weight) for m in model.modules()
                  if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head}
    params = list(model.parameters())  # deduplicated: a tied embedding appears once
    return [p for p in params if id(p) in linear_ids], [p for p in params if id(p) not in linear_ids]


def _real_4bit_bytes(w: torch.Tensor, double_quant: bool) -> int:
    packed, state = quantize_4bit(w.detach(), "nf4", 64, double_quant=double_quant)
    tensors = [packed, state.absmax, state.code]
    if state.nested is not None:
        tensors += [state.nested.absmax, state.nested.code, state.offset]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_counts_and_4bit_bytes_match_a_real_model(arch, tied):
    config = _config(arch, tied)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    linears, others = _real_weights(model)
    counts = count_parameters(config)

    assert counts.total_params == sum(p.numel() for p in model.parameters())
    assert counts.quantized_params == sum(w.numel() for w in linears)
    assert counts.params_16bit == sum(p.numel() for p in others)
    assert sorted(lin.numel for lin in counts.linears) == sorted(w.numel() for w in linears)
    for dq in (True, False):
        predicted = sum(sum(quantized_bytes(lin.numel, 64, dq)) for lin in counts.linears)
        assert predicted == sum(_real_4bit_bytes(w, dq) for w in linears)


def test_tiny_llama_counts_by_hand():
    counts = count_parameters(_config("llama", tied=False))
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96  # q, o; k, v (2 kv heads x 16); gate, up, down
    assert counts.quantized_params == 2 * per_layer
    assert counts.params_16bit == 2 * 300 * 64 + 5 * 64  # embed + lm_head, 2 norms per layer + final norm
    assert count_parameters(_config("llama", tied=True)).params_16bit == 300 * 64 + 5 * 64


def test_quantized_bytes_odd_sizes_match_quantize_4bit():
    for numel in (1, 63, 65, 64 * 256 + 1, 3 * 64 * 257):
        w = torch.randn(numel)
        for dq in (True, False):
            for blocksize in (32, 256):
                packed, state = quantize_4bit(w, "nf4", blocksize, double_quant=dq)
                tensors = [packed, state.absmax, state.code]
                if dq:
                    tensors += [state.nested.absmax, state.nested.code, state.offset]
                assert sum(quantized_bytes(numel, blocksize, dq)) == sum(t.numel() * t.element_size() for t in tensors)


def test_llama_3_8b_reproduces_published_counts():
    """Llama-3-8B has 8,030,261,248 parameters. BASELINES.md's "weights GiB"
    is torch.cuda.memory_allocated of the built model, which holds more than
    the weight tensors: its 16-bit row reads 15.02 GiB where the bf16 weights
    are exactly 2 x 8,030,261,248 bytes = 14.96 GiB, so about 0.06 GiB (the
    same in both rows, e.g. cuBLAS workspaces) is not weights. The 4-bit
    tensors (codes, constants with double quantization and code tables, bf16
    embeddings, lm_head and norms) are exactly 5.31 GiB; plus that measured
    non-weight part they must give the 5.38 GiB figure within 1%.
    """
    config = load_config("llama-3-8b")
    counts = count_parameters(config)
    assert counts.total_params == 8_030_261_248
    rows = dict(estimate(config, TrainingOptions()).rows)
    weights_4bit = (rows["linear weights (bf16 / 4-bit codes)"]["QLoRA"] + rows["quantization constants"]["QLoRA"]
                    + rows["embeddings, norms, lm_head, biases (bf16)"]["QLoRA"]) / GIB
    weights_16bit = 2 * counts.total_params / GIB
    assert abs(weights_16bit - 15.02) / 15.02 < 0.01
    assert abs(weights_4bit - 5.38) / 5.38 < 0.015
    assert abs(weights_4bit + (15.02 - weights_16bit) - 5.38) / 5.38 < 0.01
    bits = 8 * (rows["linear weights (bf16 / 4-bit codes)"]["QLoRA"] + rows["quantization constants"]["QLoRA"])
    assert bits / counts.quantized_params == pytest.approx(4.127, abs=1e-3)


def test_peak_estimate_near_measured_llama_3_8b_peaks():
    """BASELINES.md peaks (QLoRA, checkpointing, paged AdamW, batch 1) within 10%."""
    config = load_config("llama-3-8b")
    for seq_len, measured in ((2048, 9.64), (8192, 21.52), (16384, 37.34)):
        total = estimate(config, TrainingOptions(seq_len=seq_len)).total("QLoRA") / GIB
        assert abs(total - measured) / measured < 0.10, (seq_len, total)


def _saved_bytes_per_token(config, tokens: int) -> float:
    """Bytes autograd saves for backward in a bf16 forward of ``config``'s model, per token (weights excluded)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(inputs_embeds=model.get_input_embeddings()(ids).detach().requires_grad_())
    return sum(n for ptr, n in saved.items() if ptr not in weights) / tokens


@pytest.mark.parametrize("model_type, moe", [
    ("llama", {}),
    ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2)),  # experts as wide as intermediate_size
    ("qwen2_moe", dict(num_experts=8, num_experts_per_tok=4, moe_intermediate_size=128,  # their own width,
                       shared_expert_intermediate_size=256)),  # and a shared expert
    ("ernie4_5_moe", dict(moe_num_experts=8, moe_k=4, moe_intermediate_size=256, moe_num_shared_experts=2,
                          moe_layer_start_index=0)),  # shared experts counted under ERNIE's name
])
def test_a_layers_activations_match_what_autograd_saves(model_type, moe):
    """One decoder layer's activations without checkpointing (two layers' minus one layer's, so the head and the
    loss drop out) against the tensors autograd saves, within 10%. A MoE layer computes each token in its top-k
    experts: a Mixtral-like layer saved 1.7x what the dense-width model predicted."""
    from importlib.util import find_spec

    from transformers import AutoConfig

    if moe and find_spec("transformers.conversion_mapping") is None:
        pytest.skip("transformers 4.x runs MoE experts as per-expert nn.Linear modules in a Python loop, which save "
                    "more per token than transformers 5's experts (Qwen2-MoE: 19,106 vs 15,888 bytes); the formula "
                    "models 5's")
    sizes = dict(vocab_size=300, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512)
    opts = TrainingOptions(seq_len=256, gradient_checkpointing=False)
    measured, predicted = [], []
    for layers in (1, 2):
        config = AutoConfig.for_model(model_type, num_hidden_layers=layers, **sizes, **moe)
        measured.append(_saved_bytes_per_token(config, opts.seq_len))
        predicted.append(activation_bytes(config, opts, 0) / opts.seq_len)
    layer, estimated = measured[1] - measured[0], predicted[1] - predicted[0]
    assert abs(estimated - layer) / layer < 0.10, (layer, estimated)


def test_a_dense_configuration_keeping_expert_settings_counts_no_experts():
    """Doge's configuration names 16,384 experts, 64 a token, with ``is_moe: false``: its MLP is dense. Its layer
    was estimated at 16.9x what autograd saves; it may not be above it (Doge's own attention saves more than a
    Llama block, so only the upper side is asserted)."""
    from transformers import AutoConfig

    sizes = dict(vocab_size=300, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=512)
    opts = TrainingOptions(seq_len=256, gradient_checkpointing=False)
    measured, predicted = [], []
    for layers in (1, 2):
        config = AutoConfig.for_model("doge", num_hidden_layers=layers, **sizes)
        assert config.is_moe is False and config.num_experts > 1000
        measured.append(_saved_bytes_per_token(config, opts.seq_len))
        predicted.append(activation_bytes(config, opts, 0) / opts.seq_len)
    assert predicted[1] - predicted[0] <= 1.1 * (measured[1] - measured[0]), (measured, predicted)


def test_options_change_the_right_rows():
    config = _config("llama", tied=False)
    base = estimate(config, TrainingOptions(seq_len=64))
    no_gc = estimate(config, TrainingOptions(seq_len=64, gradient_checkpointing=False))
    act = "activations (checkpointing {})"
    assert dict(no_gc.rows)[act.format("off")]["QLoRA"] > dict(base.rows)[act.format("on")]["QLoRA"]
    none = estimate(config, TrainingOptions(quant="none"))
    assert none.columns == ("full fine-tuning", "16-bit LoRA")
    counts = count_parameters(config)
    only_q = select_targets(counts, ("q_proj",))
    assert len(only_q) == 2 and all(lin.name.endswith("q_proj") for lin in only_q)
    with pytest.raises(UsageError, match="match no linear"):
        select_targets(counts, ("qkv",))


def test_preference_methods_double_the_sequences_and_count_the_dpo_reference(capsys, tiny_model_dir):
    # relations between rows, which any model shows: a 2-layer one measures its activations in a fraction of the time
    config = load_config(str(tiny_model_dir))
    sft = dict(estimate(config, TrainingOptions(seq_len=1024, batch_size=2)).rows)
    doubled = dict(estimate(config, TrainingOptions(seq_len=1024, batch_size=4)).rows)
    counts = count_parameters(config)
    act, logits = "activations (checkpointing on)", "logits + loss (fp32)"
    for method in ("dpo", "orpo", "cpo", "simpo"):
        pairs = estimate(config, TrainingOptions(seq_len=1024, batch_size=2, method=method))
        rows = dict(pairs.rows)
        assert rows[act] == doubled[act] and rows[logits] == doubled[logits]  # 2 pairs = 4 sequences
        assert rows[act]["QLoRA"] > sft[act]["QLoRA"]
        if method == "dpo":  # the reference: adapter off for (Q)LoRA, a frozen bf16 copy for full fine-tuning
            assert rows["DPO reference model"] == {"full fine-tuning": 2 * counts.total_params, "16-bit LoRA": 0,
                                                   "QLoRA": 0}
        else:
            assert "DPO reference model" not in rows
    pre = dict(estimate(config, TrainingOptions(method="dpo", precompute_ref=True)).rows)
    assert pre["DPO reference model"]["full fine-tuning"] == 0
    kto = dict(estimate(config, TrainingOptions(method="kto", precompute_ref=True)).rows)
    assert kto["KTO reference model"]["full fine-tuning"] == 0
    with pytest.raises(UsageError, match="--precompute-ref applies to --method dpo and kto"):
        TrainingOptions(method="orpo", precompute_ref=True)
    assert main(["estimate", "--model", str(tiny_model_dir), "--method", "dpo", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "batch 2 pairs (DPO)" in out and "DPO reference model" in out and "4 sequences" in out
    assert main(["estimate", "--model", str(tiny_model_dir), "--method", "simpo", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "batch 2 pairs (SIMPO)" in out and "DPO reference model" not in out and "4 sequences" in out
    kto = dict(estimate(config, TrainingOptions(seq_len=1024, batch_size=2, method="kto")).rows)
    assert kto[act] == sft[act] and kto["KTO reference model"]["QLoRA"] == 0  # one sequence an example
    assert main(["estimate", "--model", str(tiny_model_dir), "--method", "kto", "--batch-size", "2"]) == 0
    assert "batch 2 examples (KTO)" in capsys.readouterr().out


def test_optimizer_bytes():
    assert optimizer_bytes([1000, 5000], "paged_adamw_32bit") == 8 * 6000
    # 8-bit: small tensors stay 32-bit; large ones 2 bytes a value + fp32 absmax per 256, for both states
    assert optimizer_bytes([1000, 5000], "adamw_8bit") == 8 * 1000 + 2 * (5000 + 4 * 20)


def test_cli_prints_table_and_verdict(capsys):
    assert main(["estimate", "--model", "llama-3-8b", "--gpu-memory", "24"]) == 0
    out = capsys.readouterr().out
    assert "QLoRA" in out and "quantization constants" in out and "fits in 24 GiB?" in out
    assert "8,030,261,248" in out


def test_cli_reads_a_config_json(tmp_path, capsys):
    _config("qwen2", tied=True).save_pretrained(tmp_path)
    assert main(["estimate", "--model", str(tmp_path), "--optim", "adamw_8bit", "--target-modules", "q_proj,v_proj"]) == 0
    assert "LoRA r=16 on 4 linears" in capsys.readouterr().out


def test_cli_reads_configs_that_save_pretrained_encodes(tmp_path, capsys):
    """Falcon-H1's config.json holds an infinity as {"__float__": "Infinity"}: only
    transformers' own reader decodes it (passing the raw JSON as kwargs fails validation)."""
    from transformers import FalconH1Config

    FalconH1Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=256).save_pretrained(tmp_path)
    if "Infinity" not in (tmp_path / "config.json").read_text():
        pytest.skip("this transformers (4.x) writes Falcon-H1's config without an encoded infinity")
    assert main(["estimate", str(tmp_path)]) == 0
    assert "QLoRA" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["hqq", "eetq"])
def test_a_checkpoint_format_training_refuses_is_refused(tmp_path, method, capsys):
    """A config.json naming weights qlora cannot read is refused by the estimate as qlora train refuses it
    (it printed a table for a run that cannot start); FP8 and MXFP4 releases, which loading decodes, are not."""
    import json

    from transformers import AutoConfig

    AutoConfig.for_model("llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         vocab_size=256).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for qc, code in (({"quant_method": method, "nbits": 4}, 2),
                     ({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}, 0)):
        (tmp_path / "config.json").write_text(json.dumps(config | {"quantization_config": qc}))
        assert main(["estimate", str(tmp_path)]) == code
    assert f"describes a '{method}' quantized checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model"], "--model 'no-such-model': unknown model"),
    (["no-such-model"], "MODEL 'no-such-model': unknown model"),
    (["--model", "no-such-org/no-such-model"], "--model no-such-org/no-such-model is not a local path"),  # offline
    (["--model", "."], "no config.json"),
    (["--model", "llama-3-8b", "--seq-len", "many"], "--seq-len"),
    (["--model", "llama-3-8b", "--rank", "0"], "--rank"),
    (["--model", "llama-3-8b", "--gpu-memory", "-3"], "--gpu-memory"),
    (["--model", "llama-3-8b", "--blocksize", "100"], "--blocksize"),
    (["--model", "llama-3-8b", "--target-modules", "c_attn"], "match no linear"),
])
def test_cli_bad_input_exits_2(argv, message, capsys):
    try:
        code = main(["estimate", *argv])
    except SystemExit as exc:  # argparse rejects a bad number itself, also with status 2
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_defaults_are_train_defaults_and_the_model_is_positional(capsys, tiny_model_dir):
    """`qlora estimate MODEL` estimates what `qlora train --model MODEL` would run: same defaults, same names."""
    import argparse
    from dataclasses import fields

    from qlora.cli.main import build_parser
    from qlora.optim import OPTIMIZER_ALIASES, OPTIMIZERS
    from qlora.train.config import TrainConfig

    for name in [*OPTIMIZERS, *OPTIMIZER_ALIASES]:  # every name train's --optim takes, as train reads it
        assert TrainingOptions(optim=name).optim == TrainConfig(optim=name).optim
    sub = next(a for a in build_parser("estimate")._actions if isinstance(a, argparse._SubParsersAction))
    est = {a.dest: a for a in sub.choices["estimate"]._actions}
    train = {f.name: f.default for f in fields(TrainConfig)}
    shared = [d for d in est if d in train]
    assert {"seq_len", "gradient_checkpointing", "optim", "chunked_ce", "rank", "blocksize"} <= set(shared)
    for dest in shared:
        assert est[dest].default == train[dest], dest
    model = str(tiny_model_dir)  # any model shows the defaults; a 2-layer one is measured in a fraction of the time
    assert main(["estimate", model]) == 0
    positional = capsys.readouterr().out
    assert main(["estimate", "--model", model, "--seq-len", "512", "--no-gradient-checkpointing",
                 "--optim", "paged_adamw_32bit", "--chunked-ce"]) == 0
    assert capsys.readouterr().out == positional
    assert "checkpointing off" in positional and "chunked" in positional
    assert main(["estimate", model, "--optim", "adamw", "--seq-len", "8192"]) == 0
    out = capsys.readouterr().out
    assert "optimizer states (adamw)" in out
    # the chunked loss holds one chunk of 4096 rows of float32 logits instead of all 8192
    plain = estimate(load_config("llama-3-8b"), TrainingOptions(seq_len=8192, chunked_ce=False))
    chunked = estimate(load_config("llama-3-8b"), TrainingOptions(seq_len=8192, chunked_ce=True))
    assert chunked.rows[-1][1]["QLoRA"] == pytest.approx(plain.rows[-1][1]["QLoRA"] / 2, rel=1e-3)
    assert main(["estimate"]) == 2


def test_the_help_borrowed_from_train_names_only_estimate_options():
    """estimate shows train's help for the options it shares; a flag that help names must be one estimate takes."""
    import argparse
    import re

    from qlora.cli.main import build_parser

    sub = next(a for a in build_parser("estimate")._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices["estimate"]
    flags = {o for a in parser._actions for o in a.option_strings}
    for action in parser._actions:
        named = set(re.findall(r"--[a-z][a-z0-9-]*", action.help or ""))
        assert named <= flags, (action.option_strings, sorted(named - flags))


def _needs_model_type(model_type: str) -> None:
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"this transformers has no {model_type!r} model (added in transformers 5)")


def test_layers_of_different_widths_are_estimated_at_the_widest():
    """Gemma 4's config holds head_dim per layer (reading the global value raises); the activation
    estimate takes the widest layer, so it is no smaller than for a model of only such layers."""
    from transformers import AutoConfig

    _needs_model_type("gemma4_text")
    kw = dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128)
    mixed = AutoConfig.for_model("gemma4_text", **kw)
    widths = [layer.head_dim for layer in mixed.per_layer_config]
    assert len(set(widths)) > 1  # the case this test is about
    opts = TrainingOptions(seq_len=64, gradient_checkpointing=False)
    got = activation_bytes(mixed, opts, lora_per_layer=0)
    widest = AutoConfig.for_model("gemma3_text", **kw, head_dim=max(widths))
    narrowest = AutoConfig.for_model("gemma3_text", **kw, head_dim=min(widths))
    assert activation_bytes(narrowest, opts, 0) < got == activation_bytes(widest, opts, 0)



def test_a_config_whose_head_counts_differ_per_layer_is_read(tmp_path, capsys):
    """dots3's config holds num_attention_heads per layer (reading the global value raises, and the
    config check at load read it): its folder is read and estimated, as Gemma 4's per-layer head_dim is."""
    from transformers import AutoConfig

    from qlora.cli.main import main

    _needs_model_type("dots3_note_text")
    config = AutoConfig.for_model("dots3_note_text")
    assert "num_attention_heads" in config.per_layer_attributes  # the case this test is about
    config.save_pretrained(tmp_path)
    assert main(["estimate", "--model", str(tmp_path)]) == 0
    assert "QLoRA" in capsys.readouterr().out

@pytest.mark.parametrize("model_type, fields", [
    ("mamba", dict(hidden_size=64, intermediate_size=128, state_size=8)),  # no attention heads
    ("rwkv", dict(hidden_size=64, attention_hidden_size=64, intermediate_size=128)),
    ("xlstm", dict(hidden_size=64, num_heads=4, qk_dim_factor=1.0)),
    ("gemma3n_text", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          intermediate_size=[128, 256], layer_types=["sliding_attention", "full_attention"],
                          num_kv_shared_layers=0, activation_sparsity_pattern=[0.0, 0.0])),  # one MLP width a layer
])
def test_attention_free_and_per_layer_width_configs_are_estimated(model_type, fields, tmp_path, capsys):
    """Mamba, RWKV and xLSTM configs have no num_attention_heads and Gemma 3n's intermediate_size is a list
    (one a layer): ``qlora estimate`` read them as ``None // int`` and ``int + list`` (a traceback); the
    activation row grows with the widest layer, and a mixer counts like one hidden-wide attention head."""
    from transformers import AutoConfig

    _needs_model_type(model_type)
    config = AutoConfig.for_model(model_type, vocab_size=512, num_hidden_layers=2, **fields)
    config.save_pretrained(tmp_path)
    assert main(["estimate", "--model", str(tmp_path)]) == 0
    assert "QLoRA" in capsys.readouterr().out
    opts = TrainingOptions(seq_len=64, gradient_checkpointing=False)
    got = activation_bytes(config, opts, lora_per_layer=0)
    assert got > 0
    if model_type == "gemma3n_text":
        narrow = AutoConfig.for_model(model_type, vocab_size=512, num_hidden_layers=2,
                                      **{**fields, "intermediate_size": [128, 128]})
        assert activation_bytes(narrow, opts, lora_per_layer=0) < got


_MOE_SIZES = dict(head_dim=16, moe_intermediate_size=32, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
                  q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                  first_k_dense_replace=1, n_group=1, topk_group=1)


_RESIDENT = ("linear weights", "quantization constants", "embeddings", "buffers")


def _saved_tiny(path, tokenizer, model_type: str):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                  max_position_embeddings=512)
    for key, value in _MOE_SIZES.items():
        if hasattr(config, key):
            setattr(config, key, value)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def _held_bytes(model) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("model_type", ["minimax", "deepseek_v3", "gpt_bigcode", "qwen2", "roberta"])
def test_resident_rows_equal_the_loaded_model_bytes(tmp_path, tiny_tokenizer, model_type):
    """Weights, constants, 16-bit tensors (fp32 where the class keeps them: DeepSeek-V3's expert bias)
    and buffers (MiniMax's decay tables, GPT-BigCode's causal mask) are what load_model holds; RoBERTa's
    ``lm_head.dense`` is 16-bit under the skipped ``lm_head`` (it was counted 4-bit)."""
    import qlora

    _saved_tiny(tmp_path, tiny_tokenizer, model_type)
    model, _ = qlora.load_model(tmp_path, compute_dtype=torch.bfloat16, device="cpu")
    est = estimate(load_config(str(tmp_path)), TrainingOptions())
    predicted = sum(values["QLoRA"] for label, values in est.rows if label.startswith(_RESIDENT))
    assert predicted == _held_bytes(model)


def test_a_bitsandbytes_4bit_checkpoint_is_estimated_in_its_stored_format(tmp_path, tiny_model_dir, tiny_tokenizer,
                                                                         capsys):
    """A checkpoint transformers + bitsandbytes saved 4-bit (Unsloth's bnb-4bit releases) is loaded in the format
    its config.json names, whatever --quant and --double-quant say, and its llm_int8_skip_modules stay 16-bit
    (Unsloth's dynamic releases skip whole layers): the resident rows are what load_model holds, and the
    skipped linears are still LoRA targets, as training adapts them. Before, the estimate took the flags' NF4 +
    double quantization and packed the skipped layers."""
    import json

    import qlora
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    skip = ["lm_head", "model.layers.0.mlp"]
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False,
                             bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip)
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb, device_map="cpu").save_pretrained(
        tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"] == skip
    model, _ = qlora.load_model(tmp_path, compute_dtype=torch.bfloat16, device="cpu")
    est = estimate(load_config(str(tmp_path)), TrainingOptions(quant="fp4", double_quant=False))
    predicted = sum(values["QLoRA"] for label, values in est.rows if label.startswith(_RESIDENT))
    assert predicted == _held_bytes(model)
    plain = count_parameters(load_config(str(tiny_model_dir)))
    assert len(select_targets(count_parameters(load_config(str(tmp_path))), None)) == len(select_targets(plain, None))

    assert main(["estimate", str(tmp_path), "--quant", "nf4", "--double-quant"]) == 0
    out = capsys.readouterr().out
    assert "bitsandbytes 4-bit checkpoint" in out and "model.layers.0.mlp kept 16-bit" in out
    assert ", fp4, block 64" in out and "without double quantization" in out


def test_gpt2_conv1d_layers_a_4bit_checkpoint_keeps_dense_are_still_lora_targets(tmp_path, tiny_tokenizer):
    """GPT-2's linear layers are ``Conv1D``: one that ``llm_int8_skip_modules`` kept 16-bit is adapted by
    training like the packed ones, so the estimate counts its adapter (it counted the layer as a plain tensor,
    two targets short here) and its 16-bit weight (what load_model holds)."""
    import qlora
    from transformers import BitsAndBytesConfig

    from qlora.model.tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch="gpt2")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16,
                             llm_int8_skip_modules=["lm_head", "c_fc"])
    AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb, device_map="cpu").save_pretrained(
        tmp_path / "q")
    tiny_tokenizer.save_pretrained(tmp_path / "q")
    counts = count_parameters(load_config(str(tmp_path / "q")))
    assert len(select_targets(counts, None)) == len(select_targets(count_parameters(load_config(str(base))), None))
    assert sorted(lin.name for lin in counts.linears if not lin.stored_4bit) == [
        "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    model, _ = qlora.load_model(tmp_path / "q", compute_dtype=torch.bfloat16, device="cpu")
    est = estimate(load_config(str(tmp_path / "q")), TrainingOptions(quant="fp4", double_quant=False))
    assert sum(values["QLoRA"] for label, values in est.rows if label.startswith(_RESIDENT)) == _held_bytes(model)


@pytest.mark.parametrize("model_type", ["minimax", "deepseek_v3", "qwen3_moe"])
def test_16bit_experts_are_estimated_as_the_loaded_model_holds_them(tmp_path, tiny_tokenizer, model_type, capsys):
    """--no-quantize-experts (axolotl's default) keeps the 3-D expert weights bf16, whole, on the 4-bit base:
    the resident rows are what load_model(quantize_experts=False) holds, more than with 4-bit experts."""
    import qlora
    from qlora.nn import Experts4bit, expert_weight_names

    if importlib.util.find_spec("transformers.conversion_mapping") is None:
        pytest.skip("transformers 4.x keeps MoE experts as per-expert linear layers")
    _saved_tiny(tmp_path, tiny_tokenizer, model_type)
    model, _ = qlora.load_model(tmp_path, compute_dtype=torch.bfloat16, device="cpu", quantize_experts=False)
    assert any(expert_weight_names(m) for m in model.modules())
    assert not any(isinstance(m, Experts4bit) for m in model.modules())
    config = load_config(str(tmp_path))
    dense = estimate(config, TrainingOptions(quantize_experts=False))
    predicted = sum(values["QLoRA"] for label, values in dense.rows if label.startswith(_RESIDENT))
    assert predicted == _held_bytes(model)
    four = estimate(config, TrainingOptions())
    assert predicted > sum(values["QLoRA"] for label, values in four.rows if label.startswith(_RESIDENT))
    for column in ("full fine-tuning", "16-bit LoRA"):  # their experts are bf16 either way
        assert dense.total(column) == four.total(column)
    assert main(["estimate", str(tmp_path), "--no-quantize-experts"]) == 0
    out = capsys.readouterr().out
    assert "experts bf16" in out and "in 3-D experts kept bf16 (--no-quantize-experts)" in out


def test_an_adapter_folder_is_estimated_as_continuing_it(tmp_path, tiny_model_dir, capsys):
    """``qlora estimate ADAPTER`` = the base with the adapter's rank, targets and trained 4-bit format,
    as ``qlora train --model ADAPTER`` would continue it; a PEFT regex of module paths counts the same layers."""
    import json

    import qlora
    from qlora.model.load import load_model

    model, _ = load_model(tiny_model_dir, quant="fp4", blocksize=128, double_quant=False, compute_dtype=torch.float32)
    qlora.add_lora(model, r=4, target_modules=["q_proj", "v_proj"])
    adapter = qlora.save_adapter(model, tmp_path / "adapter")

    def table(*argv) -> str:
        capsys.readouterr()
        assert main(["estimate", *argv]) == 0
        return capsys.readouterr().out.split("\n\n", 1)[1]  # the table, after the summary line

    expected = table(str(tiny_model_dir), "--rank", "4", "--target-modules", "q_proj,v_proj", "--quant", "fp4",
                     "--blocksize", "128", "--no-double-quant")
    assert table(str(adapter)) == expected
    assert table(str(tiny_model_dir)) != expected  # rank 16 on every linear, NF4: another table
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = r"model\.layers\.\d+\.self_attn\.(?:q_proj|v_proj)"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert table(str(adapter)) == expected
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"r": "four"}))
    assert main(["estimate", str(adapter)]) == 2
    assert "adapter_config.json: r must be a positive integer" in capsys.readouterr().err


_PEFT_ADAPTERS = {  # LoraConfig options whose trained parameters the config's r and target_modules do not give
    "rank_pattern": dict(rank_pattern={"v_proj": 8}), "dora": dict(use_dora=True),
    "modules_to_save": dict(modules_to_save=["lm_head", "embed_tokens"]),
    "trainable_tokens": dict(trainable_token_indices=[1, 2, 3]), "layers_to_transform": dict(layers_to_transform=[0]),
    "lora_bias": dict(lora_bias=True), "embedding_lora": dict(target_modules=["q_proj", "embed_tokens"]),
    "exclude_modules": dict(target_modules="all-linear", exclude_modules=["o_proj"]),
    "velora": dict(velora_config={"num_groups": 4}),  # its saved projections are backward state, not trained
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", sorted(_PEFT_ADAPTERS))
def test_a_peft_adapter_is_estimated_with_the_parameters_peft_trains(tmp_path, tiny_model_dir, capsys, case):
    """``qlora estimate ADAPTER`` counts what continuing it trains, as PEFT counts it (get_nb_trainable_parameters):
    per-layer ranks, DoRA magnitudes, modules saved whole, token rows, LoRA biases and embedding LoRA included (it
    counted r x the targets, or refused exclude_modules' and the embedding's adapters)."""
    import json

    peft = pytest.importorskip("peft")
    options = dict(r=4, target_modules=["q_proj", "v_proj"]) | _PEFT_ADAPTERS[case]
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), peft.LoraConfig(**options))
    trainable = model.get_nb_trainable_parameters()[0]
    model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config | {
        "base_model_name_or_path": str(tiny_model_dir)}))
    assert main(["estimate", str(tmp_path / "adapter")]) == 0
    out = capsys.readouterr().out
    assert f": {trainable:,}\n" in out  # the note's count of trained parameters (the table's GiB round it away)
    assert main(["estimate", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter")]) == 0  # as train spells it
    assert capsys.readouterr().out.split("\n\n", 1)[1] == out.split("\n\n", 1)[1]


def test_estimate_adapter_flag_takes_an_adapter_folder(tmp_path, tiny_model_dir, capsys):
    import qlora
    from qlora.model.load import load_model

    model, _ = load_model(tiny_model_dir, compute_dtype=torch.float32)
    qlora.add_lora(model, r=4, target_modules=["q_proj"])
    qlora.save_adapter(model, tmp_path / "a")
    (tmp_path / "empty").mkdir()
    assert main(["estimate", str(tiny_model_dir), "--adapter", str(tmp_path / "empty")]) == 2
    assert f"{tmp_path / 'empty'} is not an adapter folder" in capsys.readouterr().err
    assert main(["estimate", str(tmp_path / "a"), "--adapter", str(tmp_path / "a")]) == 2  # an adapter given twice
    assert "is an adapter folder too" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("transformers.conversion_mapping") is None,
                    reason="transformers 4.x builds the per-expert layers themselves: nothing to convert")
def test_a_transformers_4_moe_adapter_is_estimated_as_loading_converts_it(tmp_path, tiny_tokenizer, capsys):
    """A Mixtral adapter on transformers 4's block_sparse_moe.experts.N.w1/w2/w3 (it was refused: "w1, w2, w3 match
    no linear layer") is counted as loaded on the fused 3-D experts, as PEFT counts it there."""
    peft = pytest.importorskip("peft")
    from test_adapter_layout import _v4_adapter
    from tiny_moe import save_tiny_moe

    model_dir = save_tiny_moe(tmp_path / "mixtral", tiny_tokenizer, "mixtral")
    _v4_adapter(model_dir, tmp_path / "v4", {"q_proj", "w1", "w2", "w3"})
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                            tmp_path / "v4", is_trainable=True)
    trainable = theirs.get_nb_trainable_parameters()[0]
    assert main(["estimate", str(tmp_path / "v4")]) == 0
    assert f"LoRA r=2 on 2 linears and 4 expert weights (one LoRA per expert): {trainable:,}\n" in capsys.readouterr(
    ).out
    # the same experts adapted in transformers 5's layout, with a rank of their own (rank_pattern)
    ours = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), peft.LoraConfig(
        r=2, target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        rank_pattern={"gate_up_proj": 4}))
    trainable = ours.get_nb_trainable_parameters()[0]
    ours.save_pretrained(tmp_path / "v5")
    assert main(["estimate", str(model_dir), "--adapter", str(tmp_path / "v5")]) == 0
    assert f"expert weights (one LoRA per expert): {trainable:,}\n" in capsys.readouterr().out


@pytest.mark.parametrize("targets", [("q_proj", "lm_head"), r"(?:.*\.q_proj|lm_head)"], ids=["names", "pattern"])
def test_a_named_16bit_head_is_adapted_as_training_adapts_it(tiny_model_dir, targets):
    """all-linear leaves lm_head out (PEFT's rule), but naming it puts LoRA on the 16-bit head in training, so
    the estimate counts that adapter too (it refused the name)."""
    import qlora
    from qlora.model.estimate import TrainingOptions, estimate, load_config
    from qlora.model.load import load_model

    model, _ = load_model(tiny_model_dir, compute_dtype=torch.float32)
    qlora.add_lora(model, r=4, target_modules=list(targets) if isinstance(targets, tuple) else targets)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert any("lm_head.lora_A" in n for n, _ in model.named_parameters())
    est = estimate(load_config(str(tiny_model_dir)), TrainingOptions(rank=4, target_modules=targets))
    assert dict(est.rows)["LoRA adapters (fp32)"]["QLoRA"] == 4 * trained
    everything = estimate(load_config(str(tiny_model_dir)), TrainingOptions(rank=4, target_modules=None))
    model, _ = load_model(tiny_model_dir, compute_dtype=torch.float32)
    qlora.add_lora(model, r=4, target_modules="all-linear")
    assert not any("lm_head.lora" in n for n, _ in model.named_parameters())
    assert dict(everything.rows)["LoRA adapters (fp32)"]["QLoRA"] == 4 * sum(
        p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("double_quant", [False, True])
def test_a_meta_4bit_weight_decodes_to_what_the_reference_gives_without_running_it(double_quant, monkeypatch):
    """``qlora estimate`` measures activations on meta: a 4-bit weight there decodes to the tensor the reference
    kernel gives (shape, dtype, meta), without the reference's ops, which cost seconds a layer on meta."""
    from qlora.quant import dequantize_4bit
    from qlora.quant.kernels import torch_ref

    packed, state = quantize_4bit(torch.randn(96, 80), blocksize=64, double_quant=double_quant)
    packed, state = packed.to("meta"), state.to("meta")
    expected = torch_ref.dequantize_4bit_ref(packed, torch.empty(state.shape.numel() // 64, device="meta"), 64,
                                             state.quant_type, state.shape, torch.bfloat16)
    monkeypatch.setattr(torch_ref, "dequantize_4bit_ref", None)  # fails if it runs
    out = dequantize_4bit(packed, state, torch.bfloat16)
    assert (out.shape, out.dtype, out.device, out.is_contiguous()) == (expected.shape, expected.dtype,
                                                                       expected.device, expected.is_contiguous())
