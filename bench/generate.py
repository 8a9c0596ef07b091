"""Decoding benchmark: qlora generate against transformers + bitsandbytes, batch 1, greedy.

Each system runs in its own subprocess on the random-initialized model of
bench/train.py (built layer by layer on the device, NF4 with double
quantization, block 64, bf16; identical 4-bit codes in both systems). qlora
decodes through its own KV-cache loop (``qlora.infer.generate.stream_tokens``,
what ``qlora generate`` runs; its Linear4bit layers take the fused Triton GEMV
on CUDA); the peer through ``model.generate(do_sample=False)``. A 32-token
random prompt, 128 new tokens (EOS ignored), one warm-up generation, then the
median of the timed ones. Tokens/s counts new tokens over the whole generation
(prefill included, as a user sees it).

    python bench/generate.py --shape llama-3-8b                 # GPU
    python bench/generate.py --shape tiny --device cpu          # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from harness import describe, run_worker

from train import build_model

SYSTEMS = ("qlora", "bnb-transformers")


def _generate(system: str, model, prompt: torch.Tensor, new_tokens: int) -> list[int]:
    if system == "qlora":
        from qlora.infer.generate import SamplingOptions, stream_tokens

        return list(stream_tokens(model, prompt, SamplingOptions(max_new_tokens=new_tokens, temperature=0.0)))
    out = model.generate(prompt, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


def worker(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    model = build_model("qlora" if args.system == "qlora" else "bnb-peft", args.shape, device)
    model.eval()
    model.generation_config.eos_token_id = None  # always 128 new tokens
    gen = torch.Generator().manual_seed(1234)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, tokens = [], []
    for _ in range(args.warmup + args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.inference_mode():
            tokens = _generate(args.system, model, prompt, args.new_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times[args.warmup:])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"system": args.system, "tokens_per_s": len(tokens) / seconds, "peak_gib": peak, "tokens": tokens}


def run_system(system: str, args: argparse.Namespace) -> dict[str, Any]:
    return run_worker(__file__, system, ["--shape", args.shape, "--device", args.device, "--prompt", str(args.prompt),
                                         "--new-tokens", str(args.new_tokens), "--warmup", str(args.warmup),
                                         "--repeats", str(args.repeats)])


PACKAGES = ("transformers", "bitsandbytes", "triton")  # versions printed above the table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-3-8b",
                        help="tiny, or a model qlora estimate --list-models lists (a Llama-architecture one)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
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
    print(f"shape {args.shape}, batch 1, greedy, prompt {args.prompt}, {args.new_tokens} new tokens; "
          f"median of {args.repeats}")
    print(f"{'system':17} {'tokens/s':>9} {'peak GiB':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['system']:17} {'-':>9} {'-':>9}  {r['error']}")
        else:
            print(f"{r['system']:17} {r['tokens_per_s']:9.1f} {r['peak_gib']:9.2f}")
    ok = [r for r in results if "error" not in r]
    if len(ok) == 2:
        q, b = ok
        same = next((i for i, (s, t) in enumerate(zip(q["tokens"], b["tokens"])) if s != t), len(q["tokens"]))
        print(f"ratio qlora / bnb-transformers: tokens/s {q['tokens_per_s'] / b['tokens_per_s']:.2f}x; "
              f"greedy tokens agree for the first {same} of {len(q['tokens'])}")


if __name__ == "__main__":
    main()
