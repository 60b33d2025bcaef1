"""`cl3 doctor`: what this installation can do, in one screen."""

from __future__ import annotations

import json

from rich.table import Table

from .app import app, out
from .options import Json


@app.command()
def doctor(as_json: Json = False) -> None:
    """Show the llama.cpp build (CPU features, AMX check, GPU devices), where models will run, llama.cpp's own
    tools if present, and how to reinstall for a GPU."""
    from ..doctor import REFERENCE_BUILD, report

    r = report()
    if as_json:
        out.print_json(json.dumps(r.to_dict()))
        return
    t = Table(title="cl3 doctor", show_header=False)
    t.add_column("", style="bold")
    t.add_column("", overflow="fold")
    t.add_row("cl3", f"{r.cl3} (Python {r.python}, {r.platform})")
    t.add_row("llama-cpp-python", f"{r.llama_cpp_python} ({r.library_dir})")
    t.add_row("CPU features", " ".join(r.cpu_features) or "?")
    amx = r.amx
    t.add_row("AMX kernels", f"{amx['state']}: {amx['reason']}")
    for d in r.devices:
        memory = f", {d['memory_free'] / 2**30:.1f} of {d['memory_total'] / 2**30:.1f} GiB available" \
            if d["memory_total"] else ""
        t.add_row(f"device {d['name']}", f"{d['type']}: {d['description']}{memory}")
    t.add_row("GPU offload", "yes" if r.gpu_offload else "no (this build runs on the CPU only)")
    t.add_row("models run on", f"{r.where_models_run} (chat, serve, ppl, speed, imatrix, bench; -ngl changes it)")
    t.add_row("llama.cpp's tools", r.reference_tools or f"not found (only the parity tests and benchmarks use them; "
                                                         f"build them with `{REFERENCE_BUILD}` or set "
                                                         f"CL3_REFERENCE_BIN)")
    out.print(t)
    for item in r.reinstall:
        out.print(f"for {item['for']}: {item['command']}", highlight=False, soft_wrap=True, markup=False)
