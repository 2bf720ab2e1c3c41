#!/usr/bin/env bash
# Submits a command as an XPK workload on a GKE TPU (or GPU) cluster: every host of every slice runs it with
# INFINITY_JAX_DISTRIBUTED=1. The image must hold the package (e.g. built from this checkout with jax[tpu]).
#
#   launch/xpk.sh CLUSTER WORKLOAD DEVICE_TYPE NUM_SLICES IMAGE -- python -m infinity_jax.train \
#       --config configs/infinity.py:size=8b,res=0.25M,batch=1024 --workdir gs://bucket/runs/8b …
#   e.g. DEVICE_TYPE v5p-256 (TPU) or h100-80gb-8 (GPU); extra xpk flags in XPK_FLAGS.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
. "$here/common.sh"
[ $# -ge 6 ] || usage_error "usage: $0 CLUSTER WORKLOAD DEVICE_TYPE NUM_SLICES IMAGE -- COMMAND…"
cluster=$1 workload=$2 device=$3 slices=$4 image=$5
shift 5
[ "${1:-}" = "--" ] || usage_error "usage: $0 CLUSTER WORKLOAD DEVICE_TYPE NUM_SLICES IMAGE -- COMMAND…"
shift
case "$device" in
  v*-*) kind=(--tpu-type "$device") ;;
  *) kind=(--device-type "$device") ;;
esac
read -r -a flags <<< "${XPK_FLAGS:-}"
run xpk workload create --cluster "$cluster" --workload "$workload" "${kind[@]}" --num-slices "$slices" \
  --docker-image "$image" --command "INFINITY_JAX_DISTRIBUTED=1 $(printf '%q ' "$@")" "${flags[@]}"
