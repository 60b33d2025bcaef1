"""`cl3 merge`: fold a PEFT LoRA adapter into its base checkpoint (numpy, no PyTorch)."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, out, progress_bar
from .options import Quiet


@app.command()
def merge(
    base: str = typer.Argument(..., help="Base model: a Hugging Face model directory or a hub repo id."),
    lora: str = typer.Argument(..., help="PEFT LoRA adapter: a directory (adapter_config.json + "
                                         "adapter_model.safetensors) or a hub repo id."),
    output: Path = typer.Option(..., "-o", "--output", help="New directory for the merged checkpoint."),
    dtype: str = typer.Option("auto", "--dtype", help="bf16, f16, f32 or auto (the base's)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept pickle (.bin) files you trust."),
    quiet: Quiet = False,
) -> None:
    """Merge a LoRA adapter (incl. full embed_tokens/lm_head, extended vocabulary) into its base model."""
    from ..hub import resolve_source
    from ..merge import plan_merge

    base_dir = resolve_source(base)
    lora_dir = resolve_source(lora)
    plan = plan_merge(base_dir, lora_dir, output, dtype=dtype, allow_pickle=allow_pickle)
    with progress_bar("merging", quiet=quiet) as update:
        result = plan.run(update)
    out.print(f"merged {result.n_merged} LoRA pairs and {result.n_replaced} full tensors into {result.path} "
              f"({result.dtype}, vocabulary {result.vocab_size})", highlight=False)
