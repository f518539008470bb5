"""The block-diagonal operator of the per-parameter products ``p.ggnmp`` / ``p.hmp`` /
``p.pchmp`` (``hbpkit.extensions.GGNMP``, ``HMP``, ``PCHMP``) over the flattened
parameters: ``diag(C_1, ..., C_n)`` with ``C_i`` the exact block of parameter ``i``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from hbpkit.operators.base import CurvatureOperator

SAVEFIELDS = {"ggnmp": "GGNMP", "hmp": "HMP", "pchmp": "PCHMP"}  # savefield: extension


class BlockDiagonalOperator(CurvatureOperator):
    """``diag(C_1, ..., C_n)`` from the block products attached by a backward pass.

    Args:
        params: parameters that carry ``savefield`` (after ``loss.backward()`` inside
            ``backprop(GGNMP())``, say), in the order of the flat vector.
        savefield: ``"ggnmp"``, ``"hmp"`` or ``"pchmp"``.

    The products use the forward data of that pass and the parameters' values then
    (``hbpkit.extensions.curvmatprod``): use the operator before the parameters change.
    """

    def __init__(self, params: Sequence[nn.Parameter], savefield: str = "ggnmp") -> None:
        if savefield not in SAVEFIELDS:
            raise ValueError(f"savefield={savefield!r} is not one of {tuple(SAVEFIELDS)}")
        params = list(params)
        missing = [tuple(p.shape) for p in params if not callable(getattr(p, savefield, None))]
        if missing:
            raise ValueError(
                f"parameters of shapes {missing} have no {savefield!r}: run loss.backward() "
                f"inside backprop({SAVEFIELDS[savefield]}()) first"
            )
        super().__init__(params)
        self.savefield = savefield

    def _matmat(self, V: list[Tensor]) -> list[Tensor]:
        return [getattr(p, self.savefield)(v) for p, v in zip(self.params, V)]
