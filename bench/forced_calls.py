"""What a forced tool call costs the batch it runs in.

A random Qwen2-architecture model (Qwen 2.5's chat template, a byte-level BPE of
``--vocab`` tokens trained locally) is driven through the real
:class:`~qlora.infer.batcher.ContinuousBatcher`: first ``--free`` greedy requests alone, then
the same requests with one forced call (``tool_choice: "required"``, sampled at temperature 1)
in the same batch, at top_p 1 (OpenAI's default: Gumbel-max, as cheap as greedy) and 0.9 (the
nucleus scan). It reports the decode step time in each run, the CPU time the forced row's
constraint takes per token (candidates checked in logit order), and checks that the free
requests' texts are unchanged. A random model is the worst case for the constraint: its
distribution is nearly flat, so more candidates are checked than a trained model needs.

    PYTHONPATH=src python bench/forced_calls.py            # CPU, under a minute
    PYTHONPATH=src python bench/forced_calls.py --vocab 32000 --hidden 512
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from harness import describe

TEMPLATE = Path(__file__).parents[1] / "tests" / "data" / "chat_templates" / "qwen2.5.jinja"
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}


def main() -> None:
    import torch

    import qlora
    from qlora.infer.batcher import ContinuousBatcher, Request
    from qlora.infer.forced_call import ForcedCall, call_markup
    from qlora.infer.generate import SamplingOptions
    from qlora.infer.messages import Message
    from qlora.infer.template import render_chat, stop_token_ids
    from qlora.infer.tool_calls import markup_token_ids, tool_call_format
    from qlora.model.tiny import _DEFAULT_TEXT, build_tiny_model, train_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--free", type=int, default=3, help="unconstrained greedy requests")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    texts = [*_DEFAULT_TEXT, TEMPLATE.read_text(), '{"name": "get_weather", "arguments": {"city": "Paris"}}'] * 20
    tokenizer = train_tokenizer(texts, vocab_size=args.vocab)
    tokenizer.chat_template = TEMPLATE.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "m", tokenizer=tokenizer, arch="qwen2", hidden_size=args.hidden,
                                  intermediate_size=args.hidden * 2, num_hidden_layers=4)
        model, tokenizer = qlora.load_model(folder, compute_dtype=torch.float32, device="cpu")
    stops = frozenset(stop_token_ids(model, tokenizer))
    fmt = tool_call_format(tokenizer.chat_template)
    keep = markup_token_ids(fmt, tokenizer)
    batcher = ContinuousBatcher(model, tokenizer, max_batch_size=8, context_length=1024).start()

    def run(forced: bool, top_p: float = 1.0) -> tuple[list[str], float, float, int, str]:
        done, texts, events = threading.Event(), {}, []
        requests = []
        for i in range(args.free):
            prompt = render_chat(tokenizer, [Message("user", f"Tell me about item {i}.")])
            requests.append(("free", i, prompt, None))
        if forced:
            prompt = render_chat(tokenizer, [Message("user", "Weather in Paris?")], tools=[TOOL])
            requests.append(("forced", 0, prompt, ForcedCall(tokenizer, call_markup(fmt.name, tokenizer.chat_template),
                                                            [TOOL], None, keep, stops)))
        spent = [0.0, 0]
        pending = len(requests)
        lock = threading.Lock()
        for kind, i, prompt, constraint in requests:
            if constraint is not None:  # time the constraint's own work
                choose = constraint.choose

                def timed(*a, _choose=choose):
                    t = time.thread_time()  # CPU time of the decode thread, waits excluded
                    token = _choose(*a)
                    spent[0] += time.thread_time() - t
                    spent[1] += 1
                    return token
                constraint.choose = timed

            def emit(event, key=(kind, i)):
                nonlocal pending
                with lock:
                    texts[key] = texts.get(key, "") + event.text
                    if event.finish_reason is not None:
                        events.append(event)
                        pending -= 1
                        if pending == 0:
                            done.set()
            temperature = 1.0 if constraint is not None else 0.0
            ids = tokenizer(prompt, add_special_tokens=False).input_ids
            batcher.submit(Request(ids, None, SamplingOptions(max_new_tokens=args.max_tokens if constraint is None
                                                              else 400, temperature=temperature, top_p=top_p, seed=0),
                                   emit, stop_ids=stops, keep_tokens=keep if constraint else frozenset(),
                                   constraint=constraint))
        steps_before, start = batcher.stats["steps"], time.perf_counter()
        done.wait()
        wall = time.perf_counter() - start
        steps = batcher.stats["steps"] - steps_before
        free = [texts[("free", i)] for i in range(args.free)]
        return free, wall / max(steps, 1) * 1000, spent[0] / max(spent[1], 1) * 1000, spent[1], \
            texts.get(("forced", 0), "")

    run(False)  # warm up
    alone, step_alone, *_ = run(False)
    print(describe('cpu', ('transformers',)))
    print(f"vocab {len(tokenizer)}, hidden {args.hidden}, {args.free} free greedy rows of {args.max_tokens} tokens")
    print(f"decode step, free rows alone:                        {step_alone:7.2f} ms")
    for top_p in (1.0, 0.9):
        mixed, step_mixed, per_token, tokens, call = run(True, top_p)
        print(f"top_p {top_p}: decode step with one forced row:        {step_mixed:7.2f} ms; constraint "
              f"{per_token:.2f} ms CPU per forced token ({tokens} tokens); free texts unchanged: {mixed == alone}")
        print(f"  forced reply: {call[:100]!r}")
    batcher.close()


if __name__ == "__main__":
    main()
