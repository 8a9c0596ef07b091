"""Added tokens: resized embeddings and head are trained and saved PEFT's way (modules_to_save)."""

from __future__ import annotations

import json

import pytest
import torch

import qlora
from qlora.errors import UsageError
from qlora.model.tokens import add_special_tokens

from test_model_api import _dequantized_reference

NEW = ["<|tool|>", "<|/tool|>"]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A qlora model with two added tokens, trained a few steps and saved; (model, tokenizer, ids, out_dir)."""
    model, tok = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    old_vocab = model.get_input_embeddings().weight.shape[0]
    assert add_special_tokens(model, tok, NEW + [tok.eos_token]) == 2  # a known token is skipped
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == old_vocab + 2
    new_ids = tok.convert_tokens_to_ids(NEW)
    assert tok.decode(tok("a <|tool|> b <|/tool|>")["input_ids"], skip_special_tokens=True).find("tool") == -1
    torch.manual_seed(0)
    qlora.add_lora(model, r=4, dropout=0.0)
    before = {n: model.get_submodule(n).weight[new_ids].clone() for n in ("model.embed_tokens", "lm_head")}
    ids = torch.tensor([[1, 5, new_ids[0], 7, 9, new_ids[1], 11, new_ids[0], 2]])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    for name, rows in before.items():
        assert not torch.allclose(model.get_submodule(name).weight[new_ids], rows), name
    out = qlora.save_adapter(model, tmp_path_factory.mktemp("adapter") / "a", tokenizer=tok)
    return model, tok, ids, out


def test_adapter_files_list_modules_to_save(trained):
    _, tok, _, out = trained
    from safetensors.torch import load_file

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["embed_tokens", "lm_head"]
    keys = load_file(str(out / "adapter_model.safetensors"))
    assert keys["base_model.model.model.embed_tokens.weight"].shape[0] == len(tok)
    assert keys["base_model.model.lm_head.weight"].shape[0] == len(tok)
    assert (out / "tokenizer.json").is_file()


def test_peft_reloads_same_model(trained, tiny_model_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoTokenizer

    model, _, ids, out = trained
    fresh, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    ref = _dequantized_reference(tiny_model_dir, fresh)
    ref.resize_token_embeddings(len(AutoTokenizer.from_pretrained(out)))
    ref = peft.PeftModel.from_pretrained(ref, str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_qlora_reloads_same_model(trained, tiny_model_dir):
    model, _, ids, out = trained
    fresh, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(fresh, out)
    assert fresh.get_input_embeddings().weight.shape == model.get_input_embeddings().weight.shape
    assert not any(p.requires_grad for p in fresh.parameters())
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_qlora_loads_peft_saved_modules_to_save(tiny_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    qmodel, tok = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    ref = _dequantized_reference(tiny_model_dir, qmodel)
    tok.add_tokens(NEW, special_tokens=True)
    ref.resize_token_embeddings(len(tok))
    torch.manual_seed(0)
    pm = peft.get_peft_model(ref, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                  modules_to_save=["embed_tokens", "lm_head"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    pm.save_pretrained(tmp_path / "peft")
    qlora.load_adapter(qmodel, tmp_path / "peft")
    ids = torch.tensor([[1, 5, len(tok) - 1, 7, len(tok) - 2, 2]])
    with torch.no_grad():
        torch.testing.assert_close(qmodel(ids).logits, pm.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_add_lora_unknown_modules_to_save(tiny_model_dir):
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match="modules_to_save"):
        qlora.add_lora(model, modules_to_save=["no_such_module"])


def test_train_with_added_tokens_saves_a_reloadable_adapter(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from qlora.train.config import load_config
    from qlora.train.trainer import Trainer, list_checkpoints

    rows = [{"text": f"call {NEW[0]} tool {i} {NEW[1]} done"} for i in range(6)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cfg = load_config(None, dict(model=str(tiny_model_dir), data=str(data), output=str(out), optim="adamw",
                                 lr=1e-2, max_steps=3, batch_size=2, progress=False, seq_len=32, save_steps=2,
                                 add_special_tokens=NEW))
    trainer = Trainer(cfg)
    trainer.run()
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert (list_checkpoints(out)[-1] / "adapter" / "tokenizer.json").is_file()
    for folder in (out, list_checkpoints(out)[-1] / "adapter"):  # as transformers 4 reads it too (vLLM on 4.x)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        assert config["tokenizer_class"] != "TokenizersBackend"
        assert not isinstance(config.get("extra_special_tokens"), list)  # 4.x reads a dict of named tokens there
        assert AutoTokenizer.from_pretrained(folder).all_special_tokens == trainer.tokenizer.all_special_tokens
    fresh, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(fresh, out)
    trainer.model.eval()
    ids = torch.tensor([[1, len(trainer.tokenizer) - 2, 5, len(trainer.tokenizer) - 1, 2]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, trainer.model(ids).logits, rtol=1e-4, atol=1e-4)


def test_tokens_added_into_a_padded_embedding_load_in_peft_without_resizing(tmp_path, tiny_tokenizer):
    """32000 tokens on 32064 rows: tokens added take padding rows, the base keeps its size, and PEFT loads the
    adapter on it as it is (the README's rule: resize only a base with fewer rows than the tokenizer has tokens)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora.model.tiny import build_tiny_model
    from qlora.train.config import load_config
    from qlora.train.trainer import Trainer

    rows = len(tiny_tokenizer) + 16
    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, vocab_size=rows)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"call {NEW[0]} tool {i} {NEW[1]} done"}) + "\n" for i in range(6)))
    cfg = load_config(None, dict(model=str(base), data=str(data), output=str(tmp_path / "out"), optim="adamw",
                                 lr=1e-2, max_steps=2, batch_size=2, progress=False, seq_len=32, quant="none",
                                 add_special_tokens=NEW))
    trainer = Trainer(cfg)
    trainer.run()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert len(tokenizer) == len(tiny_tokenizer) + 2 < rows
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    assert plain.get_input_embeddings().num_embeddings >= len(tokenizer)  # so no resize
    reference = peft.PeftModel.from_pretrained(plain, str(tmp_path / "out")).eval()
    ids = torch.tensor([tokenizer(f"a {NEW[0]} b {NEW[1]}")["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, trainer.model(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tied, pad", [(False, None), (True, None), (False, 8)])
def test_a_peft_adapter_on_a_padded_base_cut_to_its_tokenizer_loads_and_merges(tmp_path, tiny_tokenizer, tied, pad):
    """The common PEFT recipe on a model whose embedding is padded past its tokenizer (Qwen: 151,936 rows for
    151,665 tokens): add a token, ``resize_token_embeddings(len(tokenizer))``, which cuts the padding rows, train the
    tables whole and save the tokenizer beside the adapter. qlora resizes the base as that user did: merged, the
    model computes what PEFT computes on the resized base. Also with ``pad_to_multiple_of`` (axolotl's
    resize_token_embeddings_to_32x): every token still has its row. Without the saved tokenizer a smaller table is
    still another model's, refused."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora.cli.main import main
    from qlora.model.tiny import build_tiny_model

    base = build_tiny_model(tmp_path / "base", tokenizer=tiny_tokenizer, arch="qwen2",
                            vocab_size=len(tiny_tokenizer) + 16, tie_word_embeddings=tied)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(NEW[:1], special_tokens=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad)
    rows = model.get_input_embeddings().num_embeddings
    assert len(tokenizer) <= rows < len(tiny_tokenizer) + 16 and (pad is None) == (rows == len(tokenizer))
    saved = ["embed_tokens"] if tied else ["embed_tokens", "lm_head"]
    reference = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           modules_to_save=saved, init_lora_weights=False))
    with torch.no_grad():
        reference.base_model.model.model.embed_tokens.modules_to_save["default"].weight[-1].normal_()
    reference.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 17, len(tokenizer) - 1, 42, 5]])
    with torch.no_grad():
        expected = reference.eval()(ids).logits
    with pytest.raises(UsageError, match="another base model"):  # no tokenizer saved: nothing says why it is smaller
        qlora.load_adapter(qlora.load_model(base, quant=None, compute_dtype=torch.float32, device="cpu")[0],
                           tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    assert main(["merge", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--output",
                 str(tmp_path / "merged"), "--quant", "none", "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert merged.get_input_embeddings().num_embeddings == rows
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_commands_use_the_tokenizer_saved_with_the_adapter(trained, tiny_model_dir, tmp_path, capsys):
    """merge writes it beside the merged weights; generate and eval read prompts with it (the added
    tokens are single tokens there, pieces in the base's tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer

    from qlora.cli.commands.generate import load_model_from_args
    from qlora.cli.main import build_parser, main

    _, tok, _, out = trained
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(out), "--output", str(tmp_path / "m"),
                 "--dtype", "float32"]) == 0
    merged = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert len(merged) == AutoConfig.from_pretrained(tmp_path / "m").vocab_size == len(tok)
    assert merged.tokenize("a <|tool|> b") == tok.tokenize("a <|tool|> b")
    args = build_parser("generate").parse_args(["generate", "--model", str(tiny_model_dir), "--adapter", str(out),
                                      "--prompt", "x", "--compute-dtype", "fp32"])
    _, loaded = load_model_from_args(args)
    assert loaded.convert_tokens_to_ids(NEW) == tok.convert_tokens_to_ids(NEW)


def test_the_seed_draws_the_new_tokens_rows_whatever_ran_before(tmp_path, tiny_model_dir):
    """Resized rows are drawn around the old rows' mean (transformers' mean_resizing): --seed decides the draw,
    so a run (or the reference start of a resumed DPO run) gets the same rows in a process that drew before."""
    from qlora.train.config import load_config
    from qlora.train.trainer import Trainer

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": f"call {NEW[0]} tool {NEW[1]} done"}) + "\n")

    def new_rows(seed: int, drawn_before: int) -> torch.Tensor:
        torch.rand(drawn_before)
        cfg = load_config(None, dict(model=str(tiny_model_dir), data=str(data), output=str(tmp_path / "o"),
                                     seq_len=32, progress=False, add_special_tokens=NEW, seed=seed))
        trainer = Trainer(cfg)
        trainer._load_model()
        return trainer.model.get_input_embeddings().weight[-2:].detach().clone()

    first = new_rows(0, 1)
    assert torch.equal(new_rows(0, 1000), first)
    assert not torch.equal(new_rows(1, 1), first)


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory, tiny_tokenizer):
    """A Llama whose head is its embedding (tie_word_embeddings, as small Qwen and Gemma models)."""
    from qlora.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tied"), tokenizer=tiny_tokenizer, arch="llama",
                            tie_word_embeddings=True)


def _peft_base(model_dir, out, quant: str):
    """The base as a PEFT user loads it for ``out``: transformers (bitsandbytes 4-bit for an nf4 run), resized to
    the tokenizer saved with the adapter (its new rows drawn at random: the adapter must give them back)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32) if quant == "nf4" else None
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, quantization_config=bnb,
                                                device_map="cpu")
    torch.manual_seed(123)
    base.resize_token_embeddings(len(AutoTokenizer.from_pretrained(out)))
    return base


@pytest.mark.parametrize("tied,quant", [(False, "none"), (True, "none"), (True, "nf4")])
def test_added_tokens_with_lora_on_the_embedding_reload_in_peft_and_merge(tmp_path, tiny_model_dir, tied_model_dir,
                                                                          tied, quant):
    """--target-modules naming the grown embedding: as in PEFT, a module trained whole gets no LoRA, so the adapter
    is PEFT's (modules_to_save wins); PEFT on a resized base gives qlora's outputs, and so does qlora merge."""
    if quant == "nf4":
        pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qlora.cli.main import main
    from qlora.train.config import load_config
    from qlora.train.trainer import Trainer

    model_dir = tied_model_dir if tied else tiny_model_dir
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"call {NEW[0]} tool {i} {NEW[1]} done"}) + "\n" for i in range(6)))
    out = tmp_path / "out"
    trainer = Trainer(load_config(None, dict(model=str(model_dir), data=str(data), output=str(out), optim="adamw",
                                             lr=1e-2, max_steps=3, batch_size=2, progress=False, seq_len=32,
                                             quant=quant, target_modules="q_proj,embed_tokens",
                                             add_special_tokens=NEW)))
    trainer.run()
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["target_modules"], config["modules_to_save"]) == (["q_proj"], ["embed_tokens", "lm_head"])
    ids = torch.tensor([[1, len(trainer.tokenizer) - 2, 5, len(trainer.tokenizer) - 1, 2]])
    with torch.no_grad():
        ours = trainer.model.eval()(ids).logits
        theirs = peft.PeftModel.from_pretrained(_peft_base(model_dir, out, quant), str(out)).eval()
        # bitsandbytes on CPU dequantizes to bfloat16: its 4-bit base alone is ~2e-3 off qlora's
        tol = 1e-2 if quant == "nf4" else 1e-5
        torch.testing.assert_close(theirs(ids).logits.float(), ours, rtol=tol, atol=tol)
        if quant == "nf4":
            return
        peft_merged = theirs.merge_and_unload()(ids).logits
    assert main(["merge", "--model", str(model_dir), "--adapter", str(out), "--output", str(tmp_path / "m"),
                 "--dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    assert (len(AutoTokenizer.from_pretrained(tmp_path / "m")) == AutoConfig.from_pretrained(tmp_path / "m").vocab_size
            == merged.get_input_embeddings().weight.shape[0] == merged.get_output_embeddings().weight.shape[0])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_merged, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(ids).logits, ours, rtol=1e-5, atol=1e-5)


def test_lora_skips_modules_trained_whole(tiny_model_dir):
    """PEFT's rule: a module in modules_to_save is never a LoRA target; targeting only such modules is refused."""
    from qlora.nn import LoraEmbedding

    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=4, target_modules=["q_proj", "embed_tokens"], modules_to_save=["embed_tokens"])
    assert not isinstance(model.get_input_embeddings(), LoraEmbedding)
    assert model.get_input_embeddings().weight.requires_grad
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match=r"match only modules trained whole \(model.embed_tokens: modules_to_save"):
        qlora.add_lora(model, r=4, target_modules=["embed_tokens"], modules_to_save=["embed_tokens"])


def test_grown_tables_outside_the_adapter_are_saved_for_peft(tiny_model_dir, tmp_path):
    """Tokens added, then LoRA on the embedding and no module trained whole: the grown embedding (under its LoRA's
    base_layer) and the untied head are saved beside the adapter, as PEFT's save_embedding_layers does, so a
    base resized for PEFT (new rows drawn at random) gives qlora's model."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    model, tok = qlora.load_model(tiny_model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    add_special_tokens(model, tok, NEW)
    torch.manual_seed(0)
    qlora.add_lora(model, r=4, dropout=0.0, target_modules=["q_proj", "embed_tokens"], modules_to_save=[])
    qlora.save_adapter(model, tmp_path / "a", tokenizer=tok)
    keys = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert keys["base_model.model.model.embed_tokens.base_layer.weight"].shape[0] == len(tok)
    assert keys["base_model.model.lm_head.weight"].shape[0] == len(tok)
    ids = torch.tensor([[1, len(tok) - 2, 5, len(tok) - 1, 2]])
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(_peft_base(tiny_model_dir, tmp_path / "a", "none"),
                                                str(tmp_path / "a")).eval()
        torch.testing.assert_close(theirs(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        base = _peft_base(tiny_model_dir, tmp_path / "a", "none")
        base.load_adapter(str(tmp_path / "a"))  # transformers' own PEFT integration
        torch.testing.assert_close(base.eval()(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        fresh, _ = qlora.load_model(tiny_model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
        qlora.load_adapter(fresh, tmp_path / "a")
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
