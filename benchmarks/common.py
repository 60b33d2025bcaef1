"""What the benchmark scripts share: the synthetic model they measure (built with the tests' model factory)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # the benchmarks use tests/tiny.py, the test-model factory
    sys.path.insert(0, str(REPO))


def synthetic_f16_gguf(work: Path, hidden: int, layers: int, ffn: int) -> Path:
    """A synthetic Llama checkpoint (random weights, Llama-3 tokenizer) converted to F16 by cl3, reused if present.
    Built in a child process so the calling process stays small (a child's peak RSS as reported by wait4 includes
    the memory of the parent it was forked from)."""
    gguf_path = work / f"bench-h{hidden}-l{layers}-f{ffn}-f16.gguf"
    if not gguf_path.exists():
        heads = max(4, hidden // 64)
        script = (
            "from cl3.convert import convert\n"
            f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
            "from tests.tiny import build_llama3_checkpoint\n"
            f"ckpt = build_llama3_checkpoint({str(work / f'hf-h{hidden}-l{layers}')!r}, hidden={hidden}, "
            f"layers={layers}, heads={heads}, kv_heads={max(1, heads // 4)}, ffn={ffn}, shards=1)\n"
            f"convert(ckpt.path, {str(gguf_path)!r}, 'f16')\n"
        )
        subprocess.run([sys.executable, "-c", script], check=True)
    return gguf_path
