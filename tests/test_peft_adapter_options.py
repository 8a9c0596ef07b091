"""PEFT LoraConfig options beyond r/alpha/targets: adapters PEFT writes with them load in qlora with
PEFT's outputs, qlora writes them back for PEFT, and merging them gives transformers the same model.

Options: per-layer ranks and alphas (``rank_pattern``, ``alpha_pattern``), a trained LoRA bias
(``lora_bias``), trained base biases (``bias="all"`` / ``"lora_only"``), LoRA on the token
embedding and the output head (tied or not; Gemma's scaled embedding; DoRA), and one of a tied pair
saved whole or both (``modules_to_save``, with and without ``ensure_weight_tying``), and single token rows
(``trainable_token_indices``), also of tokens added before training.
"""

from __future__ import annotations

import pytest
import torch

import qlora
from qlora.errors import UsageError
from qlora.model.merge import merge, save_merged
from qlora.model.tiny import build_tiny_model
from test_model_api import IDS, _dequantized_reference, _train_a_few_steps

CASES = {
    "patterns": ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"],
                               rank_pattern={"v_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, alpha_pattern={"q_proj": 3})),
    "lora_bias": ("qwen2", dict(target_modules=["q_proj", "v_proj"], lora_bias=True)),
    "bias_all": ("qwen2", dict(target_modules=["q_proj", "o_proj"], bias="all")),
    "bias_lora_only": ("qwen2", dict(target_modules=["q_proj", "o_proj"], bias="lora_only")),
    "embedding_and_tied_head": ("llama_tied", dict(target_modules=["q_proj", "embed_tokens", "lm_head"])),
    "scaled_embedding": ("gemma3", dict(target_modules=["embed_tokens", "v_proj"])),
    "dora_embedding": ("llama", dict(target_modules=["q_proj", "embed_tokens"], use_dora=True)),
    "dora_scaled_embedding_and_tied_head": ("gemma3", dict(target_modules=["embed_tokens", "lm_head"], use_dora=True)),
    # a module saved whole is PEFT's own copy: of a tied pair only it changes, unless ensure_weight_tying
    "saved_embedding_of_tied_pair": ("llama_tied", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    "saved_head_of_tied_pair": ("llama_tied", dict(target_modules=["v_proj"], modules_to_save=["lm_head"])),
    "saved_embedding_kept_tied": ("llama_tied", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                     ensure_weight_tying=True)),
    # PEFT ties the head's LoRA to the embedding's (dropping lm_head from target_modules): written back naming it
    "lora_on_tied_pair_kept_tied": ("llama_tied", dict(target_modules=["q_proj", "embed_tokens", "lm_head"],
                                                       ensure_weight_tying=True)),
    "lora_on_tied_head_kept_tied": ("llama_tied", dict(target_modules=["v_proj", "lm_head"], ensure_weight_tying=True)),
    # both saved whole: two tables trained apart, so the merged model has both (untied)
    "saved_embedding_and_head_of_tied_pair": ("llama_tied", dict(target_modules=["q_proj"],
                                                                 modules_to_save=["embed_tokens", "lm_head"])),
    # one layer of a name saved whole: written back naming it by its path, or PEFT would copy every down_proj
    "saved_one_layer_of_a_name": ("llama", dict(target_modules=["q_proj"], modules_to_save=["layers.1.mlp.down_proj"])),
    # PEFT writes rank_pattern sorted: layers.0's key comes first in the file, though v_proj's gave it its rank in
    # training (PEFT fails to load it; qlora refused it as 'made for another base model')
    "rank_keys_sorted_on_save": ("llama", dict(target_modules=["q_proj", "v_proj"],
                                               rank_pattern={"v_proj": 3, r"layers\.0\.self_attn\.v_proj": 2})),
    # VeLoRA compresses the activations backward keeps: its forward and merge are plain LoRA's (it was refused)
    "velora": ("llama", dict(target_modules=["q_proj", "v_proj"], velora_config={"num_groups": 4})),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("peft-options")
    specs = {"llama": ("llama", {}), "qwen2": ("qwen2", {}), "gemma3": ("gemma3", {}),
             "llama_tied": ("llama", dict(tie_word_embeddings=True))}
    return {name: build_tiny_model(root / name, tokenizer=tiny_tokenizer, arch=arch, **kw)
            for name, (arch, kw) in specs.items()}


def _peft_adapter(model_dir, qmodel, out, **options):
    """A PEFT adapter with random (non-zero) weights and biases, made on qlora's dequantized base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(_dequantized_reference(model_dir, qmodel),
                        LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and (name.endswith("bias") or ".modules_to_save." in name
                                    or "lora_magnitude_vector" in name):
                p.add_(torch.randn_like(p) * 0.1)
    pm.eval().save_pretrained(out)
    with torch.no_grad():
        return pm(IDS).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_adapter_options_round_trip(tmp_path, models, case):
    arch, options = CASES[case]
    model_dir = models[arch]
    model, _ = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    theirs = _peft_adapter(model_dir, model, tmp_path / "theirs", **options)

    _round_trip(model, model_dir, tmp_path, IDS, theirs)


@torch.no_grad()
def _round_trip(model, model_dir, tmp_path, ids, theirs) -> None:
    """PEFT's adapter in ``tmp_path/theirs`` gives its logits ``theirs`` in qlora; written back, PEFT reads the
    same adapter (options, trained biases, token rows and all); merged into plain weights, transformers
    computes the adapter model (a tied head is untied)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    qlora.load_adapter(model, tmp_path / "theirs")
    torch.testing.assert_close(model(ids).logits, theirs, rtol=1e-4, atol=1e-4)
    qlora.save_adapter(model, tmp_path / "ours")
    again = PeftModel.from_pretrained(_dequantized_reference(model_dir, model), tmp_path / "ours").eval()
    torch.testing.assert_close(again(ids).logits, theirs, rtol=1e-4, atol=1e-4)
    merge(model, into="dequantized", dtype=torch.float32)
    save_merged(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(merged(ids).logits, theirs, rtol=1e-4, atol=1e-4)


def test_lora_bias_on_a_layer_without_bias_loads_but_refuses_to_merge(tmp_path, models):
    model_dir = models["llama"]
    model, _ = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    theirs = _peft_adapter(model_dir, model, tmp_path / "a", target_modules=["q_proj"], lora_bias=True)
    qlora.load_adapter(model, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, theirs, rtol=1e-4, atol=1e-4)
    with pytest.raises(UsageError, match=r"q_proj: the adapter trains a bias there .*lora_bias.* no bias"):
        merge(model)


def test_embedding_lora_trains_and_serves_per_row(models):
    model, _ = qlora.load_model(models["llama"], compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=4, dropout=0.0, target_modules=["embed_tokens", "v_proj"], adapter_name="e")
    embedding = model.get_input_embeddings()
    assert embedding.lora_embedding_A["e"].requires_grad and not embedding.base_layer.weight.requires_grad
    with torch.no_grad():
        before = model(IDS, labels=IDS).loss.item()
    _train_a_few_steps(model, steps=5)
    with torch.no_grad():
        assert model(IDS, labels=IDS).loss.item() < before
    assert embedding.lora_embedding_A["e"].abs().sum() > 0  # A starts at zero (PEFT's init) and moved

    # a second adapter: per-row batches give each row what its adapter alone gives
    qlora.add_lora(model, r=2, dropout=0.0, target_modules=["embed_tokens"], rank_pattern={"embed_tokens": 3},
                   adapter_name="f", init="gaussian")
    with torch.no_grad():
        embedding.lora_embedding_A["f"].normal_()
    batch = IDS.repeat(3, 1)
    alone = {}
    for name in ("e", "f"):
        qlora.set_adapter(model, name)
        with torch.no_grad():
            alone[name] = model(IDS).logits[0]
    with torch.no_grad(), qlora.adapter_rows(model, ["f", None, "e"]):
        rows = model(batch).logits
        with qlora.model.inject.adapters_disabled(model):
            base = model(IDS).logits[0]
    torch.testing.assert_close(rows[0], alone["f"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows[1], base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows[2], alone["e"], rtol=1e-5, atol=1e-5)

    # concatenated with per-layer ranks, the combination equals the weighted sum
    qlora.set_adapters(model, {"e": 0.5, "f": -1.5})
    with torch.no_grad():
        weighted = model(IDS).logits
    qlora.combine_adapters(model, {"e": 0.5, "f": -1.5}, "ef")
    qlora.set_adapter(model, "ef")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, weighted, rtol=1e-4, atol=1e-4)
    assert embedding.specs["ef"].r == 7 and qlora.model.inject.adapter_configs(model)["ef"].rank_pattern


def test_bad_options_say_what_to_do(models):
    model, _ = qlora.load_model(models["llama"], compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match=r"rank_pattern\['v_proj'\] must be a positive integer, got 0"):
        qlora.add_lora(model, target_modules=["v_proj"], rank_pattern={"v_proj": 0})
    with pytest.raises(UsageError, match="bias must be 'none', 'all' or 'lora_only'"):
        qlora.add_lora(model, target_modules=["v_proj"], bias="some")
    with pytest.raises(UsageError, match="lora_bias does not combine with DoRA"):
        qlora.add_lora(model, target_modules=["v_proj"], lora_bias=True, use_dora=True)
    with pytest.raises(UsageError, match="embed_tokens: .*does not support lora_bias"):
        qlora.add_lora(model, target_modules=["embed_tokens"], lora_bias=True)


def test_trained_biases_of_4bit_layers_get_the_dense_gradient_and_reach_peft(tmp_path, models):
    from peft import PeftModel

    from qlora.nn import Linear4bit

    dense = torch.nn.Linear(64, 48)
    layer = Linear4bit.from_linear(dense, "nf4", 64, True, torch.float32)
    layer.bias.requires_grad_(True)
    reference = torch.nn.Linear(64, 48)
    reference.weight.data.copy_(layer.dequantize(torch.float32))
    reference.bias.data.copy_(layer.bias.detach())
    x = torch.randn(3, 5, 64)
    (layer(x) ** 2).sum().backward()
    (reference(x) ** 2).sum().backward()
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad, rtol=1e-5, atol=1e-5)

    model_dir = models["qwen2"]
    model, _ = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.add_lora(model, r=4, dropout=0.0, target_modules=["q_proj"], bias="all")
    q_bias = model.model.layers[0].self_attn.q_proj.base_layer.bias
    k_bias = model.model.layers[0].self_attn.k_proj.bias
    before = q_bias.detach().clone(), k_bias.detach().clone()
    _train_a_few_steps(model)
    assert not torch.equal(q_bias, before[0]) and not torch.equal(k_bias, before[1])
    qlora.save_adapter(model, tmp_path / "a")
    theirs = PeftModel.from_pretrained(_dequantized_reference(model_dir, model), tmp_path / "a").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, model(IDS).logits, rtol=1e-4, atol=1e-4)


def test_train_takes_the_options_from_yaml_and_flags(tmp_path, models, capsys):
    import json

    from qlora.cli.main import main
    from qlora.train.data.sources import demo_data_path

    config = tmp_path / "run.yaml"
    config.write_text(f"model: {models['qwen2']}\ndata: {demo_data_path()}\noutput: {tmp_path / 'run'}\n"
                      "max_steps: 2\nseq_len: 48\ntarget_modules: [q_proj, v_proj]\n"
                      "rank_pattern: {v_proj: 2}\nalpha_pattern: {'layers\\.1\\.self_attn\\.q_proj': 4}\n"
                      "lora_bias: true\nbias: lora_only\n")
    assert main(["train", str(config), "--no-progress"]) == 0
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert (saved["rank_pattern"], saved["alpha_pattern"]) == ({"v_proj": 2}, {r"layers\.1\.self_attn\.q_proj": 4.0})
    assert saved["lora_bias"] is True and saved["bias"] == "lora_only"
    model, _ = qlora.load_model(models["qwen2"], compute_dtype=torch.float32, device="cpu")
    qlora.load_adapter(model, tmp_path / "run")
    assert model.model.layers[0].self_attn.v_proj.lora_A["default"].weight.shape[0] == 2

    capsys.readouterr()
    assert main(["train", str(config), "--rank-pattern", "v_proj=two", "--overwrite"]) == 2
    assert "--rank-pattern: 'v_proj=two' is not NAME=VALUE with a positive integer rank" in capsys.readouterr().err


@pytest.mark.parametrize("arch,indices", [("llama_tied", [3, 7, 11]), ("qwen2", {"embed_tokens": [5, 2]})])
def test_trainable_token_rows_load_save_and_merge(tmp_path, models, arch, indices):
    """PEFT's trainable_token_indices: new rows for single tokens (a tied head reads them too)."""
    from peft import LoraConfig, get_peft_model

    model_dir = models[arch]
    model, _ = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    theirs_model = get_peft_model(_dequantized_reference(model_dir, model), LoraConfig(
        r=4, target_modules=["q_proj"], init_lora_weights=False, trainable_token_indices=indices)).eval()
    with torch.no_grad():
        for name, p in theirs_model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))  # the rows start as the base's: make them differ
    theirs_model.save_pretrained(tmp_path / "theirs")
    ids = torch.tensor([[1, 3, 5, 7, 2, 11, 9]])
    with torch.no_grad():
        theirs = theirs_model(ids).logits
    _round_trip(model, model_dir, tmp_path, ids, theirs)


@pytest.mark.parametrize("arch,how", [("llama_tied", "rows"), ("qwen2", "rows"), ("llama_tied", "lora"),
                                      ("qwen2", "lora")])
def test_trainable_rows_of_added_tokens_load_save_and_merge(tmp_path, models, arch, how):
    """Tokens added (the model resized) before training their rows (or LoRA on the embedding) with PEFT: PEFT
    saves the grown tables beside the adapter; qlora grows the model to them, gives PEFT's logits, writes them
    back so that PEFT on a base resized again (new rows drawn anew) gives them too, and merges into that model."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM
    from safetensors.torch import load_file

    model_dir = models[arch]
    model, _ = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    reference = _dequantized_reference(model_dir, model)
    old = reference.get_input_embeddings().weight.shape[0]
    torch.manual_seed(0)
    reference.resize_token_embeddings(old + 3)
    # rows: two added tokens trained, one not, and one of the base's
    options = dict(target_modules=["q_proj"], trainable_token_indices=[old, old + 2, 5]) if how == "rows" else dict(
        target_modules=["q_proj", "embed_tokens"])
    theirs_model = get_peft_model(reference, LoraConfig(r=4, init_lora_weights=False, **options)).eval()
    with torch.no_grad():
        for name, p in theirs_model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    theirs_model.save_pretrained(tmp_path / "theirs")
    ids = torch.tensor([[1, 5, old, old + 1, 7, old + 2]])
    with torch.no_grad():
        theirs = theirs_model(ids).logits
        qlora.load_adapter(model, tmp_path / "theirs")
        torch.testing.assert_close(model(ids).logits, theirs, rtol=1e-4, atol=1e-4)
        qlora.save_adapter(model, tmp_path / "ours")
        saved = [set(load_file(str(tmp_path / d / "adapter_model.safetensors"))) for d in ("theirs", "ours")]
        assert {k for k in saved[0] if "base_layer" in k} <= saved[1]
        base = _dequantized_reference(model_dir, model)
        torch.manual_seed(1)
        base.resize_token_embeddings(old + 3)
        again = PeftModel.from_pretrained(base, tmp_path / "ours").eval()
        torch.testing.assert_close(again(ids).logits, theirs, rtol=1e-5, atol=1e-5)
        merge(model, into="dequantized", dtype=torch.float32)
        save_merged(model, tmp_path / "merged")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        assert merged.get_input_embeddings().weight.shape[0] == old + 3
        torch.testing.assert_close(merged(ids).logits, theirs, rtol=1e-4, atol=1e-4)


def test_lora_variants_that_compute_differently_are_refused_naming_them(tmp_path, models):
    from peft import LoraConfig, get_peft_model

    model_dir = models["llama"]
    model, _ = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    pm = get_peft_model(_dequantized_reference(model_dir, model),
                        LoraConfig(r=4, target_modules=["q_proj"], use_qalora=True, qalora_group_size=8))
    pm.save_pretrained(tmp_path / "qalora")
    with pytest.raises(UsageError, match=r"adapter_config.json is a QA-LoRA adapter.*merge_and_unload"):
        qlora.load_adapter(model, tmp_path / "qalora")
    # a tensor of another kind than plain LoRA's, even without the config saying so
    from safetensors.torch import load_file, save_file

    pm = get_peft_model(_dequantized_reference(model_dir, model), LoraConfig(r=4, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path / "odd")
    tensors = load_file(str(tmp_path / "odd" / "adapter_model.safetensors"))
    key = next(iter(tensors)).rsplit(".lora_", 1)[0] + ".lora_diag"
    save_file(tensors | {key: torch.ones(4)}, str(tmp_path / "odd" / "adapter_model.safetensors"))
    fresh, _ = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError, match=r"lora_diag is not a tensor of plain LoRA or DoRA"):
        qlora.load_adapter(fresh, tmp_path / "odd")


def test_a_rank_key_older_peft_matched_nowhere_keeps_the_saved_rank(tmp_path, models):
    """Older PEFT matched a rank_pattern key only after a dot (``.*\\.{key}$``), so a key anchored at the path's
    start (PEFT's own docs' example) left the layer at r; PEFT 0.21 gives it the key's rank and fails to load the
    file. qlora takes the rank the file holds (it said 'made for another base model')."""
    import json

    model_dir = models["llama"]
    model, _ = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    theirs = _peft_adapter(model_dir, model, tmp_path / "theirs", target_modules=["q_proj", "v_proj"])
    config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    (tmp_path / "theirs" / "adapter_config.json").write_text(json.dumps(
        config | {"rank_pattern": {"^model.layers.0.self_attn.q_proj": 2}}))
    _round_trip(model, model_dir, tmp_path, IDS, theirs)


def test_integral_float_ranks_are_written_back_as_integers(tmp_path, models):
    """A rank_pattern value of 2.0 (a hand-edited or another tool's config) loads, and is written back as 2, which
    PEFT's layers take (2.0 failed there: torch.empty got a float size)."""
    import json

    from peft import PeftModel

    model_dir = models["llama"]
    model, _ = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    theirs = _peft_adapter(model_dir, model, tmp_path / "a", target_modules=["q_proj", "v_proj"],
                           rank_pattern={"q_proj": 2})
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config | {"rank_pattern": {"q_proj": 2.0}}))
    qlora.load_adapter(model, tmp_path / "a")
    qlora.save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["rank_pattern"] == {"q_proj": 2}
    again = PeftModel.from_pretrained(_dequantized_reference(model_dir, model), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, theirs, rtol=1e-4, atol=1e-4)
    # a rank of 2.5 is refused naming the file (it named the option alone)
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config | {"rank_pattern": {"q_proj": 2.5}}))
    with pytest.raises(UsageError, match=r"a/adapter_config.json: rank_pattern must be a mapping of layer name "
                                         r"patterns to positive integers, got \{'q_proj': 2.5\}"):
        qlora.load_adapter(model, tmp_path / "a", adapter_name="other")


def test_alpha_keys_of_different_alphas_matching_one_layer_are_warned_of(tmp_path, models, caplog):
    """PEFT sorts alpha_pattern's keys too, and no tensor tells which alpha training gave a layer two keys match."""
    model_dir = models["llama"]
    model, _ = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    _peft_adapter(model_dir, model, tmp_path / "a", target_modules=["v_proj"],
                  alpha_pattern={"v_proj": 3, r"layers\.0\.self_attn\.v_proj": 5})
    with caplog.at_level("WARNING", logger="qlora"):
        qlora.load_adapter(model, tmp_path / "a")
    assert "alpha_pattern keys of different alphas" in caplog.text and "model.layers.0.self_attn.v_proj" in caplog.text


def test_velora_adapter_trained_on_says_its_gradients_are_exact(tmp_path, models, caplog):
    """VeLoRA's backward approximates the gradients from compressed activations; qlora trains on with exact ones,
    and says so naming velora_config."""
    model_dir = models["llama"]
    model, _ = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    theirs = _peft_adapter(model_dir, model, tmp_path / "a", target_modules=["q_proj"], velora_config={"num_groups": 4})
    with caplog.at_level("WARNING", logger="qlora"):
        qlora.load_adapter(model, tmp_path / "a", trainable=True)
    assert "VeLoRA adapter (velora_config)" in caplog.text and "exact gradients" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(IDS).logits, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("option, what", [
    (dict(alora_invocation_tokens=[5, 9]), "an activated LoRA (aLoRA)"),
    (dict(layer_replication=[[0, 2], [1, 2]]), "a layer-replication (repeated layers)")])
def test_generate_refuses_a_variant_adapter_naming_its_field(tmp_path, models, capsys, option, what):
    """aLoRA adapts only the tokens after its invocation tokens, layer replication runs layers twice: refused by
    the CLI (exit 2, no traceback) naming the field that is set."""
    from qlora.cli.main import main

    model_dir = models["llama"]
    model, _ = qlora.load_model(model_dir, compute_dtype=torch.float32, device="cpu")
    _peft_adapter(model_dir, model, tmp_path / "a", target_modules=["q_proj"], **option)
    capsys.readouterr()
    assert main(["generate", "--model", str(model_dir), "--adapter", str(tmp_path / "a"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert f"is {what} adapter ({next(iter(option))} is set)" in err and "Traceback" not in err, err


@pytest.mark.parametrize("damage", ["int_tensor", "bool_tensor", "dora_without_magnitudes"])
def test_a_damaged_adapter_file_is_refused_naming_the_file_and_tensor(tmp_path, models, damage):
    """What PEFT loads silently or with a warning (an integer or boolean tensor cast to floats; DoRA layers whose
    magnitudes are missing keep the base's norms) is refused here, naming the file and the tensor or layer."""
    from safetensors.torch import load_file, save_file

    from random_adapters import save_random_peft_adapter

    save_random_peft_adapter(models["llama"], tmp_path / "a", 0, r=2, target_modules=["q_proj"], use_dora=True)
    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    if damage == "dora_without_magnitudes":
        del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
        expected = ["use_dora", "no lora_magnitude_vector for model.layers.0.self_attn.q_proj", str(tmp_path / "a")]
    else:
        dtype = torch.int32 if damage == "int_tensor" else torch.bool
        tensors[key] = (tensors[key] * 100).to(dtype)
        expected = [str(file), key, str(dtype).removeprefix("torch.")]
    save_file(tensors, str(file))
    model, _ = qlora.load_model(models["llama"], quant=None, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError) as info:
        qlora.load_adapter(model, tmp_path / "a")
    assert all(part in str(info.value) for part in expected), str(info.value)


@pytest.mark.parametrize("saved, tying", [(["embed_tokens"], False), (["lm_head"], False),
                                          (["embed_tokens"], True), (["embed_tokens", "lm_head"], False)])
def test_training_one_of_a_tied_pair_whole_trains_its_own_table_as_peft(tmp_path, models, saved, tying):
    """PEFT trains a module saved whole as its own copy: of a tied embedding and head, the other keeps the base's
    table (unless ensure_weight_tying, which trains the one table). Trained by qlora, the model's logits are those
    PEFT and qlora load from the file it saved, and the module not saved is the base's. (Both saved: trained as the
    one table, saved under both keys.)"""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, _ = qlora.load_model(models["llama_tied"], quant=None, compute_dtype=torch.float32, device="cpu")
    table = model.lm_head.weight.detach().clone()
    qlora.add_lora(model, r=2, target_modules=["q_proj"], modules_to_save=saved, verbose=False,
                   ensure_weight_tying=tying)
    _train_a_few_steps(model)
    one_table = tying or len(saved) == 2
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == one_table
    other = model.lm_head if saved == ["embed_tokens"] else model.model.embed_tokens
    assert torch.equal(other.weight, table) != one_table
    qlora.save_adapter(model, tmp_path / "a")
    with torch.no_grad():
        ours = model(IDS).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(models["llama_tied"],
                                                                              dtype=torch.float32), tmp_path / "a")
        torch.testing.assert_close(peft.eval()(IDS).logits, ours)
        again, _ = qlora.load_model(models["llama_tied"], quant=None, compute_dtype=torch.float32, device="cpu")
        torch.testing.assert_close(qlora.load_adapter(again, tmp_path / "a").eval()(IDS).logits, ours)
