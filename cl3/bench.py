"""`cl3 bench`: the authors' quantization table (Size, BPW, PPL, pp/tg ms/token per type) measured on this machine.

For each type: quantize (reusing files already made), then size (GiB of the file), BPW (tensor bits / parameters, as
llama.cpp counts them), perplexity (cl3.measure, llama-perplexity's method; KL divergence vs F16 on request) and
llama-bench-style pp/tg speed. With the imatrix "both", every type is quantized with and without it and the better
file (lower KLD, else lower PPL) is kept and marked; ``mix`` adds columns ``mix@TYPE``: cl3's per-tensor mix
(cl3.mix) at the size of that type's file. Each finished cell is saved to NAME.json at once, so an interrupted run resumes where
it stopped; cells measured with other settings are recomputed. The table is written as NAME.md, NAME.csv, NAME.json
and, when matplotlib is installed, NAME.png (size vs perplexity, and speed).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import io
import json
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import llama, measure
from .errors import InputError, UsageError
from .evaluation.run import EvalRequest, evaluate
from .evaluation.stats import paired
from .files import atomic_output, make_folder
from .hf import check_model_source
from .metadata import read_metadata
from .progress import Stage, stage_progress

# The nine columns of the Chinese-LLaMA-Alpaca-3 table, by llama.cpp's names (the authors' Q5_K/Q4_K/Q3_K are
# llama-quantize's aliases of the _M mixes); columns always carry llama.cpp's name, whatever alias was asked.
AUTHORS_TYPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K"]

# rows of the table: (csv key, label in the authors' layout with its unit, format, csv key of its standard error)
ROWS = [
    ("size_gib", "Size (GiB)", "{:.2f}", None),
    ("size_mib", "Size (MiB)", "{:.1f}", None),
    ("bpw", "BPW", "{:.2f}", None),
    ("ppl", "PPL", "{:.3f}", "ppl_stderr"),
    ("kld_mean", "KLD vs F16", "{:.4f}", "kld_stderr"),
    ("same_top", "Same top (%)", "{:.1f}", None),
    ("imatrix", "Imatrix (better kept)", "{}", None),
    ("ppl_imatrix", "PPL with imatrix", "{:.3f}", None),
    ("ppl_plain", "PPL without imatrix", "{:.3f}", None),
    ("kld_imatrix", "KLD with imatrix", "{:.4f}", None),
    ("kld_plain", "KLD without imatrix", "{:.4f}", None),
    ("pp_ms_per_token", "PP (ms/token)", "{:.2f}", None),
    ("tg_ms_per_token", "TG (ms/token)", "{:.2f}", None),
]
TABLE_EXTENSIONS = (".md", ".csv", ".json", ".png")


@dataclass
class BenchSettings:
    ctx: int = 8192
    chunks: int | None = None
    text: str = "cl3:evaluation"        # dataset name of the text (built-in name with its hash, or a file path)
    text_sha256: str = ""
    imatrix: str | None = None          # imatrix provenance ("cl3:calibration@…", or a file), None = none
    kld: bool = False
    n_prompt: int = 512
    n_gen: int = 128
    repetitions: int = 5
    threads: int | None = None
    n_gpu_layers: int = -1
    imatrix_both: bool = False          # every type with and without the imatrix, the better one kept
    mix: list[str] = field(default_factory=list)   # types whose file size cl3's mixes are made at
    mix_measure: str = "auto"           # the mixes' sensitivity mode (cl3.mix)
    evals: list[str] = field(default_factory=list)  # accuracy rows, "ceval:0", "ceval:5" (cl3.evaluation)


EVAL_LABELS = {"ceval": "C-Eval", "cmmlu": "CMMLU", "mmlu": "MMLU"}


def eval_specs(specs: list[str] | None) -> list[str]:
    """``--eval ceval`` (0- and 5-shot, as the authors' table), ``ceval:5``, ``ceval:0,5`` -> ["ceval:0", ...]."""
    out = []
    for spec in specs or []:
        task, _, shots = spec.strip().partition(":")
        if task not in EVAL_LABELS:
            raise UsageError(f"unknown evaluation task {task!r}: choose {', '.join(EVAL_LABELS)}", param="evals")
        for k in (shots or "0,5").split(","):
            if not k.strip().isdigit():
                raise UsageError(f"{spec}: the shots must be numbers (ceval:0,5)", param="evals")
            out.append(f"{task}:{int(k)}")
    return list(dict.fromkeys(out))


def eval_rows(evals: list[str]) -> list[tuple[str, str, str, str | None]]:
    rows = []
    for e in evals:
        task, shots = e.split(":")
        key, label = f"{task}_{shots}shot", f"{EVAL_LABELS[task]} {shots}-shot"
        rows += [(key, f"{label} (%)", "{:.1f}", f"{key}_se"), (f"{key}_flips", f"{label} flips vs F16 (%)", "{:.1f}",
                                                                None)]
    return rows


MIX_PREFIX = "mix@"


@dataclass
class BenchTable:
    name: str
    source: str
    types: list[str]
    settings: BenchSettings
    cells: dict[str, dict] = field(default_factory=dict)     # type -> {metric: value, "model": path, ...}
    machine: dict = field(default_factory=dict)
    started: str = ""

    def value(self, type_name: str, key: str):
        cell = self.cells.get(type_name, {})
        if key == "size_mib" and cell.get("size_bytes") is not None:
            return cell["size_bytes"] / 2**20
        return cell.get(key)

    def rows(self) -> list[tuple[str, str, str, str | None]]:
        """The rows worth showing, in every format alike: KLD rows only when measured; sizes in MiB for models
        under 1 GiB, in GiB otherwise."""
        sizes = [self.value(t, "size_gib") for t in self.types if self.value(t, "size_gib") is not None]
        skip = "size_gib" if sizes and max(sizes) < 1 else "size_mib"
        return [r for r in ROWS + eval_rows(self.settings.evals)
                if r[0] != skip and any(self.value(t, r[0]) is not None for t in self.types)]

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "types": self.types, "settings": vars(self.settings),
                "machine": self.machine, "started": self.started, "cells": self.cells,
                "method": METHOD}


METHOD = {
    "size_gib": "GGUF file size / 2^30",
    "size_mib": "GGUF file size / 2^20",
    "bpw": "llama_model_size * 8 / llama_model_n_params (tensor bits per parameter)",
    "ppl": "llama-perplexity's method: BOS-prefixed tokenization, non-overlapping chunks of ctx tokens, BOS as "
           "the first token of each chunk, only the second half of each chunk scored",
    "ppl_stderr": "the standard error of the perplexity over the scored tokens, as llama-perplexity estimates it",
    "kld_mean": "mean KL(P_F16 || P_type) over the scored tokens (llama-perplexity --kl-divergence)",
    "imatrix": "with the imatrix 'both': whether the kept file was quantized with the imatrix (the one of lower KLD, "
               "or lower PPL without --kld)",
    "mix": "mix@TYPE: cl3's per-tensor mix (cl3 quantize --target-size) at the file size of TYPE in this table",
    "eval": "cl3 eval: accuracy (%) over the questions of the task's default split (C-Eval val, CMMLU/MMLU test) "
            "with the model authors' prompt and constrained decoding, ± its standard error; flips: the share of "
            "questions whose answer differs from F16's",
    "pp_ms_per_token": "llama-bench pp test: mean time of the timed runs / prompt tokens (random tokens, warm-up)",
    "tg_ms_per_token": "llama-bench tg test: mean time of the timed runs / generated tokens (1 token per decode)",
}


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    ram = None
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    info = llama.backend_info()
    return {"cpu": cpu, "cores": llama.physical_cpu_count(), "ram_gib": round(ram / 2**30, 1) if ram else None,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "backend": info["backend"], "devices": info["devices"],
            "llama_cpp_python": info["llama_cpp_python"], "llama_cpp_system_info": info["system_info"]}


def _text_and_name(text_file: str | os.PathLike | None) -> tuple[str, str]:
    from . import calibration

    if text_file is None:
        return calibration.evaluation_text(), calibration.builtin_name(calibration.EVALUATION)
    return calibration.read_text_files([text_file]), str(text_file)


def _source_gguf(src: Path, work_dir: Path, stage: Stage | None) -> Path:
    """The F32/F16/BF16 GGUF to quantize from; an HF checkpoint is converted to F16 once (kept in work_dir)."""
    if src.is_file():
        return src
    if not src.is_dir():
        raise InputError(f"no such file or directory: {src}")
    from .convert import convert

    out = work_dir / f"{src.name}-F16.gguf"
    if not out.exists():
        with stage_progress(stage, "converting to F16", "bytes") as update:
            convert(src, out, "f16", progress=update)
    return out


def load_table(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"{path} exists but is not a cl3 bench table (JSON); remove it or choose another output",
                         param="out") from None


@dataclass
class BenchJob:
    """What every cell of a table needs, as plain values (a cell may run in another process or on another machine)."""

    source: Path                    # the F32/F16/BF16 GGUF the types are quantized from
    source_ftype: int | None        # its general.file_type (that type is the source itself)
    base_name: str                  # {name}-{size}, for quantized file names
    settings: BenchSettings
    text: str                       # the evaluation text
    imatrix: str | bool | None      # as cl3.quantize takes it
    plain_dir: Path                 # quantized without an imatrix (and the KLD base)
    quant_dir: Path                 # the table's quantized files (a folder of their own with an imatrix)
    kld_base: Path | None = None    # F16's logits made once by kld_base_logits (else measured from the F16 model)

    def model_path(self, type_name: str, *, plain: bool = False, size: int | None = None) -> Path:
        """Where the file of ``type_name`` is (the source itself for the source's own type); a mix column's file
        is named after its type and target ``size``."""
        from .quantize import resolve_types

        if type_name.startswith(MIX_PREFIX):
            return self.quant_dir / f"{self.base_name}-mix-{type_name[len(MIX_PREFIX):]}-{size}B.gguf"
        file_type = resolve_types([type_name])[0]
        if file_type.ftype == self.source_ftype:
            return self.source
        directory = self.plain_dir if plain or type_name == "F16" else self.quant_dir
        return directory / f"{self.base_name}-{file_type.name}.gguf"


def prepare(src: str | os.PathLike, *, types: list[str] | None = None, out: str | os.PathLike,
            imatrix: str | os.PathLike | bool | None = None, ctx: int = 8192, chunks: int | None = None,
            text_file: str | os.PathLike | None = None, kld: bool = False, n_prompt: int = 512, n_gen: int = 128,
            repetitions: int = 5, threads: int | None = None, n_gpu_layers: int = -1,
            work_dir: str | os.PathLike | None = None, imatrix_both: bool = False, mix: list[str] | None = None,
            mix_measure: str = "auto", stage: Stage | None = None,
            evals: list[str] | None = None) -> tuple[BenchJob, BenchTable, Path]:
    """Check everything, convert an HF source, and start the table (with the cells of an earlier run of the same
    settings). Returns the job, the table and the table's path stem."""
    from . import quantize
    from .mix import MODES

    src = Path(src)
    out = table_stem(out)
    if not out.parent.is_dir():
        raise InputError(f"output directory does not exist: {out.parent}")
    # llama.cpp's names (Q4_K -> Q4_K_M); unknown names fail here, before any work
    type_names = list(dict.fromkeys(quantize.resolve_types([t])[0].name for t in (types or AUTHORS_TYPES) if t.strip()))
    mix_types = [quantize.resolve_types([t])[0].name for t in (mix or []) if t.strip()]
    if mix_measure not in ("auto", *MODES):
        raise UsageError(f"unknown sensitivity mode {mix_measure!r} (auto, {', '.join(MODES)})", param="measure")
    if imatrix_both and not imatrix:
        raise UsageError("comparing with and without an imatrix needs one", param="imatrix")
    if ctx < 16:
        raise UsageError("the context size must be at least 16", param="n_ctx")
    check_model_source(src)
    work = Path(work_dir) if work_dir else out.parent / f"{out.name}.models"
    make_folder(work)

    text, text_name = _text_and_name(text_file)
    imatrix_name = None
    if imatrix is True:
        from . import calibration

        imatrix_name = calibration.builtin_name(calibration.CALIBRATION)
    elif imatrix:
        imatrix_name = str(imatrix)
    settings = BenchSettings(ctx=ctx, chunks=chunks, text=text_name,
                             text_sha256=hashlib.sha256(text.encode()).hexdigest(), imatrix=imatrix_name, kld=kld,
                             n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions, threads=threads,
                             n_gpu_layers=n_gpu_layers, imatrix_both=imatrix_both, mix=mix_types,
                             mix_measure=mix_measure, evals=eval_specs(evals))
    type_names += [MIX_PREFIX + t for t in mix_types]
    table = BenchTable(out.name, str(src), type_names, settings, machine=machine_info(),
                       started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    previous = load_table(table_file(out, ".json"))
    def comparable(values: dict) -> dict:  # tables written before --eval existed continue too
        return {k: v for k, v in values.items() if k != "evals" or v}

    if previous and comparable(previous.get("settings") or {}) == comparable(vars(settings)) \
            and previous.get("source") == str(src):
        cells = {canonical_type(t): c for t, c in previous.get("cells", {}).items()}  # tables saved with aliases
        table.cells = {t: c for t, c in cells.items() if t in type_names}
        table.started = previous.get("started", table.started)

    source = quantize.Source.open(_source_gguf(src, work, stage))
    # files quantized with an imatrix live apart from plain ones, so neither is ever taken for the other
    quant_dir = work
    if imatrix_name:
        quant_dir = work / f"imatrix-{hashlib.sha256(imatrix_name.encode()).hexdigest()[:8]}"
        make_folder(quant_dir)
    job = BenchJob(source.path, source.file_type, source.base_name, settings, text, imatrix, work, quant_dir)
    return job, table, out


# The cells. Each step is a plain function of the job (and the model file), returning the values it measured.

def quantized_model(job: BenchJob, type_name: str, stage: Stage | None = None, *, plain: bool = False) -> Path:
    """The file of ``type_name`` (``plain``: without the imatrix), quantized once (reused when it is there)."""
    from . import quantize

    path = job.model_path(type_name, plain=plain)
    if not path.exists():
        imatrix = job.imatrix if type_name != "F16" and not plain else None
        quantize.quantize(job.source, [type_name], out=path, imatrix=imatrix, threads=job.settings.threads,
                          n_gpu_layers=job.settings.n_gpu_layers, stage=stage)
    return path


def mix_model(job: BenchJob, column: str, reference: Path, stage: Stage | None = None) -> Path:
    """cl3's mix no larger than ``reference`` (the file of the column's type), made once."""
    from . import quantize
    from .mix import Target

    size = reference.stat().st_size
    path = job.model_path(column, size=size)
    if not path.exists():
        s = job.settings
        quantize.quantize(job.source, target=Target.size(size), out=path, imatrix=job.imatrix, threads=s.threads,
                          n_gpu_layers=s.n_gpu_layers, measure=s.mix_measure, stage=stage)
    return path


def _is_unquantized(job: BenchJob, type_name: str) -> bool:
    from .quantize import resolve_types

    return type_name == "F16" or resolve_types([type_name])[0].ftype == job.source_ftype


def both_values(job: BenchJob, type_name: str, cell: dict, stage: Stage | None = None) -> dict:
    """With and without the imatrix: both files' size and perplexity (and KLD), and the better one's values."""
    variants = cell.get("variants", {})
    for variant in ("imatrix", "plain"):
        if "ppl" not in variants.get(variant, {}):
            model = quantized_model(job, type_name, stage, plain=variant == "plain")
            variants[variant] = {"model": str(model), **size_values(model),
                                 **perplexity_values(job, f"{type_name} ({variant})", model, stage)}
    key = "kld_mean" if all(v.get("kld_mean") is not None for v in variants.values()) else "ppl"
    kept = min(("imatrix", "plain"), key=lambda v: variants[v][key])
    values = dict(variants[kept], variants=variants, imatrix="yes" if kept == "imatrix" else "no",
                  ppl_imatrix=variants["imatrix"]["ppl"], ppl_plain=variants["plain"]["ppl"])
    if key == "kld_mean":
        values.update(kld_imatrix=variants["imatrix"]["kld_mean"], kld_plain=variants["plain"]["kld_mean"])
    return values


def size_values(model: Path) -> dict:
    meta = read_metadata(model)
    return {"size_gib": meta.file_size / 2**30, "size_bytes": meta.file_size, "bpw": meta.bits_per_weight,
            "description": f"{meta.architecture} {meta.size_label} {meta.file_type_name}"}


def perplexity_values(job: BenchJob, type_name: str, model: Path, stage: Stage | None = None) -> dict:
    s = job.settings
    base = (job.kld_base or job.model_path("F16")) if s.kld and type_name != "F16" else None
    with stage_progress(stage, f"{type_name}: perplexity", "chunks") as update:
        r = measure.perplexity(model, job.text, n_ctx=s.ctx, chunks=s.chunks, threads=s.threads,
                               n_gpu_layers=s.n_gpu_layers, kld_base=base, progress=update)
    values = {"ppl": r.ppl, "ppl_stderr": r.stderr, "chunks": r.chunks, "scored_tokens": r.tokens,
              "ppl_seconds": r.seconds}
    if r.kld is not None:
        values.update(kld_mean=r.kld.kld_mean, kld_stderr=r.kld.kld_stderr, kld_median=r.kld.kld_median,
                      kld_p99=r.kld.kld_p99, same_top=100 * r.kld.same_top, dp_rms=100 * r.kld.dp_rms)
    return values


def speed_values(job: BenchJob, type_name: str, model: Path, stage: Stage | None = None) -> dict:
    s = job.settings
    with stage_progress(stage, f"{type_name}: speed", "runs") as update:
        r = measure.speed(model, n_prompt=s.n_prompt, n_gen=s.n_gen, repetitions=s.repetitions, threads=s.threads,
                          n_gpu_layers=s.n_gpu_layers, progress=update)
    values: dict = {"threads": r.threads, "backend": r.backend.get("layers", r.backend.get("backend"))}
    if pp := r.test("pp"):
        values.update(pp_ms_per_token=pp.ms_per_token, pp_tokens_per_s=pp.avg_ts, pp_stdev_ts=pp.stdev_ts)
    if tg := r.test("tg"):
        values.update(tg_ms_per_token=tg.ms_per_token, tg_tokens_per_s=tg.avg_ts, tg_stdev_ts=tg.stdev_ts)
    return values


def kld_base_logits(job: BenchJob, out: Path, stage: Stage | None = None) -> Path:
    """F16's token distributions on the text, written to ``out`` (llama-perplexity --kl-divergence-base) with the
    settings perplexity_values uses; a job whose ``kld_base`` is this file measures KLD without running F16 again."""
    s = job.settings
    with stage_progress(stage, "F16: KLD base", "chunks") as update:
        measure.save_base_logits(job.model_path("F16"), out, job.text, n_ctx=s.ctx, chunks=s.chunks, threads=s.threads,
                                 n_gpu_layers=s.n_gpu_layers, force=True, progress=update)
    return Path(out)


def missing_steps(cell: dict, evals: list[str] = ()) -> list[str]:
    """The measurements a cell still lacks: "size", "ppl", "speed", "eval:TASK:SHOTS"."""
    steps = [] if "size_gib" in cell else ["size"]
    steps += [] if "ppl" in cell else ["ppl"]
    steps += [] if "pp_ms_per_token" in cell or "tg_ms_per_token" in cell else ["speed"]
    steps += [f"eval:{e}" for e in evals if f"{e.replace(':', '_')}shot" not in cell]
    return steps


def eval_values(job: BenchJob, type_name: str, model: Path, spec: str, stage: Stage | None = None) -> dict:
    """Accuracy on one task (cl3.evaluation, the run file kept beside the models so Ctrl-C continues), and the
    flips against F16's answers."""
    task, shots = spec.split(":")
    s = job.settings

    def run(name: str, path: Path):
        request = EvalRequest(path, task=task, shots=int(shots), threads=s.threads, n_gpu_layers=s.n_gpu_layers,
                              output=job.plain_dir / f"{Path(path).stem}.{task}-{shots}shot.json")
        with stage_progress(stage, f"{name}: {EVAL_LABELS[task]} {shots}-shot", "questions") as update:
            return evaluate(request, progress=update)

    mine = run(type_name, model)
    key = f"{task}_{shots}shot"
    values = {key: 100 * mine.summary.overall.accuracy, f"{key}_se": 100 * mine.summary.overall.se}
    f16 = job.model_path("F16")
    if type_name != "F16" and f16.exists():
        values[f"{key}_flips"] = 100 * paired(mine.answers, run("F16", f16).answers).flip_rate
    return values


def bench(src: str | os.PathLike, *, types: list[str] | None = None, out: str | os.PathLike,
          imatrix: str | os.PathLike | bool | None = None, ctx: int = 8192, chunks: int | None = None,
          text_file: str | os.PathLike | None = None, kld: bool = False, n_prompt: int = 512, n_gen: int = 128,
          repetitions: int = 5, threads: int | None = None, n_gpu_layers: int = -1,
          work_dir: str | os.PathLike | None = None, imatrix_both: bool = False, mix: list[str] | None = None,
          mix_measure: str = "auto", stage: Stage | None = None,
          on_cell: Callable[[BenchTable], None] | None = None, evals: list[str] | None = None) -> BenchTable:
    """Measure every type and write OUT.md/.csv/.json(/.png); resumes from OUT.json when its settings match.
    Each measurement is saved as soon as it is made. ``imatrix_both``: each type with and without ``imatrix``, the
    better kept and marked. ``mix``: types at whose file size cl3's mixes are added as ``mix@TYPE`` columns."""
    job, table, out = prepare(src, types=types, out=out, imatrix=imatrix, ctx=ctx, chunks=chunks,
                              text_file=text_file, kld=kld, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions,
                              threads=threads, n_gpu_layers=n_gpu_layers, work_dir=work_dir,
                              imatrix_both=imatrix_both, mix=mix, mix_measure=mix_measure, stage=stage,
                              evals=evals)
    if kld:
        quantized_model(job, "F16", stage)
    for type_name in table.types:
        cell = table.cells.setdefault(type_name, {})
        if type_name.startswith(MIX_PREFIX):
            base = type_name[len(MIX_PREFIX):]
            kept = table.cells.get(base, {}).get("model")
            reference = Path(kept) if kept else quantized_model(job, base, stage)
            model = mix_model(job, type_name, reference, stage)
        elif imatrix_both and not _is_unquantized(job, type_name):
            if "ppl" not in cell:
                cell.update(both_values(job, type_name, cell, stage))
                save(table, out)
            model = Path(cell["model"])
        else:
            model = quantized_model(job, type_name, stage)
        cell["model"] = str(model)
        for step in missing_steps(cell, table.settings.evals):
            if step == "size":
                cell.update(size_values(model))
            elif step == "ppl":
                cell.update(perplexity_values(job, type_name, model, stage))
            elif step.startswith("eval:"):
                cell.update(eval_values(job, type_name, model, step[len("eval:"):], stage))
            else:
                cell.update(speed_values(job, type_name, model, stage))
            save(table, out)
        if on_cell:
            on_cell(table)
    save(table, out, final=True)
    return table


def table_stem(out: str | os.PathLike) -> Path:
    """OUT without a table extension; other dots in the name stay (quant_tables/M2-7.3M-F16)."""
    out = Path(out)
    return out.with_suffix("") if out.suffix in TABLE_EXTENSIONS else out


def table_file(stem: Path, extension: str) -> Path:
    """stem + extension (Path.with_suffix would replace '.3M-F16' in M2-7.3M-F16)."""
    return stem.with_name(stem.name + extension)


def combine(tables: list[BenchTable], name: str) -> BenchTable:
    """Several sources' tables as one: a column per source and type ("name:TYPE"), the first table's settings."""
    first = tables[0]
    cells = {f"{t.name}:{k}": dict(v) for t in tables for k, v in t.cells.items() if k in t.types}
    return dataclasses.replace(first, name=name, source=", ".join(t.source for t in tables),
                               types=[f"{t.name}:{k}" for t in tables for k in t.types], cells=cells)


def save(table: BenchTable, out: Path, final: bool = False) -> None:
    """Write the table's JSON, CSV and Markdown (and, when it is complete, the plot) atomically."""
    with atomic_output(table_file(out, ".json")) as tmp:
        tmp.write_text(json.dumps(table.to_dict(), indent=1, ensure_ascii=False), encoding="utf-8")
    with atomic_output(table_file(out, ".csv")) as tmp:
        tmp.write_text(render_csv(table), encoding="utf-8")
    with atomic_output(table_file(out, ".md")) as tmp:
        tmp.write_text(render_markdown(table), encoding="utf-8")
    if final:
        plot(table, table_file(out, ".png"))


# ---------------------------------------------------------------------------------------------------------- render

def _fmt(value, spec: str) -> str:
    return "" if value is None else spec.format(value)


def _cell_text(table: BenchTable, type_name: str, row: tuple[str, str, str, str | None], sep: str = " ") -> str:
    """A value as the Markdown and Rich tables show it, with its standard error: 5.130 ± 0.021."""
    key, _label, spec, err_key = row
    text = _fmt(table.value(type_name, key), spec)
    err = table.value(type_name, err_key) if err_key and text else None
    return f"{text}{sep}± {spec.format(err)}" if err is not None else text


def render_csv(table: BenchTable) -> str:
    """Rows = metrics, columns = types (the layout of quant_tables/*.published.csv); the same rows and units as the
    Markdown, each standard error in a row of its own (ppl_stderr after ppl)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", *table.types])
    for key, _label, _spec, err_key in table.rows():
        for k in (key, err_key):
            if k and any(table.value(t, k) is not None for t in table.types):
                w.writerow([k, *[_csv_value(table.value(t, k)) for t in table.types]])
    return buf.getvalue()


def _csv_value(value) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else repr(round(value, 6))


def render_markdown(table: BenchTable) -> str:
    s, m = table.settings, table.machine
    lines = [f"# {table.name}: quantization table measured by cl3", "",
             f"| | {' | '.join(table.types)} |", "|---|" + "---|" * len(table.types)]
    for row in table.rows():
        lines.append(f"| {row[1]} | " + " | ".join(_cell_text(table, t, row) for t in table.types) + " |")
    lines += ["", "How these numbers were obtained:", "",
              f"- Source: `{table.source}`; quantized with llama.cpp (llama-cpp-python {m.get('llama_cpp_python')})"
              + (f", importance matrix: {s.imatrix}" if s.imatrix else ", no importance matrix") + ".",
              f"- Size: the GGUF file's size (GiB = 2^30 bytes, MiB = 2^20 bytes; the CSV's size_gib or size_mib). "
              f"BPW: {METHOD['bpw']}.",
              f"- PPL: {METHOD['ppl']}; ctx {s.ctx}, text `{s.text}` (sha256 {s.text_sha256[:12]}…)"
              + (f", first {s.chunks} chunks" if s.chunks else "") + f". The ± is {METHOD['ppl_stderr']}.",
              *([f"- KLD: {METHOD['kld_mean']} ± its standard error."] if s.kld else []),
              *([f"- Imatrix: {METHOD['imatrix']}."] if s.imatrix_both else []),
              *([f"- Mixes: {METHOD['mix']} (sensitivity: {s.mix_measure})."] if s.mix else []),
              *([f"- C-Eval/CMMLU/MMLU: {METHOD['eval']}."] if s.evals else []),
              (f"- PP/TG: {METHOD['pp_ms_per_token']} (pp{s.n_prompt}); {METHOD['tg_ms_per_token']} "
               f"(tg{s.n_gen}); {s.repetitions} timed runs; lower is faster."),
              (f"- Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('ram_gib')} GiB RAM, {m.get('os')}, "
               f"backend {m.get('backend')}; {m.get('llama_cpp_system_info')}"), ""]
    return "\n".join(lines)


def render_rich(table: BenchTable):
    from rich.table import Table

    t = Table(title=f"{table.name} ({table.machine.get('backend')}, ctx {table.settings.ctx})")
    rows = table.rows()
    t.add_column("", no_wrap=True, min_width=max((len(r[1]) for r in rows), default=0))
    for name in table.types:
        t.add_column(name, justify="right", no_wrap=True, overflow="fold")
    for row in rows:  # a value's standard error on the line below it keeps the columns narrow
        t.add_row(row[1], *[_cell_text(table, n, row, sep="\n") for n in table.types])
    return t


def plot(table: BenchTable, path: Path) -> Path | None:
    """Size vs perplexity (with standard-error bars), and pp/tg ms/token per type; None when matplotlib is not
    installed or nothing is measured yet."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = figure(table)
    if fig is None:
        return None
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def figure(table: BenchTable):
    """The matplotlib figure of `plot`: file size against PPL (with standard-error bars) and, when measured, against
    KLD, llama.cpp's types as points and cl3's mixes as a curve; then pp/tg ms/token per column. None when no
    column has both a size and a perplexity."""
    import matplotlib.pyplot as plt

    done = [t for t in table.types if table.value(t, "ppl") is not None and table.value(t, "size_gib") is not None]
    if not done:
        return None
    with_kld = [t for t in done if table.value(t, "kld_mean") is not None]
    panels = 3 if with_kld else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    size_key = next(r[0] for r in table.rows() if r[0].startswith("size_"))
    unit = "GiB" if size_key == "size_gib" else "MiB"
    panels_of = [(axes[0], "ppl", "ppl_stderr", f"perplexity ± standard error (ctx {table.settings.ctx})")]
    if with_kld:
        panels_of.append((axes[1], "kld_mean", None, "mean KLD vs F16"))
    for ax, key, err_key, label in panels_of:
        for mixes, fmt, name in ((False, "o", "llama.cpp types"), (True, "s-", "cl3 mixes")):
            cols = [t for t in (with_kld if key == "kld_mean" else done) if t.startswith(MIX_PREFIX) == mixes]
            if mixes:  # a curve, by size
                cols.sort(key=lambda t: table.value(t, size_key))
            if not cols:
                continue
            xs = [table.value(t, size_key) for t in cols]
            ys = [table.value(t, key) for t in cols]
            errs = [table.value(t, err_key) or 0.0 for t in cols] if err_key else None
            ax.errorbar(xs, ys, yerr=errs, fmt=fmt, capsize=3, label=name)
            for t, x, y in zip(cols, xs, ys):
                mark = "*" if table.value(t, "imatrix") == "no" else ""
                ax.annotate(t + mark, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"file size ({unit})")
        ax.set_ylabel(label)
        ax.set_title(f"size vs {'KLD' if key == 'kld_mean' else 'perplexity'}")
        if key == "kld_mean":
            ax.set_yscale("log")
        if any(t.startswith(MIX_PREFIX) for t in done):
            ax.legend(fontsize=8)
    ax2 = axes[-1]
    idx = range(len(table.types))
    for key, label, offset in (("pp_ms_per_token", "PP", -0.2), ("tg_ms_per_token", "TG", 0.2)):
        vals = [table.value(t, key) or 0 for t in table.types]
        ax2.bar([i + offset for i in idx], vals, width=0.4, label=label)
    ax2.set_xticks(list(idx), table.types, rotation=45)
    ax2.set_ylabel("ms/token (lower is faster)")
    ax2.set_title(f"speed ({table.machine.get('backend')}, {table.machine.get('cores')} cores)")
    ax2.legend()
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------------- compare

def read_table_csv(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """A metrics × types CSV (ours or quant_tables/*.published.csv) → {metric: {type: value}}."""
    path = Path(path)
    try:
        rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    except (OSError, UnicodeDecodeError) as ex:
        raise InputError(f"cannot read {path}: {ex}") from None
    if not rows or not rows[0] or rows[0][0] != "metric":
        raise InputError(f"{path} is not a table CSV (its first cell must be 'metric')")
    types = rows[0][1:]
    table: dict[str, dict[str, float]] = {}
    for row in rows[1:]:
        if not row:
            continue
        values = {}
        for t, v in zip(types, row[1:]):
            if v.strip():
                try:
                    values[t] = float(v)
                except ValueError:
                    raise InputError(f"{path}: {row[0]}/{t} is not a number: {v!r}") from None
        table[row[0]] = values
    return table


def canonical_type(name: str) -> str:
    """llama.cpp's name of a column's type ("Q4_K", the authors' spelling, -> "Q4_K_M"); other columns unchanged."""
    from .quantize import resolve_types

    if name.startswith(MIX_PREFIX):
        return name
    try:
        return resolve_types([name])[0].name
    except UsageError:
        return name


def compare(table: BenchTable, published: dict[str, dict[str, float]]) -> list[dict]:
    """Published vs measured per metric and type, with measured/published ratios; columns are matched by llama.cpp's
    name of their type (a published "Q4_K" is Q4_K_M)."""
    result = []
    for key, label, _spec, _err in ROWS + eval_rows(table.settings.evals):
        if key not in published:
            continue
        row = {canonical_type(t): v for t, v in published[key].items()}
        for t in table.types:
            pub, mine = row.get(t), table.value(t, key)
            if pub is None and mine is None:
                continue
            result.append({"metric": key, "label": label, "type": t, "published": pub, "measured": mine,
                           "ratio": (mine / pub) if pub and mine is not None else None})
    return result
