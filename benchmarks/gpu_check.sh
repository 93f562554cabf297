#!/usr/bin/env bash
# One prepared check for a machine with a CUDA GPU (CPU work never depends on it):
#   1. the test suite's device-relevant parts, which run on CUDA there (train.device: auto);
#   2. a 1-epoch `dvc repro` of the whole pipeline at 224 px in bf16, then in fp16 (loss scaler);
#   3. `train.deterministic: true` twice, and once streaming the splits (`train.gpu_data_gb: 0`):
#      the metrics must be identical;
#   4. training and evaluation images/s (benchmarks/bench.py on synthetic images).
#
# Usage: bash benchmarks/gpu_check.sh [DATA]   DATA: a Kaggle-layout zip or folder
# (default: a generated data set, 40 images per class and split). Needs the project's
# virtual environment (`make install`); no internet: ResNet-18 runs with weights: none.
# Prints a short report and exits non-zero at the first failed check.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
export PATH="$(dirname "$PY"):$PATH" DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1
export GIT_AUTHOR_NAME=gpu-check GIT_COMMITTER_NAME=gpu-check
export GIT_AUTHOR_EMAIL=gpu-check@example.com GIT_COMMITTER_EMAIL=gpu-check@example.com

# GPU_CHECK_ON_CPU=1 runs the same steps on the CPU (small images), to check the script itself.
SIZE=${GPU_CHECK_IMAGE_SIZE:-224}
if [ -z "${GPU_CHECK_ON_CPU:-}" ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device here')"
  "$PY" -c "import torch; print('gpu_check:', torch.__version__, torch.cuda.get_device_name(0))"
fi

echo "== 1. device-relevant tests (on CUDA)"
"$PY" -m pytest -q -p no:cacheprovider tests/test_engine.py tests/test_runtime.py tests/test_train.py \
  tests/test_mixed_precision.py tests/test_evaluation.py tests/test_ddp.py tests/test_resume.py -m "not slow"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
DATA=${1:-}
if [ -z "$DATA" ]; then
  DATA=$WORK/images
  "$PY" -c "import sys; sys.path.insert(0, 'tests'); from conftest import make_kaggle_tree; make_kaggle_tree('$DATA', per_class=40, size=256)"
  DATA=$DATA/Data
fi

# A throwaway copy of the pipeline with `params.yaml` set by KEY=VALUE pairs.
project() {
  local dir=$1; shift
  mkdir -p "$dir/.dvc"
  cp -r stages src dvc.yaml params.yaml .gitignore .dvcignore "$dir/"
  cp .dvc/config .dvc/.gitignore "$dir/.dvc/"
  "$PY" - "$dir/params.yaml" "$DATA" "$SIZE" "$@" <<'EOF'
import sys, yaml
path, data, size, *pairs = sys.argv[1:]
params = yaml.safe_load(open(path))
params["data"]["source"] = data
params["preprocess"]["image_size"] = int(size)
for section in ("train_custom", "train_extract", "train_finetune"):
    params[section]["epochs"] = 1
    if section != "train_custom":
        params[section]["weights"] = "none"
for pair in pairs:
    key, value = pair.split("=", 1)
    *parents, leaf = key.split(".")
    node = params
    for name in parents:
        node = node[name]
    node[leaf] = yaml.safe_load(value)
yaml.safe_dump(params, open(path, "w"), sort_keys=False)
EOF
  (cd "$dir" && git init -q && git add -A && git commit -qm gpu-check)
}

for amp in bf16 fp16; do
  echo "== 2. dvc repro, 1 epoch at $SIZE px, train.amp=$amp"
  project "$WORK/$amp" "train.amp=$amp"
  started=$SECONDS
  (cd "$WORK/$amp" && dvc repro >repro.log 2>&1) || { tail -40 "$WORK/$amp/repro.log"; exit 1; }
  echo "whole pipeline: $((SECONDS - started)) s"
  tr '\r' '\n' <"$WORK/$amp/repro.log" | grep -E "precision|fp32|epoch 1/1: "
  if [ -z "${GPU_CHECK_ON_CPU:-}" ]; then
    dtype=$([ "$amp" = fp16 ] && echo float16 || echo bfloat16)
    grep -q "mixed precision $dtype on cuda" "$WORK/$amp/repro.log"
  fi
  sed -n '1,12p' "$WORK/$amp/metrics/summary.md"
done

echo "== 3. train.deterministic: true, twice"
for run in a b; do
  project "$WORK/det-$run" "train.deterministic=true"
  (cd "$WORK/det-$run" && dvc repro >repro.log 2>&1) || { tail -40 "$WORK/det-$run/repro.log"; exit 1; }
done
for name in custom extract finetune ensemble; do
  cmp "$WORK/det-a/metrics/$name.json" "$WORK/det-b/metrics/$name.json"
done
echo "deterministic: metrics/*.json identical in both runs"
project "$WORK/det-stream" "train.deterministic=true" "train.gpu_data_gb=0"
(cd "$WORK/det-stream" && dvc repro >repro.log 2>&1) || { tail -40 "$WORK/det-stream/repro.log"; exit 1; }
[ -n "${GPU_CHECK_ON_CPU:-}" ] || grep -q "streaming batches from the memory-mapped splits" "$WORK/det-stream/repro.log"
for name in custom extract finetune ensemble; do
  cmp "$WORK/det-a/metrics/$name.json" "$WORK/det-stream/metrics/$name.json"
done
echo "streamed through pinned memory (train.gpu_data_gb=0): the same metrics as the splits held on the GPU"

echo "== 4. images/s"
"$PY" benchmarks/bench.py --synthetic --image-size "$SIZE" --out "$WORK/bench.json" ${GPU_CHECK_BENCH_ARGS:-}
echo "gpu_check: all checks passed"
