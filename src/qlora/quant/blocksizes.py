"""The absmax block sizes 4-bit quantization takes (bitsandbytes'), apart from the kernels so that the
commands' ``--blocksize`` choices do not import torch."""

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
