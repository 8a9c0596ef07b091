"""Multi-process training on the CPU (gloo, 2 ranks): DDP and FSDP2 equal one process with the same global batch.

One reference run (1 process, batch 2 x accumulation 2) is compared with
``qlora train --nproc 2`` (batch 2 per rank) under DDP and under FSDP2 (with
gradient checkpointing), all with ``--init loftq`` (whose 4-bit base FSDP2 must write whole), and checkpoints
cross world sizes in both directions. Epochs end with a short step:
7 examples make steps of 4 and 3 (the ranks' shares of the short one: 2 and 1), and in a 5-example run
(steps of 4 and 1) rank 1 has no unit in the short step and runs a stand-in that counts nothing.
Dropout is 0 so that every run computes the same function; the logged gradient
norm (before clipping) pins the gradient scale, which Adam and clipping would hide.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora.nn import Linear4bit
from qlora.train.config import load_config
from qlora.train.trainer import Trainer
from qlora_processes import assert_same_run, children, kill_qlora, run_qlora, train_records

QA = [("What is two plus two?", "four"), ("Name a red fruit.", "An apple is red."),
      ("Say hello.", "Hello there!"), ("What colour is the sky?", "The sky is blue."),
      ("Count to three.", "one two three"), ("What is a fox?", "A quick brown animal."),
      ("Hi?", "Hello, how are you today?")]
STEPS = 6


def _options(model: Path, data: Path, out: Path) -> dict:
    # 5 eval examples at batch 2 are 3 batches: rank 1 evaluates one and repeats it unrecorded in the last round
    return dict(model=str(model), data=str(data), output=str(out), optim="adamw", lr=1e-2, max_steps=STEPS,
                eval_data=str(data.with_name("eval.jsonl")), eval_steps=3,
                seq_len=64, dropout=0.0, save_steps=3, save_total_limit=0, progress=False, batch_size=2,
                # ranks > 1 use the plain loss; the one-process reference must take the same path
                chunked_ce=False,
                # LoftQ ships its 4-bit base, which FSDP2 holds sharded (and its root, after the final
                # eval, unsharded): rank 0 must write it whole, the bytes of one process's
                init="loftq")


def _single(opts: dict, **kw) -> None:
    """One process, batch 2 x accumulation 2 = the global batch of 2 ranks x batch 2."""
    Trainer(load_config(None, {**opts, "grad_accum": 2, **kw})).run()


def _two_ranks(opts: dict, *flags: str) -> str:
    argv = ["train", "--nproc", "2", *flags]
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return run_qlora(argv)



def _assert_same_run(out: Path, ref: Path) -> None:
    assert_same_run(out, ref, STEPS)


def _cut_after_first_checkpoint(src: Path, dst: Path) -> None:
    """A copy of a finished run as if it had been killed right after the step-3 checkpoint."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / f"step-{STEPS:07d}")
    (dst / "adapter_model.safetensors").unlink()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n" for q, a in QA))
    (root / "eval.jsonl").write_text("".join(json.dumps({"instruction": a, "input": "", "output": q}) + "\n"
                                             for q, a in QA[:5]))
    outs = {name: root / name for name in ("single", "ddp", "fsdp")}
    _single(_options(tiny_model_dir, data, outs["single"]))
    _two_ranks(_options(tiny_model_dir, data, outs["ddp"]))
    _two_ranks(_options(tiny_model_dir, data, outs["fsdp"]), "--fsdp", "--gradient-checkpointing")
    return {**outs, "data": data, "root": root}


def test_ddp_two_ranks_equal_one_process(runs):
    _assert_same_run(runs["ddp"], runs["single"])
    assert json.loads((runs["ddp"] / "checkpoints" / "step-0000003" / "run_config.json").read_text())["global_batch"] == 4


def test_fsdp_two_ranks_equal_ddp(runs):
    _assert_same_run(runs["fsdp"], runs["ddp"])


def test_fsdp_writes_the_loftq_base_of_one_process(runs):
    want = load_file(str(runs["single"] / "loftq-base" / "model.safetensors"))
    got = load_file(str(runs["fsdp"] / "loftq-base" / "model.safetensors"))
    assert got.keys() == want.keys() and any(k.endswith(".weight.absmax") for k in want)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def test_ranks_share_the_evaluation_and_report_one_process_loss(runs):
    """Each rank evaluates every other eval batch (FSDP: every rank runs as many forwards); the summed loss is
    the one process's."""
    def evals(out: Path) -> list[dict]:
        return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "eval"]

    want = evals(runs["single"])
    assert [r["step"] for r in want] == [3, 6]
    for run in ("ddp", "fsdp"):
        got = evals(runs[run])
        assert [r["step"] for r in got] == [3, 6]
        torch.testing.assert_close(torch.tensor([r["loss"] for r in got]), torch.tensor([r["loss"] for r in want]),
                                   rtol=1e-5, atol=1e-6)


def test_two_rank_checkpoint_resumes_in_one_process(runs, tiny_model_dir):
    out = runs["root"] / "ddp-then-1"
    _cut_after_first_checkpoint(runs["ddp"], out)
    _single(_options(tiny_model_dir, runs["data"], out), resume=True)
    _assert_same_run(out, runs["single"])


def test_a_resume_that_changes_the_global_batch_is_refused_with_the_options_that_keep_it(runs, tiny_model_dir):
    from qlora.errors import UsageError

    out = runs["root"] / "ddp-then-1-short"
    _cut_after_first_checkpoint(runs["ddp"], out)
    with pytest.raises(UsageError, match=r"global_batch: 4 -> 2.*--batch-size x --grad-accum x processes \(2 x 1 x 1 "
                                         r"here\): with 1 process, resume with --batch-size 2 --grad-accum 2"):
        Trainer(load_config(None, {**_options(tiny_model_dir, runs["data"], out), "resume": True})).run()


def test_one_process_checkpoint_resumes_in_two_ranks(runs, tiny_model_dir):
    """The checkpoint is made to look older (no schedule settings recorded): the ranks' warning is said once."""
    out = runs["root"] / "1-then-ddp"
    _cut_after_first_checkpoint(runs["single"], out)
    saved = out / "checkpoints" / "step-0000003" / "run_config.json"
    saved.write_text(json.dumps({k: v for k, v in json.loads(saved.read_text()).items() if k != "lr_scheduler_kwargs"}))
    stderr = _two_ranks({**_options(tiny_model_dir, runs["data"], out), "resume": True})
    _assert_same_run(out, runs["single"])
    assert stderr.count("was written by an older qlora, whose warmup") == 1, stderr[-3000:]


def test_a_rank_without_units_in_an_epochs_short_step_runs_a_stand_in(tmp_path, tiny_model_dir):
    """5 examples, 3 epochs: 2 steps an epoch (4 examples, then 1: rank 0 trains it, rank 1 a stand-in), 6 in all
    (a stream of epochs would have made ceil(15 / 4) = 4), equal to one process. Under FSDP2 with AdaLoRA: its
    orthogonality penalty depends on the adapters alone, so it counts once per step whatever the ranks (added to
    each rank's summed gradient, not summed over the ranks: that doubled it, and the importance-based ranks
    pruned to then differed), and it is in the logged loss once."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n" for q, a in QA[:5]))
    ref, out = tmp_path / "single", tmp_path / "fsdp"

    def options(run: Path) -> dict:
        opts = {**_options(tiny_model_dir, data, run), "max_steps": 0, "epochs": 3, "init": "kaiming",
                "adalora": True, "adalora_tinit": 1, "adalora_tfinal": 1, "adalora_delta_t": 1}
        del opts["eval_data"], opts["eval_steps"]  # the fixture's eval file is not in this folder
        return opts

    _single(options(ref))
    _two_ranks(options(out), "--fsdp")
    _assert_same_run(out, ref)
    pattern = json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
    assert pattern and any(not all(kept) for kept in pattern.values())  # ranks were pruned


@pytest.mark.slow
def test_a_global_micro_batch_larger_than_the_examples_is_refused(tmp_path, tiny_model_dir):
    """2 ranks x batch 2 of 3 examples: every step would be the 3 examples in one micro-batch, rank 1 short."""
    import subprocess
    import sys

    from qlora_processes import SRC

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n" for q, a in QA[:3]))
    argv = [sys.executable, "-m", "qlora", "train", "--nproc", "2", "--model", str(tiny_model_dir), "--data",
            str(data), "--output", str(tmp_path / "out"), "--batch-size", "2", "--max-steps", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    # exit 2 and the ranks' one-paragraph error, once: not torchrun's traceback and failure report
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("--batch-size 2 x 2 ranks is more than the 3 examples") == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "FAILED" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_shardable_linear4bit_keeps_bytes_and_layout(double_quant, storage):
    layer = Linear4bit.from_linear(torch.nn.Linear(70, 33), double_quant=double_quant, compute_dtype=torch.float32)
    weight, before = layer.dequantize(), {k: v.clone() for k, v in layer.state_dict().items()}
    layer.make_shardable(storage)
    params = dict(layer.named_parameters())
    assert all(p.dim() == 1 and p.dtype == storage and not p.requires_grad for n, p in params.items() if n != "bias")
    assert not dict(layer.named_buffers())  # FSDP2 shards parameters, not buffers
    torch.testing.assert_close(layer.dequantize(), weight, rtol=0, atol=0)
    after = layer.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("units,world,parts,want", [
    (5, 2, [], {0: [([0, 1], True, 0), ([4], True, 0)], 1: [([2, 3], True, 0), ([0, 1], False, 0)]}),  # 3 of 2
    (4, 2, [], {0: [([0, 1], True, 0)], 1: [([2, 3], True, 0)]}),
    (2, 3, [], {0: [([0, 1], True, 0)], 1: [([0, 1], False, 0)], 2: [([0, 1], False, 0)]}),  # fewer than ranks
    # two eval sources of 3 and 2 units: no batch spans them
    (5, 2, [("a", 0, 3), ("b", 3, 5)], {0: [([0, 1], True, 0), ([3, 4], True, 1)], 1: [([2], True, 0),
                                                                                    ([0, 1], False, 0)]}),
])
def test_eval_batches_are_one_process_batches_dealt_round_robin(units, world, parts, want):
    from types import SimpleNamespace

    from qlora.train.distributed import DistContext

    for rank, batches in want.items():
        trainer = SimpleNamespace(config=SimpleNamespace(batch_size=2), dist=DistContext(rank, world),
                                  eval_units=list(range(units)), eval_parts=parts, _collate=lambda u: u)
        trainer._parts = lambda t=trainer: Trainer._parts(t)
        assert list(Trainer._eval_batches(trainer)) == batches


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table in /proc (Linux)")
def test_ranks_stop_and_save_when_the_launcher_is_killed(tmp_path, tiny_model_dir):
    """SIGKILL gives the launcher no chance to stop its ranks: they must stop by themselves, with a checkpoint, and
    say where it is themselves (they left it for the launcher to print: nothing was said)."""
    import signal
    import subprocess
    import sys
    import time

    from qlora_processes import SRC

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n" for q, a in QA))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "qlora", "train", "--nproc", "2", "--model", str(tiny_model_dir), "--data",
            str(data), "--output", str(out), "--batch-size", "1", "--max-steps", "100000", "--seq-len", "32",
            "--save-steps", "0", "--logging-steps", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(tmp_path / "log", "w") as log:
        launcher = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    ranks: list[int] = []
    try:
        deadline = time.monotonic() + 240
        while not ((out / "metrics.jsonl").exists() and train_records(out)):  # the ranks are training
            assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
            time.sleep(0.5)
        ranks = children(launcher.pid)
        assert len(ranks) == 2, ranks
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 120
        while any(Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
                  for pid in ranks):
            assert time.monotonic() < deadline, "the ranks trained on after their launcher was killed"
            time.sleep(0.5)
    finally:  # the ranks too: once the launcher is gone they are no longer its children
        kill_qlora([*ranks, *children(launcher.pid)])
        os.killpg(launcher.pid, signal.SIGKILL) if launcher.poll() is None else None
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert checkpoints, (tmp_path / "log").read_text()[-3000:]
    said = [line for line in (tmp_path / "log").read_text().splitlines() if "interrupted" in line]
    assert said == [f"qlora train: interrupted at step {int(checkpoints[-1].name.split('-')[1])}; checkpoint saved "
                    f"to {checkpoints[-1]}. Continue with the same command and --resume."], said


def test_fsdp_finds_the_blocks_of_a_model_that_names_none():
    """BioGPT has no ``_no_split_modules``: its blocks are the items of its list of layers; lists inside a block
    (a layer's list of experts) stay in it; a model without a list of blocks is refused as bad input."""
    from transformers import BioGptConfig, BioGptForCausalLM

    from qlora.errors import UsageError
    from qlora.train.distributed import decoder_layers

    model = BioGptForCausalLM(BioGptConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                           intermediate_size=32))
    assert not getattr(model, "_no_split_modules", None)
    assert decoder_layers(model) == list(model.biogpt.layers)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))

    moe = torch.nn.Module()
    moe.layers = torch.nn.ModuleList(Block() for _ in range(2))
    assert decoder_layers(moe) == list(moe.layers)
    with pytest.raises(UsageError, match="--fsdp: Sequential has no repeated blocks"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table in /proc (Linux)")
def test_a_killed_rank_ends_the_run_with_one_message_each_and_complete_checkpoints(tmp_path, tiny_model_dir):
    """SIGKILL to rank 0 once it checkpoints: the run exits 1 naming it, without a traceback; rank 1, whose
    collectives fail (unless the launcher stops it first), says in one paragraph which checkpoint to resume from;
    every checkpoint left is complete (one being written is a hidden temporary folder, never the newest)."""
    import re
    import signal
    import subprocess
    import sys
    import time

    from qlora_processes import SRC

    from qlora.train.trainer import list_checkpoints

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n" for q, a in QA))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "qlora", "train", "--nproc", "2", "--model", str(tiny_model_dir), "--data",
            str(data), "--output", str(out), "--batch-size", "1", "--max-steps", "100000", "--seq-len", "32",
            "--save-steps", "2", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launcher = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list_checkpoints(out):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read()[-3000:]
            time.sleep(0.2)
        ranks = {int(dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0")
                          if "=" in e)["RANK"]): pid for pid in children(launcher.pid)}
        os.kill(ranks[0], signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            for pid in children(launcher.pid):  # torchrun starts its ranks in sessions of their own
                os.kill(pid, signal.SIGKILL)
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr and stderr.count("rank 0 of the run stopped with signal 9") == 1, stderr[-3000:]
    lost = re.findall(r"rank 1 lost contact with the other ranks after step \d+: .*", stderr)
    assert len(lost) == stderr.count("lost contact") <= 1, stderr[-3000:]
    checkpoints = list_checkpoints(out)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == [p.name for p in checkpoints]
    if lost:
        assert f"The last complete checkpoint is {checkpoints[-1]}: run the same command with --resume" in lost[0]


RANK_ONE_NAN = """
import sys
import torch
from qlora.train.config import load_config
from qlora.train.trainer import Trainer


class NaNOnRankOne(Trainer):
    def setup(self):
        super().setup()
        if self.dist.rank == 1:  # rank 1's third forward alone turns non-finite
            calls = []
            layer = self.model.model.layers[0].mlp.down_proj
            layer.register_forward_hook(lambda m, i, o: o * float("nan") if len(calls.append(1) or calls) >= 3 else o)


NaNOnRankOne(load_config(None, dict(model=sys.argv[1], data=sys.argv[2], output=sys.argv[3], max_steps=6,
                                    batch_size=1, seq_len=64, progress=False, optim="adamw"))).run()
"""


@pytest.mark.slow
def test_a_rank_failing_alone_mid_step_ends_the_run_instead_of_hanging(tmp_path, tiny_model_dir):
    """Rank 1's loss turns non-finite while rank 0 is in the step's all-reduce: the run ends with rank 1's
    one-paragraph error within seconds, not at the process group's timeout (30 minutes for gloo)."""
    import signal
    import socket
    import subprocess
    import sys

    from qlora_processes import SRC

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "input": "", "output": a}) + "\n" for q, a in QA[:6]))
    script = tmp_path / "nan_rank.py"
    script.write_text(RANK_ONE_NAN)
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
            str(script), str(tiny_model_dir), str(data), str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as proc:
        try:
            _, stderr = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            for pid in children(proc.pid):  # torchrun starts its ranks in sessions of their own
                os.kill(pid, signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("a rank's failure mid-step left the run hanging past 240 s") from None
    assert proc.returncode != 0
    assert "non-finite loss at step" in stderr, stderr[-3000:]
