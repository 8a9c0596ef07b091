"""Fused Triton RMSNorm and SwiGLU against plain PyTorch, and their module swap.

The references are written out here, as transformers computes them. Without a
GPU the kernels run in Triton's CPU interpreter, which Triton reads at import,
so those checks run in a subprocess that sets ``TRITON_INTERPRET=1`` first
(``python tests/test_fused_kernels.py MODEL_DIR SEED``). On a GPU the ``cuda``
tests run the same checks on CUDA tensors.
"""

from __future__ import annotations

import importlib
import random
import sys

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import run_interpreted

pytest.importorskip("triton")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (atol, rtol) per dtype; atol is relative to the largest reference value.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}
NORM_SHAPES = ((5, 123, 123), (2, 3, 1000), (4, 4096), (3, 2, 7))
SWIGLU_SHAPES = ((5, 123, 123), (2, 3, 1000), (1, 3001), (0, 7))
EPS = 1e-6


def _rms_norm_ref(x: torch.Tensor, w: torch.Tensor, gemma: bool) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return (h * (1.0 + w.float())).type_as(x) if gemma else w * h.to(x.dtype)


def _swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _differ(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> str | None:
    atol, rtol = TOL[dtype]
    ours, ref = ours.float().cpu(), ref.float().cpu()
    scale = (ref.abs().max().item() if ref.numel() else 0.0) or 1.0
    if ours.shape == ref.shape and torch.allclose(ours, ref, atol=atol * scale, rtol=rtol):
        return None
    return f"max |diff| {(ours - ref).abs().max().item():.3g} (scale {scale:.3g})"


def _grads(fn, inputs: list[torch.Tensor], dy: torch.Tensor) -> list[torch.Tensor]:
    out = fn(*inputs)
    wanted = [t for t in inputs if t.requires_grad]
    return [out, *torch.autograd.grad(out, wanted, dy)]


def _kernel_failures(device: str, seed: int) -> list[str]:
    """Every (op, dtype, shape, variant) whose output or gradients differ from the reference."""
    from qlora.nn.fused import RMSNormFunction, swiglu

    gen = torch.Generator().manual_seed(seed)
    failures = []
    for dtype in DTYPES:
        for i, shape in enumerate(NORM_SHAPES):
            gemma, weight_grad = bool(i & 1), i < 2 or dtype == torch.float32  # each variant in each dtype
            x = (torch.randn(shape, generator=gen) * 2).to(dtype).to(device)
            w = (torch.randn(shape[-1], generator=gen) * 0.1 + (0 if gemma else 1)).to(dtype).to(device)
            dy = torch.randn(shape, generator=gen).to(dtype).to(device)
            results = []
            for fn in (lambda a, b: RMSNormFunction.apply(a, b, EPS, gemma), lambda a, b: _rms_norm_ref(a, b, gemma)):
                inputs = [x.clone().requires_grad_(), w.clone().requires_grad_(weight_grad)]
                results.append(_grads(fn, inputs, dy))
            for what, ours, ref in zip(("y", "dx", "dw"), *results):
                problem = _differ(ours, ref, dtype)
                if problem:
                    failures.append(f"rms_norm {what} {dtype} {shape} gemma={gemma}: {problem}")
        for shape in SWIGLU_SHAPES:
            gate = (torch.randn(shape, generator=gen) * 3).to(dtype).to(device)
            up, dh = torch.randn(shape, generator=gen).to(dtype).to(device), torch.randn(shape, generator=gen)
            results = [_grads(fn, [gate.clone().requires_grad_(), up.clone().requires_grad_()], dh.to(dtype).to(device))
                       for fn in (swiglu, _swiglu_ref)]
            for what, ours, ref in zip(("h", "dgate", "dup"), *results):
                problem = _differ(ours, ref, dtype)
                if problem:
                    failures.append(f"swiglu {what} {dtype} {shape}: {problem}")
    return failures


def _tiny_lora_model(model_dir: str, device: str, dtype: torch.dtype, seed: int):
    from qlora import add_lora, load_model

    model, _ = load_model(model_dir, compute_dtype=dtype, device=device)
    torch.manual_seed(seed)
    add_lora(model, r=4, alpha=8, dropout=0.0, verbose=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # nonzero, so that every adapter factor gets a gradient
            torch.nn.init.normal_(p, std=0.05)
    return model


def _logits_and_grads(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _swap_failures(model_dir: str, device: str, dtype: torch.dtype, seed: int) -> list[str]:
    """Swapped vs unswapped tiny Llama with LoRA: logits and every adapter gradient."""
    from qlora.model.fused import apply_fused_kernels

    model = _tiny_lora_model(model_dir, device, dtype, seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(seed)).to(device)
    plain_logits, plain_grads = _logits_and_grads(model, ids)
    if not apply_fused_kernels(model):
        return ["nothing was swapped"]
    logits, grads = _logits_and_grads(model, ids)
    failures = [f"logits: {p}"] if (p := _differ(logits, plain_logits, dtype)) else []
    failures += [f"grad {n}: {p}" for n, g in grads.items() if (p := _differ(g, plain_grads[n], dtype))]
    return failures


def test_interpreted_kernels_and_swap_match_reference(tiny_model_dir):
    seed = random.randrange(2**31)
    done = run_interpreted(__file__, str(tiny_model_dir), str(seed))
    assert done.returncode == 0, f"seed {seed}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "all cases match" in done.stdout


def test_swap_on_cpu_keeps_the_reference_path_and_is_reversible(tiny_model_dir):
    from qlora.model.fused import apply_fused_kernels, remove_fused_kernels
    from qlora.nn.fused import FusedRMSNorm, FusedSwiGLUMLP

    model = _tiny_lora_model(str(tiny_model_dir), "cpu", torch.float32, 0)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    plain_logits, plain_grads = _logits_and_grads(model, ids)
    before = dict(model.named_modules())
    keys = list(model.state_dict())

    swapped = apply_fused_kernels(model)
    layers = model.config.num_hidden_layers
    assert len(swapped) == 3 * layers + 1 and "model.norm" in swapped
    assert isinstance(model.get_submodule("model.layers.0.input_layernorm"), FusedRMSNorm)
    mlp = model.get_submodule("model.layers.0.mlp")
    assert isinstance(mlp, FusedSwiGLUMLP) and mlp.gate_proj is before["model.layers.0.mlp.gate_proj"]
    assert list(model.state_dict()) == keys  # same parameters, same names: adapters save unchanged
    assert apply_fused_kernels(model) == []  # idempotent
    logits, grads = _logits_and_grads(model, ids)  # CPU without the interpreter: the PyTorch formulas, bit for bit
    assert torch.equal(logits, plain_logits)
    assert all(torch.equal(g, plain_grads[n]) for n, g in grads.items())

    assert sorted(remove_fused_kernels(model)) == sorted(swapped)
    assert all(model.get_submodule(p) is before[p] for p in swapped)
    assert list(model.state_dict()) == keys


def test_gemma_norm_is_fused_and_unknown_modules_are_refused():
    from transformers import Gemma2Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2MLP, Gemma2RMSNorm

    from qlora.nn.fused import FusedRMSNorm, FusedSwiGLUMLP

    norm = Gemma2RMSNorm(37, eps=EPS)
    torch.nn.init.normal_(norm.weight, std=0.1)
    x = torch.randn(3, 37, dtype=torch.bfloat16)
    fused = FusedRMSNorm.from_module(norm)
    assert fused.gemma and fused.weight is norm.weight
    assert torch.equal(fused(x), norm(x)) and torch.equal(fused(x), _rms_norm_ref(x, norm.weight, True))
    with pytest.raises(ValueError, match="not a known RMSNorm"):
        FusedRMSNorm.from_module(torch.nn.LayerNorm(8))
    config = Gemma2Config(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=4)
    with pytest.raises(ValueError, match="not a known gate/up/down MLP"):
        FusedSwiGLUMLP.from_module(Gemma2MLP(config))


def test_trainer_option_defaults_off_and_leaves_cpu_training_unchanged(tmp_path, tiny_model_dir):
    from qlora.nn.fused import FusedRMSNorm
    from qlora.train.config import TrainConfig, load_config
    from qlora.train.trainer import Trainer

    field = TrainConfig.__dataclass_fields__["fused_kernels"]
    assert field.default is False and "GPU" in field.metadata["help"]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(f'{{"text": "Question {i}: what is {i} plus {i}? Answer: {2 * i}."}}\n' for i in range(8)))
    losses, trainers = [], []
    for fused in (False, True):
        options = dict(model=str(tiny_model_dir), data=str(data), output=str(tmp_path / str(fused)), optim="adamw",
                       max_steps=3, batch_size=2, progress=False, seq_len=32, fused_kernels=fused)
        trainer = Trainer(load_config(None, options))
        losses.append(trainer.run())
        trainers.append(trainer)
    assert isinstance(trainers[1].model.get_submodule("model.norm"), FusedRMSNorm)
    if trainers[1].device.type == "cuda":
        # The Triton RMSNorm takes the GPU's approximate sqrt, so a few bf16 roundings
        # differ; over three steps the loss moves by far less than 1%.
        assert losses[1] == pytest.approx(losses[0], rel=1e-2)
    else:  # on the CPU the fused modules run the same PyTorch code: identical losses
        assert losses[0] == losses[1]


_KERNEL_SIGNATURES = {
    "_rms_norm_forward_kernel": (
        {"x_ptr": "*bf16", "w_ptr": "*bf16", "y_ptr": "*bf16", "rstd_ptr": "*fp32", "n_cols": "i32", "eps": "fp32",
         "GEMMA": "constexpr", "BLOCK": "constexpr"}, {"GEMMA": False, "BLOCK": 4096}),
    "_rms_norm_backward_kernel": (
        {"dy_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*bf16", "rstd_ptr": "*fp32", "dx_ptr": "*bf16",
         "dw_partial_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32", "GEMMA": "constexpr",
         "WEIGHT_GRAD": "constexpr", "BLOCK": "constexpr"}, {"GEMMA": False, "WEIGHT_GRAD": True, "BLOCK": 4096}),
    "_swiglu_forward_kernel": (
        {"gate_ptr": "*bf16", "up_ptr": "*bf16", "out_ptr": "*bf16", "n": "i32", "BLOCK": "constexpr"},
        {"BLOCK": 1024}),
    "_swiglu_backward_kernel": (
        {"dh_ptr": "*bf16", "gate_ptr": "*bf16", "up_ptr": "*bf16", "dgate_ptr": "*bf16", "dup_ptr": "*bf16",
         "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024}),
}


@pytest.mark.parametrize("kernel", sorted(_KERNEL_SIGNATURES))
def test_kernels_compile_for_h100(kernel):
    """Compile each kernel for sm_90 (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget

    module = importlib.import_module("qlora.nn.fused." + ("rms_norm" if kernel.startswith("_rms") else "swiglu"))
    fn = getattr(module, kernel)
    signature, constants = _KERNEL_SIGNATURES[kernel]
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": True})
    except (RuntimeError, FileNotFoundError) as exc:  # no ptxas/LLVM backend in this Triton build
        pytest.skip(f"cannot compile for CUDA here: {exc}")
    assert ".target sm_90" in compiled.asm["ptx"]


@pytest.mark.cuda
def test_cuda_kernels_match_reference():
    seed = random.randrange(2**31)
    failures = _kernel_failures("cuda", seed)
    assert not failures, f"seed {seed}:\n" + "\n".join(failures)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_cuda_swap_matches_unswapped_model(tiny_model_dir, dtype):
    seed = random.randrange(2**31)
    failures = _swap_failures(str(tiny_model_dir), "cuda", dtype, seed)
    assert not failures, f"seed {seed}:\n" + "\n".join(failures)


if __name__ == "__main__":  # the interpreted checks, run by test_interpreted_kernels_and_swap_match_reference
    _seed = int(sys.argv[2])
    bad = _kernel_failures("cpu", _seed) + _swap_failures(sys.argv[1], "cpu", torch.float32, _seed)
    print("\n".join(bad) if bad else "all cases match")
    sys.exit(1 if bad else 0)
