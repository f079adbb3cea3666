#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md in one go (one H100/H200; bf16 compute, fp32 parameters).
# Usage: benchmarks/gpu_suite.sh OUTDIR [part...]   parts: attention fusednorm train128 train512 infer  (default: all)
# Each part writes OUTDIR/<part>.log and OUTDIR/<part>.json; a failing part does not stop the others.
# Sized for one 15-minute device loan: the per-part timeouts add up to 8 minutes (60 + 30 + 200 + 120 + 70 s).
set -u
OUT=${1:?usage: gpu_suite.sh OUTDIR [part...]}; shift
PARTS=${*:-attention fusednorm train128 train512 infer}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PYTHON:-python3}
# An environment whose flax is not 0.12.x gets the wheel carried in .whl/ (flax-narrow needs flax 0.12).
if ! $PY -c "import flax, sys; sys.exit(not flax.__version__.startswith('0.12'))"; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/flax-0.12.*.whl && export PYTHONPATH=/tmp/site
fi
$PY -c "import flax_narrow.train.flops" 2>/dev/null || \
  $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$OUT/device.txt"
B="$PY benchmarks/bench_throughput.py --dtype bfloat16 --attention-dropout 0 --steps 10 --rounds 3"
run() { local name=$1 limit=$2; shift 2; echo "== $name: $*"; timeout "$limit" "$@" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"; }
for part in $PARTS; do
  case $part in
    attention) timeout 60 $PY benchmarks/check_gpu_attention.py --batch 32 --lengths 128,512 2>&1 | tee "$OUT/attention.log" ;;
    # the fused LayerNorm + dropout + residual kernels (Triton) at BERT-base's B=128, L=128 rows: first checked
    # against the jnp form on the device (values and gradients; the part fails if they disagree), then timed
    # beside the modules' path and the jnp form, forward + backward
    fusednorm) run fusednorm 30 $PY benchmarks/bench_dropout_norm.py --what norm --rows 16384 --hidden 768 \
        --dtype bfloat16 --steps 20 --rounds 5 ;;
    # the levers of issue 15 beside their baselines, in one run: fused QKV, vocabulary padding
    train128) run train128 200 $B --lengths 128 --batch 128 --attention-impl cudnn --torch eager \
        --models bert-base,bert-base:fuse_qkv=true/vocab_pad_multiple=128,narrowbert-base,narrowbert-base:fuse_qkv=true ;;
    train512) run train512 120 $B --lengths 512 --batch 32 --attention-impl cudnn --torch none \
        --models bert-base,narrowbert-base,narrowbert-base:fuse_narrow_kv=true ;;
    infer) run infer_cls 70 $B --mode infer-cls --lengths 512 --batch 128 --attention-impl cudnn --torch eager \
        --models bert-base,narrowbert-base ;;
    *) echo "unknown part $part" ;;
  esac
done
