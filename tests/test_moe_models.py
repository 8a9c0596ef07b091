"""MoE and renamed-layout checkpoints: loaded as transformers loads them, experts in 4 bits.

Oracle: transformers' own ``from_pretrained`` of the same folder (it applies the
checkpoint conversion mapping), and for the 4-bit model a transformers model
whose expert weights were replaced by qlora's dequantized 4-bit experts.
"""

from __future__ import annotations

import pytest
import torch

from qlora.model.load import load_model
from qlora.nn import Experts4bit, Linear4bit
from bnb_oracle import reference_path
from tiny_moe import CONFIG, save_tiny_moe, tiny_moe_factory

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not hasattr(transformers, "conversion_mapping") and
                                not __import__("importlib").util.find_spec("transformers.conversion_mapping"),
                                reason="transformers 4.x stores experts as nn.Linear (loaded by the plain path)")

@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer):
    return tiny_moe_factory(tmp_path_factory, tiny_tokenizer)


def _reference(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


_IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 8, 64, 12], [3, 9, 27, 81, 200, 150, 11, 4, 66, 90]])


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3", "granitemoe", "gpt_neox",
                                        "gpt_oss", "llama4_text"])
def test_dense_load_equals_transformers(saved, model_type):
    path = saved(model_type)
    ours, _ = load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")
    ref = _reference(path)
    theirs = dict(ref.named_parameters())
    mine = dict(ours.named_parameters())
    assert mine.keys() == theirs.keys()
    for name, p in mine.items():
        assert torch.equal(p, theirs[name]), name
    with torch.no_grad():
        torch.testing.assert_close(ours(_IDS).logits, ref(_IDS).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3", "llama4_text"])
def test_4bit_experts_equal_transformers_with_dequantized_experts(saved, model_type):
    path = saved(model_type)
    ours, _ = load_model(path, quant="nf4", compute_dtype=torch.float32, device="cpu")
    experts = {n: m for n, m in ours.named_modules() if isinstance(m, Experts4bit)}
    assert experts, "experts were not swapped for 4-bit ones"
    ref = _reference(path)
    with torch.no_grad():
        for name, module in ours.named_modules():  # the oracle gets exactly our 4-bit weights, dequantized
            if isinstance(module, Experts4bit):
                target = ref.get_submodule(name)
                for w in module.weight_names:
                    getattr(target, w).copy_(module.dequantize(w, torch.float32))
                    # one expert's slice is the dequantized 2-D matrix of its own Linear4bit
                    first = getattr(module, w)[0].dequantize(torch.float32)
                    torch.testing.assert_close(getattr(target, w)[0], first.t() if module.is_transposed else first,
                                               rtol=0, atol=0)
            elif isinstance(module, Linear4bit) and not any(name.startswith(e + ".") for e in experts):
                ref.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
        torch.testing.assert_close(ours(_IDS).logits, ref(_IDS).logits, rtol=1e-5, atol=1e-5)
    # the experts are really 4-bit: no 3-D 16/32-bit expert weight is left in the model
    assert not [n for n, p in ours.named_parameters() if p.dim() == 3]


def test_lora_gradients_flow_through_4bit_experts(saved):
    import qlora

    ours, _ = load_model(saved("qwen3_moe"), quant="nf4", compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(ours, r=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    for name, p in ours.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    loss = ours(_IDS, labels=_IDS).loss
    loss.backward()
    first_layer = [p.grad for n, p in ours.named_parameters() if "layers.0." in n and "lora_A" in n]
    assert first_layer and all(g is not None and g.abs().sum() > 0 for g in first_layer)


def test_routers_stay_dense_and_are_not_default_lora_targets(tmp_path, saved):
    import qlora
    from peft import PeftModel
    from qlora.nn import LoraLinear

    path = saved("qwen2_moe")
    ours, _ = load_model(path, quant="nf4", compute_dtype=torch.float32, device="cpu")
    gates = [n for n, m in ours.named_modules() if n.endswith("shared_expert_gate")]
    assert gates and all(type(ours.get_submodule(n)) is torch.nn.Linear for n in gates)
    qlora.add_lora(ours, r=4)
    adapted = {n for n, m in ours.named_modules() if isinstance(m, LoraLinear)}
    assert not [n for n in adapted if n.endswith(("gate", "shared_expert_gate"))]
    assert [n for n in adapted if ".shared_expert." in n] and [n for n in adapted if n.endswith("q_proj")]

    # PEFT puts the adapter (shared experts included) on the same modules, with the same result
    dense, _ = load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(dense, r=4, dropout=0.0)
    torch.manual_seed(1)
    for name, p in dense.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    adapter = qlora.save_adapter(dense, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(_reference(path), str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(dense(_IDS).logits, peft_model(_IDS).logits, rtol=1e-5, atol=1e-5)


def test_estimate_counts_experts_as_4bit_and_routers_as_16bit():
    from qlora.model.estimate import count_parameters, select_targets

    cfg = transformers.AutoConfig.for_model("mixtral", vocab_size=300, **CONFIG)
    cfg.num_local_experts, cfg.num_experts_per_tok = 4, 2
    counts = count_parameters(cfg)
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    experts = [lin for lin in counts.linears if not lin.adaptable]
    assert len(experts) == layers * 4 * 2 and sum(lin.numel for lin in experts) == layers * 4 * 3 * h * i
    router = layers * 4 * h  # (E, H) per layer, 16-bit
    attention = layers * (2 * h * h + 2 * h * (h // 4 * 2))
    assert counts.quantized_params == layers * 4 * 3 * h * i + attention
    assert counts.params_16bit >= router
    assert {lin.name.rsplit(".", 1)[-1] for lin in select_targets(counts, None)} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_cli_train_merge_quantize_on_moe(tmp_path, saved, capsys):
    """train (2 steps, experts adapted too) -> PEFT loads the adapter with qlora's logits -> merge loads in
    transformers -> quantize of the merged model loads in transformers and qlora."""
    import json
    import math

    import qlora
    from peft import PeftModel
    from qlora.cli.main import main

    path = saved("qwen3_moe")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {a} plus 2?", "input": "", "output": f"{a + 2}."})
                            + "\n" for a in range(8)))
    out = tmp_path / "run"
    assert main(["train", "--model", str(path), "--data", str(data), "--output", str(out), "--seq-len", "48",
                 "--batch-size", "2", "--lr", "1e-2", "--max-steps", "2", "--no-progress",
                 "--target-parameters", "mlp.experts.gate_up_proj,mlp.experts.down_proj"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("split") == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    targets = set(json.loads((out / "adapter_config.json").read_text())["target_modules"])
    assert "gate" not in targets and {"q_proj", "v_proj"} <= targets

    ours, _ = load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(ours, out)
    peft_model = PeftModel.from_pretrained(_reference(path), str(out)).eval()
    with torch.no_grad():
        base = _reference(path)(_IDS).logits
        mine, theirs = ours(_IDS).logits, peft_model(_IDS).logits
    assert (mine - base).abs().max() > 1e-4  # the adapter does something
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)

    assert main(["merge", "--model", str(path), "--adapter", str(out), "--output", str(tmp_path / "merged"),
                 "--dtype", "float32"]) == 0
    four_bit, _ = load_model(path, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(four_bit, out)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(_IDS).logits, four_bit(_IDS).logits, rtol=1e-4, atol=1e-4)

    capsys.readouterr()
    assert main(["quantize", "--model", str(tmp_path / "merged"), "--output", str(tmp_path / "q4"),
                 "--compute-dtype", "fp32"]) == 0
    assert "experts" in capsys.readouterr().out
    again, _ = load_model(tmp_path / "q4", compute_dtype=torch.float32, device="cpu")
    direct, _ = load_model(tmp_path / "merged", compute_dtype=torch.float32, device="cpu")
    # (transformers' logits on this folder: test_quantize_writes_moe_as_transformers_and_bitsandbytes_do; these
    # layers are narrower than a block, which bitsandbytes' CPU dequantize misreads)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q4", device_map="cpu")
    merged_experts = {n: p for n, p in merged.named_parameters() if p.dim() == 3}
    assert merged_experts and all(torch.equal(p, merged_experts[n])
                                  for n, p in theirs.named_parameters() if p.dim() == 3)
    with torch.no_grad():
        torch.testing.assert_close(again(_IDS).logits, direct(_IDS).logits, rtol=0, atol=0)


def test_bitsandbytes_moe_checkpoints(tmp_path, saved):
    """transformers 5 + bitsandbytes keeps experts 16-bit in its 4-bit files: qlora loads them with 4-bit experts,
    identical to quantizing the 16-bit checkpoint (4.x files with per-expert 4-bit layers: test_moe_bnb_per_expert)."""
    pytest.importorskip("bitsandbytes")
    path = saved("mixtral")
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, device_map="cpu")
    out = tmp_path / "bnb"
    theirs.save_pretrained(out)
    for f in path.glob("tokenizer*"):
        (out / f.name).write_bytes(f.read_bytes())
    prequantized, _ = load_model(out, compute_dtype=torch.float32, device="cpu")
    direct, _ = load_model(path, compute_dtype=torch.float32, device="cpu")
    assert any(isinstance(m, Experts4bit) for m in prequantized.modules())
    with torch.no_grad():
        torch.testing.assert_close(prequantized(_IDS).logits, direct(_IDS).logits, rtol=0, atol=0)


def assert_merged_reloads_with_the_4bit_logits(path, out) -> None:
    """The 4-bit model at ``path`` merged and saved to ``out``: transformers reloads it with qlora's logits, and
    no 4-bit layer or experts module is left."""
    import qlora

    ours, tokenizer = load_model(path, compute_dtype=torch.float32, device="cpu")
    with torch.no_grad():
        before = ours(_IDS).logits
    qlora.merge(ours, dtype=torch.float32)
    assert not any(isinstance(m, (Experts4bit, Linear4bit)) for m in ours.modules())
    qlora.save_merged(ours, out, tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(_reference(out)(_IDS).logits, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt_oss", "deepseek_v3", "granitemoe", "llama4_text"])
def test_merged_moe_loads_in_transformers_with_the_4bit_logits(tmp_path, saved, model_type):
    assert_merged_reloads_with_the_4bit_logits(saved(model_type), tmp_path / "merged")


def test_experts_split_across_shards(tmp_path, saved):
    """One layer's experts in several safetensors shards: gathered across them, equal to transformers."""
    path = saved("mixtral")
    ref = _reference(path)
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="20KB")
    for f in path.glob("tokenizer*"):
        (sharded / f.name).write_bytes(f.read_bytes())
    assert len(list(sharded.glob("*.safetensors"))) > 3
    ours, _ = load_model(sharded, quant=None, compute_dtype=torch.float32, device="cpu")
    theirs = dict(ref.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in ours.named_parameters())


@pytest.mark.parametrize("model_type", ["gpt_oss", "qwen3_moe", "llama4_text"])
def test_quantize_model_in_memory_equals_quantize_on_load(saved, model_type):
    """``qlora.quantize_model`` on a transformers MoE quantizes its experts (biases kept) as loading does."""
    from qlora.model.quantize import quantize_model

    path = saved(model_type)
    loaded, _ = load_model(path, quant="nf4", compute_dtype=torch.float32, device="cpu")
    ref = _reference(path)
    replaced = quantize_model(ref, compute_dtype=torch.float32)
    assert any(p.endswith(".experts") for p in replaced)
    assert not [n for n, p in ref.named_parameters() if p.dim() == 3]
    with torch.no_grad():
        torch.testing.assert_close(ref(_IDS).logits, loaded(_IDS).logits, rtol=0, atol=0)


_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# Every 4-bit layer at least one block (64) wide: bitsandbytes' CPU dequantize misreads narrower rows.
_WIDE = dict(hidden_size=64, intermediate_size=64, moe_intermediate_size=64, shared_expert_intermediate_size=64,
             head_dim=16, q_lora_rank=64, kv_lora_rank=64, v_head_dim=16, qk_rope_head_dim=16)


@pytest.mark.parametrize("model_type, compute", [("mixtral", "fp32"), ("qwen2_moe", "fp32"), ("qwen3_moe", "bf16"),
                                                 ("olmoe", "fp32"), ("gpt_oss", "bf16"), ("deepseek_v3", "fp32")])
def test_quantize_writes_moe_as_transformers_and_bitsandbytes_do(tmp_path, tiny_tokenizer, capsys, model_type,
                                                                 compute):
    """`qlora quantize` of an MoE: its linear layers 4-bit, byte for byte qlora's; its experts 16-bit in the
    compute dtype, per expert as transformers' save_pretrained writes them (transformers + bitsandbytes
    quantizes nn.Linear only). transformers loads the folder and computes what qlora's model computes with the
    same layers 4-bit; qlora loads it back with its experts quantized to the codes it gives the original."""
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    from qlora.cli.main import main
    from qlora.errors import UsageError
    from qlora.model.quantized_io import save_quantized

    fields = transformers.AutoConfig.for_model(model_type)
    path = save_tiny_moe(tmp_path / "base", tiny_tokenizer, model_type,
                         **{k: v for k, v in _WIDE.items() if hasattr(fields, k)})
    dtype, q = _DTYPES[compute], tmp_path / "q"
    capsys.readouterr()
    assert main(["quantize", "--model", str(path), "--output", str(q), "--compute-dtype", compute]) == 0
    out = capsys.readouterr().out
    assert "experts (" in out and f"stored {compute}" in out
    ours, _ = load_model(path, compute_dtype=dtype, device="cpu")  # qlora's 4-bit model of the original
    theirs = reference_path(transformers.AutoModelForCausalLM.from_pretrained(q, device_map="cpu"))
    four_bit = {n: m for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    experts = tuple(n + "." for n, m in ours.named_modules() if isinstance(m, Experts4bit))
    mine = {n: m for n, m in ours.named_modules() if isinstance(m, Linear4bit) and not n.startswith(experts)}
    assert experts and four_bit.keys() == mine.keys()
    for name, layer in four_bit.items():
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
        assert torch.equal(weight, mine[name].dequantize(dtype)), name
    # the experts are 16-bit there, the original's values in the compute dtype
    dense, _ = load_model(path, compute_dtype=dtype, device="cpu", quantize_experts=False)
    stacks = {n: p for n, p in theirs.named_parameters() if p.dim() == 3}
    assert stacks and all(p.dtype == dtype and torch.equal(p, dense.get_parameter(n)) for n, p in stacks.items())
    with torch.no_grad():
        torch.testing.assert_close(theirs(_IDS).logits, dense(_IDS).logits, rtol=0, atol=0)
    # qlora reads it back to its own 4-bit model of the original
    again, _ = load_model(q, compute_dtype=dtype, device="cpu")
    assert sum(isinstance(m, Experts4bit) for m in again.modules()) == sum(
        isinstance(m, Experts4bit) for m in ours.modules()) > 0
    for name, module in ours.named_modules():
        if isinstance(module, Experts4bit):
            for w in module.weight_names:
                assert torch.equal(again.get_submodule(name).dequantize(w), module.dequantize(w)), (name, w)
    with torch.no_grad():
        torch.testing.assert_close(again(_IDS).logits, ours(_IDS).logits, rtol=0, atol=0)
    # the file holds what transformers + bitsandbytes writes for this model: the same keys, the same packed bytes,
    # except for routers qlora keeps 16-bit (Qwen2-MoE's shared_expert_gate, which bitsandbytes packs)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    direct = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu",
                                                               dtype=dtype)
    direct.save_pretrained(tmp_path / "direct")
    written, reference = load_file(q / "model.safetensors"), load_file(tmp_path / "direct" / "model.safetensors")
    routers = tuple(four_bit.keys() ^ {n for n, m in direct.named_modules() if isinstance(m, bnb.nn.Linear4bit)})
    assert all(n.endswith("shared_expert_gate") for n in routers)
    in_router = tuple(r + ".weight." for r in routers)
    assert [k for k in written if k.startswith(in_router)] == [] and {r + ".weight" for r in routers} <= written.keys()
    kept = [k for k in reference if not k.startswith(in_router)]
    assert sorted(written) == sorted(kept)
    if dtype == torch.float32:  # transformers rounds an fp32 checkpoint to a bf16 load dtype before quantizing
        dense_routers = tuple(r + "." for r in routers)
        assert all(torch.equal(written[k], reference[k]) for k in kept if not k.startswith(dense_routers)), model_type

    with pytest.raises(UsageError, match="quantize_experts=False"):  # 4-bit experts would load nowhere else
        save_quantized(ours, tmp_path / "refused")


def test_a_conversion_that_reads_the_built_shape_loads_4bit_experts(tmp_path, tiny_tokenizer):
    """Qwen3-VL-MoE's conversion transposes a stored expert weight only when its shape differs from the
    model's parameter (``Transpose(check_dims=True)`` reads the model): with the experts already 4-bit, that
    parameter was gone and every load was refused ("`down_proj` is not an nn.Parameter"). The 4-bit model is
    transformers' model on the dequantized weights."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from qlora.model.merge import merged_tensors

    if "qwen3_vl_moe" not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no Qwen3-VL-MoE models")
    v = len(tiny_tokenizer)
    text = dict(vocab_size=v + 8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                max_position_embeddings=256, pad_token_id=tiny_tokenizer.pad_token_id)
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  deepstack_visual_indexes=[0], num_position_embeddings=16)
    config = AutoConfig.for_model("qwen3_vl_moe", text_config=text, vision_config=vision, image_token_id=v,
                                  video_token_id=v + 1, vision_start_token_id=v + 2, vision_end_token_id=v + 3)
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path, quant="nf4", compute_dtype=torch.float32, device="cpu")
    assert any(isinstance(m, Experts4bit) for m in ours.modules())
    ref = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ref.load_state_dict({k: make() for k, _, make in merged_tensors(ours)})
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(_IDS).logits, ref(_IDS).logits, rtol=1e-5, atol=1e-5)


def test_a_conversion_split_into_several_targets_loads_4bit(tmp_path, tiny_tokenizer):
    """Sarvam-MoE's files hold one fused ``query_key_value`` that transformers' ``Split`` cuts into q/k/v by the
    rows of each target parameter: only the first target's build shape was kept, the others had become 4-bit
    layers, and every load was refused ("`weight` is not an nn.Parameter"). The 4-bit model is transformers'
    model on the dequantized weights."""
    from transformers import AutoConfig

    from qlora.model.merge import merged_tensors

    if "sarvam_moe" not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no Sarvam-MoE models")
    config = AutoConfig.for_model("sarvam_moe", vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                                  moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                                  topk_group=1, first_k_dense_replace=1, max_position_embeddings=256,
                                  pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    ours, _ = load_model(tmp_path, quant="nf4", compute_dtype=torch.float32, device="cpu")
    assert isinstance(ours.model.layers[0].self_attn.k_proj, Linear4bit)
    ref = _reference(tmp_path)
    ref.load_state_dict({k: make() for k, _, make in merged_tensors(ours)})
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(_IDS).logits, ref(_IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["deepseek_v3", "glm4_moe"])
def test_merge_in_bf16_keeps_the_router_in_fp32_as_transformers_does(tmp_path, saved, model_type):
    """Their classes keep the router (gate.weight) and e_score_correction_bias in fp32 at any dtype: the merged bf16
    folder stores each tensor in the dtype transformers' own bf16 save does, the fp32 ones as the base holds them."""
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open

    from qlora.cli.main import main

    path = saved(model_type)
    get_peft_model(_reference(path), LoraConfig(r=4, target_modules=["o_proj"], init_lora_weights=False)
                   ).save_pretrained(tmp_path / "adapter")
    assert main(["merge", "--model", str(path), "--adapter", str(tmp_path / "adapter"), "--output",
                 str(tmp_path / "merged"), "--dtype", "bf16"]) == 0
    transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(tmp_path / "hf")

    def stored(folder):
        with safe_open(next(folder.glob("*.safetensors")), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    ours, theirs, base = stored(tmp_path / "merged"), stored(tmp_path / "hf"), stored(path)
    assert {k: t.dtype for k, t in ours.items()} == {k: t.dtype for k, t in theirs.items()}
    kept = [k for k, t in theirs.items() if t.dtype == torch.float32]
    assert kept and all(torch.equal(ours[k], base[k]) for k in kept)


@pytest.mark.parametrize("key, cut", [("model.layers.1.mlp.experts.down_proj", "column"),
                                      ("model.layers.1.mlp.experts.gate_up_proj", "expert"),
                                      ("model.layers.1.self_attn.q_proj.weight", "column")])
def test_a_weight_of_the_wrong_shape_is_refused_naming_its_file_and_tensor(tmp_path, saved, capsys, key, cut):
    """A stacked expert weight (or a 2-D linear weight) whose shape the model built from config.json does not have:
    ``qlora train`` exits 2 with one paragraph naming the file, the tensor and both shapes, without a traceback."""
    folder, tensors, expected, message = _train_damaged(tmp_path, saved("gpt_oss"), capsys, key, cut)
    assert f"{folder / 'model.safetensors'}: tensor {key} " in message
    assert str(tuple(tensors[key].shape)) in message and "config.json do not belong together" in message
    assert str(expected) in message or "x".join(map(str, expected)) in message


def test_one_expert_of_another_shape_in_a_per_expert_checkpoint_is_named(tmp_path, saved, capsys):
    """Mixtral's and Qwen3-MoE's hub layout (one tensor per expert, stacked on load): the expert whose shape differs
    from its siblings' is named with both shapes, not as a transformers version qlora does not support."""
    key = "model.layers.1.mlp.experts.1.down_proj.weight"
    _, tensors, expected, message = _train_damaged(tmp_path, saved("qwen3_moe"), capsys, key, "column")
    assert f"checkpoint tensor {key} has shape {tuple(tensors[key].shape)}" in message
    assert f"have {expected}" in message and "transformers version" not in message


def _train_damaged(tmp_path, model, capsys, key: str, cut: str):
    """``qlora train`` on a copy of ``model`` whose tensor ``key`` lost its last column or expert: the damaged
    folder, its tensors, the shape ``key`` had and the one-paragraph error (exit 2, no traceback)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from cli_exit import cli_exit

    folder = tmp_path / "damaged"
    shutil.copytree(model, folder)
    tensors = load_file(folder / "model.safetensors")
    expected = tuple(tensors[key].shape)
    tensors[key] = (tensors[key][..., :-1] if cut == "column" else tensors[key][:-1]).contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {a} plus 2?", "output": f"{a + 2}."}) + "\n"
                            for a in range(4)))
    code, stderr = cli_exit(["train", "--model", str(folder), "--data", str(data), "--output", str(tmp_path / "out"),
                             "--seq-len", "32", "--max-steps", "1", "--no-progress"], capsys)
    message = stderr.strip()
    assert code == 2 and "Traceback" not in stderr and "\n" not in message, stderr
    return folder, tensors, expected, message


def test_quantize_refuses_llama4_whose_experts_transformers_rebuilds_on_loading(tmp_path, saved, capsys):
    """transformers + bitsandbytes replaces Llama 4's fused experts by one linear layer per expert before it loads
    a 4-bit file, then finds none of their weights in a file written as its own save_pretrained writes it (it
    failed: "'normal_kernel_cpu' not implemented for 'Byte'"): `qlora quantize` says so instead of writing it."""
    from qlora.cli.main import main

    path = saved("llama4_text")
    assert main(["quantize", "--model", str(path), "--output", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "Llama4TextExperts" in err and "Traceback" not in err and not (tmp_path / "q").exists()
