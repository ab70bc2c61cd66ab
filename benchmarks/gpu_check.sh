#!/usr/bin/env bash
# What the lent GPU should check, in phases that each fit one device call; logs and tables go to $OUT.
#   bash benchmarks/gpu_check.sh tests   GPU tests (forward, backward, training through the backend);
#                                        about 6 min on an H100, mostly Triton compiles
#   bash benchmarks/gpu_check.sh model   quickstart on SmolLM2 in bf16 and fp32 (when ~/smol/m.gguf is
#                                        there, see the device notes), tune on the CLI then a pure cache
#                                        hit; about 8.5 min
#   bash benchmarks/gpu_check.sh bench   attention forward / forward+backward benchmark (D128 at two
#                                        lengths took 1.5 min; the full grid is longer), Llama prefill
#   bash benchmarks/gpu_check.sh saa     SAA tests, quality on SmolLM2, SAA benchmark
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/attncompiler-gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
export ATTNCOMPILER_CACHE_DIR="$OUT/cache"
gguf=()
[ -f ~/smol/m.gguf ] && gguf=(--gguf ~/smol/m.gguf)
status=0
case "${1:-tests}" in
  tests)
    python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 || status=1
    ;;
  model)
    for dtype in bfloat16 float32; do
      python3 examples/quickstart.py "${gguf[@]}" --dtype $dtype 2>&1 | grep -v "it/s" \
        | tee "$OUT/quickstart_$dtype.log" | tail -9 || status=1
    done
    for run in first second; do
      start=$SECONDS
      python3 -m attncompiler tune --shapes 1x32x4096x128 4x16x2048x64 --kv-heads 8 --causal 2>&1 | tee "$OUT/tune_$run.log" | tail -8 || status=1
      echo "$run tune: $((SECONDS - start)) s"
    done
    ;;
  bench)
    python3 benchmarks/attention.py --dtypes bfloat16 ${BENCH_ARGS:-} --out "$OUT/attention.md" 2>&1 | tail -45 || status=1
    python3 benchmarks/llama_prefill.py --out "$OUT/llama.md" 2>&1 | tail -10 || status=1
    ;;
  saa)
    python3 -m pytest tests/test_saa.py -q -p no:cacheprovider 2>&1 | tail -5 || status=1
    python3 examples/saa_quality.py "${gguf[@]}" --out "$OUT/saa_quality.md" 2>&1 | tail -30 || status=1
    python3 benchmarks/saa.py --no-record 2>&1 | tee "$OUT/saa_bench.md" | tail -20 || status=1
    ;;
  *) echo "unknown phase $1 (tests, model, bench or saa)"; exit 2 ;;
esac
exit $status
