"""What a newcomer meets first on the command line: outputs named as folders, no silent overwrites, the same errors
for the same bad input in every command, llama.cpp's option vocabulary, and metadata read without the token lists."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest

from cl3.metadata import read_metadata

from .conftest import one_line_error, run_cl3


@pytest.fixture
def model(tiny_llama3_gguf_f16, tmp_path):
    path = tmp_path / "src" / "tiny-F16.gguf"
    path.parent.mkdir()
    shutil.copy(tiny_llama3_gguf_f16, path)
    return path


# ------------------------------------------------------------------------------------------ -o NEW/ is a folder

def test_trailing_slash_makes_a_folder_everywhere(model, tiny_llama3_dir, tmp_path):
    out = tmp_path / "new"
    assert run_cl3("convert", tiny_llama3_dir, "-o", f"{out}/convert/", "--outtype", "f16", "-q").returncode == 0
    [converted] = (out / "convert").iterdir()
    assert converted.name.endswith("-F16.gguf") and read_metadata(converted).n_params > 0

    proc = run_cl3("quantize", model, "Q8_0", "Q4_0", "-o", f"{out}/quant/", "-q")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name[-10:] for p in (out / "quant").iterdir()) == ["-Q4_0.gguf", "-Q8_0.gguf"]

    proc = run_cl3("imatrix", model, "-c", "64", "--chunks", "2", "-o", f"{out}/im/", "-q")
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in (out / "im").iterdir()] == ["tiny-F16.imatrix.gguf"]

    proc = run_cl3("export", "ollama", model, "-o", f"{out}/ollama/")
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in (out / "ollama").iterdir()] == ["tiny-F16.Modelfile"]


def test_a_file_name_without_slash_stays_a_file(model, tmp_path):
    proc = run_cl3("quantize", model, "Q8_0", "-o", tmp_path / "plain-name", "-q")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "plain-name").is_file()
    one_line_error(run_cl3("quantize", model, "Q8_0", "Q4_0", "-o", tmp_path / "one-file", "-q"), "not a folder")


# -------------------------------------------------------------------------------------------- no silent overwrites

def test_outputs_are_never_replaced_without_force(model, tmp_path):
    out = tmp_path / "out"
    first = run_cl3("quantize", model, "Q4_0", "-o", f"{out}/", "-q")
    assert first.returncode == 0, first.stderr
    [plain] = out.iterdir()
    before = plain.stat().st_mtime_ns
    one_line_error(run_cl3("quantize", model, "Q4_0", "-o", f"{out}/", "-q"), "already exists (use --force")
    assert plain.stat().st_mtime_ns == before
    assert run_cl3("quantize", model, "Q4_0", "-o", f"{out}/", "-q", "--force").returncode == 0
    assert plain.stat().st_mtime_ns != before

    # with an imatrix the default name differs (-im), so the plain file is not replaced
    im = tmp_path / "m.imatrix.gguf"
    assert run_cl3("imatrix", model, "-c", "64", "--chunks", "2", "-o", im, "-q").returncode == 0
    one_line_error(run_cl3("imatrix", model, "-c", "64", "--chunks", "2", "-o", im, "-q"), "already exists")
    proc = run_cl3("quantize", model, "Q4_0", "--imatrix", im, "-o", f"{out}/", "-q")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == {plain.name, plain.name.replace(".gguf", "-im.gguf")}

    # one Modelfile per GGUF; the same one again needs --force
    for path in out.iterdir():
        assert run_cl3("export", "ollama", path, "-o", tmp_path / "ollama").returncode == 0
    assert len(list((tmp_path / "ollama").glob("*.Modelfile"))) == 2
    one_line_error(run_cl3("export", "ollama", plain, "-o", tmp_path / "ollama"), "already exists")

    lms = tmp_path / "lms"
    assert run_cl3("export", "lmstudio", plain, "--models-dir", lms).returncode == 0
    one_line_error(run_cl3("export", "lmstudio", plain, "--models-dir", lms), "already exists")
    assert run_cl3("export", "lmstudio", plain, "--models-dir", lms, "--force").returncode == 0


def test_convert_refuses_to_replace_a_file(tiny_llama3_dir, tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"precious")
    one_line_error(run_cl3("convert", tiny_llama3_dir, "-o", target, "-q"), "already exists")
    assert target.read_bytes() == b"precious"


# ------------------------------------------------------------------------------ the same errors for the same input

@pytest.mark.parametrize("command", [["info"], ["chat", "-p", "hi"], ["speed"], ["ppl"], ["imatrix"],
                                     ["quantize", "--type", "Q8_0"], ["export", "ollama"]])
def test_bad_model_files_give_the_same_line_in_every_command(command, tiny_llama3_gguf, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_llama3_gguf.read_bytes()[: tiny_llama3_gguf.stat().st_size // 2])
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    cases = {tmp_path / "missing.gguf": "no such GGUF file", tmp_path: "is a directory, not a GGUF file",
             notes: "is not a GGUF file", truncated: "is truncated"}
    for path, message in cases.items():
        args = [*command[:2], path, *command[2:]] if command[0] == "export" else [command[0], path, *command[1:]]
        one_line_error(run_cl3(*args), message)


def test_usage_errors_are_one_error_line():
    one_line_error(run_cl3("quantize", "m.gguf", "--no-such-option"), "No such option")
    one_line_error(run_cl3("ppl", "m.gguf", "-c", "many"), "--ctx-size")


# ---------------------------------------------------------------------------------- llama.cpp's option vocabulary

def test_quantize_takes_types_like_llama_quantize(model, tmp_path):
    proc = run_cl3("quantize", model, "q8_0", "--type", "Q4_K", "-o", tmp_path, "-t", "1", "-q")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name.rsplit("-", 1)[-1] for p in tmp_path.glob("*.gguf")) == ["Q4_K_M.gguf", "Q8_0.gguf"]


def test_requantizing_needs_to_be_asked_for(model, tmp_path):
    q8 = tmp_path / "q8.gguf"
    assert run_cl3("quantize", model, "Q8_0", "-o", q8, "-q").returncode == 0
    one_line_error(run_cl3("quantize", q8, "Q4_0", "-o", tmp_path / "q4.gguf", "-q"), "--allow-requantize")
    proc = run_cl3("quantize", q8, "Q4_0", "-o", tmp_path / "q4.gguf", "--allow-requantize", "-q")
    assert proc.returncode == 0, proc.stderr
    assert read_metadata(tmp_path / "q4.gguf").file_type_name == "Q4_0"


# ------------------------------------------------------------------------ metadata without the token lists (128k)

@pytest.fixture(scope="module")
def big_vocab_gguf(tmp_path_factory):
    """A weight-less GGUF with Llama-3's vocabulary size: 128,256 tokens and 280,147 merges."""
    path = tmp_path_factory.mktemp("vocab") / "llama3-vocab.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("Big-Vocab")
    w.add_context_length(8192)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    tokens = [f"tok{i}" for i in range(128_000)] + [f"<|reserved_special_token_{i}|>" for i in range(256)]
    tokens[128_000] = "<|begin_of_text|>"
    tokens[128_009] = "<|eot_id|>"
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * 128_000 + [gguf.TokenType.CONTROL] * 256)
    w.add_token_merges([f"t{i} k{i}" for i in range(280_147)])
    w.add_bos_token_id(128_000)
    w.add_eos_token_id(128_009)
    w.add_eot_token_id(128_009)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_info_reads_a_llama3_size_vocabulary_exactly(big_vocab_gguf):
    proc = run_cl3("info", big_vocab_gguf, "--json")
    assert proc.returncode == 0, proc.stderr
    tok = json.loads(proc.stdout)["tokenizer"]
    assert tok["tokens"] == 128_256 and tok["merges"] == 280_147 and tok["pre"] == "llama-bpe"
    assert tok["bos_id"] == "128000 '<|begin_of_text|>'" and tok["eot_id"] == "128009 '<|eot_id|>'"
    meta = read_metadata(big_vocab_gguf)
    assert len(meta.control_tokens) == 256 and "<|eot_id|>" in meta.control_tokens
    assert meta.token_texts()[:2] == ["tok0", "tok1"] and len(meta.token_texts()) == 128_256
