#!/usr/bin/env bash
# Install hbpkit with its test dependencies into the current Python environment.
# torch is pinned to the CPU build first, so nothing below pulls CUDA packages;
# BackPACK (our test oracle) is installed without its torchvision dependency.
# torchvision (the model zoo of tests/models uses its ResNet and MobileNet code) is
# installed without dependencies: the wheel is built against CUDA, pip must not touch
# torch; tests/models/torchvision_shim.py makes it importable with the CPU torch.
# curvlinops (benchmarks/models.py) is installed under scripts/constraints.txt, which pins
# torch and torchvision, so its dependencies (BackPACK -> torchvision) cannot replace them.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PYTHON:-python3} -m pip"
$PIP install --quiet --disable-pip-version-check "torch==2.13.0"
$PIP install --quiet --disable-pip-version-check -e ".[test]"
$PIP install --quiet --disable-pip-version-check --no-deps backpack-for-pytorch==1.7.1 unfoldNd
$PIP install --quiet --disable-pip-version-check --no-deps torchvision==0.28.0
$PIP install --quiet --disable-pip-version-check -c scripts/constraints.txt curvlinops-for-pytorch
