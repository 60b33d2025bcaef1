"""Importance matrices: collect activation statistics while llama.cpp evaluates text, and read/write llama.cpp's files.

Collection mirrors llama.cpp's ``llama-imatrix`` (tools/imatrix/imatrix.cpp): the scheduler's eval callback is asked
about every graph node; cl3 takes every MUL_MAT_ID, and every MUL_MAT whose weight is a ``blk.*`` tensor (optionally
``output.weight``) with at least 16 F32 input rows. For each, the squares of the input rows are summed per column
(per expert for MoE) and the rows are counted. The text is cut into chunks of ``n_ctx`` tokens; each chunk starts with
BOS when the vocabulary adds one, and every token requests its logits (as llama-imatrix does, which also keeps the last
layer computing every row).

Files: the GGUF format (``general.type = imatrix``, ``imatrix.datasets``, ``imatrix.chunk_count``,
``imatrix.chunk_size``, tensors ``<weight>.in_sum2`` and ``<weight>.counts``), and the legacy ``.dat`` format (read).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from . import llama
from .errors import InputError, LlamaError, OutputError, UsageError
from .files import atomic_output
from .scoring import ChunkLayout, nll, score_chunks

IMATRIX_DATASETS = gguf.Keys.IMatrix.DATASETS
IMATRIX_CHUNK_COUNT = gguf.Keys.IMatrix.CHUNK_COUNT
IMATRIX_CHUNK_SIZE = gguf.Keys.IMatrix.CHUNK_SIZE
MIN_ROWS = 16  # llama-imatrix ignores matrix multiplications over fewer rows


@dataclass
class Entry:
    """Sums of squared inputs per column, one row per matrix (expert), and how many input rows each matrix saw."""

    sums: np.ndarray    # float64 while collecting, float32 when read; shape (n_mat, n_cols)
    counts: np.ndarray  # int64, shape (n_mat,)


@dataclass
class Imatrix:
    entries: dict[str, Entry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    is_legacy: bool = False      # legacy .dat: sums already normalised to (sum / count) * ncall, counts = [ncall]
    has_metadata: bool = True

    def importances(self) -> dict[str, np.ndarray]:
        """Per-weight column importances as llama-quantize computes them from this file (float32, flattened)."""
        out = {}
        for name, e in self.entries.items():
            sums = np.asarray(e.sums, dtype=np.float32).reshape(len(e.counts), -1)
            counts = np.asarray(e.counts).astype(np.float32)
            if self.is_legacy:
                ncall = counts[0] if len(counts) else 0
                values = sums / np.float32(ncall) if ncall > 0 else sums.copy()
            else:
                values = np.ones_like(sums)
                seen = counts > 0
                values[seen] = sums[seen] / counts[seen, None]
            out[name] = values.reshape(-1)
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------------

def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """Read a GGUF imatrix (llama-imatrix or cl3) or a legacy ``.dat`` file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"imatrix file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf(path)
    return _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as ex:  # noqa: BLE001 - gguf raises ValueError, struct.error, ... on damaged files
        raise InputError(f"{path} is not a readable GGUF file ({ex})") from None
    general_type = reader.get_field(gguf.Keys.General.TYPE)
    if general_type is not None and general_type.contents() != "imatrix":
        raise InputError(f"{path} is a GGUF {general_type.contents()} file, not an imatrix")
    fields = {name: reader.get_field(name) for name in (IMATRIX_DATASETS, IMATRIX_CHUNK_COUNT, IMATRIX_CHUNK_SIZE)}
    imatrix = Imatrix(has_metadata=all(f is not None for f in fields.values()))
    if fields[IMATRIX_DATASETS] is not None:
        imatrix.datasets = list(fields[IMATRIX_DATASETS].contents())
    if fields[IMATRIX_CHUNK_COUNT] is not None:
        imatrix.chunk_count = int(fields[IMATRIX_CHUNK_COUNT].contents())
    if fields[IMATRIX_CHUNK_SIZE] is not None:
        imatrix.chunk_size = int(fields[IMATRIX_CHUNK_SIZE].contents())
    if not reader.tensors:
        raise InputError(f"{path} holds no imatrix data")

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for tensor in reader.tensors:
        for suffix in (".in_sum2", ".counts"):
            if tensor.name.endswith(suffix):
                if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise InputError(f"{path}: {tensor.name} must be F32")
                pairs.setdefault(tensor.name[: -len(suffix)], {})[suffix] = np.array(tensor.data, dtype=np.float32)
    for name, pair in sorted(pairs.items()):
        if len(pair) != 2:
            raise InputError(f"{path}: mismatched sums and counts for {name}")
        counts = np.array([round(float(c)) for c in pair[".counts"].reshape(-1)], dtype=np.int64)
        sums = pair[".in_sum2"].reshape(-1)
        if len(counts) == 0 or sums.size % len(counts):
            raise InputError(f"{path}: {name} has {sums.size} sums for {len(counts)} counts")
        imatrix.entries[name] = Entry(sums.reshape(len(counts), -1), counts)
    if not imatrix.entries:
        raise InputError(f"{path} holds no imatrix data")
    return imatrix


def _read_legacy(path: Path) -> Imatrix:
    """The pre-GGUF ``.dat`` format: n_entries, then per entry (name, ncall, nval, values), then optional
    chunk count and dataset name."""
    data = path.read_bytes()
    bad = InputError(f"{path} is neither a GGUF imatrix nor a legacy imatrix (.dat) file")
    offset = 0

    def take(fmt: str):
        nonlocal offset
        size = struct.calcsize(fmt)
        if offset + size > len(data):
            raise bad
        values = struct.unpack_from(fmt, data, offset)
        offset += size
        return values

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > len(data) // 12:
        raise bad
    imatrix = Imatrix(is_legacy=True)
    for _ in range(n_entries):
        (length,) = take("<i")
        if length < 0 or offset + length > len(data):
            raise bad
        try:
            name = data[offset: offset + length].decode("utf-8")
        except UnicodeDecodeError:
            raise bad from None
        offset += length
        ncall, nval = take("<ii")
        if nval < 1 or offset + 4 * nval > len(data):
            raise bad
        sums = np.frombuffer(data, dtype="<f4", count=nval, offset=offset).astype(np.float32)
        offset += 4 * nval
        imatrix.entries[name] = Entry(sums.reshape(1, -1), np.array([ncall], dtype=np.int64))
    if offset + 4 <= len(data):
        (imatrix.chunk_count,) = take("<i")
        if offset + 4 <= len(data):
            (length,) = take("<i")
            if 0 < length <= len(data) - offset:
                imatrix.datasets.append(data[offset: offset + length].decode("utf-8", errors="replace"))
    return imatrix


def write_imatrix(imatrix: Imatrix, path: str | os.PathLike) -> Path:
    """Write ``imatrix`` in llama.cpp's GGUF imatrix format (atomically). Entries are stored in sorted name order."""
    import gguf

    if imatrix.is_legacy:
        imatrix = to_raw(imatrix, imatrix.chunk_size or 512)
    path = Path(path)
    with atomic_output(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="")
        try:
            writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # llama-imatrix writes none
            writer.add_string(gguf.Keys.General.TYPE, "imatrix")
            writer.add_key_value(IMATRIX_DATASETS, list(imatrix.datasets), gguf.GGUFValueType.ARRAY,
                                 sub_type=gguf.GGUFValueType.STRING)
            writer.add_uint32(IMATRIX_CHUNK_COUNT, imatrix.chunk_count)
            writer.add_uint32(IMATRIX_CHUNK_SIZE, imatrix.chunk_size)
            for name in sorted(imatrix.entries):
                e = imatrix.entries[name]
                n_mat = len(e.counts)
                if n_mat == 0 or e.sums.size == 0:
                    continue
                # llama-imatrix's shapes: ggml [n, n_mat] and [1, n_mat], stored without trailing 1s (ggml_n_dims), so
                # 1-D [n] and [1] for a dense weight, 2-D for experts
                sums_shape, counts_shape = ((n_mat, -1), (n_mat, 1)) if n_mat > 1 else ((-1,), (1,))
                writer.add_tensor(f"{name}.in_sum2", np.asarray(e.sums, dtype=np.float32).reshape(sums_shape))
                writer.add_tensor(f"{name}.counts", np.asarray(e.counts, dtype=np.float32).reshape(counts_shape))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
        except BaseException:
            with contextlib.suppress(OSError):  # a full disk: release the file (its space) all the same
                writer.close()
            raise
    return path


def to_raw(imatrix: Imatrix, chunk_size: int) -> Imatrix:
    """Turn a legacy imatrix into raw sums and counts, as llama-imatrix does when it loads one."""
    if not imatrix.is_legacy:
        return imatrix
    raw = Imatrix(datasets=list(imatrix.datasets), chunk_size=chunk_size, chunk_count=imatrix.chunk_count)
    for name, e in imatrix.entries.items():
        raw.entries[name] = Entry(np.asarray(e.sums, dtype=np.float64) * chunk_size,
                                  np.array([int(e.counts[0]) * chunk_size], dtype=np.int64))
    return raw


def combine_imatrices(imatrices: list[Imatrix], chunk_size: int) -> Imatrix:
    """Add several imatrices into one, as llama-imatrix ``--in-file A --in-file B`` does: raw sums and counts add
    up (legacy files are first turned into raw form with ``chunk_size``), the datasets are listed in order, and
    the chunk count is the largest count over ``chunk_size``."""
    combined = Imatrix(chunk_size=chunk_size)
    for imatrix in imatrices:
        imatrix = to_raw(imatrix, chunk_size)
        for name, e in imatrix.entries.items():
            sums = np.asarray(e.sums, dtype=np.float64).reshape(len(e.counts), -1)
            counts = np.asarray(e.counts, dtype=np.int64)
            have = combined.entries.get(name)
            if have is None:
                combined.entries[name] = Entry(sums.copy(), counts.copy())
                continue
            if have.sums.size != sums.size:
                raise InputError(f"cannot combine: {name} has {sums.size} values in one imatrix and "
                                 f"{have.sums.size} in another (different models?)")
            if len(have.counts) == 1 and len(counts) > 1:
                have.counts = np.full(len(counts), have.counts[0], dtype=np.int64)
            elif len(counts) != len(have.counts):
                raise InputError(f"cannot combine: {name} has {len(counts)} experts in one imatrix and "
                                 f"{len(have.counts)} in another")
            have.sums = have.sums.reshape(sums.shape) + sums
            have.counts = have.counts + counts
        combined.datasets += imatrix.datasets
    combined.chunk_count = _chunk_count(combined.entries, chunk_size)
    return combined


# ----------------------------------------------------------------------------------------------------------------------
# Collection
# ----------------------------------------------------------------------------------------------------------------------

def _weight_name(name: str) -> str:
    """``CUDA0#blk.0.attn_k.weight#0`` -> ``blk.0.attn_k.weight`` (llama-imatrix's filter_tensor_name)."""
    if "#" in name:
        name = name.split("#", 2)[1]
    return name


class Collector:
    """The eval callback: accumulates squared inputs of weight multiplications into ``self.entries``."""

    def __init__(self, *, process_output: bool = False, start: Imatrix | None = None) -> None:
        self.process_output = process_output
        self.stop_now: Callable[[], bool] = lambda: False  # a second Ctrl-C: abandon the decode under way
        self.entries: dict[str, Entry] = {}
        if start is not None:
            for name, e in start.entries.items():
                self.entries[name] = Entry(np.asarray(e.sums, dtype=np.float64).copy(), e.counts.copy())

    def __call__(self, t: llama.GgmlTensor, ask: bool) -> bool:
        if self.stop_now():
            raise KeyboardInterrupt  # re-raised after the decode (Context); nothing more is collected in it
        if ask:
            return self._wants(t)
        self._collect(t)
        return True

    def _wants(self, t: llama.GgmlTensor) -> bool:
        if t.op == llama.GGML_OP_MUL_MAT_ID:
            return True
        if t.op != llama.GGML_OP_MUL_MAT:
            return False
        src1 = llama.tensor_at(t.src[1])
        if src1.ne[1] < MIN_ROWS or src1.type != llama.GGML_TYPE_F32:
            return False
        name = _weight_name(llama.tensor_name(llama.tensor_at(t.src[0])))
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def _collect(self, t: llama.GgmlTensor) -> None:
        src0 = llama.tensor_at(t.src[0])
        src1 = llama.tensor_at(t.src[1])
        name = _weight_name(llama.tensor_name(src0))
        x = llama.tensor_array(src1)  # (ne3, ne2, ne1, ne0)
        ne0 = src1.ne[0]
        if t.op == llama.GGML_OP_MUL_MAT_ID:
            self._collect_experts(t, src0, src1, name, x, ne0)
            return
        n_mat = src0.ne[2] * src0.ne[3]
        e = self._entry(name, n_mat, ne0, 1)
        if len(e.counts) > 1 and np.all(e.counts == e.counts[0]):
            e.counts = e.counts[:1].copy()
        if n_mat == 1:
            rows = x.reshape(-1, ne0)
            e.sums[0] += np.einsum("ij,ij->j", rows, rows, dtype=np.float32)
        else:
            for i3 in range(src1.ne[3]):
                for i2 in range(src1.ne[2]):
                    mat = (i3 % src0.ne[3]) * src0.ne[2] + (i2 % src0.ne[2])
                    rows = x[i3, i2]
                    e.sums[mat] += np.einsum("ij,ij->j", rows, rows, dtype=np.float32)
        if not np.all(np.isfinite(e.sums)):
            raise LlamaError(f"non-finite activations in {name}")
        e.counts += llama.tensor_rows(src1) // n_mat

    def _collect_experts(self, t, src0, src1, name: str, x: np.ndarray, ne0: int) -> None:
        # ids: [n_expert_used, n_tokens] (int32, maybe strided); src1: [cols, n_expert_used or 1, n_tokens]
        ids_t = llama.tensor_at(t.src[2])
        ids = llama.tensor_array(ids_t, dtype=np.int32)[0, 0]  # (n_tokens, n_ids)
        n_as = src0.ne[2]
        if llama.tensor_rows(src1) != src1.ne[1] * src1.ne[2]:
            raise LlamaError(f"{name}: expert inputs with more than 3 dimensions are not supported")
        e = self._entry(name, n_as, ne0, n_as)
        if len(e.counts) == 1 and n_as > 1:
            e.counts = np.full(n_as, e.counts[0], dtype=np.int64)
        if len(e.counts) != n_as:
            raise LlamaError(f"inconsistent expert count for {name} ({len(e.counts)} vs {n_as})")
        if ids.size and (ids.min() < 0 or ids.max() >= n_as):
            raise LlamaError(f"expert id out of range in {name}")
        x3 = x[0]  # (n_tokens, n_src_rows, ne0)
        n_ids = ids.shape[1]
        for idx in range(n_ids):
            rows = x3[:, idx % src1.ne[1], :]
            squares = np.square(rows, dtype=np.float32)
            experts = ids[:, idx]
            np.add.at(e.sums, experts, squares)
            e.counts += np.bincount(experts, minlength=n_as)
        touched = np.unique(ids)
        if not np.all(np.isfinite(e.sums[touched])):
            raise LlamaError(f"non-finite activations in {name}")

    def _entry(self, name: str, n_mat: int, ne0: int, n_counts: int) -> Entry:
        e = self.entries.get(name)
        if e is None:
            e = self.entries[name] = Entry(np.zeros((n_mat, ne0), dtype=np.float64), np.zeros(n_counts, np.int64))
        elif e.sums.size != n_mat * ne0:
            raise LlamaError(f"inconsistent size for {name} ({e.sums.size} vs {n_mat * ne0})")
        else:
            e.sums = e.sums.reshape(n_mat, ne0)
        return e

    def snapshot(self) -> dict[str, Entry]:
        return {n: Entry(e.sums.copy(), e.counts.copy()) for n, e in self.entries.items()}


@dataclass
class ImatrixResult:
    imatrix: Imatrix
    perplexity: float | None
    chunks_done: int       # chunks evaluated by this run (not counting resumed ones)
    backend: str = "CPU"   # where the layers ran


def compute_imatrix(model: str | os.PathLike, text: str, *, dataset: str, n_ctx: int = 512,
                    chunks: int | None = None, n_batch: int = 2048, threads: int | None = None,
                    n_gpu_layers: int = -1, parse_special: bool = False, process_output: bool = False,
                    resume: Imatrix | None = None, start: Imatrix | None = None,
                    checkpoint: Callable[[Imatrix], None] | None = None, checkpoint_every: int = 10,
                    progress: Callable[[int, int], None] | None = None,
                    on_perplexity: Callable[[float], None] | None = None) -> ImatrixResult:
    """Evaluate ``text`` with llama.cpp and collect the importance matrix of ``model``.

    ``resume`` continues a partial imatrix (its chunks are skipped); ``start`` adds the statistics of the whole
    text to an existing imatrix (llama-imatrix ``--in-file`` with a text); ``checkpoint(imatrix)`` is called every
    ``checkpoint_every`` chunks and, on Ctrl-C, with what was collected up to the last complete chunk before
    KeyboardInterrupt propagates. ``progress(done, total)`` counts chunks; ``on_perplexity`` gets the running value.
    """
    model = Path(model)
    layout = ChunkLayout.of(n_ctx, n_batch)
    if chunks is not None and chunks < 1:
        raise UsageError("the number of chunks must be at least 1", param="chunks")
    start_chunk = 0
    datasets = [dataset]
    if resume is not None:
        if resume.is_legacy:
            resume = to_raw(resume, n_ctx)
        if resume.chunk_size and resume.chunk_size != n_ctx:
            raise UsageError(f"cannot resume: the partial imatrix used chunks of {resume.chunk_size} tokens, "
                             f"not {n_ctx}")
        start_chunk = _chunk_count(resume.entries, n_ctx)
        datasets = list(resume.datasets) or datasets
    elif start is not None:
        start = to_raw(start, n_ctx)
        datasets = list(start.datasets) + datasets
    earlier = resume or start
    if earlier is not None:
        check_against_model(earlier, model_weights(model), source="the earlier imatrix")

    collector = Collector(process_output=process_output, start=earlier)
    with llama.Model(model, n_gpu_layers=n_gpu_layers) as m:
        tokens = m.tokenize(text, add_special=True, parse_special=parse_special)
        if start_chunk:
            if (start_chunk + 2) * n_ctx >= len(tokens):
                raise InputError(f"cannot resume: the text has no chunks left after the {start_chunk} already done")
            tokens = tokens[start_chunk * n_ctx:]
        n_chunks = layout.chunks_in(len(tokens))
        if chunks is not None:
            n_chunks = min(n_chunks, max(chunks - start_chunk, 0))

        def current() -> Imatrix:
            entries = collector.snapshot()
            return Imatrix(entries, datasets, _chunk_count(entries, n_ctx), n_ctx)

        sums = {"nll": 0.0, "count": 0, "done": 0}
        saved = current()

        def on_rows(chunk: int, logits: np.ndarray, targets: np.ndarray) -> None:
            if collector.stop_now():
                raise KeyboardInterrupt
            sums["nll"] += float(nll(logits, targets).sum())
            sums["count"] += len(targets)

        def after_group(done: int, total: int) -> None:
            nonlocal saved
            if collector.stop_now():  # this group may lack what a callback dropped: keep the last snapshot
                raise KeyboardInterrupt
            before, sums["done"] = sums["done"], done
            saved = current()
            if progress:
                progress(done, total)
            if on_perplexity:
                on_perplexity(math.exp(sums["nll"] / sums["count"]))
            if checkpoint and done // checkpoint_every > before // checkpoint_every and done < total:
                checkpoint(saved)
            if presses():
                raise KeyboardInterrupt

        try:
            with _deferred_interrupt() as presses, \
                    llama.Context(m, n_ctx=layout.ctx_size, n_batch=layout.n_batch, n_seq=layout.n_seq,
                                  n_ubatch=layout.ubatch_without_small_pieces(n_chunks, MIN_ROWS),
                                  threads=threads, on_eval=collector) as ctx:
                collector.stop_now = lambda: presses() >= 2
                score_chunks(ctx, tokens, layout, n_chunks, on_rows, all_outputs=True, after_group=after_group)
        except KeyboardInterrupt:
            if checkpoint and saved.entries:
                checkpoint(saved)
            raise
    perplexity = math.exp(sums["nll"] / sums["count"]) if sums["count"] else None
    return ImatrixResult(saved, perplexity, n_chunks, m.backend)


def imatrix_file_size(weights: dict[str, tuple[int, ...]], *, process_output: bool = False,
                      datasets: list[str] | None = None) -> int:
    """An upper bound of the size of the imatrix file of a model with these weights (GGUF shapes by name): one
    in_sum2 (ne0 per matrix) and one counts (1 per matrix) tensor per blk.* matrix, aligned to 32 bytes, with
    their headers and the metadata."""
    size = 4096 + sum(len(d.encode()) + 8 for d in datasets or [])
    for name, ne in weights.items():
        if len(ne) < 2 or not (name.startswith("blk.") or (process_output and name == "output.weight")):
            continue
        n_mat = ne[2] if len(ne) > 2 else 1
        size += 2 * (len(name.encode()) + 8 + 64) + (4 * ne[0] * n_mat + 31) // 32 * 32 + (4 * n_mat + 31) // 32 * 32
    return size


def _check_room(out: Path, needed: int) -> None:
    import shutil

    folder = out.parent if str(out.parent) else Path(".")
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(f"{folder} has {free / 1e6:.1f} MB free; the imatrix (and its checkpoints) needs about "
                          f"{needed / 1e6:.1f} MB: point the output at a folder with room", param="out")


def _write_or_keep(imatrix: Imatrix, out: Path) -> None:
    """Write the finished imatrix; when that fails (a full disk), keep it in the cache instead of losing the run."""
    from . import paths

    try:
        write_imatrix(imatrix, out)
    except OutputError as ex:
        kept = paths.cache_dir() / "imatrix" / out.name
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            write_imatrix(imatrix, kept)
        except (OutputError, OSError):
            raise OutputError(f"{ex}; nothing could be kept ({kept.parent} is not writable or full either): point "
                              "the output at a folder with room", param="out") from None
        raise OutputError(f"{ex}; the {imatrix.chunk_count} chunks computed are kept in {kept}: move it where you "
                          "want it once there is room (no need to compute them again)") from None


def model_weights(model: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """The model's tensor shapes (ne0, ne1, ...) by name, from its GGUF header."""
    from .metadata import read_metadata

    return {t.name: t.ne for t in read_metadata(model).tensors}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`make_imatrix`; ``saved_chunks`` chunks were written to ``path`` (0: nothing saved)."""

    def __init__(self, path: Path, saved_chunks: int):
        super().__init__()
        self.path, self.saved_chunks = path, saved_chunks


@dataclass
class ImatrixRun:
    path: Path
    imatrix: Imatrix
    perplexity: float | None = None   # running PPL of the evaluated text (None when only combining)
    combined: int = 0                  # earlier imatrices added in
    backend: str | None = None         # where the layers ran (None when only combining)


def default_output(model: Path) -> Path:
    """Where an imatrix goes by default: ``MODEL.imatrix.gguf`` beside the model."""
    return model.with_name(model.name.removesuffix(".gguf") + ".imatrix.gguf")


def make_imatrix(model: str | os.PathLike | None, texts: list[str | os.PathLike] | None = None, *,
                 out: str | os.PathLike | None = None, resume: bool = False,
                 in_files: list[str | os.PathLike] | None = None, force: bool = False, n_ctx: int = 512,
                 chunks: int | None = None, n_batch: int = 2048, threads: int | None = None, n_gpu_layers: int = -1,
                 parse_special: bool | None = None, process_output: bool = False,
                 progress: Callable[[int, int], None] | None = None,
                 on_perplexity: Callable[[float], None] | None = None) -> ImatrixRun:
    """What `cl3 imatrix` does, checked before any work: compute ``model``'s imatrix over ``texts`` (default: the
    built-in calibration text), continuing the partial file at ``out`` with ``resume``, starting from the sum of
    ``in_files``; without a model, only combine ``in_files``. Checkpoints and the result go to ``out`` atomically.

    ``parse_special`` (read <|special|> tokens as tokens) defaults to on for the built-in text, off for files,
    as llama-imatrix does. Ctrl-C raises :class:`Interrupted` after saving what complete chunks gave.
    """
    from . import calibration
    from .files import check_new_output, is_directory_target, output_directory

    in_files = list(in_files or [])
    if resume and in_files:
        raise UsageError("continuing a partial imatrix and adding earlier ones cannot be combined")
    if model is None and not in_files:
        raise UsageError("give a GGUF model, or earlier imatrices to combine")
    model = Path(model) if model is not None else None
    if model is not None:
        llama.check_gguf_path(model)
    if out is not None and is_directory_target(out):
        if model is None:
            raise UsageError("combining imatrices needs an output file name")
        out = output_directory(out) / default_output(model).name
    elif out is None:
        if model is None:
            raise UsageError("combining imatrices needs an output file")
        out = default_output(model)
    out = Path(out)
    if model is not None and out.exists() and out.resolve() == model.resolve():
        raise UsageError(f"the output would overwrite the model: {out}")
    if not out.parent.is_dir() and str(out.parent):
        raise OutputError(f"output directory does not exist: {out.parent}")
    if resume:
        if not out.is_file():
            raise InputError(f"no partial imatrix to continue at {out}")
    else:
        check_new_output(out, force)
    combined = combine_imatrices([read_imatrix(p) for p in in_files], n_ctx) if in_files else None
    if model is None:
        write_imatrix(combined, out)
        return ImatrixRun(out, combined, combined=len(in_files))

    if texts:
        text, dataset = calibration.read_text_files(texts), ",".join(str(p) for p in texts)
        special = bool(parse_special)
    else:
        text, dataset = calibration.calibration_text(), calibration.builtin_name(calibration.CALIBRATION)
        special = parse_special is not False
    # room for the file and, while a checkpoint replaces the last one, a second copy: checked before any work
    _check_room(out, 2 * imatrix_file_size(model_weights(model), process_output=process_output, datasets=[dataset]))
    saved = {"chunks": 0}

    def checkpoint(partial: Imatrix) -> None:
        try:
            write_imatrix(partial, out)
        except OutputError as ex:  # the disk filled up meanwhile: go on, the end keeps the result somewhere
            if not saved.get("warned"):
                logging.getLogger("cl3").warning("checkpoints not saved: %s", ex)
            saved["warned"] = True
            return
        saved["chunks"] = partial.chunk_count

    try:
        result = compute_imatrix(model, text, dataset=dataset, n_ctx=n_ctx, chunks=chunks, n_batch=n_batch,
                                 threads=threads, n_gpu_layers=n_gpu_layers, parse_special=special,
                                 process_output=process_output, resume=read_imatrix(out) if resume else None,
                                 start=combined, checkpoint=checkpoint, progress=progress,
                                 on_perplexity=on_perplexity)
    except KeyboardInterrupt:
        raise Interrupted(out, saved["chunks"]) from None
    _write_or_keep(result.imatrix, out)
    return ImatrixRun(out, result.imatrix, result.perplexity, len(in_files), result.backend)


@contextlib.contextmanager
def _deferred_interrupt():
    """Count Ctrl-C presses instead of raising: the first stops after the current group of chunks, the second
    (checked by the collector at its next call) abandons the decode under way, the third raises at once. Raised
    by the handler inside llama.cpp's eval callback, a KeyboardInterrupt is swallowed at the C boundary (with a
    traceback on stderr) and the node it hit goes uncollected, so the first two never raise there."""
    presses = [0]
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: 0
        return

    def on_sigint(signum, frame) -> None:
        presses[0] += 1
        if presses[0] >= 3:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: presses[0]
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if presses[0]:
        raise KeyboardInterrupt


def _chunk_count(entries: dict[str, Entry], chunk_size: int) -> int:
    most = max((int(e.counts.max()) for e in entries.values() if len(e.counts)), default=0)
    return most // chunk_size


def check_against_model(imatrix: Imatrix, weights: dict[str, tuple[int, ...]], source: str = "imatrix") -> None:
    """Raise InputError unless every entry names a weight of the model with a matching size.

    ``weights`` maps tensor names to GGUF shapes (ne0, ne1, ...). The size rule is llama.cpp's: ne0 * ne2.
    """
    unknown = [name for name in imatrix.entries if name not in weights]
    if unknown:
        raise InputError(f"{source} does not match this model: it has entries for tensors the model lacks "
                         f"({', '.join(sorted(unknown)[:3])}{', ...' if len(unknown) > 3 else ''})")
    for name, e in imatrix.entries.items():
        shape = weights[name]
        expected = shape[0] * (shape[2] if len(shape) > 2 else 1)
        if e.sums.size != expected:
            raise InputError(f"{source} does not match this model: {name} has {e.sums.size} values, "
                             f"the model needs {expected}")
