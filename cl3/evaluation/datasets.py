"""`cl3 download --dataset ceval|cmmlu|mmlu`: the public copies on the Hugging Face hub, into the official layout.

The hub copies come in three shapes, all handled: the official archive (C-Eval's ``ceval-exam.zip`` /
``ceval_data.tar``, CMMLU's ``cmmlu_v1_0_1.zip``), the CSVs themselves, or the hub's parquet conversion (per subject
folder, ``{split}-*.parquet``; read with pyarrow when it is installed). huggingface_hub fetches (its cache, HF_TOKEN,
HF_ENDPOINT mirrors, resumed transfers); the unpacked folder is built beside the cache's ``datasets/TASK`` and
renamed into place, so an interrupted run leaves nothing half-written there.
"""

from __future__ import annotations

import csv
import shutil
import tarfile
import zipfile
from pathlib import Path

from .. import hub
from ..errors import InputError, UsageError
from ..files import atomic_output
from .run import dataset_dir
from .tasks import CHOICES, TASKS, detect_layout

HUB_REPOS = {"ceval": "ceval/ceval-exam", "cmmlu": "haonan-li/cmmlu", "mmlu": "cais/mmlu"}
PATTERNS = ["*.zip", "*.tar", "*.tar.gz", "*.csv", "*/*.csv", "*/*/*.csv", "*/*.parquet", "*/*/*.parquet"]
_SPLIT_NAMES = {"dev": "dev", "val": "val", "validation": "val", "test": "test"}


def download_dataset(task: str, *, repo_id: str | None = None, revision: str | None = None,
                     endpoint: str | None = None, progress: hub.Progress | None = None) -> Path:
    """Fetch a task's data (once) into cl3's cache in the official layout; returns the folder."""
    if task not in TASKS:
        raise UsageError(f"unknown dataset {task!r}: choose {', '.join(TASKS)}", param="dataset")
    target = dataset_dir(task)
    if (target / "dev").is_dir():
        return target
    snapshot = hub.download_dataset(repo_id or HUB_REPOS[task], PATTERNS, revision=revision, endpoint=endpoint,
                                    progress=progress)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)  # no dev/ inside: left by something else than a finished download
    with atomic_output(target, directory=True) as tmp:
        unpack(snapshot, tmp, task)
        layout = detect_layout(tmp)
        if layout != task:
            raise InputError(f"{repo_id or HUB_REPOS[task]} holds a {layout} layout, not {task}")
    return target


def unpack(snapshot: Path, out: Path, task: str) -> None:
    """The official dev/ val/ test/ folders from whatever the snapshot holds, into ``out``."""
    scratch = out / ".unpack"
    scratch.mkdir()
    for archive in sorted(snapshot.rglob("*")):
        name = archive.name.lower()
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(scratch / archive.stem)
        elif name.endswith((".tar", ".tar.gz")):
            with tarfile.open(archive) as t:
                t.extractall(scratch / archive.name.split(".")[0], filter="data")
    found = _layout_root(scratch) or _layout_root(snapshot)
    if found is not None:
        for split in ("dev", "val", "test"):
            if (found / split).is_dir():
                shutil.copytree(found / split, out / split)
    elif any(snapshot.rglob("*.parquet")):
        _from_parquet(snapshot, out, task)
    else:
        raise InputError(f"the {task} download holds no dev/ folder of CSV files, no archive and no parquet files")
    shutil.rmtree(scratch)


def _layout_root(top: Path) -> Path | None:
    """The shallowest folder under ``top`` whose dev/ holds CSV files."""
    for dev in sorted(top.rglob("dev"), key=lambda p: len(p.parts)):
        if dev.is_dir() and any(dev.glob("*.csv")):
            return dev.parent
    return None


def _from_parquet(snapshot: Path, out: Path, task: str) -> None:
    """The hub's parquet conversion (SUBJECT/SPLIT-*.parquet) written as the official CSVs."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(f"the {task} copy on the hub is parquet; install pyarrow (pip install pyarrow) to convert "
                         "it, or pass a folder in the official layout") from None
    for path in sorted(snapshot.rglob("*.parquet")):
        subject = path.parent.name
        split = next((v for k, v in _SPLIT_NAMES.items() if path.name.startswith(k) or f"-{k}" in path.name), None)
        if split is None or subject in ("all", "auxiliary_train"):
            continue
        rows = pq.read_table(path).to_pylist()
        (out / split).mkdir(exist_ok=True)
        name = f"{subject}.csv" if task == "cmmlu" else f"{subject}_{split}.csv"
        with open(out / split / name, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            if task == "mmlu":  # cais/mmlu: question, subject, choices[4], answer (0-3)
                w.writerows([r["question"], *r["choices"], CHOICES[int(r["answer"])]] for r in rows)
            elif task == "cmmlu":
                w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                w.writerows([i, r["Question"], r["A"], r["B"], r["C"], r["D"], r["Answer"]] for i, r in enumerate(rows))
            else:
                cols = [c for c in ("id", "question", "A", "B", "C", "D", "answer", "explanation") if c in rows[0]]
                w.writerow(cols)
                w.writerows([r[c] for c in cols] for r in rows)
