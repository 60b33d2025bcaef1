"""Hostile or careless input where cl3 used to end with "internal error" (exit 70, a bug) gets one clean `error:`
line naming what is wrong: checkpoint configs, adapter configs and hub listings. (Damaged GGUF metadata:
tests/test_fuzz_gguf.py.)"""

from __future__ import annotations

import json
import shutil

import pytest

from cl3.errors import InputError
from cl3.hub import download

from .conftest import one_line_error, run_cl3
from .test_hub import REPO, FakeHub, FakeModelScope


def checkpoint_with(tiny_llama3_dir, tmp_path, **config):
    path = tmp_path / "hf"
    shutil.copytree(tiny_llama3_dir, path)
    data = json.loads((path / "config.json").read_text()) | config
    (path / "config.json").write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("command", ["convert", "plan"])
def test_zero_attention_heads(tiny_llama3_dir, tmp_path, command):
    src = checkpoint_with(tiny_llama3_dir, tmp_path, num_attention_heads=0)
    args = [command, src] + (["-o", tmp_path / "out.gguf"] if command == "convert" else [])
    one_line_error(run_cl3(*args), "num_attention_heads is 0")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("command", ["convert", "plan"])
def test_architectures_given_as_a_string(tiny_llama3_dir, tmp_path, command):
    src = checkpoint_with(tiny_llama3_dir, tmp_path, architectures="LlamaForCausalLM")
    args = [command, src] + (["-o", tmp_path / "out.gguf"] if command == "convert" else [])
    line = one_line_error(run_cl3(*args), "architectures must be a list")
    assert "architecture L " not in line


def test_string_bos_token_id_in_config_is_not_an_internal_error(tiny_llama3_dir, tmp_path):
    """gguf-py skips a special token id that is not an integer; the tokenizer's own files still name BOS."""
    src = checkpoint_with(tiny_llama3_dir, tmp_path, bos_token_id="<|begin_of_text|>")
    proc = run_cl3("convert", src, "-o", tmp_path / "out.gguf", "-q")
    assert proc.returncode == 0, proc.stderr
    proc = run_cl3("info", tmp_path / "out.gguf", "--json")
    assert json.loads(proc.stdout)["tokenizer"]["bos_id"].startswith("1008 ")


class _MalformedModelScope(FakeModelScope):
    def __init__(self, listing):
        self.listing = listing
        super().__init__({})

    def route(self, h, head: bool) -> None:
        self.send_json(h, {"Code": 200, "Data": self.listing, "Success": True})


@pytest.mark.parametrize("listing", [{"Files": "model.safetensors"}, {"Files": [7]}, ["x"],
                                     {"Files": [{"Path": 7, "Size": 1}]}, {"Files": [{"Path": "a", "Size": "big"}]}],
                         ids=["files-string", "entry-int", "data-list", "path-int", "size-string"])
def test_malformed_modelscope_listing(tmp_path, monkeypatch, listing):
    server = _MalformedModelScope(listing)
    try:
        monkeypatch.setenv("MODELSCOPE_DOMAIN", server.url)
        with pytest.raises(InputError, match="malformed file listing"):
            download("LLM-Research/tiny", source="modelscope", cache_dir=tmp_path)
        one_line_error(run_cl3("download", "LLM-Research/tiny", "--source", "modelscope", "-o", tmp_path / "o", "-q"),
                       "malformed file listing")
    finally:
        server.close()


def test_hf_file_name_with_dot_dot(tmp_path, monkeypatch):
    server = FakeHub({"hfl/evil": dict(REPO) | {"sub/../../escape.safetensors": b"x" * 100}})
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        line = one_line_error(run_cl3("download", "hfl/evil", "-o", tmp_path / "out", "-q"), "leaves the download folder")
        assert "escape.safetensors" in line and "huggingface" not in line.lower()
        assert not list(tmp_path.rglob("escape.safetensors"))
    finally:
        server.close()
