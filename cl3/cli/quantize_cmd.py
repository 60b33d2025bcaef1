"""`cl3 quantize`: GGUF (or HF checkpoint) → one or several llama.cpp file types, optionally with an imatrix."""

from __future__ import annotations

import shlex
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
    target_size: Annotated[Optional[str], typer.Option(
        "--target-size", metavar="SIZE", help="Instead of a type: the per-tensor mix of least KL divergence whose "
                                              "file fits SIZE (4.58GiB, 4.9GB, 600MiB, bytes).")] = None,
    target_bpw: Annotated[Optional[float], typer.Option(
        "--target-bpw", metavar="BPW", help="Instead of a type: the best mix of at most BPW bits per weight "
                                            "(as llama.cpp counts them).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With a target: show the plan, quantize "
                                                            "nothing.")] = False,
    measure: Annotated[str, typer.Option(
        "--measure", metavar="MODE", help="How a mix's sensitivity is found: all (measure every tensor and type), "
                                          "anchors (every tensor at Q2_K/Q4_K/Q6_K), sample (a few layers), proxy "
                                          "(quantization error only); auto picks by model size.")] = "auto",
    sensitivity_chunks: Annotated[int, typer.Option(
        "--sensitivity-chunks", metavar="N", help="512-token chunks of the calibration text each sensitivity "
                                                  "measurement scores.")] = 4,
    force: Force = False,
    quiet: Quiet = False,
    list_types: Annotated[bool, typer.Option("--list-types", help="List the file types and exit.")] = False,
) -> None:
    """Quantize a model with llama.cpp (several types in one run; importance matrix optional), or to a size.

    Outputs default to {name}-{size}-{TYPE}.gguf beside the source (-im added when an imatrix is used). With
    --target-size or --target-bpw: {name}-{size}-mix-{target}.gguf, its recipe beside it (.tensor-types.txt for
    llama-quantize --tensor-type-file, .recipe.json with the whole llama-quantize command).
    """
    from ..errors import UsageError
    from ..hub import resolve_source
    from ..mix import Target
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
    if target_size is not None and target_bpw is not None:
        raise UsageError("give --target-size or --target-bpw, not both")
    target = Target.size(target_size) if target_size is not None else (
        Target.bits(target_bpw) if target_bpw is not None else None)
    if dry_run and target is None:
        raise UsageError("--dry-run shows a mix's plan; give --target-size or --target-bpw")
    if src is None or (not all_types and target is None):
        raise UsageError("give a source model and a type, e.g. `cl3 quantize model-F16.gguf Q4_K_M`, or a target "
                         "(--target-size 4.58GiB)")

    def stage(description: str, unit: str):
        return progress_bar(description, unit=unit, quiet=quiet)

    result = run_quantize(resolve_source(src), all_types, out=output, imatrix=imatrix_choice(imatrix),
                          threads=threads, n_gpu_layers=n_gpu_layers, output_tensor_type=output_tensor_type,
                          token_embedding_type=token_embedding_type, pure=pure,
                          leave_output_tensor=leave_output_tensor, allow_requantize=allow_requantize,
                          imatrix_chunks=imatrix_chunks, force=force, target=target, measure=measure,
                          sensitivity_chunks=sensitivity_chunks, dry_run=dry_run, on_plan=print_plan, stage=stage)
    if result.imatrix_file is not None:
        note = " (reused)" if result.imatrix_reused else ""
        err.print(f"imatrix: {result.imatrix_file}{note}", highlight=False)
    for path in result.outputs:
        out.print(f"wrote {path} ({path.stat().st_size / 1024**2:.1f} MiB)", highlight=False, soft_wrap=True)
    if result.mix is not None:
        m = result.mix
        predicted = (f"predicted {m.plan.predicted_kld:.5f}" if m.plan.sensitivity.calibrated else
                     "not predicted: the plan used the uncalibrated proxy")
        out.print(f"measured KLD {m.measured_kld:.5f} ({predicted}) on "
                  f"{m.plan.metadata['cl3.mix.kld_text']}", highlight=False, soft_wrap=True)
        out.print(f"wrote {m.recipe} and {m.recipe_json}; stock llama.cpp makes the same file with:",
                  highlight=False, soft_wrap=True)
        out.print("  " + shlex.join(m.command), highlight=False, soft_wrap=True, markup=False)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def print_plan(plan) -> None:
    """The mix before it is made: type, size and predicted KLD per tensor, and llama.cpp's types beside it."""
    from rich.table import Table

    from ..mix import describe_plan

    s = plan.sensitivity
    # Without any measured tensor the figures are the raw proxy (a squared error), not a KL divergence: named so.
    figure = "predicted KLD" if s.calibrated else "proxy error (uncalibrated)"
    t = Table(title=f"mix for {plan.target.label}: {_size(plan.size_bytes)}, {plan.bpw:.2f} BPW, {figure} "
                    f"{plan.predicted_kld:.5g} (sensitivity: {s.mode}, {s.measurements} measurements)")
    for col in ("tensor", "type", "size", figure):
        t.add_column(col, justify="left" if col in ("tensor", "type") else "right")
    for row in describe_plan(plan):
        t.add_row(row["tensor"], row["type"], _size(row["bytes"]),
                  f"{row['predicted_kld']:.5g}" + ("" if row["measured"] or not s.calibrated else "*"))
    out.print(t)
    std = Table(title="llama.cpp's types on the same sensitivity")
    for col in ("type", "size", "BPW", figure):
        std.add_column(col, justify="left" if col == "type" else "right")
    for name, v in plan.standard.items():
        kld = v["predicted_kld"]
        std.add_row(name, _size(v["size_bytes"]), f"{v['bpw']:.2f}", "" if kld is None else f"{kld:.5g}")
    out.print(std)
    if s.calibrated:
        out.print("[dim]* predicted from the quantization error (not measured for this type)[/]")
    else:
        out.print("[dim]proxy error: the imatrix-weighted squared quantization error, which ranks the choices but is "
                  "no KL divergence (nothing was measured; --measure sample calibrates it on a few tensors)[/]")
