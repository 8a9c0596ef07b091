"""Reasoning replies of the real chat templates in ``qlora chat``, ``qlora generate`` and ``qlora serve``.

A reasoning model writes its chain of thought inside its template's markup before the answer (``<think>...</think>``,
``[THINK]...[/THINK]``, ``<|START_THINKING|>...``, ``<|channel>thought...<channel|>``, or only ``</think>`` after a
prompt that opened the block). Where that markup is special tokens a plain decode dropped it and ran the reasoning
into the answer (``Two and two.Four.``), which the chat memory kept as the answer; where it is text, the reply showed
it. The model here is a real GPT-2 checkpoint whose greedy reply is scripted (tests/scripted_model.py) on each family's
real template and special tokens (tests/chat_families.py). Oracle: the reply is the text training writes after the
generation prompt for an answer with reasoning (``tokenize_example``, which the template renders its own way); the
answer shown is that message's ``content``, the reasoning its ``reasoning_content``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

import qlora
from chat_families import DATE, FAMILIES, U1, family_tokenizer
from qlora.cli.main import main
from qlora.infer.chat import Chat
from qlora.infer.harmony import is_harmony
from qlora.infer.messages import Message
from qlora.infer.reasoning_reply import ReasoningMarkup, ReasoningStream, reasoning_markup
from qlora.infer.template import render_chat
from qlora.model.chat_format import ChatFormat, stop_token_ids
from qlora.train.data import Example, tokenize_example
from scripted_model import build_scripted_model

ANSWER = {"role": "assistant", "content": "Four.", "reasoning_content": "Two and two."}
THINKING = {"enable_thinking": True, "thinking": True}  # the switch of templates that think only when asked


def stops(tok, family: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in FAMILIES[family]["generation_eos"]]


def written(family: str) -> tuple[str, str] | None:
    """(prompt, reply): the prompt ``qlora chat`` renders in thinking mode and what training writes after it for
    ANSWER, up to its stop token; None when training renders another prompt before the answer."""
    tok = family_tokenizer(family)
    fmt = ChatFormat(tok.chat_template, origin=f"{family}.jinja", date=DATE, template_kwargs=THINKING)
    ids = tokenize_example(Example((U1, ANSWER), None, "x"), tok, fmt,
                           stop_ids=stop_token_ids(tok, stops(tok, family))).input_ids
    text = tok.decode(ids, skip_special_tokens=False)
    prompt = render_chat(tok, [Message("user", U1["content"])], chat_format=fmt)
    if not text.startswith(prompt):
        return None
    reply = tok(text[len(prompt):], add_special_tokens=False).input_ids
    end = next(i for i, t in enumerate(reply + [tok.eos_token_id]) if t in stop_token_ids(tok, stops(tok, family)))
    return prompt, tok.decode(reply[:end + 1], skip_special_tokens=False)


REASONING = [f for f in FAMILIES if not is_harmony(family_tokenizer(f), family_tokenizer(f).chat_template)
             and reasoning_markup(family_tokenizer(f), ChatFormat(family_tokenizer(f).chat_template, date=DATE))]
CASES = [f for f in REASONING if written(f) is not None]


def test_the_reasoning_families_are_many_and_most_are_scripted():
    """The markup is found for the reasoning families (not guessed from names), and most render their prompt as
    ``qlora chat`` does, so the tests below are not vacuous."""
    assert {"qwen3", "deepseek-r1-distill", "ministral-3-reasoning", "command-a-reasoning", "gemma-4", "seed-oss",
            "qwen3.5", "glm-4.5", "kimi-k2-thinking"} <= set(REASONING)
    assert not {"llama-3.1", "gemma-3", "mistral-v0.3", "phi-4"} & set(REASONING)  # no place for reasoning
    assert len(CASES) >= len(REASONING) - 3 >= 20


def scripted(tmp_path, family: str, prompt: str, reply: str):
    tok = family_tokenizer(family)
    prompt_len, script = len(tok(prompt, add_special_tokens=False).input_ids), tok(reply, add_special_tokens=False).input_ids
    out = build_scripted_model(tmp_path / f"model-{family}", tok, prompt_len, script,
                               positions=1 << (prompt_len + len(script) + 16).bit_length())
    config = GenerationConfig.from_pretrained(out)
    config.eos_token_id = stops(tok, family)
    config.save_pretrained(out)
    return out


def load(model_dir):
    return qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("family", CASES)
def test_chat_shows_the_answer_and_keeps_the_reasoning_apart(family, tmp_path):
    prompt, reply = written(family)
    model, tokenizer = load(scripted(tmp_path, family, prompt, reply))
    fmt = ChatFormat(tokenizer.chat_template, origin=f"{family}.jinja", date=DATE, template_kwargs=THINKING)
    chat = Chat(model, tokenizer, chat_format=fmt, temperature=0, max_new_tokens=60)
    thoughts: list[str] = []
    chat.on_reasoning = thoughts.append  # what ``qlora chat`` shows on stderr while the model thinks
    pieces = list(chat.send(U1["content"]))
    assert "".join(pieces).rstrip() == "Four." and chat.last_reply == "Four.", (reply, pieces)  # Nemotron: "\n"
    assert chat.last_reasoning == "Two and two.", reply
    assert "".join(thoughts) == "Two and two.", (reply, thoughts)


@pytest.mark.parametrize("family", ["qwen3", "ministral-3-reasoning", "seed-oss", "deepseek-r1-distill"])
def test_generate_prints_the_answer(family, tmp_path, capsys):
    prompt, reply = written(family)
    model_dir = scripted(tmp_path, family, prompt, reply)
    fmt = ChatFormat(family_tokenizer(family).chat_template, origin=f"{family}.jinja", date=DATE)
    template = tmp_path / "t.jinja"
    template.write_text(fmt.pinned_template())
    assert main(["generate", "--model", str(model_dir), "--template", str(template), "--prompt", U1["content"],
                 "--chat-template-kwargs", '{"enable_thinking": true, "thinking": true}', "--temperature", "0",
                 "--max-new-tokens", "60", "--compute-dtype", "fp32"]) == 0
    out = capsys.readouterr()
    assert out.out == "Four.\n"
    assert out.err.endswith("(reasoning) Two and two.\n\n"), out.err  # the reasoning shown apart, on stderr


@pytest.mark.parametrize("family", ["qwen3", "ministral-3-reasoning", "qwen3.5", "deepseek-r1-distill", "qwq"])
def test_serve_content_is_the_answer(family, tmp_path):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    prompt, reply = written(family)
    model, tokenizer = load(scripted(tmp_path, family, prompt, reply))
    fmt = ChatFormat(tokenizer.chat_template, origin=f"{family}.jinja", date=DATE)
    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=2,
                                context_length=model.config.n_positions).start()
    try:
        with BackgroundServer(build_app(batcher, "tiny", [], chat_formats={None: fmt},
                                        template_kwargs=THINKING)) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
            ask = dict(model="tiny", messages=[U1], temperature=0, max_tokens=40)
            choice = client.chat.completions.create(**ask).choices[0]
            assert (choice.message.content, choice.finish_reason) == ("Four.", "stop")
            assert choice.message.reasoning == "Two and two."  # vLLM's field, as its reasoning parsers fill it
            chunks = [c.choices[0] for c in client.chat.completions.create(**ask, stream=True) if c.choices]
            assert "".join(c.delta.content or "" for c in chunks) == "Four."
            thoughts = [getattr(c.delta, "reasoning", None) or "" for c in chunks]
            assert "".join(thoughts) == "Two and two."
            last_thought = max(i for i, t in enumerate(thoughts) if t)
            assert not any(c.delta.content for c in chunks[:last_thought])  # the reasoning streams before the answer
            assert sum(1 for t in thoughts if t) > 1  # as it is written, not at once when its block closes
            cut = dict(ask, max_tokens=3)  # the limit comes inside the reasoning: all of it is reasoning (vLLM's)
            alone = client.chat.completions.create(**cut).choices[0]
            assert not alone.message.content and alone.message.reasoning and alone.finish_reason == "length"
            chunks = [c.choices[0] for c in client.chat.completions.create(**cut, stream=True) if c.choices]
            assert "".join(getattr(c.delta, "reasoning", None) or "" for c in chunks) == alone.message.reasoning
            assert not "".join(c.delta.content or "" for c in chunks)
            ask = dict(model="tiny", input=U1["content"], temperature=0, max_output_tokens=40)
            reply = client.responses.create(**ask)
            assert reply.output_text == "Four." and [item.type for item in reply.output] == ["reasoning", "message"]
            assert [part.text for part in reply.output[0].content] == ["Two and two."]  # vLLM's reasoning_text part
            events = list(client.responses.create(**ask, stream=True))
            deltas = {kind: "".join(e.delta for e in events if e.type == kind)
                      for kind in ("response.reasoning_text.delta", "response.output_text.delta")}
            assert deltas == {"response.reasoning_text.delta": "Two and two.", "response.output_text.delta": "Four."}
            order = [e.type for e in events if e.type.endswith(".delta")]
            assert order == sorted(order, key=lambda kind: "output_text" in kind)  # the reasoning streams first
            done = events[-1].response
            assert done.status == "completed" and done.output_text == "Four."
            assert [(item.type, item.id) for item in done.output] == \
                [(e.item.type, e.item.id) for e in events if e.type == "response.output_item.done"]
            assert [item.model_dump(exclude={"id"}) for item in done.output] == \
                [item.model_dump(exclude={"id"}) for item in reply.output]
            if reasoning_markup(tokenizer, fmt).opening in reply:  # a block the reply opens (not its prompt: see
                cut = client.responses.create(**ask | {"max_output_tokens": 3})  # test_reasoning_stream_splits...)
                assert cut.status == "incomplete" and cut.output_text == ""  # the limit came inside the reasoning
                assert [(item.type, item.status) for item in cut.output] == [("reasoning", "incomplete"),
                                                                              ("message", "incomplete")]
    finally:
        batcher.close()


QWEN3 = ReasoningMarkup("<think>", "</think>")


@pytest.mark.parametrize("prompt,text,shown,reasoning", [
    ("<|im_start|>assistant\n", "<think>\nHm.\n</think>\n\nYes.", "Yes.", "Hm."),
    ("<|im_start|>assistant\n", "Yes, <think> is a tag.", "Yes, <think> is a tag.", ""),  # opens no block
    ("<|im_start|>assistant\n<think>\n\n</think>\n\n", "Yes.", "Yes.", ""),  # the prompt closed the block
    ("<|im_start|>assistant\n<think>\n", "Hm.\n</think>\n\nYes.", "Yes.", "Hm."),  # the prompt opened it
    ("<|im_start|>assistant\n", "<think>\nCut off by the token lim", "", "Cut off by the token lim"),
    ("<|im_start|>assistant\n", "<thi", "<thi", ""),  # too short to tell: the answer
    # never closed after the prompt opened it: reasoning, as vLLM's DeepSeek-R1 parser (R1, QwQ) reads it
    ("<|im_start|>assistant\n<think>\n", "Yes.", "", "Yes."),
    ("<|im_start|>assistant\n<think>\n", "Cut at </thi", "", "Cut at </thi"),  # a closing tag's start, at the end
    ("<|im_start|>assistant\n", "<think>\nCut at </thi", "", "Cut at </thi")])
def test_reasoning_stream_splits_piece_by_piece(prompt, text, shown, reasoning):
    split, pieces, thoughts = ReasoningStream(QWEN3, prompt), [], []
    for ch in text:  # the text as decoding releases it, a character at a time
        pieces.append(split.push(ch))
        thoughts.append(split.take_reasoning())
    pieces.append(split.finish()[0])
    thoughts.append(split.take_reasoning())
    assert "".join(pieces) == shown and split.reasoning == reasoning
    assert "".join(thoughts) == reasoning  # taken piece by piece, never a part of the closing tag


def test_the_reasoning_of_a_block_the_prompt_opened_streams_before_it_closes():
    """DeepSeek-R1's and QwQ's generation prompts end with ``<think>\n``: the reply's reasoning is taken as it is
    written, as vLLM streams its ``reasoning`` deltas, not held back until ``</think>``."""
    split = ReasoningStream(QWEN3, "<|im_start|>assistant\n<think>\n")
    taken, shown = [], []
    for ch in "Two and two.\n</think>\n\nFour.":
        shown.append(split.push(ch))
        taken.append(split.take_reasoning())
    closing = "Two and two.\n</think>".index("</think>")
    assert "".join(taken[:closing]) == "Two and two."  # all of it before the closing tag came
    shown.append(split.finish()[0])
    assert "".join(shown) == "Four." and "".join(taken) == split.reasoning == "Two and two."


def test_a_call_after_the_reasoning_is_parsed_and_nothing_is_shown():
    """Qwen3 with tools: the reasoning, then a ``<tool_call>`` block: the call is the answer's, the reasoning kept."""
    from qlora.infer.tool_calls import ToolCallStream, tool_call_format

    tok = family_tokenizer("qwen3")
    split = ReasoningStream(QWEN3, "<|im_start|>assistant\n",
                            ToolCallStream(tool_call_format(tok.chat_template), ["get_weather"]))
    text = '<think>\nThe weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    shown = "".join(split.push(ch) for ch in text)
    tail, calls = split.finish()
    assert shown + tail == "" and split.reasoning == "The weather."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city": "Paris"}')]


@pytest.mark.parametrize("family", ["ministral-3-reasoning", "command-a-reasoning"])
def test_a_stray_markup_token_in_the_answer_is_left_out_as_decode_leaves_it(family, tmp_path, capsys):
    """Markup that is special tokens, written where it marks nothing (after the answer began: a fine-tune, a random
    model), is not reasoning: the reply prints as ``decode(skip_special_tokens=True)`` prints it, the oracle a plain
    transformers user compares with."""
    tok = family_tokenizer(family)
    prompt, _ = written(family)
    markup = reasoning_markup(tok, ChatFormat(tok.chat_template, date=DATE, template_kwargs=THINKING))
    stop = tok.convert_ids_to_tokens(stops(tok, family)[0])
    reply = f"Four {markup.opening} five {markup.closing} six.{stop}"
    ids = tok(reply, add_special_tokens=False).input_ids
    assert {i for i in ids if i in tok.all_special_ids} - set(stops(tok, family)), "the markup is special tokens"
    model_dir = scripted(tmp_path, family, prompt, reply)
    template = tmp_path / "t.jinja"
    template.write_text(ChatFormat(tok.chat_template, origin=f"{family}.jinja", date=DATE).pinned_template())
    assert main(["generate", "--model", str(model_dir), "--template", str(template), "--prompt", U1["content"],
                 "--chat-template-kwargs", '{"enable_thinking": true, "thinking": true}', "--temperature", "0",
                 "--max-new-tokens", "60", "--compute-dtype", "fp32"]) == 0
    out = capsys.readouterr()
    assert out.out == tok.decode(ids[:-1], skip_special_tokens=True) + "\n", out
    assert "(reasoning)" not in out.err
