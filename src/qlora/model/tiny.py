"""Tiny models and tokenizers built locally, with no download.

``qlora demo`` and the test-suite need real transformers checkpoints on a
machine that cannot reach a model hub. These helpers train a small byte-level
BPE tokenizer on the given text and save a randomly initialized model of a
chosen architecture with ``save_pretrained``, so every loading path that users
take with real checkpoints is exercised unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from .shard_bar import shard_bar

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>")

# A ChatML template: the tokenizer's own chat_template for tiny models.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, add_bos: bool = True, chat_template: bool = True):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``texts``.

    Args:
        texts: training text.
        vocab_size: target vocabulary size including special tokens.
        add_bos: whether encoding prepends ``<|bos|>`` (as Llama tokenizers
            do); ``False`` behaves like Qwen/GPT-2 tokenizers.
        chat_template: give the tokenizer a ChatML ``chat_template``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    if add_bos:
        bos_id = tok.token_to_id("<|bos|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    return fast


# Special tokens of each SentencePiece-style family, in their vocabulary order (ids 0, 1, ...).
SPM_SPECIALS = {
    "llama": ("<unk>", "<s>", "</s>"),  # Llama 2, Mistral, Phi-3, TinyLlama: no pad token
    "gemma": ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>"),
    "unigram": ("<pad>", "</s>", "<unk>", "<s>"),  # a Unigram model (T5/ALBERT-style) with byte fallback
}


def train_sentencepiece_tokenizer(texts: Iterable[str], vocab_size: int = 512, family: str = "llama",
                                  chat_template: str | None = None):
    """A SentencePiece-style fast tokenizer trained on ``texts``: ``▁`` for spaces, ``<0xNN>`` byte fallback.

    Real checkpoints of Llama 2, Mistral, Gemma, Phi-3 and TinyLlama ship such a tokenizer (converted from
    their ``tokenizer.model``); here it is trained with the ``tokenizers`` library and wrapped as
    transformers wraps theirs, so code that only ever saw byte-level BPE meets its quirks: a leading
    ``▁`` that decoding strips, characters outside the vocabulary spelled as several byte tokens, and
    (Llama) no pad token.

    Args:
        family: ``"llama"`` (``LlamaTokenizer``: ``<s>``/``</s>``, BOS added, no pad), ``"gemma"``
            (``GemmaTokenizer``: ``<bos>``/``<eos>``/``<pad>``, ``<start_of_turn>``/``<end_of_turn>``)
            or ``"unigram"`` (a Unigram model with a Metaspace pre-tokenizer, BOS not added).
        chat_template: the tokenizer's ``chat_template`` (none by default, as base models have).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GemmaTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

    if family not in SPM_SPECIALS:
        raise ValueError(f"unknown SentencePiece family {family!r}; choose from {', '.join(SPM_SPECIALS)}")
    specials = list(SPM_SPECIALS[family])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    texts = list(texts)
    trainer_tok = Tokenizer(models.BPE() if family != "unigram" else models.Unigram())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    n_learned = max(vocab_size - len(specials) - len(byte_tokens), 32)
    if family == "unigram":
        trainer_tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=n_learned, show_progress=False))
        scores = json.loads(trainer_tok.to_str())["model"]["vocab"]
        vocab = [(t, 0.0) for t in specials + byte_tokens] + [(t, s) for t, s in scores if t not in specials]
        tok = Tokenizer(models.Unigram(vocab, unk_id=specials.index("<unk>"), byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="\u2581", prepend_scheme="first"),
                                         decoders.ByteFallback(), decoders.Fuse()])
        tok.add_special_tokens(specials)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                       bos_token="<s>")
    else:
        trainer_tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=n_learned, show_progress=False))
        spec = json.loads(trainer_tok.to_str())["model"]
        learned = sorted(spec["vocab"], key=spec["vocab"].get)
        vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + byte_tokens + learned))}
        merges = [tuple(m) if not isinstance(m, str) else tuple(m.split(" ", 1)) for m in spec["merges"]]
        kind = LlamaTokenizer if family == "llama" else GemmaTokenizer
        if issubclass(kind, PreTrainedTokenizerFast):  # transformers 5: the class builds its pipeline from BPE
            fast = kind(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
        else:  # transformers 4.x: that class is the slow SentencePiece one; its fast twin wraps the same pipeline
            fast = _spm_fast(family, vocab, merges)
        if family == "gemma":
            fast.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def _spm_fast(family: str, vocab: dict[str, int], merges: list[tuple[str, str]]):
    """The fast Llama or Gemma tokenizer for ``vocab`` and ``merges`` with the pipeline transformers 5's own
    classes build (BPE with byte fallback; Llama: a ``▁`` prepended to the first word, stripped when decoding;
    Gemma: spaces as ``▁``, kept), for a transformers (4.x) whose class of that name needs sentencepiece."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import GemmaTokenizerFast, LlamaTokenizerFast

    llama = family == "llama"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None if llama else "<unk>", fuse_unk=True,
                               byte_fallback=True))
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if llama:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)])
        return LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  add_bos_token=True, add_eos_token=False)
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence(steps)
    return GemmaTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                              pad_token="<pad>", mask_token="<mask>", add_bos_token=True, add_eos_token=False)


def tiny_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate: int = 128, max_positions: int = 512, **extra):
    """A transformers config of ``arch`` at toy size (random weights follow)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if arch == "gpt2":
        return tf.GPT2Config(**{**common, **dict(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions,
                                                 n_inner=intermediate), **extra})
    llama_like = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=intermediate,
                      max_position_embeddings=max_positions, **common)
    per_arch = {  # arch -> (config class, its own defaults); ``extra`` overrides any of them
        "llama": (tf.LlamaConfig, {}),
        "mistral": (tf.MistralConfig, dict(sliding_window=None)),
        "qwen2": (tf.Qwen2Config, {}),
        "qwen3": (tf.Qwen3Config, dict(head_dim=hidden // heads)),
        "gemma2": (tf.Gemma2Config, dict(head_dim=hidden // heads)),
        "gemma3": (tf.Gemma3TextConfig, dict(head_dim=hidden // heads)),
        "phi3": (tf.Phi3Config, {}),
    }
    if arch in per_arch:
        cls, defaults = per_arch[arch]
        return cls(**{**llama_like, **defaults, **extra})
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")


def build_tiny_model(
    out_dir: str | Path,
    tokenizer=None,
    arch: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    texts: Iterable[str] | None = None,
    **config_overrides,
) -> Path:
    """Save a random-initialized ``arch`` model and its tokenizer to ``out_dir``.

    Either pass a tokenizer or ``texts`` to train one on. ``vocab_size`` (embedding rows) defaults to
    the tokenizer's length; a larger one pads the embedding as many real checkpoints do. Returns ``out_dir``.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if tokenizer is None:
        tokenizer = train_tokenizer(texts or _DEFAULT_TEXT)
    config = tiny_config(arch, **{"vocab_size": len(tokenizer), **config_overrides})
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with shard_bar(sum(t.nbytes for t in model.state_dict().values())):
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


_DEFAULT_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "QLoRA fine-tunes a 4-bit quantized model with low-rank adapters.",
    "Question: what is the capital of France? Answer: Paris.",
    "def add(a, b):\n    return a + b\n",
    "Large language models learn from text; adapters learn from little.",
] * 20
