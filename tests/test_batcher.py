"""Continuous batching equals decoding each request alone, on every tiny architecture.

Rows join mid-run (a batch of 2 for 4 requests), have different prompt lengths
(left padding), and leave at different steps (the cache is trimmed); each row's
greedy tokens must still be exactly those of ``stream_tokens`` run alone.
"""

from __future__ import annotations

import threading

import pytest
import torch

import qlora
from qlora.infer.batcher import ContinuousBatcher, Event, Request
from qlora.infer.generate import SamplingOptions, stream_tokens
from qlora.model.tiny import ARCHITECTURES, build_tiny_model

PROMPTS = ["The quick brown fox", "def add(a, b):\n", "Question: what is two plus two? Answer: four. And three?", "A"]
NEW_TOKENS = [9, 14, 5, 11]


def _run(batcher: ContinuousBatcher, requests: list[tuple[list[int], int]]) -> list[list[int]]:
    """Submit all requests while the loop is held, so they queue together; return each one's tokens."""
    done = threading.Semaphore(0)
    texts: list[list[Event]] = [[] for _ in requests]

    def emitter(i):
        def emit(event: Event) -> None:
            texts[i].append(event)
            if event.finish_reason:
                done.release()
        return emit

    reqs = [Request(ids, None, SamplingOptions(max_new_tokens=n, temperature=0), emitter(i))
            for i, (ids, n) in enumerate(requests)]
    with batcher.paused():
        for r in reqs:
            batcher.submit(r)
    for _ in reqs:
        assert done.acquire(timeout=120)
    return texts


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_greedy_equals_alone(tmp_path, tiny_tokenizer, arch):
    build_tiny_model(tmp_path, tokenizer=tiny_tokenizer, arch=arch)
    model, tokenizer = qlora.load_model(tmp_path, compute_dtype=torch.float32, device="cpu")
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    alone = [tokenizer.decode(list(stream_tokens(model, torch.tensor([ids]), SamplingOptions(max_new_tokens=n,
                              temperature=0))), skip_special_tokens=True) for ids, n in zip(prompts, NEW_TOKENS)]
    batcher = ContinuousBatcher(model, tokenizer, max_batch_size=2, context_length=512).start()
    try:
        events = _run(batcher, list(zip(prompts, NEW_TOKENS)))
    finally:
        batcher.close()
    for i, evs in enumerate(events):
        assert "".join(e.text for e in evs) == alone[i], (arch, i)
        assert evs[-1].finish_reason == "length" and evs[-1].completion_tokens == NEW_TOKENS[i]
        assert evs[-1].prompt_tokens == len(prompts[i])
    stats = batcher.load()
    assert stats["max_rows_in_step"] == 2 and stats["requests_completed"] == 4
