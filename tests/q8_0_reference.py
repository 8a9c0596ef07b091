"""The weights a q8_0 GGUF holds, put back into a model (test helper): llama.cpp's q8_0 logits are compared with
this model, not only with the float one, so the tolerance covers llama.cpp's activation rounding alone."""

from __future__ import annotations

import torch


def q8_0_round_trip(model: torch.nn.Module) -> None:
    """Round-trip, in place, every matrix the export writes as q8_0 through gguf's q8_0 (``gguf.quants``), along
    the rows llama.cpp stores (a weight applied as ``x @ W`` is quantized transposed); rows that are not a multiple
    of 32 values go through f16 as the export's fallback does. Norms, biases, routers and position tables (f32 in
    the file) stay."""
    from qlora.model.gguf_arch import arch_spec, tensor_namer
    from qlora.model.gguf_export import KEEP_F32
    from qlora.nn import experts_layout

    config = model.config.get_text_config()
    spec = arch_spec(config)
    name_of = tensor_namer(config, spec)
    stacked = {}  # expert weight key -> (applied as x @ W_e, rows per expert of a 2-D stack)
    for name, module in model.named_modules():
        layout = experts_layout(module)
        if layout is not None:
            for weight in layout.names:
                stacked[f"{name}.{weight}"] = (layout.applied_transposed(weight), layout.rows)
    with torch.no_grad():
        for key, p in model.state_dict(keep_vars=True).items():
            found = name_of(key) or ("output.weight" if key == "lm_head.weight" else None)
            if p.dim() < 2 or (found is None and key not in stacked) or (found and found.split(".")[-2] in KEEP_F32):
                continue
            transposed, rows = stacked.get(key, (bool(spec.transpose) and key.endswith(spec.transpose), 0))
            w = p.detach().float()
            w = w.reshape(-1, rows, w.shape[-1]) if rows else w
            w = _q8_0(w.transpose(-1, -2)).transpose(-1, -2) if transposed else _q8_0(w)
            p.copy_(w.reshape(p.shape))


def _q8_0(w: torch.Tensor) -> torch.Tensor:
    import gguf

    q = gguf.GGMLQuantizationType.Q8_0
    if w.shape[-1] % gguf.GGML_QUANT_SIZES[q][0]:
        return w.half().float()
    data = gguf.quants.dequantize(gguf.quants.quantize(w.contiguous().numpy(), q), q)
    return torch.from_numpy(data.copy()).reshape(w.shape)
