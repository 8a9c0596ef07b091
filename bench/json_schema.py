"""What enforcing a whole JSON Schema costs constrained decoding, per character.

Constrained decoding feeds each candidate token's text to the current
:class:`~qlora.infer.json_prefix.JsonPrefix` state (and keeps the chosen one's), so its cost
is the time of one ``feed`` of a few characters. For documents of several schemas (any JSON
object; a flat tool schema; pydantic models as ``client.chat.completions.parse`` sends them,
nested with lists of sub-models, Optional fields, enums and recursion) this measures, at
every 3-character step of a pretty-printed document, ``--candidates`` feeds of the next
3 characters from the current state (as the candidates of one decoding step), and the
one-time schema compile. No model: the automaton alone.

    PYTHONPATH=src python bench/json_schema.py
"""

from __future__ import annotations

import argparse
import enum
import json
import time
from typing import Literal, Optional

from harness import describe


def _documents():
    from openai.lib._pydantic import to_strict_json_schema
    from pydantic import BaseModel

    class Color(str, enum.Enum):
        red = "red"
        green = "green"

    class Step(BaseModel):
        explanation: str
        output: Optional[int]

    class Tree(BaseModel):
        label: str
        color: Color
        children: list["Tree"]

    class Report(BaseModel):
        steps: list[Step]
        tree: Tree
        mood: Literal["ok", "meh"]
        final: Optional[str]

    def tree(depth: int) -> Tree:
        return Tree(label=f"node {depth}", color=Color.red, children=[tree(depth - 1)] * 2 if depth else [])

    report = Report(steps=[Step(explanation="work it out step by step", output=i) for i in range(4)],
                    tree=tree(3), mood="ok", final=None)
    flat = {"type": "object", "additionalProperties": False, "required": ["city", "days", "unit"],
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "unit": {"enum": ["c", "f"]}}}
    weather = json.dumps({"city": "Paris, the capital of France", "days": 12, "unit": "c"}, indent=2)
    return [("any JSON object (json_object)", None, report.model_dump_json(indent=2)),
            ("flat tool schema", flat, weather),
            ("pydantic, nested + recursive (strict)", to_strict_json_schema(Report), report.model_dump_json(indent=2))]


def main() -> None:
    from qlora.infer.json_prefix import JsonPrefix
    from qlora.infer.json_schema import compile_schema

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=200, help="feeds per decoding step")
    args = parser.parse_args()
    print(describe("cpu", ("pydantic", "openai")))
    print("| schema | compile ms | document chars | µs per candidate feed (3 chars) | threads at most |")
    print("|---|---:|---:|---:|---:|")
    for name, schema, text in _documents():
        start = time.perf_counter()
        root = compile_schema(schema).root if schema is not None else None
        compile_ms = (time.perf_counter() - start) * 1e3
        state = JsonPrefix.start(root)
        feeds, most, start = 0, 1, time.perf_counter()
        for i in range(0, len(text), 3):
            piece = text[i:i + 3]
            for _ in range(args.candidates):
                state.feed(piece)
            feeds += args.candidates
            state = state.feed(piece)
            most = max(most, len(state.threads))
        per_feed = (time.perf_counter() - start) / feeds * 1e6
        assert state.complete
        print(f"| {name} | {compile_ms:.2f} | {len(text)} | {per_feed:.1f} | {most} |")


if __name__ == "__main__":
    main()
