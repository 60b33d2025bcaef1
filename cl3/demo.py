"""`cl3 demo`: the whole pipeline, offline, on the embedded demo model (cl3.demo_model).

build (or reuse) the demo checkpoint → convert to F16 GGUF → bench the authors' nine types without an imatrix →
bench the low-bit types again with an imatrix computed on the built-in calibration text → say which won.
Everything lands in one output directory; re-running reuses what is there (bench resumes cell by cell).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import bench
from .convert import convert, default_name
from .demo_model import build_demo_checkpoint
from .progress import Stage

# Small speed tests and a 512-token context keep the demo within a few minutes on 2 CPU cores.
DEMO_SETTINGS = {"ctx": 512, "n_prompt": 128, "n_gen": 32, "repetitions": 2}
IMATRIX_TYPES = ["Q4_K_M", "Q3_K_M", "Q2_K"]


@dataclass
class DemoResult:
    directory: Path
    checkpoint: Path
    f16: Path
    plain: bench.BenchTable
    with_imatrix: bench.BenchTable

    def imatrix_verdicts(self) -> list[tuple[str, float, float, str]]:
        """(type, PPL without imatrix, PPL with, which won) for the types measured both ways."""
        rows = []
        for t in self.with_imatrix.types:
            plain, im = self.plain.value(t, "ppl"), self.with_imatrix.value(t, "ppl")
            if plain is not None and im is not None:
                rows.append((t, plain, im, "imatrix" if im < plain else "plain"))
        return rows


def f16_path(directory: Path, checkpoint: Path) -> Path:
    """The demo's F16 GGUF: llama.cpp's name ({name}-{size}-F16.gguf), the base its quantized files are named by."""
    return directory / default_name(checkpoint, "f16")


def run_demo(directory: str | os.PathLike, *, stage: Stage | None = None, threads: int | None = None,
             n_gpu_layers: int = -1, on_step: Callable[[str], None] | None = None) -> DemoResult:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    step = on_step or (lambda _message: None)
    checkpoint = directory / "demo-model-hf"
    if not (checkpoint / "config.json").exists():
        step("building the demo model (tokenizer + bigram-statistics weights) …")
        build_demo_checkpoint(checkpoint)
    f16 = f16_path(directory, checkpoint)
    if not f16.exists():
        step("converting it to GGUF (F16) …")
        convert(checkpoint, f16, "f16")
    step("quantizing and measuring the authors' nine types …")
    plain = bench.bench(f16, out=directory / "demo-table", work_dir=directory / "models", threads=threads,
                        n_gpu_layers=n_gpu_layers, stage=stage, **DEMO_SETTINGS)
    step(f"again with an importance matrix (built-in calibration text) for {', '.join(IMATRIX_TYPES)} …")
    with_imatrix = bench.bench(f16, types=IMATRIX_TYPES, out=directory / "demo-table-imatrix", imatrix=True,
                               work_dir=directory / "models", threads=threads, n_gpu_layers=n_gpu_layers, stage=stage,
                               **DEMO_SETTINGS)
    return DemoResult(directory, checkpoint, f16, plain, with_imatrix)
