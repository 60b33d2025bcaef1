"""Quantize a GGUF (or an HF checkpoint, converted on the fly) to one or several llama.cpp file types.

The work is llama.cpp's own ``llama_model_quantize``; cl3 resolves the types, checks everything before any work
(types, source, imatrix against the model), passes the importance matrix as the C array llama.h defines, records the
same ``quantize.imatrix.*`` provenance keys as llama-quantize, and writes every output atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from . import calibration, llama
from .errors import InputError, OutputError, UsageError
from .files import atomic_output
from .imatrix import Imatrix, check_against_model, compute_imatrix, read_imatrix, write_imatrix

ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
SOURCE_TYPES = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16}

KV_IMATRIX_FILE = "quantize.imatrix.file"
KV_IMATRIX_DATASET = "quantize.imatrix.dataset"
KV_IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
KV_IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"

# progress(description, unit) -> context manager yielding update(done, total)
Stage = Callable[[str, str], AbstractContextManager[Callable[[int, int], None]]]


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
            raise UsageError(f"unknown quantization type {item!r} (known: {', '.join(file_type_names())})")
        if known[name] not in types:
            types.append(known[name])
    if not types:
        raise UsageError("no quantization type given")
    return types


def ggml_type(name: str | None, option: str) -> int | None:
    if name is None:
        return None
    try:
        return llama.ggml_type_by_name(name)
    except ValueError:
        raise UsageError(f"{option}: unknown tensor type {name!r}") from None


@dataclass
class Source:
    """What cl3 needs to know about a source GGUF before quantizing it."""

    path: Path
    weights: dict[str, tuple[int, ...]]  # tensor name -> ne[0..3]
    base_name: str

    @classmethod
    def open(cls, path: Path) -> Source:
        if not path.is_file():
            raise InputError(f"no such GGUF file: {path}")
        summary = llama.read_gguf_summary(path)
        meta = summary.strings
        if meta.get("general.type", "model") != "model":
            raise InputError(f"{path} is not a model GGUF (general.type = {meta['general.type']})")
        if not summary.tensors:
            raise InputError(f"{path} holds no tensors")
        quantized = [name for name, (qtype, ne) in summary.tensors.items() if ne[1] > 1 and qtype not in SOURCE_TYPES]
        if quantized:
            raise InputError(f"{path} is already quantized ({quantized[0]}); quantize from an F32, F16 or BF16 GGUF")
        weights = {name: ne for name, (_, ne) in summary.tensors.items()}
        size_label = meta.get("general.size_label")
        if size_label is None:
            n_params = sum(math.prod(ne) for ne in weights.values())
            size_label = gguf.model_weight_count_rounded_notation(n_params)
        base = gguf.naming_convention(meta.get("general.name"), meta.get("general.basename"),
                                      meta.get("general.finetune"), meta.get("general.version"), size_label, None)
        return cls(path, weights, base)

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


def builtin_imatrix(source: Source, cache_dir: Path, *, threads: int | None = None, chunks: int | None = None,
                    stage: Stage | None = None) -> tuple[Path, bool]:
    """The imatrix of ``source`` computed on the built-in calibration text, cached; returns (path, reused)."""
    with _stage(stage, "hashing source", "bytes") as update:
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
    with _stage(stage, "imatrix (built-in text)", "chunks") as update:
        result = compute_imatrix(source.path, calibration.calibration_text(), dataset=dataset, threads=threads,
                                 chunks=chunks, parse_special=True, progress=update)
    write_imatrix(result.imatrix, path)
    return path, False


@contextlib.contextmanager
def _stage(stage: Stage | None, description: str, unit: str) -> Iterator[Callable[[int, int], None] | None]:
    if stage is None:
        yield None
    else:
        with stage(description, unit) as update:
            yield update


def check_output_target(out: Path | None, n_types: int) -> None:
    """``out`` names a file only for one type, and then in an existing directory."""
    if out is not None and not out.is_dir():
        if n_types > 1:
            raise UsageError(f"{out} is not a directory; several types need a directory for their outputs")
        if not out.parent.is_dir() and str(out.parent):
            raise OutputError(f"output directory does not exist: {out.parent}")


def plan_outputs(source: Source, types: list[llama.FileType], out: Path | None, default_dir: Path,
                 suffix: str = "") -> list[Path]:
    """Output path per type: ``out`` if it is a file name (one type only), else default names in ``out`` or beside
    the source."""
    check_output_target(out, len(types))
    if out is not None and not out.is_dir():
        outputs = [out]
    else:
        directory = out if out is not None else default_dir
        outputs = [directory / source.output_name(t, suffix) for t in types]
    for path in outputs:
        if path.exists() and path.resolve() == source.path.resolve():
            raise UsageError(f"the output would overwrite the source: {path}")
    return outputs


def quantize_gguf(src: Path, dst: Path, file_type: llama.FileType, *, imatrix: ImatrixChoice | None = None,
                  threads: int = 0, output_tensor_type: int | None = None, token_embedding_type: int | None = None,
                  pure: bool = False, leave_output_tensor: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Quantize one GGUF to one file type, atomically."""
    with atomic_output(dst) as tmp:
        try:
            llama.quantize_file(src, tmp, file_type.ftype, threads=threads,
                                imatrix=imatrix.importances if imatrix else None,
                                metadata=imatrix.metadata() if imatrix else None,
                                output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type,
                                pure=pure, leave_output_tensor=leave_output_tensor, progress=progress)
        except Exception:
            if _free_bytes(dst.parent) < 1 << 20:
                raise OutputError(f"no space left on the device while writing {dst}") from None
            raise
    return dst


def _free_bytes(directory: Path) -> int:
    try:
        st = os.statvfs(directory)
        return st.f_bavail * st.f_frsize
    except OSError:
        return 1 << 62


@dataclass
class QuantizeResult:
    outputs: list[Path]
    imatrix_file: Path | None = None
    imatrix_reused: bool = False


def quantize(src: str | os.PathLike, types: str | Iterable[str], *, out: str | os.PathLike | None = None,
             imatrix: str | os.PathLike | bool | None = None, threads: int = 0,
             output_tensor_type: str | None = None, token_embedding_type: str | None = None,
             pure: bool = False, leave_output_tensor: bool = False, imatrix_chunks: int | None = None,
             name_imatrix: bool = False, stage: Stage | None = None) -> QuantizeResult:
    """Quantize ``src`` (an F32/F16/BF16 GGUF or an HF checkpoint directory) to every type in ``types``.

    ``imatrix``: a file, ``True`` to compute (or reuse) one on the built-in calibration text cached beside the
    source (``imatrix_chunks`` limits its text), or ``None``; ``name_imatrix`` appends ``-im`` to default output
    names (the imatrix is always recorded in the metadata). Everything is checked before any work; each output is written atomically.
    """
    src = Path(src)
    file_types = resolve_types(types)
    out_type = ggml_type(output_tensor_type, "--output-tensor-type")
    embd_type = ggml_type(token_embedding_type, "--token-embedding-type")
    needs = [t.name for t in file_types if t.needs_imatrix]
    if needs and not imatrix:
        raise UsageError(f"{', '.join(needs)} needs an importance matrix: add --imatrix (optionally with a file)")
    if imatrix_chunks is not None and imatrix_chunks < 1:
        raise UsageError("--imatrix-chunks must be at least 1")
    if not src.exists():
        raise InputError(f"no such file or directory: {src}")
    imatrix_path = Path(imatrix) if isinstance(imatrix, (str, os.PathLike)) else None
    if imatrix_path is not None and not imatrix_path.is_file():
        raise InputError(f"imatrix file not found: {imatrix_path}")
    out_path = Path(out) if out is not None else None
    check_output_target(out_path, len(file_types))  # before converting an HF checkpoint

    with contextlib.ExitStack() as stack:
        if src.is_dir():
            from .convert import convert

            if out_path is not None and out_path.is_dir():
                work_dir = out_path
            elif out_path is not None:
                work_dir = out_path.parent if str(out_path.parent) else Path(".")
            else:
                work_dir = src.parent
            tmp_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".cl3-convert-", dir=work_dir)))
            gguf_src = tmp_dir / f"{src.name}-F16.gguf"
            with _stage(stage, "converting to F16", "bytes") as update:
                convert(src, gguf_src, outtype="f16", progress=update)
            default_dir, cache_dir = src.parent, src.parent
        else:
            gguf_src = src
            default_dir = cache_dir = src.parent if str(src.parent) else Path(".")
        source = Source.open(gguf_src)
        outputs = plan_outputs(source, file_types, out_path, default_dir, "-im" if name_imatrix and imatrix else "")

        choice = None
        result = QuantizeResult(outputs)
        if imatrix_path is not None:
            choice = load_imatrix_for(source, imatrix_path)
            result.imatrix_file = imatrix_path
        elif imatrix is True:
            path, reused = builtin_imatrix(source, cache_dir, threads=threads or None, chunks=imatrix_chunks,
                                           stage=stage)
            choice = load_imatrix_for(source, path)
            result.imatrix_file, result.imatrix_reused = path, reused

        for file_type, output in zip(file_types, outputs):
            with _stage(stage, file_type.name, "tensors") as update:
                quantize_gguf(gguf_src, output, file_type, imatrix=choice, threads=threads,
                              output_tensor_type=out_type, token_embedding_type=embd_type, pure=pure,
                              leave_output_tensor=leave_output_tensor, progress=update)
    return result
