#!/usr/bin/env bash
# Downloads into .whl/ the wheels that bench/gpu.sh installs on a GPU machine that has torch, transformers, peft and
# accelerate but not datasets or trl (Python 3.12, x86-64); pyarrow too, since datasets 5.2 needs
# pyarrow >= 24, newer than such an image may hold. Run where pip reaches PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyarrow==26.0.1 trl==1.16.0
ls .whl
