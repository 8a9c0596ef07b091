"""Adapters loaded into and unloaded from a running server (vLLM's runtime LoRA updating).

``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter`` (served with ``--allow-adapter-updates``)
change the model the continuous batcher decodes, so each change happens while the batcher is paused between
two steps: no forward ever sees an adapter half loaded or half deleted. A load adds only the adapter's own
tensors beside the others, and its own copies of the modules it trained whole (``modules_to_save``), as an
``--adapter`` beside others has them; an adapter that would write the shared base (trainable token rows,
trained biases, whole tensors its config does not name, a vocabulary of another size) is refused, since every
other adapter and the base would then run with its weights. An unload of an adapter with requests running or waiting is refused with a
409 rather than waiting for them, so the call never hangs on a long reply; retry once they are done.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict

from ..errors import UsageError
from ..infer.batcher import ContinuousBatcher
from ..model.adapter_io import load_adapter, read_adapter_config, read_adapter_weights
from ..model.adapter_tensors import PEFT_PREFIX
from ..model.chat_format import ChatFormat
from ..model.image_pixels import PixelBounds
from ..model.inject import adapter_configs
from ..model.multi_adapter import discard_adapter
from ..model.quantize import matches_any
from ..nn.adapter_name import adapter_name_problem
from .protocol import APIError


class LoadAdapterRequest(BaseModel):
    """vLLM's body of ``POST /v1/load_lora_adapter``."""

    model_config = ConfigDict(strict=True)  # as the other bodies: a value of the wrong JSON type is a 400
    lora_name: str
    lora_path: str


class UnloadAdapterRequest(BaseModel):
    """vLLM's body of ``POST /v1/unload_lora_adapter`` (its ``lora_int_id`` is not needed here)."""

    model_config = ConfigDict(strict=True)
    lora_name: str
    lora_int_id: int | None = None


def check_lora_name(name: str) -> None:
    """Refuse a ``lora_name`` that cannot key the adapter layers, or that is no one-line model id (control
    characters would break the log lines and the ``model`` field that name it).

    Raises:
        APIError: 400 naming the problem.
    """
    problem = adapter_name_problem(name) or (None if name.isprintable() else "it holds control characters")
    if problem:
        raise APIError(400, f"{name!r} cannot name an adapter: {problem}; choose another lora_name (letters, digits, "
                            "'-' and '_').", "lora_name")


def adapter_folder(lora_path: str) -> Path:
    """``lora_path`` as a folder (a relative one from the server's working directory, ``~`` expanded), or a 400
    for an empty one and a 404 naming one that is no folder."""
    if not lora_path.strip():
        raise APIError(400, "'lora_path' is empty; give the folder the adapter was saved to.", "lora_path")
    folder = Path(lora_path).expanduser()
    if not folder.is_dir():
        raise APIError(404, f"The adapter path {lora_path!r} is not a folder on the server; give the folder the "
                            "adapter was saved to (adapter_config.json, adapter_model.safetensors).", "lora_path",
                       "adapter_not_found")
    return folder


def attach(batcher: ContinuousBatcher, folder: Path, name: str,
           settings: Callable[[Path], tuple[ChatFormat | None, PixelBounds]]) -> tuple[ChatFormat | None, PixelBounds]:
    """Load the adapter in ``folder`` as ``name`` onto the batcher's model, between two decode steps.

    Args:
        settings: gives the folder's chat format and pixel bounds, read before the model is touched (so a bad
            file of them leaves it as it was).

    Returns:
        The adapter's chat format and pixel bounds.

    Raises:
        APIError: 400 naming why the adapter does not fit this model (files, shapes, modules it lacks) or
            would write the shared base; 503 once the server is shutting down; the model is left as it was.
    """
    try:
        chat_format, bounds = settings(folder)
        config, tensors = read_adapter_config(folder), read_adapter_weights(folder)
        vocabulary = _saved_vocabulary(folder)
        with batcher.paused():  # the model read and changed while no other load or unload changes it
            if batcher.closed:  # the server began to shut down while the folder was read
                raise _shutting_down()
            _refuse_base_writes(batcher, config, tensors, vocabulary)
            if name in adapter_configs(batcher.model):  # the routes never attach a name twice; never discard one
                raise UsageError(f"the model already has an adapter named {name!r}")
            try:
                load_adapter(batcher.model, folder, adapter_name=name, files=(config, tensors))
            except BaseException:  # failed midway (a tensor of another shape): the model is put back as it was
                discard_adapter(batcher.model, name)
                raise
            batcher.model.eval()  # its new layers too (no dropout when serving)
    except UsageError as exc:
        raise APIError(400, f"Cannot load {str(folder)!r} as {name!r}: {exc}", "lora_path") from None
    return chat_format, bounds


def detach(batcher: ContinuousBatcher, name: str) -> None:
    """Delete adapter ``name`` from the batcher's model between two decode steps, freeing its tensors.

    Raises:
        APIError: 409 while requests for it are running or waiting; 400 for an adapter that cannot be
            deleted (one that trained base modules in place); 503 once the server is shutting down.
    """
    if batcher.closed:
        raise _shutting_down()
    try:
        busy = batcher.unload(name)
    except UsageError as exc:
        raise APIError(400, str(exc), "lora_name") from None
    if busy:
        raise APIError(409, f"The adapter {name!r} has {busy} request(s) running or waiting; it stays loaded. "
                            "Retry the unload once they are done.", "lora_name", "adapter_in_use")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # give the freed blocks back, as a restart without the adapter would have them


def _shutting_down() -> APIError:
    return APIError(503, "The server is shutting down; the adapters stay as they were.", kind="server_error",
                    code="server_shutdown")


def _refuse_base_writes(batcher: ContinuousBatcher, config: dict, tensors: dict[str, torch.Tensor],
                       vocabulary: int | None) -> None:
    """Refuse an adapter (its ``config``, ``tensors`` and saved tokenizer's ``vocabulary`` size) whose load would
    change the base model shared by the server's other adapters. Called with the batcher paused: it walks the
    model's parameters, which another load or unload would change under it.

    Raises:
        UsageError: naming what it would write (or the vocabulary it was trained with).
    """
    if config.get("target_parameters"):
        raise UsageError("it adapts expert weights (target_parameters), which per-request adapters do not cover")
    if config.get("peft_type") == "ADALORA":
        raise UsageError("it is an AdaLoRA adapter, which qlora loads only onto a model without other adapters; "
                         "give it first with --adapter at start")
    model = batcher.model
    params = dict(model.named_parameters())
    whole = config.get("modules_to_save") or []  # loaded as the adapter's own copies (qlora.nn.SavedModules)
    for key, value in tensors.items():
        if ".lora_" in key:
            continue  # the adapter's own tensors
        path = key[len(PEFT_PREFIX):]
        if ".original_module." in key or ".modules_to_save." in key:  # PEFT's copies of a module saved whole
            _check_copy(params, path.replace(".original_module.", ".").replace(".modules_to_save.", "."), value)
            continue
        if matches_any(path.rpartition(".")[0], whole):
            _check_copy(params, path, value)
            continue
        if ".base_layer." in path:  # the base table PEFT saves beside an adapted embedding: fine if it is ours
            own = params.get(path, params.get(path.replace(".base_layer.", ".", 1)))
            if own is not None and own.shape == value.shape and torch.equal(own, value.to(own.dtype)):
                continue
        what = "new token rows (trainable_token_indices)" if ".token_adapter." in key else f"the base's {path}"
        raise UsageError(f"it trains {what} in the base model itself, which every adapter served here shares; "
                         "serve it from its own qlora serve (--adapter at start) or merge it (qlora merge)")
    if vocabulary is not None and vocabulary != len(batcher.tokenizer):
        raise UsageError(f"it was trained with a tokenizer of {vocabulary} tokens, this server's has "
                         f"{len(batcher.tokenizer)}; serve it from its own qlora serve")


def _check_copy(params: dict[str, torch.Tensor], path: str, value: torch.Tensor) -> None:
    """Refuse an adapter's own copy of a module trained whole whose tensor ``path`` has another shape than the
    base's (an lm_head of another vocabulary): loading it would resize the shared base to fit.

    Raises:
        UsageError: naming both shapes.
    """
    module, _, leaf = path.rpartition(".")
    own = params.get(path, params.get(f"{module}.original_module.{leaf}"))  # already copied for another adapter
    if own is not None and own.shape != value.shape:
        raise UsageError(f"its copy of {module} (trained whole, modules_to_save) has {leaf} of shape "
                         f"{tuple(value.shape)}, this model's has {tuple(own.shape)}: it was trained on another base "
                         "or vocabulary, and loading it would resize the base model every adapter served here shares; "
                         "serve it from its own qlora serve")


def _saved_vocabulary(folder: Path) -> int | None:
    """The size of the tokenizer saved with the adapter, or None when it saved none."""
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()):
        return None
    from ..model.load import load_tokenizer

    return len(load_tokenizer(folder))
