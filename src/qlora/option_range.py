"""The allowed range of a numeric option, declared next to the option.

Config dataclasses (:class:`qlora.train.config.TrainConfig`,
:class:`qlora.infer.sampling_options.SamplingOptions`) put a :class:`Range` in a
field's metadata; the same object checks values from YAML, flags and Python
calls, and describes itself in ``--help``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import UsageError


@dataclass(frozen=True)
class Range:
    """``[low, high]`` with optionally open ends; ``None`` is unbounded. Values must be finite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    @property
    def text(self) -> str:
        """``"at least 1"``, ``"positive"``, ``"in [0, 1)"``..."""
        if self.low is None and self.high is None:
            return "finite"
        if self.high is None:
            if self.low == 0 and self.low_open:
                return "positive"
            return f"{'greater than' if self.low_open else 'at least'} {_show(self.low)}"
        if self.low is None:
            return f"{'less than' if self.high_open else 'at most'} {_show(self.high)}"
        return (f"in {'(' if self.low_open else '['}{_show(self.low)}, {_show(self.high)}"
                f"{')' if self.high_open else ']'}")

    def check(self, option: str, value: float | None) -> None:
        """Raise :class:`UsageError` naming ``option`` when ``value`` (not None) is out of range."""
        if value is not None and value not in self:
            raise UsageError(f"{option} must be {self.text}; got {value}")


def _show(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


POSITIVE = Range(0, low_open=True)
AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
