#!/usr/bin/env bash
# The GPU table of BENCHMARKS.md in one command, on one H100/H200 (about 8 minutes): ours on the Llama-3.2-1B shape
# (full fine-tuning, eager and model.compile), the HF Trainer with padding and TRL's SFTTrainer with BFD packing on
# the same model and data, and ours with LoRA r=16 on every linear layer of the Llama-3.1-8B shape. Random-init
# models from bench/models/*.json (no downloads), bf16, 1,500 long-tailed synthetic chats (median 600 tokens).
#
#   bash bench/wheels.sh              # where pip reaches PyPI: the wheels a bare GPU machine lacks, into .whl/
#   bash bench/gpu.sh                 # on the GPU machine, .whl/ beside: also /tmp/sft-gpu-table.md
#   bash bench/gpu.sh --device cpu    # the same table with tiny shapes on CPU (tests/test_bench.py)
set -euo pipefail
cd "$(dirname "$0")/.."
device=cuda
if [ "${1:-}" = "--device" ]; then device=$2; fi
if [ -d .whl ]; then  # the wheels of bench/wheels.sh, over the image's packages
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/sft-site .whl/*.whl
  export PYTHONPATH=/tmp/sft-site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 bench/bench_sft.py --gpu-table --device "$device" --work /tmp/sft-gpu-bench --out /tmp/sft-gpu-table.md
