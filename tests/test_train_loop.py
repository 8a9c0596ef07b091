"""End-to-end CPU tests of ``qlora train``: loss falls, resume, checkpoints, bad input, accumulation."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.train.config import load_config
from qlora.train.trainer import Interrupted, Trainer, list_checkpoints

from cli_exit import cli_exit

QA = [("What is two plus two?", "four"), ("Name a red fruit.", "An apple is red."),
      ("Say hello.", "Hello there!"), ("What colour is the sky?", "The sky is blue."),
      ("Count to three.", "one two three"), ("What is a fox?", "A quick brown animal.")]

FORMATS = {
    "alpaca": [{"instruction": q, "input": "", "output": a} for q, a in QA],
    "chat": [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA],
    "sharegpt": [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in QA],
    "text": [{"text": f"{q} {a}"} for q, a in QA],
}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), output=str(out), optim="adamw", lr=1e-2, max_steps=30,
                batch_size=2, progress=False, seq_len=64)
    base.update(kw)
    return load_config(None, base)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_loss_falls_on_every_format(tmp_path, tiny_model_dir, fmt):
    data = _write(tmp_path / f"{fmt}.jsonl", FORMATS[fmt])
    # Plain text trains on every token, a chat answer only on "<sum>." and its end marker: both need
    # more steps than a few constant tokens would (issue 20: no trailing "\n" + extra EOS to learn any more).
    steps = 60
    losses = Trainer(_config(tiny_model_dir, data, tmp_path / "out", max_steps=steps)).run()
    assert len(losses) == steps
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    out = tmp_path / "out"
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl", "loss.png",
                 "tokenizer.json"):
        assert (out / name).is_file(), name
    assert any((out / "events").iterdir())


@pytest.mark.parametrize("optim", ["adamw", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"])
def test_resume_reproduces_uninterrupted_losses(tmp_path, tiny_model_dir, optim):
    data = _write(tmp_path / "d.jsonl", FORMATS["alpaca"])
    kw = dict(max_steps=8, save_steps=4, dropout=0.1, lr_scheduler="cosine", warmup_steps=2, grad_accum=2, optim=optim)
    full = Trainer(_config(tiny_model_dir, data, tmp_path / "full", **kw)).run()
    first = Trainer(_config(tiny_model_dir, data, tmp_path / "part", **kw))
    first.setup()
    first.total_steps = 4  # stop as if killed right after the step-4 checkpoint
    first.train()
    first.cleanup()
    assert len(first.losses) == 4
    stale = tmp_path / "part" / "checkpoints" / ".step-0000005.tmp-killed"  # a checkpoint being written at a kill -9
    (stale / "adapter").mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    replaced = tmp_path / "part" / "checkpoints" / f".step-0000004.old-{dead.pid}"  # killed as it replaced step 4
    (replaced / "adapter").mkdir(parents=True)
    resumed = Trainer(_config(tiny_model_dir, data, tmp_path / "part", resume=True, **kw)).run()
    assert resumed == full  # bit-identical on CPU
    assert not stale.exists() and not replaced.exists()  # cleared by the next checkpoint's writer
    steps = [json.loads(line)["step"] for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_a_record_of_logging_steps_is_their_mean_and_a_resume_inside_it_keeps_it(tmp_path, tiny_model_dir):
    """--logging-steps 3: each record holds the mean loss of its 3 steps with the last one's rate (transformers'
    logging); a run stopped by Ctrl-C at step 4 (checkpoint mid-window) and resumed writes the same records."""
    data = _write(tmp_path / "d.jsonl", FORMATS["alpaca"])
    kw = dict(max_steps=8, logging_steps=3, lr_scheduler="linear", warmup_steps=2)
    full = Trainer(_config(tiny_model_dir, data, tmp_path / "full", **kw))
    losses = full.run()

    class StoppedAfter4(Trainer):
        def train_step(self):
            record = super().train_step()
            if self.step == 3:  # Ctrl-C during step 4: it finishes, a checkpoint is written, the run stops
                self._stop_signal = 2
            return record

    with pytest.raises(Interrupted):
        StoppedAfter4(_config(tiny_model_dir, data, tmp_path / "part", **kw)).run()
    assert Trainer(_config(tiny_model_dir, data, tmp_path / "part", resume=True, **kw)).run() == losses

    def records(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    written = records(tmp_path / "full")
    assert [r["step"] for r in written] == [3, 6, 8]
    for record, window in zip(written, [losses[0:3], losses[3:6], losses[6:8]]):
        assert record["loss"] == pytest.approx(sum(window) / len(window), rel=1e-12)
    assert written[1]["lr"] == pytest.approx(1e-2 * (8 - 5) / (8 - 2))  # step 6's rate, linear after warmup
    timing = ("tokens_per_s", "gpu_mem_gib")
    assert [{k: v for k, v in r.items() if k not in timing} for r in records(tmp_path / "part")] == \
        [{k: v for k, v in r.items() if k not in timing} for r in written]


def test_checkpoints_are_atomic_and_limited(tmp_path, tiny_model_dir):
    data = _write(tmp_path / "d.jsonl", FORMATS["chat"])
    Trainer(_config(tiny_model_dir, data, tmp_path / "o", max_steps=6, save_steps=1, save_total_limit=2)).run()
    ckpts = list_checkpoints(tmp_path / "o")
    assert [p.name for p in ckpts] == ["step-0000005", "step-0000006"]
    assert not [p for p in (tmp_path / "o" / "checkpoints").iterdir() if p.name.startswith(".")]
    assert {p.name for p in ckpts[-1].iterdir()} == {"adapter", "trainer_state.pt", "run_config.json"}


def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path, tiny_model_dir, capsys):
    data = _write(tmp_path / "d.jsonl", FORMATS["alpaca"])
    out = tmp_path / "o"
    first = Trainer(_config(tiny_model_dir, data, out, max_steps=8, save_steps=2))
    first.setup()
    first.total_steps = 4
    first.train()
    first.cleanup()
    before = (list_checkpoints(out)[-1] / "adapter" / "adapter_model.safetensors").read_bytes()
    trainer = Trainer(_config(tiny_model_dir, data, out, max_steps=8, save_steps=2, resume=True))
    trainer.setup()
    layer = trainer.model.model.layers[1].mlp.down_proj
    layer.register_forward_hook(lambda m, i, o: o * float("nan"))
    with pytest.raises(Exception) as info:
        trainer.train()
    trainer.cleanup()
    assert "non-finite loss at step 5" in str(info.value) and "layers.1.mlp.down_proj" in str(info.value)
    assert (list_checkpoints(out)[-1] / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_accumulation_equals_big_batch(tmp_path, tiny_model_dir):
    rows = [{"instruction": "word " * (2 + 2 * i), "input": "", "output": "x " * (1 + 3 * i)} for i in range(8)]
    data = _write(tmp_path / "v.jsonl", rows)
    grads = []
    for bs, accum in ((8, 1), (1, 8)):
        t = Trainer(_config(tiny_model_dir, data, tmp_path / f"g{bs}", batch_size=bs, grad_accum=accum,
                            dropout=0.0, max_steps=1, seq_len=128))  # every example keeps its answer
        t.setup()
        with torch.no_grad():  # non-zero B so every LoRA parameter has a gradient
            for p in t.model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
        t.optimizer.step = lambda: None
        t.train_step()
        grads.append(torch.cat([p.grad.flatten() for p in t.model.parameters() if p.requires_grad]))
        t.cleanup()
    assert len({len(r["output"]) for r in rows}) == 8
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_bad_inputs_exit_2_without_traceback(tmp_path, tiny_model_dir, capsys):
    good = _write(tmp_path / "good.jsonl", FORMATS["alpaca"])
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    missing = _write(tmp_path / "missing.jsonl", [{"instruction": "no output"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("precious")
    yaml_bad = tmp_path / "c.yaml"
    yaml_bad.write_text("rnak: 8\n")
    base = ["train", "--model", str(tiny_model_dir), "--optim", "adamw", "--max-steps", "1", "--no-progress"]
    cases = [
        (base + ["--data", str(bad_json), "--output", str(tmp_path / "o1")], "line 2"),
        (base + ["--data", str(missing), "--output", str(tmp_path / "o2")], "output"),
        (base + ["--data", str(empty), "--output", str(tmp_path / "o3")], "empty"),
        (base + ["--data", str(good), "--seq-len", "3", "--output", str(tmp_path / "o4")], "raise --seq-len"),
        (base + ["--data", str(good), "--output", str(tmp_path / "o5"), "--rnak", "4"], "--rank"),
        (["train", str(yaml_bad)] + base[1:] + ["--data", str(good), "--output", str(tmp_path / "o6")], "rank"),
        (["train", "--model", str(tmp_path / "nope"), "--data", str(good), "--output", str(tmp_path / "o7")], "nope"),
        (base + ["--data", str(good), "--output", str(existing)], "--overwrite"),
        (base + ["--data", str(good), "--output", str(tmp_path / "o9"), "--target-modules", "zzz_proj"], "zzz_proj"),
        (base + ["--data", str(good), "--output", str(tmp_path / "o10"), "--optim", "adamw", "--resume"], "no run to resume"),
        (base + ["--data", str(good), "--output", str(tmp_path / "o11"), "--resume"],
         "o11 is an empty folder, so there is no run to resume"),  # made for the run, which never started
    ]
    (tmp_path / "o11").mkdir()
    for argv, expected in cases:
        code, err = cli_exit(argv, capsys)
        assert code == 2, (argv, err)
        assert expected.lower() in err.lower(), (expected, err)
        assert "Traceback" not in err
    assert (existing / "keep.txt").read_text() == "precious"
    for i in (1, 2, 3, 4, 5, 6, 7, 9):
        assert not (tmp_path / f"o{i}").exists()


def test_resume_with_different_config_is_refused(tmp_path, tiny_model_dir, capsys):
    data = _write(tmp_path / "d.jsonl", FORMATS["alpaca"])
    out = tmp_path / "o"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--optim", "adamw",
            "--max-steps", "2", "--save-steps", "1", "--no-progress"]
    assert main(argv) == 0
    before = sorted(p.name for p in out.rglob("*"))
    code, err = cli_exit(argv + ["--resume", "--lr", "0.1"], capsys)
    assert code == 2 and "different config" in err and "lr" in err
    assert sorted(p.name for p in out.rglob("*")) == before


def test_resume_refusing_a_longer_run_says_how_to_train_further(tmp_path, tiny_model_dir, capsys):
    """Asked for more epochs or steps of a schedule that spans the run (the steps so far would have had other
    rates), --resume refuses naming the command that continues the run's adapter into a new folder, and that
    command trains (tests/test_resume_length.py: the lengths that resume)."""
    import re
    import shlex

    data = _write(tmp_path / "d.jsonl", FORMATS["alpaca"])
    out = tmp_path / "o"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--optim", "adamw",
            "--max-steps", "2", "--save-steps", "1", "--no-progress", "--lr-scheduler", "linear"]
    assert main(argv) == 0
    for longer in (["--max-steps", "4"], ["--max-steps", "0", "--epochs", "3"]):
        code, err = cli_exit(argv + ["--resume"] + longer, capsys)
        assert code == 2 and "--lr-scheduler linear over" in err and "instead of 2" in err, err
        suggested = re.search(r"qlora train (--adapter \S+ --output \S+)", err)
        assert suggested, err
        flags = shlex.split(suggested.group(1))
        assert flags[1] == str(out) and not (tmp_path / flags[3]).exists()
    assert main(argv[:5] + flags + ["--optim", "adamw", "--max-steps", "2", "--no-progress"]) == 0
    assert (tmp_path / flags[3] / "adapter_model.safetensors").is_file()


def test_resume_of_a_checkpoint_older_than_an_option_uses_its_default(tmp_path, tiny_model_dir, capsys, caplog):
    """Options added to qlora after a checkpoint was written are absent from its run_config.json:
    the run used their default, so resuming with the default is no config change; another value is."""
    from qlora.train.trainer import list_checkpoints

    data = _write(tmp_path / "d.jsonl", FORMATS["alpaca"])
    out = tmp_path / "o"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--optim", "adamw",
            "--max-steps", "3", "--save-steps", "1", "--no-progress"]
    assert main(argv) == 0
    for ckpt in list_checkpoints(out):
        run_config = ckpt / "run_config.json"
        saved = json.loads(run_config.read_text())
        for key in ("data_fields", "system_into_user", "lr_scheduler_kwargs", "adam_beta1", "adam_beta2",
                    "adam_epsilon", "epoch_steps", "quantize_experts"):
            del saved[key]
        run_config.write_text(json.dumps(saved))
    code, err = cli_exit(argv + ["--resume", "--data-fields", "output=answer"], capsys)
    assert code == 2 and "data_fields: '' (the default then) -> 'output=answer'" in err
    code, err = cli_exit(argv + ["--resume", "--adam-beta2", "0.95"], capsys)
    assert code == 2 and "adam_beta2: 0.999 (the default then) -> 0.95" in err
    with caplog.at_level("WARNING", logger="qlora"):
        code, err = cli_exit(argv + ["--resume", "--lr-scheduler", "constant_with_warmup"], capsys)  # = constant
    assert code == 0, err
    assert any("written by an older qlora, whose warmup" in r.getMessage() for r in caplog.records)
    assert any("whose steps ran on across epochs' ends" in r.getMessage() for r in caplog.records)


def test_resume_of_a_checkpoint_older_than_quantize_experts_says_how(tmp_path, tiny_model_dir, capsys):
    """A checkpoint from before --quantize-experts quantized its experts (the default then); an axolotl 4-bit file
    silent on quantize_moe_experts now keeps them 16-bit, so its resume is refused, showing the checkpoint's value
    and how to resume with its 4-bit experts, and resumes so."""
    from qlora.train.trainer import list_checkpoints

    data = _write(tmp_path / "d.jsonl", FORMATS["alpaca"])
    out = tmp_path / "o"
    axolotl = tmp_path / "axolotl.yml"
    head = (f"base_model: {tiny_model_dir}\nadapter: qlora\nload_in_4bit: true\noutput_dir: {out}\n"
            f"datasets:\n  - path: {data}\n    type: alpaca\nmax_steps: 2\nsave_steps: 1\n"
            "optimizer: adamw_torch\nmicro_batch_size: 1\n")
    axolotl.write_text(head + "quantize_moe_experts: true\n")
    assert main(["train", str(axolotl), "--no-progress", "--max-steps", "1"]) == 0
    for ckpt in list_checkpoints(out):  # as qlora wrote it before the option
        saved = json.loads((ckpt / "run_config.json").read_text())
        del saved["quantize_experts"]
        (ckpt / "run_config.json").write_text(json.dumps(saved))
    axolotl.write_text(head)
    code, err = cli_exit(["train", str(axolotl), "--resume", "--no-progress", "--max-steps", "1"], capsys)
    assert code == 2, err
    assert "different config (quantize_experts: True (the default then) -> False)" in err, err
    assert "add quantize_moe_experts: true to the config file" in err and "pass --quantize-experts" in err
    code, err = cli_exit(["train", str(axolotl), "--resume", "--no-progress", "--max-steps", "1", "--quantize-experts"],
                     capsys)
    assert code == 0, err


def test_subprocess_unknown_flag(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "qlora", "train", "--batchsize", "2"], capture_output=True,
                          text=True, env={"PYTHONPATH": "src", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    assert "--batch-size" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("checkpointing", [False, True])
def test_first_step_checks_that_gradients_reach_every_adapter(tmp_path, tiny_model_dir, checkpointing):
    data = _write(tmp_path / "d.jsonl", FORMATS["alpaca"])
    t = Trainer(_config(tiny_model_dir, data, tmp_path / "o", max_steps=1, gradient_checkpointing=checkpointing))
    t.setup()
    t.train_step()  # passes: every adapter has a gradient, every B a non-zero one
    grads = {n: p.grad for n, p in t.model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    t.cleanup()


def test_first_step_stops_when_the_graph_misses_the_adapters(tmp_path, tiny_model_dir):
    from qlora.nn import LoraLinear

    data = _write(tmp_path / "d.jsonl", FORMATS["alpaca"])
    t = Trainer(_config(tiny_model_dir, data, tmp_path / "o", max_steps=1, gradient_checkpointing=True))
    t.setup()
    for layer in t.model.modules():  # the loss still needs a backward pass, but not through the adapters
        if isinstance(layer, LoraLinear):
            layer.disabled = True
    with pytest.raises(UsageError, match="no gradient reached"):
        t.train_step()
    t.cleanup()


def test_adapters_a_batch_does_not_reach_are_a_warning_and_the_rest_train(tmp_path, tiny_model_dir, caplog):
    """Some layers are legitimately unreached by a batch (DeepSeek-V4's compressors on short sequences, an
    expert no token chose): the run warns, naming one, and trains the others."""
    from qlora.nn import LoraLinear

    data = _write(tmp_path / "d.jsonl", FORMATS["alpaca"])
    t = Trainer(_config(tiny_model_dir, data, tmp_path / "o", max_steps=2, warmup_ratio=0))  # step 1 moves the weights
    t.setup()
    unreached = [name for name, layer in t.model.named_modules()
                 if isinstance(layer, LoraLinear) and ".layers.1." in name]
    for name in unreached:
        t.model.get_submodule(name).disabled = True
    with caplog.at_level("WARNING", logger="qlora"):
        t.train_step()
    said = [r.getMessage() for r in caplog.records if "no gradient" in r.getMessage()]
    assert len(said) == 1 and f"{len(unreached)} adapted layers" in said[0] and min(unreached) in said[0], said
    # true also where the model's own autograd Function (Reformer's reversible layers) hides them from the graph
    assert "or the model computes them in a way the loss's graph does not see" in said[0], said
    reached = [layer for name, layer in t.model.named_modules() if isinstance(layer, LoraLinear)
               and name not in unreached]
    assert reached and all(layer.lora_B["default"].weight.abs().sum() > 0 for layer in reached)
    t.cleanup()


def _strict_json(line: str):
    """A metrics.jsonl line as a strict parser (jq, JavaScript, Go) reads it: NaN and Infinity are no JSON."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(line, parse_constant=refuse)


def test_a_nonfinite_eval_loss_is_written_as_strict_json_and_old_files_with_nan_still_resume(tmp_path,
                                                                                            tiny_model_dir):
    """A model whose eval forward overflows: the run goes on (training is finite) and metrics.jsonl holds null
    with the value named in ``nonfinite``, not a bare NaN; a file an older run wrote with NaN is read on resume,
    written back as strict JSON, and plotted."""
    from qlora.train.metrics import MetricsLogger

    data = _write(tmp_path / "d.jsonl", FORMATS["alpaca"])
    held = _write(tmp_path / "e.jsonl", FORMATS["alpaca"][:2])
    out = tmp_path / "o"
    trainer = Trainer(_config(tiny_model_dir, data, out, max_steps=2, eval_data=str(held), eval_steps=1))
    trainer.setup()
    trainer.model.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda m, i, o: o if m.training else o * float("nan"))
    trainer.train()
    trainer.cleanup()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [_strict_json(line) for line in lines]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [1, 2]
    assert all(r["loss"] is None and r["perplexity"] is None for r in evals)
    assert all(r["nonfinite"] == {"loss": "NaN", "perplexity": "NaN"} for r in evals)
    assert all(math.isfinite(r["loss"]) and "nonfinite" not in r for r in records if r["split"] == "train")
    assert (out / "loss.png").stat().st_size > 0

    old = [line.replace('"loss": null, "perplexity": null, "nonfinite": {"loss": "NaN", "perplexity": "NaN"}',
                        '"loss": NaN, "perplexity": NaN') for line in lines]
    assert old != lines
    (out / "metrics.jsonl").write_text("\n".join(old) + "\n")
    (out / "loss.png").unlink()
    resumed = MetricsLogger(out, total_steps=2, start_step=1, progress=False, kept=2)  # train 1 and eval 1 kept
    resumed.close()
    assert [_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()] == records[:2]
    assert (out / "loss.png").stat().st_size > 0


def test_fp16_runs_use_loss_scaling(tmp_path, tiny_model_dir):
    data = _write(tmp_path / "d.jsonl", FORMATS["alpaca"])
    t = Trainer(_config(tiny_model_dir, data, tmp_path / "o", max_steps=5, precision="fp16"))
    losses = t.run()
    assert t.scaler is not None and t.scaler.get_scale() > 1
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_an_fp16_step_whose_update_overflow_skips_leaves_the_schedule_where_it_was(tmp_path, tiny_model_dir):
    """The loss scaler skips the update of a step whose fp16 gradients are not finite (and halves its scale);
    transformers' Trainer then leaves the learning-rate schedule as it was (accelerate's optimizer_step_was_skipped),
    so warmup and decay count the updates made. A scale far too large at the start makes the first steps skip."""
    from transformers import get_scheduler

    data = _write(tmp_path / "d.jsonl", FORMATS["alpaca"])
    t = Trainer(_config(tiny_model_dir, data, tmp_path / "o", max_steps=8, precision="fp16", lr_scheduler="linear",
                        warmup_steps=2, dropout=0.0))
    t.setup()
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 21)
    t.train()
    t.cleanup()
    records = [_strict_json(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["grad_norm"] is None for r in records]  # a norm not finite, written null and named
    assert any(skipped[:2]) and not all(skipped)
    assert all(r["nonfinite"].keys() == {"grad_norm"} and r["nonfinite"]["grad_norm"] in ("NaN", "Infinity")
               for r, skip in zip(records, skipped) if skip)
    reference = get_scheduler("linear", torch.optim.SGD([torch.zeros(1)], lr=1e-2), num_warmup_steps=2,
                              num_training_steps=8)
    for record, skip in zip(records, skipped):
        assert record["lr"] == pytest.approx(reference.get_last_lr()[0], abs=1e-12), record["step"]
        if not skip:
            reference.step()
    assert t.scheduler.last_epoch == skipped.count(False)


def test_chunked_loss_reproduces_the_plain_loss_and_is_refused_where_logits_differ(tmp_path, tiny_model_dir,
                                                                                    tiny_tokenizer):
    from qlora.model.tiny import build_tiny_model

    data = _write(tmp_path / "d.jsonl", FORMATS["chat"])
    runs = {}
    for chunked in (True, False):
        t = Trainer(_config(tiny_model_dir, data, tmp_path / f"c{chunked}", max_steps=5, chunked_ce=chunked))
        runs[chunked] = t.run()
        assert t.chunked_ce is chunked
    torch.testing.assert_close(torch.tensor(runs[True]), torch.tensor(runs[False]), rtol=1e-5, atol=1e-6)
    gemma = build_tiny_model(tmp_path / "gemma2", tokenizer=tiny_tokenizer, arch="gemma2",
                             final_logit_softcapping=5.0)
    t = Trainer(_config(gemma, data, tmp_path / "g", max_steps=1))
    t.setup()
    assert t.chunked_ce is False  # soft-capped logits are not hidden @ W^T
    t.cleanup()


def test_model_with_nonfinite_logits_from_the_start_is_reported_not_crashed(tmp_path, tiny_model_dir, capsys):
    """The chunked-loss check runs before the first step; a checkpoint whose logits are NaN from
    the start (a NaN norm weight) must reach the first step's report, not crash the check."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    data = _write(tmp_path / "d.jsonl", FORMATS["alpaca"])
    code, err = cli_exit(["train", "--model", str(broken), "--data", str(data), "--output", str(tmp_path / "o"),
                      "--max-steps", "2", "--no-progress", "--chunked-ce"], capsys)
    assert code != 0 and "Traceback" not in err
    assert "non-finite loss at step 1" in err and "model.norm" in err


def test_eval_source_names_are_distinct_keys_without_a_zstd_suffix():
    """A zstd shard is named as its .gz sibling is; a repeat numbered past a file already named so keeps each
    source's ``<name>_loss`` its own key (before: test, test_2, test_2, and the second overwrote the first)."""
    from qlora.train.data.selection import source_names

    assert source_names("a/val.jsonl.zst,b/val.jsonl.gz") == ["val", "val_2"]
    assert source_names("a/test.jsonl,b/test.jsonl,test_2.jsonl") == ["test", "test_2", "test_2_2"]
    # a glob pattern: the text before its wildcard, else its folder (before: '*', so the key '*_loss')
    assert source_names("val/*.jsonl,shards/dev-*.jsonl.gz,*.jsonl") == ["val", "dev", "data"]


def test_eval_sources_are_named_by_their_files_and_recorded_each_unless_rows_span_them(tmp_path, tiny_model_dir):
    """Names: the file's name without data suffixes, a repeat numbered. A source whose rows are all skipped has a
    null loss; packed eval rows span sources, so a packed run records the whole alone."""
    from qlora.train.data.selection import source_names

    assert source_names("x/test.jsonl.gz,y/test.jsonl,org/ds,z/test.csv") == ["test", "test_2", "ds", "test_3"]
    data = _write(tmp_path / "d.jsonl", FORMATS["alpaca"])
    (tmp_path / "v").mkdir()
    held = [_write(tmp_path / "held.jsonl", FORMATS["alpaca"][:2]),
            _write(tmp_path / "v" / "held.jsonl", [{"instruction": "Say nothing.", "input": "", "output": ""}]),
            _write(tmp_path / "more.jsonl", FORMATS["alpaca"][2:5])]
    spec = ",".join(map(str, held))
    Trainer(_config(tiny_model_dir, data, tmp_path / "o", max_steps=1, eval_data=spec)).run()
    record = next(json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()
                  if '"eval"' in line)
    assert "nonfinite" not in record  # null here means no tokens, not a value that overflowed
    assert {k for k in record if k.endswith("_loss")} == {"held_loss", "held_2_loss", "more_loss"}
    assert record["held_2_loss"] is None and record["held_2_perplexity"] is None
    assert min(record["held_loss"], record["more_loss"]) <= record["loss"] <= max(record["held_loss"],
                                                                                  record["more_loss"])
    Trainer(_config(tiny_model_dir, data, tmp_path / "p", max_steps=1, eval_data=spec, packing=True)).run()
    record = next(json.loads(line) for line in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()
                  if '"eval"' in line)
    assert not [k for k in record if k.endswith("_loss")]
