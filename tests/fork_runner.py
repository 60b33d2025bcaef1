"""Run many `cl3` command lines, each in its own process, for the price of one interpreter start.

``python -m tests.fork_runner`` reads a JSON list of jobs on stdin, imports cl3 once, and forks one child per job:
the child runs the real CLI (``cl3.cli.main``) with the job's arguments, its stdout thrown away and its stderr kept,
so a crash inside llama.cpp (SIGABRT, SIGSEGV) kills only that child and shows as a negative return code, as it
would for ``subprocess.run``. A job ``["--load", PATH]`` instead loads PATH with llama.cpp's own API directly
(``llama_model_load_from_file``, no cl3 code): return code 0 when it loads, 1 when llama.cpp refuses it.
Prints a JSON list of ``{"returncode", "stderr", "seconds"}``, one per job. Each child is killed after ``CHILD_TIMEOUT`` s.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import time

CHILD_TIMEOUT = 60
WARM_UP = [["info", "--help"], ["quantize", "--help"], ["ppl", "--help"]]


def _llama_load(path: str) -> int:
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    if not model:
        return 1
    llama_cpp.llama_model_free(model)
    return 0


def _child(args: list[str], stderr_path: str) -> None:
    signal.alarm(CHILD_TIMEOUT)
    devnull = os.open(os.devnull, os.O_WRONLY)
    err = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(devnull, 1)
    os.dup2(err, 2)
    code = 0
    try:
        if args[:1] == ["--load"]:
            code = _llama_load(args[1])
        else:
            from cl3.cli import main

            main(args)
    except SystemExit as ex:
        code = ex.code if isinstance(ex.code, int) else (0 if ex.code is None else 1)
    except BaseException as ex:  # noqa: BLE001 - anything escaping main is a bug the test must see
        print(f"escaped main: {type(ex).__name__}: {ex}", file=sys.stderr)
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_jobs(jobs: list[list[str]]) -> list[dict]:
    os.environ["COLUMNS"] = "200"
    import importlib

    # what the commands import lazily, imported once before the forks (most of a short command's time)
    for module in ("cl3.cli", "cl3.metadata", "cl3.check", "cl3.quantize", "cl3.measure", "cl3.chat", "llama_cpp"):
        importlib.import_module(module)
    import cl3.cli
    from cl3.llama.library import llama_cpp

    llama_cpp()
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        for args in WARM_UP:  # typer builds its commands, rich its tables: once, in the parent
            try:
                cl3.cli.main(args)
            except SystemExit:
                pass

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, args in enumerate(jobs):
            stderr_path = os.path.join(tmp, f"{i}.err")
            start = time.monotonic()
            pid = os.fork()
            if pid == 0:
                _child(args, stderr_path)
            _, status = os.waitpid(pid, 0)
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            with open(stderr_path, encoding="utf-8", errors="replace") as f:
                results.append({"returncode": code, "stderr": f.read(), "seconds": time.monotonic() - start})
    return results


if __name__ == "__main__":
    print(json.dumps(run_jobs(json.load(sys.stdin))))
