"""`qlora export` of a vision-language model: the projector file (mmproj) as llama.cpp's own encoder runs it.

The oracle is transformers' vision tower + projector on the processor's pixels of the same image. llama.cpp's CPU
encoder computes two steps in half precision whatever the file's type (measured on llama-cpp-python 0.3.36: its
patch convolution rounds the pixels and the patch weights to f16; its GELUs read f16 tables of the f16-rounded
input), and computes the tanh GELU where Qwen2-VL's merger has the exact one: the oracle does the same there. The
rest agrees to float32 rounding, but an activation's input that lands on the other side of an f16 rounding
boundary moves its output by an f16 step, so a tower with larger activations (Qwen2-VL's, Qwen2.5-VL's) agrees to
~1e-4 (Qwen2.5-VL's SiLU is computed in f32 there: the oracle keeps it). Images have a size each family's
preprocessing keeps, so llama.cpp resizes nothing. llama.cpp's qwen2vl language model (Qwen2-VL's and Qwen2.5-VL's)
runs its RMS norms without epsilon (its loader reads none; measured): the oracle's text model does the same.
"""

from __future__ import annotations

import contextlib
import ctypes
import json

import numpy as np
import pytest
import torch
from torch import nn

from image_models import build_image_model
from qlora.cli.main import main

llama_cpp = pytest.importorskip("llama_cpp")
mtmd = pytest.importorskip("llama_cpp.mtmd_cpp")
pytest.importorskip("gguf")


VISION = ("vision_tower", "multi_modal_projector", "visual")  # the towers' and projectors' attribute names
# family -> (image height and width llama.cpp and transformers keep as is, image tokens, embeddings' tolerance and an
# image prompt's last logits' relative to the largest value: Gemma's text MLP reads llama.cpp's f16 GELU table)
CASES = {"gemma3": ((56, 56), 4, 1e-5, 2e-3), "qwen2_vl": ((112, 112), 16, 1e-3, 1e-5),
         "qwen2_5_vl": ((168, 224), 48, 1e-3, 1e-5)}
# Qwen2.5-VL as the hub's checkpoints have it (112-pixel windows, every n-th block attending over the whole image),
# n = 2 so one block of two attends within windows, and a processor keeping images up to 224x224: the test's
# 168x224 image spans two rows of two windows, the lower ones cut short.
QWEN25_VISION = dict(depth=2, fullatt_block_indexes=[1], window_size=112)


def _build(path, kind: str):
    """The tiny ``kind`` model the tests export (Qwen2.5-VL's as above)."""
    if kind != "qwen2_5_vl":
        return build_image_model(path, kind)
    model_dir = build_image_model(path, kind, vision=QWEN25_VISION)
    file = model_dir / "preprocessor_config.json"
    settings = json.loads(file.read_text())
    settings["size"]["longest_edge"] = 224 * 224
    file.write_text(json.dumps(settings))
    return model_dir


class _F16Table(nn.Module):
    """ggml's CPU GELU or quick GELU: the function of the input rounded to f16, read back from an f16 table."""

    def __init__(self, quick: bool):
        super().__init__()
        self.quick = quick

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.half().float()
        y = x * torch.sigmoid(1.702 * x) if self.quick else nn.functional.gelu(x, approximate="tanh")
        return y.half().float()


def _random_vision_weights(model_dir) -> None:
    """Random vision tower and projector weights (Gemma 3 initializes its projection to zeros)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f".{v}." in f".{name}" for v in VISION):
                norm = p.ndim == 1 and ("norm" in name or "ln_q" in name) and name.endswith("weight")
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.ndim > 1 else 0.5) + (1.0 if norm else 0.0))
    model.save_pretrained(model_dir)


@contextlib.contextmanager
def _mtmd(text_gguf, mmproj):
    """(llama-cpp-python model, mtmd context) for the exported pair."""
    # type_k/type_v 0: an f32 KV cache (llama.cpp's default is f16), so an f32 file's logits compare at float precision
    llm = llama_cpp.Llama(model_path=str(text_gguf), n_ctx=256, n_threads=2, verbose=False, type_k=0, type_v=0,
                          flash_attn=False)
    params = mtmd.mtmd_context_params_default()
    params.use_gpu, params.n_threads, params.warmup, params.flash_attn_type = False, 2, False, 0
    ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llm._model.model, params)
    assert ctx, "llama.cpp refused the projector file"
    try:
        yield llm, ctx
    finally:
        mtmd.mtmd_free(ctx)
        llm.close()


def _chunks(ctx, prompt: str, rgb: np.ndarray):
    """mtmd's chunks of ``prompt`` (its marker where the image goes) with ``rgb`` (H, W, 3 uint8)."""
    h, w, _ = rgb.shape
    bitmap = mtmd.mtmd_bitmap_init(w, h, (ctypes.c_ubyte * rgb.size).from_buffer_copy(rgb.tobytes()))
    text = mtmd.mtmd_input_text(prompt.encode(), len(prompt.encode()), False, True)
    chunks = mtmd.mtmd_input_chunks_init()
    assert mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (ctypes.c_void_p * 1)(bitmap), 1) == 0
    mtmd.mtmd_bitmap_free(bitmap)
    return chunks, [mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))]


def _is_image(chunk) -> bool:
    return mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE


def _mtmd_image_embeddings(text_gguf, mmproj, rgb: np.ndarray, n_embd: int) -> np.ndarray:
    """The embeddings llama.cpp's mtmd computes for ``rgb`` with the projector file."""
    with _mtmd(text_gguf, mmproj) as (_, ctx):
        chunks, parts = _chunks(ctx, f"look: {mtmd.mtmd_default_marker().decode()} ok", rgb)
        images = [c for c in parts if _is_image(c)]
        assert len(images) == 1
        assert mtmd.mtmd_encode_chunk(ctx, images[0]) == 0
        n = mtmd.mtmd_input_chunk_get_n_tokens(images[0])
        out = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(n * n_embd,)).reshape(n, n_embd).copy()
        mtmd.mtmd_input_chunks_free(chunks)
        return out


def _rounded_model(model_dir):
    """transformers' model, its vision part computing as llama.cpp's encoder does: f16 patch weights, activations
    from f16 tables, the tanh GELU for any GELU (pixels are rounded by the caller)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    for name, module in list(model.named_modules()):
        if not any(f".{v}." in f".{name}." for v in VISION):
            continue
        if name.endswith(("patch_embedding", "patch_embed.proj")):
            module.weight.data = module.weight.data.half().float()
        for child_name, child in module.named_children():
            kind = type(child).__name__.lower()
            if "gelu" in kind:
                setattr(module, child_name, _F16Table(quick="quick" in kind))
    if _mrope(model.config):  # llama.cpp's qwen2vl loader reads no RMS norm epsilon: its text model runs 0
        for module in model.model.language_model.modules():
            if hasattr(module, "variance_epsilon"):
                module.variance_epsilon = 0.0
    return model


def _mrope(config) -> list | None:
    """The language model's M-RoPE sections, or None."""
    return (getattr(config.get_text_config(), "rope_parameters", None) or {}).get("mrope_section")


def _small_rope_base(model_dir) -> None:
    """A RoPE base of 20 for an M-RoPE model: with the tiny model's 16-dim heads and base 1e6 the image tokens' rows
    and columns barely rotate anything, and wrong sections or positions would go unseen."""
    file = model_dir / "config.json"
    config = json.loads(file.read_text())
    rope = config.get("text_config", {}).get("rope_parameters") or {}
    if "mrope_section" in rope:
        rope["rope_theta"] = 20.0
        file.write_text(json.dumps(config))


def _oracle(model_dir, rgb: np.ndarray) -> np.ndarray:
    """transformers' image features for ``rgb``, rounded where llama.cpp's encoder rounds."""
    from PIL import Image

    from image_models import oracle_processor

    model = _rounded_model(model_dir)
    inputs = oracle_processor(model_dir).image_processor(images=[Image.fromarray(rgb)], return_tensors="pt")
    inputs = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")}
    inputs["pixel_values"] = inputs["pixel_values"].half().float()
    with torch.no_grad():
        features = model.model.get_image_features(**inputs)
    features = getattr(features, "pooler_output", features)
    features = torch.cat(list(features)) if isinstance(features, (tuple, list)) else features
    return features.reshape(-1, model.config.get_text_config().hidden_size).numpy()


@contextlib.contextmanager
def _image_features(model, features: torch.Tensor):
    """``model`` computing with ``features`` as its image embeddings, in the structure its own method returns."""
    own = model.model.get_image_features

    def swapped(*args, **kwargs):
        out = own(*args, **kwargs)
        held = getattr(out, "pooler_output", out)
        if isinstance(held, (tuple, list)):
            new = type(held)(torch.split(features.reshape(-1, held[0].shape[-1]), [len(h) for h in held]))
        else:
            new = features.reshape(held.shape).to(held.dtype)
        if hasattr(out, "pooler_output"):
            out.pooler_output = new
            return out
        return new

    model.model.get_image_features = swapped
    try:
        yield
    finally:
        del model.model.get_image_features


def _image(kind: str, seed: int) -> np.ndarray:
    height, width = CASES[kind][0]
    return (np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8)


@pytest.mark.parametrize("kind", list(CASES))
def test_mmproj_encodes_images_as_transformers_does(tmp_path, capsys, kind):
    model_dir = _build(tmp_path / kind, kind)
    _random_vision_weights(model_dir)
    out = tmp_path / "out"
    assert main(["export", "--model", str(model_dir), "--output", str(out), "--type", "f32", "--quant", "none"]) == 0
    assert "--mmproj" in capsys.readouterr().out
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-f32.gguf\nFROM ./mmproj-f32.gguf\n" in modelfile

    _, tokens, tolerance, _ = CASES[kind]
    rgb = _image(kind, 0)
    expected = _oracle(model_dir, rgb)
    got = _mtmd_image_embeddings(out / "model-f32.gguf", out / "mmproj-f32.gguf", rgb, expected.shape[1])
    assert got.shape == expected.shape == (tokens, 64)
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert error < tolerance, error  # measured 3.8e-7 (Gemma 3), 7.0e-5 (Qwen2-VL), 2.4e-5 (Qwen2.5-VL)


def test_gemma3_f16_mmproj_pairs_with_a_quantized_language_model(tmp_path):
    """Any --type but f32 writes the projector in f16 (norms, embeddings and biases f32), which llama.cpp loads."""
    import gguf

    model_dir = build_image_model(tmp_path / "gemma3", "gemma3")
    _random_vision_weights(model_dir)
    out = tmp_path / "out"
    assert main(["export", "--model", str(model_dir), "--output", str(out), "--type", "q8_0", "--quant", "none"]) == 0
    reader = gguf.GGUFReader(out / "mmproj-f16.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["v.blk.0.attn_q.weight"] == types["mm.input_projection.weight"] == "F16"
    assert {types[n] for n in ("v.patch_embd.weight", "v.position_embd.weight", "v.blk.0.ln1.weight",
                               "v.blk.0.attn_q.bias", "mm.soft_emb_norm.weight")} == {"F32"}
    assert not any(name.startswith(("token_embd", "blk.")) for name in types)  # the language model is not in it
    rgb = _image("gemma3", 1)
    expected = _oracle(model_dir, rgb)
    got = _mtmd_image_embeddings(out / "model-q8_0.gguf", out / "mmproj-f16.gguf", rgb, expected.shape[1])
    assert np.abs(got - expected).max() / np.abs(expected).max() < 5e-3  # f16 weights: measured 5.1e-4


@pytest.mark.parametrize("kind, named", [("llava", "LLaVA")])
def test_vlm_without_a_checked_projector_exports_its_language_model_and_says_why(tmp_path, capsys, kind, named):
    model_dir = build_image_model(tmp_path / kind, kind)
    out = tmp_path / "out"
    assert main(["export", "--model", str(model_dir), "--output", str(out), "--type", "f16", "--quant", "none"]) == 0
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["Modelfile", "model-f16.gguf"]
    err = capsys.readouterr().err
    assert "no image projector (mmproj)" in err and named in err
    assert (out / "Modelfile").read_text().count("FROM ") == 1


def test_qwen2_5_vl_language_model_computes_transformers_logits_in_llama_cpp(tmp_path):
    """Qwen2.5-VL's language model as llama.cpp's qwen2vl (M-RoPE sections; text positions are all equal) on a text
    prompt: transformers' logits, with the RMS norm epsilon llama.cpp's qwen2vl loader runs (0)."""
    from transformers import AutoModelForImageTextToText

    model_dir = _build(tmp_path / "qwen2_5_vl", "qwen2_5_vl")
    out = tmp_path / "out"
    assert main(["export", "--model", str(model_dir), "--output", str(out), "--type", "f32", "--quant", "none"]) == 0
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = [1, 17, 42, 99, 7, 123, 55, 8, 200, 31]
    llm = llama_cpp.Llama(model_path=str(out / "model-f32.gguf"), n_ctx=64, n_threads=2, verbose=False, type_k=0,
                          type_v=0, logits_all=True)
    try:
        llm.eval(ids)
        got = np.array(llm.scores[len(ids) - 1])[: model.config.get_text_config().vocab_size]
    finally:
        llm.close()
    with torch.no_grad():
        with_eps = model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
        for module in model.model.language_model.modules():
            if hasattr(module, "variance_epsilon"):
                module.variance_epsilon = 0.0
        expected = model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() / scale < 1e-5  # measured 2.0e-7
    assert np.abs(with_eps - expected).max() / scale > 1e-3  # 1.1e-2: the tiny model's activations feel the epsilon


def test_projector_refusals_come_before_the_language_model_is_written(tmp_path, capsys):
    """A projector llama.cpp would compute differently is refused before the language model is exported: here the
    language model would be refused too, and the projector's reason is the one shown."""
    model_dir = build_image_model(tmp_path / "gemma3", "gemma3")
    file = model_dir / "config.json"
    config = json.loads(file.read_text())
    config["vision_config"]["hidden_act"] = "gelu"  # exact GELU: llama.cpp's projector computes the tanh one
    config["text_config"]["query_pre_attn_scalar"] = 8  # llama.cpp's gemma3 scales by 1/sqrt(head_dim = 16)
    file.write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["export", "--model", str(model_dir), "--output", str(out), "--type", "f16", "--quant", "none"]) == 2
    err = capsys.readouterr().err
    assert "hidden_act is 'gelu'" in err and "query_pre_attn_scalar" not in err and "Traceback" not in err
    assert not out.exists()


def test_a_projector_trained_whole_reaches_the_mmproj(tmp_path):
    """An adapter's projector trained whole (``modules_to_save``) is the one llama.cpp's encoder runs, as PEFT's
    merged model has it. (qlora puts no LoRA on the vision tower: text training never reaches it.)"""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model_dir = build_image_model(tmp_path / "gemma3", "gemma3")
    _random_vision_weights(model_dir)
    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.q_proj",
                        modules_to_save=["multi_modal_projector"])
    peft_model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged_dir = tmp_path / "merged"
    peft_model.merge_and_unload().save_pretrained(merged_dir)
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        if (model_dir / name).is_file():
            (merged_dir / name).write_bytes((model_dir / name).read_bytes())

    out = tmp_path / "out"
    assert main(["export", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--output", str(out),
                 "--type", "f32", "--quant", "none"]) == 0
    rgb = _image("gemma3", 2)
    expected, unadapted = _oracle(merged_dir, rgb), _oracle(model_dir, rgb)
    got = _mtmd_image_embeddings(out / "model-f32.gguf", out / "mmproj-f32.gguf", rgb, expected.shape[1])
    scale = np.abs(expected).max()
    assert np.abs(expected - unadapted).max() / scale > 1e-2  # the adapter changes the embeddings
    assert np.abs(got - expected).max() / scale < 1e-5


# family -> (the template's text for an image, what llama.cpp's prompt has there). mtmd writes the family's image
# start and end tokens around its marker itself (Gemma 3's processor also adds blank lines around them).
IMAGE_SPANS = {"gemma3": ("<start_of_image>", "\n\n{marker}\n\n"),
               "qwen2_vl": ("<|vision_start|><|image_pad|><|vision_end|>", "{marker}"),
               "qwen2_5_vl": ("<|vision_start|><|image_pad|><|vision_end|>", "{marker}")}


@pytest.mark.parametrize("kind", list(CASES))
def test_llama_cpp_greedy_tokens_with_an_image_equal_transformers_generate(tmp_path, kind):
    """The exported pair in llama.cpp (prompt tokens, image embeddings in place, Gemma 3's bidirectional attention
    over the image, Qwen2-VL's and Qwen2.5-VL's M-RoPE positions) generates transformers' greedy tokens."""
    from PIL import Image

    from image_models import oracle_processor, render

    model_dir = _build(tmp_path / kind, kind)
    _random_vision_weights(model_dir)
    _small_rope_base(model_dir)
    out = tmp_path / "out"
    assert main(["export", "--model", str(model_dir), "--output", str(out), "--type", "f32", "--quant", "none"]) == 0

    processor = oracle_processor(model_dir)
    text = render(processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}],
                  add_generation_prompt=True)
    rgb = _image(kind, 3)
    inputs = processor(text=[text], images=[Image.fromarray(rgb)], add_special_tokens=False, return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].half().float()
    model = _rounded_model(model_dir)
    model.generation_config.eos_token_id = None
    ids = inputs["input_ids"][0].tolist()
    expected = model.generate(**inputs, do_sample=False, max_new_tokens=12)[0, len(ids):].tolist()
    image_id = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    assert ids.count(image_id) == CASES[kind][1]

    with _mtmd(out / "model-f32.gguf", out / "mmproj-f32.gguf") as (llm, ctx):
        span, replacement = IMAGE_SPANS[kind]
        assert text.count(span) == 1
        prompt = text.replace(span, replacement.format(marker=mtmd.mtmd_default_marker().decode()))
        chunks, parts = _chunks(ctx, prompt, rgb)
        image = next(c for c in parts if _is_image(c))
        assert mtmd.mtmd_encode_chunk(ctx, image) == 0
        n_embd = model.config.get_text_config().hidden_size
        embedded = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(ctx), shape=(CASES[kind][1] * n_embd,)).copy()
        seen = []
        for c in parts:
            if _is_image(c):
                seen += [image_id] * mtmd.mtmd_input_chunk_get_n_tokens(c)
            else:
                n = ctypes.c_size_t()
                tokens = mtmd.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
                seen += [tokens[i] for i in range(n.value)]
        assert seen == ids  # the same prompt, token for token
        lctx, n_past = llm._ctx.ctx, llama_cpp.llama_pos(0)
        assert mtmd.mtmd_helper_eval_chunks(ctx, lctx, chunks, 0, 0, 64, True, ctypes.byref(n_past)) == 0
        mtmd.mtmd_input_chunks_free(chunks)
        batch = llama_cpp.llama_batch_init(1, 0, 1)
        got, pos = [], n_past.value  # text after an image continues at mtmd's position (M-RoPE: not the token count)
        try:
            for _ in range(len(expected)):
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(lctx, -1), shape=(llm.n_vocab(),))
                if not got:
                    last = logits[: model.config.get_text_config().vocab_size].copy()
                got.append(int(logits.argmax()))
                batch.n_tokens, batch.token[0], batch.pos[0] = 1, got[-1], pos
                batch.n_seq_id[0], batch.seq_id[0][0], batch.logits[0] = 1, 0, True
                assert llama_cpp.llama_decode(lctx, batch) == 0
                pos += 1
        finally:
            llama_cpp.llama_batch_free(batch)
    assert got == expected
    # the prompt's last logits, transformers given the image embeddings llama.cpp computed: the image in place, its
    # attention (Gemma 3's bidirectional), its positions (Qwen2-VL's M-RoPE) and the text model agree
    with torch.no_grad(), _image_features(model, torch.from_numpy(embedded)):
        first = model(**inputs).logits[0, -1].numpy()
        if _mrope(model.config):  # the image's positions matter here: the text positions would give other logits
            plain = model(**inputs, position_ids=torch.arange(len(ids))[None]).logits[0, -1].numpy()
    scale = np.abs(first).max()
    tolerance = CASES[kind][3]
    assert np.abs(last - first).max() / scale < tolerance  # measured 3.8e-4 (Gemma 3), 3.0e-7 (Qwen2-VL), 2.3e-7
    if _mrope(model.config):
        assert np.abs(plain - first).max() / scale > 100 * tolerance  # measured 9.7e-3 (Qwen2-VL), 7.4e-3


def test_unreadable_image_processor_settings_are_refused_naming_the_file(tmp_path, capsys):
    """The mean and std llama.cpp normalizes pixels with come from the model folder: a file there that is not
    JSON is an error naming it, with nothing written."""
    model_dir = build_image_model(tmp_path / "gemma3", "gemma3")
    settings = next(model_dir / n for n in ("preprocessor_config.json", "processor_config.json")
                    if (model_dir / n).is_file())
    settings.write_text('{"image_mean": [0.5, 0.5, 0.5],')
    out = tmp_path / "out"
    assert main(["export", "--model", str(model_dir), "--output", str(out), "--type", "f16", "--quant", "none"]) == 2
    err = capsys.readouterr().err
    assert str(settings) in err and "not valid JSON" in err and "Traceback" not in err
    assert not out.exists()


def test_mrope_sections_llama_cpp_cannot_read_are_refused(tmp_path, capsys):
    """llama.cpp's qwen2vl rotates three contiguous sections covering all rotated pairs: other sections are
    refused before anything is written."""
    model_dir = build_image_model(tmp_path / "qwen2_vl", "qwen2_vl")
    file = model_dir / "config.json"
    config = json.loads(file.read_text())
    config["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 2]  # 7 of the 8 pairs of a 16-dim head
    file.write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["export", "--model", str(model_dir), "--output", str(out), "--type", "f16", "--quant", "none"]) == 2
    err = capsys.readouterr().err
    assert "mrope_section is [2, 3, 2]" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("change, named", [
    (dict(window_size=56), "window_size is 56"),  # llama.cpp's windows are 112 pixels whatever the file says
    (dict(fullatt_block_indexes=[0]), "fullatt_block_indexes is [0]"),  # full, then window: not every n-th block
    (dict(hidden_act="gelu_pytorch_tanh"), "hidden_act is 'gelu_pytorch_tanh'"),  # llama.cpp's graph runs SiLU
    (dict(spatial_merge_size=1), "spatial_merge_size is 1"),  # its graph merges 2x2 patches
])
def test_qwen2_5_vl_towers_llama_cpp_computes_differently_are_refused(tmp_path, capsys, change, named):
    """Qwen2.5-VL tower settings llama.cpp's qwen2.5vl encoder hard-codes otherwise are refused, naming the setting,
    before anything is written."""
    model_dir = build_image_model(tmp_path / "qwen2_5_vl", "qwen2_5_vl", vision={**QWEN25_VISION, **change})
    out = tmp_path / "out"
    assert main(["export", "--model", str(model_dir), "--output", str(out), "--type", "f16", "--quant", "none"]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err
    assert not out.exists()
