#!/usr/bin/env bash
# Distributed training with torchrun: one process per GPU, or per CPU worker on
# machines without a GPU (tools/train.py then switches to the gloo backend,
# plain BN and a device-less DDP wrapper).
#
# Usage: tools/dist_train.sh CONFIG NUM_PROCS [train.py options...]
#   NNODES, NODE_RANK, MASTER_ADDR, PORT select multi-node runs.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 CONFIG NUM_PROCS [tools/train.py options...]" >&2
    exit 2
fi
CONFIG=$1
NPROCS=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
PYTHON=${PYTHON:-python}
TOOLS="$(cd "$(dirname "$0")" && pwd)"

PYTHONPATH="$TOOLS/..${PYTHONPATH:+:$PYTHONPATH}" \
"$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --master_port="$PORT" \
    --nproc_per_node="$NPROCS" \
    "$TOOLS/train.py" "$CONFIG" --launcher pytorch "${@:3}"
