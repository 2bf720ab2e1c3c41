#!/usr/bin/env bash
# The scaling study of benchmarks/RESULTS.md (issue #10) on emoji3d, in steps that each fit one GPU call:
#
#   benchmarks/scaling_emoji3d.sh DATA/metadata.jsonl WORK OUT STEP...
#
# STEP is any of
#   tokenizer  a d32 BSQ-VAE from scratch at RES for TOKENIZER_MINUTES (the recipe of the 28.9 dB run), into
#              WORK/tok/tokenizer; later steps need it (a fresh machine retrains it: same seed, same recipe)
#   class      the class-conditional sweep (10 emoji categories) of SIZES, TOKENS training tokens per size
#   text       the same with the short captions through a tiny T5 with random weights (no Flan-T5 offline)
#   bsc        BSC strength 0 and 0.3 at BSC_SIZE, scored also on the model's own earlier scales
#   vocab      a vocabulary sweep: for each bit depth d of VOCAB_BITS a tokenizer (as the tokenizer step) and the
#              class sweep of VOCAB_SIZES on it, fitted together (one law per d)
# Each sweep is then fitted (`infinity_jax.scaling.fit`), a sample grid is drawn per size, and the run summaries,
# metrics, fits, plots and grids are packed into OUT/study.tar.gz (one file: the device returns at most eight).
# LATENTS=1 (the default) encodes the images once per tokenizer and conditioning (`infinity_jax.data.precompute`:
# latents, labels, T5 features) and trains every size on those records; LATENTS=0 decodes and encodes the images in
# every step (the sweeps are then bound by JPEG/WebP decoding, not the GPU).
# SWEEP_MINUTES=M stops each sweep after M minutes (checkpointed; the same command resumes it) and SAMPLES=0 skips
# the grids, so the study can be done in several GPU calls; PARALLEL=1 trains every size of a sweep (and draws every
# grid) as its own process at once, which fills one large GPU with these small models.
# CPU smoke run: HOLDOUT=3 WORKERS=0 TOKENIZER=random SIZES=depth1+depth2 TOKENS=2000 RES=0.004M DTYPE=float32 BATCH=8 \
#   benchmarks/scaling_emoji3d.sh tests/assets/emoji3d/set/metadata.jsonl /tmp/study /tmp/study_out class
set -euo pipefail
data=$1 work=$2 out=$3
shift 3
python=${PYTHON:-python3}
res=${RES:-0.016M}
sizes=${SIZES:-depth2+depth3+depth4+depth6+depth8}
tokens=${TOKENS:-4e6}
bsc_size=${BSC_SIZE:-depth4}
vocab_bits=${VOCAB_BITS:-16 32}
vocab_sizes=${VOCAB_SIZES:-depth2+depth3+depth4}
tokenizer=${TOKENIZER:-d32}
minutes=${TOKENIZER_MINUTES:-3.5}
workers=${WORKERS:-12}
dtype=${DTYPE:-bfloat16}
batch=${BATCH:-64}
holdout=${HOLDOUT:-20}
sweep_minutes=${SWEEP_MINUTES:-0}
draw=${SAMPLES:-1}
parallel=${PARALLEL:-0}
latents=${LATENTS:-1}
summary="$work/summary"
mkdir -p "$summary" "$out"
common=(--config.data.workers="$workers" --config.data.holdout_every="$holdout")
classes=(--class_id 0 --class_id 1 --class_id 2 --class_id 3 --class_id 4 --class_id 5 --class_id 6 --class_id 7
  --class_id 8 --class_id 9)
text_args=(--config.text.checkpoint=random --config.text.tokenizer=tests/assets/t5_tokenizer/tokenizer.json)
random_tokenizer=0
[ "$tokenizer" = random ] && tokenizer=tiny random_tokenizer=1
use_tokenizer() {  # the tokenizer's workdir: sets tok_dir and tok_args (random weights for TOKENIZER=random)
  tok_dir=$1
  if [ "$random_tokenizer" = 1 ]; then tok_args=(--config.tokenizer.checkpoint=random)
  else tok_args=(--config.tokenizer.checkpoint="$tok_dir/tokenizer"); fi
}
use_tokenizer "$work/tok"

data_args() {  # config arguments (cond=…) -> sets data_args: the images, or their records encoded once
  if [ "$latents" = 0 ]; then data_args=(--config.data.path="$data"); return; fi
  local records="$tok_dir/latents_${1//[=,]/_}"
  if [ ! -f "$records/index.json" ]; then
    local extra=()
    [[ $1 == *cond=text* ]] && extra=("${text_args[@]}")
    $python -m infinity_jax.data.precompute --out "$records.$BASHPID" \
      --config "configs/scaling.py:$1,res=$res,tokenizer=$tokenizer,dtype=$dtype" --config.data.path="$data" \
      "${tok_args[@]}" "${extra[@]}"
    # Steps run at once may encode the same records: the first to finish keeps its copy.
    mv -T "$records.$BASHPID" "$records" 2>/dev/null || rm -rf "$records.$BASHPID"
  fi
  data_args=(--config.data.source=array_record --config.data.path="$records" --config.data.precomputed=True)
}

sweep() {  # name, sizes, config arguments, extra flags...
  local name=$1 names=$2 args=$3
  shift 3
  data_args "$args"
  local train=($python -m infinity_jax.scaling.sweep --workdir "$work/$name" --config \
    "configs/scaling.py:sizes=$names,$args,res=$res,tokenizer=$tokenizer,tokens=$tokens,dtype=$dtype,batch=$batch" \
    "${common[@]}" "${data_args[@]}" "${tok_args[@]}" --max_minutes="$sweep_minutes" "$@")
  if [ "$parallel" = 1 ]; then
    mkdir -p "$work/$name"
    for size in ${names//+/ }; do "${train[@]}" --only="$size" > "$work/$name/$size.log" 2>&1 & done
    wait
  else
    "${train[@]}"
  fi
  $python -m infinity_jax.scaling.fit "$work/$name"/*/ --out "$summary/$name" | tee "$summary/$name.txt" || true
  $python -m infinity_jax.scaling.fit "$work/$name"/*/ --metric eval/last_scale_loss --out "$summary/$name-last" \
    > "$summary/$name-last.txt" || true
  for run in "$work/$name"/*/; do
    local size
    size=$(basename "$run")
    mkdir -p "$summary/$name/$size"
    cp "$run/run.json" "$run/metrics.jsonl" "$summary/$name/$size/"
  done
}

samples() {  # name, sampler arguments...
  local name=$1
  shift
  [ "$draw" = 1 ] || return 0
  for run in "$work/$name"/*/; do
    local draw_one=($python -m infinity_jax.sample --run "$run" --out "$work/samples/$name/$(basename "$run")" --cfg 3
      --seed 0 --batch 10 "$@")
    if [ "$parallel" = 1 ]; then "${draw_one[@]}" > /dev/null & else "${draw_one[@]}" > /dev/null; fi
  done
  wait
  for run in "$work/$name"/*/; do
    cp "$work/samples/$name/$(basename "$run")/grid.png" "$summary/$name/$(basename "$run")/samples.png"
  done
}

source "$(dirname "$0")/tokenizer_recipe.sh"
train_tokenizer() {  # workdir, bits (0: the layout's)
  [ "$random_tokenizer" = 1 ] && return 0  # TOKENIZER=random: random weights, nothing to train
  $python -m infinity_jax.train_tokenizer --workdir "$1" \
    --config "configs/tokenizer.py:tokenizer=$tokenizer,bits=$2,res=$res,batch=32" "${common[@]}" \
    --config.data.path="$data" \
    "${tokenizer_recipe[@]}" --config.train.log_every=500 --config.eval.resolutions="('$res',)"
}

for step in "$@"; do
  case $step in
    tokenizer)
      train_tokenizer "$work/tok" 0
      [ "$random_tokenizer" = 1 ] || cp "$work/tok/metrics.jsonl" "$summary/tokenizer_metrics.jsonl"
      ;;
    class)
      sweep class "$sizes" cond=class,classes=10
      samples class "${classes[@]}"
      ;;
    text)
      sweep text "$sizes" cond=text "${text_args[@]}"
      samples text --prompt "red apple" --prompt "smiling face with sunglasses" --prompt "rocket" \
        --prompt "pizza" --prompt "flag of japan" --prompt "cat face" --prompt "red heart" --prompt "globe" \
        --prompt "thumbs up" --prompt "snowman"
      ;;
    bsc)
      for strength in 0.0 0.3; do
        sweep "bsc$strength" "$bsc_size" cond=class,classes=10 --config.bsc.strength="$strength" \
          --config.eval.free_running=True &
        [ "$parallel" = 1 ] || wait
      done
      wait
      samples bsc0.0 "${classes[@]}"
      samples bsc0.3 "${classes[@]}"
      ;;
    vocab)
      for bits in $vocab_bits; do
        train_tokenizer "$work/tok_d$bits" "$bits"
        use_tokenizer "$work/tok_d$bits"
        sweep "vocab_d$bits" "$vocab_sizes" "cond=class,classes=10,bits=$bits"
      done
      $python -m infinity_jax.scaling.fit "$work"/vocab_d*/*/ --out "$summary/vocab" | tee "$summary/vocab.txt" || true
      ;;
    *)
      echo "unknown step $step (tokenizer, class, text, bsc, vocab)" >&2
      exit 2
      ;;
  esac
done
tar -czf "$out/study.tar.gz" -C "$work" summary
