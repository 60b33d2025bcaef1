"""Small exam folders in the official C-Eval, CMMLU and MMLU layouts, written by the tests themselves (no network)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

# Question texts with Chinese, English, digits and punctuation; options include numbers-only columns and an "NA"
# cell (pandas reads it as nan, as the authors' scripts saw it).
STEMS = ["下列关于计算机网络的说法，正确的是", "TCP 协议工作在哪一层？", "1 + 1 = ?", "光速约为多少 km/s",
         "Which of the following is a prime number?", "我国的首都是", "水的化学式是", "以下哪个是操作系统"]
OPTIONS = [["应用层", "传输层", "网络层", "链路层"], ["北京", "上海", "广州", "深圳"], ["H2O", "CO2", "NaCl", "O2"],
           ["Linux", "Excel", "Word", "NA"], ["甲", "乙", "丙", "丁"]]


def _questions(rng: random.Random, n: int, numeric_d: bool = False) -> list[tuple[str, list[str], str]]:
    out = []
    for i in range(n):
        options = list(rng.choice(OPTIONS))
        rng.shuffle(options)
        if numeric_d:
            options[3] = str(rng.randint(1, 99))
        out.append((f"{rng.choice(STEMS)}（{i}）", options, rng.choice("ABCD")))
    return out


def write_ceval(root: Path, subjects: list[str], *, n_val: int = 6, n_dev: int = 5, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for split in ("dev", "val", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for s in subjects:
        for split, n in (("dev", n_dev), ("val", n_val), ("test", n_val)):
            with open(root / split / f"{s}_{split}.csv", "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                header = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
                header = header[:6] if split == "test" else header if split == "dev" else header[:7]
                w.writerow(header)
                for i, (q, o, a) in enumerate(_questions(rng, n, numeric_d=(s == subjects[0]))):
                    row = [i, q, *o, a, "解析：略"]
                    w.writerow(row[:len(header)])
    return root


def write_cmmlu(root: Path, subjects: list[str], *, n_test: int = 6, seed: int = 1) -> Path:
    rng = random.Random(seed)
    for split in ("dev", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for s in subjects:
        for split, n in (("dev", 5), ("test", n_test)):
            with open(root / split / f"{s}.csv", "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                w.writerow(["", "Question", "A", "B", "C", "D", "Answer"])
                for i, (q, o, a) in enumerate(_questions(rng, n)):
                    w.writerow([i, q, *o, a])
    return root


def write_mmlu(root: Path, subjects: list[str], *, n_test: int = 6, seed: int = 2) -> Path:
    rng = random.Random(seed)
    for split in ("dev", "val", "test"):
        (root / split).mkdir(parents=True, exist_ok=True)
    for s in subjects:
        for split, n in (("dev", 5), ("val", n_test), ("test", n_test)):
            with open(root / split / f"{s}_{split}.csv", "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                for q, o, a in _questions(rng, n):
                    w.writerow([q, *o, a])
    return root
