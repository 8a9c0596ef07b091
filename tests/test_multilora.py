"""Several adapters on one 4-bit base: switching, weighting, concatenation, per-row batches, CLI."""

from __future__ import annotations

import pytest
import torch

import qlora
from qlora.cli.main import main
from qlora.errors import UsageError
from qlora.nn import LoraLinear

from random_adapters import randomize_lora_b, save_random_peft_adapter

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64], [5, 6, 7, 8, 9, 10, 11, 12], [3, 3, 40, 41, 42, 2, 9, 9]])


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model_dir):
    """Two saved adapters of different ranks and targets (b is DoRA)."""
    root = tmp_path_factory.mktemp("adapters")
    for name, kw, seed in (("a", dict(r=4, target_modules=["q_proj", "v_proj"]), 1),
                           ("b", dict(r=2, alpha=8, target_modules=["v_proj", "down_proj"], use_dora=True), 2)):
        model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
        torch.manual_seed(seed)
        qlora.add_lora(model, dropout=0.0, verbose=False, **kw)
        randomize_lora_b(model, seed)
        qlora.save_adapter(model, root / name)
    return root


def _model(tiny_model_dir, adapters, names=("a", "b")):
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    for n in names:
        qlora.load_adapter(model, adapters / n, adapter_name=n)
    return model.eval()


@torch.no_grad()
def test_switching_equals_each_adapter_alone(tiny_model_dir, adapters):
    model = _model(tiny_model_dir, adapters)
    for name in ("a", "b"):
        qlora.set_adapter(model, name)
        alone = _model(tiny_model_dir, adapters, [name])
        torch.testing.assert_close(model(IDS).logits, alone(IDS).logits, rtol=1e-6, atol=1e-6)
    with pytest.raises(UsageError, match="unknown adapter"):
        qlora.set_adapter(model, "c")


@torch.no_grad()
def test_per_row_adapters_equal_running_each_row_alone(tiny_model_dir, adapters):
    model = _model(tiny_model_dir, adapters)
    rows = ["b", None, "a"]
    with qlora.adapter_rows(model, rows):
        batched = model(IDS).logits
    for i, name in enumerate(rows):
        if name is None:
            with _disabled(model):
                alone = model(IDS[i:i + 1]).logits
        else:
            qlora.set_adapter(model, name)
            alone = model(IDS[i:i + 1]).logits
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    assert all(m.row_adapters is None for m in model.modules() if isinstance(m, LoraLinear))


class _disabled:
    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, LoraLinear)]

    def __enter__(self):
        for m in self.layers:
            m.disabled = True

    def __exit__(self, *exc):
        for m in self.layers:
            m.disabled = False


@torch.no_grad()
def test_concatenation_equals_weighted_sum_for_different_ranks(tmp_path, tiny_model_dir, adapters):
    model = _model(tiny_model_dir, adapters, ["a"])
    torch.manual_seed(3)
    qlora.add_lora(model, r=8, alpha=4, rslora=True, dropout=0.0, target_modules=["v_proj", "o_proj"],
                   adapter_name="c", verbose=False)
    randomize_lora_b(model, 3, name="c")
    qlora.set_adapters(model, {"a": 0.7, "c": -0.4})
    weighted = model(IDS).logits
    qlora.combine_adapters(model, {"a": 0.7, "c": -0.4}, "ac")
    qlora.set_adapter(model, "ac")
    torch.testing.assert_close(model(IDS).logits, weighted, rtol=1e-5, atol=1e-5)
    assert model.get_submodule("model.layers.0.self_attn.v_proj").specs["ac"].r == 12
    qlora.save_adapter(model, tmp_path / "ac", adapter_name="ac")
    fresh = _model(tiny_model_dir, adapters, [])
    qlora.load_adapter(fresh, tmp_path / "ac")
    torch.testing.assert_close(fresh(IDS).logits, weighted, rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match="cannot concatenate DoRA"):
        qlora.combine_adapters(_model(tiny_model_dir, adapters), {"a": 1.0, "b": 1.0}, "ab")


def _dequantized_reference(model_dir, qmodel):
    """A plain transformers model whose linear weights are qlora's dequantized ones."""
    from transformers import AutoModelForCausalLM

    from qlora.nn import Linear4bit

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for name, module in qmodel.named_modules():
        if isinstance(module, Linear4bit):
            ref.get_submodule(name.replace(".base_layer", "")).weight.data.copy_(module.dequantize(torch.float32))
    return ref


PEFT_ADAPTERS = {  # PEFT LoraConfig options of adapters living side by side on one model
    "plain": dict(r=4, target_modules=["q_proj", "v_proj"]),
    "dora": dict(r=2, lora_alpha=8, target_modules=["v_proj", "down_proj"], use_dora=True),
    "patterns": dict(r=4, target_modules="all-linear", use_rslora=True, rank_pattern={"q_proj": 2},
                     alpha_pattern={r".*\.1\.mlp\.down_proj": 3}),
    "bias": dict(r=2, target_modules=["o_proj", "up_proj"], lora_bias=True),
    "whole": dict(r=3, target_modules=["k_proj"], modules_to_save=["lm_head"]),
    "tokens": dict(r=2, target_modules=["q_proj"], trainable_token_indices=[3, 7]),
}


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory, tiny_model_dir):
    """Each adapter of PEFT_ADAPTERS made and saved by PEFT, every trainable tensor moved from its init."""
    root = tmp_path_factory.mktemp("peft-adapters")
    for name, options in PEFT_ADAPTERS.items():
        save_random_peft_adapter(tiny_model_dir, root / name, len(name), **options)
    return root


@torch.no_grad()
def test_several_peft_adapters_on_one_4bit_model_equal_peft(tiny_model_dir, peft_adapters):
    """Each adapter selected, the adapters off, and a batch with an adapter per row, against PEFT's
    set_adapter, disable_adapter and adapter_names on the same (dequantized) base."""
    from peft import PeftModel

    names = ["plain", "dora", "patterns", "bias"]
    model = _model(tiny_model_dir, peft_adapters, names)
    peft_model = PeftModel.from_pretrained(_dequantized_reference(tiny_model_dir, model), peft_adapters / names[0],
                                           adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(peft_adapters / name, adapter_name=name)
    peft_model.eval()
    for name in names:
        peft_model.set_adapter(name)
        qlora.set_adapter(model, name)
        torch.testing.assert_close(model(IDS).logits, peft_model(IDS).logits, rtol=1e-5, atol=1e-5, msg=name)
    with peft_model.disable_adapter(), qlora.model.inject.adapters_disabled(model):
        torch.testing.assert_close(model(IDS).logits, peft_model(IDS).logits, rtol=1e-5, atol=1e-5)
    rows = ["patterns", None, "bias"]  # PEFT refuses adapter_names with DoRA; test_per_row_... covers it
    with qlora.adapter_rows(model, rows):
        ours = model(IDS).logits
    theirs = peft_model(IDS, adapter_names=[n or "__base__" for n in rows]).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_place", ["whole", "tokens"])
def test_adapter_writing_base_weights_in_place_is_not_loaded_beside_others(tiny_model_dir, peft_adapters, in_place):
    """Trainable tokens, and modules_to_save of an adapter loaded to train on, are loaded into the base in
    place (PEFT keeps a copy per adapter): beside another adapter, one of them would run with the other's
    weights, so both orders of loading are refused, naming what is written in place. (Loaded for use,
    modules_to_save are copies per adapter: tests/test_saved_modules_per_adapter.py.)"""
    what = "modules_to_save" if in_place == "whole" else "trainable_token_indices"
    for first, second in (("plain", in_place), (in_place, "plain")):
        model = _model(tiny_model_dir, peft_adapters, [])
        qlora.load_adapter(model, peft_adapters / first, adapter_name=first, trainable=first == in_place)
        with pytest.raises(UsageError, match=f"beside \\['{first}'\\].*{what}"):
            qlora.load_adapter(model, peft_adapters / second, adapter_name=second, trainable=second == in_place)
    _model(tiny_model_dir, peft_adapters, [in_place])  # alone it loads


@torch.no_grad()
def test_delete_adapter_frees_it_and_equals_peft(tiny_model_dir, peft_adapters):
    """Deleting the active adapter leaves the first remaining one active (as PEFT's delete_adapter),
    frees its tensors, and the name loads again."""
    import gc
    import weakref

    from peft import PeftModel

    model = _model(tiny_model_dir, peft_adapters, ["plain", "dora"])
    peft_model = PeftModel.from_pretrained(_dequantized_reference(tiny_model_dir, model), peft_adapters / "plain",
                                           adapter_name="plain")
    peft_model.load_adapter(peft_adapters / "dora", adapter_name="dora")
    peft_model.eval().set_adapter("dora")
    qlora.set_adapter(model, "dora")
    freed = [weakref.ref(p) for n, p in model.named_parameters() if ".dora" in n]
    assert freed
    peft_model.delete_adapter("dora")
    qlora.delete_adapter(model, "dora")
    gc.collect()
    assert all(r() is None for r in freed) and not any(".dora" in n for n in model.state_dict())
    torch.testing.assert_close(model(IDS).logits, peft_model(IDS).logits, rtol=1e-5, atol=1e-5)
    qlora.load_adapter(model, peft_adapters / "dora", adapter_name="dora")
    peft_model.load_adapter(peft_adapters / "dora", adapter_name="dora")
    peft_model.set_adapter("dora")
    qlora.set_adapter(model, "dora")
    torch.testing.assert_close(model(IDS).logits, peft_model(IDS).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match="unknown adapter"):
        qlora.delete_adapter(model, "gone")
    with pytest.raises(UsageError, match="cannot give back"):
        qlora.delete_adapter(_model(tiny_model_dir, peft_adapters, ["tokens"]), "tokens")


def test_serve_does_not_answer_as_the_base_beside_an_adapter_that_overwrote_it(tiny_model_dir, tiny_tokenizer,
                                                                            peft_adapters):
    """The base id would answer with the adapter's token rows (PEFT's disable_adapter has the original):
    it is not listed, and a request for it is refused naming the adapter; the adapter answers."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from qlora.infer.batcher import ContinuousBatcher
    from qlora.serve.app import build_app

    batcher = ContinuousBatcher(_model(tiny_model_dir, peft_adapters, ["tokens"]), tiny_tokenizer,
                                max_batch_size=2, context_length=64).start()
    try:
        client = TestClient(build_app(batcher, "tiny", ["tokens"]))
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tokens"]
        body = {"prompt": "The sky", "max_tokens": 2, "temperature": 0}
        refused = client.post("/v1/completions", json=body | {"model": "tiny"})
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
        assert "'tokens' trained new rows of model.embed_tokens" in refused.json()["error"]["message"]
        assert client.post("/v1/completions", json=body | {"model": "tokens"}).status_code == 200
    finally:
        batcher.close()


def test_generate_with_several_adapters(tiny_model_dir, adapters, capsys):
    common = ["generate", "--model", str(tiny_model_dir), "--compute-dtype", "fp32", "--prompt", "The sky",
              "--temperature", "0", "--max-new-tokens", "3",
              "--adapter", f"a={adapters / 'a'}", "--adapter", f"b={adapters / 'b'}"]
    assert main(common) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line[:4] for line in out] == ["[a] ", "[b] "]
    assert main(common + ["--adapter-weights", "0.5,0.5"]) == 0
    assert "[a]" not in capsys.readouterr().out
    assert main(common + ["--adapter-weights", "0.5"]) == 2
    assert "2 adapters" in capsys.readouterr().err


def test_adapter_names_torch_cannot_hold_are_refused_before_any_change(tmp_path, tiny_model_dir, adapters, capsys):
    """Names key torch's module dicts ('.' and their attributes are not allowed): the Python API refuses
    them untouched, the CLI exits 2 naming the option, and a dotted folder name is used with '_' instead."""
    import shutil

    model = _model(tiny_model_dir, adapters, [])
    for name in ("v1.2", "training", ""):
        with pytest.raises(UsageError, match="cannot name an adapter"):
            qlora.load_adapter(model, adapters / "a", adapter_name=name)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    with pytest.raises(UsageError, match="cannot name an adapter"):
        qlora.add_lora(model, r=2, target_modules=["q_proj"], adapter_name="keys", verbose=False)
    dotted = tmp_path / "qwen2.5-sql"
    shutil.copytree(adapters / "a", dotted)
    common = ["generate", "--model", str(tiny_model_dir), "--compute-dtype", "fp32", "--prompt", "The sky",
              "--temperature", "0", "--max-new-tokens", "2"]
    capsys.readouterr()
    assert main(common + ["--adapter", str(dotted), "--adapter", f"b={adapters / 'b'}"]) == 0
    assert capsys.readouterr().out.startswith("[qwen2_5-sql] ")
    assert main(common + ["--adapter", f"v1.2={adapters / 'a'}"]) == 2
    assert "--adapter v1.2=" in capsys.readouterr().err


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_batched_generation_per_adapter_equals_each_adapter_alone(tiny_model_dir, tiny_tokenizer, adapters,
                                                                  temperature):
    from qlora.infer.generate import SamplingOptions, generate_per_adapter, stream_text

    options = SamplingOptions(max_new_tokens=6, temperature=temperature, seed=7)
    model = _model(tiny_model_dir, adapters)
    batched = generate_per_adapter(model, tiny_tokenizer, "The quick brown", ["a", None, "b"], options)
    for name, text in zip(["a", None, "b"], batched):
        alone = _model(tiny_model_dir, adapters, [name] if name else [])
        assert text == "".join(stream_text(alone, tiny_tokenizer, "The quick brown", options))
