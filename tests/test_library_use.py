"""qlora used as a library, the way PEFT + bitsandbytes + torch are: casts, argument spellings and refusals."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qlora
from qlora.errors import UsageError
from qlora.nn import Linear4bit


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("cast, dtype", [
    (lambda m: m.half(), torch.float16),
    (lambda m: m.bfloat16(), torch.bfloat16),
    (lambda m: m.to(torch.bfloat16), torch.bfloat16),
    (lambda m: m.to("cpu", torch.float16), torch.float16),
    (lambda m: m.type(torch.float16), torch.float16),
    (lambda m: m.bfloat16().float(), torch.float32),
    (lambda m: m.to("cpu"), torch.float32),
])
def test_casting_a_4bit_layer_keeps_its_weight_and_computes_in_the_new_dtype(cast, dtype, double_quant):
    torch.manual_seed(0)
    dense = nn.Linear(96, 40)
    layer = Linear4bit.from_linear(dense, double_quant=double_quant, compute_dtype=torch.float32)
    weight = layer.dequantize(torch.float32)
    state = {k: v.clone() for k, v in layer.state_dict().items() if k != "bias"}
    cast(layer)
    assert torch.equal(layer.dequantize(torch.float32), weight)  # codebook and scales not rounded
    assert all(torch.equal(layer.state_dict()[k], v) and layer.state_dict()[k].dtype == v.dtype
               for k, v in state.items())
    assert layer.compute_dtype == dtype and layer.bias.dtype == dtype
    x = torch.randn(3, 96)
    expected = F.linear(x.to(dtype), weight.to(dtype), layer.bias)  # the bias is cast as any parameter is
    torch.testing.assert_close(layer(x.to(dtype)), expected, rtol=0, atol=0)


def test_a_4bit_layer_takes_its_compute_dtype_by_name_as_load_model_does():
    dense = nn.Linear(96, 40)
    named = Linear4bit.from_linear(dense, compute_dtype="bf16")
    want = Linear4bit.from_linear(dense, compute_dtype=torch.bfloat16)
    assert named.compute_dtype == named.bias.dtype == torch.bfloat16
    x = torch.randn(3, 96)
    assert torch.equal(named(x), want(x))
    with pytest.raises(UsageError, match="^compute_dtype must be a float dtype"):
        Linear4bit(96, 40, compute_dtype=torch.int8)


def test_a_cast_model_matches_its_uncast_copy(tiny_model_dir):
    ids = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64]])
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32)
    qlora.add_lora(model, r=4, target_modules=["q_proj", "v_proj"], verbose=False)
    ref = model(ids).logits
    cast = copy.deepcopy(model).half()
    torch.testing.assert_close(cast(ids).logits.float(), ref, atol=3e-2, rtol=3e-2)
    back = cast.float()  # the 4-bit layers survive a round trip of casts exactly
    for (name, a), b in zip(model.named_modules(), back.modules()):
        if isinstance(a, Linear4bit):
            assert torch.equal(a.dequantize(torch.float32), b.dequantize(torch.float32)), name


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_load_model_takes_names_as_transformers_and_bitsandbytes_spell_them(tiny_model_dir):
    want, _ = qlora.load_model(tiny_model_dir, quant="nf4", compute_dtype=torch.bfloat16, device="cpu")
    got, _ = qlora.load_model(tiny_model_dir, quant="NF4", compute_dtype="torch.bfloat16", device="cpu")
    a, b = _state(want), _state(got)
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    dense, _ = qlora.load_model(tiny_model_dir, quant="None", compute_dtype="fp32", device="cpu")
    assert not any(isinstance(m, Linear4bit) for m in dense.modules()) and dense.dtype == torch.float32


def test_one_skip_module_string_is_one_name(tiny_model_dir):
    model, _ = qlora.load_model(tiny_model_dir, skip_modules="q_proj", device="cpu")
    attn = model.model.layers[0].self_attn
    assert type(attn.q_proj) is nn.Linear and isinstance(attn.k_proj, Linear4bit)
    dense, _ = qlora.load_model(tiny_model_dir, quant=None, device="cpu")
    assert qlora.quantize_model(dense, quant_type="FP4", compute_dtype="bf16", skip_modules="q_proj") == [
        n for n, m in model.named_modules() if isinstance(m, Linear4bit)]


@pytest.mark.parametrize("kwargs, named", [
    (dict(double_quant="no"), "double_quant must be True or False"), (dict(double_quant=0), "double_quant"),
    (dict(blocksize=48), "blocksize must be one of 32, 64"), (dict(blocksize="64"), "blocksize"),
])
def test_the_4bit_format_is_refused_by_name_where_it_is_no_value_of_its_option(tiny_model_dir, kwargs, named):
    """A string "no" read as true gave double quantization silently; a block size of another type or size failed
    inside torch, quantize_model's after it had changed the layers before."""
    with pytest.raises(UsageError, match="^" + re.escape(named)):
        qlora.load_model(tiny_model_dir, device="cpu", **kwargs)
    dense, _ = qlora.load_model(tiny_model_dir, quant=None, device="cpu")
    with pytest.raises(UsageError, match="^" + re.escape(named)):
        qlora.quantize_model(dense, **kwargs)
    assert not any(isinstance(m, Linear4bit) for m in dense.modules())


def test_numpy_format_values_and_no_skip_modules_load_as_python_ones(tiny_model_dir):
    import numpy as np

    want, _ = qlora.load_model(tiny_model_dir, device="cpu", blocksize=128, double_quant=False, skip_modules=())
    got, _ = qlora.load_model(tiny_model_dir, device="cpu", blocksize=np.int64(128), double_quant=np.bool_(False),
                              skip_modules=None)
    a, b = _state(want), _state(got)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert got.model.layers[0].self_attn.q_proj.blocksize == 128 and not got.model.layers[0].mlp.up_proj.double_quant


@pytest.mark.parametrize("kwargs, named", [
    (dict(r=0), "r (the LoRA rank)"), (dict(r="8"), "r (the LoRA rank)"), (dict(r=2.5), "r (the LoRA rank)"),
    (dict(alpha="16"), "alpha"), (dict(dropout=-0.1), "dropout"), (dict(dropout=1.0), "dropout"),
    (dict(dtype=torch.int32), "dtype"), (dict(dtype="half8"), "dtype"), (dict(init=False), "init"),
])
def test_add_lora_refuses_bad_hyperparameters_by_name_and_leaves_the_model_as_it_was(tiny_model_dir, kwargs, named):
    model, _ = qlora.load_model(tiny_model_dir, device="cpu")
    before = _state(model)
    with pytest.raises(UsageError, match="^" + re.escape(named)):
        qlora.add_lora(model, verbose=False, **kwargs)
    after = _state(model)
    assert after.keys() == before.keys() and not any(isinstance(m, qlora.nn.LoraLinear) for m in model.modules())


def _adapted(model_dir, **kwargs) -> dict[str, torch.Tensor]:
    model, _ = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    qlora.add_lora(model, verbose=False, **kwargs)
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def test_add_lora_takes_peft_spellings(tiny_model_dir):
    want = _adapted(tiny_model_dir, target_modules="all-linear", modules_to_save=["lm_head"], init="kaiming", r=8)
    got = _adapted(tiny_model_dir, target_modules="All-Linear", modules_to_save="lm_head", init=True, r=8.0)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert "lm_head.weight" in got and any(".mlp.down_proj.lora_A" in k for k in got)
    assert {p.dtype for p in _adapted(tiny_model_dir, r=8, dtype="bfloat16").values()} == {torch.bfloat16}
    assert {p.dtype for p in _adapted(tiny_model_dir, r=8, dtype=torch.float64).values()} == {torch.float64}


def test_a_single_layer_name_as_target_string_says_strings_are_regexes(tiny_model_dir):
    model, _ = qlora.load_model(tiny_model_dir, device="cpu")
    with pytest.raises(UsageError, match=r"pass a list \(\['v_proj'\]\)"):
        qlora.add_lora(model, target_modules="v_proj", verbose=False)
    qlora.add_lora(model, target_modules=".*v_proj", verbose=False)  # the regex the message offers
    assert {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, qlora.nn.LoraLinear)} == {"v_proj"}


def test_merge_takes_the_dtype_by_name(tiny_model_dir):
    def merged(dtype):
        model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
        torch.manual_seed(0)
        qlora.add_lora(model, r=4, init="gaussian", verbose=False)
        return _state(qlora.merge(model, dtype=dtype))

    want, got = merged(torch.bfloat16), merged("bfloat16")
    assert got.keys() == want.keys() and all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
                                             for k in want)
    assert want["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    with pytest.raises(UsageError, match="^dtype must be"):
        qlora.merge(nn.Linear(2, 2), dtype=torch.int8)


def test_saving_the_wrong_kind_of_model_is_a_usage_error_naming_what_to_call(tmp_path, tiny_model_dir):
    """As the rest of the API refuses bad input: qlora's UsageError, which ``except ValueError`` still catches."""
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match=r"save_merged needs a dense model: call qlora.merge\(model\) first"):
        qlora.save_merged(model, tmp_path / "merged")
    dense, _ = qlora.load_model(tiny_model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match="the model has no 4-bit layers to save"):
        qlora.save_quantized(dense, tmp_path / "quantized")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "quantized").exists()


@pytest.mark.parametrize("name, cls", [
    ("PagedAdamW", "PagedAdamW"), ("pagedadamw8bit", "PagedAdamW8bit"), ("AdamW8bit", "AdamW8bit"), ("ADAMW", "AdamW"),
    ("PagedAdamW32bit", "PagedAdamW"),
])
def test_create_optimizer_takes_the_class_names(name, cls):
    opt = qlora.optim.create_optimizer(name, [nn.Parameter(torch.zeros(3))], lr=1e-3)
    assert type(opt) is getattr(qlora.optim, cls)


@pytest.mark.parametrize("cls", ["AdamW", "PagedAdamW", "PagedAdamW8bit"])
def test_a_tensor_learning_rate_steps_as_the_float_one(cls):
    """torch optimizers take ``lr`` as a tensor (schedulers under torch.compile put one there)."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(40, 300))
    b = nn.Parameter(a.detach().clone())
    make = getattr(qlora.optim, cls)
    extra = {"min_8bit_size": 1} if cls.endswith("8bit") else {}
    as_tensor = dict(dtype=torch.float64)  # float32 tensors would round the values themselves
    opt_a = make([a], lr=torch.tensor(1e-2, **as_tensor), betas=(torch.tensor(0.9, **as_tensor), 0.99),
                 weight_decay=0.1, **extra)
    opt_b = make([b], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, **extra)
    reference = nn.Parameter(a.detach().clone())
    opt_ref = torch.optim.AdamW([reference], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    for _ in range(3):
        grad = torch.randn_like(a)
        for p, opt in ((a, opt_a), (b, opt_b), (reference, opt_ref)):
            p.grad = grad.clone()
            opt.step()
    assert torch.equal(a, b)
    if not cls.endswith("8bit"):
        torch.testing.assert_close(a, reference)


def test_a_second_adapter_leaves_a_frozen_loaded_one_frozen(tmp_path, tiny_model_dir):
    """As PEFT's add_adapter: only the new adapter's factors become trainable."""
    model, _ = qlora.load_model(tiny_model_dir, device="cpu")
    qlora.add_lora(model, r=4, target_modules=["q_proj", "v_proj"], verbose=False)
    qlora.save_adapter(model, tmp_path / "first")
    model, _ = qlora.load_model(tiny_model_dir, device="cpu")
    qlora.load_adapter(model, tmp_path / "first")  # frozen, for inference or to stack a new adapter on
    qlora.add_lora(model, r=4, target_modules=["q_proj", "o_proj"], adapter_name="second", verbose=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".second." in n for n in trainable)
    assert any(".q_proj.lora_A.default." in n for n, _ in model.named_parameters())


def test_one_token_string_is_one_token(tiny_model_dir):
    model, tokenizer = qlora.load_model(tiny_model_dir, device="cpu")
    rows = len(tokenizer)
    assert qlora.add_special_tokens(model, tokenizer, "<tool_call>") == 1
    assert tokenizer.convert_ids_to_tokens(rows) == "<tool_call>" and len(tokenizer) == rows + 1
    assert model.get_input_embeddings().weight.shape[0] >= rows + 1


@pytest.mark.parametrize("device", ["gpu", f"cuda:{torch.cuda.device_count()}"])
def test_load_model_refuses_a_device_torch_cannot_use_by_name(tiny_model_dir, device):
    with pytest.raises(UsageError, match=f"^device '{device}'"):
        qlora.load_model(tiny_model_dir, device=device)


@pytest.mark.parametrize("options", [dict(quant="nf4"), dict(quant="fp4", double_quant=False, blocksize=128)])
def test_save_pretrained_of_a_4bit_model_loads_back_bit_for_bit(tmp_path, tiny_model_dir, options):
    """transformers' save_pretrained writes the packed layers in bitsandbytes' layout but no quantization_config;
    the packed tensors say their format themselves."""
    model, tokenizer = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu", **options)
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    back, _ = qlora.load_model(tmp_path / "saved", compute_dtype=torch.float32, device="cpu")
    want, got = _state(model), _state(back)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    layer = back.model.layers[0].self_attn.q_proj
    assert (layer.quant_type, layer.blocksize, layer.double_quant) == (
        options["quant"], options.get("blocksize", 64), options.get("double_quant", True))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_dense_state_dict_loads_into_a_4bit_model_quantized(tmp_path, tiny_tokenizer, arch):
    """``load_state_dict`` of a dense model's weights (as bitsandbytes' Linear4bit takes them) quantizes each linear
    weight in the layer's own format: the model is the one load_model reads from that checkpoint, GPT-2's
    Conv1D weights (stored [in, out]) included."""
    from transformers import AutoModelForCausalLM

    from qlora.model.tiny import build_tiny_model

    first = build_tiny_model(tmp_path / "first", tokenizer=tiny_tokenizer, arch=arch, seed=0)
    second = build_tiny_model(tmp_path / "second", tokenizer=tiny_tokenizer, arch=arch, seed=1)
    model, _ = qlora.load_model(first, compute_dtype=torch.float32, device="cpu")
    dense = AutoModelForCausalLM.from_pretrained(second).state_dict()
    result = model.load_state_dict(dense, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    want, got = _state(qlora.load_model(second, compute_dtype=torch.float32, device="cpu")[0]), _state(model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_dense_weight_of_another_shape_is_refused_naming_the_layer():
    layer = Linear4bit(96, 40)
    with pytest.raises(RuntimeError, match=r"weight: weight of shape \(40, 95\) does not fit a 40x96 Linear4bit"):
        layer.load_state_dict(nn.Linear(95, 40).state_dict())


def test_lora_on_a_torch_module_of_ones_own_is_refused_leaving_it_as_it_was(tmp_path, tiny_model_dir):
    """add_lora and load_adapter make PEFT's causal-LM adapters of transformers models; a plain torch module was
    half changed (its layers wrapped, nothing trainable, no adapter to save) and then failed inside torch."""
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))
    before = _state(net)
    with pytest.raises(UsageError, match="add_lora adapts transformers language models .* Sequential is a torch "
                                         "module of another kind, left as it was"):
        qlora.add_lora(net, r=4, target_modules=["0", "2"], verbose=False)
    assert [type(m) for m in net] == [nn.Linear, nn.ReLU, nn.Linear] and all(p.requires_grad for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    model, _ = qlora.load_model(tiny_model_dir, device="cpu")
    qlora.add_lora(model, r=4, verbose=False)
    qlora.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(UsageError, match="load_adapter adapts transformers language models"):
        qlora.load_adapter(net, tmp_path / "adapter")


def test_save_pretrained_with_lora_attached_is_refused_saying_what_to_save(tmp_path, tiny_model_dir):
    model, tokenizer = qlora.load_model(tiny_model_dir, device="cpu")
    qlora.add_lora(model, r=4, verbose=False)
    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    with pytest.raises(UsageError, match="saved with LoRA layers attached .* qlora.save_adapter"):
        qlora.load_model(tmp_path / "saved", device="cpu")


def test_dir_lists_the_public_names_before_their_first_use():
    """dir(), help() and tab completion see the lazily imported API (PEP 562 ``__dir__``)."""
    import subprocess
    import sys

    code = ("import importlib, sys, qlora\n"
            "packages = [qlora] + [importlib.import_module(f'qlora.{p}') for p in ('optim', 'nn', 'quant', 'infer')]\n"
            "missing = [(p.__name__, n) for p in packages for n in p.__all__ if n not in dir(p)]\n"
            "print(missing, {'optim', 'nn'} <= set(dir(qlora)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "True"]


@pytest.mark.parametrize("cls", ["AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit"])
def test_a_copied_or_pickled_optimizer_steps_on_as_the_original(cls):
    import pickle

    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(40, 300)), nn.Parameter(torch.randn(7))]
    opt = getattr(qlora.optim, cls)([{"params": params[:1]}, {"params": params[1:], "lr": 1e-2}], lr=1e-3,
                                    min_8bit_size=64)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    copies = [copy.deepcopy((params, opt)), pickle.loads(pickle.dumps((params, opt)))]
    grads = [torch.randn_like(p) for p in params]
    for ps, o in [(params, opt), *copies]:
        assert type(o) is type(opt) and o.state_bits == opt.state_bits and o.paged == opt.paged
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        o.step()
    for ps, o in copies:
        assert all(torch.equal(a, b) for a, b in zip(ps, params))
        mine, theirs = o.state_dict()["state"], opt.state_dict()["state"]
        assert all(torch.equal(mine[i][k], theirs[i][k]) for i in theirs for k in theirs[i])


def test_numpy_hyperparameters_train_and_save_as_python_numbers(tmp_path, tiny_model_dir):
    """A sweep's NumPy scalars: the same adapter as Python numbers, and a JSON adapter_config PEFT reads."""
    import json

    np = pytest.importorskip("numpy")
    want = _adapted(tiny_model_dir, r=8, alpha=16.0, dropout=0.1)
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    qlora.add_lora(model, r=np.int64(8), alpha=np.float32(16), dropout=np.float64(0.1), verbose=False)
    got = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    qlora.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16.0, 0.1)
