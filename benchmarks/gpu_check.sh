#!/usr/bin/env bash
# Everything the lent GPU should check, in one call: install, GPU tests, the quickstart on SmolLM2 (when ~/smol/m.gguf is
# there, see the device notes), and the attention benchmark. Logs go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/attncompiler-gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -c "import torch, triton; print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
status=0
python3 -m pytest tests/test_gpu.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 || status=1
if [ -f ~/smol/m.gguf ]; then
  python3 examples/quickstart.py --gguf ~/smol/m.gguf 2>&1 | grep -v "it/s" | tee "$OUT/quickstart.log" | tail -12 || status=1
fi
python3 benchmarks/attention.py ${BENCH_ARGS:-} --out "$OUT/attention.md" 2>&1 | tail -20 || status=1
exit $status
