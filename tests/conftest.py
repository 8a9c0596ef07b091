"""Shared fixtures: tiny tokenizers and models built locally (no hub)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from qlora.model.tiny import train_tokenizer

    return train_tokenizer(_TEXT, vocab_size=400)


QWEN_TEMPLATE = (Path(__file__).parent / "data" / "chat_templates" / "qwen2.5.jinja").read_text()


@pytest.fixture(scope="session")
def qwen_tokenizer():
    """A tokenizer trained with Qwen 2.5's real chat template (data in chat format)."""
    from qlora.model.tiny import train_tokenizer

    tokenizer = train_tokenizer(_TEXT + [QWEN_TEMPLATE] * 5, vocab_size=1000)
    tokenizer.chat_template = QWEN_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def tool_model_dir(tmp_path_factory):
    """A tiny model trained to call a tool (tests/tool_model.py)."""
    from tool_model import build_tool_model

    return build_tool_model(tmp_path_factory.mktemp("tool-model"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved random Llama-architecture model (fp32) with its tokenizer."""
    from qlora.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer=tiny_tokenizer, arch="llama")


@pytest.fixture(scope="session")
def sampled_model_dir(tmp_path_factory, tiny_model_dir):
    """``tiny_model_dir`` with a generation_config.json that sets how to sample it, as Qwen3's and Gemma 3's do:
    top-k 1 (its draws are the greedy tokens, whatever the seed) and a 7-token limit."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("tiny-sampled") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(do_sample=True, temperature=0.8, top_k=1, max_new_tokens=7)
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is two plus two? Answer: four.",
    "def add(a, b):\n    return a + b\n",
    "A paged optimizer moves its state to CPU memory when the GPU is full.",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there!<|im_end|>\n",
] * 20
