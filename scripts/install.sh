#!/usr/bin/env bash
# Install hbpkit with its test dependencies into the current Python environment.
# torch is pinned to the CPU build first, so nothing below pulls CUDA packages;
# BackPACK (our test oracle) is installed without its torchvision dependency.
# torchvision (the model zoo of tests/models uses its ResNet and MobileNet code) is
# installed without dependencies: the wheel is built against CUDA, pip must not touch
# torch; tests/models/torchvision_shim.py makes it importable with the CPU torch.
# curvlinops (benchmarks/models.py) is installed under scripts/constraints.txt (pins torch
# and torchvision) and without its dependency opt_einsum: where opt_einsum is importable,
# torch.einsum reorders contractions and returns tensors of other strides, and torch.kron
# fails on such a non-contiguous factor (tests/extensions/test_against_backpack.py, KFRA).
# laplace-torch (hbpkit.integrations.laplace, the hbpkit[laplace] extra) likewise without
# dependencies: only those its imports need (asdfghjkl ships the `asdl` package that
# laplace/baselaplace.py imports; torchmetrics; tqdm); its opt_einsum is left out for the
# same reason (examples/_laplace_env.py stands in for its one use).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PYTHON:-python3} -m pip"
$PIP install --quiet --disable-pip-version-check "torch==2.13.0"
$PIP install --quiet --disable-pip-version-check -e ".[test]"
$PIP install --quiet --disable-pip-version-check --no-deps backpack-for-pytorch==1.7.1 unfoldNd
$PIP install --quiet --disable-pip-version-check --no-deps torchvision==0.28.0
$PIP install --quiet --disable-pip-version-check -c scripts/constraints.txt --no-deps \
    curvlinops-for-pytorch==3.0.1 einconv==0.1.0 linear_operator==0.6.1 tqdm
$PIP install --quiet --disable-pip-version-check -c scripts/constraints.txt --no-deps \
    laplace-torch==0.3 asdfghjkl==0.1a4 torchmetrics==1.9.0 lightning-utilities==0.15.3 tqdm
