"""An OpenAI-compatible HTTP API for a GGUF, using llama-cpp-python's server (FastAPI + uvicorn).

Chat requests are formatted with the GGUF's own Jinja chat template (or --chat-template's), never with a built-in
format guessed from the template's text, through cl3's budgeted formatter (template_budget): the template is checked
once before the model loads, and a request whose rendering runs past the budget fails alone instead of blocking the
server.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
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
    template: str | None = None  # the Jinja chat template requests are rendered with; None: llama-2 fallback
    cors: list[str] = field(default_factory=list)  # origins web pages may call from; none by default
    template_label: str = "llama-2 fallback"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_settings(model: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                    n_ctx: int | None = None, n_threads: int | None = None, n_gpu_layers: int = -1,
                    alias: str | None = None, verbose: bool = False,
                    chat_template: str | os.PathLike | None = None, cors: list[str] | None = None) -> ServeSettings:
    """Check the model and options; build llama-cpp-python's server and model settings."""
    try:
        from llama_cpp.server.settings import ModelSettings, ServerSettings
    except ImportError as ex:
        raise UsageError(f"`cl3 serve` needs llama-cpp-python's server extra: pip install "
                         f"'llama-cpp-python[server]' ({ex})") from None
    from .chat_templates import template_from_spec
    from .export import check_template_budget, read_gguf_info
    from .llama import physical_cpu_count
    from .metadata import read_metadata

    path = Path(model)
    info = read_metadata(path)  # a missing or foreign file fails here with one clear line
    if not 0 < port < 65536:
        raise UsageError(f"port must be between 1 and 65535, not {port}")
    if n_ctx is not None and n_ctx <= 0:
        raise UsageError("the context size must be positive")
    cors = [check_origin(o) for o in cors or []]
    check_port_free(host, port)
    notes = []
    if "*" in cors:
        notes.append("--cors '*': any web page the user visits can call this server")
    if not is_loopback(host) and not api_key:
        notes.append(f"listening on {host} without an API key: anyone who can reach this machine can use the model")
    template, label = None, "llama-2 fallback"
    if chat_template is not None:
        template, label = template_from_spec(chat_template).text, f"--chat-template {chat_template}"
    elif info.chat_template:
        template, label = info.chat_template, "the GGUF's chat template"
    else:
        notes.append(f"{path.name} has no chat template; chat requests use llama-cpp-python's llama-2 format")
    chat_format = "chat_template.default" if template is not None else None
    if template is not None:  # before the model loads: a server never starts on a template that would hang it
        check_template_budget(read_gguf_info(path), template, chat_template)
    ctx = n_ctx or min(info.context_length or DEFAULT_MAX_CTX, DEFAULT_MAX_CTX)
    threads = n_threads or physical_cpu_count()
    model_settings = ModelSettings(model=str(path), model_alias=alias or path.stem, n_ctx=ctx, n_threads=threads,
                                   n_threads_batch=threads, n_gpu_layers=n_gpu_layers, chat_format=chat_format,
                                   verbose=verbose)
    server = ServerSettings(host=host, port=port, api_key=api_key or None)
    return ServeSettings(server=server, model=model_settings, display_host=f"[{host}]" if ":" in host else host,
                         notes=notes, template=template, template_label=label, cors=cors)


def create_app(settings: ServeSettings):
    """The FastAPI app (loads the model)."""
    from llama_cpp.server.app import create_app as llama_create_app

    from .llama import budgeted_chat_templates, prepare_for_llama

    prepare_for_llama()
    try:
        with budgeted_chat_templates():  # the server's Llama compiles (and keeps) the GGUF's templates as it loads
            app = llama_create_app(server_settings=settings.server, model_settings=[settings.model])
    except ValueError as ex:  # llama-cpp-python raises ValueError when llama.cpp cannot load the model
        raise InputError(f"llama.cpp cannot load {settings.model.model}: {ex}") from None
    if settings.template is not None:
        _install_chat_template(settings.template)
    _only_the_served_model(app, settings.model.model_alias, settings.server.api_key)
    _restrict_cors(app, settings.cors)  # last: outermost, so refusals carry the allowed origins' headers too
    return app


_ORIGIN = re.compile(r"^https?://[^/\s?#]+$")


def check_origin(origin: str) -> str:
    """An origin as browsers send it (scheme://host[:port], no path), or "*"."""
    origin = origin.rstrip("/")
    if origin != "*" and not _ORIGIN.match(origin):
        raise UsageError(f"{origin!r} is not a web origin (like http://localhost:3000)", param="cors")
    return origin


def _restrict_cors(app, origins: list[str]) -> None:
    """llama-cpp-python's app lets every origin call it with credentials, so any web page the user visits could
    drive the model; replace that with the named origins only (none by default: no CORS headers at all)."""
    from fastapi.middleware.cors import CORSMiddleware

    app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_credentials=False, allow_methods=["*"],
                           allow_headers=["*"])


# Requests whose JSON body names a model (llama-cpp-python's server answers any name with its one model).
_MODEL_PATHS = frozenset(["/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/extras/tokenize",
                          "/extras/tokenize/count", "/extras/detokenize"])


def _only_the_served_model(app, model_id: str, api_key: str | None) -> None:
    app.add_middleware(_ServedModelOnly, model_id=model_id, api_key=api_key)


class _ServedModelOnly:
    """A request naming another model gets OpenAI's 404 ``model_not_found`` (as Ollama and the OpenAI API answer);
    one naming none is given the served id, so responses report that id (as /v1/models does), not the file path."""

    def __init__(self, app, model_id: str, api_key: str | None):
        self.app, self.model_id, self.api_key = app, model_id, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in _MODEL_PATHS:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            data = json.loads(body)
        except ValueError:  # the app reports the malformed body
            data = None
        if isinstance(data, dict) and self._authorized(scope):
            name = data.get("model")
            if name not in (None, "") and name != self.model_id:
                return await _not_found(send, name)
            data["model"] = self.model_id
            body = json.dumps(data).encode()
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-length"]
                     + [(b"content-length", str(len(body)).encode())]}
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        """Without the API key the app answers 401; the model check never tells a stranger anything."""
        if not self.api_key:
            return True
        scheme, _, key = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and key.strip() == self.api_key


async def _not_found(send, name) -> None:
    error = {"error": {"message": f"The model {str(name)!r} does not exist; this server serves the model listed by "
                                  f"/v1/models", "type": "invalid_request_error", "param": "model",
                       "code": "model_not_found"}}
    payload = json.dumps(error).encode()
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def _install_chat_template(template: str) -> None:
    """Render chat requests with cl3's budgeted formatter: llama-cpp-python's own handler for the GGUF's template
    (same variables, stops and stop token) has no time or size budget."""
    from llama_cpp.server import app as server_app

    from .llama import token_piece
    from .template_budget import BudgetedChatFormatter

    llama = server_app._llama_proxy()  # the model create_app has just loaded (the only one served)
    text = lambda t: "" if t < 0 else token_piece(llama, t, special=True).decode("utf-8", errors="replace")
    eos = llama.token_eos()
    llama.chat_handler = BudgetedChatFormatter(template, eos_token=text(eos), bos_token=text(llama.token_bos()),
                                               stop_token_ids=[eos]).to_chat_handler()


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
