"""Checkpoints that ship PyTorch pickles (``pytorch_model.bin``, sharded or not, zip or legacy format)
load as their safetensors twin does; safetensors win when both are there; a pickle that holds
anything but tensors, or a truncated one, is refused with the file named."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from qlora.errors import UsageError
from qlora.model.load import load_model

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 31]])


def _logits(folder, quant="nf4"):
    model, _ = load_model(folder, quant=quant, compute_dtype=torch.float32, device="cpu")
    with torch.no_grad():
        return model(IDS).logits


def _pickled_copy(src, dst, shards: int = 1, legacy: bool = False):
    """``src`` with its safetensors replaced by ``shards`` pytorch_model*.bin files."""
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    names = sorted(state)
    if shards == 1:
        torch.save(state, dst / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        return dst
    weight_map = {}
    for k in range(shards):
        part = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        chunk = {n: state[n] for n in names[k::shards]}
        torch.save(chunk, dst / part, _use_new_zipfile_serialization=not legacy)
        weight_map.update({n: part for n in chunk})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.mark.parametrize("shards,legacy", [(1, False), (3, False), (2, True)])
def test_pickled_checkpoints_load_as_their_safetensors_twin(tiny_model_dir, tmp_path, shards, legacy):
    pickled = _pickled_copy(tiny_model_dir, tmp_path / "bin", shards, legacy)
    assert torch.equal(_logits(pickled), _logits(tiny_model_dir))
    assert torch.equal(_logits(pickled, quant=None), _logits(tiny_model_dir, quant=None))


def test_safetensors_are_read_when_both_kinds_are_there(tiny_model_dir, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(tiny_model_dir, both)
    state = load_file(both / "model.safetensors")
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, both / "pytorch_model.bin")
    assert torch.equal(_logits(both), _logits(tiny_model_dir))


def test_a_pickle_with_more_than_tensors_is_refused_naming_the_file(tiny_model_dir, tmp_path):
    bad = _pickled_copy(tiny_model_dir, tmp_path / "bad")
    torch.save({"step": 3, "model": load_file(tiny_model_dir / "model.safetensors")}, bad / "pytorch_model.bin")
    with pytest.raises(UsageError, match="pytorch_model.bin does not hold a state dict"):
        load_model(bad, device="cpu")

    # any other class: weights_only unpickling refuses to build it, so no code in the file runs
    torch.save({"w": argparse.Namespace(x=1)}, bad / "pytorch_model.bin")
    with pytest.raises(UsageError, match="pytorch_model.bin holds Python objects besides tensors"):
        load_model(bad, device="cpu")


def test_a_truncated_pickle_is_refused_before_any_tensor_is_read(tiny_model_dir, tmp_path):
    cut = _pickled_copy(tiny_model_dir, tmp_path / "cut")
    data = (cut / "pytorch_model.bin").read_bytes()
    (cut / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="pytorch_model.bin could not be read as PyTorch weights"):
        load_model(cut, device="cpu")


def test_a_folder_without_weights_says_what_it_looked_for(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty"
    shutil.copytree(tiny_model_dir, empty)
    (empty / "model.safetensors").unlink()
    with pytest.raises(UsageError, match="no model.safetensors, model.safetensors.index.json, pytorch_model.bin"):
        load_model(empty, device="cpu")
