"""Paged AdamW with 32-bit or 8-bit states, LoRA+ groups and a by-name factory."""

from .adamw import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit
from .factory import OPTIMIZERS, create_optimizer
from .lora_plus import lora_plus_param_groups
from .pager import Pager, PagerStats, device_headroom_bytes

__all__ = [
    "OPTIMIZERS", "AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "Pager", "PagerStats",
    "create_optimizer", "device_headroom_bytes", "lora_plus_param_groups",
]
