"""Models ``qlora estimate`` knows by name without a config.json, apart from the estimate's torch code so that
the command's help can list them without importing torch."""

from __future__ import annotations

from typing import Any

# Known shapes: the config.json fields that decide the parameter count.
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=500000.0),
    "llama-3-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=500000.0),
    "llama-65b": dict(model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=22016,
                      num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=64,
                      tie_word_embeddings=False, max_position_embeddings=2048),
    "llama-33b": dict(model_type="llama", vocab_size=32000, hidden_size=6656, intermediate_size=17920,
                      num_hidden_layers=60, num_attention_heads=52, num_key_value_heads=52,
                      tie_word_embeddings=False, max_position_embeddings=2048),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       tie_word_embeddings=False, max_position_embeddings=32768, sliding_window=4096),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=1000000.0),
}
