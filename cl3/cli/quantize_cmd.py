"""`cl3 quantize`: GGUF (or HF checkpoint) → one or several llama.cpp file types, optionally with an imatrix."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.core import TyperCommand

from .app import app, err, out, progress_bar

BUILTIN = ":builtin:"  # what a bare `--imatrix` (no file) becomes


class _BareImatrixFlag(TyperCommand):
    """Let `--imatrix` be given without a value (then cl3 computes one on its built-in calibration text)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        fixed: list[str] = []
        for i, arg in enumerate(args):
            fixed.append(arg)
            if arg == "--imatrix" and (i + 1 == len(args) or args[i + 1].startswith("-")):
                fixed.append(BUILTIN)
        return super().parse_args(ctx, fixed)


@app.command(cls=_BareImatrixFlag)
def quantize(
    src: str = typer.Argument(None, help="F32/F16/BF16 GGUF, a Hugging Face model directory or a hub repo id "
                              "(converted on the fly)."),
    types: list[str] = typer.Option(None, "-t", "--type", help="File type(s): Q4_K_M, q8_0, Q4_K (= Q4_K_M), ... "
                                    "Comma-separated or repeated; see --list-types."),
    imatrix: str = typer.Option(None, "--imatrix", metavar="[FILE]",
                                help="Use this importance matrix; alone: compute one on cl3's built-in bilingual "
                                     "calibration text (cached beside the source)."),
    imatrix_chunks: int = typer.Option(None, "--imatrix-chunks", help="With a bare --imatrix: use at most this "
                                       "many 512-token chunks of the built-in text (faster, coarser)."),
    output: Path = typer.Option(None, "-o", "--output", help="Output file (one type) or directory. Default: beside "
                                "the source, named {name}-{size}-{TYPE}.gguf."),
    name_imatrix: bool = typer.Option(False, "--name-imatrix", help="Add -im to default output names when an "
                                      "imatrix is used (it is always recorded in the metadata)."),
    threads: int = typer.Option(0, "--threads", help="Threads (0: all cores)."),
    output_tensor_type: str = typer.Option(None, "--output-tensor-type", help="ggml type for output.weight."),
    token_embedding_type: str = typer.Option(None, "--token-embedding-type", help="ggml type for token_embd.weight."),
    pure: bool = typer.Option(False, "--pure", help="No k-quant mixture: every tensor gets the file type's type."),
    leave_output_tensor: bool = typer.Option(False, "--leave-output-tensor", help="Leave output.weight unquantized."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bars."),
    list_types: bool = typer.Option(False, "--list-types", help="List the file types and exit."),
) -> None:
    """Quantize a model with llama.cpp (several types in one run; importance matrix optional)."""
    from ..errors import UsageError
    from ..quantize import ALIASES, file_types
    from ..quantize import quantize as run_quantize

    if list_types:
        for name, file_type in file_types().items():
            aliases = [a for a, target in ALIASES.items() if target == name]
            notes = ([f"alias {', '.join(aliases)}"] if aliases else []) + (["needs an imatrix"]
                                                                             if file_type.needs_imatrix else [])
            out.print(f"{name:10} {'; '.join(notes)}".rstrip(), highlight=False)
        return
    if src is None or not types:
        raise UsageError("give a source model and --type (see cl3 quantize --help)")

    def stage(description: str, unit: str):
        return progress_bar(description, unit=unit, quiet=quiet)

    from ..hub import resolve_source

    result = run_quantize(resolve_source(src), types, out=output, imatrix=True if imatrix == BUILTIN else imatrix, threads=threads,
                          output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type,
                          pure=pure, leave_output_tensor=leave_output_tensor,
                          imatrix_chunks=imatrix_chunks, name_imatrix=name_imatrix, stage=stage)
    if result.imatrix_file is not None:
        note = " (reused)" if result.imatrix_reused else ""
        err.print(f"imatrix: {result.imatrix_file}{note}", highlight=False)
    for path in result.outputs:
        out.print(f"wrote {path} ({path.stat().st_size / 1024**2:.1f} MiB)", highlight=False, soft_wrap=True)
