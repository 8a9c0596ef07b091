"""Linear4bit: a frozen linear layer whose weight lives in 4 bits.

The packed codes and the quantization constants are buffers, not parameters,
so optimizers never see them and ``.to(device)`` moves them. For FSDP2, which
shards parameters only, :meth:`Linear4bit.make_shardable` turns them into
frozen parameters whose bytes are stored as float elements (bitsandbytes'
``quant_storage`` trick); gathered, they are the same bytes as before. The forward pass
dequantizes the weight to the compute dtype just before the matmul; the
backward pass dequantizes it again to form the input gradient. Nothing but
the 4-bit data is kept between the two (see :class:`_Linear4bitFunction`).
For decoding (inference on CUDA, at most 4 input rows) the forward pass is
instead one fused Triton GEMV that reads the packed bytes once and never
forms the dense weight (:mod:`qlora.quant.kernels.triton_gemv`).

The state-dict layout is transformers' bitsandbytes-4bit layout
(``weight``, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..float_dtype import float_dtype
from ..quant import QuantState, dequantize_4bit, quantize_4bit
from ..quant.fourbit import stored_sizes
from ..quant.quant_state import NestedState

class _StateDictPath:
    """Resolves the dotted suffixes of a Linear4bit state-dict key by attribute.

    ``torch.distributed.checkpoint`` maps each state-dict key to the module
    tree with ``getattr`` part by part; the bitsandbytes keys
    (``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``, ...) name no
    attribute of the weight tensor. Linear4bit's ``_fqn_modifiers`` (the hook
    DCP provides for modules whose keys differ from their attributes) points
    ``weight`` here, and every part of those keys resolves to this object.
    """

    def __init__(self, parts: frozenset[str]) -> None:
        self._parts = parts

    def __getattr__(self, name: str) -> "_StateDictPath":
        if name.startswith("__") or name not in self._parts:
            raise AttributeError(name)
        return self


def autocast_on(x: torch.Tensor) -> bool:
    """Whether autocast applies to ``x``; never on ``meta``, which has no autocast (and raises when asked),
    where :mod:`qlora.model.saved_activations` runs these layers to measure what they save."""
    return x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)


class _Linear4bitFunction(torch.autograd.Function):
    """``y = x @ dequant(W)^T + b`` that saves no 16-bit weight for backward. The bias is an input,
    so it gets a gradient when trained (PEFT's ``bias="all"``); the 4-bit weight never does."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, layer: "Linear4bit") -> torch.Tensor:
        w = layer.dequantize(x.dtype)
        ctx.layer = layer
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = ctx.layer.dequantize(grad_out.dtype)
            grad_x = grad_out @ w
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.layer.bias.dtype)
        return grad_x, grad_bias, None


class Linear4bit(nn.Module):
    """Frozen 4-bit linear layer (NF4 or FP4, optional double quantization).

    Args:
        in_features, out_features: the dense shape (weight is ``[out, in]``).
        bias: keep a (frozen) bias in ``compute_dtype``.
        compute_dtype: dtype of the dequantized weight and the matmul (a torch float dtype or its name).
        quant_type, blocksize, double_quant: as in :func:`qlora.quant.quantize_4bit`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | str = torch.bfloat16,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        compute_dtype = float_dtype(compute_dtype, "compute_dtype")  # "bfloat16", "bf16": as load_model takes it
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.quant_type = quant_type
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.quant_dtype = compute_dtype  # dtype recorded in the QuantState
        self.from_conv1d = False  # quantized from a transposed GPT-2 Conv1D
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        self.register_buffer("weight", torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8 if double_quant else torch.float32, device=device))
        self.register_buffer("quant_map", torch.zeros(16, dtype=torch.float32, device=device))
        if double_quant:
            self.register_buffer("nested_absmax", torch.zeros(-(-n_blocks // 256), dtype=torch.float32, device=device))
            self.register_buffer("nested_quant_map", torch.zeros(256, dtype=torch.float32, device=device))
            self.register_buffer("offset", torch.zeros((), dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False) if bias else None
        self._storage: dict[str, tuple[torch.dtype, torch.Size, int]] = {}  # name -> (dtype, shape, bytes)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | str = torch.bfloat16,
        transposed: bool = False,
    ) -> "Linear4bit":
        """Quantize a dense layer. ``transposed`` is for GPT-2's Conv1D,
        whose weight is stored ``[in, out]``."""
        weight = linear.weight.detach()
        if transposed:
            weight = weight.t().contiguous()
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, bias=linear.bias is not None, compute_dtype=compute_dtype,
                    quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, device=weight.device)
        layer.set_weight(weight)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().to(layer.compute_dtype))
        return layer

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a dense ``[out, in]`` weight into this layer's buffers."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit a "
                             f"{self.out_features}x{self.in_features} Linear4bit")
        packed, state = quantize_4bit(weight.to(self.weight.device), self.quant_type, self.blocksize, self.double_quant)
        self.load_quant_state(packed, state)

    @torch.no_grad()
    def load_quant_state(self, packed: torch.Tensor, state: QuantState) -> None:
        """Adopt already-quantized data (e.g. from a bitsandbytes checkpoint), in the format its
        state says (quant type, block size and double quantization, as bitsandbytes reads it)."""
        n = self.in_features * self.out_features
        if state.shape.numel() != n:
            raise ValueError(f"quantized weight of shape {tuple(state.shape)} does not fit a "
                             f"{self.out_features}x{self.in_features} Linear4bit")
        names = {"packed": "packed weight bytes"}
        wrong = [f"{names.get(key, key)} has {got} elements, not {want}"
                 for key, (got, want) in stored_sizes(packed, state).items() if got != want]
        if wrong:
            raise ValueError(f"quantized {tuple(state.shape)} weight with block size {state.blocksize}: "
                             + "; ".join(wrong))
        if state.double_quant != self.double_quant:
            if self._storage:
                raise ValueError("double quantization of the state does not match the sharded layer")
            self.double_quant = state.double_quant
            for name in ("nested_absmax", "nested_quant_map", "offset"):
                if state.double_quant:
                    self.register_buffer(name, torch.zeros(0, device=self.weight.device))
                else:
                    delattr(self, name)
        self.quant_type, self.blocksize, self.quant_dtype = state.quant_type, state.blocksize, state.dtype
        device = self.weight.device
        # bitsandbytes' layout, [bytes, 1] uint8, whatever quant_storage the checkpoint used
        # (FSDP-QLoRA files store the packed bytes as [n, 1] bfloat16/float32 elements).
        self._set_quant_tensor("weight", packed.reshape(-1).view(torch.uint8).reshape(-1, 1).to(device))
        self._set_quant_tensor("absmax", state.absmax.to(device))
        self._set_quant_tensor("quant_map", state.code.to(device).clone())
        if state.nested is not None:
            self._set_quant_tensor("nested_absmax", state.nested.absmax.to(device))
            self._set_quant_tensor("nested_quant_map", state.nested.code.to(device).clone())
            self._set_quant_tensor("offset", state.offset.to(device=device, dtype=torch.float32))

    def _set_quant_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Replace a code/constant tensor; after :meth:`make_shardable` its bytes go
        into the existing storage parameter (in place when the size is unchanged,
        so optimizers and FSDP keep holding the same parameter)."""
        if name not in self._storage:
            setattr(self, name, tensor)
            return
        param = getattr(self, name)
        raw = tensor.contiguous().reshape(-1).view(torch.uint8)
        padded = torch.cat([raw, raw.new_zeros(-raw.numel() % param.element_size())]).view(param.dtype)
        if padded.shape == param.shape:
            param.data.copy_(padded)
        else:
            self.register_parameter(name, nn.Parameter(padded, requires_grad=False))
        self._storage[name] = (tensor.dtype, tensor.shape, raw.numel())

    def _quant_names(self) -> tuple[str, ...]:
        nested = ("nested_absmax", "nested_quant_map", "offset") if self.double_quant else ()
        return ("weight", "absmax", "quant_map", *nested)

    @torch.no_grad()
    def make_shardable(self, storage_dtype: torch.dtype) -> None:
        """Store the codes and constants as frozen 1-D ``storage_dtype`` parameters.

        FSDP2 shards and all-gathers parameters along dim 0, never buffers, and
        casts them to its ``param_dtype``: with ``storage_dtype`` equal to that
        dtype the cast is a no-op, so the gathered bytes are bitsandbytes' bytes
        (padded to whole elements), viewed back by :meth:`_quant_tensor`.
        """
        size = torch.empty((), dtype=storage_dtype).element_size()
        for name in self._quant_names():
            tensor = self._buffers.pop(name)
            raw = tensor.contiguous().reshape(-1).view(torch.uint8)
            padded = torch.cat([raw, raw.new_zeros(-raw.numel() % size)])
            self._storage[name] = (tensor.dtype, tensor.shape, raw.numel())
            self.register_parameter(name, nn.Parameter(padded.view(storage_dtype), requires_grad=False))

    def _quant_tensor(self, name: str) -> torch.Tensor:
        """A code/constant tensor in its own dtype and shape, whether buffer or byte storage."""
        tensor = getattr(self, name)
        if name not in self._storage:
            return tensor
        dtype, shape, nbytes = self._storage[name]
        return tensor.view(torch.uint8)[:nbytes].view(dtype).reshape(shape)

    @property
    def quant_state(self) -> QuantState:
        nested = None
        if self.double_quant:
            nested = NestedState(self._quant_tensor("nested_absmax"), self._quant_tensor("nested_quant_map"),
                                 256, torch.float32)
        return QuantState(
            absmax=self._quant_tensor("absmax"), shape=torch.Size((self.out_features, self.in_features)),
            code=self._quant_tensor("quant_map"), blocksize=self.blocksize, quant_type=self.quant_type,
            dtype=self.quant_dtype, offset=self._quant_tensor("offset") if self.double_quant else None, nested=nested,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``[out, in]`` weight in ``dtype`` (default: compute dtype)."""
        return dequantize_4bit(self._quant_tensor("weight"), self.quant_state, dtype or self.compute_dtype)

    def _use_fused_gemv(self, x: torch.Tensor) -> bool:
        """Decode step: CUDA, Triton, no autograd graph needed, at most
        ``triton_gemv.MAX_ROWS`` rows (beyond that, dequantize + GEMM reuses the weight).
        Triton is imported only here, on CUDA: CPU runs never pay for its import."""
        if not x.is_cuda:
            return False
        from ..quant.kernels import triton_gemv

        return (0 < x.numel() <= triton_gemv.MAX_ROWS * self.in_features
                and not (torch.is_grad_enabled() and x.requires_grad)
                and triton_gemv.supports(self.in_features, self.blocksize) and triton_gemv.available())

    def requires_grad_(self, requires_grad: bool = True) -> "Linear4bit":
        """Refuse to train the layer: its 4-bit codes get no gradient (bitsandbytes' ``Linear4bit`` refuses too)."""
        if requires_grad:
            raise RuntimeError(self._frozen_message())
        return super().requires_grad_(False)

    def _frozen_message(self) -> str:
        return (f"Linear4bit({self.extra_repr()}): its 4-bit weight is frozen storage, which no gradient reaches; "
                "train LoRA adapters on it, or name the module in modules_to_save (PEFT's option) to train a dense "
                "copy of it whole.")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._storage and torch.is_grad_enabled() and any(getattr(self, n).requires_grad for n in self._storage):
            raise RuntimeError(self._frozen_message())  # the byte storage of make_shardable was set to train
        # Under autocast the matmul runs in the autocast dtype and returns it,
        # as nn.Linear does; otherwise in compute_dtype, cast back to x's dtype.
        autocast = autocast_on(x)
        xc = x.to(torch.get_autocast_dtype(x.device.type) if autocast else self.compute_dtype)
        if self._use_fused_gemv(xc):
            from ..quant.kernels import triton_gemv

            y = triton_gemv.gemv_4bit(xc, self._quant_tensor("weight"), self.quant_state, self.bias)
        else:  # reference path: dequantize, then a dense matmul
            y = _Linear4bitFunction.apply(xc, self.bias, self)
        return y if autocast else y.to(x.dtype)

    def _apply(self, fn, recurse: bool = True):
        """``model.to(dtype)``, ``.half()``, ``.bfloat16()`` (and ``.type()``) move the codes and constants but never
        cast them: the float32 codebook and block scales rounded to 16 bits would change every dequantized weight
        (bitsandbytes keeps its quantization state out of such casts too). The matmul follows the cast: the new
        float dtype becomes ``compute_dtype``, as a cast ``nn.Linear`` computes in its new dtype."""
        kept = {name: getattr(self, name) for name in self._quant_names()}
        device = kept["quant_map"].device
        # Two float probes tell a cast (one of them changes dtype) from a move (neither does).
        probes = (torch.float16, torch.float64)
        cast = [d for p in probes if (d := fn(torch.empty(0, dtype=p, device=device)).dtype) != p]
        super()._apply(fn, recurse)
        if cast and cast[0].is_floating_point:
            self.compute_dtype = cast[0]
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype == before.dtype:
                continue
            if name in self._buffers:
                self._buffers[name] = before.to(after.device)
            else:  # byte storage of make_shardable: the same parameter, its bytes as they were
                after.data = before.data.to(after.device)
        return self

    # --- bitsandbytes/transformers state-dict layout -------------------------
    def _fqn_modifiers(self) -> dict[str, str]:
        """For torch.distributed.checkpoint: resolve ``weight.*`` keys through :class:`_StateDictPath`."""
        return {"weight": "_state_dict_path"}

    @property
    def _state_dict_path(self) -> _StateDictPath:
        parts = {"weight"}
        for key in self.quant_state.as_dict(packed=True):
            parts.update(key.split("."))
        return _StateDictPath(frozenset(parts))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = self._quant_tensor("weight")
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()
        for key, value in self.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        wkey = prefix + "weight"
        if wkey not in state_dict:
            missing_keys.append(wkey)
            return
        qs = {k[len(wkey) + 1:]: v for k, v in state_dict.items() if k.startswith(wkey + ".")}
        try:
            if not qs and state_dict[wkey].is_floating_point():
                # A dense layer's weight (GPT-2's Conv1D stores it [in, out]): quantized as it loads, in this
                # layer's format, as bitsandbytes' Linear4bit takes one.
                dense = state_dict[wkey]
                self.set_weight(dense.t() if self.from_conv1d else dense)
            else:
                self.load_quant_state(state_dict[wkey], QuantState.from_dict(qs, device=self.weight.device))
        except ValueError as exc:
            error_msgs.append(f"{wkey}: {exc}")
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                self.bias.data.copy_(state_dict[prefix + "bias"].to(self.bias.dtype))
            else:
                missing_keys.append(prefix + "bias")

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.quant_type}, blocksize={self.blocksize}{dq}, compute_dtype={self.compute_dtype}")
