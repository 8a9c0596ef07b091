"""Prefix-LM models (PaliGemma 1 and 2) train as their processor marks a prompt and its suffix.

Oracle: PaliGemmaProcessor(images, text=prompt, suffix=answer) gives token_type_ids (0 on the image and prompt, 1
on the answer) and labels; transformers' forward on those is the loss of the answer with its prompt read both
ways. qlora's loss on the same prompt/completion row (text only: the processor's tokens without the image ones)
must be that, on eager and sdpa attention, packed or not, and no answer token's loss may change when a later
token does.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

from qlora.errors import UsageError
from qlora.train.config import load_config
from qlora.train.data import IGNORE_INDEX
from qlora.train.loss import token_loss_sum
from qlora.chat.prefix_lm import prefix_tokens
from qlora.train.trainer import Trainer
from image_models import build_paligemma

PROMPT, ANSWER = "what is in the picture?", "a red square on a blue field"


@pytest.fixture(scope="module", params=["gemma", "gemma2"])
def model_dir(request, tmp_path_factory):
    """A tiny PaliGemma (Gemma text model) or PaliGemma 2 (Gemma 2, with sliding-window layers)."""
    return build_paligemma(tmp_path_factory.mktemp("paligemma") / "model", request.param, sliding_window=4)


def _skip_unsupported(model_dir, attn):
    if attn == "sdpa" and AutoConfig.from_pretrained(model_dir).text_config.model_type == "gemma2":
        pytest.skip("transformers' Gemma 2 has no sdpa attention (its logits are soft-capped)")


def _oracle(model_dir, attn):
    """transformers' per-token losses of the processor's inputs, without the image tokens."""
    from PIL import Image

    processor = AutoProcessor.from_pretrained(model_dir)
    inputs = processor(images=[Image.new("RGB", (28, 28))], text="<image>" + PROMPT, suffix=ANSWER,
                       return_tensors="pt")
    text = inputs["input_ids"][0] != processor.tokenizer.convert_tokens_to_ids("<image>")
    inputs = {k: inputs[k][:, text] for k in ("input_ids", "attention_mask", "token_type_ids", "labels")}
    model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)
    with torch.no_grad():
        logits = model.eval()(**inputs).logits
    return inputs, F.cross_entropy(logits[0, :-1], inputs["labels"][0, 1:], ignore_index=IGNORE_INDEX,
                                   reduction="none")


def _trainer(model_dir, tmp_path, rows, **kw):
    tmp_path.mkdir(exist_ok=True)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = dict(model=str(model_dir), data=str(data), output=str(tmp_path / "out"), max_steps=1, batch_size=len(rows),
               progress=False, seq_len=256, quant="none", precision="fp32", dropout=0.0, warmup_ratio=0.0,
               overwrite=True)
    trainer = Trainer(load_config(None, {**cfg, **kw}))
    trainer.setup()
    trainer.model.eval()
    return trainer


def _losses(trainer, batch):
    """qlora's forward (its model inputs) as per-token losses."""
    from qlora.train.loss import model_inputs

    with torch.no_grad():
        logits = trainer.model(**model_inputs(batch, trainer.model), use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX,
                           reduction="none")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_a_prompt_and_answer_row_is_the_processors_prefix_and_suffix(model_dir, attn, tmp_path):
    _skip_unsupported(model_dir, attn)
    inputs, oracle = _oracle(model_dir, attn)
    ids, labels = inputs["input_ids"][0].tolist(), inputs["labels"][0]
    first = int((labels != IGNORE_INDEX).nonzero()[0])
    tok = AutoProcessor.from_pretrained(model_dir).tokenizer
    row = {"prompt": tok.decode(ids[:first]), "completion": tok.decode(ids[first:-1])}
    trainer = _trainer(model_dir, tmp_path, [row])
    trainer.model.set_attn_implementation(attn)
    batch = trainer._collate(trainer.train_units)
    assert batch["input_ids"][0].tolist() == ids and batch["labels"][0].tolist() == labels.tolist()
    ours = _losses(trainer, batch)[0]
    torch.testing.assert_close(ours, oracle, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert token_loss_sum(trainer.model, batch).item() == pytest.approx(oracle.sum().item(), rel=1e-5)

    # no answer token sees a later one: changing the last answer token leaves every earlier loss as it was
    changed = {k: v.clone() for k, v in batch.items()}
    changed["input_ids"][0, -2] = (changed["input_ids"][0, -2] + 1) % len(tok)
    torch.testing.assert_close(_losses(trainer, changed)[0, :-3], ours[:-3], rtol=0, atol=1e-6)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_rows_are_each_row_alone(model_dir, attn, tmp_path):
    """Each packed example's prompt is a block read both ways in the packed mask; PaliGemma 2's forward builds
    its sliding layers' mask from the one it is given, so its packed rows must fit the window."""
    _skip_unsupported(model_dir, attn)
    rows = [{"prompt": "what is in the picture? ", "completion": "a red square"},
            {"prompt": "say hello ", "completion": "hello there"},
            {"prompt": "the cat sat ", "completion": "on the mat and looked at it"}]
    if AutoConfig.from_pretrained(model_dir).text_config.model_type == "gemma2":  # its window: 4 tokens
        with pytest.raises(UsageError, match="--packing is not supported for paligemma models with --seq-len 256: "
                                             r"the model takes one attention mask .* window \(4 tokens\)"):
            _trainer(model_dir, tmp_path / "packed", rows, packing=True, batch_size=1)
        return
    alone = _trainer(model_dir, tmp_path / "alone", rows)
    alone.model.set_attn_implementation(attn)
    packed = _trainer(model_dir, tmp_path / "packed", rows, packing=True, batch_size=1)
    packed.model.set_attn_implementation(attn)
    packed.attn = attn
    (unit,) = packed.train_units
    with torch.no_grad():
        expected = sum(token_loss_sum(alone.model, alone._collate([u])).item() for u in alone.train_units)
        assert token_loss_sum(packed.model, packed._collate([unit])).item() == pytest.approx(expected, rel=1e-5)


def test_prefix_tokens_end_at_each_examples_first_trained_token():
    labels = torch.tensor([[-100, -100, 5, 6, -100, 7, -100, -100, 8, -100]])
    sequences = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 1, -1]])
    assert prefix_tokens(labels).tolist() == [[True, True] + [False] * 8]
    assert prefix_tokens(labels, sequences).tolist() == [[True, True, False, False, False, False, True, True, False,
                                                          True]]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generation_reads_the_prompt_as_the_processor_marks_it(model_dir, attn):
    """A prompt without a suffix is all prefix (the processor's token_type_ids are 0s); each generated token is
    causal: qlora's greedy tokens and prefill logits are transformers' generate's with those inputs."""
    from qlora.infer.generate import SamplingOptions, forward_cached, stream_tokens

    _skip_unsupported(model_dir, attn)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32)
    model.eval()
    ids = torch.randint(5, 200, (1, 10), generator=torch.Generator().manual_seed(0))
    types = torch.zeros_like(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, token_type_ids=types).logits[0, -1]
        out, _ = forward_cached(model, ids, {}, 0)
    torch.testing.assert_close(out.logits[0, -1], expected, rtol=1e-5, atol=1e-5)
    oracle = model.generate(input_ids=ids, token_type_ids=types, attention_mask=torch.ones_like(ids),
                            do_sample=False, max_new_tokens=8, min_new_tokens=8)[0, ids.shape[1]:].tolist()
    ours = list(stream_tokens(model, ids, SamplingOptions(temperature=0, max_new_tokens=8)))
    assert ours == oracle


@pytest.mark.skipif("hrm_text" not in CONFIG_MAPPING_NAMES, reason="this transformers has no HRM-Text")
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hrm_text_marks_its_prefix_with_ones(attn):
    """HRM-Text (``prefix_lm``) reads tokens of type 1 both ways: the prompt is 1, the answer 0 and causal."""
    from transformers import AutoModelForCausalLM

    from qlora.train.loss import model_inputs

    config = AutoConfig.for_model("hrm_text", vocab_size=100, hidden_size=32, num_attention_heads=2,
                                  num_key_value_heads=2, intermediate_size=64, num_layers_per_stack=1, H_cycles=1,
                                  L_cycles=1, L_bp_cycles=[1])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    ids = torch.randint(5, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.masked_fill(torch.arange(12) < 5, IGNORE_INDEX)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    inputs = model_inputs(batch, model)
    assert inputs["token_type_ids"].tolist() == [[1] * 5 + [0] * 7]
    changed = dict(batch, input_ids=ids.clone())
    changed["input_ids"][0, 9] += 1
    with torch.no_grad():
        ours = model(**inputs).logits
        torch.testing.assert_close(ours, model(input_ids=ids, token_type_ids=(labels == IGNORE_INDEX).long()).logits)
        assert not torch.allclose(ours, model(input_ids=ids).logits)  # the prompt does read later prompt tokens
        torch.testing.assert_close(model(**model_inputs(changed, model)).logits[0, :9], ours[0, :9], rtol=0, atol=0)
