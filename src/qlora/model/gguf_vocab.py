"""A transformers fast tokenizer as llama.cpp's GGUF tokenizer fields.

llama.cpp runs two tokenizer families, and its reader needs to be told which:

- ``gpt2``: byte-level BPE (GPT-2, Llama 3, Qwen): token strings in the byte-to-
  unicode alphabet, the merge list, and a *pre-tokenizer* name that selects
  llama.cpp's built-in split regex. The name is read off the pre-tokenizer's
  steps in ``tokenizer.json`` (all of them: digits split one by one before GPT-2's
  regex are StarCoder's rule, not GPT-2's); an unknown rule is refused rather than
  guessed, because a wrong pre-tokenizer silently changes every tokenization.
- ``llama``: SentencePiece-style BPE with byte fallback (Llama 2, Mistral,
  Gemma, Phi-3): ``▁`` for spaces, ``<0xNN>`` byte tokens, and a score per token
  that llama.cpp merges by (highest first). Scores are ``-rank`` of the merge
  that makes the token, so llama.cpp merges in exactly the order of the
  ``tokenizer.json`` merge list.

Added tokens are control tokens where the tokenizer marks them special or they are
spelled as one (``<|...|>``, DeepSeek's ``<｜...｜>``), else user-defined text with
``▁`` read as a space, as llama.cpp's converter types them; in a byte-level vocabulary one the
tokenizer matches in raw text (not normalized) is written as the text it decodes to (``ĊĊ`` as two
newlines), as the converter pre-normalizes it: llama.cpp matches and prints such tokens as raw text.

Special token ids, whether BOS/EOS are added, and the chat template come from
the tokenizer itself (``gguf.SpecialVocab``, llama.cpp's own reader, plus a
check of what encoding actually adds); an id the tokenizer does not name is
taken from the model's config, as llama.cpp's converter reads ``config.json``
after the tokenizer (Qwen's tokenizers name no BOS, their config does; without
it llama.cpp would take its default BOS, id 11, an ordinary token). ``generation_config.json`` may list more
ids that end a reply (Llama 3 Instruct, Hunyuan). llama.cpp stops on EOS, EOT, EOM
and on tokens it knows by name (``<|eot_id|>``, ``<|im_end|>``, ...); the first two
of the others become EOT and EOM (as llama.cpp's converter writes Hunyuan's), and
all of them go to ``tokenizer.ggml.eos_token_ids``, the list Ollama stops on.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError

# llama.cpp pre-tokenizer name for each split regex found in tokenizer.json.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_PRE_BY_REGEX = {
    _GPT2_REGEX: "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    # o200k (GPT-4o, gpt-oss): cased words with an optional contraction, numbers in threes
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "gpt-4o",
}

# llama.cpp pre-tokenizer name for each whole sequence of steps (:func:`_step_key`) that is not a split regex
# followed by the byte-level step (those are read off _PRE_BY_REGEX).
_PRE_BY_STEPS = {
    (("ByteLevel", True),): "gpt-2",  # GPT-2's regex inside the byte-level step
    # StarCoder, StarCoder 2, SmolLM: each digit alone, then GPT-2's regex
    (("Digits", True), ("ByteLevel", True)): "starcoder",
    # Falcon: punctuation runs, GPT-2's regex, then digits in threes
    (("Punctuation", "Contiguous"), ("ByteLevel", True), ("Digits", False),
     ("Split", "[0-9][0-9][0-9]", "Isolated", False)): "falcon",
}

# Token texts llama.cpp ends generation on by name whatever the file says (llama-vocab.cpp, its EOG list)
LLAMA_CPP_END_NAMES = frozenset({"<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
                                 "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>",
                                 "<end_of_utterance>"})

# gguf.TokenType values (kept numeric so this module imports without gguf)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class GGUFVocab:
    """Everything llama.cpp reads under ``tokenizer.ggml.*`` and ``tokenizer.chat_template``."""

    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad, ...
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None
    eos_ids: list[int] = field(default_factory=list)  # generation_config's ids that end a reply (Ollama's list)


def gguf_vocab(tokenizer, n_vocab: int, generation_eos: int | list[int] | None = None,
               config=None) -> GGUFVocab:
    """Read ``tokenizer`` (a transformers fast tokenizer) into GGUF fields.

    Args:
        n_vocab: rows of the model's embedding; ids the tokenizer lacks become
            unused ``[PAD<id>]`` tokens, as llama.cpp's converter writes them.
        generation_eos: ``generation_config.eos_token_id`` (one id or a list).
        config: the model's transformers config, whose ``<kind>_token_id`` fill the special ids the
            tokenizer does not name (its own, then its text config's, as the converter reads them).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError("GGUF export needs the model's fast tokenizer (tokenizer.json); this model has only a "
                         "slow one. Save it once with transformers (AutoTokenizer.from_pretrained(...)"
                         ".save_pretrained(DIR)) and export again.")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UsageError(f"GGUF export supports BPE tokenizers (byte-level or SentencePiece-style); this tokenizer "
                         f"is {model.get('type')}, which qlora cannot write for llama.cpp yet.")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id = {i: t for t, i in model["vocab"].items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    if max(by_id) >= n_vocab:
        raise UsageError(f"the tokenizer has ids up to {max(by_id)} but the model's embedding has only {n_vocab} "
                         f"rows; export the tokenizer the model was trained with.")

    spm = bool(model.get("byte_fallback"))
    tokens, types = [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            if not spm and not added[i].get("normalized", True):
                text = _pre_normalized(tokenizer, text)
            control = bool(added[i].get("special")) or _looks_special(text)
            tokens.append(text if control else text.replace("\u2581", " "))  # llama.cpp matches it in raw text
            types.append(CONTROL if control else USER_DEFINED)
        elif spm and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            tokens.append(text)
            types.append(BYTE)
        else:
            tokens.append(text)
            types.append(UNKNOWN if text == model.get("unk_token") else NORMAL)

    vocab = GGUFVocab(model="llama" if spm else "gpt2", pre="default" if spm else _pre_tokenizer(spec),
                      tokens=tokens, types=types)
    if spm:
        rank = {a + b: r for r, (a, b) in enumerate(m.split(" ", 1) for m in merges)}
        # Tokens no merge makes (single characters, specials) are never a merge result in HF's BPE;
        # the lowest score keeps llama.cpp from preferring them.
        vocab.scores = [-float(rank[t] + 1) if t in rank else (-1e9 if types[i] == NORMAL else 0.0)
                        for i, t in enumerate(tokens)]
        vocab.add_space_prefix = _adds_space_prefix(spec)
    else:
        vocab.merges = merges
    _special(tokenizer, vocab, n_vocab, config)
    _end_of_reply(vocab, generation_eos, n_vocab)
    return vocab


def _pre_normalized(tokenizer, text: str) -> str:
    """An added token that the tokenizer matches in raw text (not normalized), as the text it stands for: what
    decoding it gives (``ĊĊ`` is two newlines, ``Ġworld`` is `` world``), which llama.cpp matches in raw text and
    prints, as llama.cpp's converter writes a byte-level vocabulary's. Decoding that loses characters (a token
    spelt outside the byte alphabet, ``Größe``, decodes to replacement characters) keeps the token as spelt: that
    is the text the tokenizer matched in training, and replacement characters would match nothing."""
    decoded = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
    return text if decoded.count("\ufffd") > text.count("\ufffd") else decoded


def _looks_special(text: str) -> bool:
    """Whether llama.cpp's converter makes an added token a control token though the tokenizer does not mark it
    special, by its spelling (DeepSeek's ``<｜User｜>``, Command-R's ``<|START_OF_TURN_TOKEN|>``, Gemma's
    ``<unused0>`` and ``<mask>``): the runtime then neither reads it from a user's text nor prints it."""
    wrapped = any(text.startswith(a) and text.endswith(b)
                  for a, b in (("<|", "|>"), ("<｜", "｜>"), ("<unused", ">")))
    return wrapped or text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")


def _end_of_reply(vocab: GGUFVocab, generation_eos: int | list[int] | None, n_vocab: int) -> None:
    """Carry generation_config's end-of-reply ids: the first two llama.cpp would not stop on as EOT and EOM where
    the tokenizer names none, the whole list for Ollama."""
    ids = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
    ids = list(dict.fromkeys(int(i) for i in ids if 0 <= int(i) < n_vocab))
    eos = vocab.special_ids.get("eos")
    known = {vocab.special_ids.get(k) for k in ("eos", "eot", "eom")}
    extra = [i for i in ids if i not in known and vocab.tokens[i] not in LLAMA_CPP_END_NAMES]
    for kind in ("eot", "eom"):
        if kind not in vocab.special_ids and extra:
            vocab.special_ids[kind] = extra.pop(0)
    if len(ids) > 1 or (ids and ids[0] != eos):
        vocab.eos_ids = ids


def _pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name of the tokenizer's whole pre-tokenizer: every step counts (StarCoder's digits, split one by
    one before GPT-2's regex, are llama.cpp's ``starcoder``, not ``gpt-2``)."""
    steps = tuple(_step_key(step) for step in _steps(spec.get("pre_tokenizer")))
    if steps in _PRE_BY_STEPS:
        return _PRE_BY_STEPS[steps]
    if (len(steps) == 2 and steps[0][0] == "Split" and steps[0][2:] == ("Isolated", False)
            and steps[1] == ("ByteLevel", False) and steps[0][1] in _PRE_BY_REGEX):
        return _PRE_BY_REGEX[steps[0][1]]
    raise UsageError(
        "GGUF export does not recognize this tokenizer's pre-tokenizer (its split rule in tokenizer.json), so it "
        "cannot tell llama.cpp how to split text; byte-level BPE with the GPT-2, Llama 3, Qwen2, o200k (GPT-4o, "
        "gpt-oss), StarCoder (SmolLM) or Falcon rule and SentencePiece-style tokenizers are supported. Writing a guess would silently change "
        "tokenization.")


def _step_key(step: dict) -> tuple:
    """What a pre-tokenizer step does to the split, as :data:`_PRE_BY_STEPS` spells it."""
    kind = step.get("type")
    if kind == "ByteLevel":
        return kind, step.get("use_regex", True)
    if kind == "Digits":
        return kind, step.get("individual_digits", False)
    if kind == "Punctuation":
        return kind, step.get("behavior", "Isolated")
    if kind == "Split":
        return kind, step.get("pattern", {}).get("Regex"), step.get("behavior"), step.get("invert", False)
    return kind, json.dumps(step, sort_keys=True)


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer prepends ``▁`` to the text (SentencePiece's add_dummy_prefix)."""
    for step in _steps(spec.get("normalizer")):
        if step.get("type") == "Prepend" and step.get("prepend") == "\u2581":
            return True
    for step in _steps(spec.get("pre_tokenizer")):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return False


def _steps(node: dict | None) -> list[dict]:
    """The steps of a tokenizer.json normalizer/pre-tokenizer, Sequences flattened."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [s for n in node.get("normalizers") or node.get("pretokenizers") or [] for s in _steps(n)]
    return [node]


def _special(tokenizer, vocab: GGUFVocab, n_vocab: int, config=None) -> None:
    import gguf

    quiet = logging.getLogger("gguf.vocab")  # its post-processor remarks do not apply: BOS/EOS are checked below
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            special = gguf.SpecialVocab(Path(tmp), load_merges=False, n_vocab=n_vocab)
    finally:
        quiet.setLevel(level)
    vocab.special_ids = dict(special.special_token_ids)
    for kind in ("bos", "eos", "unk", "pad"):  # the tokenizer's own view wins over config guesses
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            vocab.special_ids[kind] = tid
    configs = [c for c in (config, config.get_text_config() if config is not None else None) if c is not None]
    for kind in special.special_token_types:
        tid = next((t for c in configs if isinstance(t := getattr(c, f"{kind}_token_id", None), int)), None)
        if kind not in vocab.special_ids and tid is not None and 0 <= tid < n_vocab:
            vocab.special_ids[kind] = tid
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    vocab.add_bos = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
    vocab.add_eos = tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]
    template = getattr(tokenizer, "chat_template", None)
    vocab.chat_template = template if isinstance(template, str) else special.chat_template
