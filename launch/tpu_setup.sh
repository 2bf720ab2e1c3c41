#!/usr/bin/env bash
# Sets up every worker of a TPU VM slice: the code (this checkout's HEAD, or git REPO=url), a virtualenv with
# jax[tpu] and the package. Idempotent: rerunning updates the code and reinstalls only what changed.
#
#   launch/tpu_setup.sh TPU_NAME ZONE [PROJECT]
#   REPO=https://github.com/you/infinity_jax launch/tpu_setup.sh my-v5p-64 us-east5-a
#
# Then: launch/tpu_run.sh TPU_NAME ZONE -- python -m infinity_jax.train --config … --workdir gs://…
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/common.sh"
[ $# -ge 2 ] || usage_error "usage: $0 TPU_NAME ZONE [PROJECT]"
tpu=$1 zone=$2 project=${3:-}
ssh=(gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all)
scp=(gcloud compute tpus tpu-vm scp --zone "$zone" --worker=all)
if [ -n "$project" ]; then ssh+=(--project "$project"); scp+=(--project "$project"); fi
remote_dir=${REMOTE_DIR:-infinity_jax}
venv=${VENV:-venv-infinity-jax}

if [ -n "${REPO:-}" ]; then
  fetch="if [ -d $remote_dir/.git ]; then git -C $remote_dir pull --ff-only; else git clone $REPO $remote_dir; fi"
else
  archive=$(mktemp --suffix=.tar.gz)
  trap 'rm -f "$archive"' EXIT
  run git -C "$here/.." archive --format=tar.gz -o "$archive" HEAD
  run "${scp[@]}" "$archive" "$tpu:infinity_jax.tar.gz"
  fetch="mkdir -p $remote_dir && tar -xzf infinity_jax.tar.gz -C $remote_dir"
fi
install="[ -x $venv/bin/python ] || python3 -m venv $venv; $venv/bin/pip install -q --upgrade pip"
install+=" && $venv/bin/pip install -q -e '$remote_dir[tpu]'"
run "${ssh[@]}" --command "set -e; $fetch; $install; $venv/bin/python -c 'import jax; print(jax.device_count(), \"devices\")'"
