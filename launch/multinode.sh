#!/usr/bin/env bash
# Several nodes: run this on every node. The nodes meet at HEAD:PORT (c10d rendezvous)
# and torchrun starts NPROC workers on each. Only global rank 0 writes shared files, so
# --out must be on a file system every node sees.
#
#   # on each of 2 nodes (node0 is any one of them):
#   bash launch/multinode.sh --head node0 --nnodes 2 --rdzv-id job42 -- --epochs 10 --out /shared/runs/x
#   HEAD=node0 NNODES=2 RDZV_ID=job42 bash launch/multinode.sh --epochs 10 --out /shared/runs/x
#   # elastic: start with 1 node, admit up to 4 as they come
#   HEAD=node0 NNODES=1:4 bash launch/multinode.sh
#
# Flag           Variable      Default                Meaning
# --head H       HEAD          (required)             address of the rendezvous host, reachable from every node
# --port P       PORT          29500                  its TCP port
# --nnodes N     NNODES        2                      nodes, or MIN:MAX for an elastic job
# --nproc N      NPROC         GPUs here, or 2 (CPU)  worker processes per node
# --rdzv-id ID   RDZV_ID       ddp-job                job id, identical on every node
# --max-restarts MAX_RESTARTS  3                      restarts of all workers before the job fails
# --rdzv-conf C  RDZV_CONF     (none)                 e.g. last_call_timeout=5,join_timeout=900
# Anything else (or everything after --) goes to ddp.train.
set -euo pipefail

# The project's .venv when there is one (no need to activate it), else python3; PYTHON overrides.
VENV_PYTHON="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/python"
if [[ -x "$VENV_PYTHON" ]]; then PYTHON=${PYTHON:-$VENV_PYTHON}; else PYTHON=${PYTHON:-python3}; fi
HEAD=${HEAD:-}
PORT=${PORT:-29500}
NNODES=${NNODES:-2}
NPROC=${NPROC:-}
RDZV_ID=${RDZV_ID:-ddp-job}
MAX_RESTARTS=${MAX_RESTARTS:-3}
RDZV_CONF=${RDZV_CONF:-}
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --head) HEAD=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --nnodes) NNODES=$2; shift 2 ;;
    --nproc) NPROC=$2; shift 2 ;;
    --rdzv-id) RDZV_ID=$2; shift 2 ;;
    --max-restarts) MAX_RESTARTS=$2; shift 2 ;;
    --rdzv-conf) RDZV_CONF=$2; shift 2 ;;
    --) shift; TRAIN_ARGS+=("$@"); break ;;
    *) TRAIN_ARGS+=("$1"); shift ;;
  esac
done
if [[ -z "$HEAD" ]]; then
  echo "multinode.sh: set --head (or HEAD) to the address of the rendezvous host" >&2
  exit 2
fi
if [[ -z "$NPROC" ]]; then
  NPROC=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi

if [[ "$NNODES" == *:* ]]; then
  # An elastic job (MIN:MAX nodes). The workers restart on torchrun's shared rendezvous store
  # (ddp/group.py), but torchrun's own agents do not: with it shared, a node that joins a running
  # job leaves the next rendezvous round waiting on torchelastic/role_info keys until it times
  # out (torch 2.13). Unshared, rank 0 hosts each attempt's store at a fresh MASTER_PORT.
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
fi

exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc-per-node="$NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint="$HEAD:$PORT" --rdzv-id="$RDZV_ID" \
  ${RDZV_CONF:+--rdzv-conf="$RDZV_CONF"} \
  --max-restarts="$MAX_RESTARTS" \
  -m ddp.train "${TRAIN_ARGS[@]}"
