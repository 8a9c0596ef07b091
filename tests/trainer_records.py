"""A transformers ``TrainerCallback`` that keeps the reference trainers' logged records (test helper)."""

from __future__ import annotations

from transformers import TrainerCallback


class LoggedRecords(TrainerCallback):
    """Each training log (those holding a loss), with the step it was logged at, in order."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs.append(dict(logs, step=state.global_step))
