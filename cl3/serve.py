"""An OpenAI-compatible HTTP API for a GGUF, using llama-cpp-python's server (FastAPI + uvicorn).

Chat requests are formatted with the GGUF's own Jinja chat template (llama-cpp-python's "chat_template.default"
handler), never with a built-in format guessed from the template's text.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, OutputError, UsageError

DEFAULT_MAX_CTX = 8192


@dataclass
class ServeSettings:
    server: object  # llama_cpp.server.settings.ServerSettings
    model: object  # llama_cpp.server.settings.ModelSettings
    display_host: str
    notes: list[str] = field(default_factory=list)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_settings(model: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                    n_ctx: int | None = None, n_threads: int | None = None, n_gpu_layers: int = -1,
                    alias: str | None = None, verbose: bool = False) -> ServeSettings:
    """Check the model and options; build llama-cpp-python's server and model settings."""
    try:
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as ex:
        raise UsageError(f"`cl3 serve` needs llama-cpp-python's server extra: pip install "
                         f"'llama-cpp-python[server]' ({ex})") from None
    from .llama import physical_cpu_count
    from .metadata import read_metadata

    path = Path(model)
    info = read_metadata(path)  # a missing or foreign file fails here with one clear line
    if not 0 < port < 65536:
        raise UsageError(f"port must be between 1 and 65535, not {port}")
    if n_ctx is not None and n_ctx <= 0:
        raise UsageError("the context size must be positive")
    check_port_free(host, port)
    notes = []
    if not is_loopback(host) and not api_key:
        notes.append(f"listening on {host} without an API key: anyone who can reach this machine can use the model")
    if info.chat_template:
        chat_format = "chat_template.default"
    else:
        chat_format = None
        notes.append(f"{path.name} has no chat template; chat requests use llama-cpp-python's llama-2 format")
    ctx = n_ctx or min(info.context_length or DEFAULT_MAX_CTX, DEFAULT_MAX_CTX)
    threads = n_threads or physical_cpu_count()
    model_settings = ModelSettings(model=str(path), model_alias=alias or path.stem, n_ctx=ctx, n_threads=threads,
                                   n_threads_batch=threads, n_gpu_layers=n_gpu_layers, chat_format=chat_format,
                                   verbose=verbose)
    server = ServerSettings(host=host, port=port, api_key=api_key or None)
    return ServeSettings(server=server, model=model_settings, display_host=f"[{host}]" if ":" in host else host,
                         notes=notes)


def create_app(settings: ServeSettings):
    """The FastAPI app (loads the model)."""
    from llama_cpp.server.app import create_app as llama_create_app

    from .llama import prepare_for_llama

    prepare_for_llama()
    try:
        return llama_create_app(server_settings=settings.server, model_settings=[settings.model])
    except ValueError as ex:  # llama-cpp-python raises ValueError when llama.cpp cannot load the model
        raise InputError(f"llama.cpp cannot load {settings.model.model}: {ex}") from None


def check_port_free(host: str, port: int) -> None:
    """Fail with one line, before the model loads, when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind((host, port))
        except OSError as ex:
            raise OutputError(f"cannot listen on {host}:{port}: {ex.strerror}") from None


def run_server(settings: ServeSettings) -> None:
    """Serve until interrupted."""
    import uvicorn

    check_port_free(settings.server.host, settings.server.port)
    app = create_app(settings)
    uvicorn.run(app, host=settings.server.host, port=settings.server.port,
                log_level="info" if settings.model.verbose else "warning")
