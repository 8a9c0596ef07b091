"""What a ``qlora merge`` or ``qlora quantize`` folder carries beside its weights for the tools that read it next.

transformers 5 saves a tokenizer as ``tokenizer.json`` alone. Real Gemma, Llama 2, Mistral and Phi-3 checkpoints
also ship the SentencePiece model ``tokenizer.model``, which llama.cpp's ``convert_hf_to_gguf.py`` reads their
vocabulary from (for Gemma it stops without it), as Ollama's import and slow tokenizers do: the written folder
must hold it as the base does.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora.cli.main import main
from qlora.model.tiny import build_tiny_model, train_sentencepiece_tokenizer

# stands for the SentencePiece model (the bytes are only copied, never parsed, as tokenizer.json is there)
SPM_BYTES = b"\x0a\x0bsentencepiece model of the base"
TEXT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def gemma_base(tmp_path_factory):
    """A tiny Gemma 3 base whose folder holds tokenizer.model beside tokenizer.json, as Google's does."""
    tok = train_sentencepiece_tokenizer([TEXT, "hello world, a fine-tune"] * 20, vocab_size=400, family="gemma")
    base = build_tiny_model(tmp_path_factory.mktemp("gemma") / "base", tokenizer=tok, arch="gemma3",
                            tie_word_embeddings=True)
    (base / "tokenizer.model").write_bytes(SPM_BYTES)
    return base


def _adapter(base, out, tokenizer=None):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if tokenizer is not None:
        model.resize_token_embeddings(len(tokenizer))
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                            modules_to_save=["embed_tokens"] if tokenizer is not None else None))
    peft.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _same_tokenizer(folder, reference) -> None:
    ours, theirs = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(reference)
    assert ours(TEXT)["input_ids"] == theirs(TEXT)["input_ids"] and len(ours) == len(theirs)


def test_merge_and_quantize_carry_the_sentencepiece_model(tmp_path, gemma_base):
    adapter = _adapter(gemma_base, tmp_path / "adapter")
    assert main(["merge", "--model", str(gemma_base), "--adapter", str(adapter), "--output",
                 str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    assert (tmp_path / "merged" / "tokenizer.model").read_bytes() == SPM_BYTES
    _same_tokenizer(tmp_path / "merged", gemma_base)
    assert main(["quantize", "--model", str(tmp_path / "merged"), "--output", str(tmp_path / "q4")]) == 0
    assert (tmp_path / "q4" / "tokenizer.model").read_bytes() == SPM_BYTES
    assert main(["quantize", "--model", str(gemma_base), "--output", str(tmp_path / "base-q4")]) == 0
    assert (tmp_path / "base-q4" / "tokenizer.model").read_bytes() == SPM_BYTES


def test_merge_takes_the_adapters_own_sentencepiece_model_with_its_added_tokens(tmp_path, gemma_base):
    """An adapter saved with its tokenizer (tokens added in training) is merged with that tokenizer: its own
    SentencePiece model where it has one (a transformers 4 save), else the base's, which the added tokens
    (tokenizer_config.json) extend as transformers 4 wrote them."""
    tokenizer = AutoTokenizer.from_pretrained(gemma_base)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool_call>"]})
    adapter = _adapter(gemma_base, tmp_path / "adapter", tokenizer)
    assert main(["merge", "--model", str(gemma_base), "--adapter", str(adapter), "--output",
                 str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    assert (tmp_path / "merged" / "tokenizer.model").read_bytes() == SPM_BYTES
    _same_tokenizer(tmp_path / "merged", adapter)
    (adapter / "tokenizer.model").write_bytes(SPM_BYTES + b" with the added tokens")
    assert main(["merge", "--model", str(gemma_base), "--adapter", str(adapter), "--output",
                 str(tmp_path / "merged2"), "--dtype", "fp32"]) == 0
    assert (tmp_path / "merged2" / "tokenizer.model").read_bytes() == SPM_BYTES + b" with the added tokens"


@pytest.fixture(scope="module")
def llava_base(tmp_path_factory):
    """A tiny LLaVA whose chat template is its processor's chat_template.json alone, as hub vision-language models
    saved before transformers wrote chat_template.jinja hold it (the tokenizer has none)."""
    import json

    from image_models import build_image_model

    base = build_image_model(tmp_path_factory.mktemp("llava") / "base", "llava")
    template = base / "chat_template.jinja"
    (base / "chat_template.json").write_text(json.dumps({"chat_template": template.read_text()}))
    template.unlink()
    assert AutoTokenizer.from_pretrained(base).chat_template is None
    return base


def test_a_processors_own_chat_template_is_carried(tmp_path, llava_base):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(llava_base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.q_proj",
                                     init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    assert main(["merge", "--model", str(llava_base), "--adapter", str(tmp_path / "adapter"), "--output",
                 str(tmp_path / "merged")]) == 0
    assert main(["quantize", "--model", str(llava_base), "--output", str(tmp_path / "q4")]) == 0
    base_template = AutoProcessor.from_pretrained(llava_base).chat_template
    assert base_template
    for folder in ("merged", "q4"):
        assert AutoProcessor.from_pretrained(tmp_path / folder).chat_template == base_template, folder


def test_a_trained_chat_format_is_not_overridden_by_the_bases_processor_template(tmp_path, llava_base):
    """transformers' processors read chat_template.json before chat_template.jinja: the base's file would
    replace the format the adapter was trained in, which the merged folder's template is."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from qlora.model.chat_format import ChatFormat

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(llava_base, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.q_proj",
                                     init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    trained = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    ChatFormat(template=trained).save(tmp_path / "adapter")
    assert main(["merge", "--model", str(llava_base), "--adapter", str(tmp_path / "adapter"), "--output",
                 str(tmp_path / "merged")]) == 0
    assert AutoProcessor.from_pretrained(tmp_path / "merged").chat_template == trained
    assert main(["quantize", "--model", str(tmp_path / "merged"), "--output", str(tmp_path / "q4")]) == 0
    assert AutoProcessor.from_pretrained(tmp_path / "q4").chat_template == trained


def test_gguf_export_embeds_a_processors_own_chat_template(tmp_path, llava_base):
    """llama.cpp's converter reads chat_template.json where the tokenizer has no template (gguf.SpecialVocab)."""
    gguf = pytest.importorskip("gguf")
    from transformers import AutoProcessor

    assert main(["export", "--model", str(llava_base), "--output", str(tmp_path / "g"), "--type", "f32"]) == 0
    fields = gguf.GGUFReader(next((tmp_path / "g").glob("model-*.gguf"))).fields
    template = AutoProcessor.from_pretrained(llava_base).chat_template
    assert fields["tokenizer.chat_template"].contents() == template == gguf.SpecialVocab(llava_base).chat_template


@pytest.fixture(scope="module")
def chatml_tuned(tmp_path_factory, tiny_tokenizer):
    """A base whose EOS is ``<|eos|>`` and an adapter its run trained in ChatML, whose answers end in ``<|im_end|>``
    (a Qwen or Llama base fine-tuned with ``--template chatml``)."""
    from qlora.model.chat_format import ChatFormat
    from qlora.model.tiny import CHATML_TEMPLATE, build_tiny_model

    root = tmp_path_factory.mktemp("chatml")
    base = build_tiny_model(root / "base", tokenizer=tiny_tokenizer, arch="llama")
    adapter = _adapter(base, root / "adapter")
    ChatFormat(template=CHATML_TEMPLATE, name="chatml").save(adapter)
    return base, adapter


def _eos_ids(folder) -> list[int]:
    import json

    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    return [eos] if isinstance(eos, int) else eos


def test_merged_and_quantized_folders_stop_at_the_trained_turn_end(tmp_path, chatml_tuned, tiny_tokenizer):
    """transformers' generate (as vLLM and TGI) stops where generation_config.json's eos_token_id says: a folder
    keeping the base's EOS alone runs on past every answer the fine-tune ends with ``<|im_end|>``."""
    from transformers import LogitsProcessor, LogitsProcessorList

    base, adapter = chatml_tuned
    eos, im_end = tiny_tokenizer.eos_token_id, tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert _eos_ids(base) == [eos]
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "merged"),
                 "--dtype", "fp32"]) == 0
    assert _eos_ids(tmp_path / "merged") == [eos, im_end]  # the base's first, for tools that take one

    class AnswerThenTurnEnd(LogitsProcessor):  # the model writes one token, then <|im_end|>
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == prompt.shape[1] + 1:
                scores[:] = -float("inf")
                scores[:, im_end] = 0.0
            return scores

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, logits_processor=LogitsProcessorList(
        [AnswerThenTurnEnd()]))
    assert out[0, prompt.shape[1]:].tolist()[1:] == [im_end]

    assert main(["quantize", "--model", str(tmp_path / "merged"), "--output", str(tmp_path / "q4")]) == 0
    assert _eos_ids(tmp_path / "q4") == [eos, im_end]
    # a folder merged before merges listed the turn end gets it from quantize
    (tmp_path / "merged" / "generation_config.json").write_text(
        (base / "generation_config.json").read_text())
    assert main(["quantize", "--model", str(tmp_path / "merged"), "--output", str(tmp_path / "q4-old")]) == 0
    assert _eos_ids(tmp_path / "q4-old") == [eos, im_end]


def test_a_turn_end_already_an_eos_id_or_spelt_as_text_adds_nothing(tmp_path, tiny_tokenizer):
    """A format ending its answers in the base's EOS (Alpaca) or already listed, and ChatML on a vocabulary
    without an ``<|im_end|>`` token (its turn end is text; training appends EOS), leave the ids as they are."""
    from qlora.model.chat_format import ChatFormat
    from qlora.model.tiny import CHATML_TEMPLATE, build_tiny_model, train_sentencepiece_tokenizer
    from qlora.model.turn_end_eos import turn_end_id
    from qlora.train.data.templates import TEMPLATES

    assert turn_end_id(tiny_tokenizer, ChatFormat(TEMPLATES["alpaca"])) == tiny_tokenizer.eos_token_id
    spm = train_sentencepiece_tokenizer([TEXT] * 20, vocab_size=300)
    assert turn_end_id(spm, ChatFormat(CHATML_TEMPLATE)) is None
    base = build_tiny_model(tmp_path / "base", tokenizer=spm, arch="llama")
    adapter = _adapter(base, tmp_path / "adapter")
    ChatFormat(template=CHATML_TEMPLATE, name="chatml").save(adapter)
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "merged"),
                 "--dtype", "fp32"]) == 0
    assert _eos_ids(tmp_path / "merged") == _eos_ids(base) == [spm.eos_token_id]


@pytest.mark.parametrize("saved_in", ["chat_template.jinja", "tokenizer_config.json", "chat_template.json"])
def test_an_adapters_own_tokenizer_and_template_win_over_the_bases(tmp_path, tiny_tokenizer, saved_in):
    """A PEFT adapter saved with the tokenizer it was trained with (an added token, its own chat template, in any
    file transformers writes or reads one from) is merged with that tokenizer and template: the base's
    chat_template.json, which processors and llama.cpp's converter read, must not come back beside it."""
    import json

    from qlora.model.tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch="llama")
    (base / "chat_template.json").write_text(json.dumps({"chat_template": "base: {{ messages[0]['content'] }}"}))
    trained = "trained: {% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(["<tool>"])
    tokenizer.chat_template = None if saved_in == "chat_template.json" else trained
    adapter = _adapter(base, tmp_path / "adapter", tokenizer)
    if saved_in == "tokenizer_config.json":  # as transformers 4 saved it
        (adapter / "chat_template.jinja").unlink()
        config = json.loads((adapter / saved_in).read_text())
        (adapter / saved_in).write_text(json.dumps({**config, "chat_template": trained}))
    elif saved_in == "chat_template.json":  # a processor's, as hub vision-language models keep it
        (adapter / saved_in).write_text(json.dumps({"chat_template": trained}))
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "merged"),
                 "--dtype", "fp32"]) == 0
    merged = tmp_path / "merged"
    # a processor's template: its chat_template.json where the folder has one, else the tokenizer's
    template = json.loads((merged / "chat_template.json").read_text())["chat_template"] \
        if (merged / "chat_template.json").is_file() else AutoTokenizer.from_pretrained(merged).chat_template
    assert template == trained
    _same_tokenizer(merged, adapter)


def test_the_tokenizer_is_written_as_transformers_4_reads_it_too(tmp_path, chatml_tuned):
    """transformers 5 writes ``TokenizersBackend`` and a list of ``extra_special_tokens``, on which transformers 4
    fails ('list' object has no attribute 'keys'): llama.cpp's converter (which pins transformers<5), vLLM and TGI
    on 4.x read merged folders next. The 4.x spelling (``PreTrainedTokenizerFast``, ``additional_special_tokens``)
    loads in transformers 5 as the same tokenizer."""
    import json

    base, adapter = chatml_tuned
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "merged"),
                 "--dtype", "fp32"]) == 0
    assert main(["quantize", "--model", str(tmp_path / "merged"), "--output", str(tmp_path / "q4")]) == 0
    text = "<|im_start|>user\nthe quick brown fox<|im_end|>\n"
    reference = AutoTokenizer.from_pretrained(base)
    for folder in ("merged", "q4"):
        config = json.loads((tmp_path / folder / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] in ("PreTrainedTokenizerFast", type(reference).__name__.removesuffix("Fast"))
        assert config["tokenizer_class"] != "TokenizersBackend" and "extra_special_tokens" not in config
        assert config["additional_special_tokens"] == ["<|im_start|>", "<|im_end|>"]
        written = AutoTokenizer.from_pretrained(tmp_path / folder)
        assert type(written) is type(reference) and len(written) == len(reference)
        assert written(text)["input_ids"] == reference(text)["input_ids"]
        assert written.all_special_tokens == reference.all_special_tokens
        assert written.decode(written(text)["input_ids"], skip_special_tokens=True) == "user\nthe quick brown fox\n"


@pytest.mark.parametrize("arch, rope", [
    ("qwen2", {"rope_theta": 1e6}),
    ("llama", {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 5e5},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}}})])
def test_rope_settings_are_written_where_transformers_4_reads_them(tmp_path, tiny_tokenizer, arch, rope):
    """transformers 5 writes the rotary settings under ``rope_parameters`` alone; transformers 4 (vLLM, TGI, older
    llama.cpp converters) reads ``rope_theta``, ``rope_scaling`` and Gemma 3's ``rope_local_base_freq`` at the top
    and silently takes its defaults without them (Qwen's 1e6 as 1e4: every output off). The folders carry both,
    and transformers 5 reads them as the same model."""
    import json

    from qlora.model.tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch=arch, **rope)
    params = json.loads((base / "config.json").read_text())["rope_parameters"]
    full = params.get("full_attention", params)
    expected = {"rope_theta": full["rope_theta"]}
    if full["rope_type"] != "default":
        expected["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
    if "sliding_attention" in params:
        expected["rope_local_base_freq"] = params["sliding_attention"]["rope_theta"]
    adapter = _adapter(base, tmp_path / "adapter")
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "merged"),
                 "--quant", "none", "--dtype", "fp32"]) == 0
    assert main(["quantize", "--model", str(tmp_path / "merged"), "--output", str(tmp_path / "q4")]) == 0
    for folder in ("merged", "q4"):
        config = json.loads((tmp_path / folder / "config.json").read_text())
        assert {k: config.get(k) for k in expected} == expected, folder
        assert config["rope_parameters"] == params, folder
    from peft import PeftModel

    ids = torch.arange(1, 40).view(1, -1)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids).logits, peft_model.eval()(ids).logits, rtol=1e-5, atol=1e-5)
