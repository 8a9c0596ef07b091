"""torchtune's LoRA DPO recipe configs (tests/data/torchtune, origins in its SOURCES.md) load as lora_dpo runs
them: its pairs are the ids and labels torchtune's PreferenceDataset computes, and the loss at the first step is
torchtune's DPOLoss over them, the reference the base model (its adapter off)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from chat_families import family_tokenizer, model_for
from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.train.config import load_config
from qlora.train.trainer import Trainer

DATA = Path(__file__).parent / "data" / "torchtune"
PAIRS = [{"question": "What is two plus two?", "response_j": " Four.", "response_k": "Five, I think.\n"},
         {"question": "Say hello.", "response_j": "Hello there!", "response_k": "no"},
         {"question": "Name a colour of the sky.", "response_j": "Blue.", "response_k": "A dog named Rex."},
         {"question": "Count to three.", "response_j": "1 2 3", "response_k": "3 2 1 go"}]


def _config(tmp_path, name: str, model, edit=lambda text: text) -> Path:
    """The shipped file, its /tmp model folder and output_dir made local, its hub dataset a local JSON file."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    text = (DATA / name).read_text()
    folder = next(line.split(":", 1)[1].strip() for line in text.splitlines() if "checkpoint_dir:" in line
                  and not line.lstrip().startswith("#"))
    text = text.replace(folder.rstrip("/"), str(model)).replace("/tmp/torchtune", str(tmp_path / "out"))
    text = text.replace("stack_exchange_paired_dataset\n", f"stack_exchange_paired_dataset\n  source: json\n"
                        f"  data_files: {data}\n", 1)
    path = tmp_path / name
    path.write_text(edit(text))
    return path


SHIPPED = [("llama3_1_8B_lora_dpo_single_device.yaml", "llama-3.1", 1023),
           ("llama3_1_8B_lora_dpo.yaml", "llama-3.1", 1023),
           ("llama2_7B_lora_dpo_single_device.yaml", "llama-2", 1024),
           ("llama2_7B_lora_dpo.yaml", "llama-2", 1024)]


@pytest.mark.parametrize("name, family, seq_len", SHIPPED)
def test_shipped_dpo_configs_load_as_lora_dpo(tmp_path, name, family, seq_len, capsys):
    config = load_config(_config(tmp_path, name, model_for(family, tmp_path)), {})
    assert (config.method, config.loss_type, config.beta, config.label_smoothing) == ("dpo", "sigmoid", 0.1, 0.0)
    assert (config.rank, config.alpha, config.quant) == (8, 16.0, "none")
    assert config.target_modules == "q_proj,v_proj,o_proj,gate_proj,down_proj,up_proj"
    assert (config.optim, config.lr, config.weight_decay, config.lr_scheduler, config.warmup_steps) == (
        "adamw", 5e-4, 0.05, "cosine", 100)
    assert (config.batch_size, config.grad_accum, config.epochs, config.max_steps_per_epoch) == (4, 8, 1.0, 1000)
    assert config.seq_len == seq_len  # Llama 3: its last kept token is an untrained EOS
    assert "read as lora_dpo reads it" in capsys.readouterr().err


def _one(tok, name: str) -> list[int]:
    return tok.convert_tokens_to_ids([name])


def _enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False, split_special_tokens=True).input_ids if text else []


def _llama3(tok, question: str, answer: str, train_on_input: bool):
    """Llama3Tokenizer.tokenize_messages: BOS, each turn header + stripped content + <|eot_id|> (the user turn
    masked unless train_on_input), a final untrained <|end_of_text|>."""
    ids, mask = _one(tok, "<|begin_of_text|>"), [False]
    for role, content, trained in (("user", question, train_on_input), ("assistant", answer, True)):
        turn = (_one(tok, "<|start_header_id|>") + _enc(tok, role) + _one(tok, "<|end_header_id|>") + _enc(tok, "\n\n")
                + _enc(tok, content.strip()) + _one(tok, "<|eot_id|>"))
        ids, mask = ids + turn, mask + [trained] * len(turn)
    return ids + _one(tok, "<|end_of_text|>"), mask + [False]


def _llama2(tok, question: str, answer: str, train_on_input: bool, limit: int):
    """tokenize_messages_no_special_tokens under Llama2ChatTemplate, then truncate() to max_seq_len: the last kept
    token made </s>, trained as the message the cut falls in."""
    user = _one(tok, "<s>") + [t for p in ("[INST] ", question, " [/INST] ") for t in _enc(tok, p.rstrip(" "))]
    reply = _enc(tok, answer.rstrip(" ")) + _one(tok, "</s>")
    ids, mask = user + reply, [train_on_input] * len(user) + [True] * len(reply)
    cut = len(ids) > limit
    ids, mask = ids[:limit], mask[:limit]
    ids[-1] = _one(tok, "</s>")[0]
    mask[-1] = mask[-1] if cut else True
    return ids, mask


def _trainer(tmp_path, name, family, edit):
    config = load_config(_config(tmp_path, name, model_for(family, tmp_path), edit),
                         {"precision": "fp32", "progress": False})
    trainer = Trainer(config)
    trainer.setup()
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero B so the policy differs from its reference
        for n, p in trainer.model.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.05)
    return trainer


def _logps(model, ids: list[int], mask: list[bool]) -> torch.Tensor:
    """rlhf.get_batch_log_probs for one row: the sum of log p(token) over the labelled (unmasked) tokens."""
    logits = model(torch.tensor([ids])).logits[0, :-1].float()
    labels = torch.tensor(ids[1:])
    keep = torch.tensor(mask[1:])
    return (logits.log_softmax(-1).gather(-1, labels[:, None])[:, 0] * keep).sum()


@pytest.mark.parametrize("name, family, train_on_input, limit", [
    ("llama3_1_8B_lora_dpo_single_device.yaml", "llama-3.1", False, None),
    ("llama3_1_8B_lora_dpo_single_device.yaml", "llama-3.1", True, 38),
    ("llama2_7B_lora_dpo_single_device.yaml", "llama-2", False, 1024),
    ("llama2_7B_lora_dpo_single_device.yaml", "llama-2", True, 38),
])
def test_step_zero_loss_is_torchtunes_dpo_loss(tmp_path, name, family, train_on_input, limit):
    """Oracle: each conversation tokenized as torchtune's tokenizer does (written out above), its labels the
    unmasked tokens, log-probs summed over them by the policy and by the base model (transformers, no adapter),
    and DPOLoss (beta 0.3, label smoothing 0.1) averaged over the pairs; train_on_input's prompt labels and a
    max_seq_len cut included."""
    from transformers import AutoModelForCausalLM

    def edit(text):
        text = text.replace("_component_: torchtune.rlhf.loss.DPOLoss", "_component_: torchtune.rlhf.loss.DPOLoss\n"
                            "  beta: 0.3\n  label_smoothing: 0.1").replace("  beta: 0.1\n  label_smoothing: 0\n", "")
        text = text.replace("batch_size: 4", f"batch_size: {len(PAIRS)}")
        text = text.replace("max_seq_len: 1024", f"max_seq_len: {limit}" if limit else "max_seq_len: null")
        return text.replace("  data_files:", f"  train_on_input: {train_on_input}\n  data_files:", 1)

    trainer = _trainer(tmp_path, name, family, edit)
    tok = family_tokenizer(family)
    assert trainer.tokenizer.get_vocab() == tok.get_vocab()
    base = AutoModelForCausalLM.from_pretrained(trainer.config.model, dtype=torch.float32).eval()
    trainer.model.eval()
    margins = []
    with torch.no_grad():
        for row in PAIRS:
            pair = []
            for answer in (row["response_j"], row["response_k"]):
                ids, mask = (_llama3(tok, row["question"], answer, train_on_input) if family == "llama-3.1" else
                             _llama2(tok, row["question"], answer, train_on_input, limit))
                if family == "llama-3.1" and limit is not None and len(ids) > limit:
                    ids, mask = ids[:limit - 1] + _one(tok, "<|end_of_text|>"), mask[:limit - 1] + [False]
                pair.append((_logps(trainer.model, ids, mask), _logps(base, ids, mask)))
            (pc, rc), (pr, rr) = pair
            margins.append((pc - pr) - (rc - rr))
    logits = 0.3 * torch.stack(margins)
    expected = (-F.logsigmoid(logits) * 0.9 - F.logsigmoid(-logits) * 0.1).mean()
    batch = trainer._collate(trainer.train_units)
    loss, _ = trainer._micro_loss(batch, trainer._step_normalizer([batch]))
    assert len(trainer.train_units) == len(PAIRS)
    assert abs(float(expected) - 0.6931) > 1e-3  # the adapter moves the policy off its reference
    torch.testing.assert_close(loss.detach().double(), expected.double(), rtol=1e-5, atol=1e-6)


def test_rso_loss_is_the_hinge_loss(tmp_path):
    path = _config(tmp_path, "llama2_7B_lora_dpo.yaml", model_for("llama-2", tmp_path),
                   lambda t: t.replace("DPOLoss\n  beta: 0.1\n  label_smoothing: 0", "RSOLoss\n  gamma: 0.2"))
    config = load_config(path, {})
    assert (config.method, config.loss_type, config.beta, config.label_smoothing) == ("dpo", "hinge", 0.2, 0.0)


@pytest.mark.parametrize("name", ["llama3_1_8B_lora_dpo_single_device.yaml", "llama2_7B_lora_dpo_single_device.yaml"])
def test_shipped_dpo_config_trains_from_the_cli(tmp_path, name):
    family = "llama-3.1" if name.startswith("llama3") else "llama-2"
    path = _config(tmp_path, name, model_for(family, tmp_path),
                   lambda t: t.replace("max_steps_per_epoch: 1000", "max_steps_per_epoch: 2")
                   .replace("gradient_accumulation_steps: 8", "gradient_accumulation_steps: 1")
                   .replace("batch_size: 4", "batch_size: 2"))
    out = tmp_path / "run"
    assert main(["train", str(path), "--output", str(out), "--precision", "fp32", "--no-progress"]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/margins" in s for s in steps)


def test_preference_dataset_reads_chosen_and_rejected_conversations(tmp_path):
    """preference_dataset with a column_map over openai conversations, a system prompt replaced; a multi-turn
    pair whose answers differ before a later user turn keeps that user turn out of the labels (torchtune's mask)."""
    model = model_for("llama-3.1", tmp_path)
    tok = family_tokenizer("llama-3.1")
    conv = lambda *turns: [{"role": r, "content": c} for r, c in turns]  # noqa: E731
    rows = [{"good": conv(("system", "old"), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"),
                          ("assistant", "Bye!")),
             "bad": conv(("system", "old"), ("user", "Hi"), ("assistant", "Go away"), ("user", "Bye"),
                         ("assistant", "Whatever"))}]
    data = tmp_path / "conv.json"
    data.write_text(json.dumps(rows))
    path = _config(tmp_path, "llama3_1_8B_lora_dpo_single_device.yaml", model, lambda t: t.replace(
        f"stack_exchange_paired_dataset\n  source: json\n  data_files: {tmp_path / 'pairs.jsonl'}\n",
        f"preference_dataset\n  source: json\n  data_files: {data}\n  column_map: {{chosen: good, rejected: bad}}\n"
        "  new_system_prompt: Be kind.\n").replace("batch_size: 4", "batch_size: 1"))
    trainer = Trainer(load_config(path, {"precision": "fp32"}))
    trainer.setup()
    pair = trainer.train_units[0]
    turn = lambda role, text: (_one(tok, "<|start_header_id|>") + _enc(tok, role)  # noqa: E731
                               + _one(tok, "<|end_header_id|>") + _enc(tok, "\n\n") + _enc(tok, text)
                               + _one(tok, "<|eot_id|>"))
    shared = _one(tok, "<|begin_of_text|>") + turn("system", "Be kind.") + turn("user", "Hi") + \
        _one(tok, "<|start_header_id|>") + _enc(tok, "assistant") + _one(tok, "<|end_header_id|>") + _enc(tok, "\n\n")
    assert pair.prompt_ids == shared
    answer = _enc(tok, "Hello!") + _one(tok, "<|eot_id|>")
    assert pair.chosen_ids == answer + turn("user", "Bye") + turn("assistant", "Bye!")
    batch = trainer._collate([pair])
    labels = batch["labels"][0, len(shared):len(shared) + len(pair.chosen_ids)].tolist()
    user = len(turn("user", "Bye"))
    assert labels == answer + [-100] * user + turn("assistant", "Bye!")


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.replace("DPOLoss", "SimPOLoss"), "SimPOLoss"),
    (lambda t: t.replace("torchtune.rlhf.loss.DPOLoss", "torchtune.modules.loss.CEWithChunkedOutputLoss"),
     "preference dataset"),
    (lambda t: t.replace("  label_smoothing: 0\n", "  label_smoothing: 0\n  reduction: sum\n"), "reduction"),
    (lambda t: t.replace("  source: json\n", "  source: lvwerra/stack-exchange-paired\n", 1), "data_dir"),
    (lambda t: t.replace("  max_seq_len: 1024", "  max_seq_len: 1024\n  truncation_type: left"), "truncation_type"),
    (lambda t: t + "ref_checkpointer:\n  _component_: x\n", "full-weight DPO"),
])
def test_what_lora_dpo_would_train_otherwise_is_refused_by_line(tmp_path, edit, match):
    path = _config(tmp_path, "llama2_7B_lora_dpo.yaml", model_for("llama-2", tmp_path), edit)
    with pytest.raises(UsageError, match=match) as info:
        load_config(path, {})
    assert f"{path} line " in str(info.value)


def test_kto_over_torchtunes_written_pairs_is_refused_by_row(tmp_path):
    """--method kto reads each answer apart from its prompt; torchtune's pairs are whole conversations written by
    its tokenizer (no prompt of their own), so KTO is refused naming the row (it crashed on them), and trains them
    once --template writes them as chat messages."""
    path = _config(tmp_path, "llama2_7B_lora_dpo_single_device.yaml", model_for("llama-2", tmp_path),
                   lambda t: t.replace("batch_size: 4", "batch_size: 2"))
    options = {"precision": "fp32", "method": "kto", "loss_type": "", "beta": 0.1}
    trainer = Trainer(load_config(path, options))
    with pytest.raises(UsageError, match=r"pairs\.jsonl line 1 .*--method kto.*--template") as info:
        trainer.setup()
    assert "--method dpo" in str(info.value)
    trainer = Trainer(load_config(path, options | {"template": "tokenizer"}))
    trainer.setup()
    assert len(trainer.train_units) == 2 * len(PAIRS)
