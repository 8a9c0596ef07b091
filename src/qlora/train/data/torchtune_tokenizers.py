"""How torchtune's model tokenizers write a conversation (``tokenize_messages``) and a text (``encode``), as pieces
(:mod:`qlora.chat.pieces`) that tokenize to torchtune's ids, each piece trained where torchtune's mask is
False (a message's masked flag covers its header, content and end tokens alike):

- ``llama3`` (``llama3_tokenizer``): ``<|begin_of_text|>``, then each message ``<|start_header_id|>ROLE
  <|end_header_id|>\\n\\n`` + its stripped content + ``<|eot_id|>``; the final ``<|end_of_text|>`` is never trained
  and is left out;
- ``qwen2`` (``qwen2_tokenizer``, ``qwen2_5_tokenizer``): no BOS; each message ``<|im_start|>ROLE\\n`` + its content
  as given + ``<|im_end|>\\n``, except a final assistant message, which ends with the EOS ``<|im_end|>`` alone,
  trained as the last message is; with a ``max_seq_len`` torchtune's truncation marks that EOS untrained, so it is
  left out;
- SentencePiece tokenizers (``mistral_tokenizer``, ``llama2_tokenizer``, ``gemma_tokenizer``:
  ``tokenize_messages_no_special_tokens``): BOS before each turn's first message, EOS after each assistant
  message, both with that message's mask; each text part encoded alone with its trailing spaces removed, and
  without its leading space when it continues a turn whose previous part did not end with a space; with a
  ``max_seq_len`` the ids are cut to it and the last one made the EOS (``truncate``), trained as the message cut
  (or, uncut, as the last message), so a conversation that does not end with an answer ends with an EOS too.
  Their prompt templates wrap the parts: Mistral's ``[INST] `` ... `` [/INST] `` (no system messages), Llama 2's with
  ``<<SYS>>\\n`` ... ``\\n<</SYS>>\\n\\n`` before each user message's content.
"""

from __future__ import annotations

from qlora.chat.pieces import Piece
from qlora.errors import UsageError

# torchtune's tokenizer builder -> its format
FAMILIES = {"llama3_tokenizer": "llama3", "qwen2_tokenizer": "qwen2", "qwen2_5_tokenizer": "qwen2",
            "mistral_tokenizer": "sentencepiece", "llama2_tokenizer": "sentencepiece",
            "gemma_tokenizer": "sentencepiece"}
# the builders' default prompt_template
DEFAULT_TEMPLATES = {"mistral_tokenizer": "mistral", "llama2_tokenizer": "llama2"}
TEMPLATES = {"torchtune.models.mistral.MistralChatTemplate": "mistral",
             "torchtune.models.llama2.Llama2ChatTemplate": "llama2"}
# BOS and EOS as each tokenizer names them (SentencePiece: the model's bos_id/eos_id pieces)
SPECIALS = {"llama3_tokenizer": ("<|begin_of_text|>", "<|end_of_text|>"), "qwen2_tokenizer": (None, "<|im_end|>"),
            "qwen2_5_tokenizer": (None, "<|im_end|>"), "mistral_tokenizer": ("<s>", "</s>"),
            "llama2_tokenizer": ("<s>", "</s>"), "gemma_tokenizer": ("<bos>", "<eos>")}
_WRAP = {"mistral": {"user": ("[INST] ", " [/INST] "), "assistant": ("", "")},
         "llama2": {"user": ("[INST] ", " [/INST] ")}}

Message = tuple[str, str, bool]  # role, content, trained


def conversation_pieces(builder: str, template: str | None, messages: list[Message], limit: int | None,
                        where: str) -> tuple[Piece, ...]:
    """The pieces of a conversation as ``builder``'s ``tokenize_messages`` writes it (``limit``: the tokenizer's
    ``max_seq_len``; Llama 3's and Qwen's cut is the run's seq_len, :func:`qlora.train.torchtune_config`).

    Raises:
        UsageError: a system message under Mistral's template, which torchtune refuses.
    """
    family = FAMILIES[builder]
    bos, eos = SPECIALS[builder]
    if family == "llama3":
        pieces = [Piece(bos, False, token=True)]
        for role, content, trained in messages:
            pieces += [Piece("<|start_header_id|>", trained, token=True), Piece(role, trained, specials=False),
                       Piece("<|end_header_id|>", trained, token=True), Piece("\n\n", trained, specials=False),
                       Piece(content.strip(), trained, specials=False), Piece("<|eot_id|>", trained, token=True)]
        return tuple(pieces)
    if family == "qwen2":
        pieces = []
        for k, (role, content, trained) in enumerate(messages):
            pieces += [Piece("<|im_start|>", trained, token=True), Piece(f"{role}\n", trained), Piece(content, trained)]
            if role != "assistant" or k != len(messages) - 1:
                pieces += [Piece("<|im_end|>", trained, token=True), Piece("\n", trained)]
        return tuple(pieces + ([] if limit is not None else [Piece(eos, messages[-1][2], token=True)]))
    templated = _templated(template, messages, where)
    return _sentencepiece(templated, bos, eos) + ((Piece(eos, templated[-1][2], token=True, limit=limit),)
                                                  if limit is not None and templated else ())


def text_pieces(builder: str, text: str, add_eos: bool) -> tuple[Piece, ...]:
    """``encode(text, add_bos=True, add_eos=add_eos)``, every token trained (``text_completion_dataset``)."""
    bos, eos = SPECIALS[builder]
    specials = FAMILIES[builder] == "qwen2"  # Qwen's encode reads the special tokens in a text; the others do not
    return tuple([Piece(bos, True, token=True)] * (bos is not None) + [Piece(text, True, specials=specials)]
                 + [Piece(eos, True, token=True)] * add_eos)


def _templated(template: str | None, messages: list[Message], where: str) -> list[tuple[str, list[str], bool]]:
    """``(role, text parts, trained)`` of each message after the prompt template (torchtune's PromptTemplate)."""
    if template is None:
        return [(role, [content], trained) for role, content, trained in messages]
    if template == "mistral" and any(role == "system" for role, _, _ in messages):
        raise UsageError(f"{where}: a system message: torchtune's MistralChatTemplate refuses them (\"System "
                         "prompts are not supported\"). Remove new_system_prompt and the rows' system messages, or "
                         "set the tokenizer's prompt_template: null.")
    system: list[str] = []
    out = []
    for role, content, trained in messages:
        if role == "system":  # Llama 2: put before the content of each user message that follows
            system = ["<<SYS>>\n", content, "\n<</SYS>>\n\n"]
            continue
        before, after = _WRAP[template].get(role, (None, None))
        parts = [before, *(system if template == "llama2" and role == "user" else []), content, after]
        out.append((role, [p for p in parts if p is not None], trained))
    return out


def _sentencepiece(messages: list[tuple[str, list[str], bool]], bos: str, eos: str) -> tuple[Piece, ...]:
    """torchtune's ``tokenize_messages_no_special_tokens``."""
    pieces: list[Piece] = []
    start_of_turn, prev_ends_with_space = True, False
    for role, parts, trained in messages:
        if start_of_turn:
            pieces.append(Piece(bos, trained, token=True))
        trim = not start_of_turn and not prev_ends_with_space
        pieces += [Piece(part.rstrip(" "), trained, after="\n" if trim else "", specials=False) for part in parts]
        prev_ends_with_space = parts[-1].endswith(" ")
        start_of_turn = role == "assistant"
        if start_of_turn:
            pieces.append(Piece(eos, trained, token=True))
    return tuple(pieces)
