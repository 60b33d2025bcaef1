"""cl3 download / resolve_source against local HTTP servers on 127.0.0.1 (no network).

FakeHub serves the part of the Hugging Face hub API that huggingface_hub's snapshot_download uses (read from its
source: GET /api/models/{repo}/revision/{rev}, GET /api/models/{repo}/tree/{sha}?recursive=true, HEAD/GET
/{repo}/resolve/{sha}/{file} with Range); the real huggingface_hub client talks to it. FakeModelScope serves
ModelScope's two public endpoints (file listing, file download) in the shape documented by ModelScope clients.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
import pytest

from cl3.errors import Cl3Error
from cl3.hub import download, resolve_source

from .conftest import one_line_error, run_cl3


class _Server:
    """A threaded HTTP server on 127.0.0.1 logging (method, path, Range, Authorization) of every request."""

    def __init__(self):
        self.log: list[tuple[str, str, str | None, str | None]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                owner._handle(self, head=True)

            def do_GET(self):
                owner._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _handle(self, h, head: bool) -> None:
        with self.lock:
            self.log.append((h.command, unquote(h.path), h.headers.get("Range"), h.headers.get("Authorization")))
        self.route(h, head)

    def gets(self, fragment: str) -> list[tuple]:
        return [e for e in self.log if e[0] == "GET" and fragment in e[1]]

    @staticmethod
    def send_json(h, obj, status: int = 200, headers: dict | None = None) -> None:
        body = json.dumps(obj).encode()
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)

    def send_file(self, h, data: bytes, head: bool, headers: dict, *, drop_after: int | None = None) -> None:
        start, status = 0, 200
        if rng := h.headers.get("Range"):
            start, status = int(re.match(r"bytes=(\d+)-", rng)[1]), 206
        body = data[start:]
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if head:
            return
        if drop_after is not None:  # an interrupted transfer: part of the body, then the connection closes
            h.wfile.write(body[:drop_after])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakeHub(_Server):
    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.sha = {r: hashlib.sha1(r.encode()).hexdigest() for r in repos}
        self.drop_after: dict[str, int] = {}    # file -> bytes sent by its first GET before the connection drops
        self.broken: set[str] = set()           # files whose download (GET) fails with HTTP 500
        super().__init__()

    def route(self, h, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        if m := re.match(r"^/api/models/([^/]+/[^/]+)/revision/(.+)$", path):
            if m[1] not in self.repos:
                # what huggingface.co answers for a missing (or private) repo
                return self.send_json(h, {"error": "Repository not found"}, 401, {"X-Error-Code": "RepoNotFound"})
            return self.send_json(h, {"id": m[1], "sha": self.sha[m[1]],
                                      "siblings": [{"rfilename": p} for p in self.repos[m[1]]]})
        if m := re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):
            return self.send_json(h, [{"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                                      for p, d in self.repos[m[1]].items()])
        if m := re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path):
            repo, name = m[1], m[3]
            if name in self.broken and not head:
                return self.send_json(h, {"error": "internal error"}, 500)
            data = self.repos[repo][name]
            drop = None
            if not head and name in self.drop_after and not h.headers.get("Range"):
                drop = self.drop_after.pop(name)
            return self.send_file(h, data, head, {"ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                                                  "X-Repo-Commit": self.sha[repo]}, drop_after=drop)
        self.send_json(h, {"error": "not found"}, 404)


class FakeModelScope(_Server):
    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.corrupt: set[str] = set()
        super().__init__()

    def route(self, h, head: bool) -> None:
        url = urlparse(h.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if m := re.match(r"^/api/v1/models/([^/]+/[^/]+)/repo/files$", unquote(url.path)):
            files = [{"Name": p.split("/")[-1], "Path": p, "Type": "blob", "Size": len(d), "Revision": "rev1",
                      "Sha256": hashlib.sha256(d).hexdigest()} for p, d in self.repos[m[1]].items()]
            return self.send_json(h, {"Code": 200, "Data": {"Files": files}, "Success": True})
        if m := re.match(r"^/api/v1/models/([^/]+/[^/]+)/repo$", unquote(url.path)):
            data = self.repos[m[1]][query["FilePath"]]
            if query["FilePath"] in self.corrupt:
                data = b"!" + data[1:]
            return self.send_file(h, data, head, {})
        self.send_json(h, {"Code": 404, "Message": "not found"}, 404)


REPO = {
    "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
    "tokenizer.json": b'{"model": {}}',
    "tokenizer_config.json": b"{}",
    "model-00001-of-00002.safetensors": bytes(range(256)) * 600,
    "model-00002-of-00002.safetensors": bytes(reversed(range(256))) * 300,
    "model.safetensors.index.json": b'{"weight_map": {}}',
    "README.md": b"# not needed",
    "pytorch_model.bin": b"pickle, not needed",
    "original/consolidated.00.pth": b"not needed either",
}
NEEDED = {"config.json", "tokenizer.json", "tokenizer_config.json", "model-00001-of-00002.safetensors",
          "model-00002-of-00002.safetensors", "model.safetensors.index.json"}


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch, tmp_path):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # subprocesses: cache and token away from the user's
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture
def hub():
    server = FakeHub({"hfl/tiny": dict(REPO)})
    yield server
    server.close()


def files_in(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(path).parts}


def test_download_fetches_only_what_cl3_needs(hub, tmp_path):
    seen = []
    path = download("hfl/tiny", endpoint=hub.url, cache_dir=tmp_path / "cache", progress=lambda *a: seen.append(a))
    assert files_in(path) == {n: REPO[n] for n in NEEDED}
    size = sum(len(REPO[n]) for n in NEEDED)
    assert seen[-1] == (size, size) and all(d <= t for d, t in seen)
    assert not hub.gets("README.md") and not hub.gets("pytorch_model.bin") and not hub.gets("consolidated")
    # cached: a second call sends no file requests
    n = len(hub.gets("/resolve/"))
    assert download("hfl/tiny", endpoint=hub.url, cache_dir=tmp_path / "cache") == path
    assert len(hub.gets("/resolve/")) == n


def test_config_only_and_include(hub, tmp_path):
    path = resolve_source("hfl/tiny", config_only=True, endpoint=hub.url)
    assert set(files_in(path)) == {"config.json", "tokenizer.json", "tokenizer_config.json"}
    assert not hub.gets(".safetensors")
    path = download("hfl/tiny", include=["README.md"], endpoint=hub.url, out=tmp_path / "readme")
    assert files_in(path) == {"README.md": REPO["README.md"]}


def test_interrupted_transfer_resumes_with_a_range_request(tmp_path):
    """The connection drops mid-file; huggingface_hub asks for the rest with a Range request (it keeps what it wrote,
    in whole 10 MiB chunks, so the file here is big enough to have a first chunk on disk when the drop happens)."""
    name = "model-00001-of-00001.safetensors"
    big = np.random.default_rng(0).integers(0, 256, 24 * 2**20, dtype=np.uint8).tobytes()
    server = FakeHub({"hfl/big": {"config.json": b"{}", name: big}})
    server.drop_after[name] = 15 * 2**20
    try:
        path = download("hfl/big", endpoint=server.url, cache_dir=tmp_path / "cache")
    finally:
        server.close()
    assert (path / name).read_bytes() == big
    ranges = [r[2] for r in server.gets(name)]
    assert ranges[0] is None and len(ranges) == 2, ranges
    start = int(re.match(r"bytes=(\d+)-$", ranges[1])[1])
    assert 0 < start <= 15 * 2**20  # only the missing part is fetched again


def test_rerun_after_a_failed_download_skips_completed_files(hub, tmp_path):
    broken = "model-00002-of-00002.safetensors"
    hub.broken.add(broken)
    with pytest.raises(Cl3Error, match="cannot download hfl/tiny from http://127.0.0.1"):
        download("hfl/tiny", endpoint=hub.url, cache_dir=tmp_path / "cache")
    done_before = {r[1] for r in hub.gets("/resolve/") if broken not in r[1]}
    assert len(done_before) == len(NEEDED) - 1
    hub.broken.clear()
    hub.log.clear()
    path = download("hfl/tiny", endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert files_in(path) == {n: REPO[n] for n in NEEDED}
    assert [r[1].rsplit("/", 1)[-1] for r in hub.gets("/resolve/")] == [broken]


def test_cli_download_honours_hf_endpoint_and_token(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    r = run_cl3("download", "hfl/tiny", "-o", tmp_path / "out", "-q")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == (tmp_path / "out").resolve()
    assert files_in(tmp_path / "out") == {n: REPO[n] for n in NEEDED}
    repo_requests = [e for e in hub.log if "hfl/tiny" in e[1]]  # (huggingface_hub also asks for /api/agent-harnesses)
    assert repo_requests and all(e[3] == "Bearer hf_test_token" for e in repo_requests)


def test_cli_download_errors_are_one_line(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    r = run_cl3("download", "hfl/missing", "-o", tmp_path / "out", "-q")
    assert r.returncode != 0
    assert r.stderr.startswith("error: no repository hfl/missing on http://127.0.0.1"), r.stderr
    assert r.stderr.strip().count("\n") == 0
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    r = run_cl3("download", "hfl/tiny", "-q")
    assert r.returncode != 0 and "HF_ENDPOINT=https://hf-mirror.com" in r.stderr and "Traceback" not in r.stderr


def test_resolve_source_leaves_local_paths_alone(tmp_path):
    assert resolve_source(tmp_path) == tmp_path
    assert resolve_source(tmp_path / "x.gguf") == tmp_path / "x.gguf"  # missing file: the command reports it


def test_cli_merge_takes_repo_ids(tiny_llama3, tmp_path, monkeypatch):
    """SRC given as repo ids: both the base and the adapter come from the (fake) hub through HF_ENDPOINT."""
    from .test_merge import make_adapter

    make_adapter(tmp_path / "lora", tiny_llama3, targets=("q_proj",))
    repos = {"hfl/base": {p.name: p.read_bytes() for p in tiny_llama3.path.iterdir()},
             "hfl/lora": {p.name: p.read_bytes() for p in (tmp_path / "lora").iterdir()}}
    server = FakeHub(repos)
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        r = run_cl3("merge", "hfl/base", "hfl/lora", "-o", tmp_path / "merged", "-q")
    finally:
        server.close()
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "merged" / "config.json").exists()


# --- ModelScope ---------------------------------------------------------------------------------------------------

@pytest.fixture
def modelscope(monkeypatch):
    server = FakeModelScope({"LLM-Research/tiny": dict(REPO)})
    monkeypatch.setenv("MODELSCOPE_DOMAIN", server.url)
    yield server
    server.close()


def test_modelscope_download(modelscope, tmp_path):
    path = download("LLM-Research/tiny", source="modelscope", cache_dir=tmp_path)
    assert files_in(path) == {n: REPO[n] for n in NEEDED}
    assert not modelscope.gets("README.md")


def test_modelscope_resumes_a_partial_file_from_an_earlier_run(modelscope, tmp_path):
    name = "model-00001-of-00002.safetensors"
    out = tmp_path / "out"
    out.mkdir()
    (out / (name + ".part")).write_bytes(REPO[name][:40_000])  # what an interrupted run leaves
    download("LLM-Research/tiny", source="modelscope", out=out)
    assert (out / name).read_bytes() == REPO[name]
    assert [r[2] for r in modelscope.gets(name)] == ["bytes=40000-"]
    assert not (out / (name + ".part")).exists()


def test_modelscope_checks_sha256(modelscope, tmp_path):
    modelscope.corrupt.add("config.json")
    with pytest.raises(Cl3Error, match="SHA-256"):
        download("LLM-Research/tiny", source="modelscope", out=tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("listed", ["../../../../tmp/x/evil.safetensors", "sub/../../escape.safetensors",
                                    "{tmp}/abs/evil.safetensors"])
def test_modelscope_listing_cannot_write_outside_the_output_folder(tmp_path, monkeypatch, listed):
    listed = listed.format(tmp=tmp_path)
    server = FakeModelScope({"LLM-Research/tiny": dict(REPO) | {listed: b"evil"}})
    monkeypatch.setenv("MODELSCOPE_DOMAIN", server.url)
    out = tmp_path / "a" / "b" / "c" / "d" / "out"  # deep enough that ../../../.. stays inside tmp_path
    try:
        proc = run_cl3("download", "LLM-Research/tiny", "--source", "modelscope", "-o", out, "-q")
    finally:
        server.close()
    assert "leaves the output folder" in one_line_error(proc, listed)
    assert not server.gets(listed), "the hostile file was requested"
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_modelscope_listing_cannot_write_through_a_symlink(modelscope, tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "sub").symlink_to(elsewhere)
    modelscope.repos["LLM-Research/tiny"]["sub/model.safetensors"] = b"evil"
    with pytest.raises(Cl3Error, match="leaves the output folder"):
        download("LLM-Research/tiny", source="modelscope", out=out)
    assert list(elsewhere.iterdir()) == []
    assert not any(p.is_file() for p in out.rglob("*"))
