"""Model types transformers lists as causal LMs that qlora cannot fine-tune: each command exits 2 with a
one-paragraph reason, not a traceback.

MusicGen's config joins a T5 text encoder, an EnCodec audio codec and a decoder of audio codes (transformers
maps it to a causal LM class that cannot be built from it); a Gemma 4 assistant is a speculative-decoding
draft whose layers all reuse the target model's keys and values, which transformers 5 cannot build alone.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from qlora.cli.main import main


def _commands(model, tmp_path, estimate: bool = False) -> list[list[str]]:
    """The commands that load ``model``; with ``estimate``, ``qlora estimate`` too, which refuses what loading
    refuses (not what only a forward does)."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {a}?", "output": f"{a}."}) + "\n" for a in range(4)))
    return [["train", "--model", str(model), "--data", str(data), "--output", str(tmp_path / "run"), "--max-steps",
             "1", "--no-progress"],
            ["eval", "--model", str(model), "--data", str(data)],
            ["quantize", "--model", str(model), "--output", str(tmp_path / "q4")],
            ["generate", "--model", str(model), "--prompt", "Hi", "--max-new-tokens", "2", "--temperature", "0"]] + \
        [["estimate", "--model", str(model)]] * estimate


@pytest.mark.parametrize("kind", ["musicgen", "musicgen_melody"])
def test_a_text_conditioned_audio_model_is_refused(kind, tmp_path, tiny_tokenizer, capsys):
    if kind not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this transformers has no {kind!r} models")
    from transformers import AutoModelForTextToWaveform

    t5 = dict(model_type="t5", vocab_size=len(tiny_tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    codec = dict(model_type="encodec", hidden_size=16, num_filters=4, codebook_size=64, upsampling_ratios=[2, 2],
                 num_residual_layers=1, codebook_dim=16)
    decoder = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64,
                   num_codebooks=2, max_position_embeddings=64)
    config = AutoConfig.for_model(kind, text_encoder=t5, audio_encoder=codec, decoder=decoder)
    with pytest.raises(AttributeError):  # transformers' causal LM class for the type wants the decoder's config
        AutoModelForCausalLM.from_config(config)
    torch.manual_seed(0)
    AutoModelForTextToWaveform.from_config(config).save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    for argv in _commands(tmp_path / "m", tmp_path, estimate=True):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, argv
        assert f"the {kind!r} model combines several models with text configs (text_encoder, decoder)" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind, text_kind", [("gemma4_assistant", "gemma4_text"),
                                             ("gemma4_unified_assistant", "gemma4_unified_text")])
def test_a_draft_model_is_refused(kind, text_kind, tmp_path, tiny_tokenizer, capsys):
    """Gemma 4's assistant drafts tokens for its main model from that model's embeddings and key/value states:
    transformers before 5.24 cannot build it (named as such); from 5.24 it builds and quantizes, and the commands
    that run it say in one paragraph that its forward takes what no command gives it (not 'change --seq-len')."""
    if kind not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this transformers has no {kind!r} models")
    from safetensors.torch import save_file

    text = AutoConfig.for_model(
        text_kind, vocab_size=len(tiny_tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, head_dim=16, global_head_dim=16, hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0, enable_moe_block=False, use_double_wide_mlp=False, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"])
    config = AutoConfig.for_model(kind, text_config=text.to_dict(), backbone_hidden_size=64)
    try:
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
        built = True
    except ValueError as exc:  # before transformers 5.24 its own build fails
        assert "layer types producing a cache" in str(exc)
        built = False
        config.save_pretrained(tmp_path / "m")
        save_file({"lm_head.weight": torch.zeros(len(tiny_tokenizer), 64)}, tmp_path / "m" / "model.safetensors")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    for argv in _commands(tmp_path / "m", tmp_path):
        code = main(argv)
        err = capsys.readouterr().err
        if built and argv[0] == "quantize":  # its weights quantize like any model's
            assert code == 0 and (tmp_path / "q4" / "config.json").is_file(), err
            continue
        assert code == 2, argv
        if built:  # it builds, but its forward takes its main model's states, not token ids
            assert "Its forward needs inputs_embeds and shared_kv_states, which no command gives it" in err, err
            assert not (tmp_path / "run").exists()
        else:
            assert f"transformers could not build the {kind!r} model (" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
               patch_size=14)
_QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                encoder_hidden_size=32)


@pytest.mark.parametrize("kind, text, extra", [
    ("blip", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2), {}),
    ("blip-2", dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                    word_embed_proj_dim=32), dict(qformer_config=_QFORMER, num_query_tokens=2)),
    ("instructblip", dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2), dict(qformer_config=_QFORMER, num_query_tokens=2)),
])
def test_a_model_whose_forward_requires_images_is_refused(kind, text, extra, tmp_path, tiny_tokenizer, capsys):
    """BLIP, BLIP-2 and InstructBLIP are image-text-to-text models whose forward requires pixel_values (and
    InstructBLIP's qformer_input_ids): every command said TypeError with a traceback; it names what the forward
    requires. (transformers' own forward on the token ids alone fails the same way.)"""
    from transformers import AutoModelForImageTextToText

    if kind not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this transformers has no {kind!r} models")
    config = AutoConfig.for_model(kind, text_config=dict(text, vocab_size=len(tiny_tokenizer) + 8),
                                  vision_config=_VISION, **extra)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    with pytest.raises(TypeError, match="pixel_values"):
        model(input_ids=torch.tensor([[5, 6, 7]]))
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    for argv in _commands(tmp_path / "m", tmp_path, estimate=True):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, argv
        assert f"the {kind!r} model ({type(model).__name__}) cannot run on text alone: its forward requires " \
               "pixel_values" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind, text, vision, needs", [
    ("kosmos-2", dict(embed_dim=32, layers=1, attention_heads=2, ffn_dim=64),
     dict(_VISION, model_type="kosmos_2_vision_model"),
     "pixel_values or image_embeds on every input, which a row without an image does not give it"),
    ("pix2struct", dict(hidden_size=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2),
     dict(hidden_size=32, d_kv=16, d_ff=64, num_hidden_layers=1, num_attention_heads=2, patch_embed_hidden_size=48),
     "flattened_patches, which no command gives it"),
    # IDEFICS: "Exactly 1 of pixel_values, image_encoder_embeddings or perceiver_embeddings"; said to need the two
    # that are not images, both
    ("idefics", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4),
     dict(embed_dim=32, image_size=28, patch_size=14, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
     "pixel_values, image_encoder_embeddings or perceiver_embeddings on every input, which a row without an image "
     "does not give it"),
])
def test_a_model_whose_forward_needs_an_image_on_every_input_is_refused_as_such(kind, text, vision, needs, tmp_path,
                                                                               tiny_tokenizer, capsys):
    """Kosmos-2, Pix2Struct and IDEFICS take pixel_values as optional, yet their forward refuses token ids alone:
    the commands exit 2 naming the inputs, and say an image gives it (they said only that a main model computes
    it, as for a speculative-decoding draft, and to use that main model; IDEFICS's, that it needed both of the
    inputs besides an image, where it takes any one of the three)."""
    from transformers import AutoModelForImageTextToText

    if kind not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this transformers has no {kind!r} models")
    text = dict(text, vocab_size=len(tiny_tokenizer))
    config = AutoConfig.for_model(kind, **(text if kind == "idefics" else {"text_config": text}), vision_config=vision)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config)
    if "input_ids" not in inspect.signature(type(model).forward).parameters:
        pytest.skip(f"this transformers' {type(model).__name__} takes no input_ids (4.x's Pix2Struct)")
    with pytest.raises(ValueError):  # transformers' own forward on the token ids alone
        model(input_ids=torch.tensor([[5, 6, 7]]))
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    train, eval_, _, generate = _commands(tmp_path / "m", tmp_path)
    for argv in (train, eval_, generate):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, argv
        assert f"Its forward needs {needs}: qlora runs" in err, err
        assert "or what an image gives on every input" in err and "cannot be trained or run on text alone" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kind, fields, said", [
    # T5 layout over document images: its position bias reads OCR boxes ("Bbox is required"), an input
    # the model's error names with a capital, which the refusal's input lookup missed (it advised --seq-len)
    ("udop", dict(d_model=64, d_kv=16, d_ff=128, num_layers=1, num_decoder_layers=1, num_heads=4),
     "Its forward needs bbox, which no command gives it"),
    # formulas read from images by a decoder with no token embeddings transformers finds: a traceback
    # (NotImplementedError from get_input_embeddings) before
    ("pp_formulanet", dict(text_config=dict(d_model=64, decoder_attention_heads=4, decoder_ffn_dim=128, decoder_layers=1,
                                            encoder_attention_heads=4, encoder_ffn_dim=128, encoder_layers=1,
                                            max_position_embeddings=256), vision_config=_VISION),
     "has no token embeddings transformers can find"),
])
def test_a_model_that_cannot_run_on_token_ids_says_why(kind, fields, said, tmp_path, tiny_tokenizer, capsys):
    from transformers import AutoModelForImageTextToText

    if kind not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this transformers has no {kind!r} models")
    if "text_config" in fields:
        fields = dict(fields, text_config=dict(fields["text_config"], vocab_size=len(tiny_tokenizer)))
    else:
        fields = dict(fields, vocab_size=len(tiny_tokenizer))
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(AutoConfig.for_model(kind, **fields)).save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    train, eval_, _, generate = _commands(tmp_path / "m", tmp_path)
    for argv in (train, eval_, generate):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert said in err and "on text alone" in err, err
        assert "Traceback" not in err and "--seq-len" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("language", [None, "de_DE"])
def test_a_language_routed_model_without_its_language_names_the_field_to_set(language, tmp_path, tiny_tokenizer,
                                                                            capsys):
    """X-MOD runs each token through one language's adapter, from a lang_ids input (which qlora never gives) or
    the config's default_language. Left null (as transformers' own configs leave it), training and generating
    said transformers' "Input language unknown. Please call set_default_language()" and to change --seq-len or
    --batch-size; a language it lacks failed a list lookup. Each command names the field, the file and the
    languages; set to one of them, the model trains and generates."""
    if "xmod" not in CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no X-MOD models")
    config = AutoConfig.for_model("xmod", vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                  is_decoder=True, languages=["en_XX", "fr_XX"], default_language=language,
                                  pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError):  # transformers' own forward: "Input language unknown" / "not in list"
        model(input_ids=torch.tensor([[5, 6, 7]]))
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    said = "null" if language is None else repr(language)
    for argv in _commands(tmp_path / "m", tmp_path, estimate=True):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, argv
        assert "adapter of one of its languages (en_XX, fr_XX)" in err and f"which is {said} there" in err, err
        assert f'Set "default_language" in {tmp_path / "m" / "config.json"}' in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists() and not (tmp_path / "q4").exists()

    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(saved, default_language="fr_XX")))
    train, _, _, generate = _commands(tmp_path / "m", tmp_path)
    assert main(train) == 0 and main(generate) == 0, capsys.readouterr().err


def test_a_model_that_generates_by_diffusion_is_refused(tmp_path, tiny_tokenizer, capsys):
    """DiffusionGemma (an image-text-to-text class in transformers 5.24) refines a canvas of tokens by block
    diffusion with a generate of its own; its logits are the canvas', not next-token predictions of its input.
    Every command ended in a traceback while tying its 4-bit weights (transformers' tie patterns matched the
    4-bit layers' constants); each says in one paragraph that it is not an autoregressive model."""
    if "diffusion_gemma" not in CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no DiffusionGemma models")
    from transformers import AutoModelForImageTextToText, GenerationMixin

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    text = dict(vocab_size=len(tiny_tokenizer) + 8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, intermediate_size=128, num_experts=4, top_k_experts=2,
                moe_intermediate_size=32, per_layer_config={}, sliding_window=8,
                layer_types=["sliding_attention", "full_attention"],
                rope_parameters={"sliding_attention": rope, "full_attention": rope})
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(
        AutoConfig.for_model("diffusion_gemma", text_config=text, vision_config=vision))
    assert type(model).can_generate() and not isinstance(model, GenerationMixin)
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    for argv in _commands(tmp_path / "m", tmp_path, estimate=True):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert "the 'diffusion_gemma' model (DiffusionGemmaForBlockDiffusion) is not an autoregressive language " \
               "model: it generates text with a method of its own (DiffusionGemmaGenerationMixin)" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "q4").exists()


def test_a_protein_conditioned_model_is_refused_without_advice_that_does_not_apply(tmp_path, tiny_tokenizer, capsys,
                                                                                   caplog):
    """Evolla (transformers' only ProteinText2Text class) is neither a causal LM nor an image-text-to-text model:
    refused, as it was, but first came the warning to set is_decoder true in its config.json (its protein
    encoder's field, false), which would not have made it loadable."""
    if "evolla" not in CONFIG_MAPPING_NAMES:
        pytest.skip("this transformers has no Evolla models")
    import transformers

    config = AutoConfig.for_model(
        "evolla", vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, aligner_num_add_layers=1, resampler_depth=1,
        resampler_heads=2, resampler_dim_head=16, resampler_num_latents=4,
        protein_encoder_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    torch.manual_seed(0)
    transformers.EvollaForProteinText2Text(config).save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    for argv in _commands(tmp_path / "m", tmp_path, estimate=True):
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, argv
        assert "model type 'evolla' is not a text-generating model" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "is_decoder" not in caplog.text
