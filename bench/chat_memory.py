"""Cost of `qlora chat` memory per turn as conversations grow.

1. Token buffer (`--memory token`): time of `buffer()` (what the model is shown)
   and of a whole bookkeeping turn (recall + save) on a SQLite session holding
   10 to 10,000 exchanges, against the previous algorithm (re-tokenize the whole
   transcript, dropping one message at a time) where that finishes.
2. Vector memory (`--memory vector`): one query against 100,000 stored vectors:
   the in-memory exact search qlora uses (numpy, matrix read from SQLite once),
   the previous path (read every vector from SQLite and build a FAISS index per
   query), and persistent FAISS indexes (exact flat, approximate HNSW) when
   faiss is installed.

    PYTHONPATH=src python bench/chat_memory.py                 # both parts
    PYTHONPATH=src python bench/chat_memory.py --part vector --vectors 100000 --width 1024 [--hnsw]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qlora.infer.memory import ConversationTokenBufferMemory
from qlora.infer.memory.vector import top_k
from qlora.infer.messages import Message, buffer_string
from qlora.infer.store import ChatStore
from qlora.model.tiny import train_tokenizer

_TEXT = ["The quick brown fox jumps over the lazy dog.", "Question: what is two plus two? Answer: four.",
         "A paged optimizer moves its state to CPU memory when the GPU is full.", "def add(a, b):\n    return a + b\n"]


def _median_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fill(session, exchanges: int) -> None:
    for start in range(0, exchanges, 1000):
        batch = []
        for i in range(start, min(exchanges, start + 1000)):
            batch += [Message("user", f"{_TEXT[i % 4]} (turn {i})"), Message("assistant", _TEXT[(i + 1) % 4])]
        session.add_messages(batch)


def _old_buffer(tokenizer, messages: list[Message], limit: int) -> list[Message]:
    """The algorithm before issue 21: re-count the joined transcript after dropping each message."""
    start = 0
    while start < len(messages) and len(tokenizer(buffer_string(messages[start:]),
                                                  add_special_tokens=False).input_ids) > limit:
        start += 1
    return messages[start:]


def token_buffer(sizes: list[int], limit: int, old_up_to: int) -> None:
    tokenizer = train_tokenizer(_TEXT * 20, vocab_size=400)
    print(f"\n## Token buffer, --max-token-limit {limit}, SQLite session, median of 7\n")
    print("| exchanges | buffer() ms | turn (recall + save) ms | kept exchanges | previous algorithm buffer() ms |")
    print("|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for n in sizes:
            store = ChatStore(Path(folder) / f"{n}.sqlite")
            session = store.session("bench", "token")
            _fill(session, n)
            memory = ConversationTokenBufferMemory(tokenizer, max_token_limit=limit, session=session)
            memory.buffer()  # the first turn tokenizes the kept messages once; later turns reuse the counts
            recall = _median_time(memory.buffer, 7)
            kept = len(memory.buffer()) // 2

            def turn() -> None:
                memory.load_memory_variables({"input": "next"})
                memory.save_context({"input": "The quick brown fox (new)"}, {"output": "Answer: four."})

            whole = _median_time(turn, 7)
            old = ""
            if n <= old_up_to:
                messages = session.messages()
                old = f"{_median_time(lambda: _old_buffer(tokenizer, messages, limit), 1) * 1e3:,.0f}"
            print(f"| {n:,} | {recall * 1e3:.2f} | {whole * 1e3:.2f} | {kept} | {old or 'not run'} |")
            store.close()


def vectors(count: int, width: int, k: int, queries: int, hnsw: bool) -> None:

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((count, width), dtype=np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    probes = rng.standard_normal((queries, width), dtype=np.float32)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    print(f"\n## Vector retrieval: {count:,} stored vectors of width {width}, top {k}, median of {queries} queries\n")
    print("| method | first query ms | later queries ms | same top-k as exact |")
    print("|---|---:|---:|---:|")
    exact = [top_k(q, keys, k) for q in probes]
    with tempfile.TemporaryDirectory() as folder:
        store = ChatStore(Path(folder) / "v.sqlite")
        session = store.session("bench", "vector")
        with store.transaction() as conn:
            conn.executemany("INSERT INTO vectors (session_id, text, embedding) VALUES (?, ?, ?)",
                             [(session.id, f"doc {i}", keys[i].tobytes()) for i in range(count)])

        def load() -> np.ndarray:
            rows = session.vectors()
            return np.frombuffer(b"".join(blob for _, _, blob in rows), dtype=np.float32).reshape(len(rows), -1)

        start = time.perf_counter()
        matrix = load()
        first = time.perf_counter() - start + _median_time(lambda: top_k(probes[0], matrix, k), 1)
        later = _median_time(lambda: [top_k(q, matrix, k) for q in probes], 1) / queries
        print(f"| qlora: numpy exact, matrix read from SQLite once | {first * 1e3:,.0f} | {later * 1e3:.1f} | "
              f"{queries}/{queries} |")
        try:
            import faiss
        except ImportError:
            print("| faiss | not installed (pip install faiss-cpu) | | |")
            store.close()
            return
        faiss.omp_set_num_threads(os.cpu_count() or 1)

        def rebuilt(q: np.ndarray) -> list[int]:  # before issue 21: every vector read and indexed per query
            index = faiss.IndexFlatIP(width)
            index.add(load())
            return index.search(q[None], k)[1][0].tolist()

        per_query = _median_time(lambda: rebuilt(probes[0]), 2)
        print(f"| before: every vector read from SQLite + FAISS flat index built, per query | {per_query * 1e3:,.0f} | "
              f"{per_query * 1e3:,.0f} | — |")
        indexes = [("FAISS IndexFlatIP, persistent", faiss.IndexFlatIP(width))]
        if hnsw:  # approximate: faster queries, long build, may miss exact neighbours
            indexes.append(("FAISS IndexHNSWFlat (M=32, efSearch=64), persistent",
                            faiss.IndexHNSWFlat(width, 32, faiss.METRIC_INNER_PRODUCT)))
        for name, index in indexes:
            if hasattr(index, "hnsw"):
                index.hnsw.efSearch = 64
            start = time.perf_counter()
            index.add(matrix)
            build = time.perf_counter() - start
            found = [index.search(q[None], k)[1][0].tolist() for q in probes]
            later = _median_time(lambda: [index.search(q[None], k) for q in probes], 1) / queries
            same = sum(f == e for f, e in zip(found, exact))
            print(f"| {name} (build {build:,.1f} s) | {(build + later) * 1e3:,.0f} | {later * 1e3:.1f} | "
                  f"{same}/{queries} |")
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("token", "vector", "all"), default="all")
    parser.add_argument("--sizes", default="10,100,1000,5000,10000", help="exchanges in the session")
    parser.add_argument("--limit", type=int, default=1024, help="--max-token-limit")
    parser.add_argument("--old-up-to", type=int, default=400, help="largest size timed with the previous algorithm")
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--hnsw", action="store_true", help="also an approximate FAISS HNSW index (slow to build)")
    args = parser.parse_args()
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python {sys.version.split()[0]}, "
          f"numpy {np.__version__}")
    if args.part in ("token", "all"):
        token_buffer([int(n) for n in args.sizes.split(",")], args.limit, args.old_up_to)
    if args.part in ("vector", "all"):
        vectors(args.vectors, args.width, 4, args.queries, args.hnsw)


if __name__ == "__main__":
    main()
