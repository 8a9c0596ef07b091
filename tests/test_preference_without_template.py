"""DPO and KTO on a model whose tokenizer has no chat template (a base model): ``--template auto`` renders their
conversational rows in the built-in format SFT would use, saying so, as SFT does.

Oracle: the SFT trainer's choice of format on the same model and the same conversation.
"""

from __future__ import annotations

import json
import shutil

import pytest

from qlora.train.config import load_config
from qlora.train.trainer import Trainer

ASK, GOOD, BAD = [{"role": "user", "content": "hi"}], [{"role": "assistant", "content": "hello"}], \
    [{"role": "assistant", "content": "go away"}]
ROWS = {"sft": [{"messages": ASK + GOOD}],
        "dpo": [{"prompt": ASK, "chosen": GOOD, "rejected": BAD}],
        "kto": [{"prompt": ASK, "completion": GOOD, "label": True}, {"prompt": ASK, "completion": BAD, "label": False}]}


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory, tiny_model_dir):
    """``tiny_model_dir`` without a chat template."""
    out = tmp_path_factory.mktemp("no-template") / "model"
    shutil.copytree(tiny_model_dir, out)
    for template in out.glob("*.jinja"):
        template.unlink()
    config = out / "tokenizer_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "chat_template"}))
    return out


def _setup(model_dir, tmp_path, method: str) -> Trainer:
    data = tmp_path / f"{method}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[method]))
    trainer = Trainer(load_config(None, dict(model=str(model_dir), data=str(data), output=str(tmp_path / method),
                                             method=method, max_steps=1, batch_size=len(ROWS[method]), quant="none",
                                             precision="fp32", progress=False, overwrite=True)))
    trainer.setup()
    return trainer


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_preference_rows_take_the_built_in_format_sft_takes(base_model_dir, tmp_path, method, capsys):
    sft = _setup(base_model_dir, tmp_path, "sft")
    note = [line for line in capsys.readouterr().out.splitlines() if "has no chat_template" in line]
    assert sft.template_fallback and len(note) == 1
    trainer = _setup(base_model_dir, tmp_path, method)
    assert trainer.template_fallback and trainer.chat_format == sft.chat_format
    assert [line for line in capsys.readouterr().out.splitlines() if "has no chat_template" in line] == note
