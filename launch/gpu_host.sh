#!/usr/bin/env bash
# Runs a command on one multi-GPU host. By default one process drives every GPU (JAX's usual single-host mode);
# with --processes N, N processes (one per GPU, CUDA_VISIBLE_DEVICES=i) form one JAX group through a localhost
# coordinator, as on a multi-host cluster. Exits non-zero if any process fails; logs in LOG_DIR (default logs/).
#
#   launch/gpu_host.sh -- python -m infinity_jax.train --config configs/infinity.py:size=2b,res=0.06M,batch=64 \
#       --workdir runs/2b --config.mesh.fsdp=-1 --config.mesh.data=1 …
#   launch/gpu_host.sh --processes 8 -- python -m infinity_jax.train …
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/common.sh"
processes=1
if [ "${1:-}" = "--processes" ]; then processes=$2; shift 2; fi
[ "${1:-}" = "--" ] || usage_error "usage: $0 [--processes N] -- COMMAND…"
shift
[ $# -ge 1 ] || usage_error "no command after --"
if [ "$processes" = 1 ]; then
  run "$@"
  exit
fi
port=${COORDINATOR_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
log_dir=${LOG_DIR:-logs}
mkdir -p "$log_dir"
pids=()
for ((i = 0; i < processes; i++)); do
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "CUDA_VISIBLE_DEVICES=$i JAX_COORDINATOR_ADDRESS=localhost:$port JAX_NUM_PROCESSES=$processes JAX_PROCESS_ID=$i $(printf '%q ' "$@")"
    continue
  fi
  CUDA_VISIBLE_DEVICES=$i JAX_COORDINATOR_ADDRESS=localhost:$port JAX_NUM_PROCESSES=$processes \
    JAX_PROCESS_ID=$i "$@" > "$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed; see $log_dir/process_$i.log" >&2
    status=1
  fi
done
[ "${DRY_RUN:-0}" = 1 ] || tail -n 20 "$log_dir/process_0.log"
exit $status
