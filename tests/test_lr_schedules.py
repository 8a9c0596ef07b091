"""Learning-rate schedules against transformers' ``get_scheduler``: the same rate at every step, for
every schedule and LoRA+'s two groups; the run's warmup ratio as transformers rounds it; bad schedule
names and kwargs refused by name; a YAML config in other tools' keys trained end to end; --resume
continuing a schedule exactly."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.optim import PLATEAU, SCHEDULES, lr_lambda, schedule_kwargs, schedule_name
from qlora.train.config import load_config
from qlora.train.trainer import Trainer, _make_scheduler

LR = 2e-4
# (transformers' name, kwargs): every schedule, and each with kwargs that change its shape.
CASES = [
    ("constant_with_warmup", {}), ("linear", {}), ("cosine", {}), ("cosine", {"num_cycles": 1.25}),
    ("cosine_with_restarts", {}), ("cosine_with_restarts", {"num_cycles": 3}),
    ("polynomial", {}), ("polynomial", {"power": 2.0, "lr_end": 1e-5}),
    ("inverse_sqrt", {}), ("inverse_sqrt", {"timescale": 7}),
    ("cosine_with_min_lr", {"min_lr_rate": 0.1}), ("cosine_with_min_lr", {"min_lr": 3e-5, "num_cycles": 0.4}),
    ("cosine_warmup_with_min_lr", {"min_lr_rate": 0.1}),
    ("cosine_warmup_with_min_lr", {"min_lr": 1e-5, "warmup_lr_rate": 0.2}),
    ("warmup_stable_decay", {"num_decay_steps": 10}),
    ("warmup_stable_decay", {"num_decay_steps": 12, "num_stable_steps": 20, "warmup_type": "cosine",
                             "decay_type": "1-sqrt", "min_lr_ratio": 0.05}),
    ("warmup_stable_decay", {"num_decay_steps": 9, "decay_type": "linear", "warmup_type": "1-sqrt"}),
]


def _two_groups(lr: float = LR, ratio: float = 16) -> torch.optim.Optimizer:
    """A and B groups as --lora-plus-ratio makes them; the optimizer's default rate is A's."""
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    return torch.optim.SGD([{"params": [a], "lr": lr}, {"params": [b], "lr": ratio * lr}], lr=lr)


def _rates(scheduler, optimizer, steps: int) -> list[list[float]]:
    out = []
    for _ in range(steps + 1):  # the rate of every step, and the one after the last
        out.append(scheduler.get_last_lr())
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.filterwarnings("ignore:Both num_training_steps and num_stable_steps")
@pytest.mark.parametrize("warmup, total", [(0, 40), (5, 40), (7, 41), (1, 2)])
@pytest.mark.parametrize("name, kwargs", CASES)
def test_every_step_has_transformers_rate(name, kwargs, warmup, total):
    if name == "warmup_stable_decay" and warmup + kwargs["num_decay_steps"] + kwargs.get("num_stable_steps", 0) > total:
        pytest.skip("phases longer than the run (refused by qlora train)")
    ref_opt, opt = _two_groups(), _two_groups()
    if name == "inverse_sqrt":  # transformers 4.x's get_scheduler drops its kwargs (the timescale)
        ref = transformers.get_inverse_sqrt_schedule(ref_opt, num_warmup_steps=warmup, **kwargs)
    else:
        ref = transformers.get_scheduler(name, ref_opt, num_warmup_steps=warmup, num_training_steps=total,
                                         scheduler_specific_kwargs=dict(kwargs))
    ours = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(name, warmup, total, LR, kwargs))
    expected, got = _rates(ref, ref_opt, total), _rates(ours, opt, total)
    assert got == expected  # bit for bit, both groups (LoRA+ keeps its ratio)
    assert len({round(r[1] / r[0], 9) for r in got if r[0]}) <= 1


def test_every_schedule_is_tested_and_transformers_constant_is_ours_without_warmup():
    assert {schedule_name(n) for n, _ in CASES} | {PLATEAU} == set(SCHEDULES)  # plateau: in a run, below
    ref_opt, opt = _two_groups(), _two_groups()
    ref = transformers.get_scheduler("constant", ref_opt, num_warmup_steps=5, num_training_steps=20)
    ours = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("constant", 0, 20, LR))
    assert _rates(ours, opt, 20) == _rates(ref, ref_opt, 20)


def test_kwargs_and_defaults_are_transformers_own():
    import inspect

    from transformers import optimization as hf

    functions = {"cosine": hf.get_cosine_schedule_with_warmup,
                 "cosine_with_restarts": hf.get_cosine_with_hard_restarts_schedule_with_warmup,
                 "polynomial": hf.get_polynomial_decay_schedule_with_warmup,
                 "inverse_sqrt": hf.get_inverse_sqrt_schedule,
                 "cosine_with_min_lr": hf.get_cosine_with_min_lr_schedule_with_warmup,
                 "cosine_warmup_with_min_lr": hf.get_cosine_with_min_lr_schedule_with_warmup_lr_rate,
                 "warmup_stable_decay": hf.get_wsd_schedule}
    passed_by_trainer = {"optimizer", "num_warmup_steps", "num_training_steps", "last_epoch"}
    for name, fn in functions.items():
        theirs = {p.name: p.default for p in inspect.signature(fn).parameters.values()
                  if p.name not in passed_by_trainer}
        if name == "warmup_stable_decay":
            theirs["num_decay_steps"] = None  # required by transformers; ours says so by name
        assert schedule_kwargs(name) == theirs, name
    torch_plateau = inspect.signature(torch.optim.lr_scheduler.ReduceLROnPlateau).parameters.values()
    assert schedule_kwargs(PLATEAU) == {p.name: p.default for p in torch_plateau if p.name != "optimizer"}


@pytest.mark.parametrize("ratio, total", [(0.03, 100), (0.07, 100), (0.1, 7), (0.5, 3)])
def test_warmup_ratio_is_rounded_up_as_transformers_does(ratio, total, tmp_path):
    cfg = load_config(None, dict(model="m", data="d", output="o", lr=LR, warmup_ratio=ratio, lr_scheduler="linear"))
    try:  # transformers 5 takes a ratio as a fractional warmup_steps
        args = transformers.TrainingArguments(output_dir=str(tmp_path), warmup_steps=ratio, report_to="none")
    except ValueError:  # transformers 4.x: as warmup_ratio
        args = transformers.TrainingArguments(output_dir=str(tmp_path), warmup_ratio=ratio, report_to="none")
    ref_opt, opt = _two_groups(), _two_groups()
    ref = transformers.get_scheduler("linear", ref_opt, num_warmup_steps=args.get_warmup_steps(total),
                                     num_training_steps=total)
    assert _rates(_make_scheduler(cfg, opt, total), opt, total) == _rates(ref, ref_opt, total)


@pytest.mark.parametrize("flags, message", [
    (["--lr-scheduler", "cosine", "--lr-scheduler-kwargs", "min_lr_rate=0.1"],
     "--lr-scheduler-kwargs: schedule cosine does not take min_lr_rate (it belongs to cosine_warmup_with_min_lr, "
     "cosine_with_min_lr); it takes num_cycles"),
    (["--lr-scheduler", "linear", "--lr-scheduler-kwargs", '{"power": 2}'], "schedule linear does not take power"),
    (["--lr-scheduler", "cosine_with_min_lr"], "cosine_with_min_lr needs min_lr (an absolute rate) or min_lr_rate"),
    (["--lr-scheduler", "cosine_with_min_lr", "--lr-scheduler-kwargs", "min_lr=0.1,min_lr_rate=0.1"], "not both"),
    (["--lr-scheduler", "polynomial", "--lr-scheduler-kwargs", "lr_end=0.5"], "lr_end (0.5) must be below"),
    (["--lr-scheduler", "warmup_stable_decay"], "warmup_stable_decay needs num_decay_steps"),
    (["--lr-scheduler", "warmup_stable_decay", "--lr-scheduler-kwargs", "num_decay_steps=3,decay_type=exp"],
     "decay_type must be one of linear, cosine, 1-sqrt; got 'exp'"),
    (["--lr-scheduler-kwargs", "num_cycles"], "--lr-scheduler-kwargs: 'num_cycles' is not KEY=VALUE"),
    (["--lr-scheduler-kwargs", "{num_cycles: 1}"], "is not a JSON object"),
    (["--lr-scheduler", "reduce_lr_on_plateau"], "--lr-scheduler reduce_lr_on_plateau lowers the rate when the eval "
                                                 "loss stops improving: give --eval-steps N and held-out data"),
    (["--lr-scheduler", "reduce_lr_on_plateau", "--eval-steps", "2", "--eval-split", "0.2", "--lr-scheduler-kwargs",
      "mode=max"], "mode must be min: the metric is the eval loss"),
    (["--lr-scheduler", "reduce_lr_on_plateau", "--eval-steps", "2", "--eval-split", "0.2", "--lr-scheduler-kwargs",
      "num_cycles=2"], "schedule reduce_lr_on_plateau does not take num_cycles"),
    (["--lr-scheduler", "greedy"], "--lr-scheduler: greedy is not available: qlora does not implement"),
    (["--lr-scheduler", "cosine_annealing"], "unknown schedule 'cosine_annealing'; qlora's schedules are constant, "
                                             "linear, cosine"),
    (["--optim", "adafactor"], "--optim: 'adafactor' is not available: qlora trains with AdamW only"),
    (["--optim", "adamw_hf"], "adds eps before the bias correction"),
    (["--optim", "lion_8bit"], "adamw (= adamw_torch, adamw_torch_fused), adamw_8bit (= adamw_bnb_8bit)"),
    (["--adam-beta2", "1"], "--adam-beta2 must be in [0, 1); got 1.0"),
    (["--adam-beta1", "-0.1"], "--adam-beta1 must be in [0, 1)"),
    (["--adam-epsilon", "0"], "--adam-epsilon must be positive; got 0.0"),
])
def test_bad_schedule_and_optimizer_options_exit_2_naming_them(flags, message, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi"}\n')
    code = main(["train", "--model", str(tmp_path), "--data", str(data), "--output", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_wsd_phases_longer_than_the_run_are_refused(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {i} and 1.", "output": str(i + 1)}) + "\n"
                            for i in range(4)))
    cfg = load_config(None, dict(model=str(tiny_model_dir), data=str(data), output=str(tmp_path / "o"), max_steps=5,
                                 warmup_steps=2, lr_scheduler="warmup_stable_decay",
                                 lr_scheduler_kwargs="num_decay_steps=4", progress=False, seq_len=32))
    with pytest.raises(UsageError, match=r"its phases \(2 warmup \+ 4 decay steps\) exceed the run's 5 steps"):
        Trainer(cfg).run()


def test_estimate_takes_the_same_optimizer_names(capsys, tiny_model_dir):
    model = str(tiny_model_dir)  # any model takes the names; a 2-layer one is measured in a fraction of the time
    assert main(["estimate", model, "--optim", "adamw_bnb_8bit"]) == 0
    by_alias = capsys.readouterr().out
    assert main(["estimate", model, "--optim", "adamw_8bit"]) == 0
    assert capsys.readouterr().out == by_alias and "optimizer states (adamw_8bit)" in by_alias
    assert main(["estimate", model, "--optim", "adamw_torch_fused"]) == 0
    assert "optimizer states (adamw)" in capsys.readouterr().out
    assert main(["estimate", model, "--optim", "sgd"]) == 2
    assert "--optim: 'sgd' is not available" in capsys.readouterr().err


def _data(path):
    path.write_text("".join(json.dumps({"instruction": f"What is {a} plus {b}?", "output": str(a + b)}) + "\n"
                            for a in range(4) for b in range(3)))
    return path


def _lrs(out) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["lr"] for r in records if r.get("split") == "train"]


def test_yaml_config_in_llama_factory_and_trl_keys_trains_with_their_schedule_and_adamw(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(f"""
model_name_or_path: {tiny_model_dir}
dataset: {_data(tmp_path / "d.jsonl")}
output_dir: {out}
per_device_train_batch_size: 2
learning_rate: 1.0e-3
max_steps: 6
lr_scheduler_type: cosine_with_min_lr
lr_scheduler_kwargs:
  min_lr_rate: 0.1
warmup_steps: 0.2  # transformers 5: a share of the steps
optim: adamw_torch_fused
adam_beta1: 0.85
adam_beta2: 0.95
adam_epsilon: 1.0e-6
weight_decay: 0.01
cutoff_len: 64
lora_rank: 4
lora_alpha: 8
lora_dropout: 0.0
""")
    assert main(["train", str(config), "--no-progress"]) == 0
    opt = _two_groups(1e-3)
    ref = transformers.get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=2, num_training_steps=6,
                                     scheduler_specific_kwargs={"min_lr_rate": 0.1})  # ceil(0.2 x 6) warmup steps
    assert _lrs(out) == [r[0] for r in _rates(ref, opt, 5)]
    state = torch.load(next((out / "checkpoints").iterdir()) / "trainer_state.pt", weights_only=True)
    group = state["optimizer"]["param_groups"][0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.85, 0.95), 1e-6, 0.01)
    import yaml

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert (resolved["optim"], resolved["lr_scheduler"]) == ("adamw", "cosine_with_min_lr")
    assert resolved["warmup_ratio"] == 0.2
    assert json.loads(resolved["lr_scheduler_kwargs"]) == {"min_lr_rate": 0.1}
    again = tmp_path / "again.yaml"  # the resolved config runs the same schedule
    again.write_text((out / "config.yaml").read_text().replace(str(out), str(tmp_path / "again")))
    assert main(["train", str(again), "--no-progress"]) == 0
    assert _lrs(tmp_path / "again") == _lrs(out)


@pytest.mark.parametrize("optim", ["adamw_torch", "paged_adamw_8bit"])
def test_resume_continues_the_schedule_exactly(tmp_path, tiny_model_dir, optim):
    data = _data(tmp_path / "d.jsonl")
    kw = dict(model=str(tiny_model_dir), data=str(data), optim=optim, lr=1e-2, max_steps=8, save_steps=4,
              batch_size=2, seq_len=64, dropout=0.1, progress=False, warmup_steps=2, lora_plus_ratio=4,
              lr_scheduler="warmup_stable_decay", adam_beta2=0.95, adam_epsilon=1e-6,
              lr_scheduler_kwargs='{"num_decay_steps": 4, "decay_type": "1-sqrt", "min_lr_ratio": 0.1}')
    full = Trainer(load_config(None, kw | dict(output=str(tmp_path / "full")))).run()
    first = Trainer(load_config(None, kw | dict(output=str(tmp_path / "part"))))
    first.setup()
    first.total_steps = 4  # stop as if killed right after the step-4 checkpoint
    first.train()
    first.cleanup()
    resumed = Trainer(load_config(None, kw | dict(output=str(tmp_path / "part"), resume=True,
                                                  lr_scheduler_kwargs="min_lr_ratio=0.1,num_decay_steps=4,"
                                                                      "decay_type=1-sqrt")))  # same, spelled otherwise
    assert resumed.run() == full  # bit-identical on CPU
    lrs = _lrs(tmp_path / "full")
    assert _lrs(tmp_path / "part") == lrs and len(set(lrs)) == 5  # warmup, stable, decay: a non-trivial schedule
    opt = _two_groups(1e-2, 4)
    ref = transformers.get_scheduler("warmup_stable_decay", opt, num_warmup_steps=2, num_training_steps=8,
                                     scheduler_specific_kwargs={"num_decay_steps": 4, "decay_type": "1-sqrt",
                                                                "min_lr_ratio": 0.1})
    assert lrs == [r[0] for r in _rates(ref, opt, 7)]
    refused = Trainer(load_config(None, kw | dict(output=str(tmp_path / "part"), resume=True,
                                                  lr_scheduler_kwargs="num_decay_steps=3")))
    with pytest.raises(UsageError, match="lr_scheduler_kwargs"):
        refused.run()


def test_reduce_lr_on_plateau_follows_the_eval_loss_as_transformers_and_resumes(tmp_path, tiny_model_dir):
    data = _data(tmp_path / "d.jsonl")
    plateau = {"patience": 1, "factor": 0.5, "threshold": 0.02, "threshold_mode": "abs"}
    kw = dict(model=str(tiny_model_dir), data=str(data), optim="adamw", lr=1e-2, max_steps=10, save_steps=5,
              batch_size=2, seq_len=64, dropout=0.0, progress=False, lora_plus_ratio=4, eval_split=3, eval_steps=1,
              lr_scheduler="reduce_lr_on_plateau", lr_scheduler_kwargs=json.dumps(plateau), warmup_steps=3)
    full = Trainer(load_config(None, kw | dict(output=str(tmp_path / "full")))).run()
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["loss"] for r in records if r.get("split") == "eval"][:10]
    opt = _two_groups(1e-2, 4)  # transformers' scheduler stepped with the same eval losses
    ref = transformers.get_scheduler("reduce_lr_on_plateau", opt, num_warmup_steps=3, num_training_steps=10,
                                     scheduler_specific_kwargs=dict(plateau))
    expected = []
    for loss in evals:
        expected.append(opt.param_groups[0]["lr"])
        ref.step(loss)
    lrs = _lrs(tmp_path / "full")
    assert lrs == expected and lrs[-1] < lrs[0] and lrs[0] == 1e-2  # no warmup, as transformers; it did lower
    first = Trainer(load_config(None, kw | dict(output=str(tmp_path / "part"))))
    first.setup()
    first.total_steps = 5
    first.train()
    first.cleanup()
    assert Trainer(load_config(None, kw | dict(output=str(tmp_path / "part"), resume=True))).run() == full
    assert _lrs(tmp_path / "part") == lrs
    with pytest.raises(UsageError, match="eval_steps"):  # its rates follow the evaluations: they define the run
        Trainer(load_config(None, kw | dict(output=str(tmp_path / "part"), resume=True, eval_steps=2))).run()


def test_axolotl_cosine_min_lr_ratio_is_cosine_with_min_lr(tmp_path):
    """axolotl's get_cosine_schedule_with_min_lr: warmup, then (1 - ratio) x half-cosine + ratio."""
    import math

    config = tmp_path / "axolotl.yaml"
    config.write_text("base_model: m\ndataset: d\noutput_dir: o\nlr_scheduler: cosine\ncosine_min_lr_ratio: 0.1\n")
    cfg = load_config(config, {})
    assert (cfg.lr_scheduler, json.loads(cfg.lr_scheduler_kwargs)) == ("cosine_with_min_lr", {"min_lr_rate": 0.1})
    factor = lr_lambda(cfg.lr_scheduler, 4, 30, cfg.lr, json.loads(cfg.lr_scheduler_kwargs))

    def axolotl(step, warmup=4, total=30, ratio=0.1):  # axolotl.utils.schedulers' formula
        if step < warmup:
            return float(step) / float(max(1, warmup))
        progress = float(step - warmup) / float(max(1, total - warmup))
        return (1 - ratio) * (0.5 * (1.0 + math.cos(math.pi * progress))) + ratio

    assert [factor(s) for s in range(31)] == [axolotl(s) for s in range(31)]
    config.write_text("base_model: m\ndataset: d\noutput_dir: o\nlr_scheduler: linear\ncosine_min_lr_ratio: 0.1\n")
    with pytest.raises(UsageError, match="axolotl.yaml line 5: cosine_min_lr_ratio .axolotl. sets the floor of "
                                         "lr_scheduler: cosine; this config's schedule is linear"):
        load_config(config, {})
