"""Kernels behind :mod:`qlora.quant`: ``torch_ref`` runs everywhere and is the
reference (bitsandbytes' CPU scheme on the CPU, its CUDA scheme on CUDA);
``compiled_cpu`` is the same dequantization fused by ``torch.compile`` for
large CPU tensors; ``triton_quant``, ``triton_dequant`` and ``triton_gemv``
accelerate CUDA tensors when Triton is present."""
