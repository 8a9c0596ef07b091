"""``qlora eval`` against an independent computation: transformers + PEFT on the same weights, the conversations
rendered by ``apply_chat_template``, the loss summed over the assistant turns' tokens and divided by their count.

The oracle's mask: the tokens of the rendered text that overlap an assistant turn, from where the conversation
leaves the template's generation prompt to the end of the turn's text (the whitespace a template writes after its
end-of-turn marker excluded). It is read from character offsets, not from qlora's tokenization.
"""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import qlora
from chat_families import CONVERSATIONS, family_tokenizer
from qlora.cli.main import main
from qlora.model.chat_format import ChatFormat
from qlora.model.tiny import build_tiny_model
from qlora.train.data.selection import hold_out
from qlora.train.data.templates import TEMPLATES
from random_adapters import randomize_lora_b

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SYSTEM = {"role": "system", "content": "You are a terse assistant."}
CHATS = [CONVERSATIONS[k] for k in ("one turn", "system", "system, two turns", "three turns", "whitespace")]
NO_ANSWER = [{"role": "user", "content": "What is two plus two?"}]  # nothing to evaluate: skipped


def _write(path, rows, opener=open):
    with opener(path, "wt") as fh:
        fh.write("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    return path


def _assistant_labels(tokenizer, messages, **variables):
    text = tokenizer.apply_chat_template(messages, tokenize=False, **variables)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False, **variables)
        through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False, **variables).rstrip()
        assert text.startswith(through)
        start = next((k for k, (a, b) in enumerate(zip(prompt, through)) if a != b), len(prompt))
        spans.append((start, len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [t if any(e > a and s < b for a, b in spans) else -100
              for t, (s, e) in zip(enc["input_ids"], enc["offset_mapping"])]
    return enc["input_ids"], labels


def _oracle(model_dir, adapter, chats, seq_len=512, **variables):
    """(loss per assistant token, tokens) by transformers (+ PEFT), one conversation at a time (``variables``: of
    the chat template)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, adapter)
    model.eval()
    total, count = 0.0, 0
    for messages in chats:
        ids, labels = (x[:seq_len] for x in _assistant_labels(tokenizer, messages, **variables))
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        targets = torch.tensor(labels[1:])
        total += F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    return total / count, count


def _eval(capsys, *argv):
    assert main(["eval", "--quant", "none", "--json", *argv]) == 0
    out = capsys.readouterr().out
    return json.loads(out)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A tiny Llama with Qwen 2.5's tokenizer and template, and a saved adapter with non-zero B."""
    root = tmp_path_factory.mktemp("eval-oracle")
    model_dir = build_tiny_model(root / "model", tokenizer=family_tokenizer("qwen2.5"), arch="llama")
    model, _ = qlora.load_model(model_dir, quant="none", compute_dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    qlora.add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear", verbose=False)
    randomize_lora_b(model, seed=1, scale=0.2)
    qlora.save_adapter(model, root / "adapter")
    return model_dir, root / "adapter"


def test_eval_equals_transformers_and_peft_for_every_batch_size(tmp_path, qwen, capsys):
    """Every assistant turn of multi-turn chats counts; a row with no answer is skipped (not a NaN); the number
    is the same for 1, 3 or 4 rows a batch (padding changes nothing) and for the rows split over a plain and a
    gzip file."""
    model_dir, adapter = qwen
    loss, tokens = _oracle(model_dir, adapter, CHATS)
    whole = _write(tmp_path / "all.jsonl", CHATS[:2] + [NO_ANSWER] + CHATS[2:])
    for batch in ("1", "3", "4"):
        result = _eval(capsys, "--model", str(model_dir), "--adapter", str(adapter), "--data", str(whole),
                       "--batch-size", batch)
        assert (result["rows"], result["examples"], result["tokens"]) == (len(CHATS) + 1, len(CHATS), tokens)
        assert result["loss"] == pytest.approx(loss, rel=1e-5), batch
        assert result["perplexity"] == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-5)
    parts = f"{_write(tmp_path / 'a.jsonl', CHATS[:3])},{_write(tmp_path / 'b.jsonl.gz', CHATS[3:], gzip.open)}"
    split = _eval(capsys, "--model", str(model_dir), "--adapter", str(adapter), "--data", parts)
    assert split["tokens"] == tokens and split["loss"] == pytest.approx(loss, rel=1e-5)
    base_loss, _ = _oracle(model_dir, None, CHATS)
    assert abs(base_loss - loss) > 1e-2  # the adapter matters, so its absence would be seen


def test_eval_counts_one_example_in_the_singular(tmp_path, qwen, capsys):
    model_dir, adapter = qwen
    data = _write(tmp_path / "d.jsonl", CHATS[:1])
    assert main(["eval", "--quant", "none", "--model", str(model_dir), "--adapter", str(adapter), "--data",
                 str(data)]) == 0
    summary, result = capsys.readouterr().out.splitlines()
    assert summary == f"{data}: 1 example, 0 truncated to --seq-len"
    assert result.endswith(f"({_oracle(model_dir, adapter, CHATS[:1])[1]} tokens)"), result


def test_eval_truncates_each_row_to_seq_len(tmp_path, qwen, capsys):
    model_dir, adapter = qwen
    data = _write(tmp_path / "d.jsonl", CHATS)
    loss, tokens = _oracle(model_dir, adapter, CHATS, seq_len=100)
    result = _eval(capsys, "--model", str(model_dir), "--adapter", str(adapter), "--data", str(data),
                   "--seq-len", "100")
    assert result["tokens"] == tokens < _oracle(model_dir, adapter, CHATS)[1]
    assert result["loss"] == pytest.approx(loss, rel=1e-5)


def test_eval_loss_is_the_trainers_eval_loss(tmp_path, qwen, capsys):
    """The docstring's promise: the same data give the number the run's metrics record (4-bit base included)."""
    model_dir, _ = qwen
    data = _write(tmp_path / "d.jsonl", CHATS)
    run = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--eval-data", str(data), "--output",
                 str(run), "--max-steps", "1", "--batch-size", "2", "--lr", "1e-2", "--no-progress"]) == 0
    capsys.readouterr()
    recorded = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    recorded = [r for r in recorded if r["split"] == "eval"][-1]
    assert main(["eval", "--json", "--model", str(model_dir), "--adapter", str(run), "--data", str(data)]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(recorded["loss"], rel=1e-6)


def test_eval_measures_what_the_adapter_trained_on(tmp_path, qwen, capsys):
    """A run with --train-on all, --seq-len 40 and an --eval-split: eval of its adapter on the held-out rows, given no
    option, reports the run's final eval loss (the run records both beside the adapter, checkpoints included); given
    train's defaults it measures other tokens, so the record is what makes them equal. Options still win, and an
    adapter that recorded none (older ones, PEFT's) gets train's defaults."""
    model_dir, _ = qwen
    rows = [json.dumps({"messages": m}) for m in CHATS * 2]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(r + "\n" for r in rows))
    held = tmp_path / "held.jsonl"
    held.write_text("".join(r + "\n" for r in hold_out(rows, 0.3, 7)[1]))  # the rows the run holds out
    run = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--eval-split", "0.3", "--seed", "7",
                 "--train-on", "all", "--seq-len", "40", "--output", str(run), "--max-steps", "2", "--batch-size", "2",
                 "--lr", "1e-2", "--no-progress"]) == 0
    capsys.readouterr()
    recorded = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    recorded = [r for r in recorded if r["split"] == "eval"][-1]
    evaluate = ["eval", "--json", "--model", str(model_dir), "--data", str(held)]
    for adapter in (run, *run.glob("checkpoints/step-*/adapter")):
        assert main([*evaluate, "--adapter", str(adapter)]) == 0
        assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(recorded["loss"], rel=1e-6), adapter
    assert main([*evaluate, "--adapter", str(run), "--train-on", "assistant", "--seq-len", "512"]) == 0
    defaults = json.loads(capsys.readouterr().out)
    assert defaults["loss"] != pytest.approx(recorded["loss"], rel=1e-3)
    info = json.loads((run / "qlora_adapter.json").read_text())
    assert info.pop("tokenization") == {"train_on": "all", "seq_len": 40}
    (run / "qlora_adapter.json").write_text(json.dumps(info))  # as written before runs recorded it
    assert main([*evaluate, "--adapter", str(run)]) == 0
    assert json.loads(capsys.readouterr().out) == defaults
    (run / "qlora_adapter.json").write_text(json.dumps({**info, "tokenization": {"train_on": "al", "seq_len": 40}}))
    assert main([*evaluate, "--adapter", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'qlora_adapter.json'}: tokenization must be" in err and "Traceback" not in err


def test_eval_folds_the_system_message_for_a_template_without_one(tmp_path, capsys):
    """Gemma 2's template refuses a system message; the error names --system-into-user, which qlora eval takes,
    giving the loss of the conversation with the system text opening the first user turn."""
    model_dir = build_tiny_model(tmp_path / "gemma", tokenizer=family_tokenizer("gemma-2"), arch="gemma2")
    chat = [SYSTEM, *CONVERSATIONS["three turns"]]
    data = _write(tmp_path / "d.jsonl", [chat])
    assert main(["eval", "--quant", "none", "--model", str(model_dir), "--data", str(data)]) == 2
    assert "--system-into-user" in capsys.readouterr().err
    folded = [{"role": "user", "content": f"{SYSTEM['content']}\n\n{chat[1]['content']}"}, *chat[2:]]
    loss, tokens = _oracle(model_dir, None, [folded])
    result = _eval(capsys, "--model", str(model_dir), "--data", str(data), "--system-into-user")
    assert result["tokens"] == tokens and result["loss"] == pytest.approx(loss, rel=1e-5)


def _adapter_with_format(root, family: str, **saved):
    """A tiny model of ``family`` and an adapter with non-zero B whose saved chat format is the model's own template
    with ``saved`` (date, system_into_user)."""
    model_dir = build_tiny_model(root / family, tokenizer=family_tokenizer(family), arch="llama")
    model, tokenizer = qlora.load_model(model_dir, quant="none", compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear", verbose=False)
    randomize_lora_b(model, seed=1, scale=0.2)
    qlora.save_adapter(model, root / "adapter")
    ChatFormat(template=tokenizer.chat_template, name="tokenizer", **saved).save(root / "adapter")
    return model_dir, root / "adapter"


def test_a_chosen_template_keeps_the_adapters_pinned_date(tmp_path, capsys):
    """--template naming the adapter's own template (here the model's, as `tokenizer`) measures what auto does: the
    prompts carry the date the run pinned (Llama 3.2's strftime_now), not today's; --template-date still wins."""
    model_dir, adapter = _adapter_with_format(tmp_path, "llama-3.2", date="2025-01-02")
    data = _write(tmp_path / "d.jsonl", [CONVERSATIONS["one turn"], CONVERSATIONS["three turns"]])
    common = ["--model", str(model_dir), "--adapter", str(adapter), "--data", str(data)]
    loss, tokens = _oracle(model_dir, adapter, [CONVERSATIONS["one turn"], CONVERSATIONS["three turns"]],
                           date_string="02 Jan 2025")
    for template in ("auto", "tokenizer"):
        result = _eval(capsys, *common, "--template", template)
        assert result["tokens"] == tokens and result["loss"] == pytest.approx(loss, rel=1e-5), template
    loss, tokens = _oracle(model_dir, adapter, [CONVERSATIONS["one turn"], CONVERSATIONS["three turns"]],
                           date_string="04 Mar 2025")
    result = _eval(capsys, *common, "--template", "tokenizer", "--template-date", "2025-03-04")
    assert result["tokens"] == tokens and result["loss"] == pytest.approx(loss, rel=1e-5)


def test_a_chosen_template_keeps_the_adapters_system_folding_when_it_is_the_same(tmp_path, capsys):
    """An adapter trained with --system-into-user on Gemma 2 (no system role): --template tokenizer (its template)
    folds as auto does, where it used to refuse the system message; another template (chatml, which has a system
    role) is not folded unless --system-into-user says so."""
    model_dir, adapter = _adapter_with_format(tmp_path, "gemma-2", system_into_user=True)
    chat = [SYSTEM, *CONVERSATIONS["three turns"]]
    data = _write(tmp_path / "d.jsonl", [chat])
    folded = [{"role": "user", "content": f"{SYSTEM['content']}\n\n{chat[1]['content']}"}, *chat[2:]]
    loss, tokens = _oracle(model_dir, adapter, [folded])
    for template in ("auto", "tokenizer"):
        result = _eval(capsys, "--model", str(model_dir), "--adapter", str(adapter), "--data", str(data),
                       "--template", template)
        assert result["tokens"] == tokens and result["loss"] == pytest.approx(loss, rel=1e-5), template
    chatml = ["--model", str(model_dir), "--data", str(data), "--template", "chatml"]
    result = _eval(capsys, *chatml, "--adapter", str(adapter))
    unsaved = shutil.copytree(adapter, tmp_path / "unsaved", ignore=shutil.ignore_patterns("chat_format.json"))
    assert result == _eval(capsys, *chatml, "--adapter", str(unsaved))  # its system turn kept, as without a format
    with_fold = _eval(capsys, *chatml, "--adapter", str(adapter), "--system-into-user")
    assert with_fold["loss"] != pytest.approx(result["loss"], rel=1e-4)  # folding would be seen


@pytest.mark.parametrize("content", [None, "", "\n\n"])
def test_eval_refuses_a_missing_or_empty_data_file_before_loading_the_model(tmp_path, capsys, content):
    """Exit 2 naming the file, no traceback, and before the model loads (a typo costs seconds, not a 70B load): the
    model folder here holds only a config.json no loader reads, so an error about it would mean it was loaded first."""
    (tmp_path / "no-model").mkdir()
    (tmp_path / "no-model" / "config.json").write_text('{"model_type": "no-such-model"}')
    data = tmp_path / "d.jsonl"
    if content is not None:
        data.write_text(content)
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and ("not found" in err if content is None else "empty" in err), err
    assert "no-model" not in err and "Traceback" not in err


def test_eval_of_rows_without_answers_says_there_is_nothing_to_evaluate(tmp_path, qwen, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi", "input": "", "output": ""}) + "\n")
    assert main(["eval", "--quant", "none", "--model", str(qwen[0]), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"--data {data}: the one row of it has nothing to evaluate: 1 with an empty answer (first: {data} line 1)" \
        in err and "Traceback" not in err


def test_eval_renders_the_pinned_template_date(tmp_path, capsys):
    """Llama 3.2's template writes today's date (strftime_now) into its system block; --template-date pins it as train's does,
    so a base model is evaluated on the prompt its adapter was trained with (here: transformers' date_string)."""
    model_dir = build_tiny_model(tmp_path / "llama", tokenizer=family_tokenizer("llama-3.2"), arch="llama")
    chat = CONVERSATIONS["one turn"]
    data = _write(tmp_path / "d.jsonl", [chat])
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert "02 Jan 2025" not in tokenizer.apply_chat_template(chat, tokenize=False)  # today's date otherwise
    loss, tokens = _oracle(model_dir, None, [chat], date_string="02 Jan 2025")
    result = _eval(capsys, "--model", str(model_dir), "--data", str(data), "--template-date", "2025-01-02")
    assert result["tokens"] == tokens and result["loss"] == pytest.approx(loss, rel=1e-5)
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--template-date", "2025-13-02"]) == 2
    assert "--template-date '2025-13-02'" in capsys.readouterr().err


def _eval_as_trained(capsys, *argv):
    """``_eval`` on the base as the adapter's run quantized it (its default), as the run's own eval measured."""
    assert main(["eval", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def _run_eval_loss(run):
    recorded = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recorded if r["split"] == "eval"][-1]["loss"]


def _without(run, key):
    """The run's adapter as if its run had not recorded ``key`` of its tokenization (as older runs wrote it)."""
    info = json.loads((run / "qlora_adapter.json").read_text())
    recorded = info["tokenization"].pop(key)
    (run / "qlora_adapter.json").write_text(json.dumps(info))
    return recorded


def test_eval_counts_the_eot_tokens_the_adapter_trained(tmp_path, capsys):
    """A template ending turns with a token that is no end marker of the tokenizer's (<|endofprompt|>): a run with
    --eot-tokens trains it after each assistant turn; eval of its adapter counts it too, reporting the run's eval loss
    without options. Without the record (older runs) it does not, and --eot-tokens, eval's option of the same meaning,
    gives it back."""
    from test_axolotl_data_keys import _eot_model

    model_dir, _ = _eot_model(tmp_path)
    data = _write(tmp_path / "d.jsonl", CHATS * 2)
    run = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--eval-data", str(data), "--output",
                 str(run), "--max-steps", "1", "--batch-size", "2", "--lr", "1e-2", "--no-progress", "--eot-tokens",
                 "<|endofprompt|>"]) == 0
    capsys.readouterr()
    evaluate = ["--model", str(model_dir), "--adapter", str(run), "--data", str(data)]
    followed = _eval_as_trained(capsys, *evaluate)
    assert followed["loss"] == pytest.approx(_run_eval_loss(run), rel=1e-6)
    info = (run / "qlora_adapter.json").read_text()
    for edit, named in (({"eot_tokens": "<|endofprompt|>,<|no-such-token|>"}, "'<|no-such-token|>'"),
                        ({"eot_token": "<|endofprompt|>"}, "'eot_token'")):  # hand-edited: a token it lacks, a typo
        record = json.loads(info)
        record["tokenization"].update(edit)
        (run / "qlora_adapter.json").write_text(json.dumps(record))
        assert main(["eval", *evaluate]) == 2
        err = capsys.readouterr().err
        assert f"{run / 'qlora_adapter.json'}: tokenization" in err and named in err and "Traceback" not in err
        if "eot_tokens" in edit:  # the option beats the record
            assert _eval_as_trained(capsys, *evaluate, "--eot-tokens", "<|endofprompt|>") == followed
    (run / "qlora_adapter.json").write_text(info)
    assert _without(run, "eot_tokens") == "<|endofprompt|>"
    plain = _eval_as_trained(capsys, *evaluate)
    assert plain["tokens"] != followed["tokens"]
    assert _eval_as_trained(capsys, *evaluate, "--eot-tokens", "<|endofprompt|>") == followed


def test_eval_cuts_the_blocks_an_adapter_trained_with_group_texts_on(tmp_path, qwen, capsys):
    """A run with --group-texts (pre-training blocks cut from the texts' stream): eval of its adapter on the same
    texts measures those blocks, the run's eval loss, without options; without the record it measures each text whole
    (other tokens), and --group-texts/--group-shards give the blocks back."""
    model_dir, _ = qwen
    texts = [f"Text number {k} tells of {'many ' * k}things that happen in a day." for k in range(12)]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    run = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--eval-data", str(data), "--format", "text",
                 "--output", str(run), "--max-steps", "1", "--lr", "1e-2", "--no-progress", "--seq-len", "16",
                 "--group-texts", "5", "--group-shards", "2"]) == 0
    capsys.readouterr()
    evaluate = ["--model", str(model_dir), "--adapter", str(run), "--data", str(data), "--format", "text"]
    followed = _eval_as_trained(capsys, *evaluate)
    assert followed["loss"] == pytest.approx(_run_eval_loss(run), rel=1e-6)
    chats = _write(tmp_path / "chats.jsonl", CHATS)  # the run's --group-texts names itself, and the way out
    assert main(["eval", "--model", str(model_dir), "--adapter", str(run), "--data", str(chats)]) == 2
    err = capsys.readouterr().err
    assert "chats.jsonl line 1: this row is a conversation row, not a plain text" in err and "--group-texts 5 (given, or the adapter's run's)" \
        in err and "give --group-texts 0" in err and "Traceback" not in err
    ungrouped = _eval_as_trained(capsys, *evaluate, "--group-texts", "0")  # the record's shards go with its texts
    assert _without(run, "group_texts") == {"texts": 5, "shards": 2, "template": "auto"}
    whole = _eval_as_trained(capsys, *evaluate)
    assert ungrouped == whole
    assert whole["examples"] == len(texts) and whole["tokens"] != followed["tokens"]
    assert _eval_as_trained(capsys, *evaluate, "--group-texts", "5", "--group-shards", "2") == followed
    assert main(["eval", *evaluate, "--group-texts", "0", "--group-shards", "2"]) == 2
    err = capsys.readouterr().err
    assert "--group-shards 2 splits the texts that --group-texts groups" in err and "Traceback" not in err


def test_a_turn_end_that_is_text_not_a_token_is_followed_by_a_trained_eos(tmp_path, capsys):
    """ChatML on Gemma 2's vocabulary, which has no <|im_end|> token: the template's turn end is text (several
    tokens), which no generation can stop on, so qlora trains an EOS after the last answer (the model's stop, as
    generate and serve stop on it): one token more than apply_chat_template's assistant tokens, which TRL's
    SFTTrainer trains as they are (it appends EOS to plain texts only) and whose model would run on into a next turn.
    The oracle: transformers' loss over the assistant tokens plus that EOS."""
    tok = family_tokenizer("gemma-2")
    assert "<|im_end|>" not in tok.get_vocab()
    model_dir = build_tiny_model(tmp_path / "gemma", tokenizer=tok, arch="llama")
    chats = [CONVERSATIONS["one turn"], CONVERSATIONS["three turns"]]
    data = _write(tmp_path / "d.jsonl", chats)
    chatml = transformers.AutoTokenizer.from_pretrained(model_dir)
    chatml.chat_template = TEMPLATES["chatml"]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count, plain = 0.0, 0, 0
    for messages in chats:
        ids, labels = _assistant_labels(chatml, messages)
        plain += sum(label != -100 for label in labels)
        assert tok.decode(ids).rstrip().endswith("<|im_end|>")
        ids, labels = ids + [tok.eos_token_id], labels + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        total += F.cross_entropy(logits, torch.tensor(labels[1:]), ignore_index=-100, reduction="sum").item()
        count += sum(label != -100 for label in labels[1:])
    result = _eval(capsys, "--model", str(model_dir), "--data", str(data), "--template", "chatml")
    assert result["tokens"] == count == plain + len(chats)
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)


def _held_out_run(tmp_path, model_dir, capsys, *options):
    """A run on the chats twice, 30% held out for its eval (--eval-split), with ``options``: (run, held-out rows)."""
    rows = [json.dumps({"messages": m}) for m in CHATS * 2]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(r + "\n" for r in rows))
    held = tmp_path / "held.jsonl"
    held.write_text("".join(r + "\n" for r in hold_out(rows, 0.3, 7)[1]))
    run = tmp_path / "run"
    assert main(["train", "--model", str(model_dir), "--data", str(data), "--eval-split", "0.3", "--seed", "7",
                 "--output", str(run), "--max-steps", "2", "--batch-size", "2", "--lr", "1e-2", "--no-progress",
                 *options]) == 0
    capsys.readouterr()
    return run, held


def _merged_run(tmp_path, model_dir, capsys, *options):
    """A run with --train-on all and --seq-len 40 (and ``options``) merged in fp32: its folder, held-out data, the
    eval of base + adapter (equal to the run's own final eval) and the merged folder."""
    run, held = _held_out_run(tmp_path, model_dir, capsys, *options, "--train-on", "all", "--seq-len", "40")
    adapter = _eval_as_trained(capsys, "--model", str(model_dir), "--adapter", str(run), "--data", str(held))
    assert adapter["loss"] == pytest.approx(_run_eval_loss(run), rel=1e-6)
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(run), "--output", str(merged),
                 "--dtype", "float32"]) == 0
    capsys.readouterr()
    return run, held, adapter, merged


def test_a_merged_model_is_evaluated_as_its_adapter_was(tmp_path, qwen, capsys):
    """A run with --train-on all and --seq-len 40 on a 16-bit base, merged in fp32: eval of the merged folder without
    options reports the loss of eval of base + adapter (the merge carries the run's record), which train's defaults
    would not; `qlora quantize` of the folder keeps the record (its 4-bit loss close, the same tokens). A merged
    folder without the record (older qlora) gets train's defaults, and a hand-edited one is an error naming it."""
    model_dir, _ = qwen
    run, held, adapter, merged = _merged_run(tmp_path, model_dir, capsys, "--quant", "none")
    evaluated = _eval(capsys, "--model", str(merged), "--data", str(held))
    assert evaluated["tokens"] == adapter["tokens"]
    assert evaluated["loss"] == pytest.approx(adapter["loss"], rel=1e-5)
    defaults = _eval(capsys, "--model", str(merged), "--data", str(held), "--train-on", "assistant", "--seq-len", "512")
    assert defaults["tokens"] != adapter["tokens"]
    quantized = tmp_path / "quantized"
    assert main(["quantize", "--model", str(merged), "--output", str(quantized)]) == 0
    capsys.readouterr()
    four_bit = _eval_as_trained(capsys, "--model", str(quantized), "--data", str(held))
    assert four_bit["tokens"] == adapter["tokens"] and four_bit["loss"] == pytest.approx(adapter["loss"], rel=5e-3)
    record = merged / "trained_tokens.json"
    assert json.loads(record.read_text()) == {"tokenization": {"train_on": "all", "seq_len": 40}}
    record.write_text(json.dumps({"tokenization": {"train_on": "all", "seq_len": 1}}))
    assert main(["eval", "--quant", "none", "--model", str(merged), "--data", str(held)]) == 2
    err = capsys.readouterr().err
    assert f"{record}: tokenization must be" in err and "Traceback" not in err
    record.unlink()  # as merged before merges carried it
    assert _eval(capsys, "--model", str(merged), "--data", str(held)) == defaults


def test_a_merge_by_the_python_api_carries_the_runs_records_as_qlora_merge_does(tmp_path, qwen, capsys):
    """qlora.merge + qlora.save_merged of an adapter loaded from its run's folder write what `qlora merge` writes
    beside the weights (the run's trained tokens, --train-on all --seq-len 40, and its chat format, Llama 3's here,
    also as the tokenizer's template), so eval of the folder without options equals eval of base + adapter. The
    caller's tokenizer keeps its own template; a model whose adapter was made in this process, or loaded to train on,
    carries no record."""
    model_dir, _ = qwen
    run, held = _held_out_run(tmp_path, model_dir, capsys, "--quant", "none", "--train-on", "all", "--seq-len", "40",
                              "--template", "llama-3")
    adapter = _eval(capsys, "--model", str(model_dir), "--adapter", str(run), "--data", str(held))
    model, tokenizer = qlora.load_model(model_dir, quant="none", compute_dtype=torch.float32, device="cpu")
    own = tokenizer.chat_template
    qlora.load_adapter(model, run)
    qlora.merge(model)
    qlora.save_merged(model, tmp_path / "api", tokenizer)
    assert tokenizer.chat_template == own
    assert main(["merge", "--model", str(model_dir), "--adapter", str(run), "--output", str(tmp_path / "cli"),
                 "--dtype", "float32"]) == 0
    capsys.readouterr()
    for name in ("trained_tokens.json", "chat_format.json"):
        assert (tmp_path / "api" / name).read_text() == (tmp_path / "cli" / name).read_text(), name
    saved = transformers.AutoTokenizer.from_pretrained(tmp_path / "api").chat_template
    assert saved == ChatFormat.load(run).template != own
    evaluated = _eval(capsys, "--model", str(tmp_path / "api"), "--data", str(held))
    assert evaluated["tokens"] == adapter["tokens"]
    assert evaluated["loss"] == pytest.approx(adapter["loss"], rel=1e-5)
    qlora.add_lora(model, r=2, alpha=4, dropout=0.0, target_modules="all-linear", verbose=False)
    qlora.merge(model)
    qlora.save_merged(model, tmp_path / "fresh", tokenizer)
    assert not (tmp_path / "fresh" / "trained_tokens.json").exists()
    model, _ = qlora.load_model(model_dir, quant="none", compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(model, run, trainable=True)  # to train on: no longer the run's adapter alone
    qlora.merge(model)
    qlora.save_merged(model, tmp_path / "trained-on", tokenizer)
    assert not (tmp_path / "trained-on" / "trained_tokens.json").exists()


def test_a_merge_of_a_4bit_run_and_of_a_run_on_a_merged_model_carries_that_runs_record(tmp_path, qwen, capsys):
    """A run on the default 4-bit base: its merged folder, evaluated without options, measures the tokens base +
    adapter does and a loss close to it (the merged weights quantized again). An adapter trained on that merged
    folder with other options: its merge carries its own record, not the folder's, and an adapter's record beats
    the model folder's (the numbers of eval of merged + adapter and of their merge agree)."""
    model_dir, _ = qwen
    run, held = _held_out_run(tmp_path, model_dir, capsys, "--train-on", "all", "--seq-len", "40")
    adapter = _eval_as_trained(capsys, "--model", str(model_dir), "--adapter", str(run), "--data", str(held))
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(run), "--output", str(merged)]) == 0
    capsys.readouterr()
    evaluated = _eval_as_trained(capsys, "--model", str(merged), "--data", str(held))
    assert evaluated["tokens"] == adapter["tokens"] and evaluated["loss"] == pytest.approx(adapter["loss"], rel=5e-3)
    again = tmp_path / "again"
    again.mkdir()
    second, _ = _held_out_run(again, merged, capsys, "--quant", "none", "--seq-len", "64")
    on_merged = _eval_as_trained(capsys, "--model", str(merged), "--adapter", str(second), "--data", str(held))
    assert on_merged["tokens"] != evaluated["tokens"]
    remerged = tmp_path / "remerged"
    assert main(["merge", "--model", str(merged), "--adapter", str(second), "--output", str(remerged),
                 "--dtype", "float32"]) == 0
    capsys.readouterr()
    assert json.loads((remerged / "trained_tokens.json").read_text()) == {
        "tokenization": {"train_on": "assistant", "seq_len": 64}}
    final = _eval(capsys, "--model", str(remerged), "--data", str(held))
    assert final["tokens"] == on_merged["tokens"] and final["loss"] == pytest.approx(on_merged["loss"], rel=1e-5)


def test_eval_of_a_merged_folder_defaults_to_its_16bit_weights_which_compute_what_the_run_did(tmp_path, qwen,
                                                                                                capsys):
    """A 4-bit run merged in fp32 holds dequant(W) + BA, what base + adapter computed: eval of the folder without
    --quant loads those weights as they are (saying so) and equals eval of base + adapter, where --quant nf4 (the
    default before) quantizes them again, a loss only close to it. A folder qlora quantize wrote loads as stored."""
    model_dir, _ = qwen
    run, held, adapter, merged = _merged_run(tmp_path, model_dir, capsys)
    assert main(["eval", "--json", "--model", str(merged), "--data", str(held)]) == 0
    out, err = capsys.readouterr()
    evaluated = json.loads(out)
    assert "evaluating its 16-bit weights" in err
    assert evaluated["tokens"] == adapter["tokens"]
    assert evaluated["loss"] == pytest.approx(adapter["loss"], rel=1e-5)
    requantized = _eval_as_trained(capsys, "--model", str(merged), "--data", str(held), "--quant", "nf4")
    assert requantized["loss"] != pytest.approx(adapter["loss"], rel=1e-5)
    assert requantized["loss"] == pytest.approx(adapter["loss"], rel=5e-2)
    assert main(["quantize", "--model", str(merged), "--output", str(tmp_path / "q4")]) == 0
    capsys.readouterr()
    assert main(["eval", "--json", "--model", str(tmp_path / "q4"), "--data", str(held)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["loss"] == pytest.approx(requantized["loss"], rel=1e-3) and "16-bit" not in err


def test_a_loss_that_is_not_finite_is_refused_naming_its_row_and_module(tmp_path, qwen, capsys):
    """A model that overflows on one row (its embedding of a token only that row holds is infinite) has no loss to
    report: exit 2 naming that row and the first module whose output is not finite, where NaN was printed, in
    --json as a bare NaN that is not JSON; the rows before it still evaluate (finite)."""
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "model"
    shutil.copytree(qwen[0], model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    seen = {t for m in CHATS[:2] for t in _assistant_labels(tokenizer, m)[0]}
    token = next(t for t in _assistant_labels(tokenizer, CHATS[2])[0] if t not in seen)
    weights = load_file(model_dir / "model.safetensors")
    weights["model.embed_tokens.weight"][token] = float("inf")
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    data = _write(tmp_path / "d.jsonl", CHATS[:3])
    assert _eval(capsys, "--model", str(model_dir), "--data", str(_write(tmp_path / "ok.jsonl", CHATS[:2])))["tokens"]
    for batch in ("1", "3"):
        assert main(["eval", "--quant", "none", "--json", "--model", str(model_dir), "--data", str(data),
                     "--batch-size", batch]) == 2
        out, err = capsys.readouterr()
        assert out == "" and "Traceback" not in err, out
        assert (f"--data {data}: the loss on {data} line 3 is not finite (infinite or NaN; first non-finite output: "
                "model.embed_tokens, computing in float32)" in " ".join(err.split())), err


def test_several_sources_are_each_measured_and_together(tmp_path, qwen, capsys):
    """--data a,b,c: each source's own loss (transformers + PEFT on its rows alone, whatever the batch size: a
    batch never mixes sources) beside the whole's; a source with nothing to evaluate is said so (JSON null)."""
    model_dir, adapter = qwen
    a, b = _write(tmp_path / "a.jsonl", CHATS[:2]), _write(tmp_path / "b.jsonl", CHATS[2:])
    empty = _write(tmp_path / "c.jsonl", [NO_ANSWER])
    spec = f"{a},{b},{empty}"
    (loss_a, tokens_a), (loss_b, tokens_b) = _oracle(model_dir, adapter, CHATS[:2]), _oracle(model_dir, adapter, CHATS[2:])
    for batch in ("1", "3"):
        result = _eval(capsys, "--model", str(model_dir), "--adapter", str(adapter), "--data", spec, "--batch-size", batch)
        first, second, third = result["sources"]
        assert (first["data"], first["rows"], first["examples"], first["tokens"]) == (str(a), 2, 2, tokens_a)
        assert (second["data"], second["rows"], second["examples"], second["tokens"]) == (str(b), 3, 3, tokens_b)
        assert third == {"data": str(empty), "rows": 1, "examples": 0, "tokens": 0, "loss": None, "perplexity": None}
        assert first["loss"] == pytest.approx(loss_a, rel=1e-5) and second["loss"] == pytest.approx(loss_b, rel=1e-5)
        assert first["perplexity"] == pytest.approx(torch.tensor(loss_a).exp().item(), rel=1e-5)
        assert result["loss"] == pytest.approx((loss_a * tokens_a + loss_b * tokens_b) / (tokens_a + tokens_b), rel=1e-5)
    assert abs(loss_a - loss_b) > 1e-3
    assert main(["eval", "--quant", "none", "--model", str(model_dir), "--adapter", str(adapter), "--data", spec]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith(f"  {a}: loss {loss_a:.4f}") and lines[3] == f"  {empty}: nothing to evaluate", lines
    assert lines[4].endswith(f"({tokens_a + tokens_b} tokens)") and len(lines) == 5
    assert "sources" not in _eval(capsys, "--model", str(model_dir), "--data", str(a))  # one source: the whole alone
