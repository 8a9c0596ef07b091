"""Continuous batching: concurrent requests decoded together, one batch row each.

A background thread runs the decode loop. At every step boundary it admits
waiting requests into the running batch (each prompt is prefilled alone, so its
first token is exactly what a single run gives, then its cache joins the batch;
see :mod:`qlora.infer.batch_cache`), decodes one token for every row in ONE
forward pass, and drops the rows that finished or whose client went away. Each
row carries its own adapter (:func:`qlora.model.multi_adapter.adapter_rows`: the
4-bit base is read once per step for all rows, whichever adapters they use), its
sampling options and seeded generator, its penalties (:class:`qlora.infer.penalties.Penalties`:
its own token counts and logit bias, the model's token rules), its stop tokens and stop strings. Greedy
rows produce the tokens of :func:`qlora.infer.generate.stream_tokens`. A model whose cache cannot be
re-batched (recurrent state: Mamba, hybrid models) or whose padded batch does not reproduce
each request alone is found at start and served one request at a time (``unbatchable`` says why). A row may carry
a :class:`Constraint` (a forced tool call, a JSON reply): its reply's fixed first tokens are prefilled
with its prompt and its tokens are chosen by the constraint; the batch's other rows
still take one argmax for all, so their tokens are what they would be alone. A row may carry a
:class:`~qlora.infer.token_filter.TokenFilter` (vLLM's ``allowed_token_ids`` and ``bad_words``): its
masked tokens are never chosen, by sampling, by a constraint (a constraint's fixed first tokens are
not filtered) or by the model's forced BOS/EOS (then not forced). When no token may follow (every token masked,
or none of the vocabulary continues the constraint) the row ends: with ``"stop"`` where its constraint's reply is
whole (the constraint ends it, as an end-of-turn token the mask left out would), else with ``"length"`` (cut where
nothing may follow, as a token limit would cut it).

A failure of one row's own work (its prefill, its constraint, its text) ends that row alone with
``finish_reason="error"``, logged with its traceback; a failed decode forward ends every row of the batch.

A row may ask for log-probabilities (:mod:`qlora.infer.logprobs`): of each token it
chooses, from that row's logits of the step, and of its prompt's tokens (with their ranks), from the
logits of its prefill (which covers every prompt position anyway); a row that only
scores its prompt (``generate=False``) leaves after its prefill.

Events reach the caller through the ``emit`` callback of its request, called
from the decode thread (a server hands them to its event loop).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import torch

from ..chat.prefix_lm import prompt_types
from ..model.inject import adapter_configs
from ..model.multi_adapter import adapter_rows, delete_adapter
from .batch_cache import add_row, attention_mask, cache_length, cache_problem, declared_problem, keep_rows, new_cache
from .generate import SamplingOptions, cache_keyword, forward_cached, next_token, step_inputs, takes_positions
from .images import media_rows
from .logprobs import TokenLogprob, chosen_logprob, prompt_logprobs
from .model_rules import ModelRules, masked
from .penalties import Penalties
from .rope_switch import rope_switch_length
from .text_stream import TextStream, prompt_context
from .token_filter import TokenFilter

log = logging.getLogger(__name__)


@dataclass
class Event:
    """New text of one request; ``finish_reason`` is set on its last event.

    finish_reason: ``"stop"`` (stop token or string), ``"length"`` (max tokens or
    the context is full), ``"error"`` (``error`` says why), ``"cancelled"``.
    ``logprobs``: entries of the reply tokens decoded since the previous event (when the
    request asked; end-of-turn/stop tokens have none); ``prompt_logprobs``: the prompt's, on
    the first event.
    """

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None


class BatcherClosed(RuntimeError):
    """A request submitted after :meth:`ContinuousBatcher.close` (a server shutting down)."""


class UnknownAdapter(LookupError):
    """A request for an adapter the model does not hold (unloaded while the request was set up)."""


class Constraint(Protocol):
    """Decoding restricted per request (e.g. :class:`~qlora.infer.forced_call.ForcedCall`).

    ``prefix_ids``: tokens the reply starts with, prefilled with the prompt. ``choose``: the next
    token from the row's logits, logit bias and penalties already applied, among those ``allows``
    allows (the row's token filter; None: nothing may follow); called once per step. ``complete``:
    whether the reply so far is whole (it may end here). ``accepts``: whether a token may come next.
    """

    prefix_ids: list[int]

    @property
    def complete(self) -> bool: ...

    def accepts(self, token: int) -> bool: ...

    def choose(self, logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator,
               allows: Callable[[int], bool] | None = None) -> int | None: ...


@dataclass
class Request:
    """One generation: prompt ids, adapter (None: the base alone) and how to sample and stop."""

    prompt_ids: list[int]
    adapter: str | None
    options: SamplingOptions
    emit: Callable[[Event], None]
    stop_ids: frozenset[int] = frozenset()
    stop_strings: tuple[str, ...] = ()
    turn_ends: tuple[str, ...] = ()  # a chat format's turn end spelt as text: a stop, kept as its token would be
    keep_tokens: frozenset[int] = frozenset()  # special tokens kept in the text (tool-call markup)
    constraint: Constraint | None = None  # only this row's tokens are restricted; others decode as usual
    logprobs: int | None = None  # None: no logprobs; k: each reply token's logprob with the k most likely
    prompt_logprobs: int | None = None  # k: also the prompt tokens' entries, with k alternatives each
    token_filter: TokenFilter | None = None  # tokens this row may not choose (vLLM's allowed_token_ids, bad_words)
    generate: bool = True  # False: prefill only (score the prompt), no reply token
    media: dict | None = None  # a vision-language model's image tensors for the prompt: its prefill's, dropped after it
    min_tokens: int = 0  # vLLM's: the stop tokens are masked (and stop strings not looked for) until this many
    skip_special_tokens: bool = True  # vLLM's decoding options (see :class:`~qlora.infer.text_stream.TextStream`)
    include_stop: bool = False
    spaces_between_special_tokens: bool = True
    continues_prompt: bool = False  # a raw completion: decoded after the prompt's last tokens (its leading space kept)
    cancelled: bool = field(default=False, init=False)

    def cancel(self) -> None:
        """Free the request's batch slot at the next step boundary (the client went away)."""
        self.cancelled = True


class _Row:
    """A running request: its tokens so far and how many of them the cache holds."""

    def __init__(self, request: Request, tokenizer, device: torch.device, rules: ModelRules | None) -> None:
        self.request = request
        self.text = TextStream(tokenizer, request.stop_strings, request.keep_tokens, request.skip_special_tokens,
                               request.include_stop, request.min_tokens, request.spaces_between_special_tokens,
                               request.turn_ends,
                               prompt_context(tokenizer, request.prompt_ids) if request.continues_prompt else ())
        self.length = len(request.prompt_ids)  # entries of this row in the cache
        self.pending: list[TokenLogprob] = []  # logprobs not yet sent (their text is held back)
        self.prompt_logprobs: list[TokenLogprob] | None = None
        seed = request.options.seed if request.options.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)  # as a single run seeds it
        self.penalties = Penalties.of(request.options, request.prompt_ids, rules)
        if self.penalties is not None and request.token_filter is not None:  # a forced EOS it masks is not forced
            self.penalties.allows = lambda token: request.token_filter.allows(token, self.text.tokens)
        self.images = request.media is not None  # the prompt had images (their tensors are dropped after its prefill)


class ContinuousBatcher:
    """Serve many generation requests at once from one model.

    Args:
        model: a causal LM (4-bit/LoRA modules included), adapters loaded by name.
        tokenizer: its tokenizer.
        max_batch_size: rows decoded together at most; more requests wait.
        context_length: prompt plus reply never exceed this many tokens.
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 32, context_length: int = 2048) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.context_length = context_length
        self.device = next(model.parameters()).device
        self.rules = ModelRules.of(model)  # the token rules of its generation config, for every row
        self._cache_keyword = cache_keyword(model)  # transformers 5.24 renamed past_key_values to cache
        self._waiting: deque[Request] = deque()
        self._rows: list[_Row] = []
        self._cache = None
        self._wake = threading.Condition()
        self._step_lock = threading.Lock()
        self._pauses = 0  # threads waiting in (or holding) paused(): the loop lets them in before its next step
        self._closed = False
        self._thread: threading.Thread | None = None
        self.unbatchable = self._batching_problem()
        if self.unbatchable:
            log.warning("continuous batching is off for this model: %s; requests are decoded one at a time",
                        self.unbatchable)
        self.stats = {"steps": 0, "max_rows_in_step": 0, "mixed_adapter_steps": 0, "max_adapters_in_step": 0,
                      "requests_completed": 0, "requests_cancelled": 0, "requests_failed": 0, "tokens_generated": 0}

    @torch.inference_mode()
    def _batching_problem(self) -> str | None:
        """Why this model's requests cannot share a batch, or None; asked once, at start.

        A model whose rotary angles change past a length its context reaches (:mod:`qlora.infer.rope_switch`) is
        served one request at a time. Two probe prompts are prefilled alone and decoded one step each alone, then
        joined and decoded together: the batch must give each row the logits it gets alone. A cache this module cannot
        re-batch (recurrent or hybrid state), or a model whose forward fails or differs on a padded
        batch, is served one request at a time instead, with the same tokens.
        """
        switch = rope_switch_length(self.model.config)
        if switch is not None and self.context_length > switch:
            return (f"its rotary angles change once a sequence passes {switch} tokens, for every row of a batch at "
                    f"once, and its context length is {self.context_length}; a context length of at most {switch} "
                    "(qlora serve --max-model-len) keeps its requests batched")
        vocab = self.model.get_input_embeddings().num_embeddings
        prompts = [[(7 * i + 3) % vocab for i in range(n)] for n in (11, 4)]
        try:
            with adapter_rows(self.model, [None]):
                kind = step_inputs(self.model)
            if kind == "whole":
                return "it reads the whole sequence at every step (its prepare_inputs_for_generation), not only the " \
                       "new tokens after a cache"
            if kind != "new":
                return kind
            if not takes_positions(self.model):
                return ("it counts positions from its cache's length itself (its prepare_inputs_for_generation "
                        "drops position ids), which a left-padded batch shifts")
            caches, alone = [], []
            for p in prompts:
                cache = new_cache()
                with adapter_rows(self.model, [None]):
                    out = self.model(input_ids=torch.tensor([p], device=self.device), **{self._cache_keyword: cache},
                                     use_cache=True)
                    problem = cache_problem(cache, out)
                    if problem:
                        return problem
                    caches.append(cache)
                    step = copy.deepcopy(cache)
                    alone.append(self.model(input_ids=torch.tensor([[p[-1]]], device=self.device),
                                            position_ids=torch.tensor([[len(p)]], device=self.device),
                                            **{self._cache_keyword: step}, use_cache=True).logits[0, -1].float())
            batch = add_row(add_row(None, caches[0]), caches[1])
            with adapter_rows(self.model, [None, None]):
                logits = self._batch_step([p[-1] for p in prompts], [len(p) for p in prompts],
                                          batch).logits[:, -1].float()
            dtype = self.model.get_input_embeddings().weight.dtype  # the compute dtype
        except Exception as exc:  # noqa: BLE001 - any failure of a padded batch means: decode alone
            # transformers 5.24's state-space and hybrid models fail on a plain cache: their own layers say why
            return declared_problem(self.model.config) or \
                f"a padded batch fails in its forward ({type(exc).__name__}: {exc})"
        # Rounding alone differs between a batch and a row (other kernels, other summation orders).
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        for row, ref in zip(logits, alone):
            if not torch.isfinite(row).all() or (row - ref).abs().max() > tolerance * ref.abs().max() + 1e-5:
                return "a padded batch does not give each request the logits it gets alone"
        return None

    # --- public API ----------------------------------------------------------
    def start(self) -> "ContinuousBatcher":
        self._thread = threading.Thread(target=self._loop, name="qlora-batcher", daemon=True)
        self._thread.start()
        return self

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (the server is shutting down): no request or model change is taken."""
        return self._closed

    def close(self) -> None:
        """Stop the loop; unfinished requests end with ``finish_reason="cancelled"``."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        with self._wake:  # each request ends once, however many threads close at once (a server's shutdown)
            ending = [*self._waiting, *(r.request for r in self._rows)]
            self._waiting.clear()
            self._rows, self._cache = [], None
            self.stats["requests_cancelled"] += len(ending)  # as a client's cancel is: each request counted once
        for request in ending:
            request.emit(Event("", "cancelled", len(request.prompt_ids)))

    def submit(self, request: Request) -> Request:
        """Queue ``request``; its events arrive through ``request.emit``."""
        self.submit_all([request])
        return request

    def submit_all(self, requests: Sequence[Request]) -> None:
        """Queue ``requests`` (the rows of one reply: its choices) together, or none of them.

        Raises:
            ValueError: a prompt that is empty or leaves no room in the context.
            BatcherClosed: the batcher is closed (a server shutting down); each request is counted in ``stats`` as
                cancelled, as :meth:`close` counts those it ends.
            UnknownAdapter: a request names an adapter the model does not hold.
        """
        for request in requests:
            if not request.prompt_ids:
                raise ValueError("the prompt is empty")
            if len(request.prompt_ids) >= self.context_length:
                raise ValueError(f"the prompt has {len(request.prompt_ids)} tokens; the context holds "
                                 f"{self.context_length} (prompt and reply together)")
        with self._wake:
            if self._closed:
                self.stats["requests_cancelled"] += len(requests)
                raise BatcherClosed("the batcher is closed")
            held = adapter_configs(self.model)
            for request in requests:
                if request.adapter is not None and request.adapter not in held:
                    raise UnknownAdapter(f"the model has no adapter {request.adapter!r}")
            self._waiting.extend(requests)
            self._wake.notify()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the loop between two steps (requests queue up meanwhile), e.g. to
        change the model's adapters or to look at a consistent batch. The loop waits for the pause before its
        next step: it would otherwise take the step lock back at once, step after step, and a pause would wait
        until no request runs."""
        with self._wake:
            self._pauses += 1
        try:
            with self._step_lock:
                yield
        finally:
            with self._wake:
                self._pauses -= 1
                self._wake.notify_all()

    def unload(self, adapter: str) -> int:
        """Delete ``adapter`` from the model between two steps (freeing its tensors), unless requests for it
        are running or waiting: returns how many there are (0: deleted). Checked and deleted with submissions
        held, so a request is either counted here or refused by :meth:`submit`.

        Raises:
            UsageError: an adapter that cannot be deleted (see :func:`~qlora.model.multi_adapter.delete_adapter`).
        """
        with self.paused(), self._wake:
            busy = sum(r.adapter == adapter and not r.cancelled for r in self._waiting)
            busy += sum(r.request.adapter == adapter for r in self._rows)
            if not busy:
                delete_adapter(self.model, adapter)
            return busy

    def load(self) -> dict[str, int]:
        """Running rows and waiting requests, with the counters of ``stats``."""
        return {"running": len(self._rows), "waiting": len(self._waiting), **self.stats}

    # --- the loop ------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and (self._pauses or not self._waiting and not self._rows):
                    self._wake.wait()
                if self._closed:
                    return
            with self._step_lock:
                try:
                    self._step()
                except Exception as exc:  # a failed forward ends the batch's requests, not the server
                    log.exception("decode step failed; ending the %d running requests", len(self._rows))
                    self._fail_all(f"{type(exc).__name__}: {exc}")

    @torch.inference_mode()
    def _step(self) -> None:
        self._drop_cancelled()
        while self._waiting and len(self._rows) < (1 if self.unbatchable else self.max_batch_size):
            with self._wake:
                request = self._waiting.popleft()
            if request.cancelled:
                self.stats["requests_cancelled"] += 1
            else:
                self._admit(request)
        if self._rows:
            self._decode()

    def _admit(self, request: Request) -> None:
        """Prefill ``request`` alone (with the reply's forced first tokens, if any), emit its first
        token, and add it to the batch; a failure on the way (its prefill, its constraint) ends it alone."""
        try:
            self._prefill(request)
        except Exception as exc:  # noqa: BLE001 - this request's own fault: the batch goes on without it
            self._fail(request, exc, 0)

    def _prefill(self, request: Request) -> None:
        row = _Row(request, self.tokenizer, self.device, self.rules)
        images, request.media = request.media, None  # for the prefill alone: a long reply does not hold them
        prefix = request.constraint.prefix_ids if request.constraint is not None else []
        prefix = prefix[:request.options.max_new_tokens] if request.generate else []
        if prefix and len(request.prompt_ids) + len(prefix) >= self.context_length:
            request.emit(Event("", "length", len(request.prompt_ids)))
            return
        ids = torch.tensor([request.prompt_ids + prefix], device=self.device)
        media = None if images is None else media_rows(images, 1, ids.shape[1])
        with adapter_rows(self.model, [request.adapter]):
            # a prefix-LM's token types (scored or forced tokens causal) in place of its processor's (the whole
            # prompt a prefix), on either path
            scored = request.prompt_logprobs is not None
            if self.unbatchable:  # the model's own cache, as a single run (stream_tokens) keeps it
                out, cache = forward_cached(self.model, ids, {}, 0, media, scored=scored, answer=len(prefix))
            else:  # with images: positions left to the model, as stream_tokens' prefill leaves them
                cache = new_cache()
                types = prompt_types(self.model, ids, scored, len(prefix))
                out = self.model(input_ids=ids, **{self._cache_keyword: cache}, use_cache=True,
                                 **{k: v for k, v in (media or {}).items() if k not in types}, **types)
        problem = None if self.unbatchable else cache_problem(cache, out)
        if problem:
            raise RuntimeError(f"this request's cache cannot join the batch: {problem}")
        logits, prompt = out.logits[0], len(request.prompt_ids)
        if request.prompt_logprobs is not None:
            row.prompt_logprobs = prompt_logprobs(logits, request.prompt_ids, request.prompt_logprobs)
        if not request.generate:
            self._emit(row, "", "length")
            self.stats["requests_completed"] += 1
            return
        if prefix:
            row.length += len(prefix)
            piece = "".join(row.text.push(t) for t in prefix)
            if row.penalties is not None:
                for t in prefix:
                    row.penalties.add(t)
            if request.logprobs is not None:
                row.pending += [chosen_logprob(logits[prompt - 1 + k], t, request.logprobs) for k, t in enumerate(prefix)]
            if len(prefix) >= request.options.max_new_tokens:  # the limit ends the reply inside its forced start
                self._emit(row, piece + row.text.flush(), "length")
                self.stats["requests_completed"] += 1
                return
            if piece:
                self._emit(row, piece, None)
        if not self._advance(row, self._choose(row, logits[-1]), logits[-1]):
            self._cache = cache if self.unbatchable else add_row(self._cache, cache)
            self._rows.append(row)

    @staticmethod
    def _choose(row: _Row, logits: torch.Tensor) -> int | None:
        """The row's next token (None: every token is masked, or none continues its constraint)."""
        request, reply = row.request, row.text.tokens
        if request.token_filter is not None:  # vLLM's allowed tokens and bad words, first in its sampler
            logits = request.token_filter(logits, reply)
        if len(reply) < request.min_tokens:  # no end before min_tokens (vLLM's; a constraint that must end still does)
            logits = masked(logits, request.stop_ids)
        if request.constraint is not None:
            if row.penalties is not None:
                logits = row.penalties(logits)
            allows = None if request.token_filter is None else request.token_filter.allower(reply)
            return request.constraint.choose(logits, request.options, row.generator, allows)
        if request.token_filter is not None and not torch.isfinite(logits).any():
            return None  # nothing left to sample from
        return next_token(logits, request.options, row.generator, row.penalties)

    def _batch_step(self, last: list[int], lengths: list[int], cache):
        """The forward of one decode step: each row's ``last`` token after the ``lengths[i]`` tokens its
        row of the joined ``cache`` holds (left-padded to the longest)."""
        mask = attention_mask(cache_length(cache) + 1, [n + 1 for n in lengths], self.device)
        return self.model(input_ids=torch.tensor([[t] for t in last], device=self.device), attention_mask=mask,
                          position_ids=torch.tensor([[n] for n in lengths], device=self.device),
                          **{self._cache_keyword: cache}, use_cache=True)

    def _decode(self) -> None:
        """One token for every row, in one forward pass."""
        rows = self._rows
        lengths = [r.length for r in rows]
        adapters = [r.request.adapter for r in rows]
        with adapter_rows(self.model, adapters):
            if self.unbatchable:  # one row, decoded as stream_tokens decodes it
                ids = torch.tensor([rows[0].request.prompt_ids + rows[0].text.tokens], device=self.device)
                out, self._cache = forward_cached(self.model, ids, self._cache, lengths[0],
                                                  {} if rows[0].images else None)
            else:
                out = self._batch_step([r.text.tokens[-1] for r in rows], lengths, self._cache)
        self._count_step(adapters)
        last = out.logits[:, -1]
        greedy = last.argmax(-1).tolist()  # one device sync for all greedy rows
        keep = []
        for i, row in enumerate(rows):
            row.length += 1
            plain_greedy = row.request.constraint is None and row.request.options.temperature <= 0 \
                and row.penalties is None and row.request.token_filter is None \
                and len(row.text.tokens) >= row.request.min_tokens
            try:
                finished = self._advance(row, greedy[i] if plain_greedy else self._choose(row, last[i]), last[i])
            except Exception as exc:  # noqa: BLE001 - this row's own fault (its constraint, its text): it alone ends
                self._fail(row.request, exc, len(row.text.tokens))
                finished = True
            if not finished:
                keep.append(i)
        self._retain(keep)

    def _advance(self, row: _Row, token: int | None, logits: torch.Tensor) -> bool:
        """Record ``token`` (chosen from ``logits``) for ``row`` and emit its text; True when the row is finished."""
        request = row.request
        if token is None:  # a constraint or token filter that no token of the vocabulary satisfies
            # The constraint's whole reply, its end-of-turn token masked or absent, ends; one nothing may continue
            # (the mask, or a character no token spells, even in bytes) is cut here.
            reason = "stop" if request.constraint is not None and request.constraint.complete else "length"
            self._emit(row, row.text.flush(), reason)
            self.stats["requests_completed"] += 1
            return True
        self.stats["tokens_generated"] += 1
        if row.penalties is not None:
            row.penalties.add(token)
        if request.logprobs is not None and token not in request.stop_ids:
            row.pending.append(chosen_logprob(logits, token, request.logprobs))
        stop_token = token in request.stop_ids
        piece = row.text.end(token) if stop_token else row.text.push(token)
        generated = len(row.text.tokens)
        reason = None
        if stop_token or row.text.stopped:
            reason = "stop"
        elif generated >= request.options.max_new_tokens or row.length + 1 >= self.context_length:
            reason = "length"
        if reason is not None:
            piece += row.text.flush()
            self.stats["requests_completed"] += 1
        if piece or reason is not None:
            self._emit(row, piece, reason)
        return reason is not None

    @staticmethod
    def _emit(row: _Row, text: str, reason: str | None, error: str | None = None) -> None:
        """Send ``row``'s new text, with the logprobs gathered since its last event."""
        request = row.request
        event = Event(text, reason, len(request.prompt_ids), len(row.text.tokens), error, row.pending,
                      row.prompt_logprobs)
        row.pending, row.prompt_logprobs = [], None
        request.emit(event)

    def _fail(self, request: Request, exc: Exception, completion_tokens: int) -> None:
        """End ``request`` alone with ``finish_reason="error"``, its exception logged with the traceback."""
        self.stats["requests_failed"] += 1
        log.error("request failed (%d prompt tokens); the batch goes on without it", len(request.prompt_ids),
                  exc_info=exc)
        request.emit(Event("", "error", len(request.prompt_ids), completion_tokens, f"{type(exc).__name__}: {exc}"))

    def _retain(self, keep: list[int]) -> None:
        if len(keep) != len(self._rows):
            self._rows = [self._rows[i] for i in keep]
            if self.unbatchable:  # one row at most: it left
                self._cache = None
            else:
                self._cache = keep_rows(self._cache, keep, [r.length for r in self._rows])

    def _drop_cancelled(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if not r.request.cancelled]
        for row in self._rows:
            if row.request.cancelled:
                self.stats["requests_cancelled"] += 1
                row.request.emit(Event("", "cancelled", len(row.request.prompt_ids), len(row.text.tokens)))
        self._retain(keep)

    def _count_step(self, adapters: list[str | None]) -> None:
        distinct = len(set(adapters))
        s = self.stats
        s["steps"] += 1
        s["max_rows_in_step"] = max(s["max_rows_in_step"], len(adapters))
        s["max_adapters_in_step"] = max(s["max_adapters_in_step"], distinct)
        s["mixed_adapter_steps"] += distinct > 1

    def _fail_all(self, message: str) -> None:
        for row in self._rows:
            self.stats["requests_failed"] += 1
            row.request.emit(Event("", "error", len(row.request.prompt_ids), len(row.text.tokens), message))
        self._rows, self._cache = [], None
