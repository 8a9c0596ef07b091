"""LoRA on MoE experts: qlora's per-expert ``x A_e^T B_e^T`` against PEFT's ParamWrapper.

PEFT (``target_parameters``) folds ``W + scale * B A`` for all experts into a new 3-D
weight on every forward (a second expert stack, kept for the backward pass); qlora
applies each routed expert's factors to its tokens only. Both on the same 16-bit
(fp32 on the CPU) transformers MoE model, one decoder layer of Mixtral shape scaled
down, adapters on ``gate_up_proj`` and ``down_proj``: time of one forward + backward
and the process's peak memory above the loaded model, each system in its own process.

    PYTHONPATH=src python bench/moe_expert_lora.py [--hidden 1024] [--experts 8] [--tokens 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import describe, run_worker  # noqa: E402

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _model(args):
    import torch
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                                     num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=8,
                                     num_local_experts=args.experts, num_experts_per_tok=2)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).float()


def worker(args) -> dict:
    import torch

    torch.set_num_threads(1)
    model = _model(args)
    if args.system == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.rank, target_modules=[], target_parameters=TARGETS))
    else:
        import qlora

        qlora.add_lora(model, r=args.rank, dropout=0.0, target_modules=None, target_parameters=TARGETS, verbose=False)
    ids = torch.randint(0, 256, (1, args.tokens))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        if step:
            times.append(1000 * (time.perf_counter() - start))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"system": args.system, "ms": statistics.median(times), "peak_mib": (peak - base_rss) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--system", default="qlora")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    argv = [f"--{k}={getattr(args, k)}" for k in ("hidden", "experts", "tokens", "rank", "steps")]
    print(describe("cpu", ("transformers", "peft")))
    print(f"hidden {args.hidden}, {args.experts} experts (top-2), {args.tokens} tokens, r={args.rank}, one thread\n")
    print("| system | forward + backward ms | peak memory above the model MiB |\n|---|---:|---:|")
    for system in ("peft", "qlora"):
        r = run_worker(__file__, system, argv)
        print(f"| {system} | {r['ms']:,.0f} | {r['peak_mib']:,.0f} |" if "error" not in r else f"| {system} | {r} | |")


if __name__ == "__main__":
    main()
