#!/usr/bin/env bash
# Kept as the record of what ran on the lent H100 (docs/results.md, docs/performance.md).
# It expects the 4 class folders copied to .gpu/simpsons and the wheels the GPU image lacks
# (grain, tyro, tensorboardX, ...) in .whl; its output is the .txt file of the same name.
# Issue 3 recipe search (ensembles, cutmix, random erasing; 3 seeds each) on the lent GPU,
# then issue 4's framework benchmark on the GPU with whatever time is left.
# Local dry run: OUT=/tmp/out EXTRA="--epochs 1" SWEEP_S=60 BENCH_S=60 bash .gpu/sweep.sh
set -u
T0=$(date +%s)
if [ -z "${SKIP_WHL:-}" ] && [ -d .whl ]; then
  python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
$PY -c "import jax, flax, optax, grain; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" 2>&1 | tee $OUT/summary.txt
nvidia-smi --query-gpu=name,memory.used --format=csv 2>/dev/null | tee -a $OUT/summary.txt
COMMON="--data .gpu/simpsons --split-by-group --no-report --no-tensorboard --workers 2 --preset simpsons"
EXTRA=${EXTRA:-}
run() {
  name=$1; shift
  start=$(date +%s)
  SPRINGFIELD_CACHE=/tmp/cache-$LANE $PY -m springfield.cli train $COMMON --workdir /tmp/runs/$name "$@" $EXTRA > /tmp/$name.log 2>&1
  rc=$?
  echo "== $name rc=$rc $(( $(date +%s) - start ))s t=$(( $(date +%s) - T0 ))s :: $*" >> $OUT/summary.txt
  grep -E "^epoch|Done|rror" /tmp/$name.log | tail -2 >> $OUT/summary.txt
  { echo "===== $name"; grep -v "^input wait" /tmp/$name.log; } >> $OUT/logs.txt
}
lane() {
  LANE=$1; shift
  for s in 0 1 2; do run ${LANE}_s$s --seed $s "$@"; done
}
lane base &
lane ens2 --ensemble 2 --epochs 50 &
lane cutmix --cutmix 1.0 &
lane erase --erase 0.5 &
lane ens2cut --ensemble 2 --epochs 50 --cutmix 1.0 &
lane ens3 --ensemble 3 --epochs 33 &
wait
echo "SWEEP DONE t=$(( $(date +%s) - T0 ))s" >> $OUT/summary.txt
LEFT=$(( ${BUDGET_S:-545} - ($(date +%s) - T0) ))
echo "bench gets ${LEFT}s" >> $OUT/summary.txt
if [ $LEFT -gt 40 ]; then
  timeout $LEFT $PY benchmarks/frameworks.py --data .gpu/simpsons \
    --frameworks springfield,torch-eager,torch-compile \
    --configs refcnn:64:32,refcnn:128:128,refcnn:64:128,seed:160x120:32 \
    --repeats 3 --repeat-seconds 1 --warmup 0.5 --pause 0.1 \
    --json $OUT/frameworks-gpu.json --markdown $OUT/frameworks-gpu.md > $OUT/bench.log 2>&1
  echo "bench rc=$? t=$(( $(date +%s) - T0 ))s" >> $OUT/summary.txt
fi
