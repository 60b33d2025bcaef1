"""`cl3 chat MODEL.gguf`: the terminal chat UI, or one streamed reply with `-p`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .app import app, err
from .options import GpuLayers, Threads

if TYPE_CHECKING:
    from ..chat import SamplingParams


@app.command()
def chat(
    model: Path = typer.Argument(..., help="The GGUF model file.", show_default=False),
    prompt: str = typer.Option(None, "--prompt", "-p", help="No TUI: stream one reply to this prompt to stdout ('-': read stdin)."),
    system: str = typer.Option(None, "--system", "-s", help="System prompt (default: the Chinese-LLaMA-Alpaca authors' "
                               "prompt for their models, none for others: the template's own behaviour applies)."),
    n_ctx: Annotated[int, typer.Option("-c", "--ctx-size", metavar="N",
                                       help="Context size in tokens (0: the model's training context).")] = 4096,
    n_gpu_layers: GpuLayers = -1,
    threads: Threads = None,
    temperature: float = typer.Option(0.8, "--temp", help="Sampling temperature (0: greedy)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling threshold."),
    top_k: int = typer.Option(40, "--top-k", help="Sample from the k most likely tokens (0: all)."),
    min_p: float = typer.Option(0.05, "--min-p", help="Drop tokens below this fraction of the top probability."),
    repeat_penalty: float = typer.Option(1.1, "--repeat-penalty", help="Penalty for repeating recent tokens (1: off)."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Longest reply, in tokens."),
    seed: int = typer.Option(-1, "--seed", help="Random seed (-1: random)."),
    resume: str = typer.Option(None, "--resume", help="Reopen a saved chat by its id (TUI)."),
    chat_template: str = typer.Option(None, "--chat-template", help="Use this chat template instead of the GGUF's: a "
                                      "name (chinese-alpaca-2, llama-3-instruct, llama-2-chat, chatml) or a Jinja file."),
) -> None:
    """Chat with a GGUF model in a terminal UI, using the model's own chat template."""
    # imported here, not at the top: every cl3 command imports this module, and cl3.chat pulls in jinja2 and gguf
    from ..chat import ConversationStore, SamplingParams, default_system_prompt
    from ..llama import check_gguf_path

    sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                              repeat_penalty=repeat_penalty, max_tokens=max_tokens, seed=seed).validate()
    check_gguf_path(model)
    if chat_template is not None:
        from ..chat_templates import template_from_spec

        template_from_spec(chat_template)  # a bad name or file fails before the model loads
    if system is None:
        system = default_system_prompt(model)
    if prompt is not None:
        _one_reply(model, sys.stdin.read() if prompt == "-" else prompt, system, sampling, n_ctx, n_gpu_layers, threads,
                   chat_template)
        return

    from ..tui import ChatApp

    store = ConversationStore()
    if resume:
        store.load(resume)  # a bad id fails here, before the TUI starts
    chat_app = ChatApp(model, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=threads, system_prompt=system,
                       sampling=sampling, store=store, resume=resume, chat_template=chat_template)
    chat_app.run()
    if chat_app.load_error is not None:
        raise chat_app.load_error
    if chat_app.conversation.messages:
        err.print(f"chat saved as {chat_app.conversation.id} (reopen: cl3 chat {model} --resume {chat_app.conversation.id})",
                  highlight=False, markup=False)


def _one_reply(model_path: Path, prompt: str, system: str, sampling: SamplingParams, n_ctx: int, n_gpu_layers: int,
               threads: int | None, chat_template: str | None) -> None:
    from ..chat import ChatModel, Message

    model = ChatModel(model_path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, n_threads=threads, chat_template=chat_template)
    reply = model.reply(system, [Message("user", prompt)], sampling)
    for piece in reply:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if reply.finish_reason == "length":
        err.print(f"(reply cut at {reply.n_tokens} tokens; raise --max-tokens or -c)", highlight=False, markup=False)
