"""A vision-language model's processor files, carried into the folders qlora writes from it.

``save_pretrained`` of the model and its tokenizer leaves out the processor's own files (the image processor's
settings, the processor's class and arguments), without which ``AutoProcessor`` cannot load the written folder:
a merged or quantized vision-language model could no longer take images. They are copied as the base holds them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def copy_processor_files(model_dir: str | Path, out: str | Path) -> None:
    """Copy :data:`FILES` that the base folder ``model_dir`` has and ``out`` lacks."""
    for name in FILES:
        source, target = Path(model_dir, name), Path(out, name)
        if source.is_file() and not target.exists():
            shutil.copyfile(source, target)
