"""Import torchvision's model code with a CPU-only torch.

The torchvision 0.28.0 wheel on the package index is built against CUDA; its C++
extension does not load with the CPU build of torch, so the operators it would define
are missing and ``import torchvision`` fails in ``torchvision/_meta_registrations.py``
(``torch.library.register_fake("torchvision::nms")``: "operator torchvision::nms does
not exist"). Only the detection operators ``nms`` and ``qnms`` are registered there
without a guard; their schemas are those of torchvision's ``csrc/ops/nms.cpp`` and
``csrc/ops/quantized/cpu/qnms_kernel.cpp``. Defining the two schemas (no kernels: the
models used here never call them) before the import is enough for ``torchvision.models``.

Install torchvision without its dependencies, so that pip never touches torch:
``pip install --no-deps torchvision==0.28.0`` (``scripts/install.sh``).
"""

from __future__ import annotations

import types

import torch

SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_LIBRARY: list[torch.library.Library] = []  # kept alive: dropping it deletes the schemas


def _define_missing_schemas() -> None:
    missing = [name for name in SCHEMAS if not _has_op(name)]
    if not missing:
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for name in missing:
        lib.define(SCHEMAS[name])
    _LIBRARY.append(lib)


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def import_torchvision() -> types.ModuleType:
    """``torchvision``, imported after the missing operator schemas are defined.

    Raises ``ImportError`` when torchvision is not installed.
    """
    _define_missing_schemas()
    import torchvision

    return torchvision
