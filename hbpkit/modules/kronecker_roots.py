"""The un-multiplied roots of the Kronecker factors of ``Linear`` and ``Conv1d/2d/3d``.

A weight's Kronecker factors (docs/user-guide.md, Conventions: ``kron(G, A)`` in ``p.flatten()``
order) are products of two tall matrices whose rows are samples (and positions):

* ``A = a^T a / b`` with the layer inputs ``a`` ``[b, n]`` (ISAAC eq. 14, S.8c);
* ``G = g_bar^T g_bar`` with the output-side roots ``g_bar`` ``[r * b, m]``: the
  sqrt factors of the output curvature at the layer output (ISAAC eq. 14 up to
  the loss reduction, which hbpkit keeps inside ``g_bar``).

Rows, for an input ``[N, *, D]`` to ``Linear`` (``T`` positions) or ``[N, C_in,
*in]`` to a convolution (``P`` output positions, ``a``'s rows the unfolded
patches ``u_{n,p}`` of eq. S.14), following ``kfac_approx``:

* ``"expand"``: one row per sample and position, ``b = N T`` (or ``N P``);
  ``a[(n, t)] = x_{n,t}`` and ``g_bar[(v, n, t)] = s_{v,n,t}``;
* ``"reduce"``: one row per sample, ``b = N``; ``a[n] = mean_t x_{n,t}`` and
  ``g_bar[(v, n)] = sum_t s_{v,n,t}``.

Multiplied out, these are exactly the factors of ``hbpkit/modules/linear.py`` and
``hbpkit/modules/conv/kronecker.py`` for the same sqrt factors. The same row maps applied
to the gradient at the layer output (``grad_output``) give ``g`` ``[b, m]`` with
``g^T a = grad_W`` for ``"expand"`` (for ``"reduce"`` with ``T > 1`` that sum is
not the gradient). A bias column (a trailing 1 in every row of ``a``) folds the
bias into the weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hbpkit.core.calls import ModuleCall, describe
from hbpkit.modules.losses import _scale
from hbpkit.modules.roles import per_role

#: losses whose reduction factor is per element (else per sample), see ``modules/losses.py``
_PER_ELEMENT = (nn.MSELoss, nn.BCEWithLogitsLoss)


def _with_bias_column(a: Tensor) -> Tensor:
    """``[b, n] -> [b, n + 1]``: a trailing 1 per row (the bias folded into the weight)."""
    return torch.cat([a, torch.ones_like(a[:, :1])], dim=1)


def _rows(t: Tensor, approx: str) -> Tensor:
    """``[*lead, N, T, m] -> [prod(lead) * N * T, m]`` (expand) or ``[prod(lead) * N, m]``."""
    if approx == "reduce":
        t = t.sum(-2)
    return t.reshape(-1, t.shape[-1])


def reduction_scale(call: ModuleCall) -> float:
    """The loss's reduction factor ``c`` (``L = c sum_n l_n``): ``1/N``, ``1/numel`` or ``1``.

    The empirical roots are ``g_bar = g / sqrt(c)``: the per-sample output gradients of
    ``L`` are ``g_n = c dl_n/dz_n``, and ``c sum_n (dl_n/dz)(dl_n/dz)^T = g^T g / c``.
    """
    module = call.module
    if not isinstance(module, (*_PER_ELEMENT, nn.CrossEntropyLoss)):
        raise NotImplementedError(
            f"empirical Kronecker roots need the reduction factor of {type(module).__name__}; "
            "supported: MSELoss, CrossEntropyLoss, BCEWithLogitsLoss"
        )
    return _scale(call, per_element=isinstance(module, _PER_ELEMENT))


class KroneckerRootRoles:
    """What the root extensions take per parameter role (a mixin of the Linear and Conv
    rules): the weight's input root and input factor, the bias's constant input ``1``."""

    def validate_roots(self, call: ModuleCall, per_group: bool = False) -> None:
        """Refuse, before the pass, a layer whose roots are not one pair ``(a, g_bar)``;
        ``per_group``: the extension needs only the factors, which may be per group."""

    param_input_root = per_role("param_input_root")
    param_input_factor = per_role("param_input_factor")
    kron_of_output_factor = per_role("kron_of_output_factor")

    def param_input_root_weight(self, call: ModuleCall, approx: str, bias_column: bool) -> Tensor:
        return self.input_root(call, approx, bias_column)

    def param_input_root_bias(self, call: ModuleCall, approx: str, bias_column: bool) -> None:
        return None  # the bias's input is the constant 1: no root

    def param_input_factor_weight(self, call: ModuleCall, approx: str, param: Tensor) -> Tensor:
        return self.input_factor(call, approx)

    def param_input_factor_bias(self, call: ModuleCall, approx: str, param: Tensor) -> Tensor:
        return torch.ones(1, 1, dtype=param.dtype, device=param.device)  # [[1]]

    def kron_of_output_factor_weight(self, call: ModuleCall, G: Tensor, approx: str) -> list:
        """``[G, A]`` (S.8c, S.14)."""
        return [G, self.input_factor(call, approx)]

    def kron_of_output_factor_bias(self, call: ModuleCall, G: Tensor, approx: str) -> list:
        """``[G]`` (the bias folded into the weight as an input 1)."""
        return [G]


class LinearRoots(KroneckerRootRoles):
    """Kronecker roots of ``nn.Linear`` on ``[N, *, D_in]`` (S.8c, one row per position);
    a mixin of :class:`~hbpkit.modules.linear.LinearRules`."""

    def positions(self, call: ModuleCall) -> int:
        """``T``, the positions that share the weight (1 for a ``[N, D_in]`` input)."""
        return self._x(call).shape[1]

    def input_root(self, call: ModuleCall, approx: str, bias_column: bool = False) -> Tensor:
        """``a``: ``[N T, D_in]`` (expand) or ``[N, D_in]`` (reduce), ``A = a^T a / b``."""
        x = self._x(call)  # [N, T, D_in]
        a = x.mean(1) if approx == "reduce" else x.reshape(-1, x.shape[-1])
        return _with_bias_column(a) if bias_column else a

    def output_rows(self, call: ModuleCall, t: Tensor, lead: int, approx: str) -> Tensor:
        """``[*lead, N, *, D_out] -> [rows, D_out]``: rows ``(*lead, n, t)`` or ``(*lead, n)``."""
        t = t.reshape(*t.shape[: lead + 1], -1, t.shape[-1])  # [*lead, N, T, D_out]
        return _rows(t, approx)


class ConvRoots(KroneckerRootRoles):
    """Kronecker roots of ``nn.Conv1d/2d/3d`` with ``groups=1`` (eq. S.14, one row per patch);
    a mixin of :class:`~hbpkit.modules.conv.ConvRules`.

    With ``groups > 1`` the rows of ``a`` (all input channels) and ``g_bar`` (all output
    channels) are not the roots of the per-group factors (hbpkit/modules/conv/kronecker.py),
    so :class:`KroneckerRoots` refuses them; the factors alone (``InputCovariance``,
    ``EmpiricalKFAC``) come per group: ``A_g`` of the group's patches, ``G_g`` the diagonal
    blocks of ``g_bar^T g_bar``.
    """

    def validate_roots(self, call: ModuleCall, per_group: bool = False) -> None:
        if call.module.groups != 1 and not per_group:
            raise NotImplementedError(
                f"Kronecker roots of {describe(call.module)} (groups={call.module.groups}) are not "
                "supported: a grouped convolution has one input factor per group (KFAC, KFLR, "
                "KFRA, HBP, EmpiricalKFAC and InputCovariance give its factors per group)"
            )

    def kron_of_output_factor_weight(self, call: ModuleCall, G: Tensor, approx: str) -> list:
        """``[G, A]`` (S.14), per group for ``groups > 1`` (the diagonal blocks of ``G``)."""
        return self._weight_kron(call, G, approx)

    def positions(self, call: ModuleCall) -> int:
        """``P``, the output positions that share the kernel."""
        return self.unfold(call).shape[2]

    def input_root(self, call: ModuleCall, approx: str, bias_column: bool = False) -> Tensor:
        """``a``: the patches ``[N P, C_in prod(k)]`` (expand) or their means ``[N, ...]``."""
        u = self.unfold(call)  # [N, S, P]
        a = u.mean(2) if approx == "reduce" else u.transpose(1, 2).reshape(-1, u.shape[1])
        return _with_bias_column(a) if bias_column else a

    def output_rows(self, call: ModuleCall, t: Tensor, lead: int, approx: str) -> Tensor:
        """``[*lead, N, C_out, *out] -> [rows, C_out]``, rows ``(*lead, n, p)`` / ``(*lead, n)``."""
        t = t.flatten(lead + 2).transpose(-1, -2)  # [*lead, N, P, C_out]
        return _rows(t, approx)
