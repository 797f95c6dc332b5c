#!/usr/bin/env bash
# Nsight Compute over one benchmark case: throughput, memory, occupancy, launch and warp-stall
# sections of each kernel a contender launches (eager calls, after warm-up ones; clocks as they are).
#   scripts/ncu_case.sh OUT.txt "decode 1x4096" [profile_case.py args: --kv fp8 --contender NAME ...]
# Kernels profiled: NCU_KERNELS (a regex, default every kernel), NCU_SKIP launches skipped first
# (default 6), NCU_COUNT profiled (default 3).
set -euo pipefail
report=$1; case=$2; shift 2
filter=()
[ -n "${NCU_KERNELS:-}" ] && filter=(-k "regex:${NCU_KERNELS}")
ncu --clock-control none "${filter[@]}" --launch-skip "${NCU_SKIP:-6}" --launch-count "${NCU_COUNT:-3}" \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
  --section WarpStateStats --section SchedulerStats \
  python3 scripts/profile_case.py --case "$case" --eager-calls 12 "$@" > "$report" 2>&1
