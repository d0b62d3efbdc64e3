#!/usr/bin/env bash
# The wheels bench/gpu_check.sh needs on the lent GPU machine, in .whl/ (carry it): the shared
# set (../shared/gpu/fetch-wheels.sh: DeepSpeed, webdataset, submitit and their needs) plus
# torchao for the FP8 steps, at the version pyproject.toml's `fp8` extra allows.
set -euo pipefail
top=$(git rev-parse --show-toplevel); cd "$top"
shared=${SHARED_FETCH:-../shared/gpu/fetch-wheels.sh}
[ -x "$shared" ] || [ -f "$shared" ] || { echo "no $shared (the shared GPU notes beside the checkout)" >&2; exit 1; }
bash "$shared"
spec=$(python3 -c 'import re,sys; t=open("pyproject.toml").read(); print(re.search(r"^fp8 = \[\"([^\"]+)\"\]", t, re.M).group(1))')
python3 -m pip download -q --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --only-binary=:all: --no-deps -d .whl "$spec"
ls -1 .whl | grep -i torchao
