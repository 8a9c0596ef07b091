"""bitsandbytes 4-bit MoE checkpoints written with transformers 4.x: every expert's projection its own packed
layer (``experts.3.w1.weight`` + ``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``, ...), the router a
packed ``nn.Linear`` too. qlora joins them into its 3-D expert weights' 4-bit layers.

The files are written here in that layout from bitsandbytes' own quantization of each piece (what transformers
4.x + bitsandbytes saves), so no second transformers is needed. Oracles: bitsandbytes' dequantization of each
stored piece, and transformers 5 on a 16-bit checkpoint of those dequantized pieces.
"""

from __future__ import annotations

import json

import pytest
import torch

import qlora
from qlora.model.load import load_model
from qlora.nn import Experts4bit
from test_architectures_load import train_losses
from tiny_moe import save_tiny_moe

transformers = pytest.importorskip("transformers")
bnb_F = pytest.importorskip("bitsandbytes.functional")
pytestmark = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("transformers.conversion_mapping"),
    reason="transformers 4.x keeps experts as per-expert linear layers (loaded as they are)")

_IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 8, 64, 12], [3, 9, 27, 81, 200, 150, 11, 4, 66, 90]])
# rows of whole blocks (bitsandbytes' CPU dequantization misreads other widths), so every piece is whole blocks
_SIZES = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=128, shared_expert_intermediate_size=64,
              head_dim=16)


def _write_4x(dense, out, quant_type: str, double_quant: bool, blocksize: int = 64, skip: tuple[str, ...] = ()):
    """``dense`` (transformers' per-expert 16-bit files) as transformers 4.x + bitsandbytes stores it 4-bit:
    every linear weight but the embeddings, head and ``skip`` packed by bitsandbytes; beside it the dequantized
    pieces (``out/deq``, 16-bit, the oracle's checkpoint)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(dense / "model.safetensors")
    packed, deq = {}, {}
    for key, value in tensors.items():
        if value.dim() == 2 and key.endswith(".weight") and not any(s in key for s in ("embed", "lm_head", *skip)):
            codes, state = bnb_F.quantize_4bit(value.float(), blocksize=blocksize, quant_type=quant_type,
                                               compress_statistics=double_quant)
            packed[key] = codes
            packed.update({f"{key}.{k}": v for k, v in state.as_dict(packed=True).items()})
            deq[key] = bnb_F.dequantize_4bit(codes, state)
        else:
            packed[key] = deq[key] = value
    for folder, files in ((out, packed), (out / "deq", deq)):
        folder.mkdir(parents=True)
        save_file(files, folder / "model.safetensors", metadata={"format": "pt"})
        for f in dense.iterdir():
            if f.name != "model.safetensors":
                (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
                                     "bnb_4bit_compute_dtype": "float32",
                                     "llm_int8_skip_modules": ["lm_head", *skip] if skip else None}
    (out / "config.json").write_text(json.dumps(config))
    return packed


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_tokenizer):
    cache = {}

    def get(model_type: str, quant_type: str = "nf4", double_quant: bool = True):
        key = (model_type, quant_type, double_quant)
        if key not in cache:
            sizes = dict(_SIZES)
            if model_type.startswith("deepseek"):  # latent attention: its ranks and value heads a block wide
                sizes.update(head_dim=8, q_lora_rank=64, kv_lora_rank=64, v_head_dim=16)
            if model_type == "jamba":  # a Mamba layer (no kernels on CPU; dt_proj rows a block wide), an attention one
                sizes.update(use_mamba_kernels=False, mamba_dt_rank=64, attn_layer_offset=1, attn_layer_period=2)
            dense = save_tiny_moe(tmp_path_factory.mktemp(model_type), tiny_tokenizer, model_type, **sizes)
            out = tmp_path_factory.mktemp("bnb4x") / "q"
            cache[key] = out, _write_4x(dense, out, quant_type, double_quant)
        return cache[key]
    return get


def _pieces(model_type: str, layer: int, expert: int, weight: str) -> list[str]:
    """The 4.x keys whose rows make expert ``expert``'s ``weight`` (gate rows, then up rows)."""
    if model_type in ("mixtral", "phimoe"):
        names = ["w1", "w3"] if weight == "gate_up_proj" else ["w2"]
        return [f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{n}.weight" for n in names]
    names = ["gate_proj", "up_proj"] if weight == "gate_up_proj" else ["down_proj"]
    block = "feed_forward" if model_type == "jamba" else "mlp"
    return [f"model.layers.{layer}.{block}.experts.{expert}.{n}.weight" for n in names]


def _bnb_dequantized(packed: dict, key: str) -> torch.Tensor:
    state = bnb_F.QuantState.from_dict({k[len(key) + 1:]: v for k, v in packed.items() if k.startswith(key + ".")},
                                       torch.device("cpu"))
    return bnb_F.dequantize_4bit(packed[key], state)


def _dequantized(packed: dict, key: str) -> torch.Tensor:
    """qlora's decoding of a stored piece (bitsandbytes' bit for bit, also for rows that are not whole blocks,
    which bitsandbytes' CPU path misreads)."""
    from qlora.quant import QuantState, dequantize_4bit

    state = QuantState.from_dict({k[len(key) + 1:]: v for k, v in packed.items() if k.startswith(key + ".")})
    return dequantize_4bit(packed[key], state, torch.float32)


@pytest.mark.parametrize("model_type,quant_type,double_quant", [
    ("mixtral", "nf4", True), ("mixtral", "fp4", False), ("qwen3_moe", "nf4", True), ("qwen2_moe", "fp4", True),
    ("qwen2_moe", "nf4", False), ("olmoe", "nf4", True), ("deepseek_v3", "nf4", True), ("jamba", "nf4", True),
    ("phimoe", "fp4", False)])
def test_experts_are_the_stored_pieces_joined(written, model_type, quant_type, double_quant):
    """Each expert's matrix is its pieces' bitsandbytes dequantization, row for row: exactly without double
    quantization and for single pieces (down_proj), within the second rounding of the block constants with it
    (the joined absmax are double-quantized again); logits as transformers' on the dequantized pieces."""
    path, packed = written(model_type, quant_type, double_quant)
    ours, _ = load_model(path, compute_dtype=torch.float32, device="cpu")
    experts = {n: m for n, m in ours.named_modules() if isinstance(m, Experts4bit)}
    assert experts
    for name, module in experts.items():
        layer = int(name.split(".")[2])
        assert module.layers("gate_up_proj")[0].quant_type == quant_type
        for weight in module.weight_names:
            joined = module.dequantize(weight, torch.float32)
            for e in range(joined.shape[0]):
                pieces = _pieces(model_type, layer, e, weight)
                ref = torch.cat([_bnb_dequantized(packed, k) for k in pieces])
                if double_quant and len(pieces) > 1:
                    # an absmax off by at most one 8-bit step of its nested block (1/127 of the spread)
                    torch.testing.assert_close(joined[e], ref, rtol=0, atol=1e-2 * ref.abs().max().item())
                else:
                    assert torch.equal(joined[e], ref), (name, weight, e)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(path / "deq", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs, mine = ref_model(_IDS).logits, ours(_IDS).logits
    tol = 2e-2 if double_quant else 1e-5  # measured: 0.8% of the largest logit with double quantization
    torch.testing.assert_close(mine, theirs, rtol=0, atol=tol * theirs.abs().max().item())


def test_experts_4x_kept_16bit(written):
    """GraniteMoE's 4.x experts are 3-D parameters (``input_linear``, ``output_linear``), which bitsandbytes leaves
    16-bit beside its packed layers: quantized while loading, they and the adopted packed layers are those of a
    load of the dequantized checkpoint, bit for bit (NF4 codes of NF4-decoded blocks are the same codes)."""
    path, packed = written("granitemoe", "nf4", False)
    assert packed["model.layers.0.block_sparse_moe.input_linear.weight"].dtype == torch.float32
    ours, _ = load_model(path, compute_dtype=torch.float32, device="cpu")
    assert any(isinstance(m, Experts4bit) for m in ours.modules())
    again, _ = load_model(path / "deq", quant="nf4", double_quant=False, compute_dtype=torch.float32, device="cpu")
    theirs = again.state_dict()
    for name, t in ours.state_dict().items():
        assert torch.equal(t, theirs[name]), name


def test_double_quantized_join_error_is_that_of_the_constants(written):
    """The measured cost of double-quantizing the joined absmax again: each weight within one 8-bit step of its
    block's absmax times the code value, far below the 4-bit step (the error of quantizing at all)."""
    path, packed = written("qwen3_moe", "nf4", True)
    ours, _ = load_model(path, compute_dtype=torch.float32, device="cpu")
    module = next(m for m in ours.modules() if isinstance(m, Experts4bit))
    joined = module.dequantize("gate_up_proj", torch.float32)[0]
    ref = torch.cat([_bnb_dequantized(packed, k) for k in _pieces("qwen3_moe", 0, 0, "gate_up_proj")])
    blocks_ref = ref.reshape(-1, 64).abs().amax(1)
    relative = ((joined - ref).reshape(-1, 64).abs().amax(1) / blocks_ref).max().item()
    assert 0 < relative < 2e-2  # a 4-bit NF4 step near the top is 0.28 of the absmax


def test_expert_lora_trains_saves_and_merges(tmp_path, written):
    path, _ = written("qwen3_moe", "nf4", True)
    ours, tokenizer = load_model(path, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(ours, r=4, dropout=0.0, target_modules=[], target_parameters=["gate_up_proj", "down_proj"])
    losses = train_losses(ours, _IDS, steps=6)
    assert losses[-1] < losses[0] - 0.05
    ours.eval()
    with torch.no_grad():
        adapted = ours(_IDS).logits
    qlora.save_adapter(ours, tmp_path / "adapter")
    again, _ = load_model(path, compute_dtype=torch.float32, device="cpu")
    again = qlora.load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(_IDS).logits, adapted, rtol=0, atol=1e-5)
    qlora.merge(again, dtype=torch.float32)
    qlora.save_merged(again, tmp_path / "merged", tokenizer)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_IDS).logits, adapted, rtol=1e-4, atol=1e-4)


def test_pieces_not_whole_blocks_are_quantized_again(tmp_path, tiny_tokenizer):
    """Pieces of 42 x 64 elements with blocks of 256: not whole blocks, decoded and quantized again in the
    file's format (blocks then straddle gate and up rows), close to the pieces' values."""
    dense = save_tiny_moe(tmp_path / "dense", tiny_tokenizer, "mixtral", hidden_size=64, intermediate_size=42)
    packed = _write_4x(dense, tmp_path / "q", "nf4", False, blocksize=256)
    ours, _ = load_model(tmp_path / "q", compute_dtype=torch.float32, device="cpu")
    module = next(m for m in ours.modules() if isinstance(m, Experts4bit))
    layer = module.layers("gate_up_proj")[1]
    assert layer.blocksize == 256 and not layer.double_quant
    ref = torch.cat([_dequantized(packed, k) for k in _pieces("mixtral", 0, 1, "gate_up_proj")])
    torch.testing.assert_close(layer.dequantize(torch.float32), ref, rtol=0, atol=0.2 * ref.abs().max().item())
    assert torch.equal(module.dequantize("down_proj", torch.float32)[1],
                       _dequantized(packed, _pieces("mixtral", 0, 1, "down_proj")[0]))


def test_experts_kept_dense_are_the_pieces_decoded(written):
    """``quantize_experts=False``: the pieces decoded and joined by transformers' converter, exactly."""
    path, packed = written("mixtral", "nf4", True)
    ours, _ = load_model(path, compute_dtype=torch.float32, device="cpu", quantize_experts=False)
    assert not any(isinstance(m, Experts4bit) for m in ours.modules())
    gate_up = ours.model.layers[1].mlp.experts.gate_up_proj
    assert torch.equal(gate_up[2], torch.cat([_bnb_dequantized(packed, k) for k in _pieces("mixtral", 1, 2,
                                                                                             "gate_up_proj")]))


def _with_weights(path, out, shards: dict[str, dict]):
    """A copy of the checkpoint ``path`` at ``out`` whose weight files are ``shards`` (file name: its tensors)."""
    from safetensors.torch import save_file

    out.mkdir()
    for f in path.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    for name, tensors in shards.items():
        save_file(tensors, out / name, metadata={"format": "pt"})
    return out


def test_a_piece_without_its_absmax_is_named(tmp_path, written):
    from qlora.errors import UsageError

    path, packed = written("qwen3_moe", "fp4", False)
    key = _pieces("qwen3_moe", 1, 3, "gate_up_proj")[1]
    broken = _with_weights(path, tmp_path / "broken",
                           {"model.safetensors": {k: v for k, v in packed.items() if k != key + ".absmax"}})
    with pytest.raises(UsageError, match=rf"{key}.*absmax"):
        load_model(broken, compute_dtype=torch.float32, device="cpu")


def test_an_expert_the_file_keeps_16bit(tmp_path, tiny_tokenizer):
    """A skip list naming one expert's projection (as Unsloth's dynamic 4-bit releases name sensitive modules):
    that layer's other pieces are decoded, the weight joined by transformers' converter and quantized in the
    file's format; the decoded pieces quantize back to their own codes (whole blocks, no double quantization)."""
    from qlora.quant import quantize_4bit

    dense = save_tiny_moe(tmp_path / "dense", tiny_tokenizer, "qwen3_moe", **_SIZES)
    kept = "model.layers.1.mlp.experts.2.down_proj"
    packed = _write_4x(dense, tmp_path / "q", "nf4", False, skip=(kept,))
    ours, _ = load_model(tmp_path / "q", compute_dtype=torch.float32, device="cpu")
    down = ours.model.layers[1].mlp.experts.dequantize("down_proj", torch.float32)
    for e in (0, 1, 3):
        assert torch.equal(down[e], _bnb_dequantized(packed, _pieces("qwen3_moe", 1, e, "down_proj")[0]))
    codes, state = quantize_4bit(packed[kept + ".weight"], "nf4", 64, False)
    assert torch.equal(down[2], _dequantized({"w": codes, **{f"w.{k}": v for k, v in
                                                             state.as_dict(packed=True).items()}}, "w"))


def test_a_missing_expert_is_named_before_reading(tmp_path, written):
    from qlora.errors import UsageError

    path, packed = written("qwen3_moe", "fp4", False)
    gone = _pieces("qwen3_moe", 1, 3, "gate_up_proj")[1]
    broken = _with_weights(path, tmp_path / "broken",
                           {"model.safetensors": {k: v for k, v in packed.items() if not k.startswith(gone)}})
    with pytest.raises(UsageError, match=r"3 of mlp\.experts\.\*\.up_proj\.weight .*layers\.1\.mlp\.experts\."
                                         r"gate_up_proj has 4 experts"):
        load_model(broken, compute_dtype=torch.float32, device="cpu")


def test_pieces_split_across_shards(tmp_path, written):
    """A piece's packed bytes in one shard and its constants in the next (an index splits by size, not by layer)."""
    path, packed = written("mixtral", "nf4", True)
    keys = sorted(packed)
    cut = keys.index(_pieces("mixtral", 0, 1, "gate_up_proj")[0]) + 1  # its weight here, its absmax after
    shards = {"model-00001-of-00002.safetensors": keys[:cut], "model-00002-of-00002.safetensors": keys[cut:]}
    split = _with_weights(path, tmp_path / "split",
                          {name: {k: packed[k] for k in names} for name, names in shards.items()})
    (split / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}))
    whole, _ = load_model(path, compute_dtype=torch.float32, device="cpu")
    parts, _ = load_model(split, compute_dtype=torch.float32, device="cpu")
    for (name, a), b in zip(whole.state_dict().items(), parts.state_dict().values()):
        assert torch.equal(a, b), name
