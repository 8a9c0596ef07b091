"""Multi-process preference training on the CPU (gloo, 2 ranks) equals one process with the same global batch.

Each case trains ``qlora train --nproc 2 --batch-size 2`` and one process with ``--batch-size 4`` (the same global
micro-batches), both with ``--grad-accum 2``, and compares the per-step losses, gradient norms, reward metrics and
the final adapter. What couples the rows of a micro-batch must then span the ranks:

- DPO's ``aot`` loss sorts the micro-batch's log-ratios (run here as ``sigmoid,aot``, so the pair-independent
  sigmoid loss is covered too);
- KTO's KL estimate ``z = max(0, mean(log p(y'|x) - log p_ref(y'|x)))`` is the mean over the whole global
  micro-batch's mismatched pairs, taken before the clamp (TRL gathers the ranks' means before clamping), and the
  mismatched pairs rotate the completions over the global micro-batch. In this run the ranks' own estimates
  differ in clamp (step 3's first micro-batch: -0.094 on rank 0, 0.371 on rank 1, 0.138 over both), so a
  per-rank clamp gives other losses (0.4389 instead of 0.4430 at step 3, 0.3487 instead of 0.3237 at step 4).

Epochs end with a short step: DPO and SimPO train 9 pairs (steps of 8 pairs, then 1) and ``kto-short`` 17
examples (8, 8, then 1), so in that last global micro-batch rank 1 has no unit and runs a stand-in that counts
nothing, while rank 0 trains the one unit: ``aot``'s gather then spans shares of unequal length, and KTO's KL
estimate is rank 0's row alone.

Dropout is 0 so that every run computes the same function. Tolerances: losses, metrics and gradient norms to
rtol 1e-5 / atol 1e-6 (float summation order differs between one 4-row and two 2-row batches), KTO's ``kl`` to
atol 3e-6 (a mean of differences of sequence log-probs: its noise is theirs, not relative to the small ``kl``;
measured 1.9e-6 at ``kto-short-precompute-ref``'s fourth step with MKL's AVX-512 kernels, within the former 1e-6
with its AVX2 ones), adapter weights to rtol 1e-4 / atol 1e-4 (after 4 Adam steps at lr 2e-2, whose normalized
updates magnify float noise in near-zero gradients to a few 1e-5).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_processes import run_qlora, train_records

STEPS = 4
PAIRS = [("What is two plus two?", " four", " five"), ("Say hello.", " Hello there!", " Go away."),
         ("Name a red fruit.", " An apple is red.", " A banana."), ("What colour is the sky?", " Blue.", " Green."),
         ("Count to three.", " one two three", " three two one"), ("What is a fox?", " A quick animal.", " A car."),
         ("Hi?", " Hello, how are you today?", " No."), ("Add one and one.", " two", " eleven")]
KTO = [(p, c, True) for p, c, _ in PAIRS] + [(p, r, False) for p, _, r in PAIRS]
ODD_PAIRS = PAIRS + [("Name a colour.", " Red.", " Seven.")]
CASES = {  # name: method, flags, data
    "dpo": ("dpo", ["--loss-type", "sigmoid,aot", "--loss-weights", "1,0.5", "--beta", "0.5"], "odd-pairs"),
    "kto": ("kto", ["--beta", "0.5"], "kto"),
    "kto-short": ("kto", ["--beta", "0.5"], "kto-odd"),
    # the reference log-probs of the examples and of their KL rows computed once, their batches split over the
    # ranks; the KL partners fixed within global micro-batches of the data in order, kept in the shuffled epoch 2
    "kto-short-precompute-ref": ("kto", ["--beta", "0.5", "--precompute-ref"], "kto-odd"),
    # the reference swaps the trainable tensors (new tokens' embeddings and head among them) with their start,
    # here under FSDP2 on the ranks (FSDP: --fsdp there only), for both the examples and the KL rows
    "kto-new-tokens-fsdp": ("kto", ["--beta", "0.5", "--add-special-tokens", "<|new|>", "FSDP"], "kto"),
    # SimPO's eval sums are per pair, so one process's batches of 4 and the ranks' shares of batches of 2 add up
    # alike: 5 pairs are 3 eval batches of 2, rank 1's second round a repeat left out
    "simpo": ("simpo", ["--eval-data", "EVAL", "--eval-steps", "2"], "odd-pairs"),
}
METRICS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
           "logps/rejected", "kl", "rewards/accuracies")


def _train(model: Path, data: Path, out: Path, method: str, extra: list[str], nproc: int) -> None:
    argv = ["train", "--model", str(model), "--data", str(data), "--output", str(out),
            "--method", method, "--optim", "adamw", "--lr", "2e-2", "--max-steps", str(STEPS), "--seq-len", "32",
            "--dropout", "0", "--grad-accum", "2", "--save-steps", "0", "--no-progress", "--no-chunked-ce",
            "--batch-size", str(4 // nproc), *[a for a in extra if a != "FSDP"]]
    if "FSDP" in extra and nproc > 1:
        argv.append("--fsdp")
    if nproc > 1:
        argv += ["--nproc", str(nproc)]
    run_qlora(argv)



@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("dist-pref")
    files = {"odd-pairs": [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in ODD_PAIRS],
             "kto": [{"prompt": p, "completion": c, "label": d} for p, c, d in KTO],
             "kto-odd": [{"prompt": p, "completion": c, "label": d} for p, c, d in KTO + [(*ODD_PAIRS[-1][:2], True)]]}
    for name, rows in files.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = {}
    evals = root / "eval.jsonl"
    evals.write_text("".join(json.dumps({"prompt": p, "chosen": r, "rejected": c}) + "\n" for p, c, r in PAIRS[:5]))
    for name, (method, extra, data_name) in CASES.items():
        data = root / f"{data_name}.jsonl"
        extra = [str(evals) if a == "EVAL" else a for a in extra]
        out[name] = (root / f"{name}-1", root / f"{name}-2")
        _train(tiny_model_dir, data, out[name][0], method, extra, 1)
        _train(tiny_model_dir, data, out[name][1], method, extra, 2)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process_with_the_global_batch(runs, case):
    single, ddp = runs[case]
    got, want = train_records(ddp), train_records(single)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, STEPS + 1))
    keys = [k for k in METRICS if k in want[0]]
    assert {"loss", "grad_norm", "rewards/margins"} <= set(keys)
    # a step of desirable examples alone (kto-short's last) has no rejected means, in both runs
    assert [set(METRICS) & set(r) for r in got] == [set(METRICS) & set(r) for r in want]
    for key in keys:
        torch.testing.assert_close(torch.tensor([r[key] for r in got if key in r], dtype=torch.float64),
                                   torch.tensor([r[key] for r in want if key in r], dtype=torch.float64),
                                   rtol=1e-5, atol=3e-6 if key == "kl" else 1e-6,
                                   msg=lambda m, key=key: f"{case} {key}: {m}")
    a, b = load_file(str(ddp / "adapter_model.safetensors")), load_file(str(single / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-4)


def test_ranks_share_the_evaluation_of_pairs(runs):
    single, ddp = runs["simpo"]

    def evals(out: Path) -> list[dict]:
        return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "eval"]

    got, want = evals(ddp), evals(single)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [2, 4]
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        torch.testing.assert_close(torch.tensor([r[key] for r in got], dtype=torch.float64),
                                   torch.tensor([r[key] for r in want], dtype=torch.float64), rtol=1e-5, atol=1e-6)
