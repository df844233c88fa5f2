#!/usr/bin/env bash
# The GPU checks, as one script for a GPU machine lent for a few minutes (docs/gpu.md says what each stage measured).
#
#   STAGES="lite0 infer vit convnext" DATA=<dataset folder> OUT=<results folder> bash scripts/gpu_check.sh
#   STAGES=cv DATA=... OUT=... bash scripts/gpu_check.sh          # the grouped-CV sweeps of docs/experiments.md
#
# Stages (each in its own time limit, so one failure does not cost the others):
#   env      versions of Python, torch, transformers, the GPU
#   lite0    `accelerate launch train.py`: the shipped recipe on the GPU, 50 epochs with early stopping
#   infer    Predictor latency (batch 1) and throughput (batch 64) on the GPU: benchmarks/gpu.py
#   vit      a real-size ViT-B/16 (random init) fine-tuned for a few hundred steps, without and with --torch_compile
#   convnext the same for ConvNeXt-Tiny, eager only
#   cv       grouped 5-fold CV x 2 seeds of $CV_RECIPES, one process per recipe and seed, all at once
#            (no ONNX copy per fold: the CV scores come from the PyTorch forward either way)
# Every stage's log, metrics and records are packed into $OUT/results.tar.gz after each stage, and the
# GPU-trained Lite0 folder (without its ONNX copy) into $OUT/lite0-gpu.tar.gz.
# Dry run on a CPU: CUDA_VISIBLE_DEVICES= EXTRA_TRAIN="--epochs 1 --max_train_samples 64" EXTRA_CV="--epochs 1 --max_train_samples 60" ...
set -u
DATA=${DATA:-data/bone-break}
OUT=${OUT:-runs/gpu-check}
RUNS=${RUNS:-/tmp/gpu-runs}
STAGES=${STAGES:-"env lite0 infer cv vit"}
WORKERS=${WORKERS:-8}
CV_WORKERS=${CV_WORKERS:-1}
EXTRA_TRAIN=${EXTRA_TRAIN:-}
EXTRA_CV=${EXTRA_CV:-}
CV_RECIPES=${CV_RECIPES-"baseline no_class_weights res320 lite1"}  # the earlier ideas #14 asks to re-judge
CV_RECIPES_NICE=${CV_RECIPES_NICE-"relabel_cleanlab"}  # at lower CPU priority, done if time allows; CV_RECIPES_NICE= (empty) runs none
CV_SEEDS=${CV_SEEDS:-"42 43"}
CV_NOTE=${CV_NOTE:-"GPU, images resized to a 384 px long side"}
LIMIT_LITE0=${LIMIT_LITE0:-150} LIMIT_INFER=${LIMIT_INFER:-45} LIMIT_CV=${LIMIT_CV:-240} LIMIT_VIT=${LIMIT_VIT:-70} LIMIT_COMPILE=${LIMIT_COMPILE:-80}
VIT_EPOCHS=${VIT_EPOCHS:-15}  # 14 steps of 64 images per epoch
mkdir -p "$OUT" "$RUNS/logs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MARK=$(mktemp) # records newer than this were written by this run

pack() {
  find benchmarks/results -newer "$MARK" -type f > "$RUNS/new-records.txt"
  tar czf "$OUT/results.tar.gz.part" -C "$RUNS" logs $(cd "$RUNS" && ls -d */metrics.json */log_history.json */cv.json */*/cv.json gpu-inference.json 2>/dev/null) \
    -C "$PWD" $(cat "$RUNS/new-records.txt") 2>/dev/null; mv "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
}

stage() {  # stage NAME LIMIT COMMAND...: run with a time limit, log to logs/NAME.log, report rc and seconds
  local name=$1 limit=$2 started rc
  shift 2
  echo "=== $name (limit ${limit}s) starts $(date -u +%T)"
  started=$(date +%s)
  timeout --signal=INT --kill-after=15 "$limit" bash -c '"$@"' _ "$@" > "$RUNS/logs/$name.log" 2>&1
  rc=$?
  echo "=== $name rc=$rc wall=$(( $(date +%s) - started ))s"
  grep -E "Error|error:|Traceback" "$RUNS/logs/$name.log" | tail -5
  tail -c 1500 "$RUNS/logs/$name.log" | tr '\r' '\n' | tail -8
  pack
}

train() {  # train NAME [train.py flags]: one accelerate process on the one GPU
  local name=$1
  shift
  accelerate launch --num_processes 1 --num_machines 1 --dynamo_backend no train.py --data_dir "$DATA" \
    --num_workers "$WORKERS" --output_dir "$RUNS/$name" --overwrite_output_dir "$@" $EXTRA_TRAIN
}

vit_like() {  # vit_like ARCH NAME [flags]: random-init real-size model, a few hundred steps, no checkpoints kept
  local arch=$1 name=$2
  shift 2
  [ -d "$RUNS/$arch-init" ] || python -m benchmarks.gpu init --arch "$arch" --out "$RUNS/$arch-init" || return
  train "$name" --model "$RUNS/$arch-init" --epochs "$VIT_EPOCHS" --batch_size 64 --early_stopping_patience 0 \
    --save_strategy no --load_best_model_at_end false --no_export_onnx --evaluate_test false "$@"
}

cv_sweeps() {  # one process per recipe and seed, all at once (the GPU has room; the CPU cores feed them)
  local recipe seed pids=() failed=0
  trap 'kill "${pids[@]}" 2>/dev/null; exit 124' INT TERM  # a stage's time limit must stop the runs it started, too
  for recipe in $CV_RECIPES $CV_RECIPES_NICE; do
    local niceness=0
    [[ " $CV_RECIPES_NICE " == *" $recipe "* ]] && niceness=15
    for seed in $CV_SEEDS; do
      OMP_NUM_THREADS=1 nice -n "$niceness" python -m bonebreak experiments --recipes "$recipe" --cv 5 --seed "$seed" --data_dir "$DATA" \
        --work_dir "$RUNS/cv" --results_dir benchmarks/results --table_path "$RUNS/experiments-$recipe-$seed.md" \
        --train_flags "--dataloader_num_workers $CV_WORKERS --no_export_onnx" --note "$CV_NOTE" $EXTRA_CV \
        > "$RUNS/logs/cv-$recipe-$seed.log" 2>&1 &
      pids+=($!)
    done
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  return $failed
}

export -f train vit_like cv_sweeps
export DATA RUNS WORKERS CV_WORKERS EXTRA_TRAIN EXTRA_CV CV_RECIPES CV_RECIPES_NICE CV_SEEDS CV_NOTE VIT_EPOCHS
for s in $STAGES; do
  case $s in
    env) stage env 60 bash -c 'python -V; python -c "import torch, transformers, timm, datasets, accelerate; print(torch.__version__, transformers.__version__, timm.__version__, datasets.__version__, accelerate.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"; nvidia-smi -L || true' ;;
    lite0)
      stage lite0 "$LIMIT_LITE0" train lite0-gpu --epochs 50
      [ -f "$RUNS/lite0-gpu/model.safetensors" ] && tar czf "$OUT/lite0-gpu.tar.gz" -C "$RUNS" --exclude=model.onnx lite0-gpu ;;
    infer) stage infer "$LIMIT_INFER" python -m benchmarks.gpu inference --model_path "$RUNS/lite0-gpu" --data_dir "$DATA" --out "$RUNS/gpu-inference.json" ;;
    vit)
      stage vit-eager "$LIMIT_VIT" vit_like vit_base vit-eager
      stage vit-compile "$LIMIT_COMPILE" vit_like vit_base vit-compile --torch_compile ;;
    convnext) stage convnext-eager "$LIMIT_VIT" vit_like convnext_tiny convnext-eager ;;
    cv) stage cv "$LIMIT_CV" cv_sweeps ;;
    *) echo "unknown stage $s" ;;
  esac
done
echo "=== done $(date -u +%T)"
