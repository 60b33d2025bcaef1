"""`cl3 export ollama` / `cl3 export lmstudio`: hand a GGUF to the desktop tools people already run."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer
from rich.markup import escape

from ..errors import Cl3Error
from .app import Cl3Typer, app, err, out, print_problems, progress_bar
from .options import ChatTemplate, Force, OutputDir

export_app = Cl3Typer(help="Hand a GGUF to Ollama or LM Studio.", no_args_is_help=True)
app.add_typer(export_app, name="export")


@export_app.command("ollama")
def ollama(
    model: Path = typer.Argument(..., help="A .gguf file with a chat template."),
    output: OutputDir = None,
    name: str = typer.Option(None, "--name", help="Ollama model name (default: from the GGUF's name)."),
    system: str = typer.Option(None, "--system", help="SYSTEM prompt; \"\" for none. Default: none (the template's "
                               "own behaviour, including its own default system prompt), except the Chinese-LLaMA-"
                               "Alpaca authors' bilingual prompt for their models when the template has none."),
    generation_config: Path = typer.Option(None, "--generation-config", help="HF generation_config.json (or its "
                                           "directory) for sampling defaults the GGUF does not carry."),
    license_file: Path = typer.Option(None, "--license", help="A license text to embed (default: the GGUF's "
                                      "general.license* keys)."),
    num_ctx: int = typer.Option(None, "--num-ctx", help="Context size (default: the model's training context)."),
    chat_template: ChatTemplate = None,
    create: bool = typer.Option(False, "--create", help="Run `ollama create` (fails, naming the command, if ollama is "
                                "not on PATH)."),
    force: Force = False,
) -> None:
    """Write an Ollama Modelfile: FROM, TEMPLATE translated from the GGUF's chat template, SYSTEM, PARAMETERs, LICENSE."""
    from ..export import export_ollama, ollama_create

    result = export_ollama(model, output, name=name, system=system, generation_config=generation_config,
                           license_file=license_file, num_ctx=num_ctx, chat_template=chat_template, force=force)
    out.print(f"wrote {escape(str(result.modelfile))} (template: {result.layout.family})", highlight=False)
    for note in result.notes:
        err.print(f"note: {escape(note)}", highlight=False)
    print_problems(model, chat_template)
    command = shlex.join(result.create_command)
    if not create:
        out.print(f"create the model with: {escape(command)}", highlight=False, soft_wrap=True)
        return
    code = ollama_create(result)
    if code is None:  # the model was not created: a script must see a failure
        raise Cl3Error(f"ollama is not on PATH, so the model was not created; the Modelfile is written, create the "
                       f"model with: {command}")
    if code != 0:
        raise Cl3Error(f"`{command}` failed with exit code {code}")
    out.print(f"created Ollama model {escape(result.name)}; run it with: ollama run {escape(result.name)}",
              highlight=False)


@export_app.command("lmstudio")
def lmstudio(
    model: Path = typer.Argument(..., help="A .gguf file."),
    models_dir: Path = typer.Option(None, "--models-dir", help="LM Studio's models folder (default: "
                                    "$CL3_LMSTUDIO_MODELS_DIR or ~/.lmstudio/models)."),
    publisher: str = typer.Option(None, "--publisher", help="Publisher folder (default: the GGUF's organization, "
                                  "else 'local')."),
    model_name: str = typer.Option(None, "--model", help="Model folder (default: {name}-GGUF)."),
    mode: str = typer.Option("copy", "--mode", help="copy, hardlink (no extra space, same disk) or symlink."),
    force: Force = False,
) -> None:
    """Place the GGUF in LM Studio's models folder as publisher/model/file.gguf."""
    from ..export import export_lmstudio
    from ..metadata import read_metadata

    read_metadata(model)  # a bad input fails before the progress bar appears
    with progress_bar("copying", quiet=mode != "copy") as update:
        target = export_lmstudio(model, models_dir, publisher=publisher, model=model_name, mode=mode, force=force,
                                 progress=update)
    out.print(f"LM Studio model: {escape(str(target))}", highlight=False, soft_wrap=True)
