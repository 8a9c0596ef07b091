"""LoftQ/PiSSA/OLoRA computed while the 4-bit model loads: the same adapters and 4-bit base bytes as the
init on the whole 16-bit model followed by quantize_model, without that model in memory."""

from __future__ import annotations

import json

import pytest
import torch

import qlora
from qlora.errors import UsageError
from qlora.model.inject import adapter_configs, lora_layers
from qlora.model.quantize import quantize_model
from qlora.model.streamed_init import StreamedInit
from qlora.nn import Linear4bit
from qlora.train.config import load_config
from qlora.train.trainer import Trainer

INIT_OPTIONS = ("target_modules", "rslora", "rank_pattern", "alpha_pattern", "loftq_iter")


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory, tiny_tokenizer):
    """A checkpoint stored in the compute dtype, so that the plain 4-bit load of the layers no init touches
    quantizes the very values the whole-model path does."""
    from qlora.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("bf16-llama"), tokenizer=tiny_tokenizer, arch="llama",
                            dtype=torch.bfloat16)


def _whole(model_dir, init, seed=3, **kw):
    """Today's library path: the dense model, add_lora's init on it, then quantize_model."""
    model, _ = qlora.load_model(model_dir, quant=None, compute_dtype=torch.bfloat16, device="cpu")
    torch.manual_seed(seed)
    qlora.add_lora(model, r=4, alpha=8, init=init, verbose=False, **kw)
    quantize_model(model, "nf4", 64, True, torch.bfloat16, skip_modules=("lm_head", r".*\.lora_[AB]\..*"))
    return model


def _streamed(model_dir, init, seed=3, **kw):
    initial = StreamedInit(init, r=4, alpha=8, seed=seed, **{k: v for k, v in kw.items() if k in INIT_OPTIONS})
    model, _ = qlora.load_model(model_dir, compute_dtype=torch.bfloat16, device="cpu", weight_hook=initial)
    torch.manual_seed(seed)
    return qlora.add_lora(model, r=4, alpha=8, init=init, verbose=False, initial=initial, **kw)


def _assert_identical(ours, theirs, only=None):
    """The same tensors (4-bit codes and constants, adapters, all else) and 4-bit states; ``only``: of the
    layers with these names."""
    def chosen(name):
        return only is None or any(f".{t}." in f"{name}." for t in only)

    assert adapter_configs(ours) == adapter_configs(theirs)  # what save_adapter writes (fan_in_fan_out, patterns...)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for key in filter(chosen, a):
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    quantized = [(n, m) for n, m in theirs.named_modules() if isinstance(m, Linear4bit) and chosen(n)]
    assert quantized
    for name, layer in quantized:
        assert ours.get_submodule(name).quant_dtype == layer.quant_dtype, name  # the state the 4-bit save writes
    for name, layer in lora_layers(theirs).items():
        mine = lora_layers(ours)[name]
        assert mine.initial_factors.keys() == layer.initial_factors.keys()
        for x, y in zip(mine.initial_factors.get("default", ()), layer.initial_factors.get("default", ())):
            assert torch.equal(x, y), name


@pytest.mark.parametrize("init, kw", [
    ("pissa", dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
                   alpha_pattern={r"layers\.0\..*q_proj": 3.0}, rslora=True)),
    ("pissa_niter_2", dict(target_modules="all-linear")),
    ("pissa_niter_1", dict(target_modules=["q_proj", "lm_head", "up_proj"])),  # the head stays dense: add_lora's
    ("olora", dict(target_modules=r".*\.(k_proj|gate_proj)")),
    ("loftq", dict(target_modules=["q_proj", "o_proj", "lm_head"], loftq_iter=2, use_dora=True)),
])
def test_streamed_init_is_the_whole_model_init_bit_for_bit(bf16_model_dir, init, kw):
    ours, theirs = _streamed(bf16_model_dir, init, **kw), _whole(bf16_model_dir, init, **kw)
    _assert_identical(ours, theirs)
    layer = lora_layers(ours)["model.layers.1.self_attn.q_proj" if "q_proj" in str(kw) else
                              "model.layers.1.self_attn.k_proj"]
    assert isinstance(layer.base_layer, Linear4bit) and layer.lora_B["default"].weight.abs().sum() > 0


def test_randomized_pissa_follows_the_seed(bf16_model_dir):
    one, two = (_streamed(bf16_model_dir, "pissa_niter_1", seed=s, target_modules=["q_proj"]) for s in (3, 4))
    path = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(one.get_submodule(path).lora_A["default"].weight,
                           two.get_submodule(path).lora_A["default"].weight)


def test_layers_no_init_touches_load_as_plain_4bit_loading(tiny_model_dir):
    """An fp32 checkpoint: the adapted layers start from the bf16 weights a 16-bit load holds (as the whole-model
    init does); the others are quantized from the stored values, as a plain 4-bit load quantizes them."""
    targets = ["q_proj", "down_proj"]
    ours, theirs = _streamed(tiny_model_dir, "pissa", target_modules=targets), _whole(tiny_model_dir, "pissa",
                                                                                      target_modules=targets)
    plain, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.bfloat16, device="cpu")
    _assert_identical(ours, theirs, only=targets)
    adapted = [k for k in ours.state_dict() if any(f".{t}." in k for t in targets)]
    theirs = plain.state_dict()
    for key, value in ours.state_dict().items():
        if key not in adapted:
            assert torch.equal(value, theirs[key]), key


def test_refusals_hold(tmp_path, tiny_tokenizer, bf16_model_dir):
    from qlora.model.tiny import build_tiny_model

    with pytest.raises(UsageError, match=r"'q_prj' \(did you mean q_proj"):  # on the skeleton: before any read
        qlora.load_model(bf16_model_dir, device="cpu",
                         weight_hook=StreamedInit("pissa", target_modules=["q_prj", "v_proj"]))
    with pytest.raises(UsageError, match="at most"):
        qlora.load_model(bf16_model_dir, device="cpu", weight_hook=StreamedInit("olora", r=512))
    with pytest.raises(UsageError, match="does not rewrite the base"):
        StreamedInit("kaiming")
    tied = build_tiny_model(tmp_path / "tied", tokenizer=tiny_tokenizer, arch="llama", tie_word_embeddings=True)
    with pytest.raises(UsageError, match="shares its weight with model.embed_tokens"):
        _streamed(tied, "pissa", target_modules=["q_proj", "lm_head"])
    q4, tokenizer = qlora.load_model(bf16_model_dir, device="cpu")
    qlora.save_quantized(q4, tmp_path / "q4", tokenizer)
    for init, message in (("pissa", "already 4-bit"), ("loftq", "full-precision")):
        with pytest.raises(UsageError, match=message):  # a checkpoint stored 4-bit has no 16-bit weights to split
            _streamed(tmp_path / "q4", init, target_modules=["q_proj"])
    initial = StreamedInit("olora", r=4, alpha=8, target_modules=["q_proj"])
    model, _ = qlora.load_model(bf16_model_dir, device="cpu", weight_hook=initial)
    with pytest.raises(UsageError, match="computed with init='olora', r=4"):
        qlora.add_lora(model, r=8, alpha=8, target_modules=["q_proj"], init="olora", initial=initial)


def test_training_run_starts_from_the_whole_model_init(tmp_path, bf16_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"sample {i} with a few words"}) + "\n" for i in range(8)))
    config = load_config(None, dict(model=str(bf16_model_dir), data=str(data), output=str(tmp_path / "out"),
                                    max_steps=1, batch_size=2, seq_len=16, progress=False, precision="bf16",
                                    init="pissa_niter_1", rank=4, alpha=8, seed=3, rank_pattern="o_proj=2"))
    trainer = Trainer(config)
    trainer.setup()
    try:
        theirs = _whole(bf16_model_dir, "pissa_niter_1", target_modules="all-linear", dropout=0.05,
                        rank_pattern={"o_proj": 2})
        _assert_identical(trainer.model, theirs)
    finally:
        trainer.cleanup()


@pytest.mark.parametrize("init", ["pissa_niter_1", "loftq"])
def test_gpt2_conv1d_layers(tmp_path, tiny_tokenizer, init):
    """GPT-2 stores its linear layers transposed (Conv1D): streamed, the init sees them as [out, in] too."""
    from qlora.model.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "gpt2", tokenizer=tiny_tokenizer, arch="gpt2", dtype=torch.bfloat16)
    kw = dict(target_modules=["c_attn", "c_proj"])
    ours, theirs = _streamed(model_dir, init, **kw), _whole(model_dir, init, **kw)
    _assert_identical(ours, theirs)
    layer = lora_layers(ours)["transformer.h.0.attn.c_attn"]
    assert layer.base_layer.from_conv1d and layer.lora_A["default"].weight.shape[1] == layer.in_features


def test_moe_experts_and_routers_are_left_to_the_load(tmp_path, tiny_tokenizer):
    """all-linear on a MoE model: attention is adapted (the same as on the whole model), the experts are quantized
    as they are read and the router stays 16-bit, neither adapted."""
    from tiny_moe import save_tiny_moe

    from qlora.nn import Experts4bit

    modeling = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")
    if not hasattr(modeling, "Qwen3MoeExperts"):
        pytest.skip("this transformers has no Qwen3MoeExperts (4.x's Qwen3-MoE experts are nn.Linear layers)")
    model_dir = save_tiny_moe(tmp_path / "moe", tiny_tokenizer, "qwen3_moe")
    ours, theirs = _streamed(model_dir, "pissa_niter_2"), _whole(model_dir, "pissa_niter_2")
    _assert_identical(ours, theirs, only=["self_attn"])
    paths = set(lora_layers(ours))
    assert paths == set(lora_layers(theirs)) and all(".self_attn." in p for p in paths) and len(paths) == 8
    mlp = ours.get_submodule("model.layers.0.mlp")
    assert isinstance(mlp.experts, Experts4bit) and type(mlp.gate).__name__ != "LoraLinear"
    with pytest.raises(UsageError, match="target_parameters"):
        _streamed(model_dir, "pissa", target_parameters=["mlp.experts.gate_up_proj"])
