"""One thread or all cores? The matmul of a training step on the CPU, at several model widths.

Times ``(x @ w).sum().backward()`` with x ``[512, h]`` and w ``[h, h]`` (512 tokens through one
h x h layer, as in a tiny model's step) for each width and thread count, each in a fresh process
(the thread count is fixed before any work), and prints the load average: the rule in
``qlora.cpu_threads`` is chosen from this table.

    PYTHONPATH=src python bench/cpu_threads.py [--widths 128 512 2048] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

WORKER = """
import sys, time, torch
h, t = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(t)
x = torch.randn(512, h, requires_grad=True)
w = torch.randn(h, h, requires_grad=True)
for _ in range(2):
    (x @ w).sum().backward()
n, start = 0, time.perf_counter()
while time.perf_counter() - start < 1.5:
    (x @ w).sum().backward()
    n += 1
print(1000 * (time.perf_counter() - start) / n)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start")
    print("| hidden | " + " | ".join(f"{t} thread(s) ms" for t in args.threads) + " |")
    print("|---:|" + "---:|" * len(args.threads))
    for h in args.widths:
        times = []
        for t in args.threads:
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
            out = subprocess.run([sys.executable, "-c", WORKER, str(h), str(t)], capture_output=True, text=True,
                                 env=env, timeout=120, check=True).stdout
            times.append(float(out.strip()))
        print(f"| {h} | " + " | ".join(f"{ms:.1f}" for ms in times) + " |")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
