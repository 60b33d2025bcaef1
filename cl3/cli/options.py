"""The options several commands share, defined once, with llama.cpp's spellings where it has them.

Each command keeps its own default (``ctx_size: CtxSize = 512``); the flag names and help texts live here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

CtxSize = Annotated[int, typer.Option("-c", "--ctx-size", metavar="N", help="Context size in tokens.")]
Threads = Annotated[Optional[int], typer.Option(
    "-t", "--threads", metavar="N", help="CPU threads (default: llama.cpp's choice: physical cores to evaluate, "
                                         "all cores to quantize).")]
GpuLayers = Annotated[int, typer.Option(
    "-ngl", "--n-gpu-layers", metavar="N", help="Layers to offload to the GPU: -1 all, 0 none. CPU-only builds "
                                                "ignore it (`cl3 doctor` shows what this build can do).")]
BatchSize = Annotated[int, typer.Option("-b", "--batch-size", metavar="N", help="Logical batch size (n_batch).")]
Output = Annotated[Optional[str], typer.Option(
    "-o", "--output", metavar="PATH", help="Output file, or a folder (an existing one, or a name ending in /).")]
OutputDir = Annotated[Optional[str], typer.Option("-o", "--output", metavar="DIR", help="Output folder.")]
TextFile = Annotated[Optional[Path], typer.Option(
    "-f", "--file", metavar="FILE", help="UTF-8 text file (default: cl3's built-in evaluation text).")]
Chunks = Annotated[Optional[int], typer.Option("--chunks", metavar="N", help="Use at most this many chunks.")]
Types = Annotated[Optional[list[str]], typer.Option(
    "--type", metavar="TYPE", help="Quantization type(s): Q4_K_M, q8_0, Q4_K (= Q4_K_M), ...; comma-separated or "
                                   "repeated (`cl3 quantize --list-types`).")]
Force = Annotated[bool, typer.Option("--force", help="Replace output files that already exist.")]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="No progress bars.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
NPrompt = Annotated[int, typer.Option("-p", "--n-prompt", metavar="N", help="Prompt tokens of the pp test (0: skip).")]
NGen = Annotated[int, typer.Option("-n", "--n-gen", metavar="N", help="Generated tokens of the tg test (0: skip).")]
Repetitions = Annotated[int, typer.Option("-r", "--repetitions", metavar="N", help="Timed runs of each test.")]
ChatTemplate = Annotated[Optional[str], typer.Option(
    "--chat-template", metavar="NAME|FILE", help="Chat template: a name cl3 knows or a Jinja file.")]

# Spellings of earlier releases, still accepted (rewritten before parsing; not shown in help).
OLD_SPELLINGS = {"--ctx": "--ctx-size", "--gpu-layers": "--n-gpu-layers", "--text": "--file", "--calib": "--file",
                 "--out": "--output", "--batch": "--batch-size", "--ubatch": "--ubatch-size", "--types": "--type"}


def modern_argv(argv: list[str]) -> list[str]:
    """``argv`` with old option spellings replaced (``--ctx 512`` and ``--ctx=512`` alike), up to a ``--``."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        name, eq, value = arg.partition("=")
        out.append(OLD_SPELLINGS.get(name, name) + eq + value if name in OLD_SPELLINGS else arg)
    return out


# Library parameters (cl3.errors.Cl3Error.param) as the command line spells them.
FLAGS = {"imatrix": "--imatrix", "imatrix_chunks": "--imatrix-chunks", "n_ctx": "-c/--ctx-size",
         "chunks": "--chunks", "n_batch": "-b/--batch-size", "force": "--force",
         "allow_requantize": "--allow-requantize", "resume": "--resume", "in_files": "--in-file",
         "chat_template": "--chat-template", "pre_tokenizer": "--pre-tokenizer", "allow_pickle": "--allow-pickle",
         "repetitions": "-r/--repetitions", "out": "-o/--output", "output_tensor_type": "--output-tensor-type",
         "token_embedding_type": "--token-embedding-type", "dtype": "--dtype", "source": "--source",
         "outtype": "--outtype", "system": "--system", "target_size": "--target-size", "target_bpw": "--target-bpw",
         "measure": "--measure", "sensitivity_chunks": "--sensitivity-chunks", "top_k": "--top-k", "cors": "--cors",
         "task": "--task", "split": "--split", "shots": "--shots", "subjects": "--subjects", "limit": "--limit",
         "template": "--template", "baseline": "--baseline", "dataset": "--dataset", "evals": "--eval",
         "style": "--prompts"}


def hint(param: str | None) -> str | None:
    """What to add to an error about library parameter ``param``."""
    if param == "force":
        return "use --force to replace it"
    return f"see {FLAGS[param]}" if param in FLAGS else None
