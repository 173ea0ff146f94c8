#!/usr/bin/env bash
# One-shot benchmark set for one lent GPU (an H100), bounded to about 9 minutes in all.
#
#   bash launch/bench_gpu.sh [OUT_DIR]      (default: $OUT, else ./bench_out)
#
# Writes one JSON per benchmark (python -m mmfm_jax.bench ... --json), bench_gpu.log,
# nvidia-smi.txt and summary.md (the README table) under OUT_DIR. Uses $PYTHON when set,
# else the venv at $VENV (default /tmp/mmfm-bench-venv), created from requirements.txt plus
# jax[cuda12] when missing. Commands run in order of importance, each under `timeout`
# capped by what is left of BENCH_BUDGET_S; one that fails or times out is logged and the
# rest still run. Run from anywhere: it changes to the repository root.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
OUT_DIR=${1:-${OUT:-bench_out}}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/bench_gpu.log"
BUDGET=${BENCH_BUDGET_S:-510}
VENV=${VENV:-/tmp/mmfm-bench-venv}
START=$SECONDS
FAILED=0

log() { echo "[$((SECONDS - START))s] $*" | tee -a "$LOG"; }

# run NAME LIMIT_S CMD...: CMD under min(LIMIT_S, budget left); output to the log.
run() {
  local name=$1 limit=$2 left rc
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  if ((left < 45)); then
    log "skip $name: ${left}s of the budget left"
    return 0
  fi
  ((limit > left)) && limit=$left
  log "start $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  if ((rc == 0)); then
    log "done $name"
  else
    log "FAILED $name (rc $rc$( ((rc == 124)) && echo ', timed out'))"
    FAILED=$((FAILED + 1))
  fi
}

nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1 || log "nvidia-smi unavailable"

if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
else
  if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    timeout 60 python3 -m venv "$VENV" >>"$LOG" 2>&1 || { log "venv creation failed"; exit 1; }
    run pip_install 270 "$VENV/bin/pip" install --quiet -r requirements.txt "jax[cuda12]==0.10.2"
  fi
  PY=$VENV/bin/python
fi
if ! "$PY" -c 'import jax; assert jax.default_backend() == "gpu", jax.devices()' >>"$LOG" 2>&1
then
  log "no GPU backend in $PY; see $LOG"
  exit 1
fi

BENCH=("$PY" -m mmfm_jax.bench)
XL=(--size XL --dtype bfloat16 --attention cudnn --scan)  # the autocast-like bf16 policy, scanned blocks
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}

# 1. DiTDH-XL train step at the largest batch that fits (XLA memory analysis of a probe).
run train_xl_auto 190 "${BENCH[@]}" train "${XL[@]}" --batch auto --probe-batch 32 \
  --steps 5 --json "$OUT_DIR/train_xl_auto.json"
# 2. Same step against the PyTorch reference (CUDA, bf16 autocast, fused SDPA), batch 32.
run train_xl_vs_torch 150 "${BENCH[@]}" train "${XL[@]}" --batch 32 --steps 3 --vs-torch \
  --json "$OUT_DIR/train_xl_vs_torch.json"
# 3. 50-point sampling, plain and with the DiTDH-S autoguide, against the reference.
run sample_xl 150 "${BENCH[@]}" sample "${XL[@]}" --batch 128 --warmup 0 --steps 1 \
  --vs-torch --no-flops-check --json "$OUT_DIR/sample_xl.json"
# 4. GMM EM at MM-FM's size (K = 8192, D = 768).
run gmm_k8192 90 "${BENCH[@]}" gmm --n 131072 --k 8192 --d 768 --steps 3 \
  --json "$OUT_DIR/gmm_k8192.json"
# 5. FID Inception features per second.
run inception 60 "${BENCH[@]}" inception --batch 200 --steps 5 \
  --json "$OUT_DIR/inception.json"
# 6. Speed options, one at a time against run 2's configuration (batch 32, cudnn, bf16).
run train_xl_attn_xla 75 "${BENCH[@]}" train --size XL --dtype bfloat16 --attention xla \
  --batch 32 --steps 3 --json "$OUT_DIR/train_xl_attn_xla.json"
run train_xl_remat 75 "${BENCH[@]}" train "${XL[@]}" --batch 32 --steps 3 --remat \
  --json "$OUT_DIR/train_xl_remat.json"
run train_xl_no_donate 75 "${BENCH[@]}" train "${XL[@]}" --batch 32 --steps 3 --no-donate \
  --json "$OUT_DIR/train_xl_no_donate.json"

"$PY" -m mmfm_jax.bench report "$OUT_DIR"/*.json >"$OUT_DIR/summary.md" 2>>"$LOG" \
  || log "report failed"
log "finished: $FAILED failed, $((SECONDS - START))s"
cat "$OUT_DIR/summary.md" 2>/dev/null
exit $((FAILED > 0))
