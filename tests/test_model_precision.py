"""Nothing frozen is upcast: the bytes of every tensor of a loaded QLoRA model are pinned."""

from __future__ import annotations

import torch

import qlora
from qlora.nn import Linear4bit

_QUANT_FP32 = ("absmax", "nested_absmax", "quant_map", "nested_quant_map", "offset")


def _expected_bytes(model) -> int:
    """Bytes a bf16 QLoRA model must take: 4-bit codes and constants, bf16 for the rest, fp32 adapters."""
    total = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            n = module.in_features * module.out_features
            blocks = -(-n // module.blocksize)
            total += (n + 1) // 2 + blocks + 4 * (-(-blocks // 256)) + 4 * 16 + 4 * 256 + 4
            total += 2 * module.out_features if module.bias is not None else 0
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen or (".base_layer." in name and name.endswith("bias")):
            continue
        seen.add(id(p))
        if "lora_" in name:
            total += 4 * p.numel()
        elif not any(isinstance(m, Linear4bit) and p is m.bias for m in model.modules()):
            total += 2 * p.numel()
    return total


def _actual(model) -> tuple[int, dict[str, torch.dtype]]:
    tensors = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() or t.dtype == torch.uint8:
            tensors.setdefault(t.data_ptr(), (name, t))
    dtypes = {name: t.dtype for name, t in tensors.values()}
    persistent = {n for n in model.state_dict(keep_vars=True)}
    size = sum(t.numel() * t.element_size() for name, t in tensors.values()
               if name in persistent or any(name.endswith(s) for s in _QUANT_FP32) or "lora_" in name)
    return size, dtypes


def test_loaded_model_bytes_are_pinned_and_only_adapters_are_fp32(tiny_model_dir):
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.bfloat16, device="cpu")
    qlora.add_lora(model, r=8)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    size, dtypes = _actual(model)
    assert size == _expected_bytes(model)
    fp32 = {n for n, d in dtypes.items() if d == torch.float32}
    allowed = {n for n in fp32 if "lora_" in n or n.rsplit(".", 1)[-1] in _QUANT_FP32 or "rotary" in n}
    assert fp32 == allowed, sorted(fp32 - allowed)
    trainable = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert all("lora_" in n for n in trainable)
