"""What a run reports: metrics.jsonl, TensorBoard events, a loss plot, a progress bar
(plain progress lines when stderr is not a terminal: :mod:`qlora.progress`).

metrics.jsonl is the record of truth (one JSON object a line, ``"split"`` =
train or eval); TensorBoard and the PNG are views of it. Each line is strict
JSON: a value that is not finite (an eval loss that overflowed, an fp16 step's
infinite gradient norm) is written null and named with its value in the
record's ``nonfinite`` (Python's ``json`` would write a bare NaN, which strict
parsers refuse); files of older runs with NaN read as before. On resume the lines
written after the checkpoint are dropped, so the file reads as one run.
matplotlib is a dependency (a loss plot after every run is worth it);
TensorBoard is optional (``pip install tensorboard``): without it the run says
so in one line and writes everything else. Neither view can lose a run: a
failure to draw is reported, never raised.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from qlora.progress import progress_bar


def gpu_memory_gib() -> float:
    """Peak CUDA memory allocated so far in GiB (0 on CPU)."""
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


class NullMetrics:
    """The logger of ranks other than 0: one writer per run, so they write nothing."""

    def log(self, record: dict[str, Any]) -> None: ...
    def advance(self, steps: int = 1) -> None: ...
    def write(self, message: str) -> None: ...
    def close(self) -> None: ...


class MetricsLogger:
    """Writes every record to metrics.jsonl, TensorBoard (when it imports) and the bar."""

    def __init__(self, out_dir: Path, total_steps: int, start_step: int = 0, progress: bool = True,
                 kept: int | None = None) -> None:
        """``kept``: on resume, how many records the run had written when its checkpoint was (None: the records
        of steps up to ``start_step``, for checkpoints that did not count them)."""
        self.out_dir = out_dir
        self.path = out_dir / "metrics.jsonl"
        self.records = _read_until(self.path, start_step, kept)
        self.path.write_text("".join(json_line(r) + "\n" for r in self.records))
        self._file = open(self.path, "a")
        self._bar = progress_bar(total_steps, initial=start_step, unit="step", enabled=progress)
        # on resume, TensorBoard hides what earlier event files hold of the steps after the checkpoint
        self._tb = _tensorboard(out_dir / "events", self.write, purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (must hold ``step`` and ``split``)."""
        self.records.append(record)
        self._file.write(json_line(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{record['split']}/{key}", value, record["step"])
        if record["split"] == "train":
            shown = {"loss": f"{record['loss']:.4f}"}
            if "rewards/accuracies" in record:  # preference runs (DPO, ORPO)
                shown.update(acc=f"{record['rewards/accuracies']:.2f}", margin=f"{record['rewards/margins']:.3f}")
            self._bar.set_postfix(**shown, lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                                  gpu=f"{record['gpu_mem_gib']:.1f}G")

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar (its ETA comes from the rate of steps)."""
        self._bar.update(steps)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        self._bar.write(message)

    def close(self) -> None:
        """Flush everything and draw loss.png."""
        self._bar.close()
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        try:
            plot_losses(self.records, self.out_dir / "loss.png")
        except ImportError as exc:  # a broken or partial matplotlib install
            print(f"qlora: loss.png not drawn ({exc}); pip install matplotlib. The run's metrics are in "
                  f"{self.path}.")


def json_line(record: dict[str, Any]) -> str:
    """``record`` as one line of strict JSON: each non-finite number is null, and ``nonfinite`` maps its key to
    the value as Python's ``json`` spells it (``NaN``, ``Infinity``, ``-Infinity``)."""
    bad = {k: json.dumps(v) for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        record = {**{k: None if k in bad else v for k, v in record.items()}, "nonfinite": bad}
    return json.dumps(record, allow_nan=False)


def _number(value: Any) -> float:
    """A record's value to plot: null (a non-finite value, as :func:`json_line` writes it) is a gap."""
    return float("nan") if value is None else value


def _read_until(path: Path, step: int, kept: int | None) -> list[dict[str, Any]]:
    """The records a resumed run keeps: the first ``kept``, as the step alone cannot tell the evaluation that
    follows the last step's checkpoint (run again on resume) from one of that step before it. The records past
    them are not read: a run killed (or out of disk) mid-write leaves its last line cut."""
    if step == 0 or not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if kept is not None:
        return [json.loads(line) for line in lines[:kept]]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:  # the line a kill cut short, the file's last
            break
    return [r for r in records if r["step"] <= step]


def _tensorboard(log_dir: Path, say, purge_step: int | None) -> Any:
    """A TensorBoard writer, or None (said once) when tensorboard is not installed. ``purge_step``: events of
    this step and later that earlier writers logged are hidden (the steps a resumed run runs again)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        say("qlora: TensorBoard logging off (pip install tensorboard to get it); metrics.jsonl and loss.png are written")
        return None
    return SummaryWriter(str(log_dir), purge_step=purge_step)


def plot_losses(records: list[dict[str, Any]], path: Path) -> None:
    """Train and eval loss against the optimizer step, as a PNG; for preference runs
    (records with rewards) a second panel with the reward accuracy and margin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = any("rewards/accuracies" in r for r in records)
    fig, axes = plt.subplots(2 if rewards else 1, 1, figsize=(7, 7 if rewards else 4), sharex=True, squeeze=False)
    ax = axes[0, 0]
    for split, style in (("train", "-"), ("eval", "o-")):
        points = [(r["step"], r["loss"]) for r in records
                  if r["split"] == split and math.isfinite(_number(r.get("loss")))]
        if points:
            ax.plot(*zip(*points), style, label=split)
    ax.set_ylabel("loss")
    if rewards:
        low = axes[1, 0]
        margin = low.twinx()
        for split, style in (("train", "-"), ("eval", "o-")):
            rows = [r for r in records if r["split"] == split and "rewards/accuracies" in r]
            if rows:
                steps = [r["step"] for r in rows]
                low.plot(steps, [_number(r["rewards/accuracies"]) for r in rows], style, color="tab:green",
                         label=f"{split} reward accuracy")
                margin.plot(steps, [_number(r["rewards/margins"]) for r in rows], style, color="tab:purple",
                            label=f"{split} reward margin")
        low.set_ylabel("reward accuracy")
        low.set_ylim(-0.05, 1.05)
        margin.set_ylabel("reward margin")
        low.grid(alpha=0.3)
        handles = low.get_legend_handles_labels()[0] + margin.get_legend_handles_labels()[0]
        low.legend(handles=handles, fontsize="small", loc="best")
    axes[-1, 0].set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a run stopped before its first log has nothing to label
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
