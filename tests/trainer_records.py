"""The reference trainers' runs (test helper): a ``TrainerCallback`` that keeps their logged records, and their
examples in order, as qlora's runs without shuffling take them."""

from __future__ import annotations

from torch.utils.data import SequentialSampler
from transformers import TrainerCallback, TrainingArguments

# transformers 5's train_sampling_strategy="sequential"; 4.x has no such argument, and the reference trainer's train
# sampler (the hook that argument picks in 5) is made sequential there instead (:func:`in_order`)
IN_ORDER = ({"train_sampling_strategy": "sequential"}
            if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__ else {})


def in_order(trainer_class: type) -> type:
    """``trainer_class`` (transformers' or TRL's), taking the examples in order where :data:`IN_ORDER` cannot."""
    if IN_ORDER:
        return trainer_class

    class InOrder(trainer_class):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset if train_dataset is None else train_dataset)
    return InOrder


class LoggedRecords(TrainerCallback):
    """Each training log (those holding a loss), with the step it was logged at, in order."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append(dict(logs, step=state.global_step))
