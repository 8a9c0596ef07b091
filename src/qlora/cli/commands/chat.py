"""``qlora chat``: talk with a model in the terminal, with conversation memory.

Replies stream as they are generated. With ``--session NAME --db FILE`` the
conversation is stored in SQLite after every turn and resumes on the next run.
Slash commands: /reset, /history, /memory, /save [FILE], /exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ...errors import UsageError
from .generate import add_model_arguments, load_model_from_args, sampling_options

NAME = "chat"
HELP = "multi-turn chat with a model, with conversation memory persisted in SQLite"

MEMORY_KINDS = ("buffer", "window", "token", "summary", "summary-buffer", "entity", "kg", "vector")
SLASH_HELP = "commands: /reset /history /memory /save [FILE] /exit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..options import positive_int

    add_model_arguments(parser)
    parser.add_argument("--memory", choices=MEMORY_KINDS, default="buffer", help="what the model remembers")
    parser.add_argument("--k", type=positive_int, default=4, help="exchanges kept (window, entity, kg) or recalled (vector)")
    parser.add_argument("--max-token-limit", type=positive_int, default=1024, help="token budget of token/summary-buffer")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--embedder", help="sentence-transformers model for --memory vector (default: the chat model)")
    parser.add_argument("--session", help="session name: store the chat in --db and resume it later")
    parser.add_argument("--db", default="chats.sqlite", help="SQLite file of sessions (with --session)")


def build_memory(args: argparse.Namespace, model, tokenizer, session):
    """The memory named by --memory, backed by ``session``."""
    from ...infer import memory as m
    from ...infer.llm import ModelLLM

    common = dict(session=session, return_messages=True)
    llm = ModelLLM(model, tokenizer, temperature=0.0, max_new_tokens=128)  # deterministic bookkeeping
    kind = args.memory
    if kind == "buffer":
        return m.ConversationBufferMemory(**common)
    if kind == "window":
        return m.ConversationBufferWindowMemory(k=args.k, **common)
    if kind == "token":
        return m.ConversationTokenBufferMemory(tokenizer, max_token_limit=args.max_token_limit, **common)
    if kind == "summary":
        return m.ConversationSummaryMemory(llm, **common)
    if kind == "summary-buffer":
        return m.ConversationSummaryBufferMemory(llm, tokenizer, max_token_limit=args.max_token_limit, **common)
    if kind == "entity":
        return m.ConversationEntityMemory(llm, k=args.k, **common)
    if kind == "kg":
        return m.ConversationKGMemory(llm, k=args.k, **common)
    from ...infer.embedder import ModelEmbedder, SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder(args.embedder) if args.embedder else ModelEmbedder(model, tokenizer)
    return m.VectorStoreRetrieverMemory(embedder, k=args.k, **common)


def _save(chat, args: argparse.Namespace, target: str) -> str:
    if not target:
        if args.session:
            return f"(session {args.session!r} is saved in {args.db} after every turn)"
        return "(give a file: /save FILE, or start with --session NAME to store every turn)"
    path = Path(target)
    if path.exists():  # a transcript never replaces a file (it could be the user's data)
        return f"({path} already exists; give a new file name)"
    with path.open("x", encoding="utf-8") as f:
        for message in chat.memory.session.messages():
            f.write(json.dumps({"role": message.role, "content": message.content}, ensure_ascii=False) + "\n")
    return f"(saved the transcript to {path})"


def _command(chat, args: argparse.Namespace, line: str) -> bool:
    """Run a slash command; False means exit."""
    name, _, rest = line.partition(" ")
    if name in ("/exit", "/quit"):
        return False
    if name == "/reset":
        chat.memory.clear()
        print("(conversation cleared)")
    elif name == "/history":
        from ...infer.messages import buffer_string

        print(buffer_string(chat.memory.session.messages(), "you", "assistant") or "(no messages)")
    elif name == "/memory":
        print(chat.memory.contents())
    elif name == "/save":
        print(_save(chat, args, rest.strip()))
    else:
        print(f"(unknown command {name}; {SLASH_HELP})")
    return True


def run(args: argparse.Namespace) -> int:
    from ...infer.chat import Chat
    from ...infer.memory import InMemorySession

    store = None
    if args.session:
        from ...infer.store import ChatStore

        store = ChatStore(args.db)
        session = store.session(args.session, args.memory)
    else:
        session = InMemorySession()
    model, tokenizer = load_model_from_args(args)
    options = sampling_options(args)
    chat = Chat(model, tokenizer, memory=build_memory(args, model, tokenizer, session), system=args.system,
                **dataclasses.asdict(options))
    resumed = len(session.messages())
    print(f"qlora chat ({args.memory} memory). {SLASH_HELP}")
    if resumed:
        print(f"(resumed session {args.session!r}: {resumed} messages)")
    try:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                break
            if not line:
                continue
            if line.startswith("/"):
                if not _command(chat, args, line):
                    break
                continue
            sys.stdout.write("assistant> ")
            for piece in chat.send(line):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
    finally:
        if store is not None:
            store.close()
    return 0

