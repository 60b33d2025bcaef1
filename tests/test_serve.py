"""`cl3 serve`: the real command on a free loopback port with a real tiny GGUF (random weights, so the words are
gibberish), called over HTTP like any OpenAI client would."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import gguf
import psutil
import pytest

from cl3.serve import is_loopback, server_settings

from .conftest import stop_process

API_KEY = "test-key-123"
MESSAGES = [{"role": "system", "content": "You are a helpful assistant. 你是一个乐于助人的助手。"},
            {"role": "user", "content": "用中文介绍一下北京。"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base: str, path: str, body: dict | None = None, key: str | None = API_KEY, stream: bool = False):
    req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"} | (
                                     {"Authorization": f"Bearer {key}"} if key else {}))
    resp = urllib.request.urlopen(req, timeout=120)
    if stream:
        return resp
    with resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def running_server(model, *options: str):
    """`cl3 serve MODEL OPTIONS` on a free loopback port, once it answers: (base URL, process)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cl3", "serve", str(model), "--port", str(port), *options],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=os.environ | {"COLUMNS": "200"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"cl3 serve exited with {proc.returncode}: {proc.stdout.read()}")
            try:
                urllib.request.urlopen(base + "/v1/models", timeout=10).close()
                break
            except urllib.error.HTTPError:  # 401 without the key: it answers
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail("cl3 serve did not answer within 120 s")
                time.sleep(0.3)
        yield base, proc
    finally:
        stop_process(proc)


@pytest.fixture(scope="module")
def server(tiny_llama3_gguf):
    with running_server(tiny_llama3_gguf, "--api-key", API_KEY, "--ctx", "512", "--threads", "2",
                        "--alias", "tiny") as running:
        yield running


@pytest.fixture(scope="module")
def chat_prompt_tokens(tiny_llama3_gguf) -> int:
    """Tokens of MESSAGES rendered with the GGUF's own Jinja chat template (the independent count)."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    reader = gguf.GGUFReader(tiny_llama3_gguf)
    field = lambda k: reader.fields[k].contents()
    tokens = field("tokenizer.ggml.tokens")
    prompt = Jinja2ChatFormatter(field("tokenizer.chat_template"), bos_token=tokens[field("tokenizer.ggml.bos_token_id")],
                                 eos_token=tokens[field("tokenizer.ggml.eos_token_id")])(messages=MESSAGES).prompt
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    vocab = Llama(str(tiny_llama3_gguf), vocab_only=True, verbose=False)
    n = len(vocab.tokenize(prompt.encode(), add_bos=False, special=True))
    plain = len(vocab.tokenize("".join(m["content"] for m in MESSAGES).encode(), add_bos=True, special=True))
    assert n > plain + 8  # the template's headers make a clear difference
    return n


def test_models_and_api_key(server):
    base, proc = server
    with pytest.raises(urllib.error.HTTPError) as info:
        call(base, "/v1/models", key=None)
    assert info.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as info:
        call(base, "/v1/models", key="wrong")
    assert info.value.code == 401
    models = call(base, "/v1/models")
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    # bound to loopback only
    process = psutil.Process(proc.pid)
    connections = getattr(process, "net_connections", process.connections)("tcp")  # psutil < 6: connections
    listening = {c.laddr for c in connections if c.status == psutil.CONN_LISTEN}
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening)


def test_chat_completion_uses_the_chat_template(server, chat_prompt_tokens):
    base, _ = server
    reply = call(base, "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 6,
                                                "temperature": 0})
    assert reply["object"] == "chat.completion" and reply["model"] == "tiny"
    [choice] = reply["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = reply["usage"]
    assert usage["prompt_tokens"] == chat_prompt_tokens
    # llama-cpp-python may run a few tokens past max_tokens to finish a UTF-8 character split over byte tokens
    assert 1 <= usage["completion_tokens"] <= 6 + 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_completion_streaming(server):
    base, _ = server
    resp = call(base, "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 6,
                                               "temperature": 0, "stream": True}, stream=True)
    chunks, done = [], False
    with resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                done = True
                break
            chunks.append(json.loads(data))
    assert done and len(chunks) >= 2
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    full = call(base, "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 6,
                                               "temperature": 0})
    assert streamed == full["choices"][0]["message"]["content"]  # greedy: the same words either way


def test_completion(server, tiny_llama3_gguf):
    from llama_cpp import Llama

    base, _ = server
    prompt = "The capital of China is"
    reply = call(base, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 5, "temperature": 0})
    assert reply["object"] == "text_completion"
    [choice] = reply["choices"]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
    vocab = Llama(str(tiny_llama3_gguf), vocab_only=True, verbose=False)
    assert reply["usage"]["prompt_tokens"] == len(vocab.tokenize(prompt.encode(), add_bos=True, special=True))


def test_settings(tiny_llama3_gguf, tmp_path):
    settings = server_settings(tiny_llama3_gguf, port=free_port())
    assert settings.server.host == "127.0.0.1" and settings.server.api_key is None and not settings.notes
    assert settings.model.chat_format == "chat_template.default"
    exposed = server_settings(tiny_llama3_gguf, host="0.0.0.0", port=free_port())
    assert any("without an API key" in n for n in exposed.notes)
    assert is_loopback("::1") and is_loopback("localhost") and not is_loopback("192.168.1.2")


def test_serve_errors_are_one_line(tmp_path):
    from tests.conftest import run_cl3

    proc = run_cl3("serve", tmp_path / "missing.gguf")
    assert proc.returncode != 0 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"not a gguf at all")
    proc = run_cl3("serve", bogus)
    assert proc.returncode != 0 and proc.stderr.startswith("error:")


def test_port_in_use_is_one_line(tiny_llama3_gguf):
    from tests.conftest import run_cl3

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = run_cl3("serve", tiny_llama3_gguf, "--port", busy.getsockname()[1], timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: cannot listen on 127.0.0.1:") and "Traceback" not in proc.stderr


def preflight(base: str, origin: str) -> dict[str, str]:
    """The response headers of a browser's CORS preflight for a JSON POST from a page at ``origin``."""
    req = urllib.request.Request(base + "/v1/chat/completions", method="OPTIONS", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as ex:
        return {k.lower(): v for k, v in ex.headers.items()}


def test_no_cross_origin_access_by_default(server):
    base, _ = server
    headers = preflight(base, "http://evil.example")
    assert "access-control-allow-origin" not in headers and "access-control-allow-credentials" not in headers
    req = urllib.request.Request(base + "/v1/models", headers={"Origin": "http://evil.example",
                                                               "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert "access-control-allow-origin" not in {k.lower() for k in resp.headers}


def test_cors_allows_the_named_origins_only(tiny_llama3_gguf):
    with running_server(tiny_llama3_gguf, "--ctx", "256", "--threads", "2", "--cors", "http://localhost:3000",
                        "--cors", "https://chat.example.org") as (base, _):
        for origin in ("http://localhost:3000", "https://chat.example.org"):
            headers = preflight(base, origin)
            assert headers.get("access-control-allow-origin") == origin
            assert "access-control-allow-credentials" not in headers
        assert "access-control-allow-origin" not in preflight(base, "http://evil.example")
        req = urllib.request.Request(base + "/v1/models", headers={"Origin": "http://localhost:3000"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_cors_origin_must_be_an_origin(tiny_llama3_gguf):
    from tests.conftest import one_line_error, run_cl3

    one_line_error(run_cl3("serve", tiny_llama3_gguf, "--port", free_port(), "--cors", "localhost:3000/x"),
                   "is not a web origin")


def http_error(base: str, path: str, body: dict, key: str | None = API_KEY) -> tuple[int, dict]:
    with pytest.raises(urllib.error.HTTPError) as info:
        call(base, path, body, key=key)
    return info.value.code, json.loads(info.value.read())


def test_a_request_for_another_model_is_refused(server):
    """As the OpenAI API and Ollama answer: 404 with code model_not_found, for every endpoint naming a model."""
    base, _ = server
    for path, body in (("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2}),
                       ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
                       ("/extras/tokenize", {"input": "Hi"})):
        code, error = http_error(base, path, {"model": "nonexistent-name", **body})
        assert code == 404, path
        assert error["error"]["code"] == "model_not_found" and "nonexistent-name" in error["error"]["message"]
    # without the API key the answer stays 401: a stranger learns nothing about the models
    code, _ = http_error(base, "/v1/chat/completions", {"model": "nonexistent-name", "messages": MESSAGES}, key=None)
    assert code == 401


def test_responses_name_the_served_model_id(server):
    """With or without "model" in the request, responses report /v1/models' id, not the GGUF's path."""
    base, _ = server
    [model_id] = [m["id"] for m in call(base, "/v1/models")["data"]]
    for body in ({"messages": MESSAGES, "max_tokens": 2}, {"model": model_id, "messages": MESSAGES, "max_tokens": 2}):
        assert call(base, "/v1/chat/completions", body)["model"] == model_id
    assert call(base, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})["model"] == model_id
    resp = call(base, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "stream": True}, stream=True)
    with resp:
        chunks = [json.loads(line.decode().removeprefix("data:").strip()) for line in resp
                  if line.startswith(b"data:") and b"[DONE]" not in line]
    assert chunks and all(c["model"] == model_id for c in chunks)


def test_chat_template_option_formats_chat_requests(tiny_llama3_gguf, tmp_path):
    """--chat-template FILE replaces the GGUF's template for chat requests (the prompt's token count says which)."""
    from llama_cpp import Llama

    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:", encoding="utf-8")
    prompt = "".join(f"{m['role']}: {m['content']}\n" for m in MESSAGES) + "assistant:"
    vocab = Llama(str(tiny_llama3_gguf), vocab_only=True, verbose=False)
    # as with the GGUF's own template, the rendered text is the whole prompt (a template writes BOS itself)
    expected = len(vocab.tokenize(prompt.encode(), add_bos=False, special=True))
    with running_server(tiny_llama3_gguf, "--ctx", "256", "--threads", "2", "--chat-template", str(template)) as (
            base, proc):
        reply = call(base, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2}, key=None)
        assert reply["usage"]["prompt_tokens"] == expected
