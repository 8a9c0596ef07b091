"""``qlora export --format gguf-lora``: the adapter alone as a GGUF LoRA adapter.

The oracle is transformers' base model with PEFT's adapter; the consumer llama.cpp itself (llama-cpp-python's
``lora_path``) applying the adapter file to the base model's f32 GGUF. Refusals are checked by their message.
"""

from __future__ import annotations

import pytest
import torch

from qlora.cli.main import main
from qlora.model.tiny import build_tiny_model
from test_export_llama_cpp import _greedy

gguf = pytest.importorskip("gguf")
peft = pytest.importorskip("peft")

PROMPT = "The quick brown fox jumps over the lazy dog. Question: what is two plus two?"
# llama.cpp's CPU GELU reads a 16-bit table (the merged export's tests measure up to 8e-4); SiLU models ~1e-6
GELU = ("gemma2", "gemma3")


def _peft_adapter(model_dir, out, seed: int = 0, **lora):
    """A PEFT LoRA adapter with random non-zero B saved to ``out``; returns the PEFT model (f32, eval)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **lora})
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    return model.eval()


def _export(model_dir, adapter, out, *extra) -> int:
    return main(["export", "--format", "gguf-lora", "--model", str(model_dir), "--adapter", str(adapter),
                 "--output", str(out), *extra])


def _run_in_llama_cpp(tmp_path, model_dir, adapter_gguf, ids, n: int, f32_cache: bool = True):
    llama_cpp = pytest.importorskip("llama_cpp")
    base = tmp_path / "base"
    if not base.exists():
        assert main(["export", "--model", str(model_dir), "--output", str(base), "--type", "f32"]) == 0
    kw = dict(type_k=0, type_v=0) if f32_cache else {}
    llm = llama_cpp.Llama(model_path=str(base / "model-f32.gguf"), lora_path=str(adapter_gguf), n_ctx=128,
                          n_threads=2, logits_all=True, verbose=False, **kw)
    llm.eval(ids)
    scores = torch.tensor(llm.scores[: len(ids)])
    llm.reset()
    tokens = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        tokens.append(token)
        if len(tokens) == n:
            break
    return scores, tokens


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


ARCHS = {
    "llama": {},  # Q/K rows reordered for interleaved RoPE: B's rows with them
    "qwen2": {},  # Q/K/V biases in the base, NeoX RoPE
    "qwen3": {},  # Q/K norms
    "phi3": {},  # fused qkv_proj and gate_up_proj, written fused
    "gemma2": dict(head_dim=256, tie_word_embeddings=True),
    "gemma3": dict(head_dim=256, tie_word_embeddings=True),
}


@pytest.mark.slow  # llama.cpp runs the files
@torch.no_grad()
@pytest.mark.parametrize("arch", list(ARCHS))
def test_llama_cpp_applies_the_adapter_as_peft_does(tmp_path, tiny_tokenizer, arch):
    model_dir = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer, arch=arch, initializer_range=0.1,
                                 **ARCHS[arch])
    model = _peft_adapter(model_dir, tmp_path / "adapter")
    assert _export(model_dir, tmp_path / "adapter", tmp_path / "out", "--type", "f32") == 0
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    expected = model(torch.tensor([ids])).logits[0]
    with model.disable_adapter():
        base_logits = model(torch.tensor([ids])).logits[0]
    assert _relative(base_logits, expected) > 1e-2  # the adapter matters: a missing one would fail below

    tokens, margin = _greedy(model, ids, 12)
    got, got_tokens = _run_in_llama_cpp(tmp_path, model_dir, tmp_path / "out" / "adapter-f32.gguf", ids, 12)
    error = _relative(got, expected)
    assert error < (2e-3 if arch in GELU else 1e-5)
    assert margin > 2 * error  # no near-tie this error could flip: equal tokens are a real check
    assert got_tokens == tokens


# Layouts whose base tensors get other row transforms: fused QKV regrouped per key/value head (GPT-NeoX per head,
# Falcon 40B per group), GPT-2's Conv1D stored [in, out], Granite MoE's shared fused input_linear split in two
LAYOUTS = {"gpt_neox": {}, "falcon-40b": dict(new_decoder_architecture=True, num_kv_heads=2),
           "gpt2": dict(tie_word_embeddings=False),
           "granitemoeshared": dict(shared_intermediate_size=32)}


@pytest.mark.slow  # llama.cpp runs the files
@torch.no_grad()
@pytest.mark.parametrize("model_type", list(LAYOUTS))
def test_fused_split_and_transposed_layouts(tmp_path, tiny_tokenizer, model_type):
    from tiny_moe import save_tiny_moe

    model_dir = save_tiny_moe(tmp_path / "m", tiny_tokenizer, model_type.split("-")[0], **LAYOUTS[model_type])
    model = _peft_adapter(model_dir, tmp_path / "adapter")
    assert _export(model_dir, tmp_path / "adapter", tmp_path / "out", "--type", "f32") == 0
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    expected = model(torch.tensor([ids])).logits[0]
    tokens, margin = _greedy(model, ids, 12)
    got, got_tokens = _run_in_llama_cpp(tmp_path, model_dir, tmp_path / "out" / "adapter-f32.gguf", ids, 12)
    error = _relative(got, expected)
    assert error < (1e-5 if model_type == "granitemoeshared" else 2e-3)  # llama.cpp's GELU table (see GELU)
    assert margin > 2 * error
    assert got_tokens == tokens


def test_expert_lora_is_refused(tmp_path, tiny_tokenizer, capsys):
    from tiny_moe import save_tiny_moe

    model_dir = save_tiny_moe(tmp_path / "m", tiny_tokenizer, "qwen3_moe")
    _peft_adapter(model_dir, tmp_path / "adapter", target_modules=["q_proj"],
                  target_parameters=["mlp.experts.gate_up_proj"])
    assert _export(model_dir, tmp_path / "adapter", tmp_path / "out") == 2
    assert "parameters of MoE experts or routers (target_parameters)" in capsys.readouterr().err


def _gguf_tensors(path) -> dict[str, torch.Tensor]:
    return {t.name: torch.from_numpy(t.data.copy()).float() for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("model_type", ["llama", "llama-head", "phi3", "gemma2", *LAYOUTS])
def test_base_plus_adapter_is_the_merged_export_tensor_for_tensor(tmp_path, tiny_tokenizer, model_type):
    """Without llama.cpp: in the files' own layout, base + alpha / r * lora_b @ lora_a is the merged export of the
    same 32-bit base (whose layout the merged export's tests check), for every adapted tensor, and nothing else
    differs."""
    from tiny_moe import save_tiny_moe

    lora = dict(r=4, lora_alpha=12, rank_pattern={"o_proj": 2})
    if model_type == "llama-head":  # an untied output layer adapted too: output.weight
        model_dir = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer, tie_word_embeddings=False)
        lora["target_modules"] = ["q_proj", "v_proj", "o_proj", "lm_head"]
    elif model_type in ARCHS:
        model_dir = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer, arch=model_type, **ARCHS[model_type])
    else:
        model_dir = save_tiny_moe(tmp_path / "m", tiny_tokenizer, model_type.split("-")[0], **LAYOUTS[model_type])
    _peft_adapter(model_dir, tmp_path / "adapter", **lora)
    assert _export(model_dir, tmp_path / "adapter", tmp_path / "lora", "--type", "f32") == 0
    for out, adapter in (("base", []), ("merged", ["--adapter", str(tmp_path / "adapter")])):
        assert main(["export", "--model", str(model_dir), *adapter, "--quant", "none", "--output", str(tmp_path / out),
                     "--type", "f32"]) == 0
    base, merged = (_gguf_tensors(tmp_path / out / "model-f32.gguf") for out in ("base", "merged"))
    pairs = _gguf_tensors(tmp_path / "lora" / "adapter-f32.gguf")
    alpha = gguf.GGUFReader(tmp_path / "lora" / "adapter-f32.gguf").get_field("adapter.lora.alpha").contents()
    adapted = {name.removesuffix(".lora_a") for name in pairs if name.endswith(".lora_a")}
    assert adapted and set(pairs) == {f"{n}.lora_{ab}" for n in adapted for ab in "ab"}
    assert ("output.weight" in adapted) == (model_type == "llama-head")
    for name, weight in base.items():
        if name in adapted:
            a, b = pairs[name + ".lora_a"], pairs[name + ".lora_b"]
            weight = weight + alpha / a.shape[0] * b @ a
        torch.testing.assert_close(weight, merged[name], rtol=0, atol=1e-5, msg=name)


def test_a_velora_adapter_exports_as_the_plain_lora_it_computes(tmp_path, tiny_tokenizer):
    """VeLoRA's saved projections compress activations for backward only: the adapter is exported as its plain LoRA
    (its lora_velora_embed was refused as 'a velora_embed tensor')."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    model_dir = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer)
    _peft_adapter(model_dir, tmp_path / "velora", target_modules=["q_proj", "v_proj"], velora_config={"num_groups": 4})
    plain = shutil.copytree(tmp_path / "velora", tmp_path / "plain")
    config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps(config | {"velora_config": None}))
    tensors = load_file(str(plain / "adapter_model.safetensors"))
    assert any(k.endswith(".lora_velora_embed") for k in tensors)
    save_file({k: v for k, v in tensors.items() if ".lora_velora_embed" not in k},
              str(plain / "adapter_model.safetensors"))
    for name in ("velora", "plain"):
        assert _export(model_dir, tmp_path / name, tmp_path / f"out-{name}", "--type", "f32") == 0
    ours, expected = (_gguf_tensors(tmp_path / f"out-{n}" / "adapter-f32.gguf") for n in ("velora", "plain"))
    assert ours.keys() == expected.keys() and all(torch.equal(ours[k], expected[k]) for k in ours)


@pytest.mark.slow  # llama.cpp runs the files
@torch.no_grad()
def test_on_a_dequantized_nf4_base_gguf_the_adapter_is_the_merged_export(tmp_path, tiny_tokenizer):
    """The adapter was trained against the NF4-dequantized base: a base GGUF of that (--quant nf4) plus the
    adapter computes what the merged export computes, while the 16-bit base differs by the 4-bit error."""
    import qlora
    from qlora.model.merge import merge

    llama_cpp = pytest.importorskip("llama_cpp")
    model_dir = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer, arch="llama", initializer_range=0.1)
    _peft_adapter(model_dir, tmp_path / "adapter")
    model, _ = qlora.load_model(model_dir, quant="nf4", compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(model, tmp_path / "adapter")
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    expected = merge(model, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    assert main(["export", "--model", str(model_dir), "--quant", "nf4", "--output", str(tmp_path / "nf4"),
                 "--type", "f32"]) == 0
    assert _export(model_dir, tmp_path / "adapter", tmp_path / "out", "--type", "f32") == 0
    llm = llama_cpp.Llama(model_path=str(tmp_path / "nf4" / "model-f32.gguf"),
                          lora_path=str(tmp_path / "out" / "adapter-f32.gguf"), n_ctx=128, n_threads=2,
                          logits_all=True, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    assert _relative(torch.tensor(llm.scores[: len(ids)]), expected) < 1e-5
    on_16_bit, _ = _run_in_llama_cpp(tmp_path, model_dir, tmp_path / "out" / "adapter-f32.gguf", ids, 1)
    assert _relative(on_16_bit, expected) > 1e-3


@pytest.mark.slow  # llama.cpp runs the files
@torch.no_grad()
def test_rank_and_alpha_patterns_and_rslora_become_one_alpha(tmp_path, tiny_tokenizer):
    """Per-layer rank and alpha and rsLoRA's alpha / sqrt(r): llama.cpp has one alpha and divides by each
    tensor's rank, so B is rescaled where a layer's own scaling differs."""
    model_dir = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer, arch="llama", initializer_range=0.1)
    model = _peft_adapter(model_dir, tmp_path / "adapter", r=4, lora_alpha=8, use_rslora=True,
                          rank_pattern={"q_proj": 8, "down_proj": 2}, alpha_pattern={"v_proj": 3, r"layers\.1\.": 20})
    assert _export(model_dir, tmp_path / "adapter", tmp_path / "out", "--type", "f32") == 0
    reader = gguf.GGUFReader(tmp_path / "out" / "adapter-f32.gguf")
    assert reader.get_field("adapter.lora.alpha").contents() == pytest.approx(8 * 2)  # alpha * sqrt(r)
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    ranks = {t.name: int(t.shape[1]) for t in reader.tensors if t.name.endswith(".lora_a")}
    assert ranks["blk.0.attn_q.weight.lora_a"] == 8 and ranks["blk.0.ffn_down.weight.lora_a"] == 2

    ids = tiny_tokenizer(PROMPT)["input_ids"]
    expected = model(torch.tensor([ids])).logits[0]
    tokens, margin = _greedy(model, ids, 12)
    got, got_tokens = _run_in_llama_cpp(tmp_path, model_dir, tmp_path / "out" / "adapter-f32.gguf", ids, 12)
    assert _relative(got, expected) < 1e-5
    assert got_tokens == tokens


@pytest.mark.slow  # llama.cpp runs the files
@torch.no_grad()
@pytest.mark.parametrize("out_type,tolerance", [("f16", 1e-2), ("bf16", 3e-2), ("q8_0", 3e-2)])
def test_16_bit_and_q8_0_adapters(tmp_path, tiny_tokenizer, out_type, tolerance):
    """With llama.cpp's defaults (f16 KV cache): the rounding of the adapter's matrices alone."""
    model_dir = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer, arch="qwen2", initializer_range=0.1,
                                 hidden=64, intermediate=128)
    model = _peft_adapter(model_dir, tmp_path / "adapter", r=32, lora_alpha=16)
    assert _export(model_dir, tmp_path / "adapter", tmp_path / "out", "--type", out_type) == 0
    reader = gguf.GGUFReader(tmp_path / "out" / f"adapter-{out_type}.gguf")
    types = {t.tensor_type.name for t in reader.tensors}
    assert types == {out_type.upper()}
    ids = tiny_tokenizer(PROMPT)["input_ids"]
    expected = model(torch.tensor([ids])).logits[0]
    got, _ = _run_in_llama_cpp(tmp_path, model_dir, tmp_path / "out" / f"adapter-{out_type}.gguf", ids, 1,
                               f32_cache=False)
    assert _relative(got, expected) < tolerance


def test_modelfile_from_base_gguf_and_adapter(tmp_path, tiny_tokenizer):
    model_dir = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer, arch="llama")
    _peft_adapter(model_dir, tmp_path / "adapter")
    assert _export(model_dir, tmp_path / "adapter", tmp_path / "out") == 0
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert "FROM BASE-MODEL.gguf\nADAPTER ./adapter-f16.gguf\n" in text and text.startswith("# replace BASE-MODEL")
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) == [
        "Modelfile", "adapter-f16.gguf"]

    assert main(["export", "--model", str(model_dir), "--output", str(tmp_path / "base")]) == 0
    base = (tmp_path / "base" / "model-f16.gguf").resolve()
    assert _export(model_dir, tmp_path / "adapter", tmp_path / "out", "--base-gguf", str(base)) == 2  # no overwrite
    assert _export(model_dir, tmp_path / "adapter", tmp_path / "out", "--base-gguf", str(base), "--overwrite") == 0
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert f"FROM {base}\nADAPTER ./adapter-f16.gguf\n" in text and "BASE-MODEL" not in text
    assert 'PARAMETER stop "<|im_end|>"' in text  # the chat format carried as for the merged export


def test_a_base_gguf_of_another_model_is_refused(tmp_path, tiny_tokenizer, capsys):
    model_dir = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer, arch="llama")
    other = build_tiny_model(tmp_path / "o", tokenizer=tiny_tokenizer, arch="llama", intermediate=96)
    _peft_adapter(model_dir, tmp_path / "adapter")
    assert main(["export", "--model", str(other), "--output", str(tmp_path / "base")]) == 0
    assert _export(model_dir, tmp_path / "adapter", tmp_path / "out",
                   "--base-gguf", str(tmp_path / "base" / "model-f16.gguf")) == 2
    assert "is not the base this adapter was made for" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # atomic: nothing written


@pytest.mark.parametrize("lora,message", [
    (dict(use_dora=True), "a DoRA adapter"),
    (dict(lora_bias=True), "LoRA biases"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(target_modules=["q_proj", "embed_tokens"]), "LoRA on an embedding"),
    (dict(bias="all"), "training biases"),
    (dict(trainable_token_indices=[3, 4]), "trained token rows"),
])
def test_what_a_gguf_adapter_cannot_express_is_refused(tmp_path, tiny_tokenizer, capsys, lora, message):
    model_dir = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer, arch="llama")
    _peft_adapter(model_dir, tmp_path / "adapter", **lora)
    assert _export(model_dir, tmp_path / "adapter", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert message in err and "qlora export --format gguf (merged)" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_grown_vocabulary_is_refused(tmp_path, tiny_tokenizer, capsys):
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer, tie_word_embeddings=False)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    base.resize_token_embeddings(len(tiny_tokenizer) + 8)
    peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj", "lm_head"])).save_pretrained(
        tmp_path / "adapter", save_embedding_layers=True)
    assert _export(model_dir, tmp_path / "adapter", tmp_path / "out") == 2
    assert f"to {len(tiny_tokenizer) + 8} rows (added tokens)" in capsys.readouterr().err


def test_adalora_is_refused(tmp_path, tiny_tokenizer, capsys):
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer, arch="llama")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    peft.get_peft_model(base, peft.AdaLoraConfig(target_modules=["q_proj"], init_r=4, target_r=2,
                                                 total_step=10)).save_pretrained(tmp_path / "adapter")
    assert _export(model_dir, tmp_path / "adapter", tmp_path / "out") == 2
    assert "an AdaLoRA adapter" in capsys.readouterr().err


def test_lm_head_lora_on_a_tied_gemma_is_refused(tmp_path, tiny_tokenizer, capsys):
    model_dir = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer, arch="gemma2", head_dim=256,
                                 tie_word_embeddings=True)
    _peft_adapter(model_dir, tmp_path / "adapter", target_modules=["q_proj", "lm_head"])
    assert _export(model_dir, tmp_path / "adapter", tmp_path / "out") == 2
    assert "has no output tensor to add it to" in capsys.readouterr().err


def test_merged_only_options_and_k_quants_are_refused(tmp_path, tiny_tokenizer, capsys):
    model_dir = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer, arch="llama")
    _peft_adapter(model_dir, tmp_path / "adapter")
    assert _export(model_dir, tmp_path / "adapter", tmp_path / "out", "--compute-dtype", "bf16") == 2
    assert "--compute-dtype applies to the merged export" in capsys.readouterr().err
    assert _export(model_dir, tmp_path / "adapter", tmp_path / "out", "--type", "q4_k_m") == 2
    assert "not a GGUF adapter type" in capsys.readouterr().err
    assert main(["export", "--format", "gguf-lora", "--model", str(model_dir), "--output", str(tmp_path / "o")]) == 2
    assert "--adapter" in capsys.readouterr().err
    assert main(["export", "--model", str(model_dir), "--output", str(tmp_path / "o"), "--base-gguf", "x.gguf"]) == 2
    assert "applies to --format gguf-lora" in capsys.readouterr().err
