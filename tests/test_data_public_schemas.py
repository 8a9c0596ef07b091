"""Schemas of public datasets (mirrored in small local rows with the same columns and types): the tokens trained,
or the refusal that says which option fits. lmsys/lmsys-chat-1m's ``conversation``, LDJnr/Capybara's
``{"input", "output"}`` exchanges, Salesforce/xlam-function-calling-60k's JSON-string tool calls, preference
datasets given to SFT (Anthropic/hh-rlhf, trl-lib and HuggingFaceH4 ultrafeedback_binarized) and HelpSteer2's
scored response pairs given to DPO."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.model.chat_format import ChatFormat
from qlora.train.data import load_records, normalize, tokenize_example
from qlora.train.data.preference import normalize_preferences
from qlora.train.data.unpaired import normalize_unpaired

from conftest import QWEN_TEMPLATE as QWEN
TOOLS = [{"name": "live_giveaways_by_type", "description": "Retrieve live giveaways.",
          "parameters": {"type": {"description": "The type of giveaways", "type": "str", "default": "game"}}}]
CHOSEN = [{"content": "Hi?", "role": "user"}, {"content": "Hello!", "role": "assistant"}]
REJECTED = [{"content": "Hi?", "role": "user"}, {"content": "Go.", "role": "assistant"}]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _trained(path: Path, tokenizer, fields: str | None = None) -> tuple[list[str], str]:
    """The trained spans of the first row, decoded, and its whole text."""
    example = normalize(load_records(path), "auto", fields)[0]
    tokenized = tokenize_example(example, tokenizer, ChatFormat(QWEN))
    runs, run = [], []
    for token, label in zip(tokenized.input_ids, tokenized.labels):
        if label != -100:
            run.append(token)
        elif run:
            runs, run = runs + [tokenizer.decode(run)], []
    return runs + ([tokenizer.decode(run)] if run else []), tokenizer.decode(tokenized.input_ids)


def test_lmsys_conversation_column_with_extra_columns(tmp_path, qwen_tokenizer):
    row = {"conversation_id": "33f01939", "model": "vicuna-13b", "turn": 2, "language": "English",
           "conversation": [{"content": "Hi", "role": "user"}, {"content": "Hello!", "role": "assistant"},
                            {"content": "Bye", "role": "user"}, {"content": "See you.", "role": "assistant"}],
           "openai_moderation": [{"categories": {"harassment": False}, "category_scores": {"harassment": 0.01},
                                  "flagged": False}] * 4, "redacted": False}
    runs, text = _trained(_jsonl(tmp_path / "lmsys.jsonl", [row]), qwen_tokenizer)
    assert runs == ["Hello!<|im_end|>", "See you.<|im_end|>"]
    assert "<|im_start|>user\nBye<|im_end|>" in text and "vicuna" not in text


def test_capybara_input_output_exchanges_from_parquet(tmp_path, qwen_tokenizer):
    rows = [{"source": "Airoboros", "conversation": [{"input": "What is 2+2?", "output": "It is 4."},
                                                     {"input": "And 3+3?", "output": "It is 6."}]}]
    path = tmp_path / "capybara.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)  # a list of structs, as the hub's parquet holds it
    runs, text = _trained(path, qwen_tokenizer)
    assert runs == ["It is 4.<|im_end|>", "It is 6.<|im_end|>"]
    assert "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\nIt is 6." in text


def test_xlam_tool_calls_as_json_strings(tmp_path, qwen_tokenizer):
    calls = [{"name": "live_giveaways_by_type", "arguments": {"type": "beta"}},
             {"name": "live_giveaways_by_type", "arguments": {"type": "game"}}]
    row = {"id": 0, "query": "Where can I find live beta and game giveaways?", "answers": json.dumps(calls),
           "tools": json.dumps(TOOLS)}
    path = _jsonl(tmp_path / "xlam.jsonl", [row])
    with pytest.raises(UsageError, match="--data-fields prompt=query,completion=answers: the calls are"):
        normalize(load_records(path))
    runs, text = _trained(path, qwen_tokenizer, "prompt=query,completion=answers")
    assert runs == ['<tool_call>\n{"name": "live_giveaways_by_type", "arguments": {"type": "beta"}}\n</tool_call>\n'
                    '<tool_call>\n{"name": "live_giveaways_by_type", "arguments": {"type": "game"}}\n</tool_call>'
                    "<|im_end|>\n"]
    assert text.index('"description": "Retrieve live giveaways."') < text.index("<|im_start|>user")  # untrained


@pytest.mark.parametrize("row, hint", [
    ({"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go."},
     '"chosen" holds the whole text, prompt included: --data-fields text=chosen trains every token'),
    ({"chosen": CHOSEN, "rejected": REJECTED, "score_chosen": 8.0, "score_rejected": 2.0},
     '"chosen" holds the whole conversation: --data-fields messages=chosen'),
    ({"prompt": "Hi?", "prompt_id": "p0", "chosen": CHOSEN, "rejected": REJECTED, "messages": CHOSEN},
     'train the "messages" column these rows also have: --format chat.'),
    ({"system": "", "question": "Hi?", "prompt": "Hi?", "chosen": "Hello!", "rejected": "Go."},
     "--data-fields completion=chosen"),
])
def test_preference_rows_given_to_sft_name_the_mapping_that_fits(tmp_path, row, hint):
    path = _jsonl(tmp_path / "pairs.jsonl", [row])
    with pytest.raises(UsageError, match="preference pairs") as error:
        normalize(load_records(path))
    assert hint in str(error.value)


def test_suggested_mappings_train(tmp_path, qwen_tokenizer):
    """The mappings the refusals above suggest train the chosen answers only."""
    path = _jsonl(tmp_path / "uf.jsonl", [{"chosen": CHOSEN, "rejected": REJECTED, "score_chosen": 8.0}])
    assert _trained(path, qwen_tokenizer, "messages=chosen")[0] == ["Hello!<|im_end|>"]
    path = _jsonl(tmp_path / "h4.jsonl", [{"prompt": "Hi?", "chosen": CHOSEN, "rejected": REJECTED,
                                           "messages": CHOSEN}])
    example = normalize(load_records(path), "chat")[0]
    assert example.messages == ({"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"})


def test_scored_response_pairs_refused_for_dpo_and_sft(tmp_path, tiny_model_dir, capsys):
    row = {"split": "train", "prompt": "What is 2+2?", "response_1": "It is 4.", "response_2": "It is 5.",
           "preference_strength": -2, "preference_statement": "@Response 1 is better.",
           "preference_elaboration": "Response 2 is wrong.",
           "three_most_similar_preferences": [{"statement": "a", "elaboration": "b", "strength": -2}],
           "all_preferences_unprocessed": [-2, -3, -2]}
    path = _jsonl(tmp_path / "helpsteer.jsonl", [row])
    with pytest.raises(UsageError, match='--data-fields chosen=COLUMN,rejected=COLUMN; answers that are only scored'):
        normalize_preferences(load_records(path))
    with pytest.raises(UsageError, match="cannot tell the data format") as error:
        normalize(load_records(path))
    assert "messages=three_most_similar_preferences" not in str(error.value)  # scored notes are no conversation
    assert main(["train", "--method", "dpo", "--model", str(tiny_model_dir), "--data", str(path), "--output",
                 str(tmp_path / "run"), "--max-steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f'{path} line 1: field "chosen" is missing' in err and "Traceback" not in err


def test_zstd_compressed_jsonl_reads_as_its_plain_twin(tmp_path):
    """Hub repositories store some corpora as .jsonl.zst shards (The Pile's, SlimPajama's): read as datasets reads
    them with the zstandard package."""
    zstandard = pytest.importorskip("zstandard")
    rows = [{"text": "The Pile's rows hold text", "meta": {"pile_set_name": "Github"}},
            {"text": "and a meta", "meta": {"pile_set_name": "ArXiv"}}]
    path = tmp_path / "train.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert [r.fields for r in load_records(path)] == rows


def test_wikitext_blank_lines_are_skipped_not_refused(tmp_path, qwen_tokenizer):
    """Salesforce/wikitext (wikitext-2-raw-v1) serves a corpus line a row, a third of them empty strings."""
    from qlora.train.data.tokenized_dataset import tokenize_dataset
    from qlora.train.data.text_blocks import text_blocks

    rows = [{"text": ""}, {"text": " = Valkyria Chronicles III = \n"}, {"text": ""},
            {"text": " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game . \n"}]
    path = tmp_path / "wikitext.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    examples = normalize(load_records(path))
    tokenized, report = tokenize_dataset(examples, qwen_tokenizer, ChatFormat(QWEN))
    assert [qwen_tokenizer.decode(t.input_ids) for t in tokenized] == ["<|bos|>" + r["text"] + "<|eos|>" for r in rows[1::2]]
    assert report.untrainable_where == [f"{path} row 0", f"{path} row 2"]
    assert "2 skipped with no trainable tokens" in report.summary()
    # --group-texts keeps LLaMA-Factory's stream: every text, an empty one too, followed by its EOS
    blocks, block_report = text_blocks(examples, qwen_tokenizer, 4, 1000)
    assert block_report.tokens == sum(len(qwen_tokenizer(r["text"] + "<|eos|>", add_special_tokens=False)["input_ids"]) for r in rows)
    blank = tmp_path / "blank.parquet"
    pq.write_table(pa.Table.from_pylist(rows[::2]), blank)
    with pytest.raises(UsageError, match=rf"all 2 texts of the data are empty \(first: {blank} row 0"):
        tokenize_dataset(normalize(load_records(blank)), qwen_tokenizer, ChatFormat(QWEN))
    # a null text (a parquet gap) is an empty one, not a missing column
    gaps = tmp_path / "gaps.parquet"
    pq.write_table(pa.Table.from_pylist([rows[1], {"text": None}, rows[3]]), gaps)
    tokenized, report = tokenize_dataset(normalize(load_records(gaps)), qwen_tokenizer, ChatFormat(QWEN))
    assert [t.index for t in tokenized] == [0, 2] and report.untrainable_where == [f"{gaps} row 1"]
    with pytest.raises(UsageError, match=r'line 1: field "text" is missing'):
        normalize(load_records(_jsonl(tmp_path / "other.jsonl", [{"body": "x"}])), "text")


def test_openorca_refusal_maps_its_system_prompt_too(tmp_path, qwen_tokenizer):
    """Open-Orca/OpenOrca: id, system_prompt (often empty), question, response."""
    rows = [{"id": "niv.242684", "system_prompt": "", "question": "Classify: is 7 prime?", "response": "Yes"},
            {"id": "flan.564327", "system_prompt": "You are a helpful assistant.", "question": "Say hi.",
             "response": "Hi."}]
    path = tmp_path / "openorca.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(UsageError, match="--data-fields instruction=question,output=response,system=system_prompt "):
        normalize(load_records(path))
    example = normalize(load_records(path), "auto", "instruction=question,output=response,system=system_prompt")[1]
    assert example.messages[0] == {"role": "system", "content": "You are a helpful assistant."}


def test_nemotron_message_list_input_and_string_output(tmp_path, qwen_tokenizer):
    """nvidia/Llama-Nemotron-Post-Training-Dataset: ``input`` the conversation so far, ``output`` the reply (with its
    ``<think>`` block), ``system_prompt`` the reasoning switch, ``reasoning`` a mode flag."""
    row = {"input": [{"role": "user", "content": "Solve 2+2."}], "output": "<think>\n2+2=4\n</think>\n\n4",
           "category": "math", "license": "cc-by-4.0", "reasoning": "on", "generator": "DeepSeek-R1",
           "used_in_training": "Ultra, Nano", "version": "v1", "system_prompt": "detailed thinking on"}
    path = tmp_path / "nemotron.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    with pytest.raises(UsageError, match="map them with --data-fields prompt=input,completion=output,"
                                         "system=system_prompt\\. "):
        normalize(load_records(path))
    runs, text = _trained(path, qwen_tokenizer, "prompt=input,completion=output,system=system_prompt")
    assert runs == ["<think>\n2+2=4\n</think>\n\n4<|im_end|>\n"]
    assert text.startswith("<|im_start|>system\ndetailed thinking on<|im_end|>\n<|im_start|>user\nSolve 2+2.")


def test_prompt_completion_strings_with_a_system_column_are_conversations(tmp_path, qwen_tokenizer):
    """A system prompt has no place in plain text: a source with a non-empty ``system`` column is rendered by the
    chat template, every row of it (an empty system prompt too), as preference pairs with one are."""
    path = _jsonl(tmp_path / "pc.jsonl", [{"system": "Be brief.", "prompt": "Hi?", "completion": "Hello."},
                                          {"system": "", "prompt": "Bye?", "completion": "See you."}])
    examples = normalize(load_records(path))
    assert [e.messages for e in examples] == [
        ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
         {"role": "assistant", "content": "Hello."}),
        ({"role": "user", "content": "Bye?"}, {"role": "assistant", "content": "See you."})]
    assert [e.prompt_turns for e in examples] == [2, 1]
    runs, text = _trained(path, qwen_tokenizer)
    assert runs == ["Hello.<|im_end|>\n"] and text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    plain = _jsonl(tmp_path / "plain.jsonl", [{"system": "", "prompt": "Hi?", "completion": " Hello."}])
    assert normalize(load_records(plain))[0].text == " Hello."  # no system prompt anywhere: plain text, as TRL


@pytest.mark.parametrize("tie, pair", [
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Hello"},  # Anthropic HH
     {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B"}),
    ({"source": "x", "chosen": CHOSEN, "rejected": CHOSEN},  # argilla/Capybara-Preferences
     {"source": "y", "chosen": CHOSEN, "rejected": REJECTED}),
])
def test_pairs_with_the_same_two_answers_are_skipped_and_reported(tmp_path, qwen_tokenizer, tie, pair):
    """A pair whose chosen and rejected answers are the same teaches no preference; it no longer refuses the dataset."""
    from qlora.train.data.preference import tokenize_pairs
    from qlora.train.data.unpaired import normalize_unpaired, tokenize_unpaired

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([tie, pair]), path)
    pairs, report = tokenize_pairs(normalize_preferences(load_records(path)), qwen_tokenizer, ChatFormat(QWEN))
    assert [p.index for p in pairs] == [1] and report.identical == [f"{path} row 0"]
    assert f"1 skipped whose chosen and rejected answers are the same (first: {path} row 0)" in report.summary()
    units, report = tokenize_unpaired(normalize_unpaired(load_records(path)), qwen_tokenizer, ChatFormat(QWEN))
    assert [(u.index, u.desirable) for u in units] == [(2, True), (3, False)] and len(report.identical) == 2
    only_ties = tmp_path / "ties.parquet"
    pq.write_table(pa.Table.from_pylist([tie]), only_ties)
    with pytest.raises(UsageError, match="all 1 preference pairs have the same chosen and rejected answer"):
        tokenize_pairs(normalize_preferences(load_records(only_ties)), qwen_tokenizer, ChatFormat(QWEN))


@pytest.mark.parametrize("row, mapping", [
    # openbmb/UltraInteract_pair: the question is the "trajectory" conversation; both answers start "Step 1:"
    ({"task": "Math_CoT", "dataset": "mathqa", "trajectory": [{"from": "user", "value": "Solve 2+2."}],
      "chosen": "Step 1: add. 4", "rejected": "Step 1: guess. 5", "id": "a1", "parent_id": "p1"}, "prompt=trajectory"),
    # Intel/orca_dpo_pairs rows with an empty system prompt, answers that start alike
    ({"system": "", "question": "Add 2 and 2.", "chosen": "The answer is 4.", "rejected": "The answer is 5."},
     "prompt=question"),
])
def test_shared_start_of_answers_is_no_prompt_when_the_row_holds_one(tmp_path, row, mapping):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    with pytest.raises(UsageError, match=f"this row has another column for the prompt.*--data-fields {mapping}\\."):
        normalize_preferences(load_records(path))
    (pair,) = normalize_preferences(load_records(path), mapping)
    if "trajectory" in row:  # a message-list prompt makes the pair a conversation
        assert pair.prompt == ({"role": "user", "content": "Solve 2+2."},)
        assert pair.chosen == ({"role": "assistant", "content": "Step 1: add. 4"},)
    else:
        assert (pair.prompt, pair.chosen, pair.rejected) == ("Add 2 and 2.", "The answer is 4.", "The answer is 5.")


def test_tinystories_txt_documents_are_the_texts_between_endoftext(tmp_path, qwen_tokenizer):
    """roneneldan/TinyStories' TinyStoriesV2-GPT4-*.txt: stories separated by ``<|endoftext|>`` lines, their
    paragraphs by single newlines (so no blank line in the file): a story is one text, the separator none."""
    path = tmp_path / "TinyStoriesV2-GPT4-valid.txt"
    path.write_text("Spot. Spot saw the shiny car.\nSpot said, \"Wow, Kitty!\"\n<|endoftext|>\n"
                    "Once upon a time, there was a big cat.\n\nThe cat slept.\n<|endoftext|>\n\n<|endoftext|>\n"
                    "Tim had a red ball.<|endoftext|>Lily liked to paint.\n")
    records = load_records(path)
    assert [r.fields["text"] for r in records] == [
        "Spot. Spot saw the shiny car.\nSpot said, \"Wow, Kitty!\"",
        "Once upon a time, there was a big cat.\n\nThe cat slept.", "Tim had a red ball.", "Lily liked to paint."]
    assert [r.where.rsplit(" ", 1)[1] for r in records] == ["1", "4", "10", "10"]
    examples = normalize(records)
    tokenized = tokenize_example(examples[1], qwen_tokenizer, ChatFormat(QWEN))
    text = qwen_tokenizer.decode(tokenized.input_ids)
    assert text.removeprefix(qwen_tokenizer.bos_token) == (
        "Once upon a time, there was a big cat.\n\nThe cat slept." + qwen_tokenizer.eos_token)


@pytest.mark.parametrize("row, answer", [
    ({"problem": "Find x if 2x=4.", "generated_solution": "Divide by 2: x = \\boxed{2}.", "expected_answer": "2",
      "problem_source": "augmented_math"}, "Divide by 2: x = \\boxed{2}."),  # nvidia/OpenMathInstruct-2
    ({"problem": "What is 3*3?", "deepseek_reasoning": "Three threes are nine.", "deepseek_solution": "9",
      "ground_truth_solution": "9", "domain": "math", "source": "numina_math", "test_cases": None,
      "starter_code": None}, "9"),  # open-thoughts/OpenThoughts-114k, config metadata
    ({"inputs": "Translate hello to German.", "targets": "Hallo.", "language": "English", "language_code": "eng",
      "annotation_type": "original-annotations", "user_id": "u1"}, "Hallo."),  # CohereForAI/aya_dataset
    ({"answer": "SELECT COUNT(*) FROM head WHERE age > 56", "question": "How many heads are older than 56?",
      "context": "CREATE TABLE head (age INTEGER)"}, "SELECT COUNT(*) FROM head WHERE age > 56"),  # b-mc2/sql-create-context
    ({"id": "a1", "input": "Given n, print 2n.", "output": "<think>\nDouble it.\n</think>\n\nprint(2*int(input()))",
      "source": "codeforces", "license": "cc-by-4.0", "dataset": "code_contests", "split": "train", "difficulty": "2",
      "solution": "print(2*int(input()))"}, "<think>\nDouble it.\n</think>\n\nprint(2*int(input()))"),  # nvidia/OpenCodeReasoning
    ({"id": "0", "data": ["How can I learn Python?", "Practice daily.", "Thanks!", "You're welcome."]},
     "You're welcome."),  # stingning/ultrachat: the turns as plain strings
])
def test_refusals_suggest_a_mapping_that_trains_the_answer(tmp_path, row, answer):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    with pytest.raises(UsageError, match="cannot tell the data format") as error:
        normalize(load_records(path))
    mapping = re.search(r"--data-fields (\S+?)[;.]? ", str(error.value)).group(1)
    assert "text=" not in mapping and "output=output" not in mapping
    example = normalize(load_records(path), "auto", mapping)[0]
    assert example.messages[-1]["role"] == "assistant" and example.messages[-1]["content"] == answer
    assert row.get("context", "") in example.messages[-2]["content"]  # the table's schema, for the SQL answer
    if "deepseek_reasoning" in row:
        assert example.messages[-1]["reasoning"] == "Three threes are nine."


def test_prompt_only_rows_are_refused_for_every_method(tmp_path):
    """trl-lib/ultrafeedback-prompt: a ``prompt`` message list and nothing else, data for online methods (GRPO);
    PKU-Alignment/PKU-SafeRLHF's prompts come with scored responses, which are no prompt-only rows."""
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": [{"content": "Write a poem.", "role": "user"}]}]), path)
    for read in (normalize, normalize_preferences, normalize_unpaired):
        with pytest.raises(UsageError, match=r'prompts\.parquet row 0: these rows hold only a "prompt" .* '
                                             r'online methods') as error:
            read(load_records(path))
        assert "--format" not in str(error.value)  # no format reads them: the refusal says what they are for
    pku = _jsonl(tmp_path / "pku.jsonl", [{"prompt": "How do I pick a lock?", "response_0": "I can't help.",
                                           "response_1": "Use a wrench.", "prompt_source": "Alpaca3-70B",
                                           "better_response_id": 1, "safer_response_id": 0}])
    with pytest.raises(UsageError, match="answers that are only scored"):
        normalize_preferences(load_records(pku))


def test_hyphenated_function_speakers_are_tool_call_and_result_turns(tmp_path, qwen_tokenizer):
    """Locutusque/function-calling-chatml: ShareGPT speakers ``function-call`` (the call as JSON) and
    ``function-response``, beside ``system_message`` and ``function_description`` columns."""
    row = {"system_message": "You have access to get_time.", "function_description": '{"name": "get_time"}',
           "conversations": [{"from": "system", "value": "You have access to get_time."},
                             {"from": "human", "value": "What time is it?"},
                             {"from": "function-call", "value": '{"name": "get_time", "arguments": "{}"}'},
                             {"from": "function-response", "value": '{"time": "12:00"}'},
                             {"from": "gpt", "value": "It is noon."}]}
    path = tmp_path / "fc.parquet"
    pq.write_table(pa.Table.from_pylist([row]), path)
    runs, text = _trained(path, qwen_tokenizer)
    assert runs == ['<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>',
                    "It is noon.<|im_end|>"]
    assert '<tool_response>\n{"time": "12:00"}\n</tool_response>' in text


def test_stepwise_supervision_rows_are_named_as_such(tmp_path):
    """trl-lib/math_shepherd: ``prompt``, ``completions`` (reasoning steps) and ``labels`` (one bool a step)."""
    path = tmp_path / "shepherd.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "2+2?", "completions": ["Step 1: 2+2=4.", "Step 2: 4."],
                                          "labels": [True, True]}]), path)
    for read in (normalize, normalize_preferences, normalize_unpaired):
        with pytest.raises(UsageError, match=r"shepherd\.parquet row 0: these rows are TRL's stepwise-supervision "
                                             r"data .* process reward models") as error:
            read(load_records(path))
        assert "messages=completions" not in str(error.value) and "--format" not in str(error.value)
        assert "COLUMN" not in str(error.value)


ARGILLA_UF = {"source": "evol_instruct", "instruction": "Say hi.", "chosen_response": "Hi!", "chosen_rating": 5,
              "chosen_avg_rating": 5.0, "chosen_model": "gpt-4", "rejected_response": "Go.", "rejected_rating": 2,
              "rejected_avg_rating": 2.0, "rejected_model": "llama-2-7b-chat"}
ORCA_PAIRS = {"system": "You are helpful.", "input": "Say hi.", "chosen": "Hi!", "rejected": "Go.",
              "generations": ["Hi!", "Go."], "order": ["gpt4", "gpt35"], "labelling_model": "gpt-4-1106-preview",
              "labelling_prompt": [{"content": "You are a judge.", "role": "system"},
                                   {"content": "Rate.", "role": "user"}],
              "raw_labelling_response": "9 4", "rating": [9.0, 4.0], "rationale": "The first greets.",
              "status": "unchanged", "original_chosen": "Hi!", "original_rejected": "Go.", "chosen_score": 9.0,
              "in_gsm8k_train": False}


def test_preference_refusals_name_the_exact_columns_and_the_mapping_trains_the_pair(tmp_path, qwen_tokenizer):
    """argilla/ultrafeedback-binarized-preferences (``instruction``, ``chosen_response``, ``rejected_response``
    beside their ratings and models) and argilla/distilabel-intel-orca-dpo-pairs (``system``, ``input``,
    ``chosen``, ``rejected``): each refusal names the columns, and the mapping it names reads the right pair."""
    argilla = _jsonl(tmp_path / "argilla.jsonl", [ARGILLA_UF])
    mapping = "prompt=instruction,chosen=chosen_response,rejected=rejected_response"
    for read in (normalize_preferences, normalize_unpaired):
        with pytest.raises(UsageError, match=f"--data-fields {mapping}[.;]") as error:
            read(load_records(argilla))
        assert "COLUMN" not in str(error.value)
    with pytest.raises(UsageError, match="cannot tell the data format") as error:  # given to SFT: both ways named
        normalize(load_records(argilla))
    assert ("--method dpo, orpo, cpo, simpo or kto). If 'instruction' is the prompt, 'chosen_response' the chosen "
            f"answer and 'rejected_response' the rejected answer, map them with --data-fields {mapping}."
            ) in str(error.value)
    assert _trained(argilla, qwen_tokenizer, "output=chosen_response")[0] == ["Hi!<|im_end|>"]
    pair = normalize_preferences(load_records(argilla), mapping)[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Say hi.", "Hi!", "Go.")
    assert [(e.prompt, e.completion, e.desirable) for e in normalize_unpaired(load_records(argilla), mapping)] == [
        ("Say hi.", "Hi!", True), ("Say hi.", "Go.", False)]

    orca = _jsonl(tmp_path / "orca.jsonl", [ORCA_PAIRS])
    for read in (normalize_preferences, normalize_unpaired):
        with pytest.raises(UsageError, match="--data-fields prompt=input[.;]"):
            read(load_records(orca))
    system_user = ({"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Say hi."})
    pair = normalize_preferences(load_records(orca), "prompt=input")[0]
    assert (pair.prompt, pair.chosen, pair.rejected) == (
        system_user, ({"role": "assistant", "content": "Hi!"},), ({"role": "assistant", "content": "Go."},))
    with pytest.raises(UsageError, match="preference pairs") as error:  # given to SFT: the answer is not the text
        normalize(load_records(orca))
    said = str(error.value)
    assert "text=chosen" not in said and "--method dpo, orpo, cpo or simpo (with --data-fields prompt=input)" in said
    sft = re.search(r"--data-fields (instruction=input,output=chosen)\b", said).group(1)
    example = normalize(load_records(orca), "auto", sft)[0]
    assert example.messages == (*system_user, {"role": "assistant", "content": "Hi!"})
    assert _trained(orca, qwen_tokenizer, sft)[0] == ["Hi!<|im_end|>"]


def test_arena_model_names_are_no_answer_column(tmp_path):
    """lmsys/chatbot_arena_conversations: two models' whole conversations (``conversation_a``, ``conversation_b``)
    beside their names (``model_a``, ``model_b``) and the ``winner``. The suggestion took ``model_a`` for the reply
    (its last part "a" read as an answer column's name), so --data-fields prompt=conversation_a,completion=model_a
    would have trained a model's name after a finished conversation."""
    row = {"question_id": "58210e39b3fd4441a2bd4a518bb44c2d", "model_a": "chatglm-6b", "model_b": "koala-13b",
           "winner": "model_b", "judge": "arena_user_973", "conversation_a": CHOSEN, "conversation_b": REJECTED,
           "turn": 1, "anony": True, "language": "English", "tstamp": 1682351591.1322,
           "openai_moderation": {"categories": {"harassment": False}, "category_scores": {"harassment": 0.01},
                                 "flagged": False},
           "toxic_chat_tag": {"roberta-large": {"flagged": False, "probability": 0.008},
                              "t5-large": {"flagged": False, "score": 0.0001}}}
    with pytest.raises(UsageError, match="cannot tell the data format") as error:
        normalize(load_records(_jsonl(tmp_path / "arena.jsonl", [row])))
    assert "model_a" not in str(error.value).split("Expected")[1]
    assert "--data-fields messages=conversation_a" in str(error.value)
    with pytest.raises(UsageError, match="--data-fields instruction=q,output=a "):  # "a" named whole still is one
        normalize(load_records(_jsonl(tmp_path / "qa.jsonl", [{"q": "Hi?", "a": "Hello!"}])))
