"""OpenAssistant's message trees (oasst1, oasst2) as conversations: each tree's top-ranked thread.

OpenAssistant publishes conversations as trees: an initial prompt, several replies to it, several
replies to each reply, the roles alternating between ``prompter`` and ``assistant``. The hub's
``OpenAssistant/oasst1``/``oasst2`` hold one message a row (``message_id``, ``parent_id``, ``role``,
``text``, ``rank``, ...); their ``*.trees.jsonl`` files one tree a row, each message's ``replies``
nested under the ``prompt``. Read row by row, the messages would train as unrelated texts.

Each tree becomes one conversation: from the prompt, the reply ranked best by the annotators (``rank``
0; unranked replies after ranked ones, then in file order) at every step, down to a leaf, and cut after
its last assistant message: the "highest-rated paths" that timdettmers/openassistant-guanaco, the QLoRA
paper's dataset, holds. Deleted messages and messages that failed review are left out, with what
hangs under them. A tree whose prompt has no usable reply gives no conversation.
"""

from __future__ import annotations

from typing import Any

from qlora.errors import UsageError
from qlora.train.data.sources import Record

ROLES = {"prompter": "user", "assistant": "assistant"}
_FLAT_KEYS = {"message_id", "parent_id", "role", "text"}


def is_message_tree(fields: dict[str, Any]) -> bool:
    """Whether a row is an OpenAssistant message (flat export) or a whole tree (nested export)."""
    prompt = fields.get("prompt")
    if isinstance(prompt, dict) and "replies" in prompt:
        return True
    return _FLAT_KEYS <= fields.keys() and fields.get("role") in ROLES


def top_threads(records: list[Record]) -> list[Record]:
    """One ``{"messages": [...]}`` record per tree: its top-ranked thread (see the module docstring).

    Raises:
        UsageError: a message with another role or without text (naming its row), or no tree with an answer.
    """
    roots, children = [], {}
    for r in records:
        if isinstance(r.fields.get("prompt"), dict):
            _add_nested(r.fields["prompt"], None, r.where, roots, children)
        else:
            _add(r.fields, r.fields.get("parent_id"), r.where, roots, children)
    threads = []
    for root, where in roots:
        path = [root]
        while children.get(path[-1]["message_id"]):
            ranked = sorted(enumerate(children[path[-1]["message_id"]]),
                            key=lambda item: (item[1].get("rank") is None, item[1].get("rank") or 0, item[0]))
            path.append(ranked[0][1])
        while path and path[-1]["role"] != "assistant":
            path.pop()
        if path:
            threads.append(Record({"messages": [{"role": ROLES[m["role"]], "content": m["text"]} for m in path]},
                                  f"{where} (the top-ranked thread of its message tree)"))
    if not threads:
        raise UsageError(f"{records[0].where}: these rows are OpenAssistant message trees, but no tree has an "
                         "initial prompt with an assistant reply (deleted and failed-review messages left out): "
                         "give whole trees (every message from the prompt down).")
    return threads


def _add(message: dict[str, Any], parent: Any, where: str, roots: list, children: dict) -> None:
    if message.get("deleted") is True or message.get("review_result") is False:
        return
    if message.get("message_id") is None:
        raise UsageError(f"{where}: a message of an OpenAssistant message tree has no \"message_id\".")
    if message.get("role") not in ROLES:
        raise UsageError(f"{where}: message {message.get('message_id')!r} has role {message.get('role')!r}; "
                         f"OpenAssistant's message trees have roles {', '.join(ROLES)}.")
    if not isinstance(message.get("text"), str) or not message["text"].strip():
        raise UsageError(f"{where}: message {message.get('message_id')!r} has no text (a non-empty string).")
    if parent is None:
        roots.append((message, where))
    else:
        children.setdefault(parent, []).append(message)


def _add_nested(message: dict[str, Any], parent: Any, where: str, roots: list, children: dict) -> None:
    if not isinstance(message, dict):
        raise UsageError(f"{where}: each message of a message tree is an object, got {type(message).__name__}.")
    _add(message, parent, where, roots, children)
    if message.get("deleted") is True or message.get("review_result") is False:
        return
    for reply in message.get("replies") or []:
        _add_nested(reply, message["message_id"], where, roots, children)
