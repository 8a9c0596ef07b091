"""Several adapters on one model, some with modules trained whole (PEFT's modules_to_save), against PEFT:
each adapter keeps its own copy, selected with the adapter, per batch row, deleted and saved with it."""

from __future__ import annotations

import gc
import re
import weakref

import pytest
import torch

import qlora
from qlora.errors import UsageError
from qlora.model.inject import adapters_disabled
from qlora.nn import SavedModules

from random_adapters import save_random_peft_adapter

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 64], [5, 6, 7, 8, 9, 10, 11, 12], [3, 3, 40, 41, 42, 2, 9, 9]])

ADAPTERS = {  # PEFT LoraConfig options: two save lm_head (one the embedding too), one saves nothing
    "head": dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
    "both": dict(r=2, target_modules=["k_proj"], modules_to_save=["embed_tokens", "lm_head"]),
    "none": dict(r=3, target_modules=["o_proj", "up_proj"]),
}
LORA_HEAD = dict(r=2, target_modules=["lm_head"])  # LoRA on the module the others save whole


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_model_dir):
    """Each adapter made and saved by PEFT, every trainable tensor (copies included) moved from its init."""
    root = tmp_path_factory.mktemp("peft-saved-modules")
    for seed, (name, options) in enumerate((ADAPTERS | {"lora_head": LORA_HEAD}).items()):
        save_random_peft_adapter(tiny_model_dir, root / name, seed, **options)
    return root


def _ours(tiny_model_dir, saved, names):
    model, _ = qlora.load_model(tiny_model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    for name in names:
        qlora.load_adapter(model, saved / name, adapter_name=name)
    return model.eval()


def _peft(tiny_model_dir, saved, names):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, saved / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(saved / name, adapter_name=name)
    return model.eval()


def _close(a, b, msg=None):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=msg)


@pytest.mark.parametrize("order", [["head", "both", "none"], ["none", "both", "head"]])
@torch.no_grad()
def test_each_adapter_runs_its_own_copies_as_peft(tiny_model_dir, saved, order):
    """Every adapter selected, the adapters off, and a batch with an adapter per row equal PEFT's; a copy
    exists only for the adapters that saved the module."""
    ours, theirs = _ours(tiny_model_dir, saved, order), _peft(tiny_model_dir, saved, order)
    head, embed = ours.get_submodule("lm_head"), ours.get_submodule("model.embed_tokens")
    assert isinstance(head, SavedModules) and sorted(head.modules_to_save) == ["both", "head"]
    assert isinstance(embed, SavedModules) and list(embed.modules_to_save) == ["both"]
    for name in order:
        qlora.set_adapter(ours, name)
        theirs.set_adapter(name)
        _close(ours(IDS).logits, theirs(IDS).logits, msg=name)
    assert not torch.equal(*(ours.get_submodule("lm_head").modules_to_save[n].weight for n in ("head", "both")))
    with adapters_disabled(ours), theirs.disable_adapter():
        _close(ours(IDS).logits, theirs(IDS).logits)
    # (PEFT's own adapter_names fails on a module some of the batch's adapters have no copy of: row by row)
    rows = ["both", None, "head"]
    with qlora.adapter_rows(ours, rows):
        mixed = ours(IDS).logits
    for i, name in enumerate(rows):
        if name is None:
            with theirs.disable_adapter():
                _close(mixed[i:i + 1], theirs(IDS[i:i + 1]).logits)
        else:
            theirs.set_adapter(name)
            _close(mixed[i:i + 1], theirs(IDS[i:i + 1]).logits, msg=name)


@torch.no_grad()
def test_two_adapters_with_copies_of_one_module_do_not_run_together(tiny_model_dir, saved):
    ours = _ours(tiny_model_dir, saved, ["head", "both", "none"])
    with pytest.raises(UsageError, match=r"\['head', 'both'\] .* trained lm_head whole"):
        qlora.set_adapters(ours, {"head": 1.0, "both": 1.0})
    with pytest.raises(UsageError, match=r"weights \[0.5\]"):
        qlora.set_adapters(ours, {"head": 0.5})
    with pytest.raises(UsageError, match="cannot concatenate"):
        qlora.combine_adapters(ours, {"head": 1.0, "none": 1.0}, "mix")
    qlora.set_adapters(ours, {"head": 1.0, "none": 0.5})  # one copy, and a delta beside it: allowed


def test_lora_and_a_copy_of_one_module_are_refused_in_either_order(tiny_model_dir, saved):
    for first, second in (("lora_head", "head"), ("head", "lora_head")):
        model = _ours(tiny_model_dir, saved, [first])
        with pytest.raises(UsageError, match=rf"lm_head .*\['{first}'\].* PEFT adapts a module one way only"):
            qlora.load_adapter(model, saved / second, adapter_name=second)
        assert list(qlora.model.inject.adapter_configs(model)) == [first]  # left as it was


@torch.no_grad()
def test_saved_from_qlora_equals_peft_file_and_reloads_in_peft(tmp_path, tiny_model_dir, saved):
    """Each adapter saved back holds PEFT's keys and tensors, and PEFT reloads it to the same outputs."""
    from safetensors.torch import load_file

    ours = _ours(tiny_model_dir, saved, ["head", "both", "none"])
    for name in ADAPTERS:
        qlora.save_adapter(ours, tmp_path / name, adapter_name=name)
        mine, peft_file = (load_file(str(d / name / "adapter_model.safetensors")) for d in (tmp_path, saved))
        assert sorted(mine) == sorted(peft_file), name
        for key in mine:
            torch.testing.assert_close(mine[key], peft_file[key], rtol=0, atol=0, msg=key)
        qlora.set_adapter(ours, name)
        _close(ours(IDS).logits, _peft(tiny_model_dir, tmp_path, [name])(IDS).logits, msg=name)


@torch.no_grad()
def test_delete_adapter_frees_its_copies_as_peft(tiny_model_dir, saved):
    """Deleting the active adapter frees its copies and activates the first remaining one (PEFT's rule);
    once no adapter keeps a copy, the original module is back in its place."""
    order = ["head", "both", "none"]
    ours, theirs = _ours(tiny_model_dir, saved, order), _peft(tiny_model_dir, saved, order)
    qlora.set_adapter(ours, "both")
    theirs.set_adapter("both")
    freed = [weakref.ref(p) for n, p in ours.named_parameters() if ".modules_to_save.both." in n]
    assert len(freed) == 2
    qlora.delete_adapter(ours, "both")
    theirs.delete_adapter("both")
    gc.collect()
    assert all(r() is None for r in freed)
    assert isinstance(ours.get_submodule("model.embed_tokens"), torch.nn.Embedding)
    assert theirs.active_adapters == ["head"]  # (PEFT's layers keep a mix; its model-level choice, set whole:)
    theirs.set_adapter("head")
    _close(ours(IDS).logits, theirs(IDS).logits)
    qlora.delete_adapter(ours, "head")
    assert isinstance(ours.get_submodule("lm_head"), torch.nn.Linear)
    theirs.delete_adapter("head")
    theirs.set_adapter("none")
    _close(ours(IDS).logits, theirs(IDS).logits)
    qlora.load_adapter(ours, saved / "head", adapter_name="head")  # the name loads again
    qlora.set_adapter(ours, "head")
    _close(ours(IDS).logits, _peft(tiny_model_dir, saved, ["head"])(IDS).logits)


@torch.no_grad()
def test_merge_folds_the_active_adapters_copy(tiny_model_dir, saved):
    """A merge keeps the active adapter's copy as the plain module (PEFT's merge_and_unload)."""
    ours = _ours(tiny_model_dir, saved, ["none", "both"])
    qlora.set_adapter(ours, "both")
    expected = ours(IDS).logits
    merged = qlora.merge(ours)
    assert not any(isinstance(m, SavedModules) for m in merged.modules())
    _close(merged(IDS).logits, expected)


def test_batched_serving_gives_each_row_its_adapters_copies(tiny_model_dir, tiny_tokenizer, saved):
    """Requests for different adapters decoded in one batch each run their own adapter's copies: each row's
    greedy tokens are PEFT's for that adapter (the base: adapters off), and the base is served beside them."""
    pytest.importorskip("fastapi")
    import threading

    from fastapi.testclient import TestClient

    from qlora.infer.batcher import ContinuousBatcher, Request
    from qlora.infer.generate import SamplingOptions
    from qlora.serve.app import build_app

    names, new = ["head", "both", "none"], 5
    prompt = tiny_tokenizer("The quick brown").input_ids
    theirs = _peft(tiny_model_dir, saved, names)
    expected = {}
    for name in [*names, None]:
        ids = torch.tensor([prompt])
        if name is not None:
            theirs.set_adapter(name)
        with theirs.disable_adapter() if name is None else torch.no_grad(), torch.no_grad():
            for _ in range(new):
                ids = torch.cat([ids, theirs(ids).logits[:, -1:].argmax(-1)], 1)
        expected[name] = tiny_tokenizer.decode(ids[0, len(prompt):], skip_special_tokens=True)
    batcher = ContinuousBatcher(_ours(tiny_model_dir, saved, names), tiny_tokenizer, max_batch_size=4,
                                context_length=64).start()
    try:
        assert [m["id"] for m in TestClient(build_app(batcher, "tiny", names)).get("/v1/models").json()["data"]] \
            == ["tiny", *names]
        done, texts = threading.Semaphore(0), {name: [] for name in [*names, None]}

        def emitter(name):
            def emit(event):
                texts[name].append(event.text)
                if event.finish_reason:
                    done.release()
            return emit

        with batcher.paused():
            for name in [*names, None]:
                batcher.submit(Request(prompt, name, SamplingOptions(max_new_tokens=new, temperature=0), emitter(name)))
        for _ in texts:
            assert done.acquire(timeout=120)
        assert batcher.load()["max_rows_in_step"] == 4
    finally:
        batcher.close()
    assert {name: "".join(t) for name, t in texts.items()} == expected


def test_generate_cli_runs_each_adapter_with_its_copies(tiny_model_dir, saved, capsys):
    """qlora generate with the three adapters (4-bit base, rows batched) prints for each the text it prints
    alone; weights that would run two copies of lm_head together exit 2 naming them."""
    from qlora.cli.main import main

    common = ["generate", "--model", str(tiny_model_dir), "--compute-dtype", "fp32", "--prompt", "The sky",
              "--temperature", "0", "--max-new-tokens", "4"]
    together = common + [a for name in ADAPTERS for a in ("--adapter", f"{name}={saved / name}")]
    assert main(together) == 0
    # each reply follows its "[name] " label; a reply may hold a newline of its own (random weights)
    parts = re.split(rf"^\[({'|'.join(ADAPTERS)})\] ", capsys.readouterr().out, flags=re.M)
    assert parts[0] == "" and parts[1::2] == list(ADAPTERS), parts
    replies = [text.strip() for text in parts[2::2]]
    assert len(set(replies)) == 3, replies
    for name, reply in zip(ADAPTERS, replies):
        assert main(common + ["--adapter", f"{name}={saved / name}"]) == 0
        assert capsys.readouterr().out.strip() == reply, name
    assert main(together + ["--adapter-weights", "1,1,1"]) == 2
    assert "['head', 'both'] (weights [1.0, 1.0]) trained lm_head whole" in capsys.readouterr().err


@torch.no_grad()
def test_one_adapter_alone_holds_what_it_trained_whole_once(tiny_model_dir, saved):
    """keep_base=False (one-adapter generate, eval, merge, export): the saved modules are written into the base,
    no second copy beside the original, and the model equals PEFT's with that adapter."""
    model, _ = qlora.load_model(tiny_model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    before = sum(p.numel() for p in model.parameters())
    qlora.load_adapter(model, saved / "both", adapter_name="both", keep_base=False)
    assert not any(isinstance(m, SavedModules) for m in model.modules())
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert sum(p.numel() for p in model.parameters()) == before + lora
    _close(model.eval()(IDS).logits, _peft(tiny_model_dir, saved, ["both"])(IDS).logits)


def test_state_dict_is_the_bases_with_the_copies_kept_apart(tiny_model_dir, saved):
    """The wrappers are invisible in the model's state dict (what transformers' save_pretrained writes): the
    original modules under their own keys, no copies; loading a state dict back leaves the copies as they are."""
    base, _ = qlora.load_model(tiny_model_dir, quant=None, compute_dtype=torch.float32, device="cpu")
    plain = {k: v.clone() for k, v in base.state_dict().items()}
    model = _ours(tiny_model_dir, saved, ["head", "both"])
    state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert set(state) == set(plain)
    for key, value in plain.items():
        assert torch.equal(state[key], value), key
    copies = {n: p.clone() for n, p in model.named_parameters() if ".modules_to_save." in n}
    assert model.load_state_dict({k: v + 1 for k, v in model.state_dict().items()}).missing_keys == []
    assert torch.equal(model.lm_head.original_module.weight, plain["lm_head.weight"] + 1)
    for name, value in copies.items():
        assert torch.equal(model.get_parameter(name), value), name


def test_4bit_base_saved_with_copies_loaded_is_the_base_transformers_loads(tmp_path, tiny_model_dir, saved):
    """save_quantized of a 4-bit model holding adapters' copies writes the file it writes for the bare base
    (same tensors, same config: the head listed as kept dense, no wrapper names), which transformers loads."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    bare, tok = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    qlora.save_quantized(bare, tmp_path / "bare", tokenizer=tok)
    model, _ = qlora.load_model(tiny_model_dir, compute_dtype=torch.float32, device="cpu")
    for name in ("head", "both"):
        qlora.load_adapter(model, saved / name, adapter_name=name)
    qlora.save_quantized(model, tmp_path / "wrapped", tokenizer=tok)
    files = {d: load_file(str(tmp_path / d / "model.safetensors")) for d in ("bare", "wrapped")}
    assert set(files["wrapped"]) == set(files["bare"])
    for key, value in files["bare"].items():
        assert torch.equal(files["wrapped"][key], value), key
    configs = {d: (tmp_path / d / "config.json").read_text() for d in ("bare", "wrapped")}
    assert configs["wrapped"] == configs["bare"]
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "wrapped", device_map="cpu", dtype=torch.float32,
                                                   output_loading_info=True)
    assert not any(info.values()), info


@pytest.fixture(scope="module")
def head_4bit_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model quantized by transformers + bitsandbytes with nothing kept dense: its lm_head is 4-bit."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    out = tmp_path_factory.mktemp("head-4bit")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=[])
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=config, device_map="cpu",
                                         dtype=torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def _4bit_head_model(head_4bit_dir):
    from qlora.nn import Linear4bit

    model, _ = qlora.load_model(head_4bit_dir, compute_dtype=torch.float32, device="cpu")
    assert isinstance(model.lm_head, Linear4bit)
    return model


@pytest.mark.parametrize("how", [{}, {"keep_base": False}, {"trainable": True}])
@torch.no_grad()
def test_peft_adapter_saving_the_head_loads_onto_a_4bit_head(head_4bit_dir, saved, how):
    """A 4-bit head's saved copy is a dense layer holding the adapter's weights (as PEFT's copy on a 16-bit
    head): the logits are PEFT's on the same 4-bit model with a dense head; with adapters off, the 4-bit head's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from bnb_oracle import reference_path

    ours = _4bit_head_model(head_4bit_dir)
    bare = _4bit_head_model(head_4bit_dir)(IDS).logits
    qlora.load_adapter(ours, saved / "head", adapter_name="head", **how)
    theirs = AutoModelForCausalLM.from_pretrained(head_4bit_dir, device_map="cpu", dtype=torch.float32)
    reference_path(theirs)
    theirs.lm_head = torch.nn.Linear(64, theirs.config.vocab_size, bias=False)  # replaced by the copy anyway
    theirs = PeftModel.from_pretrained(theirs, saved / "head", adapter_name="head").eval()
    _close(ours.eval()(IDS).logits, theirs(IDS).logits)
    if not how:
        with adapters_disabled(ours):
            _close(ours(IDS).logits, bare)


def test_training_a_4bit_head_whole_trains_and_saves_it_dense(tmp_path, head_4bit_dir, tiny_model_dir):
    """add_lora(modules_to_save=["lm_head"]) on a 4-bit head trains a dense head starting from its dequantized
    weights; the adapter saves it under PEFT's key, and PEFT loads it (on the 16-bit base) as saved."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = _4bit_head_model(head_4bit_dir)
    start = model.lm_head.dequantize()
    qlora.add_lora(model, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], verbose=False)
    assert model.lm_head.weight.requires_grad and torch.equal(model.lm_head.weight, start)
    model(IDS).logits.square().mean().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.lm_head.weight.sub_(model.lm_head.weight.grad)
    qlora.save_adapter(model, tmp_path / "adapter")
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))[
        "base_model.model.lm_head.weight"], model.lm_head.weight.detach())
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                     tmp_path / "adapter")
    torch.testing.assert_close(peft.base_model.model.lm_head.modules_to_save["default"].weight,
                               model.lm_head.weight.detach())
