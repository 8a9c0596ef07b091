"""Paged AdamW with 32-bit or 8-bit states, LoRA+ groups, a by-name factory and
transformers' learning-rate schedules."""

from .adamw import AdamW, AdamW8bit, PagedAdamW, PagedAdamW8bit
from .factory import OPTIMIZER_ALIASES, OPTIMIZERS, create_optimizer, optimizer_name
from .lora_plus import lora_plus_param_groups
from .lr_schedules import (
    PLATEAU, SCHEDULE_ALIASES, SCHEDULES, check_schedule, lr_lambda, make_scheduler, schedule_kwargs, schedule_name,
)
from .pager import Pager, PagerStats, device_headroom_bytes

__all__ = [
    "OPTIMIZERS", "OPTIMIZER_ALIASES", "SCHEDULES", "SCHEDULE_ALIASES", "AdamW", "AdamW8bit", "PagedAdamW",
    "PagedAdamW8bit", "Pager", "PagerStats", "create_optimizer", "device_headroom_bytes", "lora_plus_param_groups",
    "PLATEAU", "check_schedule", "lr_lambda", "make_scheduler", "optimizer_name", "schedule_kwargs", "schedule_name",
]
