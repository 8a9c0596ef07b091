"""gpt-oss's harmony replies in ``qlora generate``, ``qlora chat`` and ``qlora serve``: the answer without channel markup.

A harmony model writes its reasoning on the analysis channel and its answer on the final one, each message between
special tokens and header words (``<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final
<|message|>...``); a plain decode dropped the tokens and kept the words (``analysisTwo and two.assistantfinalFour.``).
The model here is a real GPT-2 checkpoint whose greedy reply is scripted (tests/scripted_model.py) on gpt-oss's real
template and special tokens (tests/chat_families.py). Oracle: the reply is what the template writes after its
generation prompt for the assistant message (``apply_chat_template``), with its reasoning in ``thinking`` as the
template takes it; the answer shown is that message's ``content``, its calls its ``tool_calls``.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import GenerationConfig

import qlora
from chat_families import FAMILIES, U1, family_tokenizer
from qlora.cli.main import main
from qlora.infer.chat import Chat
from qlora.infer.harmony import HarmonyStream
from qlora.infer.messages import Message
from qlora.infer.template import render_chat
from scripted_model import build_scripted_model

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
ANSWER = {"role": "assistant", "content": "Four.", "thinking": "Two and two."}
CALL = {"role": "assistant", "content": "", "thinking": "The user wants the weather.", "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}


def written(tok, message: dict, tools: list | None = None) -> str:
    """What the template writes after the generation prompt for ``message`` (up to its stop token)."""
    prompt = tok.apply_chat_template([U1], tokenize=False, add_generation_prompt=True, tools=tools)
    rendered = tok.apply_chat_template([U1, message], tokenize=False, tools=tools)
    assert rendered.startswith(prompt)
    return rendered[len(prompt):]


def scripted(tmp_path, reply: str, tools: list | None = None):
    """A gpt-oss-tokenizer model that writes ``reply`` after the generation prompt of U1."""
    tok = family_tokenizer("gpt-oss")
    prompt = tok.apply_chat_template([U1], tokenize=False, add_generation_prompt=True, tools=tools)
    prompt_len, script = len(tok(prompt, add_special_tokens=False).input_ids), tok(reply, add_special_tokens=False).input_ids
    positions = 1 << (prompt_len + len(script) + 16).bit_length()  # room for the reply and a little more
    out = build_scripted_model(tmp_path / "model", tok, prompt_len, script, positions=positions)
    config = GenerationConfig.from_pretrained(out)
    config.eos_token_id = [tok.convert_tokens_to_ids(t) for t in FAMILIES["gpt-oss"]["generation_eos"]]
    config.save_pretrained(out)
    return out


def load(model_dir):
    return qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")


def test_chat_shows_the_final_channel_and_remembers_it_as_the_template_takes_it(tmp_path):
    tok = family_tokenizer("gpt-oss")
    reply = written(tok, ANSWER)
    assert reply.startswith("<|channel|>analysis<|message|>Two and two.<|end|>") and reply.endswith("<|return|>")
    model, tokenizer = load(scripted(tmp_path, reply))
    chat = Chat(model, tokenizer, temperature=0, max_new_tokens=80)
    pieces = list(chat.send(U1["content"]))
    assert "".join(pieces) == "Four." and chat.last_reply == "Four."
    # the next turn's prompt is the template's own for the conversation with that answer
    later = chat.prompt_messages("And three plus three?")
    oracle = tok.apply_chat_template([U1, {"role": "assistant", "content": "Four."},
                                      {"role": "user", "content": "And three plus three?"}], tokenize=False,
                                     add_generation_prompt=True)
    assert render_chat(tokenizer, later) == oracle


def test_generate_prints_the_final_channel(tmp_path, capsys):
    tok = family_tokenizer("gpt-oss")
    model_dir = scripted(tmp_path, written(tok, ANSWER))
    common = ["generate", "--model", str(model_dir), "--template", "tokenizer", "--prompt", U1["content"],
              "--temperature", "0", "--max-new-tokens", "80", "--compute-dtype", "fp32"]
    assert main(common) == 0
    assert capsys.readouterr().out == "Four.\n"
    model, _ = load(model_dir)  # two adapters that change nothing (B = 0): one batch row each, the same reply
    qlora.add_lora(model, r=4, dropout=0.0, verbose=False, target_modules=["c_attn"])
    for name in ("a", "b"):
        qlora.save_adapter(model, tmp_path / name)
    assert main([*common, "--adapter", str(tmp_path / "a"), "--adapter", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.splitlines() == ["[a] Four.", "[b] Four."]


def test_chat_takes_a_harmony_tool_call_without_showing_its_markup(tmp_path):
    tok = family_tokenizer("gpt-oss")
    reply = written(tok, CALL, [WEATHER])
    assert " to=functions.get_weather<|channel|>commentary" in reply and reply.endswith("<|call|>")
    model, tokenizer = load(scripted(tmp_path, reply, [WEATHER]))
    chat = Chat(model, tokenizer, tools=[WEATHER], temperature=0, max_new_tokens=100)
    assert "".join(chat.send(U1["content"])) == ""
    ((call_id, call),) = chat.pending_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert chat.last_reasoning == "The user wants the weather."
    # the model goes on after the analysis that led to its call, as the template writes the conversation
    seen = []
    chat.llm.reply = lambda messages, tools=None: (seen.append(render_chat(tokenizer, messages, tools=tools)),
                                                   (iter(["It is sunny."]), None))[1]
    assert "".join(chat.send_tool_results(["sunny"])) == "It is sunny."
    answered = {**CALL, "tool_calls": [{**CALL["tool_calls"][0], "id": call_id}]}
    oracle = tok.apply_chat_template([U1, answered, {"role": "tool", "content": "sunny", "tool_call_id": call_id}],
                                     tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert seen == [oracle]
    assert "<|channel|>analysis<|message|>The user wants the weather.<|end|>" in oracle
    # a later turn drops that analysis, as the template drops it once a final answer follows
    later = chat.prompt_messages("And in Rome?")
    assert render_chat(tokenizer, later, tools=[WEATHER]) == tok.apply_chat_template(
        [U1, answered, {"role": "tool", "content": "sunny", "tool_call_id": call_id},
         {"role": "assistant", "content": "It is sunny."}, {"role": "user", "content": "And in Rome?"}],
        tools=[WEATHER], tokenize=False, add_generation_prompt=True)


def test_a_call_with_both_a_preamble_and_reasoning_renders_without_the_reasoning():
    """gpt-oss's template refuses a call message with both text and reasoning; the prompt keeps its text, as it was
    rendered before the reasoning was given to the template."""
    tok = family_tokenizer("gpt-oss")
    call = Message("assistant", "Let me look.", tuple(CALL["tool_calls"]), reasoning="The user wants the weather.")
    rendered = render_chat(tok, [Message("user", U1["content"]), call], add_generation_prompt=False, tools=[WEATHER])
    assert rendered == render_chat(tok, [Message("user", U1["content"]), replace(call, reasoning="")],
                                   add_generation_prompt=False, tools=[WEATHER])


@pytest.mark.parametrize("family,key", [("qwen3", "reasoning_content"), ("gpt-oss", "thinking")])
def test_a_call_renders_with_its_reasoning_as_the_template_takes_it(family, key):
    """Within the current turn a template writes the reasoning before a call (gpt-oss's analysis, Qwen3's
    ``<think>`` block): a message's ``reasoning`` reaches it under the name it reads."""
    tok = family_tokenizer(family)
    call = {**CALL, "thinking": None, key: "The user wants the weather."}
    history = [U1, {k: v for k, v in call.items() if v is not None},
               {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    oracle = tok.apply_chat_template(history, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert "The user wants the weather." in oracle
    ours = [Message("user", U1["content"]), Message("assistant", "", tuple(CALL["tool_calls"]),
                                                    reasoning="The user wants the weather."),
            Message("tool", "sunny", tool_call_id="call_1")]
    assert render_chat(tok, ours, tools=[WEATHER]) == oracle


def test_serve_renders_the_reasoning_of_a_call_in_the_history(tmp_path):
    """A client sends back the assistant's call with its ``reasoning`` (vLLM's field, as serve returned it) or
    ``reasoning_content``: the prompt is the template's with it. Oracle: ``apply_chat_template``'s token count."""
    tok = family_tokenizer("gpt-oss")
    history = [U1, CALL, {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
    oracle = tok.apply_chat_template(history, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    sent = [U1, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        history[2]]
    for client in served(scripted(tmp_path, written(tok, CALL, [WEATHER]), [WEATHER])):
        for field in ("reasoning", "reasoning_content"):
            sent[1][field] = CALL["thinking"]
            reply = client.chat.completions.create(model="tiny", messages=sent, tools=[WEATHER], temperature=0,
                                                   max_tokens=1)
            assert reply.usage.prompt_tokens == len(tok(oracle, add_special_tokens=False).input_ids), field
            del sent[1][field]


@pytest.mark.parametrize("text,shown,reasoning", [
    ("<|channel|>analysis<|message|>Hm.<|end|><|start|>assistant<|channel|>final<|message|>Yes.", "Yes.", "Hm."),
    ("<|channel|>final<|message|>Yes.<|return|>", "Yes.", ""),
    ("<|channel|>commentary<|message|>Looking.<|end|><|start|>assistant<|channel|>final<|message|>Yes.",
     "Looking.\n\nYes.", ""),  # a preamble (commentary without a recipient) is for the user
    ("Plain words, no header.", "Plain words, no header.", ""),  # a model never trained in harmony
    ("<|channel|>analysis<|message|>Cut off by the token lim", "", "Cut off by the token lim")])
def test_harmony_stream_shows_what_the_user_reads_piece_by_piece(text, shown, reasoning):
    tok = family_tokenizer("gpt-oss")
    ids = tok(text, add_special_tokens=False).input_ids
    split, pieces = HarmonyStream(), []
    for k in range(len(ids)):  # the text as decoding releases it, one token at a time
        pieces.append(split.push(tok.decode(ids[k:k + 1])))
    pieces.append(split.finish()[0])
    assert "".join(pieces) == shown and split.reasoning == reasoning
    assert not any(word in "".join(pieces) for word in ("analysis", "assistant", "final", "<|"))
    taken, thoughts = HarmonyStream(), []
    for k in range(len(ids)):  # the reasoning taken as it grows adds up to the whole
        taken.push(tok.decode(ids[k:k + 1]))
        thoughts.append(taken.take_reasoning())
    taken.finish()
    assert "".join(thoughts) + taken.take_reasoning() == reasoning


def served(model_dir):
    """An openai client of ``qlora serve`` on the model (a context manager's iterator: the server runs while open)."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app
    from qlora.serve.server import BackgroundServer

    model, tokenizer = load(model_dir)
    batcher = ContinuousBatcher(model.eval(), tokenizer, max_batch_size=2,
                                context_length=model.config.n_positions).start()
    try:
        with BackgroundServer(build_app(batcher, "tiny", [])) as server:
            yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    finally:
        batcher.close()


def test_serve_answers_with_the_final_channel(tmp_path):
    tok = family_tokenizer("gpt-oss")
    for client in served(scripted(tmp_path, written(tok, ANSWER))):
        ask = dict(model="tiny", messages=[U1], temperature=0, max_tokens=80)
        choice = client.chat.completions.create(**ask).choices[0]
        assert (choice.message.content, choice.finish_reason) == ("Four.", "stop")
        assert choice.message.reasoning == "Two and two."  # the analysis channel, in vLLM's field
        chunks = [c.choices[0] for c in client.chat.completions.create(**ask, stream=True) if c.choices]
        assert "".join(c.delta.content or "" for c in chunks) == "Four." and chunks[-1].finish_reason == "stop"
        assert "".join(getattr(c.delta, "reasoning", None) or "" for c in chunks) == "Two and two."
        reply = client.responses.create(model="tiny", input=U1["content"], temperature=0, max_output_tokens=80)
        assert (reply.output_text, reply.status) == ("Four.", "completed")
        events = list(client.responses.create(model="tiny", input=U1["content"], temperature=0,
                                              max_output_tokens=80, stream=True))
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Four."


def test_serve_returns_a_harmony_tool_call(tmp_path):
    tok = family_tokenizer("gpt-oss")
    for client in served(scripted(tmp_path, written(tok, CALL, [WEATHER]), [WEATHER])):
        ask = dict(model="tiny", messages=[U1], tools=[WEATHER], temperature=0, max_tokens=100)
        choice = client.chat.completions.create(**ask).choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        chunks = [c.choices[0] for c in client.chat.completions.create(**ask, stream=True) if c.choices]
        assert not "".join(c.delta.content or "" for c in chunks) and chunks[-1].finish_reason == "tool_calls"
        (streamed,) = [t for c in chunks for t in c.delta.tool_calls or ()]
        assert json.loads(streamed.function.arguments) == {"city": "Paris"}


def test_a_reply_in_no_channel_prints_as_decode_shows_it(tmp_path, capsys):
    """A model never trained in harmony (a fine-tune, a random one) writes text with a stray markup token in it: the
    reply is plain text, and the token is left out as decoding leaves a special token out (transformers' oracle)."""
    tok = family_tokenizer("gpt-oss")
    reply = "Four<|end|> and five.<|return|>"
    model_dir = scripted(tmp_path, reply)
    ids = tok(reply, add_special_tokens=False).input_ids
    assert main(["generate", "--model", str(model_dir), "--template", "tokenizer", "--prompt", U1["content"],
                 "--temperature", "0", "--max-new-tokens", "80", "--compute-dtype", "fp32"]) == 0
    assert capsys.readouterr().out == tok.decode(ids[:-1], skip_special_tokens=True) + "\n" == "Four and five.\n"
