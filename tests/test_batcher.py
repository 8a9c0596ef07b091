"""Continuous batching equals decoding each request alone, on every tiny architecture.

Rows join mid-run (a batch of 2 for 4 requests), have different prompt lengths
(left padding), and leave at different steps (the cache is trimmed); each row's
greedy tokens must still be exactly those of ``stream_tokens`` run alone.
"""

from __future__ import annotations

import logging
import threading
import time

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


@pytest.mark.parametrize("kind", ["gemma3", "llava_next"])
def test_image_tensors_are_freed_after_the_prefill(tmp_path, kind):
    """A prompt's image tensors serve its prefill alone: by the reply's last token nothing holds them any more,
    and the reply is still ``stream_tokens``' with them (which gives them to the prefill only)."""
    import weakref

    from image_models import build_image_model, write_png
    from qlora.chat.images import resolve_image
    from qlora.infer.images import encode_with_images, image_processor
    from qlora.infer.messages import Message
    from qlora.infer.template import render_chat

    folder = build_image_model(tmp_path / kind, kind)
    model, tokenizer = qlora.load_model(folder, compute_dtype=torch.float32, device="cpu")
    user = Message("user", "what is in the picture?", images=(resolve_image(str(write_png(tmp_path / "a.png", 40, 30,
                                                                                          0)), "test"),))
    ids, media = encode_with_images(image_processor(model, tokenizer, folder, "test"), model,
                                    render_chat(tokenizer, [user]), user.images)
    new = 8
    alone = list(stream_tokens(model.eval(), ids, SamplingOptions(max_new_tokens=new, temperature=0), (), media))
    pixels = weakref.ref(media["pixel_values"])
    finished, texts, seen = threading.Event(), [], {}

    def emit(event: Event) -> None:  # on the decode thread; the last event comes from a step after the prefill
        texts.append(event.text)
        if event.finish_reason is not None:
            seen["held"], seen["last"] = pixels() is not None, event
            finished.set()

    request = Request(ids[0].tolist(), None, SamplingOptions(max_new_tokens=new, temperature=0), emit, media=media)
    del media
    batcher = ContinuousBatcher(model, tokenizer, context_length=512).start()
    try:
        batcher.submit(request)
        assert finished.wait(120)
    finally:
        batcher.close()
    assert seen["last"].finish_reason == "length" and seen["last"].completion_tokens == new
    assert "".join(texts) == tokenizer.decode(alone, skip_special_tokens=True)
    assert not seen["held"] and request.media is None


class _FailingConstraint:
    """A constraint whose ``choose`` raises after ``good`` tokens: a fault of one row only."""

    prefix_ids: list[int] = []

    def __init__(self, good: int) -> None:
        self.good = good

    complete = False

    def accepts(self, token: int) -> bool:
        return True

    def choose(self, logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator,
               allows=None) -> int:
        if self.good == 0:
            raise RuntimeError("injected fault")
        self.good -= 1
        return int(logits.argmax())


def test_a_failing_row_ends_alone_and_the_batch_goes_on(tiny_model_dir, caplog):
    """A row's own fault (here its constraint's), at its prefill or at a later step, ends that row with
    ``finish_reason="error"``, logged with its traceback; the rows decoded beside it are as they are alone."""
    model, tokenizer = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    ids = tokenizer(PROMPTS[0]).input_ids
    alone = tokenizer.decode(list(stream_tokens(model, torch.tensor([ids]), SamplingOptions(max_new_tokens=12,
                                                                                           temperature=0))),
                             skip_special_tokens=True)
    events: list[list[Event]] = [[], [], []]
    done = threading.Semaphore(0)

    def emitter(i):
        def emit(event: Event) -> None:
            events[i].append(event)
            if event.finish_reason:
                done.release()
        return emit

    options = SamplingOptions(max_new_tokens=12, temperature=0)
    requests = [Request(ids, None, options, emitter(0)),
                Request(ids, None, options, emitter(1), constraint=_FailingConstraint(0)),  # at its prefill
                Request(ids, None, options, emitter(2), constraint=_FailingConstraint(4))]  # at its fifth token
    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=4, context_length=512).start()
    try:
        with caplog.at_level(logging.ERROR, logger="qlora"), batcher.paused():
            for r in requests:
                batcher.submit(r)
        for _ in requests:
            assert done.acquire(timeout=60)
        deadline = time.monotonic() + 10
        while (stats := batcher.load())["running"] and time.monotonic() < deadline:  # the step's end drops them
            time.sleep(0.01)
    finally:
        batcher.close()
    sound, at_prefill, later = events
    assert "".join(e.text for e in sound) == alone and sound[-1].finish_reason == "length"
    assert sound[-1].completion_tokens == 12
    for failed, tokens in ((at_prefill, 0), (later, 4)):
        assert failed[-1].finish_reason == "error" and failed[-1].error == "RuntimeError: injected fault"
        assert failed[-1].completion_tokens == tokens
    assert alone.startswith("".join(e.text for e in later))  # its four tokens were the greedy ones
    records = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(records) == 2 and all(r.exc_info is not None for r in records)
    assert stats["running"] == stats["waiting"] == 0 and stats["max_rows_in_step"] == 2
    assert (stats["requests_failed"], stats["requests_completed"]) == (2, 1)  # /stats counts the failures apart


def test_requests_a_shutdown_ends_are_counted_as_cancelled(tiny_model_dir):
    """Every request the batcher took ends counted once in /stats: those ``close`` ends (running or waiting, which
    the server answers 503 server_shutdown) as cancelled, as the ones whose client went away are."""
    model, tokenizer = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    ids = tokenizer(PROMPTS[0]).input_ids
    started, ends = threading.Event(), []

    def emit(event: Event) -> None:
        started.set()
        if event.finish_reason:
            ends.append(event.finish_reason)

    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=1, context_length=512).start()
    # no end of text: nothing finishes before close
    options = SamplingOptions(max_new_tokens=400, temperature=0, logit_bias={tokenizer.eos_token_id: -100.0})
    for _ in range(3):
        batcher.submit(Request(ids, None, options, emit))
    assert started.wait(timeout=60)  # one decodes, two wait
    batcher.close()
    stats = batcher.load()
    assert ends == ["cancelled"] * 3, ends
    assert (stats["requests_cancelled"], stats["requests_completed"], stats["requests_failed"]) == (3, 0, 0), stats


def test_a_pause_gets_in_between_two_steps_of_a_running_request(tiny_model_dir):
    """``paused`` (a runtime adapter load, an unload) waits for the step under way, not for the requests to end: the
    loop took its step lock back at once after each step, so a pause waited, starved, until nothing ran."""
    model, tokenizer = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    ids = tokenizer(PROMPTS[0]).input_ids
    tokens, ended = [], threading.Event()

    def emit(event: Event) -> None:
        tokens.append(event)
        if event.finish_reason:
            ended.set()

    def busy(*_) -> None:  # a step that computes (holds the interpreter) for 10 ms, as a real forward does
        end = time.perf_counter() + 0.01
        while time.perf_counter() < end:
            pass

    hook = model.register_forward_pre_hook(busy)
    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=1, context_length=512).start()
    try:
        options = SamplingOptions(max_new_tokens=300, temperature=0, logit_bias={tokenizer.eos_token_id: -100.0})
        batcher.submit(Request(ids, None, options, emit))
        while len(tokens) < 3:
            time.sleep(0.01)
        for _ in range(5):
            with batcher.paused():
                assert batcher.load()["running"] == 1 and not ended.is_set()
                held = len(tokens)
                time.sleep(0.05)
                assert len(tokens) == held  # no step while paused
    finally:
        batcher.close()
        hook.remove()
