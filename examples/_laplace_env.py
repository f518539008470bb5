"""Import laplace-torch in this project's environment (CPU torch, no opt_einsum).

Two things stand in the way, neither of them laplace's use of hbpkit:

* torchmetrics (laplace imports it) imports torchvision where it is installed; the
  torchvision wheel on the package index is built against CUDA, and with the CPU build of
  torch its ``import`` fails registering ``torchvision::nms`` ("operator does not
  exist"). Defining the schemas of ``nms`` and ``qnms`` first (as
  ``tests/models/torchvision_shim.py`` does) lets it import.
* ``laplace/utils/matrix.py`` imports ``opt_einsum`` at import time for one
  ``oe.contract`` call (``KronDecomposed.diag``). opt_einsum is not installed here on
  purpose (where importable, it changes ``torch.einsum``'s output strides); a stand-in
  module whose ``contract`` is ``torch.einsum`` serves that call. It is put in
  ``sys.modules`` only when opt_einsum is not installed, after torch was imported (torch
  decided then that opt_einsum is absent, and keeps its own einsum path).
"""

from __future__ import annotations

import importlib.util
import sys
import types

import torch

_LIBRARY: list = []  # keeps the defined schemas alive
SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def import_laplace() -> types.ModuleType:
    """``laplace``; raises ``ImportError`` when laplace-torch is not installed."""
    if importlib.util.find_spec("laplace") is None:
        raise ImportError("laplace-torch is not installed: pip install hbpkit[laplace]")
    if importlib.util.find_spec("torchvision") is not None:
        missing = [name for name in SCHEMAS if not _has_op(name)]
        if missing:
            lib = torch.library.Library("torchvision", "FRAGMENT")
            for name in missing:
                lib.define(SCHEMAS[name])
            _LIBRARY.append(lib)
    if "opt_einsum" not in sys.modules and importlib.util.find_spec("opt_einsum") is None:
        stand_in = types.ModuleType("opt_einsum")
        stand_in.contract = torch.einsum
        sys.modules["opt_einsum"] = stand_in
    import laplace

    return laplace
