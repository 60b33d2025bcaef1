"""`cl3 quantize --target-size`: per-tensor mixes against independent references: brute-force allocation, the bytes
llama-quantize writes, files llama.cpp quantizes itself, exact file sizes, llama-perplexity's KL divergence on
held-out text, and byte-identical reproduction by stock llama-quantize."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import gguf
import numpy as np
import pytest

from cl3 import llama, measure, mix
from cl3.calibration import evaluation_text
from cl3.imatrix import read_imatrix
from cl3.quantize import quantize

from .conftest import one_line_error, run_cl3
from .test_measure import _run_tool

TARGETS = ["Q2_K", "Q3_K_M", "Q4_K_M"]


def test_target_sizes_read_like_people_write_them():
    assert mix.Target.size("4.58GiB").size_bytes == int(4.58 * 2**30)
    assert mix.Target.size("4.9GB").size_bytes == int(4.9e9)
    assert mix.Target.size("600 MiB").size_bytes == 600 * 2**20
    assert mix.Target.size("123456").size_bytes == 123456
    assert mix.Target.bits(4.89).bpw == 4.89
    for bad in ("4.58 parsecs", "GiB", "-1GB", "0"):
        with pytest.raises(mix.UsageError):
            mix.Target.size(bad)


def test_allocation_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n_groups, n_opts = rng.integers(2, 5), rng.integers(2, 5)
        options = {f"t{g}": [(f"x{i}", int(c), float(k)) for i, (c, k) in enumerate(
            zip(rng.integers(1, 40, n_opts) * 32, rng.exponential(1.0, n_opts)))] for g in range(n_groups)}
        budget = int(rng.integers(1, 40 * n_groups)) * 32
        feasible = [(sum(o[2] for o in combo), combo) for combo in itertools.product(*options.values())
                    if sum(o[1] for o in combo) <= budget]
        if not feasible:
            with pytest.raises(mix.TargetTooSmall):
                mix.allocate(options, budget)
            continue
        best = min(k for k, _ in feasible)
        choice = mix.allocate(options, budget)
        by = {n: {t: (c, k) for t, c, k in o} for n, o in options.items()}
        assert sum(by[n][t][0] for n, t in choice.items()) <= budget
        assert sum(by[n][t][1] for n, t in choice.items()) == pytest.approx(best, rel=1e-12), trial
    # a budget too fine for exact steps: rounded, still within budget, and what rounding left is spent
    big = {f"t{g}": [("a", 1000 + g, 1.0), ("b", 5000 + 7 * g, 0.1)] for g in range(50)}
    budget = 5000 * 25 + 1000 * 25 + 2000
    exact, coarse = mix.allocate(big, budget), mix.allocate(big, budget, max_units=100)
    cost = {n: {t: (c, k) for t, c, k in o} for n, o in big.items()}
    for choice in (exact, coarse):
        assert sum(cost[n][t][0] for n, t in choice.items()) <= budget
    assert list(exact.values()).count("b") == 24  # b for t0..t23 and a for the rest is the best that fits
    assert list(coarse.values()).count("b") >= 23


def test_round_trip_bytes_are_llama_quantize_bytes(tiny_llama3_gguf, tmp_path):
    """cl3.llama.quantize_rows with an imatrix makes the very bytes llama.cpp's quantizer writes, so a measured
    sensitivity is the sensitivity of the real file."""
    rng = np.random.default_rng(1)
    with llama.GgufFile(tiny_llama3_gguf) as f:
        infos = {t.name: t for t in f.tensors}
    name = "blk.1.ffn_down.weight"
    weights = {name: rng.uniform(0.1, 5.0, infos[name].ne[0]).astype(np.float32)}
    out = tmp_path / "q.gguf"
    for type_name in ("Q3_K", "IQ2_XS", "IQ4_XS"):
        t = llama.ggml_type_by_name(type_name)
        llama.quantize_file(tiny_llama3_gguf, out, llama.file_types()["Q8_0"].ftype, imatrix=weights,
                            tensor_types=[(mix.pattern(name), t)])
        written = next(x for x in gguf.GGUFReader(out).tensors if x.name == name)
        source = next(x for x in gguf.GGUFReader(tiny_llama3_gguf).tensors if x.name == name)
        rows = np.asarray(source.data, dtype=np.float32).reshape(-1, infos[name].ne[0])
        assert np.array_equal(llama.quantize_rows(t, rows, weights[name]), np.asarray(written.data).reshape(-1)
                              .view(np.uint8)), type_name


@pytest.fixture(scope="module")
def demo_sensitivity(trained_demo, tmp_path_factory):
    """Seed 1's sensitivity in the anchors mode (every tensor measured at Q2_K/Q4_K/Q6_K), cached like a user's."""
    f16, imatrix = trained_demo(1)
    im = read_imatrix(imatrix).importances()
    return mix.sensitivity(f16, importances=im, imatrix_name=str(imatrix), mode="anchors", chunks=4, threads=2)


@pytest.mark.slow
def test_a_measurement_scores_the_source_with_one_tensor_quantized(trained_demo, demo_sensitivity, tmp_path):
    """What is measured is llama.cpp's file with that tensor alone in that type (the bytes ggml's round trip makes),
    every other tensor byte-identical to the F16 source."""
    f16, imatrix = trained_demo(1)
    sens = demo_sensitivity
    im = read_imatrix(imatrix).importances()
    name = "blk.0.ffn_gate.weight"
    out = tmp_path / "one.gguf"
    mix._one_tensor_model(f16, out, mix._Tensors(f16), name, "Q4_K", im, 2)
    source = {t.name: t for t in gguf.GGUFReader(f16).tensors}
    for t in gguf.GGUFReader(out).tensors:
        if t.name != name:
            assert t.tensor_type == source[t.name].tensor_type and bytes(t.data) == bytes(source[t.name].data)
        else:
            assert t.tensor_type.name == "Q4_K"
            rows = np.asarray(source[name].data, dtype=np.float32).reshape(-1, t.shape[0])
            assert bytes(t.data) == llama.quantize_rows(llama.ggml_type_by_name("Q4_K"), rows, im[name]).tobytes()
    sample = mix._sample_text(f16, mix.calibration.calibration_text(), sens.n_ctx, sens.chunks)
    r = measure.perplexity(out, sample, n_ctx=sens.n_ctx, chunks=sens.chunks, kld_base=f16)
    assert sens.group(name).candidates["Q4_K"].measured == pytest.approx(r.kld.kld_mean, rel=1e-9)
    assert r.kld.kld_mean > 1e-3


def test_sensitivity_is_cached_and_complete(trained_demo, demo_sensitivity):
    f16, imatrix = trained_demo(1)
    sens = demo_sensitivity
    cached = list(f16.parent.glob("*.sensitivity.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["mode"] == "anchors"
    kinds = {g.kind for g in sens.groups}
    assert kinds == {"token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                     "ffn_down"}
    for g in sens.groups:
        assert set(mix.K_TYPES) <= set(g.candidates)
        assert all(g.candidates[t].measured is not None for t in mix.ANCHORS)
        # the output has no imatrix entry: no type ggml cannot make without one
        assert ("IQ2_XS" in g.candidates) == (g.name != "output.weight" and g.name != "token_embd.weight")
    again = mix.sensitivity(f16, importances=read_imatrix(imatrix).importances(), imatrix_name=str(imatrix),
                            mode="anchors", chunks=4)
    assert again.to_dict() == sens.to_dict()


@pytest.mark.slow
def test_proxy_ranks_like_the_measurement(trained_demo, tmp_path):
    """Spearman of the proxy against measured KLD over every type of two tensors (measured in full): the raw
    imatrix-weighted error across tensors, and each tensor's calibrated prediction from its anchors alone."""
    f16, imatrix = trained_demo(1)
    keep = {"output.weight", "blk.1.ffn_down.weight"}
    sens = mix.sensitivity(f16, importances=read_imatrix(imatrix).importances(), mode="all", chunks=1, threads=2,
                           cache_dir=tmp_path, tensors=keep)
    report = sens.spearman
    print("\nproxy vs measured KLD, Spearman:", report)
    assert report["held_out_pairs"] >= 12
    assert report["anchors_held_out"] > 0.9
    assert report["raw_proxy"] is not None


@pytest.fixture(scope="module")
def acceptance(trained_demo, reference_bin, tmp_path_factory):
    """For both demo models: llama.cpp's imatrix Q2_K/Q3_K_M/Q4_K_M (llama-quantize) and cl3's mixes of the same
    sizes (same imatrix), with their mean KLD against F16 by llama-perplexity on the first chunks of the held-out
    evaluation text."""
    root = tmp_path_factory.mktemp("acceptance")
    text = root / "eval.txt"
    text.write_text(evaluation_text(), encoding="utf-8")
    tool = reference_bin / "llama-perplexity"
    results = {}
    for seed in (1, 2):
        f16, imatrix = trained_demo(seed)
        base = root / f"base{seed}.kld"
        _run_tool(tool, "-m", f16, "-f", text, "-c", 512, "--chunks", 24, "-t", 2, "--kl-divergence-base", base,
                  want=r"Final estimate")

        def kld(model, base=base):
            log = _run_tool(tool, "-m", model, "-t", 2, "--kl-divergence-base", base, "--kl-divergence",
                            want=r"Same top p:\s+[\d.]+ ")
            return float(re.search(r"Mean    KLD:\s+([-\d.]+)", log).group(1))

        for name in TARGETS:
            standard = root / f"demo{seed}-{name}.gguf"
            subprocess.run([reference_bin / "llama-quantize", "--imatrix", imatrix, f16, standard, name], check=True,
                           capture_output=True)
            size = standard.stat().st_size
            r = quantize(f16, target=mix.Target.size(size), imatrix=imatrix, out=root / f"demo{seed}-mix-{name}.gguf",
                         measure="anchors", sensitivity_chunks=4, threads=2)
            results[(seed, name)] = {"size": size, "mix_size": r.outputs[0].stat().st_size,
                                     "planned": r.plan.size_bytes, "standard_kld": kld(standard),
                                     "mix_kld": kld(r.outputs[0]), "mix": r.mix, "imatrix": imatrix, "f16": f16}
    print("\nseed target size mix-size KLD(llama.cpp) KLD(mix) change")
    for (seed, name), v in results.items():
        print(seed, name, v["size"], v["mix_size"], f"{v['standard_kld']:.5f}", f"{v['mix_kld']:.5f}",
              f"{100 * (v['mix_kld'] / v['standard_kld'] - 1):+.1f}%")
    return results


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", TARGETS)
def test_mix_beats_llama_cpp_types_at_their_size(acceptance, seed, name):
    v = acceptance[(seed, name)]
    assert v["mix_size"] == v["planned"] <= v["size"]
    assert v["mix_kld"] <= 0.85 * v["standard_kld"], v


@pytest.mark.slow
def test_recipe_reproduces_byte_identically_with_stock_llama_quantize(acceptance, reference_bin, tmp_path):
    v = acceptance[(2, "Q3_K_M")]
    result = v["mix"]
    args = json.loads(result.recipe_json.read_text())["llama_quantize"]
    assert args == result.command and "--tensor-type-file" in args
    theirs = tmp_path / "stock.gguf"
    args = [str(reference_bin / "llama-quantize"), *args[1:-2], str(theirs), args[-1]]
    subprocess.run(args, check=True, capture_output=True)
    assert theirs.read_bytes() == result.output.read_bytes()
    # and the recipe's own lines, given one by one as --tensor-type arguments
    lines = result.recipe.read_text().split()
    by_args = tmp_path / "stock2.gguf"
    cli = [a for line in lines for a in ("--tensor-type", line)]
    i = args.index("--tensor-type-file")
    subprocess.run([*args[:i], *cli, *args[i + 2:-2], str(by_args), args[-1]], check=True, capture_output=True)
    assert by_args.read_bytes() == result.output.read_bytes()


@pytest.mark.slow
def test_mix_metadata_records_target_recipe_and_a_true_kld(acceptance):
    v = acceptance[(1, "Q4_K_M")]
    result = v["mix"]
    meta = mix.read_mix_metadata(result.output)
    assert meta[mix.KV_TARGET] == f"size={v['size']}"
    assert meta[mix.KV_RECIPE] == __import__("hashlib").sha256(result.recipe.read_bytes()).hexdigest()
    sens = result.plan.sensitivity
    sample = mix._sample_text(v["f16"], mix.calibration.calibration_text(), sens.n_ctx, sens.chunks)
    again = measure.perplexity(result.output, sample, n_ctx=sens.n_ctx, chunks=sens.chunks, kld_base=v["f16"])
    assert float(meta[mix.KV_MEASURED]) == pytest.approx(again.kld.kld_mean, rel=1e-5)
    assert float(meta[mix.KV_PREDICTED]) == pytest.approx(result.plan.predicted_kld, rel=1e-5)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(result.output).tensors}
    assert all(types[n] == t for n, t in result.plan.types.items())


def test_planned_size_is_the_written_size(tiny_llama3_gguf, tmp_path):
    """The size cl3 plans (ggml's own gguf code, header included) is the size llama.cpp writes (mixes: in
    test_cli_writes_the_mix_and_its_recipe and the acceptance tests)."""
    for name in ("Q2_K", "Q4_K_M", "Q8_0"):
        ftype = llama.file_types()[name].ftype
        out = tmp_path / f"{name}.gguf"
        llama.quantize_file(tiny_llama3_gguf, out, ftype, metadata={"x.y": "value", "x.n": 7})
        planned = {n: llama.ggml_type_by_name(t) for n, t in llama.quantize_plan(tiny_llama3_gguf, ftype).items()}
        assert llama.quantized_file_size(tiny_llama3_gguf, planned, ftype, {"x.y": "value", "x.n": 7}) == \
            out.stat().st_size


def test_dry_run_shows_the_plan_and_writes_nothing(tiny_llama3_gguf, tmp_path):
    src = tmp_path / "tiny-f32.gguf"
    src.symlink_to(tiny_llama3_gguf)
    q4 = tmp_path / "q4.gguf"
    assert run_cl3("quantize", src, "Q4_K_M", "-o", q4, "-q").returncode == 0
    size = q4.stat().st_size
    before = set(tmp_path.iterdir())
    proc = run_cl3("quantize", src, "--target-size", str(size), "--measure", "proxy", "--dry-run", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "blk.0.ffn_down.weight" in proc.stdout and "Q4_K_M" in proc.stdout
    # nothing was measured: the figures are named for what they are, no column or title says KLD
    assert "proxy error (uncalibrated)" in proc.stdout and "KLD" not in proc.stdout
    # nothing but the sensitivity cache
    assert {p.name for p in set(tmp_path.iterdir()) - before} == {
        p.name for p in tmp_path.glob("*.sensitivity.json")} and len(list(tmp_path.glob("*.sensitivity.json"))) == 1


def test_cli_writes_the_mix_and_its_recipe(tiny_llama3_gguf, tmp_path):
    proc = run_cl3("quantize", tiny_llama3_gguf, "--target-bpw", "5", "--measure", "proxy", "-o", tmp_path / "m.gguf",
                   "-q")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "m.gguf"
    recipe, recipe_json = mix.recipe_paths(out)
    data = json.loads(recipe_json.read_text())
    assert data["bpw"] <= 5 and data["size_bytes"] == out.stat().st_size
    reader = gguf.GGUFReader(out)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    assert 4.5 < n_bytes * 8 / n_params <= 5
    assert len(recipe.read_text().split()) == len(data["types"])
    assert "llama-quantize --tensor-type-file" in proc.stdout and shlex.join(data["llama_quantize"]) in \
        " ".join(proc.stdout.split())


@pytest.mark.parametrize("args, message", [
    (["--target-size", "4 parsecs"], "cannot read the size"),
    (["--target-size", "1GB", "--target-bpw", "4"], "not both"),
    (["--target-size", "10KiB"], "too small"),
    (["--target-bpw", "0.5"], "too small"),
    (["Q4_K_M", "--target-size", "1GB"], "not both"),
    (["--dry-run", "Q4_K_M"], "--dry-run"),
    (["--target-size", "1GB", "--pure"], "chooses every tensor"),
    (["--target-size", "1GB", "--measure", "guess"], "unknown sensitivity mode"),
    (["--target-size", "1GB", "--sensitivity-chunks", "0"], "at least 1 chunk"),
    (["--target-size", "1GB", "--allow-requantize"], "F16 or BF16"),
])
def test_bad_targets_are_one_line_errors(args, message, tiny_llama3_gguf, tmp_path):
    src = tmp_path / "src.gguf"
    src.symlink_to(tiny_llama3_gguf)
    measure_args = [] if "--measure" in args else ["--measure", "proxy"]
    proc = run_cl3("quantize", src, *args, *measure_args, "-o", tmp_path / "out.gguf", "-q")
    one_line_error(proc, message)
    assert not (tmp_path / "out.gguf").exists()
    assert not list(tmp_path.glob("*.tensor-types.txt"))


def test_a_quantized_source_is_refused(tiny_llama3_gguf, tmp_path):
    q8 = tmp_path / "q8.gguf"
    assert run_cl3("quantize", tiny_llama3_gguf, "Q8_0", "-o", q8, "-q").returncode == 0
    one_line_error(run_cl3("quantize", q8, "--target-size", "1GB", "-q"), "already quantized")


def test_ctrl_c_during_the_check_keeps_the_finished_mix(trained_demo, tmp_path):
    """SIGINT once the mix is at its final path (during the KLD check that follows): the file stays, complete and
    loadable, its metadata saying the check did not run, and the message says so and how to run the check alone."""
    f16, _ = trained_demo(1)
    src = tmp_path / f16.name
    src.symlink_to(f16)
    out = tmp_path / "m.gguf"
    child = subprocess.Popen([sys.executable, "-m", "cl3", "quantize", src, "--target-bpw", "5", "--measure", "proxy",
                              "--sensitivity-chunks", "48", "-o", out, "-q"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=os.environ | {"COLUMNS": "200"})
    deadline = time.monotonic() + 300
    while not out.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    assert out.is_file() and f"kept {out}" in stderr and f"cl3 ppl {out} --kld-base {src}" in " ".join(stderr.split())
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"interrupted: kept {out}") and "Traceback" not in stderr, stderr
    assert mix.read_mix_metadata(out)[mix.KV_MEASURED] == mix.NOT_MEASURED
    recipe, recipe_json = mix.recipe_paths(out)
    data = json.loads(recipe_json.read_text())
    assert data["kld_measured"] is None and data["size_bytes"] == out.stat().st_size and recipe.is_file()
    assert {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors if t.name in data["types"]} == \
        data["types"]
    with llama.Model(out) as m:  # llama.cpp loads it
        assert len(m.tokenize("hello")) > 0
    assert not list(tmp_path.glob(".*partial"))


def test_an_interrupted_sensitivity_continues_from_its_cache(trained_demo, tmp_path):
    """Ctrl-C in the quantization errors, then in the measurements: each rerun continues from what was saved
    (nothing found is redone) and the result equals an uninterrupted run's."""
    from cl3.errors import Interrupted

    f16, imatrix = trained_demo(1)
    im = read_imatrix(imatrix).importances()
    names = {"blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.1.attn_v.weight", "blk.1.ffn_down.weight",
             "output.weight"}
    args = dict(importances=im, mode="anchors", chunks=1, threads=2, tensors=names, model_sha256="0" * 64)
    (tmp_path / "whole").mkdir()
    whole = mix.sensitivity(f16, cache_dir=tmp_path / "whole", **args)
    n_measured = sum(c.measured is not None for g in whole.groups for c in g.candidates.values())
    assert n_measured == 15

    def stopping(at: dict[str, int], seen: dict[str, list[int]]):
        """A stage that records every update and raises KeyboardInterrupt at ``at[stage]`` done."""
        @contextlib.contextmanager
        def stage(description: str, unit: str):
            key = description.split()[0]

            def update(done: int, total: int) -> None:
                seen.setdefault(key, []).append(done)
                if done >= at.get(key, total + 1):
                    raise KeyboardInterrupt
            yield update
        return stage

    cache = tmp_path / "cache"
    cache.mkdir()
    seen: dict[str, list[int]] = {}
    with pytest.raises(Interrupted, match="continues"):
        mix.sensitivity(f16, cache_dir=cache, stage=stopping({"quantization": 2}, seen), **args)
    partial = list(cache.glob("*.sensitivity.partial.json"))
    assert len(partial) == 1 and not list(cache.glob("*.sensitivity.json"))
    assert 2 <= len(json.loads(partial[0].read_text())["proxies"]) < len(names)
    seen.clear()
    with pytest.raises(Interrupted):
        mix.sensitivity(f16, cache_dir=cache, stage=stopping({"KLD": 4}, seen), **args)
    assert seen["quantization"][0] >= 2          # the saved tensors were not quantized again
    assert seen["KLD"] == [1, 2, 3, 4]
    seen.clear()
    resumed = mix.sensitivity(f16, cache_dir=cache, stage=stopping({}, seen), **args)
    assert seen["quantization"] == [len(names)]  # nothing left to do
    assert seen["KLD"][0] == 5 and seen["KLD"][-1] == n_measured
    assert not list(cache.glob("*.partial.json")) and len(list(cache.glob("*.sensitivity.json"))) == 1
    for a, b in zip(whole.groups, resumed.groups, strict=True):
        assert a.name == b.name and a.candidates.keys() == b.candidates.keys()
        for t in a.candidates:
            x, y = a.candidates[t], b.candidates[t]
            assert (x.bytes, x.proxy, x.measured) == (y.bytes, y.proxy, y.measured), (a.name, t)
            assert x.predicted == pytest.approx(y.predicted, rel=1e-12)


def test_a_plan_says_kld_only_when_calibrated_against_a_measurement(tiny_llama3_gguf, tmp_path):
    """A proxy-only plan prints no KLD (its figures are squared errors, recorded as uncalibrated); a plan with
    measured tensors prints predicted KLDs, and its figures are measured KLDs where measured."""
    src = tmp_path / "tiny.gguf"
    src.symlink_to(tiny_llama3_gguf)
    proxy = run_cl3("quantize", src, "--target-bpw", "5", "--measure", "proxy", "-o", tmp_path / "p.gguf")
    assert proxy.returncode == 0, proxy.stderr
    table = proxy.stdout.split("wrote")[0]
    assert "KLD" not in table and "proxy error (uncalibrated)" in table
    assert "not predicted" in proxy.stdout
    assert mix.read_mix_metadata(tmp_path / "p.gguf")[mix.KV_PREDICTED] == mix.UNCALIBRATED
    data = json.loads(mix.recipe_paths(tmp_path / "p.gguf")[1].read_text())
    assert data["kld_predicted"] is None and data["proxy_error_uncalibrated"] > 0
    measured = run_cl3("quantize", src, "--target-bpw", "5", "--measure", "anchors", "--sensitivity-chunks", "2",
                       "--dry-run")
    assert measured.returncode == 0, measured.stderr
    assert "predicted KLD" in measured.stdout and "proxy error" not in measured.stdout
    sens = mix.Sensitivity.from_dict(json.loads(next(
        p for p in tmp_path.glob("*.sensitivity.json") if '"anchors"' in p.read_text()).read_text()))
    assert sens.calibrated
    g = sens.group("blk.0.ffn_down.weight")
    assert g.candidates["Q4_K"].predicted == g.candidates["Q4_K"].measured  # the figure printed is the KLD measured
