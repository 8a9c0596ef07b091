"""Model folders that ship Python code (``auto_map``): qlora never runs it, never asks, and says what to do.

transformers asks on the terminal whether to run such code when ``trust_remote_code`` is not given (and runs it
on a yes). The shipped files here write a marker when imported, so a test sees whether any of them ran.
"""

from __future__ import annotations

import builtins
import json
import shutil

import pytest
import torch

import qlora
from qlora.errors import UsageError

from cli_exit import cli_exit

_MARKER = "ran.txt"


def _ship(folder, json_name: str, auto_map: dict, files: dict[str, str], **fields) -> None:
    """Give ``folder/json_name`` an ``auto_map`` (and ``fields``), and ``folder`` the Python ``files`` it names."""
    data = json.loads((folder / json_name).read_text())
    data.update(auto_map=auto_map, **fields)
    (folder / json_name).write_text(json.dumps(data))
    for name, body in files.items():
        (folder / name).write_text(f"open({str(folder / _MARKER)!r}, 'w').close()\n{body}")


@pytest.fixture
def questions(monkeypatch) -> list:
    """What was asked on the terminal, each question answered yes (transformers then runs the shipped code)."""
    asked = []
    monkeypatch.setattr(builtins, "input", lambda *args: asked.append(args) or "y")
    return asked


def _custom_model(tiny_model_dir, folder, model_type: str):
    shutil.copytree(tiny_model_dir, folder)
    _ship(folder, "config.json",
          {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyForCausalLM"},
          {"configuration_my.py": "from transformers import LlamaConfig\nclass MyConfig(LlamaConfig):\n"
                                  f"    model_type = {model_type!r}\n",
           "modeling_my.py": "from transformers import LlamaForCausalLM\nclass MyForCausalLM(LlamaForCausalLM):\n"
                             "    pass\n"},
          model_type=model_type)
    return folder


def test_model_only_its_shipped_code_implements_is_refused_naming_it(tiny_model_dir, tmp_path, capsys, questions):
    folder = _custom_model(tiny_model_dir, tmp_path / "custom", "my_model")
    with pytest.raises(UsageError) as err:
        qlora.load_model(folder, device="cpu")
    message = str(err.value)
    assert str(folder / "config.json") in message and "'my_model'" in message
    assert "configuration_my.py, modeling_my.py" in message and "trust_remote_code" in message
    code, stderr = cli_exit(["generate", "--model", str(folder), "--prompt", "hi", "--max-new-tokens", "1"], capsys)
    assert code == 2 and "modeling_my.py" in stderr and "Traceback" not in stderr
    assert not (folder / _MARKER).exists() and not questions


def test_model_transformers_implements_loads_its_own_classes_not_the_shipped_code(tiny_model_dir, tmp_path,
                                                                                  questions):
    """Phi-3's and others' repositories keep an auto_map to code transformers has since implemented:
    ``from_pretrained`` without trust_remote_code builds transformers' classes, and so does qlora."""
    from transformers import AutoModelForCausalLM

    folder = _custom_model(tiny_model_dir, tmp_path / "known", "llama")
    ours, _ = qlora.load_model(folder, quant=None, compute_dtype=torch.float32, device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, dtype=torch.float32)
    assert type(ours) is type(theirs)
    ids = torch.tensor([[1, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=0)
    assert not (folder / _MARKER).exists() and not questions


def test_tokenizer_only_its_shipped_code_implements_is_refused_with_the_way_out(tiny_model_dir, tmp_path,
                                                                                questions):
    from qlora.model.load import load_tokenizer

    folder = tmp_path / "custom_tokenizer"
    shutil.copytree(tiny_model_dir, folder)
    _ship(folder, "tokenizer_config.json", {"AutoTokenizer": ["tokenization_my.MyTokenizer", None]},
          {"tokenization_my.py": "from transformers import PreTrainedTokenizerFast\n"
                                 "class MyTokenizer(PreTrainedTokenizerFast):\n    pass\n"},
          tokenizer_class="MyTokenizer")
    with pytest.raises(UsageError) as err:
        load_tokenizer(folder)
    message = str(err.value)
    assert str(folder / "tokenizer_config.json") in message and "tokenization_my.py" in message
    assert not (folder / _MARKER).exists() and not questions
    # the way out the message gives
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["auto_map"]
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    text = "The quick brown fox"
    assert load_tokenizer(folder)(text)["input_ids"] == load_tokenizer(tiny_model_dir)(text)["input_ids"]


def test_a_tokenizer_transformers_implements_is_not_blamed_on_its_auto_map(tiny_model_dir, tmp_path, questions):
    """A tokenizer_config.json naming a class transformers has keeps its auto_map (as config.json does, see the
    model test above): a failure of its own files is reported as such, not as shipped code qlora will not run
    (whose way out, PreTrainedTokenizerFast, the folder already names)."""
    from qlora.model.load import load_tokenizer

    folder = tmp_path / "known_tokenizer"
    shutil.copytree(tiny_model_dir, folder)
    _ship(folder, "tokenizer_config.json", {"AutoTokenizer": ["tokenization_my.MyTokenizer", None]},
          {"tokenization_my.py": "raise SystemExit('shipped code ran')\n"}, tokenizer_class="PreTrainedTokenizerFast")
    text = "The quick brown fox"
    assert load_tokenizer(folder)(text)["input_ids"] == load_tokenizer(tiny_model_dir)(text)["input_ids"]
    (folder / "tokenizer.json").write_text("{damaged")
    with pytest.raises(UsageError) as err:
        load_tokenizer(folder)
    message = str(err.value)
    assert "could not be loaded" in message and "tokenization_my.py" not in message and "auto_map" not in message
    assert not (folder / _MARKER).exists() and not questions


def test_a_cached_hub_config_naming_shipped_code_is_refused_by_estimate(tmp_path, monkeypatch, capsys, questions):
    """``qlora estimate ORG/NAME`` reads the config from the hub (here its cache): the same refusal, no question."""
    from transformers import LlamaConfig

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--custom" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--org--custom" / "refs").mkdir()
    (cache / "models--org--custom" / "refs" / "main").write_text("0" * 40)
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=400).save_pretrained(snapshot)
    _ship(snapshot, "config.json", {"AutoConfig": "configuration_my.MyConfig"},
          {"configuration_my.py": "from transformers import LlamaConfig\nclass MyConfig(LlamaConfig):\n"
                                  "    model_type = 'my_model'\n"}, model_type="my_model")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import, from the env
    import transformers.utils.hub

    if hasattr(transformers.utils.hub, "TRANSFORMERS_CACHE"):  # transformers 4.x's own copy, also read at import
        monkeypatch.setattr(transformers.utils.hub, "TRANSFORMERS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, stderr = cli_exit(["estimate", "--model", "org/custom"], capsys)
    assert code == 2 and "--model org/custom: " in stderr and "configuration_my.py" in stderr, stderr
    assert "Traceback" not in stderr and not (snapshot / _MARKER).exists() and not questions


def _image_model(tmp_path, kind: str):
    from image_models import build_image_model, write_png

    return build_image_model(tmp_path / kind, kind), write_png(tmp_path / "a.png", 40, 30, 0)


@pytest.mark.parametrize("kind, json_name, auto_class, field, parent, own", [
    ("llava", "processor_config.json", "AutoProcessor", "processor_class", "LlavaProcessor", "LlavaProcessor"),
    ("qwen2_vl", "preprocessor_config.json", "AutoImageProcessor", "image_processor_type", "Qwen2VLImageProcessor",
     "Qwen2VLProcessor")])
def test_processor_only_its_shipped_code_implements_is_refused_naming_it(tmp_path, capsys, questions, kind,
                                                                         json_name, auto_class, field, parent, own):
    """A processor (LLaVA's, in processor_config.json) or image processor (Qwen2-VL's, in the hub's
    preprocessor_config.json) whose class only the folder's code implements: refused naming the file, the code and
    transformers' own processor, never asked about nor run; the CLI exits 2."""
    from qlora.model.image_processor import load_image_processor

    folder, image = _image_model(tmp_path, kind)
    module, mine = ("processing_my", "MyProcessor") if auto_class == "AutoProcessor" else \
        ("image_processing_my", "MyImageProcessor")
    _ship(folder, json_name, {auto_class: f"{module}.{mine}"},
          {f"{module}.py": f"import transformers\nbase = getattr(transformers, '{parent}Pil', None) or "
                           f"transformers.{parent}\nclass {mine}(base):\n    pass\n"}, **{field: mine})
    model, tokenizer = qlora.load_model(folder, quant=None, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError) as err:
        load_image_processor(folder, model, tokenizer, "row 1")
    message = str(err.value)
    assert message.startswith(f"row 1: {folder / json_name}: ") and f"{module}.py" in message
    assert "trust_remote_code" in message and f'"processor_class": "{own}"' in message
    code, stderr = cli_exit(["generate", "--model", str(folder), "--quant", "none", "--prompt", "hi", "--image",
                             str(image), "--max-new-tokens", "1"], capsys)
    assert code == 2 and f"{module}.py" in stderr and "Traceback" not in stderr, stderr
    assert not (folder / _MARKER).exists() and not questions


def test_a_processor_transformers_implements_is_its_own_despite_a_shipped_auto_map(tmp_path, questions):
    """A folder that keeps an auto_map to processor code beside transformers' own processor class: transformers'
    class, as ``AutoProcessor.from_pretrained`` without trust_remote_code builds it; no question, no code run."""
    from transformers import AutoProcessor

    from qlora.model.image_processor import load_image_processor

    folder, _ = _image_model(tmp_path, "llava")
    _ship(folder, "processor_config.json", {"AutoProcessor": "processing_my.MyProcessor"},
          {"processing_my.py": "import transformers\nclass MyProcessor(transformers.LlavaProcessor):\n    pass\n"})
    model, tokenizer = qlora.load_model(folder, quant=None, compute_dtype=torch.float32, device="cpu")
    ours = load_image_processor(folder, model, tokenizer, "row 1")
    assert type(ours) is type(AutoProcessor.from_pretrained(folder, trust_remote_code=False))
    assert type(ours).__name__ == "LlavaProcessor"
    assert not (folder / _MARKER).exists() and not questions


def test_a_processor_transformers_implements_is_not_blamed_on_its_auto_map(tmp_path, questions):
    """Beside transformers' own LlavaProcessor, an auto_map to processor code the folder's classes do not name: a
    failure of the folder's own settings (an image processor class no one implements) is reported as transformers'
    error, not as shipped code whose way out (name LlavaProcessor) the folder already took."""
    from qlora.model.image_processor import load_image_processor

    folder, _ = _image_model(tmp_path, "llava")
    _ship(folder, "processor_config.json", {"AutoProcessor": "processing_my.MyProcessor"},
          {"processing_my.py": "raise SystemExit('shipped code ran')\n"})
    config = json.loads((folder / "processor_config.json").read_text())
    if "image_processor" in config:  # transformers 5 keeps it there, 4.x in preprocessor_config.json
        config["image_processor"]["image_processor_type"] = "NoSuchImageProcessor"
        (folder / "processor_config.json").write_text(json.dumps(config))
    else:
        images = json.loads((folder / "preprocessor_config.json").read_text())
        (folder / "preprocessor_config.json").write_text(json.dumps({**images,
                                                                     "image_processor_type": "NoSuchImageProcessor"}))
    model, tokenizer = qlora.load_model(folder, quant=None, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError) as err:
        load_image_processor(folder, model, tokenizer, "row 1")
    message = str(err.value)
    assert "processing_my.py" not in message and "auto_map" not in message and "image processor" in message
    assert not (folder / _MARKER).exists() and not questions


def test_shipped_image_processor_is_named_beside_transformers_own_processor(tmp_path, questions):
    """transformers' LlavaProcessor named (beside an auto_map) in processor_config.json, the image processor only
    the shipped code implements in preprocessor_config.json: refused naming that file and its code."""
    from qlora.model.image_processor import load_image_processor

    folder, _ = _image_model(tmp_path, "llava")
    _ship(folder, "processor_config.json", {"AutoProcessor": "processing_my.MyProcessor"},
          {"processing_my.py": "raise SystemExit('shipped code ran')\n"})
    config = json.loads((folder / "processor_config.json").read_text())
    if "image_processor" in config:  # transformers 5 keeps it there, 4.x in preprocessor_config.json already
        (folder / "preprocessor_config.json").write_text(json.dumps(config.pop("image_processor")))
        (folder / "processor_config.json").write_text(json.dumps(config))
    _ship(folder, "preprocessor_config.json", {"AutoImageProcessor": "image_processing_my.MyImageProcessor"},
          {"image_processing_my.py": "raise SystemExit('shipped code ran')\n"}, image_processor_type="MyImageProcessor")
    model, tokenizer = qlora.load_model(folder, quant=None, compute_dtype=torch.float32, device="cpu")
    with pytest.raises(UsageError) as err:
        load_image_processor(folder, model, tokenizer, "row 1")
    message = str(err.value)
    assert f"{folder / 'preprocessor_config.json'}: " in message and "image_processing_my.py" in message
    assert not (folder / _MARKER).exists() and not questions
