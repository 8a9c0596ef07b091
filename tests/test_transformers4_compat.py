"""The rotary settings of a written config.json as transformers 4 reads them, for the rope kinds whose 4.x spelling
is not a plain copy of ``rope_parameters``: Phi-3's longrope and Qwen2-VL's mrope.

Each case starts from the spelling the model's own hub files have (written by transformers 4: Phi-3.5-mini and
Phi-4-mini, a Llama with longrope, Qwen2-VL), is loaded and saved by transformers 5 (``rope_parameters`` alone),
then rewritten; the 4.x keys must come back as those files spell them, and transformers 5 must read the rewritten
file as the same rotary embedding. Checked by hand against transformers 4.57: before, the Phi-3 folder was refused
(``rope_scaling must be a dictionary with three fields``), the Llama one failed in its longrope (``'<=' not
supported between NoneType and float``: 4.x reads the original context length at the top alone) and Qwen2-VL's
attention failed on a missing ``mrope_section``; after, all three compute transformers 5's logits."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
from transformers import AutoConfig

from qlora.model.transformers4_compat import readable_by_transformers_4

# Most cases are transformers 5's save of the file (rope_parameters alone): transformers 4 writes no such file.
transformers_5_save = pytest.mark.skipif(importlib.util.find_spec("transformers.initialization") is None,
                                         reason="the case starts from transformers 5's save (rope_parameters), "
                                                "which 4.x does not write")

_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
_SHORT, _LONG = [1.0 + i / 10 for i in range(6)], [2.0 + i / 10 for i in range(6)]


@transformers_5_save
@pytest.mark.parametrize("model_type, v4", [
    ("phi3", {"partial_rotary_factor": 0.75, "original_max_position_embeddings": 32,
              "rope_scaling": {"type": "longrope", "short_factor": _SHORT, "long_factor": _LONG}}),
    ("llama", {"original_max_position_embeddings": 32,
               "rope_scaling": {"type": "longrope", "short_factor": _SHORT + [3.0, 3.0],
                                "long_factor": _LONG + [4.0, 4.0]}}),
])
def test_longrope_is_spelt_as_phi3s_own_files(tmp_path, model_type, v4):
    config = AutoConfig.for_model(model_type, **_SMALL, **copy.deepcopy(v4), rope_theta=1e4)  # it takes the dict over
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_scaling" not in saved or saved["rope_scaling"] != v4["rope_scaling"]  # transformers 5's own spelling
    readable_by_transformers_4(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_scaling"] == v4["rope_scaling"]
    assert written["original_max_position_embeddings"] == v4["original_max_position_embeddings"]
    assert written["rope_theta"] == 1e4
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters == config.rope_parameters


@transformers_5_save
def test_qwen2_vl_keeps_its_mrope_section_where_transformers_4_reads_it(tmp_path):
    text = {k: v for k, v in _SMALL.items() if k != "max_position_embeddings"}
    config = AutoConfig.for_model(
        "qwen2_vl", vocab_size=128,
        text_config={**text, "rope_theta": 1e6, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}})
    config.save_pretrained(tmp_path)
    readable_by_transformers_4(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())["text_config"]
    assert written["rope_theta"] == 1e6
    scaling = written["rope_scaling"]
    assert scaling["mrope_section"] == [2, 3, 3]
    assert scaling.get("rope_type", scaling.get("type")) in ("default", "mrope")  # 4.x reads mrope as default
    assert AutoConfig.from_pretrained(tmp_path).text_config.rope_parameters == config.text_config.rope_parameters


@transformers_5_save
@pytest.mark.parametrize("model_type, extra", [("gemma4_text", {"layer_types": ["sliding_attention", "full_attention"]}),
                                               ("lfm3", {})])
def test_per_layer_type_rope_transformers_5_would_misread_is_left_alone(tmp_path, model_type, extra):
    """Gemma 4's and LFM3's rope parameters per layer type (a proportional rope on the full-attention layers), which
    no transformers 4 knows: the mirrored ``rope_scaling`` made transformers 5 fail to read a merged Gemma 4
    ("Missing required keys in `rope_parameters` for 'rope_type'='proportional': {'rope_theta'}") and replace
    LFM3's per-layer parameters with the full-attention layers' alone."""
    config = AutoConfig.for_model(model_type, **_SMALL, **extra)
    config.save_pretrained(tmp_path)
    saved = (tmp_path / "config.json").read_text()
    readable_by_transformers_4(tmp_path)
    assert (tmp_path / "config.json").read_text() == saved
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters == config.rope_parameters


@transformers_5_save
@pytest.mark.parametrize("rope", [{"rope_theta": 1e6}, {"rope_theta": 1e4, "partial_rotary_factor": 0.5}])
def test_a_default_rope_has_no_rope_scaling(tmp_path, rope):
    AutoConfig.for_model("llama", **_SMALL, **rope).save_pretrained(tmp_path)
    readable_by_transformers_4(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written.get("rope_scaling") is None and written["rope_theta"] == rope["rope_theta"]


@transformers_5_save
def test_a_models_named_special_tokens_are_listed_where_transformers_4_reads_them(tmp_path):
    """transformers 5 writes Gemma 3's image_token, boi_token and eoi_token at the top of tokenizer_config.json
    alone; 4.x reads named tokens from an ``extra_special_tokens`` dict only (its Gemma 3 processor then fails on
    ``tokenizer.image_token_id``), as 4.x's own Gemma 3 files list them. Checked by hand on 4.57: the written
    tokenizer has the named tokens and ids; transformers 5 reads it as the same tokenizer."""
    from transformers import AutoTokenizer

    from chat_families import family_tokenizer

    named = {"image_token": "<end_of_turn>", "boi_token": "<start_of_turn>"}
    family_tokenizer("gemma-3").save_pretrained(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base", extra_special_tokens=named)
    tokenizer.save_pretrained(tmp_path / "out")
    readable_by_transformers_4(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert written["extra_special_tokens"] == named
    again = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert [again.image_token, again.boi_token] == [tokenizer.image_token, tokenizer.boi_token] == list(named.values())
    assert sorted(again.all_special_tokens) == sorted(tokenizer.all_special_tokens)
    assert again.extra_special_tokens == tokenizer.extra_special_tokens


def _rotary(folder):
    """(class, rope type, inverse frequencies, attention scaling) of the rotary embedding transformers builds from
    ``folder``'s config.json (4.x's Chameleon: a class per scaling, no rope type)."""
    import torch
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_config(AutoConfig.from_pretrained(folder))
    rotary = next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))
    return (type(rotary).__name__, getattr(rotary, "rope_type", None), rotary.inv_freq.tolist(),
            getattr(rotary, "attention_scaling", 1.0))


# OLMo, OLMo 2 and Chameleon as their hub files spell a scaled rope (transformers 4's own spelling), and Llama,
# whose 4.x config takes rope_type as 5's does
_VQ = dict(embed_dim=8, num_embeddings=16, base_channels=32, channel_multiplier=[1], num_res_blocks=1,
           attn_resolutions=[])


@pytest.mark.parametrize("model_type, scaling, extra", [
    ("olmo", {"type": "linear", "factor": 2.0}, {}),
    ("olmo2", {"type": "dynamic", "factor": 4.0}, {}),
    ("chameleon", {"type": "linear", "factor": 8.0}, {"vq_config": _VQ, "vocabulary_map": {"<image>": 3}}),
    ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, {}),
])
def test_a_scaled_rope_written_by_transformers_5_is_read_by_transformers_4(tmp_path, model_type, scaling, extra):
    """A merged or quantized folder of a model with a scaled rope, written by transformers 5 (``rope_parameters``
    alone) and rewritten, gives the rotary embedding of the model's own files in the transformers installed: on 4.x
    OLMo's, OLMo 2's and Chameleon's configs take ``rope_scaling`` only as exactly ``{type, factor}`` (before, the
    rewritten ``{rope_type, factor}`` was refused: "`rope_scaling`'s type field must be one of ['linear',
    'dynamic']", and the ``type`` a 5 save keeps beside ``rope_type`` made three keys, refused too)."""
    config = AutoConfig.for_model(model_type, **_SMALL, **extra, rope_theta=1e4, rope_scaling=dict(scaling))
    config.save_pretrained(tmp_path / "hub")
    saved = json.loads((tmp_path / "hub" / "config.json").read_text())
    five = {k: v for k, v in saved.items() if k not in ("rope_theta", "rope_scaling")}
    kind = scaling.get("rope_type", scaling.get("type"))
    # transformers 5's save: rope_parameters alone, keeping the 4.x ``type`` key of the file it read
    five["rope_parameters"] = {**scaling, "rope_type": kind, "rope_theta": 1e4}
    (tmp_path / "five").mkdir()
    (tmp_path / "five" / "config.json").write_text(json.dumps(five))
    readable_by_transformers_4(tmp_path / "five")
    assert _rotary(tmp_path / "five") == _rotary(tmp_path / "hub")
    assert _rotary(tmp_path / "five")[1] in (kind, None)
    if model_type != "llama":  # the model's own 4.x spelling, two keys (which 5 reads as the same rope)
        assert json.loads((tmp_path / "five" / "config.json").read_text())["rope_scaling"] == scaling


@transformers_5_save
@pytest.mark.parametrize("model_type", ["gemma4_text", "lfm3", "gemma3_text"])
def test_a_model_type_transformers_4_never_had_keeps_its_rotary_settings(tmp_path, model_type):
    """Gemma 4's and LFM3's configs (types 4.x never had) take no 4.x rope keys: before, the Gemma 4 folder
    ``qlora merge`` wrote was refused by transformers 5 itself (``Missing required keys in `rope_parameters` for
    'rope_type'='proportional'``) and LFM3's read the mirrored ``rope_scaling`` as every layer's rope (its sliding
    layers' base frequency 1e4 became 1e6). Gemma 3, whose 5.x config reads the 4.x keys, still gets them."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this transformers has no {model_type}")
    config = AutoConfig.for_model(model_type, **_SMALL)
    assert set(config.rope_parameters) == {"full_attention", "sliding_attention"}
    config.save_pretrained(tmp_path)
    readable_by_transformers_4(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters == config.rope_parameters
    written = json.loads((tmp_path / "config.json").read_text())
    assert ("rope_local_base_freq" in written) == (model_type == "gemma3_text")


@transformers_5_save
def test_gemma_3s_scaled_rope_per_layer_type_is_still_spelt_for_transformers_4(tmp_path):
    """Gemma 3's 5.x config reads its 4.x spelling back (the full-attention layers' rope at the top, the sliding
    ones' base frequency as ``rope_local_base_freq``), so the keys stay written for 4.x."""
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}
    config = AutoConfig.for_model("gemma3_text", **_SMALL, rope_parameters=copy.deepcopy(rope))
    config.save_pretrained(tmp_path)
    readable_by_transformers_4(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_theta"] == 1e6 and written["rope_local_base_freq"] == 1e4
    assert written["rope_scaling"] == {"rope_type": "linear", "factor": 8.0}
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters == config.rope_parameters


@transformers_5_save
def test_a_config_with_an_infinite_value_is_checked_as_transformers_reads_its_file(tmp_path):
    """Falcon-H1's ``time_step_limit`` (0, inf) is written ``{"__float__": "Infinity"}``, which transformers decodes
    when it reads the file: the check of the 4.x rope keys built the config from the raw JSON and failed on it (a
    merged or quantized Falcon-H1 folder was not written)."""
    config = AutoConfig.for_model("falcon_h1", **_SMALL)
    assert config.time_step_limit[1] == float("inf")
    config.save_pretrained(tmp_path)
    readable_by_transformers_4(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_theta"] == config.rope_parameters["rope_theta"]
    back = AutoConfig.from_pretrained(tmp_path)
    assert back.rope_parameters == config.rope_parameters and back.time_step_limit == config.time_step_limit
