#!/usr/bin/env bash
# The one prepared script for a lent GPU: self-check, kernel-role timings vs cuDNN, and the
# test suite on CUDA, each stage time-boxed so the whole run ends well inside 10 minutes.
# Runs with the image's python3 and no installs:
#     OUT=/some/dir FUSEDRES_COMMIT=$(git rev-parse --short HEAD) bash scripts/gpu_check.sh
# Everything lands under $OUT: env.txt, selfcheck.txt, layers.*, blocks.*, pytest.txt.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT to the results directory}
mkdir -p "$OUT"
status=0

{
  nvidia-smi -L
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'
  echo "commit ${FUSEDRES_COMMIT:-unknown}"
} 2>&1 | tee "$OUT/env.txt"

echo "== self-check"
timeout 150 python3 -m fusedres 2>&1 | tee "$OUT/selfcheck.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== kernel roles vs cuDNN"
timeout 170 python3 benchmarks/layers.py --out "$OUT" 2>&1 | tee "$OUT/layers.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== pre-activation blocks: training step and peak memory vs eager"
timeout 150 python3 benchmarks/blocks.py --out "$OUT" 2>&1 | tee "$OUT/blocks.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== tests on CUDA"
# The offline-compile test is CPU work that CI already does; skip it here to save device time.
timeout 200 python3 -m pytest tests -q -x -n 12 --deselect tests/test_offline_compile.py 2>&1 \
  | tee "$OUT/pytest.txt" | tail -n 30
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "gpu_check status $status"
exit $status
