"""Multiple-choice exams in their official file layouts: C-Eval, CMMLU and MMLU (or a local folder in one of them).

Layouts (as the official archives unpack):

- C-Eval: ``{dev,val,test}/{subject}_{split}.csv`` with the header ``id,question,A,B,C,D,answer,explanation``
  (the test split has no answers: they are kept by the leaderboard);
- CMMLU: ``{dev,test}/{subject}.csv`` with the header ``,Question,A,B,C,D,Answer``;
- MMLU: ``{dev,val,test}/{subject}_{split}.csv`` without a header: question, A, B, C, D, answer.

The subject tables (names, categories, C-Eval's hard subset) are data files in ``cl3/data/eval_tasks/``, transcribed
from the official code. Cells become text as the authors' scripts see them through ``pandas.read_csv``: an empty or
NA-like cell reads ``nan``, and a column whose cells are all numbers reads as numbers (``1.0`` when one is fractional
or missing), which is what their prompts contain.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from ..errors import InputError, UsageError

CHOICES = ("A", "B", "C", "D")
SPLITS = ("dev", "val", "test")
TASKS = ("ceval", "cmmlu", "mmlu")
DEFAULT_SPLIT = {"ceval": "val", "cmmlu": "test", "mmlu": "test"}
_DATA = Path(__file__).resolve().parent.parent / "data" / "eval_tasks"
_HEADERS = {"ceval": ["id", "question", "A", "B", "C", "D", "answer", "explanation"],
            "cmmlu": ["", "Question", "A", "B", "C", "D", "Answer"]}
# pandas.read_csv's default NA strings
_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
       "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
_INT = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True)
class Subject:
    key: str                     # file stem: computer_network
    name: str                    # the name the prompt uses: 计算机网络 (MMLU: "computer network")
    categories: tuple[str, ...]  # C-Eval/MMLU: one; CMMLU: every category its subcategories belong to


@dataclass(frozen=True)
class TaskInfo:
    name: str                    # ceval, cmmlu, mmlu
    categories: tuple[str, ...]
    subjects: dict[str, Subject]
    hard: tuple[str, ...] = ()   # C-Eval Hard
    header: str | None = None      # a folder's own prompt header ("{subject}" replaced), instead of the task's
    answer_cue: str | None = None  # a folder's own text between the options and the answer (task's: "\n答案：")

    @property
    def language(self) -> str:
        return "en" if self.name == "mmlu" else "zh"


@dataclass(frozen=True)
class Question:
    subject: str
    index: int                   # row within its split file (the authors' row_index)
    question: str
    choices: tuple[str, str, str, str]
    answer: str | None           # A-D, None when the split has no answers

    @property
    def key(self) -> str:
        return f"{self.subject}/{self.index}"


@cache
def task_info(name: str) -> TaskInfo:
    """The subject table of a known task."""
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}: choose {', '.join(TASKS)} or a folder", param="task")
    data = json.loads((_DATA / f"{name}.json").read_text(encoding="utf-8"))
    subjects = {k: Subject(k, v["name"], tuple(v["categories"])) for k, v in data["subjects"].items()}
    return TaskInfo(name, tuple(data["categories"]), subjects, tuple(data.get("hard", ())))


FOLDER_PROMPT = "cl3-task.json"  # optional in a --task folder: {"header": "...{subject}...", "answer_cue": "..."}


def folder_prompt(root: Path, info: TaskInfo) -> TaskInfo:
    """The subject table with the folder's own prompt pieces, when it has a cl3-task.json."""
    path = root / FOLDER_PROMPT
    if not path.is_file():
        return info
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as ex:
        raise InputError(f"cannot read {path}: {ex}") from None
    if not isinstance(data, dict) or set(data) - {"header", "answer_cue"} or \
            not all(isinstance(v, str) for v in data.values()):
        raise InputError(f"{path}: expected an object with the strings \"header\" and/or \"answer_cue\"")
    return replace(info, header=data.get("header"), answer_cue=data.get("answer_cue"))


def detect_layout(root: Path) -> str:
    """Which official layout a folder holds: ceval, cmmlu or mmlu (read from its dev files)."""
    dev = root / "dev"
    if not dev.is_dir():
        raise InputError(f"{root} has no dev/ folder: not a C-Eval, CMMLU or MMLU layout (dev/, val/ or test/)",
                         param="task")
    files = sorted(dev.glob("*.csv"))
    if not files:
        raise InputError(f"{dev} holds no CSV files", param="task")
    first = _first_line(files[0])
    if first.lstrip("\ufeff").startswith("id,question,"):
        return "ceval"
    if first.lstrip("\ufeff").startswith(",Question,"):
        return "cmmlu"
    if files[0].name.endswith("_dev.csv"):
        return "mmlu"
    raise InputError(f"{files[0]}: neither C-Eval's header (id,question,...), CMMLU's (,Question,...) nor an MMLU "
                     "file name (SUBJECT_dev.csv)", param="task")


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline()
    except (OSError, UnicodeDecodeError) as ex:
        raise InputError(f"cannot read {path}: {ex}") from None


def split_file(root: Path, layout: str, subject: str, split: str) -> Path:
    if layout == "cmmlu":
        if split == "val":
            raise UsageError("CMMLU has no val split (dev and test only; the authors evaluate on test)",
                             param="split")
        return root / split / f"{subject}.csv"
    return root / split / f"{subject}_{split}.csv"


def subjects_in(root: Path, layout: str, split: str) -> list[str]:
    """The subjects whose ``split`` file the folder holds, sorted."""
    if layout == "cmmlu" and split == "val":
        split_file(root, layout, "", split)  # the clear message
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}: choose {', '.join(SPLITS)}", param="split")
    folder = root / split
    if not folder.is_dir():
        raise InputError(f"{root} has no {split}/ folder", param="split")
    suffix = ".csv" if layout == "cmmlu" else f"_{split}.csv"
    return sorted(p.name[:-len(suffix)] for p in folder.glob(f"*{suffix}"))


def read_questions(path: Path, layout: str, subject: str, *, need_answers: bool = True) -> list[Question]:
    """The questions of one split file; one InputError naming the file and row for anything malformed."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as ex:
        raise InputError(f"cannot read {path}: {ex}") from None
    header = _HEADERS.get(layout)
    if header is not None:
        found = [c.lstrip("\ufeff") for c in rows[0]] if rows else []
        if layout == "ceval" and found == header[:len(found)] and len(found) >= 6:
            header = found  # val has no explanation column, test neither an answer
        if found != header:
            raise InputError(f"{path}: the header is not {','.join(header)}")
        rows = rows[1:]
    width = len(header) if header else 6
    for n, row in enumerate(rows):
        if len(row) != width:
            raise InputError(f"{path}: row {n + 1} has {len(row)} fields, expected {width}")
    if not rows:
        raise InputError(f"{path} holds no questions")
    columns = [_as_pandas_text([r[c] for r in rows]) for c in range(width)]
    q_col = 0 if layout == "mmlu" else 1
    answer_col = q_col + 5
    questions = []
    for i, row in enumerate(rows):
        answer = row[answer_col].strip() if answer_col < width else ""
        if answer not in CHOICES:
            if need_answers:
                what = "no answer" if not answer else f"the answer {answer!r} (expected A, B, C or D)"
                hint = " (C-Eval's test answers are not public: use the val split)" if layout == "ceval" else ""
                raise InputError(f"{path}: row {i + 1} has {what}{hint}")
            answer = None
        questions.append(Question(subject, i, columns[q_col][i],
                                  tuple(columns[q_col + 1 + j][i] for j in range(4)), answer))
    return questions


def _as_pandas_text(cells: list[str]) -> list[str]:
    """A column's cells as str() of what pandas.read_csv makes of them (dtype inferred per column)."""
    present = [c for c in cells if c not in _NA]
    if present and all(_INT.match(c) for c in present):
        if len(present) == len(cells):
            return [str(int(c)) for c in cells]
        return [str(float(c)) if c not in _NA else "nan" for c in cells]
    if present and all(_is_float(c) for c in present):
        return [str(float(c)) if c not in _NA else "nan" for c in cells]
    return ["nan" if c in _NA else c for c in cells]


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip() == text and text.lower().lstrip("+-") not in ("inf", "infinity", "nan")
