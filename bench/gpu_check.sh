#!/usr/bin/env bash
# One prepared call for a machine with a GPU: build moe._C with the CUDA kernels
# and moekit's Hopper grouped GEMM in place, run the GPU tests, time the GEMM configurations, the
# ops, the expert MLP and the layer, and print a short table last. Full logs go to $OUT (default
# /tmp/moe_gpu_check; at most 8 files). Needs python3 with torch, pytest, transformers and nvcc
# (CUDA_HOME); installs nothing. CUTLASS's headers come from $CUTLASS_INCLUDE_DIR, else from
# ./.cutlass/include (carry a copy of the nvidia-cutlass wheel's cutlass_library/source/include
# there: the GPU machine has no network), else from an installed nvidia-cutlass.
#
#   OUT=/some/dir bash bench/gpu_check.sh [quick|tests]   # quick: build, tests, graph diagnosis,
#                                                        # GEMM sweeps; tests: build and tests only
#   TEST_GROUPS="sm90 graphs" ...                         # only these test groups
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moe_gpu_check}
MODE=${1:-full}
mkdir -p "$OUT"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MOE_BUILD_CUDA=1
export MOE_BUILD_SM90=1 MOE_EXPECT_SM90=1
if [ -z "${CUTLASS_INCLUDE_DIR:-}" ] && [ -f .cutlass/include/cute/tensor.hpp ]; then
  export CUTLASS_INCLUDE_DIR=$PWD/.cutlass/include
fi
export MOE_NVCC_FLAGS="-Xptxas -v"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build of moe
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

{ nvidia-smi; python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
  "$CUDA_HOME/bin/nvcc" --version; echo; } > "$OUT/build.log" 2>&1
note "env: $(python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name())' 2>&1 | tail -1)"

# 1. Build (in place; ptxas -v output lands in the build log).
t0=$(date +%s)
timeout 360 python3 setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
build_rc=$?
note "build: rc=$build_rc in $(( $(date +%s) - t0 ))s (log: build.log); $(python3 -c 'from moe import ops; print(ops.build_info())' 2>&1 | tail -1)"
python3 - "$OUT/build.log" > "$OUT/ptxas.txt" 2>&1 <<'EOF'
# Condenses ptxas -v output: one line per kernel and arch with registers, spills and shared memory.
import re, subprocess, sys
name, arch, spill = None, None, ""
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"Compiling entry function '(\S+)' for '(\S+)'", line)
    if m:
        name, arch = m.groups()
        continue
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m:
        spill = f"spill st/ld {m.group(1)}/{m.group(2)} B"
        continue
    m = re.search(r"Used (\d+) registers", line)
    if m and name:
        smem = re.search(r"(\d+) bytes smem", line)
        smem = smem.group(1) if smem else "0"
        try:
            pretty = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
        except OSError:
            pretty = name
        pretty = re.sub(r"\(anonymous namespace\)::|moe::cuda::", "", pretty)
        print(f"{arch} regs={m.group(1):>3} smem={smem:>6} B {spill:24s} {pretty[:150]}")
        name, spill = None, ""
EOF
if [ "$build_rc" -ne 0 ]; then
  tail -40 "$OUT/build.log"
  note "BUILD FAILED: see build.log"
  exit 1
fi

# 2. GPU tests, in groups run side by side in separate processes (a kernel fault poisons its
#    process's CUDA context; the other groups still report). A group that hits a CUDA error is
#    rerun under compute-sanitizer memcheck, stopping at the first failure.
t0=$(date +%s)
groups=${TEST_GROUPS:-"plan permute grouped_mm sm90 sm90_gathered layer opcheck routers topk_route activation graphs stream"}
for g in $groups; do
  case $g in
    routers) sel=(tests/routers/test_routers_common.py -m gpu) ;;
    topk_route) sel=(tests/gpu/test_gpu_router.py -m gpu) ;;
    activation) sel=(tests/gpu/test_gpu_activation.py -m gpu) ;;
    stream) sel=(tests/gpu/test_gpu_stream.py -m gpu) ;;
    graphs) sel=(tests/gpu/test_gpu_graphs.py -m gpu) ;;
    grouped_mm) sel=(tests/gpu/test_gpu.py -m gpu -k "grouped_mm and not sm90") ;;
    sm90) sel=(tests/gpu/test_gpu.py -m gpu -k "sm90 and not sm90_gathered" -v) ;;  # -v: names a crash's test
    sm90_gathered) sel=(tests/gpu/test_gpu.py -m gpu -k "sm90_gathered" -v) ;;  # the gathered sm90 GEMM, never run yet
    *) sel=(tests/gpu/test_gpu.py -m gpu -k "$g") ;;
  esac
  OMP_NUM_THREADS=2 timeout 200 python3 -X faulthandler -m pytest "${sel[@]}" -q -rfE -p no:cacheprovider \
    > "$OUT/test_$g.log" 2>&1 &
done
wait
test_rc=0
for g in $groups; do
  last=$(tail -1 "$OUT/test_$g.log")
  note "tests[$g]: $last"
  grep -qE "[0-9]+ passed" <<<"$last" && ! grep -qE "failed|error" <<<"$last" || test_rc=1
  grep -E "^(FAILED|ERROR)" "$OUT/test_$g.log" | head -8 | cut -c1-220 | tee -a "$SUMMARY"
  if grep -qiE "illegal (memory )?address|misaligned|CUDA error|device-side assert triggered" "$OUT/test_$g.log" \
      && [ "$g" != routers ] && [ "$g" != activation ] && [ "$g" != graphs ] \
      && command -v compute-sanitizer > /dev/null; then
    timeout 150 compute-sanitizer --tool memcheck --print-limit 10 python3 -m pytest tests/gpu/test_gpu.py \
      -m gpu -k "$g and not bad_" -x -q -p no:cacheprovider > "$OUT/memcheck_$g.log" 2>&1
    note "memcheck[$g]: rc=$? $(grep -m3 -E 'Invalid|ERROR SUMMARY' "$OUT/memcheck_$g.log" | tr '\n' ' ' | cut -c1-400)"
  fi
done
# moekit's gathered sm90 GEMMs have never run: on a CUDA error in their group, each case in a fresh
# process (which layouts, modes and sizes work)
if [ -f "$OUT/test_sm90_gathered.log" ] && grep -qiE "CUDA error|illegal|launch failure|unspecified" "$OUT/test_sm90_gathered.log"; then
  timeout 150 python3 bench/gpu_gathered_diag.py > "$OUT/gathered_diag.log" 2>&1
  note "gathered_diag: rc=$?"; sed 's/^/  /' "$OUT/gathered_diag.log" | cut -c1-200 | tee -a "$SUMMARY"
fi
note "tests: rc=$test_rc in $(( $(date +%s) - t0 ))s"
for g in $groups; do echo "=== $g"; cat "$OUT/test_$g.log"; rm "$OUT/test_$g.log"; done > "$OUT/test_gpu.log"
cat "$OUT"/memcheck_*.log >> "$OUT/test_gpu.log" 2>/dev/null; rm -f "$OUT"/memcheck_*.log

# 3. Timings (ratios vs F.grouped_mm, dense mm, a device-to-device copy and transformers' experts,
#    same run): the sm90 GEMM's configurations first, then the ops, the expert MLP and decode, the
#    layer. Each stage is cut short rather than run past the call's deadline (DEADLINE seconds).
t0=$(date +%s)
bench_rc=0
: > "$OUT/bench.log"
run_bench() {  # name time-limit command...
  local name=$1 limit=$2; shift 2
  local left=$(( ${DEADLINE:-560} - $(elapsed) ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then note "bench[$name]: skipped (the call's deadline is near)"; bench_rc=1; return; fi
  local s0; s0=$(date +%s)
  echo "== $name" >> "$OUT/bench.log"
  timeout "$limit" "$@" >> "$OUT/bench.log" 2>&1
  local rc=$?
  note "bench[$name]: rc=$rc in $(( $(date +%s) - s0 ))s"
  [ "$rc" -eq 0 ] || bench_rc=1
}
[ "$MODE" = tests ] && DEADLINE=0  # tests only: every bench stage is skipped
run_bench graph_diag 100 python3 bench/gpu_graph_diag.py
run_bench sweep 170 python3 bench/gpu_gemm_sweep.py --iters 20 --json "$OUT/part_sweep.json"
run_bench sweep_again 170 python3 bench/gpu_gemm_sweep.py --iters 20  # the run-to-run spread
run_bench sweep_decode 90 python3 bench/gpu_gemm_sweep.py --tokens 1 8 64 256 --proj up down --iters 20
if [ "$MODE" != quick ]; then
  run_bench layer 200 python3 bench/gpu_bench.py --only layer --json "$OUT/part_layer.json"
  run_bench mlp_decode 100 python3 bench/gpu_bench.py --only mlp decode --json "$OUT/part_mlp_decode.json"
  run_bench ops 100 python3 bench/gpu_bench.py --only ops --json "$OUT/part_ops.json"
  # last and alone: moekit's gathered sm90 GEMM has never run (a fault here loses nothing else)
  run_bench mlp_fused 80 python3 bench/gpu_bench.py --only mlp --fused --tokens 4096 --json "$OUT/part_mlp_fused.json"
fi
# One results.json (the call brings back at most 8 files).
python3 - "$OUT" <<'EOF2'
import glob, json, os, sys
out = sys.argv[1]
merged = {}
for path in sorted(glob.glob(os.path.join(out, "part_*.json"))):
    try:
        merged[os.path.basename(path)[5:-5]] = json.load(open(path))
    except Exception as err:  # noqa: BLE001
        merged[os.path.basename(path)] = f"unreadable: {err}"
    os.remove(path)
json.dump(merged, open(os.path.join(out, "results.json"), "w"), indent=1)
EOF2
note "bench: rc=$bench_rc in $(( $(date +%s) - t0 ))s (log: bench.log, results.json); call total $(elapsed)s"

echo
echo "== ptxas (regs / smem / spills), sm_90 =="
grep -E "^sm_90" "$OUT/ptxas.txt" | sort | uniq -c | sort -rn | cut -c1-170 | head -40
echo
echo "== summary =="
cat "$SUMMARY"
echo
echo "== timings =="
grep -E "^\| |^ceilings|^forward configs|^wgrad configs|^FAILED|: OK$|: FAILED|^    frame" "$OUT/bench.log" | grep -v "^|---"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
