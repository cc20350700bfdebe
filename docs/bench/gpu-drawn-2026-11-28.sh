#!/usr/bin/env bash
# Kept as the record of what ran on the lent H100 (docs/results.md, docs/performance.md).
# It expects the 4 class folders copied to .gpu/simpsons and the wheels the GPU image lacks
# (grain, tyro, tensorboardX, ...) in .whl; its output is the .txt file of the same name.
# Issue 3, second GPU call: do erasing, cutmix or a 2-model ensemble change the accuracy on the
# built-in drawn set (drawing-style proxy)? Two seeds each, 8 lanes at once.
set -u
T0=$(date +%s)
if [ -z "${SKIP_WHL:-}" ] && [ -d .whl ]; then
  python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
EXTRA=${EXTRA:-}
one() {
  name=$1; seed=$2; shift 2
  SPRINGFIELD_CACHE=/tmp/cache-$name-$seed $PY benchmarks/accuracy.py --data .gpu/simpsons --seeds $seed \
    --markdown /tmp/$name-$seed.md -- --workers 1 "$@" $EXTRA > /tmp/$name-$seed.log 2>&1
  echo "== $name seed $seed rc=$? t=$(( $(date +%s) - T0 ))s :: $*" >> $OUT/summary.txt
  tail -1 /tmp/$name-$seed.md >> $OUT/summary.txt
  { echo "===== $name $seed"; grep -v "^input wait" /tmp/$name-$seed.log; } >> $OUT/logs.txt
}
for s in 0 1; do
  one base $s &
  one erase $s --erase 0.5 &
  one cutmix $s --cutmix 1.0 &
  one ens2 $s --ensemble 2 --epochs 50 &
done
wait
echo "ALL DONE t=$(( $(date +%s) - T0 ))s" >> $OUT/summary.txt
