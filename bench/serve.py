"""Load figure of ``qlora serve``: requests/s and tokens/s at 1, 8 and 32 concurrent clients.

Starts the real command (``python -m qlora serve``, NF4 base, two LoRA adapters,
an ephemeral loopback port) on a small random Llama built locally, then, for each
concurrency level, runs that many clients at once with the official ``openai``
async client. Each client sends chat requests one after another (the model id
cycles base / adapter a / adapter b, so the batches mix adapters; greedy, at
most ``--max-tokens`` new tokens: a reply may stop early at EOS, so tokens/s
counts the tokens actually returned, from ``usage``). Wall time runs from the first request to the last reply. The
server's ``/stats`` gives the largest batch seen at each level.

    PYTHONPATH=src python bench/serve.py                       # CPU, about a minute
    PYTHONPATH=src python bench/serve.py --clients 1 8 32 --requests 4 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from harness import describe

KEY = "bench-key"


def build_model(root: Path, hidden: int, layers: int) -> tuple[Path, list[Path]]:
    """A random Llama of the given size with a ChatML tokenizer, and two random adapters."""
    import torch

    import qlora
    from qlora.model.tiny import build_tiny_model
    from qlora.nn import LoraLinear

    model_dir = build_tiny_model(root / "model", arch="llama", hidden=hidden, layers=layers, heads=8, kv_heads=4,
                                 intermediate=hidden * 8 // 3, max_positions=2048)
    adapters = []
    for name, seed in (("a", 1), ("b", 2)):
        model, _ = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
        torch.manual_seed(seed)
        qlora.add_lora(model, r=16, dropout=0.0, verbose=False)
        with torch.no_grad():
            for layer in model.modules():
                if isinstance(layer, LoraLinear):
                    layer.lora_B["default"].weight.normal_(0, 0.02)
        qlora.save_adapter(model, root / name)
        adapters.append(root / name)
    return model_dir, adapters


def start_server(model_dir: Path, adapters: list[Path], args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "qlora", "serve", "--model", str(model_dir), "--port", "0",
           "--compute-dtype", args.compute_dtype, "--max-batch-size", str(args.max_batch_size),
           "--log-level", "warning", *[a for p in adapters for a in ("--adapter", f"{p.name}={p}")]]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "QLORA_API_KEY": KEY})
    line = ""
    for line in iter(proc.stderr.readline, ""):  # warnings from libraries may come first
        if line.startswith("qlora serve: http://"):
            break
    if not line.startswith("qlora serve: http://"):
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
    return proc, line.split()[2]


async def run_level(base_url: str, clients: int, requests_each: int, max_tokens: int,
                    models: list[str]) -> dict[str, float]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=600,
                         http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4)))
    latencies: list[float] = []
    tokens = 0

    async def one_client(c: int) -> None:
        nonlocal tokens
        for r in range(requests_each):
            start = time.perf_counter()
            reply = await client.chat.completions.create(
                model=models[(c + r) % len(models)], max_tokens=max_tokens, temperature=0,
                messages=[{"role": "user", "content": f"Client {c} asks question {r}: what is two plus two?"}])
            latencies.append(time.perf_counter() - start)
            tokens += reply.usage.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    n = clients * requests_each
    return {"clients": clients, "requests": n, "wall_s": wall, "requests_per_s": n / wall,
            "tokens_per_s": tokens / wall, "tokens": tokens, "latency_p50_s": statistics.median(latencies)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=4, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--compute-dtype", default="fp32", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--max-batch-size", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, adapters = build_model(Path(tmp), args.hidden, args.layers)
        proc, base_url = start_server(model_dir, adapters, args)
        models = [model_dir.name, *(p.name for p in adapters)]
        headers = {"Authorization": f"Bearer {KEY}"}
        stats_url = base_url.removesuffix("/v1") + "/stats"
        try:
            asyncio.run(run_level(base_url, 1, 1, args.max_tokens, models))  # warm-up
            rows = []
            for clients in args.clients:
                steps_before = httpx.get(stats_url, headers=headers).json()
                row = asyncio.run(run_level(base_url, clients, args.requests, args.max_tokens, models))
                stats = httpx.get(stats_url, headers=headers).json()
                steps = stats["steps"] - steps_before["steps"]
                decoded = stats["tokens_generated"] - steps_before["tokens_generated"] - row["requests"]
                row["mean_rows_per_step"] = decoded / max(steps, 1)  # first tokens come from prefill
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            proc.send_signal(2)
            proc.wait(30)
    load = os.getloadavg()[0]
    print(f"\n{describe('cpu', ('transformers', 'fastapi', 'uvicorn', 'openai'))}; load average {load:.1f}")
    print(f"llama hidden {args.hidden}, {args.layers} layers, NF4 base, {args.compute_dtype} compute, 2 LoRA "
          f"adapters r=16 + base; {args.requests} requests per client, {args.max_tokens} max new tokens, greedy\n")
    print("| clients | requests | requests/s | tokens/s | p50 latency s | mean rows per decode step |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['latency_p50_s']:.2f} | {r['mean_rows_per_step']:.1f} |")


if __name__ == "__main__":
    main()
