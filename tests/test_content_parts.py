"""Which chat templates read a message's content as a list of parts: vLLM's content-format rule (a loop over a
message's content), checked on released families' real templates (tests/data/chat_templates)."""

from __future__ import annotations

import pytest

from chat_families import DATA

from qlora.infer.content_parts import reads_parts

PARTS = ["gemma-3", "llama-4", "qwen2.5-vl", "mistral-small-3.2", "glm-4.5", "kimi-k2"]
STRING = ["llama-3.1", "qwen2.5", "qwen3", "mistral-small-3", "kimi-k2-thinking", "phi-4", "gpt-oss"]


@pytest.mark.parametrize("family", PARTS + STRING)
def test_a_template_reads_parts_where_it_loops_over_a_content(family):
    assert reads_parts((DATA / f"{family}.jinja").read_text()) == (family in PARTS)


@pytest.mark.parametrize("template, parts", [
    ("{% for m in messages %}{% for p in m['content'] %}{{ p.text }}{% endfor %}{% endfor %}", True),
    ("{% set turns = messages[1:] %}{% for m in turns | reverse %}{% for p in m.content | list %}{{ p }}"
     "{% endfor %}{% endfor %}", True),
    ("{% for m in messages %}{% generation %}{% for p in m.content %}{{ p }}{% endfor %}{% endgeneration %}"
     "{% endfor %}", True),
    ("{% macro show(content) %}{% for p in content %}{{ p.text }}{% endfor %}{% endmacro %}", True),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", False),
    ("{% for m in messages %}{% for k in m['tool_calls'] %}{{ k }}{% endfor %}{% endfor %}", False),
    ("{% for m in messages %}{{ m.content", False),  # not valid Jinja: fails where it is rendered
])
def test_the_loops_that_count(template, parts):
    assert reads_parts(template) == parts
