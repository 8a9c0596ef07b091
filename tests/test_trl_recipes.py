"""TRL's config files and alignment-handbook's recipes (tests/data/foreign_examples, origins in its SOURCES.md):
they train as TRL and the handbook's scripts train them, TRL's defaults where they are silent (checked against
TRL's own argument classes), their dataset mixtures read as the handbook reads them (checked against ``datasets``),
and what qlora cannot do as they do is refused at its line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from chat_families import model_for
from qlora.cli.main import main
from qlora.train.config import load_config
from qlora.train.data import normalize, tokenize_example
from qlora.train.data.selection import read_sources
from qlora.train.data.sources import Record

EXAMPLES = Path(__file__).parent / "data" / "foreign_examples"
SFT, DPO = "handbook_zephyr-7b-beta_sft_config_qlora.yaml", "handbook_zephyr-7b-beta_dpo_config_qlora.yaml"


def _local(name: str, tmp_path: Path, model: str, data: str, drop: tuple[str, ...] = ()) -> Path:
    """The recipe with its hub model and datasets, output folder and held-out count replaced by local ones, line for
    line (a dropped key leaves its line empty)."""
    text = (EXAMPLES / name).read_text()
    text = re.sub(r"^model_name_or_path:.*$", f"model_name_or_path: {model}", text, flags=re.M)
    text = re.sub(r"^(\s*- id:).*$", rf"\1 {data}", text, flags=re.M)
    text = re.sub(r"^  HuggingFaceH4/ultrafeedback_binarized:", f"  {data}:", text, flags=re.M)
    text = re.sub(r"^output_dir:.*$", f"output_dir: {tmp_path / 'out'}", text, flags=re.M)
    text = re.sub(r"test_split_size: 1000", "test_split_size: 4", text)
    for key in drop:
        text = re.sub(rf"^{key}:.*$", "", text, flags=re.M)
    path = tmp_path / name
    path.write_text(text)
    return path


def _line(name: str, key: str) -> int:
    return next(i for i, line in enumerate((EXAMPLES / name).read_text().splitlines(), 1) if line.startswith(key))


def _chat(i: int) -> dict:
    """A row of HuggingFaceH4/ultrachat_200k's shape."""
    question = f"What is {i} plus {i}?"
    return {"prompt": question, "prompt_id": str(i), "messages": [{"role": "user", "content": question},
                                                                  {"role": "assistant", "content": f"It is {2 * i}."}]}


def _pair(i: int) -> dict:
    """A row of HuggingFaceH4/ultrafeedback_binarized's shape (its chosen and rejected hold the prompt's turn)."""
    question = f"Name colour number {i}."
    turn = {"role": "user", "content": question}
    return {"prompt": question, "prompt_id": str(i), "messages": [turn, {"role": "assistant", "content": "Blue."}],
            "chosen": [turn, {"role": "assistant", "content": "Blue."}],
            "rejected": [turn, {"role": "assistant", "content": "I cannot say."}], "score_chosen": 8.0,
            "score_rejected": 2.0}


def _splits(path: Path, row, names: tuple[str, ...], n: int = 12) -> str:
    from datasets import Dataset, DatasetDict

    DatasetDict({s: Dataset.from_list([row(i + 100 * k) for i in range(n)]) for k, s in enumerate(names)}).save_to_disk(
        str(path))
    return str(path)


@pytest.fixture(scope="module")
def zephyr(tmp_path_factory):
    """A tiny Llama with TinyLlama-Chat's tokenizer, whose own chat template is the zephyr recipe's."""
    import yaml

    model = model_for("tinyllama-zephyr", tmp_path_factory.mktemp("zephyr"))
    assert (model / "chat_template.jinja").read_text() == yaml.safe_load((EXAMPLES / SFT).read_text())["chat_template"]
    return model


def test_the_zephyr_sft_qlora_recipe_trains_as_the_handbook_runs_it(zephyr, tmp_path, capsys):
    data = _splits(tmp_path / "ultrachat", _chat, ("train_sft", "test_sft"))
    path = _local(SFT, tmp_path, str(zephyr), data)
    assert main(["train", str(path), "--max-steps", "2", "--seq-len", "128", "--batch-size", "2", "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "data: 20 examples" in out.out and "4 examples held out for eval" in out.out  # 2 x 12 rows, 4 held out
    cfg = load_config(tmp_path / "out" / "config.yaml", {})
    assert (cfg.quant, cfg.double_quant, cfg.rank, cfg.alpha, cfg.dropout) == ("nf4", False, 16, 16.0, 0.05)
    assert cfg.target_modules == "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    assert (cfg.lr, cfg.lr_scheduler, cfg.warmup_ratio, cfg.grad_accum, cfg.epochs) == (2e-4, "cosine", 0.1, 2, 1.0)
    # where the recipe is silent: TrainingArguments' max_grad_norm and AdamW; SFTConfig's loss on every token of a
    # conversation (assistant_only_loss false)
    assert (cfg.max_grad_norm, cfg.optim, cfg.train_on, cfg.template, cfg.precision) == (
        1.0, "adamw", "completion", "tokenizer", "bf16")
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    for key in ("model_revision", "torch_dtype", "hub_model_id", "push_to_hub", "log_level", "report_to"):
        assert key not in out.err or re.search(rf"passing over [^\n]*{key}", out.err), key


def test_a_chat_template_unlike_the_models_own_trains_with_it(tmp_path, capsys):
    """The recipe's inline chat_template on a model with another template of its own: trained with the recipe's, as
    the handbook sets it on the tokenizer, and saved with the adapter (tests/test_custom_template.py: the same
    tokens and mask as that template installed as the model's own)."""
    import yaml

    from qlora.model.chat_format import ChatFormat

    model = model_for("llama-3", tmp_path)
    data = _splits(tmp_path / "ultrachat", _chat, ("train_sft", "test_sft"))
    path = _local(SFT, tmp_path, str(model), data)
    assert main(["train", str(path), "--max-steps", "1", "--seq-len", "128", "--batch-size", "2", "--no-progress"]) == 0
    inline = yaml.safe_load((EXAMPLES / SFT).read_text())["chat_template"]
    assert inline != (model / "chat_template.jinja").read_text()
    assert load_config(tmp_path / "out" / "config.yaml", {}).template == inline
    assert ChatFormat.load(tmp_path / "out").template == inline


def test_the_zephyr_dpo_qlora_recipe(zephyr, tmp_path, capsys):
    """Its max_prompt_length is refused (TRL 1.x removed it); without it the file needs its trainer said; then it
    trains DPO with TRL's disable_dropout (LoRA's dropout off), its test_prefs split as the eval data."""
    data = _splits(tmp_path / "ultrafeedback", _pair, ("train_prefs", "test_prefs"))
    path = _local(DPO, tmp_path, str(zephyr), data)
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{path} line {_line(DPO, 'max_prompt_length')}: max_prompt_length" in err and "Traceback" not in err, err
    path = _local(DPO, tmp_path, str(zephyr), data, drop=("max_prompt_length",))
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{path} line {_line(DPO, 'beta')}: beta: keys of TRL's preference trainers" in err, err
    assert main(["train", str(path), "--method", "dpo", "--max-steps", "2", "--batch-size", "2", "--no-progress"]) == 0
    assert "data: 12 examples" in capsys.readouterr().out
    cfg = load_config(tmp_path / "out" / "config.yaml", {})
    assert (cfg.method, cfg.beta, cfg.lr, cfg.rank, cfg.alpha, cfg.dropout, cfg.double_quant) == (
        "dpo", 0.01, 5e-6, 128, 128.0, 0.0, False)
    assert [e["handbook"]["split"] for e in json.loads(cfg.eval_data)] == ["test_prefs"]
    assert [e["handbook"]["split"] for e in json.loads(cfg.data)] == ["train_prefs"]


@pytest.mark.parametrize("name, key", [
    ("trl_cli_configs_example_config.yaml", "dataset_name"),  # trl sft --config: a full fine-tune of Qwen2.5-0.5B
    ("handbook_zephyr-7b-gemma_sft_config_full.yaml", "model_revision"),
])
def test_full_fine_tuning_files_are_refused_at_their_line(tmp_path, capsys, name, key):
    path = _local(name, tmp_path, "./m", "./d")
    assert main(["train", str(path), "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{path} line {_line(name, key)}: {key} makes this a TRL" in err and "add use_peft: true" in err, err


def test_trl_defaults_where_a_file_is_silent_are_trls_own(tmp_path):
    from transformers import TrainingArguments
    from trl import DPOConfig, ModelConfig, SFTConfig

    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: m\ndataset_name: d\noutput_dir: o\nuse_peft: true\nload_in_4bit: true\n"
                    "lora_target_modules: all-linear\n")
    cpu = {"output_dir": str(tmp_path), "use_cpu": True, "bf16": False}  # TRL's bf16 default needs a GPU
    sft, dpo, model = SFTConfig(**cpu), DPOConfig(**cpu), ModelConfig()
    cfg = load_config(path, {})
    assert (cfg.lr, cfg.lr_scheduler, cfg.warmup_ratio, cfg.warmup_steps, cfg.max_grad_norm, cfg.epochs) == (
        sft.learning_rate, sft.lr_scheduler_type, 0.0, sft.warmup_steps, sft.max_grad_norm, sft.num_train_epochs)
    assert (cfg.batch_size, cfg.seq_len, cfg.gradient_checkpointing, cfg.weight_decay) == (
        sft.per_device_train_batch_size, sft.max_length, sft.gradient_checkpointing, sft.weight_decay)
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.quant, cfg.double_quant) == (
        model.lora_r, model.lora_alpha, model.lora_dropout, model.bnb_4bit_quant_type, model.use_bnb_nested_quant)
    assert cfg.optim == "adamw" and TrainingArguments(**cpu).optim in ("adamw_torch",
                                                                                          "adamw_torch_fused")
    assert cfg.train_on == "completion"
    cfg = load_config(path, {"method": "dpo"})
    assert (cfg.lr, cfg.seq_len, cfg.beta, cfg.dropout) == (dpo.learning_rate, dpo.max_length, dpo.beta, 0.0)
    assert dpo.disable_dropout
    cfg = load_config(path, {"method": "dpo", "dropout": "0.1"})
    assert cfg.dropout == 0.1  # a flag wins over TRL's disable_dropout
    text = path.read_text()
    path.write_text(text + "disable_dropout: true\nlora_dropout: 0.1\n")
    assert load_config(path, {"method": "dpo"}).dropout == 0.0  # TRL zeroes lora_dropout under disable_dropout
    path.write_text(text + "disable_dropout: false\nlora_dropout: 0.1\nmax_steps: -1\n")
    assert (load_config(path, {"method": "dpo"}).dropout, load_config(path, {}).max_steps) == (0.1, 0)


def test_handbook_mixtures_keep_the_rows_the_handbook_keeps(tmp_path):
    """dataset_mixture: each dataset cut to its columns and to int(len * weight) rows of datasets' shuffle(seed);
    dataset_mixer (handbook v0.x): the first int(fraction * len) rows of each train split, the test splits whole."""
    from datasets import concatenate_datasets, load_from_disk

    first = _splits(tmp_path / "a", _chat, ("train_sft", "test_sft"), n=10)
    second = _splits(tmp_path / "b", _chat, ("train_sft", "test_sft"), n=7)
    path = tmp_path / "run.yaml"
    path.write_text(f"""model_name_or_path: m
output_dir: o
use_peft: true
lora_target_modules: all-linear
dataset_mixture:
  datasets:
    - id: {first}
      split: train_sft
      columns: [messages]
      weight: 0.5
    - id: {second}
      split: test_sft
      columns: [messages]
  seed: 3
  test_split_size: 0.25
""")
    cfg = load_config(path, {})
    assert cfg.eval_split == 0.25
    expected = concatenate_datasets([
        load_from_disk(first)["train_sft"].select_columns(["messages"]).shuffle(seed=3).select(range(5)),
        load_from_disk(second)["test_sft"].select_columns(["messages"]).shuffle(seed=3).select(range(7))])
    assert read_sources(cfg.data, "train", None, 0, lambda records: [r.fields for r in records]) == list(expected)

    path.write_text(f"model_name_or_path: m\noutput_dir: o\nuse_peft: true\nlora_target_modules: all-linear\n"
                    f"dataset_mixer:\n  {first}: 0.5\n  {second}: 1.0\ndataset_splits: [train_sft, test_sft]\n")
    cfg = load_config(path, {})
    rows = lambda spec: read_sources(spec, "train", None, 0, lambda records: [r.fields for r in records])  # noqa: E731
    assert rows(cfg.data) == list(load_from_disk(first)["train_sft"].select(range(5))) + list(
        load_from_disk(second)["train_sft"])
    assert rows(cfg.eval_data) == list(load_from_disk(first)["test_sft"]) + list(load_from_disk(second)["test_sft"])


def test_train_on_completion_is_trls_sft_default(zephyr):
    """SFTConfig's defaults (assistant_only_loss false, completion_only_loss for prompt-completion rows): every
    token of a conversation, only the completion of a prompt-completion row."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zephyr)
    chat, = normalize([Record({"messages": _chat(1)["messages"]}, "row 1")])
    plain, = normalize([Record({"prompt": "Add 1 and 1.", "completion": " 2"}, "row 2")])
    labels = {on: [tokenize_example(e, tokenizer, tokenizer.chat_template, on).labels for e in (chat, plain)]
              for on in ("assistant", "all", "completion")}
    assert labels["completion"][0] == labels["all"][0] != labels["assistant"][0]
    assert labels["completion"][1] == labels["assistant"][1] != labels["all"][1]


@pytest.mark.parametrize("keys, train_on", [
    ("assistant_only_loss: true\n", "assistant"), ("assistant_only_loss: false\n", "completion"),
    ("completion_only_loss: true\n", "completion"), ("completion_only_loss: false\n", "all"),
    ("assistant_only_loss: true\ncompletion_only_loss: false\n", "assistant"),
])
def test_sft_loss_keys_are_read_together(tmp_path, keys, train_on):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata: d\noutput: o\n" + keys)
    assert load_config(path, {}).train_on == train_on


@pytest.mark.parametrize("text, line, says", [
    ("model_revision: v2\n", 5, "hf download MODEL --revision v2"),
    ("torch_dtype: float16\nbf16: true\n", 5, "torch_dtype float16 with bf16: true"),
    ("lora_task_type: SEQ_CLS\n", 5, "qlora trains causal language models"),
    ("packing: true\npacking_strategy: wrapped\n", 6, "packing_strategy 'wrapped'"),
    ("dataset_kwargs:\n  skip_prepare_dataset: true\n", 5, "dataset_kwargs {'skip_prepare_dataset': True}"),
    ("eos_token: <|eot_id|>\n", 5, "eos_token '<|eot_id|>'"),
    ("dataset_mixture:\n  datasets:\n    - id: d\n      weight: 2\n", 5, "weight 2: a share of its rows"),
    ("dataset_splits: [train]\n", 5, "dataset_splits names the splits of dataset_mixer"),
])
def test_what_qlora_cannot_do_as_trl_does_is_refused_by_line(tmp_path, capsys, text, line, says):
    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: m\noutput_dir: o\nuse_peft: true\nlora_target_modules: all-linear\n" + text
                    + ("" if "dataset_mixture" in text else "dataset_name: d\n"))
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{path} line {line}" in err and says in err and "Traceback" not in err, err


def test_use_peft_without_target_modules_is_refused(tmp_path, capsys):
    """TRL then adapts PEFT's per-architecture default layers, which qlora does not guess."""
    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: m\ndataset_name: d\noutput_dir: o\nuse_peft: true\n")
    assert main(["train", str(path), "--no-progress"]) == 2
    assert f"{path} line 4: use_peft without lora_target_modules" in capsys.readouterr().err


def test_the_models_own_settings_restated_are_accepted(zephyr, tmp_path):
    own = json.loads((zephyr / "tokenizer_config.json").read_text())["eos_token"]
    path = tmp_path / "run.yaml"
    path.write_text(f"model_name_or_path: {zephyr}\ndataset_name: d\noutput_dir: o\nuse_peft: true\n"
                    f"lora_target_modules: all-linear\neos_token: {json.dumps(own)}\ndtype: bfloat16\n"
                    "packing: true\npacking_strategy: bfd\ndataset_kwargs:\n  add_special_tokens: false\n")
    cfg = load_config(path, {})
    assert (cfg.precision, cfg.packing) == ("bf16", True)


def test_trl_scripts_evaluate_on_the_test_split_when_an_eval_strategy_asks(tmp_path):
    path = tmp_path / "run.yaml"
    head = ("model_name_or_path: m\ndataset_name: org/d\ndataset_config: main\ndataset_test_split: validation\n"
            "output_dir: o\nuse_peft: true\nlora_target_modules: all-linear\n")
    path.write_text(head + "eval_strategy: steps\neval_steps: 10\n")
    cfg = load_config(path, {})
    assert (cfg.eval_data, cfg.eval_data_split, cfg.data_subset, cfg.eval_steps) == ("org/d", "validation", "main", 10)
    path.write_text(head + "eval_strategy: 'no'\n")
    assert load_config(path, {}).eval_data is None
    path.write_text(head + "eval_strategy: no\n")  # YAML's bare no is false
    assert (load_config(path, {}).eval_data, load_config(path, {}).eval_strategy) == (None, "no")
