"""qlora's streaming loader builds the same model as transformers' ``from_pretrained``
across architectures beyond the tiny builder's: other attention layouts, Conv1D
layers, fused QKV, hybrid attention/Mamba layers whose buffers are computed by
a model-level initializer (Falcon-H1's muP vector)."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from qlora.model.load import load_model
from qlora.nn import Linear4bit

from bnb_oracle import reference_path

ARCHS = ("falcon_h1", "olmo2", "cohere", "bloom", "opt", "phi", "starcoder2", "stablelm", "gpt_bigcode", "lfm2")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_tokenizer):
    def build(arch: str):
        d = tmp_path_factory.mktemp(arch)
        config = AutoConfig.for_model(
            arch, vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256,
            bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
            pad_token_id=tiny_tokenizer.pad_token_id)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(d)
        tiny_tokenizer.save_pretrained(d)
        return d
    return build


def train_losses(model, ids: torch.Tensor, steps: int) -> list[float]:
    """Train ``model``'s trainable parameters on ``ids`` (AdamW, lr 1e-2); the loss of each step."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _loads_as_transformers(d):
    """qlora's 16-bit load of ``d`` has transformers' buffers and logits; returns transformers' model."""
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ours, _ = load_model(d, quant=None, compute_dtype=torch.float32, device="cpu")
    ref_buffers = dict(ref.named_buffers())
    for name, buf in ours.named_buffers():
        assert torch.equal(buf, ref_buffers[name]), f"{d.name}: buffer {name} differs from transformers'"
    x = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        assert torch.equal(ours(x).logits, ref(x).logits)
    return ref


@pytest.mark.parametrize("arch", ARCHS)
def test_load_matches_transformers(arch, saved):
    d = saved(arch)
    ref = _loads_as_transformers(d)
    x = torch.randint(3, 200, (2, 12))

    q, _ = load_model(d, quant="nf4", compute_dtype=torch.float32, device="cpu")
    assert any(isinstance(m, Linear4bit) for m in q.modules())
    with torch.no_grad():
        logits = q(x).logits
    assert torch.isfinite(logits).all()
    assert (logits - ref(x).logits).abs().max() < 0.5 * ref(x).logits.abs().max()


def test_layers_whose_weight_the_model_reads_stay_dense_and_round_trip(saved, tmp_path):
    """Falcon-H1's Mamba mixer hands ``out_proj.weight`` to a fused kernel instead of calling
    the layer: it stays 16-bit and outside all-linear, and the bitsandbytes-format checkpoint
    says so, so transformers + bitsandbytes rebuilds the same model."""
    pytest.importorskip("bitsandbytes")
    from qlora.model.inject import add_lora
    from qlora.model.quantize import kept_dense_names
    from qlora.model.quantized_io import save_quantized

    d = saved("falcon_h1")
    model, tok = load_model(d, quant="nf4", compute_dtype=torch.float32, device="cpu")
    dense = kept_dense_names(model)
    assert {"model.layers.0.mamba.out_proj", "model.layers.1.mamba.out_proj", "lm_head"} <= dense
    assert isinstance(model.model.layers[0].mamba.out_proj, torch.nn.Linear)
    assert isinstance(model.model.layers[0].self_attn.o_proj, Linear4bit)
    save_quantized(model, tmp_path / "q4", tok)
    theirs = reference_path(AutoModelForCausalLM.from_pretrained(tmp_path / "q4", device_map="cpu",
                                                                 dtype=torch.float32))
    x = torch.randint(3, 200, (1, 10))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, theirs(x).logits.float(), atol=1e-5)

    add_lora(model, r=4)
    model.train()
    loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    adapted = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert not any(".mamba.out_proj" in n for n in adapted) and any("o_proj" in n for n in adapted)


def test_linear_subclasses_that_compute_a_linear_are_quantized_and_adapted(tmp_path, tiny_tokenizer):
    """Falcon's layers are ``FalconLinear`` (an nn.Linear subclass with its own, equivalent
    forward): 4-bit and all-linear targets like plain nn.Linear; a router subclass is not."""
    from transformers import FalconConfig
    from transformers.models.phimoe.modeling_phimoe import PhimoeTopKRouter

    from qlora.model.inject import add_lora
    from qlora.model.quantize import is_plain_linear
    from qlora.nn import LoraLinear

    config = FalconConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_kv_heads=2, new_decoder_architecture=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path, quant="nf4", compute_dtype=torch.float32, device="cpu")
    block = model.transformer.h[0]
    assert isinstance(block.self_attention.query_key_value, Linear4bit)
    assert isinstance(block.mlp.dense_4h_to_h, Linear4bit)
    add_lora(model, r=4)
    assert isinstance(block.self_attention.dense, LoraLinear) and isinstance(block.mlp.dense_h_to_4h, LoraLinear)
    router = PhimoeTopKRouter.__new__(PhimoeTopKRouter)
    torch.nn.Linear.__init__(router, 8, 4)
    assert not is_plain_linear(router)


def test_routers_inside_gate_modules_and_self_cast_layers_stay_dense(tmp_path, tiny_tokenizer):
    """Hunyuan's router is ``mlp.gate.wg`` (inside a gate module, one output per expert) and its code reads
    ``wg.weight.dtype``; DeepSeek-V3.2's indexer runs ``weights_proj(x.to(weights_proj.weight.dtype))``: a
    packed uint8 weight would cast the input to bytes. Both stay 16-bit and out of all-linear; the indexer's
    other layers are 4-bit but not adapted (it only ranks keys, so no gradient reaches it)."""
    from qlora.model.inject import add_lora
    from qlora.nn import LoraLinear

    kw = dict(vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=128, head_dim=16, bos_token_id=tiny_tokenizer.bos_token_id,
              eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    dirs = {}
    for arch, extra in (("hunyuan_v1_moe", dict(num_experts=4, moe_topk=2, moe_intermediate_size=32)),
                        ("deepseek_v32", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                              q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                                              qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1))):
        config = AutoConfig.for_model(arch, **kw, **extra)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / arch)
        tiny_tokenizer.save_pretrained(tmp_path / arch)
        dirs[arch] = tmp_path / arch

    model, _ = load_model(dirs["deepseek_v32"], compute_dtype=torch.float32, device="cpu")
    indexer = model.model.layers[0].self_attn.indexer
    assert type(indexer.weights_proj) is torch.nn.Linear and isinstance(indexer.wq_b, Linear4bit)
    add_lora(model, r=4, verbose=False)  # the indexer returns top-k indices: no gradient, so no adapter
    assert isinstance(indexer.wq_b, Linear4bit) and isinstance(model.model.layers[0].self_attn.q_b_proj, LoraLinear)

    model, _ = load_model(dirs["hunyuan_v1_moe"], compute_dtype=torch.float32, device="cpu")
    mlp = model.model.layers[0].mlp
    assert type(mlp.gate.wg) is torch.nn.Linear
    add_lora(model, r=4, verbose=False)
    assert type(mlp.gate.wg) is torch.nn.Linear
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoraLinear) and q.weight is q.base_layer.weight  # PEFT's layers expose it too
    model.train()
    x = torch.randint(3, 200, (2, 10))
    loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss) and q.lora_B["default"].weight.grad.abs().sum() > 0


def test_gemma3n_loads_as_transformers_does_and_trains_every_path(tmp_path, tiny_tokenizer):
    """Gemma 3n's initializer fills the text model's buffers from attributes of the inner text model,
    which transformers reaches by dispatching to the innermost ``PreTrainedModel``; KV-shared layers,
    AltUp streams, LAuReL and per-layer inputs all load and get gradients through 4-bit LoRA."""
    from qlora.model.inject import add_lora

    n = len(tiny_tokenizer)
    config = AutoConfig.for_model(
        "gemma3n_text", vocab_size=n, vocab_size_per_layer_input=n, hidden_size=64, hidden_size_per_layer_input=16,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2, sliding_window=16,
        activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0], laurel_rank=8, altup_num_inputs=4,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    for layer in model.model.layers:  # zero at random init, which would cut the per-layer-input path
        torch.nn.init.normal_(layer.altup.correct_output_scale, std=0.5)
    model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)

    _loads_as_transformers(tmp_path)
    x = torch.randint(3, 200, (2, 12))

    q, _ = load_model(tmp_path, compute_dtype=torch.float32, device="cpu")
    add_lora(q, r=4, dropout=0.0, verbose=False)
    q.train()
    q(x, labels=x).loss.backward()
    layers = dict(q.named_modules())
    assert "model.layers.0.per_layer_input_gate" in layers and "model.layers.0.laurel.linear_left" in layers
    for name in ("model.layers.0.per_layer_input_gate", "model.layers.0.laurel.linear_left",
                 "model.layers.1.self_attn.k_proj"):
        assert layers[name].lora_B["default"].weight.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch,extra", [
    ("deepseek_v3", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, q_lora_rank=32,
                         kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
                         topk_group=1, first_k_dense_replace=1)),
    ("ernie4_5_moe", dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_layer_start_index=1)),
])
def test_tensors_the_model_keeps_in_fp32_stay_fp32_under_bf16(arch, extra, tmp_path, tiny_tokenizer):
    """``_keep_in_fp32_modules_strict`` (DeepSeek-V3's expert-bias correction, Ernie 4.5's router): fp32 as in
    transformers' bf16 load, so routing is decided as there; such a linear layer is not quantized."""
    config = AutoConfig.for_model(
        arch, vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id, **extra)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    expected = {n: t.dtype for n, t in (*ref.named_parameters(), *ref.named_buffers())}
    assert torch.float32 in expected.values()
    ours, _ = load_model(tmp_path, quant=None, compute_dtype=torch.bfloat16, device="cpu")
    got = {n: t.dtype for n, t in (*ours.named_parameters(), *ours.named_buffers()) if n in expected}
    assert got == {n: expected[n] for n in got}
    q, _ = load_model(tmp_path, compute_dtype=torch.bfloat16, device="cpu")
    fp32 = [n for n, t in (*q.named_parameters(), *q.named_buffers()) if t.dtype == torch.float32 and n in expected]
    assert fp32 and sorted(fp32) == sorted(n for n, d in expected.items() if d == torch.float32), fp32
    x = torch.randint(3, 200, (1, 10))
    with torch.no_grad():
        assert torch.isfinite(q(x).logits).all()


def test_layers_the_model_rescales_in_place_stay_dense_and_train_merge_as_transformers(tmp_path, tiny_tokenizer):
    """RWKV divides ``attention.output`` and ``feed_forward.value`` weights by 2**(layer // rescale_every) in
    place when it enters inference and multiplies them back for training: 4-bit codes cannot take that and an
    adapter there would not follow it, so those layers stay 16-bit and unadapted; the rest is 4-bit with LoRA,
    inference matches transformers', training lowers the loss, and the merged model is the adapter model."""
    import qlora
    from qlora.model.inject import add_lora
    from qlora.nn import LoraLinear

    config = AutoConfig.for_model(
        "rwkv", vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2, attention_hidden_size=64,
        intermediate_size=128, context_length=64, rescale_every=1, bos_token_id=tiny_tokenizer.bos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "rwkv")
    tiny_tokenizer.save_pretrained(tmp_path / "rwkv")
    ref = _loads_as_transformers(tmp_path / "rwkv")  # eval: both rescale block 1 by 1/2
    x = torch.randint(3, 200, (2, 12))

    model, tok = load_model(tmp_path / "rwkv", compute_dtype=torch.float32, device="cpu")
    block = model.rwkv.blocks[1]
    assert type(block.attention.output) is torch.nn.Linear and type(block.feed_forward.value) is torch.nn.Linear
    assert isinstance(block.attention.key, Linear4bit)
    model.eval()
    with torch.no_grad():
        expected = ref(x).logits
        assert (model(x).logits - expected).abs().max() < 0.5 * expected.abs().max()

    add_lora(model, r=4, dropout=0.0, verbose=False)
    assert isinstance(block.attention.key, LoraLinear) and type(block.attention.output) is torch.nn.Linear
    eval_scaled = ref.rwkv.blocks[1].attention.output.weight.detach().clone()
    ref.train()
    ref(x)  # transformers multiplies the eval-scaled weight back for training
    losses = train_losses(model, x, steps=6)
    assert losses[-1] < losses[0] - 0.05, losses
    torch.testing.assert_close(block.attention.output.weight, ref.rwkv.blocks[1].attention.output.weight)
    assert not torch.equal(eval_scaled, block.attention.output.weight)  # so the check above sees the scaling

    qlora.save_adapter(model, tmp_path / "adapter")
    qlora.merge(model, dtype=torch.float32)
    qlora.save_merged(model, tmp_path / "merged", tok)
    adapted, _ = load_model(tmp_path / "rwkv", compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(adapted, tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    adapted.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapted(x).logits, rtol=1e-4, atol=1e-4)


def test_4bit_layers_tied_across_layers_share_codes_and_adapt_per_layer(tmp_path, tiny_tokenizer):
    """Zamba runs one transformer block in all its hybrid layers; the checkpoint stores it once and
    transformers ties the others to it by a pattern. The 4-bit copies share codes and constants (the
    checkpoint lacks theirs), each layer gets its own adapter as PEFT gives it, and the merged model,
    whose shared layers now differ, is the adapter model in transformers."""
    import qlora
    from qlora.model.inject import add_lora

    config = AutoConfig.for_model(
        "zamba", vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, attention_hidden_size=128, attention_head_dim=32,
        n_mamba_heads=2, mamba_dt_rank=8, attn_layer_period=2, attn_layer_offset=1,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id)
    assert config.layers_block_type.count("hybrid") == 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "zamba")
    tiny_tokenizer.save_pretrained(tmp_path / "zamba")
    ref = _loads_as_transformers(tmp_path / "zamba")
    x = torch.randint(3, 200, (2, 12))

    model, tok = load_model(tmp_path / "zamba", compute_dtype=torch.float32, device="cpu")
    first, second = (model.model.layers[i].shared_transf.self_attn.q_proj for i in (2, 4))
    assert isinstance(first, Linear4bit) and first is not second
    assert first.weight.data_ptr() == second.weight.data_ptr() and torch.equal(first.absmax, second.absmax)
    with torch.no_grad():
        expected = ref(x).logits
        assert (model(x).logits - expected).abs().max() < 0.5 * expected.abs().max()

    add_lora(model, r=4, dropout=0.0, verbose=False)
    losses = train_losses(model, x, steps=5)
    assert losses[-1] < losses[0] - 0.05, losses
    a, b = (model.model.layers[i].shared_transf.self_attn.q_proj.lora_B["default"].weight for i in (2, 4))
    assert a.abs().sum() > 0 and b.abs().sum() > 0 and not torch.equal(a, b)

    model.eval()
    with torch.no_grad():
        adapted = model(x).logits
    qlora.merge(model, dtype=torch.float32)
    qlora.save_merged(model, tmp_path / "merged", tok)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, adapted, rtol=1e-4, atol=1e-4)


def test_weight_reads_the_config_rules_out_do_not_keep_layers_dense(tmp_path, tiny_tokenizer):
    """BLOOM slices ``dense.weight`` and ``dense_4h_to_h.weight`` only ``if self.pretraining_tp > 1 and
    self.slow_but_exact``. With that branch off (as in BLOOM's own checkpoints) every layer is 4-bit and
    all-linear adapts what PEFT's does; with it on, those layers stay dense."""
    from peft import LoraConfig, get_peft_model
    from qlora.model.inject import add_lora
    from qlora.model.quantize import kept_dense_names

    for exact in (False, True):
        config = AutoConfig.for_model("bloom", vocab_size=len(tiny_tokenizer), hidden_size=64, n_layer=2, n_head=4,
                                      pretraining_tp=2, slow_but_exact=exact)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / str(exact))
        tiny_tokenizer.save_pretrained(tmp_path / str(exact))
        model, _ = load_model(tmp_path / str(exact), compute_dtype=torch.float32, device="cpu")
        sliced = {"transformer.h.0.self_attention.dense", "transformer.h.1.mlp.dense_4h_to_h"}
        assert (sliced <= kept_dense_names(model)) is exact
        assert isinstance(model.transformer.h[0].mlp.dense_4h_to_h, Linear4bit) is not exact
        add_lora(model, r=4, alpha=8, verbose=False)
        ours = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
        ref = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / str(exact), dtype=torch.float32),
                             LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        peft_targets = {n.split("base_model.model.", 1)[1].rsplit(".lora_A", 1)[0]
                        for n, _ in ref.named_parameters() if ".lora_A" in n}
        assert (ours == peft_targets) is not exact
        assert (ours | sliced | {"transformer.h.0.mlp.dense_4h_to_h", "transformer.h.1.self_attention.dense"}
                == peft_targets)


def test_a_tied_head_registered_before_its_embedding_is_stored_and_read_under_either_name(tmp_path, tiny_tokenizer):
    """XLM-RoBERTa's causal LM registers ``lm_head`` before ``roberta``, so the tied tensor's first
    name is the tie's target, ``lm_head.decoder.weight``. qlora's 4-bit checkpoint stores it as
    transformers does, under the embedding's name; and a file that stores it under the head's name
    loads as transformers loads it (which ties towards whichever name the file holds)."""
    from safetensors.torch import load_file, save_file

    from qlora.model.quantized_io import save_quantized

    config = AutoConfig.for_model(
        "xlm-roberta", vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=256, is_decoder=True,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    x = torch.randint(3, 200, (2, 12))

    model, tok = load_model(tmp_path / "base", compute_dtype=torch.float32, device="cpu")
    save_quantized(model, tmp_path / "q4", tok)
    stored = load_file(tmp_path / "q4" / "model.safetensors")
    assert "roberta.embeddings.word_embeddings.weight" in stored and "lm_head.decoder.weight" not in stored
    reloaded, _ = load_model(tmp_path / "q4", compute_dtype=torch.float32, device="cpu")
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)

    tensors = load_file(tmp_path / "base" / "model.safetensors")
    tensors["lm_head.decoder.weight"] = tensors.pop("roberta.embeddings.word_embeddings.weight")
    save_file(tensors, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    if any(p.is_meta for p in theirs.parameters()):  # transformers 4.x ties towards the embedding's name only
        pytest.skip(f"transformers {__import__('transformers').__version__} leaves this file's tied weights "
                    "unloaded itself")
    ref = _loads_as_transformers(tmp_path / "base")
    assert ref.lm_head.decoder.weight is ref.roberta.embeddings.word_embeddings.weight


def test_a_4bit_layer_whose_file_name_lacks_weight_is_read_packed(tmp_path, tiny_tokenizer):
    """Inkling 2 stores its short-conv ``weight_proj`` layer under the module's name (``sconv.weight_proj``,
    renamed to ``sconv.weight_proj.weight`` on load), so its 4-bit quant state is ``sconv.weight_proj.absmax``,
    with no ``.weight.`` in the file's key; its head is stored padded to ``vocab_size`` and unpadded on load
    (transformers' converter, which qlora applies too). qlora's 4-bit checkpoint of it loads back packed, with the
    logits of the 16-bit original loaded in 4 bits, and transformers + bitsandbytes reads the same model
    from it (experts 16-bit, as it keeps them)."""
    pytest.importorskip("bitsandbytes")
    from safetensors import safe_open

    from qlora.model.quantized_io import save_quantized

    config = AutoConfig.for_model(
        "inkling2_text", vocab_size=len(tiny_tokenizer) + 5, unpadded_vocab_size=len(tiny_tokenizer), hidden_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
        layer_types=["hybrid_sliding", "hybrid"], max_position_embeddings=256,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    model, tok = load_model(tmp_path / "base", compute_dtype=torch.float32, device="cpu", quantize_experts=False)
    save_quantized(model, tmp_path / "q4", tok)
    with safe_open(tmp_path / "q4" / "model.safetensors", "pt") as f:
        assert any(k.endswith("sconv.weight_proj.absmax") for k in f.keys())

    reloaded, _ = load_model(tmp_path / "q4", compute_dtype=torch.float32, device="cpu")
    proj = [m for n, m in reloaded.named_modules() if n.endswith("sconv.weight_proj")]
    assert proj and all(isinstance(m, Linear4bit) for m in proj)
    direct, _ = load_model(tmp_path / "base", compute_dtype=torch.float32, device="cpu")  # experts 4-bit too
    x = torch.randint(3, 200, (1, 10))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, direct(x).logits)
    theirs = reference_path(AutoModelForCausalLM.from_pretrained(tmp_path / "q4", device_map="cpu",
                                                                 dtype=torch.float32))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits.float(), model(x).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("is_decoder", [False, True])
def test_an_encoder_family_loaded_as_a_causal_lm_without_is_decoder_is_named(tmp_path, tiny_tokenizer, caplog,
                                                                              is_decoder):
    """BERT-family causal-LM heads attend to later tokens unless the config says is_decoder: the load says so
    (and the model does see the future: the first position's logits change with the last token)."""
    if "is_decoder" not in inspect.signature(type(AutoConfig.for_model("bert")).__init__).parameters:
        pytest.skip("transformers 4.x gives every config is_decoder; qlora cannot tell an encoder family from it")
    config = AutoConfig.for_model(
        "bert", vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=256, is_decoder=is_decoder,
        pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        model, _ = load_model(tmp_path, quant=None, compute_dtype=torch.float32, device="cpu")
    named = [r.getMessage() for r in caplog.records if "is_decoder" in r.getMessage()]
    x = torch.randint(3, 200, (1, 8))
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 200 + 3
    with torch.no_grad():
        sees_future = not torch.equal(model(x).logits[0, 0], model(y).logits[0, 0])
    assert sees_future is not is_decoder
    assert bool(named) is sees_future, named
    if named:
        assert str(tmp_path) in named[0] and "bert" in named[0]


def test_decoder_only_configs_are_not_named_as_attending_both_ways():
    from qlora.model.load import attends_to_later_tokens

    assert not attends_to_later_tokens(AutoConfig.for_model("llama"))
    assert not attends_to_later_tokens(AutoConfig.for_model("t5"))  # encoder-decoder: not loaded as a causal LM


def test_a_block_shared_by_several_layers_loads_from_any_of_its_names(tmp_path, tiny_tokenizer):
    """Zamba runs one attention block in all its hybrid layers: one module object under several names in
    transformers 4.x (its file stores the weights under the last name), tied copies in 5.x. Under 4.57 the 4-bit
    load refused the file ("shape (64, 128) where the model ... expects (4096, 1)"): the quantized layer was
    looked up under its first name only. Both load, 16-bit as transformers and 4-bit as transformers computes
    on the dequantized weights."""
    import qlora

    config = AutoConfig.for_model(
        "zamba", vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=128, max_position_embeddings=256, attn_layer_period=1,
        attn_layer_offset=0, attention_hidden_size=128, attention_head_dim=32, mamba_dt_rank=8, mamba_d_state=8,
        use_mamba_kernels=False, pad_token_id=tiny_tokenizer.pad_token_id)  # layers: Mamba, Mamba, hybrid, hybrid
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    _loads_as_transformers(tmp_path / "m")
    q, tok = load_model(tmp_path / "m", quant="nf4", compute_dtype=torch.float32, device="cpu")
    shared = [n for n, m in q.named_modules(remove_duplicate=False) if n.endswith("shared_transf.self_attn.q_proj")]
    assert len(shared) == 2 and all(isinstance(q.get_submodule(n), Linear4bit) for n in shared)
    x = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        logits = q(x).logits
    qlora.merge(q, dtype=torch.float32)
    qlora.save_merged(q, tmp_path / "deq", tok)
    deq = AutoModelForCausalLM.from_pretrained(tmp_path / "deq", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(logits, deq(x).logits, atol=1e-5)


def test_layers_transformers_keeps_in_high_precision_stay_16_bit_as_bitsandbytes_keeps_them(tmp_path, tiny_tokenizer):
    """DeepSeek-V4 names its attention compressor's projections in ``_keep_in_fp32_modules``, and transformers +
    bitsandbytes never quantizes such layers: qlora's 4-bit layers are exactly bitsandbytes' (before, it packed the
    five projections too) and the folder `qlora quantize` writes loads in transformers (before: refused, "size
    mismatch ... ckpt: torch.Size([512, 1]) vs model: torch.Size([16, 64])") with qlora's logits."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    bnb = pytest.importorskip("bitsandbytes")
    if "deepseek_v4" not in CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no DeepSeek-V4")
    from transformers import BitsAndBytesConfig

    from qlora.cli.main import main

    config = AutoConfig.for_model(
        "deepseek_v4", vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, q_lora_rank=64, qk_rope_head_dim=8, moe_intermediate_size=128,
        n_routed_experts=4, num_experts_per_tok=2, index_head_dim=16, index_n_heads=2, index_topk=4, sliding_window=8,
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention"], mlp_layer_types=["hash_moe", "moe"],
        max_position_embeddings=256, bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32, device_map="cpu",
                                                  quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    packed = {n for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert any(n.endswith("compressor.kv_proj") and type(m) is torch.nn.Linear for n, m in theirs.named_modules())
    ours, _ = load_model(tmp_path / "base", compute_dtype=torch.float32, device="cpu", quantize_experts=False)
    assert {n for n, m in ours.named_modules() if isinstance(m, Linear4bit)} == packed
    assert main(["quantize", "--model", str(tmp_path / "base"), "--output", str(tmp_path / "q4"),
                 "--compute-dtype", "fp32"]) == 0
    x = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    loaded = reference_path(AutoModelForCausalLM.from_pretrained(tmp_path / "q4", dtype=torch.float32,
                                                                 device_map="cpu")).eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, ours(input_ids=x).logits, rtol=1e-4, atol=1e-4)
