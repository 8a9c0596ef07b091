"""torchtune's LoRA/QLoRA recipe configs (tests/data/torchtune, origins in its SOURCES.md) load to the run they
describe and train; their dataset rows are the tokens torchtune's Llama 3 tokenizer trains; what qlora would
train otherwise is refused by file and line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from chat_families import model_for
from qlora.chat.tokenize import IGNORE_INDEX, tokenize_example
from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.train.config import load_config
from qlora.train.data import normalize
from qlora.train.data.selection import read_sources

DATA = Path(__file__).parent / "data" / "torchtune"
# Llama 3's split rule (its tokenizer.json's pre-tokenizer regex, tiktoken's cl100k-style pat_str): "\n\n" is a
# piece of its own before any stripped content, so the joined text tokenizes as torchtune's pieces do
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
ROWS = [{"instruction": f"Add {i} and {i}.", "input": "" if i % 2 else f"numbers {i}", "output": f" {2 * i}\n"}
        for i in range(8)]


def _config(tmp_path, name: str, model, data=None, edit=lambda text: text) -> Path:
    """The shipped file, its /tmp model folder, output_dir and hub dataset made local."""
    text = (DATA / name).read_text()
    folder = next(line.split(":", 1)[1].strip() for line in text.splitlines() if "checkpoint_dir:" in line
                  and not line.lstrip().startswith("#"))
    text = text.replace(folder.rstrip("/"), str(model)).replace("/tmp/torchtune", str(tmp_path / "out"))
    if data is not None:
        text = text.replace("  packed: False", f"  source: json\n  data_files: {data}\n  packed: False", 1)
    path = tmp_path / name
    path.write_text(edit(text))
    return path


def _rows(tmp_path) -> Path:
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def test_llama3_1_qlora_single_device_loads_as_torchtune_runs_it(tmp_path, capsys):
    model = model_for("llama-3.1", tmp_path)
    config = load_config(_config(tmp_path, "llama3_1_8B_qlora_single_device.yaml", model, _rows(tmp_path)), {})
    assert (config.model, config.quant, config.double_quant) == (str(model), "nf4", True)
    assert (config.rank, config.alpha, config.dropout, config.dora) == (8, 16.0, 0.0, False)
    assert config.target_modules == "q_proj,v_proj,o_proj,gate_proj,down_proj,up_proj"
    assert (config.batch_size, config.grad_accum, config.epochs, config.max_steps) == (2, 8, 1.0, 0)
    assert (config.optim, config.lr, config.weight_decay) == ("adamw", 3e-4, 0.01)
    assert (config.lr_scheduler, config.warmup_steps, config.warmup_ratio) == ("cosine", 100, 0.0)
    assert (config.max_grad_norm, config.gradient_checkpointing, config.precision) == (0.0, True, "bf16")
    assert config.output == str(tmp_path / "out" / "llama3_1_8B" / "qlora_single_device")
    assert config.seq_len == json.loads((Path(model) / "config.json").read_text())["max_position_embeddings"]
    err = capsys.readouterr().err
    assert "torchtune recipe config" in err and "metric_logger" in err and "profiler" in err


def test_llama3_rows_train_the_tokens_torchtune_trains(tmp_path):
    """Oracle: torchtune's Llama3Tokenizer.tokenize_messages built piece by piece (header, stripped content,
    <|eot_id|>; BOS first; alpaca's train_on_input default: every token but BOS and the final EOS)."""
    from chat_families import family_tokenizer

    tok = family_tokenizer("llama-3.1", LLAMA3_SPLIT)
    model = model_for("llama-3.1", tmp_path)
    for train_on_input in (True, False):
        edit = (lambda t: t.replace("  packed: False", "  packed: False\n  train_on_input: False", 1)) if not \
            train_on_input else (lambda t: t)
        config = load_config(_config(tmp_path, "llama3_1_8B_qlora_single_device.yaml", model, _rows(tmp_path),
                                     edit), {})
        examples = read_sources(config.data, "train", None, 0, normalize)
        for row, example in zip(ROWS, examples):
            got = tokenize_example(example, tok, "", train_on=config.train_on)
            prompt = ("Below is an instruction that describes a task, paired with an input that provides further "
                      "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                      f"{row['instruction']}\n\n### Input:\n{row['input']}\n\n### Response:\n") if row["input"] else (
                "Below is an instruction that describes a task. Write a response that appropriately completes the "
                f"request.\n\n### Instruction:\n{row['instruction']}\n\n### Response:\n")
            ids, mask = [tok.bos_token_id], [False]
            for role, content, trained in (("user", prompt, train_on_input), ("assistant", row["output"], True)):
                piece = (tok.convert_tokens_to_ids(["<|start_header_id|>"]) + tok.encode(role, add_special_tokens=False)
                         + tok.convert_tokens_to_ids(["<|end_header_id|>"]) + tok.encode("\n\n", add_special_tokens=False)
                         + tok.encode(content.strip(), add_special_tokens=False)
                         + tok.convert_tokens_to_ids(["<|eot_id|>"]))
                ids, mask = ids + piece, mask + [trained] * len(piece)
            assert got.input_ids == ids
            assert got.labels == [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def test_llama3_1_qlora_config_trains(tmp_path):
    model = model_for("llama-3.1", tmp_path)
    path = _config(tmp_path, "llama3_1_8B_qlora_single_device.yaml", model, _rows(tmp_path),
                   lambda t: t.replace("max_steps_per_epoch: null", "max_steps_per_epoch: 2")
                   .replace("gradient_accumulation_steps: 8", "gradient_accumulation_steps: 1"))
    out = tmp_path / "run"
    assert main(["train", str(path), "--output", str(out), "--precision", "fp32",
                 "--no-progress"]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj",
                                                        "up_proj"])


def _enc(tok, text: str, plain: bool) -> list[int]:
    return tok(text, add_special_tokens=False, split_special_tokens=plain).input_ids if text else []


def _one(tok, name: str) -> list[int]:
    return tok.convert_tokens_to_ids([name])


def _alpaca_prompt(row) -> str:
    return ("Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n### Instruction:\n"
            f"{row['instruction']}\n\n### Input:\n{row['input']}\n\n### Response:\n") if row["input"] else (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        f"request.\n\n### Instruction:\n{row['instruction']}\n\n### Response:\n")


def _qwen(tok, row, limited: bool):
    """Qwen2Tokenizer.tokenize_messages: no BOS, <|im_start|>ROLE\n + content as given, <|im_end|>\n after all but a
    final assistant message, then the EOS <|im_end|> trained as that message; truncate() marks it untrained when
    max_seq_len is set (so it is left out: a last untrained token changes no loss)."""
    user = _one(tok, "<|im_start|>") + _enc(tok, "user\n", False) + _enc(tok, _alpaca_prompt(row), False) + \
        _one(tok, "<|im_end|>") + _enc(tok, "\n", False)
    answer = _one(tok, "<|im_start|>") + _enc(tok, "assistant\n", False) + _enc(tok, row["output"], False)
    answer += [] if limited else _one(tok, "<|im_end|>")
    return user + answer, [True] * len(user) + [True] * len(answer)  # alpaca_cleaned trains on input


def _sentencepiece(tok, row, bos: str, eos: str, inst: bool):
    """tokenize_messages_no_special_tokens: BOS, each text part encoded alone and right-stripped of spaces (Mistral's
    and Llama 2's [INST] template: "[INST] ", prompt, " [/INST] "; the answer then follows a part ending in a space,
    so it keeps its leading space; Gemma: no template, the answer continues the turn: encoded after "\n", whose ids
    are dropped), EOS after the answer; alpaca trains on input."""
    parts = ["[INST] ", _alpaca_prompt(row), " [/INST] "] if inst else [_alpaca_prompt(row)]
    ids = _one(tok, bos) + [t for p in parts for t in _enc(tok, p.rstrip(" "), True)]
    answer = row["output"].rstrip(" ")
    ids += _enc(tok, answer, True) if inst else _enc(tok, "\n" + answer, True)[len(_enc(tok, "\n", True)):]
    return ids + _one(tok, eos), [True] * (len(ids) + 1)


@pytest.mark.parametrize("name, family, oracle", [
    ("qwen2_5_0.5B_lora_single_device.yaml", "qwen2.5", lambda tok, row: _qwen(tok, row, False)),
    ("mistral_7B_qlora_single_device.yaml", "mistral-v0.3", lambda tok, row: _sentencepiece(tok, row, "<s>", "</s>",
                                                                                             True)),
    ("llama2_7B_qlora_single_device.yaml", "llama-2", lambda tok, row: _sentencepiece(tok, row, "<s>", "</s>", True)),
    ("gemma2_2B_qlora_single_device.yaml", "gemma-2", lambda tok, row: _sentencepiece(tok, row, "<bos>", "<eos>",
                                                                                       False)),
])
def test_shipped_configs_of_other_tokenizers_train_torchtunes_tokens(tmp_path, name, family, oracle):
    """Each family's shipped config trains as shipped, its rows the ids and labels torchtune's tokenizer gives."""
    from chat_families import family_tokenizer

    tok = family_tokenizer(family)
    model = model_for(family, tmp_path)
    config = load_config(_config(tmp_path, name, model, _rows(tmp_path)), {})
    assert config.template == "auto" and config.seq_len == json.loads((Path(model) / "config.json").read_text())[
        "max_position_embeddings"]
    examples = read_sources(config.data, "train", None, 0, normalize)
    for row, example in zip(ROWS, examples):
        got = tokenize_example(example, tok, "", train_on=config.train_on)
        ids, mask = oracle(tok, row)
        assert got.input_ids == ids
        assert got.labels == [IGNORE_INDEX] + [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]


def _truncate(ids: list[int], mask: list[bool], limit: int, eos: int, last_trained: bool):
    """torchtune's documented truncate(): the first max_seq_len tokens, the last one replaced by the EOS unless it
    is one; the mask likewise, its last flag the masked flag of the message tokenize_messages stopped at (the one
    the cut falls in, else the last)."""
    cut = len(ids) > limit
    ids, mask = ids[:limit], mask[:limit]
    ids[-1] = eos
    mask[-1] = mask[-1] if cut else last_trained
    return ids, mask


@pytest.mark.parametrize("name, family, bos, eos, inst", [
    ("mistral_7B_qlora_single_device.yaml", "mistral-v0.3", "<s>", "</s>", True),
    ("llama2_7B_qlora_single_device.yaml", "llama-2", "<s>", "</s>", True),
    ("gemma2_2B_qlora_single_device.yaml", "gemma-2", "<bos>", "<eos>", False),
])
@pytest.mark.parametrize("limit", [7, 2048])
def test_sentencepiece_max_seq_len_cuts_as_torchtune(tmp_path, name, family, bos, eos, inst, limit):
    """max_seq_len on the SentencePiece tokenizers: each row is cut to it, its last token made the EOS and trained
    as the message cut (alpaca trains the prompt too); a row that fits is unchanged (it ends with the EOS)."""
    from chat_families import family_tokenizer

    tok = family_tokenizer(family)
    model = model_for(family, tmp_path)
    config = load_config(_config(tmp_path, name, model, _rows(tmp_path), lambda t: re.sub(
        r"_tokenizer\n", f"_tokenizer\n  max_seq_len: {limit}\n", t.replace("  max_seq_len: null\n", ""), count=1)), {})
    assert config.seq_len == limit
    cuts = 0
    for row, example in zip(ROWS, read_sources(config.data, "train", None, 0, normalize)):
        got = tokenize_example(example, tok, "", train_on=config.train_on, seq_len=config.seq_len)
        whole, mask = _sentencepiece(tok, row, bos, eos, inst)
        ids, mask = _truncate(whole, mask, limit, _one(tok, eos)[0], True)
        cuts += len(whole) > limit
        assert got.input_ids == ids and got.labels == [IGNORE_INDEX] + ids[1:]
        assert got.input_ids[-1] == _one(tok, eos)[0]
        assert got.truncated == (len(whole) > limit)  # the data report counts the cut rows
    assert cuts == (len(ROWS) if limit < 100 else 0)


def test_sentencepiece_cut_keeps_the_cut_messages_mask(tmp_path):
    """A chat row cut inside its user turn ends with an untrained EOS; one ending with a user turn gets its last
    token replaced by the EOS though nothing is cut (torchtune's truncate runs whenever max_seq_len is set)."""
    from chat_families import family_tokenizer

    tok = family_tokenizer("llama-2")
    model = model_for("llama-2", tmp_path)
    turns = [("user", "Tell me a long story about a cat and a dog."), ("assistant", "Once upon a time."),
             ("user", "More.")]
    row = {"messages": [{"role": r, "content": c} for r, c in turns]}
    eos, bos = _one(tok, "</s>")[0], _one(tok, "<s>")[0]
    # Llama2ChatTemplate: "[INST] " + content + " [/INST] " around user turns; BOS before each turn, EOS after answers
    whole, mask = [], []
    for role, content in turns:
        parts = ["[INST] ", content, " [/INST] "] if role == "user" else [content]
        ids = ([bos] if role == "user" else []) + [t for p in parts for t in _enc(tok, p.rstrip(" "), True)] + (
            [eos] if role == "assistant" else [])
        whole, mask = whole + ids, mask + [role == "assistant"] * len(ids)
    for limit in (5, 200):
        path = _chat_config(tmp_path, model, [row], "chat_dataset\n  conversation_style: openai\n"
                            "  conversation_column: messages", "llama2.llama2_tokenizer")
        path.write_text(path.read_text().replace("  path: ", f"  max_seq_len: {limit}\n  path: ", 1))
        config = load_config(path, {})
        got = tokenize_example(read_sources(config.data, "train", None, 0, normalize)[0], tok, "",
                               train_on=config.train_on, seq_len=config.seq_len)
        ids, flags = _truncate(whole, mask, limit, eos, False)
        assert got.input_ids == ids and got.input_ids[-1] == eos
        assert got.labels == [IGNORE_INDEX] + [t if m else IGNORE_INDEX for t, m in zip(ids[1:], flags[1:])]
        assert len(ids) == min(limit, len(whole)) and (limit < len(whole)) == (limit == 5)


def test_qwen_max_seq_len_leaves_the_final_eos_untrained(tmp_path):
    from chat_families import family_tokenizer

    tok = family_tokenizer("qwen2.5")
    model = model_for("qwen2.5", tmp_path)
    config = load_config(_config(tmp_path, "qwen2_5_0.5B_lora_single_device.yaml", model, _rows(tmp_path),
                                 lambda t: t.replace("max_seq_len: null", "max_seq_len: 40")), {})
    assert config.seq_len == 39  # torchtune's last kept token: an untrained EOS
    example = read_sources(config.data, "train", None, 0, normalize)[1]
    assert tokenize_example(example, tok, "").input_ids == _qwen(tok, ROWS[1], True)[0]


def test_qwen2_5_with_a_template_trains_the_models_chat_template(tmp_path):
    model = model_for("qwen2.5", tmp_path)
    config = load_config(_config(tmp_path, "qwen2_5_0.5B_lora_single_device.yaml", model, _rows(tmp_path)),
                         {"template": "tokenizer"})
    assert (config.quant, config.rank, config.alpha, config.template) == ("none", 32, 64.0, "tokenizer")
    assert config.target_modules == "q_proj,v_proj,o_proj,gate_proj,down_proj,up_proj"
    examples = read_sources(config.data, "train", None, 0, normalize)
    assert [m["role"] for m in examples[0].messages] == ["user", "assistant"]
    assert examples[0].messages[0]["content"].startswith("Below is an instruction")


@pytest.mark.parametrize("name, edit, match", [
    ("phi3_mini_qlora_single_device.yaml", None, "fused qkv_proj"),
    ("llama3_1_8B_lora_dpo_single_device.yaml", None, "stack_exchange_paired_dataset"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("packed: False", "packed: True"), "packed: true"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("qlora_llama3_1_8b", "llama3_1_8b"),
     "full fine-tuning"),
    ("mistral_7B_qlora_single_device.yaml", lambda t: t.replace("max_seq_len: null", "max_seq_len: 64\n  "
                                                                "truncation_type: left"), "truncation_type 'left'"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("  packed: False", "  packed: False\n  source: "
                                                                 "json\n  data_files: x.json\n  split: train[:95%]",
                                                                 1), "split 'train\\[:95%\\]'.*hub dataset"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("${output_dir}", "${nowhere.dir}"),
     "nowhere.dir"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t + "teacher_model:\n  _component_: x\n",
     "knowledge distillation"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("LinearCrossEntropyLoss", "DPOLoss"), "DPOLoss"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("shuffle: True", "shuffle: False"), "shuffle"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("FullModelHFCheckpointer",
                                                                 "FullModelMetaCheckpointer"), "transformers"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("resume_from_checkpoint: False",
                                                                 "resume_from_checkpoint: True"), "resume"),
    # malformed values are said by line too (they were tracebacks: KeyError, ValueError, AttributeError)
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("  num_warmup_steps: 100\n", ""),
     "num_warmup_steps"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("lr: 3e-4", "lr: fast"), "lr 'fast'"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("weight_decay: 0.01", "weight_decay: 0.01\n  "
                                                                 "betas: [0.9]"), "betas"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("max_seq_len: null", "max_seq_len: long"),
     "max_seq_len 'long'"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("clip_grad_norm: null", "clip_grad_norm: some"),
     "clip_grad_norm 'some'"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: t.replace("  packed: False", "  packed: False\n  column_map: "
                                                                 "[output]", 1), "column_map"),
    ("llama3_1_8B_qlora_single_device.yaml", lambda t: "\n".join(line for line in t.split("\n")
                                                                 if not line.startswith("  checkpoint_dir:")),
     "checkpoint_dir"),  # it read as the working folder, '.'
])
def test_what_trains_otherwise_is_refused_by_line(tmp_path, name, edit, match):
    model = model_for("llama-3.1", tmp_path)
    path = _config(tmp_path, name, model, None, edit or (lambda t: t))
    with pytest.raises(UsageError, match=match) as info:
        load_config(path, {})
    assert f"{path} line " in str(info.value)


@pytest.mark.parametrize("edit, key, flag", [
    (lambda t: t.replace("  lr: 3e-4", "  lr: -1"), "optimizer:", "--lr"),
    (lambda t: t.replace("  num_warmup_steps: 100", "  num_warmup_steps: -5"), "lr_scheduler:", "--warmup-steps"),
    (lambda t: t.replace("  max_seq_len: null", "  max_seq_len: 1"), "tokenizer:", "--seq-len"),
    (lambda t: t.replace("gradient_accumulation_steps: 8", "gradient_accumulation_steps: 0"),
     "gradient_accumulation_steps:", "--grad-accum"),
])
def test_a_value_checked_after_reading_names_the_key_it_came_from(tmp_path, edit, key, flag):
    """A torchtune value that qlora's own checks refuse names the line of the key it was read from (not the
    model's)."""
    path = _config(tmp_path, "llama3_1_8B_qlora_single_device.yaml", model_for("llama-3.1", tmp_path),
                   _rows(tmp_path), edit)
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.startswith(key))
    with pytest.raises(UsageError, match=re.escape(flag)) as info:
        load_config(path, {})
    assert str(info.value).startswith(f"{path} line {line} ")


def test_defaults_where_the_file_is_silent(tmp_path):
    """The builders' lora_rank 8, alpha 16, dropout 0, no MLP; torch AdamW's lr 1e-3 and weight decay 0.01; no
    schedule: a constant rate; no clip_grad_norm: none; max_seq_len: one less (torchtune's last kept token is an
    untrained EOS)."""
    model = model_for("llama-3.1", tmp_path)
    path = tmp_path / "short.yaml"
    path.write_text(f"""output_dir: {tmp_path}/o
model:
  _component_: torchtune.models.llama3_2.lora_llama3_2_1b
  lora_attn_modules: [q_proj, k_proj]
tokenizer:
  _component_: torchtune.models.llama3.llama3_tokenizer
  path: {model}/original/tokenizer.model
  max_seq_len: 64
checkpointer:
  _component_: torchtune.training.FullModelHFCheckpointer
  checkpoint_dir: {model}
  output_dir: ${{output_dir}}
dataset:
  _component_: torchtune.datasets.instruct_dataset
  source: json
  data_files: {_rows(tmp_path)}
  column_map: {{input: instruction}}
optimizer:
  _component_: torch.optim.AdamW
loss:
  _component_: torchtune.modules.loss.CEWithChunkedOutputLoss
batch_size: 1
epochs: 1
""")
    config = load_config(path, {})
    assert (config.rank, config.alpha, config.dropout, config.quant) == (8, 16.0, 0.0, "none")
    assert config.target_modules == "q_proj,k_proj"
    assert (config.lr, config.weight_decay, config.lr_scheduler, config.warmup_steps, config.warmup_ratio) == (
        1e-3, 0.01, "constant", 0, 0.0)
    assert (config.max_grad_norm, config.seq_len, config.output) == (0.0, 63, f"{tmp_path}/o")
    examples = read_sources(config.data, "train", None, 0, normalize)
    assert "".join(p.text for p in examples[0].pieces).startswith(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nAdd 0 and 0.<|eot_id|>")


def _chat_config(tmp_path, model, rows, dataset: str, tokenizer: str = "llama3.llama3_tokenizer") -> Path:
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = tmp_path / "chat.yaml"
    path.write_text(f"""output_dir: {tmp_path}/o
model:
  _component_: torchtune.models.llama3_2.lora_llama3_2_1b
  lora_attn_modules: [q_proj, v_proj]
tokenizer:
  _component_: torchtune.models.{tokenizer}
  path: {model}/original/tokenizer.model
checkpointer:
  _component_: torchtune.training.FullModelHFCheckpointer
  checkpoint_dir: {model}
dataset:
  _component_: torchtune.datasets.{dataset}
  source: json
  data_files: {data}
optimizer:
  _component_: torch.optim.AdamW
loss:
  _component_: torchtune.modules.loss.CEWithChunkedOutputLoss
batch_size: 1
epochs: 1
seed: 7
""")
    return path


def _llama3_turn(tok, role: str, content: str) -> list[int]:
    return (_one(tok, "<|start_header_id|>") + _enc(tok, role, True) + _one(tok, "<|end_header_id|>")
            + _enc(tok, "\n\n", True) + _enc(tok, content.strip(), True) + _one(tok, "<|eot_id|>"))


TURNS = [("system", "Be brief. "), ("user", " Hi there\n"), ("assistant", "Hello! "), ("user", "Add 2 and 2."),
         ("assistant", " 4\n")]


@pytest.mark.parametrize("dataset, row", [
    ("chat_dataset\n  conversation_style: openai\n  conversation_column: messages",
     {"messages": [{"role": r, "content": c} for r, c in TURNS]}),
    ("chat_dataset\n  conversation_style: sharegpt",
     {"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(r, r), "value": c} for r, c in TURNS]}),
])
def test_chat_datasets_train_every_assistant_turn_as_torchtune(tmp_path, dataset, row):
    """Oracle: Llama3Tokenizer over the conversation, the user and system turns masked, each assistant turn (its
    header and <|eot_id|> too) trained, several of them in one row."""
    from chat_families import family_tokenizer

    tok = family_tokenizer("llama-3.1", LLAMA3_SPLIT)
    model = model_for("llama-3.1", tmp_path)
    config = load_config(_chat_config(tmp_path, model, [row], dataset), {})
    example = read_sources(config.data, "train", None, 0, normalize)[0]
    got = tokenize_example(example, tok, "", train_on=config.train_on)
    ids, labels = [tok.bos_token_id], [IGNORE_INDEX]
    for role, content in TURNS:
        turn = _llama3_turn(tok, role, content)
        ids += turn
        labels += turn if role == "assistant" else [IGNORE_INDEX] * len(turn)
    assert (got.input_ids, got.labels) == (ids, labels)


def test_base_llama3_checkpoint_leaves_the_end_of_text_untrained(tmp_path):
    """A base checkpoint's EOS is <|end_of_text|>: torchtune appends it untrained; qlora adds no trained EOS."""
    from chat_families import family_tokenizer

    tok = family_tokenizer("llama-3.1", LLAMA3_SPLIT)
    tok.eos_token = "<|end_of_text|>"
    model = model_for("llama-3.1", tmp_path)
    rows = [{"input": "Hi", "output": "Hello"}]
    config = load_config(_chat_config(tmp_path, model, rows, "instruct_dataset"), {})
    got = tokenize_example(read_sources(config.data, "train", None, 0, normalize)[0], tok, "")
    assert got.input_ids == [tok.bos_token_id] + _llama3_turn(tok, "user", "Hi") + _llama3_turn(tok, "assistant",
                                                                                                "Hello")
    assert got.labels[-1] == _one(tok, "<|eot_id|>")[0]


@pytest.mark.parametrize("family, tokenizer, bos, eos", [
    ("llama-3.1", "llama3.llama3_tokenizer", "<|begin_of_text|>", "<|end_of_text|>"),
    ("qwen2.5", "qwen2_5.qwen2_5_tokenizer", None, "<|im_end|>"),
])
def test_text_completion_is_the_tokenizers_encode(tmp_path, family, tokenizer, bos, eos):
    """TextCompletionDataset: encode(text, add_bos=True, add_eos=True), every token a label."""
    from chat_families import family_tokenizer

    tok = family_tokenizer(family)
    model = model_for(family, tmp_path)
    config = load_config(_chat_config(tmp_path, model, [{"text": "The capital of France is Paris.\n\n"}],
                                      "text_completion_dataset", tokenizer), {})
    got = tokenize_example(read_sources(config.data, "train", None, 0, normalize)[0], tok, "")
    ids = (_one(tok, bos) if bos else []) + _enc(tok, "The capital of France is Paris.\n\n", True) + _one(tok, eos)
    assert got.input_ids == ids and got.labels == [IGNORE_INDEX] + ids[1:]


def test_mistral_template_refuses_a_system_prompt(tmp_path):
    model = model_for("mistral-v0.3", tmp_path)
    path = _config(tmp_path, "mistral_7B_qlora_single_device.yaml", model, _rows(tmp_path),
                   lambda t: t.replace("  packed: False", "  packed: False\n  new_system_prompt: Be brief.", 1))
    with pytest.raises(UsageError, match="MistralChatTemplate"):
        read_sources(load_config(path, {}).data, "train", None, 0, normalize)


def test_seed_null_is_said(tmp_path, capsys):
    model = model_for("llama-3.1", tmp_path)
    load_config(_config(tmp_path, "llama3_1_8B_qlora_single_device.yaml", model, _rows(tmp_path)), {})
    assert "seed: null draws a random seed in torchtune, qlora takes its default --seed 42" in capsys.readouterr().err


def test_max_steps_per_epoch_stops_at_the_epochs_end(tmp_path):
    """8 rows, batch 2: 4 steps an epoch; max_steps_per_epoch 100 stops there (torchtune's epoch ends), 3 cuts each
    of 2 epochs to 3 steps."""
    from qlora.train.trainer import total_steps

    model = model_for("llama-3.1", tmp_path)
    for epochs, cap, steps in ((1, 100, 4), (2, 3, 6)):
        config = load_config(_config(tmp_path, "llama3_1_8B_qlora_single_device.yaml", model, _rows(tmp_path),
                                     lambda t: t.replace("max_steps_per_epoch: null", f"max_steps_per_epoch: {cap}")
                                     .replace("epochs: 1", f"epochs: {epochs}")
                                     .replace("gradient_accumulation_steps: 8", "gradient_accumulation_steps: 1")), {})
        assert (config.max_steps, config.max_steps_per_epoch, config.epochs) == (0, cap, epochs)
        assert total_steps(8, config.batch_size * config.grad_accum, config.epochs, config.max_steps,
                           config.max_steps_per_epoch) == steps
