#!/usr/bin/env bash
# One device session (H200): benchmarks of the fast step, then RecPO configurations of the CPU recipe run side
# by side for the number of steps 12 minutes of CPU training afford each of them, evaluated on the same seeded
# 200 valid / 200 test users (with reasoning), plus a GPU-sized recipe. Results come back as one tarball.
# Dry run on a CPU: DRY=1 DATA_ARGS="--kcore 80" bash reports/ml-100k-gpu2/run_gpu.sh
set -u
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RECPO_CACHE=${RECPO_CACHE:-/tmp/recpo} OMP_NUM_THREADS=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
DRY=${DRY:-0}
PY=${PY:-python3}
DATA=data/ml-100k-w5${DRY:+}
[ "$DRY" = 1 ] && DATA=data/ml-100k-dry
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start ))s] $*"; }

stamp "prepare data"
$PY -m data_prep movielens --window-size 5 --out $DATA ${DATA_ARGS:-} > /dev/null || exit 1
$PY -c "from recipes.modeling import resolve_model_path as r; print(r('embedded/SmolLM2-135M-Instruct'))" || exit 1

if [ "$DRY" != 1 ]; then
  stamp "bench: embedded SmolLM2-135M, CPU recipe sizes, fast path"
  timeout 120 $PY -m benchmarks step -- --variant after --steps 6 2>&1 | grep -v "it/s\|s/it\|batch/s" | tail -12
  stamp "bench: no-reasoning step"
  timeout 90 $PY -m benchmarks step -- --variant after --steps 6 --reasoning false 2>&1 | grep -v "it/s\|s/it\|batch/s" | tail -8
  stamp "bench: Qwen2.5-0.5B shape, bf16, 16 users x 4 rollouts x 128 tokens"
  timeout 150 $PY -m benchmarks step -- --variant after --shape qwen2.5-0.5b --bf16 --users 16 --generations 4 \
      --new-tokens 128 --steps 4 --tokenizer ${RECPO_CACHE}/models/SmolLM2-135M-Instruct 2>&1 | grep -v "it/s\|s/it\|batch/s" | tail -12
fi

S() { if [ "$DRY" = 1 ]; then echo 1; else echo "$1"; fi; }  # step counts (1 in a dry run)
USERS=$([ "$DRY" = 1 ] && echo 4 || echo 200)
COMMON="--config recipes/configs/smollm2-135m/movielens/recpo.yaml --data_dir $DATA --report_to none --bf16 false \
  --save_strategy no --eval_strategy no --max_eval_users $USERS --max_test_users $USERS --eval_batch_users 100 \
  --log_completions false --logging_steps 10 --time_budget_minutes 30 --disable_dropout true --recompute_prompts false"
run() {  # name, extra args...
  local name=$1; shift
  timeout ${RUN_TIMEOUT:-420} $PY recipes/recpo.py $COMMON --output_dir runs/$name "$@" > logs/$name.log 2>&1
  echo "$name exit $?" >> logs/exit_codes.txt
}
mkdir -p runs logs
stamp "first run (fills the untrained evaluation cache)"
run recpo --max_steps $(S 105) &
for i in $(seq 1 90); do [ -d $RECPO_CACHE/evaluations ] && ls $RECPO_CACHE/evaluations | grep -qv partial && break; sleep 2; done
stamp "cache ready; the other runs start"
run recpo-logq --max_steps $(S 105) --item_logq_correction true &
run w100-logq --item_warmup_steps $(S 100) --max_steps $(( $(S 100) + $(S 65) )) --item_logq_correction true &
run w180-logq --item_warmup_steps $(S 180) --max_steps $(( $(S 180) + $(S 32) )) --item_logq_correction true &
run w250-logq --item_warmup_steps $(S 250) --max_steps $(( $(S 250) + $(S 4) )) --item_logq_correction true &
run w180-paper --item_warmup_steps $(S 180) --max_steps $(( $(S 180) + $(S 32) )) &
run w180-logq-relabel2 --item_warmup_steps $(S 180) --max_steps $(( $(S 180) + $(S 32) )) --item_logq_correction true --relabel_topk 2 &
run w180-logq-lr6e4 --item_warmup_steps $(S 180) --max_steps $(( $(S 180) + $(S 32) )) --item_logq_correction true --learning_rate 6e-4 &
run w100-logq-neg16 --item_warmup_steps $(S 100) --max_steps $(( $(S 100) + $(S 23) )) --item_logq_correction true --item_negatives 16 &
run noreason-logq --reasoning false --max_steps $(S 260) --item_logq_correction true &
# A GPU-sized recipe: 16 users a step, 32 uniform negatives, a long warm-up, then RecPO; 5 minutes of training.
run gpu-w-neg32 --per_device_train_batch_size 32 --item_warmup_steps $(S 1500) --max_steps $(S 3000) \
    --item_logq_correction true --item_negatives 32 --time_budget_minutes $([ "$DRY" = 1 ] && echo 30 || echo 3.5) &
wait
stamp "all runs done"
cat logs/exit_codes.txt
for d in runs/*/; do
  n=$(basename $d)
  $PY - "$d" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
try:
    after, before = json.loads((d / "results.json").read_text()), json.loads((d / "results_before.json").read_text())
except OSError as err:
    print(d.name, "no results", err); sys.exit()
from recipes.intervals import align_by_sample_index, paired_differences, format_difference
for split in ("valid", "test"):
    a = align_by_sample_index(before["per_user"][split], after["per_user"][split])
    diff = paired_differences(a.ranks_a, a.ranks_b)
    r = sum(a.ranks_b) / len(a.ranks_b)
    print(f"{d.name:<22}{split:<6} after: mean rank {float(r):7.1f} hit@20 {after[split]['hit@20']:.3f} ndcg@10 {after[split]['ndcg@10']:.4f}"
          f" | paired change: {format_difference(diff['mean_rank'], 'mean_rank')}, {format_difference(diff['ndcg@20'], 'ndcg@20')}")
PY
done
$PY -m recipes.baselines popularity --data $DATA --max-users $USERS --out runs/popularity.json 2>&1 | tail -4
stamp "pack"
tar czf $OUT/gpu_runs.tgz runs/*/results*.json runs/*/trainer_state.json runs/popularity.json logs 2>/dev/null
ls -la $OUT
