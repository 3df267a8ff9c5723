#!/usr/bin/env bash
# Downloads into .whl/ the wheels that bench/gpu.sh installs on a GPU machine that has torch, transformers, peft and
# accelerate but not datasets or trl (Python 3.12, x86-64); transformers too, since this project needs 5.24 and
# such an image held 5.17 (its pyarrow 25 is new enough for datasets). Run where pip reaches PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 trl==1.16.0 transformers==5.24.0
ls .whl
