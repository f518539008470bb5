#!/usr/bin/env bash
# Install hbpkit with its test dependencies into the current Python environment.
# torch is pinned to the CPU build first, so nothing below pulls CUDA packages;
# BackPACK (our test oracle) is installed without its torchvision dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PYTHON:-python3} -m pip"
$PIP install --quiet --disable-pip-version-check "torch==2.13.0"
$PIP install --quiet --disable-pip-version-check -e ".[test]"
$PIP install --quiet --disable-pip-version-check --no-deps backpack-for-pytorch==1.7.1 unfoldNd
