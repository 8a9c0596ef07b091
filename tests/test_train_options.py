"""Training options users bring from LLaMA-Factory, TRL and PEFT: mixed datasets, --max-samples,
a held-out --eval-split, LoRA+ learning rates and NEFTune noise (against transformers' own hook)."""

from __future__ import annotations

import json

import pytest
import torch

from qlora.errors import UsageError
from qlora.train.config import load_config
from qlora.train.data.selection import hold_out
from qlora.train.trainer import Trainer

QA = [(f"What is {a} plus {b}?", f"{a + b}") for a in range(4) for b in range(3)]  # 12 questions


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _trainer(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), output=str(out), optim="adamw", lr=1e-2, max_steps=2,
                batch_size=2, progress=False, seq_len=64, dropout=0.0)
    trainer = Trainer(load_config(None, base | kw))
    trainer.setup()
    return trainer


@pytest.fixture
def two_files(tmp_path):
    alpaca = _write(tmp_path / "a.jsonl", [{"instruction": q, "output": a} for q, a in QA[:7]])
    sharegpt = _write(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": q},
                                                                {"from": "gpt", "value": a}]} for q, a in QA[7:]])
    return alpaca, sharegpt


def test_several_sources_mix_each_in_its_own_format_and_max_samples_caps_each(tmp_path, tiny_model_dir, two_files):
    alpaca, sharegpt = two_files
    mixed = _trainer(tiny_model_dir, f"{alpaca},{sharegpt}", tmp_path / "mixed")
    alone = [_trainer(tiny_model_dir, f, tmp_path / f.stem) for f in two_files]
    assert [u.input_ids for u in mixed.train_units] == [u.input_ids for t in alone for u in t.train_units]
    assert len(mixed.train_units) == 12
    capped = _trainer(tiny_model_dir, f"{alpaca},{sharegpt}", tmp_path / "capped", max_samples=3)
    assert [u.input_ids for u in capped.train_units] == [u.input_ids for t in alone for u in t.train_units[:3]]
    yaml_list = tmp_path / "run.yaml"  # a YAML list of sources is the same as a,b
    yaml_list.write_text(f"data: [{alpaca}, {sharegpt}]\n")
    assert load_config(yaml_list, {"model": str(tiny_model_dir), "output": "x"}).data == f"{alpaca},{sharegpt}"
    with pytest.raises(UsageError, match="an empty name between commas"):
        _trainer(tiny_model_dir, f"{alpaca},,{sharegpt}", tmp_path / "bad")


def test_eval_split_holds_out_examples_by_seed_and_evaluates_them(tmp_path, tiny_model_dir, two_files, capsys):
    alpaca, _ = two_files
    whole = _trainer(tiny_model_dir, alpaca, tmp_path / "whole")
    split = _trainer(tiny_model_dir, alpaca, tmp_path / "split", eval_split=0.2)  # ceil(0.2 x 7) = 2
    ids = [u.input_ids for u in whole.train_units]
    train, held = [u.input_ids for u in split.train_units], [u.input_ids for u in split.eval_units]
    assert len(held) == 2 and len(train) == 5 and sorted(train + held) == sorted(ids)
    assert train == [i for i in ids if i not in held]  # the data's order is kept
    again = _trainer(tiny_model_dir, alpaca, tmp_path / "again", eval_split=0.2)
    assert [u.input_ids for u in again.eval_units] == held
    other_seed = _trainer(tiny_model_dir, alpaca, tmp_path / "seed", eval_split=2, seed=7)
    assert len(other_seed.eval_units) == 2
    split.train()
    split.cleanup()
    records = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "eval"] == [2]
    assert "; 2 examples held out for eval" in capsys.readouterr().out  # the run log says how many
    _trainer(tiny_model_dir, alpaca, tmp_path / "none", eval_steps=2).cleanup()  # an interval with nothing held out
    assert "--eval-steps 2: no held-out data, so nothing is evaluated" in capsys.readouterr().out


@pytest.mark.parametrize("n, share", [(7, 0.3), (32, 0.2), (10, 0.7), (1000, 0.05), (3, 0.1)])
def test_eval_split_holds_out_as_many_as_llama_factory_val_size(n, share):
    import datasets

    theirs = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=share, seed=0)
    train, held = hold_out(list(range(n)), share, seed=0)
    assert (len(train), len(held)) == (len(theirs["train"]), len(theirs["test"]))


def test_a_resumed_run_says_where_it_resumes_without_a_progress_bar(tmp_path, tiny_model_dir, two_files, capsys):
    alpaca, _ = two_files
    first = _trainer(tiny_model_dir, alpaca, tmp_path / "run", save_steps=1)
    first.train()
    first.cleanup()
    assert "resuming" not in capsys.readouterr().out
    _trainer(tiny_model_dir, alpaca, tmp_path / "run", save_steps=1, resume=True).cleanup()
    assert f"resuming from {tmp_path / 'run' / 'checkpoints' / 'step-0000002'} at step 2" in capsys.readouterr().out


@pytest.mark.parametrize("amount,message", [(1.5, "a whole number"), (7, "holds out 7 of the 7"),
                                            (0.99, "holds out 7 of the 7")])
def test_eval_split_that_leaves_a_side_empty_is_refused(amount, message):
    with pytest.raises(UsageError, match=message):
        hold_out(list(range(7)), amount, seed=0)


def test_eval_split_and_eval_data_together_are_refused(tmp_path, tiny_model_dir, two_files):
    alpaca, sharegpt = two_files
    with pytest.raises(UsageError, match="--eval-split .* --eval-data"):
        load_config(None, dict(model=str(tiny_model_dir), data=str(alpaca), output="o", eval_split=0.1,
                               eval_data=str(sharegpt)))


def test_lora_plus_ratio_gives_b_matrices_their_learning_rate_through_the_schedule(tmp_path, tiny_model_dir,
                                                                                 two_files):
    alpaca, _ = two_files
    trainer = _trainer(tiny_model_dir, alpaca, tmp_path / "lp", lora_plus_ratio=16, lr=1e-3, warmup_steps=3,
                       max_steps=1)  # still warming up after the step
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    a_group, b_group = trainer.optimizer.param_groups
    assert all("lora_A" in names[id(p)] for p in a_group["params"])
    assert all("lora_B" in names[id(p)] for p in b_group["params"]) and b_group["params"]
    trainer.train()
    trainer.cleanup()
    assert b_group["lr"] == pytest.approx(16 * a_group["lr"]) and 0 < a_group["lr"] < 1e-3


def test_neftune_noise_is_transformers_own_and_only_in_training(tmp_path, tiny_model_dir, two_files):
    try:
        from transformers.integrations.neftune import neftune_post_forward_hook
    except ImportError:  # transformers 4.x keeps it among the trainer's utilities
        from transformers.trainer_utils import neftune_post_forward_hook

    alpaca, _ = two_files
    trainer = _trainer(tiny_model_dir, alpaca, tmp_path / "nef", neftune_alpha=5.0)
    embed = trainer.model.get_input_embeddings()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    embed.train()
    torch.manual_seed(3)
    ours = embed(ids)
    clean = torch.nn.functional.embedding(ids, embed.weight)
    embed.neftune_noise_alpha = 5.0
    torch.manual_seed(3)
    theirs = neftune_post_forward_hook(embed, (ids,), clean)
    assert torch.equal(ours, theirs) and not torch.equal(ours, clean)
    embed.eval()
    assert torch.equal(embed(ids), clean)
    with pytest.raises(UsageError, match="--neftune-alpha applies to --method sft"):
        load_config(None, dict(model="m", data="d", output="o", method="dpo", neftune_alpha=5.0))


def test_a_config_built_in_python_is_converted_and_checked_as_a_yaml_file_is(tmp_path):
    """``Trainer(TrainConfig(...))`` without load_config: values are converted as YAML's are, and the trainer
    refuses what `qlora train` refuses, naming the option, before anything is read or written."""
    from qlora.train.config import TrainConfig

    config = TrainConfig(model="m", data="d", output=str(tmp_path / "o"), lr="2e-4",
                         target_modules=["q_proj", "v_proj"], save_steps=8.0)
    assert (config.lr, config.target_modules, config.save_steps) == (2e-4, "q_proj,v_proj", 8)
    assert config == load_config(None, dict(model="m", data="d", output=str(tmp_path / "o"), lr="2e-4",
                                            target_modules=["q_proj", "v_proj"], save_steps=8.0))
    with pytest.raises(UsageError, match="TrainConfig: lr expects float, got 'fast'"):
        TrainConfig(model="m", data="d", output="o", lr="fast")
    for options, refusal in [(dict(batch_size=0), "--batch-size must be at least 1"),
                             (dict(save_strategy="sometimes"), "--save-strategy must be one of"),
                             (dict(epochs=-1), "--epochs must be at least 0")]:
        with pytest.raises(UsageError, match=refusal):
            Trainer(TrainConfig(model="m", data="d", output=str(tmp_path / "o"), **options))
    assert not (tmp_path / "o").exists()


def test_held_out_rows_cut_or_skipped_are_reported_as_the_training_rows_are(tmp_path, tiny_model_dir, two_files,
                                                                            capsys):
    """--eval-data rows whose prompts fill --seq-len are not scored, and long ones are cut: the run log says so (as
    for the training rows, and as ``qlora eval`` does), else the eval loss reads as the whole held-out set's."""
    from qlora.train.data import load_records, normalize, tokenize_dataset

    alpaca, _ = two_files
    long = _write(tmp_path / "long.jsonl", [{"instruction": "What is one plus one? " * 20, "output": "Two."},
                                            {"instruction": "What is two plus two?", "output": "Four. " * 30},
                                            {"instruction": "What is one plus two?", "output": "Three."}])
    trainer = _trainer(tiny_model_dir, alpaca, tmp_path / "run", eval_data=str(long))
    trainer.cleanup()
    _, report = tokenize_dataset(normalize(load_records(long)), trainer.tokenizer, trainer.chat_format,
                                 seq_len=64)
    assert report.truncated == 2 and len(report.empty) == 1 and len(trainer.eval_units) == 2
    assert f"eval data: {report.summary()}; 2 examples evaluated" in capsys.readouterr().out
    _trainer(tiny_model_dir, alpaca, tmp_path / "whole", eval_data=str(alpaca)).cleanup()  # nothing cut: no line
    assert "eval data:" not in capsys.readouterr().out
