"""llama.cpp itself runs the exported GGUF (slow; needs llama-cpp-python).

llama-cpp-python builds llama.cpp from source on install (``pip install llama-cpp-python``,
several minutes on 2 cores). Without it this module is skipped; it is run before a release
and before changes to the GGUF export are accepted:

    pip install llama-cpp-python
    python -m pytest tests/test_export_llama_cpp.py

The model is a tiny Llama QLoRA-trained briefly on qlora's demo data (as ``qlora demo``
does), so its greedy choices have clear margins: a random tiny model has near-ties that
any two correct implementations may break differently.
"""

from __future__ import annotations

import json

import pytest
import torch

import qlora
from qlora.cli.main import main
from qlora.infer.generate import SamplingOptions, encode_prompt, stream_tokens
from qlora.model.merge import merge
from qlora.model.tiny import build_tiny_model, train_tokenizer

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(base dir, adapter dir, {type: gguf path}) for a briefly QLoRA-trained tiny Llama."""
    from qlora.train.config import TrainConfig
    from qlora.train.data import demo_data_path
    from qlora.train.trainer import Trainer

    root = tmp_path_factory.mktemp("llama-cpp")
    records = [json.loads(line) for line in demo_data_path().read_text().splitlines() if line.strip()]
    tokenizer = train_tokenizer([f"{r['instruction']} {r['output']}" for r in records] * 4, vocab_size=512)
    base = build_tiny_model(root / "base", tokenizer=tokenizer, arch="llama", hidden=128, layers=2, heads=4,
                            kv_heads=2, intermediate=256, seed=0, initializer_range=0.1)
    config = TrainConfig(model=str(base), data=str(demo_data_path()), output=str(root / "adapter"), overwrite=True,
                         rank=32, alpha=64, dropout=0.0, lr=3e-3, lr_scheduler="cosine", warmup_steps=5,
                         max_steps=200, batch_size=8, optim="adamw", max_grad_norm=1.0, seq_len=64,
                         logging_steps=50, progress=False, seed=0)
    trainer = Trainer(config)
    trainer.setup()
    try:
        trainer.train()
        trainer.save_final()
    finally:
        trainer.cleanup()
    files = {}
    for out_type in ("f16", "q8_0"):
        assert main(["export", "--model", str(base), "--adapter", str(root / "adapter"),
                     "--output", str(root / out_type), "--type", out_type]) == 0
        files[out_type] = root / out_type / f"model-{out_type}.gguf"
    return base, root / "adapter", files


@torch.no_grad()
def _qlora_greedy(base, adapter, n: int) -> tuple[str, list[int], list[int]]:
    """(chat prompt, its ids, n greedy tokens) from qlora's generation on the merged model."""
    model, tokenizer = qlora.load_model(base, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(model, adapter)
    merge(model, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                           add_generation_prompt=True)
    ids = encode_prompt(model, tokenizer, prompt)
    out = list(stream_tokens(model, ids, SamplingOptions(max_new_tokens=n, temperature=0.0), stop_ids=()))
    return prompt, ids[0].tolist(), out


@pytest.mark.parametrize("out_type,n", [("f16", 32), ("q8_0", 8)])
def test_llama_cpp_greedy_tokens_match_qlora_generate(exported, out_type, n):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    base, adapter, files = exported
    prompt, prompt_ids, expected = _qlora_greedy(base, adapter, n)
    llm = llama_cpp.Llama(model_path=str(files[out_type]), n_ctx=256, n_threads=2, verbose=False, seed=0)

    # llama.cpp applies the chat template embedded in the file
    template = llm.metadata["tokenizer.chat_template"]
    eos, bos = (llm._model.token_get_text(i) for i in (llm.token_eos(), llm.token_bos()))
    rendered = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)(
        messages=[{"role": "user", "content": QUESTION}])
    assert rendered.prompt == prompt
    ids = llm.tokenize(rendered.prompt.encode(), add_bos=True, special=True)
    assert ids == prompt_ids  # same tokenizer: BPE merges, pre-tokenizer, specials, BOS

    got = []
    for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0):
        got.append(token)
        if len(got) == n:
            break
    assert got == expected


def test_llama_cpp_chat_completion_answers_as_qlora_does(exported):
    base, adapter, files = exported
    _, _, expected = _qlora_greedy(base, adapter, 32)
    tokenizer = qlora.load_model(base, quant=None, device="cpu")[1]
    ends = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    stop = next((i for i, t in enumerate(expected) if t in ends), len(expected))
    llm = llama_cpp.Llama(model_path=str(files["f16"]), n_ctx=256, n_threads=2, verbose=False, seed=0)
    reply = llm.create_chat_completion([{"role": "user", "content": QUESTION}], temperature=0.0, max_tokens=32)
    text = reply["choices"][0]["message"]["content"]
    assert text.strip() == tokenizer.decode(expected[:stop], skip_special_tokens=True).strip()
    assert "Paris" in text  # the trained adapter is in the file


# Every exported architecture, run by llama.cpp: its logits for a prompt equal the merged model's. This checks
# the conventions transformers' reader would undo for us (RoPE layout, Gemma norms, fused Phi-3 projections,
# soft-capping, sliding-window pattern) against the real consumer.
ARCHS = {
    "llama": {}, "mistral": {}, "qwen2": {}, "phi3": {}, "qwen3": {},
    "gemma2": dict(head_dim=256, tie_word_embeddings=True),
    "gemma3": dict(head_dim=256, tie_word_embeddings=True),
    "llama-rope-llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 64}),
}


def _random_lora(model) -> None:
    """All-linear LoRA with nonzero B, so folding it in changes every matrix."""
    from qlora.nn import LoraLinear

    torch.manual_seed(0)
    qlora.add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear", verbose=False)
    for layer in model.modules():
        if isinstance(layer, LoraLinear):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.05)


@torch.no_grad()
@pytest.mark.parametrize("arch", list(ARCHS))
def test_llama_cpp_logits_equal_the_merged_model(tmp_path, tiny_tokenizer, arch):
    from qlora.model.gguf_export import export_gguf
    model_dir = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer, arch=arch.split("-")[0],
                                 initializer_range=0.1, **ARCHS[arch])
    model, tokenizer = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    _random_lora(model)
    export_gguf(model, tokenizer, tmp_path / "m.gguf", "f32")
    ids = tokenizer("The quick brown fox jumps over the lazy dog. Question: what is two plus two?")["input_ids"]
    expected = merge(model, dtype=torch.float32)(torch.tensor([ids])).logits[0]

    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=128, n_threads=2, logits_all=True,
                          verbose=False)
    assert llm.tokenize(tokenizer.decode(ids[1:]).encode(), add_bos=True) == ids
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)])
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-3


@torch.no_grad()
def test_k_quants_are_llama_cpps_own_and_lose_accuracy_in_order_of_their_bits(tmp_path, tiny_tokenizer):
    """--type q4_k_m runs llama.cpp's quantizer: its Q4_K/Q6_K mix, and error shrinking with more bits."""
    from qlora.model.gguf_export import export_gguf
    from qlora.model.gguf_quantize import quantize_gguf

    gguf = pytest.importorskip("gguf")
    # rows of 256 values: the k-quant block size (narrower rows get llama.cpp's fallback types)
    base = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer, arch="llama", hidden=256, layers=2, heads=4,
                            kv_heads=2, intermediate=512, seed=0, initializer_range=0.05)
    adapter = tmp_path / "adapter"
    model, tokenizer = qlora.load_model(base, compute_dtype=torch.float32, device="cpu")
    _random_lora(model)
    qlora.save_adapter(model, adapter)
    assert main(["export", "--model", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "out"),
                 "--type", "q4_k_m"]) == 0
    q4 = tmp_path / "out" / "model-q4_k_m.gguf"
    assert sorted(p.name for p in q4.parent.iterdir()) == [".qlora-output.json", "Modelfile", q4.name]
    reader = gguf.GGUFReader(q4)
    assert int(reader.fields["general.file_type"].parts[-1][0]) == gguf.LlamaFileType.MOSTLY_Q4_K_M
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K" and "Q6_K" in types.values()  # llama.cpp's Q4_K_M mix
    assert types["blk.0.attn_norm.weight"] == "F32"

    ids = tokenizer("The quick brown fox jumps over the lazy dog. Question: what is two plus two?")["input_ids"]
    expected = merge(model, dtype=torch.float32)(torch.tensor([ids])).logits[0]
    export_gguf(model, tokenizer, tmp_path / "f16.gguf", "f16")  # the merged model; quantize from it directly
    errors = {}
    for out_type in ("q6_k", "q4_k_m", "q2_k"):
        path = q4 if out_type == "q4_k_m" else quantize_gguf(tmp_path / "f16.gguf", tmp_path / f"{out_type}.gguf",
                                                             out_type)
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
        llm.eval(ids)
        got = torch.tensor(llm.scores[: len(ids)])
        llm.close()
        errors[out_type] = float((got - expected).abs().max() / expected.abs().max())
        if out_type == "q4_k_m":  # the CLI's file is the adapter folded into the nf4 base, as merge gives
            assert float(torch.nn.functional.cosine_similarity(got, expected, dim=-1).min()) > 0.9, errors
    assert errors["q6_k"] < errors["q4_k_m"] < errors["q2_k"], errors
