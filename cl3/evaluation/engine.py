"""Where multiple-choice questions are scored: one forward pass per question, choice scores from the next position.

The authors' "constrained decoding" (scripts/ceval|cmmlu/llama_evaluator.py): the model's answer is the choice with
the highest score at the position after the prompt, where a choice's score is the logit of the token encoding the
bare letter (``tokenizer.encode("A", add_special_tokens=False)[0]``) plus the logit of the last token of ``：A``
(``tokenizer.encode("：A")[-1]``). Their scores are transformers' *processed* scores of ``generate`` with
``repetition_penalty=1.1`` (and ``temperature=0.2``, a common scale that changes no answer): a logit of a token that
occurs in the prompt is divided by 1.1 when positive, multiplied by 1.1 when negative. MMLU (hendrycks/test's
protocol): the plain logit of ``tokenizer("A").input_ids[-1]``. The prompt is tokenized as their
``tokenizer(text)`` does: BOS added, special-token texts parsed.

Speed: the questions of a subject share their whole few-shot prefix. It is decoded once into sequence 0; each
question then starts from a copy of it (``llama_memory_seq_cp``: the cells are shared, nothing is recomputed) on its
own sequence, and several questions' remaining tokens go into one decode side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..llama import Context, Model
from .tasks import CHOICES

AUTHORS_PENALTY = 1.1  # their GenerationConfig(repetition_penalty=1.1)


@dataclass(frozen=True)
class ChoiceTokens:
    first: tuple[int, ...]          # per choice: the bare letter's token
    second: tuple[int, ...] | None  # per choice: the last token of "：A" (C-Eval/CMMLU), None for MMLU
    penalty: float                  # repetition penalty over the prompt's tokens (1.0: none)

    @classmethod
    def of(cls, model: Model, language: str) -> ChoiceTokens:
        if language == "en":
            return cls(tuple(int(model.tokenize(c)[-1]) for c in CHOICES), None, 1.0)
        first = tuple(int(model.tokenize(c, add_special=False)[0]) for c in CHOICES)
        second = tuple(int(model.tokenize("：" + c)[-1]) for c in CHOICES)
        return cls(first, second, AUTHORS_PENALTY)

    @property
    def ids(self) -> np.ndarray:
        return np.array(self.first + (self.second or ()), dtype=np.int64)

    def scores(self, values: np.ndarray, prompt: np.ndarray) -> np.ndarray:
        """Choice scores from ``values`` (the logits of :attr:`ids`, in that order) after ``prompt``."""
        values = values.astype(np.float32)
        if self.penalty != 1.0:
            seen = np.isin(self.ids, prompt)
            penalised = np.where(values < 0, values * np.float32(self.penalty), values / np.float32(self.penalty))
            values = np.where(seen, penalised, values)
        n = len(CHOICES)
        out = values[:n] if self.second is None else values[:n] + values[n:]
        return out.astype(np.float64)


def tokenize_prompt(model: Model, text: str) -> np.ndarray:
    """As the authors' ``tokenizer(text)``: BOS added (when the vocabulary adds one), special tokens parsed."""
    return model.tokenize(text, add_special=True, parse_special=True)


Scored = Callable[[int, np.ndarray], None]  # (item index, choice scores)


class Scorer:
    """Scores prompts on one context. ``n_parallel`` questions per group, each on its own sequence."""

    def __init__(self, ctx: Context, choice_tokens: ChoiceTokens, *, n_parallel: int, reuse_prefix: bool = True):
        self.ctx = ctx
        self.tokens = choice_tokens
        self.n_parallel = max(1, n_parallel)
        self.reuse_prefix = reuse_prefix
        self._ids = choice_tokens.ids

    def score(self, prompts: Sequence[np.ndarray], on_scored: Scored) -> None:
        """Score prompts that share a prefix (one subject's); ``on_scored(i, scores)`` as each group finishes."""
        if not prompts:
            return
        n_ctx = self.ctx.n_ctx
        shared = common_prefix(prompts) if self.reuse_prefix else 0
        for p in prompts:
            if len(p) > n_ctx:
                raise InputError(f"a prompt of {len(p)} tokens does not fit the context of {n_ctx} (raise the "
                                 "context size, or use fewer shots)", param="n_ctx")
        self.ctx.clear()
        if shared:
            self._decode([(0, prompts[0][:shared], 0)], want_last=False)
        start = 0
        while start < len(prompts):
            group, used = [], shared
            while (start + len(group) < len(prompts) and len(group) < self.n_parallel
                   and (not group or used + len(prompts[start + len(group)]) - shared <= n_ctx)):
                used += len(prompts[start + len(group)]) - shared
                group.append(start + len(group))
            seqs = list(range(1, len(group) + 1))
            if shared:
                for s in seqs:
                    self.ctx.seq_copy(0, s)
            rows = self._decode([(s, prompts[i][shared:], shared) for s, i in zip(seqs, group)], want_last=True)
            for i, row in zip(group, rows):
                on_scored(i, self.tokens.scores(row, prompts[i]))
            for s in seqs:
                self.ctx.seq_remove(s)
            start += len(group)

    def _decode(self, parts: list[tuple[int, np.ndarray, int]], *, want_last: bool) -> list[np.ndarray]:
        """Decode (sequence, tokens, first position) parts in batches of at most n_batch tokens; the logits of
        :attr:`ids` at each part's last token when ``want_last``."""
        tokens = np.concatenate([t for _, t, _ in parts]).astype(np.int32)
        pos = np.concatenate([p0 + np.arange(len(t), dtype=np.int32) for _, t, p0 in parts])
        seq = np.concatenate([np.full(len(t), s, dtype=np.int32) for s, t, _ in parts])
        out = np.zeros(len(tokens), dtype=np.int8)
        if want_last:
            out[np.cumsum([len(t) for _, t, _ in parts]) - 1] = 1
        rows = []
        for b in range(0, len(tokens), self.ctx.n_batch):
            e = min(b + self.ctx.n_batch, len(tokens))
            n_out = self.ctx.decode(tokens[b:e], pos[b:e], seq[b:e], out[b:e])
            if n_out:
                logits = self.ctx.logits(n_out, copy=False)
                rows.extend(logits[r, self._ids].copy() for r in range(n_out))
        return rows


def common_prefix(prompts: Sequence[np.ndarray]) -> int:
    """Tokens every prompt starts with, leaving each at least one token of its own."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        differ = np.nonzero(first[:n] != p[:n])[0]
        if len(differ):
            n = int(differ[0])
    return max(n, 0)
