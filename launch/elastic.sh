#!/usr/bin/env bash
# An elastic job: starts once MIN nodes have joined, admits more up to MAX, and keeps
# going when a node leaves (workers restart and resume from the newest checkpoint).
#
#   HEAD=node0 bash launch/elastic.sh --out /shared/runs/x     # on each node, 1 to 4 of them
#   HEAD=node0 NNODES=2:8 bash launch/elastic.sh
#
# After MIN nodes are in, the rendezvous waits last_call_timeout (RDZV_CONF, default
# 30 s here) for more before it starts. Other settings as in multinode.sh.
set -euo pipefail
export NNODES=${NNODES:-1:4}
export RDZV_CONF=${RDZV_CONF:-last_call_timeout=30}
exec bash "$(dirname "$0")/multinode.sh" "$@"
