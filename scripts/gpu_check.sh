#!/usr/bin/env bash
# The one prepared script for a lent GPU: self-check, the benchmark suite, and the test suite on
# CUDA, each stage time-boxed so that one call ends inside 10 minutes. Image python3, no installs:
#     OUT=/some/dir FUSEDRES_COMMIT=$(git rev-parse --short HEAD) bash scripts/gpu_check.sh [--full PART]
# Without arguments the benchmark stage is the --quick subset; --full PART runs one part of the
# full suite (layers | blocks-bf16 | blocks-fp16 | blocks-tf32 | networks) and skips the tests.
# Everything lands under $OUT: env.txt, selfcheck.txt, bench/<card>/run-*.json, bench.txt, pytest.txt.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to the results directory}
mkdir -p "$OUT/bench"
status=0
part=""
if [ "${1:-}" = "--full" ]; then
  part=${2:?--full needs a part: layers, blocks-bf16, blocks-fp16, blocks-tf32 or networks}
fi

{
  nvidia-smi -L
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'
  echo "commit ${FUSEDRES_COMMIT:-unknown}"
} 2>&1 | tee "$OUT/env.txt"

if [ -z "$part" ]; then
  echo "== self-check"
  timeout 120 python3 -m fusedres 2>&1 | tee "$OUT/selfcheck.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

echo "== benchmarks ${part:-quick}"
# No -n here: with xdist active pytest-benchmark switches itself off.
case "$part" in
  "") sel=(benchmarks/ --quick); limit=330 ;;
  layers) sel=(benchmarks/test_bench_layers.py); limit=540 ;;
  blocks-bf16) sel=(benchmarks/test_bench_blocks.py -k bf16); limit=540 ;;
  blocks-fp16) sel=(benchmarks/test_bench_blocks.py -k fp16); limit=540 ;;
  blocks-tf32) sel=(benchmarks/test_bench_blocks.py -k tf32); limit=540 ;;
  networks) sel=(benchmarks/test_bench_networks.py); limit=540 ;;
  *) echo "unknown part $part"; exit 2 ;;
esac
timeout "$limit" python3 -m pytest "${sel[@]}" --benchmark-only -q --results-dir "$OUT/bench" 2>&1 \
  | tee "$OUT/bench.txt" | tail -n 60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ -z "$part" ]; then
  echo "== tests on CUDA"
  # The offline-compile test is CPU work that CI already does; skip it here to save device time.
  timeout 150 python3 -m pytest tests -q -x -n 12 --deselect tests/test_offline_compile.py 2>&1 \
    | tee "$OUT/pytest.txt" | tail -n 30
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi

echo "gpu_check status $status"
exit $status
