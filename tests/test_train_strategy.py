"""--eval-strategy/--save-strategy/--logging-strategy: the steps at which a run evaluates, checkpoints and logs
are those of transformers' Trainer for the same TrainingArguments (its checkpoint folders, its evaluations)."""

from __future__ import annotations

import json

import pytest
import torch

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.train.config import load_config
from qlora.train.strategy import Cadence
from qlora.train.trainer import Trainer, list_checkpoints, steps_per_epoch, total_steps

QA = [("What is two plus two?", "four"), ("Name a red fruit.", "An apple is red."),
      ("Say hello.", "Hello there!"), ("What colour is the sky?", "The sky is blue."),
      ("Count to three.", "one two three"), ("What is a fox?", "A quick brown animal."),
      ("Name a bird.", "A robin."), ("What is ice?", "Frozen water.")]

_V5 = __import__("importlib").util.find_spec("transformers.conversion_mapping") is not None

# (examples, batch, accumulation, epochs, max_steps, eval_strategy, save_strategy, eval_steps, save_steps, logging)
CASES = [
    (10, 2, 2, 3, 0, "epoch", "epoch", 0, 0, 1),  # 3 steps an epoch, the last one short
    (7, 1, 3, 2, 0, "epoch", "steps", 0, 2, 1),
    (9, 2, 1, 1.5, 0, "epoch", "epoch", 0, 0, 1),  # fractional epochs end mid-epoch
    (8, 2, 2, 3, 5, "epoch", "epoch", 0, 0, 1),  # max_steps ends the third epoch after its first step
    (6, 1, 1, 2, 0, "steps", "steps", 4, 5, 1),
    (6, 1, 2, 3, 0, "steps", "epoch", 0, 0, 2),  # eval_steps unset: logging_steps
    (5, 1, 1, 2, 0, "steps", "no", 0.25, 0, 1),  # a share of the run's steps
    (12, 3, 2, 2, 0, "no", "epoch", 0, 0, 1),
]


class _Regression(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(1, 1)

    def forward(self, x, labels):
        return {"loss": torch.nn.functional.mse_loss(self.w(x), labels)}


def _transformers_steps(tmp_path, n, batch, accum, epochs, max_steps, eval_s, save_s, eval_steps, save_steps,
                        logging_steps, eval_delay=0, eval_on_start=False):
    """The steps at which transformers' Trainer evaluates, and its checkpoint folders' steps."""
    transformers = pytest.importorskip("transformers")

    rows = [{"x": torch.tensor([float(i)]), "labels": torch.tensor([1.0])} for i in range(n)]
    evaluated = []

    class Record(transformers.TrainerCallback):
        def on_evaluate(self, args, state, control, **kwargs):
            evaluated.append(state.global_step)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
        num_train_epochs=epochs, max_steps=max_steps or -1, eval_strategy=eval_s, save_strategy=save_s,
        eval_steps=eval_steps or None, save_steps=save_steps or 500, logging_steps=logging_steps,
        report_to=[], use_cpu=True, save_only_model=True, disable_tqdm=True, learning_rate=1e-3,
        eval_delay=eval_delay, eval_on_start=eval_on_start)
    trainer = transformers.Trainer(model=_Regression(), args=args, train_dataset=rows, eval_dataset=rows[:2],
                                   callbacks=[Record()])
    trainer.train()
    last = trainer.state.global_step
    if not _V5 and eval_s == "steps" and evaluated[-1:] != [last] and eval_delay <= last:
        evaluated.append(last)  # transformers 5 (qlora's reference) also evaluates after the last step; 4.x did not
    saved = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*"))
    return evaluated, saved


@pytest.mark.parametrize("case", CASES, ids=[f"{c[5]}-{c[6]}-{i}" for i, c in enumerate(CASES)])
def test_evaluations_and_checkpoints_fall_on_transformers_steps(tmp_path, case):
    n, batch, accum, epochs, max_steps, eval_s, save_s, eval_steps, save_steps, logging_steps = case
    theirs = _transformers_steps(tmp_path, *case)
    total = total_steps(n, batch * accum, epochs, max_steps)
    cadence = Cadence(total, steps_per_epoch(n, batch * accum), eval_s, save_s, "steps", eval_steps, save_steps,
                      logging_steps)
    steps = range(1, total + 1)
    ours = [s for s in steps if cadence.evaluates(s)], [s for s in steps if cadence.saves(s)]
    assert not cadence.evaluates_at_end()
    assert ours == theirs


# (examples, batch, accumulation, epochs, max_steps, eval_strategy, eval_steps, eval_delay)
DELAYS = [
    (6, 1, 1, 2, 0, "steps", 2, 5),  # no evaluation before step 5: steps 6, 8, 10, 12
    (6, 1, 1, 2, 0, "steps", 5, 7),  # the interval's step 10 and the last, 12
    (6, 1, 1, 1, 0, "steps", 2, 9),  # a delay past the run: none, not even at the end
    (10, 2, 2, 3, 0, "epoch", 0, 2),  # from the second epoch's end
    (11, 2, 4, 1.5, 0, "epoch", 0, 1.6),  # the run ends 4 of 6 micro-batches into epoch 2: at 1.67 epochs
    (11, 2, 4, 1.5, 0, "epoch", 0, 1.7),  # ... so 1.7 holds its last evaluation off too
]


@pytest.mark.parametrize("case", DELAYS, ids=[f"{c[5]}-delay-{c[7]}" for c in DELAYS])
def test_eval_delay_and_eval_on_start_evaluate_at_transformers_steps(tmp_path, case):
    """transformers' eval_delay, in steps or (eval_strategy epoch) in epochs counted by micro-batches, and
    eval_on_start (an evaluation at step 0) give the steps its Trainer evaluates at."""
    n, batch, accum, epochs, max_steps, eval_s, eval_steps, delay = case
    theirs, _ = _transformers_steps(tmp_path, n, batch, accum, epochs, max_steps, eval_s, "no", eval_steps, 0, 1,
                                    eval_delay=delay, eval_on_start=True)
    total = total_steps(n, batch * accum, epochs, max_steps)
    cadence = Cadence(total, steps_per_epoch(n, batch * accum), eval_s, "no", "steps", eval_steps, 0, 1,
                      eval_delay=delay, grad_accum=accum, epoch_micro_batches=-(-n // batch))
    assert [0] + [s for s in range(1, total + 1) if cadence.evaluates(s)] == theirs
    assert not Cadence(12, 6, eval_steps=5, eval_delay=13).evaluates_at_end()  # auto's closing one is held off too
    assert Cadence(12, 6, eval_steps=5, eval_delay=12).evaluates_at_end()


def test_eval_on_start_needs_eval_data_and_records_step_0_once(tmp_path, tiny_model_dir):
    """--eval-on-start: one evaluation before any step, recorded at step 0 (its loss against transformers':
    tests/test_whole_run_reference.py); --resume does not evaluate again, and its eval records are the
    uninterrupted run's (transformers' Trainer would evaluate again at the resumed step)."""
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QA]
    data, held = _write(tmp_path / "d.jsonl", rows), _write(tmp_path / "e.jsonl", rows[:3])
    with pytest.raises(UsageError, match="--eval-on-start .* --eval-data"):
        _config(tiny_model_dir, data, tmp_path / "x", max_steps=2, eval_on_start=True)
    kw = dict(max_steps=4, eval_data=str(held), eval_on_start=True, eval_strategy="steps", eval_steps=2,
              eval_delay=3, save_steps=2, dropout=0.0)
    Trainer(_config(tiny_model_dir, data, tmp_path / "full", **kw)).run()
    evals = [r for r in _records(tmp_path / "full") if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4]

    part = Trainer(_config(tiny_model_dir, data, tmp_path / "part", **kw))
    part.setup()
    part.total_steps = 2  # killed right after the step-2 checkpoint
    part.train()
    part.cleanup()
    Trainer(_config(tiny_model_dir, data, tmp_path / "part", resume=True, **kw)).run()
    assert [r for r in _records(tmp_path / "part") if r["split"] == "eval"] == evals  # steps and losses


def test_auto_keeps_qlora_cadence():
    """auto: every --eval-steps and once at the end; every --save-steps and the last step."""
    cadence = Cadence(10, 4, eval_steps=3, save_steps=4)
    assert [s for s in range(1, 11) if cadence.evaluates(s)] == [3, 6, 9] and cadence.evaluates_at_end()
    assert [s for s in range(1, 11) if cadence.saves(s)] == [4, 8, 10]
    assert [s for s in range(1, 11) if Cadence(10, 4, save_strategy="no").saves(s)] == []
    assert [s for s in range(1, 11) if Cadence(10, 4, logging_strategy="epoch").logs(s)] == [4, 8, 10]
    assert [s for s in range(1, 11) if Cadence(10, 4, logging_strategy="no").logs(s)] == [10]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), output=str(out), optim="adamw", lr=1e-2, batch_size=2,
                progress=False, seq_len=64)
    base.update(kw)
    return load_config(None, base)


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_by_epochs_evaluates_checkpoints_and_logs_at_epoch_ends_and_resumes(tmp_path, tiny_model_dir):
    """8 examples, batch 2 x accumulation 3: 2 steps an epoch (the second short), 3 epochs. Evaluations,
    checkpoints and records at steps 2, 4, 6; resumed from the epoch-1 checkpoint the losses are the same."""
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QA]
    data, held = _write(tmp_path / "d.jsonl", rows), _write(tmp_path / "e.jsonl", rows[:3])
    kw = dict(epochs=3, grad_accum=3, eval_data=str(held), eval_strategy="epoch", save_strategy="epoch",
              logging_strategy="epoch", save_total_limit=0, dropout=0.1, lr_scheduler="cosine")
    full = Trainer(_config(tiny_model_dir, data, tmp_path / "full", **kw))
    losses = full.run()
    assert len(losses) == 6
    assert [p.name for p in list_checkpoints(tmp_path / "full")] == ["step-0000002", "step-0000004", "step-0000006"]
    records = _records(tmp_path / "full")
    assert [r["step"] for r in records if r.get("split") == "eval"] == [2, 4, 6]
    assert [r["step"] for r in records if r.get("split") != "eval"] == [2, 4, 6]

    part = Trainer(_config(tiny_model_dir, data, tmp_path / "part", **kw))
    part.setup()
    part.total_steps = 2  # killed right after the epoch-1 checkpoint
    part.train()
    part.cleanup()
    assert Trainer(_config(tiny_model_dir, data, tmp_path / "part", resume=True, **kw)).run() == losses
    assert [p.name for p in list_checkpoints(tmp_path / "part")] == ["step-0000002", "step-0000004", "step-0000006"]


def test_no_strategies_write_no_checkpoint_and_no_evaluation_but_the_adapter(tmp_path, tiny_model_dir):
    """transformers' "no": no evaluation even with eval data, no checkpoint; the final adapter is written."""
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QA]
    data, held = _write(tmp_path / "d.jsonl", rows), _write(tmp_path / "e.jsonl", rows[:3])
    out = tmp_path / "o"
    Trainer(_config(tiny_model_dir, data, out, max_steps=3, eval_data=str(held), eval_strategy="no",
                    save_strategy="no")).run()
    assert list_checkpoints(out) == []
    assert not [r for r in _records(out) if r.get("split") == "eval"]
    assert (out / "adapter_model.safetensors").is_file()


def test_config_files_strategies_are_read(tmp_path, tiny_model_dir):
    """TrainingArguments' keys (and the name before transformers 4.46) set the strategies; YAML's bare `no`
    is the strategy no; save_strategy best is refused by name."""
    rows = [{"instruction": q, "input": "", "output": a} for q, a in QA]
    data = _write(tmp_path / "d.jsonl", rows)
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset: {data}\noutput_dir: {tmp_path / 'o'}\n"
                    "evaluation_strategy: epoch\nsave_strategy: no\nlogging_strategy: epoch\nval_size: 2\n")
    cfg = load_config(yaml, {})
    assert (cfg.eval_strategy, cfg.save_strategy, cfg.logging_strategy) == ("epoch", "no", "epoch")
    with pytest.raises(UsageError, match="best"):
        load_config(None, dict(model=str(tiny_model_dir), data=str(data), output=str(tmp_path / "o"),
                               save_strategy="best")).validate()


def test_cli_refuses_an_unknown_strategy(tmp_path, tiny_model_dir, capsys):
    data = _write(tmp_path / "d.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in QA])
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "o"),
              "--eval-strategy", "epochs"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--eval-strategy" in err and "'epoch'" in err and "Traceback" not in err


def test_plateau_schedule_follows_epoch_evaluations(tmp_path, tiny_model_dir):
    """reduce_lr_on_plateau needs evaluations during the run: --eval-strategy epoch gives them, no does not."""
    data = _write(tmp_path / "d.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in QA])
    kw = dict(model=str(tiny_model_dir), data=str(data), output=str(tmp_path / "o"), eval_split=0.25,
              lr_scheduler="reduce_lr_on_plateau")
    load_config(None, dict(kw, eval_strategy="epoch")).validate()
    with pytest.raises(UsageError, match="eval-strategy epoch"):
        load_config(None, dict(kw, eval_strategy="no", eval_steps=2)).validate()


def test_axolotl_files_save_each_epoch_unless_they_say_otherwise(tmp_path, tiny_model_dir, capsys):
    """axolotl's trainer builder: save_steps (saves_per_epoch) gives steps, save_strategy its own, silence epoch."""
    data = _write(tmp_path / "d.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in QA])
    head = (f"base_model: {tiny_model_dir}\ndatasets:\n  - path: {data}\n    type: alpaca\nadapter: lora\n"
            f"output_dir: {tmp_path / 'o'}\nnum_epochs: 2\n")
    path = tmp_path / "a.yaml"
    path.write_text(head)
    assert (load_config(path, {}).save_strategy, load_config(path, {}).save_total_limit) == ("epoch", 4)
    assert "save_strategy epoch, save_total_limit 4" in capsys.readouterr().err
    path.write_text(head + "saves_per_epoch: 2\n")
    assert (load_config(path, {}).save_strategy, load_config(path, {}).save_steps) == ("auto", 0.25)
    path.write_text(head + "save_strategy: 'no'\n")
    assert load_config(path, {}).save_strategy == "no"


@pytest.mark.parametrize("head", ["stage: sft\nfinetuning_type: lora\n",  # LLaMA-Factory
                                  "use_peft: true\nlora_target_modules: all-linear\n"],  # TRL
                         ids=["llama-factory", "trl"])
def test_transformers_files_silent_on_saving_checkpoint_every_500_steps(tmp_path, head):
    """LLaMA-Factory and TRL run TrainingArguments' save_strategy steps: every save_steps, 500 unless given."""
    path = tmp_path / "run.yaml"
    path.write_text(f"model_name_or_path: m\ndataset: d\noutput_dir: o\n{head}")
    cfg = load_config(path, {})
    assert cfg.save_strategy == "steps"
    saves = Cadence(1200, 400, save_strategy=cfg.save_strategy, save_steps=cfg.save_steps).saves
    assert [s for s in range(1, 1201) if saves(s)] == [500, 1000, 1200]
    path.write_text(f"model_name_or_path: m\ndataset: d\noutput_dir: o\n{head}save_steps: 300\n")
    cfg = load_config(path, {})
    saves = Cadence(1200, 400, save_strategy=cfg.save_strategy, save_steps=cfg.save_steps).saves
    assert [s for s in range(1, 1201) if saves(s)] == [300, 600, 900, 1200]


def test_best_model_keys_pass_when_they_change_nothing_and_are_refused_otherwise(tmp_path):
    """TrainingArguments' best-checkpoint keys: off (or the eval loss) is what qlora does; on is refused by name."""
    path = tmp_path / "run.yaml"
    head = "model_name_or_path: m\ndataset: d\noutput_dir: o\n"
    path.write_text(head + "load_best_model_at_end: false\nmetric_for_best_model: eval_loss\ngreater_is_better: "
                           "false\n")
    load_config(path, {})
    for line, named in (("load_best_model_at_end: true", "load_best_model_at_end true"),
                        ("metric_for_best_model: accuracy", "metric_for_best_model 'accuracy'"),
                        ("greater_is_better: true", "greater_is_better true")):
        path.write_text(head + line + "\n")
        with pytest.raises(UsageError, match=f"line 4: {named}"):
            load_config(path, {})


@pytest.mark.parametrize("strategy", ["steps", "epoch"])
def test_an_eval_strategy_without_eval_data_is_refused_naming_what_to_add(tmp_path, tiny_model_dir, capsys, strategy):
    """transformers' Trainer refuses eval_strategy steps or epoch without an eval_dataset; a run here would train
    and evaluate nothing, silently. Held-out data (--eval-split, --eval-data) or strategy no pass."""
    data = _write(tmp_path / "d.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in QA])
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "o"),
            "--eval-strategy", strategy, "--max-steps", "1", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--eval-strategy {strategy}" in err and "--eval-data" in err and "--eval-split" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
    yaml = tmp_path / "c.yaml"
    yaml.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset: {data}\noutput_dir: {tmp_path / 'o'}\n"
                    f"eval_strategy: {strategy}\n")
    with pytest.raises(UsageError, match=f"c.yaml line 4 \\(eval_strategy\\): --eval-strategy {strategy}"):
        load_config(yaml, {})
    yaml.write_text(yaml.read_text() + "val_size: 0.25\n")
    assert load_config(yaml, {}).eval_split == 0.25
    load_config(None, dict(model=str(tiny_model_dir), data=str(data), output=str(tmp_path / "o"),
                           eval_strategy="no"))
