"""Accuracy with its standard error, per subject, per category and overall; the paired comparison of two runs.

Two overall averages: over questions (every question counts once: what the authors' eval scripts print as "All" and
what their README tables show) and over subjects (the mean of the subjects' accuracies). Standard errors are the
binomial sqrt(p(1-p)/n); over subjects, the root of the summed subject variances divided by the number of subjects.
The paired comparison counts, over the questions both runs answered, the difference of the two accuracies with the
standard error of the mean paired difference (McNemar's setting: only the discordant questions move it) and the
flip rate, the share of questions whose answer changed (Dutta et al. 2024, "Accuracy is Not All You Need").
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from .tasks import TaskInfo


@dataclass(frozen=True)
class Accuracy:
    n: int
    correct: int
    accuracy: float
    se: float

    @classmethod
    def of(cls, correct: int, n: int) -> Accuracy:
        p = correct / n if n else math.nan
        return cls(n, correct, p, math.sqrt(p * (1 - p) / n) if n else math.nan)


@dataclass(frozen=True)
class Summary:
    subjects: dict[str, Accuracy]
    categories: dict[str, Accuracy]   # over the questions of the category's subjects
    overall: Accuracy                 # over questions
    over_subjects: Accuracy           # mean of subject accuracies (n: subjects; correct: questions)

    def to_dict(self) -> dict:
        return {"overall": asdict(self.overall), "over_subjects": asdict(self.over_subjects),
                "categories": {k: asdict(v) for k, v in self.categories.items()},
                "subjects": {k: asdict(v) for k, v in self.subjects.items()}}


def summarize(info: TaskInfo, answers: Mapping[str, dict]) -> Summary:
    """``answers``: question key ("subject/index") -> {"answer": truth, "predicted": letter}."""
    per: dict[str, list[int]] = {}
    for key, a in answers.items():
        if a.get("answer") is None:
            continue
        subject = key.rsplit("/", 1)[0]
        per.setdefault(subject, [0, 0])
        per[subject][0] += a["predicted"] == a["answer"]
        per[subject][1] += 1
    subjects = {s: Accuracy.of(c, n) for s, (c, n) in sorted(per.items())}
    groups: dict[str, list[int]] = {}
    for s, (c, n) in per.items():
        known = info.subjects.get(s)
        names = list(known.categories) if known else []
        if s in info.hard:
            names.append("Hard")
        for g in names:
            groups.setdefault(g, [0, 0])
            groups[g][0] += c
            groups[g][1] += n
    order = list(info.categories) + ["Hard"]
    categories = {g: Accuracy.of(*groups[g]) for g in order if g in groups}
    total_c = sum(c for c, _ in per.values())
    total_n = sum(n for _, n in per.values())
    if subjects:
        mean = sum(a.accuracy for a in subjects.values()) / len(subjects)
        se = math.sqrt(sum(a.se ** 2 for a in subjects.values())) / len(subjects)
    else:
        mean = se = math.nan
    return Summary(subjects, categories, Accuracy.of(total_c, total_n), Accuracy(len(subjects), total_c, mean, se))


@dataclass(frozen=True)
class Paired:
    n: int               # questions both runs answered
    accuracy: float      # this run
    baseline: float      # the baseline run
    difference: float    # accuracy - baseline
    se: float            # standard error of the paired difference
    gained: int          # wrong in the baseline, right here
    lost: int            # right in the baseline, wrong here
    flips: int           # answers that changed (right or wrong)

    @property
    def flip_rate(self) -> float:
        return self.flips / self.n if self.n else math.nan

    def to_dict(self) -> dict:
        return asdict(self) | {"flip_rate": self.flip_rate}


def paired(answers: Mapping[str, dict], baseline: Mapping[str, dict]) -> Paired:
    """This run against a baseline over the questions both hold (with a known answer)."""
    keys = [k for k in answers if k in baseline and answers[k].get("answer") is not None]
    n = len(keys)
    mine = [answers[k]["predicted"] == answers[k]["answer"] for k in keys]
    theirs = [baseline[k]["predicted"] == answers[k]["answer"] for k in keys]
    gained = sum(a and not b for a, b in zip(mine, theirs))
    lost = sum(b and not a for a, b in zip(mine, theirs))
    flips = sum(answers[k]["predicted"] != baseline[k]["predicted"] for k in keys)
    if not n:
        return Paired(0, math.nan, math.nan, math.nan, math.nan, 0, 0, 0)
    d = (gained - lost) / n
    # the paired differences are +1 (gained), -1 (lost), 0 (else): their sample variance over n
    var = ((gained + lost) / n - d * d) * n / (n - 1) if n > 1 else math.nan
    return Paired(n, sum(mine) / n, sum(theirs) / n, d, math.sqrt(max(var, 0.0) / n) if n > 1 else math.nan,
                  gained, lost, flips)
