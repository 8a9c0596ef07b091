"""torchtune's dataset builders (``dataset: {_component_: torchtune.datasets...}``) as declared datasets.

Each builder turns a row into messages as torchtune's message transforms do: ``alpaca_dataset`` (and
``alpaca_cleaned_dataset``) fills the alpaca prompt (its preamble, ``### Instruction:``, ``### Input:``,
``### Response:``) as the user turn and ``output`` as the answer; ``instruct_dataset`` takes ``input`` and
``output`` (renamed by ``column_map``) as they are; ``chat_dataset`` reads ``conversation_column`` in its
``conversation_style`` (openai: role/content; sharegpt: from/value with human/gpt); ``new_system_prompt``
replaces any system message. ``text_completion_dataset`` is a plain text trained whole.

The messages are then written one of two ways (``render``):

- ``llama3``: as torchtune's Llama 3 tokenizer writes them, so a run trains the tokens it trains: each message
  ``<|start_header_id|>ROLE<|end_header_id|>\\n\\n`` + its stripped content + ``<|eot_id|>``, the header of a
  trained turn trained with it, system turns never. That is a plain prompt-completion row (the untrained
  messages, then the trained ones); a row whose trained turns are not one final run (several assistant turns
  with the user turns masked) has no such form and is refused, saying what to do;
- ``messages``: qlora's chat rows, written by the model's chat template (the run's ``--template``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qlora.errors import UsageError
from qlora.train.data.declared import DeclaredDataset

BUILDERS = ("alpaca_dataset", "alpaca_cleaned_dataset", "instruct_dataset", "chat_dataset", "text_completion_dataset")
HUB_SOURCES = {"alpaca_dataset": "tatsu-lab/alpaca", "alpaca_cleaned_dataset": "yahma/alpaca-cleaned"}
# torchtune's AlpacaToMessages prompt, with and without an input
_ALPACA = ("Below is an instruction that describes a task, paired with an input that provides further context. "
           "Write a response that appropriately completes the request.\n\n"
           "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
           "Below is an instruction that describes a task. Write a response that appropriately completes the request."
           "\n\n### Instruction:\n{instruction}\n\n### Response:\n")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


@dataclass(frozen=True)
class TorchtuneDataset(DeclaredDataset):
    """One torchtune dataset builder with its arguments (torchtune's defaults filled in)."""

    builder: str = "alpaca_dataset"
    columns: dict[str, str] = field(default_factory=dict)  # torchtune's column name -> the dataset's
    style: str = ""  # chat_dataset's conversation_style
    train_on_input: bool = False
    system_prompt: str | None = None  # new_system_prompt
    render: str = "llama3"  # llama3: as torchtune's Llama 3 tokenizer; messages: qlora's chat rows
    add_eos: bool = True  # text_completion_dataset

    def required_columns(self) -> tuple[str, ...]:
        wanted = {"alpaca": ("instruction", "output"), "instruct": ("input", "output"), "chat": ("conversations",),
                  "text_completion": ("text",)}[self.builder.removesuffix("_dataset").replace("alpaca_cleaned",
                                                                                               "alpaca")]
        return tuple(self.columns.get(c, c) for c in wanted)

    def rebuild(self, fields: dict[str, Any], where: str) -> dict[str, Any]:
        if self.builder == "text_completion_dataset":
            text = fields.get(self.columns.get("text", "text"))
            if not isinstance(text, str):
                raise UsageError(f"{where}: column {self.columns.get('text', 'text')!r} must be a string.")
            return {"text": text}
        messages = self._messages(fields, where)
        if self.render == "messages":
            return {"messages": [{"role": role, "content": content} for role, content, _ in messages]}
        return _llama3_row(messages, where)

    def _messages(self, fields: dict[str, Any], where: str) -> list[tuple[str, str, bool]]:
        """``(role, content, trained)`` of the row's messages, as torchtune's transform and masking set them."""
        col = self.columns.get
        if self.builder in ("alpaca_dataset", "alpaca_cleaned_dataset"):
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

    def _conversation(self, raw: Any, where: str) -> list[tuple[str, Any]]:
        if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
            raise UsageError(f"{where}: column {self.columns.get('conversations', 'conversations')!r} must be a list "
                             "of messages (objects).")
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


def _llama3_row(messages: list[tuple[str, str, bool]], where: str) -> dict[str, Any]:
    """The messages as torchtune's Llama 3 tokenizer writes them: an untrained prompt, then a trained completion
    (its BOS is the checkpoint tokenizer's own; its final EOS is masked there, the ``<|eot_id|>`` before it ends
    the text here)."""
    parts = [(f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>", trained)
             for role, content, trained in messages]
    first = next((k for k, (_, trained) in enumerate(parts) if trained), len(parts))
    if first == len(parts):
        return {"text": "", "prompt": ""}  # nothing trained: skipped as an empty row
    if not all(trained for _, trained in parts[first:]):
        raise UsageError(f"{where}: torchtune trains this conversation's assistant turns each (with their headers) "
                         "and masks the user turns between them; qlora trains one final run of a row's tokens in "
                         "torchtune's format. Set the dataset's train_on_input: true, or give --template tokenizer "
                         "to train every assistant turn in the model's own chat template.")
    return {"prompt": "".join(p for p, _ in parts[:first]), "completion": "".join(p for p, _ in parts[first:])}


def torchtune_dataset(spec: dict[str, Any]) -> TorchtuneDataset:
    """The dataset of an entry written by :func:`qlora.train.torchtune_config` (``{"torchtune": {...}}``)."""
    return TorchtuneDataset(**spec)
