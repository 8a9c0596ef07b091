"""Checkpoints stored in FP8 (DeepSeek-V3, Qwen3-FP8: ``quant_method: fp8``) and MXFP4 (gpt-oss) load.

Oracle: transformers' own ``from_pretrained`` of the same folder, which on a machine without a GPU
dequantizes such checkpoints; qlora's 16-bit load must hold exactly its tensors, and qlora's 4-bit load
the same codes as a 4-bit load of those tensors saved in 32 bits. The files are written here the way
the formats define them (FP8: ``weight`` e4m3 and one ``weight_scale_inv`` per block; MXFP4: two e2m1
codes a byte, low nibble first, and one biased power-of-two exponent per 32 values).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora.errors import UsageError
from qlora.model.load import load_model
from qlora.model.stored_floats import FP4_VALUES
from tiny_moe import save_tiny_moe

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' FP8 loader needs it
_V5 = __import__("importlib").util.find_spec("transformers.conversion_mapping") is not None
_IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 8, 64, 12], [3, 9, 27, 81, 200, 150, 11, 4, 66, 90]])


def fp8_encode(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` as e4m3 codes and one float32 scale per ``block`` (a last, partial block has its own)."""
    (rows, cols), (bm, bn) = w.shape, block
    grid = (-(-rows // bm), -(-cols // bn))
    padded = torch.zeros(grid[0] * bm, grid[1] * bn)
    padded[:rows, :cols] = w.float()
    scale = padded.view(grid[0], bm, grid[1], bn).abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    full = scale.repeat_interleave(bm, 0).repeat_interleave(bn, 1)
    return (padded / full)[:rows, :cols].to(torch.float8_e4m3fn), scale


def mxfp4_encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert stack ``(E, in, out)`` as gpt-oss stores it: ``(E, out, in/32, 16)`` bytes and exponents."""
    t = w.transpose(1, 2).float()
    groups = t.reshape(*t.shape[:2], t.shape[2] // 32, 32)
    exp = torch.ceil(torch.log2(groups.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    codes = ((groups / torch.exp2(exp).unsqueeze(-1)).unsqueeze(-1) - torch.tensor(FP4_VALUES)).abs().argmin(-1)
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exp + 127).to(torch.uint8)


def write_fp8(src: Path, out: Path, block: tuple[int, int], scale_dtype=torch.float32,
              shard_scales: bool = False) -> Path:
    """``src``'s 2-D projection weights in FP8 (``weight_block_size=block``); the rest as it is. With
    ``shard_scales`` the scales go in a second shard, after their weights."""
    out.mkdir()
    tensors, scales = {}, {}
    for key, w in load_file(src / "model.safetensors").items():
        if w.dim() == 2 and key.endswith("proj.weight") and ".layers." in key:
            tensors[key], s = fp8_encode(w, block)
            scales[key + "_scale_inv"] = (torch.log2(s).round().add(127).to(torch.uint8) if scale_dtype == torch.uint8
                                          else s.to(scale_dtype))
        else:
            tensors[key] = w
    if shard_scales:
        save_file(tensors, out / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
        save_file(scales, out / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
        weight_map = {k: "model-00001-of-00002.safetensors" for k in tensors}
        weight_map |= {k: "model-00002-of-00002.safetensors" for k in scales}
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file(tensors | scales, out / "model.safetensors", metadata={"format": "pt"})
    _copy_config(src, out, {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                            "weight_block_size": list(block)})
    return out


def write_mxfp4(src: Path, out: Path) -> Path:
    out.mkdir()
    tensors = {}
    for key, w in load_file(src / "model.safetensors").items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[key + "_blocks"], tensors[key + "_scales"] = mxfp4_encode(w)
        else:
            tensors[key] = w
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    _copy_config(src, out, {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
    return out


def _copy_config(src: Path, out: Path, quantization_config: dict) -> None:
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config))
    _copy_tokenizer(src, out)


def _copy_tokenizer(src: Path, out: Path) -> None:
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")) or f.name == "generation_config.json":
            (out / f.name).write_bytes(f.read_bytes())


def with_tensors(checkpoint: Path, out: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of the one-file ``checkpoint`` at ``out`` whose weights are ``tensors`` (a broken variant, say)."""
    shutil.copytree(checkpoint, out)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _reference(path: Path):
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    except RuntimeError as exc:  # transformers 4.x dequantizes FP8 on a GPU only: no oracle here
        if "GPU" not in str(exc) or _V5:
            raise
        pytest.skip(f"transformers {transformers.__version__} loads FP8 checkpoints on a GPU only ({exc})")


def assert_same_tensors(mine: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    """The same names, and each tensor bit-identical."""
    assert mine.keys() == theirs.keys()
    for name, t in mine.items():
        assert torch.equal(t, theirs[name]), name


def _assert_same_as_transformers(path: Path):
    """qlora's 16-bit load holds exactly transformers' dequantized tensors and gives its logits."""
    ours, _ = load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")
    ref = _reference(path)
    assert_same_tensors(ours.state_dict(), ref.state_dict())
    with torch.no_grad():
        assert torch.equal(ours(_IDS).logits, ref(_IDS).logits)
    return ref


def _save_dense(model, like: Path, out: Path) -> Path:
    """``model``'s tensors as a plain 32-bit checkpoint with ``like``'s config minus its quantization
    (in the model's own naming and layout, which loading accepts as it is)."""
    out.mkdir()
    save_file({k: t.detach().clone().contiguous() for k, t in model.state_dict().items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((like / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    _copy_tokenizer(like, out)
    return out


def _assert_same_4bit(a: Path, b: Path) -> None:
    qa, _ = load_model(a, quant="nf4", compute_dtype=torch.float32, device="cpu")
    qb, _ = load_model(b, quant="nf4", compute_dtype=torch.float32, device="cpu")
    assert_same_tensors(qa.state_dict(), qb.state_dict())


@pytest.fixture(scope="module")
def fp8_llama(tmp_path_factory, tiny_model_dir):
    return write_fp8(tiny_model_dir, tmp_path_factory.mktemp("fp8") / "m", (32, 32))


def test_fp8_checkpoint_loads_as_transformers_dequantizes_it(fp8_llama, tiny_model_dir, tmp_path):
    ref = _assert_same_as_transformers(fp8_llama)
    original = load_file(tiny_model_dir / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].float()
    decoded = ref.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(decoded, original)  # the FP8 values were read, not some 16-bit copy
    assert (decoded - original).abs().max() < 0.07 * original.abs().max()
    _assert_same_4bit(fp8_llama, _save_dense(ref, fp8_llama, tmp_path / "dense"))


def test_fp8_scales_in_a_later_shard_and_as_exponents(tiny_model_dir, tmp_path):
    """Sharded checkpoints may put a weight's scale in a later file; DeepSeek-V3.1-style UE8M0 scales
    are stored as biased exponents (uint8)."""
    _assert_same_as_transformers(write_fp8(tiny_model_dir, tmp_path / "sharded", (32, 32), shard_scales=True))
    ue8m0 = write_fp8(tiny_model_dir, tmp_path / "ue8m0", (32, 32), scale_dtype=torch.uint8)
    ours, _ = load_model(ue8m0, quant=None, compute_dtype=torch.float32, device="cpu")
    files = load_file(ue8m0 / "model.safetensors")
    key = "model.layers.1.mlp.down_proj.weight"
    want = files[key].float() * torch.exp2(files[key + "_scale_inv"].float() - 127).repeat_interleave(32, 0) \
        .repeat_interleave(32, 1)
    assert torch.equal(ours.get_parameter(key), want)


def test_fp8_partial_blocks_follow_the_format(tiny_model_dir, tmp_path):
    """Rows or columns that are not a multiple of the block (DeepSeek-V3's 576-row kv_a_proj with 128 x 128
    blocks) have a last, smaller block with its own scale: w[i, j] = q[i, j] * s[i // 48, j // 48]."""
    path = write_fp8(tiny_model_dir, tmp_path / "m", (48, 48))
    ours, _ = load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")
    files = load_file(path / "model.safetensors")
    for key in ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        q, s = files[key].float(), files[key + "_scale_inv"]
        rows, cols = torch.meshgrid(torch.arange(q.shape[0]), torch.arange(q.shape[1]), indexing="ij")
        assert torch.equal(ours.get_parameter(key), q * s[rows // 48, cols // 48]), key


@pytest.mark.skipif(not _V5, reason="transformers 4.x keeps experts as per-expert linear layers")
def test_fp8_moe_experts_per_expert_files(tmp_path, tiny_tokenizer):
    """DeepSeek-V3 and Qwen3-MoE FP8 files hold one FP8 weight and scale per expert: decoded, then joined
    into transformers 5's 3-D experts, then 4-bit experts."""
    dense = save_tiny_moe(tmp_path / "dense", tiny_tokenizer, "qwen3_moe")
    path = write_fp8(dense, tmp_path / "fp8", (16, 16))
    assert any(".experts.0." in k and k.endswith("_scale_inv") for k in load_file(path / "model.safetensors"))
    ref = _assert_same_as_transformers(path)
    _assert_same_4bit(path, _save_dense(ref, path, tmp_path / "decoded"))


@pytest.mark.skipif(not _V5, reason="transformers 4.x names gpt-oss's MXFP4 experts differently")
def test_mxfp4_gpt_oss_experts(tmp_path, tiny_tokenizer):
    dense = save_tiny_moe(tmp_path / "dense", tiny_tokenizer, "gpt_oss", intermediate_size=64)
    path = write_mxfp4(dense, tmp_path / "mxfp4")
    ref = _assert_same_as_transformers(path)
    original = load_file(dense / "model.safetensors")["model.layers.0.mlp.experts.down_proj"]
    decoded = ref.model.layers[0].mlp.experts.down_proj
    assert decoded.shape == original.shape and not torch.equal(decoded, original)
    _assert_same_4bit(path, _save_dense(ref, path, tmp_path / "decoded"))


def write_fp8_per_tensor(src: Path, out: Path, scale: str, activation: str) -> Path:
    """``src``'s projection weights in FP8 with one scale each, under the layer's ``scale`` name and with a static
    activation scale ``activation``, as writers other than transformers name them (``quant_method: fp8``, no block)."""
    out.mkdir()
    tensors = {}
    for key, w in load_file(src / "model.safetensors").items():
        if w.dim() == 2 and key.endswith("proj.weight") and ".layers." in key:
            module = key.removesuffix(".weight")
            q, s = fp8_encode(w, tuple(w.shape))
            tensors |= {key: q, f"{module}.{scale}": s.reshape(()), f"{module}.{activation}": torch.tensor(0.02)}
        else:
            tensors[key] = w
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    _copy_config(src, out, {"quant_method": "fp8", "activation_scheme": "static"})
    return out


def test_fp8_per_tensor_scales_as_autofp8_writes_them(tiny_model_dir, tmp_path):
    """AutoFP8's checkpoints (neuralmagic's first -FP8 releases) store ``weight_scale`` and ``input_scale``; its
    format description says ``w = q * weight_scale``. (transformers 5 reads no such scale and leaves the codes
    unscaled, so the oracle is that formula.)"""
    path = write_fp8_per_tensor(tiny_model_dir, tmp_path / "autofp8", "weight_scale", "input_scale")
    stored = load_file(path / "model.safetensors")
    expected = {k: v.float() * stored[k.removesuffix("weight") + "weight_scale"] if v.dtype == torch.float8_e4m3fn
                else v for k, v in stored.items() if not k.endswith("_scale")}
    ours, _ = load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")
    assert_same_tensors(ours.state_dict(), expected)
    dense = _folder(tmp_path / "decoded", expected, json.loads((tiny_model_dir / "config.json").read_text()),
                    tiny_model_dir)
    _assert_same_4bit(path, dense)


@pytest.mark.skipif(not _V5, reason="transformers 4.x dequantizes FP8 on a GPU only")
def test_fp8_scales_under_mistrals_names_load_as_transformers_reads_them(tiny_model_dir, tmp_path):
    """``qscale_weight`` and ``qscale_act`` (Mistral's names), which transformers reads as ``weight_scale_inv`` and
    an activation scale."""
    _assert_same_as_transformers(write_fp8_per_tensor(tiny_model_dir, tmp_path / "m", "qscale_weight", "qscale_act"))


def test_stored_floats_train_and_merge_to_a_plain_checkpoint(fp8_llama, tmp_path):
    """An FP8 base trains like any other, and `qlora merge` writes a plain 16-bit checkpoint (no FP8
    quantization_config) that transformers loads as it is."""
    from qlora.cli.main import main

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"say {w}", "output": w}) for w in "abcdefgh") + "\n")
    assert main(["train", "--model", str(fp8_llama), "--data", str(data), "--output", str(tmp_path / "run"),
                 "--max-steps", "2", "--seq-len", "32", "--progress", "off"]) == 0
    assert main(["merge", "--model", str(fp8_llama), "--adapter", str(tmp_path / "run"),
                 "--output", str(tmp_path / "merged")]) == 0
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")  # 4.x: float32
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def _folder(out: Path, tensors: dict, config: dict, like: Path) -> Path:
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    _copy_tokenizer(like, out)
    return out


def test_broken_stored_floats_are_named(fp8_llama, tmp_path, tiny_model_dir):
    key = "model.layers.0.self_attn.q_proj.weight"
    files = load_file(fp8_llama / "model.safetensors")
    config = json.loads((fp8_llama / "config.json").read_text())

    def load(path: Path):
        return load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")

    no_scale = {k: v for k, v in files.items() if k != key + "_scale_inv"}
    with pytest.raises(UsageError, match=rf"{key} is stored in FP8 without a scale .* lacks its scale"):
        load(_folder(tmp_path / "no-scale", no_scale, config, fp8_llama))
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    with pytest.raises(UsageError, match=r"proj.weight is stored in FP8 without a scale .* names no FP8 format"):
        load(_folder(tmp_path / "no-config", files, plain, fp8_llama))
    orphan = _folder(tmp_path / "orphan", {k: v for k, v in files.items() if k != key}, config, fp8_llama)
    with pytest.raises(UsageError, match=rf"{key}_scale_inv has no weight {key} beside it"):
        load(orphan)
    two = _folder(tmp_path / "two", files | {key.removesuffix("weight") + "weight_scale": torch.ones(())}, config,
                  fp8_llama)
    with pytest.raises(UsageError, match=rf"the FP8 weight {key} has several scales"):
        load(two)
    grid = _folder(tmp_path / "grid", files | {key + "_scale_inv": torch.ones(3, 3)}, config, fp8_llama)
    with pytest.raises(UsageError, match=rf"FP8 tensor {key}: its scale grid \(3, 3\) does not tile"):
        load(grid)
    gptq = _folder(tmp_path / "gptq", files, plain | {"quantization_config": {"quant_method": "gptq", "bits": 4}},
                   fp8_llama)
    with pytest.raises(UsageError, match=r"proj.weight is stored in FP8 without a scale .* names no FP8 format"):
        load(gptq)


def write_fbgemm_fp8(src: Path, out: Path, keep: tuple[str, ...]) -> Path:
    """``src`` as Meta's Llama-3.1-405B-Instruct-FP8 stores it (``quant_method: fbgemm_fp8``): each MLP projection an
    e4m3 ``weight`` and a float32 ``weight_scale`` ``[out, 1]`` (one per output row), the modules in ``keep``
    (``modules_to_not_convert``) and the rest as they are."""
    out.mkdir()
    tensors = {}
    for key, w in load_file(src / "model.safetensors").items():
        module = key.removesuffix(".weight")
        if key.endswith("proj.weight") and ".mlp." in key and module not in keep:
            tensors[key], tensors[module + ".weight_scale"] = fp8_encode(w, (1, w.shape[1]))
            tensors[module + ".input_scale_ub"] = torch.tensor([1200.0])  # the layer's bound, were it saved
        else:
            tensors[key] = w
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    _copy_config(src, out, {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                            "modules_to_not_convert": [*keep, "lm_head"]})
    return out


def test_fbgemm_fp8_rows_as_meta_stores_them(tiny_model_dir, tmp_path):
    """fbgemm_fp8 (Meta's Llama-3.1-405B-Instruct-FP8): ``w = q * weight_scale`` row by row, the layers in
    ``modules_to_not_convert`` read as stored; transformers reads the format only with fbgemm-gpu's CUDA kernels,
    so the oracle is that formula, and the 4-bit load is the one of its result saved in 32 bits."""
    keep = tuple(f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down"))
    path = write_fbgemm_fp8(tiny_model_dir, tmp_path / "fbgemm", keep)
    stored = load_file(path / "model.safetensors")
    assert stored["model.layers.1.mlp.up_proj.weight_scale"].shape[1] == 1
    expected = {k: v.float() * stored[k + "_scale"] if v.dtype == torch.float8_e4m3fn else v
                for k, v in stored.items() if not k.endswith(("_scale", "_ub"))}
    ours, _ = load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")
    assert_same_tensors(ours.state_dict(), expected)
    dense = _folder(tmp_path / "decoded", expected, json.loads((tiny_model_dir / "config.json").read_text()),
                    tiny_model_dir)
    _assert_same_4bit(path, dense)
    key = "model.layers.1.mlp.up_proj.weight"
    config = json.loads((path / "config.json").read_text())
    with pytest.raises(UsageError, match=rf"{key} is stored in FP8 without a scale .* lacks its scale {key}_scale,"):
        load_model(_folder(tmp_path / "no-scale", {k: v for k, v in stored.items() if k != key + "_scale"}, config,
                           path), quant=None, device="cpu")
    with pytest.raises(UsageError, match=rf"fbgemm_fp8 tensor {key}: .* the scale \(3, 3\)"):
        load_model(_folder(tmp_path / "grid", stored | {key + "_scale": torch.ones(3, 3)}, config, path), quant=None,
                   device="cpu")


@pytest.mark.skipif(not _V5, reason="transformers 4.x's Llama 4 experts are stored alike but not tested here")
def test_fbgemm_fp8_llama4_experts(tmp_path, tiny_tokenizer):
    """Llama 4's expert stacks under fbgemm_fp8, as transformers' FbgemmFp8Llama4TextExperts holds them: one scale
    per expert and output column, ``gate_up_proj_scale`` ``(E, 1, 2 I)`` and ``down_proj_scale`` ``(E, H, 1)``."""
    dense = save_tiny_moe(tmp_path / "dense", tiny_tokenizer, "llama4_text", intermediate_size=64)
    out = tmp_path / "fbgemm"
    out.mkdir()
    tensors, expected = {}, {}
    for key, w in load_file(dense / "model.safetensors").items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            q, s = fp8_encode(w.transpose(1, 2).reshape(-1, w.shape[1]), (1, w.shape[1]))
            tensors[key] = q.reshape(w.shape[0], w.shape[2], w.shape[1]).transpose(1, 2).contiguous()
            tensors[key + "_scale"] = s.reshape(w.shape[0], 1, -1) if "gate_up" in key else s.reshape(w.shape[0], -1, 1)
            expected[key] = tensors[key].float() * s.reshape(w.shape[0], 1, -1)
        else:
            tensors[key] = expected[key] = w
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    _copy_config(dense, out, {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0})
    ours, _ = load_model(out, quant=None, compute_dtype=torch.float32, device="cpu")
    theirs = {k: v for k, v in ours.state_dict().items() if k in expected}
    assert theirs.keys() == expected.keys()
    for name, t in theirs.items():
        assert torch.equal(t, expected[name]), name
