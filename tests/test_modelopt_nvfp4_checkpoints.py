"""NVFP4 checkpoints load: ModelOpt's (``quant_method: modelopt``, NVIDIA's ``-FP4`` releases; its FP8 too) and
compressed-tensors' ``nvfp4-pack-quantized`` (llm-compressor's ``-NVFP4`` releases).

compressed-tensors files are written by its own NVFP4 compressor, and its ``decompress`` is the oracle.
ModelOpt files are written here from the format's public definition (two ``e2m1`` codes a byte, the
even column in the low nibble; one ``float8_e4m3fn`` scale per 16 input columns times a float32
``weight_scale_2``); the oracle is a decode written here from that definition, and compressed-tensors'
own ModelOpt-to-compressed-tensors converter followed by its ``decompress`` (an independent reading
of the same files).
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
from test_stored_floats import (_IDS, _assert_same_4bit, _copy_config, _copy_tokenizer, _save_dense,
                                assert_same_tensors, with_tensors)

pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_NVFP4 = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=4, type="float",
                                                                         strategy="tensor_group", group_size=16))


def _quantized(key: str) -> bool:
    return ".layers." in key and key.endswith("proj.weight") and "layers.1.mlp.down_proj" not in key


def _fp4_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest ``e2m1`` code (sign in bit 3) of each value of ``x`` (already scaled into [-6, 6])."""
    magnitude = (x.abs().unsqueeze(-1) - E2M1).abs().argmin(-1)
    return (magnitude | (x < 0).long() << 3).to(torch.uint8)


def modelopt_encode(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """``w`` ``[out, in]`` as ModelOpt's NVFP4 ``weight``, ``weight_scale``, ``weight_scale_2``."""
    scale_2 = w.abs().amax() / (448.0 * 6.0)
    groups = w.float().unflatten(-1, (-1, 16))
    block = (groups.abs().amax(-1) / 6.0 / scale_2).to(torch.float8_e4m3fn)
    codes = _fp4_codes(groups / (block.float() * scale_2).clamp(min=1e-30).unsqueeze(-1)).flatten(-2)
    return {"weight": codes[:, 0::2] | codes[:, 1::2] << 4, "weight_scale": block,
            "weight_scale_2": scale_2.reshape(()), "input_scale": torch.tensor(0.02)}


def modelopt_decode(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The format's definition: low nibble = even column; ``code * (weight_scale * weight_scale_2)``."""
    packed = parts["weight"].long()
    codes = torch.stack((packed & 0xF, packed >> 4), -1).flatten(-2)
    values = E2M1[codes & 7] * torch.where(codes >= 8, -1.0, 1.0)
    scale = parts["weight_scale"].float() * parts["weight_scale_2"].float()
    return values * scale.repeat_interleave(16, dim=-1)


def write_modelopt(src: Path, out: Path, where: str = "config", shard_scales: bool = False) -> Path:
    """``src``'s projections (but layer 1's down_proj, excluded) in ModelOpt NVFP4, with KV-cache scales."""
    tensors, scales = {}, {}
    for key, w in load_file(src / "model.safetensors").items():
        if _quantized(key):
            module = key[: -len("weight")]
            parts = modelopt_encode(w)
            tensors[key] = parts.pop("weight")
            scales |= {module + name: t for name, t in parts.items()}
            if key.endswith(("k_proj.weight", "v_proj.weight")):
                scales[module + key[-13] + "_scale"] = torch.tensor(1.0)
        else:
            tensors[key] = w
    quantization = {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
                    "exclude_modules": ["lm_head", "model.layers.1.mlp.down_proj"]}
    out.mkdir()
    if shard_scales:
        names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
        save_file(tensors, out / names[0], metadata={"format": "pt"})
        save_file(scales, out / names[1], metadata={"format": "pt"})
        weight_map = {k: names[0] for k in tensors} | {k: names[1] for k in scales}
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file(tensors | scales, out / "model.safetensors", metadata={"format": "pt"})
    if where == "config":
        _copy_config(src, out, {"quant_method": "modelopt", **quantization})
    else:  # older releases: config.json names no quantization; hf_quant_config.json does
        shutil.copy(src / "config.json", out / "config.json")
        _copy_tokenizer(src, out)
        (out / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt", "version": "0.19"},
                                                              "quantization": quantization}))
    return out


def _stored(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def _load16(path: Path):
    return load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")[0]


def _modules(stored: dict[str, torch.Tensor], leaf: str) -> dict[str, dict[str, torch.Tensor]]:
    """Each quantized module's parts, by the module's name (those that store ``leaf``)."""
    found = {k[: -len(leaf) - 1] for k in stored if k.endswith("." + leaf)}
    return {m: {k[len(m) + 1:]: v for k, v in stored.items() if k.startswith(m + ".")} for m in found}


@pytest.mark.parametrize("where, shard_scales", [("config", False), ("hf_quant_config", True)])
def test_modelopt_nvfp4_decodes_as_the_format_defines(where, shard_scales, tiny_model_dir, tmp_path):
    path = write_modelopt(tiny_model_dir, tmp_path / "m", where, shard_scales)
    stored = _stored(path)
    ours = _load16(path).state_dict()
    original = load_file(tiny_model_dir / "model.safetensors")
    assert ours.keys() == original.keys()  # input and KV-cache scales dropped, nothing else
    modules = _modules(stored, "weight_scale_2")
    assert len(modules) == 13
    converted = ModelOptNvfp4Converter(targets=["re:.*"]).process(dict(stored))
    compressor = BaseCompressor.get_value_from_registry("nvfp4-pack-quantized")
    for module, parts in modules.items():
        key = module + ".weight"
        want = modelopt_decode(parts)
        assert torch.equal(ours[key], want), key
        assert not torch.equal(want, original[key])
        assert (want - original[key]).abs().max() < 0.3 * original[key].abs().max()
        theirs = compressor.decompress({n: converted[f"{module}.{n}"] for n in (
            "weight_packed", "weight_scale", "weight_global_scale")}, _NVFP4)["weight"]
        # within one bfloat16 step: compressed-tensors scales by 1 / (1 / weight_scale_2), not weight_scale_2
        torch.testing.assert_close(ours[key].to(theirs.dtype), theirs, rtol=2**-7, atol=0)
    for key in ("lm_head.weight", "model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
        assert torch.equal(ours[key], original[key])


def test_modelopt_nvfp4_4bit_load_and_refused_algorithms(tiny_model_dir, tmp_path):
    path = write_modelopt(tiny_model_dir, tmp_path / "m")
    _assert_same_4bit(path, _save_dense(_load16(path), path, tmp_path / "dense"))
    awq = tmp_path / "awq"
    shutil.copytree(path, awq)
    config = json.loads((awq / "config.json").read_text())
    config["quantization_config"]["quant_algo"] = "W4A8_AWQ"
    (awq / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=r"config.json describes a ModelOpt checkpoint with quant_algo = 'W4A8_AWQ'"):
        _load16(awq)
    stored = load_file(path / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight"
    broken = with_tensors(path, tmp_path / "broken",
                          {k: v for k, v in stored.items() if k != key[:-6] + "weight_scale_2"})
    with pytest.raises(UsageError, match=rf"NVFP4 weight {key} is stored as .*, which lacks {key}_scale_2"):
        _load16(broken)


def write_ct_nvfp4(src: Path, out: Path) -> Path:
    """``src``'s projections (but layer 1's down_proj, ignored) compressed by compressed-tensors' NVFP4
    compressor, with global and group scales calibrated from the weights."""
    compressor = BaseCompressor.get_value_from_registry("nvfp4-pack-quantized")
    tensors = {}
    for key, w in load_file(src / "model.safetensors").items():
        if not _quantized(key):
            tensors[key] = w
            continue
        global_scale = generate_gparam(w.amin(), w.amax())
        groups = w.unflatten(-1, (-1, 16))
        scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), _NVFP4.weights, global_scale=global_scale)
        parts = compressor.compress({"weight": w, "weight_scale": scale, "weight_global_scale": global_scale}, _NVFP4)
        tensors |= {key[: -len("weight")] + name: t for name, t in parts.items()}
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    _copy_config(src, out, {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
                            "quantization_status": "compressed", "ignore": ["lm_head", "model.layers.1.mlp.down_proj"],
                            "config_groups": {"group_0": _NVFP4.model_dump() | {"format": "nvfp4-pack-quantized"}}})
    return out


def test_compressed_tensors_nvfp4_decodes_as_compressed_tensors_does(tiny_model_dir, tmp_path):
    """The global scale is stored inverted (``448 * 6 / amax``): ``w = code * weight_scale / weight_global_scale``,
    in float32; compressed-tensors' ``decompress`` computes the same and rounds it to bfloat16."""
    path = write_ct_nvfp4(tiny_model_dir, tmp_path / "ct")
    stored = load_file(path / "model.safetensors")
    model = _load16(path)
    ours = model.state_dict()
    compressor = BaseCompressor.get_value_from_registry("nvfp4-pack-quantized")
    modules = _modules(stored, "weight_global_scale")
    assert len(modules) == 13
    for module, parts in modules.items():
        key = module + ".weight"
        assert parts["weight_packed"].dtype == torch.uint8 and parts["weight_scale"].dtype == torch.float8_e4m3fn
        theirs = compressor.decompress(dict(parts), _NVFP4)["weight"]
        assert torch.equal(ours[key].to(theirs.dtype), theirs), key
        codes = modelopt_decode({"weight": parts["weight_packed"], "weight_scale": torch.ones_like(
            parts["weight_scale"], dtype=torch.float32), "weight_scale_2": torch.ones(())})
        scale = parts["weight_scale"].float() / parts["weight_global_scale"]
        exact = codes * scale.repeat_interleave(16, dim=-1)
        assert torch.equal(ours[key], exact), key
    assert torch.equal(ours["model.layers.1.mlp.down_proj.weight"], stored["model.layers.1.mlp.down_proj.weight"])
    dense = _save_dense(model, path, tmp_path / "dense")
    with torch.no_grad():
        assert torch.equal(model(_IDS).logits, _load16(dense)(_IDS).logits)
    _assert_same_4bit(path, dense)
    assert_same_tensors(_load16(dense).state_dict(), ours)


@pytest.mark.parametrize("per_row", [False, True])
def test_modelopt_fp8_per_tensor_and_per_row_scales(per_row, tiny_model_dir, tmp_path):
    """ModelOpt's FP8 (``quant_algo: FP8``): ``float8_e4m3fn`` weights and one float32 ``weight_scale`` per tensor
    (or per output row); ``w = code * weight_scale``."""
    tensors, want = {}, {}
    for key, w in load_file(tiny_model_dir / "model.safetensors").items():
        if not _quantized(key):
            tensors[key] = w
            continue
        scale = (w.abs().amax(-1, keepdim=True) if per_row else w.abs().amax()) / 448.0
        codes = (w / scale).to(torch.float8_e4m3fn)
        module = key[: -len("weight")]
        tensors |= {key: codes, module + "weight_scale": scale, module + "input_scale": torch.tensor(0.1)}
        want[key] = codes.float() * scale
    out = tmp_path / "fp8"
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    _copy_config(tiny_model_dir, out, {"quant_method": "modelopt", "quant_algo": "FP8", "exclude_modules": ["lm_head"]})
    assert_same_tensors(_load16(out).state_dict(), load_file(tiny_model_dir / "model.safetensors") | want)


def test_modelopt_kv_cache_only_checkpoint_reads_its_16bit_weights(tiny_model_dir, tmp_path):
    """``quant_algo: null`` with an FP8 KV cache (``-FP8-KV`` style): the weights are 16-bit, the cache scales
    dropped."""
    original = load_file(tiny_model_dir / "model.safetensors")
    scales = {f"model.layers.{i}.self_attn.{p}_proj.{p}_scale": torch.tensor(0.5) for i in range(2) for p in "kv"}
    out = tmp_path / "kv"
    out.mkdir()
    save_file(original | scales, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(tiny_model_dir / "config.json", out / "config.json")
    _copy_tokenizer(tiny_model_dir, out)
    (out / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"}, "quantization": {
        "quant_algo": None, "kv_cache_quant_algo": "FP8"}}))
    assert_same_tensors(_load16(out).state_dict(), original)
