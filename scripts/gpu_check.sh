#!/usr/bin/env bash
# The one prepared script for a lent GPU: the benchmark suite, a training run, and the test suite
# and self-check on CUDA, each stage time-boxed so that the whole script ends inside its budget
# (GPU_CHECK_BUDGET_S, default 560 s). Image python3, no installs:
#     OUT=/some/dir FUSEDRES_COMMIT=$(git rev-parse --short HEAD) bash scripts/gpu_check.sh [--full PART]
# Without arguments (quick), in this order, most important first:
#   env          nvidia-smi, versions                                   -> head of stages.txt
#   ticket-stress tests/test_ticket.py's CUDA stress test: the last-program reductions (atomic
#                ticket) against the two-launch path bit for bit, 200 repeats, large grids -> pytest.txt
#   bench-core   the --quick benchmark subset without torch.compile     -> bench.txt, bench/<card>/run-*.json
#                (7 bf16 block training steps, CIFAR bottlenecks first; CUDA-graph steps of the 3
#                CIFAR bottleneck blocks; 25 kernel-role rows; ResNet-164 step — in that order)
#   host-profile scripts/host_profile.py: a CIFAR bottleneck step launched with Triton's launch
#                path and with FUSEDRES_FAST_LAUNCH's direct one, both routes, eager beside them,
#                a cProfile of each (where the ~110 us per launch go)  -> train.txt
#   kernel-profile scripts/kernel_profile.py: torch.profiler per-kernel GPU time of the 64/16
#                bottleneck and the 64ch 56^2 basic block, eager and fused on each route -> train.txt
#   hopper       scripts/hopper_fprop_bench.py 20 all: the sm_90 engine's fprop, stride-1 dgrad and
#                wgrad (fused and plain) against the pointer engine (same results, MISMATCH fails the
#                stage; wgrad bitwise run to run) and the cuDNN route at the DESIGN §5 and CIFAR
#                shapes                                                -> train.txt
#   train-fused  fusedres train, ResNet-164, 50 steps, --fused (issue #6) -> train.txt (appended)
#   train-eager  the same with --eager                                  -> train.txt (appended)
#   bench-compile  the quick blocks/networks again with the torch.compile column, each compilation
#                capped at FUSEDRES_BENCH_COMPILE_CAP_S (default 75 s); it gets the time the other
#                stages leave, and being cut short is expected (rows measured so far are kept)
#                                                                -> bench.txt (appended), bench/<card>/run-*.json
#   tests        pytest tests on CUDA (12 xdist workers, --dist loadgroup): the suite, the CUDA-only
#                files (tests/test_cuda_semantics.py: NaN/Inf positions on both routes, fp16 GradScaler
#                parity; tests/test_cuda_large.py: every kernel role past 2**31 elements, ~30 GB,
#                kept on one worker by its xdist_group) and the fuzz's CI profile -> pytest.txt
#   selfcheck    python3 -m fusedres check, beside the tests (both only check correctness, and the
#                tests leave 4 of the 16 cores free; with a cold Triton cache it took 137 s on the
#                H200, too long to run alone; plain `python3 -m fusedres` adds a torch.compile bench)
#                                                                       -> selfcheck.txt
# benchmarks/report.py keeps the newest row per case, so bench-compile's rows (with the compile
# column) replace bench-core's where it got that far, and bench-core's stay for the rest.
# --full PART runs one part of the full suite (layers | blocks-bf16 | blocks-fp16 | blocks-tf32 |
# networks | graphs), compile column included, and nothing else.
#
# Every stage runs under `timeout -k 20 -s INT LIMIT`: SIGINT is a KeyboardInterrupt, so pytest
# still finishes its session; the run file is rewritten after every row anyway, so even the KILL
# 20 s later loses nothing measured. LIMIT = min(the stage's cap, the time left minus the seconds
# promised to the later stages minus the 20 s), so the stages never sum past the budget.
# A failed stage does not stop the later ones; the exit status is 1 if any stage failed
# (bench-compile or the self-check being cut at its limit is not a failure), and stages.txt
# lists every stage with its time, limit and verdict.
#
# Seven files at most (stages.txt, bench.txt, train.txt, pytest.txt, selfcheck.txt and the two run
# files): a lent machine sends back at most 8 files from $OUT, so stages that run one after the
# other append to one log, each part headed by its "== stage" line.
set -u
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# inductor compiles its Triton kernels in a pool of worker processes: one per core (16 on the lent machines)
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}
OUT=${OUT:?set OUT to the results directory}
mkdir -p "$OUT/bench"
BUDGET=${GPU_CHECK_BUDGET_S:-560}
GRACE=20
START=$SECONDS
status=0
part=""
if [ "${1:-}" = "--full" ]; then
  part=${2:?--full needs a part: layers, blocks-bf16, blocks-fp16, blocks-tf32, networks or graphs}
fi
: > "$OUT/stages.txt"
rm -f "$OUT/bench.txt" "$OUT/train.txt" "$OUT/pytest.txt" "$OUT/selfcheck.txt"  # the stages append to them

# stage NAME CAP RESERVE LOG [--may-time-out] CMD...: run CMD with stdout+stderr to LOG (its tail on
# the terminal) under a limit of min(CAP, time left - RESERVE - GRACE); RESERVE = seconds promised
# to the stages after this one.
stage() {
  local name=$1 cap=$2 reserve=$3 log=$4 may_time_out=0
  shift 4
  if [ "$1" = "--may-time-out" ]; then may_time_out=1; shift; fi
  local left=$(( BUDGET - (SECONDS - START) - reserve - GRACE ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 15 ]; then
    printf '%-14s skipped: %d s left for it\n' "$name" "$left" | tee -a "$OUT/stages.txt"
    [ "$may_time_out" -eq 1 ] || status=1
    return
  fi
  echo "== $name (limit ${limit} s, $(( SECONDS - START )) s in)" | tee -a "$log"
  local t0=$SECONDS
  timeout -k "$GRACE" -s INT "$limit" "$@" 2>&1 | tee -a "$log" | tail -n 40
  local rc=${PIPESTATUS[0]}
  local verdict=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    verdict="cut at its ${limit} s limit (rc $rc)"
    [ "$may_time_out" -eq 1 ] || status=1
  elif [ "$rc" -ne 0 ]; then
    verdict="FAILED (rc $rc)"
    status=1
  fi
  printf '%-14s %4d s of %4d s  %s\n' "$name" $(( SECONDS - t0 )) "$limit" "$verdict" | tee -a "$OUT/stages.txt"
}

# bg_stage NAME CAP RESERVE LOG CMD...: like `stage ... --may-time-out`, in the background (output
# only to LOG); bg_wait waits for it and reports it.
bg_stage() {
  local name=$1 cap=$2 reserve=$3 log=$4
  shift 4
  local left=$(( BUDGET - (SECONDS - START) - reserve - GRACE ))
  BG_NAME=$name BG_LOG=$log BG_LIMIT=$(( cap < left ? cap : left )) BG_T0=$SECONDS BG_PID=""
  if [ "$BG_LIMIT" -lt 15 ]; then
    printf '%-14s skipped: %d s left for it\n' "$name" "$left" | tee -a "$OUT/stages.txt"
    return
  fi
  echo "== $name (limit ${BG_LIMIT} s, $(( SECONDS - START )) s in, in the background)"
  ( timeout -k "$GRACE" -s INT "$BG_LIMIT" "$@" > "$log" 2>&1; echo $? > "$OUT/.$name.rc" ) &
  BG_PID=$!
}

bg_wait() {
  [ -n "$BG_PID" ] || return 0
  wait "$BG_PID"
  local rc verdict=ok
  rc=$(cat "$OUT/.$BG_NAME.rc" 2>/dev/null || echo 255)
  rm -f "$OUT/.$BG_NAME.rc"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    verdict="cut at its ${BG_LIMIT} s limit (rc $rc)"
  elif [ "$rc" -ne 0 ]; then
    verdict="FAILED (rc $rc)"
    status=1
  fi
  echo "== $BG_NAME (tail)"
  tail -n 8 "$BG_LOG"
  printf '%-14s %4d s of %4d s  %s\n' "$BG_NAME" $(( SECONDS - BG_T0 )) "$BG_LIMIT" "$verdict" | tee -a "$OUT/stages.txt"
}

{
  timeout 30 nvidia-smi -L
  timeout 60 python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'
  echo "commit ${FUSEDRES_COMMIT:-unknown}, TORCHINDUCTOR_COMPILE_THREADS=$TORCHINDUCTOR_COMPILE_THREADS, nproc $(nproc)"
} 2>&1 | tee -a "$OUT/stages.txt"

bench=(python3 -m pytest --benchmark-only -q -p no:cacheprovider --results-dir "$OUT/bench")
if [ -n "$part" ]; then
  # No -n here: with xdist active pytest-benchmark switches itself off.
  case "$part" in
    layers) sel=(benchmarks/test_bench_layers.py) ;;
    blocks-bf16) sel=(benchmarks/test_bench_blocks.py -k "test_block and bf16 and not graph") ;;
    blocks-fp16) sel=(benchmarks/test_bench_blocks.py -k fp16) ;;
    blocks-tf32) sel=(benchmarks/test_bench_blocks.py -k tf32) ;;
    networks) sel=(benchmarks/test_bench_networks.py -k "not graph") ;;
    graphs) sel=(benchmarks/ -k graph) ;;
    *) echo "unknown part $part"; exit 2 ;;
  esac
  FUSEDRES_BENCH_COMPILE_CAP_S=${FUSEDRES_BENCH_COMPILE_CAP_S:-150} \
    stage "bench-$part" 540 0 "$OUT/bench.txt" "${bench[@]}" "${sel[@]}"
  echo "gpu_check status $status"
  exit $status
fi

# Seconds promised to each stage by the ones before it (its limit is at least this minus the 20 s grace).
# (All of them sum to ~430 s of the 560: bench-core, the launched and graphed block steps, gets what
# the ticket stress test leaves of the rest, ~110-140 s.)
MIN_HOST=40 MIN_KERNELS=40 MIN_HOPPER=90 MIN_TRAIN_FUSED=50 MIN_TRAIN_EAGER=30 MIN_TESTS=120
AFTER_BENCH=$(( MIN_HOST + MIN_KERNELS + MIN_HOPPER + MIN_TRAIN_FUSED + MIN_TRAIN_EAGER + MIN_TESTS ))

# First, what every figure after it relies on: the atomic-ticket reductions against the two-launch
# path bit for bit on real concurrency (tests/test_ticket.py's CUDA stress test; the interpreter
# runs programs one at a time and cannot show a memory-ordering fault).
stage ticket-stress 45 $(( AFTER_BENCH + 100 )) "$OUT/pytest.txt" \
  python3 -m pytest tests/test_ticket.py -q -p no:cacheprovider -k cuda

FUSEDRES_BENCH_COMPILE=0 \
  stage bench-core 300 "$AFTER_BENCH" "$OUT/bench.txt" "${bench[@]}" benchmarks/ --quick

# Where a launched fused step's host time goes, and the direct launch path against Triton's (NOTES log 4-5).
stage host-profile 60 $(( AFTER_BENCH - MIN_HOST )) "$OUT/train.txt" \
  python3 scripts/host_profile.py 20
# Where a step's GPU time goes: per-kernel times, fused (each route) and eager (NOTES §4 item 1a).
stage kernel-profile 60 $(( AFTER_BENCH - MIN_HOST - MIN_KERNELS )) "$OUT/train.txt" \
  python3 scripts/kernel_profile.py 5
# The sm_90 engine (issue #12): fprop, stride-1 dgrad and wgrad against the pointer engine (same
# results: MISMATCH fails the stage) and cuDNN, NOTES §3. 20 repetitions each.
stage hopper 120 $(( MIN_TRAIN_FUSED + MIN_TRAIN_EAGER + MIN_TESTS )) "$OUT/train.txt" \
  python3 scripts/hopper_fprop_bench.py 20 all

train=(python3 -m fusedres train --synthetic --steps 50 --depth 164 --batch-size 128 --channels-last --amp)
stage train-fused 80 $(( MIN_TRAIN_EAGER + MIN_TESTS )) "$OUT/train.txt" "${train[@]}" --fused
stage train-eager 60 "$MIN_TESTS" "$OUT/train.txt" "${train[@]}" --eager

FUSEDRES_BENCH_COMPILE=1 FUSEDRES_BENCH_COMPILE_CAP_S=${FUSEDRES_BENCH_COMPILE_CAP_S:-75} \
  stage bench-compile 600 "$MIN_TESTS" "$OUT/bench.txt" --may-time-out \
  "${bench[@]}" benchmarks/test_bench_blocks.py benchmarks/test_bench_networks.py --quick

# The self-check beside the tests; one inductor compile thread per process (12 xdist workers x 16
# compile processes would swamp 16 cores). The offline-compile test is CPU work that CI already
# does; skip it here to save device time.
export TORCHINDUCTOR_COMPILE_THREADS=1
bg_stage selfcheck 160 0 "$OUT/selfcheck.txt" python3 -m fusedres check
stage tests 160 0 "$OUT/pytest.txt" python3 -m pytest tests -q -n 12 --dist loadgroup --durations=20 -p no:cacheprovider \
  --deselect tests/test_offline_compile.py
bg_wait

echo "== summary ($(( SECONDS - START )) s of $BUDGET s)"
cat "$OUT/stages.txt"
grep '^train:' "$OUT/train.txt" 2>/dev/null || echo "no train: lines in $OUT/train.txt"
ls "$OUT"/bench/*/run-*.json 2>/dev/null
echo "gpu_check status $status"
exit $status
