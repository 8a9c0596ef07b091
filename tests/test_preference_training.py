"""``qlora train --method dpo|orpo`` on the CPU: data, resume, accumulation, checkpointing, reference, DDP, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora.train.data.tokenized_dataset import PROMPT_FILLS_SEQ_LEN
from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.train.config import load_config
from qlora.train.data import load_records, resolve_chat_template
from qlora.train.data.preference import normalize_preferences, preference_collate, tokenize_pairs
from qlora.train.trainer import Trainer

from cli_exit import cli_exit

SRC = Path(__file__).resolve().parents[1] / "src"
PAIRS = [("What is two plus two?", " four", " five"), ("Say hello.", " Hello there!", " Go away."),
         ("Name a red fruit.", " An apple is red.", " A banana."), ("What colour is the sky?", " Blue.", " Green."),
         ("Count to three.", " one two three", " three two one"), ("What is a fox?", " A quick animal.", " A car.")]
ROWS = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS]


def _write(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), output=str(out), method="dpo", optim="adamw", lr=1e-2,
                max_steps=6, batch_size=2, progress=False, seq_len=64)
    base.update(kw)
    return load_config(None, base)


def _train_records(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


def _stop_after(config, steps: int) -> None:
    """Train as if killed right after the checkpoint of step ``steps``."""
    trainer = Trainer(config)
    trainer.setup()
    trainer.total_steps = steps
    trainer.train()
    trainer.cleanup()


@pytest.mark.parametrize("method,extra", [("dpo", {}), ("dpo", {"precompute_ref": True}), ("orpo", {}),
                                          ("dpo", {"add_special_tokens": "<|think|>"})],
                         ids=["dpo", "dpo-precomputed-ref", "orpo", "dpo-new-token"])
def test_resume_reproduces_uninterrupted_losses(tmp_path, tiny_model_dir, method, extra):
    data = _write(tmp_path / "d.jsonl", ROWS)
    kw = dict(method=method, max_steps=8, save_steps=4, dropout=0.1, lr_scheduler="cosine", warmup_steps=2,
              grad_accum=2, **extra)
    full = Trainer(_config(tiny_model_dir, data, tmp_path / "full", **kw)).run()
    _stop_after(_config(tiny_model_dir, data, tmp_path / "part", **kw), 4)
    resumed = Trainer(_config(tiny_model_dir, data, tmp_path / "part", resume=True, **kw))
    if extra.get("precompute_ref"):  # the stored reference is reused, not recomputed
        resumed._compute_reference = lambda units: pytest.fail("the reference log-probs were recomputed")
    assert resumed.run() == full  # bit-identical on CPU
    got, want = _train_records(tmp_path / "part"), _train_records(tmp_path / "full")
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["rewards/accuracies"] for r in got] == [r["rewards/accuracies"] for r in want]
    assert [r["rewards/margins"] for r in got] == [r["rewards/margins"] for r in want]


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_accumulation_equals_big_batch(tmp_path, tiny_model_dir, method):
    data = _write(tmp_path / "d.jsonl", ROWS)
    kw = dict(method=method, dropout=0.0, max_steps=3)
    big = Trainer(_config(tiny_model_dir, data, tmp_path / "big", batch_size=4, **kw)).run()
    small = Trainer(_config(tiny_model_dir, data, tmp_path / "small", batch_size=2, grad_accum=2, **kw)).run()
    torch.testing.assert_close(torch.tensor(small), torch.tensor(big), rtol=1e-5, atol=1e-6)
    for key in ("grad_norm", "rewards/margins", "rewards/chosen", "logps/rejected"):
        a = [r[key] for r in _train_records(tmp_path / "small")]
        b = [r[key] for r in _train_records(tmp_path / "big")]
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-6)


def test_precomputed_reference_and_checkpointing_equal_the_plain_run(tmp_path, tiny_model_dir):
    data = _write(tmp_path / "d.jsonl", ROWS)
    kw = dict(dropout=0.0, max_steps=4)
    plain = Trainer(_config(tiny_model_dir, data, tmp_path / "plain", **kw)).run()
    precomputed = Trainer(_config(tiny_model_dir, data, tmp_path / "pre", precompute_ref=True, **kw)).run()
    checkpointed = Trainer(_config(tiny_model_dir, data, tmp_path / "gc", gradient_checkpointing=True, **kw)).run()
    torch.testing.assert_close(torch.tensor(precomputed), torch.tensor(plain), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(checkpointed), torch.tensor(plain), rtol=1e-5, atol=1e-6)
    assert plain[0] == pytest.approx(0.6931472, abs=1e-6)  # step 1: policy == reference, loss = log 2
    assert (tmp_path / "pre" / "reference" / "logps.safetensors").is_file()
    assert not (tmp_path / "plain" / "reference").exists()


def test_kto_precomputed_reference_keeps_its_kl_pairs_over_shuffled_epochs(tmp_path, tiny_model_dir):
    """KTO with --precompute-ref, shuffled: each example's KL partner is fixed when the reference log-probs are
    computed, so in every epoch, whatever micro-batch an example lands in, the stored log-probs are the reference's
    on the very rows the batch holds (oracle: the live reference pass on that batch), though partners then sit in
    other micro-batches. Eval uses its own stored log-probs, and a resume reuses the stored reference and trains
    the same losses."""
    data = _write(tmp_path / "d.jsonl", ROWS)  # 12 examples: each pair unpaired
    kw = dict(method="kto", batch_size=3, grad_accum=2, dropout=0.0, max_steps=6, save_steps=3, precompute_ref=True,
              eval_data=str(data), eval_steps=3)
    trainer = Trainer(_config(tiny_model_dir, data, tmp_path / "look", **kw))
    trainer.setup()
    assert trainer.steps_per_epoch == 2 and trainer.step_units(0) != trainer.step_units(2)  # epochs reshuffle
    moved = 0
    for step in range(6):  # three epochs
        for batch in trainer.micro_batches(step):
            live = trainer._reference_logps({k: v for k, v in batch.items() if k != "ref_logps"})
            torch.testing.assert_close(batch["ref_logps"], live.double(), rtol=1e-5, atol=1e-5)
        for m in range(0, 6, 3):  # KL partners outside the micro-batch's in-batch rotation
            units = [trainer.train_units[i] for i in trainer.step_units(step)[m:m + 3]]
            moved += sum(u.kl_pair_ids != units[k - 1].kl_completion_ids for k, u in enumerate(units))
    assert moved > 0 and len(trainer.eval_units) == 12
    for batch, _, _ in trainer._eval_batches():
        live = trainer._reference_logps({k: v for k, v in batch.items() if k != "ref_logps"})
        torch.testing.assert_close(batch["ref_logps"], live.double(), rtol=1e-5, atol=1e-5)
    trainer.cleanup()
    full = Trainer(_config(tiny_model_dir, data, tmp_path / "full", **kw)).run()
    _stop_after(_config(tiny_model_dir, data, tmp_path / "part", **kw), 3)
    resumed = Trainer(_config(tiny_model_dir, data, tmp_path / "part", resume=True, **kw))
    resumed._compute_reference = lambda units: pytest.fail("the reference log-probs were recomputed")
    assert resumed.run() == full  # bit-identical on CPU
    got, want = _train_records(tmp_path / "part"), _train_records(tmp_path / "full")
    assert [r["kl"] for r in got] == [r["kl"] for r in want] and got[-1]["kl"] > 0


def test_metrics_reach_jsonl_tensorboard_and_plot(tmp_path, tiny_model_dir):
    data = _write(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "out"
    Trainer(_config(tiny_model_dir, data, out, method="orpo", eval_data=str(data), max_steps=3)).run()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train, evals = [r for r in records if r["split"] == "train"], [r for r in records if r["split"] == "eval"]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen"):
        assert key in train[-1] and key in evals[-1], key
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "events"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/rewards/accuracies", "train/rewards/margins", "eval/rewards/accuracies"} <= tags
    assert (out / "loss.png").stat().st_size > 0
    assert (out / "adapter_model.safetensors").is_file()
    from qlora.train.metrics import MetricsLogger

    (tmp_path / "bar").mkdir()
    logger = MetricsLogger(tmp_path / "bar", total_steps=1, progress=True)  # the progress bar shows the rewards
    logger.log(train[-1])
    assert "acc=" in logger._bar.postfix and "margin=" in logger._bar.postfix
    logger.close()


def test_conversational_rows_use_the_chat_template(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from qlora.model.chat_format import stop_token_ids

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    user = {"role": "user", "content": "Say hello."}
    rows = [
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "Hello there!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        # implicit prompt: whole conversations sharing their first message (TRL's format)
        {"chosen": [user, {"role": "assistant", "content": "Hello there!"}],
         "rejected": [user, {"role": "assistant", "content": "Go away."}]},
        # a string prompt is a user message, string answers assistant messages
        {"prompt": "Say hello.", "chosen": [{"role": "assistant", "content": "Hello there!"}], "rejected": "Go away."},
    ]
    examples = normalize_preferences(load_records(_write(tmp_path / "c.jsonl", rows)))
    template = resolve_chat_template(tok, "auto")
    pairs, report = tokenize_pairs(examples, tok, template, seq_len=64)
    assert report.untrainable == []
    prompt = tok.apply_chat_template([user], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    whole = tok.apply_chat_template([user, {"role": "assistant", "content": "Hello there!"}], tokenize=True,
                                    return_dict=True)["input_ids"]
    ends_turn = any(t in stop_token_ids(tok) for t in whole[len(prompt):])  # the template's end marker: no EOS
    for pair in pairs:
        assert pair.prompt_ids == prompt  # the template decides BOS; the prompt ends with the generation prompt
        assert pair.prompt_ids + pair.chosen_ids == whole + ([] if ends_turn else [tok.eos_token_id])
        assert tok.decode(pair.rejected_ids, skip_special_tokens=True).startswith("Go away.")
    batch = preference_collate(pairs[:2], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4  # chosen rows, then rejected rows, in one batch
    labelled = (batch["labels"] != -100).sum(-1).tolist()
    assert labelled == [len(pairs[0].chosen_ids), len(pairs[1].chosen_ids),
                        len(pairs[0].rejected_ids), len(pairs[1].rejected_ids)]


def test_parquet_rows_with_message_columns(tmp_path, tiny_model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    user = [{"role": "user", "content": "Say hello."}]
    table = pa.Table.from_pylist([
        {"prompt": user, "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "No."}]}] * 3)
    pq.write_table(table, tmp_path / "pairs.parquet")
    losses = Trainer(_config(tiny_model_dir, tmp_path / "pairs.parquet", tmp_path / "out", method="orpo",
                             max_steps=2)).run()
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("kind", ["lora", "dora", "adalora"])
def test_reference_is_the_base_with_adapters_off(tiny_model_dir, kind):
    """adapters_disabled gives the base model's logits back, for every adapter kind, once they have trained values."""
    from qlora.model.adalora import add_adalora
    from qlora.model.load import load_model
    from qlora.model.inject import adapters_disabled, add_lora

    model, _ = load_model(str(tiny_model_dir), quant="nf4")
    ids = torch.tensor([[1, 5, 9, 20, 33, 7]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
        if kind == "adalora":
            add_adalora(model, init_r=4, target_r=2, total_step=10, verbose=False)
        else:
            add_lora(model, r=4, use_dora=kind == "dora", verbose=False)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        adapted = model(input_ids=ids).logits
        with adapters_disabled(model):
            off = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert not torch.allclose(adapted, base, atol=1e-3)
    torch.testing.assert_close(off, base, rtol=0, atol=0)
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)


def test_truncation_keeps_prompts_and_skips_pairs_without_answers(tiny_tokenizer):
    from qlora.train.data.preference import PreferenceExample

    long_prompt = "The quick brown fox jumps over the lazy dog. " * 6
    examples = [PreferenceExample("Say hello.", " Hello there, how are you today?", " no", "row 0"),
                PreferenceExample(long_prompt, " yes", " no", "row 1")]
    pairs, report = tokenize_pairs(examples, tiny_tokenizer, "", seq_len=12)
    assert [p.index for p in pairs] == [0] and report.empty == {PROMPT_FILLS_SEQ_LEN: ["row 1"]}
    assert report.truncated == 2 and len(pairs[0].prompt_ids + pairs[0].chosen_ids) == 12


@pytest.mark.parametrize("method", ["dpo", "cpo", "orpo", "simpo", "kto"])
def test_pairs_whose_prompt_fills_seq_len_are_counted_in_the_run_log_and_all_of_them_refused(
        tmp_path, tiny_model_dir, tiny_tokenizer, capsys, method):
    """A prompt of --seq-len tokens leaves no answer token: TRL 1.16 trains such a pair (its CPO, SimPO and ORPO
    losses turn NaN, an average over no token); qlora skips it, says how many and why in the data line, and refuses
    a dataset that is all such pairs, naming the option to change."""
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 6
    assert len(tiny_tokenizer(long_prompt)["input_ids"]) > 16
    rows = [{"prompt": long_prompt, "chosen": " yes", "rejected": " no"}] + ROWS[:3]
    args = ["train", "--quant", "none", "--model", str(tiny_model_dir), "--method", method, "--seq-len", "16",
            "--max-steps", "1", "--batch-size", "2", "--optim", "adamw", "--no-progress"]
    out = tmp_path / "run"
    assert main(args + ["--data", str(_write(tmp_path / "d.jsonl", rows)), "--output", str(out)]) == 0
    log = "".join(capsys.readouterr())
    skipped = 2 if method == "kto" else 1  # KTO trains each answer of a pair as an example of its own
    assert f"{skipped} skipped with a prompt that fills --seq-len, leaving no answer token" in log
    assert f"(first: {tmp_path / 'd.jsonl'} line 1" in log
    all_long = _write(tmp_path / "long.jsonl", [rows[0], {**rows[0], "chosen": " sure"}])
    assert main(args + ["--data", str(all_long), "--output", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "prompt that fills --seq-len" in err and "raise --seq-len or shorten the prompts" in err
    assert "Traceback" not in err and not (tmp_path / "none").exists()


def test_bad_preference_input_exits_2_with_file_and_line(tmp_path, tiny_model_dir, capsys):
    base = ["train", "--model", str(tiny_model_dir), "--method", "dpo", "--optim", "adamw", "--no-progress",
            "--max-steps", "1"]
    missing = _write(tmp_path / "missing.jsonl", ROWS[:2] + [{"prompt": "Hi", "chosen": "Hello"}])
    bad_message = _write(tmp_path / "msg.jsonl", [{"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}])
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    no_prompt = _write(tmp_path / "np.jsonl", [{"chosen": "a", "rejected": "b"}])
    cases = [
        (["--data", str(missing)], f'{missing} line 3: field "rejected" is missing'),
        (["--data", str(bad_message)], f'{bad_message} line 1, field "prompt", message 0'),
        (["--data", str(bad_json)], f"{bad_json} line 2: malformed JSON"),
        (["--data", str(no_prompt)], f'{no_prompt} line 1: field "prompt" is missing'),
        (["--data", str(missing), "--method", "orpo", "--label-smoothing", "0.1"], "--label-smoothing applies to --method dpo"),
        (["--data", str(missing), "--packing"], "--packing applies to --method sft"),
        (["--data", str(missing), "--label-smoothing", "0.5"], "--label-smoothing must be in [0, 0.5); got 0.5"),
        (["--data", str(missing), "--beta", "0"], "--beta must be positive; got 0"),
        (["--data", str(missing), "--method", "sft", "--precompute-ref"], "applies to --method dpo"),
    ]
    for i, (extra, message) in enumerate(cases):
        code, err = cli_exit(base + ["--output", str(tmp_path / f"o{i}")] + extra, capsys)
        assert code == 2, (extra, err)
        assert message in err, (message, err)
        assert "Traceback" not in err
        assert not (tmp_path / f"o{i}").exists()


def test_cli_dpo_run_then_resume_with_another_method_is_refused(tmp_path, tiny_model_dir, capsys):
    data = _write(tmp_path / "d.jsonl", ROWS)
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "o"),
            "--method", "dpo", "--beta", "0.2", "--optim", "adamw", "--no-progress", "--max-steps", "2",
            "--batch-size", "2", "--save-steps", "1"]
    assert main(argv) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    saved = json.loads(next((tmp_path / "o" / "checkpoints").glob("step-*/run_config.json")).read_text())
    assert saved["method"] == "dpo" and saved["beta"] == 0.2
    code, err = cli_exit([a if a != "dpo" else "orpo" for a in argv] + ["--resume"], capsys)
    assert code == 2 and "method: 'dpo' -> 'orpo'" in err


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--precompute-ref"], ["--fsdp", "--gradient-checkpointing"]],
                         ids=["ddp-precomputed-ref", "fsdp-checkpointing"])
def test_two_ranks_equal_one_process(tmp_path, tiny_model_dir, flags):
    """DPO under torchrun (gloo, 2 ranks x batch 1) equals one process with batch 1 x accumulation 2 and
    the reference in each step: under DDP with the reference precomputed and split over the ranks, and
    under FSDP2 (sharded 4-bit base) with gradient checkpointing and the reference in each step."""
    data = _write(tmp_path / "d.jsonl", ROWS)
    opts = dict(model=str(tiny_model_dir), data=str(data), method="dpo", optim="adamw", lr=1e-2, max_steps=3,
                seq_len=64, dropout=0.0, progress=False, batch_size=1, chunked_ce=False)
    Trainer(load_config(None, {**opts, "output": str(tmp_path / "single"), "grad_accum": 2})).run()
    argv = [sys.executable, "-m", "qlora", "train", "--nproc", "2", *flags, "--output", str(tmp_path / "ranks")]
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        argv += [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = _train_records(tmp_path / "ranks"), _train_records(tmp_path / "single")
    assert [r["step"] for r in got] == [1, 2, 3]
    for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        torch.testing.assert_close(torch.tensor([r[key] for r in got]), torch.tensor([r[key] for r in want]),
                                   rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("precompute", [False, True], ids=["frozen-copy", "precomputed"])
def test_dpo_from_an_sft_adapter_uses_it_as_the_reference(tmp_path, tiny_model_dir, precompute):
    """SFT, then DPO on top with --adapter: the reference is the SFT policy, so the first step's rewards
    (policy minus reference log-probs) are zero; with the base as reference they would not be."""
    from safetensors.torch import load_file

    sft_data = _write(tmp_path / "sft.jsonl", [{"prompt": p, "completion": c} for p, c, _ in PAIRS])
    sft = tmp_path / "sft"
    Trainer(_config(tiny_model_dir, sft_data, sft, method="sft", rank=4, alpha=8, target_modules="q_proj,v_proj",
                    dropout=0.0, max_steps=8)).run()
    before = load_file(str(sft / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 1e-3 for k, v in before.items())  # SFT != base
    dpo = tmp_path / "dpo"
    Trainer(_config(tiny_model_dir, _write(tmp_path / "p.jsonl", ROWS), dpo, adapter=str(sft), max_steps=2,
                    precompute_ref=precompute)).run()
    first = _train_records(dpo)[0]
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
    saved = json.loads((dpo / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], sorted(saved["target_modules"])) == (4, 8, ["q_proj", "v_proj"])
    after = load_file(str(dpo / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)


def test_train_from_an_adapter_continues_it_and_refuses_its_own_settings(tmp_path, tiny_model_dir, capsys):
    from safetensors.torch import load_file

    from qlora.model.adapter_io import adapter_state_dict

    data = _write(tmp_path / "sft.jsonl", [{"prompt": p, "completion": c} for p, c, _ in PAIRS])
    first = tmp_path / "first"
    Trainer(_config(tiny_model_dir, data, first, method="sft", rank=4, max_steps=3)).run()
    again = Trainer(_config(tiny_model_dir, data, tmp_path / "again", method="sft", adapter=str(first), max_steps=2))
    again.setup()  # training starts from the adapter's own weights
    saved, start = load_file(str(first / "adapter_model.safetensors")), adapter_state_dict(again.model)
    assert saved.keys() == start.keys() and all(torch.equal(saved[k], start[k].cpu()) for k in saved)
    again.train()
    again.cleanup()
    assert any(not torch.equal(saved[k], adapter_state_dict(again.model)[k].cpu()) for k in saved)
    capsys.readouterr()
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "x"),
                 "--adapter", str(first), "--rank", "8"]) == 2
    err = capsys.readouterr().err
    assert f"--adapter {first} brings its own --rank (rank 4," in err and "drop it" in err


@pytest.mark.parametrize("flags", [["--method", "dpo", "--loss-type", "ipo"],
                                   ["--method", "dpo", "--loss-type", "robust,sft", "--loss-weights", "1,0.2",
                                    "--label-smoothing", "0.1"],
                                   ["--method", "dpo", "--rpo-alpha", "0.5"],
                                   ["--method", "cpo"], ["--method", "simpo", "--beta", "2"],
                                   ["--method", "dpo", "--ld-alpha", "0.5", "--wpo", "--f-divergence-type",
                                    "js_divergence"],
                                   ["--method", "simpo", "--beta", "2", "--alphapo-alpha", "0.3"]],
                         ids=["dpo-ipo", "dpo-robust-sft", "rpo", "cpo", "simpo", "ld-wpo-js", "alphapo"])
def test_cli_preference_losses_train_and_record_their_options(tmp_path, tiny_model_dir, flags, capsys):
    """Each loss trains from the command line: the loss goes down, and --resume holds the loss options."""
    data = _write(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / "o"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(out), "--optim", "adamw",
            "--lr", "1e-2", "--no-progress", "--max-steps", "8", "--batch-size", "6", "--dropout", "0",
            "--seq-len", "64", "--save-steps", "8", *flags]
    assert main(argv) == 0
    records = _train_records(out)
    assert records[-1]["loss"] < records[0]["loss"], [r["loss"] for r in records]
    assert records[-1]["rewards/margins"] > records[0]["rewards/margins"]
    assert ("nll_loss" in records[0]) == ("--rpo-alpha" in flags or "robust,sft" in flags or "cpo" in flags)
    saved = json.loads(next((out / "checkpoints").glob("step-*/run_config.json")).read_text())
    trained = flags[3] if flags[2:3] == ["--loss-type"] else {"dpo": "sigmoid", "cpo": "sigmoid"}.get(flags[1], "")
    assert saved["method"] == flags[1] and saved["loss_type"] == trained  # recorded as the loss that trained
    capsys.readouterr()
    code, err = cli_exit(argv + ["--beta", "0.3", "--resume"], capsys)  # another beta: not this run
    assert code == 2 and "beta: " in err


@pytest.mark.parametrize("flags, message", [
    (["--method", "dpo", "--ld-alpha", "1.5"], "--ld-alpha must be in [0, 1]; got 1.5"),
    (["--method", "dpo", "--f-divergence-type", "forward_kl", "--loss-type", "bco_pair"],
     "bco_pair has no f-divergence form"),
    (["--method", "dpo", "--f-divergence-type", "chi2"], "chi2"),
    (["--method", "dpo", "--wpo", "--rpo-alpha", "1"], "--wpo weighs the pair losses; with the NLL term"),
    (["--method", "cpo", "--alphapo-alpha", "inf"], "--alphapo-alpha must be finite; got inf"),
    (["--method", "sft", "--wpo"], "--wpo applies to --method dpo; this run is --method sft"),
], ids=["ld-alpha-range", "f-divergence-loss", "f-divergence-name", "wpo-rpo", "alphapo-inf", "wpo-sft"])
def test_cli_refuses_bad_preference_extras_with_exit_2(tmp_path, tiny_model_dir, capsys, flags, message):
    data = _write(tmp_path / "d.jsonl", ROWS)
    code, err = cli_exit(["train", "--model", str(tiny_model_dir), "--data", str(data), "--output", str(tmp_path / "o"),
                      *flags], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_resume_of_a_dpo_checkpoint_from_before_loss_types(tmp_path, tiny_model_dir):
    """A checkpoint whose run_config.json predates --loss-type & co. resumes with their defaults."""
    data = _write(tmp_path / "d.jsonl", ROWS)
    kw = dict(max_steps=4, save_steps=2)
    _stop_after(_config(tiny_model_dir, data, tmp_path / "o", **kw), 2)
    path = next((tmp_path / "o" / "checkpoints").glob("step-*/run_config.json"))
    saved = json.loads(path.read_text())
    for key in ("loss_type", "loss_weights", "rpo_alpha", "discopop_tau", "cpo_alpha", "simpo_gamma"):
        del saved[key]
    path.write_text(json.dumps(saved))
    resumed = Trainer(_config(tiny_model_dir, data, tmp_path / "o", resume=True, **kw))
    resumed.run()
    assert resumed.step == 4 and [r["step"] for r in _train_records(tmp_path / "o")] == [1, 2, 3, 4]
    with pytest.raises(UsageError, match="loss_type: 'sigmoid' -> 'ipo'"):
        Trainer(_config(tiny_model_dir, data, tmp_path / "o", resume=True, loss_type="ipo", **kw)).setup()


def test_cli_kto_on_unpaired_conversations_and_on_pairs(tmp_path, tiny_model_dir, capsys):
    """KTO from the command line: conversational unpaired rows train (loss down, desirable rewards up,
    undesirable down), eval reports TRL's KTO metrics; pairs are unpaired into a true and a false row."""
    from qlora.train.data import Record
    from qlora.train.data.unpaired import normalize_unpaired

    rows = []
    for p, c, r in PAIRS:
        prompt = [{"role": "user", "content": p}]
        rows += [{"prompt": prompt, "completion": [{"role": "assistant", "content": c}], "label": True},
                 {"prompt": prompt, "completion": [{"role": "assistant", "content": r}], "label": False}]
    data = _write(tmp_path / "kto.jsonl", rows)
    out = tmp_path / "o"
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--eval-data", str(data), "--output",
            str(out), "--method", "kto", "--optim", "adamw", "--lr", "1e-2", "--no-progress", "--max-steps", "8",
            "--batch-size", "4", "--dropout", "0", "--seq-len", "64", "--undesirable-weight", "1.2"]
    assert main(argv) == 0
    records = _train_records(out)
    assert records[-1]["loss"] < records[0]["loss"], [r["loss"] for r in records]
    assert all("kl" in r for r in records)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in evals if r["split"] == "eval"][-1]
    assert final["rewards/chosen"] > 0 > final["rewards/rejected"] and final["rewards/margins"] > 0
    config = (out / "config.yaml").read_text()
    assert "method: kto" in config and "undesirable_weight: 1.2" in config

    pairs = normalize_unpaired([Record(ROWS[0], "p.jsonl line 1")])
    assert [(e.prompt, e.completion, e.desirable) for e in pairs] == [
        (PAIRS[0][0], PAIRS[0][1], True), (PAIRS[0][0], PAIRS[0][2], False)]
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c", "label": "maybe"}])
    code, err = cli_exit(["train", "--model", str(tiny_model_dir), "--data", str(bad), "--output", str(tmp_path / "x"),
                      "--method", "kto", "--batch-size", "2"], capsys)
    assert code == 2 and f'{bad} line 1: field "label" must be true or false' in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kw", [
    dict(init="pissa"), dict(init="olora", method="kto"), dict(init="loftq"), dict(bias="all"),
    dict(add_special_tokens="<|new|>"), dict(add_special_tokens="<|new|>", method="kto"),
], ids=["pissa", "olora-kto", "loftq", "bias-all", "new-tokens", "new-tokens-kto"])
def test_reference_is_the_starting_policy_throughout(tmp_path, tiny_model_dir, kw):
    """When the start is not the base with the adapters off (an init that rewrites the base, weights trained
    in place), the reference is still the policy as training started: the first step's rewards are 0, and
    after training the reference log-probs are the starting policy's, while the policy's have moved."""
    from qlora.train.preference_loss import label_logps

    trainer = Trainer(_config(tiny_model_dir, _write(tmp_path / "p.jsonl", ROWS), tmp_path / "o", dropout=0.0,
                              max_steps=3, **kw))
    trainer.setup()
    batch = trainer._collate(trainer.train_units[:2])
    if trainer.config.method == "kto":
        batch = {k: v for k, v in batch.items()}

    def policy_logps():
        trainer.model.eval()
        with torch.no_grad():
            return label_logps(trainer.model, batch, [batch["labels"]], False)[0]

    start = policy_logps()
    trainer.model.train()
    trainer.train()
    trainer.cleanup()
    first = _train_records(tmp_path / "o")[0]
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5, first
    trainer.model.eval()
    with trainer._reference_model(), torch.no_grad():
        reference = label_logps(trainer.model, batch, [batch["labels"]], False)[0]
    torch.testing.assert_close(reference, start, rtol=0, atol=0)
    assert not torch.allclose(policy_logps(), start, atol=1e-3)


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_reference_swap_copies_nothing_and_trains_as_copying_did(tmp_path, tiny_model_dir, method):
    """The reference pass swaps the starting tensors in by pointing each trainable parameter (the same object: the
    optimizer's state is keyed by it) at the other's storage; nothing is copied, the embeddings of --add-special-tokens
    included. Oracle: the former swap, which copied every tensor there and back, trains the same losses bit for bit
    (fixed seed, dropout on)."""
    from qlora.train.kto_trainer import KTOTrainer
    from qlora.train.preference_trainer import PreferenceTrainer

    data = _write(tmp_path / "p.jsonl", ROWS)
    kw = dict(add_special_tokens="<|new|>", method=method, dropout=0.1, max_steps=4, seed=3)
    trainer = Trainer(_config(tiny_model_dir, data, tmp_path / "o", **kw))
    trainer.setup()
    params = [p for p, _ in trainer._start]
    assert any(p.shape[0] == len(trainer.tokenizer) for p in params)  # the embeddings are among the swapped tensors
    before = [(p.data_ptr(), s.data_ptr()) for p, s in trainer._start]
    trainer._swap_start()
    assert all(p is q for p, (q, _) in zip(params, trainer._start))
    assert [(p.data_ptr(), s.data_ptr()) for p, s in trainer._start] == [(s, p) for p, s in before]
    trainer._swap_start()
    assert [(p.data_ptr(), s.data_ptr()) for p, s in trainer._start] == before
    trainer.cleanup()

    class Copying(KTOTrainer if method == "kto" else PreferenceTrainer):
        @torch.no_grad()
        def _swap_start(self):  # the former swap: each tensor copied through a temporary
            for param, start in self._start:
                now = param.detach().clone()
                param.copy_(start)
                start.copy_(now)

    # the new token's embedding row starts from transformers' mean resizing, which draws from the global generator
    torch.manual_seed(0)
    swapped = Trainer(_config(tiny_model_dir, data, tmp_path / "a", **kw))
    losses = swapped.run()
    assert set(swapped.optimizer.state) == {p for p in swapped.model.parameters() if p.requires_grad}
    torch.manual_seed(0)
    copied = Copying(_config(tiny_model_dir, data, tmp_path / "b", **kw)).run()
    assert len(losses) == 4 and losses == copied
    timed = ("tokens_per_s", "gpu_mem_gib")
    assert [{k: v for k, v in r.items() if k not in timed} for r in _train_records(tmp_path / "a")] == [
        {k: v for k, v in r.items() if k not in timed} for r in _train_records(tmp_path / "b")]  # rewards, KL too


def test_kto_from_an_sft_adapter_uses_it_as_the_reference(tmp_path, tiny_model_dir):
    """As for DPO: with --adapter the reference is the starting adapter, so the first step's rewards are 0."""
    sft_data = _write(tmp_path / "sft.jsonl", [{"prompt": p, "completion": c} for p, c, _ in PAIRS])
    sft = tmp_path / "sft"
    Trainer(_config(tiny_model_dir, sft_data, sft, method="sft", rank=4, dropout=0.0, max_steps=6)).run()
    kto = tmp_path / "kto"
    Trainer(_config(tiny_model_dir, _write(tmp_path / "p.jsonl", ROWS), kto, method="kto", adapter=str(sft),
                    max_steps=2)).run()
    first = _train_records(kto)[0]
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5 and first["kl"] < 1e-5


def test_kto_eval_split_holds_out_both_answers_of_a_pair(tmp_path, tiny_model_dir):
    """KTO trains a pair's two answers as two examples; --eval-split holds out rows, so no held-out prompt was
    trained with its other answer (drawn over examples, most held-out prompts were)."""
    rows = [{**row, "prompt": f"{row['prompt']} ({k})"} for k in range(4) for row in ROWS]
    trainer = Trainer(_config(tiny_model_dir, _write(tmp_path / "p.jsonl", rows), tmp_path / "o", method="kto",
                              eval_split=0.25))
    trainer.setup()
    assert (len(trainer.train_units), len(trainer.eval_units)) == (36, 12)  # 6 of the 24 pairs held out, whole
    prompts = [{tuple(u.prompt_ids) for u in units} for units in (trainer.train_units, trainer.eval_units)]
    assert len(prompts[1]) == 6 and not prompts[0] & prompts[1]
    with pytest.raises(UsageError, match=r"--eval-split 24\.0 holds out 24 of the 24 rows of --data"):
        Trainer(_config(tiny_model_dir, tmp_path / "p.jsonl", tmp_path / "o2", method="kto", eval_split=24)).setup()
