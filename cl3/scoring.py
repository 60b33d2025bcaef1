"""Where text is scored: the chunk layout llama-perplexity and llama-imatrix share, used by cl3's ppl, KLD and imatrix.

The tokenized text is cut into chunks of ``n_ctx`` tokens; each chunk's first token is replaced by BOS when the
vocabulary adds one; ``n_batch // n_ctx`` chunks are decoded side by side as separate sequences (a chunk longer than
the batch takes several decodes); the logits at positions n_ctx/2 ... n_ctx-2 of each chunk are scored against the
tokens that follow them. llama-imatrix requests every position's logits (so the last layer computes every row, which
its statistics see); llama-perplexity only the scored half.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .errors import InputError, UsageError
from .llama import Context

RowsCallback = Callable[[int, np.ndarray, np.ndarray], None]  # (chunk, logits rows, target tokens)
GroupCallback = Callable[[int, int], None]                    # (chunks done, chunks in all)
MIN_CTX = 16
BLOCK_BYTES = 16 << 20  # logits handed over in blocks of about this size (bounded temporaries for 128k vocabularies)


@dataclass(frozen=True)
class ChunkLayout:
    n_ctx: int      # tokens per chunk
    n_seq: int      # chunks decoded side by side
    n_batch: int    # tokens per decode

    @classmethod
    def of(cls, n_ctx: int, n_batch: int) -> ChunkLayout:
        """llama-perplexity's rules for a context (chunk) size and a logical batch size."""
        if n_ctx < MIN_CTX:
            raise UsageError(f"context size {n_ctx} is too small (at least {MIN_CTX} tokens)")
        if n_batch < 1:
            raise UsageError("batch size must be positive")
        n_seq = max(1, n_batch // n_ctx)
        n_batch = min(n_batch, n_seq * n_ctx)
        if not (n_batch < n_ctx or n_batch % n_ctx == 0):
            raise UsageError(f"batch size {n_batch} must be below the context size {n_ctx} or a multiple of it")
        return cls(n_ctx, n_seq, n_batch)

    @property
    def ctx_size(self) -> int:
        """Cells of the llama_context: every side-by-side chunk has its own n_ctx."""
        return self.n_seq * self.n_ctx

    @property
    def first_scored(self) -> int:
        return self.n_ctx // 2

    @property
    def scored_per_chunk(self) -> int:
        return self.n_ctx - 1 - self.first_scored

    def ubatch_without_small_pieces(self, n_chunks: int, min_rows: int, preferred: int = 512) -> int:
        """The n_ubatch nearest ``preferred`` for which llama.cpp cuts no decode of ``n_chunks`` chunks into a piece
        of fewer than ``min_rows`` rows (llama-imatrix's filter skips such pieces, so some rows of each chunk would
        go uncounted: 6 chunks of 256 at the default 512 end in a piece of one token per chunk).

        llama.cpp's split (llama_batch_allocr): one sequence in the context takes ``n_ubatch`` tokens at a time;
        several take ``n_ubatch // n`` tokens of each of the ``n`` sequences in the decode at a time.
        """
        groups = {min(self.n_seq, n_chunks - i) for i in range(0, n_chunks, self.n_seq)}
        sizes = {min(self.n_ctx - start, self.n_batch) for start in range(0, self.n_ctx, self.n_batch)}

        def keeps_all_rows(n_ubatch: int) -> bool:
            for n in groups:
                step = n_ubatch // n if self.n_seq > 1 else n_ubatch
                if step * n < min_rows or any(0 < size % step and (size % step) * n < min_rows for size in sizes):
                    return False
            return True

        preferred = min(preferred, self.n_batch)
        for candidate in sorted(range(1, self.n_batch + 1), key=lambda u: (abs(u - preferred), -u)):
            if keeps_all_rows(candidate):
                return candidate
        return preferred

    def chunks_in(self, n_tokens: int, limit: int | None = None) -> int:
        """How many chunks a text of ``n_tokens`` gives (at most ``limit``); it needs at least two."""
        if n_tokens < 2 * self.n_ctx:
            raise InputError(f"the text has only {n_tokens} tokens; a context of {self.n_ctx} needs at least "
                             f"{2 * self.n_ctx} (use a longer text or a smaller context)", param="n_ctx")
        if limit is not None and limit < 1:
            raise UsageError("the number of chunks must be at least 1", param="chunks")
        n = n_tokens // self.n_ctx
        return n if limit is None else min(n, limit)


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, as llama-perplexity's log_softmax (float32 exp, double sum)."""
    top = logits.max(axis=1)
    sum_exp = np.exp(logits - top[:, None]).sum(axis=1, dtype=np.float64)
    picked = logits[np.arange(len(targets)), targets]
    return np.log(sum_exp) - (picked - top).astype(np.float64)


def score_chunks(ctx: Context, tokens: np.ndarray, layout: ChunkLayout, n_chunk: int, on_rows: RowsCallback, *,
                 all_outputs: bool = False, after_group: GroupCallback | None = None) -> None:
    """Decode ``n_chunk`` chunks of ``tokens`` and hand every scored block of logits to ``on_rows``, in order.

    ``on_rows(chunk, logits, targets)`` gets the logits of positions n_ctx/2 ... n_ctx-2 of each chunk, possibly
    in several blocks, valid only during the call. ``after_group(done, n_chunk)`` runs after each group of
    side-by-side chunks.
    """
    n_ctx, n_batch, first = layout.n_ctx, layout.n_batch, layout.first_scored
    model = ctx.model
    decodes = -(-n_ctx // n_batch)
    block = max(1, BLOCK_BYTES // (4 * model.n_vocab))
    for i in range(0, n_chunk, layout.n_seq):
        start = i * n_ctx
        n_seq = min(layout.n_seq, n_chunk - i)
        ctx.clear()
        for j in range(decodes):
            batch_start = start + j * n_batch
            size = min(start + n_ctx - batch_start, n_batch)
            pos = j * n_batch + np.arange(size, dtype=np.int32)
            parts = []
            for seq in range(n_seq):
                part = tokens[batch_start + seq * n_ctx: batch_start + seq * n_ctx + size].copy()
                if model.add_bos and j == 0:
                    part[0] = model.bos
                parts.append(part)
            want = np.ones(size, dtype=bool) if all_outputs else pos >= first
            n_out = ctx.decode(np.concatenate(parts), np.tile(pos, n_seq),
                               np.repeat(np.arange(n_seq, dtype=np.int32), size), np.tile(want, n_seq).astype(np.int8))
            out_pos = pos[want]  # positions with logits, the same in every sequence
            scored = np.nonzero((out_pos >= first) & (out_pos <= n_ctx - 2))[0]  # the last one predicts past the chunk
            if n_out == 0 or len(scored) == 0:
                continue
            logits = ctx.logits(n_out, copy=False)
            for seq in range(n_seq):
                row0 = seq * len(out_pos) + scored[0]
                targets = tokens[start + seq * n_ctx + out_pos[scored] + 1]
                for b in range(0, len(scored), block):
                    e = min(b + block, len(scored))
                    on_rows(i + seq, logits[row0 + b: row0 + e], targets[b:e])
        if after_group:
            after_group(i + n_seq, n_chunk)
