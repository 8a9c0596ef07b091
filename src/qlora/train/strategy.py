"""When a run evaluates, checkpoints and logs: transformers' ``eval_strategy``, ``save_strategy`` and
``logging_strategy``.

Configs of TRL, LLaMA-Factory and axolotl say ``eval_strategy: epoch`` or ``save_strategy: no``; a run here
must evaluate and save at the steps transformers' Trainer would for them. Its rules (``DefaultFlowCallback``):

- ``steps``: every N optimizer steps (``eval_steps`` unset: ``logging_steps``; ``save_steps`` unset: 500),
  and the run's last step (evaluated there since transformers 5; 4.x only saved it).
- ``epoch``: at each epoch's end: every ``steps per epoch`` steps, and the run's last step (a run that
  ``max_steps`` or fractional epochs end mid-epoch ends that epoch there).
- ``no``: never.

``eval_delay`` (transformers' too) holds evaluations off until that many steps (``steps``, ``auto``) or epochs
(``epoch``: the epoch count transformers keeps, in micro-batches, so a run that ends mid-epoch is at a fraction of
one); ``eval_on_start`` is the trainer's.

``auto`` is qlora's own default: every ``--eval-steps`` (0: none) and once at the end; every ``--save-steps``
(0: none) and the last step. Every strategy but ``no`` checkpoints the last step (so ``--resume`` finishes a run
whose final save failed); a Ctrl-C is checkpointed whatever the strategy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STRATEGIES = ("auto", "steps", "epoch", "no")
LOGGING_STRATEGIES = ("steps", "epoch", "no")
SAVE_STEPS_DEFAULT = 500  # TrainingArguments' save_steps, used by save_strategy steps when --save-steps is 0


def steps_of(value: float, total_steps: int) -> int:
    """A ``--save-steps``-like value in optimizer steps: below 1 a share of the run's steps, rounded up
    (transformers' rule); 0 stays 0."""
    return math.ceil(total_steps * value) if 0 < value < 1 else int(value)


@dataclass(frozen=True)
class Cadence:
    """The steps (1-based, counted after the step) at which a run of ``total_steps`` evaluates, saves and logs."""

    total_steps: int
    steps_per_epoch: int
    eval_strategy: str = "auto"
    save_strategy: str = "auto"
    logging_strategy: str = "steps"
    eval_steps: float = 0
    save_steps: float = 0
    logging_steps: float = 1
    eval_delay: float = 0
    grad_accum: int = 1
    epoch_micro_batches: int = 0  # of one rank (0: steps_per_epoch x grad_accum)

    def epoch_at(self, step: int) -> float:
        """The epochs done after ``step``, as transformers counts them (``state.epoch``): the micro-batches of the
        current epoch done over its micro-batches."""
        epoch, k = divmod(step, self.steps_per_epoch)
        micro_batches = self.epoch_micro_batches or self.steps_per_epoch * self.grad_accum
        return epoch + min(k * self.grad_accum, micro_batches) / micro_batches

    def _delayed(self, step: int) -> bool:
        """Whether ``eval_delay`` still holds evaluations off after ``step``."""
        return self.eval_delay > (self.epoch_at(step) if self.eval_strategy == "epoch" else step)

    def _epoch_end(self, step: int) -> bool:
        return step % self.steps_per_epoch == 0 or step == self.total_steps

    def _every(self, value: float, step: int) -> bool:
        interval = steps_of(value, self.total_steps)
        return bool(interval) and step % interval == 0

    def evaluates(self, step: int) -> bool:
        """Whether the run evaluates after ``step`` (``auto``'s closing evaluation is :meth:`evaluates_at_end`)."""
        if self._delayed(step):
            return False
        if self.eval_strategy == "epoch":
            return self._epoch_end(step)
        if self.eval_strategy == "steps":
            return step == self.total_steps or self._every(self.eval_steps or self.logging_steps, step)
        return self.eval_strategy == "auto" and self._every(self.eval_steps, step)

    def evaluates_at_end(self) -> bool:
        """``auto``'s evaluation after the last step, where the interval did not already evaluate it."""
        return (self.eval_strategy == "auto" and not self._delayed(self.total_steps)
                and not self.evaluates(self.total_steps))

    def saves(self, step: int) -> bool:
        """Whether the run writes a checkpoint after ``step``: its strategy's steps and the last step."""
        if self.save_strategy == "no":
            return False
        if step == self.total_steps:
            return True
        if self.save_strategy == "epoch":
            return self._epoch_end(step)
        if self.save_strategy == "steps":
            return self._every(self.save_steps or SAVE_STEPS_DEFAULT, step)
        return self._every(self.save_steps, step)

    def logs(self, step: int) -> bool:
        """Whether the run writes a metric record after ``step`` (the last step's always closes the run)."""
        if step == self.total_steps:
            return True
        if self.logging_strategy == "epoch":
            return self._epoch_end(step)
        return self.logging_strategy == "steps" and self._every(self.logging_steps, step)
