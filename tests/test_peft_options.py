"""Adapters users make with PEFT's LoraConfig options load, merge (``qlora merge``) and generate
(``qlora generate``) in qlora as in PEFT, or are refused with exit 2 naming the folder and the option.

The adapters are PEFT's own (``get_peft_model`` + ``save_pretrained``) with random non-zero weights, on
tiny 16-bit models; the oracles are the PEFT model's logits, its ``merge_and_unload`` and its greedy
``generate``. Options with a file of their own are tested there (test_peft_adapter_options.py: patterns,
biases, embeddings, saved modules; test_pissa.py: residual inits; test_moe_expert_lora.py: experts).
"""

from __future__ import annotations

import pytest
import torch

import qlora
from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.model.load import load_tokenizer
from qlora.model.tiny import build_tiny_model

PROMPT = "The quick brown fox"

CASES = {
    "regex_targets": ("llama", dict(target_modules=r".*layers\.1\.self_attn\.(q|k)_proj")),
    "all_linear_excluding": ("llama", dict(target_modules="all-linear", exclude_modules=["o_proj", "down_proj"])),
    "excluded_by_regex": ("llama", dict(target_modules=["q_proj", "v_proj"], exclude_modules=r".*layers\.0\..*")),
    "layers_to_transform": ("llama", dict(target_modules=["q_proj", "v_proj", "o_proj"], layers_to_transform=[1],
                                          layers_pattern="layers", exclude_modules=["o_proj"])),
    "rslora_regex_patterns": ("llama", dict(target_modules="all-linear", use_rslora=True,
                                            rank_pattern={r"^model\.layers\.0\.self_attn\.q_proj": 2, "v_proj": 8},
                                            alpha_pattern={r".*\.1\.mlp\..*": 3})),
    "mica_init": ("llama", dict(target_modules=["q_proj", "v_proj"], init_lora_weights="mica")),
    "conv1d_layers": ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, layers_to_transform=[1],
                                   layers_pattern="h")),
    "conv1d_dora_and_embedding": ("gpt2", dict(target_modules=["c_attn", "wte"], fan_in_fan_out=True, use_dora=True)),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("peft-options-sweep")
    return {arch: build_tiny_model(root / arch, tokenizer=tiny_tokenizer, arch=arch) for arch in ("llama", "gpt2")}


def _base(model_dir, vocab: int | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if vocab:
        model.resize_token_embeddings(vocab)  # as a user does before loading an adapter with added tokens
    return model


@torch.no_grad()
def _randomize(peft_model) -> None:
    """Every trainable tensor moved (B is zero at PEFT's init, DoRA's magnitudes equal the norms)."""
    g = torch.Generator().manual_seed(0)
    for _, p in sorted(peft_model.named_parameters()):
        if p.requires_grad:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _peft_adapter(model, out, adapter_name="default", **options):
    from peft import LoraConfig, get_peft_model

    options = dict(r=4, lora_alpha=8, init_lora_weights=False) | options
    peft_model = get_peft_model(model, LoraConfig(**options), adapter_name=adapter_name)
    _randomize(peft_model)
    peft_model.eval().save_pretrained(out)
    return peft_model


def _generate_cli(model_dir, adapter, capsys) -> str:
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--adapter", str(adapter), "--quant", "none",
                 "--compute-dtype", "fp32", "--temperature", "0", "--max-new-tokens", "8", "--template", "none",
                 "--prompt", PROMPT]) == 0
    return capsys.readouterr().out.strip()


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_loads_merges_and_generates_as_peft(tmp_path, models, case, capsys):
    from transformers import AutoModelForCausalLM

    arch, options = CASES[case]
    model_dir = models[arch]
    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    theirs = _peft_adapter(_base(model_dir), tmp_path / "adapter", **options)
    with torch.no_grad():
        logits = theirs(ids).logits
        tokens = theirs.generate(input_ids=ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
        merged_logits = theirs.merge_and_unload()(ids).logits

    model, _ = qlora.load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits, rtol=1e-5, atol=1e-5)
    assert main(["merge", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--output",
                 str(tmp_path / "merged"), "--quant", "none", "--dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, merged_logits, rtol=1e-5, atol=1e-5)
    assert _generate_cli(model_dir, tmp_path / "adapter", capsys) == tokenizer.decode(tokens, skip_special_tokens=True)


def test_added_tokens_with_a_lora_embedding_give_the_untied_head_transformers_rows(tmp_path, models, tiny_tokenizer):
    """LoRA on a resized embedding: PEFT's save_embedding_layers saves the embedding's base table, not the
    untied head, whose new rows are then what resize_token_embeddings gives (the old rows' mean) in PEFT and
    in qlora alike (they were random before: logits of the new tokens off by 0.18)."""
    from peft import PeftModel

    model_dir = models["llama"]
    vocab = len(tiny_tokenizer) + 2
    theirs = _peft_adapter(_base(model_dir, vocab), tmp_path / "a", target_modules=["q_proj", "embed_tokens"])
    theirs.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    ids = torch.tensor([[1, 5, vocab - 1, 7, vocab - 2]])
    reloaded = PeftModel.from_pretrained(_base(model_dir, vocab), tmp_path / "a").eval()
    model, _ = qlora.load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(model, tmp_path / "a")
    assert model.get_output_embeddings().weight.shape[0] == vocab
    with torch.no_grad():
        ours, trained, peft = model(ids).logits, theirs(ids).logits, reloaded(ids).logits
    old = len(tiny_tokenizer)
    torch.testing.assert_close(ours[..., :old], trained[..., :old], rtol=1e-5, atol=1e-5)
    # transformers' resize adds noise of 1e-9 the rows' spread to the mean, hence the looser bound
    torch.testing.assert_close(ours, peft, rtol=0, atol=1e-4)


def test_named_adapters_in_subfolders_load_one_by_one_and_the_folder_is_refused(tmp_path, models, capsys):
    from peft import LoraConfig

    model_dir = models["llama"]
    theirs = _peft_adapter(_base(model_dir), tmp_path / "x", adapter_name="first", target_modules=["q_proj"])
    theirs.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    _randomize(theirs)
    theirs.save_pretrained(tmp_path / "both")  # PEFT writes both/first/ and both/second/, nothing at the top
    ids = torch.tensor([[1, 17, 42, 99, 7]])
    for name in ("first", "second"):
        theirs.set_adapter(name)
        model, _ = qlora.load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
        qlora.load_adapter(model, tmp_path / "both" / name)
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, theirs.eval()(ids).logits, rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--adapter", str(tmp_path / "both"), "--quant", "none",
                 "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'both'} holds several adapters, in its subfolders first, second" in err
    assert str(tmp_path / "both" / "first") in err and "Traceback" not in err
    with pytest.raises(UsageError, match="is not an adapter folder: adapter_config.json is missing"):
        qlora.load_adapter(model, tmp_path)


def _rewritten(source, out, rename=lambda k: k, pickle=False):
    """A copy of adapter folder ``source`` whose tensor keys are ``rename``d, or saved as PEFT < 0.7's pickle."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out)
    tensors = {rename(k): v for k, v in load_file(str(out / "adapter_model.safetensors")).items()}
    (out / "adapter_model.safetensors").unlink()
    if pickle:
        torch.save(tensors, out / "adapter_model.bin")
    else:
        save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def test_keys_naming_the_adapter_load_as_peft_loads_them(tmp_path, models):
    """A file saved from the model's own state dict names the adapter in its keys (``lora_A.default.weight``,
    ``lora_embedding_A.default``, ``lora_magnitude_vector.default.weight``): PEFT loads it as trained, and so does
    qlora (it refused such keys as a LoRA variant); keys of two adapters in one file are refused naming them."""
    import re

    from peft import PeftModel

    model_dir = models["llama"]
    _peft_adapter(_base(model_dir), tmp_path / "a", target_modules=["q_proj", "embed_tokens"], use_dora=True)
    named = _rewritten(tmp_path / "a", tmp_path / "named", lambda k: re.sub(
        r"\.(lora_(?:A|B))\.weight$|\.(lora_embedding_[AB])$|\.(lora_magnitude_vector)$",
        lambda m: f".{m[1]}.default.weight" if m[1] else f".{m[2]}.default" if m[2] else f".{m[3]}.default.weight",
        k))
    ids = torch.tensor([[1, 17, 42, 99, 7]])
    theirs = PeftModel.from_pretrained(_base(model_dir), named).eval()
    model, _ = qlora.load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(model, named)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(_base(model_dir), tmp_path / "a").eval()(ids).logits
        torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    two = _rewritten(tmp_path / "a", tmp_path / "two", lambda k: k.replace(
        ".lora_A.weight", ".lora_A.first.weight").replace(".lora_B.weight", ".lora_B.second.weight"))
    fresh, _ = qlora.load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match=r"holds the tensors of several adapters, named first, second"):
        qlora.load_adapter(fresh, two)


def test_keys_without_peft_prefix_are_refused_naming_the_key(tmp_path, models):
    """PEFT leaves layers whose keys lack ``base_model.model.`` at their init (random here): refused, naming the key
    (the path was cut by the prefix's length before: 'it adapts lf_attn.q_proj, which this model does not have')."""
    _peft_adapter(_base(models["llama"]), tmp_path / "a", target_modules=["q_proj"])
    bare = _rewritten(tmp_path / "a", tmp_path / "bare", lambda k: k.removeprefix("base_model.model."))
    model, _ = qlora.load_model(models["llama"], quant=None, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match=r"tensor model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight is not named as "
                                         r"PEFT names an adapter's tensors \(base_model\.model\.<module path>"):
        qlora.load_adapter(model, bare)


def test_pickled_adapter_of_older_peft_is_refused_with_a_command_that_converts_it(tmp_path, models, capsys):
    """PEFT before 0.7 wrote adapter_model.bin (the QLoRA paper's Guanaco adapters are such): qlora reads no pickle,
    and says how to convert it; the command it prints converts it, and the adapter then gives PEFT's outputs."""
    import shlex
    import subprocess
    import sys

    from peft import PeftModel

    model_dir = models["llama"]
    _peft_adapter(_base(model_dir), tmp_path / "a", target_modules=["q_proj", "v_proj"])
    old = _rewritten(tmp_path / "a", tmp_path / "old peft's", pickle=True)
    theirs = PeftModel.from_pretrained(_base(model_dir), old).eval()
    assert main(["generate", "--model", str(model_dir), "--adapter", str(old), "--quant", "none",
                 "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "holds its weights in adapter_model.bin" in err and "Traceback" not in err
    command = shlex.split(err[err.index("python3 -c"):].split("\n")[0].rstrip())
    subprocess.run([sys.executable, *command[1:]], check=True)
    model, _ = qlora.load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(model, old)
    ids = torch.tensor([[1, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_classification_adapter_is_refused_naming_its_task_type(tmp_path, models, capsys):
    """A SEQ_CLS adapter trained the classifier head ``score`` whole, which a causal LM lacks: refused naming the
    task type (it was 'made for another base model: it adapts score'), by the CLI with exit 2."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(models["llama"], dtype=torch.float32, num_labels=3)
    adapter = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["q_proj"]))
    adapter.save_pretrained(tmp_path / "a")
    capsys.readouterr()
    assert main(["generate", "--model", str(models["llama"]), "--adapter", str(tmp_path / "a"), "--quant", "none",
                 "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "task_type is 'SEQ_CLS': the adapter was trained on a sequence classification model" in err, err
    assert "AutoModelForSequenceClassification" in err and "Traceback" not in err


def test_a_config_without_lora_alpha_takes_peft_default(tmp_path, models):
    """lora_alpha left out of adapter_config.json (a hand-written or another tool's config) is PEFT's default 8, as
    PEFT reads it (a KeyError before)."""
    import json

    from peft import PeftModel

    model_dir = models["llama"]
    _peft_adapter(_base(model_dir), tmp_path / "a", target_modules=["q_proj", "v_proj"], lora_alpha=3)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    theirs = PeftModel.from_pretrained(_base(model_dir), tmp_path / "a").eval()
    model, _ = qlora.load_model(model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(model, tmp_path / "a")
    ids = torch.tensor([[1, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)
