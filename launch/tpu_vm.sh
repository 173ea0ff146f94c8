#!/usr/bin/env bash
# Cloud TPU VM slices: create/delete the slice, deploy this checkout to every worker, run the
# main job on all workers at once (JAX finds the other hosts itself), follow logs, stop.
#
#   launch/tpu_vm.sh create
#   launch/tpu_vm.sh deploy
#   launch/tpu_vm.sh run --config=configs/mode_gmm.py:imagenet256_xl --workdir=gs://BUCKET/xl
#   launch/tpu_vm.sh logs [WORKER]      (default worker 0; Ctrl-C stops following only)
#   launch/tpu_vm.sh stop               (SIGTERM: training saves a checkpoint, then exits)
#   launch/tpu_vm.sh exec 'COMMAND'     (any shell command on every worker)
#   launch/tpu_vm.sh delete
#
# Settings (environment): TPU_NAME (required), ZONE (required), PROJECT, ACCELERATOR
# (create; default v4-32), RUNTIME (create; default tpu-ubuntu2204-base), SPOT=1 (create a
# spot slice), REMOTE_DIR (default mmfm_jax, relative to the workers' home), PIP_EXTRA
# (deploy; default: "jax[tpu]==0.10.2 gcsfs==2026.10.1" for TPU and gs:// workdirs).
set -euo pipefail

usage() {
  sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

die() {
  echo "tpu_vm.sh: $*" >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
cmd=$1
shift
[[ -n ${TPU_NAME:-} ]] || die "set TPU_NAME (the slice name)"
[[ -n ${ZONE:-} ]] || die "set ZONE (e.g. us-central2-b)"
REMOTE_DIR=${REMOTE_DIR:-mmfm_jax}
PIP_EXTRA=${PIP_EXTRA:-"jax[tpu]==0.10.2 gcsfs==2026.10.1"}
LOG=mmfm.log
PIDFILE=mmfm.pid

common=(--zone "$ZONE")
if [[ -n ${PROJECT:-} ]]; then
  common+=(--project "$PROJECT")
fi

# Run one shell command line on the given workers (default: all).
on_workers() {
  local workers=$1 line=$2
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${common[@]}" --worker="$workers" \
    --command "$line"
}

# The arguments as one shell-quoted string that the workers' shell splits back exactly.
quote_args() {
  local out=""
  if [[ $# -gt 0 ]]; then
    printf -v out '%q ' "$@"
  fi
  printf '%s' "${out% }"
}

case $cmd in
  create)
    extra=()
    if [[ ${SPOT:-0} == 1 ]]; then
      extra+=(--spot)
    fi
    gcloud compute tpus tpu-vm create "$TPU_NAME" "${common[@]}" \
      --accelerator-type "${ACCELERATOR:-v4-32}" --version "${RUNTIME:-tpu-ubuntu2204-base}" \
      "${extra[@]}" "$@"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" "${common[@]}" --quiet "$@"
    ;;
  deploy)
    repo=$(cd "$(dirname "$0")/.." && pwd)
    tarball=$(mktemp -d)/mmfm_jax.tgz
    tar -czf "$tarball" -C "$repo" --exclude=./.venv --exclude=./.git --exclude=./workdir \
      --exclude='*/__pycache__' .
    gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:mmfm_jax.tgz" "${common[@]}" \
      --worker=all
    dir=$(quote_args "$REMOTE_DIR")
    pip_line=""
    if [[ -n $PIP_EXTRA ]]; then
      read -r -a pip_extra <<<"$PIP_EXTRA"
      pip_line="&& .venv/bin/pip install --quiet $(quote_args "${pip_extra[@]}")"
    fi
    on_workers all "mkdir -p $dir && tar -xzf mmfm_jax.tgz -C $dir && cd $dir \
&& { test -x .venv/bin/python || python3 -m venv .venv; } \
&& .venv/bin/pip install --quiet -r requirements.txt $pip_line"
    rm -f "$tarball"
    ;;
  run)
    [[ $# -ge 1 ]] || die "run needs the main job's flags, e.g. --config=configs/mode_gmm.py"
    args=$(quote_args "$@")
    dir=$(quote_args "$REMOTE_DIR")
    # MMFM_DISTRIBUTED=auto: jax.distributed finds the slice's workers from TPU metadata.
    on_workers all "cd $dir && { MMFM_DISTRIBUTED=auto setsid nohup .venv/bin/python \
-m mmfm_jax.main $args \
> $LOG 2>&1 < /dev/null & echo \$! > $PIDFILE; }"
    echo "started on every worker of $TPU_NAME; follow with: $0 logs"
    ;;
  logs)
    dir=$(quote_args "$REMOTE_DIR")
    on_workers "${1:-0}" "tail -n 200 -F $dir/$LOG"
    ;;
  stop)
    dir=$(quote_args "$REMOTE_DIR")
    on_workers all "test -f $dir/$PIDFILE && kill -TERM -- -\$(cat $dir/$PIDFILE) || true"
    ;;
  exec)
    [[ $# -eq 1 ]] || die "exec takes one quoted command line"
    on_workers all "$1"
    ;;
  *)
    usage
    ;;
esac
