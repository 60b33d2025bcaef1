"""Damaged GGUF metadata never takes cl3 down: every command that reads a GGUF (info, info --check, quantize, ppl,
chat) either works or says what is wrong in one `error:` line, never dies inside llama.cpp or ggml (a signal) and
never ends as an "internal error" (exit 70); a quantize that succeeds writes a file llama.cpp loads.

The variants start from the real tiny Llama-3 GGUF, rewritten by tests/gguf_edit.py (an independent reader/writer),
and each command runs in its own forked process (tests/fork_runner.py), so a crash is seen, not suffered.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from . import gguf_edit as ge

ROOT = Path(__file__).resolve().parent.parent
TOKENS, TOKEN_TYPE, MERGES = b"tokenizer.ggml.tokens", b"tokenizer.ggml.token_type", b"tokenizer.ggml.merges"
N_RANDOM = 20  # variants; 4 commands each in forked children, the whole file runs well under a minute
TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def run_jobs(jobs: list[list[str]]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "tests.fork_runner"], input=json.dumps(jobs), capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def command(kind: str, model: Path, work: Path) -> list[str]:
    text = work / "text.txt"
    if not text.exists():
        text.write_text(TEXT, encoding="utf-8")
    return {
        "info": ["info", str(model)],
        "check": ["info", "--check", str(model)],
        "quantize": ["quantize", str(model), "Q8_0", "-o", str(work / f"{model.stem}-Q8_0.gguf"), "-q", "--force"],
        "ppl": ["ppl", str(model), "-f", str(text), "-c", "64", "--chunks", "1", "-q", "-t", "1"],
        "chat": ["chat", str(model), "-p", "hi", "-n", "2", "-c", "128", "--seed", "1", "-t", "1"],
    }[kind]


def check_outcome(label: str, result: dict) -> None:
    """A clean outcome: no signal, no internal error, and a failure says one `error:` line."""
    code, stderr = result["returncode"], result["stderr"]
    assert code >= 0, f"{label}: killed by signal {-code}\n{stderr[-2000:]}"
    assert code != 70, f"{label}: internal error\n{stderr}"
    assert code != 99, f"{label}: {stderr}"
    if code not in (0, 1) or (code == 1 and "error:" in stderr):
        lines = stderr.rstrip("\n").splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), f"{label}: exit {code}\n{stderr}"


def run_and_check(cases: list[tuple[str, Path, str]], work: Path) -> list[dict]:
    """Run each (label, model, command kind); for each quantize that succeeds, also load its output with llama.cpp."""
    jobs = [command(kind, model, work) for _, model, kind in cases]
    results = run_jobs(jobs)
    if os.environ.get("CL3_FUZZ_TIMES"):
        for job, r in zip(jobs, results):
            print(f"{r['seconds']:.2f}s rc={r['returncode']} {' '.join(job[:3])}")
    loads = []
    for (label, _, kind), job, result in zip(cases, jobs, results):
        check_outcome(f"{label} {kind}", result)
        if kind == "quantize" and result["returncode"] == 0:
            loads.append((label, job[4]))
    outs = run_jobs([["--load", out] for _, out in loads]) if loads else []
    for (label, _), result in zip(loads, outs):
        assert result["returncode"] == 0, (f"{label}: quantize exited 0 but llama.cpp cannot load its output\n"
                                           f"{result['stderr'][-2000:]}")
    return results


# --- the variants the issue names -------------------------------------------------------------------------------

def tokens_as_int32(g: ge.Gguf) -> None:
    kv = g.kv(TOKENS.decode())
    kv.sub_type, kv.value = ge.INT32, list(range(len(kv.value)))


def token_type_longer(g: ge.Gguf) -> None:
    g.kv(TOKEN_TYPE.decode()).value += [3] * 50  # CONTROL: cl3 looks their texts up


def block_count_1000(g: ge.Gguf) -> None:
    g.kv("llama.block_count").value = 1000


NAMED = {"tokens_int32": tokens_as_int32, "token_type_longer": token_type_longer, "block_count_1000": block_count_1000}
ISSUE_CRASHES = [("tokens_int32", kind) for kind in ("info", "check", "quantize", "chat")] + \
                [("token_type_longer", kind) for kind in ("info", "check", "quantize", "chat")] + \
                [("block_count_1000", kind) for kind in ("quantize", "ppl", "chat")]


def make_variant(source: Path, directory: Path, name: str, edit) -> Path:
    g = ge.read(source)
    edit(g)
    return ge.write(g, directory / f"{name}.gguf")


def rename(g: ge.Gguf, old: bytes, new: bytes) -> None:
    for item in (*g.kvs, *g.tensors):
        if item.name == old:
            item.name = new


def set_kv(key: str, kind: int, value, sub_type: int | None = None):
    def edit(g: ge.Gguf) -> None:
        g.remove(key)
        g.kvs.append(ge.KV(key.encode(), kind, value, sub_type))
    return edit


# damage the brief names beyond the issue's three (each must end cleanly too)
MORE = {
    "key_not_utf8": lambda g: rename(g, b"general.name", b"general.\xff\xfeame"),
    "tensor_not_utf8": lambda g: rename(g, b"output_norm.weight", b"output_norm.\xc3\x28eight"),
    "scores_short": set_kv("tokenizer.ggml.scores", ge.ARRAY, [0.0] * 10, ge.FLOAT32),
    "token_type_float": lambda g: setattr(g.kv(TOKEN_TYPE.decode()), "sub_type", ge.FLOAT32),
    "merges_int": set_kv("tokenizer.ggml.merges", ge.ARRAY, [1, 2, 3], ge.INT32),
    "bos_as_string": set_kv("tokenizer.ggml.bos_token_id", ge.STRING, b"<s>"),
    "block_count_1": set_kv("llama.block_count", ge.UINT32, 1),
    "block_count_0": set_kv("llama.block_count", ge.UINT32, 0),
    "head_count_0": set_kv("llama.attention.head_count", ge.UINT32, 0),
    "head_count_kv_0": set_kv("llama.attention.head_count_kv", ge.UINT32, 0),
    "head_count_3": set_kv("llama.attention.head_count", ge.UINT32, 3),
    "context_length_0": set_kv("llama.context_length", ge.UINT32, 0),
    "rms_epsilon_negative": set_kv("llama.attention.layer_norm_rms_epsilon", ge.FLOAT32, -1.0),  # ppl: SIGABRT
    "embedding_length_128": set_kv("llama.embedding_length", ge.UINT32, 128),
    "rope_scaling_bogus": set_kv("llama.rope.scaling.type", ge.STRING, b"bogus"),
    "expert_count_huge": set_kv("llama.expert_count", ge.UINT32, 100000),
    "name_as_int": set_kv("general.name", ge.INT32, 7),
    "architecture_array": set_kv("general.architecture", ge.ARRAY, [b"llama"], ge.STRING),
    "tokens_missing": lambda g: g.remove("tokenizer.ggml.tokens"),
}


# damage llama.cpp tolerates (it warns and ignores the id): cl3 works with it too
TOLERATED = {"pad_out_of_vocab": set_kv("tokenizer.ggml.padding_token_id", ge.UINT32, 1024),
             "eos_out_of_vocab": set_kv("tokenizer.ggml.eos_token_id", ge.UINT32, 5000)}

# the issue's "internal error" cases (item 9) go through every command it names
MORE_COMMANDS = {name: ("info", "check", "quantize", "ppl") for name in ("key_not_utf8", "tensor_not_utf8",
                                                                         "bos_as_string", "rms_epsilon_negative")}


def random_variant(rng: random.Random, source: bytes, header_end: int):
    """One seeded damage: header bytes, a key's type, an array's length, a count, a tensor's shape or type."""
    g = ge.read_bytes(source)
    how = rng.choice(["bytes", "kv_type", "array_len", "count", "tensor", "hparam"])
    if how == "bytes":
        data = bytearray(source)
        for _ in range(rng.choice([1, 2, 4, 8])):
            data[rng.randrange(4, header_end)] = rng.randrange(256)
        return how, bytes(data)
    if how == "kv_type":
        kv = rng.choice(g.kvs)
        kind = rng.choice([ge.UINT8, ge.INT32, ge.FLOAT32, ge.BOOL, ge.STRING, ge.UINT64, ge.ARRAY])
        kv.type, kv.sub_type, kv.value = kind, (ge.INT32 if kind == ge.ARRAY else None), {
            ge.UINT8: 3, ge.INT32: -1, ge.FLOAT32: 1.5, ge.BOOL: True, ge.STRING: b"x", ge.UINT64: 2**40,
            ge.ARRAY: [1, 2]}[kind]
    elif how == "array_len":
        kv = rng.choice([kv for kv in g.kvs if kv.type == ge.ARRAY])
        kv.value = kv.value[:rng.randrange(len(kv.value))] if rng.random() < 0.5 else kv.value + kv.value[:rng.randrange(1, 60)]
    elif how == "count":
        if rng.random() < 0.5:
            g.n_kv_override = len(g.kvs) + rng.choice([-2, -1, 1, 1000])
        else:
            g.n_tensors_override = len(g.tensors) + rng.choice([-1, 1, 2**40])
    elif how == "tensor":
        t = rng.choice(g.tensors)
        change = rng.choice(["ne", "type", "offset", "dims"])
        if change == "ne":
            t.ne[rng.randrange(len(t.ne))] = rng.choice([0, 1, 3, 128, 512, 2**40])
        elif change == "type":
            t.type = rng.choice([0, 1, 2, 4, 8, 12, 30, 39, 200])
        elif change == "offset":
            t.offset = rng.choice([1, 64, 2**20, 2**62])
        else:
            t.ne = t.ne + [1, 1, 1, 1]
    else:
        kv = rng.choice([kv for kv in g.kvs if kv.name.startswith(b"llama.") and kv.type in (ge.UINT32, ge.FLOAT32)])
        kv.value = rng.choice([0, 1, 3, 7, 1000, 2**31 - 1]) if kv.type == ge.UINT32 else rng.choice([0.0, -1.0, 1e30])
    return how, ge.dumps(g)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def named_results(tiny_llama3_gguf_f16, work):
    """The issue's crash cases and the brief's other damage, each command once, in one forked batch."""
    edits = {**NAMED, **MORE, **TOLERATED}
    models = {name: make_variant(tiny_llama3_gguf_f16, work, name, edit) for name, edit in edits.items()}
    cases = [(v, models[v], kind) for v, kind in ISSUE_CRASHES] + \
            [(name, models[name], kind) for name in [*MORE, *TOLERATED]
             for kind in MORE_COMMANDS.get(name, ("info", "quantize"))]
    return {(label, kind): result for (label, _, kind), result in zip(cases, run_and_check(cases, work))}


@pytest.mark.parametrize(("variant", "kind"), ISSUE_CRASHES, ids=[f"{v}-{k}" for v, k in ISSUE_CRASHES])
def test_issue_crash_cases_end_in_one_error_line(named_results, variant, kind):
    result = named_results[variant, kind]
    check_outcome(f"{variant} {kind}", result)
    assert result["returncode"] != 0, f"{variant} {kind} accepted a damaged file"
    assert "error:" in result["stderr"]


@pytest.mark.parametrize("variant", list(MORE))
def test_damaged_metadata_is_refused_cleanly(named_results, variant):
    for kind in MORE_COMMANDS.get(variant, ("info", "quantize")):
        result = named_results[variant, kind]
        check_outcome(f"{variant} {kind}", result)
        assert result["returncode"] != 0 and "error:" in result["stderr"], f"{variant} {kind}: {result}"


@pytest.mark.parametrize("variant", list(TOLERATED))
def test_tolerated_damage_still_works(named_results, variant):
    for kind in ("info", "quantize"):
        assert named_results[variant, kind]["returncode"] == 0, named_results[variant, kind]["stderr"]


def test_seeded_fuzz_never_crashes(tiny_llama3_gguf_f16, work):
    """Seeded random damage (header bytes, key types, array lengths, counts, tensor entries, hyper-parameters): every
    command ends cleanly, and a quantize that succeeds writes a file llama.cpp loads. Variants `info` refuses only
    get `quantize` too (they share the header check); the others get every command."""
    source = tiny_llama3_gguf_f16.read_bytes()
    header_end = len(source) - len(ge.read_bytes(source).data)
    rng = random.Random(20)
    variants = []
    for i in range(N_RANDOM):
        how, data = random_variant(rng, source, header_end)
        path = work / f"random-{i:02d}-{how}.gguf"
        path.write_bytes(data)
        variants.append(path)
    first = run_and_check([(p.stem, p, "info") for p in variants], work)
    run_and_check([(p.stem, p, kind) for p, r in zip(variants, first)
                   for kind in (("check", "quantize", "ppl") if r["returncode"] == 0 else ("quantize",))], work)
