#!/usr/bin/env bash
# Runs one command on every worker of a TPU VM slice, inside the virtualenv of tpu_setup.sh, with
# INFINITY_JAX_DISTRIBUTED=1 (jax.distributed.initialize finds the slice itself). Output goes to ~/logs/ on each
# worker and worker 0's is streamed here. A preempted or rerun job resumes from its --workdir.
#
#   launch/tpu_run.sh TPU_NAME ZONE [--project P] -- python -m infinity_jax.train \
#       --config configs/infinity.py:size=2b,res=0.06M,batch=256 --workdir gs://bucket/runs/2b \
#       --config.mesh.fsdp=-1 --config.mesh.data=1 --config.data.path='gs://bucket/data/*.jsonl'
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/common.sh"
[ $# -ge 2 ] || usage_error "usage: $0 TPU_NAME ZONE [--project P] -- COMMAND…"
tpu=$1 zone=$2
shift 2
extra=()
if [ "${1:-}" = "--project" ]; then extra=(--project "$2"); shift 2; fi
[ "${1:-}" = "--" ] || usage_error "usage: $0 TPU_NAME ZONE [--project P] -- COMMAND…"
shift
[ $# -ge 1 ] || usage_error "no command after --"
remote_dir=${REMOTE_DIR:-infinity_jax} venv=${VENV:-venv-infinity-jax}
command=$(printf '%q ' "$@")
log="logs/\$(date +%Y%m%d-%H%M%S).log"
remote="mkdir -p logs; cd $remote_dir; source ../$venv/bin/activate; export INFINITY_JAX_DISTRIBUTED=1;"
remote+=" $command 2>&1 | tee ../$log"
run gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all "${extra[@]}" --command "$remote"
