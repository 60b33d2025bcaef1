"""`cl3 bench --ray`: the authors' tables for many checkpoints and types, measured on the machines of a Ray cluster.

Every cell is a Ray task with its resource request, running bench's own steps (``quantized_model``, ``size_values``,
``perplexity_values``, ``speed_values``, ``kld_base_logits``): quantize one type, perplexity (and KLD) of one type,
speed of one type on one hardware kind; plus the imatrix and the KLD base once per source. The caller (the process
that runs this module, on a node of the cluster) keeps the tables: each result is merged into NAME.json as it comes,
so an interrupted run resumes, locally or on the cluster, from the same files.

Files. With ``shared=True`` every node sees the caller's paths (NFS and the like) and cells read and write them in
place. Otherwise one ``NodeFiles`` actor per node keeps that node's copies: a task asks it for the source, the imatrix,
the KLD base or a model, and it pulls the file from the caller's ``NodeFiles`` once (in chunks, through Ray's object
store); what a cell makes on a node (a quantized model, the imatrix, the KLD base) is pulled back into the caller's
folders. Cells on the caller's node use its files directly. Bytes moved are counted per node; the copies are removed
at the end.

Failures. Ray retries a task whose node dies elsewhere (soft node affinity falls back); a model that only existed on
the dead node is quantized again. A result is merged once per cell (cells are keyed by type, speed by hardware kind),
so retries never count twice. An error in a cell itself (a Cl3Error) is reported and the other cells go on.

Speed figures are kept apart per hardware kind (CPU model, threads, GPUs): each type's speed is measured on every
kind the cluster has, and the table gets one PP/TG row pair per kind.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, bench, quantize
from .errors import Cl3Error, InputError, UsageError
from .progress import Stage

NAMESPACE = "cl3"
CHUNK = 32 << 20          # bytes per object-store transfer
WINDOW = 4                # transfers in flight per file
SPEED_KEYS = ("pp_ms_per_token", "tg_ms_per_token")
RETRIES = 3               # re-runs of a cell after a system failure Ray's own retries did not absorb


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError("running bench on a Ray cluster needs Ray: pip install 'cl3[ray]'", param="ray") from None
    return ray


# ------------------------------------------------------------------------------------------------------ the table

@dataclass
class ClusterTable(bench.BenchTable):
    """A bench table whose speed rows are kept apart per hardware kind (cells[type]["speed"][kind])."""

    nodes: dict = field(default_factory=dict)     # node id -> what the node is (hostname, CPU, GPUs, versions)

    def kinds(self) -> list[str]:
        return sorted({k for t in self.types for k in self.cells.get(t, {}).get("speed", {})})

    def value(self, type_name: str, key: str):
        if "@" in key:
            key, kind = key.split("@", 1)
            return self.cells.get(type_name, {}).get("speed", {}).get(kind, {}).get(key)
        if key in SPEED_KEYS and len(kinds := self.kinds()) == 1:
            return self.value(type_name, f"{key}@{kinds[0]}")
        return super().value(type_name, key)

    def rows(self):
        rows = [r for r in super().rows() if r[0] not in SPEED_KEYS]
        for kind in self.kinds():
            rows += [(f"{key}@{kind}", f"{label}, {kind}", spec, None) for key, label, spec, _ in bench.ROWS
                     if key in SPEED_KEYS and any(self.value(t, f"{key}@{kind}") is not None for t in self.types)]
        return rows

    def to_dict(self) -> dict:
        return {**super().to_dict(), "nodes": self.nodes}


def hardware_kind(cpu: str, threads: int, gpus: list[str]) -> str:
    """What makes speed figures comparable: the CPU model and threads, and the GPUs when layers are offloaded."""
    cpu = " ".join(re.sub(r"\((R|TM)\)|\bCPU\b|@.*$", "", cpu, flags=re.I).split())
    kind = f"{cpu}, {threads} threads"
    return f"{' + '.join(gpus)}; {kind}" if gpus else kind


def node_record(settings: bench.BenchSettings) -> dict:
    """This node as a table records it (run on each node)."""
    import ray

    from . import llama

    info = bench.machine_info()
    gpus = [d["description"] for d in info["devices"] if d["type"] in ("GPU", "iGPU")]
    use_gpu = bool(gpus) and settings.n_gpu_layers != 0 and llama.gpu_offload_supported()
    threads = settings.threads or info["cores"]
    return {"id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
            "ip": ray.util.get_node_ip_address(), "cpu": info["cpu"], "cores": info["cores"],
            "gpus": gpus if use_gpu else [], "kind": hardware_kind(info["cpu"], threads, gpus if use_gpu else []),
            "cl3": __version__, "llama_cpp_python": info["llama_cpp_python"], "machine": info}


def _short(record: dict) -> dict:
    return {k: record[k] for k in ("id", "hostname", "ip", "cpu", "cores", "gpus", "kind") if k in record}


def _machine_summary(records: list[dict]) -> dict:
    """The table's "machine": the node itself when speed ran on one hardware kind, else each kind in turn."""
    if not records:
        return {}
    if len({r["kind"] for r in records}) == 1:
        return dict(records[0].get("machine") or _short(records[0]))
    by_kind = {r["kind"]: r.get("machine") or _short(r) for r in records}

    def joined(key):
        return " / ".join(str(m.get(key)) for m in by_kind.values())
    return {"cpu": " / ".join(by_kind), "cores": joined("cores"), "ram_gib": joined("ram_gib"), "os": joined("os"),
            "backend": joined("backend"), "llama_cpp_python": joined("llama_cpp_python"),
            "llama_cpp_system_info": "one per node: see nodes"}


# -------------------------------------------------------------------------------------------------------- actors

class Board:
    """On the caller's node: which cell runs where and how far it is, how often each cell started, bytes moved."""

    def __init__(self):
        self.running: dict[str, dict] = {}
        self.starts: collections.Counter = collections.Counter()
        self.moved: dict[str, int] = collections.defaultdict(int)       # node id -> bytes received
        self.seconds = 0.0                                              # spent receiving, all nodes together
        self.copies: collections.Counter = collections.Counter()        # (node id, file) -> times received
        self.stop_asked = False                                         # the caller was interrupted

    def started(self, work_id: str, node: str) -> None:
        self.running[work_id] = {"node": node, "description": "", "done": 0, "total": 0}
        self.starts[work_id] += 1

    def progress(self, work_id: str, description: str, done: int, total: int) -> None:
        if work_id in self.running:
            self.running[work_id].update(description=description, done=done, total=total)

    def received(self, node: str, key: str, n_bytes: int, seconds: float) -> None:
        self.moved[node] += n_bytes
        self.seconds += seconds
        self.copies[(node, key)] += 1

    def stop(self) -> None:
        self.stop_asked = True

    def stopping(self) -> bool:
        return self.stop_asked

    def snapshot(self) -> dict:
        return {"running": dict(self.running), "starts": dict(self.starts), "moved": dict(self.moved),
                "copies": [(n, k, c) for (n, k), c in self.copies.items()], "seconds": self.seconds}


class NodeFiles:
    """One per node: the node's copies of the run's files, each received once; on the caller's node, its own files."""

    def __init__(self, node: str, board, origin=None, roots: list[str] | None = None):
        self.node, self.board, self.origin = node, board, origin
        self.roots = [Path(r) for r in roots or []]     # caller's node: the folders whose files nodes may read
        self.root = Path(tempfile.mkdtemp(prefix="cl3-ray-"))
        self.paths: dict[str, str] = {}
        self.locks: dict[str, threading.Lock] = collections.defaultdict(threading.Lock)
        self.guard = threading.Lock()

    def root_dir(self) -> str:
        return str(self.root)

    def add(self, key: str, path: str) -> None:
        self.paths[key] = path

    def _path(self, key: str) -> str:
        if key in self.paths:
            return self.paths[key]
        if any(Path(key).is_relative_to(r) for r in self.roots) and os.path.isfile(key):
            return key
        raise InputError(f"not a file of this run: {key}")

    def size(self, key: str) -> int:
        return os.path.getsize(self._path(key))

    def read(self, key: str, offset: int, n: int) -> bytes:
        with open(self._path(key), "rb") as f:
            f.seek(offset)
            return f.read(n)

    def ensure(self, key: str, dest: str) -> str:
        """This node's copy of the caller's file ``key``, received into ``dest`` the first time."""
        with self.guard:
            lock = self.locks[key]
        with lock:
            have = self.paths.get(key)
            if have and os.path.exists(have):
                return have
            self._receive(self.origin, key, Path(dest))
            self.paths[key] = dest
            return dest

    def pull(self, key: str, source, dest: str) -> int:
        """On the caller's node: a file a node made (``key`` in ``source``'s store) received into ``dest``."""
        return self._receive(source, key, Path(dest))

    def _receive(self, source, key: str, dest: Path) -> int:
        import ray

        t0 = time.monotonic()
        size = ray.get(source.size.remote(key))
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = partial_name(dest)
        try:
            with open(tmp, "wb") as f:
                pending = collections.deque()
                for offset in range(0, size, CHUNK):
                    pending.append(source.read.remote(key, offset, CHUNK))
                    if len(pending) >= WINDOW:
                        f.write(ray.get(pending.popleft()))
                while pending:
                    f.write(ray.get(pending.popleft()))
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        ray.get(self.board.received.remote(self.node, key, size, time.monotonic() - t0))
        return size

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def partial_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.cl3-ray.partial")


# --------------------------------------------------------------------------------------------------------- tasks

@dataclass(frozen=True)
class RunSpec:
    """What every task of a run needs to find its way: the run's actors and the caller's node."""

    run_id: str
    caller_node: str
    shared: bool

    @property
    def board(self) -> str:
        return f"cl3-board-{self.run_id}"

    def store(self, node: str) -> str:
        return f"cl3-files-{self.run_id}-{node}"


def node_job(job: bench.BenchJob, root: Path) -> bench.BenchJob:
    """``job`` with this node's paths: the same file names under ``root``."""
    plain = root / "plain"
    quant = plain if job.quant_dir == job.plain_dir else root / job.quant_dir.name
    imatrix = job.imatrix
    if isinstance(imatrix, (str, os.PathLike)):
        imatrix = root / "imatrix" / Path(imatrix).name
    for d in (plain, quant, root / "source"):
        d.mkdir(parents=True, exist_ok=True)
    return dataclasses.replace(job, source=root / "source" / job.source.name, imatrix=imatrix, plain_dir=plain,
                               quant_dir=quant, kld_base=plain / job.kld_base.name if job.kld_base else None)


class _OnNode:
    """A task's view of its node: the job with this node's paths, and the files it needs brought here."""

    def __init__(self, run: RunSpec, job: bench.BenchJob, work_id: str):
        import ray

        self.node = ray.get_runtime_context().get_node_id()
        self.work_id = work_id
        self.board = ray.get_actor(run.board, namespace=NAMESPACE)
        self.board.started.remote(work_id, self.node)
        self.store = None
        self.job = job
        if not (run.shared or self.node == run.caller_node):
            self.store = _actor(run.store(self.node))
            table_dir = hashlib.sha1(str(job.plain_dir).encode()).hexdigest()[:10]  # one per source's table
            self.job = node_job(job, Path(ray.get(self.store.root_dir.remote())) / table_dir)

    def need(self, caller_path, here) -> None:
        if self.store is not None:
            import ray

            ray.get(self.store.ensure.remote(str(caller_path), str(here)))

    def made(self, caller_path, here) -> None:
        if self.store is not None:
            import ray

            ray.get(self.store.add.remote(str(caller_path), str(here)))

    def stage(self) -> Stage:
        board, work_id, last = self.board, self.work_id, [0.0]

        @contextlib.contextmanager
        def stage(description: str, unit: str):
            def update(done: int, total: int) -> None:
                now = time.monotonic()
                if now - last[0] >= 0.5 or done == total:
                    last[0] = now
                    board.progress.remote(work_id, description, done, total)
            yield update
        return stage

    def result(self, **values) -> dict:
        return {"node": self.node, "remote": self.store is not None, **values}


def _actor(name: str, wait: float = 60.0):
    """A named actor of the run (a node's store may be created a moment after a task lands there)."""
    import ray

    deadline = time.monotonic() + wait
    while True:
        try:
            return ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def probe_task(settings: bench.BenchSettings, paths: list[str]) -> dict:
    record = node_record(settings)
    record["missing"] = [p for p in paths if not os.path.exists(p)]
    return record


def _stoppable(task):
    """A cell that stops itself when the caller is interrupted: a watcher thread asks the run's Board twice a second
    and raises KeyboardInterrupt in the task's thread, as ray.cancel would (the cell's atomic outputs clean up, Ray
    reports TaskCancelledError), but without ray.cancel, whose race with the task's reply aborts Ray 2.60's driver
    ("Tried to complete task that was not pending", ray-project/ray PR 54798)."""
    @functools.wraps(task)
    def cell(run: RunSpec, *args):
        import _thread

        import ray

        board = ray.get_actor(run.board, namespace=NAMESPACE)
        lock, done = threading.Lock(), threading.Event()

        def watch() -> None:
            while not done.wait(0.5):
                try:
                    stop = ray.get(board.stopping.remote(), timeout=5)
                except ray.exceptions.RayActorError:  # the board is gone: the run has ended
                    stop = True
                except ray.exceptions.RayError:  # a slow answer: ask again
                    continue
                with lock:
                    if stop and not done.is_set():
                        _thread.interrupt_main()
                        return

        threading.Thread(target=watch, name="cl3-stop-watch", daemon=True).start()
        try:
            return task(run, *args)
        finally:
            with lock:
                done.set()
    return cell


@_stoppable
def imatrix_task(run: RunSpec, job: bench.BenchJob, work_id: str) -> dict:
    on = _OnNode(run, job, work_id)
    on.need(job.source, on.job.source)
    s = job.settings
    path, _ = quantize.builtin_imatrix(quantize.Source.open(on.job.source), on.job.source.parent, threads=s.threads,
                                       n_gpu_layers=s.n_gpu_layers, stage=on.stage())
    caller_path = job.source.parent / path.name
    on.made(caller_path, path)
    return on.result(file=str(caller_path))


@_stoppable
def quantize_task(run: RunSpec, job: bench.BenchJob, type_name: str, work_id: str) -> dict:
    on = _OnNode(run, job, work_id)
    on.need(job.source, on.job.source)
    if isinstance(job.imatrix, (str, os.PathLike)) and type_name != "F16":
        on.need(job.imatrix, on.job.imatrix)
    model = bench.quantized_model(on.job, type_name, on.stage())
    on.made(job.model_path(type_name), model)
    return on.result(values=bench.size_values(model))


@_stoppable
def kld_base_task(run: RunSpec, job: bench.BenchJob, work_id: str) -> dict:
    on = _OnNode(run, job, work_id)
    on.need(job.model_path("F16"), on.job.model_path("F16"))
    bench.kld_base_logits(on.job, on.job.kld_base, on.stage())
    on.made(job.kld_base, on.job.kld_base)
    return on.result()


@_stoppable
def perplexity_task(run: RunSpec, job: bench.BenchJob, type_name: str, work_id: str) -> dict:
    on = _OnNode(run, job, work_id)
    model = on.job.model_path(type_name)
    on.need(job.model_path(type_name), model)
    if job.settings.kld and type_name != "F16":
        on.need(job.kld_base, on.job.kld_base)
    return on.result(values=bench.perplexity_values(on.job, type_name, model, on.stage()))


@_stoppable
def speed_task(run: RunSpec, job: bench.BenchJob, type_name: str, work_id: str) -> dict:
    on = _OnNode(run, job, work_id)
    model = on.job.model_path(type_name)
    on.need(job.model_path(type_name), model)
    values = bench.speed_values(on.job, type_name, model, on.stage())
    return on.result(values=values, record=node_record(job.settings))


# ----------------------------------------------------------------------------------------------- the caller's side

@dataclass
class NodeStatus:
    id: str
    hostname: str = "?"
    kind: str = ""
    alive: bool = True
    done: int = 0
    failed: int = 0
    running: list[str] = field(default_factory=list)     # "Q4_0 perplexity 3/8"
    received: int = 0                                    # bytes


@dataclass
class RunStatus:
    """One view of the whole run, for a progress display."""

    total: int
    done: int
    running: int
    failed: int
    retried: int
    bytes_moved: int
    nodes: dict[str, NodeStatus]
    caller: str = ""          # the node this process runs on


@dataclass
class ClusterResult:
    tables: list[ClusterTable]
    outs: list[Path]
    combined: ClusterTable | None
    combined_out: Path | None
    nodes: dict[str, dict]                   # node id -> record (every node seen)
    cells_by_node: dict[str, int]            # node id -> cells it finished
    retried: int
    failed: dict[str, str]                   # work id -> message
    skipped: dict[str, str]                  # work id -> why (no node of its hardware kind left)
    bytes_moved: int
    bytes_by_node: dict[str, int]
    copies: dict[str, int]                   # "node file" -> times received (1 when each went once)
    transfer_seconds: float                  # spent receiving files, all nodes together
    seconds: float
    shared: bool


@dataclass
class _Work:
    id: str
    table: int
    step: str                 # imatrix, quantize, fetch, kld, ppl, speed, probe
    type: str | None = None
    kind: str | None = None
    target: Path | None = None
    node: str | None = None   # fetch: the node whose store has the file
    origin: str | None = None  # fetch: the step that made the file


@dataclass
class _Source:
    job: bench.BenchJob
    table: ClusterTable
    out: Path
    model_node: dict[str, str] = field(default_factory=dict)  # type -> node holding a copy besides the caller
    imatrix_path: Path | None = None                          # the built-in imatrix's cached file (imatrix=True)


class _Run:
    def __init__(self, ray, preps: list[tuple[bench.BenchJob, bench.BenchTable, Path]], *, shared: bool,
                 cpus: float | None, on_status: Callable[[RunStatus], None] | None):
        self.ray = ray
        self.t0, self.started = time.monotonic(), time.time()
        self.shared = shared
        self.on_status = on_status
        self.sources = [_Source(job, _cluster_table(table, out), out) for job, table, out in preps]
        self.caller = ray.get_runtime_context().get_node_id()
        self.run = RunSpec(uuid.uuid4().hex[:12], self.caller, shared)
        self.inflight: dict = {}              # ObjectRef -> _Work
        self.planned: set[str] = set()        # cell work ids (not fetches/probes)
        self.finished: set[str] = set()
        self.failed: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.attempts: collections.Counter = collections.Counter()
        self.done_by_node: collections.Counter = collections.Counter()
        self.failed_by_node: collections.Counter = collections.Counter()
        self.records: dict[str, dict] = {}    # node id -> record
        self.stores: dict[str, object] = {}
        self.dead: set[str] = set()
        self.board_view: dict = {"running": {}, "starts": {}, "moved": {}, "copies": [], "seconds": 0.0}
        self.last_poll = 0.0
        self.cpus_asked = cpus
        self._alive_cache: dict[str, dict] = {}
        self.remote = {name: ray.remote(fn) for name, fn in (
            ("probe", probe_task), ("imatrix", imatrix_task), ("quantize", quantize_task), ("kld", kld_base_task),
            ("ppl", perplexity_task), ("speed", speed_task))}

    # ---- setup

    def start(self) -> None:
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Affinity

        here = Affinity(self.caller, soft=False)
        self.board = ray.remote(Board).options(name=self.run.board, namespace=NAMESPACE, num_cpus=0,
                                               scheduling_strategy=here).remote()
        if not self.shared:
            roots = sorted({str(p) for s in self.sources for p in (s.job.source.parent, s.job.plain_dir, s.job.quant_dir,
                                                                    *([Path(s.job.imatrix).parent] if isinstance(
                                                                        s.job.imatrix, (str, os.PathLike)) else []))})
            self.stores[self.caller] = ray.remote(NodeFiles).options(
                name=self.run.store(self.caller), namespace=NAMESPACE, num_cpus=0, max_concurrency=32,
                scheduling_strategy=here).remote(self.caller, self.board, None, roots)
        nodes = self._alive()
        if not any(n["Resources"].get("CPU", 0) > 0 for n in nodes.values()):
            raise InputError("the Ray cluster has no CPUs to run cells on")
        most = max(n["Resources"].get("CPU", 0) for n in nodes.values())
        if self.cpus_asked is not None and not 0 < self.cpus_asked <= most:
            raise UsageError(f"a cell cannot ask for {self.cpus_asked} CPUs: the largest node has {most:g}",
                             param="ray_cpus")
        self.cpus = self.cpus_asked or min(n["Resources"]["CPU"] for n in nodes.values()
                                           if n["Resources"].get("CPU", 0) > 0)
        self.gpu = self.sources[0].job.settings.n_gpu_layers != 0 and ray.cluster_resources().get("GPU", 0) > 0
        self._alive_cache = nodes
        self._meet(nodes, wait=True)

    def _alive(self) -> dict[str, dict]:
        return {n["NodeID"]: n for n in self.ray.nodes() if n["Alive"]}

    def _meet(self, nodes: dict[str, dict], wait: bool = False) -> None:
        """Probe new nodes (what they are; with shared files, that they see them) and give each its store."""
        ray = self.ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Affinity

        new = [n for n in nodes if n not in self.records and n not in self.dead and n not in
               {w.node for w in self.inflight.values() if w.step == "probe"}]
        paths = sorted({str(p) for s in self.sources for p in (s.job.source, s.job.plain_dir)}) if self.shared else []
        refs = {}
        for node in new:
            if not self.shared and node not in self.stores:
                self.stores[node] = ray.remote(NodeFiles).options(
                    name=self.run.store(node), namespace=NAMESPACE, num_cpus=0, max_concurrency=32,
                    scheduling_strategy=Affinity(node, soft=False)).remote(node, self.board,
                                                                           self.stores[self.caller])
            ref = self.remote["probe"].options(num_cpus=0, scheduling_strategy=Affinity(node, soft=False),
                                               max_retries=0).remote(self.sources[0].job.settings, paths)
            refs[ref] = node
            self.inflight[ref] = _Work(f"probe@{node}", -1, "probe", node=node)
        if wait and refs:
            for ref, node in refs.items():
                del self.inflight[ref]
                try:
                    self._met(ray.get(ref, timeout=300), node)
                except self.ray.exceptions.RayError as ex:
                    raise InputError(f"node {nodes[node]['NodeManagerAddress']} cannot run cl3 cells: "
                                     f"{_cause(ex)} (install the same cl3 on every node)") from None

    def _met(self, record: dict, node: str) -> None:
        import llama_cpp

        if (record["cl3"], record["llama_cpp_python"]) != (__version__, llama_cpp.__version__):
            raise InputError(f"node {record['hostname']} runs cl3 {record['cl3']} with llama-cpp-python "
                             f"{record['llama_cpp_python']}, this one cl3 {__version__} with "
                             f"{llama_cpp.__version__}: install the same cl3 on every node")
        if record.get("missing"):
            raise InputError(f"{record['missing'][0]} is not visible on node {record['hostname']}; the shared "
                             "folder must be mounted at the same path on every node", param="shared")
        self.records[node] = record

    # ---- what to run next

    def kinds(self) -> dict[str, list[str]]:
        """Hardware kind -> the alive nodes of that kind (that can run a cell)."""
        kinds = collections.defaultdict(list)
        alive = self._alive_cache
        for node, r in self.records.items():
            if node in alive and alive[node]["Resources"].get("CPU", 0) >= self.cpus:
                kinds[r["kind"]].append(node)
        return kinds

    def advance(self, index: int) -> None:
        """Launch every cell of this source whose inputs are ready; count the others as planned."""
        src = self.sources[index]
        job, table = src.job, src.table
        s = job.settings
        plan = self.planned.add
        if job.imatrix is True:
            cached = self._cached_imatrix(src)
            if cached is None:
                self.launch(index, "imatrix")
            else:
                src.job = job = dataclasses.replace(job, imatrix=cached)
        kld_ready = not s.kld or (job.kld_base is not None and job.kld_base.exists())
        if s.kld and not kld_ready:
            target = job.plain_dir / f"{job.base_name}-F16.{_kld_key(job)}.kld-base"
            if target.exists():
                src.job = job = dataclasses.replace(job, kld_base=target)
                kld_ready = True
            elif job.model_path("F16").exists():
                self.launch(index, "kld", target=target)
            else:
                plan(self.work_id(index, "kld"))
                self.launch(index, "quantize", "F16")
        for type_name in table.types:
            cell = table.cells.setdefault(type_name, {})
            path = job.model_path(type_name)
            missing = bench.missing_steps(cell)
            if not path.exists():
                plan(self.work_id(index, "quantize", type_name))
                if job.imatrix is not True or type_name == "F16":
                    self.launch(index, "quantize", type_name)
            else:
                cell["model"] = str(path)
                if "size" in missing:
                    cell.update(bench.size_values(path))
                    bench.save(table, src.out)
            if "ppl" in missing:
                plan(self.work_id(index, "ppl", type_name))
                if path.exists() and (kld_ready or type_name == "F16"):
                    self.launch(index, "ppl", type_name)
            for kind in self.kinds():
                if kind not in cell.get("speed", {}):
                    plan(self.work_id(index, "speed", type_name, kind))
                    if path.exists():
                        self.launch(index, "speed", type_name, kind)

    def work_id(self, index: int, step: str, type_name: str | None = None, kind: str | None = None) -> str:
        return f"{self.sources[index].table.name}/{type_name or ''}/{step}" + (f"@{kind}" if kind else "")

    def _cached_imatrix(self, src: _Source) -> Path | None:
        if src.imatrix_path is None:  # where the single-machine bench keeps it too
            src.imatrix_path = quantize.cached_imatrix_path(src.job.source, src.job.source.parent,
                                                            quantize.file_sha256(src.job.source))
        return src.imatrix_path if src.imatrix_path.is_file() else None

    def launch(self, index: int, step: str, type_name: str | None = None, kind: str | None = None,
               target: Path | None = None, node: str | None = None, origin: str | None = None) -> None:
        src = self.sources[index]
        work_id = self.work_id(index, step, type_name, kind)
        if step == "fetch":
            work_id += f"/{target}"
        else:
            self.planned.add(work_id)
        if work_id in self.finished or work_id in self.failed or work_id in self.skipped or any(
                w.id == work_id for w in self.inflight.values()):
            return
        if step == "speed" and kind not in self.kinds():
            self.skipped[work_id] = "no node of its hardware kind is left"
            return
        job = src.job
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as Affinity

        cpu, evaluate = {"num_cpus": self.cpus}, {"num_cpus": self.cpus, "num_gpus": 1 if self.gpu else 0}
        self.attempts[work_id] += 1
        if step == "fetch":
            ref = self.stores[self.caller].pull.remote(str(target), self.stores[node], str(target))
        elif step == "imatrix":
            ref = self.remote["imatrix"].options(**evaluate).remote(self.run, job, work_id)
        elif step == "quantize":
            ref = self.remote["quantize"].options(**cpu).remote(self.run, job, type_name, work_id)
        elif step == "kld":
            ref = self.remote["kld"].options(**evaluate).remote(self.run, dataclasses.replace(job, kld_base=target),
                                                                work_id)
        elif step == "ppl":
            near = src.model_node.get(type_name)
            options = {"scheduling_strategy": Affinity(near, soft=True)} if near and near not in self.dead else {}
            ref = self.remote["ppl"].options(**evaluate, **options).remote(self.run, job, type_name, work_id)
        else:
            nodes = self.kinds()[kind]
            near = src.model_node.get(type_name)  # a node that made the model: no copy to send
            options = {"scheduling_strategy": Affinity(near, soft=True)} if near in nodes else {
                "label_selector": {"ray.io/node-id": f"in({','.join(nodes)})"}}
            gpus = 1 if self.records[nodes[0]]["gpus"] else 0
            ref = self.remote["speed"].options(num_cpus=self.cpus, num_gpus=gpus, **options).remote(
                self.run, job, type_name, work_id)
        self.inflight[ref] = _Work(work_id, index, step, type_name, kind, target, node, origin)

    # ---- results

    def finish(self, work: _Work, result) -> None:
        if work.step == "probe":
            self._met(result, work.node)
            return
        src = self.sources[work.table]
        table, job = src.table, src.job
        node = result.get("node") if isinstance(result, dict) else self.caller
        remote = isinstance(result, dict) and result.get("remote")
        if work.step == "fetch":
            self.finished.add(work.id)
            return
        cell = table.cells.setdefault(work.type, {}) if work.type in table.types else None
        if work.step == "imatrix":
            src.imatrix_path = Path(result["file"])
            if remote:
                self.launch(work.table, "fetch", target=src.imatrix_path, node=node, origin="imatrix")
        elif work.step == "kld":
            if remote:
                self.launch(work.table, "fetch", target=work.target, node=node, origin="kld")
        elif work.step == "quantize":
            target = job.model_path(work.type)
            if cell is not None:
                cell.update(result["values"], model=str(target))
                cell.setdefault("ran_on", {})["quantize"] = node
            if remote:
                src.model_node[work.type] = node
                self.launch(work.table, "fetch", work.type, target=target, node=node, origin="quantize")
        elif work.step == "ppl":
            cell.update(result["values"])
            cell.setdefault("ran_on", {})["ppl"] = node
        elif work.step == "speed":
            record = result["record"]
            speed = cell.setdefault("speed", {})
            if record["kind"] != work.kind and record["kind"] in speed:
                return self._again(work)  # fell back onto a node of a kind already measured: not counted twice
            speed[record["kind"]] = {**result["values"], "node": _short(record)}
            table.nodes[node] = self.records.get(node, record)
            if record["kind"] != work.kind:
                self.finished.add(work.id.replace(f"@{work.kind}", f"@{record['kind']}"))
                return self._again(work)
        self.finished.add(work.id)
        self.done_by_node[node] += 1
        if node in self.records:
            table.nodes.setdefault(node, self.records[node])
        bench.save(table, src.out)

    def fail(self, work: _Work, ex: Exception) -> None:
        errors = self.ray.exceptions
        cause = ex.cause if isinstance(ex, errors.RayTaskError) else ex
        node = self.board_view["running"].get(work.id, {}).get("node")
        if work.step == "probe":
            self.dead.add(work.node)     # a node that could not be probed runs no speed cells
            return
        lost = isinstance(cause, errors.RayError) and not isinstance(cause, (errors.WorkerCrashedError,
                                                                             errors.TaskCancelledError))
        if lost and work.step == "fetch":
            # the file existed only on a node that is gone: make it again
            src = self.sources[work.table]
            src.model_node.pop(work.type, None)
            made_by = f"{src.table.name}/{work.type or ''}/{work.origin}"
            self.finished.discard(made_by)
            return self._again(_Work(made_by, work.table, work.origin, work.type, target=work.target))
        if lost:   # a node (or the store a cell read from) died under the cell, after Ray's own retries
            return self._again(work)
        message = str(cause) if isinstance(cause, Cl3Error) else f"{type(cause).__name__}: {cause}"
        self.failed[work.id] = message.strip().splitlines()[0] if message.strip() else type(cause).__name__
        if node:
            self.failed_by_node[node] += 1

    def _again(self, work: _Work) -> None:
        if self.attempts[work.id] > RETRIES:
            self.failed[work.id] = "its node was lost again and again; retries exhausted"
            return
        self.launch(work.table, work.step, work.type, work.kind, work.target)

    # ---- the loop

    def loop(self) -> None:
        ray = self.ray
        self._alive_cache = self._alive()
        for i in range(len(self.sources)):
            self.advance(i)
        while self.inflight:
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=0.25)
            for ref in ready:
                work = self.inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as ex:
                    self.fail(work, ex)
                else:
                    self.finish(work, result)
            self.poll()
            for i in range(len(self.sources)):
                self.advance(i)

    def refresh(self) -> None:
        with contextlib.suppress(self.ray.exceptions.RayError):
            self.board_view = self.ray.get(self.board.snapshot.remote(), timeout=10)

    def poll(self, force: bool = False) -> None:
        now = time.monotonic()
        if now - self.last_poll < 0.5 and not force:
            return
        self.last_poll = now
        ray = self.ray
        self.refresh()
        self._alive_cache = alive = self._alive()
        for node in set(self.records) | set(self.stores):
            if node not in alive and node not in self.dead:
                self.dead.add(node)
                self.stores.pop(node, None)
        self._meet(alive)
        kinds = self.kinds()
        for ref, work in list(self.inflight.items()):   # speed cells of a kind whose nodes all left
            if work.step == "speed" and work.kind not in kinds:
                ray.cancel(ref, force=True)
                del self.inflight[ref]
                self.skipped[work.id] = "no node of its hardware kind is left"
        if self.on_status:
            self.on_status(self.status())

    def status(self) -> RunStatus:
        view = self.board_view
        nodes: dict[str, NodeStatus] = {}
        for node in set(self.records) | set(self.dead) | set(self.done_by_node):
            r = self.records.get(node, {})
            nodes[node] = NodeStatus(node, r.get("hostname", "?"), r.get("kind", ""), node not in self.dead,
                                     self.done_by_node[node], self.failed_by_node[node],
                                     received=view["moved"].get(node, 0))
        running = 0
        for work in self.inflight.values():
            if work.step in ("fetch", "probe"):
                continue
            running += 1
            info = view["running"].get(work.id)
            if info and info["node"] in nodes:
                label = " ".join(x for x in (self.sources[work.table].table.name if len(self.sources) > 1 else "",
                                             work.type, work.step, work.kind and f"({work.kind})") if x)
                progress = f" {info['done']}/{info['total']}" if info["total"] else ""
                nodes[info["node"]].running.append(f"{label}{progress}")
        retried = sum(n - 1 for n in view["starts"].values() if n > 1) + sum(
            n - 1 for n in self.attempts.values() if n > 1)
        return RunStatus(len(self.planned), len(self.finished & self.planned), running, len(self.failed), retried,
                         sum(view["moved"].values()), nodes, self.caller)

    # ---- the end

    def teardown(self) -> None:
        """Stop what still runs (interrupted), remove every node's copies and any partial file."""
        ray = self.ray
        refs = [r for r, w in self.inflight.items() if w.step != "fetch"]
        if refs:  # each cell stops itself (see _stoppable); its atomic outputs clean up after themselves
            with contextlib.suppress(Exception):
                ray.get(self.board.stop.remote(), timeout=10)
                ray.wait(refs, num_returns=len(refs), timeout=10)
        cleanups = [s.cleanup.remote() for n, s in self.stores.items() if n not in self.dead]
        with contextlib.suppress(Exception):
            ray.wait(cleanups, num_returns=len(cleanups), timeout=30)
        for actor in [*self.stores.values(), getattr(self, "board", None)]:
            with contextlib.suppress(Exception):
                ray.kill(actor)
        for work in self.inflight.values():
            if work.step == "fetch":
                with contextlib.suppress(FileNotFoundError):
                    partial_name(work.target).unlink()
        self.inflight.clear()
        self.sweep()

    def sweep(self) -> None:
        """Partial files (atomic_output's) that a cell of this run stopped with its job left on this node."""
        for src in self.sources:
            for folder in {src.job.plain_dir, src.job.quant_dir, src.job.source.parent}:
                for path in Path(folder).glob(".*.partial"):
                    with contextlib.suppress(OSError):
                        if path.stat().st_mtime >= self.started:
                            path.unlink()


def _cause(ex: Exception) -> str:
    cause = getattr(ex, "cause", None) or ex
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


def _kld_key(job: bench.BenchJob) -> str:
    s = job.settings
    f16 = job.model_path("F16")
    key = f"{s.ctx}|{s.chunks}|{s.text_sha256}|{f16.name}|{f16.stat().st_size if f16.exists() else 0}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _cluster_table(table: bench.BenchTable, out: Path) -> ClusterTable:
    t = ClusterTable(**{f.name: getattr(table, f.name) for f in dataclasses.fields(bench.BenchTable)})
    previous = bench.load_table(bench.table_file(out, ".json")) or {}
    if t.cells and previous.get("cells"):
        t.nodes = previous.get("nodes", {})
    return t


# ---------------------------------------------------------------------------------------------------- the API

def bench_on_ray(sources: list[str | os.PathLike], *, out: str | os.PathLike, address: str | None = "auto",
                 shared: bool = False, cpus_per_cell: float | None = None, types: list[str] | None = None,
                 imatrix: str | os.PathLike | bool | None = None, ctx: int = 8192, chunks: int | None = None,
                 text_file: str | os.PathLike | None = None, kld: bool = False, n_prompt: int = 512,
                 n_gen: int = 128, repetitions: int = 5, threads: int | None = None, n_gpu_layers: int = -1,
                 combined_name: str = "combined", stage: Stage | None = None,
                 on_status: Callable[[RunStatus], None] | None = None) -> ClusterResult:
    """`bench` for every source on the Ray cluster at ``address`` ("auto": the one `ray start` made here, or
    RAY_ADDRESS). ``out``: the table's path for one source, a folder for several (each table named after its source,
    plus ``combined_name``). The tables resume from their JSON files exactly as `bench` does. Must run on a node of
    the cluster (the caller's files are read and written here)."""
    ray = import_ray()
    sources = [Path(s) for s in sources]
    if not sources:
        raise UsageError("no source to measure")
    stems = table_stems(sources, out)
    connected = _connect(ray, address)  # first: an unreachable cluster leaves nothing behind
    run = None
    try:
        preps = [bench.prepare(src, types=types, out=stem, imatrix=imatrix, ctx=ctx, chunks=chunks,
                               text_file=text_file, kld=kld, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions,
                               threads=threads, n_gpu_layers=n_gpu_layers, stage=stage)
                 for src, stem in zip(sources, stems)]
        run = _Run(ray, preps, shared=shared, cpus=cpus_per_cell, on_status=on_status)
        run.start()
        run.loop()
        run.refresh()
        view = run.board_view
        for src in run.sources:
            speed_nodes = [run.records.get(n) or r for n, r in src.table.nodes.items()
                           if any(s.get("node", {}).get("id") == n for c in src.table.cells.values()
                                  for s in c.get("speed", {}).values())]
            src.table.machine = _machine_summary(speed_nodes) or src.table.machine
            bench.save(src.table, src.out, final=True)
        combined = combined_out = None
        if len(run.sources) > 1:
            combined = bench.combine([s.table for s in run.sources], combined_name)
            combined.nodes = {k: v for s in run.sources for k, v in s.table.nodes.items()}
            combined_out = stems[0].parent / combined_name
            bench.save(combined, combined_out, final=True)
        return ClusterResult(
            [s.table for s in run.sources], [s.out for s in run.sources], combined, combined_out, dict(run.records),
            dict(run.done_by_node), run.status().retried, dict(run.failed), dict(run.skipped),
            sum(view["moved"].values()), dict(view["moved"]),
            {f"{n} {k}": c for n, k, c in view["copies"]}, view["seconds"], time.monotonic() - run.t0, shared)
    finally:
        if run is not None:
            run.teardown()
        if connected:
            ray.shutdown()  # ends the job: Ray stops the cells still running
            if run is not None:
                run.sweep()


def table_names(sources: list[Path]) -> list[str]:
    """Each source's table name (its file name without .gguf); two sources may not share one."""
    names = [Path(s).name.removesuffix(".gguf") for s in sources]
    if len(set(names)) < len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"two sources would both write the table {dup}; measure them in separate runs")
    return names


def table_stems(sources: list[Path], out: str | os.PathLike) -> list[Path]:
    """Each source's table path: ``out`` itself for one source (unless it is a folder), else out/NAME."""
    from .files import is_directory_target

    names = table_names(sources)
    if len(sources) == 1 and not is_directory_target(out):
        return [bench.table_stem(out)]
    folder = Path(out)
    if len(sources) > 1 and folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; several sources need a folder for their tables", param="out")
    return [folder / n for n in names]


def _connect(ray, address: str | None) -> bool:
    """Connect to the cluster; False when this process is already connected."""
    import logging

    if address and address.startswith("ray://"):
        raise UsageError("bench runs on a node of the cluster, not through Ray Client (its tables and files are "
                         "written there): run it on the head node, or submit it with `ray job submit`", param="ray")
    if ray.is_initialized():
        return False
    _check_reachable(address)
    try:
        ray.init(address=address or "auto", namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING,
                 configure_logging=True)
    except (ConnectionError, RuntimeError, ValueError) as ex:
        if address and address != "auto":
            raise InputError(f"no Ray cluster at {address}: {str(ex).splitlines()[0]}", param="ray") from None
        raise InputError("no Ray cluster on this machine nor at RAY_ADDRESS (start one with `ray start --head`, or "
                         "give its address)", param="ray") from None
    return True


def _check_reachable(address: str | None) -> None:
    """Fail at once when nothing listens at the cluster's address (Ray itself would keep retrying)."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        resolved = canonicalize_bootstrap_address(address or "auto")
    except Exception:  # Ray's own lookup failed: ray.init reports it
        return
    if not resolved:
        return
    host, _, port = resolved.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as ex:
        where = address if address and address != "auto" else f"{resolved} (found by `auto`)"
        raise InputError(f"no Ray cluster at {where}: {getattr(ex, 'strerror', None) or ex}", param="ray") from None
