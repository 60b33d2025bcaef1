"""Quantize a GGUF (or an HF checkpoint, converted on the fly) to one or several llama.cpp file types.

The work is llama.cpp's own ``llama_model_quantize``; cl3 resolves the types, checks everything before any work
(types, source, imatrix against the model), passes the importance matrix as the C array llama.h defines, records the
same ``quantize.imatrix.*`` provenance keys as llama-quantize, and writes every output atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from . import calibration, llama, mix
from .errors import InputError, Interrupted, OutputError, UsageError
from .files import atomic_output, check_new_output, is_directory_target, output_directory
from .hf import check_model_source
from .imatrix import Imatrix, check_against_model, compute_imatrix, read_imatrix, write_imatrix
from .metadata import read_metadata
from .progress import Stage, duration, stage_progress

ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
SOURCE_TYPES = {int(gguf.GGMLQuantizationType.F32), int(gguf.GGMLQuantizationType.F16),
                int(gguf.GGMLQuantizationType.BF16)}

KV_IMATRIX_FILE = "quantize.imatrix.file"
KV_IMATRIX_DATASET = "quantize.imatrix.dataset"
KV_IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
KV_IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"



def file_types() -> dict[str, llama.FileType]:
    """Every file type llama.cpp can write, by llama-quantize's name (aliases not included)."""
    return llama.file_types()


def file_type_names() -> list[str]:
    return list(llama.file_types()) + list(ALIASES)


def resolve_types(spec: str | Iterable[str]) -> list[llama.FileType]:
    """``"q8_0,Q6_K,q4_k"`` -> file types (aliases resolved, case-insensitive, duplicates dropped, order kept)."""
    items = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    known = llama.file_types()
    types: list[llama.FileType] = []
    for item in (i.strip().upper() for i in items):
        if not item:
            continue
        name = ALIASES.get(item, item)
        if name not in known:
            guess = closest_type_name(item)
            raise UsageError(f"unknown quantization type {item!r}; did you mean {guess}?" if guess else
                             f"unknown quantization type {item!r} (known: {', '.join(file_type_names())})")
        if known[name] not in types:
            types.append(known[name])
    if not types:
        raise UsageError("no quantization type given")
    return types


def closest_type_name(name: str) -> str | None:
    """The file type a mistyped name most likely means ("Q4KM", "q4-k-m" -> "Q4_K_M"), compared without case,
    underscores or dashes (aliases count as their type); None when nothing is close."""
    import difflib

    def norm(n: str) -> str:
        return n.upper().replace("_", "").replace("-", "")

    by_norm: dict[str, str] = {}
    for n in file_type_names():
        by_norm.setdefault(norm(n), ALIASES.get(n, n))
    match = difflib.get_close_matches(norm(name), list(by_norm), n=1, cutoff=0.75)
    return by_norm[match[0]] if match else None


def ggml_type(name: str | None, what: str) -> int | None:
    if name is None:
        return None
    try:
        return llama.ggml_type_by_name(name)
    except ValueError:
        raise UsageError(f"unknown tensor type {name!r} for the {what}",
                         param=what.replace(" ", "_") + "_type") from None


@dataclass
class Source:
    """What cl3 needs to know about a source GGUF before quantizing it."""

    path: Path
    weights: dict[str, tuple[int, ...]]  # tensor name -> ne[0..3]
    base_name: str
    file_type: int | None = None         # general.file_type

    @classmethod
    def open(cls, path: Path, *, allow_requantize: bool = False) -> Source:
        meta = read_metadata(path)
        if meta.general_type != "model":
            raise InputError(f"{path} is not a model GGUF (general.type = {meta.general_type})")
        if not meta.tensors:
            raise InputError(f"{path} holds no tensors")
        quantized = [t.name for t in meta.tensors if t.ne[1] > 1 and t.ggml_type not in SOURCE_TYPES]
        if quantized and not allow_requantize:
            raise InputError(f"{path} is already quantized ({quantized[0]}); quantize from an F32, F16 or BF16 GGUF "
                             "(requantizing loses quality and must be asked for)", param="allow_requantize")
        # llama_model_quantize does not check the hyper-parameters against the tensors: a source llama.cpp cannot
        # load would give an output it cannot load either. Loading it without weights costs the vocabulary's time.
        with llama.Model(path, n_gpu_layers=0, no_alloc=True):
            pass
        size_label = meta.size_label or gguf.model_weight_count_rounded_notation(meta.n_params)
        base = gguf.naming_convention(meta.name, meta.basename, meta.finetune, meta.version, size_label, None)
        return cls(path, {t.name: t.ne for t in meta.tensors}, base, meta.file_type)

    def output_name(self, file_type: llama.FileType, suffix: str = "") -> str:
        return f"{self.base_name}-{file_type.name}{suffix}.gguf"


@dataclass
class ImatrixChoice:
    """An imatrix to quantize with: already loaded, plus the provenance written into the output."""

    imatrix: Imatrix
    file: str
    importances: dict[str, object] = field(default_factory=dict)

    def metadata(self) -> dict[str, str | int]:
        meta: dict[str, str | int] = {KV_IMATRIX_FILE: self.file}
        if self.imatrix.datasets:
            meta[KV_IMATRIX_DATASET] = self.imatrix.datasets[0]
        meta[KV_IMATRIX_N_ENTRIES] = len(self.imatrix.entries)
        if self.imatrix.chunk_count > 0:
            meta[KV_IMATRIX_N_CHUNKS] = self.imatrix.chunk_count
        return meta


def load_imatrix_for(source: Source, path: Path) -> ImatrixChoice:
    imatrix = read_imatrix(path)
    if not imatrix.is_legacy and not imatrix.has_metadata:
        raise InputError(f"{path} lacks the imatrix metadata (datasets, chunk count and size)")
    check_against_model(imatrix, source.weights, source=f"imatrix {path.name}")
    return ImatrixChoice(imatrix, str(path), imatrix.importances())


def file_sha256(path: Path, progress: Callable[[int, int], None] | None = None, chunk: int = 16 << 20) -> str:
    digest, done, total = hashlib.sha256(), 0, path.stat().st_size
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
            done += len(block)
            if progress:
                progress(done, total)
    return digest.hexdigest()


def cached_imatrix_path(source_file: Path, cache_dir: Path, digest: str, chunks: int | None = None) -> Path:
    """Where ``--imatrix`` without a file keeps the imatrix of a source: beside it, keyed by the source's hash
    (and the chunk limit, if any)."""
    stem = source_file.name.removesuffix(".gguf")
    limit = f".c{chunks}" if chunks else ""
    return cache_dir / f"{stem}.{digest[:16]}{limit}.imatrix.gguf"


def builtin_imatrix(source: Source, cache_dir: Path, *, threads: int | None = None, n_gpu_layers: int = -1,
                    chunks: int | None = None, stage: Stage | None = None) -> tuple[Path, bool]:
    """The imatrix of ``source`` computed on the built-in calibration text, cached; returns (path, reused)."""
    with stage_progress(stage, "hashing source", "bytes") as update:
        digest = file_sha256(source.path, update)
    path = cached_imatrix_path(source.path, cache_dir, digest, chunks)
    dataset = calibration.builtin_name(calibration.CALIBRATION)
    if path.is_file():
        try:
            cached = read_imatrix(path)
            if cached.datasets == [dataset]:
                check_against_model(cached, source.weights)
                return path, True
        except InputError:
            pass
    text = calibration.calibration_text()
    if chunks is not None:  # windows spread over every file (language, kind) of the text, not its first N chunks
        text = spread_calibration(source.path, chunks)
    with stage_progress(stage, "imatrix (built-in text)", "chunks") as update:
        result = compute_imatrix(source.path, text, dataset=dataset, threads=threads, n_gpu_layers=n_gpu_layers,
                                 chunks=chunks, parse_special=True, progress=_say_how_long(update, chunks is None))
    write_imatrix(result.imatrix, path)
    return path, False


def spread_calibration(model: Path, chunks: int, n_ctx: int = 512) -> str:
    """``chunks`` windows of a little over ``n_ctx`` tokens (the model's tokenizer) spread over every file of the
    built-in calibration text; the whole text when that is shorter."""
    text = calibration.calibration_text()
    with llama.Model(model, vocab_only=True) as m:
        probe = text[:200_000]
        per_token = len(probe) / max(1, len(m.tokenize(probe)))
        sample = calibration.spread_windows(calibration.builtin_parts(calibration.CALIBRATION), chunks,
                                            int(1.25 * n_ctx * per_token) + 1)
        return sample if len(m.tokenize(sample)) >= n_ctx * chunks else text


IMATRIX_NOTE_S = 120.0  # an imatrix expected to take longer than this says so, and how to make it shorter
log = logging.getLogger("cl3")


def _say_how_long(update: Callable[[int, int], None] | None, whole_text: bool) -> Callable[[int, int], None]:
    """``update``, and a note (logger "cl3") at the first chunks done when the whole imatrix will take longer than
    IMATRIX_NOTE_S on this machine: how long, and how to make it shorter."""
    started = time.monotonic()
    said = False

    def progress(done: int, total: int) -> None:
        nonlocal said
        if update is not None:
            update(done, total)
        if said or done <= 0 or not total:
            return
        said = True
        each = (time.monotonic() - started) / done
        if each * total <= IMATRIX_NOTE_S:
            return
        fewer = max(4, min(total // 2, int(IMATRIX_NOTE_S / each)))
        shorter = (f"--imatrix-chunks {fewer} (chunks spread over the text's languages and kinds) takes about "
                   f"{duration(each * fewer)}, " if whole_text else "")
        log.warning(f"the imatrix takes about {duration(each * total)} on this machine ({total} chunks of the "
                    f"built-in text, {each:.1f} s each so far); {shorter}or give an imatrix file (--imatrix FILE)")
    return progress


def output_target(out: str | os.PathLike | None, n_types: int) -> tuple[Path | None, bool]:
    """(path, is a folder) for ``out``: a folder (created when missing) or, for one type only, a file name in an
    existing folder. Checked before any work (an HF source is converted first)."""
    if out is None:
        return None, True
    if is_directory_target(out):
        return output_directory(out), True
    path = Path(out)
    if n_types > 1:
        raise UsageError(f"{path} is not a folder; several types need a folder for their outputs "
                         f"(end the name with / to create one)")
    if not path.parent.is_dir() and str(path.parent):
        raise OutputError(f"output directory does not exist: {path.parent}")
    return path, False


def plan_outputs(source: Source, types: list[llama.FileType], out: Path | None, out_is_dir: bool, default_dir: Path,
                 suffix: str = "", force: bool = False) -> list[Path]:
    """Output path per type: ``out`` if it names a file (one type only), else default names in ``out`` or beside
    the source. Existing files are refused unless ``force``."""
    if out is not None and not out_is_dir:
        outputs = [out]
    else:
        directory = out if out is not None else default_dir
        outputs = [directory / source.output_name(t, suffix) for t in types]
    for path in outputs:
        if path.exists() and path.resolve() == source.path.resolve():
            raise UsageError(f"the output would overwrite the source: {path}")
        check_new_output(path, force)
    return outputs


def quantize_gguf(src: Path, dst: Path, file_type: llama.FileType, *, imatrix: ImatrixChoice | None = None,
                  threads: int | None = None, output_tensor_type: int | None = None, token_embedding_type: int | None = None,
                  pure: bool = False, leave_output_tensor: bool = False, allow_requantize: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Quantize one GGUF to one file type, atomically."""
    with atomic_output(dst) as tmp:
        llama.quantize_file(src, tmp, file_type.ftype, threads=threads or 0,
                            imatrix=imatrix.importances if imatrix else None,
                            metadata=imatrix.metadata() if imatrix else None,
                            output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type,
                            pure=pure, leave_output_tensor=leave_output_tensor, allow_requantize=allow_requantize,
                            progress=progress)
    return dst


@dataclass
class QuantizeResult:
    outputs: list[Path]
    imatrix_file: Path | None = None
    imatrix_reused: bool = False
    plan: mix.MixPlan | None = None          # with a target: the mix (also for a dry run, which writes nothing)
    mix: mix.MixResult | None = None


def quantize(src: str | os.PathLike, types: str | Iterable[str] | None = None, *, out: str | os.PathLike | None = None,
             imatrix: str | os.PathLike | bool | None = None, threads: int | None = None, n_gpu_layers: int = -1,
             output_tensor_type: str | None = None, token_embedding_type: str | None = None,
             pure: bool = False, leave_output_tensor: bool = False, allow_requantize: bool = False,
             imatrix_chunks: int | None = None, force: bool = False, target: mix.Target | None = None,
             measure: str = "auto", sensitivity_chunks: int = 4, dry_run: bool = False,
             on_plan: Callable[[mix.MixPlan], None] | None = None, stage: Stage | None = None) -> QuantizeResult:
    """Quantize ``src`` (an F32/F16/BF16 GGUF or an HF checkpoint directory) to every type in ``types``, or, with
    ``target`` (a size or BPW), to the per-tensor mix of least predicted KL divergence that fits (see cl3.mix).

    ``imatrix``: a file, ``True`` to compute (or reuse) one on the built-in calibration text cached beside the
    source (``imatrix_chunks`` limits its text), or ``None``. ``out``: a file (one type) or a folder; default names
    are ``{name}-{size}-{TYPE}.gguf`` (a mix: ``{name}-{size}-mix-{target}.gguf``), with ``-im`` when an imatrix is
    used (it is also recorded in the metadata). A mix: ``measure`` and ``sensitivity_chunks`` say how its
    sensitivity is measured (cached beside the source), ``on_plan(plan)`` sees the plan before any quantization,
    and ``dry_run`` stops there. Existing outputs are replaced only with ``force``. Everything is checked before any
    work; each output is written atomically.
    """
    src = Path(src)
    if target is not None:
        if types:
            raise UsageError("give either quantization types or a target size, not both", param="target_size")
        if pure or leave_output_tensor or output_tensor_type or token_embedding_type:
            raise UsageError("a mix chooses every tensor's type itself; drop --pure, --leave-output-tensor and the "
                             "tensor type options", param="target_size")
        if allow_requantize:
            raise UsageError("a mix starts from an F32, F16 or BF16 model", param="allow_requantize")
        if measure not in ("auto", *mix.MODES):
            raise UsageError(f"unknown sensitivity mode {measure!r} (auto, {', '.join(mix.MODES)})", param="measure")
        if sensitivity_chunks < 1:
            raise UsageError("the sensitivity needs at least 1 chunk", param="sensitivity_chunks")
    file_types = resolve_types(types) if target is None else [llama.file_types()["Q8_0"]]
    out_type = ggml_type(output_tensor_type, "output tensor")
    embd_type = ggml_type(token_embedding_type, "token embedding")
    needs = [t.name for t in file_types if t.needs_imatrix]
    if needs and not imatrix:
        raise UsageError(f"{', '.join(needs)} needs an importance matrix (a file, or one computed on the built-in "
                         "calibration text)", param="imatrix")
    if imatrix_chunks is not None and imatrix_chunks < 1:
        raise UsageError("the imatrix needs at least 1 chunk", param="imatrix_chunks")
    check_model_source(src)
    imatrix_path = Path(imatrix) if isinstance(imatrix, (str, os.PathLike)) else None
    if imatrix_path is not None and not imatrix_path.is_file():
        raise InputError(f"imatrix file not found: {imatrix_path}")
    out_path, out_is_dir = output_target(out, len(file_types))  # before converting an HF checkpoint

    with contextlib.ExitStack() as stack:
        if src.is_dir():
            from .convert import convert

            work_dir = out_path if out_is_dir and out_path is not None else (
                (out_path.parent if str(out_path.parent) else Path(".")) if out_path is not None else src.parent)
            tmp_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".cl3-convert-", dir=work_dir)))
            gguf_src = tmp_dir / f"{src.name}-F16.gguf"
            with stage_progress(stage, "converting to F16", "bytes") as update:
                convert(src, gguf_src, outtype="f16", progress=update)
            default_dir, cache_dir = src.parent, src.parent
        else:
            gguf_src = src
            default_dir = cache_dir = src.parent if str(src.parent) else Path(".")
        source = Source.open(gguf_src, allow_requantize=allow_requantize)
        if target is not None:
            name = f"{source.base_name}-mix-{target.label}{'-im' if imatrix else ''}.gguf"
            outputs = [out_path if out_path is not None and not out_is_dir else (out_path or default_dir) / name]
            for path in [outputs[0], *mix.recipe_paths(outputs[0])]:
                if not dry_run:
                    check_new_output(path, force)
        else:
            outputs = plan_outputs(source, file_types, out_path, out_is_dir, default_dir, "-im" if imatrix else "",
                                   force)

        choice = None
        result = QuantizeResult(outputs)
        if imatrix_path is not None:
            choice = load_imatrix_for(source, imatrix_path)
            result.imatrix_file = imatrix_path
        elif imatrix is True:
            path, reused = builtin_imatrix(source, cache_dir, threads=threads, n_gpu_layers=n_gpu_layers,
                                           chunks=imatrix_chunks, stage=stage)
            choice = load_imatrix_for(source, path)  # read back: exactly the file's float32 values, as llama-quantize
            result.imatrix_file, result.imatrix_reused = path, reused

        if target is not None:
            return _quantize_mix(source, target, outputs[0], result, choice, cache_dir=cache_dir, threads=threads,
                                 n_gpu_layers=n_gpu_layers, measure=measure, chunks=sensitivity_chunks,
                                 dry_run=dry_run, force=force, on_plan=on_plan, stage=stage)
        done: list[Path] = []
        try:
            for file_type, output in zip(file_types, outputs):
                with stage_progress(stage, file_type.name, "tensors") as update:
                    quantize_gguf(gguf_src, output, file_type, imatrix=choice, threads=threads,
                                  output_tensor_type=out_type, token_embedding_type=embd_type, pure=pure,
                                  leave_output_tensor=leave_output_tensor, allow_requantize=allow_requantize,
                                  progress=update)
                done.append(output)
        except KeyboardInterrupt:
            if not done:
                raise
            rest = [t.name for t in file_types[len(done):]]
            raise Interrupted(f"kept: {', '.join(map(str, done))} (complete); not written: {', '.join(rest)}") \
                from None
    return result


def _quantize_mix(source: Source, target: mix.Target, output: Path, result: QuantizeResult,
                  choice: ImatrixChoice | None, *, cache_dir: Path, threads: int | None, n_gpu_layers: int,
                  measure: str, chunks: int, dry_run: bool, force: bool,
                  on_plan: Callable[[mix.MixPlan], None] | None, stage: Stage | None) -> QuantizeResult:
    importances = choice.importances if choice else None
    sens = mix.sensitivity(source.path, importances=importances, imatrix_name=choice.file if choice else None,
                           mode=measure, chunks=chunks, threads=threads, n_gpu_layers=n_gpu_layers,
                           cache_dir=cache_dir, stage=stage)
    result.plan = mix.plan_mix(source.path, target, sens, imatrix_metadata=choice.metadata() if choice else None)
    if on_plan is not None:
        on_plan(result.plan)
    if dry_run:
        result.outputs = []
        return result
    result.mix = mix.quantize_mix(result.plan, output, importances=importances,
                                  imatrix_file=choice.file if choice else None, threads=threads,
                                  n_gpu_layers=n_gpu_layers, force=force, stage=stage)
    return result
