"""Kernels behind :mod:`qlora.quant`: ``torch_ref`` runs everywhere and is the
reference; ``triton_dequant`` accelerates CUDA tensors when Triton is present."""
