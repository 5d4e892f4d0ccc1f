#!/usr/bin/env bash
# The GPU numbers of attnbench's fast paths, in one command on a CUDA machine:
#
#   scripts/gpu_fast_paths.sh [RUN_DIR]      (default runs/gpu-fast-paths)
#
# Installs nothing: run it inside the project's environment (pip install -e .
# with a CUDA build of torch and triton). It first runs the GPU tests of the
# kernels (parity of the Triton QuadTree kernel and the compiled FlexAttention
# paths against the float32 references), then sweeps the "scaling" preset
# (16x16 .. 384x384 tokens, dim 128, 4 heads, batch 1, bf16, fwd and fwd+bwd):
#
#   RUN_DIR/quadtree   quadtree (top-K 8, 3 levels) on impl reference, fast and triton
#   RUN_DIR/full       full attention through SDPA (impl fast), the baseline
#   RUN_DIR/windowed   swin (window 8, which divides every map of the preset) and
#                      pooling (MViTv2 defaults) through SDPA with a materialised
#                      bias (impl fast) and through FlexAttention (impl flex)
#   RUN_DIR/biased     full attention with a relative-position bias table
#                      (bias_table 384) through SDPA with the (h, N, N) bias
#                      materialised (impl fast; expect oom at large maps) and
#                      through FlexAttention reading the table (impl flex)
#
# and writes RUN_DIR/report.html (latency, peak memory, achieved TFLOP/s and %
# of the GPU's bf16 peak per point, speed-ups against full attention, fitted
# scaling exponents) plus the summary table as RUN_DIR/summary.md. The aims the
# numbers are checked against, per point, bf16, fwd and fwd+bwd:
#   - quadtree triton at least 3x faster than quadtree reference, peak memory
#     linear in tokens (memory exponent ~1);
#   - quadtree (top-K 8) faster than full/SDPA from 128x128 tokens upward;
#   - swin and pooling on flex no slower than on fast, and using less memory;
#   - full/SDPA at 40% or more of the GPU's bf16 peak from 64x64 tokens upward.
# A killed run resumes where it stopped when the command is run again.
set -euo pipefail

OUT="${1:-runs/gpu-fast-paths}"
cd "$(dirname "$0")/.."

python - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("scripts/gpu_fast_paths.sh needs a CUDA GPU (torch.cuda.is_available() is False)")
print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
PY

# Correctness first: no number is worth taking from a kernel that disagrees with its reference.
python -m pytest -q -m gpu tests/attentions/test_kernels_quadtree.py tests/attentions/test_flex.py

mkdir -p "$OUT"
attnbench sweep --preset scaling --mechanism quadtree --impl reference,fast,triton --knob topk=8 --out "$OUT/quadtree"
attnbench sweep --preset scaling --mechanism full --impl fast --out "$OUT/full"
attnbench sweep --preset scaling --mechanism swin,pooling --impl fast,flex --knob window=8 --out "$OUT/windowed"
attnbench sweep --preset scaling --mechanism full --impl fast,flex --knob bias_table=384 --out "$OUT/biased"

RUNS=("$OUT/quadtree" "$OUT/full" "$OUT/windowed" "$OUT/biased")
attnbench report "${RUNS[@]}" --out "$OUT/report.html"
attnbench report "${RUNS[@]}" --format md | tee "$OUT/summary.md"
echo "report: $OUT/report.html"
