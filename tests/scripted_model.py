"""A real GPT-2 checkpoint whose greedy reply is a chosen token sequence (test helper).

GPT-2 adds a learned embedding of each position to the token's: with every block's output projections zero
(the blocks add nothing to the residual stream) and the token embeddings zero, the hidden state at position
``p`` is the position embedding alone, here the ``p``-th unit vector. Its layer norm keeps the largest
coordinate at ``p``, so an ``lm_head`` whose row for token ``t`` is 1 at the positions that must be followed by
``t`` (and 0 elsewhere) makes greedy decoding write ``script`` after a prompt of ``prompt_len`` tokens, whatever
the prompt says. The weights are exactly 0 and 1, which NF4 quantization keeps as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch


def build_scripted_model(out_dir: Path, tokenizer, prompt_len: int, script: Sequence[int],
                         positions: int = 128) -> Path:
    """Save a GPT-2 model and ``tokenizer`` to ``out_dir``; greedy decoding after ``prompt_len`` prompt tokens
    writes ``script`` (then whatever token has the first id, never reached when the reply stops or is cut)."""
    from transformers import GPT2LMHeadModel

    from qlora.model.tiny import tiny_config

    if prompt_len + len(script) > positions:
        raise ValueError(f"a prompt of {prompt_len} tokens and {len(script)} scripted ones pass {positions} positions")
    config = tiny_config("gpt2", vocab_size=len(tokenizer), hidden=positions, layers=1, heads=2,
                         max_positions=positions, intermediate=positions)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for block in model.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
        model.transformer.wte.weight.zero_()
        model.transformer.wpe.weight.copy_(torch.eye(positions))
        model.lm_head.weight.zero_()
        for k, token in enumerate(script):
            model.lm_head.weight[token, prompt_len - 1 + k] = 1.0  # the logits at position p choose token p + 1
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
