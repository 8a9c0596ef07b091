"""axolotl's and TRL's config files: their example QLoRA YAMLs load to the run they describe and train; each
``datasets:`` type gives the examples of the same data written in qlora's own formats; what qlora cannot do
as they do is refused by file and line."""

from __future__ import annotations

import json

import pytest

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.train.config import load_config
from qlora.train.strategy import steps_of
from qlora.train.data import normalize
from qlora.train.data.selection import read_sources

# axolotl's examples/llama-3/qlora.yml, keys and values as it ships them; only the hub names are local paths.
_LLAMA3 = """base_model: {model}
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer

load_in_8bit: false
load_in_4bit: true
strict: false

datasets:
  - path: {data}
    type: alpaca
dataset_prepared_path:
val_set_size: 0
output_dir: {output}

adapter: qlora
lora_model_dir:

sequence_len: 4096
sample_packing: true
pad_to_sequence_len: true

lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
lora_target_linear: true
lora_fan_in_fan_out:

wandb_project:
wandb_entity:
wandb_watch:
wandb_name:
wandb_log_model:

gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 4
optimizer: paged_adamw_32bit
lr_scheduler: cosine
learning_rate: 0.0002

train_on_inputs: false
group_by_length: false
bf16: auto
fp16:
tf32: false

gradient_checkpointing: true
early_stopping_patience:
resume_from_checkpoint:
local_rank:
logging_steps: 1
xformers_attention:
flash_attention: true

warmup_steps: 10
evals_per_epoch: 4
eval_table_size:
saves_per_epoch: 1
debug:
deepspeed:
weight_decay: 0.0
fsdp:
fsdp_config:
special_tokens:
  pad_token: "<|end_of_text|>"
"""

# axolotl's examples/mistral/qlora.yml (its middle part: the keys that differ from the llama-3 one).
_MISTRAL = """base_model: ./models/mistral
model_type: MistralForCausalLM
tokenizer_type: LlamaTokenizer
is_mistral_derived_model: true
load_in_8bit: false
load_in_4bit: true
strict: false
datasets:
  - path: ./alpaca_2k_test.jsonl
    type: alpaca
dataset_prepared_path: last_run_prepared
val_set_size: 0.1
output_dir: ./qlora-out
adapter: qlora
lora_model_dir:
sequence_len: 8192
sample_packing: true
pad_to_sequence_len: true
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
lora_fan_in_fan_out:
lora_target_modules:
  - gate_proj
  - down_proj
  - up_proj
  - q_proj
  - v_proj
  - k_proj
  - o_proj
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 1
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002
train_on_inputs: false
group_by_length: false
bf16: auto
fp16: false
tf32: false
gradient_checkpointing: true
loss_watchdog_threshold: 5.0
loss_watchdog_patience: 3
warmup_steps: 10
evals_per_epoch: 4
eval_table_size:
eval_table_max_new_tokens: 128
saves_per_epoch: 1
weight_decay: 0.0
special_tokens:
  bos_token: "<s>"
  eos_token: "</s>"
  unk_token: "<unk>"
"""

_ALPACA = [{"instruction": "Add 2 and 3.", "input": "Show the sum.", "output": "5"},
           {"instruction": "Name a colour.", "input": "", "output": "Blue."},
           {"instruction": "Say hi.", "input": "", "output": "Hi!"},
           {"instruction": "Count to three.", "input": "", "output": "1, 2, 3."}]
_CHAT = [{"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                       {"role": "assistant", "content": "Bye."}]}]


def _alpaca_prompt(row: dict) -> str:
    """axolotl's alpaca prompt, written out (its AlpacaPrompter, instruct style)."""
    if row["input"]:
        return ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n### Instruction:\n"
                f"{row['instruction']}\n\n### Input:\n{row['input']}\n\n### Response:\n")
    return ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{row['instruction']}\n\n### Response:\n")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _yaml(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def _examples(spec: str) -> list:
    return [(e.messages, e.text, e.prompt) for e in read_sources(spec, "train", None, 0, normalize)]


def test_axolotl_llama3_qlora_example_loads_as_it_trains_there(tmp_path, capsys):
    cfg = load_config(_yaml(tmp_path, _LLAMA3.format(model="./models/llama", data="./alpaca.jsonl",
                                                     output="./outputs/qlora-out")), {})
    assert (cfg.model, cfg.output, cfg.method, cfg.quant, cfg.double_quant, cfg.blocksize) == (
        "./models/llama", "./outputs/qlora-out", "sft", "nf4", True, 64)
    assert json.loads(cfg.data) == [{"path": "./alpaca.jsonl", "type": "alpaca"}]
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.target_modules, cfg.adapter) == (32, 16.0, 0.05, "all-linear", None)
    assert (cfg.seq_len, cfg.packing, cfg.batch_size, cfg.grad_accum, cfg.epochs) == (4096, True, 2, 4, 4.0)
    assert (cfg.optim, cfg.lr_scheduler, cfg.lr, cfg.warmup_steps, cfg.weight_decay) == (
        "paged_adamw_32bit", "cosine", 2e-4, 10, 0.0)
    assert (cfg.train_on, cfg.precision, cfg.gradient_checkpointing, cfg.eval_split, cfg.fsdp) == (
        "assistant", "auto", True, 0.0, False)
    assert cfg.max_grad_norm == 1.0  # transformers' default, which axolotl keeps (qlora's own is the paper's 0.3)
    err = capsys.readouterr().err
    assert "passing over model_type, tokenizer_type, load_in_8bit, strict" in err and "flash_attention" in err
    assert "its defaults apply where it is silent (max_grad_norm 1.0, save_total_limit 4)" in err


def test_axolotl_mistral_qlora_example_loads(tmp_path, capsys):
    cfg = load_config(_yaml(tmp_path, _MISTRAL), {})
    # lora_target_linear with a list: axolotl adapts the union, every linear layer
    assert (cfg.target_modules, cfg.optim, cfg.eval_split, cfg.seq_len, cfg.dropout) == (
        "all-linear", "adamw_8bit", 0.1, 8192, 0.05)
    err = capsys.readouterr().err
    assert "loss_watchdog_threshold" in err and "special_tokens bos_token, eos_token, unk_token" in err


def test_axolotl_defaults_apply_where_the_file_is_silent(tmp_path):
    cfg = load_config(_yaml(tmp_path, "base_model: m\nadapter: lora\ndatasets:\n  - path: d.jsonl\n    type: alpaca\n"
                                      "output_dir: o\nlearning_rate: 1.0e-4\n"), {"warmup-ratio": "0.1"})
    assert (cfg.quant, cfg.lr_scheduler, cfg.optim, cfg.dropout, cfg.max_grad_norm) == (
        "none", "cosine", "adamw", 0.0, 1.0)  # adapter lora without load_in_4bit: a 16-bit base
    assert cfg.warmup_ratio == 0.1  # flags still win
    cfg = load_config(_yaml(tmp_path, "base_model: m\nadapter: lora\nload_in_4bit: true\ndatasets: [d.jsonl]\n"
                                      "output_dir: o\n"), {})
    assert cfg.quant == "nf4" and cfg.warmup_ratio == 0.0
    cfg = load_config(_yaml(tmp_path, "base_model: m\ndataset: d.jsonl\noutput_dir: o\n"), {})
    assert cfg.lr_scheduler == "constant" and cfg.max_grad_norm == 0.3  # not axolotl's: qlora's own defaults
    cfg = load_config(_yaml(tmp_path, "base_model: m\nadapter: qlora\nload_in_4bit: true\ndatasets: [d.jsonl]\n"
                                      "output_dir: o\nfsdp: [full_shard, auto_wrap]\nfsdp_config: {}\n"), {})
    assert cfg.fsdp  # axolotl's list of FSDP options: qlora's FSDP2 sharding under torchrun
    # our own data key takes axolotl-style mappings too
    cfg = load_config(_yaml(tmp_path, "model: m\noutput: o\ndata:\n  - path: d.jsonl\n    type: alpaca\n"), {})
    assert json.loads(cfg.data) == [{"path": "d.jsonl", "type": "alpaca"}]


@pytest.mark.parametrize("keys, micro, accum", [
    ("micro_batch_size: 2\nbatch_size: 8\n", 2, 4),
    ("batch_size: 6\n", 1, 6),  # micro_batch_size 1 when silent
    ("micro_batch_size: 4\nbatch_size: 10\n", 4, 2),  # floored, as axolotl's batch_size // micro_batch_size
])
def test_axolotl_batch_size_is_the_steps_batch_that_sets_the_accumulation(tmp_path, keys, micro, accum):
    cfg = load_config(_yaml(tmp_path, "base_model: m\nadapter: lora\ndatasets: [d.jsonl]\noutput_dir: o\n" + keys),
                      {})
    assert (cfg.batch_size, cfg.grad_accum) == (micro, accum)
    cfg = load_config(_yaml(tmp_path, "model: m\ndata: d.jsonl\noutput: o\nbatch_size: 8\n"), {})
    assert (cfg.batch_size, cfg.grad_accum) == (8, 1)  # qlora's own batch_size is the micro-batch


@pytest.mark.parametrize("keys, message", [
    ("batch_size: 8\ngradient_accumulation_steps: 2\n", "axolotl refuses both"),
    ("micro_batch_size: 4\nbatch_size: 2\n", "at least micro_batch_size"),
])
def test_axolotl_batch_size_that_axolotl_refuses_is_refused_by_line(tmp_path, capsys, keys, message):
    path = _yaml(tmp_path, "base_model: m\nadapter: lora\ndatasets: [d.jsonl]\noutput_dir: o\n" + keys)
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{path} line " in err and "batch_size" in err and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("rl, method, loss_type, nll", [
    ("dpo", "dpo", "", 0.0), ("ipo", "dpo", "ipo", 0.0), ("orpo", "orpo", "", 1.0), ("kto", "kto", "", 0.0),
    # axolotl's simpo: TRL's CPOTrainer with loss simpo and CPOConfig's cpo_alpha 1
    ("simpo", "cpo", "simpo", 1.0),
])
def test_axolotl_rl_is_qlora_method_and_loss(tmp_path, rl, method, loss_type, nll):
    cfg = load_config(_yaml(tmp_path, f"base_model: m\nadapter: qlora\nload_in_4bit: true\nrl: {rl}\n"
                                      "datasets: [d.jsonl]\noutput_dir: o\nmicro_batch_size: 2\nrl_beta: 0.2\n"), {})
    assert (cfg.method, cfg.loss_type, cfg.nll_weight, cfg.beta) == (method, loss_type, nll, 0.2)


def test_trl_sft_config_keys_load(tmp_path, capsys):
    cfg = load_config(_yaml(tmp_path, """model_name_or_path: m
dataset: d.jsonl
output_dir: o
dataset_text_field: body
max_length: 256
packing: true
padding_free: true
dataset_num_proc: 4
completion_only_loss: true
assistant_only_loss: true
pad_token: "<pad>"
num_train_epochs: 1
learning_rate: 2.0e-5
"""), {})
    assert (cfg.data_fields, cfg.seq_len, cfg.packing, cfg.train_on, cfg.lr) == ("text=body", 256, True, "assistant",
                                                                                 2e-5)
    assert "dataset_num_proc" in capsys.readouterr().err
    cfg = load_config(_yaml(tmp_path, "model: m\ndata: d\noutput: o\nassistant_only_loss: false\n"), {})
    assert cfg.train_on == "completion"  # TRL: every token of a conversation, the completion of prompt-completion rows


def test_each_dataset_type_gives_the_examples_of_our_own_format(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "alpaca.jsonl", _ALPACA)
    _write(tmp_path / "qa.jsonl", [{"q": r["instruction"], "ctx": r["input"], "a": r["output"], "sys": "Be brief."}
                                   for r in _ALPACA])
    _write(tmp_path / "chat.jsonl", _CHAT)
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    _write(tmp_path / "sharegpt.jsonl", [{"conversations": [{"from": speakers[m["role"]], "value": m["content"]}
                                                            for m in _CHAT[0]["messages"]]}])
    _write(tmp_path / "dialog.jsonl", [{"dialog": [{"speaker": {"system": "sys", "user": "me", "assistant": "bot"}[
        m["role"]], "text": m["content"]} for m in _CHAT[0]["messages"]]}])
    _write(tmp_path / "texts.jsonl", [{"body": "The quick brown fox."}, {"body": "Jumps over the lazy dog."}])
    (tmp_path / "shards").mkdir()
    _write(tmp_path / "shards" / "part.json", _ALPACA[:2])

    def axolotl(*entries):
        return _examples(json.dumps(list(entries)))

    def ours(rows):
        return _examples(str(_write(tmp_path / "ours.jsonl", rows)))

    # axolotl's alpaca prompter: its preamble and sections, the output (and EOS) trained
    alpaca = ours([{"prompt": _alpaca_prompt(r), "completion": r["output"]} for r in _ALPACA])
    assert axolotl({"path": "alpaca.jsonl", "type": "alpaca"}) == alpaca
    assert axolotl({"path": "alpaca.jsonl"}) == ours(_ALPACA)  # no type: read as it is (our alpaca format)
    assert axolotl({"path": "alpaca.jsonl", "type": "alpaca:chatml"})[1][2] == (
        "<|im_start|>system\nBelow is an instruction that describes a task. Write a response that appropriately "
        "completes the request.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    custom = {"field_instruction": "q", "field_input": "ctx", "field_output": "a"}  # axolotl's default strings
    assert axolotl({"path": "qa.jsonl", "type": custom}) == ours(
        [{"prompt": f"{r['instruction']} {r['input']} " if r["input"] else f"{r['instruction']} ",
          "completion": r["output"]} for r in _ALPACA])
    assert axolotl({"path": "chat.jsonl", "type": "chat_template"}) == ours(_CHAT)
    assert axolotl({"path": "sharegpt.jsonl", "type": "chat_template", "field_messages": "conversations",
                    "message_property_mappings": {"role": "from", "content": "value"}}) == ours(_CHAT)
    assert axolotl({"path": "sharegpt.jsonl", "type": "sharegpt"}) == ours(_CHAT)
    assert axolotl({"path": "dialog.jsonl", "type": "chat_template", "field_messages": "dialog",
                    "message_field_role": "speaker", "message_field_content": "text",
                    "roles": {"system": ["sys"], "user": ["me"], "assistant": ["bot"]}}) == ours(_CHAT)
    assert axolotl({"path": "texts.jsonl", "type": "completion", "field": "body"}) == ours(
        [{"text": "The quick brown fox."}, {"text": "Jumps over the lazy dog."}])
    fmt = {"field_instruction": "q", "field_input": "ctx", "field_output": "a", "field_system": "sys",
           "system_format": "{system}\n", "format": "[INST] {instruction} "
           "{input} [/INST]", "no_input_format": "[INST] {instruction} [/INST]"}
    assert axolotl({"path": "qa.jsonl", "type": fmt}) == ours(
        [{"prompt": f"Be brief.\n[INST] {r['instruction']} {r['input']} [/INST]" if r["input"] else
          f"Be brief.\n[INST] {r['instruction']} [/INST]", "completion": r["output"]} for r in _ALPACA])
    assert axolotl({"path": "shards", "ds_type": "json", "data_files": "shards/part.json", "type": "alpaca"}) == (
        alpaca[:2])
    # several entries mix, each read with its own type, in order
    assert axolotl({"path": "alpaca.jsonl", "type": "alpaca"}, {"path": "chat.jsonl", "type": "chat_template"}) == (
        alpaca + ours(_CHAT))


def test_an_unmapped_role_names_the_row(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "chat.jsonl", [{"messages": [{"role": "narrator", "content": "Once."}]}])
    with pytest.raises(UsageError, match=r"chat.jsonl line 1 \(chat.jsonl\), message 0: role 'narrator' is not mapped"):
        _examples(json.dumps([{"path": "chat.jsonl", "type": "chat_template"}]))


@pytest.mark.parametrize("text, line, message", [
    ("load_in_8bit: true\nadapter: lora\n", 5, "qlora stores the base model in 4 bits"),
    ("adapter: qlora\n", 5, "set load_in_4bit: true"),
    ("load_in_4bit: true\n", 5, "(TRL) is full fine-tuning"),
    ("adapter: qlora\nload_in_4bit: true\nrl: grpo\n", 7, "rl 'grpo' has no qlora counterpart"),
    ("adapter: qlora\nload_in_4bit: true\ngroup_by_length: true\n", 7, "not grouped by length"),
    ("adapter: qlora\nload_in_4bit: true\nchat_template: tokenizer_default_fallback_chatml\n", 7, "choose one"),
    ("adapter: qlora\nload_in_4bit: true\nlora_modules_to_save: [embed_tokens, lm_head]\n", 7, "add_special_tokens"),
    ("adapter: qlora\nload_in_4bit: true\ndatasets:\n  - path: d.jsonl\n    type: input_output\n", 6,
     "datasets item 1: type 'input_output'"),
    ("adapter: qlora\nload_in_4bit: true\ndatasets:\n  - path: d.jsonl\n    type: chat_template\n"
     "    roles_to_train: [user, assistant]\n", 6, "roles_to_train"),
    ("adapter: qlora\nload_in_4bit: true\ndatasets:\n  - path: d.jsonl\n    shards: 4\n", 6, "shards: not an option"),
    ("eos_token: <|im_end|>\n", 5, "eos_token"),
])
def test_what_qlora_cannot_do_as_axolotl_does_is_refused_by_line(tmp_path, capsys, text, line, message):
    header = "base_model: m\ndataset_prepared_path:\noutput_dir: o\n"
    path = _yaml(tmp_path, header + ("" if "datasets:" in text else "datasets: [d.jsonl]\n") + text)
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{path} line {line}" in err and message in err and "Traceback" not in err, err


def test_the_axolotl_llama3_qlora_example_trains(tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "alpaca.jsonl", _ALPACA * 2)
    _write(tmp_path / "eval.jsonl", _CHAT)
    config = _yaml(tmp_path, _LLAMA3.format(model=tiny_model_dir, data="./alpaca.jsonl", output="./out")
                   + "test_datasets:\n  - path: ./eval.jsonl\n    type: chat_template\n    split: train\n")
    # the 8 short examples pack into one 4096-token row: micro_batch_size 2 would hold it twice (refused)
    assert main(["train", str(config), "--max-steps", "2", "--batch-size", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "data: 8 examples" in out and "1 packed row," in out
    saved = (tmp_path / "out" / "config.yaml").read_text()
    assert "quant: nf4" in saved and "alpaca.jsonl" in saved
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    # saves_per_epoch 1 of num_epochs 4: a checkpoint every quarter of the run, ceil(2 * 0.25) = every step
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").glob("step-*")) == ["step-0000001", "step-0000002"]


def test_saves_and_evals_per_epoch_are_shares_of_the_run_as_axolotl_computes_them(tmp_path):
    """axolotl: save_steps = 1 / (saves_per_epoch * num_epochs) when below 1 (transformers then saves every
    ceil(total_steps * share) steps); evals_per_epoch likewise, only with val_set_size or test_datasets."""
    cfg = load_config(_yaml(tmp_path, _LLAMA3.format(model="m", data="d.jsonl", output="o")), {})
    assert (cfg.save_steps, cfg.eval_steps) == (0.25, 0)  # evals_per_epoch 4, but val_set_size 0: no evals
    assert (steps_of(cfg.save_steps, 10), steps_of(cfg.save_steps, 4)) == (3, 1)
    head = "base_model: m\nadapter: lora\ndatasets: [d.jsonl]\noutput_dir: o\n"
    cfg = load_config(_yaml(tmp_path, head + "num_epochs: 2\nval_set_size: 0.1\nevals_per_epoch: 3\n"
                                             "saves_per_epoch: 1\n"), {})
    assert (cfg.eval_steps, cfg.save_steps) == (1 / 6, 0.5)
    assert steps_of(cfg.eval_steps, 13) == 3  # ceil(13 / 6)
    cfg = load_config(_yaml(tmp_path, head + "saves_per_epoch: 1\nevals_per_epoch: 1\ntest_datasets: [e.jsonl]\n"),
                      {})
    assert (cfg.save_steps, cfg.eval_steps) == (0, 0)  # one per epoch of one epoch: the end of the run
    assert load_config(_yaml(tmp_path, head + "save_steps: 8\n"), {"eval-steps": "0.5"}).save_steps == 8
    with pytest.raises(UsageError, match=r"run.yaml line 5: saves_per_epoch and save_steps both set"):
        load_config(_yaml(tmp_path, head + "saves_per_epoch: 2\nsave_steps: 10\n"), {})
    with pytest.raises(UsageError, match=r"--save-steps 1.5: give a whole number of steps, or a share"):
        load_config(_yaml(tmp_path, head), {"save-steps": "1.5"})


def test_special_tokens_must_be_the_local_models_own(tiny_model_dir, tmp_path, capsys):
    own = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    head = f"base_model: {tiny_model_dir}\nadapter: qlora\nload_in_4bit: true\ndatasets: [d.jsonl]\noutput_dir: o\n"
    load_config(_yaml(tmp_path, head + f"special_tokens:\n  eos_token: {json.dumps(own['eos_token'])}\n"
                                       "  pad_token: '<|end_of_text|>'\n"), {})
    path = _yaml(tmp_path, head + "special_tokens:\n  eos_token: '</s>'\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path} line 6: special_tokens eos_token '</s>': the model's tokenizer has" in err and "Traceback" not in err


def test_trl_model_config_peft_and_4bit_keys(tmp_path):
    """TRL's ModelConfig: use_peft with load_in_4bit is QLoRA (NF4, nested quantization only when asked),
    use_peft alone LoRA on a 16-bit base; its ScriptArguments name the dataset."""
    head = ("model_name_or_path: m\ndataset_name: org/data\ndataset_config: main\ndataset_train_split: train\n"
            "output_dir: o\nuse_peft: true\nlora_r: 16\nlora_alpha: 32\nlora_target_modules: [q_proj, v_proj]\n")
    cfg = load_config(_yaml(tmp_path, head + "load_in_4bit: true\nbnb_4bit_quant_type: nf4\n"), {})
    assert (cfg.data, cfg.data_subset, cfg.data_split, cfg.quant, cfg.double_quant, cfg.alpha) == (
        "org/data", "main", "train", "nf4", False, 32.0)
    cfg = load_config(_yaml(tmp_path, head + "load_in_4bit: true\nuse_bnb_nested_quant: true\n"), {})
    assert cfg.double_quant
    assert load_config(_yaml(tmp_path, head), {}).quant == "none"
    with pytest.raises(UsageError, match=r"run.yaml line 6: use_peft: false is full fine-tuning"):
        load_config(_yaml(tmp_path, head.replace("use_peft: true", "use_peft: false")), {})


def test_ds_type_text_reads_a_row_a_line_whatever_the_suffix(tmp_path, monkeypatch):
    """datasets' text loader (axolotl's ds_type: text): each non-blank line a row in the column text, blank lines
    between paragraphs not joining them as qlora's own .txt reading does."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "corpus.md").write_text("The quick brown fox.\nJumps over.\n\nThe lazy dog.\n")
    lines = _examples(str(_write(tmp_path / "ours.jsonl", [{"text": "The quick brown fox."}, {"text": "Jumps over."},
                                                            {"text": "The lazy dog."}])))
    for entry in ({"path": "notes/corpus.md", "ds_type": "text", "type": "completion"},
                  {"path": "notes/corpus.md", "ds_type": "text"},
                  {"path": "notes", "ds_type": "text", "data_files": ["notes/corpus.md"], "type": "completion"}):
        assert _examples(json.dumps([entry])) == lines, entry
    (tmp_path / "notes" / "corpus.txt").write_text((tmp_path / "notes" / "corpus.md").read_text())
    assert _examples(json.dumps([{"path": "notes/corpus.txt", "type": "completion"}])) == lines
    assert _examples("notes/corpus.txt") != lines  # qlora's own .txt reading: a row a paragraph
    with pytest.raises(UsageError, match=r"unknown data format '.md'"):
        _examples(json.dumps([{"path": "notes/corpus.md", "type": "completion"}]))  # no ds_type: by the suffix
