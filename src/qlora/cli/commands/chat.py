"""``qlora chat``: talk with a model in the terminal, with conversation memory.

Replies stream as they are generated. With ``--session NAME --db FILE`` the
conversation is stored in SQLite after every turn and resumes on the next run;
what a memory derives from a turn (summary, entities, triples, vectors) is
caught up on resume if the program was killed before it was written. A
read-only database still opens (``/history`` works; turns are not saved); a
database locked by another program is waited for ``--db-timeout`` seconds, then
the turn is reported unsaved and the chat goes on.
Slash commands: /reset, /history, /memory, /save [FILE], /image PATH, /exit. ``/image`` attaches an image
(a file or a data: URI) to the next message, for a vision-language model; the image's bytes are read then, and a
session stores them (as a data: URI), so a resumed session shows the model its images again, wherever their files
went. A stored image that no longer reads is said and left out.
With ``--tools FILE`` the model sees those function definitions; each call it makes
is shown and its result asked for (you play the tool), then the model goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ..reasoning_echo import ReasoningEcho, show_answer
from .generate import (add_model_arguments, chat_format_from_args, load_model_from_args, pixel_bounds_from_args,
                       sampling_options)

NAME = "chat"
HELP = "multi-turn chat with a model, with conversation memory persisted in SQLite"

MEMORY_KINDS = ("buffer", "window", "token", "summary", "summary-buffer", "entity", "kg", "vector")
SLASH_HELP = "commands: /reset /history /memory /save [FILE] /image PATH /exit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..options import non_negative_float, positive_int

    add_model_arguments(parser)
    parser.add_argument("--memory", choices=MEMORY_KINDS, default="buffer",
                        help="what the model remembers: every turn (buffer), the last --k exchanges (window), the "
                             "newest exchanges within --max-token-limit tokens (token), a running summary (summary), "
                             "a summary plus recent exchanges within the token limit (summary-buffer), descriptions "
                             "of the entities named (entity), facts as triples about them (kg), or the --k past "
                             "exchanges most similar to the input (vector)")
    parser.add_argument("--k", type=positive_int, default=4,
                        help="window and entity: recent exchanges shown; kg: recent exchanges given to the model "
                             "as context when it extracts entities and facts (kg shows no turns); vector: "
                             "exchanges recalled")
    parser.add_argument("--max-token-limit", type=positive_int, default=1024,
                        help="token and summary-buffer: most tokens of verbatim history, counted per message as "
                             "its 'Human: ...'/'AI: ...' line with the model's tokenizer, whole exchanges kept")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--embedder",
                        help="--memory vector: a sentence-transformers model (folder or hub id; needs "
                             "pip install sentence-transformers); default: the chat model's mean hidden state. "
                             "A session keeps the embedder it started with")
    parser.add_argument("--tools", metavar="FILE",
                        help="JSON file with a list of OpenAI function definitions ({\"type\": \"function\", "
                             "\"function\": {\"name\", \"description\", \"parameters\"}}) shown to the model "
                             "through its chat template; you type the result of each call it makes")
    parser.add_argument("--session", help="session name: store the chat in --db and resume it later")
    parser.add_argument("--db", help="SQLite file of sessions (with --session; default: chats.sqlite)")
    parser.add_argument("--db-timeout", type=non_negative_float, default=10.0,
                        help="seconds to wait for a database locked by another program before reporting the turn "
                             "unsaved")


def embedder_name(args: argparse.Namespace) -> str:
    """What a session records as the embedder of --memory vector (known before the model loads)."""
    def where(name: str) -> str:  # a local folder by its absolute path, so another working directory agrees
        path = Path(name).expanduser()
        return str(path.resolve()) if path.exists() else name

    if args.embedder:
        return f"sentence-transformers:{where(args.embedder)}"
    adapters = "".join(f"+{where(item.rpartition('=')[2])}" for item in args.adapter)
    return f"model:{where(args.model)}{adapters}"


def build_memory(args: argparse.Namespace, model, tokenizer, session):
    """The memory named by --memory, backed by ``session``."""
    from ...infer import memory as m
    from ...infer.llm import ModelLLM

    common: dict[str, Any] = dict(session=session, return_messages=True)
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

    if args.embedder:
        embedder = SentenceTransformerEmbedder(args.embedder, name=embedder_name(args))
    else:
        embedder = ModelEmbedder(model, tokenizer, name=embedder_name(args))
    return m.VectorStoreRetrieverMemory(embedder, k=args.k, **common)


def load_tools(path: str | None) -> list[dict] | None:
    """The tool definitions in ``path`` (--tools), checked.

    Raises:
        UsageError: unreadable file, not JSON, not a list of function tools (naming the entry and field).
    """
    from ...errors import UsageError
    from ...infer.tool_calls import tool_definition_problem

    if path is None:
        return None
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise UsageError(f"--tools {path}: cannot read it ({exc.strerror}).") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"--tools {path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8.") \
            from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--tools {path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}).") \
            from None
    if isinstance(tools, dict) and isinstance(tools.get("tools"), list):  # a saved request body's "tools"
        tools = tools["tools"]
    if not isinstance(tools, list) or not tools:
        raise UsageError(f"--tools {path}: expected a non-empty JSON list of function definitions, "
                         '[{"type": "function", "function": {"name": ..., "parameters": {...}}}].')
    problem = tool_definition_problem(tools)
    if problem is not None:
        raise UsageError(f"--tools {path}: {problem[0]}.")
    return tools


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
            f.write(json.dumps(message.as_dict(), ensure_ascii=False) + "\n")  # tool calls and ids included
    return f"(saved the transcript to {path})"


def _command(chat, args: argparse.Namespace, line: str, images: list) -> bool:
    """Run a slash command (``/image`` adds to ``images``, those of the next message); False means exit."""
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
    elif name == "/image":
        print(_attach(chat, args, rest.strip(), images))
    else:
        print(f"(unknown command {name}; {SLASH_HELP})")
    return True


def _attach(chat, args: argparse.Namespace, source: str, images: list) -> str:
    """Attach the image ``source`` to the next message; the line shown (a bad image is said, not fatal)."""
    from ...chat.images import resolve_image
    from ...errors import UsageError
    from ...infer.images import image_processor

    if not source:
        return "(give an image: /image PATH, a file or a data: URI)"
    try:
        ref = resolve_image(source, "/image")
        ref = dataclasses.replace(ref, source=ref.data_uri())  # its bytes now: sent and stored, whatever the file does
        if chat.llm.processor is None:
            chat.llm.processor = image_processor(chat.llm.model, chat.llm.tokenizer, args.model, "/image",
                                                 bounds=pixel_bounds_from_args(args))
    except UsageError as exc:
        return f"({exc})"
    images.append(ref)
    return f"(image {len(images)} attached to your next message: {ref.shown})"


def _store_problem(exc: Exception, answered: bool) -> str:
    """The line shown when a turn could not be stored; the chat goes on."""
    from ...infer.store import StoreLocked

    what = "turn not saved" if answered else "turn not answered"
    if isinstance(exc, StoreLocked):
        return f"({what}: database locked by another program; the chat goes on)"
    return f"({what}: {exc}; the chat goes on)"


def _open_session(args: argparse.Namespace):
    """``(store, session)`` for --session/--db, or ``(None, in-memory session)``."""
    from ...infer.memory import InMemorySession
    from ...infer.store import ChatStore

    if not args.session:
        return None, InMemorySession()
    store = ChatStore(args.db, timeout=args.db_timeout)
    try:
        session = store.session(args.session, args.memory)
        if args.memory == "vector":
            from ...infer.memory.vector import check_embedder

            recorded = session.embedder()
            if recorded is not None:  # the width is checked too once the model is loaded
                check_embedder(recorded, embedder_name(args), recorded[1])
    except BaseException:
        store.close()
        raise
    return store, session


def run(args: argparse.Namespace) -> int:
    from ...errors import UsageError
    from ...infer.chat import Chat
    from ...infer.store import StoreLocked, StoreReadOnly

    if args.memory == "vector" and args.embedder:
        from ...infer.embedder import resolve_sentence_transformer

        resolve_sentence_transformer(args.embedder)  # fail before the chat model loads
    if args.db is not None and not args.session:  # the chat would be lost: --db alone stores nothing
        raise UsageError(f"--db {args.db} stores chats under a session name: add --session NAME to save this "
                         "chat there and resume it later (or leave out --db for a chat that is not saved).")
    args.db = args.db or "chats.sqlite"
    options = sampling_options(args)  # checked before the (slow) model load
    tools = load_tools(args.tools)
    store, session = _open_session(args)
    try:
        model, tokenizer = load_model_from_args(args)
        options = sampling_options(args, model)
        chat = Chat(model, tokenizer, memory=build_memory(args, model, tokenizer, session), system=args.system,
                    chat_format=chat_format_from_args(args, tokenizer, "chat"), tools=tools,
                    template_kwargs=args.chat_template_kwargs, on_reasoning=ReasoningEcho(),
                    **dataclasses.asdict(options))
        print(f"qlora chat ({args.memory} memory). {SLASH_HELP}")
        if store is not None and store.read_only:
            print(f"({args.db} is read-only: the session can be read, new turns will not be saved)", file=sys.stderr)
        resumed = session.messages()
        if resumed:
            print(f"(resumed session {args.session!r}: {len(resumed)} messages)")
            for line in getattr(session, "unreadable", []):
                print(f"({line})", file=sys.stderr)
            if any(m.images for m in resumed):  # shown to the model again with their turns
                from ...infer.images import image_processor

                chat.llm.processor = image_processor(model, tokenizer, args.model, f"--session {args.session}",
                                                     subject="the session holds images",
                                                     bounds=pixel_bounds_from_args(args))
            if store is None or not store.read_only:
                try:
                    chat.memory.catch_up()  # what a killed run saved but did not derive yet
                except (StoreLocked, StoreReadOnly) as exc:
                    print(f"(memory not brought up to date: {exc})", file=sys.stderr)
        _loop(chat, args)
    finally:
        if store is not None:
            store.close()
    return 0


def _loop(chat, args: argparse.Namespace) -> None:
    from ...errors import UsageError
    from ...infer.store import StoreLocked, StoreReadOnly

    images: list = []  # attached with /image, sent with the next message
    while True:
        line = _read_line("you> ")
        if line is None:
            return
        if not line:
            continue
        if line.startswith("/"):
            try:
                if not _command(chat, args, line, images):
                    return
            except (StoreLocked, StoreReadOnly) as exc:
                print(f"({line.split()[0]} not done: {exc})", file=sys.stderr)
            continue
        sys.stdout.write("assistant> ")
        attached, images[:] = tuple(images), []  # sent with this message only, whatever happens to its turn
        try:
            show_answer(chat.send(line, attached), getattr(chat, "on_reasoning", None))
            while chat.pending_calls:
                results = _tool_results(chat)
                if results is None:
                    return
                sys.stdout.write("assistant> ")
                show_answer(chat.send_tool_results(results), getattr(chat, "on_reasoning", None))
        except (StoreLocked, StoreReadOnly) as exc:
            sys.stdout.write("\n")
            sys.stdout.flush()
            print(_store_problem(exc, chat.last_reply is not None), file=sys.stderr)
        except UsageError as exc:  # images the processor cannot place, a prompt past the positions: the chat goes on
            sys.stdout.write("\n")
            print(f"({exc}{' The images were dropped; attach them again.' if attached else ''})", file=sys.stderr)


def _tool_results(chat) -> list[str] | None:
    """Show each pending call and read its result (one line each); None at end of input."""
    results = []
    for _, call in chat.pending_calls:
        print(f"(tool call: {call.name} {call.arguments})")
        result = _read_line(f"{call.name} result> ")
        if result is None:
            return None
        results.append(result)
    return results


def _read_line(prompt: str) -> str | None:
    """A line typed or piped in, stripped; None at the end of input. A line that is not UTF-8 (a Latin-1 terminal)
    is not sent: stderr says so and the next line is read."""
    from ..utf8_text import not_utf8, undecoded

    while True:
        try:
            line = input(prompt)
        except EOFError:
            print()
            return None
        except UnicodeDecodeError as exc:  # standard input decoded strictly
            problem = undecoded(exc)
        else:
            problem = not_utf8(line)
            if problem is None:
                return line.strip()
        print(f"(not sent: the line is {problem}; type it again in UTF-8, or set the terminal to UTF-8)",
              file=sys.stderr)
