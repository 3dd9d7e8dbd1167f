#!/usr/bin/env bash
# On a CUDA machine (< 5 min on an H100): build mildnet._C for this GPU, run the CUDA tests, run the kernel
# benchmark on CUDA. Writes bench/results/kernel_cuda.json (+ .png) and bench/results/gpu_check.json, and copies
# them (plus the logs) to $OUT when it is set. Exit status: non-zero if the build or any test failed.
#   bash bench/gpu_check.sh                 # env: PY (python to use), GPU_BENCH_ARGS (extra bench/kernel.py flags)
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=$(command -v python3 || command -v python); fi
fi
RESULTS=bench/results
LOGS=$(mktemp -d)
mkdir -p "$RESULTS"
log() { echo "[gpu_check $(date +%T)] $*"; }
start=$(date +%s)

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" || exit 1

# Build only for this GPU (fast); setup.py finds the toolkit through nvcc. A stale library must never be tested.
ARCH=$("$PY" -c "import torch; major, minor = torch.cuda.get_device_capability(); print(f'{major}.{minor}')")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$ARCH}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
rm -f mildnet/_C*.so
log "building mildnet._C for sm_${ARCH/./} with $MAX_JOBS jobs"
build_start=$(date +%s)
"$PY" setup.py build_ext --inplace > "$LOGS/build.log" 2>&1
build_rc=$?
build_s=$(( $(date +%s) - build_start ))
tail -3 "$LOGS/build.log"
if [ $build_rc -ne 0 ]; then log "BUILD FAILED (see build.log)"; fi

# The extension must really load: no silent fallback to the reference. `-m cuda` selects every CUDA test of
# tests/test_ops.py: the kernels against the reference in every dtype and layout, a misaligned storage offset and
# batch stride, a side stream checked after synchronising only that stream, opcheck, torch.compile and
# torch.export on CUDA, and every zoo model's real taps. On a GPU none of them may skip.
log "CUDA tests"
"$PY" -m pytest -q -rs -p no:cacheprovider tests/test_ops.py -m cuda \
  --junitxml="$LOGS/cuda_tests.xml" > "$LOGS/cuda_tests.log" 2>&1
cuda_tests_rc=$?
"$PY" -m pytest -q -p no:cacheprovider "tests/test_ops.py::test_extension_is_loaded" > "$LOGS/loaded.log" 2>&1
loaded_rc=$?
tail -3 "$LOGS/cuda_tests.log"

log "kernel benchmark on CUDA"
# The torch.compile variant is skipped by default here (its compiles alone would eat the 5-minute budget);
# the GPU targets compare the fused op with eager and with the device-to-device copy.
"$PY" bench/kernel.py --device cuda --no-compile ${GPU_BENCH_ARGS:-} > "$LOGS/bench.log" 2>&1
bench_rc=$?
grep -E "^(config|N=|target|wrote)" "$LOGS/bench.log"

"$PY" - "$LOGS" "$build_rc" "$build_s" "$cuda_tests_rc" "$loaded_rc" "$bench_rc" "$(( $(date +%s) - start ))" <<'PYEOF'
import json, os, sys, datetime, xml.etree.ElementTree as ET
logs, build_rc, build_s, tests_rc, loaded_rc, bench_rc, total_s = sys.argv[1], *map(int, sys.argv[2:])
summary = {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(), "build_rc": build_rc,
           "build_seconds": build_s, "cuda_tests_rc": tests_rc, "extension_loaded_test_rc": loaded_rc,
           "bench_rc": bench_rc, "total_seconds": total_s}
try:
    suite = ET.parse(os.path.join(logs, "cuda_tests.xml")).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    summary["cuda_tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
except Exception as error:  # no XML: the test run itself broke
    summary["cuda_tests"] = {"error": str(error)}
counts = summary["cuda_tests"]
# a CUDA test that skips on a GPU machine, or none collected, is a failure of this check, not a pass
summary["cuda_tests_complete"] = counts.get("tests", 0) > 0 and counts.get("skipped", 1) == 0
try:
    bench = json.load(open("bench/results/kernel_cuda.json"))
    summary["gpu"] = bench["machine"].get("gpu")
    summary["targets"] = bench["targets"]
except Exception as error:
    summary["targets"] = {"error": str(error)}
tmp = "bench/results/gpu_check.json.tmp"
with open(tmp, "w") as f:
    json.dump(summary, f, indent=2)
    f.flush(); os.fsync(f.fileno())
os.replace(tmp, "bench/results/gpu_check.json")
print(json.dumps(summary, indent=2))
sys.exit(0 if summary["cuda_tests_complete"] else 3)
PYEOF
summary_rc=$?

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$LOGS"/* "$OUT"/ 2>/dev/null
  cp "$RESULTS"/kernel_cuda.json "$RESULTS"/kernel_cuda.png "$RESULTS"/gpu_check.json "$OUT"/ 2>/dev/null
fi
log "done in $(( $(date +%s) - start )) s"
[ $build_rc -eq 0 ] && [ $cuda_tests_rc -eq 0 ] && [ $loaded_rc -eq 0 ] && [ $bench_rc -eq 0 ] && [ $summary_rc -eq 0 ]
