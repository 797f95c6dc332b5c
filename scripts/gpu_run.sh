#!/usr/bin/env bash
# Everything the GPU machine does in one call: unpack the carried optional packages, print the
# versions, run the GPU tests and/or the benchmark, and leave logs and results under $OUT.
#   scripts/gpu_run.sh "[tests] [tune] [bench] [model] | all" [extra pytest args...]
# Several steps in one call run in that order (scripts/gpu_run.sh "tests tune"). Environment:
# TUNE_BUDGET_S / TUNE_ARGS (scripts/tune_kernels.py), BENCH_TIMEOUT_S (each benchmark run),
# BENCH_PAGES (the page sizes to bench, default "16 256"), BENCH_ARGS (added to each bench run,
# e.g. "--rounds 3"), MODEL_ARGS (compiled-attn bench-model).
# bench: pages of 16 (our kernels, fp8 too) and of 256 (where flash-attn and xFormers can join).
# xformers 0.0.35's extension does not load under this torch; its Triton kernels still run once
# the package is told CUDA works -- done here, in the harness, never in the library.
set -uo pipefail
what=${1:-all}; shift || true
OUT=${OUT:-out}; mkdir -p "$OUT" /tmp/site
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
for tarball in .gpu/flash_attn-*.tar.xz; do
  [ -f "$tarball" ] && python3 -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall('/tmp/site')" "$tarball"
done
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for name in ("triton", "flash_attn", "xformers", "transformers", "onnxruntime"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:
        print(name, "unavailable:", type(err).__name__, err)
import compiled_attn as ca
for name, state in ca.available_backends(device="cuda", dtype=torch.bfloat16).items():
    print(f"  backend {name}: {state}")
PY
status=0
wants() { [ "$what" = all ] || [[ " $what " == *" $1 "* ]]; }
if wants tests; then
  python3 -m pytest tests -m gpu -q -rs --durations=15 "$@" 2>&1 | tee "$OUT/gpu_tests.log" || status=1
fi
if wants tune; then
  python3 scripts/tune_kernels.py --json "$OUT/tune.json" --budget-s "${TUNE_BUDGET_S:-240}" ${TUNE_ARGS:-} 2>&1 | tee "$OUT/tune.log" || status=1
fi
if wants bench; then
  # BENCH_TIMEOUT_S bounds each run (0 = none); rows are saved after every case.
  pages=" ${BENCH_PAGES:-16 256} "
  for page in $pages; do
    [[ "$page" == 16 || "$page" == 256 ]] || { echo "BENCH_PAGES: '$page' is not 16 or 256" >&2; exit 2; }
  done
  if [[ "$pages" == *" 16 "* ]]; then
    timeout "${BENCH_TIMEOUT_S:-0}" python3 -m compiled_attn bench --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 \
      | tee "$OUT/bench.log" || status=1
  fi
  if [[ "$pages" == *" 256 "* ]]; then
    timeout "${BENCH_TIMEOUT_S:-0}" python3 - "$OUT/bench_page256.json" ${BENCH_ARGS:-} <<'PY' 2>&1 | tee "$OUT/bench_page256.log" || status=1
import sys
try:
    import xformers.ops.fmha.common as common
    common._built_with_cuda = True
except ImportError:
    pass
from compiled_attn.cli import main
sys.exit(main(["bench", "--block-size", "256", "--no-fp8", "--no-flex", "--json", *sys.argv[1:]]))
PY
  fi
fi
if wants model; then
  timeout "${BENCH_TIMEOUT_S:-0}" python3 -m compiled_attn bench-model --json "$OUT/bench_model.json" ${MODEL_ARGS:-} 2>&1 | tee "$OUT/bench_model.log" || status=1
fi
exit $status
