"""`cl3 convert`: HF checkpoint (directory or hub repo id) → GGUF; with --lora, a PEFT adapter → llama.cpp LoRA GGUF."""

from __future__ import annotations

from typing import Annotated

import typer

from .app import app, out, print_problems, progress_bar
from .options import ChatTemplate, Force, Quiet


@app.command()
def convert(
    src: str = typer.Argument(..., help="Hugging Face model directory or hub repo id (config.json, safetensors, "
                                        "tokenizer files)."),
    output: Annotated[str, typer.Option(
        "-o", "--output", metavar="PATH", help="Output .gguf file, or a folder (an existing one, or a name ending in "
                                               "/) for the default name {name}-{size}-{TYPE}.gguf.")] = ".",
    outtype: str = typer.Option("auto", "--outtype", help="f32, f16, bf16, q8_0 or auto (f16 for f16 weights, else bf16)."),
    lora: str = typer.Option(None, "--lora", help="Instead: write this PEFT LoRA adapter (dir or repo id) as a "
                                                 "llama.cpp LoRA GGUF for the base SRC (`cl3 chat --lora`)."),
    pre_tokenizer: str = typer.Option(None, "--pre-tokenizer", help="Override the detected BPE pre-tokenizer name."),
    chat_template: ChatTemplate = None,
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept pytorch_model*.bin (pickle) checkpoints."),
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Convert a Hugging Face checkpoint to GGUF (streaming; no PyTorch)."""
    from ..chat_templates import template_from_spec
    from ..convert import convert as run_convert
    from ..hub import resolve_source

    if lora:
        from ..merge import export_lora_gguf

        r = export_lora_gguf(resolve_source(lora), resolve_source(src, config_only=True), output,
                             outtype=outtype, allow_pickle=allow_pickle, force=force)
        out.print(f"wrote {r.path} (LoRA adapter, {r.n_pairs} pairs, alpha {r.alpha:g})")
        return
    if chat_template is not None:
        template_from_spec(chat_template)  # a bad name or file fails before any work
    with progress_bar("converting", quiet=quiet) as update:
        result = run_convert(resolve_source(src), output, outtype, allow_pickle=allow_pickle,
                             pre_tokenizer=pre_tokenizer, chat_template=chat_template, force=force, progress=update)
    out.print(f"wrote {result.path} ({result.outtype}, {result.n_tensors} tensors, "
              f"{result.n_params / 1e6:.1f}M parameters, {result.n_bytes / 1024**3:.2f} GiB)")
    if result.template is not None and result.template.source != "checkpoint":
        from ..chat_templates import describe_source

        out.print(f"chat template: {result.template.name}, from {describe_source(result.template.source, result.template.name)}",
                  highlight=False)
    print_problems(result.path)
