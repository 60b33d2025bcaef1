"""`cl3 quantize`: GGUF (or HF checkpoint) → one or several llama.cpp file types, optionally with an imatrix."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .app import BareImatrixCommand, app, err, imatrix_choice, out, progress_bar
from .options import Force, GpuLayers, Output, Quiet, Threads, Types


@app.command(cls=BareImatrixCommand)
def quantize(
    src: Annotated[Optional[str], typer.Argument(
        metavar="SRC", help="F32/F16/BF16 GGUF, a Hugging Face model directory or a hub repo id (converted on the "
                            "fly).")] = None,
    type_args: Annotated[Optional[list[str]], typer.Argument(
        metavar="TYPE", help="File type(s), as llama-quantize takes them: Q4_K_M, q8_0, Q4_K (= Q4_K_M), ...")] = None,
    types: Types = None,
    imatrix: Annotated[Optional[str], typer.Option(
        "--imatrix", metavar="[FILE]", help="Use this importance matrix; alone: compute one on cl3's built-in "
                                            "bilingual calibration text (cached beside the source).")] = None,
    imatrix_chunks: Annotated[Optional[int], typer.Option(
        "--imatrix-chunks", metavar="N", help="With a bare --imatrix: use at most this many 512-token chunks of the "
                                              "built-in text (faster, coarser).")] = None,
    output: Output = None,
    threads: Threads = None,
    n_gpu_layers: GpuLayers = -1,
    output_tensor_type: Annotated[Optional[str], typer.Option(
        "--output-tensor-type", metavar="TYPE", help="ggml type for output.weight.")] = None,
    token_embedding_type: Annotated[Optional[str], typer.Option(
        "--token-embedding-type", metavar="TYPE", help="ggml type for token_embd.weight.")] = None,
    pure: Annotated[bool, typer.Option("--pure", help="No k-quant mixture: every tensor gets the file type's "
                                                      "type.")] = False,
    leave_output_tensor: Annotated[bool, typer.Option("--leave-output-tensor", help="Leave output.weight "
                                                                                    "unquantized.")] = False,
    allow_requantize: Annotated[bool, typer.Option("--allow-requantize", help="Accept an already quantized source "
                                                                              "(quality suffers).")] = False,
    force: Force = False,
    quiet: Quiet = False,
    list_types: Annotated[bool, typer.Option("--list-types", help="List the file types and exit.")] = False,
) -> None:
    """Quantize a model with llama.cpp (several types in one run; importance matrix optional).

    Outputs default to {name}-{size}-{TYPE}.gguf beside the source (-im added when an imatrix is used).
    """
    from ..errors import UsageError
    from ..hub import resolve_source
    from ..quantize import ALIASES, file_types
    from ..quantize import quantize as run_quantize

    if list_types:
        for name, file_type in file_types().items():
            aliases = [a for a, target in ALIASES.items() if target == name]
            notes = ([f"alias {', '.join(aliases)}"] if aliases else []) + (["needs an imatrix"]
                                                                             if file_type.needs_imatrix else [])
            out.print(f"{name:10} {'; '.join(notes)}".rstrip(), highlight=False)
        return
    all_types = [*(type_args or []), *(types or [])]
    if src is None or not all_types:
        raise UsageError("give a source model and a type, e.g. `cl3 quantize model-F16.gguf Q4_K_M`")

    def stage(description: str, unit: str):
        return progress_bar(description, unit=unit, quiet=quiet)

    result = run_quantize(resolve_source(src), all_types, out=output, imatrix=imatrix_choice(imatrix),
                          threads=threads, n_gpu_layers=n_gpu_layers, output_tensor_type=output_tensor_type,
                          token_embedding_type=token_embedding_type, pure=pure,
                          leave_output_tensor=leave_output_tensor, allow_requantize=allow_requantize,
                          imatrix_chunks=imatrix_chunks, force=force, stage=stage)
    if result.imatrix_file is not None:
        note = " (reused)" if result.imatrix_reused else ""
        err.print(f"imatrix: {result.imatrix_file}{note}", highlight=False)
    for path in result.outputs:
        out.print(f"wrote {path} ({path.stat().st_size / 1024**2:.1f} MiB)", highlight=False, soft_wrap=True)
