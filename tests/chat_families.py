"""Real chat templates of released model families on local tokenizers (test data helpers).

The templates and each family's special tokens, BOS/EOS and ``add_bos_token`` are in
tests/data/chat_templates (origins in its SOURCES.md). ``family_tokenizer`` trains a small byte-level
BPE that carries those tokens, so ``apply_chat_template`` renders and tokenizes as the real one does.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "data" / "chat_templates"
FAMILIES = json.loads((DATA / "families.json").read_text())
DATE = "2026-01-31"

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
U1 = {"role": "user", "content": "What is two plus two?"}
A1 = {"role": "assistant", "content": "Four."}
U2 = {"role": "user", "content": "And three plus three?"}
A2 = {"role": "assistant", "content": "It is six.\n\nSix, that is."}
U3 = {"role": "user", "content": "Say 'Yes please' and nothing else."}
A3 = {"role": "assistant", "content": "Yes please"}
CONVERSATIONS = {
    "one turn": [U1, A1],
    "system": [SYSTEM, U1, A1],
    "system, two turns": [SYSTEM, U1, A1, U2, A2],
    "three turns": [U1, A1, U2, A2, U3, A3],
    "whitespace": [{"role": "user", "content": "  Hello there!\n"}, {"role": "assistant", "content": "\n  Hi. \n\n"}],
    "think": [U1, {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\nFour."},
              U2, {"role": "assistant", "content": "<think>Three and three.</think>Six."}],
    "ends with user": [U1, A1, U2],
}
CORPUS = [m["content"] for c in CONVERSATIONS.values() for m in c] * 3 + ["The capital of France is Paris.\n\n"] * 5
_TOKENIZERS: dict = {}
# The split rule of OpenAI's o200k encoding (GPT-4o, gpt-oss): tiktoken's o200k_base pat_str, which gpt-oss's
# tokenizer.json carries as its Split pre-tokenizer before a ByteLevel step without a regex of its own
O200K = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
         r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def family_tokenizer(name: str, split: str | None = None):
    """A local fast tokenizer with the family's special tokens, BOS/EOS settings and real template
    (``split``: a split regex before the byte-level step, as o200k tokenizers have; default GPT-2's)."""
    if (name, split) in _TOKENIZERS:
        return _TOKENIZERS[name, split]
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    info = FAMILIES[name]
    specials = [t for t in dict.fromkeys([info["bos_token"], info["eos_token"], info["pad_token"], "<unk>",
                                          *info["special_tokens"]]) if t]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if split is None else (
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if info["add_bos_token"]:
        bos = info["bos_token"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=info["bos_token"], eos_token=info["eos_token"],
                                   pad_token=info["pad_token"], unk_token="<unk>",
                                   additional_special_tokens=[t for t in info["special_tokens"] if t not in
                                                              (info["bos_token"], info["eos_token"])])
    fast.add_tokens(info["added_tokens"])
    fast.chat_template = (DATA / f"{name}.jinja").read_text()
    _TOKENIZERS[name, split] = fast
    return fast


def model_for(family: str, tmp_path):
    """A tiny Llama with the family's tokenizer and generation_config stop ids."""
    from transformers import GenerationConfig

    from qlora.model.tiny import build_tiny_model

    tok = family_tokenizer(family)
    out = build_tiny_model(tmp_path / f"model-{family}", tokenizer=tok, arch="llama")
    config = GenerationConfig.from_pretrained(out)
    config.eos_token_id = [tok.convert_tokens_to_ids(t) for t in FAMILIES[family]["generation_eos"]]
    config.save_pretrained(out)
    return out
