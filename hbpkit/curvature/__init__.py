"""Representations of curvature and the memory policy (layer 1: imports only ``hbpkit.core``).

* :mod:`hbpkit.curvature.factors`: per-sample sqrt factors (dense, diagonal) and residuals;
* :mod:`hbpkit.curvature.local`: sqrt factors with local columns (residuals behind convolutions);
* :mod:`hbpkit.curvature.blocks`: position blocks of a batch-averaged curvature;
* :mod:`hbpkit.curvature.kronecker`: :class:`KroneckerFactors`, what Kronecker extensions attach;
* :mod:`hbpkit.curvature.memory`: the budget for the dense tensors some rules must form.
"""
