"""What a training record of ``--logging-steps N`` holds: the mean over the N steps since the last record.

transformers' ``Trainer`` (so TRL, axolotl, LLaMA-Factory) logs, every N steps, the mean loss of the steps since
its last log with the learning rate and gradient norm of the last one, and TRL's trainers average their metrics
(rewards, log-probs) over the same steps: a record of the last step alone would be as noisy as N = 1 and leave
N - 1 steps unseen.
"""

from __future__ import annotations

from typing import Any

# What the last step of the window says: its position, rate, gradient norm, throughput and peak memory.
LAST_STEP = frozenset({"split", "step", "lr", "grad_norm", "tokens_per_s", "gpu_mem_gib"})


def window_record(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One record for the step records ``records`` (oldest first): the last step's ``LAST_STEP`` values, and
    every other metric's mean over the steps that have it (a KTO step without undesirable rows has no
    ``rewards/rejected``), unweighted by the steps' sizes, as TRL 1.16 averages its logged values, KTO's per-kind
    means included."""
    last = records[-1]
    keys = dict.fromkeys(k for r in records for k in r if k not in LAST_STEP or k in last)  # first-seen order
    return {k: last[k] if k in LAST_STEP else _mean([r[k] for r in records if k in r]) for k in keys}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
