"""TRL's SFTTrainer dataset preparation, the oracle of the SFT data tests: the token ids and labels TRL 1.16
trains on, from rows or a ``datasets.Dataset``, without a model or a trainer."""

from __future__ import annotations

import types


def trl_sft(tokenizer, rows, completion_only_loss: bool = True) -> list[dict]:
    """``input_ids`` and ``labels`` of each row (a list of dicts or a Dataset) as ``SFTTrainer`` prepares them."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    data = rows if isinstance(rows, Dataset) else Dataset.from_list(rows)
    args = SFTConfig(output_dir="unused", report_to=[], bf16=False, use_cpu=True,
                     completion_only_loss=completion_only_loss, dataset_num_proc=None)
    trainer = types.SimpleNamespace(_tokenizer=tokenizer, chat_template=None, completion_only_loss=completion_only_loss)
    out = SFTTrainer._prepare_dataset(trainer, data, tokenizer, args, False, None, "train")
    return [{"input_ids": list(r["input_ids"]), "labels": list(r["labels"])} for r in out]
