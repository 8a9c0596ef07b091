"""Token ids, loss masks, BOS/EOS rules and truncation (issue 11, items 1-3; issue 20)."""

from __future__ import annotations

import json

import pytest

from qlora.errors import UsageError
from qlora.train.data.tokenized_dataset import PROMPT_FILLS_SEQ_LEN
from qlora.model.tiny import train_tokenizer
from qlora.train.data import (
    IGNORE_INDEX, TEMPLATES, Example, count_trainable_tokens, pad_collate, pad_token_id, resolve_chat_template,
    tokenize_dataset, tokenize_example,
)

from trained_runs import trained_runs

TEXT = [
    "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\nFour.<|im_end|>\n",
    "### Instruction:\nName a color.\n\n### Response:\nBlue.",
    "The capital of France is Paris. Hello there!",
] * 20

CONVERSATION = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six."},
)
# What the loss must cover, per template: each assistant message with its end-of-turn marker, no extra EOS.
TRAINED = {
    "chatml": ["Four.<|im_end|>", "Six.<|im_end|>"],
    "llama-3": ["Four.<|eot_id|>", "Six.<|eot_id|><|eos|>"],  # this vocabulary spells <|eot_id|> as text: EOS follows
    "alpaca": ["Four.<|eos|>", "Six.<|eos|>"],
    "tokenizer": ["Four.<|im_end|>", "Six.<|im_end|>"],
}
_CACHE: dict = {}


def tokenizer(add_bos: bool = True, pad: str = "pad"):
    """A tiny tokenizer: adds BOS or not; pad token own ("pad"), = eos ("eos") or absent ("none")."""
    key = (add_bos, pad)
    if key not in _CACHE:
        tok = train_tokenizer(TEXT, vocab_size=300, add_bos=add_bos)
        if pad == "eos":
            tok.pad_token = tok.eos_token
        elif pad == "none":
            tok.pad_token = None
        _CACHE[key] = tok
    return _CACHE[key]


def chat(messages=CONVERSATION) -> Example:
    return Example(tuple(messages), None, "d.jsonl line 1")


def spans(tok, tokenized) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    return [tok.decode(r, skip_special_tokens=False) for r in trained_runs(tokenized.input_ids, tokenized.labels)]


@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("name", sorted(TRAINED))
def test_ids_equal_apply_chat_template_and_mask_is_exact(name, add_bos):
    tok = tokenizer(add_bos)
    template = resolve_chat_template(tok, name)
    tokenized = tokenize_example(chat(), tok, template)
    full = tok.apply_chat_template(list(CONVERSATION), chat_template=template, return_dict=True)["input_ids"]
    eos = [tok.eos_token_id] if name == "llama-3" else []
    assert tokenized.input_ids == list(full) + eos  # the template decides BOS and end markers; EOS only if no stop
    assert spans(tok, tokenized) == TRAINED[name]
    bos = 0 if name == "tokenizer" else 1  # the tiny ChatML template writes no BOS; the built-ins write one
    assert tokenized.input_ids.count(tok.bos_token_id) == bos


@pytest.mark.parametrize("add_bos", [True, False])
def test_text_examples_follow_the_tokenizer_and_chat_follows_the_template(add_bos):
    tok = tokenizer(add_bos)
    text = tokenize_example(Example(None, "Hello there!", "x"), tok, TEMPLATES["chatml"])
    assert text.input_ids == tok("Hello there!")["input_ids"] + [tok.eos_token_id]
    doubled = "{{ bos_token }}" + TEMPLATES["chatml"]  # a template that writes BOS twice: its own choice
    ids = tokenize_example(chat(), tok, doubled).input_ids
    assert ids == list(tok.apply_chat_template(list(CONVERSATION), chat_template=doubled, return_dict=True)["input_ids"])


def test_eos_appended_only_without_an_end_marker_after_the_last_answer():
    tok = tokenizer()
    bare = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    tokenized = tokenize_example(chat(), tok, bare)
    assert tokenized.input_ids[-1] == tokenized.labels[-1] == tok.eos_token_id
    assert tokenized.input_ids[:-1] == list(tok.apply_chat_template(list(CONVERSATION), chat_template=bare, return_dict=True)["input_ids"])
    marked = tokenize_example(chat(), tok, TEMPLATES["chatml"])
    assert marked.input_ids.count(tok.eos_token_id) == 0  # <|im_end|> ends the answer: no EOS after it


def test_assistant_text_quoted_in_the_prompt_is_not_taken_for_the_answer():
    tok = tokenizer()
    quoted = ({"role": "user", "content": "Reply Four."}, {"role": "assistant", "content": "Four."})
    tokenized = tokenize_example(chat(quoted), tok, TEMPLATES["chatml"])
    assert spans(tok, tokenized) == ["Four.<|im_end|>"]


@pytest.mark.parametrize("pad", ["pad", "eos", "none"])
def test_final_eos_counts_in_loss_whatever_the_pad_token(pad):
    tok = tokenizer(True, pad)
    short = tokenize_example(chat(CONVERSATION[1:3]), tok, TEMPLATES["chatml"])
    long = tokenize_example(chat(), tok, TEMPLATES["chatml"])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for e in (short, long):  # the answer's end marker is trained; the template's trailing newline is not
        assert e.labels[-2] == im_end and e.labels[-1] == IGNORE_INDEX
    batch = pad_collate([short, long], pad_token_id(tok))
    n = len(short.input_ids)
    assert batch["labels"][0, n - 2] == im_end
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, n:] == 0).all()
    assert count_trainable_tokens(batch) == short.num_trainable + long.num_trainable


def test_train_on_all_tokens():
    tok = tokenizer()
    tokenized = tokenize_example(chat(), tok, TEMPLATES["chatml"], train_on="all")
    assert tokenized.labels[0] == IGNORE_INDEX and tokenized.labels[1:] == tokenized.input_ids[1:]
    with pytest.raises(UsageError, match="unknown train_on"):
        tokenize_example(chat(), tok, TEMPLATES["chatml"], train_on="prompt")


def test_truncation_is_counted_and_untrainable_examples_reported():
    tok = tokenizer()
    long_prompt = ({"role": "user", "content": "What is two plus two? " * 30}, {"role": "assistant", "content": "Four."})
    examples = [chat(CONVERSATION[1:3]), Example(long_prompt, None, "d.jsonl line 2"), chat()]
    kept, report = tokenize_dataset(examples, tok, TEMPLATES["chatml"], seq_len=60)
    assert [e.index for e in kept] == [0, 2]
    assert report.truncated == 2 and kept[1].num_trainable == kept[1].labels.count(IGNORE_INDEX) * 0 + \
        sum(label != IGNORE_INDEX for label in kept[1].labels)
    assert report.empty == {PROMPT_FILLS_SEQ_LEN: ["d.jsonl line 2"]}  # its answer past --seq-len, as a pair's
    assert "1 skipped with a prompt that fills --seq-len, leaving no answer token (first: d.jsonl line 2)" in \
        report.summary()
    assert all(len(e.input_ids) <= 60 for e in kept)
    assert kept[1].truncated and kept[1].input_ids[-1] != tok.eos_token_id


def test_every_example_truncated_away_is_an_error():
    tok = tokenizer()
    examples = [Example(chat().messages, None, f"d.jsonl line {i}") for i in (1, 2)]
    expected = (r"all 2 rows of the data have nothing to train: 2 with a prompt that fills --seq-len, leaving no answer "
                r"token \(first: d\.jsonl line 1, d\.jsonl line 2\)\. Such rows are skipped; raise --seq-len or shorten "
                r"the prompts\.")
    with pytest.raises(UsageError, match=expected):
        tokenize_dataset(examples, tok, TEMPLATES["chatml"], seq_len=8)


def test_template_resolution():
    tok = tokenizer()
    assert resolve_chat_template(tok, "auto") == tok.chat_template
    bare = train_tokenizer(TEXT, vocab_size=300, chat_template=False)
    assert resolve_chat_template(bare, "auto") == TEMPLATES["chatml"]
    with pytest.raises(UsageError, match="has no chat_template"):
        resolve_chat_template(bare, "tokenizer")
    with pytest.raises(UsageError, match="unknown chat template 'vicuna'"):
        resolve_chat_template(tok, "vicuna")


def test_template_that_rewrites_earlier_turns_is_refused():
    # Renders only the last assistant turn in full, like templates that strip earlier reasoning.
    rewriting = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}{{ 'A:...\n' }}"
                 "{% else %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(UsageError, match=r"d\.jsonl line 1: assistant message 1 of 2 \(message 3 of the conversation, "
                                         r"starting 'Four\.'\) does not appear"):
        tokenize_example(chat(), tokenizer(), rewriting)


def test_template_error_is_a_usage_error_with_line_and_hint():
    no_system = ("{% if messages[0]['role'] == 'system' %}\n{{ raise_exception('System role not supported') }}"
                 "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(UsageError, match=r"d\.jsonl line 1: the chat template \(the chat template, line 2\) failed "
                                         r".*System role not supported.*--system-into-user"):
        tokenize_example(chat(), tokenizer(), no_system)


@pytest.mark.parametrize("speakers, fix", [
    (["human", "human", "gpt"], r"starting with user\): merge consecutive messages of the same role in the data\.$"),
    (["gpt", "human", "gpt"], r"starting with user\): remove the assistant message that opens the conversation "
                              r"\(or give it a user turn before\)\.$"),
    (["system", "human", "gpt"], r"starting with user\): try --system-into-user\.$"),
])
def test_a_template_refusing_the_order_of_roles_is_told_the_fix_that_applies(tmp_path, speakers, fix):
    """Mixtral's and Llama 2's templates refuse a conversation whose roles do not alternate from a user turn: a
    ShareGPT dump's two user turns in a row, its opening greeting by the bot, a system message; each is told its own
    fix (a bot greeting has nothing to merge)."""
    from qlora.train.data import load_records, normalize

    alternate = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                 "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                 "{% endif %}{{ m['content'] }}{% endfor %}")
    row = {"conversations": [{"from": s, "value": f"turn {i}"} for i, s in enumerate(speakers)]}
    (tmp_path / "d.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(UsageError, match=r"d\.jsonl line 1: the chat template .*must alternate.*" + fix):
        tokenize_example(normalize(load_records(tmp_path / "d.jsonl"))[0], tokenizer(), alternate)


def test_llama3_on_a_bpe_that_merges_newlines_differently_at_a_prefix_boundary():
    # A GPT-2-style BPE that learned "\n\n": the generation prompt "...<|end_header_id|>\n\n" alone
    # tokenizes its newlines as one token, the whole conversation as two, so tokenizing pieces fails.
    tok = train_tokenizer(["Hello\n\nworld\n\n"] * 50 + TEXT, vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    template = TEMPLATES["llama-3"]
    full = list(tok.apply_chat_template(list(CONVERSATION), chat_template=template, return_dict=True)["input_ids"])
    prompt = list(tok.apply_chat_template(list(CONVERSATION[:2]), chat_template=template,
                                          add_generation_prompt=True, return_dict=True)["input_ids"])
    assert full[:len(prompt)] != prompt  # the hazard is real on this tokenizer
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    tokenized = tokenize_example(chat(), tok, template, stop_ids=[tok.eos_token_id, eot])
    assert tokenized.input_ids == full
    assert spans(tok, tokenized) == ["Four.<|eot_id|>", "Six.<|eot_id|>"]


def test_template_syntax_error_names_its_line():
    broken = "{% for m in messages %}\n{{ m['content'] }}\n{% endfor %\n"
    with pytest.raises(UsageError, match=r"the chat template \(the chat template, line 3\) failed"):
        tokenize_example(chat(), tokenizer(), broken)
