"""Which chat templates read a message's content as a list of parts: vLLM's content-format rule (a loop over a
message's content), checked on released families' real templates (tests/data/chat_templates)."""

from __future__ import annotations

import pytest

from chat_families import DATA

from qlora.chat.content_parts import reads_parts

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


# llava-hf/llava-1.5-7b-hf's chat template (its chat_template.json): images first, then texts, read only as parts
LLAVA_15 = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', "
    "'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


@pytest.mark.parametrize("family", PARTS + ["gemma-4", "qwen3.5"])
def test_a_template_testing_for_a_string_content_reads_strings(family):
    from qlora.chat.content_parts import reads_only_parts

    assert not reads_only_parts((DATA / f"{family}.jinja").read_text())


@pytest.mark.parametrize("template", ["llava-1.5", "smolvlm", "llava"])
def test_a_string_content_reaches_a_template_reading_only_parts_as_vllm_gives_it(template, tiny_tokenizer):
    """vLLM gives a template that loops over contents every content as parts (a string as one text part); LLaVA's
    and SmolVLM's templates loop over a string's characters and printed no text: 'USER: ASSISTANT:'."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from image_models import LLAVA_TEMPLATE, SMOLVLM_TEMPLATE
    from qlora.chat.content_parts import reads_only_parts
    from qlora.infer.messages import Message
    from qlora.infer.template import render_chat

    text = {"llava-1.5": LLAVA_15, "smolvlm": SMOLVLM_TEMPLATE, "llava": LLAVA_TEMPLATE}[template]
    assert reads_only_parts(text)
    messages = [Message("system", "Be brief."), Message("user", "Name a colour."), Message("assistant", "Blue."),
                Message("user", "Another one?")]
    vllm = [{"role": m.role, "content": [{"type": "text", "text": m.content}]} for m in messages]
    expected = render_jinja_template(conversations=[vllm], chat_template=text, add_generation_prompt=True)[0][0]
    saved = tiny_tokenizer.chat_template
    tiny_tokenizer.chat_template = text
    try:
        assert render_chat(tiny_tokenizer, messages) == expected
    finally:
        tiny_tokenizer.chat_template = saved
    assert "Another one?" in expected


def test_a_text_only_row_trains_on_a_template_reading_only_parts_as_inference_renders_it(tiny_tokenizer):
    """Training renders a text row as inference now prompts it: a string content as one text part for LLaVA's
    template, whose rendering of a string printed no text (the answer could not be located: refused as Unlocated)."""
    import copy

    from transformers.utils.chat_template_utils import render_jinja_template

    from qlora.infer.messages import Message
    from qlora.infer.template import render_chat
    from qlora.train.data import Record, normalize, resolve_chat_format, tokenize_dataset

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = LLAVA_15
    row = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}
    [example], _ = tokenize_dataset(normalize([Record(row, "data.jsonl line 1")], "auto", ""), tokenizer,
                                    resolve_chat_format(tokenizer, "auto"), "assistant", 128)
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in row["messages"]]
    rendered = render_jinja_template(conversations=[parts], chat_template=LLAVA_15)[0][0]
    expected = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert example.input_ids[:len(expected)] == expected
    assert tokenizer.decode([t for t in example.labels if t != -100]) == f"Blue. {tokenizer.eos_token}"
    assert rendered.startswith(render_chat(tokenizer, [Message("user", "Name a colour.")]))  # the prompt it answers
