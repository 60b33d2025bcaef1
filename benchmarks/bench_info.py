"""`cl3 info` on a Llama-3-vocabulary GGUF: cl3's metadata reader (ggml's C parser, token texts read one by one)
against gguf-py's GGUFReader (which builds every token array in Python), side by side.

usage: python benchmarks/bench_info.py [--vocab GGUF] [--repeat 3]
Default vocabulary: llama.cpp's models/ggml-vocab-llama-bpe.gguf (Llama-3's 128,256 tokens and 280,147 merges) from the
reference build's source, else a generated GGUF of the same sizes. Target: `cl3 info` under 1 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np


def llama3_sized_vocab(path: Path) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list([f"tok{i}" for i in range(128_256)])
    w.add_token_types([gguf.TokenType.NORMAL] * 128_000 + [gguf.TokenType.CONTROL] * 256)
    w.add_token_merges([f"t{i} k{i}" for i in range(280_147)])
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def timed(command: list[str], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=Path)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import llama_cpp

    default = Path.home() / ".cache/cl3-reference" / llama_cpp.__version__ / "src/models/ggml-vocab-llama-bpe.gguf"
    with tempfile.TemporaryDirectory() as tmp:
        vocab = args.vocab or (default if default.exists() else llama3_sized_vocab(Path(tmp) / "vocab.gguf"))
        ours = timed([sys.executable, "-m", "cl3", "info", str(vocab), "--json"], args.repeat)
        reader = ("import sys, gguf; r = gguf.GGUFReader(sys.argv[1]); "
                  "[f.contents() for k, f in r.fields.items() if not k.startswith('tokenizer.ggml.')]; "
                  "len(r.fields['tokenizer.ggml.tokens'].contents())")
        theirs = timed([sys.executable, "-c", reader, str(vocab)], args.repeat)
        imports = timed([sys.executable, "-c", "import cl3.cli, llama_cpp"], args.repeat)
    print(f"vocabulary: {vocab}\n")
    print("| reader | wall s (best of %d, whole process) |" % args.repeat)
    print("|---|---|")
    print(f"| `cl3 info --json` | {ours:.2f} {'✓' if ours < 1 else '✗'} (target < 1 s) |")
    print(f"| gguf-py GGUFReader, scalars + token list | {theirs:.2f} |")
    print(f"| Python start-up + imports of cl3.cli and llama_cpp | {imports:.2f} |")


if __name__ == "__main__":
    main()
