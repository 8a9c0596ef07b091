"""Quantize-on-load never holds the whole 16-bit model: peak RSS growth is bounded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

import qlora
from qlora.model.tiny import build_tiny_model

_CHILD = textwrap.dedent("""
    import json, sys, torch
    import qlora
    from qlora.nn import Linear4bit

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    # Import what loading imports, so the measured growth is the loading itself.
    import transformers, safetensors.torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    AutoTokenizer.from_pretrained(sys.argv[1])
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]))
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    before = rss("VmRSS")
    model, _ = qlora.load_model(sys.argv[1], quant="nf4", compute_dtype=torch.bfloat16, device="cpu")
    n4 = sum(isinstance(m, Linear4bit) for m in model.modules())
    print(json.dumps({"growth": rss("VmHWM") - before, "n4": n4}))
""")


def test_peak_rss_growth_below_half_the_16bit_model_plus_one_shard(tmp_path, tiny_tokenizer):
    out = build_tiny_model(tmp_path / "m", tokenizer=tiny_tokenizer, arch="llama", dtype=torch.bfloat16,
                           hidden=768, intermediate=2048, layers=8, heads=8, kv_heads=4)
    shards = sorted(out.glob("*.safetensors"))
    if len(shards) == 1:  # re-save in small shards so the model is many times one shard
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).save_pretrained(out, max_shard_size="8MB")
        shards[0].unlink()
        shards = sorted(out.glob("*.safetensors"))
    size16 = sum(f.stat().st_size for f in shards)
    biggest = max(f.stat().st_size for f in shards)
    assert len(shards) >= 4 and size16 >= 4 * biggest
    src = os.path.dirname(os.path.dirname(qlora.__file__))
    env = os.environ | {"PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", _CHILD, str(out)], capture_output=True, text=True, check=True, env=env)
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["n4"] == 8 * 7
    bound = size16 / 2 + biggest
    print(f"16-bit size {size16 / 2**20:.1f} MiB, largest shard {biggest / 2**20:.1f} MiB, "
          f"peak RSS growth {report['growth'] / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB")
    assert report["growth"] < bound


def test_a_model_whose_bulk_stays_16bit_says_so(tmp_path, tiny_tokenizer, tiny_model_dir, caplog):
    """RWKV's code rescales its attention.output and feed_forward.value weights in place, so they stay 16-bit:
    the load warns instead of leaving the user to find out from an out-of-memory error; a model quantized as
    usual loads without the warning."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("rwkv", vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2,
                                  attention_hidden_size=64, intermediate_size=256, context_length=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="qlora"):
        qlora.load_model(tmp_path, compute_dtype=torch.float32, device="cpu")
    assert "of this model's weights stay 16-bit (in Linear, RwkvSelfAttention, RwkvFeedForward" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="qlora"):
        qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    assert "stay 16-bit" not in caplog.text
