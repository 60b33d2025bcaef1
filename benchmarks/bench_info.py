"""`cl3 info` on a Llama-3-vocabulary GGUF: cl3's metadata reader (ggml's C parser, token texts read one by one)
against gguf-py's GGUFReader (which builds every token array in Python), side by side.

usage: python benchmarks/bench_info.py [--vocab GGUF] [--repeat 3]
Default vocabulary: llama.cpp's models/ggml-vocab-llama-bpe.gguf (Llama-3's 128,256 tokens and 280,147 merges) from the
reference build's source, else a generated GGUF of the same sizes. Target: `cl3 info` under 1 s.
"""

from __future__ import annotations

import argparse
import os
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


def sparse_8b(path: Path) -> Path:
    """A 16 GB Llama-3-8B-shaped F16 GGUF (291 tensors, the 128,256-token vocabulary) costing no disk: the header is
    written and the file truncated to its full size, so the tensor data is a hole (reads as zeros)."""
    L, H, F, V = 32, 4096, 14336, 128_256
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(L)
    w.add_embedding_length(H)
    w.add_feed_forward_length(F)
    w.add_head_count(32)
    w.add_head_count_kv(8)
    w.add_file_type(1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list([f"tok{i}" for i in range(V)])
    w.add_token_types([gguf.TokenType.NORMAL] * (V - 256) + [gguf.TokenType.CONTROL] * 256)
    w.add_token_merges([f"t{i} k{i}" for i in range(280_147)])
    shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,), "output.weight": (V, H)}
    for i in range(L):
        shapes |= {f"blk.{i}.attn_norm.weight": (H,), f"blk.{i}.ffn_norm.weight": (H,),
                   f"blk.{i}.attn_q.weight": (H, H), f"blk.{i}.attn_k.weight": (1024, H),
                   f"blk.{i}.attn_v.weight": (1024, H), f"blk.{i}.attn_output.weight": (H, H),
                   f"blk.{i}.ffn_gate.weight": (F, H), f"blk.{i}.ffn_up.weight": (F, H),
                   f"blk.{i}.ffn_down.weight": (H, F)}
    data = 0
    for name, shape in shapes.items():
        dtype = np.dtype(np.float32 if len(shape) == 1 else np.float16)
        n = int(np.prod(shape)) * dtype.itemsize
        w.add_tensor_info(name, shape, dtype, n)
        data = -(-data // 32) * 32 + n
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    os.truncate(path, -(-path.stat().st_size // 32) * 32 + data)
    return path


def bytes_read(command: list[str]) -> int:
    """What a process read (rchar of /proc/PID/io, Linux), to show cl3 info reads the header only."""
    script = ("import subprocess, sys, time; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
              "io = 0\nwhile p.poll() is None:\n    try:\n        io = int(open(f'/proc/{p.pid}/io').read().split()[1])\n"
              "    except (OSError, ValueError, IndexError):\n        pass\n    time.sleep(0.005)\nprint(io)")
    out = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True, check=True)
    return int(out.stdout.strip() or 0)


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
        big = sparse_8b(Path(tmp) / "sparse-8b-F16.gguf")
        command = [sys.executable, "-m", "cl3", "info", str(big), "--json"]
        big_s, big_read, big_gib = timed(command, args.repeat), bytes_read(command), big.stat().st_size / 2**30
    print(f"vocabulary: {vocab}\n")
    print("| reader | wall s (best of %d, whole process) |" % args.repeat)
    print("|---|---|")
    print(f"| `cl3 info --json` | {ours:.2f} {'✓' if ours < 1 else '✗'} (target < 1 s) |")
    print(f"| gguf-py GGUFReader, scalars + token list | {theirs:.2f} |")
    print(f"| Python start-up + imports of cl3.cli and llama_cpp | {imports:.2f} |")
    print(f"| `cl3 info --json` on an 8B-shaped F16 GGUF ({big_gib:.1f} GiB, sparse: the same "
          f"header, tensor data a hole; {big_read / 2**20:.1f} MiB read by the process) | {big_s:.2f} "
          f"{'✓' if big_s < 1 else '✗'} |")


if __name__ == "__main__":
    main()
