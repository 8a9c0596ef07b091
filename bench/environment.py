"""The device and package versions that every benchmark prints above its table."""

from __future__ import annotations

import torch


def describe(device: str, packages: tuple[str, ...]) -> str:
    """``"<GPU name or CPU>; torch X, qlora Y, <package> Z, ..."`` for the installed ``packages``."""
    import qlora

    versions = f"torch {torch.__version__}, qlora {qlora.__version__}"
    for name in packages:
        try:
            versions += f", {name} {__import__(name).__version__}"
        except ImportError:
            pass
    return f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}; {versions}"
