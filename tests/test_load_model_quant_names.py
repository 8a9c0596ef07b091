"""load_model's quant takes the CLI's spellings: "none" is the 16-bit load that None is."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import qlora
from qlora.errors import UsageError
from qlora.nn import Linear4bit


def test_quant_none_string_loads_the_16bit_model(tiny_model_dir):
    model, tokenizer = qlora.load_model(tiny_model_dir, quant="none", compute_dtype=torch.float32, device="cpu")
    assert not any(isinstance(m, Linear4bit) for m in model.modules())
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_unknown_quant_is_refused_with_the_choices(tiny_model_dir):
    with pytest.raises(UsageError, match="nf4, fp4 or none") as err:
        qlora.load_model(tiny_model_dir, quant="int8")
    assert "'int8'" in str(err.value)
