"""``qlora eval``: loss and perplexity of a model (+ optional adapter) on a dataset.

Uses the same tokenization, loss mask and per-token normalization as training,
so the number printed is comparable with the eval loss in a run's metrics; with
``--adapter`` the chat format, ``--train-on``, ``--seq-len``, ``--eot-tokens`` and
``--group-texts`` default to the ones its run recorded, so without options it is
that run's eval loss; a merged model's folder (``qlora merge``) carries them too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from bisect import bisect_right
from dataclasses import replace
from pathlib import Path

# train's, for an adapter that recorded none
TRAIN_DEFAULTS = {"train_on": "assistant", "seq_len": 512, "eot_tokens": "", "group_texts": 0, "group_shards": 1}

NAME = "eval"
HELP = "loss and perplexity of a model (+ adapter) on a dataset"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ...model.trained_tokens import TRAIN_ON
    from ...option_range import Range
    from ...template_names import TRAIN_TEMPLATE_NAMES
    from ..image_pixels import add_pixel_arguments
    from ..options import add_template_option, number, positive_int

    parser.add_argument("--model", help="base model folder or hub id (default: the base the --adapter folder's "
                                          "adapter_config.json names)")
    parser.add_argument("--adapter", default=None, help="a PEFT-format adapter folder (e.g. a qlora train output)")
    parser.add_argument("--data", required=True, help="evaluation data: a .jsonl/.json/.csv/.tsv/.parquet/.arrow/.txt file "
                        "(text ones also .gz, .bz2, .xz, .zst), a save_to_disk folder, or a hub dataset name; several as a,b "
                        "(each also measured on its own)")
    parser.add_argument("--data-split", default="test", help="split of a hub dataset or DatasetDict folder")
    parser.add_argument("--data-subset", default=None, help="subset (configuration) of a hub dataset")
    parser.add_argument("--dataset-dir", default="data",
                        help="folder of a LLaMA-Factory dataset_info.json, whose registered names --data may give")
    parser.add_argument("--media-dir", default="", help="folder that relative image paths of the data are looked for "
                        "in when they are not beside the data file, as in qlora train (LLaMA-Factory's media_dir; "
                        "default: --dataset-dir)")
    parser.add_argument("--format", default="auto", choices=("auto", "alpaca", "chat", "sharegpt",
                        "prompt-completion", "text"), help="data format")
    parser.add_argument("--data-fields", default="", help="the dataset's names for our fields, as OURS=THEIRS,... "
                        "(e.g. instruction=question,output=answer; see qlora train --help)")
    add_template_option(parser, TRAIN_TEMPLATE_NAMES, "chat format and loss mask, as train's: auto = the one "
                        "--adapter was trained with (chat_format.json), else the model's own, else the built-in one "
                        "its vocabulary supports")
    parser.add_argument("--system-into-user", action="store_true",
                        help="fold a system message into the first user turn, as qlora train's (for chat templates "
                             "without a system role, e.g. Gemma 2); on already where --adapter was trained so")
    parser.add_argument("--template-date", default="", metavar="YYYY-MM-DD",
                        help="date that date-dependent chat templates (strftime_now, e.g. Llama 3.2) see, as qlora "
                             "train's (default: the one --adapter was trained with, else today)")
    parser.add_argument("--train-on", default=None, choices=TRAIN_ON,
                        help="tokens that count, as qlora train's --train-on (completion: all but the prompts of "
                             "prompt-completion rows, as TRL's SFT trains; default: as the adapter or merged "
                             f"model was trained, else {TRAIN_DEFAULTS['train_on']})")
    parser.add_argument("--quant", default=None, choices=("nf4", "fp4", "none"),
                        help="base data type (default: the format the adapter was trained on; none for a folder "
                             "qlora merged, whose 16-bit weights compute what its run did; else nf4)")
    parser.add_argument("--seq-len", type=number(int, Range(2)), default=None,
                        help="truncate examples to this many tokens, as qlora train's --seq-len (default: as the "
                             f"adapter or merged model was trained, else {TRAIN_DEFAULTS['seq_len']})")
    parser.add_argument("--eot-tokens", default=None, metavar="TOKENS",
                        help="comma-separated tokens that end a turn besides the tokenizer's own end markers, as "
                             "qlora train's --eot-tokens: counted after each counted turn, where the template writes "
                             "them (default: as the adapter or merged model was trained, else none)")
    parser.add_argument("--group-texts", type=number(int, Range(0)), default=None, metavar="N",
                        help="measure plain texts as qlora train's --group-texts cut them: each text + EOS, every N "
                             "texts concatenated and cut into --seq-len blocks; 0: each text whole (default: as the "
                             "adapter or merged model was trained, else 0)")
    parser.add_argument("--group-shards", type=number(int, Range(1)), default=None, metavar="N",
                        help="with --group-texts: group this many contiguous parts of the texts each on its own, as "
                             "qlora train's (default: as the adapter or merged model was trained, else 1)")
    parser.add_argument("--batch-size", type=positive_int, default=4, help="examples per forward pass")
    parser.add_argument("--json", action="store_true",
                        help="print the result as one JSON object on stdout (data, rows read, examples evaluated, "
                             "tokens, loss, perplexity; loss at full precision; with several sources, a sources list of "
                             "these for each), the data summary on stderr")
    add_pixel_arguments(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from ...cpu_threads import apply_cpu_threads
    from ..base_model import load_kwargs
    from ..image_pixels import pixel_bounds_for
    from ...model.adapter_io import adapter_tokenizer, load_adapter
    from ...model.load import load_model
    from ...model.position_limit import check_positions, longest_positions
    from ...train.data.fields import parse_data_fields
    from ...train.data.selection import check_split_of_files, read_sources, source_locations
    from ...train.data import (count_trainable_tokens, fallback_note, normalize, own_template,
                               pad_collate, pad_token_id, resolve_chat_format, tokenize_dataset)
    from ...model.chat_format import ChatFormat, merged_format, pinned_datetime
    from ...model.trained_tokens import turn_end_ids
    from ...errors import UsageError
    from ...train.data.text_blocks import text_blocks
    from ...train.data.tokenized_dataset import NothingToTrain
    from ...train.trainer import compute_dtype_for, token_loss_sum

    fields = parse_data_fields(args.data_fields)  # checked before the model loads
    recorded, record_file = _follow_record(args)
    if args.template_date:
        pinned_datetime(args.template_date)
    bounds = pixel_bounds_for(args, args.adapter)  # images shown as training showed them (saved with the adapter)
    # Read (and so check) the data before the model, as train does: a bad file fails in seconds, not after the load.
    check_split_of_files(args.data, args.data_split, args.data_subset, args.dataset_dir,
                         ("--data-split", "--data-subset"), "test")
    ends: list[int] = []  # where each source's rows end in examples

    def read(records):
        rows = normalize(records, args.format, fields, args.media_dir or args.dataset_dir)
        ends.append((ends[-1] if ends else 0) + len(rows))
        return rows

    examples = read_sources(args.data, args.data_split, args.data_subset, 0, read,  # image paths found as in train
                            args.dataset_dir)
    imaged = next((e for e in examples if e.images), None)
    if args.group_texts and imaged is not None:
        raise UsageError(f"{imaged.where}: this row holds images, and --group-texts {args.group_texts} (given, or "
                         f"{_recorder(args)}) measures blocks cut from a stream of plain texts, which would cut "
                         "images apart; give --group-texts 0 to measure each example whole.")
    unplain = next((e for e in examples if e.text is None or e.prompt is not None or e.pieces is not None), None)
    if args.group_texts and unplain is not None:  # said before the model loads, naming where the option comes from
        kind = ("a torchtune dataset's" if unplain.pieces is not None
                else "a prompt-completion" if unplain.text is not None else "a conversation")
        raise UsageError(f"{unplain.where}: this row is {kind} row, not a plain text, and --group-texts "
                         f"{args.group_texts} (given, or {_recorder(args)}) measures blocks cut from a stream of "
                         "plain texts; give --group-texts 0 to measure each example whole, or rows with a text field "
                         "(--format text).")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype_for("auto", device)
    model, tokenizer = load_model(args.model, **load_kwargs(args), compute_dtype=dtype, device=device)
    apply_cpu_threads(model, device)
    if args.adapter:
        tokenizer = adapter_tokenizer(args.adapter, tokenizer)
        load_adapter(model, args.adapter, keep_base=False)
    saved = ChatFormat.load(args.adapter) if args.adapter else merged_format(args.model)
    if args.template != "auto" or saved is None:  # a chosen template keeps the saved date, variables and folding
        fmt = resolve_chat_format(tokenizer, args.template).keeping(saved)
    else:
        fmt = saved
    if args.system_into_user:
        fmt = replace(fmt, system_into_user=True)
    if args.template_date:
        fmt = fmt.with_date(args.template_date)
    if (saved is None and args.template == "auto" and own_template(tokenizer) is None
            and any(e.messages is not None for e in examples)):
        print(fallback_note(tokenizer), file=sys.stderr)
    # the turn ends training counted: its end markers and --eot-tokens
    stops = turn_end_ids(model, tokenizer, args.eot_tokens, record_file if "eot_tokens" in recorded else None)
    try:
        if args.group_texts:  # the blocks the run trained and evaluated on
            tokenized, report = text_blocks(examples, tokenizer, args.seq_len, args.group_texts, args.group_shards,
                                            args.template if args.template != "auto" else args.group_template)
        else:
            tokenized, report = tokenize_dataset(examples, tokenizer, fmt, args.train_on, args.seq_len, stop_ids=stops,
                                                 with_images=_image_tokenizer(args, examples, model, tokenizer, fmt,
                                                                              stops, bounds))
    except NothingToTrain as exc:  # in eval's words, not training's
        raise UsageError(f"--data {args.data}: {exc.subject('of it')} nothing to evaluate: {exc.counts}. Such rows "
                         f"are skipped; {exc.fix}.") from None
    check_positions(model, longest_positions(tokenized), args.model)
    model.eval()
    dtype = model.get_input_embeddings().weight.dtype  # image tensors go in as the 16-bit vision tower takes them
    def collate(units: list) -> dict:
        return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
                for k, v in pad_collate(units, pad_token_id(tokenizer)).items()}

    # each source's rows in batches of their own, so each has its own sums (blocks of grouped texts span sources)
    names = source_locations(args.data, args.dataset_dir) if len(ends) > 1 and not args.group_texts else [args.data]
    parts = [[u for u in tokenized if len(names) == 1 or bisect_right(ends, u.index) == k] for k in range(len(names))]
    sums = []  # (loss sum, tokens) of each source
    with torch.no_grad():
        for part in parts:
            loss_sum, tokens = 0.0, 0
            for i in range(0, len(part), args.batch_size):
                batch = collate(part[i:i + args.batch_size])
                batch_loss = token_loss_sum(model, batch)
                if not torch.isfinite(batch_loss):
                    raise UsageError(_nonfinite(args, model, part[i:i + args.batch_size], collate, examples, dtype))
                loss_sum += batch_loss.item()
                tokens += count_trainable_tokens(batch)
            sums.append((loss_sum, tokens))
    print(f"{args.data}: {report.summary()}", file=sys.stderr if args.json else sys.stdout)
    rows = [end - start for start, end in zip([0, *ends], ends)]
    sources = [{"data": name, "rows": n, "examples": len(part), **_measures(*total)}
               for name, n, part, total in zip(names, rows, parts, sums)] if len(names) > 1 else []
    _print_result(args, report.texts if args.group_texts else report.examples, len(tokenized),
                  sum(s for s, _ in sums), sum(t for _, t in sums), sources)
    return 0


def _follow_record(args: argparse.Namespace) -> tuple[set[str], Path]:
    """--train-on, --seq-len, --eot-tokens and --group-texts/--group-shards not given: the adapter's run's
    (qlora_adapter.json), so the loss is the one that run's eval reported; without --adapter, the run's that a merged
    --model folder carries (trained_tokens.json); else train's defaults. The adapter's record alone counts where one is
    given (the model folder's is of the run merged into it before, as for the chat format). The record is read only
    for options not given (all given, a bad one is passed over); its group_shards and group_template belong to its
    group_texts, so a given --group-texts takes neither.

    Returns:
        The options taken from the record, and the file they were read from.
    """
    from ...errors import UsageError
    from ...model.trained_tokens import INFO_FILE, MODEL_FILE, model_tokenization, trained_tokenization

    missing = [k for k in ("train_on", "seq_len", "eot_tokens", "group_texts") if getattr(args, k, None) is None]
    record_file = Path(args.adapter, INFO_FILE) if args.adapter else Path(args.model, MODEL_FILE)
    recorded = {} if not missing else trained_tokenization(args.adapter) if args.adapter \
        else model_tokenization(args.model)
    if args.group_texts is not None:
        recorded = {k: v for k, v in recorded.items() if k not in ("group_shards", "group_template")}
    taken = set()
    for key, value in {**TRAIN_DEFAULTS, "group_template": "auto", **recorded}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
            taken |= {key} & recorded.keys()
    if args.group_shards != 1 and not args.group_texts:
        raise UsageError(f"--group-shards {args.group_shards} splits the texts that --group-texts groups; give "
                         "--group-texts too (or leave --group-shards out).")
    return taken, record_file


def _recorder(args: argparse.Namespace) -> str:
    """Whose record an option not given came from, for errors."""
    return "the adapter's run's" if args.adapter else "the merged model's run's"


def _nonfinite(args: argparse.Namespace, model, units: list, collate, examples: list, dtype) -> str:
    """The refusal of a loss that is not finite (no loss or perplexity to report, and NaN is not JSON), naming the
    first of ``units`` (a batch) whose loss alone is not, and the first module whose output is not on it."""
    import torch

    from ...train.trainer import first_nonfinite_module, token_loss_sum

    unit = next((u for u in units if not torch.isfinite(token_loss_sum(model, collate([u])))), units[0])
    where = (f"block {unit.index + 1} of the texts --group-texts {args.group_texts} cut" if args.group_texts
             else examples[unit.index].where)
    module = first_nonfinite_module(model, collate([unit]))
    narrow = (" float16 ends at 65504, which such models exceed: evaluate on a GPU with bfloat16 or on the CPU "
              "(float32)." if dtype == torch.float16 else "")
    return (f"--data {args.data}: the loss on {where} is not finite (infinite or NaN"
            + (f"; first non-finite output: {module}" if module else "") + f", computing in {str(dtype)[6:]}), so "
            "there is no loss or perplexity to report: the model's weights (or the adapter's) overflow on this "
            "row; check them." + narrow)


def _measures(loss_sum: float, tokens: int) -> dict:
    """Tokens, the loss per counted token and its perplexity (capped at e^50, as the trainer's); loss and
    perplexity None (JSON null) for a source with no token to count."""
    loss = loss_sum / tokens if tokens else None
    return {"tokens": tokens, "loss": loss, "perplexity": None if loss is None else math.exp(min(loss, 50.0))}


def _print_result(args: argparse.Namespace, rows: int, examples: int, loss_sum: float, tokens: int,
                  sources: list[dict]) -> None:
    """The result, as text or, with --json, as one JSON object at full precision; with several sources, each
    source's own too (``sources``: its data, rows, examples, tokens, loss and perplexity)."""
    result = {"data": args.data, "rows": rows, "examples": examples, **_measures(loss_sum, tokens)}
    if args.json:
        print(json.dumps({**result, "sources": sources} if sources else result))
        return
    for source in sources:
        print(f"  {source['data']}: " + (_line(source) if source["tokens"] else "nothing to evaluate"))
    print(_line(result))


def _line(result: dict) -> str:
    tokens = result["tokens"]
    return (f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
            f"({tokens} {'token' if tokens == 1 else 'tokens'})")


def _image_tokenizer(args: argparse.Namespace, examples, model, tokenizer, fmt, stops, bounds):
    """What tokenizes rows with images as training does (the model folder's processor, each image scaled into
    ``bounds``), or None without any."""
    first = next((e for e in examples if e.images), None)
    if first is None:
        return None
    from ...chat.prefix_suffix import image_row_tokenizer
    from ...model.image_processor import load_image_processor

    processor = load_image_processor(args.model, model, tokenizer, first.where, bounds=bounds)
    return image_row_tokenizer(model, processor, fmt, args.train_on, args.seq_len, stops)
