"""GPTQ and AWQ checkpoints load, each weight decoded to ``(q - zero) * scale`` of its group.

No GPTQ/AWQ library runs here, so the files are written by packers in this file, from the formats'
public definitions (GPTQ: ``32 / bits`` codes a word along the input rows, zero points packed along the
columns and stored minus one unless ``checkpoint_format: gptq_v2``, ``g_idx`` giving each row's group;
AWQ: eight codes a word along the output columns in the order 0, 2, 4, 6, 1, 3, 5, 7), checked against
hand-packed words. The oracle is the dequantized weight computed from the integer codes before packing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora.errors import UsageError
from qlora.model.load import load_model
from qlora.model.tiny import build_tiny_model
from test_stored_floats import _IDS, _V5, _assert_same_4bit, _copy_config, _save_dense, assert_same_tensors
from tiny_moe import save_tiny_moe

transformers = pytest.importorskip("transformers")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a word holds column AWQ_ORDER[k] of its eight


def _int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values (int64) as the int32 the files hold."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ ``qweight``: codes ``[in, out]``, row ``r * n + k`` at bit ``bits * k`` of word row ``r``."""
    n = 32 // bits
    words = torch.zeros(codes.shape[0] // n, codes.shape[1], dtype=torch.int64)
    for k in range(n):
        words |= codes[k::n].long() << (bits * k)
    return _int32(words)


def pack_columns(codes: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """``qzeros`` (and AWQ's ``qweight``): codes ``[R, C]`` along the columns, padded to whole words."""
    n = 32 // bits
    order = order or tuple(range(n))
    padded = torch.zeros(codes.shape[0], -(-codes.shape[1] // n) * n, dtype=torch.int64)
    padded[:, : codes.shape[1]] = codes.long() & ((1 << bits) - 1)
    groups = padded.view(codes.shape[0], -1, n)
    words = torch.zeros(groups.shape[:2], dtype=torch.int64)
    for k in range(n):
        words |= groups[..., order[k]] << (bits * k)
    return _int32(words)


def test_packers_follow_the_formats():
    """Hand-packed words: GPTQ rows 0..7 with codes 1..8 in one word; AWQ columns 0..7 with codes 0..7."""
    assert pack_rows(torch.arange(1, 9).view(8, 1), 4).item() == _int32(torch.tensor(0x87654321)).item()
    assert pack_columns(torch.arange(8).view(1, 8), 4, AWQ_ORDER).item() == 0x75316420
    assert pack_columns(torch.tensor([[3, 0, 0, 1]]), 8).item() == 0x01000003


def quantize(w: torch.Tensor, bits: int, groups: torch.Tensor):
    """``w`` ``[out, in]`` quantized per (group of input rows, output column), asymmetric: codes ``[in, out]``,
    zero points and float16 scales ``[groups, out]``, and the dequantized ``[in, out]`` it stands for."""
    wt, top = w.t().float(), (1 << bits) - 1
    n = int(groups.max()) + 1
    low = torch.stack([wt[groups == g].amin(0) for g in range(n)]).clamp(max=0)
    high = torch.stack([wt[groups == g].amax(0) for g in range(n)]).clamp(min=0)
    scales = ((high - low) / top).clamp(min=1e-6).half()
    zeros = (-low / scales.float()).round().clamp(1, top).long()  # >= 1: GPTQ's stored zero minus one stays >= 0
    codes = ((wt / scales.float()[groups]).round() + zeros[groups]).clamp(0, top).long()
    return codes, zeros, scales, (codes - zeros[groups]).float() * scales.float()[groups]


def _converted(key: str, w: torch.Tensor, head: bool) -> bool:
    """The transformer blocks' 2-D weights (and the output head with ``head``), but layer 1's MLP down projection."""
    if key == "lm_head.weight":
        return head
    return w.dim() == 2 and (".layers." in key or ".h." in key) and "layers.1.mlp.down_proj" not in key


def write_checkpoint(src: Path, out: Path, method: str, bits: int = 4, group_size: int = 32, act_order=False,
                     v2=False, head=False, shard=False) -> tuple[Path, dict[str, torch.Tensor]]:
    """``src``'s projections (all but layer 1's MLP down projection, left unconverted) in GPTQ or AWQ; returns
    the folder and each converted weight as the model holds it."""
    conv1d = json.loads((src / "config.json").read_text())["model_type"] == "gpt2"
    tensors, parts, want = {}, {}, {}
    generator = torch.Generator().manual_seed(0)
    for key, w in load_file(src / "model.safetensors").items():
        if not _converted(key, w, head):
            tensors[key] = w
            continue
        linear = w.t() if conv1d else w  # GPT-2's Conv1D holds [in, out]; both formats pack nn.Linear's [out, in]
        rows = linear.shape[1]
        size = rows if group_size == -1 else group_size
        groups = torch.arange(rows) // size
        if act_order:  # rows quantized in another order: the groups follow it
            groups = torch.empty(rows, dtype=torch.long)
            groups[torch.randperm(rows, generator=generator)] = torch.arange(rows) // size
        codes, zeros, scales, dequantized = quantize(linear, bits, groups)
        module = key[: -len("weight")]
        if method == "gptq":
            parts |= {module + "qweight": pack_rows(codes, bits), module + "scales": scales,
                      module + "qzeros": pack_columns(zeros - (0 if v2 else 1), bits),
                      module + "g_idx": groups.to(torch.int32)}
        else:
            parts |= {module + "qweight": pack_columns(codes, 4, AWQ_ORDER), module + "scales": scales,
                      module + "qzeros": pack_columns(zeros, 4, AWQ_ORDER)}
        want[key] = dequantized if conv1d else dequantized.t()
    out.mkdir()
    if shard:
        names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
        qweights = {k: v for k, v in parts.items() if k.endswith("qweight")}
        save_file(tensors | qweights, out / names[0], metadata={"format": "pt"})
        save_file({k: v for k, v in parts.items() if k not in qweights}, out / names[1], metadata={"format": "pt"})
        weight_map = {k: names[0] for k in tensors | qweights} | {k: names[1] for k in parts if k not in qweights}
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file(tensors | parts, out / "model.safetensors", metadata={"format": "pt"})
    if method == "gptq":
        qc = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order, "sym": False,
              "checkpoint_format": "gptq_v2" if v2 else "gptq", "lm_head": head}
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": ["layers.1.mlp.down_proj"]}
    _copy_config(src, out, qc)
    return out, want


def _load16(path: Path):
    return load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")[0]


CASES = {
    "gptq-4bit": dict(method="gptq"),
    "gptq-v2-act-order-sharded": dict(method="gptq", v2=True, act_order=True, shard=True),
    "gptq-8bit-one-group-head": dict(method="gptq", bits=8, group_size=-1, head=True),
    "gptq-2bit": dict(method="gptq", bits=2, group_size=16),
    "awq": dict(method="awq"),
    "awq-sharded-one-group": dict(method="awq", group_size=-1, shard=True),
}


# every case on Llama; one per method on Qwen2 (biases beside the packed layers)
@pytest.mark.parametrize("case, arch", [(c, "llama") for c in CASES] + [("gptq-4bit", "qwen2"), ("awq", "qwen2")])
def test_checkpoint_decodes_to_the_dequantized_weights(case, arch, tmp_path, tiny_tokenizer):
    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch=arch)
    path, want = write_checkpoint(base, tmp_path / "q", **CASES[case])
    assert len(want) == 13 + CASES[case].get("head", False)
    original = load_file(base / "model.safetensors")
    ours = _load16(path).state_dict()
    assert_same_tensors(ours, original | want)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert (ours[key] - original[key]).abs().max() < (0.5 if CASES[case].get("bits") == 2 else 0.15) * \
        original[key].abs().max()


def test_gpt2_conv1d_layers(tmp_path, tiny_tokenizer):
    """GPT-2's Conv1D weights are packed as nn.Linear ones ([out, in]) and decoded back to [in, out]."""
    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch="gpt2")
    path, want = write_checkpoint(base, tmp_path / "q", "gptq")
    assert "transformer.h.0.attn.c_attn.weight" in want
    ours = _load16(path)
    assert_same_tensors(ours.state_dict(), load_file(base / "model.safetensors") | want)
    dense = _save_dense(ours, path, tmp_path / "dense")
    with torch.no_grad():
        assert torch.equal(ours(_IDS).logits, _load16(dense)(_IDS).logits)


@pytest.mark.skipif(not _V5, reason="transformers 4.x keeps experts as per-expert linear layers")
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_moe_experts_per_expert_layers(method, tmp_path, tiny_tokenizer):
    """Qwen3-MoE GPTQ/AWQ files pack every expert's projections as their own layer: decoded, then joined into
    transformers 5's 3-D experts as the same weights stored in 32 bits are."""
    dense = save_tiny_moe(tmp_path / "dense", tiny_tokenizer, "qwen3_moe")
    path, want = write_checkpoint(dense, tmp_path / "q", method)
    assert any(".experts.3." in k for k in want)
    decoded = tmp_path / "decoded"
    decoded.mkdir()
    save_file(load_file(dense / "model.safetensors") | want, decoded / "model.safetensors", metadata={"format": "pt"})
    for f in dense.iterdir():
        if f.name != "model.safetensors":
            (decoded / f.name).write_bytes(f.read_bytes())
    assert_same_tensors(_load16(path).state_dict(), _load16(decoded).state_dict())
    _assert_same_4bit(path, decoded)


def test_4bit_load_warns_and_quantizes_the_decoded_weights(tiny_model_dir, tmp_path, caplog):
    path, _ = write_checkpoint(tiny_model_dir, tmp_path / "q", "awq")
    with caplog.at_level(logging.WARNING, logger="qlora"):
        _assert_same_4bit(path, _save_dense(_load16(path), path, tmp_path / "dense"))
    warnings = [r.getMessage() for r in caplog.records if "quantized to 4 bits again" in r.getMessage()]
    assert len(warnings) == 1 and "AWQ integer weights" in warnings[0] and "\n" not in warnings[0]


REFUSED = {
    "gptq-3bit": ({"quant_method": "gptq", "bits": 3}, r"GPTQ checkpoint with quantization_config bits = 3"),
    "gptq-marlin": ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"},
                    r"checkpoint_format = 'marlin': weights repacked"),
    "autogptq-marlin": ({"quant_method": "gptq", "bits": 4, "is_marlin_format": True}, r"is_marlin_format = True"),
    "awq-gemv": ({"quant_method": "awq", "bits": 4, "version": "GEMV"}, r"AWQ checkpoint .* version = 'GEMV'"),
    "awq-exllama": ({"quant_method": "awq", "bits": 4, "version": "exllama"}, r"version = 'exllama'"),
    "llm-awq": ({"quant_method": "awq", "bits": 4, "backend": "llm-awq"}, r"backend = 'llm-awq'"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_other_packings_are_refused_naming_the_field(case, tiny_model_dir, tmp_path):
    qc, message = REFUSED[case]
    out = tmp_path / case
    out.mkdir()
    (out / "model.safetensors").write_bytes((tiny_model_dir / "model.safetensors").read_bytes())
    _copy_config(tiny_model_dir, out, qc)
    with pytest.raises(UsageError, match=message + r".*original 16/32-bit checkpoint"):
        _load16(out)


def test_broken_layers_are_named(tiny_model_dir, tmp_path):
    path, _ = write_checkpoint(tiny_model_dir, tmp_path / "q", "gptq")
    stored = load_file(path / "model.safetensors")
    module = "model.layers.0.mlp.up_proj"
    save_file({k: v for k, v in stored.items() if k != module + ".qzeros"}, path / "model.safetensors")
    with pytest.raises(UsageError, match=rf"GPTQ layer {module} is stored as .*, which lacks {module}.qzeros"):
        _load16(path)
    save_file(stored | {module + ".scales": stored[module + ".scales"][:1]}, path / "model.safetensors")
    with pytest.raises(UsageError, match=rf"GPTQ layer {module}: its qweight .* do not fit 4-bit GPTQ packing"):
        _load16(path)


def test_train_and_merge_cli_on_a_gptq_checkpoint(tiny_model_dir, tmp_path):
    """`qlora train` on a GPTQ base saves an adapter; `qlora merge` writes a plain 16-bit checkpoint."""
    from qlora.cli.main import main

    path, _ = write_checkpoint(tiny_model_dir, tmp_path / "q", "gptq", act_order=True)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"say {w}", "output": w}) for w in "abcdefgh") + "\n")
    assert main(["train", "--model", str(path), "--data", str(data), "--output", str(tmp_path / "run"),
                 "--max-steps", "2", "--seq-len", "32", "--progress", "off"]) == 0
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    assert main(["merge", "--model", str(path), "--adapter", str(tmp_path / "run"),
                 "--output", str(tmp_path / "merged")]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")  # 4.x: float32
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("method, name, spelled", [
    ("gptq", "quantize_config.json", {"bits": 4, "group_size": 32, "desc_act": True, "sym": False}),
    ("awq", "quant_config.json", {"w_bit": 4, "q_group_size": 32, "zero_point": True, "version": "GEMM"}),
])
def test_quantizer_side_file_without_a_quantization_config(method, name, spelled, tiny_model_dir, tmp_path):
    """Older AutoGPTQ / AutoAWQ releases describe the quantization only in their own file beside config.json."""
    path, want = write_checkpoint(tiny_model_dir, tmp_path / "q", method, act_order=method == "gptq")
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    (path / name).write_text(json.dumps(spelled))
    assert_same_tensors(_load16(path).state_dict(), load_file(tiny_model_dir / "model.safetensors") | want)
