"""A multiple-choice set the demo model can learn: questions built from its own training text.

The demo model is a bigram model of cl3's calibration text, so its next-token logits depend on the last prompt token
only. The folder's cl3-task.json drops the header and the answer cue; the prompt then ends with option D, whose text
is a snippet of the training text that was followed there by a bare letter A-D. The key is the letter the training
text most often has after that token (counted here, not asked of the model), so a model that learned its text
answers far better than chance, and quantization errors move the answers near a tie.
"""

from __future__ import annotations

import collections
import csv
import json
import random
from pathlib import Path

from tokenizers import Tokenizer

from cl3.calibration import calibration_text


def write_learnable_set(root: Path, tokenizer_json: Path, *, n: int = 48, seed: int = 0) -> Path:
    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = tok.encode(calibration_text()).ids
    letters = {tok.token_to_id(c): c for c in "ABCD"}
    follow: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for a, b in zip(ids, ids[1:]):
        if b in letters:
            follow[a][letters[b]] += 1
    rng = random.Random(seed)
    rows, seen = [], set()
    for i in range(6, len(ids) - 1):
        if ids[i + 1] not in letters:
            continue
        counts = follow[ids[i]].most_common(2)
        if len(counts) > 1 and counts[0][1] < 2 * counts[1][1]:
            continue  # no clear letter after this token
        snippet = tok.decode(ids[i - 5:i + 1])
        if not snippet.strip() or snippet in seen or "\n" in snippet:
            continue
        if tok.encode("\nD. " + snippet).ids[-1] != ids[i]:
            continue
        seen.add(snippet)
        others = [tok.decode(ids[j:j + 4]).replace("\n", " ") for j in rng.sample(range(len(ids) - 4), 3)]
        rows.append([f"第{len(rows)}题", *others, snippet, counts[0][0]])
    rng.shuffle(rows)
    rows = rows[:n]
    for split, part in (("dev", rows[:5]), ("val", rows[5:])):
        (root / split).mkdir(parents=True, exist_ok=True)
        with open(root / split / f"logic_{split}.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
            for i, r in enumerate(part):
                w.writerow([i, *r])
    (root / "cl3-task.json").write_text(json.dumps({"header": "", "answer_cue": ""}), encoding="utf-8")
    return root
