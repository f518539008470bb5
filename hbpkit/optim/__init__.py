"""Optimizers that consume the curvature hbpkit attaches to parameters.

* :class:`NewtonCG`: per-block damped Newton steps by conjugate gradients on the
  exact products (``GGNMP``, ``HMP``, ``PCHMP``) or on Kronecker factors, with the
  block splitting of the HBP paper.
* :class:`KroneckerPreconditioner`: K-FAC-style steps with moving averages of the
  factors and factored Tikhonov damping.
* :class:`ISAAC`, :class:`FOOF`, :class:`SubsampledNaturalGradient`: ISAAC's
  ``zeta`` / ``zeta*``, gradient descent on neurons, and the exact Woodbury natural
  gradient (``optim/isaac.py``, ``optim/foof.py``, ``optim/natural_gradient.py``).
* :class:`GroupedNewton`: per-subset learning rates from the summary Hessian and
  third-order terms (``optim/grouped_newton.py``).
* :class:`DistributedKroneckerPreconditioner`, :class:`DistributedNewtonCG`: the same
  steps under ``torch.distributed`` (``optim/distributed.py``).
* :func:`cg`: the batched conjugate-gradient solver behind ``NewtonCG``.

Each optimizer's ``.extensions`` lists the extensions its step needs::

    with backprop(*opt.extensions):
        loss.backward()
    opt.step()
"""

from hbpkit.optim.cg import CGInfo, cg
from hbpkit.optim.distributed import DistributedKroneckerPreconditioner, DistributedNewtonCG
from hbpkit.optim.foof import FOOF
from hbpkit.optim.grouped_newton import GroupedNewton
from hbpkit.optim.isaac import ISAAC
from hbpkit.optim.kronecker import KroneckerPreconditioner
from hbpkit.optim.natural_gradient import SubsampledNaturalGradient
from hbpkit.optim.newton_cg import NewtonCG

__all__ = [
    "CGInfo",
    "DistributedKroneckerPreconditioner",
    "DistributedNewtonCG",
    "FOOF",
    "GroupedNewton",
    "ISAAC",
    "KroneckerPreconditioner",
    "NewtonCG",
    "SubsampledNaturalGradient",
    "cg",
]
