#!/usr/bin/env bash
# What the lent GPU should check, in phases that each fit one device call; logs and tables go to $OUT.
# Several phases may run in one call (bash benchmarks/gpu_check.sh tests tune).
#   tests   GPU tests (forward in both forms, backward, training through the backend); about 6 min on
#           an H100, mostly Triton compiles; TESTS_K="backward or trains" runs a subset, TEST_FILES
#           other files (tests/test_kernel.py runs the forward's CPU tests on the GPU)
#   model   quickstart on SmolLM2 in bf16 and fp32 (when ~/smol/m.gguf is there, see the device notes)
#   tune    attncompiler tune on SmolLM2 (real weights, 2K tokens) and on the Llama model of
#           benchmarks/llama_prefill.py at 4K, each run twice: the second run must be a pure cache hit
#   attention  forward / forward+backward benchmark (BENCH_ARGS narrows it; D128 at two lengths
#           took 1.5 min)
#   llama   Llama prefill against its peers (LLAMA_ARGS, e.g. "--train")
#   bench   attention, then llama
#   sweep   launch-config sweep of the dense kernels at one shape (SWEEP_ARGS, e.g. "--causal --passes bwd")
#   anatomy where the dense forward's time goes: probes, ceilings, SASS, host against GPU time (D128, S=4096,
#           causal and not; D64 and D128 at S=1024, causal, where the forward is slow)
#   saa     SAA tests, quality on SmolLM2 (SAA_QUALITY_ARGS), SAA benchmark (SAA_ARGS), the op site after site
#           (with and without CUDA graphs), and when the model is there on SmolLM2's own inputs and its
#           prefill through the backend with and without SAA
# The tuning cache lives in ~/attncompiler-gpu-cache, so later calls on a warm machine reuse what tune
# found; a copy (without the converted model checkpoints) lands in $OUT/cache.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/attncompiler-gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
export ATTNCOMPILER_CACHE_DIR=${ATTNCOMPILER_CACHE_DIR:-$HOME/attncompiler-gpu-cache}
gguf=()
if [ -f ~/smol/m.gguf ]; then
  gguf=(--gguf ~/smol/m.gguf)
  export SMOLLM2_GGUF=~/smol/m.gguf
fi
status=0
phases=$(echo "${@:-tests}" | sed 's/\bbench\b/attention llama/')
for phase in $phases; do
  start=$SECONDS
  case "$phase" in
    tests)
      python3 -m pytest ${TEST_FILES:-tests/test_gpu.py tests/test_tma.py} -q -p no:cacheprovider ${TESTS_K:+-k "$TESTS_K"} 2>&1 \
        | tee "$OUT/gpu_tests.log" | tail -15 || status=1
      ;;
    model)
      for dtype in bfloat16 float32; do
        python3 examples/quickstart.py "${gguf[@]}" --dtype $dtype 2>&1 | grep -v "it/s" \
          | tee "$OUT/quickstart_$dtype.log" | tail -9 || status=1
      done
      ;;
    tune)
      for target in smollm2 llama_4k llama_16k; do
        runs="first second"
        [ $target = llama_16k ] && runs=first  # for the 16K prefill; the cache hit is shown at 4K
        for run in $runs; do
          begin=$SECONDS
          python3 -m attncompiler tune "examples/tune_targets.py:$target" 2>&1 | grep -v "it/s" \
            | tee "$OUT/tune_${target}_$run.log" | tail -8 || status=1
          echo "$target $run tune: $((SECONDS - begin)) s"
        done
      done
      ;;
    attention)
      python3 benchmarks/attention.py --dtypes bfloat16 ${BENCH_ARGS:-} --out "$OUT/attention.md" 2>&1 | tail -45 || status=1
      ;;
    llama)
      python3 benchmarks/llama_prefill.py ${LLAMA_ARGS:-} --out "$OUT/llama.md" 2>&1 | tail -10 || status=1
      ;;
    anatomy)
      for shape in "" "--causal" "--seq 1024 --head-dim 64 --causal" "--seq 1024 --causal"; do
        python3 benchmarks/forward_anatomy.py $shape 2>&1 | tee -a "$OUT/anatomy.md" | tail -14 || status=1
      done
      ;;
    sweep)
      python3 benchmarks/kernel_sweep.py ${SWEEP_ARGS:-} 2>&1 | grep -v "^  " | tee -a "$OUT/sweep.md" | tail -30 || status=1
      ;;
    saa)
      python3 -m pytest tests/test_saa.py tests/test_saa_graphs.py tests/test_saa_hopper.py -q -p no:cacheprovider 2>&1 | tail -5 || status=1
      python3 examples/saa_quality.py "${gguf[@]}" ${SAA_QUALITY_ARGS:-} --out "$OUT/saa_quality.md" 2>&1 | tail -30 || status=1
      python3 benchmarks/saa.py --no-record ${SAA_ARGS:-} 2>&1 | tee "$OUT/saa_bench.md" | tail -20 || status=1
      python3 benchmarks/saa_sites.py --no-record 2>&1 | tee "$OUT/saa_sites.md" | tail -6 || status=1
      if [ -f ~/smol/m.gguf ]; then  # and on SmolLM2's own queries, keys and values
        python3 benchmarks/saa.py --no-record --smollm2 ~/smol/m.gguf --seqs 4096 8192 2>&1 \
          | tee "$OUT/saa_bench_smollm2.md" | tail -8 || status=1
        python3 benchmarks/llama_prefill.py --smollm2 ~/smol/m.gguf --seqs 4096 8192 --saa '{}' \
          --only attncompiler "attncompiler + SAA" sdpa --out "$OUT/saa_prefill_smollm2.md" 2>&1 | tail -6 || status=1
      fi
      ;;
    *) echo "unknown phase $phase (tests, model, tune, attention, llama, bench, sweep, anatomy or saa)"; exit 2 ;;
  esac
  echo "phase $phase: $((SECONDS - start)) s"
done
mkdir -p "$OUT/cache"
for entry in "$ATTNCOMPILER_CACHE_DIR"/*; do  # all but the converted model checkpoints (hundreds of MB)
  [ "$(basename "$entry")" = models ] || cp -r "$entry" "$OUT/cache/" 2>/dev/null
done
exit $status
