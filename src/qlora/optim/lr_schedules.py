"""Learning-rate schedules by the names of transformers' ``lr_scheduler_type``.

Each schedule is a factor of the peak learning rate as a function of the
optimizer step, for ``torch.optim.lr_scheduler.LambdaLR``; the formulas and
their floating-point order are those of ``transformers.get_scheduler``
(5.x), so a run gets the same learning rate at every step as a transformers
run with the same warmup and total steps. One difference, on purpose:
qlora's ``constant`` warms up over the run's warmup steps like every other
schedule (transformers' ``constant`` ignores warmup; its
``constant_with_warmup`` is qlora's ``constant``).

Each group of the optimizer is scaled by the same factor, so LoRA+'s B
group keeps its ratio to the A group at every step. Kwargs given in absolute
learning rates (``lr_end``, ``min_lr``) are relative to the run's ``--lr``, the
A group's rate, as transformers takes them relative to the optimizer's
default rate.

``reduce_lr_on_plateau`` is torch's ``ReduceLROnPlateau``, as transformers
builds it: no warmup, the rate multiplied by ``factor`` when the eval loss has
not improved for ``patience`` evaluations; the trainer steps it after each
periodic evaluation instead of after each optimizer step.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from ..errors import UsageError

if TYPE_CHECKING:  # torch is imported in make_scheduler, so that checking a schedule (train options) does not
    import torch

LrLambda = Callable[[int], float]

_WSD_SHAPES = ("linear", "cosine", "1-sqrt")


def _warmup(step: int, warmup: int) -> float:
    return float(step) / float(max(1, warmup))


def _linear_factor(step: int, *, warmup: int, total: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return max(0.0, float(total - step) / float(max(1, total - warmup)))


def _cosine_factor(step: int, *, warmup: int, total: int, num_cycles: float, min_lr_rate: float = 0.0) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    if min_lr_rate:
        factor = factor * (1 - min_lr_rate) + min_lr_rate
    return max(0.0, factor)


def _restarts_factor(step: int, *, warmup: int, total: int, num_cycles: float) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    progress = float(step - warmup) / float(max(1, total - warmup))
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))


def _polynomial_factor(step: int, *, warmup: int, total: int, lr_end: float, power: float, lr: float) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    if step > total:
        return lr_end / lr
    pct_remaining = 1 - (step - warmup) / max(1, total - warmup)
    return ((lr - lr_end) * pct_remaining**power + lr_end) / lr


def _constant_factor(step: int, *, warmup: int) -> float:
    if step < warmup:
        return float(step) / float(max(1.0, warmup))
    return 1.0


def _inverse_sqrt_factor(step: int, *, warmup: int, timescale: int) -> float:
    if step < warmup:
        return _warmup(step, warmup)
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


def _cosine_warmup_min_lr_factor(step: int, *, warmup: int, total: int, num_cycles: float, min_lr_rate: float,
                                 warmup_lr_rate: float | None) -> float:
    # transformers' cosine_warmup_with_min_lr counts from step + 1 in warmup and decay alike.
    current, warmup_f, total_f = float(step), float(warmup), float(total)
    if current < warmup_f:
        if warmup_lr_rate is None:
            return (current + 1.0) / max(1.0, warmup_f)
        return float(warmup_lr_rate) + (1.0 - float(warmup_lr_rate)) * current / max(1, warmup_f - 1)
    progress = (current - warmup_f + 1.0) / max(1.0, total_f - warmup_f)
    factor = 0.5 * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress))
    return max(0.0, factor * (1 - min_lr_rate) + min_lr_rate)


def _wsd_factor(step: int, *, warmup: int, stable: int, decay: int, warmup_type: str, decay_type: str,
                min_lr_ratio: float, num_cycles: float) -> float:
    if step < warmup:
        progress = float(step) / float(max(1, warmup))
        factor = {"linear": lambda: progress, "cosine": lambda: 0.5 * (1.0 - math.cos(math.pi * progress)),
                  "1-sqrt": lambda: 1.0 - math.sqrt(1.0 - progress)}[warmup_type]()
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    if step < warmup + stable:
        return 1.0
    if step < warmup + stable + decay:
        progress = float(step - warmup - stable) / float(max(1, decay))
        factor = {"linear": lambda: 1.0 - progress,
                  "cosine": lambda: 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)),
                  "1-sqrt": lambda: 1.0 - math.sqrt(progress)}[decay_type]()
        return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)
    return min_lr_ratio


# ------------------------------------------------------------------ builders
# One per schedule name: (warmup, total, lr, **the schedule's kwargs) -> the factor of a step. The
# keyword-only parameters are the kwargs --lr-scheduler-kwargs accepts, with transformers' defaults.

def _number(name: str, value: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False, integer: bool = False) -> float:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()) \
            or not math.isfinite(value):
        raise UsageError(f"{name} must be {kind}; got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise UsageError(f"{name} must be {'greater than' if low_open else 'at least'} {low:g}; got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise UsageError(f"{name} must be {'less than' if high_open else 'at most'} {high:g}; got {value!r}")
    return int(value) if integer else float(value)


def _min_lr_rate(schedule: str, lr: float, min_lr: Any, min_lr_rate: Any) -> float:
    if min_lr is not None and min_lr_rate is not None:
        raise UsageError("give one of min_lr (an absolute rate) or min_lr_rate (a share of --lr), not both")
    if min_lr is not None:
        return _number("min_lr", min_lr, 0, lr, high_open=True) / lr
    if min_lr_rate is None:
        raise UsageError(f"{schedule} needs min_lr (an absolute rate) or min_lr_rate (a share of --lr), "
                         "e.g. min_lr_rate=0.1")
    return _number("min_lr_rate", min_lr_rate, 0, 1)


def _linear(warmup: int, total: int, lr: float) -> LrLambda:
    return partial(_linear_factor, warmup=warmup, total=total)


def _cosine(warmup: int, total: int, lr: float, *, num_cycles: float = 0.5) -> LrLambda:
    return partial(_cosine_factor, warmup=warmup, total=total, num_cycles=_number("num_cycles", num_cycles, 0))


def _cosine_with_restarts(warmup: int, total: int, lr: float, *, num_cycles: int = 1) -> LrLambda:
    return partial(_restarts_factor, warmup=warmup, total=total,
                   num_cycles=_number("num_cycles", num_cycles, 0, low_open=True))


def _polynomial(warmup: int, total: int, lr: float, *, lr_end: float = 1e-7, power: float = 1.0) -> LrLambda:
    lr_end = _number("lr_end", lr_end, 0)
    if not lr > lr_end:
        raise UsageError(f"lr_end ({lr_end:g}) must be below the peak --lr ({lr:g})")
    return partial(_polynomial_factor, warmup=warmup, total=total, lr_end=lr_end,
                   power=_number("power", power, 0, low_open=True), lr=lr)


def _constant(warmup: int, total: int, lr: float) -> LrLambda:
    return partial(_constant_factor, warmup=warmup)


def _inverse_sqrt(warmup: int, total: int, lr: float, *, timescale: int | None = None) -> LrLambda:
    if timescale is None:
        timescale = warmup or 10_000
    timescale = _number("timescale", timescale, 0, low_open=True, integer=True)
    return partial(_inverse_sqrt_factor, warmup=warmup, timescale=timescale)


def _cosine_with_min_lr(warmup: int, total: int, lr: float, *, num_cycles: float = 0.5, min_lr: float | None = None,
                        min_lr_rate: float | None = None) -> LrLambda:
    return partial(_cosine_factor, warmup=warmup, total=total, num_cycles=_number("num_cycles", num_cycles, 0),
                   min_lr_rate=_min_lr_rate("cosine_with_min_lr", lr, min_lr, min_lr_rate))


def _cosine_warmup_with_min_lr(warmup: int, total: int, lr: float, *, num_cycles: float = 0.5,
                               min_lr: float | None = None, min_lr_rate: float | None = None,
                               warmup_lr_rate: float | None = None) -> LrLambda:
    if warmup_lr_rate is not None:
        warmup_lr_rate = _number("warmup_lr_rate", warmup_lr_rate, 0, 1)
    return partial(_cosine_warmup_min_lr_factor, warmup=warmup, total=total,
                   num_cycles=_number("num_cycles", num_cycles, 0),
                   min_lr_rate=_min_lr_rate("cosine_warmup_with_min_lr", lr, min_lr, min_lr_rate),
                   warmup_lr_rate=warmup_lr_rate)


def _warmup_stable_decay(warmup: int, total: int, lr: float, *, num_decay_steps: int | None = None,
                         num_stable_steps: int | None = None, warmup_type: str = "linear", decay_type: str = "cosine",
                         min_lr_ratio: float = 0.0, num_cycles: float = 0.5) -> LrLambda:
    if num_decay_steps is None:
        raise UsageError("warmup_stable_decay needs num_decay_steps (the steps of the final decay), e.g. "
                         "num_decay_steps=100")
    decay = _number("num_decay_steps", num_decay_steps, 0, integer=True)
    for name, value in (("warmup_type", warmup_type), ("decay_type", decay_type)):
        if value not in _WSD_SHAPES:
            raise UsageError(f"{name} must be one of {', '.join(_WSD_SHAPES)}; got {value!r}")
    stable = (total - warmup - decay if num_stable_steps is None
              else _number("num_stable_steps", num_stable_steps, 0, integer=True))
    return partial(_wsd_factor, warmup=warmup, stable=stable, decay=decay, warmup_type=warmup_type,
                   decay_type=decay_type, min_lr_ratio=_number("min_lr_ratio", min_lr_ratio, 0, 1),
                   num_cycles=_number("num_cycles", num_cycles, 0))


def _reduce_lr_on_plateau(*, mode: str = "min", factor: float = 0.1, patience: int = 10, threshold: float = 1e-4,
                          threshold_mode: str = "rel", cooldown: int = 0, min_lr: float = 0.0,
                          eps: float = 1e-8) -> dict[str, Any]:
    """torch's ReduceLROnPlateau options (and defaults), checked."""
    if mode != "min":
        raise UsageError(f"mode must be min: the metric is the eval loss, lower is better; got {mode!r}")
    if threshold_mode not in ("rel", "abs"):
        raise UsageError(f"threshold_mode must be rel or abs; got {threshold_mode!r}")
    return dict(mode=mode, factor=_number("factor", factor, 0, 1, low_open=True, high_open=True),
                patience=_number("patience", patience, 0, integer=True), threshold=_number("threshold", threshold, 0),
                threshold_mode=threshold_mode, cooldown=_number("cooldown", cooldown, 0, integer=True),
                min_lr=_number("min_lr", min_lr, 0), eps=_number("eps", eps, 0))


PLATEAU = "reduce_lr_on_plateau"
SCHEDULES: dict[str, Callable[..., Any]] = {
    "constant": _constant,
    "linear": _linear,
    "cosine": _cosine,
    "cosine_with_restarts": _cosine_with_restarts,
    "polynomial": _polynomial,
    "inverse_sqrt": _inverse_sqrt,
    "cosine_with_min_lr": _cosine_with_min_lr,
    "cosine_warmup_with_min_lr": _cosine_warmup_with_min_lr,
    "warmup_stable_decay": _warmup_stable_decay,
    PLATEAU: _reduce_lr_on_plateau,
}
# Other tools' names for one of ours.
SCHEDULE_ALIASES = {"constant_with_warmup": "constant"}
# transformers' schedules qlora does not run, and why.
_REFUSED = {
    "greedy": "qlora does not implement transformers' GreedyLR, which raises and lowers the rate from a metric",
}


def schedule_name(name: str) -> str:
    """Our name of the schedule ``name`` (ours or an alias).

    Raises:
        UsageError (a ValueError): for a name qlora does not have, saying why and listing what it has.
    """
    name = SCHEDULE_ALIASES.get(name, name)
    if name in SCHEDULES:
        return name
    have = f"qlora's schedules are {', '.join(SCHEDULES)} (constant_with_warmup = constant)"
    if name in _REFUSED:
        raise UsageError(f"{name} is not available: {_REFUSED[name]}. {have}.")
    raise UsageError(f"unknown schedule {name!r}; {have}.")


def schedule_kwargs(name: str) -> dict[str, Any]:
    """The kwargs schedule ``name`` accepts, with their defaults."""
    return {p.name: p.default for p in inspect.signature(SCHEDULES[schedule_name(name)]).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def lr_lambda(name: str, warmup: int, total: int, lr: float, kwargs: dict[str, Any] | None = None) -> LrLambda:
    """The factor of the peak learning rate at each optimizer step (0-based) of schedule ``name``.

    Args:
        name: a schedule name (see :data:`SCHEDULES`) or alias.
        warmup: warmup steps (the factor rises linearly from 0 over them).
        total: the run's optimizer steps.
        lr: the peak learning rate, which ``lr_end`` and ``min_lr`` are compared with.
        kwargs: the schedule's own options (``--lr-scheduler-kwargs``).

    Raises:
        UsageError (a ValueError): for an unknown schedule, a kwarg it does not take (naming the valid ones) or a
            bad value.
    """
    name = schedule_name(name)
    kwargs = dict(kwargs or {})
    _check_names(name, kwargs)
    if name == PLATEAU:
        raise UsageError(f"{PLATEAU} follows the eval loss, not the step; build it with make_scheduler")
    return SCHEDULES[name](warmup, total, lr, **kwargs)


def _check_names(name: str, kwargs: dict[str, Any]) -> None:
    valid = schedule_kwargs(name)
    bad = [k for k in kwargs if k not in valid]
    if bad:
        others = sorted({s for s in SCHEDULES if all(k in schedule_kwargs(s) for k in bad)})
        elsewhere = f" ({'it belongs' if len(bad) == 1 else 'they belong'} to {', '.join(others)})" if others else ""
        takes = f"it takes {', '.join(valid)}" if valid else "it takes none"
        raise UsageError(f"schedule {name} does not take {', '.join(bad)}{elsewhere}; {takes}")


def check_schedule(name: str, lr: float, kwargs: dict[str, Any] | None = None) -> None:
    """Check the schedule's name and kwargs (names and values) before a run knows its steps.

    Raises:
        UsageError (a ValueError): as :func:`lr_lambda`.
    """
    if schedule_name(name) == PLATEAU:
        _plateau_options(kwargs)
    else:
        lr_lambda(name, 0, 0, lr, kwargs)


def _plateau_options(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    _check_names(PLATEAU, kwargs or {})
    return _reduce_lr_on_plateau(**(kwargs or {}))


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup: int, total: int,
                   kwargs: dict[str, Any] | None = None) -> torch.optim.lr_scheduler.LRScheduler:
    """The scheduler of schedule ``name`` over ``optimizer``: a ``LambdaLR`` stepped after each optimizer
    step, or for ``reduce_lr_on_plateau`` a ``ReduceLROnPlateau`` stepped with each eval loss. Rates in
    kwargs are relative to the optimizer's default ``lr``.

    Raises:
        UsageError (a ValueError): as :func:`lr_lambda`.
    """
    import torch

    if schedule_name(name) == PLATEAU:
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **_plateau_options(kwargs))
    lr = optimizer.defaults["lr"]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(name, warmup, total, lr, kwargs))
