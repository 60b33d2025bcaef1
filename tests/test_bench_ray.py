"""`cl3 bench --ray` on a real two-node Ray cluster on this machine: `ray start --head` plus a second `ray start
--address` node, each with one CPU, a temp folder of its own and free ports. The cluster's tables must be the
single-machine tables (same PPL and KLD to the last bit); cells must run on both nodes; losing the worker node mid-run
and Ctrl-C must both end in a complete table."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cl3 import bench, imatrix

from .conftest import one_line_error, run_cl3
from .test_measure import TEXT

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'cl3[ray]')")
psutil = pytest.importorskip("psutil")

from cl3 import bench_ray  # noqa: E402

TYPES = ["F16", "Q8_0", "Q4_0", "Q4_K_M"]
# speed cells of about a second each, so that a node can be lost while it runs one
SETTINGS = {"ctx": 64, "chunks": 4, "n_prompt": 512, "n_gen": 128, "repetitions": 20, "threads": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A Ray cluster of processes this test started; each node's processes are found by its own temp folder."""

    def __init__(self, base: Path):
        self.base = base
        self.env = os.environ | {
            "PYTHONPATH": os.pathsep.join([str(Path(bench.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]),
            "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4",
            "RAY_USAGE_STATS_ENABLED": "0"}
        self.nodes: dict[str, Path] = {}     # name -> its temp folder
        self.address = ""

    def start(self, name: str, head: bool = False) -> None:
        temp = self.base / name
        (temp / "tmp").mkdir(parents=True)
        args = ["--num-cpus", "1", "--object-store-memory", str(120 << 20), "--temp-dir", str(temp),
                "--disable-usage-stats"]
        if head:
            port = _free_port()
            args += ["--head", "--port", str(port), "--include-dashboard=false", "--dashboard-port",
                     str(_free_port()), "--dashboard-agent-listen-port", "0"]
            self.address = f"127.0.0.1:{port}"
        else:
            args += ["--address", self.address, "--dashboard-agent-listen-port", "0"]
        # TMPDIR: where this node's NodeFiles keeps its copies
        proc = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", *args], capture_output=True,
                              text=True, env=self.env | {"TMPDIR": str(temp / "tmp")}, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        self.nodes[name] = temp

    def processes(self, name: str | None = None) -> list:
        folders = [str(self.nodes[name])] if name else [str(p) for p in self.nodes.values()]
        found = {p for p in psutil.process_iter(["cmdline"])
                 if any(f in a for a in (p.info["cmdline"] or []) for f in folders)}
        for p in list(found):
            with _gone():
                found.update(p.children(recursive=True))
        return list(found)

    def kill(self, name: str | None = None) -> None:
        procs = self.processes(name)
        for p in procs:
            with _gone():
                p.kill()
        psutil.wait_procs(procs, timeout=10)

    def copies_left(self) -> list[Path]:
        return [p for temp in self.nodes.values() for p in (temp / "tmp").glob("cl3-ray-*")]


class _gone:
    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        return kind is not None and issubclass(kind, psutil.Error)


@pytest.fixture(scope="module")
def cluster():
    base = Path(tempfile.mkdtemp(prefix="cl3ray", dir="/tmp"))  # Unix socket paths must stay short
    # A ~/.ray/auth_token (any earlier ray.init() leaves one) would switch token authentication on for some of the
    # processes: this cluster and its drivers run without it.
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    c = Cluster(base)
    try:
        c.start("head", head=True)
        c.start("worker")
        yield c
    finally:
        c.kill()
        if auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth_mode
        import shutil

        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def imatrix_file(tiny_llama3_gguf, tmp_path_factory):
    """A small imatrix (a file, so it is shipped to the nodes like the source)."""
    path = tmp_path_factory.mktemp("imatrix") / "tiny.imatrix.gguf"
    result = imatrix.compute_imatrix(tiny_llama3_gguf, TEXT, dataset="eval.txt", n_ctx=64, chunks=4)
    imatrix.write_imatrix(result.imatrix, path)
    return path


@pytest.fixture(scope="module")
def local_table(tiny_llama3_gguf, text_file, imatrix_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "Tiny"
    return bench.bench(tiny_llama3_gguf, types=TYPES, out=out, text_file=text_file, kld=True, imatrix=imatrix_file,
                       **SETTINGS), out


def _on_ray(cluster, src, out, text_file, imatrix_file, **kw):
    return bench_ray.bench_on_ray([src], out=out, address=cluster.address, types=TYPES, text_file=text_file,
                                  kld=True, imatrix=imatrix_file, **SETTINGS, **kw)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _measured_alike(local: bench.BenchTable, table: bench.BenchTable) -> None:
    for t in TYPES:
        a, b = local.cells[t], table.cells[t]
        for key in ("ppl", "ppl_stderr", "kld_mean", "kld_stderr", "same_top", "bpw", "chunks", "scored_tokens"):
            assert a.get(key) == b.get(key), (t, key)
        # the file records the path of the imatrix it was quantized with: a node's copy has another
        assert abs(a["size_bytes"] - b["size_bytes"]) < 1024


def test_the_cluster_table_is_the_single_machine_table(cluster, tiny_llama3_gguf, text_file, imatrix_file,
                                                       local_table, tmp_path):
    local, local_out = local_table
    result = _on_ray(cluster, tiny_llama3_gguf, tmp_path / "Tiny", text_file, imatrix_file)
    table = result.tables[0]
    assert not result.failed and not result.skipped
    _measured_alike(local, table)
    # cells ran on both nodes, and each node's share is in the table
    assert len(result.nodes) == 2 and set(result.cells_by_node) == set(result.nodes)
    ran = {n for c in table.cells.values() for n in c["ran_on"].values()}
    ran |= {s["node"]["id"] for c in table.cells.values() for s in c["speed"].values()}
    assert ran == set(result.nodes)
    # speed figures record the node that measured them; one hardware kind here, so one PP/TG row pair
    kinds = table.kinds()
    assert len(kinds) == 1 and kinds[0].endswith("1 threads")
    for t in TYPES:
        (kind, speed), = table.cells[t]["speed"].items()
        assert speed["node"]["id"] in result.nodes and speed["node"]["hostname"] == socket.gethostname()
        assert speed["pp_ms_per_token"] > 0 and speed["tg_ms_per_token"] > 0 and speed["threads"] == 1
    md = (tmp_path / "Tiny.md").read_text()
    assert f"| PP (ms/token), {kinds[0]} |" in md and f"| TG (ms/token), {kinds[0]} |" in md
    saved = json.loads((tmp_path / "Tiny.json").read_text())
    assert set(saved["nodes"]) == set(result.nodes) and saved["cells"] == json.loads(json.dumps(table.cells))
    # the same files as the single-machine run, nothing partial, every node's copies removed
    # (plus the KLD base, made once and shipped: the single-machine run keeps it in the user's cache)
    made = [f for f in _files(tmp_path) if not f.endswith(".kld-base")]
    assert made == [f.replace(local_out.name, "Tiny") for f in _files(local_out.parent)]
    assert len(_files(tmp_path)) == len(made) + 1
    assert cluster.copies_left() == []
    # each file went to each node at most once, and the bytes moved are those files' sizes
    assert result.copies and set(result.copies.values()) == {1}
    assert result.bytes_moved == sum(os.path.getsize(k.split(" ", 1)[1]) for k in result.copies)
    # what a node received is what its cells needed (which node gets which cells is Ray's choice): a node that got
    # the source quantized there, and got the imatrix exactly when it quantized a type that uses one
    for node in {k.split(" ", 1)[0] for k in result.copies}:
        got = {k.split(" ", 1)[1] for k in result.copies if k.startswith(node + " ")}
        quantized = [t for t, c in table.cells.items() if c["ran_on"].get("quantize") == node]
        if str(tiny_llama3_gguf) in got:
            assert quantized and (str(imatrix_file) in got) == any(t != "F16" for t in quantized), (got, quantized)
        else:
            assert str(imatrix_file) not in got, got


def test_a_shared_filesystem_moves_nothing(cluster, tiny_llama3_gguf, text_file, imatrix_file, local_table,
                                           tmp_path):
    """Both nodes see the same paths here, as an NFS mount would give them: cells read and write in place."""
    local, _ = local_table
    result = _on_ray(cluster, tiny_llama3_gguf, tmp_path / "Tiny", text_file, imatrix_file, shared=True)
    assert not result.failed and set(result.cells_by_node) == set(result.nodes) and len(result.nodes) == 2
    assert result.bytes_moved == 0 and result.copies == {} and cluster.copies_left() == []
    _measured_alike(local, result.tables[0])
    # a model quantized on either node is the very file the single-machine run writes
    for t in TYPES:
        assert result.tables[0].cells[t]["size_bytes"] == local.cells[t]["size_bytes"]


def test_cli_several_sources_make_a_table_each_and_a_combined_one(cluster, tiny_llama3_gguf, text_file, tmp_path):
    srcs = []
    for name in ("M1-1.7M-F32", "M2-1.7M-F32"):
        srcs.append(tmp_path / f"{name}.gguf")
        srcs[-1].symlink_to(tiny_llama3_gguf)
    proc = run_cl3("bench", *srcs, "--ray", cluster.address, "-o", tmp_path / "tables/", "--type", "Q8_0,Q4_0",
                   "-c", "64", "--chunks", "2", "-f", text_file, "-p", "32", "-n", "4", "-r", "1", "-t", "1", "-q")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in (tmp_path / "tables").iterdir() if p.is_file())
    assert names == sorted(f"{n}{e}" for n in ("M1-1.7M-F32", "M2-1.7M-F32", "combined")
                           for e in (".csv", ".json", ".md", ".png"))
    combined = json.loads((tmp_path / "tables" / "combined.json").read_text())
    assert combined["types"] == ["M1-1.7M-F32:Q8_0", "M1-1.7M-F32:Q4_0", "M2-1.7M-F32:Q8_0", "M2-1.7M-F32:Q4_0"]
    m1 = json.loads((tmp_path / "tables" / "M1-1.7M-F32.json").read_text())
    assert combined["cells"]["M1-1.7M-F32:Q4_0"]["ppl"] == m1["cells"]["Q4_0"]["ppl"]
    summary = " ".join(proc.stdout.split())
    assert "cells on 2 nodes" in summary and "moved between nodes" in summary and "0 retried" in summary


def test_cli_without_ray_is_one_line(tiny_llama3_gguf, tmp_path):
    code = ("import sys; sys.modules['ray'] = None\nfrom cl3.cli import main\n"
            f"main(['bench', {str(tiny_llama3_gguf)!r}, '--ray', '-o', {str(tmp_path / 't')!r}])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    one_line_error(proc, "pip install 'cl3[ray]'")
    assert list(tmp_path.iterdir()) == []


def test_cli_without_a_cluster_is_one_line(tiny_llama3_gguf, tmp_path):
    proc = run_cl3("bench", tiny_llama3_gguf, "--ray", f"127.0.0.1:{_free_port()}", "-o", tmp_path / "t",
                   "--type", "Q8_0", timeout=300)
    one_line_error(proc, "no Ray cluster at 127.0.0.1:")


def test_ctrl_c_leaves_a_table_that_a_rerun_completes(cluster, tiny_llama3_gguf, text_file, tmp_path):
    args = ["bench", tiny_llama3_gguf, "--ray", cluster.address, "-o", tmp_path / "Tiny", "--type", ",".join(TYPES),
            "--kld", "-f", text_file, "-q", *[str(x) for k, v in SETTINGS.items() for x in (_FLAG[k], v)]]
    proc = subprocess.Popen([sys.executable, "-m", "cl3", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    table = tmp_path / "Tiny.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        cells = json.loads(table.read_text())["cells"] if table.exists() else {}
        if sum("ppl" in c for c in cells.values()) >= 1:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (f"interrupted: measured cells are kept in {table}; the same command "
                                               "continues from there"), stderr
    before = json.loads(table.read_text())["cells"]
    assert 1 <= sum("ppl" in c for c in before.values()) and not all(
        "ppl" in c and c.get("speed") for c in before.values())
    assert not [p for p in tmp_path.rglob("*") if "partial" in p.name]
    time.sleep(1)
    assert cluster.copies_left() == []
    rerun = run_cl3(*args)
    assert rerun.returncode == 0, rerun.stderr
    after = json.loads(table.read_text())["cells"]
    for t, cell in before.items():  # what was measured before the interruption is kept, not measured again
        if "ppl" in cell:
            assert after[t]["ppl_seconds"] == cell["ppl_seconds"]
    assert all("ppl" in after[t] and len(after[t]["speed"]) == 1 for t in TYPES)


_FLAG = {"ctx": "-c", "chunks": "--chunks", "n_prompt": "-p", "n_gen": "-n", "repetitions": "-r", "threads": "-t"}


def test_losing_the_worker_node_mid_run_still_completes_the_table(cluster, tiny_llama3_gguf, text_file,
                                                                  imatrix_file, local_table, tmp_path):
    """Last in this file: the worker node does not come back."""
    local, _ = local_table
    killed = {}

    def on_status(status: bench_ray.RunStatus) -> None:
        if killed:
            return
        for node in status.nodes.values():
            # the worker: not the node this process runs on
            if node.id != status.caller and any(
                    "speed" in r and "/" in r for r in node.running):
                killed.update(node=node.id, running=list(node.running))
                cluster.kill("worker")
                return

    result = _on_ray(cluster, tiny_llama3_gguf, tmp_path / "Tiny", text_file, imatrix_file, on_status=on_status)
    assert killed, "the worker never ran a speed cell"
    assert not result.failed and not result.skipped and result.retried >= 1
    table = result.tables[0]
    _measured_alike(local, table)
    for t in TYPES:  # complete, once: one speed per hardware kind, measured by a node still alive
        cell = table.cells[t]
        assert not bench.missing_steps({**cell, "pp_ms_per_token": 0}) and len(cell["speed"]) == 1
    saved = json.loads((tmp_path / "Tiny.json").read_text())
    assert list(saved["cells"]) == TYPES and saved["types"] == TYPES
    rows = [ln.split("|")[1].strip() for ln in (tmp_path / "Tiny.md").read_text().splitlines() if ln.startswith("| ")]
    assert len(rows) == len(set(rows))
    header = (tmp_path / "Tiny.csv").read_text().splitlines()[0]
    assert header == "metric," + ",".join(TYPES)
    assert not [p for p in tmp_path.rglob("*") if "partial" in p.name]
