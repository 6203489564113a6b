#!/usr/bin/env bash
# One node: one process per GPU (NCCL), or NPROC CPU processes (gloo, default 2).
#
#   bash launch/train_ddp.sh --epochs 3 --out runs/demo     # extra arguments go to ddp.train
#   NPROC=4 bash launch/train_ddp.sh                        # 4 processes
#   MASTER_PORT=29500 bash launch/train_ddp.sh              # a fixed port (default: a free one)
#   MAX_RESTARTS=0 bash launch/train_ddp.sh                 # fail at the first crash
#
# Workers that crash are restarted MAX_RESTARTS times (default 3; plain torchrun's
# default is 0) and resume from the newest complete checkpoint.
set -euo pipefail

# The project's .venv when there is one (no need to activate it), else python3; PYTHON overrides.
VENV_PYTHON="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/python"
if [[ -x "$VENV_PYTHON" ]]; then PYTHON=${PYTHON:-$VENV_PYTHON}; else PYTHON=${PYTHON:-python3}; fi
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
MAX_RESTARTS=${MAX_RESTARTS:-3}

if [[ -n "${MASTER_PORT:-}" ]]; then
  if ! "$PYTHON" - "$MASTER_PORT" <<'PY'
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError as e:
    sys.exit(f"train_ddp.sh: MASTER_PORT={sys.argv[1]} is already in use ({e.strerror}); "
             "pick another port, or unset MASTER_PORT to let torchrun choose a free one")
PY
  then exit 2
  fi
  ENDPOINT="localhost:${MASTER_PORT}"
else
  ENDPOINT="localhost:0"  # the OS picks a free port: two jobs on one host never collide
fi

exec "$PYTHON" -m torch.distributed.run \
  --nnodes=1 --nproc-per-node="$NPROC" \
  --rdzv-backend=c10d --rdzv-endpoint="$ENDPOINT" --rdzv-id="ddp-$$" \
  --max-restarts="$MAX_RESTARTS" \
  -m ddp.train "$@"
