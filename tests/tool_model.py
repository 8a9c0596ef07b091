"""A tiny model that really calls a tool (test helper): trained, not stubbed.

A Qwen2-architecture toy with Qwen 2.5's own chat template (it renders tools and writes calls as
``<tool_call>`` blocks) is trained for a few seconds, full weights, on one tool-calling conversation
tokenized by qlora's training data path, until it writes that conversation's call (for ASK) and final
answer (once given RESULT) greedily.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qlora.model.chat_format import ChatFormat
from qlora.model.tiny import build_tiny_model, train_tokenizer
from qlora.train.data import Record, normalize, tokenize_example

TEMPLATE = (Path(__file__).parent / "data" / "chat_templates" / "qwen2.5.jinja").read_text()
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = {"role": "user", "content": "Weather in Paris?"}
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
RESULT = '{"temp_c": 21}'
ANSWER = "It is 21 degrees in Paris."
TRAINED = [ASK, {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": CALL}]},
           {"role": "tool", "content": RESULT}, {"role": "assistant", "content": ANSWER}]


def build_tool_model(folder: Path) -> Path:
    """A tiny model trained to call get_weather for ASK and to answer ANSWER once given RESULT."""
    from transformers import AutoModelForCausalLM

    fmt = ChatFormat(TEMPLATE, origin="qwen2.5.jinja")
    scratch = train_tokenizer(["Weather"], vocab_size=300)
    text = fmt.render(scratch, TRAINED, tools=TOOLS)
    tokenizer = train_tokenizer([text] * 20, vocab_size=700)
    tokenizer.chat_template = TEMPLATE
    folder = build_tiny_model(folder, tokenizer=tokenizer, arch="qwen2",
                              max_positions=1024)
    example = normalize([Record({"messages": TRAINED, "tools": TOOLS}, "tools.jsonl line 1")])[0]
    tokenized = tokenize_example(example, tokenizer, fmt)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids, labels = torch.tensor([tokenized.input_ids]), torch.tensor([tokenized.labels])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(400):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if loss.item() < 1e-3:
            break
    model.save_pretrained(folder)
    return folder
