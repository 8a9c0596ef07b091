"""Released models ``qlora estimate`` knows by their hub ids without the hub or a config.json, apart from the
estimate's torch code so that the command's help and ``--list-models`` need no torch.

Each row holds the config.json fields of a released model that decide its parameter count and memory, copied from
a public copy of that file (named above the rows; tests/test_known_shapes.py checks each total against the number
its model card states). A hub id is matched case-insensitively, with or without its organisation, and with a
variant word (``-Instruct``, ``-it``, ``-chat``, ``-hf``, ``-Base``, ``-pt``, ``-SFT``, ``-DPO``) left out: a
post-trained model has its base's shape. DeepSeek-R1 distills are named on the row of the model they were distilled
into, as DeepSeek-R1's README lists them (not Distill-Qwen-1.5B and -7B: their bases are Qwen2.5-Math models). Another
organisation's copy is not matched: a fine-tune may have changed the vocabulary.
"""

from __future__ import annotations

import copy
import re
from typing import Any

# the words a hub id adds to its base model's name for a post-trained (or plainly named base) variant of one shape
_VARIANT = re.compile(r"-(instruct|it|chat|base|hf|pt|sft|dpo)(?=-|$)")

# hub ids (space-separated; the first is shown) | model_type | vocab | hidden | intermediate | layers | heads |
# key-value heads | tied embeddings | context | other config.json fields
_ROWS: tuple[tuple[str, str, int, int, int, int, int, int, bool, int, dict[str, Any]], ...] = (
    # mlc-ai/mlc-llm @ 01ced331a9e155c5ba4e7625b027a51bee611450 : python/mlc_llm/model/model_preset.py
    # (MODEL_PRESETS llama2_7b, llama2_13b, llama2_70b, llama3_8b, llama3_70b, llama3_1_8b, llama3_1_70b, llama3_2_1b,
    # llama3_2_3b, mistral_7b, mistral_7b_v03, Mixtral-8x7B-v0.1, phi-3, phi-3_5, gemma2_2b, gemma2_9b, gemma2_27b,
    # gemma3_1b_it, qwen2_0_5b, qwen2_1_5b, qwen2_7b, qwen2.5_3b, qwen3_0.6b, qwen3_1.7b, qwen3_4b, qwen3_8b,
    # smollm2_135m, smollm2_360m, smollm2_1_7b; some commented out there, copied from the release all the same;
    # Llama 2's context is the paper's 4096, where the presets set 2048 for MLC's own use).
    # Qwen2.5-0.5B and -1.5B have the shapes of Qwen2-0.5B and -1.5B: layers, heads, tied embeddings and parameter
    # counts on their model cards (ZHUI/paddlenlp_model_readme @ ffc26950 : Qwen/Qwen2.5-0.5B/index.md), hidden and
    # intermediate widths in the experiment registry of code search file id 69678342600 (huggingface.co/Qwen/
    # Qwen2.5-0.5B/raw/060db6499f32faf8b98477b0a26969ef7d8b9987/config.json)
    ("meta-llama/Llama-2-7b-hf", "llama", 32000, 4096, 11008, 32, 32, 32, False, 4096, {}),
    ("meta-llama/Llama-2-13b-hf", "llama", 32000, 5120, 13824, 40, 40, 40, False, 4096, {}),
    ("meta-llama/Llama-2-70b-hf", "llama", 32000, 8192, 28672, 80, 64, 8, False, 4096, {}),
    ("meta-llama/Meta-Llama-3-8B llama-3-8b", "llama", 128256, 4096, 14336, 32, 32, 8, False, 8192,
     dict(rope_theta=500000.0)),
    ("meta-llama/Meta-Llama-3-70B llama-3-70b", "llama", 128256, 8192, 28672, 80, 64, 8, False, 8192,
     dict(rope_theta=500000.0)),
    ("meta-llama/Llama-3.1-8B meta-llama/Meta-Llama-3.1-8B deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "llama",
     128256, 4096, 14336, 32, 32, 8, False, 131072, dict(rope_theta=500000.0, rope_scaling=dict(
         rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
         original_max_position_embeddings=8192))),
    ("meta-llama/Llama-3.1-70B meta-llama/Meta-Llama-3.1-70B meta-llama/Llama-3.3-70B-Instruct "
     "deepseek-ai/DeepSeek-R1-Distill-Llama-70B", "llama", 128256, 8192, 28672, 80, 64, 8, False, 131072,
     dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                 high_freq_factor=4.0, original_max_position_embeddings=8192))),
    ("meta-llama/Llama-3.2-1B", "llama", 128256, 2048, 8192, 16, 32, 8, True, 131072, dict(
        head_dim=64, rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                            high_freq_factor=4.0,
                                                            original_max_position_embeddings=8192))),
    ("meta-llama/Llama-3.2-3B", "llama", 128256, 3072, 8192, 28, 24, 8, True, 131072, dict(
        head_dim=128, rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                             high_freq_factor=4.0,
                                                             original_max_position_embeddings=8192))),
    ("mistralai/Mistral-7B-v0.1 mistral-7b", "mistral", 32000, 4096, 14336, 32, 32, 8, False, 32768,
     dict(sliding_window=4096)),
    # edadaltocg/mistral-src-finetune : finetune/config.py (Mistral's params.json of Mistral-7B-v0.2-Instruct)
    ("mistralai/Mistral-7B-Instruct-v0.2", "mistral", 32000, 4096, 14336, 32, 32, 8, False, 32768,
     dict(rope_theta=1000000.0, sliding_window=None)),
    ("mistralai/Mistral-7B-v0.3", "mistral", 32768, 4096, 14336, 32, 32, 8, False, 32768,
     dict(rope_theta=1000000.0, sliding_window=None)),
    ("mistralai/Mixtral-8x7B-v0.1", "mixtral", 32000, 4096, 14336, 32, 32, 8, False, 32768,
     dict(num_local_experts=8, num_experts_per_tok=2, rope_theta=1000000.0, sliding_window=None)),
    ("microsoft/Phi-3-mini-4k-instruct", "phi3", 32064, 3072, 8192, 32, 32, 32, False, 4096,
     dict(sliding_window=2047)),
    ("microsoft/Phi-3.5-mini-instruct", "phi3", 32064, 3072, 8192, 32, 32, 32, False, 131072,
     dict(sliding_window=262144, original_max_position_embeddings=4096)),
    ("google/gemma-2-2b", "gemma2", 256000, 2304, 9216, 26, 8, 4, True, 8192, dict(
        head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        sliding_window=4096)),
    ("google/gemma-2-9b", "gemma2", 256000, 3584, 14336, 42, 16, 8, True, 8192, dict(
        head_dim=256, query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        sliding_window=4096)),
    ("google/gemma-2-27b", "gemma2", 256000, 4608, 36864, 46, 32, 16, True, 8192, dict(
        head_dim=128, query_pre_attn_scalar=144, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        sliding_window=4096)),
    ("google/gemma-3-1b-it", "gemma3_text", 262144, 1152, 6912, 26, 4, 1, True, 32768, dict(
        head_dim=256, query_pre_attn_scalar=256, sliding_window=512, rope_theta=1000000.0,
        rope_local_base_freq=10000.0)),
    ("Qwen/Qwen2-0.5B Qwen/Qwen2.5-0.5B", "qwen2", 151936, 896, 4864, 24, 14, 2, True, 32768,
     dict(rope_theta=1000000.0)),
    ("Qwen/Qwen2-1.5B Qwen/Qwen2.5-1.5B", "qwen2", 151936, 1536, 8960, 28, 12, 2, True, 32768,
     dict(rope_theta=1000000.0)),
    ("Qwen/Qwen2-7B", "qwen2", 152064, 3584, 18944, 28, 28, 4, False, 32768, dict(rope_theta=1000000.0)),
    ("Qwen/Qwen2.5-3B", "qwen2", 151936, 2048, 11008, 36, 16, 2, True, 32768, dict(rope_theta=1000000.0)),
    ("Qwen/Qwen3-0.6B", "qwen3", 151936, 1024, 3072, 28, 16, 8, True, 40960, dict(head_dim=128,
                                                                                  rope_theta=1000000.0)),
    ("Qwen/Qwen3-1.7B", "qwen3", 151936, 2048, 6144, 28, 16, 8, True, 40960, dict(head_dim=128,
                                                                                 rope_theta=1000000.0)),
    ("Qwen/Qwen3-4B", "qwen3", 151936, 2560, 9728, 36, 32, 8, True, 40960, dict(head_dim=128,
                                                                               rope_theta=1000000.0)),
    ("Qwen/Qwen3-8B", "qwen3", 151936, 4096, 12288, 36, 32, 8, False, 40960, dict(head_dim=128,
                                                                                 rope_theta=1000000.0)),
    ("HuggingFaceTB/SmolLM2-135M", "llama", 49152, 576, 1536, 30, 9, 3, True, 8192, dict(rope_theta=100000.0)),
    ("HuggingFaceTB/SmolLM2-360M", "llama", 49152, 960, 2560, 32, 15, 5, True, 8192, dict(rope_theta=100000.0)),
    ("HuggingFaceTB/SmolLM2-1.7B", "llama", 49152, 2048, 8192, 24, 32, 32, True, 8192, dict(rope_theta=130000.0)),
    # a collection of released models' config.json files (code search file id 30247352769: Llama-3.1-8B,
    # Llama-3.2-3B, Qwen2.5-3B/7B/14B/32B, Qwen3-4B/8B/14B/30B-A3B/32B, each as the hub serves it); Qwen3-30B-A3B
    # also in NVIDIA-NeMo/Megatron-Bridge @ 067f987df03b8355b03192d88d70f1709fedf51a :
    # tests/unit_tests/models/qwen/test_qwen3_moe_bridge.py (qwen3_moe_30b_config_dict)
    ("Qwen/Qwen2.5-7B", "qwen2", 152064, 3584, 18944, 28, 28, 4, False,
     131072, dict(rope_theta=1000000.0)),
    ("Qwen/Qwen2.5-14B deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "qwen2", 152064, 5120, 13824, 48, 40, 8, False,
     131072, dict(rope_theta=1000000.0)),
    ("Qwen/Qwen2.5-32B deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "qwen2", 152064, 5120, 27648, 64, 40, 8, False,
     131072, dict(rope_theta=1000000.0)),
    ("Qwen/Qwen3-14B", "qwen3", 151936, 5120, 17408, 40, 40, 8, False, 40960, dict(head_dim=128,
                                                                                  rope_theta=1000000.0)),
    ("Qwen/Qwen3-32B", "qwen3", 151936, 5120, 25600, 64, 64, 8, False, 40960, dict(head_dim=128,
                                                                                  rope_theta=1000000.0)),
    ("Qwen/Qwen3-30B-A3B", "qwen3_moe", 151936, 2048, 6144, 48, 32, 4, False, 40960, dict(
        head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
        rope_theta=1000000.0)),
    # Gemma 3 4B and 27B are vision-language releases (Gemma3ForConditionalGeneration): the language model's
    # fields from NVIDIA-NeMo/Megatron-Bridge @ 067f987df03b8355b03192d88d70f1709fedf51a :
    # tests/unit_tests/models/gemma/test_gemma3_bridge.py (gemma3_4b_config_dict, gemma3_27b_config_dict), under
    # text_config beside the SigLIP tower of tests/unit_tests/models/gemma_vl/test_gemma3_vl_bridge.py
    # (mock_vision_config, mm_tokens_per_image)
    ("google/gemma-3-4b-pt google/gemma-3-4b-it", "gemma3_text", 262208, 2560, 10240, 34, 8, 4, True, 131072, dict(
        head_dim=256, query_pre_attn_scalar=256, sliding_window=1024, wrapper="gemma3")),
    ("google/gemma-3-27b-pt google/gemma-3-27b-it", "gemma3_text", 262208, 5376, 21504, 62, 32, 16, True, 131072,
     dict(head_dim=128, query_pre_attn_scalar=168, sliding_window=1024, wrapper="gemma3")),
    # kevinstephano/thunder_model_blocks : thunder_model_blocks/mistral/mistral_config.py (the release's config.json)
    ("mistralai/Mistral-Nemo-Base-2407 mistralai/Mistral-Nemo-Instruct-2407", "mistral", 131072, 5120, 14336, 40,
     32, 8, False, 128000, dict(head_dim=128, rope_theta=1000000.0, sliding_window=None)),
    # an experiment registry of resolved config.json fields, each pinned to its source (code search file id
    # 69678342600): meta-llama/llama-models @ 0e0b8c51 : models/sku_list.py for Llama 3.1 405B, google/gemma_pytorch
    # @ 014acb7a : gemma/config.py for Gemma 3 12B's text decoder (its config.json's vocabulary, 262208, as for 4B
    # and 27B above), huggingface.co/microsoft/phi-4 @ 2db69c1c and mistralai/Mistral-Small-3.1-24B-Instruct-2503 @
    # 68faf511 (the text_config of Mistral Small 3.1, which adds a vision tower to Mistral Small 3, 2501)
    ("meta-llama/Llama-3.1-405B meta-llama/Meta-Llama-3.1-405B", "llama", 128256, 16384, 53248, 126, 128, 8, False,
     131072, dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                         high_freq_factor=4.0, original_max_position_embeddings=8192))),
    ("google/gemma-3-12b-pt google/gemma-3-12b-it", "gemma3_text", 262208, 3840, 15360, 48, 16, 8, True, 131072,
     dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=1024, wrapper="gemma3")),
    ("microsoft/phi-4", "phi3", 100352, 5120, 17920, 40, 40, 10, False, 16384, dict(rope_theta=250000.0)),
    ("mistralai/Mistral-Small-24B-Base-2501 mistralai/Mistral-Small-24B-Instruct-2501", "mistral", 131072, 5120,
     32768, 40, 32, 8, False, 32768, dict(head_dim=128, sliding_window=None)),
    # code search file id 4881146369 (a profiler's copies of released config.json files: Phi-3-medium-4k-instruct,
    # Qwen2-72B-Instruct; Qwen2.5-72B's card gives the same layers, heads and 72.7B parameters)
    ("microsoft/Phi-3-medium-4k-instruct", "phi3", 32064, 5120, 17920, 40, 40, 10, False, 4096,
     dict(sliding_window=2047)),
    ("Qwen/Qwen2-72B Qwen/Qwen2.5-72B", "qwen2", 152064, 8192, 29568, 80, 64, 8, False, 131072,
     dict(rope_theta=1000000.0)),
    # OLMo 2: mauer4/Attention-From-Scratch @ 381a295f : weights/allenai/OLMo-2-1124-13B/config.json, and a test
    # fixture mirroring allenai/OLMo-2-1124-7B/config.json (code search file id 56292883532)
    ("allenai/OLMo-2-1124-7B", "olmo2", 100352, 4096, 11008, 32, 32, 32, False, 4096, dict(rope_theta=500000.0)),
    ("allenai/OLMo-2-1124-13B", "olmo2", 100352, 5120, 13824, 40, 40, 40, False, 4096, dict(rope_theta=500000.0)),
    # gpt-oss (its config.json also holds the mxfp4 quantization_config of its experts, which loading decodes to
    # 16-bit, so the estimate is the same without it): 20b from EchoCog/gpt-oss-20b : docs/gpt-oss-20b-architecture.md
    # (the repository's config.json, field by field), 120b from transformers' GptOssConfig, whose defaults are
    # gpt-oss-120b's (36 layers, 128 experts; the rest as 20b)
    ("openai/gpt-oss-20b", "gpt_oss", 201088, 2880, 2880, 24, 64, 8, False, 131072, dict(
        head_dim=64, num_local_experts=32, num_experts_per_tok=4, sliding_window=128, rope_theta=150000.0)),
    ("openai/gpt-oss-120b", "gpt_oss", 201088, 2880, 2880, 36, 64, 8, False, 131072, dict(
        head_dim=64, num_local_experts=128, num_experts_per_tok=4, sliding_window=128, rope_theta=150000.0)),
    # LLaMA 1 as huggyllama publishes it (the paper's table 2: dimensions, heads, layers; the 2048-token context);
    # llama-33b and llama-65b are two of the six short names qlora knew before
    ("huggyllama/llama-7b", "llama", 32000, 4096, 11008, 32, 32, 32, False, 2048, {}),
    ("huggyllama/llama-13b", "llama", 32000, 5120, 13824, 40, 40, 40, False, 2048, {}),
    ("huggyllama/llama-30b llama-33b", "llama", 32000, 6656, 17920, 60, 52, 52, False, 2048, {}),
    ("huggyllama/llama-65b llama-65b", "llama", 32000, 8192, 22016, 80, 64, 64, False, 2048, {}),
)


# a vision-language release: its config.json beside the language model's fields (its text_config)
_WRAPPERS: dict[str, dict[str, Any]] = {
    "gemma3": dict(model_type="gemma3", mm_tokens_per_image=256, vision_config=dict(
        model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
        num_attention_heads=16, patch_size=14, image_size=896, vision_use_head=False)),
}


def _key(name: str) -> str:
    """``name`` as the table files it: lower case, variant words dropped."""
    org, _, repo = name.strip().lower().rpartition("/")
    repo = _VARIANT.sub("", repo)
    return f"{org}/{repo}" if org else repo


def _fields(row: tuple) -> dict[str, Any]:
    _, model_type, vocab, hidden, inter, layers, heads, kv, tied, context, extra = row
    extra = dict(extra)
    wrapper = _WRAPPERS.get(extra.pop("wrapper", ""))
    text = dict(model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                tie_word_embeddings=tied, max_position_embeddings=context, **extra)
    return text if wrapper is None else dict(wrapper, text_config=text)


def _index() -> dict[str, dict[str, Any]]:
    index: dict[str, dict[str, Any]] = {}
    for row in _ROWS:
        fields = _fields(row)
        for name in row[0].split():
            index[_key(name)] = fields
            index.setdefault(_key(name.rpartition("/")[2]), fields)  # the id without its organisation
    return index


_INDEX = _index()


def known_shape(name: str) -> dict[str, Any] | None:
    """The config.json fields (``model_type`` among them) of the released model ``name`` names, a hub id or a
    short name, or ``None`` where the table does not hold it."""
    fields = _INDEX.get(_key(name))
    return None if fields is None else copy.deepcopy(fields)  # a config built from it may change nested fields


def known_model_names() -> list[str]:
    """Each row's names, one line a model: what ``qlora estimate --list-models`` prints."""
    return [" ".join(row[0].split()) for row in _ROWS]
