"""Streamed text generation with a KV cache.

A small explicit loop instead of ``model.generate``: each step runs the model on
the newest token only (the cache holds the past), picks the next token, and
yields it at once, so a chat shows words as they are made. Greedy decoding
(temperature 0) gives exactly the tokens of ``model.generate(do_sample=False)``, with
``repetition_penalty`` too.

The next token is chosen as transformers' ``generate`` chooses it: logit bias and penalties on
the raw logits (:mod:`qlora.infer.penalties`), then temperature, top-k, top-p and min-p, in the
order of its ``LogitsProcessorList`` (``GenerationMixin._get_logits_processor``).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field, fields
from typing import Iterable, Iterator, Sequence

import torch
from transformers import DynamicCache

from ..errors import UsageError
from ..option_range import AT_LEAST_1, NON_NEGATIVE, POSITIVE, Range
from .penalties import Penalties

PENALTY_RANGE = Range(-2, 2)  # OpenAI's presence_penalty / frequency_penalty
BIAS_RANGE = Range(-100, 100)  # OpenAI's logit_bias values


@dataclass
class SamplingOptions:
    """How the next token is chosen; each field's help is the CLI's help text."""

    max_new_tokens: int = field(default=256, metadata={"help": "stop after this many new tokens", "range": AT_LEAST_1})
    temperature: float = field(default=0.7, metadata={"help": "softmax temperature; 0 = greedy (deterministic)",
                                                      "range": NON_NEGATIVE})
    top_p: float = field(default=0.9, metadata={"help": "nucleus sampling: smallest token set with this probability mass",
                                                "range": Range(0, 1, low_open=True)})
    top_k: int = field(default=0, metadata={"help": "sample only among the k most likely tokens; 0 = all",
                                            "range": NON_NEGATIVE})
    seed: int | None = field(default=None, metadata={"help": "random seed, for reproducible sampling",
                                                     "range": NON_NEGATIVE})
    min_p: float = field(default=0.0, metadata={
        "help": "drop tokens less likely than min_p times the most likely one (after temperature); 0 = off",
        "range": Range(0, 1)})
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "penalize tokens already in the prompt or the reply: a logit above 0 is divided by this, one below "
                "0 multiplied (transformers' repetition_penalty); 1 = off, above 1 repeats less",
        "range": POSITIVE})
    presence_penalty: float = field(default=0.0, metadata={
        "help": "subtract this from the logit of every token already in the reply (OpenAI's); 0 = off",
        "range": PENALTY_RANGE})
    frequency_penalty: float = field(default=0.0, metadata={
        "help": "subtract this times its count in the reply from each token's logit (OpenAI's); 0 = off",
        "range": PENALTY_RANGE})
    logit_bias: dict[int, float] = field(default_factory=dict, metadata={
        "help": "token id -> value added to its logit before sampling, in [-100, 100] (OpenAI's logit_bias)",
        "cli": False})

    def __post_init__(self) -> None:
        for f in fields(self):
            if "range" in f.metadata:
                f.metadata["range"].check(f"--{f.name.replace('_', '-')}", getattr(self, f.name))
        self.logit_bias = dict(self.logit_bias or {})
        for token, bias in self.logit_bias.items():
            if not isinstance(token, int) or token < 0:
                raise UsageError(f"logit_bias keys must be token ids (integers, at least 0); got {token!r}")
            BIAS_RANGE.check(f"logit_bias[{token}]", bias)


def cli_fields() -> list:
    """The :class:`SamplingOptions` fields that are command-line options (``logit_bias`` is not)."""
    return [f for f in fields(SamplingOptions) if f.metadata.get("cli", True)]


def next_token(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None,
               penalties: Penalties | None = None) -> int:
    """Pick the next token id from 1-D ``logits``: penalties, then greedy or a sample of :func:`sampling_probs`."""
    if penalties is not None:
        logits = penalties(logits)
    if options.temperature <= 0:
        return int(logits.argmax())
    return int(torch.multinomial(sampling_probs(logits, options), 1, generator=generator))


def sampling_probs(logits: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """The distribution a token is drawn from: ``logits`` (1-D or batched, penalties already applied)
    divided by the temperature, then top-k, top-p and min-p, as transformers' warpers in this order."""
    logits = logits.float() / options.temperature
    if 0 < options.top_k < logits.shape[-1]:
        kth = torch.topk(logits, options.top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if options.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= options.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    if options.min_p > 0:
        probs = probs.masked_fill(probs < options.min_p * probs.amax(-1, keepdim=True), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


@torch.inference_mode()
def stream_tokens(model, input_ids: torch.Tensor, options: SamplingOptions | None = None,
                  stop_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield new token ids one by one; a stop id is yielded and then ends the stream.

    Args:
        model: a transformers causal LM (4-bit/LoRA modules included).
        input_ids: the prompt, shape ``(1, length)``.
        options: sampling options (defaults: :class:`SamplingOptions`).
        stop_ids: token ids that end generation (EOS, end of turn).
    """
    options = options or SamplingOptions()
    stop = set(stop_ids)
    device = input_ids.device
    generator = None
    if options.seed is not None and options.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(options.seed)
    model.eval()
    penalties = Penalties.of(options, input_ids[0])
    ids, cache, seen = input_ids, {}, 0
    for _ in range(options.max_new_tokens):
        out, cache = forward_cached(model, ids, cache, seen)
        seen += ids.shape[1]
        token = next_token(out.logits[0, -1], options, generator, penalties)
        if penalties is not None:
            penalties.add(token)
        yield token
        if token in stop:
            return
        ids = torch.tensor([[token]], device=device)


def forward_cached(model, ids: torch.Tensor, cache: dict, seen: int):
    """Run ``ids`` after the ``seen`` tokens that ``cache`` (keywords from the previous call, ``{}`` at first)
    holds; returns the model's output and the cache keywords for the next call.

    As transformers' ``generate``: positions are passed to a forward that takes them (Bamba counts from 0
    again at every call when they are left out), and a model that fills a cache it is given without
    returning it (RecurrentGemma) gets the cache its own ``prepare_inputs_for_generation`` makes (transformers
    4.x's Bamba: its hybrid cache class), else a ``DynamicCache`` for its config, kept from call to call.
    """
    params = _forward_params(getattr(model.forward, "__func__", model.forward))
    positions = {}
    steps = torch.arange(seen, seen + ids.shape[1], device=ids.device)
    if "position_ids" in params:
        positions = {"position_ids": steps[None].expand(ids.shape[0], -1)}
    if "cache_position" in params and seen and "cache_position" not in cache:  # as generate: a hybrid cache whose
        # first layer holds no keys (transformers 4.x's Bamba) cannot count the tokens seen
        positions["cache_position"] = steps
    out = model(input_ids=ids, use_cache=True, **cache, **positions)
    returned = _cache_of(out, seen + ids.shape[1])
    if returned or cache or "past_key_values" not in params:
        return out, returned or cache
    own = model.prepare_inputs_for_generation(ids, use_cache=True, cache_position=steps).get("past_key_values")
    cache = {"past_key_values": own if own is not None else DynamicCache(config=model.config)}  # the prefill again
    return model(input_ids=ids, use_cache=True, **cache, **positions), cache


@functools.lru_cache(maxsize=None)
def _forward_params(forward) -> frozenset[str]:
    """The keywords a forward takes: asked once per model class, not at every decoded token."""
    return frozenset(inspect.signature(forward).parameters)


# Where a forward returns its cache, by model family, as transformers' generate looks for it.
CACHE_NAMES = ("past_key_values", "cache_params", "state")  # default; Mamba in transformers 4.x; RWKV


def _cache_of(out, seen: int) -> dict:
    """The model's cache as the keywords its forward takes back after ``seen`` tokens: ``past_key_values``,
    Mamba's ``cache_params`` with the next position (transformers 4.x requires it) or RWKV's ``state``,
    as transformers' ``generate`` passes them. Without them the next step would decode without context."""
    name = next((n for n in CACHE_NAMES if getattr(out, n, None) is not None), None)
    if name == "cache_params":
        return {"cache_params": out.cache_params, "cache_position": torch.tensor([seen], device=out.logits.device)}
    return {name: getattr(out, name)} if name else {}


def encode_prompt(model, tokenizer, prompt: str, chat: bool = False) -> torch.Tensor:
    """``(1, length)`` prompt ids on the model's device.

    A ``chat`` prompt (text rendered by a chat template) gets no special tokens from the tokenizer: its ids are
    ``apply_chat_template(tokenize=True)``'s, the ids training used, whose template decides BOS. Raw text gets
    the tokenizer's own (a BOS where it adds one), as ``tokenizer(prompt)`` gives them to ``generate``.
    """
    device = next(model.parameters()).device
    # Raw text that starts with the BOS text must not get a second one from the tokenizer.
    has_bos = bool(tokenizer.bos_token) and prompt.startswith(tokenizer.bos_token)
    return tokenizer(prompt, return_tensors="pt", add_special_tokens=not (chat or has_bos)).input_ids.to(device)


def default_stop_ids(model, tokenizer) -> set[int]:
    """Ids that end a raw-text continuation: the tokenizer's EOS and every id of
    ``generation_config.eos_token_id`` (Llama 3 Instruct lists three), as ``transformers``' ``generate``."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else (int(i) for i in eos or ()))
    return ids


def stream_text(model, tokenizer, prompt: str, options: SamplingOptions | None = None,
                stop_ids: Iterable[int] | None = None, keep: frozenset[int] = frozenset(),
                stop_strings: Sequence[str] = (), chat: bool = False) -> Iterator[str]:
    """Yield the continuation of ``prompt`` (``chat``: rendered by a chat template, see :func:`encode_prompt`)
    as text pieces, as soon as they decode.

    The pieces join to exactly ``tokenizer.decode(tokens, skip_special_tokens=True)``
    (see :class:`qlora.infer.text_stream.TextStream`), but for the special tokens in ``keep``.
    A stop string ends the text before it (OpenAI's ``stop``, as ``qlora serve`` does).
    """
    from .text_stream import TextStream

    input_ids = encode_prompt(model, tokenizer, prompt, chat)
    if stop_ids is None:
        stop_ids = default_stop_ids(model, tokenizer)
    text = TextStream(tokenizer, stop_strings, keep=keep)
    for token in stream_tokens(model, input_ids, options, stop_ids):
        piece = text.push(token)
        if piece:
            yield piece
        if text.stopped:
            return
    rest = text.flush()
    if rest:
        yield rest


@torch.no_grad()
def generate_per_adapter(model, tokenizer, prompt: str, adapters: list[str | None],
                         options: SamplingOptions | None = None,
                         stop_ids: Iterable[int] | None = None, stop_strings: Sequence[str] = (),
                         chat: bool = False) -> list[str]:
    """Continue ``prompt`` (``chat``: as :func:`stream_text`) once per adapter in ONE batch: row ``i`` runs adapter
    ``adapters[i]`` (``None``: the base alone) and the 4-bit base is read once
    per step for all rows. Each row samples with its own generator seeded like a
    single run, so every row equals what that adapter produces alone (stop strings included).
    """
    from ..model.multi_adapter import adapter_rows
    from .text_stream import TextStream

    options = options or SamplingOptions()
    if stop_ids is None:
        stop_ids = default_stop_ids(model, tokenizer)
    stop = set(stop_ids)
    prompt_ids = encode_prompt(model, tokenizer, prompt, chat)
    device = prompt_ids.device
    rows = len(adapters)
    generators = [torch.Generator(device=device).manual_seed(options.seed)
                  if options.seed is not None and options.temperature > 0 else None for _ in adapters]
    penalties = [Penalties.of(options, prompt_ids[0]) for _ in adapters]
    texts = [TextStream(tokenizer, stop_strings) for _ in adapters]
    pieces: list[list[str]] = [[] for _ in adapters]
    done = [False] * rows
    model.eval()
    ids, cache, seen = prompt_ids.repeat(rows, 1), {}, 0
    with adapter_rows(model, adapters):
        for _ in range(options.max_new_tokens):
            out, cache = forward_cached(model, ids, cache, seen)
            seen += ids.shape[1]
            step = []
            for r in range(rows):
                token = texts[r].tokens[-1] if done[r] else next_token(out.logits[r, -1], options,
                                                                       generators[r], penalties[r])
                if not done[r]:
                    pieces[r].append(texts[r].push(token))
                    if penalties[r] is not None:
                        penalties[r].add(token)
                    done[r] = token in stop or texts[r].stopped
                step.append(token)
            if all(done):
                break
            ids = torch.tensor(step, device=device)[:, None]
    return ["".join(p) + text.flush() for p, text in zip(pieces, texts)]
