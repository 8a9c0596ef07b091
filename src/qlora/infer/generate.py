"""Streamed text generation with a KV cache.

A small explicit loop instead of ``model.generate``: each step runs the model on
the newest token only (the cache holds the past; the whole sequence for a model whose
``prepare_inputs_for_generation`` asks for it), picks the next token, and
yields it at once, so a chat shows words as they are made. Greedy decoding
(temperature 0) gives exactly the tokens of ``model.generate(do_sample=False)``, with
``repetition_penalty`` too, and with the token rules of the model's generation config
(:mod:`qlora.infer.model_rules`: forced EOS at the length limit, suppressed tokens...).

The next token is chosen as transformers' ``generate`` chooses it: logit bias and penalties on
the raw logits (:mod:`qlora.infer.penalties`), then temperature, top-k, top-p, min-p and typical-p, in the
order of its ``LogitsProcessorList`` (``GenerationMixin._get_logits_processor``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from transformers import DynamicCache, GenerationMixin

from ..chat.prefix_lm import prompt_types
from ..errors import UsageError
from ..model.position_limit import position_room
from .model_rules import ModelRules
from .penalties import Penalties
from .sampling_options import SamplingOptions, model_defaults

# Where a forward returns its cache, by model family, as transformers' generate looks for it: ``cache`` from
# transformers 5.24 on (the older names stay as deprecated aliases there), ``past_key_values`` before, Mamba's
# ``cache_params`` before 5.24, RWKV's ``state``.
CACHE_NAMES = ("cache", "past_key_values", "cache_params", "state")


def returned_cache(out) -> tuple[str, object] | tuple[None, None]:
    """The field a forward's output returns its cache in, and the cache (``(None, None)`` for none). Read by
    field name, not attribute: transformers 5.24's outputs answer the old names too, with a deprecation warning."""
    for name in CACHE_NAMES:
        value = out.get(name) if isinstance(out, Mapping) else getattr(out, name, None)
        if value is not None:
            return name, value
    return None, None


def cache_keyword(model) -> str:
    """The keyword ``model``'s forward takes its key/value cache by: ``cache`` from transformers 5.24 on (which
    still renames ``past_key_values``, warning each process once), ``past_key_values`` before."""
    params = _forward_params(getattr(model.forward, "__func__", model.forward))
    return "cache" if "cache" in params else "past_key_values"


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
    divided by the temperature, then top-k, top-p, min-p and typical-p, as transformers' warpers in this order."""
    logits = logits.float() / options.temperature
    if 0 < options.top_k < logits.shape[-1]:
        kth = torch.topk(logits, options.top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if options.top_p < 1.0:  # as TopPLogitsWarper: from the least likely up, so that equal logits go as there
        sorted_logits, order = torch.sort(logits, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - options.top_p
        drop[..., -1:] = False  # the most likely token stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if options.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < options.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    if options.typical_p < 1.0:
        logits = _typical(logits, options.typical_p)
    return logits.softmax(-1)


def _typical(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Typical sampling as transformers' ``TypicalLogitsWarper``: the tokens sorted by how far their surprise
    (-log p) lies from the entropy, kept up to the first whose cumulative probability reaches ``mass``."""
    logp = logits.log_softmax(-1)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
    distance, order = torch.sort((-logp - entropy).abs(), descending=False)
    cumulative = logits.gather(-1, order).softmax(-1).cumsum(-1)
    last = (cumulative < mass).sum(-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
    drop = distance > distance.gather(-1, last)
    drop[..., :1] = False  # the most typical token stays
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


@torch.inference_mode()
def stream_tokens(model, input_ids: torch.Tensor, options: SamplingOptions | None = None,
                  stop_ids: Iterable[int] = (), media: dict | None = None) -> Iterator[int]:
    """Yield new token ids one by one; a stop id is yielded and then ends the stream.

    Args:
        model: a transformers causal LM (4-bit/LoRA modules included).
        input_ids: the prompt, shape ``(1, length)``.
        options: sampling options (default: those the model's generation config sets, else
            :class:`SamplingOptions`'s).
        stop_ids: token ids that end generation (EOS, end of turn).
        media: a vision-language model's image tensors for the prompt (:mod:`qlora.infer.images`), given to
            the prefill only.
    """
    options = (options or SamplingOptions(**model_defaults(model))).new_tokens(input_ids.shape[1])
    _decodable(model, step_inputs(model))  # refused before the first token, not at the second
    stop = set(stop_ids)
    device = input_ids.device
    generator = None
    if options.seed is not None and options.temperature > 0:
        generator = torch.Generator(device=device).manual_seed(options.seed)
    model.eval()
    penalties = Penalties.of(options, input_ids[0], ModelRules.of(model))
    ids, cache = input_ids, {}
    for _ in range(position_room(model, input_ids.shape[1], options.max_new_tokens)):
        out, cache = forward_cached(model, ids, cache, ids.shape[1] - 1 if cache else 0,
                                    None if media is None else {} if cache else media)
        token = next_token(out.logits[0, -1], options, generator, penalties)
        if penalties is not None:
            penalties.add(token)
        yield token
        if token in stop:
            return
        ids = torch.cat([ids, torch.tensor([[token]], device=device)], 1)


def forward_cached(model, ids: torch.Tensor, cache: dict, seen: int, media: dict | None = None, *,
                   scored: bool = False, answer: int = 0):
    """Run the tokens of ``ids`` (the whole sequence so far, ``(rows, length)``) after the first ``seen``, which
    ``cache`` (keywords from the previous call, ``{}`` at first) holds; returns the model's output and the cache
    keywords for the next call.

    As transformers' ``generate``: the model is given the new tokens only, or the whole sequence where its
    ``prepare_inputs_for_generation`` gives that (CPM-Ant's forward cuts the cached part off itself); positions
    are passed to a forward that takes them (Bamba counts from 0 again at every call when they are left out),
    and the new tokens' cache positions after the prefill (a hybrid cache whose first layer holds no keys,
    transformers 4.x's Bamba, cannot count the tokens seen); a model that fills a cache it is given without
    returning it (RecurrentGemma) gets the cache its own ``prepare_inputs_for_generation`` makes (4.x's Bamba:
    its hybrid cache class), else a ``DynamicCache`` for its config, kept from call to call; and one that keeps
    no cache qlora can pass back (Reformer's ``past_buckets_states``) runs the whole sequence at every call, as
    ``generate`` runs it.

    ``media`` (a prompt with images): the image tensors of the prefill, ``{}`` at the steps after it. The prefill's
    position ids are left to the model; the steps after it get those of its ``prepare_inputs_for_generation``, as
    ``generate`` gives them (Qwen2-VL adds the rope deltas of its images' positions, kept from the prefill), and
    their cache positions (without which transformers 4.x's Qwen2-VL family counts each step from 0).

    A prefix-LM's prefill (PaliGemma's) gets :func:`~qlora.chat.prefix_lm.prompt_types` in place of its
    processor's token types: the prompt a prefix, its last ``answer`` tokens (a reply's forced start) causal, all of it
    causal where the prompt is ``scored`` (its logprobs asked), as the batcher's batched prefill gives them.
    """
    params = _forward_params(getattr(model.forward, "__func__", model.forward))
    length, whole = ids.shape[1], ids
    if cache and seen and media is None and restarts_cache(model, ids, cache, seen):
        cache, seen = {}, 0  # the whole sequence again, into a new cache
    if cache and seen and not reads_whole_sequence(model, ids, cache, seen):  # no cache: the whole sequence again
        ids = ids[:, seen:]
    positions = {}
    steps = torch.arange(seen, length, device=ids.device)  # the cache positions of the tokens not yet cached
    if "position_ids" in params and media is None and takes_positions(model):
        positions = {"position_ids": torch.arange(length - ids.shape[1], length, device=ids.device)[None]
                     .expand(ids.shape[0], -1)}
    elif "position_ids" in params and seen and cache:  # a step after a prefill with images
        positions = _generation_positions(model, whole, cache, steps)
    if "cache_position" in params and seen and "cache_position" not in cache:
        positions["cache_position"] = steps
    if not seen:  # a prefix-LM's token types (PaliGemma's), in place of its processor's (all the prompt a prefix)
        types = prompt_types(model, ids, scored, answer)
        positions |= types
        media = None if media is None else {k: v for k, v in media.items() if k not in types}
    out = model(input_ids=ids, use_cache=True, **cache, **positions, **(media or {}))
    returned = _cache_of(out, length, params)
    if returned or cache:
        return out, returned or cache
    keyword = cache_keyword(model)  # a prefill that returned no cache: asked once per generation, not per step
    if keyword not in params:
        return out, {}
    own = model.prepare_inputs_for_generation(ids, use_cache=True, cache_position=steps).get(keyword)
    cache = {keyword: own if own is not None else DynamicCache(config=model.config)}  # the prefill again
    return model(input_ids=ids, use_cache=True, **cache, **positions, **(media or {})), cache


def restarts_cache(model, ids: torch.Tensor, cache: dict, seen: int) -> bool:
    """Whether ``generate`` drops ``cache`` (holding the first ``seen`` tokens of ``ids``) at the step that runs the
    rest of ``ids``, and runs the whole sequence again into a new cache: Phi-3's (PhiMoE's, Phi-4-multimodal's)
    ``prepare_inputs_for_generation`` does so once the sequence passes ``original_max_position_embeddings``, where
    its long-context rope factors take over, so that every key is rotated by them. Asked of that function only at
    that step, with the real cache."""
    limit = getattr(model.config, "original_max_position_embeddings", None)
    keyword = next((name for name in CACHE_NAMES if name in cache), None)
    if not isinstance(limit, int) or not seen <= limit < ids.shape[1] or keyword is None:
        return False
    step = ({"next_sequence_length": ids.shape[1] - seen} if "next_sequence_length" in _forward_params(_BASE_PREPARE)
            else {"cache_position": torch.arange(seen, ids.shape[1], device=ids.device)})  # transformers 4.x
    try:
        inputs = model.prepare_inputs_for_generation(ids, use_cache=True, attention_mask=torch.ones_like(ids),
                                                     **cache, **step)
    except Exception:  # noqa: BLE001 - a preparation that wants more than ids and a cache: the cache is kept
        return False
    return isinstance(inputs, dict) and inputs.get(keyword) is None


def takes_positions(model) -> bool:
    """Whether ``generate`` gives ``model``'s forward position ids: its ``prepare_inputs_for_generation`` keeps those
    it is given. Kosmos-2.5's drops them: its embedding layer counts positions from the padding index and the cache
    length itself, so ids counted from 0 shift every position. Asked once per model class."""
    kind = type(model)
    if kind not in _POSITIONS:
        ids = torch.tensor([[1, 2]], device=next(model.parameters()).device)
        try:
            inputs = model.prepare_inputs_for_generation(ids, attention_mask=torch.ones_like(ids), use_cache=False,
                                                         position_ids=torch.arange(2, device=ids.device)[None])
            _POSITIONS[kind] = not isinstance(inputs, dict) or inputs.get("position_ids") is not None
        except Exception:  # noqa: BLE001 - a preparation that wants more than ids: positions given, as before
            _POSITIONS[kind] = True
    return _POSITIONS[kind]


_POSITIONS: dict[type, bool] = {}  # model class -> whether generate gives its forward position ids


def _generation_positions(model, ids: torch.Tensor, cache: dict, steps: torch.Tensor) -> dict:
    """The position ids ``model.prepare_inputs_for_generation`` gives the tokens at cache positions ``steps`` of
    ``ids`` (the whole sequence, nothing padded) after a prefill with images, as ``generate`` passes them: the
    Qwen2-VL family adds there the rope deltas of the prompt's images (transformers 4.56's Qwen2.5-VL forward fails
    computing them itself); ``{}`` where it gives none (the forward counts from the cache positions)."""
    prepared = model.prepare_inputs_for_generation(ids, attention_mask=torch.ones_like(ids), cache_position=steps,
                                                   use_cache=True, **cache)
    position_ids = prepared.get("position_ids")
    return {} if position_ids is None else {"position_ids": position_ids}


def reads_whole_sequence(model, ids: torch.Tensor, cache: dict, seen: int) -> bool:
    """Whether ``model`` takes the whole sequence ``ids`` at a step after ``cache`` (holding the first ``seen``
    tokens), not only the new tokens: asked of its own ``prepare_inputs_for_generation`` (what ``generate``
    feeds it) with that real cache, once per model class.

    Raises:
        UsageError: it feeds the forward something else (see :func:`decode_problem`).
    """
    return _decodable(model, _step_kind(model, ids, cache, seen)) == "whole"


def _decodable(model, kind: str) -> str:
    """``kind`` (see :func:`step_inputs`) when qlora's loops can decode such a model; else a UsageError saying why."""
    if kind not in ("new", "whole"):
        raise UsageError(f"qlora cannot decode {type(model).__name__}: {kind}")
    return kind


def decode_problem(model) -> str | None:
    """Why qlora's decoding loops cannot give ``model.generate``'s tokens, or None (see :func:`step_inputs`)."""
    kind = step_inputs(model)
    return None if kind in ("new", "whole") else kind


def step_inputs(model) -> str:
    """What ``model`` takes at a step after its cache, as its ``prepare_inputs_for_generation`` feeds it in
    ``generate``: ``"new"`` (the new tokens), ``"whole"`` (the whole sequence: CPM-Ant's forward cuts the cached
    part off itself), or why qlora cannot decode it (XLM appends a mask token to the ids, XLNet a dummy token
    with permutation masks: the commands refuse such a model before decoding, not decode wrong text).
    Asked once per model class, with one small forward."""
    if type(model) not in _KINDS:
        vocab = model.get_input_embeddings().num_embeddings
        device = next(model.parameters()).device
        ids = torch.tensor([[(7 * i + 3) % vocab for i in range(5)]], device=device)
        with torch.inference_mode():
            try:
                _, cache = forward_cached(model, ids[:, :4], {}, 0)
            except Exception as exc:  # noqa: BLE001 - re-raised unless the same forward runs without a cache
                _KINDS[type(model)] = _cache_failure(model, ids, exc)
                return _KINDS[type(model)]
        _step_kind(model, ids, cache, 4 if cache else 0)
    return _KINDS[type(model)]


def _cache_failure(model, ids: torch.Tensor, exc: Exception) -> str:
    """Why qlora cannot decode a model whose forward raised ``exc`` when asked to keep a cache, if the same
    forward runs without one (transformers 5's BLT builds its cache from a config without
    ``num_hidden_layers``; its own ``generate`` fails the same way); else ``exc`` itself, a real failure."""
    try:
        model(input_ids=ids[:, :4], use_cache=False)
    except Exception:  # noqa: BLE001 - the model fails without a cache too: the first error is the one to show
        raise exc from None
    said = " ".join(str(exc).split())[:200]
    return (f"its forward fails when asked to keep a cache ({type(exc).__name__}: {said}), as transformers' own "
            "generate does unless given use_cache=False, though it runs without one")


_KINDS: dict[type, str] = {}  # model class -> "new", "whole" or why neither
# What qlora's loops pass to a forward (or leave to its defaults), as prepare_inputs_for_generation names them.
_OWN_INPUTS = frozenset({"input_ids", "attention_mask", "position_ids", "cache_position", "use_cache", "return_dict",
                         "logits_to_keep", "num_logits_to_keep", "inputs_embeds", *CACHE_NAMES})


def _step_kind(model, ids: torch.Tensor, cache: dict, seen: int) -> str:
    kind = type(model)
    if kind not in _KINDS:
        _KINDS[kind] = _probe_step(model, ids, cache, seen)
    return _KINDS[kind]


def _probe_step(model, ids: torch.Tensor, cache: dict, seen: int) -> str:
    """``prepare_inputs_for_generation``'s inputs for the step that runs ``ids`` after ``cache``: "new" (the
    tokens after the ``seen`` cached ones), "whole" (CPM-Ant's forward cuts the cached part off itself), or why
    they are neither."""
    prepare = getattr(model, "prepare_inputs_for_generation", None)
    if prepare is None:
        return "new"
    new = ids.shape[1] - seen
    step = ({"next_sequence_length": new} if "next_sequence_length" in _forward_params(_BASE_PREPARE)
            else {"cache_position": torch.arange(seen, ids.shape[1], device=ids.device)})  # transformers 4.x
    try:
        inputs = prepare(ids, use_cache=True, attention_mask=torch.ones_like(ids), **cache, **step)
    except Exception:  # noqa: BLE001 - a preparation that wants more than ids and a cache: the usual inputs
        return "new"
    fed = inputs.get("input_ids") if isinstance(inputs, dict) else None
    if not isinstance(fed, torch.Tensor):
        return "new"
    extra = sorted(k for k, v in inputs.items() if isinstance(v, torch.Tensor) and k not in _OWN_INPUTS)
    if fed.shape != ids[:, -fed.shape[-1]:].shape or not torch.equal(fed, ids[:, -fed.shape[-1]:]):
        return ("its prepare_inputs_for_generation feeds the forward other token ids than the text so far "
                f"({fed.shape[-1]} ids for {ids.shape[1]} tokens), which qlora's decoding does not reproduce")
    if extra:
        return (f"its prepare_inputs_for_generation also feeds the forward {', '.join(extra)}, which qlora's "
                "decoding does not make")
    if fed.shape[-1] == new:
        return "new"
    return "whole" if fed.shape[-1] == ids.shape[1] else (
        f"its prepare_inputs_for_generation feeds the forward the last {fed.shape[-1]} of {ids.shape[1]} tokens "
        f"after a cache of {seen}, which qlora's decoding does not reproduce")


_BASE_PREPARE = GenerationMixin.prepare_inputs_for_generation


@functools.lru_cache(maxsize=None)
def _forward_params(forward) -> frozenset[str]:
    """The keywords a forward takes: asked once per model class, not at every decoded token."""
    return frozenset(inspect.signature(forward).parameters)


def _cache_of(out, seen: int, params: frozenset[str]) -> dict:
    """The model's cache as the keywords its forward (taking ``params``) takes back after ``seen`` tokens:
    ``cache`` (transformers 5.24 on), ``past_key_values``, Mamba's ``cache_params`` with the next position
    (transformers 4.x requires it) or RWKV's ``state``, as transformers' ``generate`` passes them. Without them the
    next step would decode without context: 5.24's Mamba, given ``past_key_values``, ignores it."""
    name, value = returned_cache(out)
    if name is None:
        return {}
    keyword = name if name in params else next((n for n in CACHE_NAMES if n in params), name)
    if keyword == "cache_params":
        return {"cache_params": value, "cache_position": torch.tensor([seen], device=out.logits.device)}
    return {keyword: value}


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
                stop_strings: Sequence[str] = (), chat: bool = False, images: Sequence = (),
                processor=None) -> Iterator[str]:
    """Yield the continuation of ``prompt`` (``chat``: rendered by a chat template, see :func:`encode_prompt`)
    as text pieces, as soon as they decode.

    ``images`` (ImageRefs, placed by the rendered prompt's image placeholders) go through ``processor``, the
    model's (:func:`qlora.infer.images.encode_with_images`).

    The pieces join to exactly ``tokenizer.decode(tokens, skip_special_tokens=True)``
    (see :class:`qlora.infer.text_stream.TextStream`), but for the special tokens in ``keep``; raw text's
    continuation is decoded after the prompt's last tokens, so that its first word keeps its leading space
    (:func:`~qlora.infer.text_stream.prompt_context`).
    A stop string ends the text before it (OpenAI's ``stop``, as ``qlora serve`` does).
    """
    from .text_stream import TextStream

    input_ids, media = _encoded(model, tokenizer, prompt, chat, images, processor)
    if stop_ids is None:
        stop_ids = default_stop_ids(model, tokenizer)
    text = TextStream(tokenizer, stop_strings, keep=keep, context=_context(tokenizer, input_ids, chat))
    for token in stream_tokens(model, input_ids, options, stop_ids, media):
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
                         chat: bool = False, images: Sequence = (), processor=None,
                         keep: frozenset[int] = frozenset()) -> list[str]:
    """Continue ``prompt`` (``chat``, ``images``, ``keep``: as :func:`stream_text`) once per adapter in ONE batch: row ``i`` runs adapter
    ``adapters[i]`` (``None``: the base alone) and the 4-bit base is read once
    per step for all rows. Each row samples with its own generator seeded like a
    single run, so every row equals what that adapter produces alone (stop strings included).
    """
    from ..model.multi_adapter import adapter_rows
    from .text_stream import TextStream

    options = options or SamplingOptions(**model_defaults(model))
    if stop_ids is None:
        stop_ids = default_stop_ids(model, tokenizer)
    stop = set(stop_ids)
    prompt_ids, media = _encoded(model, tokenizer, prompt, chat, images, processor)
    options = options.new_tokens(prompt_ids.shape[1])
    device = prompt_ids.device
    rows = len(adapters)
    if media is not None:
        from .images import media_rows

        media = media_rows(media, rows, prompt_ids.shape[1])
    generators = [torch.Generator(device=device).manual_seed(options.seed)
                  if options.seed is not None and options.temperature > 0 else None for _ in adapters]
    rules = ModelRules.of(model)
    penalties = [Penalties.of(options, prompt_ids[0], rules) for _ in adapters]
    context = _context(tokenizer, prompt_ids, chat)  # one prompt: one context for every adapter's text
    texts = [TextStream(tokenizer, stop_strings, keep=keep, context=context) for _ in adapters]
    pieces: list[list[str]] = [[] for _ in adapters]
    done = [False] * rows
    model.eval()
    ids, cache = prompt_ids.repeat(rows, 1), {}
    with adapter_rows(model, adapters):
        for _ in range(position_room(model, prompt_ids.shape[1], options.max_new_tokens)):
            out, cache = forward_cached(model, ids, cache, ids.shape[1] - 1 if cache else 0,
                                        None if media is None else {} if cache else media)
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
            ids = torch.cat([ids, torch.tensor(step, device=device)[:, None]], 1)
    return ["".join(p) + text.flush() for p, text in zip(pieces, texts)]


def _context(tokenizer, input_ids: torch.Tensor, chat: bool) -> tuple[int, ...]:
    """The prompt tokens a raw continuation is decoded after (none for a chat reply, which starts a turn)."""
    from .text_stream import prompt_context

    return () if chat else prompt_context(tokenizer, input_ids[0].tolist())


def _encoded(model, tokenizer, prompt: str, chat: bool, images: Sequence, processor) -> tuple[torch.Tensor, dict | None]:
    """The prompt's ids, and its image tensors (None without images)."""
    if not images:
        return encode_prompt(model, tokenizer, prompt, chat), None
    from .images import encode_with_images

    return encode_with_images(processor, model, prompt, images)
