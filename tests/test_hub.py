"""Hub names without a hub: a clear error in seconds (no minute of retries); with a hub, the probe says yes."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from qlora import hub
from qlora.errors import UsageError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_hub(monkeypatch):
    """A hub endpoint nobody listens on, offline mode off (conftest turns it on for the suite)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")


def _serve(status: int, delay: float = 0.0):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            time.sleep(delay)
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("status, delay, reachable", [(200, 0, True), (404, 0, True), (503, 0, False),
                                                      (200, 3, False)])
def test_probe_answers(monkeypatch, status, delay, reachable):
    server = _serve(status, delay)
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        start = time.perf_counter()
        assert hub.hub_reachable(timeout=1.0) is reachable
        assert time.perf_counter() - start < 2.0  # a hub that does not answer costs the timeout, no more
    finally:
        server.shutdown()


def test_model_names_fail_fast_without_a_hub(no_hub):
    from huggingface_hub import snapshot_download  # noqa: F401  (imports are not what is timed)
    from transformers import AutoConfig  # noqa: F401

    from qlora.model.estimate import load_config
    from qlora.model.load import resolve_model_dir

    start = time.perf_counter()
    # a hub id qlora estimate does not know offline (it knows meta-llama/Llama-3.1-8B: tests/test_known_shapes.py)
    with pytest.raises(UsageError, match=r"some-org/some-8B is not a local path, and the Hugging Face hub "
                                         r"\(http://127\.0\.0\.1:\d+\) is not reachable .* not in the local"
                                         r".*qlora estimate --list-models"):
        load_config("some-org/some-8B")
    with pytest.raises(UsageError, match=r"some/name is not a local path, .* pass a local model folder"):
        resolve_model_dir("some/name")
    assert time.perf_counter() - start < 5


def test_offline_mode_reads_the_cache_only_and_says_so(monkeypatch):
    from qlora.model.load import resolve_model_dir

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # never asked in offline mode
    assert hub.cache_only()
    with pytest.raises(UsageError, match=r"not in the Hugging Face cache, and offline mode is on"):
        resolve_model_dir("some/name")


def test_cli_exits_2_in_seconds(no_hub, capsys):
    from transformers import AutoConfig  # noqa: F401  (imports are not what is timed)

    from qlora.cli.main import main
    from qlora.model.estimate import load_config  # noqa: F401

    start = time.perf_counter()
    assert main(["estimate", "--model", "some-org/some-8B"]) == 2
    assert time.perf_counter() - start < 5
    assert "is not reachable" in capsys.readouterr().err


def _fake_hub(tmp_path, monkeypatch, repo: dict[str, str]):
    """``snapshot_download`` serving ``repo`` (name -> text) with its allow_patterns; returns the snapshot."""
    import fnmatch

    import huggingface_hub

    snapshot = tmp_path / "snapshot"

    def fake_download(repo_id, allow_patterns, local_files_only=False, **kwargs):
        for name, text in repo.items():
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
                (snapshot / name).write_text(text)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setattr(hub, "cache_only", lambda: False)
    return snapshot


def _fetched(snapshot) -> list[str]:
    return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())


def test_a_hub_model_brings_its_chat_template_file_and_only_the_weights_it_names(tmp_path, monkeypatch):
    """Repos keep chat templates in chat_template.jinja, and some a second copy of the weights in
    another layout (Mistral's consolidated.safetensors): fetch the first, never the second."""
    import json

    from qlora.model.load import resolve_model_dir

    repo = {"config.json": "{}", "tokenizer.json": "{}", "chat_template.jinja": "{{ messages }}",
            "additional_chat_templates/tool_use.jinja": "{{ tools }}", "tokenizer.model": "",
            "model.safetensors.index.json": json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                                       "b": "model-00002-of-00002.safetensors"}}),
            "model-00001-of-00002.safetensors": "", "model-00002-of-00002.safetensors": "",
            "consolidated.safetensors": "", "original/consolidated.00.pth": "", "pytorch_model.bin": ""}
    snapshot = _fake_hub(tmp_path, monkeypatch, repo)
    assert resolve_model_dir("org/model") == snapshot
    assert _fetched(snapshot) == sorted(set(repo) - {"consolidated.safetensors", "original/consolidated.00.pth",
                                                     "pytorch_model.bin"})


@pytest.mark.parametrize("sharded", [False, True])
def test_a_hub_model_without_safetensors_brings_its_pickled_weights(tmp_path, monkeypatch, sharded):
    import json

    from qlora.model.load import resolve_model_dir

    repo = {"config.json": "{}", "tokenizer.json": "{}", "consolidated.00.pth": ""}
    if sharded:
        repo |= {"pytorch_model.bin.index.json": json.dumps({"weight_map": {"a": "pytorch_model-1.bin",
                                                                            "b": "pytorch_model-2.bin"}}),
                 "pytorch_model-1.bin": "", "pytorch_model-2.bin": ""}
    else:
        repo |= {"pytorch_model.bin": ""}
    snapshot = _fake_hub(tmp_path, monkeypatch, repo)
    assert resolve_model_dir("org/model") == snapshot
    assert _fetched(snapshot) == sorted(set(repo) - {"consolidated.00.pth"})


def test_estimate_checks_a_cached_hub_config_as_a_local_one(tmp_path, monkeypatch, capsys):
    """A hub id read from the cache goes through the same checks as a local config.json: MusicGen (a text
    encoder conditioning a decoder of audio codes) exits 2 with the reason, not a traceback."""
    from transformers import AutoConfig

    from qlora.cli.main import main

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--music" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--org--music" / "refs").mkdir()
    (cache / "models--org--music" / "refs" / "main").write_text("0" * 40)
    # its three parts named (transformers 4.x has no defaults for them; 5's are these)
    AutoConfig.for_model("musicgen", text_encoder={"model_type": "t5"}, audio_encoder={"model_type": "encodec"},
                         decoder={"model_type": "musicgen_decoder"}).save_pretrained(snapshot)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import, from the env
    import transformers.utils.hub

    if hasattr(transformers.utils.hub, "TRANSFORMERS_CACHE"):  # transformers 4.x's own copy, also read at import
        monkeypatch.setattr(transformers.utils.hub, "TRANSFORMERS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["estimate", "--model", "org/music"]) == 2
    err = capsys.readouterr().err
    assert "org/music" in err and "several models with text configs" in err and "Traceback" not in err


def test_a_mistyped_local_path_that_reads_as_a_hub_id_names_what_is_there(no_hub, tmp_path, monkeypatch):
    """``runs/sfy`` for ``runs/sft``: one ``/``, so a hub id to the loader; the refusal says that ``runs`` is a
    folder here and names the close entry in it, without a hub, offline, and for data files and datasets alike."""
    from qlora.model.load import resolve_model_dir
    from qlora.train.data.sources import load_records

    (tmp_path / "runs" / "sft").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "hi"}\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=rf"not reachable.*Here, {tmp_path / 'runs'} is a folder: did you mean "
                                         rf"{tmp_path / 'runs' / 'sft'}\?$"):
        resolve_model_dir("runs/sfy")
    with pytest.raises(UsageError, match=rf"data/trian.jsonl: data file not found.*did you mean "
                                         rf"{tmp_path / 'data' / 'train.jsonl'}\?$"):
        load_records("data/trian.jsonl")
    with pytest.raises(UsageError, match=rf"not reachable.*Here, {tmp_path / 'data'} is a folder, without "
                                         r"trian\.$"):
        load_records("data/trian")
    from qlora.model.estimate import load_config

    with pytest.raises(UsageError, match=r"not reachable.*did you mean .*runs/sft\?$"):
        load_config("runs/sfy")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match=r"offline mode is on.*did you mean .*runs/sft\?$"):
        resolve_model_dir("runs/sfy")
    with pytest.raises(UsageError) as bare:  # a bare name (gpt2) may be a hub id: nothing local is suggested
        resolve_model_dir("runz")
    assert "Here," not in str(bare.value)


def test_a_hub_refusal_is_one_paragraph(tmp_path, monkeypatch):
    """huggingface_hub's RepositoryNotFoundError spans several lines; the error the user reads is one paragraph."""
    import huggingface_hub

    from qlora.model.load import resolve_model_dir

    def not_found(repo_id, **kwargs):
        raise OSError("404 Client Error.\n\nRepository Not Found for url: x.\nPlease make sure ...")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    monkeypatch.setattr(hub, "cache_only", lambda: False)
    with pytest.raises(UsageError) as refused:
        resolve_model_dir("org/model")
    assert "\n" not in str(refused.value) and "404 Client Error. Repository Not Found for url: x." in str(refused.value)
