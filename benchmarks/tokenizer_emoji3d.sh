#!/usr/bin/env bash
# The GPU tokenizer run of benchmarks/RESULTS.md: a d32 BSQ-VAE trained from scratch at 128² on emoji3d for a fixed
# wall-clock budget (compilation and evaluations included), then its held-out reconstructions at 128² and 256²
# saved as uint8 .npz chunks in OUT/recon128, OUT/recon256 (`benchmarks/tokenizer_heldout.py rfid` computes rFID
# from them where the Inception weights are), with the metrics and the last reconstruction grids.
#
#   benchmarks/tokenizer_emoji3d.sh DATA/metadata.jsonl WORKDIR OUT [MINUTES]
# (ARGS=tokenizer=tiny,res=0.004M,batch=4 HOLDOUT=6 for a CPU smoke run on tests/assets/emoji3d/set)
set -euo pipefail
data=$1 workdir=$2 out=$3 minutes=${4:-7}
python=${PYTHON:-python3}
config="configs/tokenizer.py:${ARGS:-tokenizer=d32,res=0.016M,batch=32}"
holdout=${HOLDOUT:-20}
source "$(dirname "$0")/tokenizer_recipe.sh"
$python -m infinity_jax.train_tokenizer --config "$config" --workdir "$workdir" \
  --config.data.path="$data" --config.data.holdout_every="$holdout" --config.data.workers=12 \
  "${tokenizer_recipe[@]}" --config.train.log_every=100 --config.eval.resolutions="('0.016M','0.06M')"
for res in 0.016M 0.06M; do
  size=$([ $res = 0.016M ] && echo 128 || echo 256)
  $python benchmarks/tokenizer_heldout.py reconstruct --config "$config" --tokenizer "$workdir/tokenizer" \
    --data "$data" --holdout_every "$holdout" --res $res --chunk 90 --out "$out/recon$size"
  ls -t "$workdir"/samples/recon_${size}_*.png | head -1 | xargs -I{} cp {} "$out/"
done
cp "$workdir/metrics.jsonl" "$out/"
