"""The Ollama Modelfile: its TEMPLATE reproduces the model's own Jinja chat template."""

from __future__ import annotations

import copy
import re

import pytest

from qlora.model.modelfile import chat_format, go_template, modelfile_text

# The chat templates of the families qlora exports, as their tokenizers ship them (abridged to the chat part).
TEMPLATES = {
    "llama3": "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
              "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    "gemma": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
             "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
             "{{ raise_exception('Conversation roles must alternate') }}{% endif %}{% if (message['role'] == "
             "'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
             "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}",
    "phi3": "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
            "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
            "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
            "{% endif %}",
}
SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>",
            "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
]


@pytest.fixture
def tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *SPECIALS]})
    return tok


def render_go(template: str, messages: list[dict]) -> str:
    """Evaluate the Go template qlora writes (its only constructs) for Ollama's ``.Messages``."""
    head, body = template.split("{{ range $i, $_ := .Messages }}", 1)
    branches = dict(re.findall(r'\{\{ (?:else )?if eq \.Role "(\w+)" \}\}(.*?)(?=\{\{ else if|\{\{ end \}\})',
                               body, re.S))
    generation = re.search(r'\(ne \.Role "assistant"\) \}\}(.*?)\{\{ end \}\}\{\{ end \}\}$', body, re.S).group(1)
    out = head
    for i, m in enumerate(messages):
        if m["role"] in branches:
            out += branches[m["role"]].replace("{{ .Content }}", m["content"])
        if i == len(messages) - 1 and m["role"] != "assistant":
            out += generation
    return out.replace('{{ "{{" }}', "{{")


@pytest.mark.parametrize("family", ["chatml", *TEMPLATES])
def test_go_template_renders_what_the_jinja_template_renders(tokenizer, family):
    if family != "chatml":
        tokenizer.chat_template = TEMPLATES[family]
    fmt = chat_format(tokenizer)
    assert fmt is not None
    template = go_template(fmt)
    for messages in CONVERSATIONS:
        if family == "gemma" and messages[0]["role"] == "system":
            continue  # Gemma's template refuses system messages
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_go(template, messages) == expected
    assert ("system" in fmt.prefix) == (family != "gemma")


def test_chatml_modelfile(tokenizer):
    text, notes = modelfile_text("model-f16.gguf", tokenizer, add_bos=True)
    assert notes == []
    assert text == (
        'FROM ./model-f16.gguf\n\nTEMPLATE """{{ range $i, $_ := .Messages }}'
        '{{ if eq .Role "system" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
        '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n{{ end }}'
        '{{ if and (eq (len (slice $.Messages $i)) 1) (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}'
        '{{ end }}"""\n\nPARAMETER stop "<|eos|>"\nPARAMETER stop "<|im_end|>"\n')


def test_bos_the_runtime_adds_is_not_written_twice(tokenizer):
    tokenizer.chat_template = TEMPLATES["llama3"]
    with_bos, _ = modelfile_text("m.gguf", tokenizer, add_bos=True)
    without, _ = modelfile_text("m.gguf", tokenizer, add_bos=False)
    assert 'TEMPLATE """{{ range' in with_bos and 'TEMPLATE """<|bos|>{{ range' in without
    assert 'PARAMETER stop "<|eot_id|>"' in with_bos


def test_a_template_without_per_message_form_is_not_guessed(tokenizer):
    tokenizer.chat_template = ("{% for m in messages %}Turn {{ loop.index }} ({{ m['role'] }}): {{ m['content'] }}\n"
                               "{% endfor %}{% if add_generation_prompt %}Turn {{ messages|length + 1 }}:"
                               "{% endif %}")
    assert chat_format(tokenizer) is None
    text, notes = modelfile_text("m.gguf", tokenizer, add_bos=True)
    assert not any(line.startswith("TEMPLATE") for line in text.splitlines())
    assert notes and text.startswith("# no TEMPLATE written")
    assert 'PARAMETER stop "<|eos|>"' in text
