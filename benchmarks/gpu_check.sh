#!/bin/bash
# Issue 19's GPU check: benchmarks/frameworks.py and benchmarks/endtoend.py, unchanged, on a
# lent GPU machine that has its own jax, torch and CUDA but not the rest of springfield's
# needs, and no network. Two steps:
#
#   bash benchmarks/gpu_check.sh prepare   # here: wheels into .whl/, the 4 classes into .gpu/
#   bash benchmarks/gpu_check.sh run       # there (carry .whl and .gpu; results under $OUT)
#
# `prepare` downsizes the pictures to 144 px (both sides train at 64 px) so that they travel
# (the folders are ignored by git: add `/.whl/` and `/.gpu/` to .git/info/exclude).
set -u
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    $plat -d .whl grain==0.2.18 array_record==0.8.6 portpicker==1.6.0 tyro==1.0.17 \
    docstring_parser==0.18.0 typeguard==4.6.1 tensorboardX==2.6.5 flax==0.12.8 optax==0.2.8 \
    orbax-checkpoint==0.12.8
  python3 - <<'PY'
from pathlib import Path
from PIL import Image
src, dst = Path("../shared/data/simpsons"), Path(".gpu/simpsons4")
for c in ("bart_simpson", "homer_simpson", "lisa_simpson", "marge_simpson"):
    (dst / c).mkdir(parents=True, exist_ok=True)
    for f in sorted((src / c).iterdir()):
        with Image.open(f) as im:
            im = im.convert("RGB")
            im.thumbnail((144, 144), Image.BILINEAR)
            im.save(dst / c / (f.stem + ".jpg"), quality=92)
PY
  du -sh .whl .gpu ;;
run)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
  # Each JAX process takes 75% of the GPU's memory at start by default; frameworks.py keeps
  # two JAX workers alive at once.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=.15
  mkdir -p /tmp/bin
  printf '#!/bin/sh\nexec python3 -c "import sys; from springfield.cli import main; sys.argv[0] = \\"springfield\\"; sys.exit(main())" "$@"\n' > /tmp/bin/springfield
  chmod +x /tmp/bin/springfield
  export PATH=/tmp/bin:$PATH
  { nvidia-smi -L; nproc; python3 -c "import jax, flax, grain, torch; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, jax.devices())"; } 2>&1 | tee $OUT/env.txt
  t0=$(date +%s)
  timeout "${FW_S:-250}" python3 benchmarks/frameworks.py \
    --frameworks springfield,springfield-bf16,torch-eager,torch-compile,torch-eager-bf16,torch-compile-bf16 \
    --configs refcnn:64:32,resnet:64:64,refcnn:128:128 --repeats 3 --repeat-seconds 1 \
    --warmup 0.5 --pause 0.2 --json $OUT/frameworks-gpu.json --markdown $OUT/frameworks-gpu.md \
    > $OUT/frameworks.log 2>&1
  echo "frameworks rc=$? $(( $(date +%s) - t0 )) s" | tee -a $OUT/env.txt
  t0=$(date +%s)
  timeout "${E2E_S:-300}" python3 benchmarks/endtoend.py --data .gpu/simpsons4 --epochs "${EPOCHS:-8}" \
    --torch-workers 8 --torch-python python3 --springfield-python /tmp/bin/python \
    --workdir /tmp/e2e --json $OUT/endtoend-gpu.json --markdown $OUT/endtoend-gpu.md \
    > $OUT/endtoend.log 2>&1
  echo "endtoend rc=$? $(( $(date +%s) - t0 )) s" | tee -a $OUT/env.txt
  tail -30 $OUT/frameworks.log $OUT/endtoend.log ;;
*) echo "usage: bash benchmarks/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
