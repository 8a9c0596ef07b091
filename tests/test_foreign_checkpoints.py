"""Checkpoints in layouts transformers does not read (GGUF, Meta's and Mistral's originals, other file names) are
refused saying what they are and how to get a transformers folder, by the CLI before its imports and by
``load_model``; the layouts transformers reads (safetensors preferred over pickles, pickles alone) load."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import qlora
from qlora.errors import UsageError

from cli_exit import cli_exit

_GGUF_HEADER = b"GGUF\x03\x00\x00\x00" + bytes(16)  # magic, version 3, no tensors, no metadata


def _weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def _without_weights(tiny_model_dir, folder, config: bool = True):
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    if not config:
        (folder / "config.json").unlink()
    return folder


def _meta_original(tiny_model_dir, tmp_path):
    folder = _without_weights(tiny_model_dir, tmp_path / "original", config=False)
    torch.save(_weights(tiny_model_dir), folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    return folder, ["Meta's original checkpoint layout (consolidated.00.pth)", "convert_llama_weights_to_hf.py"]


def _mistral_own(tiny_model_dir, tmp_path):
    folder = _without_weights(tiny_model_dir, tmp_path / "mistral")  # config.json kept, as the repositories have it
    shutil.copy(tiny_model_dir / "model.safetensors", folder / "consolidated.safetensors")
    return folder, ["Mistral's own checkpoint layout (consolidated.safetensors)", "convert_mistral_weights_to_hf.py"]


def _gguf_folder(tiny_model_dir, tmp_path):
    folder = _without_weights(tiny_model_dir, tmp_path / "gguf", config=False)
    (folder / "model-Q4_K_M.gguf").write_bytes(_GGUF_HEADER)
    return folder, ["It holds model-Q4_K_M.gguf: GGUF is llama.cpp's format",
                    "gguf_file='model-Q4_K_M.gguf'"]


def _gguf_file(tiny_model_dir, tmp_path):
    folder, words = _gguf_folder(tiny_model_dir, tmp_path)
    return folder / "model-Q4_K_M.gguf", ["model-Q4_K_M.gguf is a GGUF file", *words[1:]]


def _other_name(tiny_model_dir, tmp_path):
    folder = _without_weights(tiny_model_dir, tmp_path / "pt")
    torch.save(_weights(tiny_model_dir), folder / "model.pt")
    torch.save({}, folder / "optimizer.pt")  # a Trainer's file beside it is no weights of the model
    return folder, ["It holds model.pt, weights under a file name transformers does not read", "save_pretrained"]


@pytest.mark.parametrize("shape", [_meta_original, _mistral_own, _gguf_folder, _gguf_file, _other_name])
def test_layouts_transformers_does_not_read_are_named_with_the_way_out(shape, tiny_model_dir, tmp_path, capsys):
    model, words = shape(tiny_model_dir, tmp_path)
    with pytest.raises(UsageError) as err:
        qlora.load_model(model, device="cpu")
    assert all(w in str(err.value) for w in words), str(err.value)
    assert "optimizer.pt" not in str(err.value)
    code, stderr = cli_exit(["generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "1"], capsys)
    assert code == 2 and all(w in " ".join(stderr.split()) for w in words) and "Traceback" not in stderr, stderr
    if not (model / "config.json").is_file():  # estimate needs only that, and reads one given alone
        code, stderr = cli_exit(["estimate", "--model", str(model)], capsys)
        assert code == 2 and words[0] in " ".join(stderr.split()) and "Traceback" not in stderr, stderr


def test_pickled_weights_load_and_safetensors_beside_them_win(tiny_model_dir, tmp_path):
    """A folder with only pytorch_model.bin loads it (torch.load weights_only); with model.safetensors beside
    it, the safetensors are read, as transformers prefers them."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 17, 42, 99, 7]])
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        expected = reference(ids).logits
    pickled = _without_weights(tiny_model_dir, tmp_path / "bin")
    torch.save(_weights(tiny_model_dir), pickled / "pytorch_model.bin")
    both = tmp_path / "both"
    shutil.copytree(tiny_model_dir, both)
    torch.save({k: torch.zeros_like(v) for k, v in _weights(tiny_model_dir).items()}, both / "pytorch_model.bin")
    for folder in (pickled, both):
        model, _ = qlora.load_model(folder, quant=None, compute_dtype=torch.float32, device="cpu")
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
