"""``qlora demo`` end to end, in-process: QLoRA training must measurably teach the model the answers."""

from __future__ import annotations

import ast
import json
import os
import re
import stat

from qlora.cli.main import main


def _counts(text: str, who: str) -> tuple[int, int, int]:
    m = re.search(rf"^{who}:\s+(\d+)/(\d+) answers correct \((\d+)/\d+ over all training questions\)", text, re.M)
    assert m, f"no {who!r} summary line in the demo output:\n{text}"
    return int(m[1]), int(m[2]), int(m[3])


def test_demo_adapter_beats_the_base(capsys, tmp_path):
    out = tmp_path / "run"
    assert main(["demo", "--steps", "200", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    base, asked, base_all = _counts(text, re.escape("base model (adapter disabled)"))
    tuned, _, tuned_all = _counts(text, "QLoRA adapter")
    assert asked >= 3
    assert tuned > base and tuned_all > base_all, text
    assert tuned >= asked - 1, text  # not just a lucky answer: training worked
    first, last = map(float, re.search(r"loss: first step ([\d.]+) -> last step ([\d.]+)", text).groups())
    assert last < first / 5, text
    # --output keeps what the other commands need: the base and the adapter, both listed as qlora's
    assert json.loads((out / ".qlora-output.json").read_text())["entries"] == ["adapter", "model"]
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.relative_to(out): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o666 & ~umask}, modes  # safetensors alone writes 0600, unreadable to others
    question = "What is the capital of Peru?"
    shown = ast.literal_eval(re.findall(rf"Q: {re.escape(question)}\n  A: (.*?)  (?:correct|wrong)", text)[-1])
    assert main(["generate", "--model", str(out / "model"), "--adapter", str(out / "adapter"), "--temperature", "0",
                 "--compute-dtype", "fp32", "--max-new-tokens", "12", "--prompt", question]) == 0
    assert capsys.readouterr().out == shown + "\n"
    # several adapters in one batch: each row stops at the chat format's end of turn, as one adapter alone
    assert main(["generate", "--model", str(out / "model"), "--adapter", f"a={out / 'adapter'}", "--adapter",
                 f"b={out / 'adapter'}", "--temperature", "0", "--compute-dtype", "fp32", "--max-new-tokens", "12",
                 "--prompt", question]) == 0
    assert capsys.readouterr().out == f"[a] {shown}\n[b] {shown}\n"


def test_demo_without_output_says_how_to_keep_its_model_and_prints_only_its_own_lines(capsys):
    """A first run ends saying what to do next (the model and adapter were temporary), and transformers' "Writing
    model shards" bar, drawn for the tiny model's save, does not break into the demo's output."""
    assert main(["demo", "--steps", "2"]) == 0
    out, err = capsys.readouterr()
    assert "Writing model shards" not in err, err
    last = out.rstrip("\n").splitlines()[-1]
    assert "qlora demo --output DIR" in last and "qlora generate --model DIR/model --adapter DIR/adapter" in last, out
