"""Quantize to a size, not a type: a per-tensor mix of llama.cpp types chosen by measured sensitivity.

1. :func:`sensitivity`: for every tensor llama.cpp quantizes (each layer's attn_q/k/v/output, ffn_gate/up/down,
   token_embd, output) and every candidate type, what quantizing that tensor alone costs in mean KL divergence of
   the model's next-token distributions against the F16 model, on a text. *Measured*: llama.cpp's quantizer writes
   the source with only that tensor in that type (with the imatrix), and :mod:`cl3.measure` scores it against the
   source's logits. *Proxy*: the imatrix-weighted squared error of the same quantization, done by ggml in memory
   (the same bytes), sum_ij imatrix_j (W - deq(q(W)))_ij^2. A proxy becomes a KLD through the tensor's own measured
   points (a line in log-log space), or, for tensors not measured, through the measured tensors of the same kind in
   other layers. Cached as ``*.sensitivity.json`` beside the source; an unfinished run keeps what it found in
   ``*.sensitivity.partial.json`` as it goes, and the next run continues from it.
2. :func:`allocate`: minimise the sum of predicted KLDs (per-tensor errors add up nearly linearly) subject to the
   size, by dynamic programming over the tensors, then a greedy fill of what rounding left over.
3. :func:`plan_mix` checks the choice with llama.cpp's quantizer dry run and sizes the file exactly (header
   included); :func:`quantize_mix` quantizes through ``llama_model_quantize`` with per-tensor type patterns
   (``tt_overrides``), records target, recipe hash and KLDs in the metadata, and writes the recipe beside the output:
   ``--tensor-type-file`` entries and the llama-quantize command that makes the same file byte for byte.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import math
import os
import re
import shlex
import struct
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import calibration, llama, measure
from .errors import InputError, Interrupted, OutputError, UsageError
from .files import atomic_output, check_new_output
from .progress import Stage, stage_progress

SENSITIVITY_VERSION = 1
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]
IQ_TYPES = ["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"]  # with an imatrix only
ANCHORS = ["Q2_K", "Q4_K", "Q6_K"]  # measured per tensor in the "anchors" and "sample" modes
MODES = ("all", "anchors", "sample", "proxy")
# The file types a mix may be labelled as (general.file_type): llama.cpp honours type patterns only under a
# quantized file type, and none of these needs an imatrix itself.
LABEL_TYPES = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
KV_TARGET = "cl3.mix.target"
KV_RECIPE = "cl3.mix.recipe_sha256"
KV_PREDICTED = "cl3.mix.kld_predicted"
KV_MEASURED = "cl3.mix.kld_measured"
KV_TEXT = "cl3.mix.kld_text"
UNCALIBRATED = "uncalibrated"  # KV_PREDICTED of a mix planned on the proxy alone (no KLD to predict from)
NOT_MEASURED = "not measured"  # KV_MEASURED of a mix whose check did not run (12 characters, as a measured value)
BLOCK_ELEMENTS = 1 << 22  # rows are quantized in blocks of about this many weights (bounded memory)
PROXY_ELEMENTS = 1 << 20  # the proxy of a larger tensor is estimated on evenly spread rows (scaled up)
_LAYER = re.compile(r"^blk\.(\d+)\.(.+?)(?:\.weight)?$")


# ------------------------------------------------------------------------------------------------------- targets

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Target:
    """A file size in bytes, or bits per weight as llama.cpp counts them (tensor bits / parameters)."""

    size_bytes: int | None = None
    bpw: float | None = None
    label: str = ""

    @classmethod
    def size(cls, text: str | int) -> Target:
        """``4.58GiB``, ``4.9GB``, ``600MiB``, ``123456`` (bytes): binary (KiB, MiB, GiB) and decimal (KB, MB, GB)."""
        if isinstance(text, int):
            return cls(size_bytes=text, label=f"{text}B")
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else ""
        if not m or unit not in _UNITS and unit != "":
            raise UsageError(f"cannot read the size {text!r} (write e.g. 4.58GiB, 4.9GB, 600MiB or a byte count)",
                             param="target_size")
        n = int(float(m.group(1)) * _UNITS.get(unit, 1))
        if n <= 0:
            raise UsageError("the target size must be positive", param="target_size")
        return cls(size_bytes=n, label=f"{m.group(1)}{m.group(2) or 'B'}")

    @classmethod
    def bits(cls, bpw: float) -> Target:
        if not 0 < bpw <= 32:
            raise UsageError(f"bits per weight must be between 0 and 32, not {bpw}", param="target_bpw")
        return cls(bpw=float(bpw), label=f"{bpw:g}bpw")

    def describe(self) -> str:
        """As recorded in the output's metadata: ``size=4917739438`` or ``bpw=4.89``."""
        return f"size={self.size_bytes}" if self.size_bytes is not None else f"bpw={self.bpw:g}"


# --------------------------------------------------------------------------------------------------- sensitivity

@dataclass
class Candidate:
    bytes: int                     # the tensor's bytes in this type (ggml_row_size * rows)
    proxy: float                   # imatrix-weighted squared quantization error
    measured: float | None = None  # mean KLD with only this tensor quantized
    predicted: float = 0.0         # measured, or the calibrated proxy


@dataclass
class Group:
    """One tensor llama.cpp quantizes, and what each candidate type would cost."""

    name: str
    kind: str                      # attn_q, ffn_down, token_embd, output ...
    layer: int | None
    shape: tuple[int, int]         # (rows, row length)
    candidates: dict[str, Candidate] = field(default_factory=dict)

    @property
    def n_elements(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class Sensitivity:
    model: str
    model_sha256: str
    text: str                      # the text's name (built-in name with hash, or a file)
    text_sha256: str
    imatrix: str | None            # the imatrix's file (provenance), None = none
    imatrix_sha256: str | None
    n_ctx: int
    chunks: int
    mode: str
    groups: list[Group]
    seconds: float = 0.0
    measurements: int = 0
    spearman: dict[str, float | None] = field(default_factory=dict)

    def group(self, name: str) -> Group:
        return next(g for g in self.groups if g.name == name)

    @property
    def calibrated(self) -> bool:
        """Whether the predictions are KLDs: some tensor was measured. Otherwise (the proxy mode) they are the raw
        imatrix-weighted squared errors, which rank the choices but are no KL divergence."""
        return any(c.measured is not None for g in self.groups for c in g.candidates.values())

    def predicted(self, types: dict[str, str]) -> float | None:
        """The predicted KLD of a whole assignment {tensor: type name} (None if a type has no estimate)."""
        total = 0.0
        for g in self.groups:
            c = g.candidates.get(types.get(g.name, "").upper())
            if c is None:
                return None
            total += c.predicted
        return total

    def to_dict(self) -> dict:
        d = asdict(self)
        d["version"] = SENSITIVITY_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Sensitivity:
        groups = [Group(g["name"], g["kind"], g["layer"], tuple(g["shape"]),
                        {t: Candidate(**c) for t, c in g["candidates"].items()}) for g in d["groups"]]
        keys = ("model", "model_sha256", "text", "text_sha256", "imatrix", "imatrix_sha256", "n_ctx", "chunks",
                "mode", "seconds", "measurements", "spearman")
        return cls(groups=groups, **{k: d[k] for k in keys})


def group_of(name: str) -> tuple[str, int | None]:
    """``blk.3.ffn_down.weight`` -> ("ffn_down", 3); ``token_embd.weight`` -> ("token_embd", None)."""
    if m := _LAYER.match(name):
        return m.group(2), int(m.group(1))
    return name.removesuffix(".weight"), None


def candidate_types(row_length: int, *, has_imatrix: bool, has_entry: bool) -> list[str]:
    """The types a tensor with rows of ``row_length`` can take: whole blocks per row; IQ types only with an imatrix,
    and those ggml cannot make without one only for tensors the imatrix covers."""
    names = K_TYPES + (IQ_TYPES if has_imatrix else [])
    out = []
    for name in names:
        t = llama.ggml_type_by_name(name)
        if row_length % llama.block_size(t):
            continue
        if llama.requires_imatrix(t) and not has_entry:
            continue
        out.append(name)
    return out


def _text_sample(text: str, n_ctx: int, chunks: int, chars_per_token: float) -> str:
    """``chunks`` windows of about ``n_ctx`` tokens spread evenly over ``text`` (whole paragraphs), so a few chunks
    see every kind of text in it rather than only its first file."""
    need = int(1.25 * n_ctx * chars_per_token) + 1
    if len(text) <= need * chunks:
        return text
    paragraphs = text.split("\n\n")
    starts = np.cumsum([0] + [len(p) + 2 for p in paragraphs[:-1]])
    parts = []
    for k in range(chunks):
        i = int(np.searchsorted(starts, k * len(text) / chunks))
        window = []
        while i < len(paragraphs) and sum(len(p) + 2 for p in window) < need:
            window.append(paragraphs[i])
            i += 1
        parts.append("\n\n".join(window))
    return "\n\n".join(parts)


def _imatrix_digest(importances: dict[str, np.ndarray] | None) -> str | None:
    if not importances:
        return None
    h = hashlib.sha256()
    for name in sorted(importances):
        h.update(name.encode() + b"\0" + np.ascontiguousarray(importances[name], dtype=np.float32).tobytes())
    return h.hexdigest()


def sensitivity_path(src: Path, cache_dir: Path, key: str) -> Path:
    return cache_dir / f"{src.name.removesuffix('.gguf')}.{key[:16]}.sensitivity.json"


def _row_blocks(rows: int, row_length: int) -> tuple[list[np.ndarray], float]:
    """Row indices to quantize, in blocks of about BLOCK_ELEMENTS weights, and the factor that scales their error to
    the whole tensor: every row up to PROXY_ELEMENTS weights, else evenly spread rows."""
    n = min(rows, max(1, PROXY_ELEMENTS // row_length))
    which = np.unique(np.linspace(0, rows - 1, n).round().astype(np.int64))
    step = max(1, BLOCK_ELEMENTS // row_length)
    return [which[i: i + step] for i in range(0, len(which), step)], rows / len(which)


class _Tensors:
    """The source's weights read through a memory map, as float32 row blocks (F32/F16/BF16 via ggml)."""

    def __init__(self, path: Path):
        with llama.GgufFile(path) as f:
            self.infos = {t.name: t for t in f.tensors}
            self.data_offset = f.data_offset
        self.path = path
        self.map = np.memmap(path, dtype=np.uint8, mode="r")

    def rows(self, name: str, which: np.ndarray) -> np.ndarray:
        """The rows ``which`` of tensor ``name`` as float32."""
        t = self.infos[name]
        n_rows = t.n_elements // t.ne[0]
        at = self.data_offset + t.offset
        data = self.map[at: at + t.nbytes].reshape(n_rows, t.nbytes // n_rows)[which]
        return llama.dequantize_rows(t.ggml_type, data, len(which), t.ne[0])


def _round_trip(t: int, rows: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    q = llama.quantize_rows(t, rows, weights)
    return llama.dequantize_rows(t, q, rows.shape[0], rows.shape[1])


def _proxy(tensors: _Tensors, name: str, row_length: int, type_name: str, weights: np.ndarray | None,
           blocks: list[np.ndarray], scale: float) -> float:
    """The imatrix-weighted squared error of one tensor in one type, sum_ij imatrix_j (W - deq(q(W)))_ij^2, over
    ``blocks`` of rows scaled up by ``scale``."""
    t = llama.ggml_type_by_name(type_name)
    col = weights if weights is not None else np.ones(row_length, np.float32)
    total = 0.0
    for which in blocks:
        w = tensors.rows(name, which)
        total += float((np.square(_round_trip(t, w, weights) - w) * col).sum(dtype=np.float64)) * scale
    return total


def anchors(g: Group) -> list[str]:
    """The types measured for a tensor in the "anchors" and "sample" modes."""
    chosen = [t for t in ANCHORS if t in g.candidates]
    if not chosen:  # no K-quant fits the rows: the cheapest, middle and largest candidates
        order = sorted(g.candidates, key=lambda t: g.candidates[t].bytes)
        chosen = sorted({order[0], order[len(order) // 2], order[-1]}, key=order.index)
    return chosen


def _measure_modes(groups: list[Group], mode: str) -> dict[str, list[str]]:
    """{tensor: types to measure} for a mode."""
    if mode == "proxy":
        return {}
    if mode == "all":
        return {g.name: list(g.candidates) for g in groups}
    if mode == "anchors":
        return {g.name: anchors(g) for g in groups}
    # sample: per kind the first, middle and last layers (and every tensor outside the layers) at the anchors
    picked: dict[str, list[str]] = {}
    by_kind: dict[str, list[Group]] = {}
    for g in groups:
        by_kind.setdefault(g.kind, []).append(g)
    for members in by_kind.values():
        members = sorted(members, key=lambda g: -1 if g.layer is None else g.layer)
        for i in sorted({0, len(members) // 2, len(members) - 1}):
            picked[members[i].name] = anchors(members[i])
    return picked


def _fit_predictions(groups: list[Group]) -> None:
    """Fill ``predicted`` of every candidate: measured where measured; otherwise the tensor's measured points
    extended along its proxy (log-log), or the calibration of measured tensors of its kind (by layer)."""
    tiny = 1e-12
    slopes = []
    for g in groups:
        pts = sorted((c.proxy, c.measured) for c in g.candidates.values()
                     if c.measured is not None and c.measured > tiny and c.proxy > tiny)
        if len(pts) >= 2 and pts[-1][0] > pts[0][0]:
            slopes.append(math.log(pts[-1][1] / pts[0][1]) / math.log(pts[-1][0] / pts[0][0]))
    slope = float(np.clip(np.median(slopes), 0.5, 3.0)) if slopes else 1.0

    def curve(g: Group):
        """log KLD as a function of log proxy for this tensor, or None without measurements."""
        pts = sorted((math.log(max(c.proxy, tiny)), math.log(max(c.measured, tiny)))
                     for c in g.candidates.values() if c.measured is not None)
        if not pts:
            return None
        xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])

        def f(x: float) -> float:
            if x <= xs[0]:
                return ys[0] + slope * (x - xs[0])
            if x >= xs[-1]:
                return ys[-1] + slope * (x - xs[-1])
            return float(np.interp(x, xs, ys))
        return f

    # calibration constant log(KLD / proxy^slope) of each measured tensor, for the unmeasured ones of its kind
    constants: dict[str, list[tuple[float, float]]] = {}
    curves = {}
    for g in groups:
        curves[g.name] = f = curve(g)
        if f is not None:
            c = next(iter(sorted(g.candidates.values(), key=lambda c: c.measured is None)))
            x = math.log(max(c.proxy, tiny))
            constants.setdefault(g.kind, []).append((g.layer or 0, f(x) - slope * x))
    everything = [v for vals in constants.values() for _, v in vals]
    for g in groups:
        f = curves[g.name]
        if f is None:
            known = sorted(constants.get(g.kind, []))
            if known:
                offset = float(np.interp(g.layer or 0, [k[0] for k in known], [k[1] for k in known]))
            else:
                offset = float(np.median(everything)) if everything else 0.0
        for c in g.candidates.values():
            if c.measured is not None:
                c.predicted = max(c.measured, 0.0)
            elif f is not None:
                c.predicted = math.exp(f(math.log(max(c.proxy, tiny))))
            elif everything:
                c.predicted = math.exp(offset + slope * math.log(max(c.proxy, tiny)))
            else:
                c.predicted = c.proxy  # proxy mode: the raw weighted error


def spearman(a, b) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None for fewer than 3 pairs."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3:
        return None

    def ranks(x):
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):
            same = x == v
            r[same] = r[same].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def proxy_report(groups: list[Group]) -> dict[str, float | None]:
    """How well the proxy ranks against measurement, over every measured (tensor, type): the raw weighted error,
    and the calibrated prediction from the anchor types alone (each tensor's other measured types held out)."""
    measured = [(g, t, c) for g in groups for t, c in g.candidates.items() if c.measured is not None]
    report: dict[str, float | None] = {"pairs": len(measured)}
    report["raw_proxy"] = spearman([c.proxy for _, _, c in measured], [c.measured for _, _, c in measured])
    held = [(g.name, t) for g, t, _ in measured if t not in anchors(g)]
    if held:
        trial = [Group(g.name, g.kind, g.layer, g.shape,
                       {t: Candidate(c.bytes, c.proxy, c.measured if t in anchors(g) else None)
                        for t, c in g.candidates.items()}) for g in groups]
        _fit_predictions(trial)
        by = {g.name: g for g in trial}
        truth = {(g.name, t): c.measured for g, t, c in measured}
        report["anchors_held_out"] = spearman([by[n].candidates[t].predicted for n, t in held],
                                              [truth[(n, t)] for n, t in held])
        report["held_out_pairs"] = len(held)
    return report


def sensitivity(src: str | os.PathLike, *, importances: dict[str, np.ndarray] | None = None,
                imatrix_name: str | None = None, text: str | None = None, text_name: str | None = None,
                n_ctx: int = 512, chunks: int = 4, mode: str = "auto", threads: int | None = None,
                n_gpu_layers: int = -1, cache_dir: str | os.PathLike | None = None, model_sha256: str | None = None,
                tensors: set[str] | None = None, stage: Stage | None = None) -> Sensitivity:
    """What quantizing each tensor of ``src`` (an F32/F16/BF16 GGUF) to each candidate type costs in KLD.

    ``importances``: the imatrix as llama.cpp's quantizer takes it (``Imatrix.importances()``); it weights the
    proxy, enters the quantization exactly as it will in the real file, and allows the IQ types. ``text``: default
    the built-in calibration text (``chunks`` windows of ``n_ctx`` tokens spread over it). ``mode``: "all" measures
    every candidate; "anchors" every tensor at Q2_K/Q4_K/Q6_K, the rest from the proxy; "sample" the anchors of the
    first, middle and last layer of each kind; "proxy" measures nothing; "auto": "all" up to 50M parameters,
    "anchors" up to 500M, else "sample". The result is cached in ``cache_dir`` (default: beside the source); an
    interrupted run keeps what it found there and raises :class:`Interrupted`, and the same call continues from it.
    The quantization errors run on ``threads`` threads (default: the physical cores), one (tensor, type) each.
    ``tensors`` limits the work to those tensors (for studies of the proxy; such a result cannot plan a mix).
    """
    from .quantize import file_sha256

    src = Path(src)
    if chunks < 1:
        raise UsageError("the sensitivity needs at least 1 chunk", param="sensitivity_chunks")
    if text is None:
        text, text_name = calibration.calibration_text(), calibration.builtin_name(calibration.CALIBRATION)
    meta_tensors = _quantizable(src)
    if tensors is not None:
        meta_tensors = {n: s for n, s in meta_tensors.items() if n in tensors}
    n_params = sum(r * n for r, n in meta_tensors.values())
    if mode == "auto":
        mode = "all" if n_params <= 50e6 else "anchors" if n_params <= 500e6 else "sample"
    if mode not in MODES:
        raise UsageError(f"unknown sensitivity mode {mode!r} (one of: auto, {', '.join(MODES)})", param="measure")
    cache = Path(cache_dir) if cache_dir is not None else (src.parent if str(src.parent) else Path("."))
    if model_sha256 is None:
        with stage_progress(stage, "hashing source", "bytes") as update:
            model_sha256 = file_sha256(src, update)
    text_sha = hashlib.sha256(text.encode()).hexdigest()
    im_sha = _imatrix_digest(importances)
    key = hashlib.sha256(json.dumps([SENSITIVITY_VERSION, model_sha256, text_sha, im_sha, n_ctx, chunks, mode,
                                     K_TYPES, IQ_TYPES, ANCHORS, sorted(meta_tensors)]).encode()).hexdigest()
    path = sensitivity_path(src, cache, key)
    if path.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return Sensitivity.from_dict(json.loads(path.read_text(encoding="utf-8")))

    t0 = time.perf_counter()
    groups = []
    for name, shape in meta_tensors.items():
        kind, layer = group_of(name)
        types = candidate_types(shape[1], has_imatrix=bool(importances),
                                has_entry=bool(importances) and name in importances)
        if types:
            groups.append(Group(name, kind, layer, shape))
            groups[-1].candidates = dict.fromkeys(types)  # filled below
    if not groups:
        raise InputError(f"{src} has no tensor llama.cpp would quantize")
    weights_file = _Tensors(src)
    saved = _PartialSensitivity(partial_sensitivity_path(path), key)
    try:
        with stage_progress(stage, "quantization error per type", "tensors") as update:
            _all_proxies(weights_file, groups, importances, threads or llama.physical_cpu_count(), saved, update)
        for g in groups:
            g.candidates = {t: Candidate(llama.tensor_nbytes(t, g.shape), saved.proxies[g.name][t])
                            for t in g.candidates}
        todo = _measure_modes(groups, mode)
        n_todo = sum(len(v) for v in todo.values())
        left = []
        for g in groups:
            for t in todo.get(g.name, []):
                g.candidates[t].measured = saved.measured.get(g.name, {}).get(t)
                if g.candidates[t].measured is None:
                    left.append((g, t))
        if left:
            sample = _sample_text(src, text, n_ctx, chunks)
            with stage_progress(stage, f"KLD per tensor and type ({mode})", "measurements") as update, \
                    _scratch_file(cache) as scratch:
                done = n_todo - len(left)
                for g, t in left:
                    _one_tensor_model(src, scratch, weights_file, g.name, t, importances, threads)
                    r = measure.perplexity(scratch, sample, n_ctx=n_ctx, chunks=chunks, threads=threads,
                                           n_gpu_layers=n_gpu_layers, kld_base=src)
                    g.candidates[t].measured = max(r.kld.kld_mean, 0.0)
                    saved.measured.setdefault(g.name, {})[t] = g.candidates[t].measured
                    saved.save(time.perf_counter() - t0, force=True)
                    done += 1
                    if update:
                        update(done, n_todo)
    except KeyboardInterrupt:
        saved.save(time.perf_counter() - t0, force=True)
        raise Interrupted(f"the sensitivity found so far is kept in {saved.path}; the same command continues "
                          "from it") from None
    _fit_predictions(groups)
    result = Sensitivity(str(src), model_sha256, text_name or "text", text_sha, imatrix_name, im_sha, n_ctx,
                         chunks, mode, groups, seconds=saved.seconds + time.perf_counter() - t0,
                         measurements=n_todo)
    result.spearman = proxy_report(groups)
    with contextlib.suppress(OSError), atomic_output(path) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
    if path.is_file():
        saved.path.unlink(missing_ok=True)
    return result


def partial_sensitivity_path(path: Path) -> Path:
    """Where an unfinished sensitivity keeps what it has found (removed when it completes)."""
    return path.with_name(path.name.removesuffix(".json") + ".partial.json")


class _PartialSensitivity:
    """What an unfinished sensitivity run has found (every type's proxy of each finished tensor, each measured KLD),
    saved atomically as it goes so that an interrupted run continues where it stopped. ``key`` is the cache key:
    a file for another model, text, imatrix or mode is ignored."""

    def __init__(self, path: Path, key: str, every_s: float = 5.0):
        self.path, self.key, self.every_s = path, key, every_s
        self.proxies: dict[str, dict[str, float]] = {}
        self.measured: dict[str, dict[str, float]] = {}
        self.seconds = 0.0
        self.last_save = time.monotonic()
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            d = json.loads(path.read_text(encoding="utf-8"))
            if d["key"] == key:
                self.proxies = {g: {t: float(v) for t, v in c.items()} for g, c in d["proxies"].items()}
                self.measured = {g: {t: float(v) for t, v in c.items()} for g, c in d["measured"].items()}
                self.seconds = float(d["seconds"])

    def save(self, seconds: float = 0.0, *, force: bool = False) -> None:
        if not force and time.monotonic() - self.last_save < self.every_s:
            return
        self.last_save = time.monotonic()
        data = {"key": self.key, "seconds": self.seconds + seconds, "proxies": self.proxies, "measured": self.measured}
        with contextlib.suppress(OSError, OutputError), atomic_output(self.path) as tmp:
            tmp.write_text(json.dumps(data), encoding="utf-8")


def _all_proxies(tensors: _Tensors, groups: list[Group], importances: dict[str, np.ndarray] | None, workers: int,
                 saved: _PartialSensitivity, update) -> None:
    """Every candidate's proxy into ``saved.proxies``: one task per (tensor, type) on ``workers`` threads (ggml's
    quantization and numpy release the GIL, so every core is busy); a tensor is saved once all its types are done."""
    left = [g for g in groups if set(g.candidates) - set(saved.proxies.get(g.name, {}))]
    finished = len(groups) - len(left)
    if update:
        update(finished, len(groups))
    if not left:
        return
    pool = concurrent.futures.ThreadPoolExecutor(workers)
    try:
        tasks = {}
        for g in left:
            weights = importances.get(g.name) if importances else None
            blocks, scale = _row_blocks(*g.shape)
            for t in g.candidates:
                tasks[pool.submit(_proxy, tensors, g.name, g.shape[1], t, weights, blocks, scale)] = g.name, t
        found: dict[str, dict[str, float]] = {g.name: {} for g in left}
        want = {g.name: len(g.candidates) for g in left}
        for future in concurrent.futures.as_completed(tasks):
            name, t = tasks[future]
            found[name][t] = future.result()
            if len(found[name]) == want[name]:
                saved.proxies[name] = found.pop(name)
                saved.save()
                finished += 1
                if update:
                    update(finished, len(groups))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _quantizable(src: Path) -> dict[str, tuple[int, int]]:
    """{tensor: (rows, row length)} of the tensors llama.cpp's quantizer would quantize (its Q8_0 dry run)."""
    from .quantize import SOURCE_TYPES

    with llama.GgufFile(src) as f:
        infos = {t.name: t for t in f.tensors}
    bad = [t.name for t in infos.values() if t.ggml_type not in SOURCE_TYPES]
    if bad:
        raise InputError(f"{src} is already quantized ({bad[0]}); a mix starts from an F32, F16 or BF16 GGUF")
    plan = llama.quantize_plan(src, llama.file_types()["Q8_0"].ftype)
    out = {}
    for name, type_name in plan.items():
        t = infos[name]
        if type_name.lower() != t.type_name.lower() and t.ne[2] == t.ne[3] == 1:
            out[name] = (t.n_elements // t.ne[0], t.ne[0])
    return out


def _sample_text(src: Path, text: str, n_ctx: int, chunks: int) -> str:
    with llama.Model(src, vocab_only=True) as m:
        probe = text[: 200_000]
        per_token = len(probe) / max(1, len(m.tokenize(probe)))
        sample = _text_sample(text, n_ctx, chunks, per_token)
        if len(m.tokenize(sample)) < n_ctx * chunks:  # short windows (dense text): use the text as it is
            sample = text
    return sample


@contextlib.contextmanager
def _scratch_file(directory: Path):
    """A hidden file name for the one-tensor models, removed afterwards."""
    fd, name = tempfile.mkstemp(prefix=".cl3-sensitivity-", suffix=".gguf", dir=directory)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def _one_tensor_model(src: Path, out: Path, tensors: _Tensors, name: str, type_name: str,
                      importances: dict[str, np.ndarray] | None, threads: int | None) -> None:
    """``src`` with only tensor ``name`` quantized to ``type_name``, by llama.cpp's quantizer: every other tensor is
    told to keep its own type (copied), so the file differs from the source in that tensor alone."""
    keep = [(pattern(n), t.ggml_type) for n, t in tensors.infos.items() if n != name]
    llama.quantize_file(src, out, llama.file_types()["Q8_0"].ftype, threads=threads or 0, imatrix=importances,
                        tensor_types=[(pattern(name), llama.ggml_type_by_name(type_name)), *keep])


# ---------------------------------------------------------------------------------------------------- allocation

class TargetTooSmall(InputError):
    def __init__(self, shortfall: int):
        super().__init__(f"the target is {shortfall} bytes too small for the smallest mix")
        self.shortfall = shortfall


def allocate(options: dict[str, list[tuple[str, int, float]]], budget: int, *, max_units: int = 1 << 18
             ) -> dict[str, str]:
    """Choose one option per tensor minimising the summed KLD with summed cost <= ``budget``.

    ``options``: {tensor: [(type, cost, kld), ...]}. Exact dynamic programming when the budget fits in
    ``max_units`` steps of the costs' common divisor; otherwise costs are rounded up to a coarser unit (the choice
    stays within budget) and what rounding left is spent greedily, best KLD saved per byte first.
    """
    names = list(options)
    opts = {n: _undominated(options[n]) for n in names}
    cheapest = sum(min(c for _, c, _ in opts[n]) for n in names)
    if cheapest > budget:
        raise TargetTooSmall(cheapest - budget)
    unit = math.gcd(*[c for n in names for _, c, _ in opts[n]])
    unit = max(unit, -(-budget // max_units))
    units = budget // unit
    inf = float("inf")
    best = np.zeros(units + 1)
    picks = []
    for n in names:
        new = np.full(units + 1, inf)
        pick = np.full(units + 1, -1, dtype=np.int16)
        for i, (_, cost, kld) in enumerate(opts[n]):
            u = -(-cost // unit)
            if u > units:
                continue
            cand = np.full(units + 1, inf)
            cand[u:] = best[: units + 1 - u] + kld
            better = cand < new
            new[better] = cand[better]
            pick[better] = i
        best = new
        picks.append(pick)
    at = int(np.argmin(best))
    if not np.isfinite(best[at]):  # rounding made it infeasible: fall back to the cheapest choice
        choice = {n: min(opts[n], key=lambda o: o[1])[0] for n in names}
    else:
        choice = {}
        for n, pick in zip(reversed(names), reversed(picks)):
            i = int(pick[at])
            choice[n] = opts[n][i][0]
            at -= -(-opts[n][i][1] // unit)
    return _greedy_fill(choice, opts, budget)


def _undominated(options: list[tuple[str, int, float]]) -> list[tuple[str, int, float]]:
    """Options by cost, keeping only those better than every cheaper one."""
    kept: list[tuple[str, int, float]] = []
    for o in sorted(options, key=lambda o: (o[1], o[2])):
        if not kept or o[2] < kept[-1][2]:
            kept.append(o)
    return kept


def _greedy_fill(choice: dict[str, str], opts, budget: int) -> dict[str, str]:
    cost = {n: {t: c for t, c, _ in o} for n, o in opts.items()}
    kld = {n: {t: k for t, _, k in o} for n, o in opts.items()}
    used = sum(cost[n][t] for n, t in choice.items())
    while True:
        moves = [((kld[n][cur] - kld[n][t]) / max(1, cost[n][t] - cost[n][cur]), n, t)
                 for n, cur in choice.items() for t in cost[n]
                 if kld[n][t] < kld[n][cur] and used - cost[n][cur] + cost[n][t] <= budget]
        if not moves:
            return choice
        _, n, t = max(moves)
        used += cost[n][t] - cost[n][choice[n]]
        choice[n] = t


# ---------------------------------------------------------------------------------------------------------- plans

def pattern(name: str) -> str:
    """An anchored regular expression matching only the tensor ``name`` (llama-quantize lower-cases patterns, so
    only lower-case escapes are used)."""
    return "^" + re.escape(name).replace("\\_", "_") + "$"


@dataclass
class MixPlan:
    source: str
    target: Target
    file_type: str                     # general.file_type of the output (a label; every quantized tensor is named)
    types: dict[str, str]              # tensor -> ggml type name, for every tensor the mix decides
    size_bytes: int                    # the exact file size
    tensor_bytes: int
    n_params: int
    predicted_kld: float
    metadata: dict[str, str | int]     # key/value overrides, in llama-quantize's order (ours, then the imatrix's)
    sensitivity: Sensitivity
    standard: dict[str, dict] = field(default_factory=dict)   # llama.cpp's types near the target, for comparison

    @property
    def bpw(self) -> float:
        return self.tensor_bytes * 8 / self.n_params

    def tensor_type_lines(self) -> list[str]:
        """The recipe, one ``--tensor-type`` argument per tensor (llama-quantize's ``--tensor-type-file``)."""
        return [f"{pattern(n)}={t.lower()}" for n, t in self.types.items()]

    @property
    def recipe_text(self) -> str:
        return "\n".join(self.tensor_type_lines()) + "\n"

    def overrides(self) -> list[tuple[str, int]]:
        return [(pattern(n), llama.ggml_type_by_name(t)) for n, t in self.types.items()]


def _fixed_width(value: float) -> str:
    return f"{value:.6e}"


def plan_mix(src: str | os.PathLike, target: Target, sens: Sensitivity, *,
             imatrix_metadata: dict[str, str | int] | None = None) -> MixPlan:
    """The mix of least predicted KLD within ``target``, checked by llama.cpp's quantizer dry run and sized exactly
    (metadata included)."""
    src = Path(src)
    with llama.GgufFile(src) as f:
        n_params = sum(t.n_elements for t in f.tensors)
    known = llama.file_types()
    standard = {}
    for name in LABEL_TYPES:
        ftype = known[name].ftype
        types = llama.quantize_plan(src, ftype)
        ggml = {n: llama.ggml_type_by_name(t) for n, t in types.items()}
        size = llama.quantized_file_size(src, ggml, ftype, imatrix_metadata)
        tensor_bytes = _tensor_bytes(src, types)
        standard[name] = {"size_bytes": size, "bpw": tensor_bytes * 8 / n_params,
                          "predicted_kld": sens.predicted({n: t for n, t in types.items()})}
    if target.size_bytes is not None:
        fits = [n for n in LABEL_TYPES if standard[n]["size_bytes"] <= target.size_bytes]
    else:
        fits = [n for n in LABEL_TYPES if standard[n]["bpw"] <= target.bpw]
    label = fits[-1] if fits else LABEL_TYPES[0]
    ftype = known[label].ftype

    metadata: dict[str, str | int] = {KV_TARGET: target.describe()[:127], KV_RECIPE: "0" * 64,
                                      KV_PREDICTED: _fixed_width(0.0), KV_MEASURED: NOT_MEASURED,
                                      KV_TEXT: f"{sens.text}/ctx{sens.n_ctx}x{sens.chunks}"[:127]}
    metadata.update(imatrix_metadata or {})
    cheapest = {g.name: min(g.candidates, key=lambda t: g.candidates[t].bytes) for g in sens.groups}
    base_types = llama.quantize_plan(src, ftype, tensor_types=[(pattern(n), llama.ggml_type_by_name(t))
                                                               for n, t in cheapest.items()])
    if target.size_bytes is not None:
        fixed = llama.quantized_file_size(src, {n: llama.ggml_type_by_name(t) for n, t in base_types.items()},
                                          ftype, metadata) - sum(_padded(sens.group(n).candidates[t].bytes)
                                                                 for n, t in cheapest.items())
        budget = target.size_bytes - fixed
        cost = _padded
    else:
        fixed = _tensor_bytes(src, base_types) - sum(sens.group(n).candidates[t].bytes for n, t in cheapest.items())
        budget = int(target.bpw * n_params / 8) - fixed
        cost = int
    options = {g.name: [(t, cost(c.bytes), c.predicted) for t, c in g.candidates.items()] for g in sens.groups}
    try:
        choice = allocate(options, budget)
    except TargetTooSmall as ex:
        smallest = (f"the smallest mix is {target.size_bytes + ex.shortfall} bytes "
                    f"({(target.size_bytes + ex.shortfall) / 2**20:.2f} MiB)" if target.size_bytes is not None else
                    f"the smallest mix has {(budget + fixed + ex.shortfall) * 8 / n_params:.3f} BPW")
        raise InputError(f"the target {target.label} is too small for this model: {smallest}",
                         param="target_size" if target.size_bytes is not None else "target_bpw") from None
    types = {g.name: choice[g.name] for g in sens.groups}
    overrides = [(pattern(n), llama.ggml_type_by_name(t)) for n, t in types.items()]
    planned = llama.quantize_plan(src, ftype, tensor_types=overrides)
    wrong = [n for n, t in types.items() if planned.get(n, "").lower() != t.lower()]
    if wrong:
        raise InputError(f"llama.cpp's quantizer would not give {wrong[0]} the type {types[wrong[0]]} "
                         f"(it plans {planned.get(wrong[0])})")
    predicted = sum(sens.group(n).candidates[t].predicted for n, t in types.items())
    metadata[KV_PREDICTED] = _fixed_width(predicted) if sens.calibrated else UNCALIBRATED
    plan = MixPlan(str(src), target, label, types, 0, _tensor_bytes(src, planned), n_params, predicted, metadata,
                   sens, standard)
    metadata[KV_RECIPE] = hashlib.sha256(plan.recipe_text.encode()).hexdigest()
    plan.size_bytes = llama.quantized_file_size(src, {n: llama.ggml_type_by_name(t) for n, t in planned.items()},
                                                ftype, metadata)
    return plan


def _padded(n: int, alignment: int = 32) -> int:
    return -(-n // alignment) * alignment


def _tensor_bytes(src: Path, types: dict[str, str]) -> int:
    """Bytes of every tensor of ``src`` when those in ``types`` take the given ggml types (llama_model_size)."""
    with llama.GgufFile(src) as f:
        total = 0
        for t in f.tensors:
            if t.name in types:
                total += llama.tensor_nbytes(types[t.name], (t.n_elements // t.ne[0], t.ne[0]))
            else:
                total += t.nbytes
    return total


# ---------------------------------------------------------------------------------------------------- quantizing

@dataclass
class MixResult:
    output: Path
    plan: MixPlan
    measured_kld: float
    recipe: Path                       # --tensor-type-file entries
    recipe_json: Path                  # everything, with the llama-quantize command line
    command: list[str]                 # stock llama-quantize arguments that make the same file


def recipe_paths(output: Path) -> tuple[Path, Path]:
    stem = output.name.removesuffix(".gguf")
    return output.with_name(stem + ".tensor-types.txt"), output.with_name(stem + ".recipe.json")


def llama_quantize_args(plan: MixPlan, output: Path, recipe: Path, imatrix_file: str | None) -> list[str]:
    """The stock llama-quantize arguments that make ``output`` byte for byte."""
    args = ["llama-quantize"]
    if imatrix_file:
        args += ["--imatrix", imatrix_file]
    args += ["--tensor-type-file", str(recipe)]
    for key, value in plan.metadata.items():
        if not key.startswith("quantize.imatrix."):
            args += ["--override-kv", f"{key}=str:{value}" if isinstance(value, str) else f"{key}=int:{value}"]
    return args + [plan.source, str(output), plan.file_type]


def quantize_mix(plan: MixPlan, output: str | os.PathLike, *, importances: dict[str, np.ndarray] | None = None,
                 imatrix_file: str | None = None, text: str | None = None, threads: int | None = None,
                 n_gpu_layers: int = -1, force: bool = False, stage: Stage | None = None) -> MixResult:
    """Quantize ``plan`` with llama.cpp, write the recipe (``.tensor-types.txt`` and ``.recipe.json``) beside it,
    then measure the file's KLD on the sensitivity text and record it. Every file is written atomically; once the
    mix is complete, an interrupted check keeps it (``cl3.mix.kld_measured`` "not measured") and raises
    :class:`Interrupted` saying so."""
    output = Path(output)
    recipe, recipe_json = recipe_paths(output)
    for path in (output, recipe, recipe_json):
        check_new_output(path, force)
    src = Path(plan.source)
    sens = plan.sensitivity
    if text is None:
        text = calibration.calibration_text()
    if hashlib.sha256(text.encode()).hexdigest() != sens.text_sha256:
        raise UsageError("the text differs from the one the sensitivity was measured on")
    sample = _sample_text(src, text, sens.n_ctx, sens.chunks)
    plan.metadata[KV_MEASURED] = NOT_MEASURED  # until the check below has run (same width as a measured value)
    with atomic_output(output) as tmp, atomic_output(recipe) as tmp_recipe, atomic_output(recipe_json) as tmp_json:
        with stage_progress(stage, f"quantizing the mix ({plan.size_bytes / 2**20:.1f} MiB)", "tensors") as update:
            llama.quantize_file(src, tmp, llama.file_types()[plan.file_type].ftype, threads=threads or 0,
                                imatrix=importances, metadata=plan.metadata, tensor_types=plan.overrides(),
                                progress=update)
        if tmp.stat().st_size != plan.size_bytes:
            raise InputError(f"llama.cpp wrote {tmp.stat().st_size} bytes, not the {plan.size_bytes} planned")
        tmp_recipe.write_text(plan.recipe_text, encoding="utf-8")
        args = llama_quantize_args(plan, output, recipe, imatrix_file)
        tmp_json.write_text(_recipe_json(plan, output, imatrix_file, None, args), encoding="utf-8")
    # The mix is complete at its final path: the check that follows decides nothing about it, so an interrupted
    # or failed check leaves it there, recorded as not measured.
    try:
        with stage_progress(stage, "measuring its KLD", "chunks") as update:
            r = measure.perplexity(output, sample, n_ctx=sens.n_ctx, chunks=sens.chunks, threads=threads,
                                   n_gpu_layers=n_gpu_layers, kld_base=src, progress=update)
    except KeyboardInterrupt:
        raise Interrupted(f"kept {output} (complete; its KLD was not measured, {KV_MEASURED} = {NOT_MEASURED!r}); "
                          f"measure it alone with: cl3 ppl {shlex.quote(str(output))} --kld-base "
                          f"{shlex.quote(str(src))}") from None
    kld = r.kld.kld_mean
    plan.metadata[KV_MEASURED] = _fixed_width(kld)
    patch_string(output, KV_MEASURED, plan.metadata[KV_MEASURED])
    args = llama_quantize_args(plan, output, recipe, imatrix_file)
    with atomic_output(recipe_json) as tmp_json:
        tmp_json.write_text(_recipe_json(plan, output, imatrix_file, kld, args), encoding="utf-8")
    return MixResult(output, plan, kld, recipe, recipe_json, args)


def _recipe_json(plan: MixPlan, output: Path, imatrix_file: str | None, kld: float | None, args: list[str]) -> str:
    sens = plan.sensitivity
    return json.dumps({
        "output": str(output), "source": plan.source, "target": plan.target.describe(),
        "file_type": plan.file_type, "size_bytes": plan.size_bytes, "bpw": plan.bpw,
        "kld_predicted": plan.predicted_kld if sens.calibrated else None,
        "proxy_error_uncalibrated": None if sens.calibrated else plan.predicted_kld, "kld_measured": kld, "kld_text": plan.metadata[KV_TEXT],
        "recipe_sha256": plan.metadata[KV_RECIPE], "imatrix": imatrix_file, "types": plan.types,
        "metadata": plan.metadata, "llama_quantize": args, "standard_types": plan.standard,
        "sensitivity": {"mode": sens.mode, "measurements": sens.measurements, "spearman": sens.spearman}},
        indent=1)


def patch_string(path: Path, key: str, value: str) -> None:
    """Overwrite the value of string key ``key`` in a GGUF header with one of the same length."""
    kb, vb = key.encode(), value.encode()
    with llama.GgufFile(path) as f:
        old = f.get(key)
        header = f.data_offset
    if not isinstance(old, str) or len(old.encode()) != len(vb):
        raise ValueError(f"{key} is not a string of {len(vb)} bytes")
    needle = struct.pack("<Q", len(kb)) + kb + struct.pack("<IQ", 8, len(vb))  # 8 = GGUF_TYPE_STRING
    with open(path, "r+b") as f:
        head = f.read(header)
        at = head.find(needle)
        if at < 0 or head.find(needle, at + 1) >= 0:
            raise ValueError(f"{key} not found once in the header")
        f.seek(at + len(needle))
        f.write(vb)


def read_mix_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The cl3.mix.* keys of a GGUF (empty for files that are not mixes)."""
    with llama.GgufFile(path) as f:
        return {k: f.get(k) for k in f.keys() if k.startswith("cl3.mix.")}


def describe_plan(plan: MixPlan) -> list[dict]:
    """One row per tensor: name, type, bytes, predicted KLD (what the CLI shows before quantizing)."""
    rows = []
    for g in plan.sensitivity.groups:
        t = plan.types[g.name]
        c = g.candidates[t]
        rows.append({"tensor": g.name, "type": t, "bytes": c.bytes, "predicted_kld": c.predicted,
                     "measured": c.measured is not None})
    return rows

