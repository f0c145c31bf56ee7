#!/usr/bin/env bash
# One prepared call for a machine with a GPU (issue 8): build moe._C with the CUDA kernels in
# place, run the GPU tests, time the ops and the layer, and print a short table last. Full logs go
# to $OUT (default /tmp/moe_gpu_check; at most 8 files). Needs python3 with torch, pytest,
# transformers and nvcc (CUDA_HOME); installs nothing. Took 120-142 s of command time per call on
# an H200 machine with 16 cores (build ~55 s, tests ~21 s, timings ~75 s; bench/RESULTS_H200.md).
#
#   OUT=/some/dir bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moe_gpu_check}
mkdir -p "$OUT"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MOE_BUILD_CUDA=1
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
python3 setup.py build_ext --inplace >> "$OUT/build.log" 2>&1
build_rc=$?
note "build: rc=$build_rc in $(( $(date +%s) - t0 ))s (log: build.log)"
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
groups="plan permute grouped_mm layer opcheck routers"
for g in $groups; do
  if [ "$g" = routers ]; then sel=(tests/test_routers_common.py -m gpu); else sel=(tests/test_gpu.py -m gpu -k "$g"); fi
  OMP_NUM_THREADS=2 timeout 200 python3 -m pytest "${sel[@]}" -q -rfE -p no:cacheprovider \
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
      && [ "$g" != routers ] && command -v compute-sanitizer > /dev/null; then
    timeout 150 compute-sanitizer --tool memcheck --print-limit 10 python3 -m pytest tests/test_gpu.py \
      -m gpu -k "$g and not bad_id" -x -q -p no:cacheprovider > "$OUT/memcheck_$g.log" 2>&1
    note "memcheck[$g]: rc=$? $(grep -m3 -E 'Invalid|ERROR SUMMARY' "$OUT/memcheck_$g.log" | tr '\n' ' ' | cut -c1-400)"
  fi
done
note "tests: rc=$test_rc in $(( $(date +%s) - t0 ))s"
for g in $groups; do echo "=== $g"; cat "$OUT/test_$g.log"; rm "$OUT/test_$g.log"; done > "$OUT/test_gpu.log"
cat "$OUT"/memcheck_*.log >> "$OUT/test_gpu.log" 2>/dev/null; rm -f "$OUT"/memcheck_*.log

# 3. Timings (ratios vs F.grouped_mm, dense mm, a device-to-device copy and transformers' experts,
#    same run), the ops first, then the layer.
t0=$(date +%s)
timeout 150 python3 bench/gpu_bench.py --only ops --json "$OUT/bench_ops.json" > "$OUT/bench.log" 2>&1
bench_rc=$?
timeout 180 python3 bench/gpu_bench.py --only layer --json "$OUT/bench_layer.json" >> "$OUT/bench.log" 2>&1
layer_rc=$?
# The ops again: the same version timed twice shows the run-to-run spread (METHOD: a difference
# smaller than that is noise).
echo "== ops, second run" >> "$OUT/bench.log"
timeout 120 python3 bench/gpu_bench.py --only ops >> "$OUT/bench.log" 2>&1
note "bench: rc=$bench_rc/$layer_rc in $(( $(date +%s) - t0 ))s (log: bench.log, bench_*.json)"

echo
echo "== ptxas (regs / smem / spills), sm_90 =="
grep -E "^sm_90" "$OUT/ptxas.txt" | cut -c1-160
echo
echo "== summary =="
cat "$SUMMARY"
echo
echo "== timings =="
grep -E "^\| " "$OUT/bench.log" | grep -v "^| op \|^|---" 
grep -E "failed|Error" "$OUT/bench.log" | head -5
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$layer_rc" -eq 0 ]
