#!/usr/bin/env bash
# Multi-node GPU runs without a scheduler: start this on every node with its rank.
#
#   # on node 0 (its address is the coordinator) and, with NODE_RANK=1, on node 1:
#   NODE_RANK=0 NUM_NODES=2 COORDINATOR=10.0.0.1:29500 launch/gpu_multinode.sh \
#       --config=configs/mode_gmm.py:imagenet256_xl --workdir=/shared/runs/xl
#
# One JAX process per node uses all of its GPUs. PYTHON defaults to the checkout's .venv.
set -euo pipefail

for var in NODE_RANK NUM_NODES COORDINATOR; do
  if [[ -z ${!var:-} ]]; then
    echo "gpu_multinode.sh: set $var (NODE_RANK=0..NUM_NODES-1, NUM_NODES, COORDINATOR=host:port)" >&2
    exit 2
  fi
done
if ! [[ $NODE_RANK =~ ^[0-9]+$ && $NUM_NODES =~ ^[0-9]+$ ]] || ((NODE_RANK >= NUM_NODES)); then
  echo "gpu_multinode.sh: NODE_RANK=$NODE_RANK must be an integer below NUM_NODES=$NUM_NODES" >&2
  exit 2
fi
repo=$(cd "$(dirname "$0")/.." && pwd)
export MMFM_COORDINATOR=$COORDINATOR MMFM_NUM_PROCESSES=$NUM_NODES MMFM_PROCESS_ID=$NODE_RANK
cd "$repo"
exec "${PYTHON:-$repo/.venv/bin/python}" -m mmfm_jax.main "$@"
