"""OpenAssistant's message trees (oasst1/oasst2, flat or nested exports) train as conversations:
each tree's top-ranked thread, not its messages as unrelated texts."""

from __future__ import annotations

import json

import pytest

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.train.data import load_records, normalize


def _msg(mid, parent, role, text, rank=None, **extra):
    return {"message_id": mid, "parent_id": parent, "user_id": "u", "text": text, "role": role, "lang": "en",
            "review_count": 3, "review_result": True, "deleted": False, "rank": rank, "synthetic": False,
            "model_name": None, "message_tree_id": "t", "tree_state": "ready_for_export", **extra}


FLAT = [
    _msg("p1", None, "prompter", "What is the capital of France?"),
    _msg("a1", "p1", "assistant", "Lyon.", rank=1),
    _msg("a2", "p1", "assistant", "Paris.", rank=0),
    _msg("a3", "p1", "assistant", "Paris, of course.", deleted=True),
    _msg("p2", "a2", "prompter", "And of Italy?"),
    _msg("a4", "p2", "assistant", "Rome."),
    _msg("p3", "a4", "prompter", "Thanks!"),  # the thread ends with a prompter message: cut after Rome
    _msg("q1", None, "prompter", "Tell me a joke."),  # a prompt nobody answered: no conversation
    _msg("r1", None, "prompter", "Name a colour."),
    _msg("s1", "r1", "assistant", "Spam.", review_result=False),
    _msg("s2", "r1", "assistant", "Blue."),  # unranked, but the only usable reply
]
EXPECTED = [
    [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _nested(rows):
    by_parent = {}
    for r in rows:
        by_parent.setdefault(r["parent_id"], []).append(r)

    def tree(m):
        return {**m, "replies": [tree(c) for c in by_parent.get(m["message_id"], [])]}

    return [{"message_tree_id": r["message_id"], "tree_state": "ready_for_export", "prompt": tree(r)}
            for r in by_parent[None]]


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_each_tree_is_its_top_ranked_thread(tmp_path, layout):
    rows = FLAT if layout == "flat" else _nested(FLAT)
    examples = normalize(load_records(_write(tmp_path / "oasst.jsonl", rows)))
    assert [list(e.messages) for e in examples] == EXPECTED
    assert "top-ranked thread" in examples[0].where


def test_rows_in_any_order_and_bad_messages_named(tmp_path):
    examples = normalize(load_records(_write(tmp_path / "shuffled.jsonl", FLAT[::-1])))
    assert sorted(json.dumps(e.messages) for e in examples) == sorted(json.dumps(m) for m in EXPECTED)
    bad = _write(tmp_path / "bad.jsonl", [FLAT[0], _msg("x", "p1", "moderator", "hi")])
    with pytest.raises(UsageError, match=r"bad\.jsonl line 2: message 'x' has role 'moderator'"):
        normalize(load_records(bad))
    lonely = _write(tmp_path / "lonely.jsonl", [FLAT[0], FLAT[7]])
    with pytest.raises(UsageError, match="no tree has an initial prompt with an assistant reply"):
        normalize(load_records(lonely))


def test_cli_trains_one_example_per_tree(tmp_path, tiny_model_dir, capsys):
    data = _write(tmp_path / "oasst.jsonl", FLAT)
    out = tmp_path / "o"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out),
                 "--max-steps", "1", "--no-progress"]) == 0
    assert "data: 2 examples" in capsys.readouterr().out
