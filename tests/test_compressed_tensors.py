"""compressed-tensors checkpoints (llm-compressor, vLLM: ``quant_method: compressed-tensors``) load.

The files are written by compressed-tensors' own compressors (``ModelCompressor`` over a tiny model
whose quantization scales are computed from its weights, or a format's compressor on one module's
tensors). Oracles: transformers' dequantizing ``from_pretrained`` (``CompressedTensorsConfig(dequantize=True)``,
which runs on a machine without a GPU) and, for layouts transformers cannot load, compressed-tensors'
own per-module ``decompress``. qlora's 16-bit load must hold exactly their tensors, and its 4-bit load
the same codes as a 4-bit load of those tensors saved in 32 bits.
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
from test_stored_floats import (_IDS, _assert_same_4bit, _copy_tokenizer, _save_dense, assert_same_tensors,
                                with_tensors)
from tiny_moe import save_tiny_moe

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor, ModelCompressor  # noqa: E402
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,  # noqa: E402
                                             apply_quantization_config)
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

_V5 = __import__("importlib").util.find_spec("transformers.conversion_mapping") is not None
_DYNAMIC_TOKEN = dict(num_bits=8, type="float", strategy="token", dynamic=True)


def _observed(w: torch.Tensor, args: QuantizationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """The min and max of ``w`` over each region one scale covers (what an observer computes)."""
    if args.strategy == "tensor":
        return w.amin().reshape(1), w.amax().reshape(1)
    if args.strategy == "channel":
        return w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    if args.strategy == "group":
        g = w.unflatten(-1, (-1, args.group_size))
        return g.amin(-1), g.amax(-1)
    (bm, bn), (rows, cols) = args.block_structure, w.shape
    grid = (-(-rows // bm), -(-cols // bn))
    padded = torch.zeros(grid[0] * bm, grid[1] * bn, dtype=w.dtype)
    padded[:rows, :cols] = w
    blocks = padded.view(grid[0], bm, grid[1], bn)
    return blocks.amin((1, 3)), blocks.amax((1, 3))


def _calibrate(module: torch.nn.Module, args: QuantizationArgs) -> None:
    scale, zero = calculate_qparams(*_observed(module.weight.detach().float(), args), args)
    module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
    if hasattr(module, "weight_zero_point"):
        module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype).reshape(module.weight_zero_point.shape)


def write_compressed(src: Path, out: Path, groups: dict[str, QuantizationScheme], fmt: str | None = None,
                     ignore=("lm_head",), dtype=torch.float32) -> Path:
    """``src`` quantized by ``groups`` and saved by compressed-tensors in ``fmt`` (None: one a scheme implies)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    apply_quantization_config(model, QuantizationConfig(config_groups=groups, ignore=list(ignore)), show_progress=False)
    with torch.no_grad():
        for module in model.modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is not None and scheme.weights is not None:
                _calibrate(module, scheme.weights)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    _copy_tokenizer(src, out)
    return out


def _scheme(weights: dict, targets=("Linear",), inputs: dict | None = None) -> QuantizationScheme:
    return QuantizationScheme(targets=list(targets), weights=QuantizationArgs(**weights),
                              input_activations=QuantizationArgs(**inputs) if inputs else None)


def _dequantizing_load(path: Path):
    config = transformers.CompressedTensorsConfig(dequantize=True)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             quantization_config=config).eval()


def _load16(path: Path):
    return load_model(path, quant=None, compute_dtype=torch.float32, device="cpu")[0]


def _assert_same(ours, theirs: dict[str, torch.Tensor]) -> None:
    assert_same_tensors(ours.state_dict(), theirs)


# (weights, input activations, format, model dtype): the released kinds of checkpoints
CASES = {
    "fp8-dynamic-channel": (dict(num_bits=8, type="float", strategy="channel"), _DYNAMIC_TOKEN, "float-quantized",
                            torch.bfloat16),
    "fp8-static-tensor": (dict(num_bits=8, type="float", strategy="tensor"),
                          dict(num_bits=8, type="float", strategy="tensor"), "float-quantized", torch.float32),
    "fp8-block": (dict(num_bits=8, type="float", strategy="block", block_structure=[48, 48]), None,
                  "float-quantized", torch.float32),
    "fp8-group": (dict(num_bits=8, type="float", strategy="group", group_size=32), None, "float-quantized",
                  torch.float16),
    "w4a16-group": (dict(num_bits=4, type="int", strategy="group", group_size=32), None, "pack-quantized",
                    torch.bfloat16),
    "w4a16-asym-group": (dict(num_bits=4, type="int", strategy="group", group_size=16, symmetric=False), None,
                         "pack-quantized", torch.float32),
    "w4a16-asym-channel": (dict(num_bits=4, type="int", strategy="channel", symmetric=False), None,
                           "pack-quantized", torch.float32),
    "w8a16-channel": (dict(num_bits=8, type="int", strategy="channel"), None, "pack-quantized", torch.float32),
    "w2-group": (dict(num_bits=2, type="int", strategy="group", group_size=32), None, "pack-quantized",
                 torch.float32),
    "w8a8-int": (dict(num_bits=8, type="int", strategy="channel"),
                 dict(num_bits=8, type="int", strategy="token", dynamic=True), "int-quantized", torch.float32),
    "naive-int8-asym-tensor": (dict(num_bits=8, type="int", strategy="tensor", symmetric=False), None,
                               "naive-quantized", torch.float32),
}


@pytest.mark.parametrize("case", CASES)
def test_compressed_tensors_checkpoint_loads_as_transformers_dequantizes_it(case, tiny_model_dir, tmp_path):
    weights, inputs, fmt, dtype = CASES[case]
    path = write_compressed(tiny_model_dir, tmp_path / case, {"group_0": _scheme(weights, inputs=inputs)}, fmt,
                            ignore=("lm_head", "re:.*layers\\.1\\.mlp\\.down_proj$"), dtype=dtype)
    stored = load_file(path / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj."
    assert q + ("weight_packed" if fmt == "pack-quantized" else "weight") in stored and q + "weight_scale" in stored
    assert json.loads((path / "config.json").read_text())["quantization_config"]["format"] == fmt
    ref = _dequantizing_load(path)
    ours = _load16(path)
    _assert_same(ours, ref.state_dict())
    with torch.no_grad():
        assert torch.equal(ours(_IDS).logits, ref(_IDS).logits)
    original = load_file(tiny_model_dir / "model.safetensors")
    ignored = "model.layers.1.mlp.down_proj.weight"  # in `ignore`: stored as it was, read as it is
    assert torch.equal(ours.get_parameter(ignored), stored[ignored].float())
    assert torch.equal(stored[ignored].float(), original[ignored].to(dtype).float())
    decoded, want = ours.get_parameter(q + "weight"), original[q + "weight"].float()
    assert not torch.equal(decoded, want)  # the codes were read, not a 16-bit copy
    assert (decoded - want).abs().max() < (0.6 if weights["num_bits"] == 2 else 0.15) * want.abs().max()


@pytest.mark.parametrize("case", ["fp8-block", "w4a16-asym-group"])
def test_compressed_tensors_4bit_load_quantizes_the_decoded_weights(case, tiny_model_dir, tmp_path):
    weights, inputs, fmt, dtype = CASES[case]
    path = write_compressed(tiny_model_dir, tmp_path / case, {"group_0": _scheme(weights, inputs=inputs)}, fmt,
                            dtype=dtype)
    _assert_same_4bit(path, _save_dense(_dequantizing_load(path), path, tmp_path / "dense"))


def test_mixed_precision_groups_by_target(tiny_model_dir, tmp_path):
    """Two config groups (INT4 asymmetric MLPs, FP8 attention: ``format: mixed-precision``) each decode with
    their own scheme. transformers' loader applies one scheme to every layer and fails on such files, so the
    oracle is compressed-tensors' decompress of each module with its group's scheme."""
    groups = {"mlp": _scheme(dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=False),
                             targets=["re:.*mlp\\..*"]),
              "attention": _scheme(dict(num_bits=8, type="float", strategy="channel"), targets=["re:.*self_attn.*"],
                                   inputs=_DYNAMIC_TOKEN)}
    path = write_compressed(tiny_model_dir, tmp_path / "mixed", groups, None)
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    stored = load_file(path / "model.safetensors")
    want = {}
    for key, tensor in stored.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in ("weight", "weight_packed") or module + ".weight_scale" not in stored:
            want[key] = tensor.float()
            continue
        target = "re:.*mlp\\..*" if ".mlp." in key else "re:.*self_attn.*"
        scheme = next(QuantizationScheme.model_validate(group) for group in qc["config_groups"].values()
                      if group["targets"] == [target])
        parts = {k.rpartition(".")[2]: v for k, v in stored.items() if k.startswith(module + ".")}
        want[module + ".weight"] = BaseCompressor.get_value_from_registry(scheme.format).decompress(
            parts, scheme)["weight"].float()
    ours = _load16(path)
    theirs = {k: want[k] for k in ours.state_dict()}
    _assert_same(ours, theirs)


@pytest.mark.skipif(not _V5, reason="transformers 4.x keeps experts as per-expert linear layers")
def test_pack_quantized_moe_experts(tmp_path, tiny_tokenizer):
    """Kimi-K2-style: every expert's projections INT4 pack-quantized (per-expert keys, written by the format's
    compressor), attention kept 16-bit; decoded, joined into transformers 5's 3-D experts, then 4-bit."""
    dense = save_tiny_moe(tmp_path / "dense", tiny_tokenizer, "qwen3_moe")
    scheme = _scheme(dict(num_bits=4, type="int", strategy="group", group_size=16), targets=["re:.*experts.*"])
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    tensors = {}
    for key, w in load_file(dense / "model.safetensors").items():
        if ".experts." in key and key.endswith("proj.weight"):
            layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            layer.weight.data = w
            layer.weight_scale = torch.nn.Parameter(torch.empty(w.shape[0], w.shape[1] // 16), requires_grad=False)
            _calibrate(layer, scheme.weights)
            parts = compressor.compress({"weight": w, "weight_scale": layer.weight_scale.data}, scheme)
            tensors |= {key[: -len("weight")] + name: t for name, t in parts.items()}
        else:
            tensors[key] = w
    out = tmp_path / "int4"
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dense / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                     "quantization_status": "compressed", "ignore": ["lm_head"],
                                     "config_groups": {"group_0": scheme.model_dump()}}
    (out / "config.json").write_text(json.dumps(config))
    _copy_tokenizer(dense, out)
    ref = _dequantizing_load(out)
    _assert_same(_load16(out), ref.state_dict())
    _assert_same_4bit(out, _save_dense(ref, out, tmp_path / "decoded"))


REFUSED = {
    "mxfp4": ({"format": "mxfp4-pack-quantized", "group_format": "mxfp4-pack-quantized"},
              r"config_groups.group_0.format = 'mxfp4-pack-quantized'"),
    "nvfp4-int-weights": ({"format": "nvfp4-pack-quantized", "group_format": "nvfp4-pack-quantized"},
                          r"config_groups.group_0.weights = 'float8 group_size None': not the FP4 weights"),
    "marlin-24": ({"format": "marlin-24", "group_format": None}, r"format = 'marlin-24'"),
    "sparse-24": ({"sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}},
                  r"sparsity_config.format = 'sparse-24-bitmask': sparse weights"),
    "activation-only": ({"config_groups": {"group_0": {"targets": ["Linear"], "input_activations": _DYNAMIC_TOKEN}}},
                        r"config_groups.group_0.weights = None: an activation-only scheme"),
    "transforms": ({"transform_config": {"config_groups": {"u": {"type": "hadamard"}}}},
                   r"transform_config = '\(set\)': weights rotated"),
    "int3": ({"config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": {
        "num_bits": 3, "type": "int", "strategy": "channel"}}}}, r"config_groups.group_0.weights = 'int3'"),
    "token-weights": ({"config_groups": {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 8, "type": "float", "strategy": "tensor_group", "group_size": 16}}}},
        r"config_groups.group_0.weights.strategy = 'tensor_group'"),
    "not-compressed": ({"quantization_status": "frozen"}, r"quantization_status = 'frozen'"),
}


@pytest.fixture(scope="module")
def fp8_channel(tiny_model_dir, tmp_path_factory):
    weights, inputs, fmt, dtype = CASES["fp8-dynamic-channel"]
    return write_compressed(tiny_model_dir, tmp_path_factory.mktemp("ct") / "fp8", {"group_0": _scheme(
        weights, inputs=inputs)}, fmt, dtype=dtype)


@pytest.mark.parametrize("case", REFUSED)
def test_undecodable_compressed_tensors_variants_are_refused(case, fp8_channel, tmp_path):
    change, message = REFUSED[case]
    out = tmp_path / case
    shutil.copytree(fp8_channel, out)
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    if "group_format" in change:  # the format each group names (written since compressed-tensors 0.10) or none
        qc["config_groups"]["group_0"]["format"] = change["group_format"]
    qc |= {k: v for k, v in change.items() if k != "group_format"}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=rf"config.json describes a compressed-tensors checkpoint with "
                                         rf"quantization_config {message}.*original 16/32-bit checkpoint"):
        _load16(out)


def test_kv_cache_scales_are_dropped(fp8_channel, tmp_path):
    """RedHatAI's ``-FP8-KV`` releases add a kv_cache_scheme and per-layer ``k_scale``/``v_scale``: the weights
    are those of the checkpoint without them (the cache of a dequantized model stays 16-bit)."""
    out = tmp_path / "kv"
    shutil.copytree(fp8_channel, out)
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor",
                                                        "dynamic": False, "symmetric": True}
    (out / "config.json").write_text(json.dumps(config))
    stored = load_file(out / "model.safetensors")
    scales = {f"model.layers.{i}.self_attn.{kv}_scale": torch.tensor(0.05) for i in range(2) for kv in "kv"}
    save_file(stored | scales, out / "model.safetensors", metadata={"format": "pt"})
    _assert_same(_load16(out), _load16(fp8_channel).state_dict())


def test_broken_compressed_tensors_files_are_named(fp8_channel, tmp_path):
    stored = load_file(fp8_channel / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    no_scale = with_tensors(fp8_channel, tmp_path / "no-scale",
                            {k: v for k, v in stored.items() if k != key + "_scale"})
    with pytest.raises(UsageError, match=rf"tensor {key} is stored as torch.float8_e4m3fn codes without its scale"):
        _load16(no_scale)
    orphan = with_tensors(fp8_channel, tmp_path / "orphan", {k: v for k, v in stored.items() if k != key})
    with pytest.raises(UsageError, match=rf"weight {key} is stored as {key}_scale, which lacks its codes"):
        _load16(orphan)
    grid = with_tensors(fp8_channel, tmp_path / "grid",
                        stored | {key + "_scale": torch.ones(3, 1, dtype=torch.bfloat16)})
    with pytest.raises(UsageError, match=rf"weight {key}: its scale \(3, 1\) do not tile its shape"):
        _load16(grid)
