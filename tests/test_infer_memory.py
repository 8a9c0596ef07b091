"""Each memory kind: what it keeps and drops, its prompts and parsing (scripted LLM), and the real model path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qlora.infer.memory import (
    ConversationBufferMemory, ConversationBufferWindowMemory, ConversationEntityMemory, ConversationKGMemory,
    ConversationSummaryBufferMemory, ConversationSummaryMemory, ConversationTokenBufferMemory,
    VectorStoreRetrieverMemory)
from qlora.infer.memory.entity import parse_entities
from qlora.infer.memory.kg import parse_triples
from qlora.infer.memory.prompts import ENTITY_EXTRACTION_PROMPT, SUMMARY_PROMPT
from qlora.infer.messages import Message


class ScriptedLLM:
    """Returns queued answers in order and records the prompts it was given."""

    def __init__(self, *answers: str) -> None:
        self.answers = list(answers)
        self.prompts: list[str] = []

    def complete(self, prompt: str, **options) -> str:
        self.prompts.append(prompt)
        return self.answers.pop(0)


def _talk(memory, turns):
    for i in range(turns):
        memory.save_context({"input": f"q{i}"}, {"output": f"a{i}"})


def test_buffer_keeps_every_turn_in_order():
    memory = ConversationBufferMemory()
    _talk(memory, 3)
    assert memory.load_memory_variables({"input": "x"}) == {"history": "Human: q0\nAI: a0\nHuman: q1\nAI: a1\nHuman: q2\nAI: a2"}
    messages = ConversationBufferMemory(session=memory.session, return_messages=True).load_memory_variables({})["history"]
    assert messages[0] == Message("user", "q0") and messages[-1] == Message("assistant", "a2")
    memory.clear()
    assert memory.load_memory_variables({})["history"] == ""


def test_window_keeps_last_k_exchanges():
    memory = ConversationBufferWindowMemory(k=2, return_messages=True)
    _talk(memory, 5)
    assert [m.content for m in memory.load_memory_variables({})["history"]] == ["q3", "a3", "q4", "a4"]


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_STEPS = [Message("assistant", "", (CALL,)), Message("tool", "21 C", tool_call_id="call_1")]


def _talk_with_tools(memory, turns):
    """Exchanges whose odd ones call a tool before answering."""
    for i in range(turns):
        memory.save_context({"input": f"q{i}"}, {"output": f"a{i}"}, steps=TOOL_STEPS if i % 2 else ())


def test_tool_calls_and_results_belong_to_their_exchange():
    """Windows, token budgets, summaries and derived memories count an exchange with tool steps as one,
    and recall it whole: the calls and results come with the answer they led to."""
    from qlora.infer.memory.base import exchanges

    window = ConversationBufferWindowMemory(k=1, return_messages=True)
    _talk_with_tools(window, 2)
    assert window.buffer() == [Message("user", "q1"), *TOOL_STEPS, Message("assistant", "a1")]
    window.k = 2
    assert [m.content for m in window.buffer()] == ["q0", "a0", "q1", "", "21 C", "a1"]
    found = list(exchanges(window.session.entries()))
    assert [(e.user.content, e.reply.content, e.user_id, e.through) for e in found] == [("q0", "a0", 1, 2),
                                                                                         ("q1", "a1", 3, 6)]
    window.session.add_messages([Message("user", "q2"), *TOOL_STEPS])  # a turn whose answer never came
    assert list(exchanges(window.session.entries()))[-1].through == 6 and window.buffer()[-1].content == "a1"
    assert "AI: (tool call: get_weather {\"city\": \"Paris\"})\nTool: 21 C\nAI: a1" in \
        ConversationBufferMemory(session=window.session).load_memory_variables({})["history"]
    llm = ScriptedLLM("s1", "s2")
    summary = ConversationSummaryMemory(llm)
    _talk_with_tools(summary, 2)
    assert "(tool call: get_weather" not in llm.prompts[0] and "Tool: 21 C" in llm.prompts[1]


def test_token_buffer_counts_tool_steps_and_keeps_them_whole(tiny_tokenizer):
    memory = ConversationTokenBufferMemory(tiny_tokenizer, max_token_limit=10**6)
    _talk_with_tools(memory, 2)
    every = memory.session.messages()
    memory.max_token_limit = memory.num_tokens(every[2:])  # exactly the exchange with the tool steps
    assert memory.buffer() == every[2:]
    memory.max_token_limit -= 1
    assert memory.buffer() == []


def test_token_buffer_keeps_newest_whole_exchanges_by_per_message_count(tiny_tokenizer):
    memory = ConversationTokenBufferMemory(tiny_tokenizer, max_token_limit=10**6)
    for i in range(4):
        memory.save_context({"input": f"The quick brown fox {i}"}, {"output": "jumps over the lazy dog."})
    every = memory.session.messages()
    per_message = [len(tiny_tokenizer(f"{'Human' if m.role == 'user' else 'AI'}: {m.content}",
                                      add_special_tokens=False).input_ids) for m in every]
    assert memory.num_tokens(every) == sum(per_message)  # LangChain's rule: each message alone, summed
    last_two = sum(per_message[4:])
    memory.max_token_limit = last_two  # exactly the last two exchanges fit
    assert memory.buffer() == every[4:]
    memory.max_token_limit = last_two - 1  # one token short: a whole exchange goes, never half of one
    assert memory.buffer() == every[6:]
    memory.max_token_limit = per_message[-1] + per_message[-2] - 1
    assert memory.buffer() == []


def test_token_buffer_cost_does_not_grow_with_the_conversation(tmp_path, tiny_tokenizer):
    """A loose ratio check; the measured figures are in BENCHMARKS.md (bench/chat_memory.py)."""
    import time

    from qlora.infer.store import ChatStore

    def per_call(exchanges: int) -> float:
        store = ChatStore(tmp_path / f"{exchanges}.sqlite")
        session = store.session("s", "token")
        for start in range(0, exchanges, 500):
            n = min(500, exchanges - start)
            session.add_messages([Message(role, f"message {start + i} from the {role}")
                                  for i in range(n) for role in ("user", "assistant")])
        memory = ConversationTokenBufferMemory(tiny_tokenizer, max_token_limit=200, session=session)
        memory.buffer()  # warm the token-count cache, as after the first turn
        times = []
        for _ in range(5):
            start = time.perf_counter()
            kept = memory.buffer()
            times.append(time.perf_counter() - start)
        assert kept and kept[0].role == "user" and memory.num_tokens(kept) <= 200
        store.close()
        return sorted(times)[2]

    small, large = per_call(100), per_call(5000)
    assert large < 3 * small + 0.005, (small, large)


def test_summary_is_progressive_and_written_by_the_llm():
    llm = ScriptedLLM("S1", "S2")
    memory = ConversationSummaryMemory(llm)
    _talk(memory, 2)
    assert llm.prompts[0] == SUMMARY_PROMPT.format(summary="", new_lines="Human: q0\nAI: a0")
    assert llm.prompts[1] == SUMMARY_PROMPT.format(summary="S1", new_lines="Human: q1\nAI: a1")
    assert memory.load_memory_variables({"input": "x"}) == {"history": "S2"}
    memory.return_messages = True
    assert memory.load_memory_variables({})["history"] == [Message("system", "S2")]


def test_summary_buffer_folds_old_turns_into_the_summary(tiny_tokenizer):
    llm = ScriptedLLM("folded")
    memory = ConversationSummaryBufferMemory(llm, tiny_tokenizer, max_token_limit=10**6)
    memory.save_context({"input": "hi"}, {"output": "yo"})
    assert llm.prompts == []  # under the limit: nothing summarized
    memory.max_token_limit = memory.num_tokens([Message("user", "The quick brown fox jumps"),
                                                Message("assistant", "over the lazy dog.")])
    memory.save_context({"input": "The quick brown fox jumps"}, {"output": "over the lazy dog."})
    kept = memory.buffer()
    assert memory.session.summary() == ("folded", 2)  # the first exchange, whole, by the id of its reply
    assert [m.content for m in kept] == ["The quick brown fox jumps", "over the lazy dog."]
    assert llm.prompts[0] == SUMMARY_PROMPT.format(summary="", new_lines="Human: hi\nAI: yo")
    history = memory.load_memory_variables({})["history"]
    assert history.startswith("System: folded\n")


def test_entity_memory_extracts_and_summarizes():
    llm = ScriptedLLM("Alice, Paris", "Alice lives in Paris.", "Paris is a city.", "NONE")
    memory = ConversationEntityMemory(llm, return_messages=True)
    variables = memory.load_memory_variables({"input": "Alice moved to Paris"})
    assert variables["entities"] == {"Alice": "", "Paris": ""}
    assert llm.prompts[0] == ENTITY_EXTRACTION_PROMPT.format(history="", input="Alice moved to Paris")
    memory.save_context({"input": "Alice moved to Paris"}, {"output": "Nice!"})
    assert memory.session.entities() == {"Alice": "Alice lives in Paris.", "Paris": "Paris is a city."}
    assert "Existing summary of Alice:\n\n" in llm.prompts[1]
    assert memory.load_memory_variables({"input": "hello"})["entities"] == {}


def test_entity_parsing_is_robust():
    assert parse_entities("NONE") == []
    assert parse_entities(" Output: Alice,  Bob , Alice, - Carol.\nrambling, more") == ["Alice", "Bob", "Carol"]
    assert parse_entities("x" * 200) == []


def test_kg_memory_stores_triples_and_recalls_by_subject():
    llm = ScriptedLLM("(Nevada, is a, state)<|>(Nevada, is in, US)", "Nevada")
    memory = ConversationKGMemory(llm)
    memory.save_context({"input": "Nevada is a state in the US"}, {"output": "ok"})
    assert memory.session.triples() == [("Nevada", "is a", "state"), ("Nevada", "is in", "US")]
    assert memory.load_memory_variables({"input": "tell me about Nevada"}) == {
        "history": "On Nevada: Nevada is a state. Nevada is in US."}  # LangChain's wording


def test_triple_parsing_is_robust():
    messy = 'Output: ( "Ann" , likes, tea )\n(Bob, works at, Acme, Inc)  junk (only, two) (Ann, likes, tea) NONE'
    assert parse_triples(messy) == [("Ann", "likes", "tea"), ("Bob", "works at", "Acme, Inc")]
    assert parse_triples("NONE") == []


def test_kg_splits_four_parts_as_subject_relation_object_and_newer_facts_replace_older():
    assert parse_triples("(Acme, is based in, Nevada, USA)") == [("Acme", "is based in", "Nevada, USA")]
    llm = ScriptedLLM("(Ann, lives in, Paris)<|>(Ann, likes, tea)", "(ann, moved away from, paris)", "Ann")
    memory = ConversationKGMemory(llm)
    memory.save_context({"input": "Ann lives in Paris and likes tea"}, {"output": "ok"})
    memory.save_context({"input": "Ann moved away from Paris"}, {"output": "ok"})
    assert memory.session.triples() == [("Ann", "likes", "tea"), ("ann", "moved away from", "paris")]
    assert memory.load_memory_variables({"input": "where is Ann?"}) == {
        "history": "On Ann: Ann likes tea. ann moved away from paris."}


class BagOfWords:
    """A deterministic embedder: normalized counts of a few words."""

    words = ("cat", "dog", "car", "tea")
    name, dim = "bag-of-words", 4

    def __call__(self, texts):
        rows = torch.tensor([[t.lower().count(w) for w in self.words] for t in texts], dtype=torch.float32)
        return torch.nn.functional.normalize(rows + 1e-3, dim=-1)


def test_vector_memory_recalls_most_similar_first():
    memory = VectorStoreRetrieverMemory(BagOfWords(), k=2)
    memory.save_context({"input": "my cat"}, {"output": "cats purr"})
    memory.save_context({"input": "my car"}, {"output": "car car"})
    memory.save_context({"input": "tea time"}, {"output": "green tea"})
    history = memory.load_memory_variables({"input": "car car cat"})["history"]
    assert history == "input: my car\noutput: car car\ninput: my cat\noutput: cats purr"
    memory.return_messages = True
    assert memory.load_memory_variables({"input": "tea"})["history"][0] == Message("system", "input: tea time\noutput: green tea")


def test_vector_ties_come_back_in_stored_order():
    from qlora.infer.memory.vector import top_k

    keys = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.6, 0.8], [1.0, 0.0]], dtype=np.float32)
    assert top_k(np.array([1.0, 0.0], dtype=np.float32), keys, 4) == [0, 2, 4, 3]
    assert top_k(np.array([1.0, 0.0], dtype=np.float32), keys, 2) == [0, 2]
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((1000, 8)).astype(np.float32)
    query = rng.standard_normal(8).astype(np.float32)
    assert top_k(query, keys, 10) == np.argsort(-(keys @ query), kind="stable")[:10].tolist()


def test_vector_session_refuses_another_embedder():
    from qlora.errors import UsageError

    memory = VectorStoreRetrieverMemory(BagOfWords(), k=2)
    memory.save_context({"input": "my cat"}, {"output": "cats purr"})
    assert memory.session.embedder() == ("bag-of-words", 4)

    class Renamed(BagOfWords):
        name = "other-words"

    class Wider(BagOfWords):
        dim = 5

    for other in (Renamed(), Wider()):
        with pytest.raises(UsageError, match=r"made by embedder bag-of-words \(width 4\).*start a new --session"):
            VectorStoreRetrieverMemory(other, session=memory.session)
    VectorStoreRetrieverMemory(BagOfWords(), session=memory.session)  # the same one resumes


@pytest.fixture(scope="module")
def model_llm(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora.infer.llm import ModelLLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return ModelLLM(model, AutoTokenizer.from_pretrained(tiny_model_dir), temperature=0, max_new_tokens=12)


def test_model_written_summary_entities_and_triples(model_llm):
    """The real generation path: whatever the (random) model writes is stored as parsed."""
    summary = ConversationSummaryMemory(model_llm)
    summary.save_context({"input": "Alice likes tea"}, {"output": "Good."})
    expected = model_llm.complete(SUMMARY_PROMPT.format(summary="", new_lines="Human: Alice likes tea\nAI: Good."))
    assert summary.session.summary() == (expected, 2)

    entity = ConversationEntityMemory(model_llm)
    found = entity.load_memory_variables({"input": "Alice likes tea"})["entities"]
    extracted = model_llm.complete(ENTITY_EXTRACTION_PROMPT.format(history="", input="Alice likes tea"))
    assert list(found) == parse_entities(extracted)
    entity.save_context({"input": "Alice likes tea"}, {"output": "Good."})
    assert list(entity.session.entities()) == list(found)

    kg = ConversationKGMemory(model_llm)
    kg.save_context({"input": "Alice likes tea"}, {"output": "Good."})
    assert all(len(t) == 3 for t in kg.session.triples())


def test_model_embedder_retrieves_identical_text_first(model_llm):
    from qlora.infer.embedder import ModelEmbedder

    memory = VectorStoreRetrieverMemory(ModelEmbedder(model_llm.model, model_llm.tokenizer), k=3)
    for text in ("The quick brown fox", "def add(a, b):", "a paged optimizer"):
        memory.save_context({"input": text}, {"output": "ok"})
    assert memory.retrieve("input: def add(a, b):\noutput: ok")[0] == "input: def add(a, b):\noutput: ok"


def test_model_embedder_skips_bos_and_truncates_to_the_window(model_llm):
    from qlora.infer.embedder import ModelEmbedder

    model, tok = model_llm.model, model_llm.tokenizer
    embedder = ModelEmbedder(model, tok)
    assert embedder.dim == model.config.hidden_size and embedder.max_tokens == model.config.max_position_embeddings

    def mean_without_bos(ids):
        assert ids[0] == tok.bos_token_id
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        return torch.nn.functional.normalize(hidden[1:].mean(0), dim=0)

    text = "The quick brown fox"
    torch.testing.assert_close(embedder([text])[0], mean_without_bos(tok(text).input_ids), atol=1e-5, rtol=1e-5)
    long = "def add(a, b): return a + b. " * 200
    ids = tok(long).input_ids
    assert len(ids) > embedder.max_tokens
    torch.testing.assert_close(embedder([long])[0], mean_without_bos(ids[:embedder.max_tokens]), atol=1e-5, rtol=1e-5)
