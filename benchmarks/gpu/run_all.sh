#!/usr/bin/env bash
# Every GPU benchmark in one go (one H100/H200), each under its own time limit, logs in $OUT.
#
#   OUT=gpu-logs bash benchmarks/gpu/run_all.sh            # from the repository root
#
# Python packages the machine lacks (soundfile, rapidfuzz) may be given as wheels in .whl/.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

run() {  # name, seconds, command...  (ONLY=a,b runs just those)
  local name=$1 limit=$2
  [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]] && return 0
  shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - start)) s"
  grep -v -E "Warning|warnings.warn|^\s*$" "$OUT/$name.log" | tail -n "${TAIL:-14}"
}

run train_fsdp 150 $PY benchmarks/gpu/train_fsdp.py
run train_packing 140 $PY benchmarks/gpu/train_packing.py
run detokenizer 90 $PY benchmarks/gpu/detokenizer_full.py
run train_full_size 90 $PY benchmarks/gpu/train_full_size.py --skip-zero3
run speech_tokenizer 60 $PY benchmarks/gpu/speech_tokenizer_full.py --batch 1,16,64 --pieces 64
run train_deepspeed 300 $PY benchmarks/gpu/train_deepspeed.py
