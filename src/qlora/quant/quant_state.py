"""QuantState: everything needed to turn packed 4-bit codes back into a tensor.

Its serialized form is bitsandbytes' ``QuantState.as_dict(packed=True)``, key
for key and byte for byte, so 4-bit checkpoints written by transformers +
bitsandbytes load here and ours load there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch

def _pack_json(obj: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)


def _unpack_json(t: torch.Tensor) -> dict[str, Any]:
    return json.loads(bytes(t.cpu().numpy()).decode("utf-8"))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass
class NestedState:
    """Second-level state of double quantization: the 8-bit codes' block absmax."""

    absmax: torch.Tensor  # float32, one per block of ``blocksize`` 8-bit codes
    code: torch.Tensor  # the signed dynamic code (256 float32)
    blocksize: int = 256
    dtype: torch.dtype = torch.float32


@dataclass
class QuantState:
    """State of one 4-bit tensor.

    Without double quantization ``absmax`` holds one float32 per block. With it,
    ``absmax`` holds uint8 codes of ``absmax_fp32 - offset`` and ``nested`` the
    constants to decode them (see :mod:`qlora.quant.double_quant`).
    """

    absmax: torch.Tensor
    shape: torch.Size
    code: torch.Tensor
    blocksize: int
    quant_type: str
    dtype: torch.dtype
    offset: torch.Tensor | None = None
    nested: NestedState | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def double_quant(self) -> bool:
        return self.nested is not None

    def to(self, device: torch.device | str) -> "QuantState":
        """A copy with every tensor on ``device``."""
        nested = None
        if self.nested is not None:
            nested = NestedState(self.nested.absmax.to(device), self.nested.code.to(device),
                                 self.nested.blocksize, self.nested.dtype)
        return QuantState(
            absmax=self.absmax.to(device), shape=self.shape, code=self.code.to(device),
            blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.dtype,
            offset=None if self.offset is None else self.offset.to(device), nested=nested,
        )

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """bitsandbytes' layout. ``packed=True`` gives tensors only (for
        safetensors): the non-tensor items go into one uint8 JSON tensor under
        ``quant_state.bitsandbytes__<quant_type>``."""
        d: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape),
        }
        if self.nested is not None:
            assert self.offset is not None
            d.update({
                "nested_absmax": self.nested.absmax,
                "nested_blocksize": self.nested.blocksize,
                "nested_quant_map": self.nested.code.clone(),
                "nested_dtype": _dtype_name(self.nested.dtype),
                "nested_offset": self.offset.item(),
            })
        if not packed:
            return d
        tensors = {k: v for k, v in d.items() if isinstance(v, torch.Tensor)}
        rest = {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}
        tensors[f"quant_state.bitsandbytes__{self.quant_type}"] = _pack_json(rest)
        return tensors

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device | str = "cpu") -> "QuantState":
        """Inverse of :meth:`as_dict`; accepts packed or unpacked dicts, with
        or without a module prefix on the keys (``weight.absmax`` ...)."""
        flat: dict[str, Any] = {}
        for key, value in d.items():
            if "quant_state.bitsandbytes__" in key:
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"{key} must be a uint8 tensor holding JSON")
                flat.update(_unpack_json(value))
            else:
                flat[key.split(".")[-1]] = value
        missing = [k for k in ("absmax", "quant_map", "quant_type", "blocksize", "dtype", "shape") if k not in flat]
        if missing:
            raise ValueError(f"quantization state is missing {', '.join(missing)}; found keys {sorted(d)}")
        nested_keys = ("nested_absmax", "nested_quant_map", "nested_blocksize", "nested_dtype", "nested_offset")
        present = [k for k in nested_keys if k in flat]
        if present and len(present) < len(nested_keys):
            raise ValueError(f"double-quantization state is missing "
                             f"{', '.join(k for k in nested_keys if k not in flat)}; found keys {sorted(d)}")
        if not present and flat["absmax"].dtype == torch.uint8:
            raise ValueError("absmax holds 8-bit codes (double quantization) but the nested state that decodes "
                             f"them is missing; found keys {sorted(d)}")
        nested = offset = None
        if present:
            offset = torch.tensor(float(flat["nested_offset"]), device=device)
            nested = NestedState(
                absmax=flat["nested_absmax"].to(device),
                code=flat["nested_quant_map"].to(device),
                blocksize=int(flat["nested_blocksize"]),
                dtype=getattr(torch, flat["nested_dtype"]),
            )
        return cls(
            absmax=flat["absmax"].to(device),
            shape=torch.Size(flat["shape"]),
            code=flat["quant_map"].to(device),
            blocksize=int(flat["blocksize"]),
            quant_type=str(flat["quant_type"]),
            dtype=getattr(torch, flat["dtype"]),
            offset=offset,
            nested=nested,
        )


def bits_per_parameter(state: QuantState) -> float:
    """Storage bits per weight, constants included: 4 for the code plus the
    absmax per block (32 bits, or 8 bits plus 32 per nested block with double
    quantization). NF4, block 64: 4.5 without, 4.127 with double quantization."""
    numel = state.shape.numel()
    bits = 4.0 * numel
    bits += state.absmax.numel() * state.absmax.element_size() * 8
    if state.nested is not None:
        bits += state.nested.absmax.numel() * 32 + 32  # nested absmax + the offset
    return bits / numel
