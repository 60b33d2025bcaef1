#!/usr/bin/env bash
# cl3 on CUDA, side by side with llama.cpp's own tools built from the same source, every layer on the GPU.
# (cl3's copy of ../shared/device/cuda-check.sh; adds cl3 doctor, cl3 bench end to end, cl3 serve with offload, and a
#  gdb backtrace of any crash. Prepare with ../shared/device/prepare.sh, then copy this file into the prepared dir.)
# Runs on the device machine (prepared by prepare.sh): builds the pinned release's llama.cpp with CUDA (library and
# llama-imatrix/-perplexity/-bench), installs it as llama-cpp-python's lib/, then checks on a synthetic Llama-3-shaped
# model: imatrix values, perplexity, pp/tg speed (Q4_K_M and F16) and one chat reply.
# usage: bash cuda-check.sh [PREPARED_DIR] [PROJECT_DIR]      env: CUDA_ARCH (90), SHAPE ("2048 16 8192"), BUILD_DIR
# writes $OUT/cuda-check.md (the table) and $OUT/cuda-check.log (every command's output)
set -uo pipefail
DEV=$(cd "${1:-.device}" && pwd); PROJ=$(cd "${2:-.}" && pwd)
W=${WORK_DIR:-$(mktemp -d)}; mkdir -p "$W"
R=${OUT:-$W/out}; mkdir -p "$R"; LOG=$R/cuda-check.log; MD=$R/cuda-check.md; : >"$LOG"
say() { echo "[$(date +%T)] $*" | tee -a "$LOG"; }
row() { echo "| $* |" >>"$MD"; }
timed() { local t0=$SECONDS; "$@" >>"$LOG" 2>&1; local rc=$?; LAST_S=$((SECONDS - t0)); return $rc; }
printf '# cl3 on CUDA\n\n| check | result |\n|---|---|\n' >"$MD"
row "machine" "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1); nvcc $(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')"

say "unpack"; tar xJf "$DEV/llama-cpp.tar.xz" -C "$W"
B=${BUILD_DIR:-$W/build}
if [ ! -x "$B/bin/llama-bench" ]; then
  say "build llama.cpp with CUDA"
  gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
  timed cmake -S "$W/vendor/llama.cpp" -B "$B" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
      -DCMAKE_C_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" -DCMAKE_CXX_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" || { row "cmake configure" "FAILED (log)"; exit 1; }
  timed cmake --build "$B" -j"$(nproc)" --target llama llama-imatrix llama-perplexity llama-bench \
      || { row "CUDA build" "FAILED (log)"; tail -40 "$LOG"; exit 1; }
  row "CUDA build of llama.cpp (lib + 3 tools, $(nproc) cores)" "${LAST_S} s"
fi
ln -sfn "$B/bin" "$W/llama_cpp/lib"        # llama-cpp-python's own layout: the shared libraries in llama_cpp/lib
python3 -m pip install -q --no-index --no-deps --no-compile --target "$W/site" "$DEV"/wheels/*.whl >>"$LOG" 2>&1
export PYTHONPATH=$W/site:$W:$PROJ PYTHONUNBUFFERED=1
cl3() {  # a crash (signal) is run again under gdb, when the machine has it, to log its C backtrace
  python3 -X faulthandler -m cl3 "$@"; local rc=$?
  if [ $rc -gt 128 ] && command -v gdb >/dev/null; then
    echo "== crash (exit $rc): cl3 $*; backtrace:" >>"$LOG"
    gdb -q -batch -ex run -ex "bt 30" --args python3 -m cl3 "$@" >>"$LOG" 2>&1 </dev/null
  fi
  return $rc
}
python3 -c 'import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)' \
  && row "llama_cpp imports, supports GPU offload" "yes" || { row "llama_cpp GPU offload" "NO"; [ -n "${ALLOW_CPU:-}" ] || exit 1; }

say "model"; read -r H L F <<<"${SHAPE:-2048 16 8192}"
M=$W/model; mkdir -p "$M"
timed python3 -c "
import sys; sys.path.insert(0, '$PROJ/benchmarks')
from common import synthetic_f16_gguf; print(synthetic_f16_gguf(__import__('pathlib').Path('$M'), $H, $L, $F))" \
  || { row "synthetic model" "FAILED (log)"; exit 1; }
F16=$(ls "$M"/*-f16.gguf | head -1); Q4=$M/q4km.gguf
timed cl3 quantize "$F16" --type Q4_K_M -o "$Q4" -q; row "model: hidden $H, $L layers, ffn $F; F16 $(du -m "$F16" | cut -f1) MiB, Q4_K_M $(du -m "$Q4" | cut -f1) MiB (quantize ${LAST_S} s)" "built"
python3 -c "from cl3.calibration import calibration_text as c, evaluation_text as e
open('$W/calib.txt','w').write(c()); open('$W/eval.txt','w').write(e())"

say "imatrix"
timed cl3 imatrix "$F16" -f "$W/calib.txt" -c 512 --chunks 8 -ngl 99 -o "$W/cl3-im.gguf" -q; t1=$LAST_S
timed "$B/bin/llama-imatrix" -m "$F16" -f "$W/calib.txt" -c 512 --chunks 8 -ngl 99 -o "$W/ref-im.gguf"; t2=$LAST_S
row "imatrix 8×512 on GPU vs llama-imatrix" "$(python3 - "$W/cl3-im.gguf" "$W/ref-im.gguf" <<'PY' 2>&1 | tail -1
import sys, numpy as np
from gguf import GGUFReader
def load(p):
    return {t.name: np.array(t.data, dtype=np.float64) for t in GGUFReader(p).tensors}
a, b = load(sys.argv[1]), load(sys.argv[2])
worst = max((float(np.max(np.abs(a[k] - b[k]) / np.maximum(np.abs(b[k]), 1e-30))) for k in b if k in a), default=float('nan'))
print(f"entries {len(a)} vs {len(b)}, same names {set(a) == set(b)}, max rel diff {worst:.2e}")
PY
); ${t1} s vs ${t2} s"

say "perplexity"
timed cl3 ppl "$Q4" -f "$W/eval.txt" -c 512 --chunks 16 -ngl 99 --json -q; t1=$LAST_S
p1=$(grep -o '"ppl": *[0-9.]*' "$LOG" | tail -1 | grep -o '[0-9.]*$')
timed "$B/bin/llama-perplexity" -m "$Q4" -f "$W/eval.txt" -c 512 --chunks 16 -ngl 99; t2=$LAST_S
p2=$(grep -o 'Final estimate: PPL = [0-9.]*' "$LOG" | tail -1 | grep -o '[0-9.]*$')
row "PPL Q4_K_M, 16×512, GPU: cl3 vs llama-perplexity" "${p1:-?} vs ${p2:-?}; ${t1} s vs ${t2} s"

for f in "$Q4" "$F16"; do
  say "speed $(basename "$f")"
  cl3 speed "$f" -p 512 -n 128 -r 3 -ngl 99 --json -q >"$W/s1.json" 2>>"$LOG"
  "$B/bin/llama-bench" -m "$f" -p 512 -n 128 -r 3 -ngl 99 -o json >"$W/s2.json" 2>>"$LOG"
  cat "$W/s1.json" "$W/s2.json" >>"$LOG"
  row "speed $(basename "$f") GPU, tok/s pp512 / tg128: cl3 vs llama-bench" "$(python3 - "$W/s1.json" "$W/s2.json" <<'PY' 2>&1 | tail -1
import json, sys
def pick(obj):
    out = {}
    rows = obj if isinstance(obj, list) else obj.get("results", obj.get("tests", [obj]))
    for r in rows:
        n_p, n_g = r.get("n_prompt", 0), r.get("n_gen", 0)
        ts = r.get("avg_ts") or r.get("tokens_per_second") or r.get("tps")
        name = str(r.get("name") or ("pp" if n_p and not n_g else "tg"))
        out["pp" if name.startswith("pp") else "tg"] = round(float(ts), 1) if ts else ts
    return out
try:
    a, b = pick(json.load(open(sys.argv[1]))), pick(json.load(open(sys.argv[2])))
    print(f"pp {a.get('pp')} vs {b.get('pp')}; tg {a.get('tg')} vs {b.get('tg')}")
except Exception as e:
    print(f"unreadable: {e}")
PY
)"
done

say "doctor"
timed cl3 doctor --json
row "cl3 doctor" "exit $?; $(python3 -m cl3 doctor --json 2>/dev/null | python3 -c 'import json,sys; r=json.load(sys.stdin); print("offload", r["gpu_offload"], "; runs on", r["where_models_run"])' 2>&1 | tail -1)"

say "bench"
mkdir -p "$W/tables"; timed cl3 bench "$F16" --type Q8_0,Q4_K_M -c 512 --chunks 4 -p 128 -n 32 -r 2 -ngl 99 -o "$W/tables/gpu" -q
row "cl3 bench F16,Q8_0,Q4_K_M end to end on GPU" "exit $? in ${LAST_S} s"
[ -f "$W/tables/gpu.md" ] && cp "$W/tables/gpu.md" "$R/bench-gpu.md"

say "serve"
PORT=18765
python3 -m cl3 serve "$Q4" --port $PORT -ngl 99 >>"$LOG" 2>&1 &
SPID=$!
for i in $(seq 60); do python3 - <<PY 2>/dev/null && break; sleep 1; done
import urllib.request; urllib.request.urlopen("http://127.0.0.1:$PORT/v1/models", timeout=2)
PY
reply=$(python3 - <<PY 2>&1 | tail -1
import json, urllib.request
req = urllib.request.Request("http://127.0.0.1:$PORT/v1/chat/completions", method="POST",
    data=json.dumps({"messages": [{"role": "user", "content": "你好"}], "max_tokens": 8}).encode(),
    headers={"Content-Type": "application/json"})
print(json.load(urllib.request.urlopen(req, timeout=60))["usage"])
PY
)
kill $SPID 2>/dev/null; wait $SPID 2>/dev/null
row "cl3 serve -ngl 99, one chat completion" "$reply"

say "chat"
timed timeout 120 python3 -X faulthandler -m cl3 chat "$Q4" -p "用一句话介绍量化。" -n 32 --temp 0 -ngl 99
row "chat -p on GPU" "exit $? in ${LAST_S} s"
say "diagnostics"
timed cl3 ppl "$Q4" -f "$W/eval.txt" -c 512 --chunks 4 -ngl 0 --json -q
row "cl3 ppl -ngl 0 (CPU) on this build" "exit $?"
timed python3 -X faulthandler -c "from llama_cpp import Llama; m = Llama('$Q4', n_gpu_layers=99, verbose=False); print(m.create_completion('hello', max_tokens=8)['choices'][0]['text'])"
row "llama-cpp-python Llama(n_gpu_layers=99) completion" "exit $?"
if grep -q "Fatal Python error" "$LOG"; then
  printf '\nFirst crash (faulthandler):\n```\n' >>"$MD"; grep -m1 -A24 "Fatal Python error" "$LOG" >>"$MD"; printf '```\n' >>"$MD"
fi
say "done"; cat "$MD"
