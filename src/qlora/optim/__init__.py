"""Paged AdamW with 32-bit or 8-bit states, LoRA+ groups, weight decay's exemptions, a by-name factory and
transformers' learning-rate schedules. Names are imported lazily, so that the optimizer and
schedule names (what ``qlora train`` checks its options against) do not import torch."""

from qlora.lazy_names import lazy_attributes, lazy_dir

_LAZY = {
    "OPTIMIZERS": "qlora.optim.factory",
    "OPTIMIZER_ALIASES": "qlora.optimizer_names",
    "OPTIMIZER_NAMES": "qlora.optimizer_names",
    "SCHEDULES": "qlora.optim.lr_schedules",
    "SCHEDULE_ALIASES": "qlora.optim.lr_schedules",
    "AdamW": "qlora.optim.adamw",
    "AdamW8bit": "qlora.optim.adamw",
    "PagedAdamW": "qlora.optim.adamw",
    "PagedAdamW8bit": "qlora.optim.adamw",
    "Pager": "qlora.optim.pager",
    "PagerStats": "qlora.optim.pager",
    "create_optimizer": "qlora.optim.factory",
    "decay_groups": "qlora.optim.weight_decay",
    "device_headroom_bytes": "qlora.optim.pager",
    "lora_plus_param_groups": "qlora.optim.lora_plus",
    "PLATEAU": "qlora.optim.lr_schedules",
    "check_schedule": "qlora.optim.lr_schedules",
    "lr_lambda": "qlora.optim.lr_schedules",
    "make_scheduler": "qlora.optim.lr_schedules",
    "no_decay_names": "qlora.optim.weight_decay",
    "optimizer_name": "qlora.optimizer_names",
    "schedule_kwargs": "qlora.optim.lr_schedules",
    "schedule_name": "qlora.optim.lr_schedules",
}
__getattr__ = lazy_attributes(__name__, _LAZY)
__dir__ = lazy_dir(globals(), _LAZY)
__all__ = list(_LAZY)
