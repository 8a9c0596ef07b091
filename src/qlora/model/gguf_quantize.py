"""llama.cpp's own quantizer for the GGUF types Python cannot write (k-quants such as ``q4_k_m``).

``gguf-py`` encodes only f32/f16/bf16/q8_0 here; the k-quants (and llama.cpp's
per-tensor mixes like ``Q4_K_M``, which keep some tensors at higher precision)
exist only in llama.cpp's C code. Rather than re-implement them approximately,
qlora writes the f16 file and hands it to ``llama_model_quantize`` from
llama-cpp-python, the same routine ``llama-quantize`` runs, so the result is the
file llama.cpp would have made. Tensors whose rows are not a multiple of 256
get llama.cpp's own fallback type, as with ``llama-quantize``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from ..errors import UsageError

# qlora's --type name -> llama.cpp's LLAMA_FTYPE_MOSTLY_* suffix
LLAMA_CPP_TYPES: dict[str, str] = {
    "q2_k": "Q2_K", "q3_k_s": "Q3_K_S", "q3_k_m": "Q3_K_M", "q3_k_l": "Q3_K_L",
    "q4_0": "Q4_0", "q4_1": "Q4_1", "q4_k_s": "Q4_K_S", "q4_k_m": "Q4_K_M",
    "q5_0": "Q5_0", "q5_1": "Q5_1", "q5_k_s": "Q5_K_S", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K",
}


def require_llama_cpp():
    """llama-cpp-python's module, or a one-paragraph way forward without it."""
    try:
        import llama_cpp
    except ImportError:
        raise UsageError("--type k-quants (q4_k_m, q5_k_m, q6_k, ...) are made by llama.cpp's own quantizer, "
                         "which qlora calls through llama-cpp-python: pip install llama-cpp-python (it builds "
                         "llama.cpp, a few minutes). Or export --type f16 and run llama.cpp's "
                         "`llama-quantize model-f16.gguf model-q4_k_m.gguf Q4_K_M` yourself.") from None
    return llama_cpp


def quantize_gguf(source: str | Path, target: str | Path, out_type: str, threads: int | None = None) -> Path:
    """Quantize the f16/bf16/f32 GGUF ``source`` to ``out_type`` (a key of ``LLAMA_CPP_TYPES``) at ``target``.

    ``target`` appears only once complete: llama.cpp writes a ``.partial`` sibling that is renamed.
    """
    if out_type not in LLAMA_CPP_TYPES:
        raise UsageError(f"unknown llama.cpp quantization {out_type!r}; choose from {', '.join(LLAMA_CPP_TYPES)}")
    llama_cpp = require_llama_cpp()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{LLAMA_CPP_TYPES[out_type]}", None)
    if ftype is None:
        raise UsageError(f"the installed llama-cpp-python has no {LLAMA_CPP_TYPES[out_type]} quantization; "
                         f"upgrade it (pip install -U llama-cpp-python) or choose another --type")
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads or os.cpu_count() or 1
    try:
        with _quiet_llama_cpp():
            status = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params)
        if status != 0 or not partial.is_file():
            raise RuntimeError(f"llama.cpp could not quantize {source} to {LLAMA_CPP_TYPES[out_type]} "
                               f"(llama_model_quantize returned {status})")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


@contextlib.contextmanager
def _quiet_llama_cpp():
    """Show only llama.cpp's errors, not its per-tensor lines (hundreds for a real model).

    llama-cpp-python routes llama.cpp's log through the ``llama-cpp-python`` logger; its level decides.
    Set ``QLORA_LLAMA_CPP_LOG=1`` to see everything.
    """
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    if not os.environ.get("QLORA_LLAMA_CPP_LOG"):
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
