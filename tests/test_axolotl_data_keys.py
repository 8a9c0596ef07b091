"""axolotl keys that change the data or the run (its utils/data, prompt_strategies/chat_template.py and schemas):
``dataset_exact_deduplication``, ``drop_system_message``, ``eot_tokens`` with ``train_on_eot``,
``curriculum_sampling``, ``sample_packing_sequentially``, ``bfloat16``, ``float16`` and a silent
``quantize_moe_experts``; each does what axolotl does, or is refused at its line."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest

from chat_families import family_tokenizer
from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.model.tiny import build_tiny_model
from qlora.train.config import load_config
from qlora.train.data import IGNORE_INDEX, normalize
from qlora.train.data.selection import read_sources
from qlora.train.trainer import Trainer
from test_axolotl_config import _write, _yaml

_HEAD = "base_model: m\noutput_dir: o\nadapter: lora\n"


def _trainer(model, data, tmp_path, **kw) -> Trainer:
    options = dict(model=str(model), data=str(data), output=str(tmp_path / "out"), seq_len=64, progress=False,
                   optim="adamw") | kw
    trainer = Trainer(load_config(None, options))
    trainer.setup()
    return trainer


def test_drop_system_message_leaves_out_a_leading_system_turn_only(tmp_path, monkeypatch):
    """axolotl drops turns[0] when its role (after the roles mapping) is system; later system turns stay."""
    monkeypatch.chdir(tmp_path)
    system = {"from": "system", "value": "Be brief."}
    rows = [{"conversations": [system, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
            {"conversations": [{"from": "human", "value": "Hi"}, system, {"from": "gpt", "value": "Hello."}]}]
    _write(tmp_path / "d.jsonl", rows)
    entry = {"path": "d.jsonl", "type": "chat_template", "field_messages": "conversations",
             "message_property_mappings": {"role": "from", "content": "value"}}

    def messages(**options):
        return [e.messages for e in read_sources(json.dumps([entry | options]), "train", None, 0, normalize)]

    kept = messages()
    assert [m["role"] for m in kept[0]] == ["system", "user", "assistant"]
    assert messages(drop_system_message=True) == [kept[0][1:], kept[1]]
    assert messages(drop_system_message=False) == kept
    # the same entry from an axolotl config file
    cfg = load_config(_yaml(tmp_path, _HEAD + "datasets:\n  - path: d.jsonl\n    type: chat_template\n"
                                              "    drop_system_message: true\n    train_on_eot: turn\n"), {})
    assert json.loads(cfg.data)[0]["drop_system_message"] is True


@pytest.mark.parametrize("option, line, says", [
    ("train_on_eot: all", 4, "train_on_eot 'all': qlora trains the end of every trained turn"),
    ("train_on_eot: last", 4, "train_on_eot 'last'"),
    ("train_on_eos: none", 4, "train_on_eos 'none'"),
    ("drop_system_message: maybe", 4, "drop_system_message expects true or false"),
])
def test_end_of_turn_training_qlora_lacks_is_refused_by_line(tmp_path, capsys, option, line, says):
    path = _yaml(tmp_path, _HEAD + f"datasets:\n  - path: d.jsonl\n    type: chat_template\n    {option}\n")
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{path} line {line}, datasets item 1: " in err and says in err and "Traceback" not in err, err


def _eot_model(tmp_path):
    """A tiny model whose template ends each turn with ``<|endofprompt|>``, a special token that is neither its
    EOS nor a known end-of-turn marker (phi-4's template, its ``<|im_end|>`` replaced)."""
    tok = family_tokenizer("phi-4")
    out = build_tiny_model(tmp_path / "model", tokenizer=tok, arch="llama")
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out)
    saved.chat_template = tok.chat_template.replace("<|im_end|>", "<|endofprompt|>")
    saved.save_pretrained(out)
    return out, saved


def test_eot_tokens_are_trained_after_each_assistant_turn_as_axolotl_trains_them(tmp_path):
    """axolotl (train_on_eot: turn, its default) labels the first eot token after each trained turn and no other;
    the ids are the template's own (no EOS added after a turn that ends with one)."""
    model, tok = _eot_model(tmp_path)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                    {"role": "assistant", "content": "Bye now."}]
    data = _write(tmp_path / "chat.jsonl", [{"messages": conversation}] * 2)
    eot, start = tok.convert_tokens_to_ids("<|endofprompt|>"), tok.convert_tokens_to_ids("<|im_start|>")

    def assistant_eots(ids):  # the eot closing a turn whose header names the assistant
        out = []
        for i, t in enumerate(ids):
            if t == eot:
                header = max(k for k in range(i) if ids[k] == start)
                if tok.decode(ids[header + 1:i]).startswith("assistant"):
                    out.append(i)
        return out

    unit = _trainer(model, data, tmp_path, eot_tokens="<|endofprompt|>").train_units[0]
    rendered = tok.apply_chat_template(conversation, tokenize=True, return_dict=False)
    assert unit.input_ids == list(rendered)
    trained_eots = [i for i, t in enumerate(unit.input_ids) if t == eot and unit.labels[i] != IGNORE_INDEX]
    assert trained_eots == assistant_eots(unit.input_ids) and len(trained_eots) == 2
    # without it the marker is plain markup to qlora: not trained, and the last turn gets an EOS
    plain = _trainer(model, data, tmp_path, eot_tokens="", overwrite=True).train_units[0]
    assert not any(t == eot and plain.labels[i] != IGNORE_INDEX for i, t in enumerate(plain.input_ids))
    assert plain.input_ids[-1] == tok.eos_token_id and plain.labels[-1] == tok.eos_token_id

    with pytest.raises(UsageError, match=r"--eot-tokens 'end of turn' is \d+ tokens"):
        _trainer(model, data, tmp_path, eot_tokens="end of turn", overwrite=True)


def test_eot_tokens_load_from_an_axolotl_list(tmp_path):
    cfg = load_config(_yaml(tmp_path, _HEAD + "datasets: [d.jsonl]\neot_tokens:\n  - <end_of_turn>\n"
                                              "  - \"<|im_end|>\"\n"), {})
    assert cfg.eot_tokens == "<end_of_turn>,<|im_end|>"


_ROWS = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(6)]


def _axolotl_dedup(units, seen=None):
    """axolotl's utils/data/utils.py _deduplicate_dataset: sha256 of str(row) of the prepared rows, the first
    kept, rows of another split checked against the hashes of the first."""
    seen = set() if seen is None else seen
    kept = []
    for unit in units:
        row = {"input_ids": unit.input_ids, "attention_mask": [1] * len(unit.input_ids), "labels": unit.labels}
        digest = hashlib.sha256(str(row).encode("utf-8")).hexdigest()
        if digest not in seen:
            seen.add(digest)
            kept.append((unit.input_ids, unit.labels))
    return kept, seen


def test_dedupe_keeps_the_rows_axolotl_keeps(tiny_model_dir, tmp_path):
    # duplicates of rows 0 and 2, and a row with the characters of row 1 but another prompt (other labels: kept)
    rows = _ROWS + [_ROWS[0], _ROWS[2], _ROWS[0], {"prompt": "Question 1", "completion": "?Answer 1."}]
    data = _write(tmp_path / "d.jsonl", rows)
    every = _trainer(tiny_model_dir, data, tmp_path).train_units
    deduped = _trainer(tiny_model_dir, data, tmp_path, dedupe=True, overwrite=True)
    expected, _ = _axolotl_dedup(every)
    assert [(u.input_ids, u.labels) for u in deduped.train_units] == expected and len(expected) == 7
    assert deduped.duplicates == 3

    # --eval-data (axolotl's test_datasets) is deduplicated on its own; a held-out share never repeats training
    eval_data = _write(tmp_path / "e.jsonl", [_ROWS[0], _ROWS[0], _ROWS[5]])
    trainer = _trainer(tiny_model_dir, data, tmp_path, dedupe=True, overwrite=True, eval_data=str(eval_data))
    assert len(trainer.eval_units) == 2
    split = _trainer(tiny_model_dir, data, tmp_path, dedupe=True, overwrite=True, eval_split=0.3)
    train = {(tuple(u.input_ids), tuple(u.labels)) for u in split.train_units}
    held = [(tuple(u.input_ids), tuple(u.labels)) for u in split.eval_units]
    assert not train & set(held) and len(held) == len(set(held)) and len(train) + len(held) == 7


_PAIRS = [{"prompt": f"Pick {i}.", "chosen": f"Yes {i}.", "rejected": f"No {i}."} for i in range(4)]


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_dedupe_of_preference_rows_keeps_the_rows_axolotl_keeps(tiny_model_dir, tmp_path, method):
    """axolotl's rl.py: the rows its strategy built hashed as text (sha256 of str(row)), the first kept, and the
    eval rows checked against the training rows; a row equal in prompt and chosen but not rejected is kept."""
    rows = _PAIRS + [_PAIRS[1], _PAIRS[3] | {"rejected": "No."}, _PAIRS[1]]
    if method == "kto":  # KTO's rows: prompt, completion, label
        rows = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in rows
                for k in ("chosen", "rejected")]
    seen: set[str] = set()
    expected = [i for i, r in enumerate(rows) if (h := hashlib.sha256(str(r).encode()).hexdigest()) not in seen
                and not seen.add(h)]
    data = _write(tmp_path / "p.jsonl", rows)
    eval_data = _write(tmp_path / "e.jsonl", [rows[0], rows[-1] | {"prompt": "Other."}, rows[0]])
    trainer = _trainer(tiny_model_dir, data, tmp_path, method=method, dedupe=True, eval_data=str(eval_data),
                       lr=1e-5, batch_size=2)
    assert sorted(u.index for u in trainer.train_units) == expected and len(expected) < len(rows)
    assert [u.index for u in trainer.eval_units] == [1]  # row 0 is a training row; its repeat too


def test_dedupe_from_an_axolotl_file_and_its_refusal_with_text_blocks(tmp_path, capsys):
    cfg = load_config(_yaml(tmp_path, _HEAD + "datasets: [d.jsonl]\ndataset_exact_deduplication: true\n"), {})
    assert cfg.dedupe is True
    with pytest.raises(UsageError, match="--dedupe compares tokenized examples; --group-texts"):
        load_config(None, {"model": "m", "data": "d.jsonl", "output": "o", "dedupe": True, "group_texts": 4})


def test_curriculum_sampling_trains_in_the_datas_order(tiny_model_dir, tmp_path):
    """axolotl's curriculum_sampling: a sequential sampler, and packing (sample_packing_sequentially) next-fit in
    that order."""
    cfg = load_config(_yaml(tmp_path, _HEAD + "datasets: [d.jsonl]\ncurriculum_sampling: true\nsample_packing: "
                                              "true\nsample_packing_sequentially: true\n"), {})
    assert (cfg.shuffle, cfg.packing) == (False, True)
    assert load_config(_yaml(tmp_path, _HEAD + "datasets: [d.jsonl]\ncurriculum_sampling: false\n"), {}).shuffle
    data = _write(tmp_path / "d.jsonl", _ROWS)
    trainer = _trainer(tiny_model_dir, data, tmp_path, shuffle=False, batch_size=2)
    assert [trainer.step_units(s) for s in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert [trainer.step_units(s) for s in range(3, 6)] == [[0, 1], [2, 3], [4, 5]]  # every epoch alike
    shuffled = _trainer(tiny_model_dir, data, tmp_path, batch_size=2, overwrite=True)
    assert sum((shuffled.step_units(s) for s in range(3)), []) != list(range(6))
    packed = _trainer(tiny_model_dir, data, tmp_path, shuffle=False, packing=True, seq_len=24, overwrite=True)
    assert [i for row in packed.train_units for i in row.indices] == list(range(6))
    assert len(packed.train_units) > 1


def test_sample_packing_sequentially_is_qlora_packing_and_a_bad_value_is_refused(tmp_path, capsys):
    load_config(_yaml(tmp_path, _HEAD + "datasets: [d.jsonl]\nsample_packing: true\n"
                                        "sample_packing_sequentially: true\neval_sample_packing: false\n"), {})
    assert "passing over sample_packing_sequentially, eval_sample_packing" in capsys.readouterr().err
    path = _yaml(tmp_path, _HEAD + "datasets: [d.jsonl]\nsample_packing_sequentially: always\n")
    assert main(["train", str(path), "--no-progress"]) == 2
    assert f"{path} line 5: sample_packing_sequentially expects true or false" in capsys.readouterr().err


@pytest.mark.parametrize("keys, precision", [
    ("bfloat16: true\nbf16: true\n", "bf16"),  # axolotl's examples/phi/lora-3.5.yaml
    ("bfloat16: true\n", "bf16"),
    ("bfloat16: true\nbf16: false\n", "bf16"),  # cfg.bf16 or cfg.bfloat16
    ("bfloat16: true\nbf16: auto\n", "bf16"),
    ("bfloat16: false\n", "auto"),
])
def test_bfloat16_is_bf16(tmp_path, keys, precision):
    assert load_config(_yaml(tmp_path, _HEAD + "datasets: [d.jsonl]\n" + keys), {}).precision == precision


@pytest.mark.parametrize("keys, precision", [
    ("float16: true\nbf16: false\n", "fp16"),  # resolve_dtype: torch_dtype float16 when neither bf16 nor bfloat16
    ("float16: true\n", "auto"),  # bf16 auto: bf16 where the GPU has it, else float16 (qlora's auto: fp16 there)
    ("float16: true\nbf16: auto\n", "auto"),
    ("float16: true\nbf16: true\n", "bf16"),  # cfg.bf16 or cfg.bfloat16 comes first
    ("float16: true\nbfloat16: true\n", "bf16"),
    ("float16: true\nfp16: true\n", "fp16"),
    ("float16: true\nfp16: false\nbf16: false\n", "fp16"),  # cfg.fp16 or cfg.float16
    ("float16: false\nbf16: false\n", "auto"),
])
def test_float16_is_fp16_where_axolotl_loads_the_model_in_float16(tmp_path, keys, precision):
    assert load_config(_yaml(tmp_path, _HEAD + "datasets: [d.jsonl]\n" + keys), {}).precision == precision


@pytest.mark.parametrize("keys, says", [
    ("bfloat16: true\nfp16: true\n", "both set precision"),
    ("float16: 16\n", "float16 expects true or false"),
    ("bfloat16: yes please\n", "bfloat16 expects true or false"),
])
def test_bfloat16_conflicts_are_refused_by_line(tmp_path, capsys, keys, says):
    path = _yaml(tmp_path, _HEAD + "datasets: [d.jsonl]\n" + keys)
    assert main(["train", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{path} line 5" in err and says in err and "Traceback" not in err, err


@pytest.mark.parametrize("keys, quantized", [
    ("", False),  # axolotl's default: bitsandbytes quantizes the linear layers only
    ("quantize_moe_experts: true\n", True),
    ("quantize_moe_experts: false\n", False),
])
def test_quantize_moe_experts_is_axolotls_even_where_silent(tmp_path, keys, quantized):
    cfg = load_config(_yaml(tmp_path, "base_model: m\noutput_dir: o\nadapter: qlora\nload_in_4bit: true\n"
                                      "datasets: [d.jsonl]\n" + keys), {})
    assert (cfg.quant, cfg.quantize_experts) == ("nf4", quantized)
    assert load_config(_yaml(tmp_path, _HEAD + "datasets: [d.jsonl]\n"), {}).quantize_experts  # 16-bit base: moot


def test_a_4bit_moe_keeps_its_experts_16bit_without_quantize_experts(tmp_path_factory, tiny_tokenizer, tmp_path,
                                                                    capsys):
    """Experts kept in the compute dtype as transformers + bitsandbytes loads them (the model's own experts
    module, its weights unchanged) while the linear layers are 4-bit; the run trains and says so."""
    import torch

    from qlora.nn import Experts4bit, Linear4bit
    from tiny_moe import tiny_moe_factory

    transformers = pytest.importorskip("transformers")
    if importlib.util.find_spec("transformers.conversion_mapping") is None:
        pytest.skip("transformers 4.x keeps qwen3_moe's experts as per-expert linear layers")
    model = tiny_moe_factory(tmp_path_factory, tiny_tokenizer)("qwen3_moe")
    data = _write(tmp_path / "d.jsonl", [{"prompt": f"Add {i} and 2.", "completion": f"{i + 2}."} for i in range(4)])
    dense = _trainer(model, data, tmp_path, quantize_experts=False, max_steps=2, lr=1e-2, batch_size=2,
                     target_parameters="mlp.experts.gate_up_proj,mlp.experts.down_proj", dropout=0.0)
    experts = [m for n, m in dense.model.named_modules() if n.endswith("mlp.experts")]
    assert experts and not any(isinstance(m, Experts4bit) for m in dense.model.modules())
    assert any(isinstance(m, Linear4bit) for m in dense.model.modules())
    reference = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    own = reference.model.layers[0].mlp.experts.gate_up_proj
    loaded = next(p for n, p in dense.model.named_parameters() if n.endswith("layers.0.mlp.experts.base_layer."
                                                                           "gate_up_proj") or
                  n.endswith("layers.0.mlp.experts.gate_up_proj"))
    torch.testing.assert_close(loaded.detach().float(), own.detach(), rtol=0, atol=0)
    assert not loaded.requires_grad
    assert dense.dense_experts == len(experts) == 2
    assert "--quantize-experts false: 2 MoE experts modules keep their 3-D weights in float32" in (
        capsys.readouterr().out)
    dense.train()
    dense.save_final()
    dense.cleanup()
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() and len(dense.losses) == 2
    quantized = _trainer(model, data, tmp_path, overwrite=True, target_parameters="mlp.experts.down_proj",
                         dropout=0.0)
    assert quantized.dense_experts == 0 and sum(isinstance(m, Experts4bit) for m in quantized.model.modules()) == 2


@pytest.mark.parametrize("val_set_size, seed, extra", [(0.25, 7, ""), (5, 42, ""), (0.1, 3, ""),
                                                       (0.25, 7, "curriculum_sampling: true\n")])
def test_val_set_size_holds_out_the_rows_axolotl_holds_out(tmp_path, val_set_size, seed, extra):
    """axolotl shuffles its merged data with the seed (not under curriculum_sampling), then holds out its last rows:
    ``train_test_split(test_size=val_set_size, shuffle=False)``. Oracle: that on a ``datasets.Dataset``."""
    from datasets import Dataset

    from qlora.train.data.selection import hold_out

    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}."} for i in range(23)]
    cfg = load_config(_yaml(tmp_path, _HEAD + f"datasets: [d.jsonl]\nval_set_size: {val_set_size}\nseed: {seed}\n"
                            + extra), {})
    assert cfg.eval_split == val_set_size and cfg.eval_split_order == "axolotl"
    merged = Dataset.from_list(rows)
    merged = merged if extra else merged.shuffle(seed=seed)
    expected = merged.train_test_split(test_size=val_set_size, shuffle=False, seed=seed)
    train, held = hold_out(rows, cfg.eval_split, cfg.seed, cfg.eval_split_order, cfg.shuffle)
    assert sorted(map(str, held)) == sorted(map(str, expected["test"])) and len(held) + len(train) == len(rows)
    assert sorted(map(str, train)) == sorted(map(str, expected["train"]))
    # qlora's own --eval-split (and LLaMA-Factory's val_size) keeps its seeded draw: the same count
    assert load_config(None, {"model": "m", "data": "d", "output": "o", "eval_split": 0.25}).eval_split_order == "draw"


def test_val_set_size_split_reaches_the_trainer(tiny_model_dir, tmp_path):
    from datasets import Dataset

    data = _write(tmp_path / "d.jsonl", _ROWS * 2)
    trainer = _trainer(tiny_model_dir, data, tmp_path, eval_split=0.25, eval_split_order="axolotl", seed=5)
    expected = Dataset.from_list(_ROWS * 2).shuffle(seed=5).train_test_split(test_size=0.25, shuffle=False)["test"]
    held = sorted(int(r["completion"].split()[1][:-1]) for r in expected)
    shown = sorted(int(trainer.tokenizer.decode(u.input_ids).split("Answer ")[1][0]) for u in trainer.eval_units)
    assert shown == held and len(trainer.eval_units) == 3
