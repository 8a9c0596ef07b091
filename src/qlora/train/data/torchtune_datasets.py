"""torchtune's dataset builders (``dataset: {_component_: torchtune.datasets...}``) as declared datasets.

Each builder turns a row into messages as torchtune's message transforms do: ``alpaca_dataset`` (and
``alpaca_cleaned_dataset``) fills the alpaca prompt (its preamble, ``### Instruction:``, ``### Input:``,
``### Response:``) as the user turn and ``output`` as the answer; ``instruct_dataset`` takes ``input`` and
``output`` (renamed by ``column_map``) as they are; ``chat_dataset`` reads ``conversation_column`` in its
``conversation_style`` (openai: role/content; sharegpt: from/value with human/gpt); ``new_system_prompt``
replaces any system message. ``text_completion_dataset`` is a plain text trained whole.

The preference builders (lora_dpo's) give each row two conversations: ``stack_exchange_paired_dataset`` the
``prompt`` as a user turn followed by the ``chosen`` or the ``rejected`` answer (its default column_map: question,
response_j, response_k); ``preference_dataset`` the ``chosen`` and ``rejected`` columns' openai conversations as
they are (``new_system_prompt`` replacing their system messages). Each is written alone, as torchtune's
PreferenceDataset tokenizes them, and the pair's prompt is their shared start
(:mod:`qlora.train.data.preference`).

The rows are then written one of two ways (``render``):

- a torchtune tokenizer builder's name (``llama3_tokenizer``, ``qwen2_5_tokenizer``, ``mistral_tokenizer``, ...):
  as that tokenizer writes them (:mod:`qlora.train.data.torchtune_tokenizers`), its prompt template included, so a
  run trains the tokens torchtune trains;
- ``messages``: qlora's chat rows, written by the model's chat template (the run's ``--template``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qlora.errors import UsageError
from qlora.train.data.declared import DeclaredDataset
from qlora.train.data.torchtune_tokenizers import conversation_pieces, text_pieces

PREFERENCE_BUILDERS = ("stack_exchange_paired_dataset", "preference_dataset")
BUILDERS = ("alpaca_dataset", "alpaca_cleaned_dataset", "instruct_dataset", "chat_dataset", "text_completion_dataset",
            *PREFERENCE_BUILDERS)
HUB_SOURCES = {"alpaca_dataset": "tatsu-lab/alpaca", "alpaca_cleaned_dataset": "yahma/alpaca-cleaned",
               "stack_exchange_paired_dataset": "lvwerra/stack-exchange-paired"}
# torchtune's AlpacaToMessages prompt, with and without an input
_ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
           "Write a response that appropriately completes the request.\n\n"
           "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
           "Below is an instruction that describes a task. Write a response that appropriately completes the request."
           "\n\n### Instruction:\n{instruction}\n\n### Response:\n")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
# the columns each builder reads, by torchtune's names for them (column_map renames them)
_COLUMNS = {"alpaca_dataset": ("instruction", "output"), "alpaca_cleaned_dataset": ("instruction", "output"),
            "instruct_dataset": ("input", "output"), "chat_dataset": ("conversations",),
            "text_completion_dataset": ("text",), "stack_exchange_paired_dataset": ("prompt", "chosen", "rejected"),
            "preference_dataset": ("chosen", "rejected")}


@dataclass(frozen=True)
class TorchtuneDataset(DeclaredDataset):
    """One torchtune dataset builder with its arguments (torchtune's defaults filled in)."""

    builder: str = "alpaca_dataset"
    columns: dict[str, str] = field(default_factory=dict)  # torchtune's column name -> the dataset's
    style: str = ""  # chat_dataset's conversation_style
    train_on_input: bool = False
    system_prompt: str | None = None  # new_system_prompt
    render: str = "llama3_tokenizer"  # a torchtune tokenizer builder, or messages: qlora's chat rows
    prompt_template: str | None = None  # the tokenizer's: mistral, llama2 or none
    max_seq_len: int | None = None  # the tokenizer's
    add_eos: bool = True  # text_completion_dataset

    def required_columns(self) -> tuple[str, ...]:
        return tuple(self.columns.get(c, c) for c in _COLUMNS[self.builder])

    def rebuild(self, fields: dict[str, Any], where: str) -> dict[str, Any]:
        if self.builder == "text_completion_dataset":
            text = fields.get(self.columns.get("text", "text"))
            if not isinstance(text, str):
                raise UsageError(f"{where}: column {self.columns.get('text', 'text')!r} must be a string.")
            return {"text": text} if self.render == "messages" else {
                "pieces": text_pieces(self.render, text, self.add_eos)}
        if self.builder in PREFERENCE_BUILDERS:
            return {key: self._written(self._messages(fields, where, key), where) for key in ("chosen", "rejected")}
        return {"messages" if self.render == "messages" else "pieces": self._written(self._messages(fields, where),
                                                                                      where)}

    def _written(self, messages: list[tuple[str, str, bool]], where: str) -> Any:
        """A conversation as the run writes it: qlora's messages (``--template``), or the tokenizer's pieces."""
        if self.render == "messages":
            return [{"role": role, "content": content} for role, content, _ in messages]
        return conversation_pieces(self.render, self.prompt_template, messages, self.max_seq_len, where)

    def _messages(self, fields: dict[str, Any], where: str, answer: str = "") -> list[tuple[str, str, bool]]:
        """``(role, content, trained)`` of the row's messages, as torchtune's transform and masking set them
        (``answer``: a preference row's chosen or rejected conversation)."""
        col = self.columns.get
        if self.builder == "stack_exchange_paired_dataset":
            turns = [("user", fields.get(col("prompt", "prompt"))), ("assistant", fields.get(col(answer, answer)))]
        elif self.builder == "preference_dataset":
            turns = self._conversation(fields.get(col(answer, answer)), where, answer)
        elif self.builder in ("alpaca_dataset", "alpaca_cleaned_dataset"):
            given = fields.get(col("input", "input"))
            prompt = (_ALPACA[0].format(instruction=fields.get(col("instruction", "instruction")), input=given)
                      if given else _ALPACA[1].format(instruction=fields.get(col("instruction", "instruction"))))
            turns = [("user", prompt), ("assistant", fields.get(col("output", "output")))]
        elif self.builder == "instruct_dataset":
            turns = [("user", fields.get(col("input", "input"))), ("assistant", fields.get(col("output", "output")))]
        else:
            turns = self._conversation(fields.get(col("conversations", "conversations")), where)
        if self.system_prompt is not None:
            turns = [("system", self.system_prompt)] + [t for t in turns if t[0] != "system"]
        for role, content in turns:
            if not isinstance(content, str):
                raise UsageError(f"{where}: the {role} turn must be a string, got {content!r}.")
        return [(role, content, role != "system" and (self.train_on_input or role == "assistant"))
                for role, content in turns]

    def _conversation(self, raw: Any, where: str, column: str = "conversations") -> list[tuple[str, Any]]:
        if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
            raise UsageError(f"{where}: column {self.columns.get(column, column)!r} must be a list of messages "
                             "(objects).")
        if self.style == "sharegpt":
            turns = [(_SHAREGPT_ROLES.get(m.get("from")), m.get("value")) for m in raw]
        else:
            turns = [(m.get("role"), m.get("content")) for m in raw]
        for k, (role, _) in enumerate(turns):
            if role not in ("system", "user", "assistant"):
                raise UsageError(f"{where}, message {k}: role {raw[k].get('from', raw[k].get('role'))!r}: torchtune's "
                                 f"{self.style} conversations hold system, user and assistant turns "
                                 f"({', '.join(_SHAREGPT_ROLES) if self.style == 'sharegpt' else 'role'}).")
        return turns


def torchtune_dataset(spec: dict[str, Any]) -> TorchtuneDataset:
    """The dataset of an entry written by :func:`qlora.train.torchtune_config` (``{"torchtune": {...}}``)."""
    return TorchtuneDataset(**spec)
