"""Training-step benchmark: qlora against bitsandbytes + PEFT, same shapes, same weights.

Each system runs in its own subprocess (clean memory peaks; one running out of
memory does not stop the other) on a random-initialized Llama-architecture
model built directly on the device: the model skeleton is created on the meta
device and every decoder linear layer is generated (bf16, seeded per layer),
quantized to NF4 with double quantization (block 64) and freed one at a time,
so the 16-bit model never exists. Both systems get bit-identical 4-bit codes,
so their first-step losses must agree to bf16 tolerance.

Setup as in ../shared/BASELINES.md: LoRA r=16, alpha=16, no dropout on
q, k, v, o, gate, up, down; non-reentrant gradient checkpointing; bf16
autocast; paged AdamW (32-bit); batch 1; random tokens; loss on all tokens;
SDPA attention; two warm-up steps, then the median step.

    python bench/train.py --shape llama-3-8b --seq 2048                 # GPU
    python bench/train.py --shape llama-3-70b --seq 4096 --memory-cap 48
    python bench/train.py --shape tiny --seq 64 --steps 4 --device cpu  # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from harness import describe, run_worker

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
SYSTEMS = ("qlora", "bnb-peft")


def llama_config(shape: str):
    from transformers import LlamaConfig

    from qlora.model.known_shapes import known_shape

    fields = dict(TINY) if shape == "tiny" else known_shape(shape)
    if fields is None:
        raise SystemExit(f"bench/train.py: unknown --shape {shape!r}; tiny, or a name qlora estimate --list-models "
                         "lists")
    fields.pop("model_type", None)
    return LlamaConfig(**fields)


def _random_weight(out_f: int, in_f: int, seed: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(out_f, in_f, generator=gen, device=device, dtype=torch.bfloat16) * 0.02


def build_model(system: str, shape: str, device: torch.device, seed: int = 0):
    """The model for ``system`` with identical weights for both systems."""
    from torch import nn
    from transformers import AutoModelForCausalLM

    config = llama_config(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    linears = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS]
    for index, (name, meta) in enumerate(linears):
        w = _random_weight(meta.out_features, meta.in_features, seed * 100003 + index, device)
        if system == "qlora":
            from qlora.nn import Linear4bit

            layer = Linear4bit(meta.in_features, meta.out_features, bias=False, compute_dtype=torch.bfloat16,
                               device=device)
            layer.set_weight(w)
        else:
            import bitsandbytes as bnb

            layer = bnb.nn.Linear4bit(meta.in_features, meta.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                      device="meta")
            layer.weight = bnb.nn.Params4bit(w.cpu() if device.type == "cpu" else w, requires_grad=False,
                                             compress_statistics=True, quant_type="nf4", blocksize=64).to(device)
        del w
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    gen = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        if any(p.is_meta for p in module.parameters(recurse=False)) or any(
                b.is_meta for b in module.buffers(recurse=False)):
            module.to_empty(device=device, recurse=False)
            for pname, p in module.named_parameters(recurse=False):
                with torch.no_grad():
                    if pname == "weight" and p.dim() == 1:
                        p.fill_(1.0)  # norms
                    else:
                        p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=p.dtype) * 0.02)
                p._is_hf_initialized = True
            if any(True for _ in module.buffers(recurse=False)):
                model._init_weights(module)  # rotary frequencies: the model's own initializer
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def add_adapters(system: str, model, rank: int):
    if system == "qlora":
        import qlora

        return qlora.add_lora(model, r=rank, alpha=rank, dropout=0.0, target_modules=TARGETS, verbose=False)
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))


def make_optimizer(system: str, params, device: torch.device):
    if device.type != "cuda":
        return torch.optim.AdamW(params, lr=1e-4)
    if system == "qlora":
        from qlora.optim import PagedAdamW

        return PagedAdamW(params, lr=1e-4)
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW32bit(params, lr=1e-4)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and args.memory_cap:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap * 2**30 / total), device)
    model = build_model(args.system, args.shape, device)
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    model = add_adapters(args.system, model, args.rank)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
    model.train()
    opt = make_optimizer(args.system, [p for p in model.parameters() if p.requires_grad], device)
    gen = torch.Generator(device="cpu").manual_seed(1234)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (1, args.seq), generator=gen) for _ in range(args.steps)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times, losses = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for ids in batches:
        ids = ids.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    step = statistics.median(times[args.warmup:]) if len(times) > args.warmup else times[-1]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"system": args.system, "tokens_per_s": args.seq / step, "step_s": step, "peak_gib": peak,
            "weights_gib": weights_gib, "first_loss": losses[0], "losses": losses}


def run_system(system: str, args: argparse.Namespace) -> dict[str, Any]:
    return run_worker(__file__, system, ["--shape", args.shape, "--seq", str(args.seq), "--steps", str(args.steps),
                                         "--warmup", str(args.warmup), "--rank", str(args.rank), "--device",
                                         args.device] + (["--memory-cap", str(args.memory_cap)] if args.memory_cap
                                                         else []))


PACKAGES = ("transformers", "peft", "bitsandbytes", "triton")  # versions printed above the table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3-8b",
                        help="tiny, or a model qlora estimate --list-models lists (a Llama-architecture one)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--memory-cap", type=float, default=None, help="GiB (set_per_process_memory_fraction)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--system", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    results = [run_system(s, args) for s in args.systems.split(",")]
    print(describe(args.device, PACKAGES))
    print(f"shape {args.shape}, seq {args.seq}, batch 1, r={args.rank}, memory cap {args.memory_cap or 'none'}; "
          f"median of {max(args.steps - args.warmup, 1)} steps")
    print(f"{'system':10} {'tokens/s':>10} {'peak GiB':>9} {'weights GiB':>11} {'first loss':>11}")
    for r in results:
        if "error" in r:
            print(f"{r['system']:10} {'-':>10} {'-':>9} {'-':>11} {'-':>11}  {r['error']}")
        else:
            print(f"{r['system']:10} {r['tokens_per_s']:10.1f} {r['peak_gib']:9.2f} {r['weights_gib']:11.2f} "
                  f"{r['first_loss']:11.4f}")
    ok = [r for r in results if "error" not in r]
    if len(ok) == 2:
        q, b = ok
        print(f"ratio qlora / bnb-peft: tokens/s {q['tokens_per_s'] / b['tokens_per_s']:.2f}x, "
              f"peak {q['peak_gib'] / b['peak_gib']:.2f}x, "
              f"first-loss difference {abs(q['first_loss'] - b['first_loss']):.2e}")


if __name__ == "__main__":
    main()
