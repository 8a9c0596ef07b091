"""Reasoning ("thinking") traces in training data: kept from every shape users bring, given to each chat
template its own way (a field it reads, a ``<think>`` block, or a clear refusal), and trained exactly on
reasoning + answer, never the prompt.

Templates are the real ones of tests/data/chat_templates (Qwen3, DeepSeek-R1-Distill, GLM-4.5, SmolLM3,
Qwen2.5, Llama 3.1) and one written here after gpt-oss's harmony format (``thinking`` field, analysis channel).
"""

from __future__ import annotations

import copy
import json

import pytest

from qlora.chat.reasoning import template_reasoning_keys
from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.model.chat_format import ChatFormat
from qlora.train.data import IGNORE_INDEX, Record, normalize, tokenize_example
from qlora.train.data.preference import normalize_preferences, tokenize_pair

from chat_families import family_tokenizer, model_for
from trained_runs import trained_runs

U1 = {"role": "user", "content": "What is two plus two?"}
U2 = {"role": "user", "content": "And three plus three?"}
R1, R2 = "Two and two make four.", "Three and three make six."


def assistant(answer: str, reasoning: str, key: str = "reasoning_content") -> dict:
    return {"role": "assistant", "content": answer, key: reasoning}


def embedded(answer: str, reasoning: str) -> dict:
    return {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{answer}"}


def tokenize(tok, messages, where: str = "d.jsonl line 1", template: str | None = None, **kw):
    example = normalize([Record({"messages": messages}, where)])[0]
    fmt = ChatFormat(template or tok.chat_template, origin="chat_template.jinja")
    return tokenize_example(example, tok, fmt, **kw)


def trained_text(tok, tokenized) -> list[str]:
    return [tok.decode(run) for run in trained_runs(tokenized.input_ids, tokenized.labels)]


# ---------------------------------------------------------------- normalization: every shape keeps its reasoning


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning", "thinking"])
def test_message_reasoning_fields_are_kept_under_their_name(key):
    example = normalize([Record({"messages": [U1, assistant("Four.", R1, key)]}, "d.jsonl line 1")])[0]
    assert example.messages[1] == {"role": "assistant", "content": "Four.", key: R1}


def test_reasoning_columns_beside_the_answer():
    alpaca = normalize([Record({"instruction": "What is two plus two?", "reasoning": R1, "output": "Four."}, "a")])[0]
    assert alpaca.messages[-1] == {"role": "assistant", "content": "Four.", "reasoning": R1}
    plain = normalize([Record({"prompt": "Q: 2+2?", "completion": " Four.", "thinking": R1}, "p")])[0]
    assert (plain.text, plain.reasoning) == (" Four.", ("thinking", R1))
    chat = normalize([Record({"prompt": [U1], "completion": "Four.", "reasoning_content": R1}, "c")])[0]
    assert chat.messages[-1] == {"role": "assistant", "content": "Four.", "reasoning_content": R1}
    mapped = normalize([Record({"question": "2+2?", "cot": R1, "answer": "Four."}, "m")],
                       fields="instruction=question,output=answer,reasoning=cot")[0]
    assert mapped.messages[-1] == {"role": "assistant", "content": "Four.", "reasoning": R1}


def test_reasoning_written_twice_alike_and_mode_flags_are_not_errors():
    twice = normalize([Record({"messages": [U1, {**embedded("Four.", R1), "reasoning_content": R1}]}, "d")])[0]
    assert twice.messages[1] == {"role": "assistant", "content": "Four.", "reasoning_content": R1}
    # Llama-Nemotron: "reasoning": "on" is a mode flag beside an output that holds its <think> block
    row = {"input": [U1], "output": f"<think>{R1}</think>Four.", "reasoning": "on", "category": "math"}
    nemotron = normalize([Record(row, "n")], fields="prompt=input,completion=output")[0]
    assert nemotron.messages[-1] == {"role": "assistant", "content": f"<think>{R1}</think>Four."}


@pytest.mark.parametrize("row, message", [
    ({"messages": [U1, {**embedded("Four.", R1), "reasoning_content": R2}]},
     r'd\.jsonl line 3, message 1: the assistant answer has two different reasonings: in field "reasoning_content"'),
    ({"messages": [U1, assistant("Four.", ["step"], "thinking")]},
     r'd\.jsonl line 3, message 1: field "thinking" \(the reasoning of an assistant message\) must be a string'),
    ({"prompt": "Q", "completion": "<think>x</think>A", "reasoning": R1},
     r'd\.jsonl line 3: the assistant answer has two different reasonings: in field "reasoning"'),
])
def test_malformed_reasoning_names_file_line_and_field(row, message):
    with pytest.raises(UsageError, match=message):
        normalize([Record(row, "d.jsonl line 3")])


def test_which_fields_templates_read():
    assert template_reasoning_keys(template_of("qwen3")) == ("reasoning_content",)
    assert template_reasoning_keys(template_of("glm-4.5")) == ("reasoning_content",)
    assert template_reasoning_keys(HARMONY) == ("thinking",)
    for name in ("deepseek-r1-distill", "smollm3", "qwen2.5", "llama-3.1"):  # enable_thinking is no message field
        assert template_reasoning_keys(template_of(name)) == (), name


@pytest.mark.parametrize("name, keys", [
    ("qwen3_6", ("reasoning_content",)), ("nemotron_3_nano", ("reasoning_content",)), ("gptoss", ("thinking",)),
    ("gemma4_v5", ("reasoning_content", "reasoning")), ("lfm2_2_5", ("thinking",)),
    ("lfm2_2_5_v2", ("reasoning_content", "reasoning", "thinking")), ("gemma4_v2", ()), ("qwen3_instruct_2507", ()),
])
def test_which_fields_the_templates_trl_ships_read(name, keys):
    """Recent families' own templates, as TRL 1.16 stores them (message.get(...), fallbacks, `in message`)."""
    pytest.importorskip("trl")
    from importlib.resources import files

    assert template_reasoning_keys(files("trl").joinpath(f"chat_templates/{name}.jinja").read_text()) == keys


def template_of(name: str) -> str:
    return family_tokenizer(name).chat_template


# ---------------------------------------------------------------- templates that read a reasoning field


def test_qwen3_gets_reasoning_content_and_trains_reasoning_and_answer():
    tok = family_tokenizer("qwen3")
    messages = [U1, assistant("Four.", R1), U2, assistant("Six.", R2)]
    tokenized = tokenize(tok, messages)
    # the template formats the field itself: ids are apply_chat_template's on the messages as given
    assert tokenized.input_ids == list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    text = tok.decode(tokenized.input_ids)
    assert R1 not in text and R2 in text  # Qwen3 keeps reasoning only after the last user turn
    assert trained_text(tok, tokenized) == ["Four.<|im_end|>", f"<think>\n{R2}\n</think>\n\nSix.<|im_end|>"]
    assert tokenized.reasoning_hidden == 1  # the first turn's, reported in the run log
    # the same turns written as <think> blocks in the content give the same ids and labels
    again = tokenize(tok, [U1, embedded("Four.", R1), U2, embedded("Six.", R2)])
    assert (again.input_ids, again.labels) == (tokenized.input_ids, tokenized.labels)


def test_repeated_reasoning_and_tool_calls_and_weight_zero_on_qwen3():
    tok = family_tokenizer("qwen3")
    # the same reasoning twice: the first turn's (dropped by the template) must not be taken from the second turn
    same = tokenize(tok, [U1, assistant("Four.", R1), U2, assistant("Four.", R1)])
    assert trained_text(tok, same) == ["Four.<|im_end|>", f"<think>\n{R1}\n</think>\n\nFour.<|im_end|>"]
    # a tool-calling turn after the last user message keeps its reasoning, trained with the call
    call = {"role": "assistant", "content": None, "reasoning_content": R1, "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]}
    tool = {"role": "tool", "content": "4"}
    runs = trained_text(tok, tokenize(tok, [U1, call, tool, assistant("Four.", R2)]))
    assert len(runs) == 2 and runs[0].startswith(f"<think>\n{R1}\n</think>\n\n<tool_call>") and '"add"' in runs[0]
    assert runs[1] == f"<think>\n{R2}\n</think>\n\nFour.<|im_end|>"
    # weight 0: in the context (with its reasoning where the template shows it), not trained
    kept = tokenize(tok, [U1, {**assistant("Four.", R1), "weight": 0}, U2, assistant("Six.", R2)])
    assert trained_text(tok, kept) == [f"<think>\n{R2}\n</think>\n\nSix.<|im_end|>"]


def test_final_turn_without_reasoning_trains_the_empty_block_qwen3_writes():
    tok = family_tokenizer("qwen3")
    tokenized = tokenize(tok, [U1, {"role": "assistant", "content": "Four."}])
    assert trained_text(tok, tokenized) == ["<think>\n\n</think>\n\nFour.<|im_end|>"]
    assert tokenized.reasoning_hidden == 0


def test_glm_reads_reasoning_content_after_its_own_header():
    tok = family_tokenizer("glm-4.5")
    tokenized = tokenize(tok, [U1, assistant("Four.", R1)])
    assert trained_text(tok, tokenized) == [f"\n<think>{R1}</think>\nFour.<|endoftext|>"]


# A template after gpt-oss's harmony format (reads ``thinking``; the analysis channel only in the final turn).
HARMONY = (
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' -%}{{ '<|start|>user<|message|>' + message.content + '<|end|>' }}"
    "{%- elif message.role == 'assistant' -%}"
    "{%- if loop.last and not add_generation_prompt -%}"
    "{%- if 'thinking' in message -%}{{ '<|start|>assistant<|channel|>analysis<|message|>' + message.thinking"
    " + '<|end|>' }}{%- endif -%}"
    "{{ '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|return|>' }}"
    "{%- else -%}{{ '<|start|>assistant<|channel|>final<|message|>' + message.content + '<|end|>' }}{%- endif -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start|>assistant' }}{%- endif -%}"
)


@pytest.fixture(scope="module")
def harmony_tokenizer():
    tok = copy.deepcopy(family_tokenizer("llama-3.1"))
    tok.add_special_tokens({"additional_special_tokens": ["<|start|>", "<|end|>", "<|message|>", "<|channel|>",
                                                          "<|return|>"]})
    tok.eos_token = "<|return|>"
    tok.chat_template = HARMONY
    return tok


@pytest.mark.parametrize("form", ["thinking", "reasoning_content", "embedded"])
def test_harmony_template_gets_thinking_and_trains_the_analysis_channel(harmony_tokenizer, form):
    tok = harmony_tokenizer
    last = embedded("Six.", R2) if form == "embedded" else assistant("Six.", R2, form)
    tokenized = tokenize(tok, [U1, assistant("Four.", R1, "thinking"), U2, last])
    text = tok.decode(tokenized.input_ids)
    assert R1 not in text and "<think>" not in text
    assert trained_text(tok, tokenized) == [  # each turn from the end of the generation prompt <|start|>assistant
        "<|channel|>final<|message|>Four.<|end|>",
        f"<|channel|>analysis<|message|>{R2}<|end|><|start|>assistant<|channel|>final<|message|>Six.<|return|>"]


def test_gpt_oss_turns_train_what_trl_trains_but_the_generation_prompt(harmony_tokenizer):
    """gpt-oss's real template (as TRL ships it) with TRL's assistant-only masks (its gptoss_training template's
    {% generation %} blocks): each assistant turn is trained from its <|start|>assistant on. The model is given that
    generation prompt and writes the rest, the channel header (<|channel|>final<|message|>) included, so qlora trains
    the same turns without the prompt: a turn without reasoning too, not its answer alone."""
    import os

    import trl
    from trl.chat_template_utils import get_training_chat_template

    folder = os.path.join(os.path.dirname(trl.__file__), "chat_templates")
    tok = copy.deepcopy(harmony_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|call|>"]})
    with open(os.path.join(folder, "gptoss.jinja")) as fh:
        tok.chat_template = fh.read()
    training = get_training_chat_template(tok)
    prompt = "<|start|>assistant"
    for messages in ([U1, assistant("Four.", R1, "thinking")], [U1, {"role": "assistant", "content": "Four."}],
                     [U1, {"role": "assistant", "content": "Four."}, U2, assistant("Six.", R2, "thinking")]):
        marked = tok.apply_chat_template(messages, chat_template=training, return_dict=True, tokenize=True,
                                         return_assistant_tokens_mask=True)
        ids = marked["input_ids"]
        theirs = [tok.decode(run) for run in trained_runs(ids, [t if m else IGNORE_INDEX for t, m in
                                                                 zip(ids, marked["assistant_masks"])])]
        tokenized = tokenize(tok, messages)
        assert tokenized.input_ids == ids
        assert all(run.startswith(prompt) for run in theirs)
        assert trained_text(tok, tokenized) == [run[len(prompt):] for run in theirs]


# ---------------------------------------------------------------- <think> markers: reasoning folded into the content


def test_reasoning_folded_for_a_vocabulary_with_think_tokens():
    tok = family_tokenizer("qwen2.5")  # its template reads no reasoning field; its vocabulary has <think>, </think>
    tokenized = tokenize(tok, [U1, assistant("Four.", R1, "reasoning")])
    assert trained_text(tok, tokenized) == [f"<think>\n{R1}\n</think>\n\nFour.<|im_end|>"]


def test_smollm3_generation_marks_cover_the_folded_reasoning():
    tok = family_tokenizer("smollm3")
    tokenized = tokenize(tok, [U1, assistant("Four.", R1, "thinking")])
    (run,) = trained_text(tok, tokenized)
    assert f"<think>\n{R1}\n</think>\n\nFour.<|im_end|>" in run and "two plus two" not in run


def test_deepseek_r1_reasoning_is_put_back_in_the_final_turn():
    """DeepSeek-R1's template strips every <think> block; the final turn's is what the model writes after the
    generation prompt ``<｜Assistant｜><think>\\n``, so it is put back and trained; earlier turns stay answers."""
    tok = family_tokenizer("deepseek-r1-distill")
    tokenized = tokenize(tok, [U1, embedded("Four.", R1), U2, assistant("Six.", R2)])
    text = tok.decode(tokenized.input_ids)
    assert R1 not in text and f"<｜Assistant｜><think>\n{R2}\n</think>\n\nSix." in text
    eos = "<｜end▁of▁sentence｜>"
    assert trained_text(tok, tokenized) == [f"Four.{eos}", f"{R2}\n</think>\n\nSix.{eos}"]


def test_plain_prompt_completion_reasoning_becomes_a_think_block():
    row = {"prompt": "Q: what is two plus two?\nA:", "completion": " Four.", "reasoning": R1}
    tok = family_tokenizer("qwen2.5")
    tokenized = tokenize_example(normalize([Record(row, "p.jsonl line 2")])[0], tok, ChatFormat(tok.chat_template))
    trained = tok.decode([t for t in tokenized.labels if t != IGNORE_INDEX])
    assert trained == f"<think>\n{R1}\n</think>\n\nFour.{tok.eos_token}"
    llama = family_tokenizer("llama-3.1")
    with pytest.raises(UsageError, match=r'p\.jsonl line 2: field "reasoning" holds the reasoning'):
        tokenize_example(normalize([Record(row, "p.jsonl line 2")])[0], llama, ChatFormat(llama.chat_template))


# ---------------------------------------------------------------- no place for reasoning: refused, not dropped


def test_template_without_reasoning_support_is_refused_with_file_line_and_field():
    tok = family_tokenizer("llama-3.1")
    with pytest.raises(UsageError) as err:
        tokenize(tok, [U1, assistant("Four.", "x"), U2, assistant("Six.", R2, "thinking")], where="d.jsonl line 4")
    text = str(err.value)
    assert text.startswith('d.jsonl line 4, message 2 of the conversation: field "reasoning_content" holds the '
                           'reasoning')
    assert "(chat_template.jinja)" in text and "Qwen3" in text and "\n" not in text


# ---------------------------------------------------------------- TRL as the oracle


def _trl(tokenizer, rows):
    from trl_sft import trl_sft

    return trl_sft(tokenizer, rows)


@pytest.mark.parametrize("family, completion", [
    ("qwen3", [assistant("Four.", R1)]),
    ("qwen3", [embedded("Four.", R1)]),
    ("glm-4.5", [assistant("Four.", R1)]),
])
def test_prompt_completion_with_reasoning_equals_trl(family, completion):
    pytest.importorskip("trl")
    tok = family_tokenizer(family)
    row = {"prompt": [{"role": "system", "content": "Be brief."}, U1], "completion": completion}
    (theirs,) = _trl(tok, [row])
    ours = tokenize_example(normalize([Record(row, "d.jsonl line 1")])[0], tok, ChatFormat(tok.chat_template))
    if family == "glm-4.5":  # nothing ends GLM's final turn, so qlora adds the EOS the model must learn to stop on
        theirs = {k: v + [tok.eos_token_id] for k, v in theirs.items()}
    assert ours.input_ids == theirs["input_ids"] and ours.labels == theirs["labels"]
    assert R1 in tok.decode([t for t in ours.labels if t != IGNORE_INDEX])


def test_deepseek_r1_reasoning_equals_trl_with_its_training_template():
    """TRL trains R1-distill on reasoning only with its patched template (the </think> split removed); qlora gives
    the same ids and completion mask from the model's own template."""
    pytest.importorskip("trl")
    from importlib.resources import files

    tok = family_tokenizer("deepseek-r1-distill")
    patched = copy.deepcopy(tok)
    patched.chat_template = files("trl").joinpath("chat_templates/deepseek_r1_distill_training.jinja").read_text()
    row = {"prompt": [U1], "completion": [embedded("Four.", R1)]}
    (theirs,) = _trl(patched, [row])
    ours = tokenize_example(normalize([Record(row, "d.jsonl line 1")])[0], tok, ChatFormat(tok.chat_template))
    assert ours.input_ids == theirs["input_ids"] and ours.labels == theirs["labels"]
    assert R1 in tok.decode([t for t in ours.labels if t != IGNORE_INDEX])


# ---------------------------------------------------------------- preference pairs


@pytest.mark.parametrize("family", ["qwen3", "deepseek-r1-distill"])
def test_preference_answers_keep_their_reasoning(family):
    tok = family_tokenizer(family)
    row = {"prompt": [U1], "chosen": [assistant("Four.", R1)], "rejected": [assistant("Five.", "Two and two, five.")]}
    pair = tokenize_pair(normalize_preferences([Record(row, "p.jsonl line 1")])[0], tok, ChatFormat(tok.chat_template))
    chosen, rejected = tok.decode(pair.chosen_ids), tok.decode(pair.rejected_ids)
    assert R1 in chosen and chosen.rstrip().endswith(tok.eos_token) and "Two and two, five." in rejected
    assert "two plus two" not in chosen and "two plus two" in tok.decode(pair.prompt_ids)


# ---------------------------------------------------------------- end to end


def test_train_and_eval_on_reasoning_data_end_to_end(tmp_path, capsys):
    rows = [{"messages": [U1, assistant("Four.", R1)]},
            {"messages": [U1, {"role": "assistant", "content": "Four.", "thinking": R1}, U2, embedded("Six.", R2)]}]
    data = tmp_path / "think.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--data", str(data), "--seq-len", "256", "--no-progress"]
    model = model_for("qwen3", tmp_path)
    assert main(["train", "--model", str(model), "--output", str(tmp_path / "run"), "--max-steps", "2", *common]) == 0
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()
    evaluated = ["eval", "--model", str(model), "--adapter", str(tmp_path / "run"), "--quant", "none", *common[:4]]
    assert main(evaluated) == 0
    out = capsys.readouterr().out
    assert "2 examples, 0 truncated to --seq-len, 2 with reasoning (given to the chat template as " \
           "reasoning_content); the chat template does not show the reasoning of 1 assistant turn " in out
    llama = model_for("llama-3.1", tmp_path)
    assert main(["train", "--model", str(llama), "--output", str(tmp_path / "bad"), "--max-steps", "2", *common]) == 2
    err = capsys.readouterr().err
    assert f'{data} line 1, message 2 of the conversation: field "reasoning_content" holds' in err
    assert "Traceback" not in err
    assert not (tmp_path / "bad" / "adapter_model.safetensors").exists()
