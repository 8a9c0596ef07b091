"""Real chat templates of 73 model families (issue 20): ids, BOS/EOS and loss mask, token for token.

Each family's template is the model's own ``chat_template`` (tests/data/chat_templates, origins in
SOURCES.md), on a local byte-level BPE tokenizer that carries the family's special tokens, BOS/EOS and
``add_bos_token``. The oracle is ``tokenizer.apply_chat_template(conversation, tokenize=True)``, on the
conversation as that template takes reasoning: a family whose template reads reasoning apart from the
answer (``"reasoning"`` in families.json: a message field, or ``thinking`` content chunks) gets a
``<think>`` block's reasoning there, as its users write it. A tool-calling conversation is trained on
the templates that render its call and refused on the others.
"""

from __future__ import annotations

import os
import re

import pytest

from qlora.chat.tokenize import has_generation_markers
from qlora.errors import UsageError
from qlora.model.chat_format import ChatFormat, stop_token_ids
from qlora.train.data import IGNORE_INDEX, Example, tokenize_example

from chat_families import A1, CONVERSATIONS, DATA, DATE, FAMILIES, SYSTEM, U1, family_tokenizer
from trained_runs import trained_runs


def stops(tok, name: str) -> set[int]:
    return stop_token_ids(tok, [tok.convert_tokens_to_ids(t) for t in FAMILIES[name]["generation_eos"]])


def runs(tokenized) -> list[list[int]]:
    return trained_runs(tokenized.input_ids, tokenized.labels)


def squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def visible_forms(content: str) -> set[str]:
    """What a template may print of an assistant message: all of it, or its answer without the reasoning;
    a generation prompt that opens the reasoning block (DeepSeek-R1) leaves the rest to the model; an empty
    reasoning block the template writes before an answer (Qwen3, GLM) is the model's to write."""
    forms = {squash(content), squash(content.replace("<think>", "", 1)), squash("<think></think>" + content)}
    if "</think>" in content:
        forms.add(squash(content.split("</think>")[-1]))
    return forms


# DeepSeek's templates strip every <think> block (``content.split('</think>')[-1]``); qlora puts the final
# turn's back (as TRL's deepseek_r1_distill_training template does, by removing this split).
_STRIP = "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"


def as_family_takes_reasoning(family: str, messages: list[dict]) -> list[dict]:
    """The conversation as a user of ``family`` writes it: a ``<think>`` block of an assistant message moved to the
    field or chunks its template reads reasoning from (families.json ``"reasoning"``), the answer as content."""
    how = FAMILIES[family].get("reasoning")
    out = []
    for m in messages:
        if how and m["role"] == "assistant" and "</think>" in m["content"]:
            reasoning, answer = m["content"].split("</think>")
            reasoning, answer = reasoning.replace("<think>", "").strip(), answer.strip()
            m = ({**m, "content": [{"type": "thinking", "thinking": reasoning}, {"type": "text", "text": answer}]}
                 if how == "chunks" else {**m, "content": answer, how: reasoning})
        out.append(m)
    return out


def reference_ids(tok, messages, template: str) -> list[int]:
    """apply_chat_template's ids; for a template that strips reasoning, with the turns after the last user message
    rendered whole and the earlier ones as the template shows them (their answer); for one that hides a final
    answer's reasoning otherwise, the final turn as the model writes it at inference (see hidden_final_reasoning)."""
    if _STRIP in template:
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages = [{**m, "content": m["content"].split("</think>")[-1]} if m["role"] == "assistant" and
                    i < last_user else m for i, m in enumerate(messages)]
        template = template.replace(_STRIP, "")
    ids = list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, chat_template=template)["input_ids"])
    written = hidden_final_reasoning(tok, messages, template)
    return ids if written is None else list(tok(written, add_special_tokens=False)["input_ids"])


def hidden_final_reasoning(tok, messages, template: str) -> str | None:
    """For a conversation ending with a user message and an answer with reasoning that the template's rendering of
    the whole conversation does not show (DeepSeek-V3.1 strips it, Kimi-K2-Thinking shows it only in an unfinished
    tool-calling exchange): the text the model sees at inference, the generation prompt of the conversation before
    that answer (thinking on, for templates with that switch) followed by what the model writes, the reasoning in a
    <think> block (opened by the prompt or by the model) or, for a template without <think> markup whose prompt with
    thinking off closes an empty block (Gemma 4's <|channel>thought\n<channel|>), in that block, then the answer and
    the end the template writes after it."""
    *before, final = messages
    if not before or before[-1]["role"] != "user" or final["role"] != "assistant":
        return None
    field = final.get("reasoning_content") or final.get("thinking") or final.get("reasoning")
    if field:
        reasoning, answer = field, final["content"]
    elif "</think>" in final["content"]:
        reasoning, answer = final["content"].split("</think>")
        reasoning = reasoning.split("<think>")[-1]
    else:
        return None
    rendered = tok.apply_chat_template(messages, tokenize=False, chat_template=template)
    if reasoning.strip() in rendered:
        return None
    end = rendered[rendered.rfind(answer.strip()) + len(answer.strip()):]
    prompt = tok.apply_chat_template(before, tokenize=False, add_generation_prompt=True, thinking=True,
                                     enable_thinking=True, chat_template=template)
    opening, closing = "" if prompt.endswith("<think>") else "<think>", "</think>"
    off = tok.apply_chat_template(before, tokenize=False, add_generation_prompt=True, chat_template=template)
    if "</think>" not in template and not off.startswith(prompt):  # Gemma 4: thinking off, the prompt closes an empty
        block = off[len(os.path.commonprefix([off, rendered])):]  # block; on, the model writes it, holding reasoning
        at = max(block.rfind(t) for t in tok.all_special_tokens)
        opening, closing = block[:at], block[at:]
        reasoning = reasoning.strip()
    return prompt + opening + reasoning + closing + answer.strip() + end


CASES = [(f, c) for f in FAMILIES for c in CONVERSATIONS
         if FAMILIES[f]["system_role"] or not any(m["role"] == "system" for m in CONVERSATIONS[c])]


@pytest.mark.parametrize("family,shape", CASES)
def test_real_template_ids_bos_eos_and_mask(family, shape):
    tok = family_tokenizer(family)
    messages = CONVERSATIONS[shape]
    fmt = ChatFormat(tok.chat_template, origin=f"{family}.jinja", date=DATE)
    ends = stops(tok, family)
    tokenized = tokenize_example(Example(tuple(messages), None, "d.jsonl line 1"), tok, fmt, stop_ids=ends)
    reference = reference_ids(tok, as_family_takes_reasoning(family, messages), fmt.pinned_template())
    ids = tokenized.input_ids
    # ids: exactly apply_chat_template's, plus one EOS only when no stop token follows the final answer
    if ids != reference:
        assert ids == reference + [tok.eos_token_id] and messages[-1]["role"] == "assistant"
        answer_end = tok.decode(reference).rfind(messages[-1]["content"].split("</think>")[-1].strip())
        assert answer_end >= 0
        tail = tok(tok.decode(reference)[answer_end:], add_special_tokens=False)["input_ids"]
        assert not set(tail) & ends, "an EOS was appended although a stop token ends the answer"
    assert ids.count(tok.bos_token_id) == reference.count(tok.bos_token_id) if tok.bos_token_id is not None else True
    # mask: one run per assistant message = what the template prints of it + its end marker (markup closing the
    # answer, such as Command R7B's <|END_RESPONSE|>, then a stop token)
    assistants = [m["content"] for m in messages if m["role"] == "assistant"]
    trained = runs(tokenized)
    assert len(trained) == len(assistants)
    for run, content in zip(trained, assistants):
        assert run[-1] in ends, f"{tok.decode(run)!r} does not end with an end-of-turn token"
        body = run[:-1]
        while body and (body[-1] in ends or body[-1] in tok.all_special_ids):
            body = body[:-1]
        # or markup the model writes after the generation prompt, then the answer (gpt-oss's
        # <|channel|>final<|message|>, Command A's <|START_RESPONSE|>): trained with it
        header = max((k + 1 for k, t in enumerate(body) if t in tok.all_special_ids), default=0)
        if squash(tok.decode(body)) not in visible_forms(content) and run[0] in tok.all_special_ids:
            body = body[header:]
        if FAMILIES[family].get("reasoning") and "</think>" in content:  # the template's reasoning markup, then answer
            reasoning, answer = (squash(part.replace("<think>", "")) for part in content.split("</think>"))
            shown = squash(tok.decode(body))
            assert shown.endswith(answer) and (reasoning in shown or shown == answer), tok.decode(run)
        elif has_generation_markers(fmt.template):  # the template's own {% generation %} span, up to its end marker
            assert any(form in squash(tok.decode(body)) for form in visible_forms(content)), tok.decode(run)
        else:
            assert squash(tok.decode(body)) in visible_forms(content), tok.decode(run)
    assert tokenized.labels[0] == IGNORE_INDEX


def test_every_family_is_exact_on_the_plain_conversations():
    """A summary count: every family and shape above gives apply_chat_template's ids (EOS aside)."""
    exact = sum(1 for f, c in CASES)
    assert len(FAMILIES) >= 12 and exact >= 12 * 5


@pytest.mark.parametrize("family", [f for f in FAMILIES if not FAMILIES[f]["system_role"]])
def test_template_without_system_role_names_file_line_message_and_hint(family):
    tok = family_tokenizer(family)
    fmt = ChatFormat(tok.chat_template, origin=f"{family}.jinja")
    with pytest.raises(UsageError) as err:
        tokenize_example(Example((SYSTEM, U1, A1), None, "d.jsonl line 7"), tok, fmt)
    text = str(err.value)
    assert text.startswith("d.jsonl line 7: the chat template (" + family + ".jinja, line ")
    assert "system" in text.lower() and "--system-into-user" in text
    folded = ChatFormat(tok.chat_template, origin=f"{family}.jinja", system_into_user=True)
    tokenized = tokenize_example(Example((SYSTEM, U1, A1), None, "d.jsonl line 7"), tok, folded)
    assert "You are a terse assistant.\n\nWhat is two plus two?" in tok.decode(tokenized.input_ids)
    assert squash(tok.decode(runs(tokenized)[0])).startswith("Four.")


DATED = [f for f in FAMILIES if "strftime_now" in (DATA / f"{f}.jinja").read_text()]


def dated_ids(family: str, date: str) -> list[int]:
    tok = family_tokenizer(family)
    return tokenize_example(Example((U1, A1), None, "x"), tok, ChatFormat(tok.chat_template, date=date)).input_ids


@pytest.mark.parametrize("family", DATED)
def test_date_dependent_templates_render_the_pinned_date(family):
    """Years far from today's: a template that prints the date prints the pinned one; one that only computes it
    (Llama 4 without tools) renders the same ids on either date."""
    tok = family_tokenizer(family)
    ids = {date: dated_ids(family, date) for date in ("2031-01-31", "2031-02-01")}
    assert dated_ids(family, "2031-01-31") == ids["2031-01-31"]
    if "2031" in tok.decode(ids["2031-01-31"]):
        assert ids["2031-01-31"] != ids["2031-02-01"]
    else:
        assert ids["2031-01-31"] == ids["2031-02-01"] and "2031" not in tok.decode(ids["2031-02-01"])


def test_most_date_dependent_templates_print_the_pinned_date():
    """The test above is not vacuous: the pinned year is printed by most date-dependent templates."""
    printing = [f for f in DATED if "2031" in family_tokenizer(f).decode(dated_ids(f, "2031-01-31"))]
    assert len(printing) >= len(DATED) - 1 >= 5, printing


def test_reasoning_field_goes_to_thinking_chunks_and_is_trained_from_the_template_opening():
    """Mistral's reasoning template reads ``block['thinking']`` of content chunks, not a message field: a
    ``reasoning_content`` field is rendered as its ``[THINK]...[/THINK]`` chunk (not dropped), and the trained run
    starts at ``[THINK]``, which the model writes after ``[/INST]``."""
    tok = family_tokenizer("ministral-3-reasoning")
    fmt = ChatFormat(tok.chat_template, origin="ministral-3-reasoning.jinja", date=DATE)
    answer = {"role": "assistant", "content": "Four.", "reasoning_content": "Two and two."}
    tokenized = tokenize_example(Example((U1, answer), None, "x"), tok, fmt)
    chunked = {"role": "assistant", "content": [{"type": "thinking", "thinking": "Two and two."},
                                                {"type": "text", "text": "Four."}]}
    assert tokenized.input_ids == reference_ids(tok, [U1, chunked], fmt.pinned_template())
    (run,) = runs(tokenized)
    assert tok.convert_ids_to_tokens(run[:1]) == ["[THINK]"] and run[-1] == tok.eos_token_id
    assert squash(tok.decode(run)) == squash("[THINK]Two and two.[/THINK]Four.</s>")


@pytest.mark.parametrize("family,answer,block", [
    ("kimi-k2-thinking", {"role": "assistant", "content": "Four.", "reasoning_content": "Two and two."},
     "<think>Two and two.</think>"),
    ("kimi-k2-thinking", {"role": "assistant", "content": "<think>Two and two.</think>Four."},
     "<think>Two and two.</think>"),
    ("deepseek-v3.1", {"role": "assistant", "content": "<think>Two and two.</think>Four."},
     "<think>Two and two.</think>"),
    ("deepseek-v3.1", {"role": "assistant", "content": "Four.", "reasoning_content": "Two and two."},
     "<think>\nTwo and two.\n</think>\n\n")])  # V3.1 reads no field: the block qlora writes (README, Data)
def test_final_reasoning_the_template_hides_is_trained_where_the_model_writes_it(family, answer, block):
    """Kimi-K2-Thinking's template writes ``<think></think>`` before every finished answer (reasoning_content only
    in a tool-calling exchange under way), DeepSeek-V3.1's ``</think>`` (its non-thinking prompt) with the block
    stripped: the final answer's reasoning is trained as the model writes it after the generation prompt (V3.1's
    thinking one ends with ``<think>``), never dropped and never after the template's empty block."""
    tok = family_tokenizer(family)
    fmt = ChatFormat(tok.chat_template, origin=f"{family}.jinja", date=DATE)
    tokenized = tokenize_example(Example((U1, answer), None, "x"), tok, fmt, stop_ids=stops(tok, family))
    (run,) = runs(tokenized)
    assert tok.decode(run) == block + "Four." + tok.decode(run[-1:])
    prompt = tok.apply_chat_template([U1], tokenize=False, add_generation_prompt=True, thinking=True)
    written = block.removeprefix("<think>") + "Four." if prompt.endswith("<think>") else block + "Four."
    assert tokenized.input_ids == tok(prompt + written + tok.decode(run[-1:]), add_special_tokens=False)["input_ids"]


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "The city."}}, "required": ["city"]}}}
CALL = [{"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "Sunny, 21 C"},
        {"role": "assistant", "content": "It is sunny."}]


def oracle_call(tok, template: str) -> list[dict] | None:
    """CALL as the template renders its call (name and arguments after the user's request), with the call's content
    "" (transformers drops a None key) and its arguments an object (Hugging Face's convention) or JSON text
    (DeepSeek's); None when apply_chat_template renders the call in neither."""
    from jinja2.exceptions import TemplateError

    for arguments in ({"city": "Paris"}, '{"city": "Paris"}'):
        call = {**CALL[1], "content": "", "tool_calls": [{**CALL[1]["tool_calls"][0], "function": {
            "name": "get_weather", "arguments": arguments}}]}
        conversation = [CALL[0], call, *CALL[2:]]
        try:
            text = tok.apply_chat_template(conversation, tools=[WEATHER], tokenize=False, chat_template=template)
        except (TemplateError, TypeError):  # TypeError: a template's tojson of an undefined field
            continue
        after = text[text.find("Weather in Paris?") + len("Weather in Paris?"):]
        if "get_weather" in after and "Paris" in after[after.find("get_weather"):]:
            return conversation
    return None


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tool_calling_turn_is_trained_whole_or_refused(family):
    """A template that writes the call: apply_chat_template's ids, the call turn (name, arguments, end marker) and the
    answer trained; one that drops it or fails on it: refused with the file and line (never trained without it)."""
    from qlora.train.data.formats import normalize
    from qlora.train.data.sources import Record

    tok = family_tokenizer(family)
    fmt = ChatFormat(tok.chat_template, origin=f"{family}.jinja", date=DATE)
    example = normalize([Record({"messages": CALL, "tools": [WEATHER]}, "t.jsonl line 3")])[0]
    conversation = oracle_call(tok, fmt.pinned_template())
    if conversation is None:
        with pytest.raises(UsageError, match="t.jsonl line 3"):
            tokenize_example(example, tok, fmt, stop_ids=stops(tok, family))
        return
    tokenized = tokenize_example(example, tok, fmt, stop_ids=stops(tok, family))
    reference = list(tok.apply_chat_template(conversation, tools=[WEATHER], tokenize=True, return_dict=True,
                                             chat_template=fmt.pinned_template())["input_ids"])
    assert tokenized.input_ids in (reference, reference + [tok.eos_token_id])
    call, answer = runs(tokenized)
    assert "get_weather" in tok.decode(call) and "Paris" in tok.decode(call) and call[-1] in stops(tok, family)
    assert "Weather in Paris?" not in tok.decode(call) and "Sunny" not in tok.decode(call + answer)
    assert "It is sunny." in tok.decode(answer) and answer[-1] in stops(tok, family)


@pytest.mark.parametrize("family,prompt_end,opening", [("minimax-m2", "]~b]ai", "<minimax:tool_call>"),
                                                       ("gpt-oss", "<|start|>assistant", " to=functions.get_weather")])
def test_tool_call_turn_starts_after_the_role_header_the_prompt_shares(family, prompt_end, opening):
    """The call turn is what the model writes after its role header: a word that the generation prompt and the turn
    share (MiniMax's ``]~b]ai``, whose prompt goes on with ``\n<think>``; gpt-oss's ``assistant``, followed by a
    channel or a recipient) is prompt, not trained."""
    from qlora.train.data.formats import normalize
    from qlora.train.data.sources import Record

    tok = family_tokenizer(family)
    fmt = ChatFormat(tok.chat_template, origin=f"{family}.jinja", date=DATE)
    example = normalize([Record({"messages": CALL, "tools": [WEATHER]}, "t.jsonl line 3")])[0]
    tokenized = tokenize_example(example, tok, fmt, stop_ids=stops(tok, family))
    call = runs(tokenized)[0]
    at = next(i for i in range(len(tokenized.input_ids)) if tokenized.labels[i] != IGNORE_INDEX)
    assert tok.decode(call).startswith(opening), tok.decode(call)
    assert tok.decode(tokenized.input_ids[:at]).rstrip().endswith(prompt_end)


def test_tool_calling_test_is_not_vacuous():
    """Most families with tool support render the call, so the test above trains it rather than expecting refusal."""
    rendering = [f for f in FAMILIES if oracle_call(family_tokenizer(f), family_tokenizer(f).chat_template)]
    assert len(rendering) >= 20 and {"qwen3-coder", "gpt-oss", "llama-3.3", "deepseek-v3"} <= set(rendering)


GUARDIAN = (DATA / "granite-guardian-3.0.jinja").read_text()


@pytest.mark.parametrize("conversation", [[U1, A1], [SYSTEM, U1, A1]])
def test_template_that_quotes_the_answer_inside_the_prompt_is_refused(conversation):
    """Granite Guardian's template renders the assistant message inside the user turn it judges (and no assistant
    turn): the model reads that text as prompt, so training it would teach the model to write its own input."""
    tok = family_tokenizer("granite-3.3")
    fmt = ChatFormat(GUARDIAN, origin="granite-guardian-3.0.jinja")
    rendered = tok.apply_chat_template(conversation, tokenize=False, chat_template=GUARDIAN)
    prompt = tok.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True,
                                     chat_template=GUARDIAN)
    assert A1["content"] in rendered and prompt.endswith("<|start_of_role|>assistant<|end_of_role|>")
    assert "<|start_of_role|>assistant" not in rendered  # the answer is never the assistant's turn
    with pytest.raises(UsageError) as err:
        tokenize_example(Example(tuple(conversation), None, "d.jsonl line 3"), tok, fmt)
    text = str(err.value)
    assert text.startswith("d.jsonl line 3: assistant message 1 of 1") and "granite-guardian-3.0.jinja" in text
    assert "<|start_of_role|>assistant<|end_of_role|>" in text and "--train-on all" in text
    whole = tokenize_example(Example(tuple(conversation), None, "d.jsonl line 3"), tok, fmt, train_on="all")
    assert whole.num_trainable == len(whole.input_ids) - 1


def test_answers_after_the_generation_prompt_are_not_refused_by_that_check():
    """The same tokenizer's own Granite 3.3 template opens the assistant turn with its generation prompt."""
    tok = family_tokenizer("granite-3.3")
    fmt = ChatFormat(tok.chat_template, origin="granite-3.3.jinja", date=DATE)
    tokenized = tokenize_example(Example((U1, A1), None, "d.jsonl line 3"), tok, fmt)
    assert squash(tok.decode(runs(tokenized)[0])) == squash("Four.<|end_of_text|>")


def test_a_template_that_drops_the_answer_trains_whole_with_train_on_all_as_the_refusal_says():
    tok = family_tokenizer("granite-3.3")
    drop = ("{% for m in messages %}{% if m.role == 'user' %}{{ '<|start_of_role|>user<|end_of_role|>' + m.content + "
            "'<|end_of_text|>' }}{% endif %}{% endfor %}")
    fmt, example = ChatFormat(drop, origin="drop.jinja"), Example((U1, A1), None, "d.jsonl line 1")
    with pytest.raises(UsageError, match="does not appear.*--train-on all"):
        tokenize_example(example, tok, fmt)
    whole = tokenize_example(example, tok, fmt, train_on="all")
    reference = tok.apply_chat_template([U1, A1], chat_template=drop, tokenize=True, return_dict=True)["input_ids"]
    assert whole.input_ids == list(reference)  # the text ends with a stop token: no EOS added
    assert whole.num_trainable == len(whole.input_ids) - 1


@pytest.mark.parametrize("family,dropped", [("phi-4-reasoning", True), ("phi-4", False), ("qwen3", False),
                                            ("llama-3.1", False)])
def test_run_log_warns_once_when_the_template_ignores_the_rows_system_messages(family, dropped):
    """Phi-4-reasoning's template writes its own system prompt and drops the one a row gives: the model is trained
    without it, which the data report says once, naming the template; a template that renders it says nothing."""
    from qlora.train.data import tokenize_dataset

    tok = family_tokenizer(family)
    fmt = ChatFormat(tok.chat_template, origin=f"{family}.jinja", date=DATE)
    shown = SYSTEM["content"] in tok.apply_chat_template([SYSTEM, U1, A1], tokenize=False,
                                                         chat_template=fmt.pinned_template())
    assert shown is not dropped  # the oracle: apply_chat_template's own text
    rows = [Example((SYSTEM, U1, A1), None, f"d.jsonl line {n}") for n in (1, 2)]
    rows.append(Example((U1, A1), None, "d.jsonl line 3"))
    summary = tokenize_dataset(rows, tok, fmt, stop_ids=stops(tok, family))[1].summary()
    warning = "does not render the system message"
    assert summary.count(warning) == int(dropped)
    if dropped:
        assert f"the chat template ({family}.jinja) does not render the system message of 2 rows" in summary
        assert "(first: d.jsonl line 1, d.jsonl line 2)" in summary and "--system-into-user" in summary
    bare = tokenize_dataset(rows[2:], tok, fmt, stop_ids=stops(tok, family))[1].summary()
    assert warning not in bare  # no row gives a system message


@pytest.mark.parametrize("family", ["qwen2.5", "llama-3.1", "granite-3.3"])
def test_an_answer_that_the_turn_header_spells_is_found_after_the_header(family):
    """A one-letter answer ("a") is also a letter of the assistant header the template writes before it: the
    answer is the text after the generation prompt, not the header's letter."""
    tok = family_tokenizer(family)
    fmt = ChatFormat(tok.chat_template, origin=f"{family}.jinja", date=DATE)
    conversation = [U1, {"role": "assistant", "content": "a"}]
    tokenized = tokenize_example(Example(tuple(conversation), None, "d.jsonl line 1"), tok, fmt,
                                 stop_ids=stops(tok, family))
    (run,) = runs(tokenized)
    assert squash(tok.decode(run)).startswith("a<") and "assistant" not in tok.decode(run)


def test_apertus_tool_call_is_trained_up_to_its_stop_token_and_the_answer_after_the_outputs():
    """Apertus stops a call on ``<|tools_suffix|>`` and its template writes the tool outputs inside the assistant's
    turn, the answer right after them (its generation prompt opens a new turn only when the conversation stops there).
    The call is trained up to and including that token, its arguments the object the template's ``tojson`` writes for
    OpenAI tool calls (not the JSON text its own content blocks concatenate), the outputs (given at inference) not at
    all, the answer after them with the EOS qlora adds, since the template writes no end after a final answer."""
    from qlora.train.data.formats import normalize
    from qlora.train.data.sources import Record

    tok = family_tokenizer("apertus")
    fmt = ChatFormat(tok.chat_template, origin="apertus.jinja", date=DATE)
    example = normalize([Record({"messages": CALL, "tools": [WEATHER]}, "t.jsonl line 3")])[0]
    tokenized = tokenize_example(example, tok, fmt, stop_ids=stops(tok, "apertus"))
    call, answer = runs(tokenized)
    assert tok.decode(call) == '<|tools_prefix|>[{"get_weather": {"city": "Paris"}}]<|tools_suffix|>'
    assert tok.decode(answer) == "It is sunny.<|assistant_end|>"
    assert "<|tools_suffix|>[Sunny, 21 C]It is sunny." in tok.decode(tokenized.input_ids)


@pytest.mark.parametrize("answer", [{"role": "assistant", "content": "Four.", "reasoning_content": "Two and two."},
                                    {"role": "assistant", "content": "<think>Two and two.</think>Four."}])
def test_gemma4_final_reasoning_is_trained_in_its_thinking_channel_in_thinking_mode(answer):
    """Gemma 4's template shows reasoning only before tool calls and writes nothing before a finished answer; its
    generation prompt closes an empty ``<|channel>thought\\n<channel|>`` unless ``enable_thinking`` puts ``<|think|>``
    in the system turn, after which the model writes ``<|channel>thought\\n...<channel|>`` itself (vLLM's Gemma 4
    reasoning parser documents that output). So a final answer with reasoning trains in thinking mode, token for token
    that prompt and that block; an answer without reasoning stays apply_chat_template's rendering."""
    tok = family_tokenizer("gemma-4")
    fmt = ChatFormat(tok.chat_template, origin="gemma-4.jinja", date=DATE)
    tokenized = tokenize_example(Example((U1, answer), None, "x"), tok, fmt, stop_ids=stops(tok, "gemma-4"))
    (run,) = runs(tokenized)
    assert tok.decode(run) == "<|channel>thought\nTwo and two.<channel|>Four.<turn|>"
    prompt = tok.apply_chat_template([U1], tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert "<|think|>" in prompt and prompt.endswith("<|turn>model\n")
    written = prompt + "<|channel>thought\nTwo and two.<channel|>Four.<turn|>\n"
    assert tokenized.input_ids == tok(written, add_special_tokens=False)["input_ids"]
    assert tokenized.reasoning_hidden == 0
    plain = tokenize_example(Example((U1, A1), None, "x"), tok, fmt, stop_ids=stops(tok, "gemma-4"))
    assert plain.input_ids == list(tok.apply_chat_template([U1, A1], tokenize=True, return_dict=True)["input_ids"])


def test_gemma4_earlier_turns_reasoning_stays_hidden_and_counted():
    """Only the final answer is what the model writes after the prompt: an earlier turn's reasoning, which the
    template drops, is not put back (and is counted for the run log)."""
    tok = family_tokenizer("gemma-4")
    fmt = ChatFormat(tok.chat_template, origin="gemma-4.jinja", date=DATE)
    conversation = as_family_takes_reasoning("gemma-4", CONVERSATIONS["think"])
    tokenized = tokenize_example(Example(tuple(conversation), None, "x"), tok, fmt, stop_ids=stops(tok, "gemma-4"))
    first, final = runs(tokenized)
    assert tok.decode(first) == "Four.<turn|>" and "Two and two" not in tok.decode(tokenized.input_ids)
    assert tok.decode(final) == "<|channel>thought\nThree and three.<channel|>Six.<turn|>"
    assert tokenized.reasoning_hidden == 1



def test_gemma4_tool_call_is_trained_up_to_the_tool_response_token_it_stops_on():
    """Gemma 4 stops a call on ``<|tool_response>`` (generation_config's eos ids 1, 106, 50), the first token of the
    result block its template writes right after the call: the call is trained up to and including it, the result
    (given at inference) not at all, the answer after it with ``<turn|>``."""
    from qlora.train.data.formats import normalize
    from qlora.train.data.sources import Record

    tok = family_tokenizer("gemma-4")
    fmt = ChatFormat(tok.chat_template, origin="gemma-4.jinja", date=DATE)
    example = normalize([Record({"messages": CALL, "tools": [WEATHER]}, "t.jsonl line 3")])[0]
    tokenized = tokenize_example(example, tok, fmt, stop_ids=stops(tok, "gemma-4"))
    call, answer = runs(tokenized)
    assert tok.decode(call) == '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>'
    assert tok.decode(answer) == "It is sunny.<turn|>"
    assert '<|tool_response>response:get_weather{value:<|"|>Sunny, 21 C<|"|>}<tool_response|>It is sunny.' in (
        tok.decode(tokenized.input_ids))


def test_gemma4_preference_pair_with_reasoning_shares_the_thinking_mode_prompt_or_is_refused():
    """A pair's prompt is rendered in the mode its answers are: both with reasoning, the thinking-mode prompt (its
    ``<|think|>`` system turn) and each answer's thinking channel; one with and one without reasoning follow
    different prompts, so the row is refused by name rather than compared on a prompt of a single ``<bos>``."""
    from qlora.train.data.preference import PreferenceExample, tokenize_pair

    tok = family_tokenizer("gemma-4")
    fmt = ChatFormat(tok.chat_template, origin="gemma-4.jinja", date=DATE)
    chosen = {"role": "assistant", "content": "Four.", "reasoning_content": "Two and two."}
    rejected = {"role": "assistant", "content": "Five.", "reasoning_content": "Two and three."}
    pair = tokenize_pair(PreferenceExample((U1,), (chosen,), (rejected,), "p.jsonl line 2"), tok, fmt,
                         stop_ids=stops(tok, "gemma-4"))
    prompt = tok.apply_chat_template([U1], tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert tok.decode(pair.prompt_ids) == prompt
    assert tok.decode(pair.chosen_ids) == "<|channel>thought\nTwo and two.<channel|>Four.<turn|>\n"
    assert tok.decode(pair.rejected_ids) == "<|channel>thought\nTwo and three.<channel|>Five.<turn|>\n"
    with pytest.raises(UsageError, match=r"p.jsonl line 2: one answer has reasoning .*thinking mode"):
        tokenize_pair(PreferenceExample((U1,), (chosen,), (A1,), "p.jsonl line 2"), tok, fmt,
                      stop_ids=stops(tok, "gemma-4"))


def test_apertus_reasoning_field_is_refused_by_line():
    """Apertus's template takes reasoning only inside its own content blocks (``<|inner_prefix|>``), reading no message
    field, and its tokens know no ``<think>``: a row's reasoning has no place there and is refused, never dropped."""
    tok = family_tokenizer("apertus")
    fmt = ChatFormat(tok.chat_template, origin="apertus.jinja", date=DATE)
    answer = {"role": "assistant", "content": "Four.", "reasoning_content": "Two and two."}
    with pytest.raises(UsageError, match=r'^r.jsonl line 4, message 2 of the conversation: field "reasoning_content"'
                                         r".*\(apertus.jinja\) has no place for reasoning"):
        tokenize_example(Example((U1, answer), None, "r.jsonl line 4"), tok, fmt)


@pytest.mark.parametrize("family", ["qwen3.5", "qwen3-next", "glm-5.1"])
def test_what_the_model_writes_after_a_generation_prompt_that_opens_think_is_trained(family):
    """Qwen3.5's, Qwen3-Next's and GLM-5.1's generation prompt ends with ``<think>``; an answer without reasoning is
    rendered after an empty block, so the model writes the block's end (``</think>``) before the answer: trained."""
    tok = family_tokenizer(family)
    fmt = ChatFormat(tok.chat_template, origin=f"{family}.jinja", date=DATE)
    prompt = tok.apply_chat_template([U1], tokenize=False, add_generation_prompt=True,
                                     chat_template=fmt.pinned_template())
    rendered = tok.apply_chat_template([U1, A1], tokenize=False, chat_template=fmt.pinned_template())
    assert prompt.rstrip().endswith("<think>") and rendered.startswith(prompt)  # the oracle: what follows the prompt
    written = rendered[len(prompt):].rstrip()
    tokenized = tokenize_example(Example((U1, A1), None, "d.jsonl line 1"), tok, fmt, stop_ids=stops(tok, family))
    (run,) = runs(tokenized)
    assert "</think>" in written and squash(written) in squash(tok.decode(run)), tok.decode(run)


@pytest.mark.parametrize("family", ["qwen3.5", "nemotron-nano-v2"])
def test_a_template_that_fails_on_a_prompt_without_a_user_turn_still_trains_a_greeting_first_row(family):
    """A row opening with an assistant greeting after the system message: Qwen3.5's and Nemotron Nano 2's templates
    render the whole conversation but fail on the system message alone (no user query), which is only the probe of
    where the greeting's turn opens, not the row: trained as apply_chat_template renders it."""
    tok = family_tokenizer(family)
    fmt = ChatFormat(tok.chat_template, origin=f"{family}.jinja", date=DATE)
    greeting = {"role": "assistant", "content": "Hello! How can I help?"}
    conversation = [SYSTEM, greeting, U1, A1]
    from jinja2.exceptions import TemplateError
    with pytest.raises(TemplateError):  # the oracle's own failure on the prefix
        tok.apply_chat_template([SYSTEM], tokenize=False, add_generation_prompt=True,
                                chat_template=fmt.pinned_template())
    tokenized = tokenize_example(Example(tuple(conversation), None, "d.jsonl line 1"), tok, fmt,
                                 stop_ids=stops(tok, family))
    reference = reference_ids(tok, conversation, fmt.pinned_template())
    assert tokenized.input_ids in (reference, reference + [tok.eos_token_id]) and len(runs(tokenized)) == 2
    for run, content in zip(runs(tokenized), (greeting["content"], A1["content"])):
        assert run[-1] in stops(tok, family)
        body = [t for t in run if t not in tok.all_special_ids]
        assert squash(tok.decode(body)) in visible_forms(content), tok.decode(run)


class CountingFormat(ChatFormat):
    """A chat format that counts its renderings (the cost of tokenizing a row)."""

    def render(self, tokenizer, messages, where="", /, **kwargs):
        object.__setattr__(self, "renders", getattr(self, "renders", 0) + 1)
        return super().render(tokenizer, messages, where, **kwargs)


@pytest.mark.parametrize("family", ["qwen3", "llama-3.1", "gpt-oss", "mistral-v0.3"])
def test_a_long_conversation_renders_its_template_as_often_as_a_short_one(family):
    """Where each answer's turn opens is probed with the generation prompt of the messages before it: one probe serves
    every turn it opens (a template's prompt is the same each turn), and a template that never reads
    add_generation_prompt has none to probe, so tokenizing grows with the conversation, not with its square."""
    tok = family_tokenizer(family)
    counts = []
    for conversation in (CONVERSATIONS["three turns"][:2], CONVERSATIONS["three turns"] * 8):
        fmt = CountingFormat(tok.chat_template, origin=f"{family}.jinja", date=DATE)
        tokenized = tokenize_example(Example(tuple(conversation), None, "d.jsonl line 1"), tok, fmt,
                                     stop_ids=stops(tok, family))
        assert len(runs(tokenized)) == sum(m["role"] == "assistant" for m in conversation)
        counts.append(fmt.renders)
    assert counts[1] == counts[0], counts


@pytest.mark.parametrize("family,answer", [
    *((f, a) for f in ("glm-4.5", "qwen3", "llama-3.1", "deepseek-v3.2", "kimi-k2") for a in "tsaei"),
    *(("gpt-oss", a) for a in "tseai")])
def test_a_one_letter_answer_is_never_taken_from_markup_text(family, answer):
    """A letter of a special token's text (Qwen3's and GLM's ``<think>`` after the assistant header, gpt-oss's
    ``<|message|>`` after ``<|start|>assistant``) is markup the template writes, never the answer: the answer is the
    text that renders the message."""
    tok = family_tokenizer(family)
    fmt = ChatFormat(tok.chat_template, origin=f"{family}.jinja", date=DATE)
    conversation = [U1, {"role": "assistant", "content": answer}]
    tokenized = tokenize_example(Example(tuple(conversation), None, "d.jsonl line 1"), tok, fmt,
                                 stop_ids=stops(tok, family))
    (run,) = runs(tokenized)
    assert run[-1] in stops(tok, family)
    header = max((k + 1 for k, t in enumerate(run[:-1]) if t in tok.all_special_ids), default=0)  # gpt-oss's channel
    body = [t for t in run[header:] if t not in tok.all_special_ids]
    assert squash(tok.decode(body)) in visible_forms(answer), tok.decode(run)


@pytest.mark.parametrize("family", ["yi-1.5", "phi-4-gguf", "gpt-oss", "qwen3.5", "nemotron-3-nano", "glm-4.5",
                                    "qwen3"])
@pytest.mark.parametrize("answer", ["a", "i", "is", "assistant"])
def test_a_short_answer_met_first_in_its_turn_header_trains_as_any_answer(family, answer):
    """A short answer is first met in the text of its turn's header: ``<|im_start|>assistant`` that Yi's and Phi-4's
    GGUF templates write with the user's turn (no generation prompt), gpt-oss's ``final`` that the model writes after
    its prompt, Qwen3.5's ``assistant`` before the empty ``<think>`` block. It is trained where it ends its turn, each
    turn of a conversation trained as with any other answer (``Qz``), not the header's letters."""
    tok = family_tokenizer(family)
    fmt = ChatFormat(tok.chat_template, origin=f"{family}.jinja", date=DATE)

    def trained(content: str) -> list[str]:
        reply = {"role": "assistant", "content": content}
        conversation = (U1, reply, {"role": "user", "content": "Again?"}, reply)
        tokenized = tokenize_example(Example(conversation, None, "d.jsonl line 1"), tok, fmt,
                                     stop_ids=stops(tok, family))
        return [tok.decode(run) for run in runs(tokenized)]

    assert trained(answer) == [run.replace("Qz", answer) for run in trained("Qz")]


@pytest.mark.parametrize("family", ["gpt-oss", "nemotron-3-nano", "kimi-k2-thinking", "qwen3", "deepseek-r1",
                                    "glm-4.5"])
@pytest.mark.parametrize("answer", ["a", "i", "t"])
def test_a_short_answer_after_reasoning_trains_with_its_reasoning(family, answer):
    """The same with reasoning: a short answer met first in the header (gpt-oss's ``analysis``, Kimi's ``assistant``)
    is still the answer after the reasoning, and the reasoning a template drops from the final turn (Kimi-K2-Thinking's)
    is put back before it, as for any answer."""
    tok = family_tokenizer(family)
    fmt = ChatFormat(tok.chat_template, origin=f"{family}.jinja", date=DATE)

    def trained(content: str) -> list[str]:
        reply = {"role": "assistant", "content": content, "reasoning_content": "Two and two."}
        tokenized = tokenize_example(Example((U1, reply), None, "d.jsonl line 1"), tok, fmt,
                                     stop_ids=stops(tok, family))
        return [tok.decode(run) for run in runs(tokenized)]

    assert trained(answer) == [run.replace("Qz", answer) for run in trained("Qz")]
